//! Privileged end-to-end test (root, BPF) of Python's USDT probes on a script run by Debian's
//! `python3` (3.11, built with its probes): each Python function return is a span whose text
//! is `file:function:line`, and the script keeps running correctly.
//!
//! Issue 6 asks for Python calls as spans *with durations, nested as called*: that needs
//! `function__entry`, which CPython 3.11 carries in its notes but never fires
//! (python/cpython#98894: the call was lost when 3.11 rebuilt its interpreter loop; fixed
//! upstream for 3.15 only). This test pins that down too, so the day Debian's interpreter
//! fires it, the test says so and the pairing (which `usdt.rs` tests on C programs) applies.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{process::Command, time::Duration};

use scope_tests::{Scoped, Target};

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
