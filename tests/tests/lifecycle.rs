//! Privileged end-to-end tests (root, BPF): after `scope detach` and after `kill -9` of
//! scoped, the target keeps running correctly and no uprobe of ours is left in the kernel —
//! checked in the target's own memory (the int3 the kernel wrote at the probed function is
//! gone), with bpftool (no link, no program of the daemon left) and in uprobe_events.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use scope_tests::{Scoped, Target, compile, read_memory, runtime_address};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);
const INT3: u8 = 0xcc;

const SOURCE: &str = r#"#include <stdio.h>
#include <string.h>

__attribute__((noinline)) long add(long a, long b) {
    return a + b;
}

int main(void) {
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long total = 0;
        for (long i = 0; i < 1000; i++) total += add(i, 2 * i);
        printf("done %ld\n", total); fflush(stdout);
    }
    return 0;
}
"#;

/// sum of 3i for i in 0..1000
const EXPECTED: &str = "done 1498500";

/// Ids of the BPF objects a process holds, from /proc/PID/fdinfo: `(kind, id)` with kind a
/// link type (`uprobe_multi`, `uretprobe_multi`, `perf`...) or `prog`. (Debian's bpftool 7.1
/// neither names uprobe_multi links nor shows owning pids, so we read the kernel directly.)
fn bpf_objects_of(pid: u32) -> Vec<(String, u64)> {
    let mut objects = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if let (Some(kind), Some(id)) = (field("link_type:"), field("link_id:")) {
            objects.push((kind, id.parse().unwrap()));
        } else if let (Some(_), Some(id)) = (field("prog_type:"), field("prog_id:")) {
            objects.push(("prog".to_owned(), id.parse().unwrap()));
        }
    }
    objects
}

fn uprobe_links_of(pid: u32) -> Vec<(String, u64)> {
    bpf_objects_of(pid)
        .into_iter()
        .filter(|(kind, _)| kind.ends_with("probe_multi"))
        .collect()
}

/// Ids of every BPF link or program in the kernel.
fn kernel_ids(what: &str) -> Vec<u64> {
    let out = Command::new("bpftool")
        .args(["-j", what, "show"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "bpftool is needed to list BPF objects ({e}); install it with `cargo xtask setup`"
            )
        });
    assert!(
        out.status.success(),
        "bpftool {what} show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["id"].as_u64())
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn detach_and_kill_9_leave_no_uprobe_and_the_target_unharmed() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "lifecycle.c", SOURCE, &["-g", "-O0"]);
    let mut target = Target::spawn("lifecycle", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid();
    let address = runtime_address(pid, &binary, "add");
    let original = read_memory(pid, address, 1)[0];
    assert_ne!(original, INT3, "nothing is attached yet");

    // Attach, check the breakpoint is in the target, trace, detach.
    let scoped = Scoped::start();
    let session = scoped.attach(pid, &["add"]);
    assert_eq!(
        read_memory(pid, address, 1)[0],
        INT3,
        "the kernel placed its breakpoint on add"
    );
    assert_eq!(
        uprobe_links_of(scoped.proc.pid()).len(),
        2,
        "one entry and one exit link"
    );
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), EXPECTED);
    let pid_arg = pid.to_string();
    assert_eq!(
        scoped
            .settled_calls(&["--pid", &pid_arg], 1000, TIMEOUT)
            .len(),
        1000
    );

    let id = session["session_id"].as_u64().unwrap().to_string();
    scoped.scope_ok(&["detach", &id]);
    assert_eq!(
        read_memory(pid, address, 1)[0],
        original,
        "detach restored the original instruction"
    );
    assert!(
        uprobe_links_of(scoped.proc.pid()).is_empty(),
        "detach removed the links"
    );
    target.send("go");
    assert_eq!(
        target.expect_line("done", TIMEOUT),
        EXPECTED,
        "the target still computes correctly"
    );
    let before = scoped.calls(&["--pid", &pid_arg]).len();
    assert_eq!(before, 1000, "no spans after detach");

    // Attach again, then kill -9 the daemon mid-trace.
    scoped.attach(pid, &["add"]);
    assert_eq!(read_memory(pid, address, 1)[0], INT3);
    let held = bpf_objects_of(scoped.proc.pid());
    let programs: Vec<u64> = held
        .iter()
        .filter(|(k, _)| k == "prog")
        .map(|(_, id)| *id)
        .collect();
    let links: Vec<u64> = held
        .iter()
        .filter(|(k, _)| k.ends_with("probe_multi"))
        .map(|(_, id)| *id)
        .collect();
    assert!(!programs.is_empty() && links.len() == 2, "{held:?}");
    assert!(
        links.iter().all(|id| kernel_ids("link").contains(id)),
        "bpftool sees the links"
    );
    scoped.proc.signal(libc::SIGKILL);
    let mut scoped = scoped;
    assert!(scoped.proc.wait_exit(TIMEOUT).is_some(), "scoped died");

    wait_until("the kernel removed the breakpoint", || {
        read_memory(pid, address, 1)[0] == original
    });
    wait_until("the daemon's uprobe links are gone", || {
        !kernel_ids("link").iter().any(|id| links.contains(id))
    });
    wait_until("the daemon's programs are unloaded", || {
        !kernel_ids("prog").iter().any(|id| programs.contains(id))
    });
    target.send("go");
    assert_eq!(
        target.expect_line("done", TIMEOUT),
        EXPECTED,
        "the target survives the daemon's death"
    );
    assert!(target.proc.is_running());

    // We never create tracefs uprobe events, and none name our target.
    let events = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    assert!(!events.contains(binary.to_str().unwrap()), "{events}");
}

