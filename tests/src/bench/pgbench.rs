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
             the executable in every process. Rounds interleaved, median of {}. Measured {} on {}.\n",
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
        for name in ["scope, no capture", "scope"] {
            if let (Some(scope), Some(bpftrace)) = (self.get(name), self.get("bpftrace")) {
                let _ = writeln!(
                    md,
                    "- {name} ÷ bpftrace TPS: **{:.3}×**; 1.0 means the same cost.",
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

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); TRACERS.len()];
    let mut kept = vec![0u64; TRACERS.len()];
    let mut dropped = vec![0u64; TRACERS.len()];
    for _ in 0..config.rounds {
        for (index, &(name, _)) in TRACERS.iter().enumerate() {
            let (tps, spans) = tracers.run(name, postgres.pid(), &exe, &FUNCTIONS, None, || {
                benchmark(&postgres, config.seconds, cpus)
            });
            samples[index].push(tps);
            if let Some((stored, lost)) = spans {
                kept[index] += stored;
                dropped[index] += lost;
            }
        }
    }
    let results = TRACERS
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
