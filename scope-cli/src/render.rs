//! Human and JSON output for every command. Pure functions over the wire types, so they can be
//! tested without a daemon.

use std::collections::BTreeMap;

use scope_proto::v1::{
    AnalyzeResponse, DetachResponse, Frame, Probe, ProbePlan, Session, Span, StatusResponse,
    Throttle,
};
use serde::Serialize;

use crate::duration::format_duration_ns;
use crate::tree::{CallTree, ReadyTree, TreeKind};

/// Number of integer arguments a span carries (System V x86-64 argument registers).
pub const SPAN_ARGS: usize = 6;

// ---------------------------------------------------------------------------------------------
// Pieces of a span

/// Arguments as hex, up to the last non-zero one (registers past a function's real arity hold
/// leftovers, but zeros at the end are almost always "no argument").
pub fn format_args(args: &[u64]) -> String {
    let shown = args
        .iter()
        .rposition(|&a| a != 0)
        .map_or(0, |last| last + 1);
    args[..shown]
        .iter()
        .map(|&a| {
            if a == 0 {
                "0".to_owned()
            } else {
                format!("{a:#x}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A return value: small values (including small negative ones such as `-1` or `-EINVAL`) in
/// decimal, anything else — pointers, bit patterns — in hex.
pub fn format_ret(ret: u64) -> String {
    let signed = ret as i64;
    if (-4096..=65535).contains(&signed) {
        signed.to_string()
    } else {
        format!("{ret:#x}")
    }
}

/// `file:line` with the file's directories left out, or `None` when debug info had nothing.
pub fn location(file: &str, line: u32) -> Option<String> {
    if file.is_empty() {
        return None;
    }
    let base = file.rsplit('/').next().unwrap_or(file);
    Some(if line == 0 {
        base.to_owned()
    } else {
        format!("{base}:{line}")
    })
}

/// A module's file name: `/usr/lib/x86_64-linux-gnu/libc.so.6` → `libc.so.6`.
pub fn module_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Span flags as words: `thread_exited` → `thread exited`.
pub fn format_flags(flags: &[String]) -> String {
    flags
        .iter()
        .map(|f| f.replace('_', " "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Flags that mark an entry-only span (an inlined call site): scoped calls it `inlined`;
/// `instant` is the kernel's name for the same bit.
const ENTRY_ONLY_FLAGS: &[&str] = &["inlined", "instant"];

/// An entry-only span (an inlined call site): it has neither a duration nor a return value.
fn is_instant(span: &Span) -> bool {
    !span.inlined_into.is_empty()
        || span
            .flags
            .iter()
            .any(|f| ENTRY_ONLY_FLAGS.contains(&f.as_str()))
}

/// Flags saying the call did not return normally (everything but the entry-only marker,
/// which is shown as "inlined into X" instead).
fn abnormal_flags(span: &Span) -> Vec<String> {
    span.flags
        .iter()
        .filter(|f| !ENTRY_ONLY_FLAGS.contains(&f.as_str()))
        .cloned()
        .collect()
}

/// A USDT span's text on one line: whitespace runs (a multi-line query) become one space,
/// and past 100 characters it is cut with `…`; Python's `file:function:line` is shown bare,
/// anything else quoted.
fn quoted_text(text: &str) -> String {
    let mut one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some((cut, _)) = one_line.char_indices().nth(100) {
        one_line.truncate(cut);
        one_line.push('…');
    }
    if one_line.contains(' ') {
        format!("{one_line:?}")
    } else {
        one_line
    }
}

fn function_name(span: &Span) -> &str {
    if span.function.is_empty() {
        "?"
    } else {
        &span.function
    }
}

/// `processCommand(0x55d0c1e0a2c0) = 0  12.3µs  server.c:3987`, plus flags and inlining.
pub fn span_summary(span: &Span) -> String {
    let mut text = if span.text.is_empty() {
        format!("{}({})", function_name(span), format_args(&span.args))
    } else {
        // A USDT probe's own words (a query, a Python call) say more than its registers.
        format!("{} {}", function_name(span), quoted_text(&span.text))
    };
    let flags = abnormal_flags(span);
    let instant = is_instant(span);
    if !flags.is_empty() {
        // The call did not return normally, so there is no return value to show.
        text.push_str(&format!(" [{}]", format_flags(&flags)));
    } else if !instant && span.text.is_empty() {
        text.push_str(&format!(" = {}", format_ret(span.ret)));
    }
    if !instant || span.duration_ns > 0 {
        text.push_str("  ");
        text.push_str(&format_duration_ns(span.duration_ns));
    }
    if let Some(loc) = location(&span.file, span.line) {
        text.push_str("  ");
        text.push_str(&loc);
    }
    if !span.inlined_into.is_empty() {
        text.push_str(&format!("  (inlined into {})", span.inlined_into));
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Call trees (`scope trace`)

/// The lines of one call tree: the root after a `[pid P tid T]` prefix, children below it.
pub fn tree_lines(ready: &ReadyTree) -> Vec<String> {
    let span = &ready.tree.span;
    let prefix = format!("[pid {} tid {}] ", span.pid, span.tid);
    let mut first = format!("{prefix}{}", span_summary(span));
    match &ready.kind {
        TreeKind::Complete => {}
        TreeKind::Late { parent_function } => first.push_str(&format!(
            "  (arrived late: called from {parent_function}, printed above)"
        )),
        TreeKind::Incomplete => first.push_str(&format!(
            "  (depth {}: its caller was still running or was not received)",
            span.depth
        )),
    }
    let mut lines = vec![first];
    let pad = " ".repeat(prefix.chars().count());
    child_lines(&ready.tree, &pad, &mut lines);
    lines
}

fn child_lines(tree: &CallTree, indent: &str, lines: &mut Vec<String>) {
    let count = tree.children.len();
    for (i, child) in tree.children.iter().enumerate() {
        let last = i + 1 == count;
        let (branch, below) = if last {
            ("└─ ", "   ")
        } else {
            ("├─ ", "│  ")
        };
        lines.push(format!("{indent}{branch}{}", span_summary(&child.span)));
        child_lines(child, &format!("{indent}{below}"), lines);
    }
}

// ---------------------------------------------------------------------------------------------
// Tables

/// A text table whose column widths grow to fit the rows shown to [`Table::fit`].
pub struct Table {
    headers: Vec<&'static str>,
    right_aligned: Vec<bool>,
    widths: Vec<usize>,
}

impl Table {
    /// Columns as `(header, right_aligned)`.
    pub fn new(columns: &[(&'static str, bool)]) -> Self {
        Self {
            headers: columns.iter().map(|c| c.0).collect(),
            right_aligned: columns.iter().map(|c| c.1).collect(),
            widths: columns.iter().map(|c| c.0.chars().count()).collect(),
        }
    }

    pub fn fit(&mut self, rows: &[Vec<String>]) {
        for row in rows {
            for (width, cell) in self.widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }

    pub fn header(&self) -> String {
        let cells: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        self.line(&cells)
    }

    pub fn line(&self, row: &[String]) -> String {
        let mut out = String::new();
        for (i, cell) in row.iter().enumerate() {
            let width = self.widths.get(i).copied().unwrap_or(0);
            let pad = width.saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            let right = self.right_aligned.get(i).copied().unwrap_or(false);
            if right {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.trim_end().to_owned()
    }

    /// The whole table, header first.
    pub fn render(mut self, rows: &[Vec<String>]) -> Vec<String> {
        self.fit(rows);
        std::iter::once(self.header())
            .chain(rows.iter().map(|r| self.line(r)))
            .collect()
    }
}

/// Time of day in UTC with microseconds, `13:04:05.123456`.
pub fn format_time_of_day(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = unix_ns % 1_000_000_000 / 1_000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{micros:06}",
        day / 3600,
        day / 60 % 60,
        day % 60
    )
}

/// Columns of `scope calls`.
pub fn calls_table() -> Table {
    Table::new(&[
        ("TIME (UTC)", false),
        ("PID", true),
        ("TID", true),
        ("FUNCTION", false),
        ("DURATION", true),
        ("LOCATION", false),
        ("RET", false),
    ])
}

/// One row of `scope calls`.
pub fn call_row(span: &Span) -> Vec<String> {
    let indent = "  ".repeat(span.depth.min(64) as usize);
    let mut function = format!("{indent}{}", function_name(span));
    if !span.text.is_empty() {
        function.push(' ');
        function.push_str(&quoted_text(&span.text));
    }
    if !span.inlined_into.is_empty() {
        function.push_str(&format!(" (inlined into {})", span.inlined_into));
    }
    let flags = abnormal_flags(span);
    let ret = if !flags.is_empty() {
        format!("[{}]", format_flags(&flags))
    } else if is_instant(span) {
        "-".to_owned()
    } else {
        format_ret(span.ret)
    };
    vec![
        format_time_of_day(span.start_unix_ns),
        span.pid.to_string(),
        span.tid.to_string(),
        function,
        format_duration_ns(span.duration_ns),
        location(&span.file, span.line).unwrap_or_else(|| "-".to_owned()),
        ret,
    ]
}

/// `scope sessions` as a table.
pub fn sessions_lines(sessions: &[Session]) -> Vec<String> {
    if sessions.is_empty() {
        return vec![
            "no sessions (start one with `scope attach --pid PID --func GLOB`)".to_owned(),
        ];
    }
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.pid.to_string(),
                s.comm.clone(),
                s.exe.clone(),
                if s.target_alive { "yes" } else { "no" }.to_owned(),
                s.probes.len().to_string(),
                s.spans_received.to_string(),
                s.spans_dropped.to_string(),
                s.patterns.join(" "),
            ]
        })
        .collect();
    let mut lines = Table::new(&[
        ("ID", true),
        ("PID", true),
        ("COMM", false),
        ("EXE", false),
        ("ALIVE", false),
        ("PROBES", true),
        ("SPANS", true),
        ("DROPPED", true),
        ("PATTERNS", false),
    ])
    .render(&rows);
    for s in sessions {
        let mut limits = Vec::new();
        if s.sample_every > 1 {
            limits.push(format!("1 call in {} sampled", s.sample_every));
        }
        if s.max_rate > 0 {
            limits.push(format!("at most {} calls/s per probe", s.max_rate));
        }
        if s.budget_percent > 0.0 {
            limits.push(format!(
                "budget {}% of a CPU, estimated cost {:.2}%",
                s.budget_percent, s.overhead_percent
            ));
        }
        if s.sampled_out + s.rate_limited > 0 {
            limits.push(format!(
                "{} calls sampled out, {} rate limited",
                s.sampled_out, s.rate_limited
            ));
        }
        if !limits.is_empty() {
            lines.push(format!("session {}: {}", s.id, limits.join("; ")));
        }
        lines.extend(s.throttled.iter().map(throttle_line));
        if let Some(plan) = &s.plan {
            lines.push(format!("session {} (--auto):", s.id));
            lines.extend(plan_lines(plan));
        }
    }
    lines
}

/// `scope attach`: the session and what was probed.
pub fn attach_lines(session: &Session) -> Vec<String> {
    let name = if session.comm.is_empty() {
        session.exe.clone()
    } else {
        session.comm.clone()
    };
    let mut lines = vec![format!(
        "session {}: attached {} probe{} to pid {} ({name})",
        session.id,
        session.probes.len(),
        if session.probes.len() == 1 { "" } else { "s" },
        session.pid,
    )];
    let rows: Vec<Vec<String>> = session
        .probes
        .iter()
        .map(|p| {
            let mut loc = match (p.file.is_empty(), p.line) {
                (true, _) => "-".to_owned(),
                (false, 0) => p.file.clone(),
                (false, line) => format!("{}:{line}", p.file),
            };
            if !p.inlined_into.is_empty() {
                loc.push_str(&format!("  inlined into {}", p.inlined_into));
            }
            vec![format!("  {}", p.function), p.module.clone(), loc]
        })
        .collect();
    lines.extend(
        Table::new(&[
            ("  FUNCTION", false),
            ("MODULE", false),
            ("LOCATION", false),
        ])
        .render(&rows),
    );
    if let Some(plan) = &session.plan {
        lines.extend(plan_lines(plan));
    }
    lines.push(format!(
        "see its calls with `scope calls --session {id}`; stop with `scope detach {id}`",
        id = session.id
    ));
    lines
}

/// `scope detach`.
pub fn detach_line(response: &DetachResponse) -> String {
    let took = format_duration_ns(response.detach_ns);
    match response.detached_session_ids.as_slice() {
        [] => "no sessions to detach".to_owned(),
        [id] => format!("detached session {id} in {took}"),
        ids => {
            let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
            format!("detached sessions {} in {took}", ids.join(", "))
        }
    }
}

/// `1.5 MiB`.
fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// ` (kept under 2.0 GiB and 7d)`, or nothing without bounds.
fn retention(status: &StatusResponse) -> String {
    let mut bounds = Vec::new();
    if status.store_retain_bytes > 0 {
        bounds.push(format_bytes(status.store_retain_bytes));
    }
    if status.store_retain_age_ns > 0 {
        bounds.push(format_duration_ns(status.store_retain_age_ns));
    }
    if bounds.is_empty() {
        String::new()
    } else {
        format!(" (kept under {})", bounds.join(" and "))
    }
}

/// `scope analyze`.
pub fn analyze_lines(a: &AnalyzeResponse) -> Vec<String> {
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut rows: Vec<Vec<String>> = vec![
        vec!["path".into(), a.path.clone()],
        vec!["language".into(), a.language.clone()],
        vec!["toolchain".into(), list(&a.toolchain)],
        vec![
            "build id".into(),
            if a.build_id.is_empty() {
                "-".into()
            } else {
                a.build_id.clone()
            },
        ],
        vec![
            "symbols".into(),
            format!(
                "{} functions{}",
                a.functions,
                if a.stripped {
                    " (stripped: dynamic symbols only)"
                } else {
                    ""
                }
            ),
        ],
        vec!["DWARF".into(), yes_no(a.dwarf).into()],
        vec!["PIE".into(), yes_no(a.pie).into()],
        vec!["libraries".into(), list(&a.libraries)],
        vec!["runs on".into(), list(&a.runtimes)],
        vec![
            "USDT probes".into(),
            format!("{} sites, {} distinct", a.usdt.len(), {
                let mut names = a.usdt.clone();
                names.sort();
                names.dedup();
                names.len()
            }),
        ],
    ];
    if !a.entry_points.is_empty() {
        rows.push(vec!["entry points:".into(), String::new()]);
        rows.extend(
            a.entry_points
                .iter()
                .map(|e| vec![format!("  {}", e.function), e.reason.clone()]),
        );
    }
    if !a.classes.is_empty() {
        rows.push(vec![
            "functions by class".into(),
            a.classes
                .iter()
                .map(|c| format!("{} {}", c.class, c.functions))
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    let mut table = Table::new(&[("", false), ("", false)]);
    table.fit(&rows);
    let mut lines: Vec<String> = rows.iter().map(|r| table.line(r)).collect();
    if let Some(plan) = &a.plan {
        lines.push(String::new());
        lines.extend(plan_lines(plan));
    }
    lines
}

/// A probe plan: the chosen functions and the ones left out, with why.
pub fn plan_lines(plan: &ProbePlan) -> Vec<String> {
    let chosen = plan.functions.iter().filter(|f| f.chosen).count();
    let mut lines = vec![format!(
        "probe plan for a budget of {}% of a CPU: {chosen} function{}, estimated {}",
        plan.budget_percent,
        if chosen == 1 { "" } else { "s" },
        if plan.count_ms > 0 {
            format!("{:.3}%", plan.predicted_percent)
        } else {
            "cost unknown".to_owned()
        }
    )];
    let rows: Vec<Vec<String>> = plan
        .functions
        .iter()
        .map(|f| {
            vec![
                format!("  {}", if f.chosen { "yes" } else { "no" }),
                f.function.clone(),
                f.class.clone(),
                if f.measured {
                    format!("{:.0}", f.calls_per_second)
                } else {
                    "-".to_owned()
                },
                if f.measured {
                    format!("{:.3}%", f.cost_percent)
                } else {
                    "-".to_owned()
                },
                f.reason.clone(),
            ]
        })
        .collect();
    lines.extend(
        Table::new(&[
            ("  CHOSEN", false),
            ("FUNCTION", false),
            ("CLASS", false),
            ("CALLS/S", true),
            ("COST", true),
            ("WHY", false),
        ])
        .render(&rows),
    );
    lines.extend(plan.notes.iter().map(|n| format!("  note: {n}")));
    lines
}

/// A probe plan, as JSON.
#[derive(Serialize)]
pub struct PlanJson<'a> {
    pub budget_percent: f64,
    pub predicted_percent: f64,
    pub window_ms: u64,
    pub samples: u64,
    pub count_ms: u64,
    pub functions: Vec<PlannedJson<'a>>,
    pub notes: &'a [String],
}

#[derive(Serialize)]
pub struct PlannedJson<'a> {
    pub function: &'a str,
    pub module: &'a str,
    pub class: &'a str,
    pub chosen: bool,
    pub measured: bool,
    pub calls_per_second: f64,
    pub ns_per_call: f64,
    pub cost_percent: f64,
    pub self_samples: u64,
    pub stack_samples: u64,
    pub pattern: &'a str,
    pub reason: &'a str,
}

impl<'a> From<&'a ProbePlan> for PlanJson<'a> {
    fn from(p: &'a ProbePlan) -> Self {
        Self {
            budget_percent: p.budget_percent,
            predicted_percent: p.predicted_percent,
            window_ms: p.window_ms,
            samples: p.samples,
            count_ms: p.count_ms,
            functions: p
                .functions
                .iter()
                .map(|f| PlannedJson {
                    function: &f.function,
                    module: &f.module,
                    class: &f.class,
                    chosen: f.chosen,
                    measured: f.measured,
                    calls_per_second: f.calls_per_second,
                    ns_per_call: f.ns_per_call,
                    cost_percent: f.cost_percent,
                    self_samples: f.self_samples,
                    stack_samples: f.stack_samples,
                    pattern: &f.pattern,
                    reason: &f.reason,
                })
                .collect(),
            notes: &p.notes,
        }
    }
}

/// `scope analyze --json`.
#[derive(Serialize)]
pub struct AnalyzeJson<'a> {
    pub path: &'a str,
    pub pid: u32,
    pub language: &'a str,
    pub toolchain: &'a [String],
    pub build_id: &'a str,
    pub stripped: bool,
    pub dwarf: bool,
    pub pie: bool,
    pub libraries: &'a [String],
    pub runtimes: &'a [String],
    pub functions: u32,
    pub usdt: &'a [String],
    pub entry_points: Vec<EntryPointJson<'a>>,
    /// Function counts by class.
    pub classes: BTreeMap<&'a str, u32>,
    pub plan: Option<PlanJson<'a>>,
}

#[derive(Serialize)]
pub struct EntryPointJson<'a> {
    pub function: &'a str,
    pub reason: &'a str,
}

impl<'a> From<&'a AnalyzeResponse> for AnalyzeJson<'a> {
    fn from(a: &'a AnalyzeResponse) -> Self {
        Self {
            path: &a.path,
            pid: a.pid,
            language: &a.language,
            toolchain: &a.toolchain,
            build_id: &a.build_id,
            stripped: a.stripped,
            dwarf: a.dwarf,
            pie: a.pie,
            libraries: &a.libraries,
            runtimes: &a.runtimes,
            functions: a.functions,
            usdt: &a.usdt,
            entry_points: a
                .entry_points
                .iter()
                .map(|e| EntryPointJson {
                    function: &e.function,
                    reason: &e.reason,
                })
                .collect(),
            classes: a
                .classes
                .iter()
                .map(|c| (c.class.as_str(), c.functions))
                .collect(),
            plan: a.plan.as_ref().map(PlanJson::from),
        }
    }
}

/// `scope status`.
pub fn status_lines(status: &StatusResponse) -> Vec<String> {
    let mut rows: Vec<Vec<String>> = vec![
        vec!["version".into(), status.version.clone()],
        vec!["uptime".into(), format_duration_ns(status.uptime_ns)],
        vec!["spans received".into(), status.spans_received.to_string()],
        vec!["spans dropped".into(), status.spans_dropped.to_string()],
        vec!["sessions".into(), status.sessions.to_string()],
        vec!["probes".into(), status.probes.to_string()],
        vec![
            "store".into(),
            format!(
                "{} spans, {} in {}{}, {} evicted",
                status.stored_spans,
                format_bytes(status.store_bytes),
                status.store_path,
                retention(status),
                status.store_evicted
            ),
        ],
        vec![
            "ring buffers".into(),
            format!(
                "{} KiB per CPU, {} CPUs",
                status.ring_bytes_per_cpu / 1024,
                status.cpus
            ),
        ],
        vec![
            "io capture".into(),
            if status.io_capture {
                "on (reads and writes on pipes and sockets link requests)".into()
            } else {
                "off (scoped --no-io-capture): requests are not linked across processes".into()
            },
        ],
    ];
    let counters: BTreeMap<&String, &u64> = status.counters.iter().collect();
    if !counters.is_empty() {
        rows.push(vec!["counters:".into(), String::new()]);
        rows.extend(
            counters
                .into_iter()
                .map(|(name, value)| vec![format!("  {name}"), value.to_string()]),
        );
    }
    let mut table = Table::new(&[("", false), ("", false)]);
    table.fit(&rows);
    let mut lines: Vec<String> = rows.iter().map(|r| table.line(r)).collect();
    if !status.throttled.is_empty() {
        lines.push("throttled by overhead budgets:".to_owned());
        lines.extend(
            status
                .throttled
                .iter()
                .map(|t| format!("  {}", throttle_line(t))),
        );
    }
    lines
}

// ---------------------------------------------------------------------------------------------
// JSON. Integers stay JSON numbers (serde_json writes u64 exactly).

#[derive(Serialize)]
pub struct FrameJson<'a> {
    pub function: &'a str,
    pub file: &'a str,
    pub line: u32,
    pub inlined: bool,
}

impl<'a> From<&'a Frame> for FrameJson<'a> {
    fn from(f: &'a Frame) -> Self {
        Self {
            function: &f.function,
            file: &f.file,
            line: f.line,
            inlined: f.inlined,
        }
    }
}

/// One line of `scope calls --json`.
#[derive(Serialize)]
pub struct SpanJson<'a> {
    pub pid: u32,
    pub tid: u32,
    pub function: &'a str,
    pub module: &'a str,
    pub file: &'a str,
    pub line: u32,
    pub start_ns: u64,
    pub duration_ns: u64,
    pub end_ns: u64,
    pub depth: u32,
    pub args: [u64; SPAN_ARGS],
    pub ret: u64,
    pub span_id: u64,
    pub parent_id: u64,
    pub session_id: u64,
    pub probe_id: u32,
    pub flags: &'a [String],
    pub inlined_into: &'a str,
    pub caller: Vec<FrameJson<'a>>,
    /// The trace the call belongs to (32 hex digits).
    pub trace_id: &'a str,
    /// How `parent_id` (on another thread or process) caused this call: fork, wakeup, io.
    pub link_kind: &'a str,
    /// Calls whose bytes this call read (a reply): filled by `scope show`, empty elsewhere.
    pub links: Vec<LinkJson<'a>>,
    /// What a USDT probe said in strings: a query's SQL, a Python call's file:function:line.
    pub text: &'a str,
}

/// One causal link of a span (`SpanJson::links`).
#[derive(Serialize)]
pub struct LinkJson<'a> {
    pub span_id: u64,
    pub trace_id: &'a str,
    pub kind: &'a str,
}

impl<'a> From<&'a Span> for SpanJson<'a> {
    fn from(s: &'a Span) -> Self {
        let mut args = [0; SPAN_ARGS];
        for (slot, value) in args.iter_mut().zip(&s.args) {
            *slot = *value;
        }
        Self {
            pid: s.pid,
            tid: s.tid,
            function: &s.function,
            module: &s.module,
            file: &s.file,
            line: s.line,
            start_ns: s.start_unix_ns,
            duration_ns: s.duration_ns,
            end_ns: s.start_unix_ns.saturating_add(s.duration_ns),
            depth: s.depth,
            args,
            ret: s.ret,
            span_id: s.span_id,
            parent_id: s.parent_id,
            session_id: s.session_id,
            probe_id: s.probe_id,
            flags: &s.flags,
            inlined_into: &s.inlined_into,
            caller: s.caller.iter().map(FrameJson::from).collect(),
            trace_id: &s.trace_id,
            link_kind: &s.link_kind,
            text: &s.text,
            links: s
                .links
                .iter()
                .map(|l| LinkJson {
                    span_id: l.span_id,
                    trace_id: &l.trace_id,
                    kind: &l.kind,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub struct ProbeJson<'a> {
    pub probe_id: u32,
    pub function: &'a str,
    pub symbol: &'a str,
    pub module: &'a str,
    pub address: u64,
    pub file_offset: u64,
    pub file: &'a str,
    pub line: u32,
    pub inlined_into: &'a str,
    pub calls: u64,
    pub spans_dropped: u64,
    pub kernel_dropped: u64,
    pub daemon_dropped: u64,
    pub sampled_out: u64,
    pub rate_limited: u64,
    pub sample_every: u32,
}

impl<'a> From<&'a Probe> for ProbeJson<'a> {
    fn from(p: &'a Probe) -> Self {
        Self {
            probe_id: p.probe_id,
            function: &p.function,
            symbol: &p.symbol,
            module: &p.module,
            address: p.address,
            file_offset: p.file_offset,
            file: &p.file,
            line: p.line,
            inlined_into: &p.inlined_into,
            calls: p.calls,
            spans_dropped: p.spans_dropped,
            kernel_dropped: p.kernel_dropped,
            daemon_dropped: p.daemon_dropped,
            sampled_out: p.sampled_out,
            rate_limited: p.rate_limited,
            sample_every: p.sample_every,
        }
    }
}

/// `scope attach --json` (with `session_id`) and each entry of `scope sessions --json`.
#[derive(Serialize)]
pub struct SessionJson<'a> {
    pub session_id: u64,
    pub pid: u32,
    pub exe: &'a str,
    pub comm: &'a str,
    pub patterns: &'a [String],
    pub created_unix_ns: u64,
    pub target_alive: bool,
    pub spans_received: u64,
    pub spans_dropped: u64,
    pub sampled_out: u64,
    pub rate_limited: u64,
    pub sample_every: u32,
    pub max_rate: u32,
    pub budget_percent: f64,
    pub overhead_percent: f64,
    pub throttled: Vec<ThrottleJson<'a>>,
    /// The uid that attached it.
    pub owner_uid: u32,
    /// Whether forked processes are traced too, and the processes traced now.
    pub follow: bool,
    pub pids: &'a [u32],
    pub probes: Vec<ProbeJson<'a>>,
    /// The plan an `--auto` session applied.
    pub plan: Option<PlanJson<'a>>,
}

/// A probe the overhead budget sampled or detached.
#[derive(Serialize)]
pub struct ThrottleJson<'a> {
    pub session_id: u64,
    pub probe_id: u32,
    pub function: &'a str,
    pub pid: u32,
    pub action: &'a str,
    pub sample_every: u32,
    pub calls_per_second: f64,
    pub cost_percent: f64,
    pub reason: &'a str,
    pub at_unix_ns: u64,
}

impl<'a> From<&'a Throttle> for ThrottleJson<'a> {
    fn from(t: &'a Throttle) -> Self {
        Self {
            session_id: t.session_id,
            probe_id: t.probe_id,
            function: &t.function,
            pid: t.pid,
            action: &t.action,
            sample_every: t.sample_every,
            calls_per_second: t.calls_per_second,
            cost_percent: t.cost_percent,
            reason: &t.reason,
            at_unix_ns: t.at_unix_ns,
        }
    }
}

/// `session 3: work (pid 812) detached by the overhead budget: ...`.
pub fn throttle_line(t: &Throttle) -> String {
    let what = match t.action.as_str() {
        "sampled" => format!("sampled to 1 call in {}", t.sample_every),
        other => other.to_owned(),
    };
    format!(
        "session {}: {} (pid {}) {what} by the overhead budget: {}",
        t.session_id, t.function, t.pid, t.reason
    )
}

impl<'a> From<&'a Session> for SessionJson<'a> {
    fn from(s: &'a Session) -> Self {
        Self {
            session_id: s.id,
            pid: s.pid,
            exe: &s.exe,
            comm: &s.comm,
            patterns: &s.patterns,
            created_unix_ns: s.created_unix_ns,
            target_alive: s.target_alive,
            spans_received: s.spans_received,
            spans_dropped: s.spans_dropped,
            sampled_out: s.sampled_out,
            rate_limited: s.rate_limited,
            sample_every: s.sample_every,
            max_rate: s.max_rate,
            budget_percent: s.budget_percent,
            overhead_percent: s.overhead_percent,
            throttled: s.throttled.iter().map(ThrottleJson::from).collect(),
            owner_uid: s.owner_uid,
            follow: s.follow,
            pids: &s.pids,
            probes: s.probes.iter().map(ProbeJson::from).collect(),
            plan: s.plan.as_ref().map(PlanJson::from),
        }
    }
}

/// `scope sessions --json`.
#[derive(Serialize)]
pub struct SessionsJson<'a> {
    pub sessions: Vec<SessionJson<'a>>,
}

/// `scope detach --json`.
#[derive(Serialize)]
pub struct DetachJson<'a> {
    pub detached_session_ids: &'a [u64],
    pub detach_ns: u64,
}