#[test]
fn sigterm_detaches_everything_before_exit() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "sigterm.c", SOURCE, &["-g", "-O0"]);
    let mut target = Target::spawn("sigterm", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid();
    let address = runtime_address(pid, &binary, "add");
    let original = read_memory(pid, address, 1)[0];

    let mut scoped = Scoped::start();
    scoped.attach(pid, &["add"]);
    assert_eq!(read_memory(pid, address, 1)[0], INT3);
    scoped.proc.signal(libc::SIGTERM);
    let status = scoped
        .proc
        .wait_exit(TIMEOUT)
        .expect("scoped exits on SIGTERM");
    assert!(status.success(), "clean exit: {status}\n{}", scoped.log());
    assert!(
        scoped.log().contains("detached every session on shutdown"),
        "{}",
        scoped.log()
    );
    assert_eq!(read_memory(pid, address, 1)[0], original);
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), EXPECTED);
}

#[test]
fn detach_all_removes_every_probe_of_every_session() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "lifecycle.c", SOURCE, &["-g", "-O0"]);
    let mut targets: Vec<Target> = (0..2)
        .map(|_| {
            let target = Target::spawn("lifecycle", &mut Command::new(&binary));
            target.expect_line("ready", TIMEOUT);
            target
        })
        .collect();
    let scoped = Scoped::start();
    let mut addresses = Vec::new();
    // One session on each target, then a second one on the first.
    for target in &targets {
        let address = runtime_address(target.pid(), &binary, "add");
        let original = read_memory(target.pid(), address, 1)[0];
        scoped.attach(target.pid(), &["add"]);
        assert_eq!(read_memory(target.pid(), address, 1)[0], INT3);
        addresses.push((target.pid(), address, original));
    }
    scoped.attach(targets[0].pid(), &["add"]);
    assert_eq!(uprobe_links_of(scoped.proc.pid()).len(), 6);

    scoped.scope_ok(&["detach", "--all"]);
    assert!(
        uprobe_links_of(scoped.proc.pid()).is_empty(),
        "no link of ours is left"
    );
    for &(pid, address, original) in &addresses {
        assert_eq!(
            read_memory(pid, address, 1)[0],
            original,
            "pid {pid}: the original instruction is back"
        );
    }
    let sessions = scoped.scope_json(&["sessions", "--json"]);
    assert_eq!(
        sessions["sessions"].as_array().map(Vec::len),
        Some(0),
        "{sessions}"
    );
    for target in &mut targets {
        target.send("go");
        assert_eq!(target.expect_line("done", TIMEOUT), EXPECTED);
    }
    let events = std::fs::read_to_string("/sys/kernel/tracing/uprobe_events").unwrap_or_default();
    assert!(!events.contains(binary.to_str().unwrap()), "{events}");
}

