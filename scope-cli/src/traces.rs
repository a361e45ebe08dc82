//! `scope traces`, `scope show` and `scope ps`: traces and processes, as trees that cross
//! threads and processes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
};

use anyhow::Result;
use scope_proto::v1::{
    FindIoPeersRequest, GetTraceRequest, IoEvent, ListProcessesRequest, ListTracesRequest, Process,
    Span, TraceSummary,
};
use serde::Serialize;
use tokio_stream::StreamExt;

use crate::{
    client::{Address, Client, Credentials},
    commands::{print_json, print_lines},
    duration::format_duration_ns,
    render::{self, Table},
};

pub async fn list(
    client: &Client,
    out: &mut impl Write,
    request: ListTracesRequest,
    json: bool,
) -> Result<()> {
    let response = client
        .rpc
        .clone()
        .list_traces(request)
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    if json {
        for trace in &response.traces {
            print_json(out, &TraceJson::from(trace))?;
        }
        return Ok(());
    }
    print_lines(out, &traces_lines(&response.traces))
}

/// Every span of a trace from one daemon.
async fn trace_spans(client: &Client, trace_id: &str) -> Result<Vec<Span>> {
    let mut stream = client
        .rpc
        .clone()
        .get_trace(GetTraceRequest {
            trace_id: trace_id.to_owned(),
        })
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    let mut spans = Vec::new();
    while let Some(batch) = stream.next().await {
        spans.extend(batch.map_err(|status| client.error(status))?.spans);
    }
    Ok(spans)
}

/// How many hops across hosts `show --addr` follows.
const MAX_HOPS: usize = 8;

/// Stitches a trace across daemons: the TCP writes of the trace's calls on one host are
/// matched, on every other host, to the reads of the same bytes (same connection, same
/// sequence numbers); each call those reads caused joins the tree under the call that wrote,
/// with its whole trace on that host. Repeats for what was found, a few hops deep.
async fn stitch(clients: &[Client], trace_id: &str, spans: &mut Vec<Span>) -> Result<()> {
    // (daemon index, trace id on that daemon) still to look at.
    let mut frontier: Vec<(usize, String)> = vec![(0, trace_id.to_owned())];
    let mut seen: HashSet<(usize, String)> = frontier.iter().cloned().collect();
    let mut ids: HashSet<u64> = spans.iter().map(|s| s.span_id).collect();
    for _ in 0..MAX_HOPS {
        let mut next = Vec::new();
        for (from, trace) in &frontier {
            let source = &clients[*from];
            let io = source
                .rpc
                .clone()
                .get_trace_io(GetTraceRequest {
                    trace_id: trace.clone(),
                })
                .await
                .map_err(|status| source.error(status))?
                .into_inner()
                .io;
            let writes: Vec<IoEvent> = io.into_iter().filter(|e| e.op == "write").collect();
            if writes.is_empty() {
                continue;
            }
            for (to, other) in clients.iter().enumerate().filter(|(to, _)| to != from) {
                let peers = other
                    .rpc
                    .clone()
                    .find_io_peers(FindIoPeersRequest {
                        writes: writes.clone(),
                    })
                    .await
                    .map_err(|status| other.error(status))?
                    .into_inner()
                    .peers;
                for peer in peers {
                    let Some(caused) = peer.caused else { continue };
                    for mut span in peer.trace {
                        if span.span_id == caused.span_id && span.parent_id == 0 {
                            span.parent_id = peer.writer_span_id;
                            span.link_kind = "io".to_owned();
                        }
                        if ids.insert(span.span_id) {
                            spans.push(span);
                        }
                    }
                    if seen.insert((to, caused.trace_id.clone())) {
                        next.push((to, caused.trace_id));
                    }
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    Ok(())
}

pub async fn show(
    client: &Client,
    others: &[Address],
    credentials: &Credentials,
    out: &mut impl Write,
    trace_id: String,
    json: bool,
) -> Result<()> {
    let mut spans = trace_spans(client, &trace_id).await?;
    if !others.is_empty() && !spans.is_empty() {
        let mut clients = vec![client.clone()];
        for address in others {
            clients.push(Client::connect(address, credentials).await?);
        }
        stitch(&clients, &trace_id, &mut spans).await?;
        spans.sort_by_key(|s| (s.start_unix_ns, s.span_id));
    }
    if spans.is_empty() {
        anyhow::bail!("no stored span belongs to trace {trace_id} (see `scope traces`)");
    }
    if json {
        for span in &spans {
            print_json(out, &render::SpanJson::from(span))?;
        }
        return Ok(());
    }
    print_lines(out, &trace_tree_lines(&trace_id, &spans))
}

pub async fn ps(client: &Client, out: &mut impl Write, json: bool) -> Result<()> {
    let response = client
        .rpc
        .clone()
        .list_processes(ListProcessesRequest {})
        .await
        .map_err(|status| client.error(status))?;
    let processes = response.into_inner().processes;
    if json {
        for process in &processes {
            print_json(out, &ProcessJson::from(process))?;
        }
        return Ok(());
    }
    print_lines(out, &process_tree_lines(&processes))
}

/// `scope traces --json`: one object per trace.
#[derive(Serialize)]
pub struct TraceJson<'a> {
    pub trace_id: &'a str,
    pub start_ns: u64,
    pub duration_ns: u64,
    pub spans: u64,
    pub pids: &'a [u32],
    pub root_function: &'a str,
    pub root_pid: u32,
    pub root_comm: &'a str,
}

impl<'a> From<&'a TraceSummary> for TraceJson<'a> {
    fn from(t: &'a TraceSummary) -> Self {
        TraceJson {
            trace_id: &t.trace_id,
            start_ns: t.start_unix_ns,
            duration_ns: t.duration_ns,
            spans: t.spans,
            pids: &t.pids,
            root_function: t.root.as_ref().map_or("", |r| r.function.as_str()),
            root_pid: t.root.as_ref().map_or(0, |r| r.pid),
            root_comm: t.root.as_ref().map_or("", |r| r.comm.as_str()),
        }
    }
}

/// `scope ps --json`: one object per process.
#[derive(Serialize)]
pub struct ProcessJson<'a> {
    pub pid: u32,
    pub start_ns: u64,
    pub parent_pid: u32,
    pub session_id: u64,
    pub comm: &'a str,
    pub exe: &'a str,
    pub fork_span_id: u64,
    pub exited_ns: u64,
}

impl<'a> From<&'a Process> for ProcessJson<'a> {
    fn from(p: &'a Process) -> Self {
        ProcessJson {
            pid: p.pid,
            start_ns: p.start_unix_ns,
            parent_pid: p.parent_pid,
            session_id: p.session_id,
            comm: &p.comm,
            exe: &p.exe,
            fork_span_id: p.fork_span_id,
            exited_ns: p.exited_unix_ns,
        }
    }
}

