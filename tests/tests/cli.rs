//! Privileged end-to-end tests (root, BPF) of the user-facing surfaces: `scope trace` live
//! trees, and the standard gRPC health and reflection services generic clients rely on.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use scope_tests::{Proc, Scoped, Target, bin, compile};
use tokio_stream::StreamExt;

const TIMEOUT: Duration = Duration::from_secs(20);

const SOURCE: &str = r#"#include <stdio.h>
#include <string.h>

__attribute__((noinline)) long leaf(long n) {
    return n + 1;
}

__attribute__((noinline)) long branch(long n) {
    return leaf(n) + leaf(n + 1);
}

int main(void) {
    char line[64];
    printf("ready\n"); fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long total = 0;
        for (long i = 0; i < 5; i++) total += branch(i);
        printf("done %ld\n", total); fflush(stdout);
    }
    return 0;
}
"#;

fn wait_for_session(scoped: &Scoped) {
    let deadline = Instant::now() + TIMEOUT;
    while scoped.scope_json(&["sessions", "--json"])["sessions"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "scope trace did not attach");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn trace_prints_live_trees_and_detaches_on_exit_and_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "tree.c", SOURCE, &["-g", "-O0"]);
    let scoped = Scoped::start();
    let mut target = Target::spawn("tree", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();

    // --duration: runs, prints, detaches by itself.
    let trace = Command::new(bin("scope"))
        .arg("--socket")
        .arg(&scoped.socket)
        .args([
            "trace",
            "--pid",
            &pid,
            "--func",
            "branch",
            "--func",
            "leaf",
            "--duration",
            "3s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_session(&scoped);
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 35");
    let out = trace.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let roots: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with(&format!("[pid {pid} tid {pid}] branch(")))
        .collect();
    assert_eq!(roots.len(), 5, "five branch trees:\n{text}");
    let children = lines
        .iter()
        .filter(|l| {
            l.trim_start().starts_with("├─ leaf(") || l.trim_start().starts_with("└─ leaf(")
        })
        .count();
    assert_eq!(children, 10, "two leaf calls under each branch:\n{text}");
    assert!(text.contains("tree.c:"), "file:line shown:\n{text}");
    assert!(text.contains("15 spans received"), "summary line:\n{text}");
    assert!(
        scoped.scope_json(&["sessions", "--json"])["sessions"]
            .as_array()
            .unwrap()
            .is_empty(),
        "detached at the end"
    );

    // Ctrl-C: detaches too.
    let mut trace = Proc::spawn(
        "scope trace",
        Command::new(bin("scope"))
            .arg("--socket")
            .arg(&scoped.socket)
            .args(["trace", "--pid", &pid, "--func", "leaf"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_session(&scoped);
    trace.signal(libc::SIGINT);
    assert!(
        trace.wait_exit(TIMEOUT).is_some(),
        "scope trace exits on Ctrl-C"
    );
    assert!(
        scoped.scope_json(&["sessions", "--json"])["sessions"]
            .as_array()
            .unwrap()
            .is_empty(),
        "detached on Ctrl-C"
    );
    target.send("go");
    assert_eq!(target.expect_line("done", TIMEOUT), "done 35");
}

#[tokio::test]
async fn health_and_reflection_serve_generic_clients() {
    let scoped = Scoped::start();
    let channel = scoped.channel().await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "scope.v1.Scope".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"scope.v1.Scope".to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}