/// The lifecycle program, plus commands to crash (`crash`) or exec another program (`exec`).
const MORTAL: &str = r#"#include <stdio.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) long add(long a, long b) {
    return a + b;
}

__attribute__((noinline)) void crash(void) {
    add(1, 2);
    *(volatile int *)0 = 1;
}

int main(void) {
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "crash", 5) == 0) crash();
        if (strncmp(line, "exec", 4) == 0) {
            execl("/bin/sh", "sh", "-c", "echo execed; read x; echo still $x", (char *)0);
        }
        long total = 0;
        for (long i = 0; i < 1000; i++) total += add(i, 2 * i);
        printf("done %ld\n", total); fflush(stdout);
    }
    return 0;
}
"#;

fn session_of(scoped: &Scoped, id: u64) -> Value {
    let sessions = scoped.scope_json(&["sessions", "--json"]);
    sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["session_id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no session {id}: {sessions}"))
}

#[test]
fn targets_that_crash_exec_or_are_replaced_on_disk_leave_the_daemon_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "mortal.c", MORTAL, &["-g", "-O0"]);
    let scoped = Scoped::start();

    // A target that crashes inside a traced call: the call is reported unfinished, the
    // session lets the process go, and the daemon carries on.
    let mut crasher = Target::spawn("crasher", &mut Command::new(&binary));
    crasher.expect_line("ready", TIMEOUT);
    let crash_session = scoped.attach(crasher.pid(), &["add", "crash"])["session_id"]
        .as_u64()
        .unwrap();
    crasher.send("crash");
    let status = crasher.proc.wait_exit(TIMEOUT).expect("the crasher died");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGSEGV)
    );
    wait_until("the session lets the crashed process go", || {
        session_of(&scoped, crash_session)["target_alive"] == false
            && uprobe_links_of(scoped.proc.pid()).is_empty()
    });
    let pid = crasher.pid().to_string();
    let calls = scoped.settled_calls(&["--pid", &pid], 2, TIMEOUT);
    let crash = calls.iter().find(|c| c["function"] == "crash").unwrap();
    assert!(
        crash["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "thread_exited"),
        "the call the process died in is reported as unfinished: {crash}"
    );
    assert!(calls.iter().any(|c| c["function"] == "add"));

    // A target that execs another program: its probes go with the old image (the new one
    // has no `add`), and the new program runs correctly.
    let mut execer = Target::spawn("execer", &mut Command::new(&binary));
    execer.expect_line("ready", TIMEOUT);
    let exec_session = scoped.attach(execer.pid(), &["add"])["session_id"]
        .as_u64()
        .unwrap();
    execer.send("exec");
    execer.expect_line("execed", TIMEOUT);
    wait_until("the old image's links are released", || {
        uprobe_links_of(scoped.proc.pid()).is_empty()
    });
    assert_eq!(session_of(&scoped, exec_session)["target_alive"], true);
    execer.send("fine");
    assert_eq!(execer.expect_line("still", TIMEOUT), "still fine");

    // A binary replaced on disk (a new file renamed over it, as package managers do) while
    // its process is traced: the probes stay on the running image, the new file is
    // untouched, and a process started from it can be traced on its own.
    let installed = dir.path().join("installed");
    std::fs::copy(&binary, &installed).unwrap();
    let mut old = Target::spawn("old", &mut Command::new(&installed));
    old.expect_line("ready", TIMEOUT);
    let old_address = runtime_address(old.pid(), &installed, "add");
    scoped.attach(old.pid(), &["add"]);
    let replacement = compile(
        dir.path(),
        "gcc",
        "replacement.c",
        &SOURCE.replace("return a + b;", "return a + b + 1;"),
        &["-g", "-O0"],
    );
    let staged = dir.path().join("staged");
    std::fs::copy(&replacement, &staged).unwrap();
    std::fs::rename(&staged, &installed).unwrap();
    old.send("go");
    assert_eq!(
        old.expect_line("done", TIMEOUT),
        EXPECTED,
        "the old image runs on"
    );
    assert_eq!(read_memory(old.pid(), old_address, 1)[0], INT3);
    let old_pid = old.pid().to_string();
    assert_eq!(
        scoped
            .settled_calls(&["--pid", &old_pid], 1000, TIMEOUT)
            .len(),
        1000
    );
    let mut new = Target::spawn("new", &mut Command::new(&installed));
    new.expect_line("ready", TIMEOUT);
    let new_address = runtime_address(new.pid(), &installed, "add");
    assert_ne!(
        read_memory(new.pid(), new_address, 1)[0],
        INT3,
        "the new file carries no probe"
    );
    scoped.attach(new.pid(), &["add"]);
    new.send("go");
    // sum of 3i + 1 for i in 0..1000
    assert_eq!(new.expect_line("done", TIMEOUT), "done 1499500");
    let new_pid = new.pid().to_string();
    assert_eq!(
        scoped
            .settled_calls(&["--pid", &new_pid], 1000, TIMEOUT)
            .len(),
        1000
    );

    let status = scoped.status();
    assert_eq!(status["counters"]["daemon.decode_errors"], 0, "{status}");
}

