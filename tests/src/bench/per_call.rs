//! The per-call cost of tracing one function (entry + exit captured), scope against its
//! peers, measured in one run on one binary so the ratios are meaningful on a noisy machine.
//!
//! The target calls a tiny function N times in a loop and reports the loop's nanoseconds per
//! call. Each configuration attaches, runs a round, detaches; configurations are interleaved
//! round by round and each one's median is kept. The cost of a configuration is its
//! ns/call minus the untraced ns/call.

use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::{machine, today};
use crate::{Proc, Scoped, Target, compile, read_memory, runtime_address};

const TARGET_SOURCE: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) long work(long x) {
    __asm__ volatile("" ::: "memory");
    return x + 1;
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    char line[16];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'q') break;
        long acc = 0;
        double start = now_ns();
        for (long i = 0; i < n; i++) acc += work(i);
        double end = now_ns();
        printf("ns_per_call %.3f %ld\n", (end - start) / n, acc); fflush(stdout);
    }
    return 0;
}
"#;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct BenchConfig {
    /// Calls per round.
    pub calls: u64,
    /// Rounds per configuration (the median is kept).
    pub rounds: usize,
}

impl BenchConfig {
    pub const FULL: BenchConfig = BenchConfig {
        calls: 200_000,
        rounds: 5,
    };
    pub const QUICK: BenchConfig = BenchConfig {
        calls: 20_000,
        rounds: 1,
    };
}

/// One configuration's result.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub name: &'static str,
    pub what: &'static str,
    pub ns_per_call: f64,
    /// ns_per_call minus the untraced ns_per_call.
    pub cost_ns: f64,
    /// Spans (or events) the tracer reported, when it reports them.
    pub captured: Option<u64>,
}

/// What the run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub results: Vec<Measurement>,
    pub machine: String,
}

impl BenchReport {
    pub fn get(&self, name: &str) -> Option<&Measurement> {
        self.results.iter().find(|m| m.name == name)
    }

    /// `a`'s cost divided by `b`'s.
    pub fn ratio(&self, a: &str, b: &str) -> Option<f64> {
        Some(self.get(a)?.cost_ns / self.get(b)?.cost_ns)
    }

    /// BENCHMARKS.md's section for this benchmark.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "## Per-call cost of tracing one function (entry + exit)\n"
        );
        let _ = writeln!(
            md,
            "A C function `work(long)` called {} times in a loop; each configuration attaches to it, runs the \
             loop, detaches. Rounds are interleaved; the median of {} rounds is kept. *Cost* is ns/call minus \
             the untraced ns/call. Measured {} on {}.\n",
            self.config.calls,
            self.config.rounds,
            today(),
            self.machine
        );
        let _ = writeln!(
            md,
            "| configuration | what it does | ns/call | cost ns/call | cost vs empty pair | captured |"
        );
        let _ = writeln!(md, "| --- | --- | ---: | ---: | ---: | ---: |");
        for m in &self.results {
            let ratio = match (m.name, self.get("null pair")) {
                ("untraced", _) => "—".to_owned(),
                (_, Some(floor)) => format!("{:.3}×", m.cost_ns / floor.cost_ns),
                _ => "?".to_owned(),
            };
            let captured = m.captured.map_or("—".to_owned(), |c| c.to_string());
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.2} | {} | {} |",
                m.name, m.what, m.ns_per_call, m.cost_ns, ratio, captured
            );
        }
        let _ = writeln!(md);
        let mut line = |label: &str, a: &str, b: &str| {
            if let Some(r) = self.ratio(a, b) {
                let _ = writeln!(md, "- {label}: **{r:.3}×**");
            }
        };
        line(
            "scope ÷ empty uprobe+uretprobe pair (goal ≤ 1.10)",
            "scope",
            "null pair",
        );
        line(
            "scope ÷ bpftrace (uprobe+uretprobe measuring duration)",
            "scope",
            "bpftrace",
        );
        line(
            "scope ÷ perf probe + perf record (entry+return events)",
            "scope",
            "perf",
        );
        md
    }
}

