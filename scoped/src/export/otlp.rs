//! OpenTelemetry export (OTLP/gRPC): the way out to Jaeger, Tempo or any OpenTelemetry
//! Collector when one host's store is not enough.
//!
//! - [`build_request`] turns spans into an `ExportTraceServiceRequest`: one `ResourceSpans` per
//!   traced process (host, pid, executable, command), one `ScopeSpans` named `scope`.
//! - [`send`] delivers stored spans once (the `Export` RPC with format OTLP).
//! - [`ContinuousExporter`] runs as a task and forwards spans as they are traced, batching,
//!   retrying with backoff, and counting every span it could not deliver.
//!
//! Only plaintext `http://` endpoints: TLS to the collector is not built in (run a collector
//! or a sidecar on the host and let it do TLS onwards).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1 as otel;
use scope_common::span_flags;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::file_name;
use crate::model::Span;
use crate::stats::Count;

/// Spans per `ExportTraceServiceRequest`. An encoded span is about 300-600 bytes, so a
/// request stays well under the 4 MiB a collector accepts by default.
pub const MAX_SPANS_PER_REQUEST: usize = 2000;
/// How long connecting to a collector may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one Export call may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the continuous exporter sends what it has collected.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Tries per request (the first and the retries) before its spans count as dropped.
pub const DEFAULT_SEND_ATTEMPTS: u32 = 4;
/// Pause before the first retry; it doubles up to [`DEFAULT_MAX_BACKOFF`].
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(250);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(4);
/// Batches the daemon may queue for the continuous exporter before it drops (and counts) them.
pub const DEFAULT_QUEUE_BATCHES: usize = 256;

/// The instrumentation scope every exported span carries.
pub const SCOPE_NAME: &str = "scope";

/// What went wrong exporting to a collector. Every message names the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(
        "invalid OTLP endpoint {endpoint:?}: write it as http://HOST:PORT, e.g. http://localhost:4317"
    )]
    BadEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },

    #[error("OTLP endpoint {endpoint:?} has no scheme: write it as http://{endpoint}")]
    MissingScheme { endpoint: String },

    #[error(
        "OTLP endpoint {endpoint:?}: {scheme}:// is not supported, only plaintext http:// \
         (TLS to the collector is not built in; send to a local collector and let it forward)"
    )]
    UnsupportedScheme { endpoint: String, scheme: String },

    #[error(
        "cannot reach the OpenTelemetry collector at {endpoint} (is it running and listening \
         for OTLP/gRPC there? the usual port is 4317)"
    )]
    Unreachable {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },

    #[error(
        "the OpenTelemetry collector at {endpoint} did not take {spans} spans \
         ({delivered} were delivered before)"
    )]
    Export {
        endpoint: String,
        spans: usize,
        delivered: usize,
        #[source]
        status: tonic::Status,
    },
}

impl OtlpError {
    /// The gRPC status code the daemon should answer with.
    pub fn code(&self) -> tonic::Code {
        match self {
            OtlpError::BadEndpoint { .. }
            | OtlpError::MissingScheme { .. }
            | OtlpError::UnsupportedScheme { .. } => tonic::Code::InvalidArgument,
            OtlpError::Unreachable { .. } => tonic::Code::Unavailable,
            OtlpError::Export { status, .. } if retryable(status.code()) => {
                tonic::Code::Unavailable
            }
            OtlpError::Export { .. } => tonic::Code::FailedPrecondition,
        }
    }
}

/// Checks an endpoint URL and sets the timeouts.
pub fn endpoint(url: &str) -> Result<Endpoint, OtlpError> {
    let endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|source| OtlpError::BadEndpoint {
            endpoint: url.to_owned(),
            source,
        })?;
    match endpoint.uri().scheme_str() {
        Some("http") if endpoint.uri().host().is_some() => {}
        Some("http") | None => {
            return Err(OtlpError::MissingScheme {
                endpoint: url.to_owned(),
            });
        }
        Some(scheme) => {
            return Err(OtlpError::UnsupportedScheme {
                endpoint: url.to_owned(),
                scheme: scheme.to_owned(),
            });
        }
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT))
}

