//! Privileged end-to-end tests (root, BPF) of the kernel's entry/exit pairing on the cases a
//! plain uprobe printer gets wrong: a thread that exits mid-call, a longjmp over traced
//! frames, a process that execs mid-call, and two sessions tracing the same function.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{process::Command, time::Duration};

use scope_tests::{Scoped, Target, compile};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);

const SOURCE: &str = r#"#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static jmp_buf env;

__attribute__((noinline)) void leave_thread(long code) {
    pthread_exit((void *)code);
}

__attribute__((noinline)) void *thread_body(void *arg) {
    leave_thread((long)arg);
    return NULL;
}

__attribute__((noinline)) void jump_out(int depth) {
    if (depth == 0) longjmp(env, 1);
    jump_out(depth - 1);
}

__attribute__((noinline)) long after_jump(long x) {
    return x + 1;
}

__attribute__((noinline)) int guarded(void) {
    if (setjmp(env) == 0) {
        jump_out(2);
    }
    return (int)after_jump(41);
}

__attribute__((noinline)) void become_true(void) {
    execl("/bin/true", "true", (char *)NULL);
}

__attribute__((noinline)) long shared(long x) {
    return x * 2;
}

int main(void) {
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "thread", 6) == 0) {
            pthread_t t;
            void *ret;
            pthread_create(&t, NULL, thread_body, (void *)7);
            pthread_join(t, &ret);
            printf("done %ld\n", (long)ret); fflush(stdout);
        } else if (strncmp(line, "jump", 4) == 0) {
            printf("done %d\n", guarded()); fflush(stdout);
        } else if (strncmp(line, "shared", 6) == 0) {
            long total = 0;
            for (long i = 0; i < 100; i++) total += shared(i);
            printf("done %ld\n", total); fflush(stdout);
        } else if (strncmp(line, "exec", 4) == 0) {
            become_true();
        }
    }
    return 0;
}
"#;

fn spans_named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["function"] == name).collect()
}

fn flags(span: &Value) -> Vec<&str> {
    span["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect()
}

#[test]
fn thread_exit_longjmp_and_exec_mid_call() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(
        dir.path(),
        "gcc",
        "pairing.c",
        SOURCE,
        &["-g", "-O0", "-pthread"],
    );
    let scoped = Scoped::start();
    let mut target = Target::spawn("pairing", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid();
    let pid_arg = pid.to_string();
    scoped.attach(
        pid,
        &[
            "thread_body",
            "leave_thread",
            "guarded",
            "jump_out",
            "after_jump",
            "become_true",
        ],
    );

    // A thread that exits inside two traced calls: both reported, flagged, nested.
    target.send("thread");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 7");
    let spans = scoped.settled_calls(&["--pid", &pid_arg], 2, TIMEOUT);
    let body = spans_named(&spans, "thread_body");
    let leave = spans_named(&spans, "leave_thread");
    assert_eq!((body.len(), leave.len()), (1, 1), "{spans:?}");
    assert_eq!(flags(body[0]), ["thread_exited"]);
    assert_eq!(flags(leave[0]), ["thread_exited"]);
    assert_eq!(leave[0]["parent_id"], body[0]["span_id"]);
    assert_eq!(leave[0]["args"][0], 7);
    assert_ne!(
        body[0]["tid"].as_u64(),
        Some(u64::from(pid)),
        "it ran on the new thread"
    );

    // longjmp out of three nested jump_out calls: they never return. The next return of an
    // enclosing traced call (guarded) reports them as abandoned; after_jump pairs normally.
    target.send("jump");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 42");
    let spans = scoped.settled_calls(&["--pid", &pid_arg], 7, TIMEOUT);
    let jumps = spans_named(&spans, "jump_out");
    assert_eq!(jumps.len(), 3, "{spans:?}");
    assert!(jumps.iter().all(|j| flags(j) == ["abandoned"]), "{jumps:?}");
    let guarded = spans_named(&spans, "guarded");
    assert_eq!(guarded.len(), 1);
    assert!(flags(guarded[0]).is_empty());
    assert_eq!(guarded[0]["ret"], 42);
    let after = spans_named(&spans, "after_jump");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["ret"], 42);
    assert_eq!(
        after[0]["depth"], 1,
        "nested in guarded, not under the abandoned frames"
    );
    assert_eq!(after[0]["parent_id"], guarded[0]["span_id"]);
    let status = scoped.status();
    assert_eq!(status["counters"]["kernel.abandoned"], 3, "{status}");
    assert_eq!(status["counters"]["kernel.unmatched_exit"], 0, "{status}");

    // exec in the middle of a traced call.
    target.send("exec");
    let spans = scoped.settled_calls(&["--pid", &pid_arg, "--func", "become_true"], 1, TIMEOUT);
    assert_eq!(spans.len(), 1);
    assert_eq!(flags(&spans[0]), ["execed"]);
    // The kernel side said so in the daemon's log, through aya-log.
    let log = scoped.log();
    assert!(
        log.contains("called exec inside 1 traced calls"),
        "eBPF log line missing from:\n{log}"
    );
    assert_eq!(scoped.status()["spans_dropped"], 0);
}

