//! Privileged end-to-end test (root, BPF) of Python's USDT probes on a script run by Debian's
//! `python3` (3.11, built with its probes): each Python function return is a span whose text
//! is `file:function:line`, and the script keeps running correctly.
//!
//! Python calls as spans *with durations, nested as called* need `function__entry`, which
//! CPython 3.11 carries in its notes but never fires (python/cpython#98894: the call was lost
//! when 3.11 rebuilt its interpreter loop; fixed upstream for 3.15 only). The first test pins
//! that down on Debian 12's python3, so the day it fires, the test says so. The second runs
//! the same script under Debian 11's CPython 3.9 (unpacked by `cargo xtask setup`), which
//! fires both probes: there every call is a span `python:function` with its
//! `file:function:line`, a duration, and its caller as parent.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{process::Command, time::Duration};

use scope_tests::{Scoped, Target, probed_python};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Debian's interpreter: it carries the `python` USDT notes (a pyenv or python.org build on
/// PATH may not).
const PYTHON: &str = "/usr/bin/python3";

const SCRIPT: &str = r#"import sys


def leaf(n):
    return n * 2


def middle(n):
    return leaf(n) + leaf(n + 1)


def top(n):
    total = 0
    for i in range(n):
        total += middle(i)
    return total


print("ready", flush=True)
for line in sys.stdin:
    print("result", top(3), flush=True)
"#;

#[test]
fn python_returns_are_spans_with_file_function_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("app.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let scoped = Scoped::start();
    let mut target = Target::spawn("python", Command::new(PYTHON).arg(&script));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();
    let analysis = scoped.scope_json(&["analyze", "--pid", &pid, "--json"]);
    let usdt: Vec<&str> = analysis["usdt"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert!(
        usdt.contains(&"python:function__entry") && usdt.contains(&"python:function__return"),
        "{PYTHON} carries its USDT probes: {usdt:?}"
    );

    let session = scoped.scope_json(&[
        "attach",
        "--pid",
        &pid,
        "--usdt",
        "python:function__*",
        "--json",
    ]);
    let mut functions: Vec<&str> = session["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["function"].as_str().unwrap())
        .collect();
    functions.sort_unstable();
    // Not paired into `python:function`: 3.11 never fires the entry site.
    assert_eq!(
        functions,
        ["python:function__entry", "python:function__return"],
        "{session}"
    );
    for _ in 0..2 {
        target.send("go");
        // 2*(0+1) + 2*(1+2) + 2*(2+3) = 18: the program computes what it did untraced.
        assert_eq!(target.expect_line("result", TIMEOUT), "result 18");
    }

    let calls = scoped.settled_calls(&["--pid", &pid, "--func", "python:*"], 20, TIMEOUT);
    let file = script.to_str().unwrap();
    let ours: Vec<&str> = calls
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .filter(|text| text.starts_with(file))
        .collect();
    // One return per call, in the order they return: two leaves, then their middle, three
    // times, then top; twice. The line is the `return` statement's.
    let leaf = format!("{file}:leaf:5");
    let middle = format!("{file}:middle:9");
    let top = format!("{file}:top:16");
    let run = [
        &leaf, &leaf, &middle, &leaf, &leaf, &middle, &leaf, &leaf, &middle, &top,
    ];
    let expected: Vec<&str> = run.iter().chain(&run).map(|s| s.as_str()).collect();
    assert_eq!(ours, expected, "{calls:#?}");
    assert!(
        calls
            .iter()
            .all(|c| c["function"] == "python:function__return"),
        "CPython 3.11 fires function__entry after all (python/cpython#98894 fixed?): pair \
         them again in scoped/src/usdt.rs broken_begins: {calls:#?}"
    );

    let id = session["session_id"].as_u64().unwrap().to_string();
    scoped.scope_ok(&["detach", &id]);
    target.send("go");
    assert_eq!(target.expect_line("result", TIMEOUT), "result 18");
}

#[test]
fn python_calls_are_spans_with_file_function_and_line_nested_as_called() {
    let (python, home) = probed_python();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("app.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let scoped = Scoped::start();
    let mut target = Target::spawn(
        "python3.9",
        Command::new(&python).arg(&script).env("PYTHONHOME", &home),
    );
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();
    let session = scoped.scope_json(&[
        "attach",
        "--pid",
        &pid,
        "--usdt",
        "python:function__*",
        "--json",
    ]);
    let functions: Vec<&str> = session["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["function"].as_str().unwrap())
        .collect();
    assert!(functions.contains(&"python:function"), "{session}");
    for _ in 0..2 {
        target.send("go");
        assert_eq!(target.expect_line("result", TIMEOUT), "result 18");
    }

    let calls = scoped.settled_calls(&["--pid", &pid, "--func", "python:function"], 20, TIMEOUT);
    let file = script.to_str().unwrap();
    let ours: Vec<&Value> = calls
        .iter()
        .filter(|c| c["text"].as_str().unwrap().starts_with(file))
        .collect();
    let named = |name: &str| -> Vec<&Value> {
        ours.iter()
            .copied()
            .filter(|c| c["text"].as_str().unwrap().split(':').nth(1) == Some(name))
            .collect()
    };
    let (tops, middles, leaves) = (named("top"), named("middle"), named("leaf"));
    assert_eq!(
        (tops.len(), middles.len(), leaves.len()),
        (2, 6, 12),
        "two runs of top(3): {ours:#?}"
    );
    // file:function:line, the line being the function's `def`.
    assert_eq!(tops[0]["text"], format!("{file}:top:12"), "{:#?}", tops[0]);
    assert_eq!(middles[0]["text"], format!("{file}:middle:8"));
    assert_eq!(leaves[0]["text"], format!("{file}:leaf:4"));

    // Nested as called: every leaf inside a middle, every middle inside a top, two leaves
    // per middle and three middles per top, each inside its parent's time.
    let parent_of = |span: &Value| -> Value {
        ours.iter()
            .find(|p| p["span_id"] == span["parent_id"])
            .map(|p| (*p).clone())
            .unwrap_or_else(|| panic!("no parent for {span}"))
    };
    for (children, parents, per_parent) in [(&leaves, &middles, 2), (&middles, &tops, 3)] {
        for child in children {
            let parent = parent_of(child);
            assert!(
                parents.iter().any(|p| p["span_id"] == parent["span_id"]),
                "{child}"
            );
            let (start, end) = (
                child["start_ns"].as_u64().unwrap(),
                child["end_ns"].as_u64().unwrap(),
            );
            assert!(
                parent["start_ns"].as_u64().unwrap() <= start
                    && end <= parent["end_ns"].as_u64().unwrap(),
                "{child} inside {parent}"
            );
            assert_eq!(child["depth"], parent["depth"].as_u64().unwrap() + 1);
        }
        for parent in parents {
            let count = children
                .iter()
                .filter(|c| c["parent_id"] == parent["span_id"])
                .count();
            assert_eq!(count, per_parent, "{parent}");
        }
    }
    for call in &ours {
        assert!(call["duration_ns"].as_u64().unwrap() > 0, "{call}");
        assert!(call["flags"].as_array().unwrap().is_empty(), "{call}");
    }
    let status = scoped.scope_json(&["status", "--json"]);
    assert_eq!(status["counters"]["kernel.abandoned"], 0, "{status}");

    let id = session["session_id"].as_u64().unwrap().to_string();
    scoped.scope_ok(&["detach", &id]);
    target.send("go");
    assert_eq!(target.expect_line("result", TIMEOUT), "result 18");
}