/// This host's name, for the `host.name` resource attribute.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// One request for `spans`: a `ResourceSpans` per process (in order of first appearance),
/// each with one `ScopeSpans`.
pub fn build_request(spans: &[Span], host_name: &str) -> ExportTraceServiceRequest {
    let mut processes: HashMap<(u32, &str, &str), usize> = HashMap::new();
    let mut resource_spans: Vec<otel::ResourceSpans> = Vec::new();
    for span in spans {
        let probe = &span.probe;
        let key = (span.pid, probe.exe.as_str(), probe.comm.as_str());
        let slot = *processes.entry(key).or_insert_with(|| {
            resource_spans.push(otel::ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        string("host.name", host_name),
                        int("process.pid", i64::from(span.pid)),
                        string("process.executable.path", &probe.exe),
                        string("process.executable.name", file_name(&probe.exe)),
                        string("process.command", &probe.comm),
                        string("service.name", &probe.comm),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![otel::ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE_NAME.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        ..Default::default()
                    }),
                    spans: Vec::new(),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            });
            resource_spans.len() - 1
        });
        resource_spans[slot].scope_spans[0]
            .spans
            .push(to_otel(span));
    }
    ExportTraceServiceRequest { resource_spans }
}

/// Flags under which a span has no return value.
const NO_RETURN: u32 =
    span_flags::INSTANT | span_flags::THREAD_EXITED | span_flags::EXECED | span_flags::ABANDONED;

fn to_otel(span: &Span) -> otel::Span {
    let probe = &span.probe;
    let mut attributes = vec![string("code.function", &probe.function)];
    if let Some(file) = &probe.file {
        attributes.push(string("code.filepath", file));
    }
    if let Some(line) = probe.line {
        attributes.push(int("code.lineno", i64::from(line)));
    }
    attributes.push(int("thread.id", i64::from(span.tid)));
    attributes.push(string("scope.module", &probe.module));
    // Hex strings: arguments are mostly pointers and flags, and an int attribute is signed.
    attributes.push(strings(
        "scope.args",
        span.args.iter().map(|arg| format!("{arg:#x}")),
    ));
    if span.flags & NO_RETURN == 0 {
        // Signed, so -1 and -EINVAL read as such.
        attributes.push(int("scope.return", span.ret as i64));
    }
    let flags = span.flag_names();
    if !flags.is_empty() {
        attributes.push(strings(
            "scope.flags",
            flags.iter().map(|flag| (*flag).to_owned()),
        ));
    }
    if let Some(into) = &probe.inlined_into {
        attributes.push(string("scope.inlined_into", into));
    }
    attributes.push(int("scope.depth", i64::from(span.depth)));
    if let Some(text) = &span.text {
        // PostgreSQL's query text is what OpenTelemetry calls the statement.
        let key = if probe.function.starts_with("postgresql:") {
            "db.statement"
        } else {
            "scope.text"
        };
        attributes.push(string(key, text));
    }
    otel::Span {
        trace_id: span.trace_id.to_bytes().to_vec(),
        span_id: span.id.to_be_bytes().to_vec(),
        parent_span_id: if span.parent_id == 0 {
            Vec::new()
        } else {
            span.parent_id.to_be_bytes().to_vec()
        },
        name: probe.function.clone(),
        kind: otel::span::SpanKind::Internal as i32,
        start_time_unix_nano: span.start_ns,
        end_time_unix_nano: span.end_ns(),
        attributes,
        status: Some(otel::Status::default()), // UNSET: a traced call neither failed nor succeeded
        ..Default::default()
    }
}

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn string(key: &str, value: &str) -> KeyValue {
    attribute(key, any_value::Value::StringValue(value.to_owned()))
}

fn int(key: &str, value: i64) -> KeyValue {
    attribute(key, any_value::Value::IntValue(value))
}

fn strings(key: &str, values: impl Iterator<Item = String>) -> KeyValue {
    attribute(
        key,
        any_value::Value::ArrayValue(ArrayValue {
            values: values
                .map(|value| AnyValue {
                    value: Some(any_value::Value::StringValue(value)),
                })
                .collect(),
        }),
    )
}

/// Status codes worth retrying (the OTLP specification's list, without RESOURCE_EXHAUSTED's
/// retry-info subtlety: a busy collector is worth another try).
fn retryable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Cancelled
            | DeadlineExceeded
            | Aborted
            | OutOfRange
            | Unavailable
            | DataLoss
            | ResourceExhausted
    )
}