/// `scope status --json`.
#[derive(Serialize)]
pub struct StatusJson<'a> {
    pub version: &'a str,
    pub uptime_ns: u64,
    pub spans_received: u64,
    pub spans_dropped: u64,
    pub sessions: u32,
    pub probes: u32,
    pub stored_spans: u64,
    pub store_path: &'a str,
    pub store_bytes: u64,
    pub store_retain_bytes: u64,
    pub store_retain_age_ns: u64,
    pub store_evicted: u64,
    pub ring_bytes_per_cpu: u32,
    pub cpus: u32,
    pub io_capture: bool,
    pub counters: BTreeMap<&'a str, u64>,
    pub throttled: Vec<ThrottleJson<'a>>,
}

impl<'a> From<&'a StatusResponse> for StatusJson<'a> {
    fn from(s: &'a StatusResponse) -> Self {
        Self {
            version: &s.version,
            uptime_ns: s.uptime_ns,
            spans_received: s.spans_received,
            spans_dropped: s.spans_dropped,
            sessions: s.sessions,
            probes: s.probes,
            stored_spans: s.stored_spans,
            store_path: &s.store_path,
            store_bytes: s.store_bytes,
            store_retain_bytes: s.store_retain_bytes,
            store_retain_age_ns: s.store_retain_age_ns,
            store_evicted: s.store_evicted,
            ring_bytes_per_cpu: s.ring_bytes_per_cpu,
            cpus: s.cpus,
            io_capture: s.io_capture,
            counters: s.counters.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
            throttled: s.throttled.iter().map(ThrottleJson::from).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{CallTree, ReadyTree, TreeKind};
    use serde_json::Value;

    fn sample_span() -> Span {
        Span {
            span_id: 7,
            parent_id: 3,
            session_id: 2,
            probe_id: 1,
            pid: 1234,
            tid: 1235,
            function: "processCommand".into(),
            module: "/usr/bin/redis-server".into(),
            file: "/src/redis/src/server.c".into(),
            line: 3987,
            start_unix_ns: 1_700_000_000_123_456_789,
            duration_ns: 12_345,
            depth: 1,
            args: vec![0x55d0_c1e0_a2c0, 0, 0, 0, 0, 0],
            ret: 0,
            caller: vec![Frame {
                function: "processInputBuffer".into(),
                file: "networking.c".into(),
                line: 2100,
                inlined: false,
            }],
            flags: vec![],
            inlined_into: String::new(),
            trace_id: "0123456789abcdef0000000000000007".into(),
            link_kind: String::new(),
            comm: String::new(),
            links: Vec::new(),
            text: String::new(),
        }
    }

    #[test]
    fn span_json_has_every_key_with_the_right_type() {
        let mut span = sample_span();
        span.ret = u64::MAX;
        span.args[5] = u64::MAX;
        let line = serde_json::to_string(&SpanJson::from(&span)).expect("serialize");
        assert!(!line.contains('\n'), "one JSON object per line");
        let v: Value = serde_json::from_str(&line).expect("valid JSON");
        let obj = v.as_object().expect("an object");
        for key in [
            "pid",
            "tid",
            "line",
            "start_ns",
            "duration_ns",
            "depth",
            "ret",
            "span_id",
            "parent_id",
            "session_id",
            "probe_id",
        ] {
            assert!(obj[key].is_u64(), "{key} is an integer: {}", obj[key]);
        }
        for key in ["function", "module", "file", "inlined_into", "trace_id"] {
            assert!(obj[key].is_string(), "{key} is a string");
        }
        assert_eq!(obj["trace_id"], "0123456789abcdef0000000000000007");
        assert_eq!(obj["ret"].as_u64(), Some(u64::MAX), "u64 kept exact");
        assert_eq!(obj["start_ns"].as_u64(), Some(1_700_000_000_123_456_789));
        let args = obj["args"].as_array().expect("args array");
        assert_eq!(args.len(), 6);
        assert!(args.iter().all(Value::is_u64));
        assert_eq!(args[0].as_u64(), Some(0x55d0_c1e0_a2c0));
        assert_eq!(args[5].as_u64(), Some(u64::MAX));
        assert!(obj["flags"].is_array());
        let caller = obj["caller"].as_array().expect("caller array");
        let frame = caller[0].as_object().expect("frame object");
        assert_eq!(frame["function"], "processInputBuffer");
        assert_eq!(frame["file"], "networking.c");
        assert_eq!(frame["line"], 2100);
        assert_eq!(frame["inlined"], false);
    }

    #[test]
    fn span_json_pads_missing_args_to_six() {
        let mut span = sample_span();
        span.args = vec![1, 2];
        let v = serde_json::to_value(SpanJson::from(&span)).expect("serialize");
        assert_eq!(v["args"], serde_json::json!([1, 2, 0, 0, 0, 0]));
    }

    #[test]
    fn attach_and_status_json_shapes() {
        let session = Session {
            id: 9,
            pid: 42,
            probes: vec![Probe {
                probe_id: 1,
                function: "f".into(),
                address: 0x1000,
                inlined_into: "g".into(),
                ..Probe::default()
            }],
            ..Session::default()
        };
        let v = serde_json::to_value(SessionJson::from(&session)).expect("serialize");
        assert_eq!(v["session_id"], 9);
        assert_eq!(v["pid"], 42);
        let probe = &v["probes"][0];
        for key in [
            "probe_id",
            "function",
            "symbol",
            "module",
            "address",
            "file",
            "line",
            "inlined_into",
        ] {
            assert!(probe.get(key).is_some(), "probe has {key}");
        }
        assert_eq!(probe["address"], 0x1000);

        let mut status = StatusResponse {
            spans_received: 10,
            spans_dropped: 2,
            ..StatusResponse::default()
        };
        status.counters.insert("kernel.ring_full".into(), 2);
        let v = serde_json::to_value(StatusJson::from(&status)).expect("serialize");
        assert_eq!(v["spans_received"], 10);
        assert_eq!(v["spans_dropped"], 2);
        assert_eq!(v["counters"]["kernel.ring_full"], 2);
    }

    #[test]
    fn args_and_return_values() {
        assert_eq!(
            format_args(&[0x55d0_c1e0_a2c0, 0, 0, 0, 0, 0]),
            "0x55d0c1e0a2c0"
        );
        assert_eq!(format_args(&[1, 0, 3, 0, 0, 0]), "0x1, 0, 0x3");
        assert_eq!(format_args(&[0; 6]), "");
        assert_eq!(format_args(&[]), "");
        assert_eq!(format_ret(0), "0");
        assert_eq!(format_ret(42), "42");
        assert_eq!(format_ret(u64::MAX), "-1");
        assert_eq!(format_ret((-22i64) as u64), "-22");
        assert_eq!(format_ret(0x7f00_dead_beef), "0x7f00deadbeef");
    }

    #[test]
    fn span_summary_shows_call_return_duration_and_location() {
        let span = sample_span();
        assert_eq!(
            span_summary(&span),
            "processCommand(0x55d0c1e0a2c0) = 0  12.3µs  server.c:3987"
        );
        let mut exited = sample_span();
        exited.flags = vec!["thread_exited".into()];
        assert_eq!(
            span_summary(&exited),
            "processCommand(0x55d0c1e0a2c0) [thread exited]  12.3µs  server.c:3987"
        );
        let mut inlined = sample_span();
        inlined.flags = vec!["inlined".into()];
        inlined.duration_ns = 0;
        inlined.inlined_into = "processInputBuffer".into();
        assert_eq!(
            span_summary(&inlined),
            "processCommand(0x55d0c1e0a2c0)  server.c:3987  (inlined into processInputBuffer)"
        );
        inlined.inlined_into.clear();
        assert_eq!(
            span_summary(&inlined),
            "processCommand(0x55d0c1e0a2c0)  server.c:3987"
        );
        assert_eq!(call_row(&inlined)[6], "-");
    }

    #[test]
    fn tree_renders_indented_children() {
        let mut root = sample_span();
        root.parent_id = 0;
        root.depth = 0;
        root.duration_ns = 50_000;
        let mut a = sample_span();
        a.function = "lookupKey".into();
        a.args = vec![1, 2];
        a.ret = 0x7f00_0000_1000;
        a.line = 100;
        a.file = "db.c".into();
        let mut b = a.clone();
        b.function = "addReply".into();
        b.flags = vec!["abandoned".into()];
        let mut c = a.clone();
        c.function = "dictFind".into();
        c.file = String::new();
        c.duration_ns = 800;
        let ready = ReadyTree {
            kind: TreeKind::Complete,
            tree: CallTree {
                span: root,
                children: vec![
                    CallTree {
                        span: a,
                        children: vec![CallTree {
                            span: c,
                            children: vec![],
                        }],
                    },
                    CallTree {
                        span: b,
                        children: vec![],
                    },
                ],
            },
        };
        let lines = tree_lines(&ready);
        assert_eq!(
            lines,
            vec![
                "[pid 1234 tid 1235] processCommand(0x55d0c1e0a2c0) = 0  50.0µs  server.c:3987",
                "                    ├─ lookupKey(0x1, 0x2) = 0x7f0000001000  12.3µs  db.c:100",
                "                    │  └─ dictFind(0x1, 0x2) = 0x7f0000001000  800ns",
                "                    └─ addReply(0x1, 0x2) [abandoned]  12.3µs  db.c:100",
            ]
        );
    }

    #[test]
    fn late_and_incomplete_trees_say_so() {
        let span = sample_span();
        let late = ReadyTree {
            kind: TreeKind::Late {
                parent_function: "main".into(),
            },
            tree: CallTree {
                span: span.clone(),
                children: vec![],
            },
        };
        assert!(tree_lines(&late)[0].ends_with("(arrived late: called from main, printed above)"));
        let incomplete = ReadyTree {
            kind: TreeKind::Incomplete,
            tree: CallTree {
                span,
                children: vec![],
            },
        };
        assert!(tree_lines(&incomplete)[0].contains("caller was still running"));
    }

    #[test]
    fn calls_table_rows_are_aligned() {
        let mut root = sample_span();
        root.depth = 0;
        let child = sample_span();
        let rows = vec![call_row(&root), call_row(&child)];
        let lines = calls_table().render(&rows);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("TIME (UTC)"));
        assert!(lines[1].starts_with("22:13:20.123456"));
        let col = |line: &str, needle: &str| line.find(needle).expect(needle);
        assert_eq!(
            col(&lines[1], "processCommand") + 2,
            col(&lines[2], "processCommand")
        );
        assert!(lines[2].ends_with("server.c:3987  0"));
    }

    #[test]
    fn detach_lines() {
        let one = DetachResponse {
            detached_session_ids: vec![3],
            detach_ns: 1_500_000,
        };
        assert_eq!(detach_line(&one), "detached session 3 in 1.50ms");
        let many = DetachResponse {
            detached_session_ids: vec![1, 2],
            detach_ns: 900,
        };
        assert_eq!(detach_line(&many), "detached sessions 1, 2 in 900ns");
        assert_eq!(
            detach_line(&DetachResponse::default()),
            "no sessions to detach"
        );
    }

    #[test]
    fn status_lists_every_counter() {
        let mut status = StatusResponse {
            version: "0.1.0".into(),
            spans_received: 5,
            spans_dropped: 1,
            ..StatusResponse::default()
        };
        status.counters.insert("kernel.ring_full".into(), 1);
        status.counters.insert("daemon.store_full".into(), 0);
        let lines = status_lines(&status);
        let words: Vec<Vec<&str>> = lines
            .iter()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(words.contains(&vec!["spans", "received", "5"]), "{lines:?}");
        assert!(words.contains(&vec!["spans", "dropped", "1"]), "{lines:?}");
        assert!(words.contains(&vec!["kernel.ring_full", "1"]), "{lines:?}");
        assert!(words.contains(&vec!["daemon.store_full", "0"]), "{lines:?}");
        // Counters are sorted and indented under their heading.
        let at = |name: &str| lines.iter().position(|l| l.contains(name)).expect(name);
        assert!(at("counters:") < at("daemon.store_full"));
        assert!(at("daemon.store_full") < at("kernel.ring_full"));
        assert!(lines[at("kernel.ring_full")].starts_with("  kernel.ring_full"));
    }

    #[test]
    fn usdt_spans_show_their_text_instead_of_registers() {
        let mut query = sample_span();
        query.function = "postgresql:query".into();
        query.text = "SELECT abalance\n  FROM pgbench_accounts WHERE aid = 7;".into();
        let summary = span_summary(&query);
        assert!(
            summary.starts_with(
                "postgresql:query \"SELECT abalance FROM pgbench_accounts WHERE aid = 7;\"  12.3"
            ),
            "{summary}"
        );
        let mut python = sample_span();
        python.function = "python:function".into();
        python.text = "/srv/app.py:handle:42".into();
        assert!(call_row(&python)[3].ends_with("python:function /srv/app.py:handle:42"));
        let mut long = sample_span();
        long.text = "x ".repeat(200);
        assert!(span_summary(&long).contains("…"));
    }
}
