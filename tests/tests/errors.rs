//! Privileged end-to-end tests (root, BPF): bad input gets a clear error, over gRPC and from
//! the CLI, and the daemon keeps serving.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use scope_proto::v1 as pb;
use scope_tests::{Redis, Scoped, Target};
use tonic::Code;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_reports_bad_input_clearly() {
    let scoped = Scoped::start();
    let redis = Redis::start();
    let pid = redis.pid().to_string();

    // A pid that does not exist.
    let out = scoped.scope(&["attach", "--pid", "999999", "--func", "main"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("pid 999999 does not exist"),
        "{}",
        stderr_of(&out)
    );
    assert!(!stderr_of(&out).contains("panicked"));

    // A glob that matches nothing, with a suggestion.
    let out = scoped.scope(&["attach", "--pid", &pid, "--func", "procesCommand"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("no function matches 'procesCommand'"), "{err}");
    assert!(err.contains("did you mean processCommand?"), "{err}");

    // A non-ELF target.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let out = scoped.scope(&[
        "attach",
        "--pid",
        &pid,
        "--binary",
        script.to_str().unwrap(),
        "--func",
        "main",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("is not an ELF file"), "{err}");

    // A bad glob, an unknown session.
    let out = scoped.scope(&["attach", "--pid", &pid, "--func", "proc[ess"]);
    assert!(
        stderr_of(&out).contains("unclosed '['"),
        "{}",
        stderr_of(&out)
    );
    let out = scoped.scope(&["detach", "424242"]);
    assert!(
        stderr_of(&out).contains("no session 424242"),
        "{}",
        stderr_of(&out)
    );

    // Nothing was attached by any of that, and the daemon still works.
    let sessions = scoped.scope_json(&["sessions", "--json"]);
    assert_eq!(
        sessions["sessions"].as_array().unwrap().len(),
        0,
        "{sessions}"
    );
    scoped.attach(redis.pid(), &["processCommand"]);
}

#[tokio::test]
async fn grpc_errors_carry_the_right_codes() {
    let scoped = Scoped::start();
    let mut client = scoped.client().await;
    let target = Target::spawn("sleep", Command::new("sleep").arg("30"));

    let attach = |pid: u32, functions: &[&str], binary: &str| pb::AttachRequest {
        pid,
        functions: functions.iter().map(|f| (*f).to_owned()).collect(),
        binary: binary.to_owned(),
        ..Default::default()
    };
    let status = client
        .attach(attach(999_999, &["main"], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client.attach(attach(0, &["main"], "")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .attach(attach(target.pid(), &[], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .attach(attach(target.pid(), &["no_such_function_anywhere"], ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .attach(attach(target.pid(), &["main"], "/etc/hostname"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("not an ELF file"), "{status:?}");
    let many: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
    let status = client
        .attach(pb::AttachRequest {
            pid: target.pid(),
            functions: many,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for budget_percent in [-1.0, f64::NAN, f64::INFINITY] {
        let status = client
            .attach(pb::AttachRequest {
                budget_percent,
                ..attach(target.pid(), &["main"], "")
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("budget_percent"), "{status:?}");
    }
    let status = client
        .detach(pb::DetachRequest { target: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .detach(pb::DetachRequest {
            target: Some(pb::detach_request::Target::SessionId(77)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = client
        .query_spans(pb::QuerySpansRequest {
            filter: Some(pb::SpanFilter {
                function: "[".into(),
                ..Default::default()
            }),
            limit: 0,
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .query_spans(pb::QuerySpansRequest {
            filter: Some(pb::SpanFilter {
                trace_id: "not-a-trace".into(),
                ..Default::default()
            }),
            limit: 0,
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = client
        .stats(pb::StatsRequest {
            filter: Some(pb::SpanFilter {
                min_duration_ns: 5,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // --auto chooses the functions: naming some too is a mistake, said so.
    let status = client
        .attach(pb::AttachRequest {
            auto: true,
            ..attach(target.pid(), &["main"], "")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("--auto"), "{status:?}");
    // A plan's sampling window is bounded.
    let status = client
        .analyze(pb::AnalyzeRequest {
            pid: target.pid(),
            window_ms: 3_600_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("sampling window"), "{status:?}");
    // Still serving.
    client.status(pb::StatusRequest {}).await.unwrap();
}