/// Spans the collector said it rejected in an otherwise successful answer.
fn rejected(
    response: &tonic::Response<
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
    >,
    sent: usize,
) -> usize {
    let rejected = response
        .get_ref()
        .partial_success
        .as_ref()
        .map_or(0, |p| p.rejected_spans.max(0));
    usize::try_from(rejected).unwrap_or(usize::MAX).min(sent)
}

/// Sends `spans` to the collector at `endpoint` (`http://HOST:PORT`) in requests of at most
/// [`MAX_SPANS_PER_REQUEST`] spans. Returns how many spans the collector accepted.
pub async fn send(endpoint_url: &str, spans: &[Span]) -> Result<usize, OtlpError> {
    let channel =
        endpoint(endpoint_url)?
            .connect()
            .await
            .map_err(|source| OtlpError::Unreachable {
                endpoint: endpoint_url.to_owned(),
                source,
            })?;
    let mut client = TraceServiceClient::new(channel);
    let host = host_name();
    let mut accepted = 0;
    let mut delivered = 0;
    for batch in spans.chunks(MAX_SPANS_PER_REQUEST) {
        let response = client
            .export(build_request(batch, &host))
            .await
            .map_err(|status| OtlpError::Export {
                endpoint: endpoint_url.to_owned(),
                spans: batch.len(),
                delivered,
                status,
            })?;
        let rejected = rejected(&response, batch.len());
        if rejected > 0 {
            tracing::warn!(
                endpoint = endpoint_url,
                rejected,
                message = response
                    .get_ref()
                    .partial_success
                    .as_ref()
                    .map(|p| p.error_message.as_str()),
                "the OpenTelemetry collector rejected some spans"
            );
        }
        accepted += batch.len() - rejected;
        delivered += batch.len();
    }
    Ok(accepted)
}

/// How the continuous exporter batches and retries.
#[derive(Clone, Debug)]
pub struct ExporterConfig {
    /// Send what has been collected this often ...
    pub flush_interval: Duration,
    /// ... or as soon as this many spans are waiting (also the request size).
    pub max_batch_spans: usize,
    /// Tries per request before its spans count as dropped.
    pub send_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Batches [`continuous`] lets the daemon queue.
    pub queue_batches: usize,
}

impl Default for ExporterConfig {
    fn default() -> Self {
        ExporterConfig {
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            max_batch_spans: MAX_SPANS_PER_REQUEST,
            send_attempts: DEFAULT_SEND_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            queue_batches: DEFAULT_QUEUE_BATCHES,
        }
    }
}

/// What the continuous exporter did, for the Status call.
#[derive(Debug, Default)]
pub struct ExporterCounters {
    /// Spans the collector accepted.
    pub sent: Count,
    /// Spans never delivered: the queue was full, the collector stayed unreachable through
    /// every retry, or it rejected them.
    pub dropped: Count,
    /// Export calls that failed (each retry counts).
    pub failed_requests: Count,
}

impl ExporterCounters {
    /// Every counter by name.
    pub fn snapshot(&self) -> [(&'static str, u64); 3] {
        [
            ("otlp.sent", self.sent.get()),
            ("otlp.dropped", self.dropped.get()),
            ("otlp.failed_requests", self.failed_requests.get()),
        ]
    }
}

/// The daemon's side of a [`ContinuousExporter`]: hands it batches without ever waiting.
#[derive(Clone, Debug)]
pub struct ExporterHandle {
    tx: mpsc::Sender<Vec<Span>>,
    counters: Arc<ExporterCounters>,
}

impl ExporterHandle {
    /// Queues `spans` for export. When the queue is full (the collector is slow or down) or
    /// the exporter has stopped, the spans are dropped, counted, and `false` returned.
    pub fn offer(&self, spans: Vec<Span>) -> bool {
        if spans.is_empty() {
            return true;
        }
        match self.tx.try_send(spans) {
            Ok(()) => true,
            Err(
                mpsc::error::TrySendError::Full(spans) | mpsc::error::TrySendError::Closed(spans),
            ) => {
                self.counters.dropped.add(spans.len() as u64);
                false
            }
        }
    }

