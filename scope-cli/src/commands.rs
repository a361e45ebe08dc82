//! The one-shot commands: each is one gRPC call and its output.

use std::io::Write;

use anyhow::{Context, Result};
use scope_proto::v1::{
    AnalyzeRequest, AttachRequest, DetachRequest, ListSessionsRequest, QuerySpansRequest, Session,
    SpanFilter, StatusRequest, detach_request::Target,
};

use crate::client::Client;
use crate::render;

/// Rows `scope calls` collects before it sizes the table's columns and starts printing.
const TABLE_SIZING_ROWS: usize = 1_000;

pub fn print_lines(out: &mut impl Write, lines: &[String]) -> Result<()> {
    for line in lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

pub fn print_json(out: &mut impl Write, value: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer(&mut *out, value).context("cannot write JSON")?;
    writeln!(out)?;
    Ok(())
}

/// What to attach to (`scope attach` and `scope trace`).
#[derive(clap::Args, Clone, Debug)]
pub struct AttachTarget {
    /// The process to trace.
    #[arg(long, short)]
    pub pid: u32,
    /// Functions to trace: a glob over names (`*`, `?`, `[abc]`); `LIB!GLOB` limits it to
    /// modules whose file name starts with LIB. Repeat for more.
    #[arg(
        long = "func",
        short,
        value_name = "GLOB",
        required_unless_present_any = ["usdt", "auto"],
        conflicts_with = "auto"
    )]
    pub functions: Vec<String>,
    /// USDT probes to trace, `PROVIDER:NAME` (globs; `scope analyze --pid PID` lists them):
    /// each hit is a zero-length span named `PROVIDER:NAME` with its arguments decoded.
    /// Both sites of a pair (`X__start` and `X__done`, `X__entry` and `X__return`) make one
    /// span `PROVIDER:X` with a duration; PostgreSQL's queries carry their SQL, Python's
    /// calls their `file:function:line`. Repeat for more.
    #[arg(long, value_name = "PROVIDER:NAME", conflicts_with = "auto")]
    pub usdt: Vec<String>,
    /// Choose the functions: scoped samples the process, counts its candidates' calls and
    /// attaches the plan that fits --budget (1% without one), keeping that budget while it
    /// runs (`scope analyze --pid PID` shows the plan without attaching).
    #[arg(long)]
    pub auto: bool,
    /// With --auto: how long to sample where the process spends its CPU (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse_duration, requires = "auto")]
    pub window: Option<std::time::Duration>,
    /// With --auto: how long to count the candidates' calls (default 200ms).
    #[arg(long, value_name = "DURATION", value_parser = crate::duration::parse_duration, requires = "auto")]
    pub count: Option<std::time::Duration>,
    /// Resolve the globs only in this ELF file mapped by the process (its executable
    /// or one of its libraries).
    #[arg(long, value_name = "PATH", conflicts_with = "auto")]
    pub binary: Option<String>,
    /// Do not trace the processes it forks (by default they are followed, and what they
    /// exec is traced with the same globs).
    #[arg(long = "no-follow", action = clap::ArgAction::SetFalse)]
    pub follow: bool,
    /// Record 1 call in N per probe (per CPU); the rest are counted as sampled out.
    #[arg(long = "sample", value_name = "N", default_value_t = 1)]
    pub sample_every: u32,
    /// Record at most N calls a second per probe; the rest are counted as rate limited.
    #[arg(long, value_name = "N")]
    pub max_rate: Option<u32>,
    /// The share of one CPU the session's probes may cost, e.g. `1%`. scoped measures each
    /// probe's call rate and cost, and samples or detaches the most expensive probes to stay
    /// under it (`scope sessions` and `scope status` say which and why). A budgeted session
    /// does not capture the process's reads and writes, whose cost the budget cannot bound.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub budget: Option<f64>,
}

/// A duration as the milliseconds a request carries (0: the daemon's default).
pub fn millis(duration: Option<std::time::Duration>) -> u32 {
    duration.map_or(0, |d| {
        u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
    })
}

/// `1%`, `0.5%` or `2` (percent either way).
pub fn parse_percent(text: &str) -> std::result::Result<f64, String> {
    let number = text.trim().trim_end_matches('%').trim();
    match number.parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!(
            "{text:?} is not a budget: give a percentage of one CPU above 0, like 1% or 0.5%"
        )),
    }
}

/// Attaches and returns the new session (shared with `scope trace`).
pub async fn attach_session(client: &Client, target: &AttachTarget) -> Result<Session> {
    let response = client
        .rpc
        .clone()
        .attach(AttachRequest {
            pid: target.pid,
            functions: target
                .functions
                .iter()
                .cloned()
                .chain(target.usdt.iter().map(|u| format!("usdt:{u}")))
                .collect(),
            binary: target.binary.clone().unwrap_or_default(),
            no_follow: !target.follow,
            sample_every: target.sample_every,
            max_rate: target.max_rate.unwrap_or(0),
            budget_percent: target.budget.unwrap_or(0.0),
            auto: target.auto,
            window_ms: millis(target.window),
            count_ms: millis(target.count),
        })
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    response
        .session
        .context("scoped answered Attach without a session; this is a bug in scoped")
}

