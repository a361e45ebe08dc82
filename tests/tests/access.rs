//! Privileged end-to-end tests (root, BPF, and users the tests create): the daemon never lets
//! one user spy on another. A user traces its own processes and is refused everyone else's,
//! sees only its own sessions' spans in every read, cannot detach another user's session,
//! and loses a process that execs into a setuid program; the socket is open to the `scope`
//! group alone; the TCP listener needs TLS and client authentication.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use scope_tests::{Proc, Scoped, Target, TestUser, bin, compile, free_port, shared_dir};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A program that calls `work` on each `work` line, and on `exec PATH` forks a child that
/// waits for SIGUSR1, calls `work` once and execs PATH with the argument `privileged` (in
/// which mode it calls `work` and `malloc` a hundred times over 50 ms and says which euid it
/// has).
const SOURCE: &str = r#"#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work(long n) {
    return n * 2 + 1;
}

static volatile sig_atomic_t go;
static void on_usr1(int signal) { (void)signal; go = 1; }

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "privileged") == 0) {
        long total = 0;
        for (long i = 0; i < 100; i++) {
            total += work(i);
            free(malloc(64 + i));
            usleep(500); /* 50 ms in all: long enough for a daemon to see it, if it could */
        }
        printf("privileged %ld euid %d\n", total, (int)geteuid());
        fflush(stdout);
        return 0;
    }
    signal(SIGUSR1, on_usr1);
    sigset_t usr1, old;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &old);
    printf("ready\n");
    fflush(stdout);
    char line[512];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (strcmp(line, "work") == 0) {
            long total = 0;
            for (long i = 0; i < 10; i++) total += work(i);
            printf("done %ld\n", total);
            fflush(stdout);
        } else if (strncmp(line, "exec ", 5) == 0) {
            pid_t child = fork();
            if (child == 0) {
                /* No malloc from here on: only the program exec'd calls it. */
                alarm(60); /* never outlive a failed test for long */
                while (!go) sigsuspend(&old);
                work(1);
                execl(line + 5, line + 5, "privileged", (char *)0);
                _exit(127);
            }
            printf("child %d\n", (int)child);
            fflush(stdout);
            int status = 0;
            waitpid(child, &status, 0);
            printf("reaped %d\n", status);
            fflush(stdout);
        }
    }
    return 0;
}
"#;

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pids_of(spans: &[Value]) -> BTreeSet<u64> {
    spans.iter().map(|s| s["pid"].as_u64().unwrap()).collect()
}

