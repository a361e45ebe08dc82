//! Privileged end-to-end tests (root, BPF) of the span store: spans traced from a live
//! program survive a daemon restart and a `kill -9` (losing at most the last second),
//! retention keeps the file under its cap with the newest spans, and `stats` percentiles
//! match the raw spans within the histogram's stated error.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use scope_proto::v1 as pb;
use scope_tests::{Scoped, Target, compile};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

const SOURCE: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) long add(long a, long b) {
    return a + b;
}

/* Spins for about `n` nanoseconds: durations the test controls. */
__attribute__((noinline)) long work(long n) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    do {
        clock_gettime(CLOCK_MONOTONIC, &now);
    } while ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) < n);
    return n;
}

int main(void) {
    char line[64];
    long next = 0;
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long total = 0;
        if (strncmp(line, "add", 3) == 0) {
            for (int i = 0; i < 1000; i++) total += add(next, 0), next++;
        } else if (strncmp(line, "loop", 4) == 0) {
            /* add(i) every ~50 us for the given number of seconds */
            int seconds = atoi(line + 5);
            time_t end = time(NULL) + seconds;
            while (time(NULL) < end) { total += add(next, 0); next++; usleep(50); }
        } else if (strncmp(line, "work", 4) == 0) {
            srand(7);
            for (int i = 0; i < 2000; i++) total += work(1000 + rand() % 200000);
        }
        printf("done %ld %ld\n", total, next); fflush(stdout);
    }
    return 0;
}
"#;

fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {value}"))
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn target(dir: &Path) -> Target {
    let binary = compile(dir, "gcc", "store.c", SOURCE, &["-g", "-O1"]);
    let target = Target::spawn("store", &mut Command::new(binary));
    target.expect_line("ready", TIMEOUT);
    target
}

/// The `i` each stored add(i, 0) span carries, sorted.
fn add_indexes(spans: &[Value]) -> Vec<u64> {
    let mut indexes: Vec<u64> = spans
        .iter()
        .filter(|s| s["function"] == "add")
        .map(|s| u64_of(&s["args"][0]))
        .collect();
    indexes.sort_unstable();
    indexes
}

#[test]
fn spans_survive_restart_and_kill_9_loses_at_most_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kept.db");
    let db_arg = db.to_str().unwrap();
    let mut target = target(dir.path());
    let pid = target.pid().to_string();

    // Trace, stop cleanly, start again on the same file: everything is still there.
    let scoped = Scoped::start_with(&["--db", db_arg]);
    scoped.attach(target.pid(), &["add"]);
    target.send("add");
    target.expect_line("done", TIMEOUT);
    let before = scoped.settled_calls(&["--pid", &pid], 1000, TIMEOUT);
    assert_eq!(before.len(), 1000);
    drop(scoped); // SIGTERM: detaches, commits, exits
    let scoped = Scoped::start_with(&["--db", db_arg]);
    let after = scoped.calls(&["--pid", &pid]);
    assert_eq!(after.len(), 1000, "all spans survive a restart");
    for (a, b) in before.iter().zip(&after) {
        for key in [
            "span_id",
            "parent_id",
            "trace_id",
            "function",
            "start_ns",
            "duration_ns",
            "args",
            "ret",
            "file",
            "line",
        ] {
            assert_eq!(a[key], b[key], "{key} survives a restart");
        }
    }
    assert_eq!(add_indexes(&after), (0..1000).collect::<Vec<_>>());

    // kill -9 in the middle of a steady load.
    scoped.attach(target.pid(), &["add"]);
    target.send("loop 4");
    thread::sleep(Duration::from_millis(2500));
    let killed_at = unix_ns();
    let mut scoped = scoped;
    scoped.proc.signal(libc::SIGKILL);
    assert!(scoped.proc.wait_exit(TIMEOUT).is_some());
    let done = target.expect_line("done", TIMEOUT);
    assert!(done.starts_with("done "), "the target is unharmed: {done}");

    let scoped = Scoped::start_with(&["--db", db_arg]);
    let spans = scoped.calls(&["--pid", &pid]);
    let indexes = add_indexes(&spans);
    let last = *indexes.last().unwrap();
    assert_eq!(
        indexes,
        (0..=last).collect::<Vec<_>>(),
        "no gap: the file holds a prefix of the calls"
    );
    let newest_start = spans.iter().map(|s| u64_of(&s["start_ns"])).max().unwrap();
    assert!(
        newest_start + 1_000_000_000 >= killed_at,
        "at most the last second is lost: newest stored span started {} ms before the kill",
        (killed_at - newest_start) / 1_000_000
    );
    let check = rusqlite_integrity(&db);
    assert_eq!(check, "ok");
}

