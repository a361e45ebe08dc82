//! Privileged end-to-end test (root, BPF) of loss accounting under a forced overload: a ring
//! buffer of one page and a program calling a traced function as fast as it can. Most spans
//! cannot be kept; every one of them must be either received or counted as dropped — in the
//! daemon's totals, in the kernel's counters and on the probe itself.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use scope_tests::{Scoped, Target, WORK_SOURCE, compile};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const CALLS: u64 = 300_000;

fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {value}"))
}

#[test]
fn a_forced_overload_accounts_for_every_call_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "load.c", WORK_SOURCE, &["-g", "-O2"]);
    // One page of ring per CPU: about 28 spans fit before the reader drains it.
    let scoped = Scoped::start_with(&["--ring-bytes", "4096"]);
    let mut target = Target::spawn("load", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    scoped.attach(target.pid(), &["work"]);
    target.send(&CALLS.to_string());
    let sum: u64 = (0..CALLS).map(|i| i + 1).sum();
    assert_eq!(
        target.expect_line("done", TIMEOUT),
        format!("done {sum}"),
        "the target is unharmed"
    );

    // Wait until what was received has all been stored (or counted as not stored).
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        let status = scoped.status();
        let counters = &status["counters"];
        let received = u64_of(&status["spans_received"]);
        let settled = u64_of(&counters["kernel.spans_emitted"]) == received
            && u64_of(&counters["store.written"])
                + u64_of(&counters["store.queue_full"])
                + u64_of(&counters["store.write_failed"])
                == received;
        if settled || Instant::now() > deadline {
            break status;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let counters = &status["counters"];
    let received = u64_of(&status["spans_received"]);
    let kernel_dropped = u64_of(&counters["kernel.ring_full"])
        + u64_of(&counters["kernel.no_ring"])
        + u64_of(&counters["kernel.stack_map_full"])
        + u64_of(&counters["kernel.depth_overflow"]);
    assert!(
        kernel_dropped > CALLS / 2,
        "the overload is real: {kernel_dropped} dropped in the kernel: {status}"
    );
    assert!(received > 0, "{status}");
    assert_eq!(
        received + kernel_dropped,
        CALLS,
        "received + dropped in the kernel = calls made: {status}"
    );
    assert_eq!(
        u64_of(&counters["kernel.spans_emitted"]),
        received,
        "every span the kernel emitted was decoded: {status}"
    );
    // The daemon's total of drops counts them all.
    let daemon_dropped = u64_of(&status["spans_dropped"]);
    assert_eq!(
        received + daemon_dropped
            - u64_of(&counters["store.queue_full"])
            - u64_of(&counters["store.write_failed"]),
        CALLS,
        "spans_dropped counts the kernel's drops: {status}"
    );
    // What was received is stored, or counted as not stored.
    assert_eq!(
        u64_of(&counters["store.written"])
            + u64_of(&counters["store.queue_full"])
            + u64_of(&counters["store.write_failed"]),
        received,
        "{status}"
    );
    let stored = scoped.calls(&["--pid", &target.pid().to_string()]);
    assert_eq!(stored.len() as u64, u64_of(&counters["store.written"]));

    // And per probe: every call counted, the drops attributed to it.
    let sessions = scoped.scope_json(&["sessions", "--json"]);
    let session = &sessions["sessions"][0];
    let probe = &session["probes"][0];
    assert_eq!(probe["function"], "work");
    assert_eq!(u64_of(&probe["calls"]), CALLS, "{probe}");
    assert_eq!(u64_of(&probe["spans_dropped"]), kernel_dropped, "{probe}");
    assert_eq!(
        u64_of(&session["spans_received"]) + u64_of(&session["spans_dropped"]),
        CALLS,
        "{session}"
    );
}
