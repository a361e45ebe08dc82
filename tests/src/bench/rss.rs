//! The daemon's memory under a steady load: scoped traces a program making calls at a
//! steady rate for a long time; its resident set is sampled throughout. Every queue on the
//! span path is bounded, so the RSS must level off, not grow with the spans seen.

use std::{
    fmt::Write as _,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{Scoped, Target, compile};

use super::{machine, today};

const SOURCE: &str = r#"#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) long add(long a, long b) {
    __asm__ volatile("" ::: "memory");
    return a + b;
}

int main(void) {
    char line[16];
    volatile long total = 0;
    printf("ready\n"); fflush(stdout);
    fgets(line, sizeof line, stdin);
    for (long i = 0;; i++) { total += add(i, 1); if (i % 20 == 0) usleep(1000); }
    return (int)total;
}
"#;

#[derive(Clone, Debug)]
pub struct RssReport {
    pub duration: Duration,
    /// (seconds since the load started, RSS in KiB).
    pub samples: Vec<(u64, u64)>,
    pub spans: u64,
    pub dropped: u64,
    pub machine: String,
}

impl RssReport {
    fn at_least(&self, seconds: u64) -> Option<u64> {
        self.samples
            .iter()
            .find(|(t, _)| *t >= seconds)
            .map(|(_, kib)| *kib)
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## The daemon's memory at a steady load\n");
        let seconds = self.duration.as_secs();
        let _ = writeln!(
            md,
            "scoped traces a C program calling a function at a steady rate for {} s ({} spans, {:.0}/s, {} \
             dropped); its VmRSS is sampled every {} s. Measured {} on {}.\n",
            seconds,
            self.spans,
            self.spans as f64 / seconds.max(1) as f64,
            self.dropped,
            sample_every(self.duration).as_secs(),
            today(),
            self.machine
        );
        let _ = writeln!(md, "| time | RSS |");
        let _ = writeln!(md, "| ---: | ---: |");
        let step = (self.samples.len() / 12).max(1);
        for (t, kib) in self.samples.iter().step_by(step).chain(self.samples.last()) {
            let _ = writeln!(md, "| {t} s | {:.1} MiB |", *kib as f64 / 1024.0);
        }
        if let (Some(early), Some((_, last))) = (self.at_least(seconds / 5), self.samples.last()) {
            let _ = writeln!(
                md,
                "\nFrom {} s to the end the RSS changed by {:+.1} MiB ({:+.2}%).",
                seconds / 5,
                (*last as f64 - early as f64) / 1024.0,
                (*last as f64 - early as f64) * 100.0 / early as f64
            );
        }
        md
    }
}

fn sample_every(duration: Duration) -> Duration {
    (duration / 40).max(Duration::from_secs(1))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub fn run(duration: Duration) -> RssReport {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile(dir.path(), "gcc", "steady.c", SOURCE, &["-O1"]);
    let scoped = Scoped::start();
    let mut target = Target::spawn("steady", &mut Command::new(binary));
    target.expect_line("ready", Duration::from_secs(10));
    scoped.attach(target.pid(), &["add"]);
    target.send("go");
    let daemon = scoped.proc.pid();
    let start = Instant::now();
    let every = sample_every(duration);
    let mut samples = Vec::new();
    while start.elapsed() < duration {
        samples.push((start.elapsed().as_secs(), rss_kib(daemon)));
        thread::sleep(every);
    }
    samples.push((start.elapsed().as_secs(), rss_kib(daemon)));
    let status = scoped.status();
    assert!(
        status["spans_received"].as_u64().unwrap_or(0) > 0,
        "the steady load produced no spans: {status}"
    );
    RssReport {
        duration,
        samples,
        spans: status["spans_received"].as_u64().unwrap_or(0),
        dropped: status["spans_dropped"].as_u64().unwrap_or(0),
        machine: machine(),
    }
}
