//! Privileged end-to-end tests (root, BPF) of correlation across threads and processes:
//! a worker pool fed through condvars (every job span hangs under the producer span that
//! handed it over), fork and exec (the child's spans hang under the parent's forking span,
//! in the same trace), and a reused pid that stays another process.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{collections::HashMap, process::Command, time::Duration};

use scope_tests::{Scoped, Target, compile};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

const POOL: &str = r#"#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#define WORKERS 4
#define JOBS 1000

struct worker {
    pthread_t thread;
    pid_t tid;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    long job;      /* 0: none */
    int idle;
};

static struct worker workers[WORKERS];
static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cond = PTHREAD_COND_INITIALIZER;
static long done;

__attribute__((noinline)) long process(long job) {
    __asm__ volatile("" ::: "memory");
    return job * 2;
}

/* Sleeping in the kernel (state S): a signal now is a real wakeup. */
static int asleep(pid_t tid) {
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t n = fread(stat, 1, sizeof stat - 1, f);
    fclose(f);
    stat[n] = 0;
    char *end = strrchr(stat, ')');
    return end && end[2] == 'S';
}

static void *work(void *arg) {
    struct worker *w = arg;
    w->tid = (pid_t)syscall(SYS_gettid);
    for (;;) {
        pthread_mutex_lock(&w->lock);
        w->idle = 1;
        while (w->job == 0) pthread_cond_wait(&w->wake, &w->lock);
        long job = w->job;
        w->job = 0;
        w->idle = 0;
        pthread_mutex_unlock(&w->lock);
        if (job < 0) return NULL;
        process(job);
        pthread_mutex_lock(&done_lock);
        done++;
        pthread_cond_signal(&done_cond);
        pthread_mutex_unlock(&done_lock);
    }
}

/* Hands one job to worker w, which is asleep waiting for one. */
__attribute__((noinline)) long dispatch(long job, int w) {
    pthread_mutex_lock(&workers[w].lock);
    workers[w].job = job;
    pthread_cond_signal(&workers[w].wake);
    pthread_mutex_unlock(&workers[w].lock);
    return job;
}

static void wait_asleep(int w) {
    for (;;) {
        pthread_mutex_lock(&workers[w].lock);
        int idle = workers[w].idle && workers[w].job == 0;
        pthread_mutex_unlock(&workers[w].lock);
        if (idle && workers[w].tid && asleep(workers[w].tid)) return;
        usleep(50);
    }
}

__attribute__((noinline)) long produce(long jobs) {
    for (long job = 1; job <= jobs; job++) {
        int w = (int)(job % WORKERS);
        wait_asleep(w);
        dispatch(job, w);
    }
    pthread_mutex_lock(&done_lock);
    while (done < jobs) pthread_cond_wait(&done_cond, &done_lock);
    pthread_mutex_unlock(&done_lock);
    return jobs;
}

int main(void) {
    char line[64];
    for (int i = 0; i < WORKERS; i++) {
        pthread_mutex_init(&workers[i].lock, NULL);
        pthread_cond_init(&workers[i].wake, NULL);
        pthread_create(&workers[i].thread, NULL, work, &workers[i]);
    }
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "go", 2) == 0) {
            printf("done %ld\n", produce(JOBS)); fflush(stdout);
        }
    }
    return 0;
}
"#;

fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {value}"))
}

