//! Privileged end-to-end test (root, BPF) of USDT probes: `scope attach --usdt PROVIDER:NAME`
//! on a program built with `<sys/sdt.h>` raises the probe's semaphore (the program skips the
//! probe otherwise), reports each hit as a span named `PROVIDER:NAME` with its arguments
//! decoded from where the note says they are (registers, memory, constants, RIP-relative
//! data), makes a `X__start`/`X__done` pair one span `PROVIDER:X` with a duration, and
//! lowers the semaphore again on detach.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{process::Command, time::Duration};

use scope_tests::{Scoped, Target, compile, probe_functions, read_memory, runtime_address};

const TIMEOUT: Duration = Duration::from_secs(20);

const SOURCE: &str = r#"#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <stdio.h>
#include <string.h>

unsigned short demo_request__start_semaphore __attribute__((section(".probes")));
unsigned short demo_request__done_semaphore __attribute__((section(".probes")));
unsigned short demo_global_semaphore __attribute__((section(".probes")));
long counter = 41;
struct stats { long a, b, c; } stats = {1, 2, 3};

/* Arguments in data: gcc passes them RIP-relative (`-8@counter(%rip) -8@16+stats(%rip)`). */
__attribute__((noinline)) void report(void) {
    if (demo_global_semaphore)
        DTRACE_PROBE2(demo, global, counter, stats.c);
}

__attribute__((noinline)) long handle(long id, const char *path, int status) {
    long local = id * 3;
    if (demo_request__start_semaphore)
        DTRACE_PROBE4(demo, request__start, id, path, status, -5);
    local += (long)strlen(path);
    if (demo_request__done_semaphore)
        DTRACE_PROBE2(demo, request__done, id, local);
    return local;
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    long id = 0;
    while (fgets(line, sizeof line, stdin)) {
        id++;
        counter++;
        stats.c += 10;
        report();
        printf("done %ld\n", handle(id, "/index.html", 200 + (int)id));
    }
    return 0;
}
"#;

#[test]
fn usdt_probes_report_their_decoded_arguments_and_semaphores_are_restored() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "sdt.c", SOURCE, &["-g", "-O2"]);
    let scoped = Scoped::start();
    let mut target = Target::spawn("sdt", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid();
    let semaphore = runtime_address(pid, &binary, "demo_request__start_semaphore");
    let read_semaphore = || u16::from_ne_bytes(read_memory(pid, semaphore, 2).try_into().unwrap());
    assert_eq!(read_semaphore(), 0);

    // Unknown probes are a clear error.
    let out = scoped.scope(&[
        "attach",
        "--pid",
        &pid.to_string(),
        "--usdt",
        "demo:nothing",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no USDT probe matches"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let session = scoped.scope_json(&[
        "attach",
        "--pid",
        &pid.to_string(),
        "--usdt",
        "demo:request__*",
        "--usdt",
        "demo:global",
        "--json",
    ]);
    let probes = session["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 3, "{session}");
    assert_eq!(read_semaphore(), 1, "attaching raised the semaphore");
    for _ in 0..3 {
        target.send("go");
        target.expect_line("done", TIMEOUT);
    }
    let pid_arg = pid.to_string();
    // request__start and request__done are a pair: one span `demo:request` per request, with
    // the start's arguments, a duration, and the done site's first argument as `ret`.
    let calls = scoped.settled_calls(&["--pid", &pid_arg], 6, TIMEOUT);
    let requests: Vec<_> = calls
        .iter()
        .filter(|c| c["function"] == "demo:request")
        .collect();
    assert_eq!(requests.len(), 3, "{calls:?}");
    assert!(
        calls.iter().all(|c| c["function"] != "demo:request__done"),
        "the done site makes no span of its own: {calls:?}"
    );
    for (i, request) in requests.iter().enumerate() {
        let id = i as u64 + 1;
        let args = request["args"].as_array().unwrap();
        assert_eq!(args[0], id, "the first argument (a register) {request}");
        assert_ne!(args[1], 0, "the path pointer {request}");
        assert_eq!(args[2], 200 + id, "the status (an int) {request}");
        assert_eq!(
            args[3],
            u64::MAX - 4,
            "a constant -5, sign-extended {request}"
        );
        assert_eq!(
            request["ret"], id,
            "the done site's first argument {request}"
        );
        assert!(
            request["duration_ns"].as_u64().unwrap() > 0,
            "a pair has a duration {request}"
        );
        assert!(
            request["flags"].as_array().unwrap().is_empty(),
            "a pair is not an instant {request}"
        );
        // The pointer really points at the path.
        let text = read_memory(pid, args[1].as_u64().unwrap(), 11);
        assert_eq!(text, b"/index.html");
    }
    let globals: Vec<_> = calls
        .iter()
        .filter(|c| c["function"] == "demo:global")
        .collect();
    assert_eq!(globals.len(), 3, "{calls:?}");
    for (i, global) in globals.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(global["args"][0], 41 + n, "counter(%rip) {global}");
        assert_eq!(global["args"][1], 3 + 10 * n, "16+stats(%rip) {global}");
    }

    let id = session["session_id"].as_u64().unwrap().to_string();
    scoped.scope_ok(&["detach", &id]);
    assert_eq!(read_semaphore(), 0, "detaching lowered the semaphore");
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 23");

    // Alone, one site of a pair is a zero-length span of its own, with its own arguments.
    let session = scoped.scope_json(&[
        "attach",
        "--pid",
        &pid_arg,
        "--usdt",
        "demo:request__done",
        "--json",
    ]);
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 26");
    let calls = scoped.settled_calls(
        &["--pid", &pid_arg, "--func", "demo:request__done"],
        1,
        TIMEOUT,
    );
    assert_eq!(calls[0]["args"][0], 5, "{calls:?}");
    assert_eq!(calls[0]["args"][1], 5 * 3 + 11, "{calls:?}");
    assert_eq!(calls[0]["duration_ns"], 0, "{calls:?}");
    let id = session["session_id"].as_u64().unwrap().to_string();
    scoped.scope_ok(&["detach", &id]);
}

