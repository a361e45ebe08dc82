//! Runs the built `scope` binary against a fake `scoped`: a tonic server on a unix socket in a
//! temporary directory that returns canned answers and records every request. Needs no root,
//! no BPF and no real daemon.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use scope_proto::v1::scope_server::{Scope, ScopeServer};
use scope_proto::v1::{
    AnalyzeRequest, AnalyzeResponse, AttachRequest, AttachResponse, DetachRequest, DetachResponse,
    EntryPoint, ExportChunk, ExportRequest, FindIoPeersRequest, FindIoPeersResponse, FlameRequest,
    FlameResponse, Frame, FunctionStats, GetTraceRequest, ListProcessesRequest,
    ListProcessesResponse, ListSessionsRequest, ListSessionsResponse, ListTracesRequest,
    ListTracesResponse, Probe, Process, QuerySpansRequest, Session, Span, SpanBatch, SpanFilter,
    StatsRequest, StatsResponse, StatusRequest, StatusResponse, Throttle, TraceIoResponse,
    TraceSummary, WatchRequest, detach_request::Target, export_request, flame_request,
};
use serde_json::Value;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};

const SCOPE: &str = env!("CARGO_BIN_EXE_scope");
const SESSION: u64 = 7;
const PID: u32 = 1234;

/// Requests the fake received, for assertions.
#[derive(Default, Debug)]
struct Seen {
    attach: Vec<AttachRequest>,
    detach: Vec<DetachRequest>,
    watch: Vec<WatchRequest>,
    query: Vec<QuerySpansRequest>,
    stats: Vec<StatsRequest>,
    flame: Vec<FlameRequest>,
    export: Vec<ExportRequest>,
}

impl Seen {
    /// The filter of the only QuerySpans call.
    fn query_filter(&self) -> SpanFilter {
        assert_eq!(self.query.len(), 1, "one QuerySpans call");
        self.query[0]
            .filter
            .clone()
            .expect("QuerySpans has a filter")
    }
}

/// A pid the fake says has nothing recorded.
const EMPTY_PID: u32 = 4242;

/// What the fake answers.
#[derive(Clone)]
struct Script {
    /// Batches Watch sends, each after the given pause.
    watch: Vec<(Duration, SpanBatch)>,
    /// End the Watch stream after the batches (otherwise it stays open, like a live daemon).
    end_watch: bool,
    /// End the Watch stream with this error after the batches.
    watch_error: Option<Status>,
    /// Refuse a Watch that names no session (as an older daemon might).
    session_watch_only: bool,
    target_alive: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            watch: Vec::new(),
            end_watch: false,
            watch_error: None,
            session_watch_only: false,
            target_alive: true,
        }
    }
}

struct Fake {
    seen: Arc<Mutex<Seen>>,
    script: Script,
}

fn probe(id: u32, function: &str, file: &str, line: u32, inlined_into: &str) -> Probe {
    Probe {
        probe_id: id,
        function: function.into(),
        symbol: function.into(),
        module: "/usr/bin/redis-server".into(),
        address: 0x4000 + u64::from(id) * 0x100,
        file_offset: 0x3000 + u64::from(id) * 0x100,
        file: file.into(),
        line,
        inlined_into: inlined_into.into(),
        calls: 3,
        spans_dropped: 0,
        ..Default::default()
    }
}

fn session(alive: bool) -> Session {
    Session {
        id: SESSION,
        pid: PID,
        exe: "/usr/bin/redis-server".into(),
        comm: "redis-server".into(),
        patterns: vec!["processCommand".into(), "lookupKey*".into()],
        probes: vec![
            probe(1, "processCommand", "src/server.c", 3987, ""),
            probe(2, "lookupKey", "src/db.c", 100, "lookupKeyRead"),
        ],
        created_unix_ns: 1_700_000_000_000_000_000,
        target_alive: alive,
        spans_received: 12,
        spans_dropped: 5,
        follow: true,
        pids: vec![PID],
        ..Default::default()
    }
}

fn span(id: u64, parent: u64, tid: u32, depth: u32, function: &str, start: u64, dur: u64) -> Span {
    Span {
        span_id: id,
        parent_id: parent,
        session_id: SESSION,
        probe_id: 1,
        pid: PID,
        tid,
        function: function.into(),
        module: "/usr/bin/redis-server".into(),
        file: "/src/redis/src/server.c".into(),
        line: 3987,
        start_unix_ns: 1_700_000_000_000_000_000 + start,
        duration_ns: dur,
        depth,
        args: vec![0x55d0_c1e0_a2c0, 0, 0, 0, 0, 0],
        ret: 0,
        caller: vec![Frame {
            function: "processInputBuffer".into(),
            file: "networking.c".into(),
            line: 2100,
            inlined: false,
        }],
        flags: vec![],
        inlined_into: String::new(),
        trace_id: format!("{:016x}{:016x}", 0xabcd_u64, 1000 + id),
        link_kind: String::new(),
        comm: String::new(),
        links: Vec::new(),
        text: String::new(),
    }
}

type SpanStream = Pin<Box<dyn Stream<Item = Result<SpanBatch, Status>> + Send>>;

fn stream_of(script: Vec<(Duration, SpanBatch)>, end: bool) -> SpanStream {
    stream_ending(script, end, None)
}