/// A tracer under test: attaches to `work` in the target and detaches.
trait Tracer {
    fn name(&self) -> &'static str;
    fn what(&self) -> &'static str;
    fn attach(&mut self, pid: u32);
    /// Detaches; returns how many calls it captured, if it knows.
    fn detach(&mut self) -> Option<u64>;
}

struct Untraced;

impl Tracer for Untraced {
    fn name(&self) -> &'static str {
        "untraced"
    }
    fn what(&self) -> &'static str {
        "no probe"
    }
    fn attach(&mut self, _pid: u32) {}
    fn detach(&mut self) -> Option<u64> {
        None
    }
}

/// scope itself, or scoped with its empty programs (the floor).
struct ScopeTracer {
    scoped: Scoped,
    null: bool,
    session: Option<String>,
    received_before: u64,
}

impl Tracer for ScopeTracer {
    fn name(&self) -> &'static str {
        if self.null { "null pair" } else { "scope" }
    }
    fn what(&self) -> &'static str {
        if self.null {
            "empty uprobe.multi + uretprobe.multi programs (the trap floor)"
        } else {
            "scope: span paired in kernel, ring buffer, daemon stores it"
        }
    }
    fn attach(&mut self, pid: u32) {
        self.received_before = self.scoped.status()["spans_received"].as_u64().unwrap_or(0);
        let session = self.scoped.attach(pid, &["work"]);
        self.session = session["session_id"].as_u64().map(|id| id.to_string());
    }
    fn detach(&mut self) -> Option<u64> {
        let id = self.session.take()?;
        self.scoped.scope_ok(&["detach", &id]);
        if self.null {
            return None;
        }
        // Let the reader drain the rings.
        thread::sleep(Duration::from_millis(300));
        Some(self.scoped.status()["spans_received"].as_u64().unwrap_or(0) - self.received_before)
    }
}

/// bpftrace with uprobe + uretprobe measuring each call's duration into a histogram.
struct Bpftrace {
    binary: String,
    running: Option<Proc>,
}

impl Tracer for Bpftrace {
    fn name(&self) -> &'static str {
        "bpftrace"
    }
    fn what(&self) -> &'static str {
        "uprobe + uretprobe, duration into a histogram"
    }
    fn attach(&mut self, pid: u32) {
        let program = format!(
            "uprobe:{b}:work {{ @start[tid] = nsecs; }} uretprobe:{b}:work /@start[tid]/ {{ @ns = hist(nsecs - @start[tid]); delete(@start[tid]); @n = count(); }}",
            b = self.binary
        );
        let proc = Proc::spawn(
            "bpftrace",
            Command::new("bpftrace")
                .args(["-p", &pid.to_string(), "-e", &program])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        self.running = Some(proc);
    }
    fn detach(&mut self) -> Option<u64> {
        let mut proc = self.running.take()?;
        proc.signal(libc::SIGINT);
        proc.wait_exit(Duration::from_secs(20));
        None
    }
}

/// `perf probe` entry and return events on the binary, recorded with `perf record -p`.
struct Perf {
    binary: String,
    group: String,
    running: Option<Proc>,
    data: std::path::PathBuf,
}