#[test]
fn worker_jobs_hang_under_the_producer_span_that_handed_them_over() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(
        dir.path(),
        "gcc",
        "pool.c",
        POOL,
        &["-g", "-O1", "-pthread"],
    );
    let scoped = Scoped::start();
    let mut target = Target::spawn("pool", &mut Command::new(binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();
    scoped.attach(target.pid(), &["produce", "dispatch", "process"]);
    target.send("go");
    assert_eq!(
        target.expect_line("done", Duration::from_secs(120)),
        "done 1000"
    );

    let spans = scoped.settled_calls(&["--pid", &pid], 2001, TIMEOUT);
    let dispatches: HashMap<u64, &Value> = spans
        .iter()
        .filter(|s| s["function"] == "dispatch")
        .map(|s| (u64_of(&s["args"][0]), s))
        .collect();
    let jobs: Vec<&Value> = spans
        .iter()
        .filter(|s| s["function"] == "process")
        .collect();
    assert_eq!(
        (dispatches.len(), jobs.len()),
        (1000, 1000),
        "every hand-off and job was traced"
    );
    let produce = spans.iter().find(|s| s["function"] == "produce").unwrap();
    for job in &jobs {
        let id = u64_of(&job["args"][0]);
        let dispatch = dispatches[&id];
        assert_eq!(
            job["parent_id"], dispatch["span_id"],
            "job {id} hangs under the dispatch of job {id}"
        );
        assert_eq!(job["link_kind"], "wakeup", "{job}");
        assert_eq!(
            job["trace_id"], produce["trace_id"],
            "one trace: the producer's"
        );
        assert_ne!(job["tid"], dispatch["tid"], "a hand-off to another thread");
        assert_eq!(u64_of(&job["depth"]), 0, "a root call on its own thread");
    }
    // One trace holds them all, and `scope show` draws it.
    let trace = produce["trace_id"].as_str().unwrap();
    let shown = scoped.scope_ok(&["show", trace]);
    assert!(
        shown.starts_with(&format!("trace {trace}: 2001 spans in 1 process")),
        "{}",
        &shown[..200.min(shown.len())]
    );
    assert!(shown.contains("(wakeup) ["), "hand-offs are marked");
}

const FORKER: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long child_work(long n) {
    __asm__ volatile("" ::: "memory");
    return n * 2;
}

/* Present here too so the session's globs resolve in this program; the exec'd one calls its own. */
__attribute__((noinline)) long exec_work(long n) {
    __asm__ volatile("" ::: "memory");
    return n + 1;
}

/* Forks; the child waits for the daemon to follow it, then works (or execs). */
__attribute__((noinline)) int spawn(long n, const char *program) {
    pid_t pid = fork();
    if (pid == 0) {
        usleep(400000);
        if (program) {
            execl(program, program, NULL);
            _exit(127);
        }
        child_work(n);
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return pid;
}

int main(int argc, char **argv) {
    char line[256];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (strncmp(line, "fork", 4) == 0) {
            printf("done %d\n", spawn(21, NULL)); fflush(stdout);
        } else if (strncmp(line, "exec ", 5) == 0) {
            printf("done %d\n", spawn(21, line + 5)); fflush(stdout);
        } else if (strncmp(line, "reuse ", 6) == 0) {
            /* Fork a child that gets the pid the first one had. */
            pid_t want = atoi(line + 6);
            int got = 0;
            for (int tries = 0; tries < 50 && got != want; tries++) {
                FILE *f = fopen("/proc/sys/kernel/ns_last_pid", "w");
                if (!f) break;
                fprintf(f, "%d", want - 1);
                fclose(f);
                got = spawn(21, NULL);
            }
            printf("done %d\n", got); fflush(stdout);
        }
    }
    return 0;
}
"#;

const EXECED: &str = r#"#include <unistd.h>
__attribute__((noinline)) long exec_work(long n) {
    __asm__ volatile("" ::: "memory");
    return n + 1;
}
int main(void) {
    usleep(400000);
    return (int)exec_work(41) == 42 ? 0 : 1;
}
"#;

fn pid_of(done: &str) -> u32 {
    done.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn forked_and_execed_children_hang_under_the_forking_span_and_reused_pids_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let forker = compile(dir.path(), "gcc", "forker.c", FORKER, &["-g", "-O1"]);
    let execed = compile(dir.path(), "gcc", "execed.c", EXECED, &["-g", "-O1"]);
    let scoped = Scoped::start();
    let mut target = Target::spawn("forker", &mut Command::new(forker));
    target.expect_line("ready", TIMEOUT);
    scoped.attach(target.pid(), &["spawn", "child_work", "exec_work"]);

    // fork: the child's call hangs under the parent's spawn().
    target.send("fork");
    let child = pid_of(&target.expect_line("done", TIMEOUT));
    let spans = scoped.settled_calls(&["--pid", &child.to_string()], 1, TIMEOUT);
    assert_eq!(spans.len(), 1, "the forked child was followed: {spans:?}");
    let work = &spans[0];
    assert_eq!(work["function"], "child_work");
    assert_eq!(work["ret"], 42);
    let parents = scoped.settled_calls(
        &["--pid", &target.pid().to_string(), "--func", "spawn"],
        1,
        TIMEOUT,
    );
    let spawn = &parents[0];
    assert_eq!(
        work["parent_id"], spawn["span_id"],
        "under the span that forked"
    );
    assert_eq!(work["link_kind"], "fork");
    assert_eq!(
        work["trace_id"], spawn["trace_id"],
        "one trace across the two processes"
    );

    // fork + exec: the new program's call, re-resolved after exec, hangs there too.
    target.send(&format!("exec {}", execed.display()));
    let execed_pid = pid_of(&target.expect_line("done", TIMEOUT));
    let spans = scoped.settled_calls(&["--pid", &execed_pid.to_string()], 1, TIMEOUT);
    assert_eq!(spans.len(), 1, "the exec'd program was traced: {spans:?}");
    assert_eq!(spans[0]["function"], "exec_work");
    assert!(
        spans[0]["module"].as_str().unwrap().ends_with("/execed"),
        "{}",
        spans[0]
    );
    let spawns = scoped.settled_calls(
        &["--pid", &target.pid().to_string(), "--func", "spawn"],
        2,
        TIMEOUT,
    );
    let second = spawns
        .iter()
        .find(|s| u64_of(&s["ret"]) == u64::from(execed_pid))
        .unwrap();
    assert_eq!(spans[0]["parent_id"], second["span_id"]);
    assert_eq!(spans[0]["trace_id"], second["trace_id"]);
    assert_eq!(spans[0]["link_kind"], "fork");

    // A new process that gets the first child's pid is another process.
    target.send(&format!("reuse {child}"));
    let reused = pid_of(&target.expect_line("done", TIMEOUT));
    assert_eq!(
        reused, child,
        "the test could not get the pid reused (ns_last_pid)"
    );
    let spans = scoped.settled_calls(&["--pid", &child.to_string()], 2, TIMEOUT);
    assert_eq!(spans.len(), 2, "one call in each process with that pid");
    assert_ne!(
        spans[0]["trace_id"], spans[1]["trace_id"],
        "two processes, two traces"
    );
    assert_ne!(
        spans[0]["parent_id"], spans[1]["parent_id"],
        "each under its own spawn()"
    );
    let ps: Vec<Value> = scoped
        .scope_ok(&["ps", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let with_pid: Vec<&Value> = ps.iter().filter(|p| p["pid"] == child).collect();
    assert_eq!(
        with_pid.len(),
        2,
        "two processes with pid {child} in `scope ps`: {ps:?}"
    );
    assert_ne!(with_pid[0]["start_ns"], with_pid[1]["start_ns"]);
    assert!(
        with_pid.iter().all(|p| p["parent_pid"] == target.pid()),
        "{with_pid:?}"
    );
    assert!(u64_of(&with_pid[0]["exited_ns"]) > 0, "the first one ended");
}
