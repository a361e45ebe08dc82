//! A real multi-process server under tracing: Debian's PostgreSQL driven by pgbench
//! (select-only transactions), untraced, traced by scope and traced by bpftrace on the same
//! two functions (`PortalRun`, which runs each query, and the `ExecutorRun` inside it), in one
//! run with the rounds interleaved.
//!
//! PostgreSQL forks a backend per connection: scope attaches to the postmaster and follows
//! its forks; bpftrace probes the executable for every process. The server's processes are
//! pinned to one CPU and pgbench to the others, so the server's CPU limits the rate.

use std::{fmt::Write as _, process::Stdio};

use super::{TRACERS, Tracers, machine, today};
use crate::Postgres;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct PgbenchConfig {
    /// Seconds per pgbench run.
    pub seconds: u32,
    /// Rounds per configuration (the median is kept).
    pub rounds: usize,
}

impl PgbenchConfig {
    pub const FULL: PgbenchConfig = PgbenchConfig {
        seconds: 10,
        rounds: 5,
    };
    pub const QUICK: PgbenchConfig = PgbenchConfig {
        seconds: 2,
        rounds: 1,
    };
}

/// pgbench clients (connections, so backends).
const CLIENTS: u32 = 8;
// Debian strips postgres: only exported functions have symbols (`exec_simple_query`, the
// simple protocol's entry, is static).
const FUNCTIONS: [&str; 2] = ["PortalRun", "ExecutorRun"];

/// Configurations of this benchmark alone, on PostgreSQL's own query probes (USDT), in run
/// order after [`TRACERS`].
const QUERY_TRACERS: [(&str, &str); 2] = [
    (
        "scope, query spans",
        "`--usdt postgresql:query__start --usdt postgresql:query__done`: one span per query with its SQL, paired in the kernel (`--no-io-capture`)",
    ),
    (
        "bpftrace, query probes",
        "the same two USDT probes (`--usdt-file-activation`), query durations into a histogram",
    ),
];