/// `PRAGMA integrity_check` with the sqlite3 shell, as a user would open the file.
fn rusqlite_integrity(db: &Path) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("PRAGMA integrity_check;")
        .output()
        .unwrap_or_else(|e| {
            panic!("the sqlite3 shell is needed ({e}); install it with `cargo xtask setup`")
        });
    assert!(
        out.status.success(),
        "sqlite3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn retention_keeps_the_file_under_the_cap_and_the_newest_spans() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("small.db");
    let cap: u64 = 2 << 20;
    let scoped = Scoped::start_with(&["--db", db.to_str().unwrap(), "--retain-bytes", "2M"]);
    let mut target = target(dir.path());
    scoped.attach(target.pid(), &["add"]);
    target.send("loop 8");
    let wal = dir.path().join("small.db-wal");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut largest = 0;
    while Instant::now() < deadline {
        largest = largest.max(size(&db) + size(&wal));
        thread::sleep(Duration::from_millis(50));
    }
    let done = target.expect_line("done", TIMEOUT);
    let made: u64 = done.split_whitespace().nth(2).unwrap().parse().unwrap();
    let status = scoped.wait_received(made, TIMEOUT);
    thread::sleep(Duration::from_millis(500));
    let status_after = scoped.status();
    assert!(
        u64_of(&status_after["store_evicted"]) > 0,
        "a long trace needs eviction: {status}"
    );
    assert!(
        largest <= cap,
        "the store reached {largest} bytes, over its {cap}-byte cap"
    );
    let spans = scoped.calls(&["--pid", &target.pid().to_string()]);
    let indexes = add_indexes(&spans);
    assert_eq!(
        indexes.last().copied(),
        Some(made - 1),
        "the newest call is kept"
    );
    let first = indexes[0];
    assert_eq!(
        indexes,
        (first..made).collect::<Vec<_>>(),
        "what is kept is the newest contiguous run"
    );
    assert!(first > 0, "the oldest were evicted");
}

#[tokio::test]
async fn stats_percentiles_match_the_raw_spans() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let mut target = target(dir.path());
    scoped.attach(target.pid(), &["work"]);
    target.send("work");
    target.expect_line("done", Duration::from_secs(120));
    let pid = target.pid().to_string();
    let spans = scoped.settled_calls(&["--pid", &pid, "--func", "work"], 2000, TIMEOUT);
    assert_eq!(spans.len(), 2000);
    let mut durations: Vec<u64> = spans.iter().map(|s| u64_of(&s["duration_ns"])).collect();
    durations.sort_unstable();
    let exact = |q: f64| {
        durations[((q * durations.len() as f64).ceil() as usize).clamp(1, durations.len()) - 1]
    };

    let mut client = scoped.client().await;
    let answer = client
        .stats(pb::StatsRequest {
            filter: Some(pb::SpanFilter {
                pid: target.pid(),
                function: "work".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.functions.len(), 1, "{answer:?}");
    let work = &answer.functions[0];
    let error = answer.percentile_relative_error;
    assert!(error > 0.0 && error <= 0.01, "stated error {error}");
    assert_eq!(work.function, "work");
    assert_eq!(work.count, 2000);
    assert_eq!(work.total_ns, durations.iter().sum::<u64>());
    assert_eq!(work.max_ns, *durations.last().unwrap());
    assert_eq!(work.min_ns, durations[0]);
    assert_eq!(work.mean_ns, work.total_ns / 2000);
    // `scope stats --json` says the same.
    let cli = scoped.scope_json(&["stats", "--pid", &pid, "--func", "work", "--json"]);
    let row = &cli["functions"][0];
    assert_eq!(row["function"], "work");
    for (key, value) in [
        ("count", work.count),
        ("p50_ns", work.p50_ns),
        ("p99_ns", work.p99_ns),
        ("max_ns", work.max_ns),
    ] {
        assert_eq!(row[key], value, "{key} in {cli}");
    }
    for (q, got) in [(0.5, work.p50_ns), (0.95, work.p95_ns), (0.99, work.p99_ns)] {
        let want = exact(q);
        let off = (got as f64 - want as f64).abs() / want as f64;
        assert!(
            off <= error,
            "p{q}: stats says {got} ns, the raw spans {want} ns ({off:.4} > {error})"
        );
    }
}
