//! Privileged end-to-end tests (root, BPF) of causality through bytes: a client and a server
//! built here talk over TCP, a unix socket and pipes; each request's server handler hangs
//! under the client's request call (same trace, linked by the bytes it read), the reply links
//! back, and nothing lands in the wrong trace. Then Debian's redis-cli against redis-server.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::HashMap,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use scope_proto::v1 as pb;
use scope_tests::{IPC_SOURCE as IPC, Redis, Scoped, Target, compile, free_port};
use serde_json::Value;
use tokio_stream::StreamExt;

const TIMEOUT: Duration = Duration::from_secs(30);
const REQUESTS: u64 = 100;

fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {value}"))
}

/// Checks the client's request spans and the server's handler spans: one trace per request,
/// each handler under its request, linked by the bytes.
fn check_requests(requests: &[Value], handlers: &[Value]) {
    assert_eq!(
        (requests.len(), handlers.len()),
        (REQUESTS as usize, REQUESTS as usize)
    );
    let by_number: HashMap<u64, &Value> = requests
        .iter()
        .map(|r| (u64_of(&r["args"][2]), r))
        .collect();
    let mut traces: Vec<&str> = Vec::new();
    for handler in handlers {
        let number = u64_of(&handler["args"][1]);
        let request = by_number[&number];
        assert_eq!(
            handler["parent_id"], request["span_id"],
            "handler {number} hangs under request {number}"
        );
        assert_eq!(handler["link_kind"], "io", "{handler}");
        assert_eq!(
            handler["trace_id"], request["trace_id"],
            "request {number} and its handler share a trace"
        );
        assert_ne!(handler["pid"], request["pid"], "across processes");
        assert_eq!(u64_of(&handler["ret"]), 2 * number);
        assert_eq!(u64_of(&request["ret"]), 2 * number);
        traces.push(request["trace_id"].as_str().unwrap());
    }
    traces.sort_unstable();
    traces.dedup();
    assert_eq!(
        traces.len(),
        REQUESTS as usize,
        "{REQUESTS} requests give {REQUESTS} traces"
    );
}

