//! The gRPC service `scope.v1.Scope`: validates and converts wire types, calls [`Daemon`],
//! converts the answer back. No business logic lives here.

use std::{path::PathBuf, pin::Pin, sync::Arc, time::UNIX_EPOCH};

use scope_common::span_flags;
use scope_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    daemon::{Daemon, SessionSnapshot, StatusSnapshot},
    glob::Glob,
    probes::ProbeInfo,
    resolve::AttachSpec,
    store::{SpanFilter, StoredSpan},
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

#[tonic::async_trait]
impl pb::scope_server::Scope for ScopeService {
    async fn attach(
        &self,
        request: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::AttachResponse>, Status> {
        let spec = AttachSpec::from(request.into_inner());
        let daemon = Arc::clone(&self.daemon);
        let session = blocking(move || daemon.attach(&spec)).await??;
        Ok(Response::new(pb::AttachResponse {
            session: Some(session.into()),
        }))
    }

    async fn detach(
        &self,
        request: Request<pb::DetachRequest>,
    ) -> Result<Response<pb::DetachResponse>, Status> {
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
        let (ids, took) = blocking(move || daemon.detach(id)).await??;
        Ok(Response::new(pb::DetachResponse {
            detached_session_ids: ids,
            detach_ns: u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
        }))
    }

    async fn list_sessions(
        &self,
        _request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let daemon = Arc::clone(&self.daemon);
        let sessions = blocking(move || daemon.sessions()).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions.into_iter().map(Into::into).collect(),
        }))
    }

    type WatchStream = SpanStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let filter = filter(request.session_id, request.pid, &request.function)?;
        let mut subscription = self.daemon.subscribe(filter);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_MESSAGES);
        let daemon = Arc::clone(&self.daemon);
        tokio::spawn(async move {
            let mut reported_drops = 0;
            while let Some(batch) = subscription.rx.recv().await {
                let dropped_total = subscription.dropped.get();
                let message = pb::SpanBatch {
                    spans: batch.iter().map(|s| span_to_wire(&daemon, s)).collect(),
                    dropped: dropped_total - reported_drops,
                };
                reported_drops = dropped_total;
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
        let request = request.into_inner();
        let wire = request.filter.unwrap_or_default();
        let filter = filter(wire.session_id, wire.pid, &wire.function)?;
        let daemon = Arc::clone(&self.daemon);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_MESSAGES);
        tokio::task::spawn_blocking(move || {
            let spans = daemon.query(&filter, request.limit as usize);
            for chunk in spans.chunks(QUERY_BATCH_SPANS) {
                let message = pb::SpanBatch {
                    spans: chunk.iter().map(|s| span_to_wire(&daemon, s)).collect(),
                    dropped: 0,
                };
                if tx.blocking_send(Ok(message)).is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        Err(Status::unimplemented("stats: being built"))
    }

    async fn flame(
        &self,
        _request: Request<pb::FlameRequest>,
    ) -> Result<Response<pb::FlameResponse>, Status> {
        Err(Status::unimplemented("flame: being built"))
    }

    type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

    async fn export(
        &self,
        _request: Request<pb::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        Err(Status::unimplemented("export: being built"))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let daemon = Arc::clone(&self.daemon);
        let status = blocking(move || daemon.status()).await?;
        Ok(Response::new(status.into()))
    }
}

/// Runs blocking domain work (ELF parsing, kernel attach/detach) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|error| Status::internal(format!("request handler failed: {error}")))
}

fn filter(session_id: u64, pid: u32, function: &str) -> Result<SpanFilter, Status> {
    let function = match function {
        "" => None,
        glob => Some(Glob::new(glob).map_err(|error| {
            Status::invalid_argument(format!("invalid function pattern {glob:?}: {error}"))
        })?),
    };
    Ok(SpanFilter {
        session_id: (session_id != 0).then_some(session_id),
        pid: (pid != 0).then_some(pid),
        function,
    })
}

impl From<pb::AttachRequest> for AttachSpec {
    fn from(request: pb::AttachRequest) -> Self {
        AttachSpec {
            pid: request.pid,
            patterns: request.functions,
            binary: (!request.binary.is_empty()).then(|| PathBuf::from(request.binary)),
        }
    }
}

fn probe_to_wire(probe: &ProbeInfo, calls: u64, dropped: u64) -> pb::Probe {
    pb::Probe {
        probe_id: probe.slot,
        function: probe.function.clone(),
        symbol: probe.symbol.clone(),
        module: probe.module.display().to_string(),
        address: probe.address,
        file_offset: probe.file_offset,
        file: probe.file.clone().unwrap_or_default(),
        line: probe.line.unwrap_or(0),
        inlined_into: probe.inlined_into.clone().unwrap_or_default(),
        calls,
        spans_dropped: dropped,
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
                .map(|(p, c)| probe_to_wire(p, c.calls, c.dropped))
                .collect(),
            created_unix_ns: session
                .created
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            target_alive: session.alive,
            spans_received: session.spans_received,
            spans_dropped: session.spans_dropped,
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
            stored_spans: status.stored_spans as u64,
            store_capacity: status.store_capacity as u64,
            store_evicted: status.store_evicted,
            ring_bytes_per_cpu: status.ring_bytes_per_cpu,
            cpus: status.cpus,
        }
    }
}

/// Names of the span flags, as the API reports them.
fn flag_names(flags: u32) -> Vec<String> {
    [
        (span_flags::INSTANT, "inlined"),
        (span_flags::THREAD_EXITED, "thread_exited"),
        (span_flags::EXECED, "execed"),
        (span_flags::ABANDONED, "abandoned"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| (*name).to_owned())
    .collect()
}

fn span_to_wire(daemon: &Daemon, stored: &StoredSpan) -> pb::Span {
    let span = &stored.span;
    let probe = &stored.probe;
    pb::Span {
        span_id: span.span_id,
        parent_id: span.parent_id,
        session_id: probe.session_id,
        probe_id: span.probe_id,
        pid: span.pid,
        tid: span.tid,
        function: probe.function.clone(),
        module: probe.module.display().to_string(),
        file: probe.file.clone().unwrap_or_default(),
        line: probe.line.unwrap_or(0),
        start_unix_ns: daemon.clock().to_unix_ns(span.start_ns),
        duration_ns: span.end_ns.saturating_sub(span.start_ns),
        depth: span.depth,
        args: span.args.to_vec(),
        ret: span.ret,
        caller: caller_frames(daemon, stored)
            .into_iter()
            .map(|frame| pb::Frame {
                function: frame.function,
                file: frame.file.unwrap_or_default(),
                line: frame.line.unwrap_or(0),
                inlined: frame.inlined,
            })
            .collect(),
        flags: flag_names(span.flags),
        inlined_into: probe.inlined_into.clone().unwrap_or_default(),
        trace_id: String::new(),
    }
}

/// Where a span's call came from. For an inlined call site the probed address is inside the
/// inlined function itself: frames of functions inlined *into it* are dropped, so the first
/// frame is the inlined function, then the function(s) it sits in.
fn caller_frames(daemon: &Daemon, stored: &StoredSpan) -> Vec<scope_symbolizer::Frame> {
    let span = &stored.span;
    let instant = span.flags & span_flags::INSTANT != 0;
    let mut frames = daemon.caller_frames(span.pid, span.caller, !instant);
    if instant
        && let Some(own) = frames
            .iter()
            .position(|f| f.function == stored.probe.function)
    {
        frames.drain(..own);
    }
    frames
}