/// (open fds, resident KiB) of a process.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    (fds, rss)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_attach_detach_cycles_leak_no_fds_links_or_memory() {
    use scope_proto::v1 as pb;
    const CYCLES: usize = 1000;
    const WARMUP: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "cycles.c", SOURCE, &["-g", "-O0"]);
    let mut target = Target::spawn("cycles", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let scoped = Scoped::start();
    let daemon = scoped.proc.pid();
    let mut client = scoped.client().await;
    let mut after_warmup = None;
    let mut detach_ns = Vec::with_capacity(CYCLES);
    for cycle in 0..CYCLES {
        let session = client
            .attach(pb::AttachRequest {
                pid: target.pid(),
                functions: vec!["add".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        let detached = client
            .detach(pb::DetachRequest {
                target: Some(pb::detach_request::Target::SessionId(session.id)),
            })
            .await
            .unwrap()
            .into_inner();
        detach_ns.push(detached.detach_ns);
        if cycle + 1 == WARMUP {
            after_warmup = Some(fds_and_rss(daemon));
        }
    }
    assert!(uprobe_links_of(daemon).is_empty(), "no link is left");
    let (fds_before, rss_before) = after_warmup.unwrap();
    let (fds_after, rss_after) = fds_and_rss(daemon);
    detach_ns.sort_unstable();
    eprintln!(
        "{CYCLES} cycles: fds {fds_before} → {fds_after}, RSS {rss_before} → {rss_after} KiB; detach p50 {:.1} ms, p99 {:.1} ms",
        detach_ns[CYCLES / 2] as f64 / 1e6,
        detach_ns[CYCLES * 99 / 100] as f64 / 1e6
    );
    assert_eq!(fds_after, fds_before, "no fd leaks over {CYCLES} cycles");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew {} KiB over {} cycles",
        rss_after - rss_before,
        CYCLES - WARMUP
    );
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), EXPECTED);
}