fn stream_ending(
    script: Vec<(Duration, SpanBatch)>,
    end: bool,
    error: Option<Status>,
) -> SpanStream {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        for (pause, batch) in script {
            tokio::time::sleep(pause).await;
            if tx.send(Ok(batch)).await.is_err() {
                return;
            }
        }
        if let Some(error) = error {
            let _ = tx.send(Err(error)).await;
            return;
        }
        if !end {
            // Like a live daemon: keep the stream open until the client goes away.
            tx.closed().await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl Scope for Fake {
    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        let request = request.into_inner();
        self.seen.lock().expect("lock").attach.push(request.clone());
        if request.pid == 4242 {
            return Err(Status::not_found("pid 4242 does not exist"));
        }
        if request.functions.iter().any(|f| f == "procesCommand") {
            return Err(Status::invalid_argument(
                "no function matches 'procesCommand' in /usr/bin/redis-server; did you mean \
                 processCommand?",
            ));
        }
        Ok(Response::new(AttachResponse {
            session: Some(session(true)),
        }))
    }

    async fn detach(
        &self,
        request: Request<DetachRequest>,
    ) -> Result<Response<DetachResponse>, Status> {
        let request = request.into_inner();
        self.seen.lock().expect("lock").detach.push(request);
        let ids = match request.target {
            Some(Target::SessionId(id)) if id == SESSION || id == 8 => vec![id],
            Some(Target::SessionId(id)) => {
                return Err(Status::not_found(format!("no session {id}")));
            }
            Some(Target::All(true)) => vec![SESSION, 8],
            _ => return Err(Status::invalid_argument("say which session to detach")),
        };
        Ok(Response::new(DetachResponse {
            detached_session_ids: ids,
            detach_ns: 1_234_000,
        }))
    }

    async fn list_sessions(
        &self,
        _: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsResponse>, Status> {
        Ok(Response::new(ListSessionsResponse {
            sessions: vec![session(self.script.target_alive)],
        }))
    }

    type WatchStream = SpanStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        self.seen.lock().expect("lock").watch.push(request.clone());
        if self.script.session_watch_only && request.session_id == 0 {
            return Err(Status::invalid_argument("say which session to watch"));
        }
        Ok(Response::new(stream_ending(
            self.script.watch.clone(),
            self.script.end_watch,
            self.script.watch_error.clone(),
        )))
    }

    type QuerySpansStream = SpanStream;

    async fn query_spans(
        &self,
        request: Request<QuerySpansRequest>,
    ) -> Result<Response<Self::QuerySpansStream>, Status> {
        self.seen
            .lock()
            .expect("lock")
            .query
            .push(request.into_inner());
        let mut exited = span(3, 1, 1235, 1, "addReply", 3_000, 800);
        exited.flags = vec!["thread_exited".into()];
        exited.ret = 0;
        let mut child = span(2, 1, 1235, 1, "lookupKey", 2_000, 1_500);
        child.ret = u64::MAX;
        child.args = vec![1, 2, 3, 4, 5, u64::MAX];
        let batches = vec![
            (
                Duration::ZERO,
                SpanBatch {
                    spans: vec![span(1, 0, 1235, 0, "processCommand", 1_000, 12_345), child],
                    dropped: 0,
                    warnings: Vec::new(),
                },
            ),
            (
                Duration::ZERO,
                SpanBatch {
                    spans: vec![exited],
                    dropped: 0,
                    warnings: Vec::new(),
                },
            ),
        ];
        Ok(Response::new(stream_of(batches, true)))
    }

    async fn list_traces(
        &self,
        request: Request<ListTracesRequest>,
    ) -> Result<Response<ListTracesResponse>, Status> {
        let request = request.into_inner();
        let mut root = span(1, 0, 1235, 0, "processCommand", 1_000, 12_345);
        root.comm = "redis-server".into();
        Ok(Response::new(ListTracesResponse {
            traces: vec![TraceSummary {
                trace_id: format!("{:032x}", 0xabcdu64 + u64::from(request.pid)),
                start_unix_ns: root.start_unix_ns,
                duration_ns: 12_345,
                spans: 3,
                pids: vec![PID, 5678],
                root: Some(root),
            }],
        }))
    }

    type GetTraceStream = SpanStream;

    async fn get_trace(
        &self,
        request: Request<GetTraceRequest>,
    ) -> Result<Response<Self::GetTraceStream>, Status> {
        if request.into_inner().trace_id == format!("{:032x}", 0) {
            return Ok(Response::new(stream_of(Vec::new(), true)));
        }
        let mut root = span(1, 0, 1235, 0, "request", 1_000, 12_345);
        root.comm = "client".into();
        let mut handler = span(2, 1, 1235, 0, "handle", 2_000, 5_000);
        handler.pid = 5678;
        handler.tid = 5679;
        handler.comm = "server".into();
        handler.link_kind = "io".into();
        let batch = SpanBatch {
            spans: vec![root, handler],
            dropped: 0,
            warnings: Vec::new(),
        };
        Ok(Response::new(stream_of(
            vec![(Duration::ZERO, batch)],
            true,
        )))
    }

    async fn list_processes(
        &self,
        _: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        let process = |pid: u32, parent_pid: u32, start: u64, comm: &str| Process {
            pid,
            start_unix_ns: 1_700_000_000_000_000_000 + start,
            parent_pid,
            session_id: SESSION,
            comm: comm.into(),
            exe: format!("/usr/bin/{comm}"),
            fork_span_id: 0,
            exited_unix_ns: 0,
        };
        Ok(Response::new(ListProcessesResponse {
            processes: vec![
                process(PID, 1, 0, "postgres"),
                process(5678, PID, 1_000, "postgres-backend"),
            ],
        }))
    }

    async fn get_trace_io(
        &self,
        _: Request<GetTraceRequest>,
    ) -> Result<Response<TraceIoResponse>, Status> {
        Ok(Response::new(TraceIoResponse { io: Vec::new() }))
    }

    async fn find_io_peers(
        &self,
        _: Request<FindIoPeersRequest>,
    ) -> Result<Response<FindIoPeersResponse>, Status> {
        Ok(Response::new(FindIoPeersResponse { peers: Vec::new() }))
    }

    async fn analyze(
        &self,
        request: Request<AnalyzeRequest>,
    ) -> Result<Response<AnalyzeResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(AnalyzeResponse {
            path: "/usr/bin/redis-server".into(),
            pid: request.pid,
            language: "c".into(),
            toolchain: vec!["GCC: (Debian 12.2.0-14) 12.2.0".into()],
            libraries: vec!["libc.so.6".into()],
            runtimes: vec!["glibc".into(), "redis".into()],
            functions: 5000,
            stripped: true,
            pie: true,
            entry_points: vec![EntryPoint {
                function: "processCommand".into(),
                reason: "redis: dispatches every command a client sends".into(),
            }],
            ..Default::default()
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            version: "0.1.0".into(),
            uptime_ns: 3_723_000_000_000,
            spans_received: 1000,
            spans_dropped: 17,
            counters: [
                ("kernel.ring_full".to_owned(), 17),
                ("daemon.queue_full".to_owned(), 0),
            ]
            .into_iter()
            .collect(),
            sessions: 1,
            probes: 2,
            stored_spans: 900,
            store_bytes: 3 << 20,
            store_evicted: 0,
            ring_bytes_per_cpu: 262_144,
            cpus: 4,
            store_path: "/var/lib/scope/scope.db".to_owned(),
            store_retain_bytes: 2 << 30,
            store_retain_age_ns: 0,
            io_capture: true,
            throttled: vec![Throttle {
                probe_id: 1,
                function: "processCommand".into(),
                pid: PID,
                action: "detached".into(),
                calls_per_second: 512_000.0,
                cost_percent: 750.0,
                reason: "512000 calls/s cost 750% of a CPU, over its budget of 1%".into(),
                session_id: SESSION,
                ..Default::default()
            }],
        }))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let request = request.into_inner();
        let calls = {
            let mut seen = self.seen.lock().expect("lock");
            seen.stats.push(request.clone());
            seen.stats.len() as u64
        };
        if request.filter.unwrap_or_default().pid == EMPTY_PID {
            return Ok(Response::new(StatsResponse::default()));
        }
        // Counts grow by 100 calls (1ms) and 10 calls per answer, like a live daemon's.
        let function = |name: &str, count: u64, total_ns: u64| FunctionStats {
            function: name.into(),
            module: "/usr/bin/redis-server".into(),
            count,
            total_ns,
            mean_ns: total_ns / count,
            p50_ns: 8_000,
            p95_ns: 15_000,
            p99_ns: 21_000,
            max_ns: 90_000,
            min_ns: 700,
        };
        Ok(Response::new(StatsResponse {
            functions: vec![
                function("processCommand", 100 * calls, 1_000_000 * calls),
                function("lookupKey", 10 * calls, 20_000 * calls),
            ],
            percentile_relative_error: 0.01,
        }))
    }

    async fn flame(
        &self,
        request: Request<FlameRequest>,
    ) -> Result<Response<FlameResponse>, Status> {
        let request = request.into_inner();
        self.seen.lock().expect("lock").flame.push(request.clone());
        if request.filter.unwrap_or_default().pid == EMPTY_PID {
            return Err(Status::not_found(
                "no spans to draw: none match the filter (see `scope calls` for what is stored)",
            ));
        }
        let data = if request.format == flame_request::Format::Folded as i32 {
            "redis-server (1234);processCommand 9000\nredis-server (1234);processCommand;lookupKey 3000\n".to_owned()
        } else {
            format!(
                "<svg><text>{}</text><title>processCommand (12,000 ns, 100%)</title></svg>",
                request.title
            )
        };
        Ok(Response::new(FlameResponse {
            data: data.into_bytes(),
            spans: 3,
        }))
    }

    type ExportStream = Pin<Box<dyn Stream<Item = Result<ExportChunk, Status>> + Send>>;

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let request = request.into_inner();
        self.seen.lock().expect("lock").export.push(request.clone());
        let chunk = |data: &str, spans: u64| {
            Ok(ExportChunk {
                data: data.as_bytes().to_vec(),
                spans,
            })
        };
        let chunks = match export_request::Format::try_from(request.format) {
            Ok(export_request::Format::Chrome) => vec![
                chunk(
                    "{\"traceEvents\":[{\"ph\":\"X\",\"name\":\"processCommand\"},",
                    1,
                ),
                chunk("{\"ph\":\"X\",\"name\":\"lookupKey\"}", 2),
                chunk("],\"displayTimeUnit\":\"ns\"}\n", 2),
            ],
            Ok(export_request::Format::Jsonl) => vec![
                chunk("{\"function\":\"processCommand\"}\n{\"function\":", 1),
                chunk("\"lookupKey\"}\n", 2),
            ],
            Ok(export_request::Format::Otlp) if request.otlp_endpoint.contains("dead") => {
                vec![Err(Status::unavailable(format!(
                    "cannot reach the OpenTelemetry collector at {}",
                    request.otlp_endpoint
                )))]
            }
            Ok(export_request::Format::Otlp) => vec![chunk("", 2000), chunk("", 4500)],
            Err(_) => vec![Err(Status::invalid_argument("unknown format"))],
        };
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// A running fake daemon; dropping it stops the server.
struct Daemon {
    socket: PathBuf,
    seen: Arc<Mutex<Seen>>,
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

impl Daemon {
    fn start(script: Script) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("scoped.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let fake = Fake {
            seen: seen.clone(),
            script,
        };
        let listener = runtime
            .block_on(async { tokio::net::UnixListener::bind(&socket) })
            .expect("bind the fake socket");
        runtime.spawn(async move {
            tonic::transport::Server::builder()
                .serve_with_incoming(ScopeServer::new(fake), UnixListenerStream::new(listener))
                .await
                .expect("fake server");
        });
        Self {
            socket,
            seen,
            _dir: dir,
            _runtime: runtime,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(SCOPE);
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd.env_remove("SCOPE_SOCKET");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run scope")
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().expect("lock"))
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("utf-8 stderr")
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "scope failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// A user-facing failure: exit code 1, one clear line, no panic or Rust debug output.
fn assert_clean_error(output: &Output, expected: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err, format!("scope: error: {expected}\n"));
    assert!(!err.contains("panicked") && !err.contains("Status {") && !err.contains("Os {"));
}

#[test]
fn traces_show_and_ps() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["traces"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.lines()
            .nth(1)
            .is_some_and(|l| l.contains("processCommand (redis-server 1234)")),
        "{text}"
    );
    let out = daemon.run(&["traces", "--pid", "5", "--json"]);
    assert_ok(&out);
    let line: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("json");
    assert_eq!(line["trace_id"], format!("{:032x}", 0xabcd + 5));
    assert_eq!(line["root_function"], "processCommand");
    assert_eq!(line["pids"], serde_json::json!([1234, 5678]));

