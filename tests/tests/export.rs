//! Privileged end-to-end tests (root, BPF) of the exports people load into other tools:
//! OTLP received by a collector written with the official `opentelemetry-proto` and `grpcio`
//! Python packages (a client nobody here wrote), Chrome trace-event JSON read back by
//! Python's `json`, and a flame graph SVG parsed as XML.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use scope_tests::{Scoped, Target, compile, target_dir};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

const SOURCE: &str = r#"#include <stdio.h>

__attribute__((noinline)) long fact(long n) {
    if (n <= 1) return 1;
    return n * fact(n - 1);
}

__attribute__((noinline)) long run(void) {
    long total = 0;
    for (int i = 0; i < 10; i++) total += fact(6);
    return total;
}

int main(void) {
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        printf("done %ld\n", run()); fflush(stdout);
    }
    return 0;
}
"#;

/// The test venv's Python (made by `cargo xtask setup`).
fn python() -> PathBuf {
    let python = target_dir().parent().unwrap().join("pyenv/bin/python3");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (it creates the test venv)",
        python.display()
    );
    python
}

/// The OTLP receiver written with the official Python packages, and where it writes.
struct Receiver {
    _process: Target,
    port: u16,
    output: PathBuf,
}

impl Receiver {
    fn start(dir: &Path, name: &str) -> Receiver {
        let output = dir.join(format!("{name}.jsonl"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp_receiver.py");
        let target = Target::spawn(
            "otlp_receiver.py",
            Command::new(python())
                .arg(script)
                .arg("0")
                .arg(&output)
                .stderr(Stdio::inherit()),
        );
        let line = target.expect_line("listening", TIMEOUT);
        let port = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        Receiver {
            _process: target,
            port,
            output,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The spans received so far.
    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.output)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn traced_fact(dir: &Path, scoped: &Scoped) -> (Target, Vec<Value>) {
    let binary = compile(dir, "gcc", "export.c", SOURCE, &["-g", "-O0"]);
    let mut target = Target::spawn("export", &mut Command::new(binary));
    target.expect_line("ready", TIMEOUT);
    scoped.attach(target.pid(), &["fact", "run"]);
    target.send("go");
    target.expect_line("done", TIMEOUT);
    // run() once, fact(6) ten times: 1 + 60 spans.
    let stored = scoped.settled_calls(&["--pid", &target.pid().to_string()], 61, TIMEOUT);
    assert_eq!(stored.len(), 61);
    (target, stored)
}

fn check_otlp(received: &[Value], stored: &[Value], pid: u32) {
    assert_eq!(
        received.len(),
        stored.len(),
        "every stored span reached the collector"
    );
    let by_id: HashMap<String, &Value> = received
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap().to_owned(), s))
        .collect();
    for span in stored {
        let id = format!("{:016x}", span["span_id"].as_u64().unwrap());
        let got = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("span {id} not received"));
        assert_eq!(got["name"], span["function"]);
        let start = got["start_time_unix_nano"].as_u64().unwrap();
        let end = got["end_time_unix_nano"].as_u64().unwrap();
        assert_eq!(start, span["start_ns"].as_u64().unwrap());
        assert_eq!(
            end - start,
            span["duration_ns"].as_u64().unwrap(),
            "duration"
        );
        let parent = span["parent_id"].as_u64().unwrap();
        let expected_parent = if parent == 0 {
            String::new()
        } else {
            format!("{parent:016x}")
        };
        assert_eq!(
            got["parent_span_id"],
            expected_parent.as_str(),
            "parent of {id}"
        );
        assert_eq!(got["trace_id"], span["trace_id"]);
        let resource = &got["resource"];
        assert!(
            !resource["host.name"].as_str().unwrap_or("").is_empty(),
            "{resource}"
        );
        assert_eq!(resource["process.pid"], pid);
        assert!(
            resource["process.executable.path"]
                .as_str()
                .unwrap()
                .ends_with("/export"),
            "{resource}"
        );
        assert_eq!(got["attributes"]["code.function"], span["function"]);
    }
    // The trees hold together across the wire: every parent id names a received span.
    for span in received {
        let parent = span["parent_span_id"].as_str().unwrap();
        assert!(
            parent.is_empty() || by_id.contains_key(parent),
            "dangling parent {parent}"
        );
    }
}

#[test]
fn otlp_reaches_an_official_python_collector() {
    let dir = tempfile::tempdir().unwrap();
    let continuous = Receiver::start(dir.path(), "continuous");
    let scoped = Scoped::start_with(&["--otlp-endpoint", &continuous.endpoint()]);
    let (target, stored) = traced_fact(dir.path(), &scoped);
    check_otlp(&continuous.wait_for(stored.len()), &stored, target.pid());

    // The same spans, exported on demand to another collector.
    let once = Receiver::start(dir.path(), "once");
    let out = scoped.scope_ok(&[
        "export",
        "--format",
        "otlp",
        "--endpoint",
        &once.endpoint(),
        "--pid",
        &target.pid().to_string(),
    ]);
    assert!(out.contains("61"), "says how many spans it sent: {out}");
    check_otlp(&once.wait_for(stored.len()), &stored, target.pid());
    let status = scoped.status();
    assert_eq!(status["counters"]["otlp.sent"], 61, "{status}");
    assert_eq!(status["counters"]["otlp.dropped"], 0, "{status}");
}

#[test]
fn chrome_trace_and_flame_graph_load_in_other_tools() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let (target, stored) = traced_fact(dir.path(), &scoped);
    let pid = target.pid().to_string();

    let trace = dir.path().join("trace.json");
    scoped.scope_ok(&[
        "export",
        "--format",
        "chrome",
        "--pid",
        &pid,
        "-o",
        trace.to_str().unwrap(),
    ]);
    // Python's json reads it; the structure is what Perfetto and chrome://tracing expect.
    let checker = r#"
import json, sys
doc = json.load(open(sys.argv[1]))
events = doc["traceEvents"]
slices = [e for e in events if e["ph"] == "X"]
meta = [e for e in events if e["ph"] == "M"]
flows = [e for e in events if e["ph"] in ("s", "f")]
for e in slices:
    assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float)), e
    assert isinstance(e["pid"], int) and isinstance(e["tid"], int) and e["name"], e
assert {m["name"] for m in meta} >= {"process_name", "thread_name"}, meta
starts = {e["id"] for e in flows if e["ph"] == "s"}
ends = {e["id"] for e in flows if e["ph"] == "f"}
assert starts == ends, (starts, ends)
print(len(slices), len({e["name"] for e in slices}), len(flows))
"#;
    let out = Command::new(python())
        .arg("-c")
        .arg(checker)
        .arg(&trace)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<usize> = summary
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(numbers[0], stored.len(), "one slice per span");
    assert_eq!(numbers[1], 2, "fact and run");

    let svg = dir.path().join("flame.svg");
    scoped.scope_ok(&["flame", "--pid", &pid, "-o", svg.to_str().unwrap()]);
    let checker = r#"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
assert root.tag.endswith("svg"), root.tag
titles = [t.text for t in root.iter() if t.tag.endswith("title") and t.text]
print("\n".join(titles))
"#;
    let out = Command::new(python())
        .arg("-c")
        .arg(checker)
        .arg(&svg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the flame graph is valid XML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let titles = String::from_utf8_lossy(&out.stdout);
    assert!(
        titles.lines().any(|t| t.starts_with("fact ")),
        "a frame names fact:\n{titles}"
    );
    assert!(
        titles.lines().any(|t| t.starts_with("run ")),
        "a frame names run:\n{titles}"
    );
}
