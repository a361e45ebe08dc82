//! Privileged end-to-end tests (root, BPF): attach to live programs built here, and check
//! what comes back — exact counts, args, return values, depths, file:line, names.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{process::Command, time::Duration};

use scope_tests::{Scoped, Target, compile, line_of};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);

const C_SOURCE: &str = r#"#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>

__attribute__((noinline)) long add(long a, long b) {
    return a + b;
}

__attribute__((noinline)) long fact(long n) {
    if (n <= 1) return 1;
    return n * fact(n - 1);
}

int main(void) {
    char line[64];
    int devnull = open("/dev/null", O_WRONLY);
    printf("ready %d\n", devnull); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long total = 0;
        if (strncmp(line, "add", 3) == 0) {
            for (long i = 0; i < 1000; i++) total += add(i, 2 * i);
        } else if (strncmp(line, "fact", 4) == 0) {
            total = fact(5);
        } else if (strncmp(line, "write", 5) == 0) {
            for (int i = 0; i < 250; i++) total += write(devnull, "scope!", 6);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        }
        printf("done %ld\n", total); fflush(stdout);
    }
    return 0;
}
"#;

fn c_target(dir: &std::path::Path) -> (std::path::PathBuf, Target) {
    let binary = compile(dir, "gcc", "calls.c", C_SOURCE, &["-g", "-O0"]);
    let target = Target::spawn("calls", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    (binary, target)
}

fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {value}"))
}

#[test]
fn c_program_calls_args_returns_depths_and_lines() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let (binary, mut target) = c_target(dir.path());
    let pid = target.pid();

    let attached = scoped.attach(pid, &["add", "fact"]);
    let probes = attached["probes"].as_array().unwrap();
    let names: Vec<&str> = probes
        .iter()
        .map(|p| p["function"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"add") && names.contains(&"fact"),
        "probed: {names:?}"
    );
    assert_eq!(probes.len(), 2, "exactly the two functions: {probes:?}");

    target.send("add");
    target.expect_line("done", TIMEOUT);
    target.send("fact");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 120");

    let pid_arg = pid.to_string();
    let adds = scoped.settled_calls(&["--pid", &pid_arg, "--func", "add"], 1000, TIMEOUT);
    assert_eq!(
        adds.len(),
        1000,
        "1000 calls of add give exactly 1000 spans"
    );
    let add_line = line_of(C_SOURCE, "long add(long a, long b)");
    for (i, span) in adds.iter().enumerate() {
        let i = i as u64;
        let args: Vec<u64> = span["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(u64_of)
            .collect();
        assert_eq!(args.len(), 6);
        assert_eq!((args[0], args[1]), (i, 2 * i), "args of call {i}: {span}");
        assert_eq!(u64_of(&span["ret"]), 3 * i, "return value of call {i}");
        assert_eq!(u64_of(&span["depth"]), 0);
        assert_eq!(u64_of(&span["pid"]), u64::from(pid));
        assert_eq!(
            span["file"].as_str().unwrap().rsplit('/').next(),
            Some("calls.c")
        );
        assert_eq!(
            u64_of(&span["line"]),
            u64::from(add_line),
            "add is defined on line {add_line}"
        );
        assert!(span["module"].as_str().unwrap().ends_with("/calls"));
        assert!(u64_of(&span["duration_ns"]) > 0);
    }
    let mut ids: Vec<u64> = adds.iter().map(|s| u64_of(&s["span_id"])).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1000, "span ids are unique");
    // Spans come back in start order.
    let starts: Vec<u64> = adds.iter().map(|s| u64_of(&s["start_ns"])).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]));

    let mut facts = scoped.settled_calls(&["--pid", &pid_arg, "--func", "fact"], 5, TIMEOUT);
    assert_eq!(facts.len(), 5, "fact(5) recurses 5 times: {facts:?}");
    facts.sort_by_key(|s| u64_of(&s["depth"]));
    let fact_line = line_of(C_SOURCE, "long fact(long n)");
    let expected_ret = [120u64, 24, 6, 2, 1];
    for (depth, span) in facts.iter().enumerate() {
        assert_eq!(u64_of(&span["depth"]), depth as u64, "depths 0..4");
        assert_eq!(u64_of(&span["args"][0]), 5 - depth as u64);
        assert_eq!(u64_of(&span["ret"]), expected_ret[depth]);
        assert_eq!(u64_of(&span["line"]), u64::from(fact_line));
        if depth > 0 {
            assert_eq!(
                span["parent_id"],
                facts[depth - 1]["span_id"],
                "each level's parent is the level above"
            );
            // The caller of a recursive call is fact itself, at the recursive call's line.
            assert_eq!(span["caller"][0]["function"], "fact", "caller of {span}");
        } else {
            assert_eq!(u64_of(&span["parent_id"]), 0);
            assert_eq!(span["caller"][0]["function"], "main");
        }
        let start = u64_of(&span["start_ns"]);
        let end = start + u64_of(&span["duration_ns"]);
        if depth > 0 {
            let parent = &facts[depth - 1];
            let parent_start = u64_of(&parent["start_ns"]);
            assert!(parent_start <= start && end <= parent_start + u64_of(&parent["duration_ns"]));
        }
    }

    // Nothing was lost and the kernel saw exactly the calls that came back.
    let status = scoped.status();
    assert_eq!(u64_of(&status["spans_dropped"]), 0, "{status}");
    let sessions = scoped.scope_json(&["sessions", "--json"]);
    let probe_calls: u64 = sessions["sessions"][0]["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| u64_of(&p["calls"]))
        .sum();
    assert_eq!(probe_calls, 1005, "{sessions}");
    let _ = binary;
    target.send("quit");
}

