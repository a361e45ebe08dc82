//! Privileged end-to-end test (root, BPF) of `scope analyze`: real servers (a live
//! redis-server by pid, Debian's postgres and nginx by path) and a Rust binary built here are
//! recognised for what they are, with their libraries, USDT probes and request entry points,
//! and each gets a probe plan that includes its request-handling entry point.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{path::PathBuf, process::Command, time::Duration};

use scope_tests::{Postgres, Redis, Scoped, Target, compile};
use serde_json::Value;

/// The plan's line for `function`.
fn planned<'a>(analysis: &'a Value, function: &str) -> &'a Value {
    analysis["plan"]["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == function)
        .unwrap_or_else(|| panic!("{function} is not in the plan: {}", analysis["plan"]))
}

/// Checks what every plan says: classes and reasons for each function, the chosen ones'
/// cost within the budget.
fn check_plan(analysis: &Value) {
    let plan = &analysis["plan"];
    let functions = plan["functions"].as_array().unwrap();
    assert!(!functions.is_empty(), "{plan}");
    for f in functions {
        assert!(
            [
                "entry", "handler", "io", "lock", "alloc", "crypto", "parse", "cpu"
            ]
            .contains(&f["class"].as_str().unwrap()),
            "{f}"
        );
        assert!(!f["reason"].as_str().unwrap().is_empty(), "{f}");
    }
    let chosen_cost: f64 = functions
        .iter()
        .filter(|f| f["chosen"] == true)
        .map(|f| f["cost_percent"].as_f64().unwrap())
        .sum();
    let budget = plan["budget_percent"].as_f64().unwrap();
    assert!(chosen_cost <= budget + 1e-9, "{plan}");
    assert!(
        (plan["predicted_percent"].as_f64().unwrap() - chosen_cost).abs() < 1e-6,
        "{plan}"
    );
}

/// A Rust program that handles a "request" every 10 ms: parses it and hashes for ~1 ms.
const RUST_SERVER: &str = r#"
use std::io::Write;

#[inline(never)]
fn parse_request(line: &str) -> Vec<u64> {
    line.split(' ').map(|w| w.len() as u64).collect()
}

#[inline(never)]
fn handle_request(line: &str) -> u64 {
    let words = parse_request(line);
    let mut h = 1469598103934665603u64;
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(1) {
        for w in &words {
            h = (h ^ w).wrapping_mul(1099511628211);
        }
    }
    h
}

fn main() {
    println!("ready");
    std::io::stdout().flush().unwrap();
    let mut sink = 0u64;
    for i in 0u64.. {
        sink ^= handle_request(&format!("GET /item/{i} HTTP/1.1"));
        std::thread::sleep(std::time::Duration::from_millis(10));
        if sink == 42 {
            println!("{sink}");
        }
    }
}
"#;

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

