//! `scope`: the command-line client of the `scoped` tracing daemon. Every command is one
//! `scope.v1.Scope` gRPC call (or, for `trace`, Attach + Watch + Detach) over scoped's unix
//! socket, or over its TCP listener with TLS.

mod client;
mod commands;
mod duration;
mod export;
mod filter;
mod render;
mod stats;
mod trace;
mod traces;
mod tree;

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::client::{Address, Client, Credentials, DEFAULT_SOCKET};
use crate::duration::parse_duration;
use crate::export::ExportFormat;
use crate::filter::{CallArgs, TargetArgs, TimeArgs, check_range, now_unix_ns, span_filter};

/// How long a finished call waits for children still in flight in other CPUs' rings.
const DEFAULT_GRACE: &str = "100ms";

/// How often `scope top` refreshes.
const DEFAULT_TOP_INTERVAL: &str = "1s";

/// Rows `scope top` shows.
const DEFAULT_TOP_ROWS: usize = 20;

#[derive(Parser)]
#[command(
    name = "scope",
    version,
    about = "Trace function calls in live native processes through the scoped daemon",
    after_help = "Examples:\n  \
        scope trace --pid 1234 --func 'processCommand' --func 'lookupKey*' --duration 10s\n  \
        scope attach --pid 1234 --func 'libc.so.6!malloc'\n  \
        scope calls --pid 1234 --limit 20 --since 5m --min-duration 1ms\n  \
        scope stats --pid 1234\n  \
        scope top --func 'lookupKey*'\n  \
        scope flame --pid 1234 -o redis.svg\n  \
        scope export --format chrome --since 1m -o trace.json\n  \
        scope export --format otlp --endpoint http://localhost:4317\n  \
        scope detach --all\n  \
        scope --socket https://tracer:7443 --ca ca.pem --token-file token status"
)]
struct Cli {
    /// Where scoped is: its unix socket, or `https://HOST:PORT` for its TCP listener
    /// (`scoped --listen`, TLS only; see --ca, --cert, --key, --token-file).
    #[arg(
        long,
        global = true,
        env = "SCOPE_SOCKET",
        default_value = DEFAULT_SOCKET,
        value_name = "PATH|URL",
        value_parser = Address::parse
    )]
    socket: Address,
    /// For an https:// address: the CA certificate (PEM) that signed scoped's certificate.
    #[arg(long, global = true, env = "SCOPE_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// For an https:// address: this client's certificate (PEM), when scoped wants one
    /// (`scoped --client-ca`).
    #[arg(
        long,
        global = true,
        env = "SCOPE_CERT",
        value_name = "FILE",
        requires = "key"
    )]
    cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(
        long,
        global = true,
        env = "SCOPE_KEY",
        value_name = "FILE",
        requires = "cert"
    )]
    key: Option<PathBuf>,
    /// For an https:// address: a file holding the token scoped wants
    /// (`scoped --token-file`), sent as `authorization: Bearer TOKEN`.
    #[arg(long, global = true, env = "SCOPE_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach probes to the functions of a running process and print what was probed.
    Attach {
        #[command(flatten)]
        target: commands::AttachTarget,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Attach, print calls live as per-thread call trees, and detach on exit.
    Trace {
        #[command(flatten)]
        target: commands::AttachTarget,
        /// Stop after this long (`5s`, `500ms`, `2m`); default: until Ctrl-C or the target
        /// exits.
        #[arg(long, short, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// How long a finished call waits for late spans of its children before printing.
        #[arg(long, value_parser = parse_duration, default_value = DEFAULT_GRACE)]
        grace: Duration,
    },
    /// Print recorded calls, oldest first.
    Calls {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        time: TimeArgs,
        #[command(flatten)]
        call: CallArgs,
        /// The most recent N matching calls; 0 for all.
        #[arg(long, short = 'n', value_name = "N", default_value_t = 100)]
        limit: u32,
        /// Print one JSON object per line (JSON Lines).
        #[arg(long)]
        json: bool,
    },
    /// Per-function call counts, total time and duration percentiles of recorded calls.
    Stats {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        time: TimeArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// The functions with the most time in them, refreshed live until Ctrl-C.
    ///
    /// Each refresh shows, per function, calls/s and time/s since the previous refresh and
    /// the cumulative count, total and p99.
    Top {
        #[command(flatten)]
        target: TargetArgs,
        /// Time between refreshes.
        #[arg(long, short, value_parser = parse_duration, default_value = DEFAULT_TOP_INTERVAL)]
        interval: Duration,
        /// Stop after N refreshes.
        #[arg(long, short = 'n', value_name = "N")]
        count: Option<u64>,
        /// Functions shown per refresh; 0 for all (--json always has all).
        #[arg(long, value_name = "N", default_value_t = DEFAULT_TOP_ROWS)]
        rows: usize,
        /// Print one JSON object per refresh (JSON Lines), without screen control codes.
        #[arg(long)]
        json: bool,
    },
    /// A flame graph (SVG or folded stacks) of recorded call trees.
    ///
    /// A frame's width is the time spent in the call, its traced children included.
    Flame {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        time: TimeArgs,
        #[command(flatten)]
        call: CallArgs,
        /// Write to this file instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Folded stacks (`outer;inner self_time_ns` per line) instead of SVG.
        #[arg(long)]
        folded: bool,
        /// The SVG's title.
        #[arg(long, value_name = "TITLE")]
        title: Option<String>,
    },
    /// Recorded calls as Chrome/Perfetto JSON or JSON Lines, or sent to an OpenTelemetry
    /// Collector.
    Export {
        /// The format.
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Write to this file instead of stdout (chrome and jsonl).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The collector's OTLP/gRPC address for --format otlp, e.g. http://localhost:4317.
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        time: TimeArgs,
        #[command(flatten)]
        call: CallArgs,
    },
    /// Recorded traces: causal call trees across threads and processes, newest first.
    Traces {
        /// Only traces that went through this process.
        #[arg(long, short)]
        pid: Option<u32>,
        #[command(flatten)]
        time: TimeArgs,
        /// The most recent N traces; 0 for all.
        #[arg(long, short = 'n', value_name = "N", default_value_t = 20)]
        limit: u32,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One trace as a tree across threads and processes, with how each hop happened
    /// (fork, wakeup, io).
    Show {
        /// The trace (32 hex digits, from `scope traces`).
        #[arg(value_name = "TRACE_ID", value_parser = filter::parse_trace_id)]
        trace_id: String,
        /// Also ask the scoped daemon at this socket or https:// URL (another host's, or
        /// another network namespace's) for the calls the trace's TCP bytes reached there,
        /// and stitch them in. Repeat for more daemons. An https:// daemon is reached with
        /// the same --ca, --cert, --key and --token-file.
        #[arg(long = "addr", value_name = "PATH|URL", value_parser = Address::parse)]
        addrs: Vec<Address>,
        /// Print one JSON object per span (the fields of `scope calls --json`).
        #[arg(long)]
        json: bool,
    },
    /// The traced processes as a tree, with start and end times (a reused pid is another
    /// process).
    Ps {
        /// Print one JSON object per process.
        #[arg(long)]
        json: bool,
    },
    /// List tracing sessions.
    Sessions {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Remove a session's probes, or every session's with --all.
    Detach {
        /// The session to detach (see `scope sessions`).
        #[arg(
            value_name = "SESSION_ID",
            required_unless_present = "all",
            conflicts_with = "all"
        )]
        session: Option<u64>,
        /// Detach every session.
        #[arg(long)]
        all: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show the daemon's counters: spans received and dropped, sessions, probes, store.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// What a binary is and runs on: language and toolchain, build id, stripped, DWARF, PIE,
    /// libraries, runtimes and known servers, USDT probes, request entry points, its functions
    /// by class, and a probe plan that fits --budget (for a live process measured: it is
    /// sampled for --window and its candidates' calls counted for --count).
    Analyze {
        /// A live process: its executable, as it sees it.
        #[arg(
            long,
            short,
            required_unless_present = "binary",
            conflicts_with = "binary"
        )]
        pid: Option<u32>,
        /// An ELF file.
        #[arg(long, value_name = "PATH")]
        binary: Option<String>,
        /// The budget the probe plan fits, a share of one CPU (default 1%).
        #[arg(long, value_name = "PERCENT", value_parser = commands::parse_percent)]
        budget: Option<f64>,
        /// For a process: how long to sample where it spends its CPU (default 1s).
        #[arg(long, value_name = "DURATION", value_parser = duration::parse_duration, requires = "pid")]
        window: Option<std::time::Duration>,
        /// For a process: how long to count the candidates' calls (default 200ms).
        #[arg(long, value_name = "DURATION", value_parser = duration::parse_duration, requires = "pid")]
        count: Option<std::time::Duration>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("scope: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `scope calls | head` closes the pipe early; that is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("scope: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

async fn run(cli: Cli) -> Result<()> {
    // Options that are wrong whatever the daemon says fail before connecting.
    if let Command::Export {
        format,
        output,
        endpoint,
        ..
    } = &cli.command
    {
        export::check_export(*format, endpoint.as_deref(), output.as_deref())
            .map_err(anyhow::Error::msg)?;
    }
    let now = now_unix_ns();
    let credentials = Credentials {
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
        token_file: cli.token_file,
    };
    let client = Client::connect(&cli.socket, &credentials).await?;
    let mut out = BufWriter::new(io::stdout());
    match cli.command {
        Command::Attach { target, json } => {
            commands::attach(&client, &mut out, &target, json).await?;
        }
        Command::Trace {
            target,
            duration,
            grace,
        } => {
            let options = trace::TraceOptions {
                target,
                duration,
                grace,
            };
            trace::trace(&client, &mut out, options).await?;
        }
        Command::Calls {
            target,
            time,
            call,
            limit,
            json,
        } => {
            let filter = span_filter(&target, Some(&time), Some(&call), now);
            check_range(&filter).map_err(anyhow::Error::msg)?;
            let query = commands::CallsQuery {
                filter,
                limit,
                json,
            };
            commands::calls(&client, &mut out, query).await?;
        }
        Command::Stats { target, time, json } => {
            let filter = span_filter(&target, Some(&time), None, now);
            check_range(&filter).map_err(anyhow::Error::msg)?;
            stats::stats(&client, &mut out, &filter, json).await?;
        }
        Command::Top {
            target,
            interval,
            count,
            rows,
            json,
        } => {
            if interval.is_zero() {
                anyhow::bail!("--interval must be longer than 0");
            }
            let options = stats::TopOptions {
                filter: span_filter(&target, None, None, now),
                interval,
                count,
                rows,
                json,
            };
            stats::top(&client, &mut out, options).await?;
        }
        Command::Flame {
            target,
            time,
            call,
            output,
            folded,
            title,
        } => {
            let filter = span_filter(&target, Some(&time), Some(&call), now);
            check_range(&filter).map_err(anyhow::Error::msg)?;
            let options = export::FlameOptions {
                filter,
                folded,
                title,
                output,
            };
            export::flame(&client, &mut out, options).await?;
        }
        Command::Export {
            format,
            output,
            endpoint,
            target,
            time,
            call,
        } => {
            let filter = span_filter(&target, Some(&time), Some(&call), now);
            check_range(&filter).map_err(anyhow::Error::msg)?;
            let options = export::ExportOptions {
                filter,
                format,
                endpoint,
                output,
            };
            export::export(&client, &mut out, options).await?;
        }
        Command::Sessions { json } => commands::sessions(&client, &mut out, json).await?,
        Command::Detach { session, all, json } => {
            commands::detach(&client, &mut out, if all { None } else { session }, json).await?
        }
        Command::Traces {
            pid,
            time,
            limit,
            json,
        } => {
            let filter = span_filter(
                &TargetArgs {
                    pid,
                    ..TargetArgs::default()
                },
                Some(&time),
                None,
                now,
            );
            check_range(&filter).map_err(anyhow::Error::msg)?;
            let request = scope_proto::v1::ListTracesRequest {
                pid: filter.pid,
                since_unix_ns: filter.since_unix_ns,
                until_unix_ns: filter.until_unix_ns,
                limit,
            };
            traces::list(&client, &mut out, request, json).await?;
        }
        Command::Show {
            trace_id,
            addrs,
            json,
        } => traces::show(&client, &addrs, &credentials, &mut out, trace_id, json).await?,
        Command::Ps { json } => traces::ps(&client, &mut out, json).await?,
        Command::Status { json } => commands::status(&client, &mut out, json).await?,
        Command::Analyze {
            pid,
            binary,
            budget,
            window,
            count,
            json,
        } => {
            let args = commands::AnalyzeArgs {
                pid: pid.unwrap_or(0),
                binary,
                budget,
                window,
                count,
            };
            commands::analyze(&client, &mut out, args, json).await?
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_command_lines() {
        let cli = Cli::try_parse_from([
            "scope",
            "--socket",
            "/tmp/s",
            "trace",
            "--pid",
            "7",
            "--func",
            "a*",
            "--func",
            "b",
            "--duration",
            "500ms",
        ])
        .expect("trace parses");
        assert_eq!(cli.socket, Address::Unix(PathBuf::from("/tmp/s")));
        match cli.command {
            Command::Trace {
                target,
                duration,
                grace,
            } => {
                assert_eq!(target.pid, 7);
                assert_eq!(target.functions, ["a*", "b"]);
                assert!(target.follow, "forks are followed unless --no-follow");
                assert_eq!(duration, Some(Duration::from_millis(500)));
                assert_eq!(grace, Duration::from_millis(100));
            }
            _ => panic!("not trace"),
        }
        let cli = Cli::try_parse_from(["scope", "attach", "-p", "7", "-f", "x", "--no-follow"])
            .expect("attach --no-follow parses");
        assert!(
            matches!(cli.command, Command::Attach { target, .. } if !target.follow),
            "--no-follow turns following off"
        );
        let cli = Cli::try_parse_from(["scope", "calls"]).expect("calls parses");
        assert!(matches!(cli.command, Command::Calls { limit: 100, .. }));
        assert!(Cli::try_parse_from(["scope", "detach", "--all"]).is_ok());
        let cli = Cli::try_parse_from([
            "scope",
            "calls",
            "--since",
            "5m",
            "--until",
            "2024-05-01T13:00:00Z",
            "--min-duration",
            "1ms",
            "--trace",
            "0123456789abcdef0123456789abcdef",
            "-p",
            "3",
        ])
        .expect("calls with filters parses");
        match cli.command {
            Command::Calls {
                target, time, call, ..
            } => {
                assert_eq!(target.pid, Some(3));
                assert_eq!(
                    time.since,
                    Some(filter::TimeSpec::Ago(Duration::from_secs(300)))
                );
                assert_eq!(
                    time.until,
                    Some(filter::TimeSpec::At(1_714_568_400_000_000_000))
                );
                assert_eq!(call.min_duration, Some(Duration::from_millis(1)));
                assert!(call.trace_id.is_some());
            }
            _ => panic!("not calls"),
        }
        let cli = Cli::try_parse_from(["scope", "top"]).expect("top parses");
        match cli.command {
            Command::Top {
                interval,
                count,
                rows,
                json,
                ..
            } => {
                assert_eq!(interval, Duration::from_secs(1));
                assert_eq!((count, rows, json), (None, DEFAULT_TOP_ROWS, false));
            }
            _ => panic!("not top"),
        }
        assert!(Cli::try_parse_from(["scope", "top", "-i", "250ms", "-n", "3", "--json"]).is_ok());
        assert!(
            Cli::try_parse_from(["scope", "stats", "--func", "f*", "--since", "1h", "--json"])
                .is_ok()
        );
        assert!(
            Cli::try_parse_from(["scope", "flame", "-o", "x.svg", "--title", "t", "--folded"])
                .is_ok()
        );
        assert!(
            Cli::try_parse_from(["scope", "export", "--format", "chrome", "-o", "t.json"]).is_ok()
        );
        assert!(
            Cli::try_parse_from(["scope", "export", "-o", "t.json"]).is_err(),
            "--format is required"
        );
        assert!(Cli::try_parse_from(["scope", "export", "--format", "perfetto"]).is_err());
        assert!(Cli::try_parse_from(["scope", "calls", "--since", "soon"]).is_err());
        assert!(Cli::try_parse_from(["scope", "detach", "3"]).is_ok());
        assert!(Cli::try_parse_from(["scope", "detach"]).is_err());
        assert!(Cli::try_parse_from(["scope", "detach", "3", "--all"]).is_err());
        assert!(Cli::try_parse_from(["scope", "attach", "--pid", "1"]).is_err());
        assert!(
            Cli::try_parse_from([
                "scope",
                "trace",
                "--pid",
                "1",
                "--func",
                "f",
                "--duration",
                "5x"
            ])
            .is_err()
        );
    }
}