pub async fn attach(
    client: &Client,
    out: &mut impl Write,
    target: &AttachTarget,
    json: bool,
) -> Result<()> {
    let session = attach_session(client, target).await?;
    if json {
        print_json(out, &render::SessionJson::from(&session))
    } else {
        print_lines(out, &render::attach_lines(&session))
    }
}

pub async fn detach(
    client: &Client,
    out: &mut impl Write,
    session: Option<u64>,
    json: bool,
) -> Result<()> {
    let target = match session {
        Some(id) => Target::SessionId(id),
        None => Target::All(true),
    };
    let response = client
        .rpc
        .clone()
        .detach(DetachRequest {
            target: Some(target),
        })
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    if json {
        print_json(
            out,
            &render::DetachJson {
                detached_session_ids: &response.detached_session_ids,
                detach_ns: response.detach_ns,
            },
        )
    } else {
        writeln!(out, "{}", render::detach_line(&response))?;
        Ok(())
    }
}

pub async fn sessions(client: &Client, out: &mut impl Write, json: bool) -> Result<()> {
    let response = client
        .rpc
        .clone()
        .list_sessions(ListSessionsRequest {})
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    if json {
        print_json(
            out,
            &render::SessionsJson {
                sessions: response
                    .sessions
                    .iter()
                    .map(render::SessionJson::from)
                    .collect(),
            },
        )
    } else {
        print_lines(out, &render::sessions_lines(&response.sessions))
    }
}

/// What `scope analyze` asks for.
pub struct AnalyzeArgs {
    pub pid: u32,
    pub binary: Option<String>,
    pub budget: Option<f64>,
    pub window: Option<std::time::Duration>,
    pub count: Option<std::time::Duration>,
}

pub async fn analyze(
    client: &Client,
    out: &mut impl Write,
    args: AnalyzeArgs,
    json: bool,
) -> Result<()> {
    let response = client
        .rpc
        .clone()
        .analyze(AnalyzeRequest {
            pid: args.pid,
            binary: args.binary.unwrap_or_default(),
            budget_percent: args.budget.unwrap_or(0.0),
            window_ms: millis(args.window),
            count_ms: millis(args.count),
        })
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    if json {
        print_json(out, &render::AnalyzeJson::from(&response))
    } else {
        print_lines(out, &render::analyze_lines(&response))
    }
}

pub async fn status(client: &Client, out: &mut impl Write, json: bool) -> Result<()> {
    let response = client
        .rpc
        .clone()
        .status(StatusRequest {})
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    if json {
        print_json(out, &render::StatusJson::from(&response))
    } else {
        print_lines(out, &render::status_lines(&response))
    }
}

/// What `scope calls` asks for.
pub struct CallsQuery {
    pub filter: SpanFilter,
    pub limit: u32,
    pub json: bool,
}

pub async fn calls(client: &Client, out: &mut impl Write, query: CallsQuery) -> Result<()> {
    let filtered = query.filter != SpanFilter::default();
    let mut stream = client
        .rpc
        .clone()
        .query_spans(QuerySpansRequest {
            filter: Some(query.filter),
            limit: query.limit,
        })
        .await
        .map_err(|status| client.error(status))?
        .into_inner();

    let mut table = render::calls_table();
    // Rows held until the column widths are known; `None` once the header is out.
    let mut sizing: Option<Vec<Vec<String>>> = Some(Vec::new());
    let mut shown: u64 = 0;
    let mut dropped: u64 = 0;
    while let Some(batch) = stream
        .message()
        .await
        .map_err(|status| client.error(status))?
    {
        dropped = dropped.saturating_add(batch.dropped);
        for span in &batch.spans {
            shown += 1;
            if query.json {
                print_json(out, &render::SpanJson::from(span))?;
                continue;
            }
            let row = render::call_row(span);
            match sizing.as_mut() {
                Some(rows) => {
                    rows.push(row);
                    if rows.len() >= TABLE_SIZING_ROWS {
                        flush_sizing(out, &mut table, &mut sizing)?;
                    }
                }
                None => writeln!(out, "{}", table.line(&row))?,
            }
        }
    }
    if !query.json {
        if shown == 0 {
            writeln!(
                out,
                "no calls recorded{} (see `scope sessions`; trace with `scope attach` or `scope trace`)",
                if filtered { " matching the filter" } else { "" }
            )?;
        } else {
            flush_sizing(out, &mut table, &mut sizing)?;
        }
    }
    out.flush()?;
    if dropped > 0 {
        // On stderr so `--json` output stays pure JSON Lines; never silent.
        eprintln!(
            "scope: warning: scoped dropped {dropped} spans while sending them to this client"
        );
    }
    Ok(())
}

fn flush_sizing(
    out: &mut impl Write,
    table: &mut render::Table,
    sizing: &mut Option<Vec<Vec<String>>>,
) -> Result<()> {
    if let Some(rows) = sizing.take() {
        table.fit(&rows);
        writeln!(out, "{}", table.header())?;
        for row in &rows {
            writeln!(out, "{}", table.line(row))?;
        }
    }
    Ok(())
}