/// Every span of each trace, and the reply links, straight from GetTrace.
async fn check_traces_and_replies(scoped: &Scoped, requests: &[Value], handlers: &[Value]) {
    let mut client = scoped.client().await;
    let handler_of: HashMap<&str, u64> = handlers
        .iter()
        .map(|h| (h["trace_id"].as_str().unwrap(), u64_of(&h["span_id"])))
        .collect();
    for request in requests {
        let trace = request["trace_id"].as_str().unwrap();
        let mut stream = client
            .get_trace(pb::GetTraceRequest {
                trace_id: trace.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut spans = Vec::new();
        while let Some(batch) = stream.next().await {
            spans.extend(batch.unwrap().spans);
        }
        let names: Vec<&str> = spans.iter().map(|s| s.function.as_str()).collect();
        assert_eq!(
            names,
            ["request", "handle"],
            "exactly this request's two calls in trace {trace}"
        );
        let request_span = spans.iter().find(|s| s.function == "request").unwrap();
        let replies: Vec<u64> = request_span
            .links
            .iter()
            .filter(|l| l.kind == "io")
            .map(|l| l.span_id)
            .collect();
        assert_eq!(
            replies,
            [handler_of[trace]],
            "the reply links the handler back to the request"
        );
    }
    // As the CLI shows it.
    let trace = requests[0]["trace_id"].as_str().unwrap();
    let shown = scoped.scope_ok(&["show", trace]);
    assert!(shown.contains("↩ reply from handle ["), "{shown}");
    let json = scoped.scope_ok(&["show", trace, "--json"]);
    let request_line = json
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|s| s["function"] == "request")
        .unwrap();
    assert_eq!(
        request_line["links"][0]["span_id"], handler_of[trace],
        "{request_line}"
    );
}

/// Two network namespaces joined by a veth pair: two "hosts" on one machine.
struct Hosts {
    a: String,
    b: String,
    a_addr: String,
}

impl Hosts {
    fn create() -> Hosts {
        let n = std::process::id() % 100_000;
        let (a, b) = (format!("scopea{n}"), format!("scopeb{n}"));
        let subnet = 10 + n % 200;
        let run = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("ip (iproute2) is installed by `cargo xtask setup`");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let (veth_a, veth_b) = (format!("va{n}"), format!("vb{n}"));
        run(&["netns", "add", &a]);
        run(&["netns", "add", &b]);
        run(&[
            "link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b,
        ]);
        run(&["link", "set", &veth_a, "netns", &a]);
        run(&["link", "set", &veth_b, "netns", &b]);
        let a_addr = format!("10.77.{subnet}.1");
        let b_addr = format!("10.77.{subnet}.2");
        for (ns, dev, addr) in [(&a, &veth_a, &a_addr), (&b, &veth_b, &b_addr)] {
            run(&[
                "netns",
                "exec",
                ns,
                "ip",
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            run(&["netns", "exec", ns, "ip", "link", "set", dev, "up"]);
            run(&["netns", "exec", ns, "ip", "link", "set", "lo", "up"]);
        }
        Hosts { a, b, a_addr }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

#[test]
fn two_hosts_stitch_into_one_trace() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "ipc.c", IPC, &["-g", "-O0"]);
    let hosts = Hosts::create();
    // One daemon per host, each tracing its own side.
    let server_host = Scoped::start_wrapped(&["ip", "netns", "exec", &hosts.a], &[]);
    let client_host = Scoped::start_wrapped(&["ip", "netns", "exec", &hosts.b], &[]);
    let server = Target::spawn(
        "server on host a",
        Command::new("ip")
            .args(["netns", "exec", &hosts.a])
            .arg(&binary)
            .args(["server", "tcp", "5000"]),
    );
    server.expect_line("ready", TIMEOUT);
    let mut client = Target::spawn(
        "client on host b",
        Command::new("ip")
            .args(["netns", "exec", &hosts.b])
            .arg(&binary)
            .args(["client", "tcp", &format!("{}:5000", hosts.a_addr)]),
    );
    client.expect_line("ready", TIMEOUT);
    server_host.attach(server.pid(), &["handle"]);
    client_host.attach(client.pid(), &["request"]);
    client.send("go 10");
    assert_eq!(client.expect_line("done", TIMEOUT), "done 110");

    let requests = client_host.settled_calls(&["--pid", &client.pid().to_string()], 10, TIMEOUT);
    let handlers = server_host.settled_calls(&["--pid", &server.pid().to_string()], 10, TIMEOUT);
    assert_eq!((requests.len(), handlers.len()), (10, 10));
    // Each daemon alone sees only its half: no handler is linked on the server's host.
    assert!(
        handlers.iter().all(|h| u64_of(&h["parent_id"]) == 0),
        "{handlers:?}"
    );
    // Stitched from the client's host, with the server's daemon asked for its half.
    for request in &requests {
        let trace = request["trace_id"].as_str().unwrap();
        let out = client_host.scope_ok(&[
            "show",
            trace,
            "--addr",
            server_host.socket.to_str().unwrap(),
            "--json",
        ]);
        let spans: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(spans.len(), 2, "both halves: {spans:?}");
        let handler = spans.iter().find(|s| s["function"] == "handle").unwrap();
        assert_eq!(
            handler["parent_id"], request["span_id"],
            "the server's handler is the client request's child"
        );
        assert_eq!(handler["link_kind"], "io");
        assert_eq!(handler["pid"], server.pid());
        assert_eq!(
            u64_of(&handler["args"][1]),
            u64_of(&request["args"][2]),
            "the handler of this very request"
        );
        // Trace ids name their host: the halves were recorded by different daemons.
        assert_ne!(handler["trace_id"].as_str().unwrap()[..16], trace[..16]);
    }
    let shown = client_host.scope_ok(&[
        "show",
        requests[0]["trace_id"].as_str().unwrap(),
        "--addr",
        server_host.socket.to_str().unwrap(),
    ]);
    assert!(shown.contains("2 spans in 2 processes"), "{shown}");
    assert!(shown.contains("└─ (io) ["), "{shown}");
}

/// The fixture's server (`tcp PORT` or `unix PATH`), ready to accept.
fn server(binary: &std::path::Path, kind: &str, place: &str) -> Target {
    let server = Target::spawn(
        "ipc server",
        Command::new(binary).args(["server", kind, place]),
    );
    server.expect_line("ready", TIMEOUT);
    server
}

/// The fixture's client: each `go N` line connects and makes N requests.
fn client(binary: &std::path::Path, kind: &str, place: &str) -> Target {
    let client = Target::spawn(
        "ipc client",
        Command::new(binary).args(["client", kind, place]),
    );
    client.expect_line("ready", TIMEOUT);
    client
}

fn client_server(
    scoped: &Scoped,
    dir: &std::path::Path,
    kind: &str,
    place: &str,
) -> (Vec<Value>, Vec<Value>) {
    let binary = compile(dir, "gcc", "ipc.c", IPC, &["-g", "-O0"]);
    let server = server(&binary, kind, place);
    let mut client = client(&binary, kind, place);
    scoped.attach(server.pid(), &["handle"]);
    scoped.attach(client.pid(), &["request"]);
    client.send(&format!("go {REQUESTS}"));
    assert_eq!(
        client.expect_line("done", TIMEOUT),
        format!("done {}", REQUESTS * (REQUESTS + 1))
    );
    let requests = scoped.settled_calls(
        &["--pid", &client.pid().to_string()],
        REQUESTS as usize,
        TIMEOUT,
    );
    let handlers = scoped.settled_calls(
        &["--pid", &server.pid().to_string()],
        REQUESTS as usize,
        TIMEOUT,
    );
    (requests, handlers)
}

#[tokio::test]
async fn tcp_requests_link_client_to_server_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let port = free_port().to_string();
    let (requests, handlers) = client_server(&scoped, dir.path(), "tcp", &port);
    check_requests(&requests, &handlers);
    check_traces_and_replies(&scoped, &requests, &handlers).await;
}

#[test]
fn without_io_capture_requests_are_traced_but_not_linked() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start_with(&["--no-io-capture"]);
    assert_eq!(scoped.status()["io_capture"], false);
    let port = free_port().to_string();
    let (requests, handlers) = client_server(&scoped, dir.path(), "tcp", &port);
    assert_eq!(
        (requests.len(), handlers.len()),
        (REQUESTS as usize, REQUESTS as usize)
    );
    // No byte links. (On loopback the client's write still wakes the server's thread from
    // inside the request, so a handler may hang under it by that wakeup.)
    let request_ids: Vec<u64> = requests.iter().map(|r| u64_of(&r["span_id"])).collect();
    for handler in &handlers {
        assert_ne!(handler["link_kind"], "io", "{handler}");
        let parent = u64_of(&handler["parent_id"]);
        assert!(
            parent == 0 || (handler["link_kind"] == "wakeup" && request_ids.contains(&parent)),
            "{handler}"
        );
    }
    // The syscall tracepoints' programs were never loaded (a daemon with capture has them).
    let names = scoped.program_names();
    assert!(names.iter().any(|n| n == "scope_entry"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("scope_io_")),
        "{names:?}"
    );
    let capturing = Scoped::start();
    let names = capturing.program_names();
    assert!(
        names.iter().any(|n| n == "scope_io_enter_write"),
        "{names:?}"
    );
}

#[test]
fn io_tracepoints_are_attached_only_while_a_process_is_traced() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "ipc.c", IPC, &["-g", "-O0"]);
    let server = server(&binary, "tcp", &free_port().to_string());
    let scoped = Scoped::start();
    let io_links = || {
        scoped
            .linked_program_names()
            .iter()
            .filter(|name| name.starts_with("scope_io_"))
            .count()
    };
    // An idle daemon costs other processes' reads and writes nothing.
    assert_eq!(io_links(), 0, "{:?}", scoped.linked_program_names());
    let session = scoped.attach(server.pid(), &["handle"]);
    // 3 writes, 3 reads entering, 6 exits.
    assert_eq!(io_links(), 12, "{:?}", scoped.linked_program_names());
    scoped.scope_ok(&["detach", &session["session_id"].to_string()]);
    // They linger a few seconds (a detach and a new attach should not pay for releasing
    // and attaching them again), then go.
    let deadline = Instant::now() + Duration::from_secs(20);
    while io_links() != 0 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            scoped.linked_program_names()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_busy_request_loop_loses_nothing() {
    // 20,000 requests as fast as loopback TCP goes: 40,000 spans and 80,000 reads/writes
    // arrive in many small batches; every one is stored and every handler linked.
    const BUSY: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let binary = compile(dir.path(), "gcc", "ipc.c", IPC, &["-g", "-O2"]);
    let port = free_port().to_string();
    let server = server(&binary, "tcp", &port);
    let mut client = client(&binary, "tcp", &port);
    scoped.attach(server.pid(), &["handle"]);
    scoped.attach(client.pid(), &["request"]);
    client.send(&format!("go {BUSY}"));
    assert_eq!(
        client.expect_line("done", Duration::from_secs(120)),
        format!("done {}", BUSY * (BUSY + 1))
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = scoped.status();
        if status["stored_spans"].as_u64().unwrap() >= 2 * BUSY
            || std::time::Instant::now() > deadline
        {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["stored_spans"], 2 * BUSY, "{status}");
    assert_eq!(status["spans_dropped"], 0, "{status}");
    assert_eq!(status["counters"]["daemon.io_dropped"], 0, "{status}");
    // Four per request, and the client's lines to its stdout pipe (unbuffered: a line may
    // take more than one write).
    let io = u64_of(&status["counters"]["daemon.io_received"]);
    assert!((4 * BUSY..4 * BUSY + 10).contains(&io), "{status}");
    let handlers = scoped.calls(&["--pid", &server.pid().to_string()]);
    let unlinked: Vec<&Value> = handlers.iter().filter(|h| h["link_kind"] != "io").collect();
    assert!(
        unlinked.is_empty(),
        "every handler hangs under its request; {} do not: {:?}",
        unlinked.len(),
        &unlinked[..unlinked.len().min(5)]
    );
}

#[tokio::test]
async fn unix_socket_requests_link_client_to_server_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let socket = dir.path().join("ipc.sock");
    let (requests, handlers) = client_server(&scoped, dir.path(), "unix", socket.to_str().unwrap());
    check_requests(&requests, &handlers);
    check_traces_and_replies(&scoped, &requests, &handlers).await;
}