    pub fn counters(&self) -> &Arc<ExporterCounters> {
        &self.counters
    }
}

/// A continuous exporter to `endpoint` and the handle that feeds it. Run the exporter as a
/// task (`tokio::spawn(exporter.run())`); it stops when every handle is dropped, after
/// sending what it still holds.
pub fn continuous(
    endpoint_url: &str,
    config: ExporterConfig,
) -> Result<(ExporterHandle, ContinuousExporter), OtlpError> {
    let (tx, rx) = mpsc::channel(config.queue_batches.max(1));
    let exporter = ContinuousExporter::new(endpoint_url, rx, config)?;
    let handle = ExporterHandle {
        tx,
        counters: exporter.counters(),
    };
    Ok((handle, exporter))
}

/// Forwards spans to a collector as they come: at most one round of requests per
/// `flush_interval` (sooner when `max_batch_spans` are waiting), each retried with
/// exponential backoff. Spans it cannot deliver are counted in
/// [`ExporterCounters::dropped`], never lost silently. While it is sending, it does not read
/// its queue, so a slow collector fills the queue and the producer's `try_send` fails (count
/// those in the same counter, as [`ExporterHandle::offer`] does).
pub struct ContinuousExporter {
    endpoint: Endpoint,
    endpoint_url: String,
    rx: mpsc::Receiver<Vec<Span>>,
    config: ExporterConfig,
    counters: Arc<ExporterCounters>,
    host: String,
    /// The collector failed the last request; log recovery once.
    failing: bool,
}

impl ContinuousExporter {
    pub fn new(
        endpoint_url: &str,
        rx: mpsc::Receiver<Vec<Span>>,
        config: ExporterConfig,
    ) -> Result<Self, OtlpError> {
        Ok(ContinuousExporter {
            endpoint: endpoint(endpoint_url)?,
            endpoint_url: endpoint_url.to_owned(),
            rx,
            config,
            counters: Arc::default(),
            host: host_name(),
            failing: false,
        })
    }

    pub fn counters(&self) -> Arc<ExporterCounters> {
        Arc::clone(&self.counters)
    }

    /// Runs until the queue's senders are all gone, then sends what is left and returns.
    pub async fn run(mut self) {
        // Connects on first use and reconnects after failures.
        let mut client = TraceServiceClient::new(self.endpoint.connect_lazy());
        let cap = self.config.max_batch_spans.max(1);
        let mut pending: Vec<Span> = Vec::new();
        let mut ticker = tokio::time::interval(self.config.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                batch = self.rx.recv() => match batch {
                    Some(batch) => {
                        pending.extend(batch);
                        while pending.len() >= cap {
                            let rest = pending.split_off(cap);
                            let full = std::mem::replace(&mut pending, rest);
                            self.deliver(&mut client, &full).await;
                        }
                    }
                    None => break,
                },
                _ = ticker.tick() => {
                    if !pending.is_empty() {
                        let batch = std::mem::take(&mut pending);
                        self.deliver(&mut client, &batch).await;
                    }
                }
            }
        }
        for batch in pending.chunks(cap) {
            self.deliver(&mut client, batch).await;
        }
    }

