//! Privileged end-to-end tests (root, BPF) of overhead control: sampling and rate limits in
//! the kernel account for every call, and an overhead budget keeps a program calling a
//! traced function 500,000 times a second near its untraced speed, naming the probe it
//! throttled.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use scope_tests::{Scoped, Target, WORK_SOURCE as WORK, compile};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// The tests of this file run one at a time: the budget test measures the speed of a program
/// against itself, and the others' loads on this 2-CPU machine would be its noise.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Calls `work` (about 2 µs of arithmetic, calibrated at start) as fast as it can, and
/// `cold` every 100 ms; prints how many `work` calls each 250 ms window made.
const HOT: &str = r#"#include <stdio.h>
#include <time.h>

static volatile long sink;
static long spins = 100;

__attribute__((noinline)) long work(long x) {
    long acc = x;
    for (long i = 0; i < spins; i++) {
        acc = acc * 6364136223846793005L + 1442695040888963407L;
        __asm__ volatile("" : "+r"(acc));
    }
    return acc;
}

__attribute__((noinline)) void cold(long x) {
    sink = x;
    __asm__ volatile("" ::: "memory");
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    /* Calibrate: one call of work() takes about 2 µs, 500,000 calls a second. */
    double start = now();
    for (long i = 0; i < 100000; i++) sink = work(i);
    double per_call = (now() - start) / 100000;
    spins = (long)(spins * 2e-6 / per_call);
    if (spins < 1) spins = 1;
    printf("ready %ld\n", spins);
    double window = now(), last_cold = window;
    long calls = 0;
    for (long i = 0;; i++) {
        sink = work(i);
        calls++;
        if ((i & 255) == 0) {
            double t = now();
            if (t - last_cold >= 0.1) {
                cold(i);
                last_cold = t;
            }
            if (t - window >= 0.25) {
                printf("rate %.0f %.6f\n", calls / (t - window), t);
                calls = 0;
                window = t;
            }
        }
    }
}
"#;

fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {value}"))
}

/// The session's probe on `function`.
fn probe<'a>(session: &'a Value, function: &str) -> &'a Value {
    session["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["function"] == function)
        .unwrap_or_else(|| panic!("no probe on {function}: {session}"))
}