    let out = daemon.run(&["show", &format!("{:032x}", 7)]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("2 spans in 2 processes"), "{text}");
    assert!(
        text.contains("└─ (io) [server 5678/5679] handle("),
        "{text}"
    );
    let out = daemon.run(&["show", &format!("{:032x}", 0)]);
    assert_clean_error(
        &out,
        &format!(
            "no stored span belongs to trace {:032x} (see `scope traces`)",
            0
        ),
    );
    let out = daemon.run(&["show", "not-a-trace"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad trace id is a usage error"
    );

    let out = daemon.run(&["ps"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.lines()
            .nth(2)
            .is_some_and(|l| l.contains("  postgres-backend")),
        "the child is indented: {text}"
    );
    let out = daemon.run(&["ps", "--json"]);
    assert_ok(&out);
    assert_eq!(stdout(&out).lines().count(), 2);
}

#[test]
fn attach_prints_session_and_probes() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&[
        "attach",
        "--pid",
        "1234",
        "--func",
        "processCommand",
        "--func",
        "lookupKey*",
    ]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.starts_with("session 7: attached 2 probes to pid 1234 (redis-server)\n"),
        "{text}"
    );
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle} in\n{text}"))
            .to_owned()
    };
    let pc = line("processCommand");
    assert!(pc.contains("/usr/bin/redis-server") && pc.contains("src/server.c:3987"));
    let lk = line("lookupKey ");
    assert!(lk.contains("src/db.c:100") && lk.contains("inlined into lookupKeyRead"));
    daemon.seen(|seen| {
        assert_eq!(seen.attach.len(), 1);
        assert_eq!(seen.attach[0].pid, PID);
        assert_eq!(seen.attach[0].functions, ["processCommand", "lookupKey*"]);
    });
}