#[tokio::test]
async fn pipe_requests_link_client_to_server_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "ipc.c", IPC, &["-g", "-O0"]);
    let scoped = Scoped::start();
    let mut parent = Target::spawn("ipc pipes", Command::new(&binary).arg("pipes"));
    parent.expect_line("ready", TIMEOUT);
    // The parent is the client; the server child it forks is followed by the session.
    scoped.attach(parent.pid(), &["request", "handle"]);
    parent.send("start");
    let child: u32 = parent.expect_line("started", TIMEOUT)[8..].parse().unwrap();
    std::thread::sleep(Duration::from_millis(500)); // the daemon attaches to the child
    parent.send(&format!("go {REQUESTS}"));
    assert_eq!(
        parent.expect_line("done", TIMEOUT),
        format!("done {}", REQUESTS * (REQUESTS + 1))
    );
    let requests = scoped.settled_calls(
        &["--pid", &parent.pid().to_string()],
        REQUESTS as usize,
        TIMEOUT,
    );
    let handlers = scoped.settled_calls(&["--pid", &child.to_string()], REQUESTS as usize, TIMEOUT);
    check_requests(&requests, &handlers);
    check_traces_and_replies(&scoped, &requests, &handlers).await;
}

#[test]
fn redis_commands_join_the_trace_of_the_client_write_that_sent_them() {
    let scoped = Scoped::start();
    let redis = Redis::start();
    scoped.attach(redis.pid(), &["processCommand"]);
    // redis-cli, with the client side probed at libc send/write (it sends commands with
    // send): each command is a send span, and the server's processCommand for it joins
    // that send's trace.
    let mut cli = Target::spawn(
        "redis-cli",
        Command::new("redis-cli")
            .args(["-p", &redis.port.to_string()])
            .env("TERM", "dumb"),
    );
    std::thread::sleep(Duration::from_millis(300));
    scoped.attach(cli.pid(), &["libc.so.6!send", "libc.so.6!write"]);
    for i in 0..20 {
        cli.send(&format!("SET key{i} value{i}"));
    }
    cli.send("PING");
    cli.expect_line("PONG", TIMEOUT);
    let commands = scoped.settled_calls(
        &[
            "--pid",
            &redis.pid().to_string(),
            "--func",
            "processCommand",
        ],
        21,
        TIMEOUT,
    );
    let writes = scoped.settled_calls(
        &["--pid", &cli.pid().to_string(), "--func", "send"],
        21,
        TIMEOUT,
    );
    let writes_by_id: HashMap<u64, &Value> =
        writes.iter().map(|w| (u64_of(&w["span_id"]), w)).collect();
    assert!(commands.len() >= 21, "{} commands", commands.len());
    let linked: Vec<&Value> = commands.iter().filter(|c| c["link_kind"] == "io").collect();
    assert_eq!(
        linked.len(),
        21,
        "every command the client sent is linked to its write: {commands:?}"
    );
    for command in linked {
        let write = writes_by_id
            .get(&u64_of(&command["parent_id"]))
            .unwrap_or_else(|| panic!("the parent of {command} is a client write"));
        assert_eq!(command["trace_id"], write["trace_id"]);
        assert_eq!(write["pid"], cli.pid());
    }
}