/// Done-when 3 of issue 6: pgbench against PostgreSQL traced with `query__start` and
/// `query__done` gives one span per query, carrying its SQL and a duration, with the
/// executor's calls nested inside it. The backends are forked by the postmaster after the
/// attach: they are followed.
#[test]
fn pgbench_queries_are_spans_with_their_sql_and_a_duration() {
    let postgres = scope_tests::Postgres::start(1, &[]);
    let scoped = Scoped::start();
    let pid = postgres.pid().to_string();
    let session = scoped.scope_json(&[
        "attach",
        "--pid",
        &pid,
        "--usdt",
        "postgresql:query__start",
        "--usdt",
        "postgresql:query__done",
        "--func",
        "ExecutorRun",
        "--json",
    ]);
    assert!(
        probe_functions(&session).contains(&"postgresql:query".to_owned()),
        "{session}"
    );

    let run = postgres.pgbench(&["-n", "-S", "-c", "4", "-T", "4"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "pgbench: {stdout} {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let processed: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|l| l.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("pgbench's count in: {stdout}"));

    let calls = scoped.settled_calls(&["--func", "postgresql:query"], 100, TIMEOUT);
    let selects: Vec<_> = calls
        .iter()
        .filter(|c| {
            c["text"]
                .as_str()
                .unwrap()
                .starts_with("SELECT abalance FROM pgbench_accounts WHERE aid = ")
        })
        .collect();
    // Queries that ran before a new backend was followed (tens of ms) are not traced; the
    // rest are.
    assert!(
        selects.len() * 2 >= processed && selects.len() <= processed,
        "{} query spans of pgbench's {processed} selects",
        selects.len()
    );
    for call in &calls {
        let text = call["text"].as_str().unwrap();
        assert!(!text.is_empty(), "every query span carries its SQL: {call}");
        assert!(
            call["duration_ns"].as_u64().unwrap() > 0,
            "every query span has a duration: {call}"
        );
        assert!(call["flags"].as_array().unwrap().is_empty(), "{call}");
    }
    for select in &selects {
        let aid = select["text"].as_str().unwrap()
            ["SELECT abalance FROM pgbench_accounts WHERE aid = ".len()..]
            .trim_end_matches(';');
        let aid: u32 = aid
            .parse()
            .unwrap_or_else(|_| panic!("the query's literal: {select}"));
        assert!((1..=100_000).contains(&aid), "{select}");
    }

    // The executor runs inside the query: ExecutorRun spans are its children.
    let executor: Vec<serde_json::Value> = scoped
        .scope_ok(&["calls", "--json", "--limit", "500", "--func", "ExecutorRun"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(!executor.is_empty());
    let query_ids: std::collections::HashSet<u64> = calls
        .iter()
        .map(|c| c["span_id"].as_u64().unwrap())
        .collect();
    let nested = executor
        .iter()
        .filter(|e| query_ids.contains(&e["parent_id"].as_u64().unwrap()))
        .count();
    assert!(
        nested * 10 >= executor.len() * 9,
        "{nested} of {} ExecutorRun spans nest in a query span",
        executor.len()
    );

    // Nothing lost, nothing abandoned. While a followed backend's probes are being armed,
    // its calls can end whose start was not seen yet: the end sites and exits are armed
    // first, so those are counted unmatched, never made into spans that look abandoned.
    let status = scoped.scope_json(&["status", "--json"]);
    assert_eq!(status["counters"]["kernel.abandoned"], 0, "{status}");
    assert_eq!(status["spans_dropped"], 0, "{status}");
}

/// A program that opens and closes a USDT pair as fast as it can.
const HOT_PAIR: &str = r#"#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <stdio.h>

/* volatile: the loop calls nothing, so the compiler would read them once. */
volatile unsigned short hot_op__start_semaphore __attribute__((section(".probes")));
volatile unsigned short hot_op__done_semaphore __attribute__((section(".probes")));

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    for (unsigned long i = 0;; i++) {
        if (hot_op__start_semaphore)
            DTRACE_PROBE1(hot, op__start, i);
        if (hot_op__done_semaphore)
            DTRACE_PROBE1(hot, op__done, i);
    }
}
"#;

/// An overhead budget detaches a hot USDT pair as a unit: the end site goes with its begin
/// (it makes no spans of its own and would only trap), and the program runs on.
#[test]
fn a_budget_detaches_a_hot_usdt_pair_with_its_end_site() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "hot_pair.c", HOT_PAIR, &["-O2"]);
    let scoped = Scoped::start();
    let mut target = Target::spawn("hot_pair", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();
    let session = scoped.scope_json(&[
        "attach",
        "--pid",
        &pid,
        "--usdt",
        "hot:op__*",
        "--budget",
        "1%",
        "--json",
    ]);
    assert_eq!(
        probe_functions(&session),
        ["hot:op", "hot:op__done"],
        "{session}"
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    let sessions = loop {
        let sessions = scoped.scope_json(&["sessions", "--json"]);
        if sessions["sessions"][0]["probes"]
            .as_array()
            .unwrap()
            .is_empty()
            || std::time::Instant::now() > deadline
        {
            break sessions;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let session = &sessions["sessions"][0];
    assert!(
        session["probes"].as_array().unwrap().is_empty(),
        "both sites of the pair were detached: {session}"
    );
    assert_eq!(session["throttled"][0]["function"], "hot:op", "{session}");
    assert_eq!(session["throttled"][0]["action"], "detached", "{session}");
    // Spans came back while it was attached, and the program is still running.
    let calls = scoped.settled_calls(&["--pid", &pid, "--func", "hot:op"], 1, TIMEOUT);
    assert!(!calls.is_empty());
    assert!(
        calls
            .iter()
            .all(|c| c["flags"].as_array().unwrap().is_empty()),
        "{calls:?}"
    );
    assert!(target.proc.child.try_wait().unwrap().is_none());
}

/// A program whose children, forked on request, fire a USDT probe every millisecond.
const FORKING: &str = r#"#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>

volatile unsigned short kid_tick_semaphore __attribute__((section(".probes")));

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (fork() == 0) {
            /* Gone with its parent, whatever becomes of the test. */
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            printf("child %d\n", getpid());
            for (;;) {
                if (kid_tick_semaphore)
                    DTRACE_PROBE(kid, tick);
                usleep(1000);
            }
        }
    }
    return 0;
}
"#;

/// A forked child inherits the semaphore counts its parent holds: a followed child is not
/// raised a second time, and detaching lowers it to where it was, so the program stops
/// paying for arguments nobody reads.
#[test]
fn a_followed_fork_inherits_the_semaphore_and_detach_lowers_it() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "forking.c", FORKING, &["-O2"]);
    let scoped = Scoped::start();
    let mut target = Target::spawn("forking", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid();
    let session = scoped.scope_json(&[
        "attach",
        "--pid",
        &pid.to_string(),
        "--usdt",
        "kid:tick",
        "--json",
    ]);
    target.send("fork");
    let child: u32 = target.expect_line("child", TIMEOUT)["child ".len()..]
        .parse()
        .unwrap();
    let semaphore = |pid: u32| {
        let address = runtime_address(pid, &binary, "kid_tick_semaphore");
        u16::from_ne_bytes(read_memory(pid, address, 2).try_into().unwrap())
    };
    // Followed: its ticks come back as spans.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while scoped.calls(&["--pid", &child.to_string()]).len() < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the child's ticks come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(semaphore(pid), 1);
    assert_eq!(semaphore(child), 1, "inherited, not raised twice");
    let id = session["session_id"].as_u64().unwrap().to_string();
    scoped.scope_ok(&["detach", &id]);
    assert_eq!(semaphore(pid), 0);
    assert_eq!(
        semaphore(child),
        0,
        "the child's inherited count was lowered"
    );
    // SAFETY: kill has no memory-safety preconditions; the child is ours.
    unsafe { libc::kill(child as i32, libc::SIGKILL) };
}