#[test]
fn attach_json_is_one_object() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&[
        "attach",
        "--pid",
        "1234",
        "--func",
        "processCommand",
        "--json",
    ]);
    assert_ok(&out);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["session_id"], 7);
    assert_eq!(v["pid"], 1234);
    let probes = v["probes"].as_array().expect("probes");
    assert_eq!(probes.len(), 2);
    let p = &probes[1];
    assert_eq!(p["probe_id"], 2);
    assert_eq!(p["function"], "lookupKey");
    assert_eq!(p["symbol"], "lookupKey");
    assert_eq!(p["module"], "/usr/bin/redis-server");
    assert_eq!(p["address"], 0x4200);
    assert_eq!(p["file"], "src/db.c");
    assert_eq!(p["line"], 100);
    assert_eq!(p["inlined_into"], "lookupKeyRead");
}

#[test]
fn daemon_errors_are_printed_as_they_are() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["attach", "--pid", "4242", "--func", "main"]);
    assert_clean_error(&out, "pid 4242 does not exist");
    let out = daemon.run(&["trace", "--pid", "1234", "--func", "procesCommand"]);
    assert_clean_error(
        &out,
        "no function matches 'procesCommand' in /usr/bin/redis-server; did you mean \
         processCommand?",
    );
    // Nothing was attached, so nothing to detach.
    daemon.seen(|seen| assert!(seen.detach.is_empty()));
    let out = daemon.run(&["detach", "99"]);
    assert_clean_error(&out, "no session 99");
}

#[test]
fn missing_socket_says_to_start_scoped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("nope.sock");
    let out = Command::new(SCOPE)
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .expect("run scope");
    assert_clean_error(
        &out,
        &format!(
            "cannot connect to scoped at {}: No such file or directory — is scoped running? \
             (start it with `scoped` or `systemctl start scoped`)",
            socket.display()
        ),
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn stale_socket_is_connection_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    let out = Command::new(SCOPE)
        .args(["sessions"])
        .env("SCOPE_SOCKET", &socket)
        .output()
        .expect("run scope");
    assert_clean_error(
        &out,
        &format!(
            "cannot connect to scoped at {}: Connection refused — is scoped running? \
             (start it with `scoped` or `systemctl start scoped`)",
            socket.display()
        ),
    );
}

#[test]
fn socket_comes_from_the_environment() {
    let daemon = Daemon::start(Script::default());
    let out = Command::new(SCOPE)
        .args(["status", "--json"])
        .env("SCOPE_SOCKET", &daemon.socket)
        .output()
        .expect("run scope");
    assert_ok(&out);
}

#[test]
fn default_socket_is_documented() {
    let out = Command::new(SCOPE)
        .arg("--help")
        .env_remove("SCOPE_SOCKET")
        .output()
        .expect("run scope");
    assert_ok(&out);
    assert!(stdout(&out).contains("/run/scope/scoped.sock"));
}

#[test]
fn calls_json_lines_have_every_key() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["calls", "--pid", "1234", "--json"]);
    assert_ok(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in &lines {
        let v: Value = serde_json::from_str(line).expect("each line is JSON");
        for key in [
            "pid",
            "tid",
            "line",
            "start_ns",
            "duration_ns",
            "depth",
            "ret",
            "span_id",
            "parent_id",
            "session_id",
            "probe_id",
        ] {
            assert!(v[key].is_u64(), "{key} is an integer in {line}");
        }
        for key in ["function", "module", "file", "inlined_into", "trace_id"] {
            assert!(v[key].is_string(), "{key} is a string in {line}");
        }
        let args = v["args"].as_array().expect("args");
        assert_eq!(args.len(), 6);
        assert!(args.iter().all(Value::is_u64));
        assert!(v["flags"].is_array());
        let caller = v["caller"].as_array().expect("caller");
        assert_eq!(caller[0]["function"], "processInputBuffer");
        assert!(caller[0]["line"].is_u64() && caller[0]["inlined"].is_boolean());
    }
    let child: Value = serde_json::from_str(lines[1]).expect("JSON");
    assert_eq!(child["function"], "lookupKey");
    assert_eq!(child["ret"].as_u64(), Some(u64::MAX));
    assert_eq!(child["args"][5].as_u64(), Some(u64::MAX));
    assert_eq!(child["start_ns"], 1_700_000_000_000_002_000u64);
    let exited: Value = serde_json::from_str(lines[2]).expect("JSON");
    assert_eq!(exited["flags"][0], "thread_exited");
    assert_eq!(child["trace_id"], "000000000000abcd00000000000003ea");
    daemon.seen(|seen| {
        let filter = seen.query_filter();
        assert_eq!(filter.pid, 1234);
        assert_eq!(seen.query[0].limit, 100, "default limit");
        assert_eq!(filter.session_id, 0);
        assert_eq!(filter.function, "");
        assert_eq!(
            (
                filter.since_unix_ns,
                filter.until_unix_ns,
                filter.min_duration_ns
            ),
            (0, 0, 0)
        );
        assert_eq!(filter.trace_id, "");
    });
}

#[test]
fn calls_passes_filters_and_prints_a_table() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&[
        "calls",
        "--session",
        "7",
        "--func",
        "lookup*",
        "--limit",
        "0",
    ]);
    assert_ok(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "TIME", "(UTC)", "PID", "TID", "FUNCTION", "DURATION", "LOCATION", "RET"
        ]
    );
    assert!(lines[1].starts_with("22:13:20.000001"), "{text}");
    assert!(lines[1].contains(" processCommand ") && lines[1].contains("12.3µs"));
    assert!(lines[1].contains("server.c:3987") && lines[1].ends_with(" 0"));
    // The child is indented by its depth.
    let col = |l: &str, s: &str| l.find(s).unwrap_or_else(|| panic!("{s} in {l}"));
    assert_eq!(
        col(lines[2], "lookupKey"),
        col(lines[1], "processCommand") + 2
    );
    assert!(lines[2].ends_with(" -1"), "{text}");
    assert!(lines[3].ends_with("[thread exited]"), "{text}");
    daemon.seen(|seen| {
        assert_eq!(seen.query[0].limit, 0);
        let filter = seen.query_filter();
        assert_eq!(filter.session_id, 7);
        assert_eq!(filter.function, "lookup*");
    });
}