fn entry_points(analysis: &Value) -> Vec<&str> {
    analysis["entry_points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["function"].as_str().unwrap())
        .collect()
}

#[test]
fn real_servers_and_a_rust_binary_are_recognised() {
    let scoped = Scoped::start();

    // A live redis-server, by pid, answering a PING every 5 ms while it is analyzed.
    let redis = Redis::start();
    let trickle = redis.trickle(Duration::from_millis(5));
    let analysis = scoped.scope_json(&["analyze", "--pid", &redis.pid().to_string(), "--json"]);
    drop(trickle);
    assert_eq!(analysis["language"], "c", "{analysis}");
    assert!(
        strings(&analysis["runtimes"]).contains(&"redis"),
        "{analysis}"
    );
    assert!(
        strings(&analysis["runtimes"]).contains(&"glibc"),
        "{analysis}"
    );
    assert!(
        strings(&analysis["libraries"]).contains(&"libc.so.6"),
        "{analysis}"
    );
    assert!(
        entry_points(&analysis).contains(&"processCommand"),
        "{analysis}"
    );
    // Debian strips .comment with the symbol table: no toolchain to report.
    assert_eq!(analysis["stripped"], true);
    assert_eq!(
        analysis["build_id"].as_str().unwrap().len(),
        40,
        "{analysis}"
    );
    // The plan: processCommand chosen, its rate measured (about 200 PINGs a second) and
    // cheap enough for the default 1% budget.
    check_plan(&analysis);
    let plan = &analysis["plan"];
    assert_eq!(plan["budget_percent"], 1.0, "{plan}");
    assert!(plan["samples"].as_u64().is_some(), "{plan}");
    assert!(plan["count_ms"].as_u64().unwrap() >= 150, "{plan}");
    let command = planned(&analysis, "processCommand");
    assert_eq!(command["class"], "entry", "{command}");
    assert_eq!(command["chosen"], true, "{command}");
    assert_eq!(command["measured"], true, "{command}");
    let rate = command["calls_per_second"].as_f64().unwrap();
    assert!((20.0..2_000.0).contains(&rate), "{command}");
    assert!(
        command["reason"]
            .as_str()
            .unwrap()
            .contains("dispatches every command"),
        "{command}"
    );
    assert!(
        analysis["classes"]["handler"].as_u64().unwrap() > 100,
        "{analysis}"
    );
    let text = scoped.scope_ok(&[
        "analyze",
        "--pid",
        &redis.pid().to_string(),
        "--window",
        "300ms",
    ]);
    assert!(
        text.contains("probe plan for a budget of 1% of a CPU") && text.contains("processCommand"),
        "{text}"
    );

    // Debian's postgres: stripped, its USDT probes, its query entry points.
    let postgres = Postgres::bin_dir().join("postgres");
    let analysis =
        scoped.scope_json(&["analyze", "--binary", postgres.to_str().unwrap(), "--json"]);
    assert!(
        strings(&analysis["runtimes"]).contains(&"postgres"),
        "{analysis}"
    );
    assert_eq!(analysis["stripped"], true);
    let usdt = strings(&analysis["usdt"]);
    assert!(usdt.len() >= 70, "{usdt:?}");
    assert!(usdt.contains(&"postgresql:query__start"), "{usdt:?}");
    assert!(entry_points(&analysis).contains(&"PortalRun"), "{analysis}");
    // A file: a plan by the rules alone, the known entry points first, no costs.
    check_plan(&analysis);
    let portal = planned(&analysis, "PortalRun");
    assert_eq!(portal["chosen"], true, "{portal}");
    assert_eq!(portal["measured"], false, "{portal}");
    assert_eq!(analysis["plan"]["count_ms"], 0);
    let text = scoped.scope_ok(&["analyze", "--binary", postgres.to_str().unwrap()]);
    assert!(
        text.contains("USDT probes") && text.contains("PortalRun"),
        "{text}"
    );

    // Debian's nginx, by path (never started).
    let analysis = scoped.scope_json(&["analyze", "--binary", "/usr/sbin/nginx", "--json"]);
    assert!(
        strings(&analysis["runtimes"]).contains(&"nginx"),
        "{analysis}"
    );
    assert!(
        entry_points(&analysis).contains(&"ngx_http_process_request"),
        "{analysis}"
    );
    check_plan(&analysis);
    let request = planned(&analysis, "ngx_http_process_request");
    assert_eq!(request["chosen"], true, "{request}");
    assert_eq!(request["class"], "entry", "{request}");
    assert!(
        strings(&analysis["runtimes"]).contains(&"libssl"),
        "{analysis}"
    );

    // A Rust binary built here.
    let dir = tempfile::tempdir().unwrap();
    let binary: PathBuf = compile(
        dir.path(),
        "rustc",
        "analyzed.rs",
        "fn main() { println!(\"{}\", std::env::args().count()); }",
        &["-g", "-C", "opt-level=1"],
    );
    let analysis = scoped.scope_json(&["analyze", "--binary", binary.to_str().unwrap(), "--json"]);
    assert_eq!(analysis["language"], "rust", "{analysis}");
    assert_eq!(analysis["dwarf"], true);
    assert_eq!(analysis["stripped"], false);
    assert!(
        strings(&analysis["toolchain"])
            .iter()
            .any(|t| t.contains("rustc version")),
        "{analysis}"
    );

    // A Rust program built here, live: its request handler is found by name, sampled
    // (where its CPU goes) and counted (about 90 calls a second).
    let server = compile(
        dir.path(),
        "rustc",
        "served.rs",
        RUST_SERVER,
        &["-g", "-C", "opt-level=1"],
    );
    let target = Target::spawn("served", &mut Command::new(&server));
    target.expect_line("ready", Duration::from_secs(30));
    let analysis = scoped.scope_json(&["analyze", "--pid", &target.pid().to_string(), "--json"]);
    assert_eq!(analysis["language"], "rust", "{analysis}");
    check_plan(&analysis);
    let handler = planned(&analysis, "served::handle_request");
    assert_eq!(handler["class"], "entry", "{handler}");
    assert_eq!(handler["chosen"], true, "{handler}");
    let rate = handler["calls_per_second"].as_f64().unwrap();
    assert!((20.0..200.0).contains(&rate), "{handler}");
    assert!(handler["self_samples"].as_u64().unwrap() > 0, "{handler}");

    // Not an ELF file: a clear error.
    let out = scoped.scope(&["analyze", "--binary", "/etc/hostname"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an ELF file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