/// Runs `measure` under configuration `name` of [`QUERY_TRACERS`]; for scope, also the
/// spans stored and dropped.
fn query_round(
    tracers: &Tracers,
    name: &str,
    postgres: &Postgres,
    exe: &str,
    measure: impl FnOnce() -> f64,
) -> (f64, Option<(u64, u64)>) {
    use std::process::Command;
    use std::time::Duration;
    if name.starts_with("scope") {
        let daemon = &tracers.no_capture;
        let before = daemon.status();
        let pid = postgres.pid().to_string();
        let attached = daemon.scope_json(&[
            "attach",
            "--pid",
            &pid,
            "--usdt",
            "postgresql:query__start",
            "--usdt",
            "postgresql:query__done",
            "--json",
        ]);
        let tps = measure();
        daemon.scope_ok(&["detach", &attached["session_id"].to_string()]);
        let after = daemon.settled_status(Duration::from_secs(60));
        let delta =
            |key: &str| after[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0);
        return (tps, Some((delta("stored_spans"), delta("spans_dropped"))));
    }
    let program = format!(
        "usdt:{exe}:postgresql:query__start {{ @start[tid] = nsecs; }} \
         usdt:{exe}:postgresql:query__done /@start[tid]/ {{ @ns = hist(nsecs - @start[tid]); delete(@start[tid]); }}"
    );
    let mut command = Command::new("bpftrace");
    // Raises the semaphores in the running postmaster; the backends it forks inherit them.
    command
        .args(["--usdt-file-activation", "-e", &program])
        .stderr(Stdio::null());
    let mut bpftrace = crate::Target::spawn("bpftrace", &mut command);
    bpftrace.expect_line("Attaching", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let tps = measure();
    bpftrace.proc.signal(libc::SIGINT);
    bpftrace.proc.wait_exit(Duration::from_secs(30));
    (tps, None)
}

#[derive(Clone, Debug)]
pub struct PgbenchMeasurement {
    pub name: &'static str,
    pub what: &'static str,
    /// Median transactions per second.
    pub tps: f64,
    /// Spans scope stored and dropped over all rounds (scope only).
    pub spans: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
pub struct PgbenchReport {
    pub config: PgbenchConfig,
    pub results: Vec<PgbenchMeasurement>,
    pub machine: String,
}

impl PgbenchReport {
    pub fn get(&self, name: &str) -> Option<&PgbenchMeasurement> {
        self.results.iter().find(|m| m.name == name)
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## A real program: PostgreSQL under pgbench\n");
        let _ = writeln!(
            md,
            "Debian's PostgreSQL (all its processes pinned to one CPU, fsync off) driven by \
             `pgbench -S -c {CLIENTS} -j 2 -T {}` (select-only, simple protocol, on the other CPUs). \
             Traced configurations probe `PortalRun` and the `ExecutorRun` inside it, entry and \
             exit: scope attaches to the postmaster and follows the backends it forks; bpftrace probes \
             the executable in every process. The last two use PostgreSQL's own USDT probes instead, \
             `query__start` and `query__done`: scope makes each query one span carrying its SQL, \
             bpftrace a histogram of query durations. Rounds interleaved, median of {}. Measured {} on {}.\n",
            self.config.seconds,
            self.config.rounds,
            today(),
            self.machine
        );
        let _ = writeln!(
            md,
            "| configuration | what it does | TPS | vs untraced | spans kept / dropped |"
        );
        let _ = writeln!(md, "| --- | --- | ---: | ---: | ---: |");
        let base = self.get("untraced").map(|m| m.tps);
        for m in &self.results {
            let ratio = match (m.name, base) {
                ("untraced", _) => "—".to_owned(),
                (_, Some(base)) => format!("{:.3}×", m.tps / base),
                _ => "?".to_owned(),
            };
            let spans = m.spans.map_or("—".to_owned(), |(kept, dropped)| {
                format!("{kept} / {dropped}")
            });
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {} | {} |",
                m.name, m.what, m.tps, ratio, spans
            );
        }
        let _ = writeln!(md);
        for (name, peer) in [
            ("scope, no capture", "bpftrace"),
            ("scope", "bpftrace"),
            ("scope, query spans", "bpftrace, query probes"),
        ] {
            if let (Some(scope), Some(bpftrace)) = (self.get(name), self.get(peer)) {
                let _ = writeln!(
                    md,
                    "- {name} ÷ {peer} TPS: **{:.3}×**; 1.0 means the same cost.",
                    scope.tps / bpftrace.tps
                );
            }
        }
        md
    }
}

/// One pgbench run: transactions per second.
fn benchmark(postgres: &Postgres, seconds: u32, cpus: usize) -> f64 {
    let child = postgres
        .pgbench_command(&[
            "-n",
            "-S",
            "-c",
            &CLIENTS.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench runs (installed by `cargo xtask setup`)");
    if cpus > 1 {
        super::pin(child.id(), 0..cpus - 1);
    }
    let out = child.wait_with_output().expect("pgbench output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench failed:\n{text}");
    // "tps = 12345.678901 (without initial connection time)"
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tps in pgbench's output:\n{text}"))
}

pub fn run(config: PgbenchConfig) -> PgbenchReport {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = (cpus - 1).to_string();
    let postgres = Postgres::start(1, &["taskset", "-c", &last]);
    let exe = postgres.executable();
    let exe = exe.to_str().expect("UTF-8 path").to_owned();
    let tracers = Tracers::start();
    // Warm up: the tables are in the server's cache.
    benchmark(&postgres, config.seconds, cpus);

    let configurations: Vec<(&str, &str)> = TRACERS.iter().chain(&QUERY_TRACERS).copied().collect();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); configurations.len()];
    let mut kept = vec![0u64; configurations.len()];
    let mut dropped = vec![0u64; configurations.len()];
    for _ in 0..config.rounds {
        for (index, &(name, _)) in configurations.iter().enumerate() {
            let measure = || benchmark(&postgres, config.seconds, cpus);
            let (tps, spans) = if index < TRACERS.len() {
                tracers.run(name, postgres.pid(), &exe, &FUNCTIONS, None, measure)
            } else {
                query_round(&tracers, name, &postgres, &exe, measure)
            };
            samples[index].push(tps);
            if let Some((stored, lost)) = spans {
                kept[index] += stored;
                dropped[index] += lost;
            }
        }
    }
    let results = configurations
        .iter()
        .zip(samples.iter_mut())
        .enumerate()
        .map(|(index, (&(name, what), tps))| {
            tps.sort_by(f64::total_cmp);
            PgbenchMeasurement {
                name,
                what,
                tps: tps[tps.len() / 2],
                spans: name
                    .starts_with("scope")
                    .then_some((kept[index], dropped[index])),
            }
        })
        .collect();
    PgbenchReport {
        config,
        results,
        machine: machine(),
    }
}