/// Runs `scope-rpc SOCKET ARGS...` as `user` (raw gRPC calls: status codes, Watch).
fn rpc_as(scoped: &Scoped, user: &TestUser, args: &[&str]) -> String {
    let out = user
        .command(&bin("scope-rpc"))
        .arg(&scoped.socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scope-rpc {args:?} as {} failed: {}",
        user.name,
        stderr_of(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Polls `read` until `done` says its answer is complete.
fn wait_for<T>(what: &str, mut read: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let value = read();
        if done(&value) {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn assert_denied(out: &Output, pid: u32) {
    let err = stderr_of(out);
    assert_eq!(out.status.code(), Some(1), "refused: {err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
}

#[test]
fn a_user_traces_its_own_process_and_never_sees_another_users() {
    let scoped = Scoped::start_with(&["--max-sessions-per-caller", "2"]);
    scoped.open_to_users();
    let dir = shared_dir();
    let binary = compile(dir.path(), "gcc", "access.c", SOURCE, &["-g", "-O0"]);
    let alice = TestUser::create("alice");
    let bob = TestUser::create("bob");
    let mut mine = Target::spawn("alice's", &mut alice.command(&binary));
    let mut theirs = Target::spawn("bob's", &mut bob.command(&binary));
    let roots = Target::spawn("root's", &mut Command::new(&binary));
    for target in [&mine, &theirs, &roots] {
        target.expect_line("ready", TIMEOUT);
    }
    let (my_pid, their_pid) = (mine.pid().to_string(), theirs.pid().to_string());

    // Alice traces her own process.
    let session = scoped.scope_as_ok(
        &alice,
        &["attach", "--pid", &my_pid, "--func", "work", "--json"],
    );
    let session: Value = serde_json::from_str(&session).unwrap();
    let my_session = session["session_id"].as_u64().unwrap();
    assert_eq!(session["owner_uid"].as_u64(), Some(u64::from(alice.uid)));
    mine.send("work");
    mine.expect_line("done", TIMEOUT);
    let calls = wait_for(
        "alice's calls",
        || scoped.json_lines_as(&alice, &["calls", "--json", "--limit", "0"]),
        |calls| calls.len() >= 10,
    );
    assert_eq!(calls.len(), 10, "{calls:?}");
    assert_eq!(pids_of(&calls), BTreeSet::from([u64::from(mine.pid())]));

    // She is refused Bob's process and root's, by the CLI and with the gRPC code.
    let out = scoped.scope_as(&alice, &["attach", "--pid", &their_pid, "--func", "work"]);
    assert_denied(&out, theirs.pid());
    assert!(
        stderr_of(&out).contains(&format!("runs as uid {}", bob.uid)),
        "{}",
        stderr_of(&out)
    );
    let out = scoped.scope_as(
        &alice,
        &[
            "attach",
            "--pid",
            &roots.pid().to_string(),
            "--func",
            "work",
        ],
    );
    assert_denied(&out, roots.pid());
    let answer = rpc_as(&scoped, &alice, &["attach", &their_pid, "work"]);
    assert!(answer.starts_with("error PermissionDenied "), "{answer}");

    // Root traces Bob's process.
    let root_session = scoped.attach(theirs.pid(), &["work"])["session_id"]
        .as_u64()
        .unwrap();
    theirs.send("work");
    theirs.expect_line("done", TIMEOUT);
    let theirs_calls = scoped.settled_calls(&["--pid", &their_pid], 10, TIMEOUT);
    assert_eq!(theirs_calls.len(), 10, "root sees Bob's calls");
    let their_trace = theirs_calls[0]["trace_id"].as_str().unwrap().to_owned();
    let everyone = scoped.calls(&[]);
    assert_eq!(
        pids_of(&everyone),
        BTreeSet::from([u64::from(mine.pid()), u64::from(theirs.pid())]),
        "root sees everyone's calls"
    );

    // Alice sees none of it, whichever way she asks.
    let calls = scoped.json_lines_as(&alice, &["calls", "--json", "--limit", "0"]);
    assert_eq!(pids_of(&calls), BTreeSet::from([u64::from(mine.pid())]));
    assert_eq!(calls.len(), 10);
    for filter in [
        vec!["--pid", their_pid.as_str()],
        vec!["--session", &root_session.to_string()],
        vec!["--trace", their_trace.as_str()],
    ] {
        let mut args = vec!["calls", "--json", "--limit", "0"];
        args.extend(filter.iter().copied());
        let calls = scoped.json_lines_as(&alice, &args);
        assert!(calls.is_empty(), "{args:?} shows alice {calls:?}");
    }
    let out = scoped.scope_as(&alice, &["show", &their_trace]);
    assert!(!out.status.success(), "alice may not see Bob's trace");
    assert!(
        stderr_of(&out).contains("no stored span"),
        "{}",
        stderr_of(&out)
    );
    let traces = scoped.json_lines_as(&alice, &["traces", "--json", "--limit", "0"]);
    assert!(!traces.is_empty());
    for trace in &traces {
        assert_eq!(trace["pids"], serde_json::json!([mine.pid()]), "{trace}");
    }
    let exported = scoped.json_lines_as(&alice, &["export", "--format", "jsonl"]);
    assert_eq!(pids_of(&exported), BTreeSet::from([u64::from(mine.pid())]));
    let stats: Value =
        serde_json::from_str(&scoped.scope_as_ok(&alice, &["stats", "--json"])).unwrap();
    let work_calls: u64 = stats["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["count"].as_u64().unwrap())
        .sum();
    assert_eq!(work_calls, 10, "only her own calls are counted: {stats}");
    let processes = scoped.json_lines_as(&alice, &["ps", "--json"]);
    assert!(
        processes
            .iter()
            .all(|p| p["pid"].as_u64() == Some(u64::from(mine.pid()))),
        "{processes:?}"
    );
    let sessions: Value =
        serde_json::from_str(&scoped.scope_as_ok(&alice, &["sessions", "--json"])).unwrap();
    let ids: Vec<u64> = sessions["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [my_session]);
    let status: Value =
        serde_json::from_str(&scoped.scope_as_ok(&alice, &["status", "--json"])).unwrap();
    assert_eq!(status["sessions"].as_u64(), Some(1), "{status}");
    assert_eq!(status["probes"].as_u64(), Some(1), "{status}");

    // Live: a Watch of everything shows her only her own calls.
    let mut watch = Proc::spawn(
        "scope-rpc watch",
        alice
            .command(&bin("scope-rpc"))
            .arg(&scoped.socket)
            .args(["watch", "4"])
            .stdout(Stdio::piped()),
    );
    let (lines_tx, lines) = mpsc::channel();
    let stdout = watch.child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    assert_eq!(lines.recv_timeout(TIMEOUT).unwrap(), "watching");
    for target in [&mut mine, &mut theirs] {
        target.send("work");
        target.expect_line("done", TIMEOUT);
    }
    assert!(
        watch.wait_exit(TIMEOUT).is_some(),
        "the watch ends after 4 s"
    );
    reader.join().unwrap();
    let seen: Vec<String> = lines.try_iter().collect();
    let spans: BTreeSet<&str> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("span "))
        .collect();
    assert_eq!(
        spans,
        BTreeSet::from([format!("{} {my_session}", mine.pid()).as_str()]),
        "alice's watch: {seen:?}"
    );
    assert_eq!(
        scoped
            .settled_calls(&["--pid", &their_pid], 20, TIMEOUT)
            .len(),
        20,
        "Bob's second round was traced all the same"
    );

    // She cannot detach root's session; `detach --all` detaches only hers.
    let out = scoped.scope_as(&alice, &["detach", &root_session.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("permission denied"),
        "{}",
        stderr_of(&out)
    );
    let answer = rpc_as(&scoped, &alice, &["detach", &root_session.to_string()]);
    assert!(answer.starts_with("error PermissionDenied "), "{answer}");

    // At most two sessions of hers at once (--max-sessions-per-caller 2); root is not held to it.
    let answer = rpc_as(&scoped, &alice, &["attach", &my_pid, "work"]);
    assert!(answer.starts_with("ok "), "{answer}");
    let answer = rpc_as(&scoped, &alice, &["attach", &my_pid, "work"]);
    assert!(answer.starts_with("error ResourceExhausted "), "{answer}");
    scoped.attach(roots.pid(), &["work"]);
    scoped.attach(roots.pid(), &["work"]);

    let detached: Value =
        serde_json::from_str(&scoped.scope_as_ok(&alice, &["detach", "--all", "--json"])).unwrap();
    assert_eq!(
        detached["detached_session_ids"].as_array().unwrap().len(),
        2,
        "{detached}"
    );
    let left: Vec<u64> = scoped.scope_json(&["sessions", "--json"])["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_u64().unwrap())
        .collect();
    assert_eq!(left.len(), 3, "root's three sessions stay: {left:?}");
    assert!(left.contains(&root_session));
}

#[test]
fn a_followed_process_that_execs_a_setuid_program_is_let_go() {
    let scoped = Scoped::start();
    scoped.open_to_users();
    let dir = shared_dir();
    let binary = compile(dir.path(), "gcc", "access.c", SOURCE, &["-g", "-O0"]);
    // The same program, setuid root: what the user's process execs into.
    let setuid = dir.path().join("access-setuid");
    std::fs::copy(&binary, &setuid).unwrap();
    std::os::unix::fs::chown(&setuid, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&setuid, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let alice = TestUser::create("exec");
    let mut mine = Target::spawn("alice's", &mut alice.command(&binary));
    mine.expect_line("ready", TIMEOUT);

    scoped.scope_as_ok(
        &alice,
        &[
            "attach",
            "--pid",
            &mine.pid().to_string(),
            "--func",
            "work",
            "--func",
            "libc.so.6!malloc",
        ],
    );
    mine.send(&format!("exec {}", setuid.display()));
    let child: u32 = mine.expect_line("child ", TIMEOUT)["child ".len()..]
        .parse()
        .unwrap();
    let _child = KillOnDrop(child);
    // The session follows the fork (the child is still hers)...
    wait_for(
        "the session to follow the fork",
        || scoped.scope_json(&["sessions", "--json"]),
        |sessions| {
            sessions["sessions"][0]["pids"]
                .as_array()
                .unwrap()
                .contains(&child.into())
        },
    );
    // ...and lets go when it execs into a program she could not ptrace.
    // SAFETY: signalling the test's own grandchild.
    unsafe { libc::kill(child as i32, libc::SIGUSR1) };
    let line = mine.expect_line("privileged ", TIMEOUT);
    assert!(
        line.ends_with("euid 0"),
        "the setuid copy must run as root (is the temp dir on a nosuid file system?): {line}"
    );
    mine.expect_line("reaped 0", TIMEOUT);

    let child_calls = scoped.settled_calls(&["--pid", &child.to_string()], 1, TIMEOUT);
    let functions: Vec<&str> = child_calls
        .iter()
        .map(|c| c["function"].as_str().unwrap())
        .collect();
    assert_eq!(
        functions,
        ["work"],
        "only the call before the exec is recorded, none of the setuid program's"
    );
    let sessions = scoped.scope_json(&["sessions", "--json"]);
    assert!(
        !sessions["sessions"][0]["pids"]
            .as_array()
            .unwrap()
            .contains(&child.into()),
        "{sessions}"
    );
    assert!(
        scoped.log().contains("not following a process after exec"),
        "{}",
        scoped.log()
    );
}

/// The fixture's forked child, killed if the test ends before it does.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling the test's own grandchild (reaped by its parent, our child).
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

#[test]
fn the_socket_is_open_to_root_and_the_scope_group_only() {
    let scoped = Scoped::start();
    scoped.open_to_users();
    let meta = std::fs::metadata(&scoped.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.uid(), 0);
    let group = Command::new("getent")
        .args(["group", "scope"])
        .output()
        .unwrap();
    let gid: u32 = String::from_utf8_lossy(&group.stdout)
        .split(':')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(meta.gid(), gid, "the socket belongs to the group scope");
    let store = scoped.socket.with_file_name("scope.db");
    assert_eq!(
        std::fs::metadata(&store).unwrap().mode() & 0o777,
        0o600,
        "the store holds every user's spans: root's alone"
    );

    let member = TestUser::create("member");
    let status: Value =
        serde_json::from_str(&scoped.scope_as_ok(&member, &["status", "--json"])).unwrap();
    assert!(status["version"].is_string());
    let outsider = TestUser::create_outside_group("outsider");
    let out = scoped.scope_as(&outsider, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("`scope` group"), "{err}");
}

/// Runs scoped with `args` and expects it to refuse to start; returns its stderr.
fn refused(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut scoped = Proc::spawn(
        "scoped",
        Command::new(bin("scoped"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg("--db")
            .arg(dir.path().join("s.db"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let status = scoped
        .wait_exit(TIMEOUT)
        .unwrap_or_else(|| panic!("scoped {args:?} started; it must refuse"));
    assert!(!status.success(), "scoped {args:?} exited successfully");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut scoped.child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !Path::new(&dir.path().join("s.sock")).exists(),
        "scoped {args:?} served before refusing"
    );
    err
}

#[test]
fn listen_refuses_to_start_without_tls_and_client_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let address = format!("127.0.0.1:{}", free_port());
    let (cert, key, token) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("token"),
    );
    let err = refused(&["--listen", &address]);
    assert!(
        err.contains("needs TLS: give --tls-cert FILE and --tls-key FILE"),
        "{err}"
    );
    let err = refused(&["--listen", &address, "--tls-cert", &cert, "--tls-key", &key]);
    assert!(err.contains("needs client authentication"), "{err}");
    assert!(
        err.contains("--client-ca") && err.contains("--token-file"),
        "{err}"
    );
    let err = refused(&[
        "--listen",
        &address,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--token-file",
        &token,
    ]);
    assert!(err.contains("needs --listen-uid UID"), "{err}");
    let err = refused(&["--tls-cert", &cert]);
    assert!(
        err.contains("--listen"),
        "TLS options without --listen: {err}"
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a token,
/// made with openssl.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn make(dir: &Path) -> Pki {
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .output()
                .unwrap_or_else(|e| {
                    panic!("running openssl failed ({e}); `cargo xtask setup` installs it")
                });
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                stderr_of(&out)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"],
                &key[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=scope test CA",
                ],
            ]
            .concat(),
        );
        std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, subject) in [
            ("server", "/CN=127.0.0.1"),
            ("client", "/CN=scope test client"),
        ] {
            let (csr, pem, keyfile, ext) = (
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("{name}.key"),
                format!("{name}.ext"),
            );
            openssl(
                &[
                    &["req"],
                    &key[..],
                    &["-keyout", &keyfile, "-out", &csr, "-subj", subject],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ]);
        }
        std::fs::write(dir.join("token"), "0123456789abcdef-scope-test-token\n").unwrap();
        std::fs::set_permissions(dir.join("token"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::write(dir.join("wrong-token"), "not-the-token\n").unwrap();
        Pki {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

#[test]
fn tls_clients_need_the_certificate_and_the_token_and_act_as_the_listen_uid() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::make(dir.path());
    let alice = TestUser::create("tcp");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let scoped = Scoped::start_with(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
        "--client-ca",
        &pki.path("ca.pem"),
        "--token-file",
        &pki.path("token"),
        "--listen-uid",
        &alice.uid.to_string(),
    ]);
    let tcp = |extra: &[&str], args: &[&str]| {
        Command::new(bin("scope"))
            .args(["--socket", &url, "--ca", &pki.path("ca.pem")])
            .args(extra)
            .args(args)
            .output()
            .unwrap()
    };
    let (cert, key, token) = (
        pki.path("client.pem"),
        pki.path("client.key"),
        pki.path("token"),
    );
    let full = [
        "--cert",
        cert.as_str(),
        "--key",
        key.as_str(),
        "--token-file",
        token.as_str(),
    ];

    // With the certificate and the token: in.
    let out = tcp(&full, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr_of(&out),
        scoped.log()
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["version"].is_string());

    // Without either, or with the wrong token: out.
    let wrong = pki.path("wrong-token");
    for (what, extra) in [
        ("no token", vec!["--cert", &cert, "--key", &key]),
        (
            "a wrong token",
            vec!["--cert", &cert, "--key", &key, "--token-file", &wrong],
        ),
        ("no client certificate", vec!["--token-file", &token]),
        ("nothing", vec![]),
    ] {
        let out = tcp(&extra, &["status"]);
        assert!(!out.status.success(), "{what}: let in");
        let err = stderr_of(&out);
        assert!(!err.contains("panicked"), "{what}: {err}");
        if what.contains("token") {
            assert!(err.contains("did not accept this client"), "{what}: {err}");
        }
    }
    let out = Command::new(bin("scope"))
        .args(["--socket", &url, "status"])
        .output()
        .unwrap();
    assert!(
        stderr_of(&out).contains("give --ca FILE"),
        "{}",
        stderr_of(&out)
    );
    let out = Command::new(bin("scope"))
        .args(["--socket", &format!("http://127.0.0.1:{port}"), "status"])
        .output()
        .unwrap();
    assert!(
        stderr_of(&out).contains("use https://"),
        "{}",
        stderr_of(&out)
    );

    // TCP clients act as --listen-uid: root's process is not theirs, root's session not shown.
    let dir = shared_dir();
    let binary = compile(dir.path(), "gcc", "access.c", SOURCE, &["-g", "-O0"]);
    let roots = Target::spawn("root's", &mut Command::new(&binary));
    roots.expect_line("ready", TIMEOUT);
    scoped.attach(roots.pid(), &["work"]);
    let out = tcp(
        &full,
        &[
            "attach",
            "--pid",
            &roots.pid().to_string(),
            "--func",
            "work",
        ],
    );
    assert_denied(&out, roots.pid());
    let out = tcp(&full, &["sessions", "--json"]);
    let sessions: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sessions["sessions"], serde_json::json!([]), "{sessions}");
}