#[test]
fn sessions_table_and_json() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["sessions"]);
    assert_ok(&out);
    let text = stdout(&out);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "ID", "PID", "COMM", "EXE", "ALIVE", "PROBES", "SPANS", "DROPPED", "PATTERNS"
        ]
    );
    assert_eq!(
        lines[1],
        [
            "7",
            "1234",
            "redis-server",
            "/usr/bin/redis-server",
            "yes",
            "2",
            "12",
            "5",
            "processCommand",
            "lookupKey*"
        ]
    );
    let out = daemon.run(&["sessions", "--json"]);
    assert_ok(&out);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let s = &v["sessions"][0];
    assert_eq!(s["session_id"], 7);
    assert_eq!(s["target_alive"], true);
    assert_eq!(s["spans_dropped"], 5);
    assert_eq!(s["probes"].as_array().map(Vec::len), Some(2));
}

#[test]
fn detach_one_or_all() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["detach", "7"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "detached session 7 in 1.23ms\n");
    let out = daemon.run(&["detach", "--all"]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "detached sessions 7, 8 in 1.23ms\n");
    daemon.seen(|seen| {
        assert_eq!(seen.detach[0].target, Some(Target::SessionId(7)));
        assert_eq!(seen.detach[1].target, Some(Target::All(true)));
    });
    let out = daemon.run(&["detach"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn status_human_and_json() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["status"]);
    assert_ok(&out);
    let text = stdout(&out);
    let words: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    for expected in [
        vec!["spans", "received", "1000"],
        vec!["spans", "dropped", "17"],
        vec!["sessions", "1"],
        vec!["probes", "2"],
        vec!["kernel.ring_full", "17"],
        vec!["daemon.queue_full", "0"],
    ] {
        assert!(words.contains(&expected), "{expected:?} in\n{text}");
    }
    assert!(
        text.contains("900 spans, 3.0 MiB in /var/lib/scope/scope.db (kept under 2.0 GiB)"),
        "{text}"
    );
    assert!(text.contains("io capture"), "{text}");
    assert!(text.contains("on (reads and writes"), "{text}");
    assert!(
        text.contains(
            "throttled by overhead budgets:\n  session 7: processCommand (pid 1234) detached by the overhead budget: 512000 calls/s"
        ),
        "{text}"
    );
    let out = daemon.run(&["status", "--json"]);
    assert_ok(&out);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["spans_received"], 1000);
    assert_eq!(v["spans_dropped"], 17);
    assert_eq!(v["counters"]["kernel.ring_full"], 17);
    assert_eq!(v["store_bytes"], 3 << 20);
    assert_eq!(v["store_path"], "/var/lib/scope/scope.db");
    assert_eq!(v["io_capture"], true);
    assert_eq!(v["throttled"][0]["function"], "processCommand");
    assert_eq!(v["throttled"][0]["action"], "detached");
}

/// Two threads' calls, children before parents, one root's child arriving after the root,
/// a span of another session (left out) and 3 spans lost on the way.
fn live_script() -> Vec<(Duration, SpanBatch)> {
    let mut abandoned = span(3, 1, 1234, 1, "addReply", 3_000, 900);
    abandoned.flags = vec!["abandoned".into()];
    let mut other_session = span(99, 0, 1234, 0, "otherSession", 500, 10);
    other_session.session_id = 8;
    let ms = Duration::from_millis;
    vec![
        (
            ms(50),
            SpanBatch {
                spans: vec![
                    span(4, 2, 1234, 2, "dictFind", 2_100, 300),
                    span(11, 10, 1240, 1, "lookupKey", 1_600, 100),
                    abandoned,
                ],
                dropped: 0,
                warnings: Vec::new(),
            },
        ),
        (
            ms(10),
            SpanBatch {
                spans: vec![
                    span(1, 0, 1234, 0, "processCommand", 1_000, 12_345),
                    span(10, 0, 1240, 0, "processCommand", 1_500, 2_000),
                    other_session,
                ],
                dropped: 3,
                warnings: vec![
                    format!(
                        "session {SESSION}: probe 1 on processCommand (pid {PID}) detached by the overhead budget: too hot"
                    ),
                    "session 999: another session's warning".into(),
                ],
            },
        ),
        (
            ms(20),
            SpanBatch {
                // Ended before the root but came through a slower CPU ring.
                spans: vec![span(2, 1, 1234, 1, "lookupKey", 2_000, 1_000)],
                dropped: 0,
                warnings: Vec::new(),
            },
        ),
    ]
}

fn assert_live_trees(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("[pid 1234 tid 1234]"))
        .unwrap_or_else(|| panic!("no tree for tid 1234 in\n{text}"));
    assert_eq!(
        &lines[start..start + 4],
        [
            "[pid 1234 tid 1234] processCommand(0x55d0c1e0a2c0) = 0  12.3µs  server.c:3987",
            "                    ├─ lookupKey(0x55d0c1e0a2c0) = 0  1.00µs  server.c:3987",
            "                    │  └─ dictFind(0x55d0c1e0a2c0) = 0  300ns  server.c:3987",
            "                    └─ addReply(0x55d0c1e0a2c0) [abandoned]  900ns  server.c:3987",
        ],
        "{text}"
    );
    let other = lines
        .iter()
        .position(|l| l.starts_with("[pid 1234 tid 1240]"))
        .unwrap_or_else(|| panic!("no tree for tid 1240 in\n{text}"));
    assert_eq!(
        lines[other + 1],
        "                    └─ lookupKey(0x55d0c1e0a2c0) = 0  100ns  server.c:3987"
    );
    assert!(!text.contains("otherSession"), "{text}");
    assert!(!text.contains("late"), "{text}");
}

