//! The gRPC service `scope.v1.Scope`: validates and converts wire types, calls [`Daemon`],
//! converts the answer back. No business logic lives here.

use std::{
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use scope_common::{ProbeCounters, io_op, stream_kind};
use scope_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    access::Caller,
    budget::{Action, Throttle},
    daemon::{Daemon, MAX_PLAN_WINDOW, PlanOptions, SessionSnapshot, StatusSnapshot},
    error::ScopeError,
    export::{
        self, StreamFormat,
        flame::{self, FlameFormat, FlameOptions},
        otlp,
    },
    glob::Glob,
    model::{Io, Span, TraceId},
    pipeline::WatchFilter,
    planner::ProbePlan,
    probes::{Limits, ProbeInfo},
    resolve::AttachSpec,
    store::{self, FunctionStats, SpanQuery, TraceQuery},
};

/// Spans per message of a QuerySpans stream.
const QUERY_BATCH_SPANS: usize = 1024;
/// Messages a QuerySpans/Watch stream buffers before waiting for the client.
const STREAM_QUEUE_MESSAGES: usize = 16;

pub struct ScopeService {
    daemon: Arc<Daemon>,
}

impl ScopeService {
    pub fn new(daemon: Arc<Daemon>) -> ScopeService {
        ScopeService { daemon }
    }
}

type SpanStream = Pin<Box<dyn Stream<Item = Result<pb::SpanBatch, Status>> + Send>>;

