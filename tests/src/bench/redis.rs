//! A real program's throughput under tracing: Debian's redis-server driven by
//! redis-benchmark, untraced, traced by scope and traced by bpftrace on the same two functions
//! (`processCommand` and the `call` inside it), in one run with the rounds interleaved.
//!
//! redis-server is pinned to one CPU and redis-benchmark to the others, so the server's CPU is
//! what limits the rate and what the probes cost shows in it.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
};

use super::{TRACERS, Tracers, machine, today};
use crate::Redis;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct RedisConfig {
    /// Requests per redis-benchmark run (SET and GET each).
    pub requests: u64,
    /// Rounds per configuration (the median is kept).
    pub rounds: usize,
}

impl RedisConfig {
    pub const FULL: RedisConfig = RedisConfig {
        requests: 100_000,
        rounds: 5,
    };
    pub const QUICK: RedisConfig = RedisConfig {
        requests: 10_000,
        rounds: 1,
    };
}

#[derive(Clone, Debug)]
pub struct RedisMeasurement {
    pub name: &'static str,
    pub what: &'static str,
    /// Median operations per second, SET and GET.
    pub set: f64,
    pub get: f64,
    /// Spans scope stored and dropped over all rounds (scope only).
    pub spans: Option<(u64, u64)>,
}

#[derive(Clone, Debug)]
pub struct RedisReport {
    pub config: RedisConfig,
    pub results: Vec<RedisMeasurement>,
    pub machine: String,
}

impl RedisReport {
    fn get(&self, name: &str) -> Option<&RedisMeasurement> {
        self.results.iter().find(|m| m.name == name)
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "## A real program: redis-server under redis-benchmark\n"
        );
        let _ = writeln!(
            md,
            "Debian's redis-server (pinned to one CPU) driven by `redis-benchmark -t set,get -n {} -c 50` \
             (on the other CPUs). Traced configurations probe `processCommand` and the `call` inside it \
             (entry and exit of both: two uprobe pairs per request). Rounds interleaved, median of {}. \
             Measured {} on {}.\n",
            self.config.requests,
            self.config.rounds,
            today(),
            self.machine
        );
        let _ = writeln!(
            md,
            "| configuration | what it does | SET ops/s | GET ops/s | vs untraced (GET) | spans kept / dropped |"
        );
        let _ = writeln!(md, "| --- | --- | ---: | ---: | ---: | ---: |");
        let base = self.get("untraced").map(|m| m.get);
        for m in &self.results {
            let ratio = match (m.name, base) {
                ("untraced", _) => "—".to_owned(),
                (_, Some(base)) => format!("{:.3}×", m.get / base),
                _ => "?".to_owned(),
            };
            let spans = m.spans.map_or("—".to_owned(), |(kept, dropped)| {
                format!("{kept} / {dropped}")
            });
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {} | {} |",
                m.name, m.what, m.set, m.get, ratio, spans
            );
        }
        let _ = writeln!(md);
        for name in ["scope, no capture", "scope"] {
            if let (Some(scope), Some(bpftrace)) = (self.get(name), self.get("bpftrace")) {
                let _ = writeln!(
                    md,
                    "- {name} ÷ bpftrace throughput: **{:.3}×** (SET), **{:.3}×** (GET); 1.0 means the same cost.",
                    scope.set / bpftrace.set,
                    scope.get / bpftrace.get
                );
            }
        }
        let _ = writeln!(
            md,
            "\nWhy the gap: both functions start with `push` (which the kernel emulates), so the trap itself is \
             nearly free here (the empty pair's row) — unlike the per-call benchmark's `work`, whose first instruction must be \
             single-stepped (the ~15 µs trap of that table). What scope pays for is what bpftrace does not do: \
             a span per call carried to user space and stored (the daemon's CPU, mostly its SQLite writer at \
             about half a core here, competes with redis and redis-benchmark on this 2-CPU machine), and, \
             with IO capture, every read and write of redis-server followed to its socket and stored. Rows \
             above 1.0× are this VM's doing: a CPU kept busy by traps idles less and answers wakeups sooner."
        );
        md
    }
}

/// One redis-benchmark run: (SET ops/s, GET ops/s).
pub(crate) fn benchmark(port: u16, requests: u64, cpus: usize) -> (f64, f64) {
    let mut command = Command::new("redis-benchmark");
    command.args([
        "-p",
        &port.to_string(),
        "-n",
        &requests.to_string(),
        "-c",
        "50",
        "-t",
        "set,get",
        "--csv",
    ]);
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-benchmark runs (installed by `cargo xtask setup`)");
    if cpus > 1 {
        super::pin(child.id(), 0..cpus - 1);
    }
    let out = child.wait_with_output().expect("redis-benchmark output");
    assert!(out.status.success(), "redis-benchmark failed");
    let text = String::from_utf8_lossy(&out.stdout);
    // "SET","98039.22",... (newer) or "SET","98039.22" (older).
    let rate = |test: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))
            .and_then(|l| l.split(',').nth(1))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("no {test} rate in redis-benchmark's output:\n{text}"))
    };
    (rate("SET"), rate("GET"))
}

pub fn run(config: RedisConfig) -> RedisReport {
    let redis = Redis::start();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    super::pin(redis.pid(), std::iter::once(cpus - 1));
    let exe = std::fs::read_link(format!("/proc/{}/exe", redis.pid()))
        .expect("redis-server's executable");
    let exe = exe.to_str().expect("UTF-8 path").to_owned();
    let tracers = Tracers::start();
    // Warm up: the keys exist, the server's memory is allocated.
    benchmark(redis.port, config.requests, cpus);

    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); TRACERS.len()];
    let mut kept = vec![0u64; TRACERS.len()];
    let mut dropped = vec![0u64; TRACERS.len()];
    for _ in 0..config.rounds {
        for (index, &(name, _)) in TRACERS.iter().enumerate() {
            let ((set, get), spans) = tracers.run(
                name,
                redis.pid(),
                &exe,
                &["processCommand", "call"],
                Some(redis.pid()),
                || benchmark(redis.port, config.requests, cpus),
            );
            samples[index].0.push(set);
            samples[index].1.push(get);
            if let Some((stored, lost)) = spans {
                kept[index] += stored;
                dropped[index] += lost;
            }
        }
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let results = TRACERS
        .iter()
        .zip(samples.iter_mut())
        .enumerate()
        .map(|(index, (&(name, what), (set, get)))| RedisMeasurement {
            name,
            what,
            set: median(set),
            get: median(get),
            spans: name
                .starts_with("scope")
                .then_some((kept[index], dropped[index])),
        })
        .collect();
    RedisReport {
        config,
        results,
        machine: machine(),
    }
}