/// Waits until the session's probes have delivered every span the kernel sent.
fn settled_session(scoped: &Scoped) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = scoped.status();
        let emitted = u64_of(&status["counters"]["kernel.spans_emitted"]);
        let sessions = scoped.scope_json(&["sessions", "--json"]);
        let session = sessions["sessions"][0].clone();
        if u64_of(&status["spans_received"]) == emitted || Instant::now() > deadline {
            return session;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sampling_keeps_one_call_in_n_and_counts_the_rest() {
    let _serial = serial();
    const CALLS: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "counted.c", WORK, &["-g", "-O2"]);
    let scoped = Scoped::start();
    let mut target = Target::spawn("counted", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();
    scoped.scope_json(&[
        "attach", "--pid", &pid, "--func", "work", "--sample", "10", "--json",
    ]);
    target.send(&CALLS.to_string());
    target.expect_line("done", TIMEOUT);

    let session = settled_session(&scoped);
    let work = probe(&session, "work");
    let calls = u64_of(&work["calls"]);
    let sampled_out = u64_of(&work["sampled_out"]);
    let dropped = u64_of(&work["spans_dropped"]);
    let received = u64_of(&session["spans_received"]);
    assert_eq!(calls, CALLS, "{work}");
    assert_eq!(u64_of(&work["sample_every"]), 10, "{work}");
    assert_eq!(
        received + dropped + sampled_out,
        CALLS,
        "every call is a span, a drop, or sampled out: {session}"
    );
    // 1 in 10 per CPU: each CPU the thread ran on keeps floor(its calls / 10).
    let cpus = u64_of(&scoped.status()["cpus"]);
    let kept = received + dropped;
    assert!(
        kept <= CALLS / 10 && kept + cpus >= CALLS / 10,
        "1 call in 10 kept: {kept} of {CALLS}"
    );
    assert_eq!(u64_of(&session["sampled_out"]), sampled_out, "{session}");
    let status = scoped.status();
    assert_eq!(
        u64_of(&status["counters"]["kernel.sampled_out"]),
        sampled_out,
        "{status}"
    );
    // The kept calls are stored with their real arguments: every 10th call (per CPU).
    let stored = scoped.settled_calls(
        &["--pid", &pid, "--func", "work"],
        received as usize,
        TIMEOUT,
    );
    assert_eq!(stored.len() as u64, received);
}

#[test]
fn a_rate_limit_passes_about_max_rate_calls_a_second_and_counts_the_rest() {
    let _serial = serial();
    // 200,000 calls over about 2 s (a 100 µs pause every 100 calls).
    const CALLS: u64 = 200_000;
    const MAX_RATE: u64 = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "counted.c", WORK, &["-g", "-O2"]);
    let scoped = Scoped::start();
    let mut target = Target::spawn("counted", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();
    scoped.scope_json(&[
        "attach",
        "--pid",
        &pid,
        "--func",
        "work",
        "--max-rate",
        &MAX_RATE.to_string(),
        "--json",
    ]);
    let started = Instant::now();
    target.send(&format!("{CALLS},100"));
    target.expect_line("done", TIMEOUT);
    let seconds = started.elapsed().as_secs_f64();

    let session = settled_session(&scoped);
    let work = probe(&session, "work");
    let limited = u64_of(&work["rate_limited"]);
    let kept = u64_of(&session["spans_received"]) + u64_of(&work["spans_dropped"]);
    assert_eq!(u64_of(&work["calls"]), CALLS, "{work}");
    assert_eq!(
        kept + limited,
        CALLS,
        "every call is kept or counted: {work}"
    );
    // The bucket starts full (a tenth of a second's calls) and refills at MAX_RATE.
    let allowed = MAX_RATE as f64 * seconds + MAX_RATE as f64 / 10.0;
    assert!(
        (kept as f64) <= allowed * 1.05 && (kept as f64) >= allowed * 0.5,
        "{kept} calls kept in {seconds:.2} s at --max-rate {MAX_RATE}"
    );
    assert_eq!(
        u64_of(&scoped.status()["counters"]["kernel.rate_limited"]),
        limited
    );
}

/// CLOCK_MONOTONIC, as the hot program stamps its lines.
fn monotonic() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Median call rate of the hot program's next `n` windows that end after `after`
/// (CLOCK_MONOTONIC seconds).
fn median_rate(target: &Target, n: usize, after: f64) -> f64 {
    let mut rates = Vec::with_capacity(n);
    while rates.len() < n {
        let line = target.expect_line("rate ", TIMEOUT);
        let mut fields = line["rate ".len()..].split(' ');
        let rate: f64 = fields.next().unwrap().parse().unwrap();
        let at: f64 = fields.next().unwrap().parse().unwrap();
        if at > after {
            rates.push(rate);
        }
    }
    rates.sort_by(f64::total_cmp);
    rates[n / 2]
}

#[test]
fn a_budget_detaches_the_hot_probe_keeps_the_cold_one_and_the_program_near_full_speed() {
    let _serial = serial();
    const BUDGET_PERCENT: f64 = 1.0;
    // Noise of this shared machine on top of the budget: the rate varies by a few percent
    // from window to window untraced.
    const NOISE: f64 = 0.05;
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "hot.c", HOT, &["-g", "-O2"]);
    let scoped = Scoped::start();
    let target = Target::spawn("hot", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let untraced = median_rate(&target, 9, monotonic());
    assert!(
        untraced > 250_000.0,
        "the program calls work() about 500,000 times a second: {untraced:.0}/s"
    );

    let pid = target.pid().to_string();
    let attached_at = Instant::now();
    scoped.scope_json(&[
        "attach", "--pid", &pid, "--func", "work", "--func", "cold", "--budget", "1%", "--json",
    ]);
    // The budget names the probe it throttled, and why.
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        let status = scoped.status();
        if !status["throttled"].as_array().unwrap().is_empty() || Instant::now() > deadline {
            break status;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let reaction = attached_at.elapsed();
    // Windows from a quarter second after the throttle: the last one spanning it is out.
    let throttled_at = monotonic() + 0.25;
    let throttled = status["throttled"].as_array().unwrap();
    assert_eq!(throttled.len(), 1, "only the hot probe: {status}");
    assert_eq!(throttled[0]["function"], "work", "{status}");
    assert_eq!(throttled[0]["action"], "detached", "{status}");
    assert!(
        // Over what a 1% budget allows at any trap cost this machine has (10 ms / 15 µs).
        throttled[0]["calls_per_second"].as_f64().unwrap() > 1_000.0,
        "{status}"
    );
    let reason = throttled[0]["reason"].as_str().unwrap();
    assert!(reason.contains("budget of 1%"), "{reason}");
    let text = scoped.scope_ok(&["status"]);
    assert!(
        text.contains("throttled by overhead budgets") && text.contains("work (pid"),
        "{text}"
    );

    // Traced under the budget, the program runs near its untraced speed.
    let traced = median_rate(&target, 9, throttled_at);
    let slowdown = 1.0 - traced / untraced;
    eprintln!(
        "untraced {untraced:.0} calls/s, under --budget 1% {traced:.0} calls/s: slowdown {:.2}% (throttled {:.0} ms after attach)",
        slowdown * 100.0,
        reaction.as_secs_f64() * 1e3
    );
    assert!(
        slowdown <= BUDGET_PERCENT / 100.0 + NOISE,
        "slowdown {:.2}% with a 1% budget ({untraced:.0} → {traced:.0} calls/s)",
        slowdown * 100.0
    );

    // The cold probe stays and reports calls; the session lists what was done.
    let sessions = scoped.scope_json(&["sessions", "--json"]);
    let session = &sessions["sessions"][0];
    let probes = session["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 1, "work was detached: {session}");
    assert_eq!(probes[0]["function"], "cold");
    assert_eq!(session["budget_percent"].as_f64().unwrap(), BUDGET_PERCENT);
    assert_eq!(session["throttled"][0]["function"], "work");
    let overhead = session["overhead_percent"].as_f64().unwrap();
    assert!(overhead <= BUDGET_PERCENT, "{session}");
    let deadline = Instant::now() + TIMEOUT;
    while scoped.calls(&["--pid", &pid, "--func", "cold"]).len() < 5 {
        assert!(Instant::now() < deadline, "cold calls keep coming");
        thread::sleep(Duration::from_millis(200));
    }
    // The program writes a line a window to its pipe, but a budgeted session captures no
    // reads and writes: their cost is per syscall, outside what the budget can bound.
    let status = scoped.status();
    assert_eq!(status["counters"]["daemon.io_received"], 0, "{status}");
}

#[test]
fn budgets_and_limits_are_validated() {
    let _serial = serial();
    let scoped = Scoped::start();
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "counted.c", WORK, &["-g", "-O2"]);
    let target = Target::spawn("counted", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();
    for budget in ["0%", "-1%", "lots", "NaN"] {
        let flag = format!("--budget={budget}");
        let out = scoped.scope(&["attach", "--pid", &pid, "--func", "work", &flag]);
        assert!(!out.status.success(), "--budget {budget} is refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("budget"), "{stderr}");
    }
}