#[test]
fn trace_prints_trees_and_detaches_when_the_duration_elapses() {
    let daemon = Daemon::start(Script {
        watch: live_script(),
        ..Script::default()
    });
    let out = daemon.run(&[
        "trace",
        "--pid",
        "1234",
        "--func",
        "processCommand",
        "--func",
        "lookupKey*",
        "--duration",
        "700ms",
    ]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "tracing 2 functions in pid 1234 (redis-server) as session 7 for 700ms; Ctrl-C to stop\n"
        ),
        "{text}"
    );
    assert_live_trees(&text);
    let last = text.lines().last().expect("a summary");
    assert_eq!(
        last,
        "session 7: 6 spans received, 3 dropped on the way to this client (it fell behind), \
         5 dropped by scoped for this session (see `scope status`); detached in 1.23ms"
    );
    // Warnings about this session reach the user, others' do not.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "scope: warning: session 7: probe 1 on processCommand (pid 1234) detached by the overhead budget: too hot"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("session 999"), "{stderr}");
    daemon.seen(|seen| {
        assert_eq!(seen.attach[0].functions, ["processCommand", "lookupKey*"]);
        assert_eq!(seen.detach.len(), 1);
        assert_eq!(seen.detach[0].target, Some(Target::SessionId(SESSION)));
        assert_eq!(seen.watch[0].pid, PID);
    });
}

fn trace_until_signal(signal: &str) {
    let daemon = Daemon::start(Script {
        watch: live_script(),
        ..Script::default()
    });
    let mut child = daemon
        .command(&["trace", "--pid", "1234", "--func", "processCommand"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scope");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut text = String::new();
    // Wait until both trees are out, then stop the trace.
    while !(text.contains("tid 1234]") && text.contains("tid 1240]")) {
        let mut line = String::new();
        if reader.read_line(&mut line).expect("read") == 0 {
            panic!("scope ended early:\n{text}");
        }
        text.push_str(&line);
    }
    daemon.seen(|seen| assert!(seen.detach.is_empty(), "still tracing"));
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).expect("read");
    text.push_str(&rest);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{signal}: {:?}\n{text}\n{}",
        out.status,
        stderr(&out)
    );
    assert_live_trees(&text);
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("session 7: 6 spans received, 3 dropped")
                && l.ends_with("detached in 1.23ms")),
        "{text}"
    );
    daemon.seen(|seen| {
        assert_eq!(seen.detach.len(), 1);
        assert_eq!(seen.detach[0].target, Some(Target::SessionId(SESSION)));
    });
}

#[test]
fn trace_detaches_on_ctrl_c() {
    trace_until_signal("-INT");
}

#[test]
fn trace_detaches_on_sigterm() {
    trace_until_signal("-TERM");
}

#[test]
fn trace_stops_when_the_target_exits() {
    let daemon = Daemon::start(Script {
        watch: live_script(),
        target_alive: false,
        ..Script::default()
    });
    let out = daemon.run(&["trace", "--pid", "1234", "--func", "processCommand"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("pid 1234 exited; session 7:")),
        "{text}"
    );
    daemon.seen(|seen| assert_eq!(seen.detach.len(), 1));
}

#[test]
fn trace_prints_late_and_unfinished_calls() {
    let ms = Duration::from_millis;
    let daemon = Daemon::start(Script {
        watch: vec![
            (
                ms(10),
                SpanBatch {
                    spans: vec![span(1, 0, 1234, 0, "processCommand", 1_000, 10_000)],
                    dropped: 0,
                    warnings: Vec::new(),
                },
            ),
            // Far past the grace period.
            (
                ms(400),
                SpanBatch {
                    spans: vec![
                        span(2, 1, 1234, 1, "lookupKey", 2_000, 1_000),
                        // Its parent (span 50) is still running when the stream ends.
                        span(51, 50, 1234, 1, "dictFind", 20_000, 1_000),
                    ],
                    dropped: 0,
                    warnings: Vec::new(),
                },
            ),
        ],
        end_watch: true,
        ..Script::default()
    });
    let out = daemon.run(&["trace", "--pid", "1234", "--func", "*"]);
    assert_ok(&out);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[1].starts_with("[pid 1234 tid 1234] processCommand("),
        "{text}"
    );
    assert!(
        lines[2].starts_with("[pid 1234 tid 1234] lookupKey(")
            && lines[2].ends_with("(arrived late: called from processCommand, printed above)"),
        "{text}"
    );
    assert!(
        lines[3].starts_with("[pid 1234 tid 1234] dictFind(")
            && lines[3].contains("caller was still running"),
        "{text}"
    );
    assert!(
        lines[4].starts_with("scoped ended the live stream; session 7: 3 spans received"),
        "{text}"
    );
    daemon.seen(|seen| assert_eq!(seen.detach.len(), 1));
}

#[test]
fn bad_duration_is_a_usage_error() {
    let out = Command::new(SCOPE)
        .args([
            "--socket",
            "/nonexistent",
            "trace",
            "--pid",
            "1",
            "--func",
            "f",
        ])
        .args(["--duration", "5 parsecs"])
        .output()
        .expect("run scope");
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("unknown unit 'parsecs'"), "{err}");
}

#[test]
fn closed_stdout_is_not_an_error() {
    let daemon = Daemon::start(Script::default());
    let mut child = daemon
        .command(&["calls", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
}

#[test]
fn trace_watches_the_session_when_scoped_refuses_a_pid_watch() {
    let daemon = Daemon::start(Script {
        watch: live_script(),
        session_watch_only: true,
        ..Script::default()
    });
    let out = daemon.run(&[
        "trace",
        "--pid",
        "1234",
        "--func",
        "*",
        "--duration",
        "500ms",
    ]);
    assert_ok(&out);
    assert_live_trees(&stdout(&out));
    daemon.seen(|seen| {
        assert_eq!(seen.watch.len(), 2);
        assert_eq!((seen.watch[0].session_id, seen.watch[0].pid), (0, PID));
        assert_eq!((seen.watch[1].session_id, seen.watch[1].pid), (SESSION, 0));
        assert_eq!(seen.detach.len(), 1);
    });
}

#[test]
fn trace_reports_a_failed_stream_and_still_detaches() {
    let daemon = Daemon::start(Script {
        watch: live_script(),
        watch_error: Some(Status::internal(
            "the span reader stopped: ring buffer gone",
        )),
        ..Script::default()
    });
    let out = daemon.run(&["trace", "--pid", "1234", "--func", "*"]);
    // The live script's warning comes first, then the error.
    let err = stderr(&out);
    let (warning, error) = err.split_once('\n').expect("two lines");
    assert!(warning.starts_with("scope: warning: session 7:"), "{err}");
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(
        error,
        "scope: error: the span reader stopped: ring buffer gone\n"
    );
    let text = stdout(&out);
    // What arrived before the failure is still printed, and the summary too.
    assert_live_trees(&text);
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("session 7: 6 spans received")),
        "{text}"
    );
    daemon.seen(|seen| assert_eq!(seen.detach.len(), 1));
}