impl Perf {
    fn new(binary: &str, data: std::path::PathBuf) -> Perf {
        let group = "scopebench".to_owned();
        let probe = |spec: String| {
            let out = Command::new("perf")
                .args(["probe", "-q", "-x", binary, &spec])
                .output()
                .expect("perf is installed (`cargo xtask setup`)");
            assert!(
                out.status.success(),
                "perf probe {spec}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("perf")
            .args(["probe", "-q", "-d", &format!("{group}:*")])
            .output();
        probe(format!("{group}:work=work"));
        probe(format!("{group}:work_ret=work%return"));
        Perf {
            binary: binary.to_owned(),
            group,
            running: None,
            data,
        }
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        let _ = Command::new("perf")
            .args(["probe", "-q", "-d", &format!("{}:*", self.group)])
            .output();
    }
}

impl Tracer for Perf {
    fn name(&self) -> &'static str {
        "perf"
    }
    fn what(&self) -> &'static str {
        "perf probe entry + return events, perf record -p"
    }
    fn attach(&mut self, pid: u32) {
        let _ = &self.binary;
        let proc = Proc::spawn(
            "perf record",
            Command::new("perf")
                .args(["record", "-q", "-o"])
                .arg(&self.data)
                .args([
                    "-e",
                    &format!("{}:work", self.group),
                    "-e",
                    &format!("{}:work_ret__return", self.group),
                    "-p",
                    &pid.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        self.running = Some(proc);
    }
    fn detach(&mut self) -> Option<u64> {
        let mut proc = self.running.take()?;
        proc.signal(libc::SIGINT);
        proc.wait_exit(Duration::from_secs(30));
        None
    }
}

fn wait_for_breakpoint(pid: u32, address: u64, want: bool, who: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while (read_memory(pid, address, 1)[0] == 0xcc) != want {
        assert!(
            Instant::now() < deadline,
            "{who}: the uprobe on work was {} in time",
            if want { "not placed" } else { "not removed" }
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs every configuration and returns the medians.
pub fn run(config: BenchConfig) -> BenchReport {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile(
        dir.path(),
        "gcc",
        "bench_target.c",
        TARGET_SOURCE,
        &["-O2", "-g"],
    );
    let binary_str = binary.to_str().expect("utf-8 path").to_owned();
    let mut target = Target::spawn(
        "bench_target",
        Command::new(&binary).arg(config.calls.to_string()),
    );
    target.expect_line("ready", Duration::from_secs(10));
    let pid = target.pid();
    let address = runtime_address(pid, &binary, "work");

    let mut tracers: Vec<Box<dyn Tracer>> = vec![
        Box::new(Untraced),
        Box::new(ScopeTracer {
            scoped: Scoped::start_with(&["--bench-null-programs"]),
            null: true,
            session: None,
            received_before: 0,
        }),
        Box::new(ScopeTracer {
            scoped: Scoped::start(),
            null: false,
            session: None,
            received_before: 0,
        }),
        Box::new(Bpftrace {
            binary: binary_str.clone(),
            running: None,
        }),
        Box::new(Perf::new(&binary_str, dir.path().join("perf.data"))),
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); tracers.len()];
    let mut captured: Vec<Option<u64>> = vec![None; tracers.len()];
    // One warm-up loop, then the interleaved rounds.
    target.send("go");
    target.expect_line("ns_per_call", Duration::from_secs(60));
    for _round in 0..config.rounds {
        for (index, tracer) in tracers.iter_mut().enumerate() {
            let traced = tracer.name() != "untraced";
            tracer.attach(pid);
            if traced {
                wait_for_breakpoint(pid, address, true, tracer.name());
            }
            target.send("go");
            let line = target.expect_line("ns_per_call", Duration::from_secs(120));
            let ns: f64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .expect("ns_per_call value");
            samples[index].push(ns);
            captured[index] = tracer.detach();
            if traced {
                wait_for_breakpoint(pid, address, false, tracer.name());
            }
        }
    }
    target.send("q");

    let medians: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
    let baseline = medians[0];
    let results = tracers
        .iter()
        .zip(&medians)
        .zip(&captured)
        .map(|((tracer, &ns), &captured)| Measurement {
            name: tracer.name(),
            what: tracer.what(),
            ns_per_call: ns,
            cost_ns: ns - baseline,
            captured,
        })
        .collect();
    BenchReport {
        config,
        results,
        machine: machine(),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}