/// The `scope traces` table.
pub fn traces_lines(traces: &[TraceSummary]) -> Vec<String> {
    if traces.is_empty() {
        return vec![
            "no traces recorded (trace something with `scope attach` or `scope trace`)".to_owned(),
        ];
    }
    let rows: Vec<Vec<String>> = traces
        .iter()
        .map(|t| {
            let root = t.root.as_ref().map_or("?".to_owned(), |r| {
                format!("{} ({} {})", r.function, r.comm, r.pid)
            });
            vec![
                t.trace_id.clone(),
                render::format_time_of_day(t.start_unix_ns),
                format_duration_ns(t.duration_ns),
                t.spans.to_string(),
                t.pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                root,
            ]
        })
        .collect();
    let mut table = Table::new(&[
        ("TRACE", false),
        ("START (UTC)", false),
        ("DURATION", true),
        ("SPANS", true),
        ("PIDS", false),
        ("ROOT", false),
    ]);
    table.fit(&rows);
    std::iter::once(table.header())
        .chain(rows.iter().map(|r| table.line(r)))
        .collect()
}

/// One trace as a tree across threads and processes. A line names its process and thread
/// when they differ from its parent's, and how the parent caused it (`fork`, `wakeup`, `io`).
pub fn trace_tree_lines(trace_id: &str, spans: &[Span]) -> Vec<String> {
    let ids: HashSet<u64> = spans.iter().map(|s| s.span_id).collect();
    let mut children: HashMap<u64, Vec<&Span>> = HashMap::new();
    let mut roots: Vec<&Span> = Vec::new();
    for span in spans {
        if span.parent_id != 0 && ids.contains(&span.parent_id) && span.parent_id != span.span_id {
            children.entry(span.parent_id).or_default().push(span);
        } else {
            roots.push(span);
        }
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| (s.start_unix_ns, s.span_id));
    }
    roots.sort_by_key(|s| (s.start_unix_ns, s.span_id));
    let pids: HashSet<u32> = spans.iter().map(|s| s.pid).collect();
    let start = spans.iter().map(|s| s.start_unix_ns).min().unwrap_or(0);
    let end = spans
        .iter()
        .map(|s| s.start_unix_ns.saturating_add(s.duration_ns))
        .max()
        .unwrap_or(0);
    let mut lines = vec![format!(
        "trace {trace_id}: {} spans in {} process{}, {}",
        spans.len(),
        pids.len(),
        if pids.len() == 1 { "" } else { "es" },
        format_duration_ns(end.saturating_sub(start))
    )];
    let by_id: HashMap<u64, &Span> = spans.iter().map(|s| (s.span_id, s)).collect();
    let mut visited = HashSet::new();
    for root in roots {
        walk(
            root,
            None,
            "",
            true,
            true,
            &Tree {
                children: &children,
                by_id: &by_id,
            },
            &mut visited,
            &mut lines,
        );
    }
    lines
}