// ---------------------------------------------------------------------------------------------
// Filters, stats, top, flame, export

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
}

#[test]
fn calls_filters_reach_the_daemon() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&[
        "calls",
        "--since",
        "2024-05-01T13:00:00Z",
        "--until",
        "1714568460000000000",
        "--min-duration",
        "1ms",
        "--trace",
        "0123456789ABCDEF0123456789abcdef",
        "--json",
    ]);
    assert_ok(&out);
    daemon.seen(|seen| {
        let filter = seen.query_filter();
        assert_eq!(filter.since_unix_ns, 1_714_568_400_000_000_000);
        assert_eq!(filter.until_unix_ns, 1_714_568_460_000_000_000);
        assert_eq!(filter.min_duration_ns, 1_000_000);
        assert_eq!(filter.trace_id, "0123456789abcdef0123456789abcdef");
    });

    let daemon = Daemon::start(Script::default());
    let before = now_ns();
    let out = daemon.run(&["calls", "--since", "5m"]);
    let after = now_ns();
    assert_ok(&out);
    daemon.seen(|seen| {
        let since = seen.query_filter().since_unix_ns;
        let five_minutes = 300_000_000_000;
        assert!(
            (before - five_minutes..=after - five_minutes).contains(&since),
            "--since 5m is five minutes before now: {since}"
        );
    });
}

#[test]
fn bad_filters_are_usage_errors() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["calls", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("invalid time 'yesterday'") && err.contains("RFC 3339"),
        "{err}"
    );
    let out = daemon.run(&["calls", "--trace", "abc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("expected 32 hex digits"),
        "{}",
        stderr(&out)
    );
    let out = daemon.run(&["calls", "--since", "1m", "--until", "5m"]);
    assert_clean_error(&out, "--until is not after --since: nothing can match");
    daemon.seen(|seen| assert!(seen.query.is_empty(), "nothing was asked"));
}

#[test]
fn stats_table_json_and_filters() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&[
        "stats",
        "--pid",
        "1234",
        "--func",
        "proc*",
        "--session",
        "7",
        "--since",
        "10m",
    ]);
    assert_ok(&out);
    let text = stdout(&out);
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "FUNCTION", "MODULE", "COUNT", "TOTAL", "MEAN", "P50", "P95", "P99", "MAX"
        ]
    );
    assert_eq!(
        lines[1],
        [
            "processCommand",
            "redis-server",
            "100",
            "1.00ms",
            "10.0µs",
            "8.00µs",
            "15.0µs",
            "21.0µs",
            "90.0µs"
        ]
    );
    assert_eq!(lines[2][0], "lookupKey");
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("percentiles are within ±1%")),
        "{text}"
    );
    daemon.seen(|seen| {
        let filter = seen.stats[0].filter.clone().expect("filter");
        assert_eq!((filter.pid, filter.session_id), (1234, 7));
        assert_eq!(filter.function, "proc*");
        assert!(filter.since_unix_ns > 0);
    });

    let out = daemon.run(&["stats", "--json"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["percentile_relative_error"], 0.01);
    let f = &v["functions"][0];
    assert_eq!(f["function"], "processCommand");
    assert_eq!(f["module"], "/usr/bin/redis-server");
    for key in [
        "count", "total_ns", "mean_ns", "p50_ns", "p95_ns", "p99_ns", "max_ns", "min_ns",
    ] {
        assert!(f[key].is_u64(), "{key} is an integer: {f}");
    }
    assert_eq!(f["min_ns"], 700);

    let out = daemon.run(&["stats", "--pid", "4242"]);
    assert_ok(&out);
    assert!(stdout(&out).starts_with("no calls recorded matching the filter"));
}

#[test]
fn top_json_prints_rates_per_refresh() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&[
        "top",
        "--json",
        "--count",
        "2",
        "--interval",
        "100ms",
        "--pid",
        "1234",
    ]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(!text.contains('\x1b'), "no screen control codes: {text:?}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each refresh is one JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for v in &lines {
        assert!(v["time_unix_ns"].is_u64() && v["interval_ns"].is_u64());
        let interval = v["interval_ns"].as_u64().expect("interval");
        assert!(interval >= 90_000_000, "about 100ms: {interval}");
        let f = &v["functions"][0];
        assert_eq!(f["function"], "processCommand");
        // 100 more calls and 1ms more per answer, over about 100ms.
        let rate = f["calls_per_sec"].as_f64().expect("calls_per_sec");
        assert!((200.0..=1100.0).contains(&rate), "{rate}");
        let time = f["time_ns_per_sec"].as_f64().expect("time_ns_per_sec");
        assert!((rate * 9_000.0..=rate * 11_000.0).contains(&time), "{time}");
        for key in ["count", "total_ns", "p99_ns", "mean_ns", "max_ns"] {
            assert!(f[key].is_u64(), "{key}: {f}");
        }
    }
    assert_eq!(lines[1]["functions"][0]["count"], 300, "cumulative count");
    daemon.seen(|seen| {
        assert_eq!(seen.stats.len(), 3, "a baseline and one answer per refresh");
        assert!(
            seen.stats
                .iter()
                .all(|r| r.filter.as_ref().is_some_and(|f| f.pid == 1234))
        );
    });
}

#[test]
fn top_table_without_a_terminal() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["top", "--count", "1", "--interval", "50ms"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        !text.contains('\x1b'),
        "no control codes into a pipe: {text:?}"
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("scope top "), "{text}");
    let header: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "FUNCTION", "MODULE", "CALLS/S", "TIME/S", "COUNT", "TOTAL", "P99"
        ]
    );
    assert!(lines[3].starts_with("processCommand"), "{text}");
    assert!(lines[3].contains("ms/s"), "{text}");
}