    /// One request, retried; its spans end up in `sent` or `dropped`.
    async fn deliver(&mut self, client: &mut TraceServiceClient<Channel>, spans: &[Span]) {
        let request = build_request(spans, &self.host);
        let mut backoff = self.config.initial_backoff;
        let attempts = self.config.send_attempts.max(1);
        for attempt in 1..=attempts {
            match client.export(request.clone()).await {
                Ok(response) => {
                    let rejected = rejected(&response, spans.len());
                    self.counters.sent.add((spans.len() - rejected) as u64);
                    self.counters.dropped.add(rejected as u64);
                    if self.failing {
                        self.failing = false;
                        tracing::info!(endpoint = %self.endpoint_url, "the OpenTelemetry collector takes spans again");
                    }
                    return;
                }
                Err(status) => {
                    self.counters.failed_requests.add(1);
                    if attempt == attempts || !retryable(status.code()) {
                        self.counters.dropped.add(spans.len() as u64);
                        if !self.failing {
                            self.failing = true;
                            tracing::warn!(
                                endpoint = %self.endpoint_url,
                                spans = spans.len(),
                                attempts = attempt,
                                error = %status,
                                "cannot export spans to the OpenTelemetry collector; dropping them \
                                 (counted in otlp.dropped) until it answers again"
                            );
                        }
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };
    use tokio_stream::wrappers::TcpListenerStream;

    use super::*;
    use crate::export::fixtures::{T0, TRACE, probe, span};

    fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    fn str_attr<'a>(attributes: &'a [KeyValue], key: &str) -> &'a str {
        match attr(attributes, key) {
            Some(any_value::Value::StringValue(s)) => s,
            other => panic!("{key} is not a string: {other:?}"),
        }
    }

    fn int_attr(attributes: &[KeyValue], key: &str) -> i64 {
        match attr(attributes, key) {
            Some(any_value::Value::IntValue(i)) => *i,
            other => panic!("{key} is not an int: {other:?}"),
        }
    }

    fn two_processes() -> Vec<Span> {
        let client = probe(1, 10, "call");
        let server = Arc::new(crate::model::Probe {
            comm: "server".into(),
            exe: "/opt/srv/bin/server".into(),
            inlined_into: Some("main".into()),
            ..(*probe(2, 20, "handle")).clone()
        });
        let mut inlined = span(3, 2, &server, 21, 3_000, 0);
        inlined.flags = span_flags::INSTANT;
        vec![
            span(1, 0, &client, 10, 1_000, 10_000),
            span(2, 1, &server, 21, 2_000, 5_000),
            inlined,
        ]
    }

    #[test]
    fn request_groups_by_process_with_resource_attributes() {
        let request = build_request(&two_processes(), "host-a");
        assert_eq!(request.resource_spans.len(), 2);
        let client = &request.resource_spans[0];
        let attrs = &client.resource.as_ref().expect("resource").attributes;
        assert_eq!(str_attr(attrs, "host.name"), "host-a");
        assert_eq!(int_attr(attrs, "process.pid"), 10);
        assert_eq!(
            str_attr(attrs, "process.executable.path"),
            "/usr/bin/redis-server"
        );
        assert_eq!(str_attr(attrs, "process.executable.name"), "redis-server");
        assert_eq!(str_attr(attrs, "process.command"), "redis-server");
        assert_eq!(str_attr(attrs, "service.name"), "redis-server");
        let server = &request.resource_spans[1];
        let attrs = &server.resource.as_ref().expect("resource").attributes;
        assert_eq!(int_attr(attrs, "process.pid"), 20);
        assert_eq!(str_attr(attrs, "service.name"), "server");
        assert_eq!(str_attr(attrs, "process.executable.name"), "server");
        for rs in &request.resource_spans {
            assert_eq!(rs.scope_spans.len(), 1);
            let scope = rs.scope_spans[0].scope.as_ref().expect("scope");
            assert_eq!(scope.name, "scope");
            assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));
        }
        assert_eq!(client.scope_spans[0].spans.len(), 1);
        assert_eq!(server.scope_spans[0].spans.len(), 2);
    }