#[test]
fn shared_library_function_traced_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let (_binary, mut target) = c_target(dir.path());
    let pid = target.pid();
    let attached = scoped.attach(pid, &["libc.so.6!write"]);
    let probe = &attached["probes"][0];
    assert_eq!(probe["function"], "write");
    assert!(
        probe["module"].as_str().unwrap().contains("libc.so.6"),
        "{probe}"
    );

    target.send("write");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 1500");
    let pid_arg = pid.to_string();
    let writes = scoped.settled_calls(&["--pid", &pid_arg, "--func", "write"], 251, TIMEOUT);
    // 250 writes to /dev/null, plus the write of "done 1500\n" to stdout.
    let to_devnull: Vec<&Value> = writes
        .iter()
        .filter(|w| u64_of(&w["args"][2]) == 6)
        .collect();
    assert_eq!(to_devnull.len(), 250, "{} write spans", writes.len());
    for write in to_devnull {
        assert_eq!(u64_of(&write["ret"]), 6, "write returns the bytes written");
        assert_eq!(write["caller"][0]["function"], "main", "{write}");
    }
    target.send("quit");
}

const RUST_SOURCE: &str = r#"use std::hint::black_box;
use std::io::BufRead;

#[inline(never)]
pub fn fib(n: u64) -> u64 {
    // black_box keeps LLVM from turning one of the two recursive calls into a loop.
    if n < 2 { n } else { black_box(fib(n - 1)) + black_box(fib(n - 2)) }
}

#[inline(always)]
fn scramble(x: u64) -> u64 {
    black_box(x.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 7)
}

#[inline(never)]
pub fn mix(x: u64) -> u64 {
    scramble(x) >> 3
}

fn main() {
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let total = match line.as_str() {
            "fib" => fib(black_box(10)),
            "mix" => (0..100).map(|i| mix(black_box(i))).fold(0, u64::wrapping_add),
            _ => break,
        };
        println!("done {total}");
    }
}
"#;

#[test]
fn rust_program_demangled_names_and_inlined_calls() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(
        dir.path(),
        "rustc",
        "demo.rs",
        RUST_SOURCE,
        &["-g", "-C", "opt-level=2", "--edition", "2021"],
    );
    let scoped = Scoped::start();
    let mut target = Target::spawn("demo", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid();

    let attached = scoped.attach(pid, &["demo::fib", "demo::mix", "demo::scramble"]);
    let probes = attached["probes"].as_array().unwrap();
    let fib = probes
        .iter()
        .find(|p| p["function"] == "demo::fib")
        .unwrap_or_else(|| panic!("{attached}"));
    assert!(
        fib["symbol"].as_str().unwrap().starts_with("_ZN")
            || fib["symbol"].as_str().unwrap().starts_with("_R")
    );
    let inlined: Vec<&Value> = probes
        .iter()
        .filter(|p| p["function"] == "demo::scramble")
        .collect();
    assert!(
        !inlined.is_empty(),
        "the inlined scramble has call sites: {attached}"
    );
    assert!(
        inlined.iter().all(|p| p["inlined_into"] == "demo::mix"),
        "{inlined:?}"
    );

    target.send("fib");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 55");
    target.send("mix");
    target.expect_line("done", TIMEOUT);

    let pid_arg = pid.to_string();
    let fibs = scoped.settled_calls(&["--pid", &pid_arg, "--func", "demo::fib"], 177, TIMEOUT);
    assert_eq!(fibs.len(), 177, "fib(10) makes 177 calls");
    let max_depth = fibs.iter().map(|s| u64_of(&s["depth"])).max().unwrap();
    assert_eq!(max_depth, 9, "fib(10) recurses to depth 9");
    let root = fibs.iter().find(|s| u64_of(&s["depth"]) == 0).unwrap();
    assert_eq!((u64_of(&root["args"][0]), u64_of(&root["ret"])), (10, 55));
    assert_eq!(
        u64_of(&root["line"]),
        u64::from(line_of(RUST_SOURCE, "pub fn fib"))
    );

    let mixes = scoped.settled_calls(&["--pid", &pid_arg, "--func", "demo::mix"], 100, TIMEOUT);
    assert_eq!(mixes.len(), 100);
    let scrambles = scoped.settled_calls(
        &["--pid", &pid_arg, "--func", "demo::scramble"],
        100,
        TIMEOUT,
    );
    assert_eq!(
        scrambles.len(),
        100,
        "each call of the inlined scramble is one span"
    );
    for span in &scrambles {
        assert_eq!(span["inlined_into"], "demo::mix");
        assert_eq!(
            u64_of(&span["duration_ns"]),
            0,
            "an inlined call has no exit to time"
        );
        // Attributed to its caller, with the inline frame named.
        let caller: Vec<&str> = span["caller"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["function"].as_str().unwrap())
            .collect();
        assert_eq!(caller.first(), Some(&"demo::scramble"), "{span}");
        assert_eq!(span["caller"][0]["inlined"], true);
        assert!(caller.contains(&"demo::mix"), "{span}");
        // It happens inside a mix call: depth 1 under that mix span.
        assert_eq!(u64_of(&span["depth"]), 1);
        assert!(mixes.iter().any(|m| m["span_id"] == span["parent_id"]));
    }
    target.send("quit");
}