/// The trace being drawn: each span's children, and every span by id.
struct Tree<'t, 'a> {
    children: &'t HashMap<u64, Vec<&'a Span>>,
    by_id: &'t HashMap<u64, &'a Span>,
}

#[expect(
    clippy::too_many_arguments,
    reason = "a recursive walk with its drawing state"
)]
fn walk<'a>(
    span: &'a Span,
    parent: Option<&Span>,
    prefix: &str,
    last: bool,
    root: bool,
    tree: &Tree<'_, 'a>,
    visited: &mut HashSet<u64>,
    lines: &mut Vec<String>,
) {
    if !visited.insert(span.span_id) {
        return;
    }
    let branch = if root {
        ""
    } else if last {
        "└─ "
    } else {
        "├─ "
    };
    let mut text = String::new();
    if !span.link_kind.is_empty() {
        text.push_str(&format!("({}) ", span.link_kind));
    }
    let moved = parent.is_none_or(|p| p.pid != span.pid || p.tid != span.tid);
    if moved {
        let name = if span.comm.is_empty() {
            "?"
        } else {
            span.comm.as_str()
        };
        text.push_str(&format!("[{name} {}/{}] ", span.pid, span.tid));
    }
    text.push_str(&render::span_summary(span));
    lines.push(format!("{prefix}{branch}{text}"));
    let next_prefix = if root {
        prefix.to_owned()
    } else {
        format!("{prefix}{}", if last { "   " } else { "│  " })
    };
    // Replies: the calls whose bytes this call read back.
    let reply_prefix = format!("{next_prefix}{}", if root { "" } else { "   " });
    for link in &span.links {
        let from = match tree.by_id.get(&link.span_id) {
            Some(peer) => format!(
                "{} [{} {}/{}]",
                peer.function,
                if peer.comm.is_empty() {
                    "?"
                } else {
                    &peer.comm
                },
                peer.pid,
                peer.tid
            ),
            None => format!("span {:016x} of trace {}", link.span_id, link.trace_id),
        };
        lines.push(format!("{reply_prefix}↩ reply from {from}"));
    }
    let kids = tree
        .children
        .get(&span.span_id)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for (i, child) in kids.iter().enumerate() {
        walk(
            child,
            Some(span),
            &next_prefix,
            i + 1 == kids.len(),
            false,
            tree,
            visited,
            lines,
        );
    }
}

