//! Privileged end-to-end test (root, BPF) on Debian's real redis-server under
//! redis-benchmark: every command's processCommand span has a `call` span nested inside.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{collections::HashMap, time::Duration};

use scope_tests::{Redis, Scoped};

#[test]
fn redis_process_command_and_call_under_benchmark() {
    let scoped = Scoped::start();
    let redis = Redis::start();
    let attached = scoped.attach(redis.pid(), &["processCommand", "call"]);
    assert_eq!(
        attached["probes"].as_array().unwrap().len(),
        2,
        "{attached}"
    );

    let bench = redis.benchmark(&["-n", "20000", "-t", "set", "-q"]);
    assert!(
        bench.status.success(),
        "redis-benchmark failed: {}",
        String::from_utf8_lossy(&bench.stderr)
    );

    let pid = redis.pid().to_string();
    let spans = scoped.settled_calls(&["--pid", &pid], 40_000, Duration::from_secs(60));
    let commands: Vec<_> = spans
        .iter()
        .filter(|s| s["function"] == "processCommand")
        .collect();
    assert!(
        commands.len() >= 20_000,
        "{} processCommand spans for 20000 requests",
        commands.len()
    );

    // Index `call` spans by their parent.
    let mut calls_by_parent: HashMap<u64, Vec<&serde_json::Value>> = HashMap::new();
    for span in spans.iter().filter(|s| s["function"] == "call") {
        calls_by_parent
            .entry(span["parent_id"].as_u64().unwrap())
            .or_default()
            .push(span);
    }
    for command in &commands {
        let id = command["span_id"].as_u64().unwrap();
        let nested = calls_by_parent
            .get(&id)
            .unwrap_or_else(|| panic!("no call span inside {command}"));
        let (start, duration) = (
            command["start_ns"].as_u64().unwrap(),
            command["duration_ns"].as_u64().unwrap(),
        );
        for call in nested {
            assert_eq!(
                call["depth"].as_u64(),
                Some(command["depth"].as_u64().unwrap() + 1)
            );
            assert_eq!(call["tid"], command["tid"]);
            let call_start = call["start_ns"].as_u64().unwrap();
            assert!(
                start <= call_start
                    && call_start + call["duration_ns"].as_u64().unwrap() <= start + duration
            );
        }
    }
    let status = scoped.status();
    assert_eq!(status["spans_dropped"].as_u64(), Some(0), "{status}");
}
