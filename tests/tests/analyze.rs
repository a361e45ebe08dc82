//! Privileged end-to-end test (root, BPF) of `scope analyze`: real servers (a live
//! redis-server by pid, Debian's postgres and nginx by path) and a Rust binary built here are
//! recognised for what they are, with their libraries, USDT probes and request entry points.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::path::PathBuf;

use scope_tests::{Postgres, Redis, Scoped, compile};
use serde_json::Value;

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

    // A live redis-server, by pid.
    let redis = Redis::start();
    let analysis = scoped.scope_json(&["analyze", "--pid", &redis.pid().to_string(), "--json"]);
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

    // Not an ELF file: a clear error.
    let out = scoped.scope(&["analyze", "--binary", "/etc/hostname"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an ELF file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