    #[test]
    fn spans_carry_ids_parents_times_and_attributes() {
        let request = build_request(&two_processes(), "h");
        let root = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(root.trace_id, TRACE.to_bytes().to_vec());
        assert_eq!(root.trace_id.len(), 16);
        assert_eq!(root.span_id, vec![0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(root.parent_span_id.is_empty(), "a root has no parent");
        assert_eq!(root.name, "call");
        assert_eq!(root.kind, otel::span::SpanKind::Internal as i32);
        assert_eq!(root.start_time_unix_nano, T0 + 1_000);
        assert_eq!(root.end_time_unix_nano - root.start_time_unix_nano, 10_000);
        assert_eq!(
            root.status.as_ref().map(|s| s.code),
            Some(otel::status::StatusCode::Unset as i32)
        );
        let a = &root.attributes;
        assert_eq!(str_attr(a, "code.function"), "call");
        assert_eq!(str_attr(a, "code.filepath"), "/src/redis/src/server.c");
        assert_eq!(int_attr(a, "code.lineno"), 101);
        assert_eq!(int_attr(a, "thread.id"), 10);
        assert_eq!(str_attr(a, "scope.module"), "/usr/bin/redis-server");
        assert_eq!(int_attr(a, "scope.return"), -1);
        match attr(a, "scope.args") {
            Some(any_value::Value::ArrayValue(array)) => {
                let args: Vec<_> = array.values.iter().map(|v| v.value.clone()).collect();
                assert_eq!(args.len(), 6);
                assert_eq!(
                    args[0],
                    Some(any_value::Value::StringValue("0x55d0c1e0a2c0".into()))
                );
                assert_eq!(
                    args[5],
                    Some(any_value::Value::StringValue("0xffffffffffffffff".into()))
                );
            }
            other => panic!("scope.args is not an array: {other:?}"),
        }
        assert!(attr(a, "scope.flags").is_none() && attr(a, "scope.inlined_into").is_none());

        let spans = &request.resource_spans[1].scope_spans[0].spans;
        let child = &spans[0];
        assert_eq!(child.parent_span_id, 1u64.to_be_bytes().to_vec());
        assert_eq!(child.trace_id, root.trace_id, "one trace across processes");
        assert_eq!(int_attr(&child.attributes, "thread.id"), 21);
        let inlined = &spans[1];
        assert_eq!(inlined.start_time_unix_nano, inlined.end_time_unix_nano);
        assert_eq!(str_attr(&inlined.attributes, "scope.inlined_into"), "main");
        assert!(
            attr(&inlined.attributes, "scope.return").is_none(),
            "no exit, no return"
        );
        match attr(&inlined.attributes, "scope.flags") {
            Some(any_value::Value::ArrayValue(array)) => assert_eq!(
                array.values[0].value,
                Some(any_value::Value::StringValue("inlined".into()))
            ),
            other => panic!("scope.flags: {other:?}"),
        }
    }

    #[test]
    fn endpoints_are_checked_with_advice() {
        let err = endpoint("localhost:4317").expect_err("no scheme");
        assert!(matches!(err, OtlpError::MissingScheme { .. }), "{err:?}");
        assert!(err.to_string().contains("http://localhost:4317"), "{err}");
        let err = endpoint("https://collector:4317").expect_err("tls");
        assert!(
            matches!(err, OtlpError::UnsupportedScheme { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("only plaintext http://"), "{err}");
        let err = endpoint("http://bad host:4317").expect_err("bad url");
        assert!(matches!(err, OtlpError::BadEndpoint { .. }), "{err:?}");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(endpoint("http://127.0.0.1:4317").is_ok());
        assert!(endpoint("http://[::1]:4317").is_ok());
    }

    /// An in-process OTLP receiver: records every request.
    #[derive(Clone, Default)]
    struct Receiver {
        requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.requests
                .lock()
                .expect("lock")
                .push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    impl Receiver {
        fn span_ids(&self) -> Vec<u64> {
            let mut ids: Vec<u64> = self
                .requests
                .lock()
                .expect("lock")
                .iter()
                .flat_map(|r| r.resource_spans.iter())
                .flat_map(|rs| rs.scope_spans.iter())
                .flat_map(|ss| ss.spans.iter())
                .map(|s| {
                    u64::from_be_bytes(s.span_id.as_slice().try_into().expect("8-byte span id"))
                })
                .collect();
            ids.sort_unstable();
            ids
        }

        fn request_sizes(&self) -> Vec<usize> {
            self.requests
                .lock()
                .expect("lock")
                .iter()
                .map(|r| {
                    r.resource_spans
                        .iter()
                        .flat_map(|rs| rs.scope_spans.iter())
                        .map(|ss| ss.spans.len())
                        .sum()
                })
                .collect()
        }
    }

    /// Starts a receiver on a free local port; returns it and its endpoint URL.
    async fn start_receiver() -> (Receiver, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .expect("receiver");
        });
        (receiver, url)
    }

    /// An endpoint nothing listens on.
    async fn dead_endpoint() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        drop(listener);
        url
    }

    fn many(n: u64) -> Vec<Span> {
        let p = probe(1, 10, "f");
        (1..=n).map(|i| span(i, 0, &p, 10, i * 10, 5)).collect()
    }

    #[tokio::test]
    async fn send_delivers_in_bounded_requests() {
        let (receiver, url) = start_receiver().await;
        let spans = many(4500);
        assert_eq!(send(&url, &spans).await.expect("send"), 4500);
        assert_eq!(receiver.request_sizes(), [2000, 2000, 500]);
        assert_eq!(receiver.span_ids(), (1..=4500).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn send_to_a_dead_collector_says_so() {
        let url = dead_endpoint().await;
        let err = send(&url, &many(3)).await.expect_err("nothing listens");
        assert!(matches!(err, OtlpError::Unreachable { .. }), "{err:?}");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.to_string().starts_with(&format!(
                "cannot reach the OpenTelemetry collector at {url}"
            )),
            "{err}"
        );
        let err = send("collector:4317", &many(1)).await.expect_err("bad url");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    fn quick(config: ExporterConfig) -> ExporterConfig {
        ExporterConfig {
            flush_interval: Duration::from_millis(50),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            ..config
        }
    }

    #[tokio::test]
    async fn continuous_exporter_batches_and_delivers_everything() {
        let (receiver, url) = start_receiver().await;
        let (handle, exporter) = continuous(
            &url,
            quick(ExporterConfig {
                max_batch_spans: 40,
                ..ExporterConfig::default()
            }),
        )
        .expect("exporter");
        let counters = Arc::clone(handle.counters());
        let task = tokio::spawn(exporter.run());
        let spans = many(100);
        for chunk in spans.chunks(15) {
            assert!(handle.offer(chunk.to_vec()));
        }
        // Time-based flush: what is below the size cap still goes out within an interval.
        tokio::time::timeout(Duration::from_secs(5), async {
            while receiver.span_ids().len() < 100 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("all spans arrive while the exporter runs");
        drop(handle);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the exporter stops when its handles are gone")
            .expect("task");
        assert_eq!(receiver.span_ids(), (1..=100).collect::<Vec<_>>());
        assert!(
            receiver.request_sizes().iter().all(|&n| n <= 40),
            "{:?}",
            receiver.request_sizes()
        );
        assert_eq!(counters.sent.get(), 100);
        assert_eq!(counters.dropped.get(), 0);
        assert_eq!(counters.failed_requests.get(), 0);
    }

    #[tokio::test]
    async fn continuous_exporter_flushes_what_is_left_when_stopped() {
        let (receiver, url) = start_receiver().await;
        let (handle, exporter) = continuous(
            &url,
            ExporterConfig {
                flush_interval: Duration::from_secs(3600),
                ..ExporterConfig::default()
            },
        )
        .expect("exporter");
        let counters = Arc::clone(handle.counters());
        assert!(handle.offer(many(7)));
        drop(handle);
        tokio::time::timeout(Duration::from_secs(5), exporter.run())
            .await
            .expect("stops");
        assert_eq!(receiver.span_ids().len(), 7);
        assert_eq!(counters.sent.get(), 7);
    }

    #[tokio::test]
    async fn a_dead_collector_counts_every_span_as_dropped() {
        let url = dead_endpoint().await;
        let (handle, exporter) = continuous(
            &url,
            quick(ExporterConfig {
                max_batch_spans: 10,
                send_attempts: 3,
                ..ExporterConfig::default()
            }),
        )
        .expect("exporter");
        let counters = Arc::clone(handle.counters());
        let task = tokio::spawn(exporter.run());
        assert!(handle.offer(many(25)));
        drop(handle);
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("gives up after its retries")
            .expect("task");
        assert_eq!(counters.dropped.get(), 25);
        assert_eq!(counters.sent.get(), 0);
        // Three requests (10, 10, 5 spans), each tried three times.
        assert_eq!(counters.failed_requests.get(), 9);
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        let url = dead_endpoint().await;
        let (handle, exporter) = continuous(
            &url,
            ExporterConfig {
                queue_batches: 1,
                ..ExporterConfig::default()
            },
        )
        .expect("exporter");
        // The exporter is not running: the first batch fills the queue.
        assert!(handle.offer(many(3)));
        assert!(!handle.offer(many(4)));
        assert_eq!(handle.counters().dropped.get(), 4);
        drop(exporter);
        assert!(!handle.offer(many(5)), "a stopped exporter takes nothing");
        assert_eq!(handle.counters().dropped.get(), 9);
        assert_eq!(
            handle.counters().snapshot(),
            [
                ("otlp.sent", 0),
                ("otlp.dropped", 9),
                ("otlp.failed_requests", 0)
            ]
        );
    }
}
