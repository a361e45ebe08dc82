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

use scope_tests::{Scoped, Target, probe_functions, probed_python};
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

/// The script running under an interpreter, traced with `python:function__*`.
struct Traced {
    _dir: tempfile::TempDir,
    /// The script's path, as the spans' texts start.
    file: String,
    scoped: Scoped,
    target: Target,
    pid: String,
    session: Value,
}

impl Traced {
    /// Writes the script, starts `python` on it and attaches to it.
    fn start(python: &mut Command) -> Traced {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("app.py");
        std::fs::write(&script, SCRIPT).unwrap();
        let scoped = Scoped::start();
        let target = Target::spawn("python", python.arg(&script));
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
        Traced {
            _dir: dir,
            file: script.to_str().unwrap().to_owned(),
            scoped,
            target,
            pid,
            session,
        }
    }

    /// Runs `top(3)` `times` times; the script computes what it does untraced:
    /// 2*(0+1) + 2*(1+2) + 2*(2+3) = 18.
    fn run(&mut self, times: usize) {
        for _ in 0..times {
            self.target.send("go");
            assert_eq!(self.target.expect_line("result", TIMEOUT), "result 18");
        }
    }

    /// Detaches, and the script still runs right.
    fn detach(mut self) {
        let id = self.session["session_id"].as_u64().unwrap().to_string();
        self.scoped.scope_ok(&["detach", &id]);
        self.run(1);
    }
}

#[test]
fn python_returns_are_spans_with_file_function_and_line() {
    let mut traced = Traced::start(&mut Command::new(PYTHON));
    let analysis = traced
        .scoped
        .scope_json(&["analyze", "--pid", &traced.pid, "--json"]);
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
    // Not paired into `python:function`: 3.11 never fires the entry site.
    assert_eq!(
        probe_functions(&traced.session),
        ["python:function__entry", "python:function__return"],
        "{}",
        traced.session
    );
    traced.run(2);

    let calls =
        traced
            .scoped
            .settled_calls(&["--pid", &traced.pid, "--func", "python:*"], 20, TIMEOUT);
    let file = &traced.file;
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
    traced.detach();
}

#[test]
fn python_calls_are_spans_with_file_function_and_line_nested_as_called() {
    let (python, home) = probed_python();
    let mut traced = Traced::start(Command::new(&python).env("PYTHONHOME", &home));
    assert!(
        probe_functions(&traced.session).contains(&"python:function".to_owned()),
        "{}",
        traced.session
    );
    traced.run(2);

    let calls = traced.scoped.settled_calls(
        &["--pid", &traced.pid, "--func", "python:function"],
        20,
        TIMEOUT,
    );
    let file = &traced.file;
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
    let status = traced.scoped.scope_json(&["status", "--json"]);
    assert_eq!(status["counters"]["kernel.abandoned"], 0, "{status}");
    traced.detach();
}