#[test]
fn two_sessions_on_one_function_each_get_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(
        dir.path(),
        "gcc",
        "shared.c",
        SOURCE,
        &["-g", "-O0", "-pthread"],
    );
    let scoped = Scoped::start();
    let mut target = Target::spawn("shared", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid();
    let first = scoped.attach(pid, &["shared"])["session_id"]
        .as_u64()
        .unwrap()
        .to_string();
    let second = scoped.attach(pid, &["shared"])["session_id"]
        .as_u64()
        .unwrap()
        .to_string();
    target.send("shared");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 9900");
    for session in [&first, &second] {
        let spans = scoped.settled_calls(&["--session", session], 100, TIMEOUT);
        assert_eq!(spans.len(), 100, "session {session}");
        for (i, span) in spans.iter().enumerate() {
            assert_eq!(span["args"][0], i as u64);
            assert_eq!(span["ret"], 2 * i as u64);
        }
    }
    let status = scoped.status();
    assert_eq!(status["counters"]["kernel.unmatched_exit"], 0, "{status}");
    assert_eq!(status["spans_dropped"], 0, "{status}");
}

const TAIL_SOURCE: &str = r#"#include <stdio.h>
#include <string.h>

__attribute__((noinline)) long tail_target(long x) {
    __asm__ volatile("" ::: "memory");
    return x * 3;
}

__attribute__((noinline)) long tail_caller(long x) {
    return tail_target(x + 1);
}

int main(void) {
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long total = 0;
        for (long i = 0; i < 10; i++) total += tail_caller(i);
        printf("done %ld\n", total); fflush(stdout);
    }
    return 0;
}
"#;

#[test]
fn tail_calls_nest_and_return_once() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "tail.c", TAIL_SOURCE, &["-g", "-O2"]);
    // The premise: gcc -O2 compiles tail_caller's call as a jump.
    let disassembly = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(&binary)
        .output()
        .unwrap();
    let disassembly = String::from_utf8_lossy(&disassembly.stdout);
    let body: String = disassembly
        .split("<tail_caller>:")
        .nth(1)
        .unwrap()
        .lines()
        .take(6)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        body.contains("jmp") && body.contains("<tail_target>"),
        "tail_caller should tail-jump:\n{body}"
    );

    let scoped = Scoped::start();
    let mut target = Target::spawn("tail", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid();
    scoped.attach(pid, &["tail_caller", "tail_target"]);
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 165");
    let spans = scoped.settled_calls(&["--pid", &pid.to_string()], 20, TIMEOUT);
    let callers = spans_named(&spans, "tail_caller");
    let targets = spans_named(&spans, "tail_target");
    assert_eq!((callers.len(), targets.len()), (10, 10), "{spans:?}");
    for (caller, callee) in callers.iter().zip(&targets) {
        assert!(
            flags(caller).is_empty() && flags(callee).is_empty(),
            "{caller} {callee}"
        );
        assert_eq!(
            callee["parent_id"], caller["span_id"],
            "the tail-called function nests under its caller"
        );
        assert_eq!(callee["depth"], 1);
        // Both return the same value: the tail call's return is the caller's return.
        assert_eq!(caller["ret"], callee["ret"]);
        assert_eq!(caller["ret"], 3 * (caller["args"][0].as_u64().unwrap() + 1));
    }
    let status = scoped.status();
    assert_eq!(status["counters"]["kernel.abandoned"], 0, "{status}");
    assert_eq!(status["counters"]["kernel.unmatched_exit"], 0, "{status}");
}