/// `scope ps`: traced processes as a tree by parent, each with its start and end.
pub fn process_tree_lines(processes: &[Process]) -> Vec<String> {
    if processes.is_empty() {
        return vec!["no traced processes recorded".to_owned()];
    }
    // A parent is the latest process with the parent's pid that started before the child.
    let mut by_parent: BTreeMap<Option<usize>, Vec<usize>> = BTreeMap::new();
    for (i, process) in processes.iter().enumerate() {
        let parent = processes
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.pid == process.parent_pid
                    && p.start_unix_ns <= process.start_unix_ns
                    && p.pid != process.pid
            })
            .max_by_key(|(_, p)| p.start_unix_ns)
            .map(|(j, _)| j);
        by_parent.entry(parent).or_default().push(i);
    }
    let mut lines = vec!["PID      STARTED (UTC)    ENDED            SESSION  COMMAND".to_owned()];
    fn draw(
        index: usize,
        depth: usize,
        processes: &[Process],
        by_parent: &BTreeMap<Option<usize>, Vec<usize>>,
        lines: &mut Vec<String>,
    ) {
        let p = &processes[index];
        let ended = if p.exited_unix_ns == 0 {
            "running".to_owned()
        } else {
            render::format_time_of_day(p.exited_unix_ns)
        };
        let session = if p.session_id == 0 {
            "-".to_owned()
        } else {
            p.session_id.to_string()
        };
        lines.push(format!(
            "{:<8} {:<16} {:<16} {:<8} {}{} ({})",
            p.pid,
            render::format_time_of_day(p.start_unix_ns),
            ended,
            session,
            "  ".repeat(depth),
            p.comm,
            p.exe
        ));
        for child in by_parent
            .get(&Some(index))
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            draw(*child, depth + 1, processes, by_parent, lines);
        }
    }
    for root in by_parent.get(&None).map(Vec::as_slice).unwrap_or(&[]) {
        draw(*root, 0, processes, &by_parent, &mut lines);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(
        id: u64,
        parent: u64,
        pid: u32,
        tid: u32,
        function: &str,
        start: u64,
        link: &str,
    ) -> Span {
        Span {
            span_id: id,
            parent_id: parent,
            pid,
            tid,
            function: function.to_owned(),
            comm: format!("proc{pid}"),
            start_unix_ns: 1_700_000_000_000_000_000 + start,
            duration_ns: 1000,
            args: vec![0; 6],
            link_kind: link.to_owned(),
            ..Span::default()
        }
    }

    #[test]
    fn a_trace_crosses_processes_with_edge_kinds() {
        let spans = vec![
            span(3, 2, 20, 21, "handle", 200, "io"),
            span(1, 0, 10, 10, "main_loop", 0, ""),
            span(2, 1, 10, 10, "request", 100, ""),
            span(4, 3, 20, 21, "compute", 300, ""),
            span(5, 1, 30, 30, "child_main", 400, "fork"),
        ];
        let lines = trace_tree_lines("abc", &spans);
        assert!(
            lines[0].starts_with("trace abc: 5 spans in 3 processes"),
            "{lines:?}"
        );
        assert!(
            lines[1].starts_with("[proc10 10/10] main_loop("),
            "{lines:?}"
        );
        assert!(lines[2].starts_with("├─ request("), "{lines:?}");
        assert!(
            lines[3].starts_with("│  └─ (io) [proc20 20/21] handle("),
            "{lines:?}"
        );
        assert!(
            lines[4].starts_with("│     └─ compute("),
            "same thread: no prefix: {lines:?}"
        );
        assert!(
            lines[5].starts_with("└─ (fork) [proc30 30/30] child_main("),
            "{lines:?}"
        );
    }

    #[test]
    fn replies_are_drawn_under_the_call_that_read_them() {
        let mut request = span(2, 1, 10, 10, "request", 100, "");
        request.links = vec![scope_proto::v1::CausalLink {
            span_id: 3,
            trace_id: "abc".into(),
            kind: "io".into(),
        }];
        let mut elsewhere = span(6, 1, 10, 10, "request", 500, "");
        elsewhere.links = vec![scope_proto::v1::CausalLink {
            span_id: 0x77,
            trace_id: "def".into(),
            kind: "io".into(),
        }];
        let spans = vec![
            span(1, 0, 10, 10, "main_loop", 0, ""),
            request,
            span(3, 2, 20, 21, "handle", 200, "io"),
            elsewhere,
        ];
        let lines = trace_tree_lines("abc", &spans);
        assert!(lines[2].starts_with("├─ request("), "{lines:?}");
        assert_eq!(
            lines[3], "│     ↩ reply from handle [proc20 20/21]",
            "{lines:?}"
        );
        assert!(
            lines[4].starts_with("│  └─ (io) [proc20 20/21] handle("),
            "{lines:?}"
        );
        assert_eq!(
            lines[6], "      ↩ reply from span 0000000000000077 of trace def",
            "{lines:?}"
        );
    }

    #[test]
    fn missing_parents_and_cycles_do_not_lose_spans() {
        let spans = vec![
            span(1, 99, 10, 10, "orphan", 0, ""),
            span(2, 3, 10, 10, "a", 1, ""),
            span(3, 2, 10, 10, "b", 2, ""),
        ];
        let lines = trace_tree_lines("t", &spans);
        assert!(lines.iter().any(|l| l.contains("orphan(")), "{lines:?}");
    }

    #[test]
    fn processes_draw_as_a_tree_and_reused_pids_stay_apart() {
        let process = |pid, start, parent| Process {
            pid,
            start_unix_ns: start,
            parent_pid: parent,
            comm: format!("p{pid}"),
            exe: "/bin/x".into(),
            ..Process::default()
        };
        let processes = vec![
            process(10, 100, 1),
            process(11, 200, 10),
            process(11, 900, 10),
            process(12, 300, 11),
        ];
        let lines = process_tree_lines(&processes);
        assert_eq!(lines.len(), 5, "{lines:?}");
        assert!(lines[1].contains(" p10 "), "{lines:?}");
        assert!(lines[2].contains("   p11 "), "{lines:?}");
        assert!(
            lines[3].contains("     p12 "),
            "the grandchild under the first 11: {lines:?}"
        );
        assert!(
            lines[4].contains("   p11 "),
            "the reused pid is a second child: {lines:?}"
        );
    }
}