#[test]
fn top_stops_on_ctrl_c() {
    let daemon = Daemon::start(Script::default());
    let mut child = daemon
        .command(&["top", "--json", "--interval", "50ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scope");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("a first refresh");
    assert!(line.starts_with('{'), "{line}");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{:?} {}", out.status, stderr(&out));
}

#[test]
fn flame_writes_svg_or_folded_stacks() {
    let daemon = Daemon::start(Script::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let svg = dir.path().join("redis.svg");
    let out = daemon.run(&[
        "flame",
        "--pid",
        "1234",
        "--since",
        "1h",
        "--title",
        "redis latency",
        "-o",
        svg.to_str().expect("utf-8 path"),
    ]);
    assert_ok(&out);
    assert!(out.stdout.is_empty(), "the graph goes to the file");
    let written = std::fs::read_to_string(&svg).expect("the SVG");
    assert!(
        written.starts_with("<svg>") && written.contains("redis latency"),
        "{written}"
    );
    assert_eq!(
        stderr(&out),
        format!(
            "scope: flame graph of 3 spans written to {}\n",
            svg.display()
        )
    );
    daemon.seen(|seen| {
        let request = &seen.flame[0];
        assert_eq!(request.format, flame_request::Format::Svg as i32);
        assert_eq!(request.title, "redis latency");
        let filter = request.filter.clone().expect("filter");
        assert_eq!(filter.pid, 1234);
        assert!(filter.since_unix_ns > 0);
    });

    let out = daemon.run(&["flame", "--folded"]);
    assert_ok(&out);
    assert_eq!(
        stdout(&out),
        "redis-server (1234);processCommand 9000\nredis-server (1234);processCommand;lookupKey 3000\n"
    );
    assert_eq!(
        stderr(&out),
        "scope: folded stacks of 3 spans written to stdout\n"
    );
    daemon.seen(|seen| {
        assert_eq!(seen.flame[1].format, flame_request::Format::Folded as i32);
        assert_eq!(seen.flame[1].title, "");
    });
}

#[test]
fn flame_errors_leave_no_file() {
    let daemon = Daemon::start(Script::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let svg = dir.path().join("empty.svg");
    let out = daemon.run(&["flame", "--pid", "4242", "-o", svg.to_str().expect("path")]);
    assert_clean_error(
        &out,
        "no spans to draw: none match the filter (see `scope calls` for what is stored)",
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "no file, no temporary"
    );
}

#[test]
fn export_chrome_and_jsonl_stream_to_a_file_or_stdout() {
    let daemon = Daemon::start(Script::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("trace.json");
    let out = daemon.run(&[
        "export",
        "--format",
        "chrome",
        "-o",
        trace.to_str().expect("path"),
        "--session",
        "7",
        "--min-duration",
        "10us",
    ]);
    assert_ok(&out);
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&trace).expect("file"))
        .expect("chunks make one JSON document");
    assert_eq!(doc["traceEvents"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        stderr(&out),
        format!("scope: exported 2 spans to {}\n", trace.display())
    );
    daemon.seen(|seen| {
        let request = &seen.export[0];
        assert_eq!(request.format, export_request::Format::Chrome as i32);
        assert_eq!(request.otlp_endpoint, "");
        let filter = request.filter.clone().expect("filter");
        assert_eq!(filter.session_id, 7);
        assert_eq!(filter.min_duration_ns, 10_000);
    });

    let out = daemon.run(&["export", "--format", "jsonl"]);
    assert_ok(&out);
    let text = stdout(&out);
    let functions: Vec<String> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("JSON line");
            v["function"].as_str().expect("function").to_owned()
        })
        .collect();
    assert_eq!(functions, ["processCommand", "lookupKey"]);
    assert_eq!(stderr(&out), "scope: exported 2 spans to stdout\n");
}

#[test]
fn export_otlp_reports_what_was_sent() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&[
        "export",
        "--format",
        "otlp",
        "--endpoint",
        "http://collector:4317",
        "--trace",
        "0123456789abcdef0123456789abcdef",
    ]);
    assert_ok(&out);
    assert_eq!(stdout(&out), "sent 4500 spans to http://collector:4317\n");
    daemon.seen(|seen| {
        let request = &seen.export[0];
        assert_eq!(request.format, export_request::Format::Otlp as i32);
        assert_eq!(request.otlp_endpoint, "http://collector:4317");
        assert_eq!(
            request.filter.clone().expect("filter").trace_id,
            "0123456789abcdef0123456789abcdef"
        );
    });

    let out = daemon.run(&[
        "export",
        "--format",
        "otlp",
        "--endpoint",
        "http://dead:4317",
    ]);
    // The daemon's Unavailable is about the collector, not about scoped: printed as it is.
    assert_clean_error(
        &out,
        "cannot reach the OpenTelemetry collector at http://dead:4317",
    );
}

#[test]
fn export_option_mistakes_fail_before_connecting() {
    // No daemon at all: these must not get as far as connecting.
    for (args, expected) in [
        (
            vec!["export", "--format", "otlp"],
            "--format otlp needs --endpoint URL, the collector's OTLP/gRPC address (e.g. http://localhost:4317)",
        ),
        (
            vec![
                "export",
                "--format",
                "chrome",
                "--endpoint",
                "http://c:4317",
            ],
            "--endpoint is only for --format otlp",
        ),
        (
            vec![
                "export",
                "--format",
                "otlp",
                "--endpoint",
                "http://c:4317",
                "-o",
                "x",
            ],
            "--format otlp sends to the collector and writes no file: leave out -o",
        ),
    ] {
        let out = Command::new(SCOPE)
            .args(["--socket", "/nonexistent/scoped.sock"])
            .args(&args)
            .output()
            .expect("run scope");
        assert_clean_error(&out, expected);
    }
    let out = Command::new(SCOPE)
        .args(["--socket", "/nonexistent", "export", "--format", "xml"])
        .output()
        .expect("run scope");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn analyze_human_and_json() {
    let daemon = Daemon::start(Script::default());
    let out = daemon.run(&["analyze", "--pid", "1234"]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("language") && text.contains(" c\n"), "{text}");
    assert!(
        text.contains("runs on") && text.contains("glibc, redis"),
        "{text}"
    );
    assert!(
        text.contains("processCommand") && text.contains("dispatches"),
        "{text}"
    );
    assert!(text.contains("stripped"), "{text}");
    let out = daemon.run(&["analyze", "--binary", "/usr/bin/redis-server", "--json"]);
    assert_ok(&out);
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(v["entry_points"][0]["function"], "processCommand");
    assert_eq!(v["runtimes"][1], "redis");
    let out = daemon.run(&["analyze"]);
    assert!(!out.status.success(), "a pid or a binary is required");
}
