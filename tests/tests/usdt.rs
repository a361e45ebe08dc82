//! Privileged end-to-end test (root, BPF) of USDT probes: `scope attach --usdt PROVIDER:NAME`
//! on a program built with `<sys/sdt.h>` raises the probe's semaphore (the program skips the
//! probe otherwise), reports each hit as a span named `PROVIDER:NAME` with its arguments
//! decoded from where the note says they are (registers, memory, constants, RIP-relative
//! data), and lowers the
//! semaphore again on detach.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{process::Command, time::Duration};

use scope_tests::{Scoped, Target, compile, read_memory, runtime_address};

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
    let calls = scoped.settled_calls(&["--pid", &pid_arg], 9, TIMEOUT);
    let starts: Vec<_> = calls
        .iter()
        .filter(|c| c["function"] == "demo:request__start")
        .collect();
    let dones: Vec<_> = calls
        .iter()
        .filter(|c| c["function"] == "demo:request__done")
        .collect();
    assert_eq!(starts.len(), 3, "{calls:?}");
    assert_eq!(dones.len(), 3, "{calls:?}");
    for (i, start) in starts.iter().enumerate() {
        let id = i as u64 + 1;
        let args = start["args"].as_array().unwrap();
        assert_eq!(args[0], id, "the first argument (a register) {start}");
        assert_ne!(args[1], 0, "the path pointer {start}");
        assert_eq!(args[2], 200 + id, "the status (an int) {start}");
        assert_eq!(
            args[3],
            u64::MAX - 4,
            "a constant -5, sign-extended {start}"
        );
        assert_eq!(start["duration_ns"], 0);
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
    for (i, done) in dones.iter().enumerate() {
        let id = i as u64 + 1;
        assert_eq!(done["args"][0], id, "{done}");
        assert_eq!(done["args"][1], id * 3 + 11, "{done}");
    }

    let id = session["session_id"].as_u64().unwrap().to_string();
    scoped.scope_ok(&["detach", &id]);
    assert_eq!(read_semaphore(), 0, "detaching lowered the semaphore");
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 23");
}