impl ScopeService {
    /// Stored spans matching `query` that `caller` may see, streamed in batches.
    fn stream_spans(&self, caller: Caller, query: SpanQuery, limit: usize) -> Response<SpanStream> {
        let daemon = Arc::clone(&self.daemon);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_MESSAGES);
        tokio::task::spawn_blocking(move || {
            let spans = match daemon.query(&caller, &query, limit) {
                Ok(spans) => spans,
                Err(error) => {
                    let _ = tx.blocking_send(Err(ScopeError::from(error).into()));
                    return;
                }
            };
            for chunk in spans.chunks(QUERY_BATCH_SPANS) {
                let message = pb::SpanBatch {
                    spans: chunk.iter().map(|s| span_to_wire(&daemon, s)).collect(),
                    dropped: 0,
                    warnings: Vec::new(),
                };
                if tx.blocking_send(Ok(message)).is_err() {
                    break;
                }
            }
        });
        Response::new(Box::pin(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl pb::scope_server::Scope for ScopeService {
    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let auto = request
            .auto
            .then(|| plan_options(request.budget_percent, request.window_ms, request.count_ms))
            .transpose()?;
        let spec = attach_spec(request)?;
        let daemon = Arc::clone(&self.daemon);
        let session = blocking(move || match auto {
            Some(options) => daemon.attach_auto(&caller, &spec, options),
            None => daemon.attach(&caller, &spec),
        })
        .await??;
        Ok(Response::new(pb::AttachResponse {
            session: Some(session.into()),
        }))
    }

    async fn detach(
        &self,
        request: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
        let caller = Caller::of(&request)?;
        let id = match request.into_inner().target {
            Some(pb::detach_request::Target::SessionId(id)) => Some(id),
            Some(pb::detach_request::Target::All(true)) => None,
            Some(pb::detach_request::Target::All(false)) | None => {
                return Err(Status::invalid_argument(
                    "say which session to detach: session_id, or all = true",
                ));
            }
        };
        let daemon = Arc::clone(&self.daemon);
        let (ids, took) = blocking(move || daemon.detach(&caller, id)).await??;
        Ok(Response::new(pb::DetachResponse {
            detached_session_ids: ids,
            detach_ns: u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let daemon = Arc::clone(&self.daemon);
        let sessions = blocking(move || daemon.sessions(&caller)).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions.into_iter().map(Into::into).collect(),
        }))
    }

    type WatchStream = SpanStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let filter = WatchFilter {
            owner: None, // the daemon narrows every read to what the caller may see
            session_id: nonzero(request.session_id),
            pid: nonzero(request.pid),
            function: glob(&request.function)?,
        };
        let mut subscription = self.daemon.subscribe(&caller, filter);
        let mut warnings = self.daemon.warnings();
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_MESSAGES);
        let daemon = Arc::clone(&self.daemon);
        tokio::spawn(async move {
            let mut reported_drops = 0;
            loop {
                let message = tokio::select! {
                    batch = subscription.rx.recv() => {
                        let Some(batch) = batch else { break };
                        let dropped_total = subscription.dropped.get();
                        let message = pb::SpanBatch {
                            spans: batch.iter().map(|s| span_to_wire(&daemon, s)).collect(),
                            dropped: dropped_total - reported_drops,
                            warnings: Vec::new(),
                        };
                        reported_drops = dropped_total;
                        message
                    }
                    warning = warnings.recv() => {
                        let warning = match warning {
                            Ok(warning) => warning,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                format!("{n} warnings were missed (this client read too slowly)")
                            }
                            // The daemon, held here, owns the sender.
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        };
                        pb::SpanBatch {
                            spans: Vec::new(),
                            dropped: 0,
                            warnings: vec![warning],
                        }
                    }
                };
                if tx.send(Ok(message)).await.is_err() {
                    break; // the client went away; dropping the subscription unsubscribes
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type QuerySpansStream = SpanStream;

    async fn query_spans(
        &self,
        request: Request<pb::QuerySpansRequest>,
    ) -> Result<Response<Self::QuerySpansStream>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let query = SpanQuery::try_from(request.filter.unwrap_or_default())?;
        Ok(self.stream_spans(caller, query, request.limit as usize))
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let caller = Caller::of(&request)?;
        let filter = request.into_inner().filter.unwrap_or_default();
        if filter.min_duration_ns != 0 || !filter.trace_id.is_empty() {
            return Err(Status::invalid_argument(
                "stats are kept per function and minute: filter by session, pid, function and time, not by duration or trace",
            ));
        }
        let query = SpanQuery::try_from(filter)?;
        let daemon = Arc::clone(&self.daemon);
        let stats = blocking(move || daemon.stats(&caller, &query))
            .await?
            .map_err(ScopeError::from)?;
        Ok(Response::new(pb::StatsResponse {
            functions: stats.into_iter().map(Into::into).collect(),
            percentile_relative_error: store::RELATIVE_ERROR,
        }))
    }

    async fn flame(
        &self,
        request: Request<pb::FlameRequest>,
    ) -> Result<Response<pb::FlameResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let query = SpanQuery::try_from(request.filter.unwrap_or_default())?;
        let format = match pb::flame_request::Format::try_from(request.format) {
            Ok(pb::flame_request::Format::Svg) => FlameFormat::Svg,
            Ok(pb::flame_request::Format::Folded) => FlameFormat::Folded,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown flame graph format {}",
                    request.format
                )));
            }
        };
        let options = FlameOptions {
            title: if request.title.is_empty() {
                flame::DEFAULT_TITLE.to_owned()
            } else {
                request.title
            },
            ..FlameOptions::default()
        };
        let daemon = Arc::clone(&self.daemon);
        let (data, spans) = blocking(move || -> Result<(Vec<u8>, usize), Status> {
            let spans = daemon.query(&caller, &query, 0).map_err(ScopeError::from)?;
            let data = flame::render(&spans, format, &options)
                .map_err(|error| Status::new(error.code(), error.to_string()))?;
            Ok((data, spans.len()))
        })
        .await??;
        Ok(Response::new(pb::FlameResponse {
            data,
            spans: spans as u64,
        }))
    }

    type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

    async fn export(
        &self,
        request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let query = SpanQuery::try_from(request.filter.unwrap_or_default())?;
        let format = pb::export_request::Format::try_from(request.format).map_err(|_| {
            Status::invalid_argument(format!("unknown export format {}", request.format))
        })?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_MESSAGES);
        let daemon = Arc::clone(&self.daemon);
        match format {
            pb::export_request::Format::Otlp => {
                if request.otlp_endpoint.is_empty() {
                    return Err(Status::invalid_argument(
                        "OTLP export needs otlp_endpoint, e.g. http://collector:4317",
                    ));
                }
                let endpoint = request.otlp_endpoint;
                tokio::spawn(async move {
                    let spans = match blocking(move || daemon.query(&caller, &query, 0)).await {
                        Ok(Ok(spans)) => spans,
                        Ok(Err(error)) => {
                            return tx.send(Err(ScopeError::from(error).into())).await;
                        }
                        Err(status) => return tx.send(Err(status)).await,
                    };
                    let answer = match otlp::send(&endpoint, &spans).await {
                        Ok(accepted) => Ok(pb::ExportChunk {
                            data: Vec::new(),
                            spans: accepted as u64,
                        }),
                        Err(error) => Err(Status::new(error.code(), error.to_string())),
                    };
                    tx.send(answer).await
                });
            }
            pb::export_request::Format::Chrome | pb::export_request::Format::Jsonl => {
                let format = if format == pb::export_request::Format::Chrome {
                    StreamFormat::Chrome
                } else {
                    StreamFormat::JsonLines
                };
                tokio::task::spawn_blocking(move || {
                    let spans = match daemon.query(&caller, &query, 0) {
                        Ok(spans) => spans,
                        Err(error) => {
                            let _ = tx.blocking_send(Err(ScopeError::from(error).into()));
                            return;
                        }
                    };
                    let caller = |span: &Span| daemon.caller_frames(span);
                    let _ = export::stream(
                        format,
                        &spans,
                        Some(&caller),
                        export::DEFAULT_CHUNK_BYTES,
                        |data, done| {
                            tx.blocking_send(Ok(pb::ExportChunk { data, spans: done }))
                                .map_err(|_| {
                                    std::io::Error::new(
                                        std::io::ErrorKind::BrokenPipe,
                                        "the client went away",
                                    )
                                })
                        },
                    );
                });
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_traces(
        &self,
        request: Request<pb::ListTracesRequest>,
    ) -> Result<Response<pb::ListTracesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        if request.until_unix_ns != 0 && request.until_unix_ns <= request.since_unix_ns {
            return Err(Status::invalid_argument(
                "the time range is empty: until must be after since",
            ));
        }
        let query = TraceQuery {
            owner: None, // the daemon narrows every read to what the caller may see
            pid: nonzero(request.pid),
            since_ns: nonzero(request.since_unix_ns),
            until_ns: nonzero(request.until_unix_ns),
            limit: request.limit as usize,
        };
        let daemon = Arc::clone(&self.daemon);
        let traces = blocking(move || -> Result<Vec<pb::TraceSummary>, ScopeError> {
            Ok(daemon
                .traces(&caller, &query)?
                .into_iter()
                .map(|t| pb::TraceSummary {
                    trace_id: t.trace_id.to_string(),
                    start_unix_ns: t.start_ns,
                    duration_ns: t.end_ns.saturating_sub(t.start_ns),
                    spans: t.spans,
                    pids: t.pids,
                    root: t.root.as_ref().map(|root| span_to_wire(&daemon, root)),
                })
                .collect())
        })
        .await??;
        Ok(Response::new(pb::ListTracesResponse { traces }))
    }

    type GetTraceStream = SpanStream;

    async fn get_trace(
        &self,
        request: Request<pb::GetTraceRequest>,
    ) -> Result<Response<Self::GetTraceStream>, Status> {
        let caller = Caller::of(&request)?;
        let trace = trace_id(&request.into_inner().trace_id)?;
        let daemon = Arc::clone(&self.daemon);
        let spans = blocking(move || -> Result<Vec<pb::Span>, ScopeError> {
            let query = SpanQuery {
                trace_id: Some(trace),
                ..SpanQuery::default()
            };
            let spans = daemon.query(&caller, &query, 0)?;
            let ids: Vec<u64> = spans.iter().map(|s| s.id).collect();
            let mut links = daemon.io_links(&caller, &ids)?;
            Ok(spans
                .iter()
                .map(|span| {
                    let mut wire = span_to_wire(&daemon, span);
                    wire.links = links
                        .remove(&span.id)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(span_id, trace)| pb::CausalLink {
                            span_id,
                            trace_id: trace.to_string(),
                            kind: "io".to_owned(),
                        })
                        .collect();
                    wire
                })
                .collect())
        })
        .await??;
        let batches: Vec<Result<pb::SpanBatch, Status>> = spans
            .chunks(QUERY_BATCH_SPANS)
            .map(|chunk| {
                Ok(pb::SpanBatch {
                    spans: chunk.to_vec(),
                    dropped: 0,
                    warnings: Vec::new(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn get_trace_io(
        &self,
        request: Request<pb::GetTraceRequest>,
    ) -> Result<Response<pb::TraceIoResponse>, Status> {
        let caller = Caller::of(&request)?;
        let trace = trace_id(&request.into_inner().trace_id)?;
        let daemon = Arc::clone(&self.daemon);
        let io = blocking(move || daemon.trace_io(&caller, trace))
            .await?
            .map_err(ScopeError::from)?;
        Ok(Response::new(pb::TraceIoResponse {
            io: io.iter().map(io_to_wire).collect(),
        }))
    }

    async fn find_io_peers(
        &self,
        request: Request<pb::FindIoPeersRequest>,
    ) -> Result<Response<pb::FindIoPeersResponse>, Status> {
        let caller = Caller::of(&request)?;
        let writes = request
            .into_inner()
            .writes
            .iter()
            .map(io_from_wire)
            .collect::<Result<Vec<Io>, Status>>()?;
        let daemon = Arc::clone(&self.daemon);
        let peers = blocking(move || -> Result<Vec<pb::IoPeer>, ScopeError> {
            let mut peers = Vec::new();
            for (writer_span_id, caused) in daemon.io_peers(&caller, &writes)? {
                let query = SpanQuery {
                    trace_id: Some(caused.trace_id),
                    ..SpanQuery::default()
                };
                let trace = daemon.query(&caller, &query, 0)?;
                peers.push(pb::IoPeer {
                    writer_span_id,
                    caused: Some(span_to_wire(&daemon, &caused)),
                    trace: trace.iter().map(|s| span_to_wire(&daemon, s)).collect(),
                });
            }
            Ok(peers)
        })
        .await??;
        Ok(Response::new(pb::FindIoPeersResponse { peers }))
    }

    async fn list_processes(
        &self,
        request: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let daemon = Arc::clone(&self.daemon);
        let processes = blocking(move || daemon.processes(&caller))
            .await?
            .map_err(ScopeError::from)?;
        Ok(Response::new(pb::ListProcessesResponse {
            processes: processes
                .into_iter()
                .map(|p| pb::Process {
                    pid: p.pid,
                    start_unix_ns: p.start_ns,
                    parent_pid: p.parent_pid.unwrap_or(0),
                    session_id: p.session_id.unwrap_or(0),
                    comm: p.comm,
                    exe: p.exe,
                    fork_span_id: p.fork_span.unwrap_or(0),
                    exited_unix_ns: p.exited_ns.unwrap_or(0),
                })
                .collect(),
        }))
    }

    async fn analyze(
        &self,
        request: Request<pb::AnalyzeRequest>,
    ) -> Result<Response<pb::AnalyzeResponse>, Status> {
        let caller = Caller::of(&request)?;
        let request = request.into_inner();
        let binary = match (request.pid, request.binary.as_str()) {
            (0, "") => {
                return Err(Status::invalid_argument(
                    "say what to analyze: a pid, or a binary's path",
                ));
            }
            (0, path) => Some(PathBuf::from(path)),
            (_, "") => None,
            _ => {
                return Err(Status::invalid_argument("give a pid or a binary, not both"));
            }
        };
        let options = plan_options(request.budget_percent, request.window_ms, request.count_ms)?;
        let daemon = Arc::clone(&self.daemon);
        let pid = request.pid;
        let (analysis, plan) =
            blocking(move || daemon.analyze(&caller, pid, binary.as_deref(), options)).await??;
        Ok(Response::new(pb::AnalyzeResponse {
            path: analysis.path.display().to_string(),
            language: analysis.language.to_owned(),
            toolchain: analysis.toolchain,
            build_id: analysis.build_id.unwrap_or_default(),
            stripped: analysis.stripped,
            dwarf: analysis.dwarf,
            pie: analysis.pie,
            libraries: analysis.libraries,
            runtimes: analysis.runtimes.iter().map(|r| (*r).to_owned()).collect(),
            functions: u32::try_from(analysis.functions).unwrap_or(u32::MAX),
            usdt: analysis.usdt,
            entry_points: analysis
                .entry_points
                .into_iter()
                .map(|(function, reason)| pb::EntryPoint { function, reason })
                .collect(),
            pid,
            classes: analysis
                .classes
                .iter()
                .map(|&(class, functions)| pb::ClassCount {
                    class: class.name().to_owned(),
                    functions: u32::try_from(functions).unwrap_or(u32::MAX),
                })
                .collect(),
            plan: Some(plan_to_wire(&plan)),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let caller = Caller::of(&request)?;
        let daemon = Arc::clone(&self.daemon);
        let status = blocking(move || daemon.status(&caller)).await?;
        Ok(Response::new(status.into()))
    }
}

/// tonic answers a request message it cannot decode with `internal`, as if the daemon were
/// at fault; it is the caller's: this rewrites such answers to `invalid_argument`, keeping
/// tonic's message ("failed to decode Protobuf message: ..."), which says what was wrong.
pub fn malformed_is_invalid_argument<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let internal = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"13");
    let undecodable = headers
        .get("grpc-message")
        .is_some_and(|message| message.as_bytes().starts_with(b"failed%20to%20decode"));
    if internal && undecodable {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from_static("3"), // INVALID_ARGUMENT
        );
    }
    response
}

/// Runs blocking domain work (ELF parsing, kernel attach/detach) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|error| Status::internal(format!("request handler failed: {error}")))
}

fn trace_id(text: &str) -> Result<TraceId, Status> {
    if text.is_empty() {
        return Err(Status::invalid_argument(
            "which trace? give trace_id (32 hex digits, from ListTraces)",
        ));
    }
    TraceId::parse(text).ok_or_else(|| {
        Status::invalid_argument(format!("trace id {text:?} is not 32 hexadecimal digits"))
    })
}

fn io_to_wire(io: &Io) -> pb::IoEvent {
    pb::IoEvent {
        time_unix_ns: io.time_ns,
        pid: io.pid,
        tid: io.tid,
        op: if io.op == io_op::WRITE {
            "write"
        } else {
            "read"
        }
        .to_owned(),
        stream: match io.stream {
            stream_kind::PIPE => "pipe",
            stream_kind::UNIX => "unix",
            _ => "tcp",
        }
        .to_owned(),
        start: io.start,
        end: io.end,
        bytes: io.bytes,
        span_id: io.span_id,
        trace_id: io.trace_id.to_string(),
        local: io.local.map(|a| a.to_string()).unwrap_or_default(),
        remote: io.remote.map(|a| a.to_string()).unwrap_or_default(),
    }
}

fn io_from_wire(io: &pb::IoEvent) -> Result<Io, Status> {
    let address = |text: &str, which: &str| -> Result<Option<std::net::SocketAddr>, Status> {
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            Status::invalid_argument(format!("{which} address {text:?} is not address:port"))
        })
    };
    let op = match io.op.as_str() {
        "write" => io_op::WRITE,
        "read" => io_op::READ,
        other => {
            return Err(Status::invalid_argument(format!(
                "op {other:?} is neither write nor read"
            )));
        }
    };
    let stream = match io.stream.as_str() {
        "pipe" => stream_kind::PIPE,
        "unix" => stream_kind::UNIX,
        "tcp" => stream_kind::TCP,
        other => {
            return Err(Status::invalid_argument(format!(
                "stream {other:?} is not pipe, unix or tcp"
            )));
        }
    };
    Ok(Io {
        time_ns: io.time_unix_ns,
        pid: io.pid,
        tid: io.tid,
        op,
        stream,
        key: 0,
        start: io.start,
        end: io.end,
        bytes: io.bytes,
        span_id: io.span_id,
        trace_id: TraceId::parse(&io.trace_id).unwrap_or_default(),
        peer_span_id: 0,
        peer_trace_id: TraceId::default(),
        local: address(&io.local, "local")?,
        remote: address(&io.remote, "remote")?,
    })
}

fn nonzero<T: Default + PartialEq>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

fn glob(pattern: &str) -> Result<Option<Glob>, Status> {
    match pattern {
        "" => Ok(None),
        pattern => Glob::new(pattern).map(Some).map_err(|error| {
            // Quote enough to recognise it, not a megabyte of it back.
            let shown: String = pattern.chars().take(64).collect();
            let more = if shown.len() < pattern.len() {
                "…"
            } else {
                ""
            };
            Status::invalid_argument(format!("invalid function pattern {shown:?}{more}: {error}"))
        }),
    }
}

impl TryFrom<pb::SpanFilter> for SpanQuery {
    type Error = Status;

    fn try_from(filter: pb::SpanFilter) -> Result<Self, Status> {
        let trace_id = match filter.trace_id.as_str() {
            "" => None,
            text => Some(TraceId::parse(text).ok_or_else(|| {
                Status::invalid_argument(format!("trace id {text:?} is not 32 hexadecimal digits"))
            })?),
        };
        if filter.until_unix_ns != 0 && filter.until_unix_ns <= filter.since_unix_ns {
            return Err(Status::invalid_argument(
                "the time range is empty: until must be after since",
            ));
        }
        Ok(SpanQuery {
            owner: None, // the daemon narrows every read to what the caller may see
            session_id: nonzero(filter.session_id),
            pid: nonzero(filter.pid),
            function: glob(&filter.function)?,
            since_ns: nonzero(filter.since_unix_ns),
            until_ns: nonzero(filter.until_unix_ns),
            min_duration_ns: nonzero(filter.min_duration_ns),
            trace_id,
        })
    }
}

impl From<FunctionStats> for pb::FunctionStats {
    fn from(stats: FunctionStats) -> Self {
        pb::FunctionStats {
            function: stats.function,
            module: stats.module,
            count: stats.count,
            total_ns: stats.total_ns,
            mean_ns: stats.mean_ns,
            p50_ns: stats.p50_ns,
            p95_ns: stats.p95_ns,
            p99_ns: stats.p99_ns,
            max_ns: stats.max_ns,
            min_ns: stats.min_ns,
        }
    }
}

/// The most a budget may be: every CPU of a large machine.
const MAX_BUDGET_PERCENT: f64 = 100.0 * 1024.0;

fn attach_spec(request: pb::AttachRequest) -> Result<AttachSpec, Status> {
    let budget = request.budget_percent;
    if !(budget.is_finite() && (0.0..=MAX_BUDGET_PERCENT).contains(&budget)) {
        return Err(Status::invalid_argument(format!(
            "budget_percent {budget} is not a share of CPU: give a percentage above 0 (e.g. 1 for 1% of one CPU), or 0 for no budget"
        )));
    }
    Ok(AttachSpec {
        pid: request.pid,
        patterns: request.functions,
        binary: (!request.binary.is_empty()).then(|| PathBuf::from(request.binary)),
        follow: !request.no_follow,
        require_matches: true,
        limits: Limits {
            sample_every: request.sample_every,
            max_rate: request.max_rate,
            budget: (budget > 0.0).then_some(budget / 100.0),
        },
    })
}

/// Plan options from a request: `budget_percent` 0 means the default budget, window and
/// count 0 their defaults.
fn plan_options(budget_percent: f64, window_ms: u32, count_ms: u32) -> Result<PlanOptions, Status> {
    if !(budget_percent.is_finite() && (0.0..=MAX_BUDGET_PERCENT).contains(&budget_percent)) {
        return Err(Status::invalid_argument(format!(
            "budget_percent {budget_percent} is not a share of CPU: give a percentage above 0 (e.g. 1 for 1% of one CPU), or 0 for the default"
        )));
    }
    let defaults = PlanOptions::default();
    let window = |ms: u32, default: Duration, what: &str| {
        let window = if ms == 0 {
            default
        } else {
            Duration::from_millis(u64::from(ms))
        };
        if window > MAX_PLAN_WINDOW {
            return Err(Status::invalid_argument(format!(
                "{what} of {ms} ms is too long: at most {} s",
                MAX_PLAN_WINDOW.as_secs()
            )));
        }
        Ok(window)
    };
    Ok(PlanOptions {
        budget: if budget_percent > 0.0 {
            budget_percent / 100.0
        } else {
            defaults.budget
        },
        window: window(window_ms, defaults.window, "a sampling window")?,
        count: window(count_ms, defaults.count, "a counting run")?,
    })
}

fn plan_to_wire(plan: &ProbePlan) -> pb::ProbePlan {
    pb::ProbePlan {
        budget_percent: plan.budget * 100.0,
        predicted_percent: plan.predicted * 100.0,
        window_ms: plan.window_ms,
        samples: plan.samples,
        count_ms: plan.count_ms,
        functions: plan
            .functions
            .iter()
            .map(|p| {
                let c = &p.candidate;
                pb::PlannedFunction {
                    function: c.function.clone(),
                    module: c.module.display().to_string(),
                    class: c.class.name().to_owned(),
                    reason: p.reason.clone(),
                    measured: c.calls_per_second.is_some(),
                    calls_per_second: c.calls_per_second.unwrap_or(0.0),
                    ns_per_call: c.ns_per_call,
                    cost_percent: c.cost_ns().map_or(0.0, |ns| ns / 1e7),
                    chosen: p.chosen,
                    self_samples: c.self_samples,
                    stack_samples: c.stack_samples,
                    pattern: c.pattern(),
                }
            })
            .collect(),
        notes: plan.notes.clone(),
    }
}

fn throttle_to_wire(throttle: &Throttle) -> pb::Throttle {
    let (action, sample_every) = match throttle.action {
        Action::Sample(every) => ("sampled", every),
        Action::Detach => ("detached", 0),
    };
    pb::Throttle {
        probe_id: throttle.slot,
        function: throttle.function.clone(),
        pid: throttle.pid,
        action: action.to_owned(),
        sample_every,
        calls_per_second: throttle.calls_per_second,
        cost_percent: throttle.cost * 100.0,
        reason: throttle.reason.clone(),
        at_unix_ns: unix_ns(throttle.at),
        session_id: throttle.session_id,
    }
}

fn unix_ns(time: std::time::SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn probe_to_wire(live: &ProbeInfo, counters: &ProbeCounters) -> pb::Probe {
    let probe = &live.probe;
    pb::Probe {
        probe_id: live.slot,
        function: probe.function.clone(),
        symbol: probe.symbol.clone(),
        module: probe.module.clone(),
        address: probe.address,
        file_offset: probe.file_offset,
        file: probe.file.clone().unwrap_or_default(),
        line: probe.line.unwrap_or(0),
        inlined_into: probe.inlined_into.clone().unwrap_or_default(),
        calls: counters.calls,
        spans_dropped: counters.dropped + live.daemon_dropped.get(),
        kernel_dropped: counters.dropped,
        daemon_dropped: live.daemon_dropped.get(),
        sampled_out: counters.sampled_out,
        rate_limited: counters.rate_limited,
        sample_every: live.sample_every(),
    }
}

impl From<SessionSnapshot> for pb::Session {
    fn from(session: SessionSnapshot) -> Self {
        pb::Session {
            id: session.id,
            pid: session.process.pid,
            exe: session.process.exe.display().to_string(),
            comm: session.process.comm,
            patterns: session.patterns,
            probes: session
                .probes
                .iter()
                .map(|(p, c)| probe_to_wire(p, c))
                .collect(),
            created_unix_ns: unix_ns(session.created),
            target_alive: session.alive,
            follow: session.follow,
            owner_uid: session.owner_uid,
            pids: session.pids,
            spans_received: session.spans_received,
            spans_dropped: session.spans_dropped,
            sample_every: session.limits.sample_every,
            max_rate: session.limits.max_rate,
            budget_percent: session.limits.budget.map_or(0.0, |b| b * 100.0),
            overhead_percent: session.overhead.map_or(0.0, |o| o * 100.0),
            throttled: session.throttled.iter().map(throttle_to_wire).collect(),
            sampled_out: session.sampled_out,
            rate_limited: session.rate_limited,
            plan: session.plan.as_deref().map(plan_to_wire),
        }
    }
}

impl From<StatusSnapshot> for pb::StatusResponse {
    fn from(status: StatusSnapshot) -> Self {
        pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ns: u64::try_from(status.uptime.as_nanos()).unwrap_or(u64::MAX),
            spans_received: status.spans_received,
            spans_dropped: status.spans_dropped,
            counters: status.counters.into_iter().collect(),
            sessions: status.sessions as u32,
            probes: status.probes as u32,
            stored_spans: status.stored_spans,
            store_bytes: status.store_bytes,
            store_evicted: status.store_evicted,
            ring_bytes_per_cpu: status.ring_bytes_per_cpu,
            cpus: status.cpus,
            io_capture: status.io_capture,
            throttled: status.throttled.iter().map(throttle_to_wire).collect(),
            store_path: status.store_path,
            store_retain_bytes: status.store_retain_bytes.unwrap_or(0),
            store_retain_age_ns: status
                .store_retain_age
                .map_or(0, |age| u64::try_from(age.as_nanos()).unwrap_or(u64::MAX)),
        }
    }
}

fn span_to_wire(daemon: &Daemon, span: &Span) -> pb::Span {
    let probe = &span.probe;
    pb::Span {
        span_id: span.id,
        parent_id: span.parent_id,
        session_id: probe.session_id,
        probe_id: u32::try_from(probe.id).unwrap_or(u32::MAX),
        pid: span.pid,
        tid: span.tid,
        function: probe.function.clone(),
        module: probe.module.clone(),
        file: probe.file.clone().unwrap_or_default(),
        line: probe.line.unwrap_or(0),
        start_unix_ns: span.start_ns,
        duration_ns: span.duration_ns,
        depth: span.depth,
        args: span.args.to_vec(),
        ret: span.ret,
        caller: daemon
            .caller_frames(span)
            .into_iter()
            .map(|frame| pb::Frame {
                function: frame.function,
                file: frame.file.unwrap_or_default(),
                line: frame.line.unwrap_or(0),
                inlined: frame.inlined,
            })
            .collect(),
        flags: span.flag_names().into_iter().map(str::to_owned).collect(),
        inlined_into: probe.inlined_into.clone().unwrap_or_default(),
        trace_id: span.trace_id.to_string(),
        link_kind: span.link_kind().to_owned(),
        comm: probe.comm.clone(),
        links: Vec::new(),
        text: span.text.clone().unwrap_or_default(),
    }
}
