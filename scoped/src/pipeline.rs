//! The pipeline: takes decoded kernel span batches from the reader, attributes them to their
//! probe (names, Unix time, store-wide ids), fans them out to live watchers and hands them to
//! the store. One task owns this path; every queue on it is bounded and every span that does
//! not fit is counted.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::{
    export::otlp::ExporterHandle,
    glob::Glob,
    model::{Clock, IdScheme, Io, Span},
    probes::Registry,
    reader::Batch,
    stats::{Count, DaemonStats},
    store::Store,
};

/// Span batches queued between the reader and the pipeline. A batch holds at most
/// `reader::BATCH_SPANS` (4096) kernel spans of 128 bytes: at most 32 MiB waiting here.
pub const INGEST_QUEUE_BATCHES: usize = 64;
/// Fork/exec/exit events queued for the lifecycle task (they are rare; a full queue means a
/// fork storm, and each event lost is counted).
pub const LIFECYCLE_QUEUE_EVENTS: usize = 4096;
/// Span batches queued for one live watcher before it starts losing them (and counting).
pub const WATCH_QUEUE_BATCHES: usize = 64;

/// Which live spans a watcher wants. `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct WatchFilter {
    /// Only spans of sessions this uid owns (what a non-root caller may see).
    pub owner: Option<u32>,
    pub session_id: Option<u64>,
    pub pid: Option<u32>,
    pub function: Option<Glob>,
}

impl WatchFilter {
    pub fn matches(&self, span: &Span) -> bool {
        self.owner.is_none_or(|uid| span.probe.owner_uid == uid)
            && self.session_id.is_none_or(|id| span.probe.session_id == id)
            && self.pid.is_none_or(|pid| span.pid == pid)
            && self.function.as_ref().is_none_or(|glob| {
                glob.matches(&span.probe.function) || glob.matches(&span.probe.symbol)
            })
    }
}

/// A live subscriber (one Watch call, or an exporter).
struct Watcher {
    filter: WatchFilter,
    tx: mpsc::Sender<Vec<Span>>,
    dropped: Arc<Count>,
}

/// What a subscriber reads from.
pub struct Subscription {
    pub rx: mpsc::Receiver<Vec<Span>>,
    /// Spans this subscriber lost because its queue was full.
    pub dropped: Arc<Count>,
}

/// State shared by the pipeline task and the API.
pub struct Pipeline {
    store: Arc<Store>,
    watchers: Mutex<Vec<Watcher>>,
    registry: Arc<Registry>,
    stats: Arc<DaemonStats>,
    clock: Clock,
    ids: IdScheme,
    /// The continuous OTLP exporter (`--otlp-endpoint`), if any.
    exporter: Option<ExporterHandle>,
}

impl Pipeline {
    pub fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        stats: Arc<DaemonStats>,
        ids: IdScheme,
        exporter: Option<ExporterHandle>,
    ) -> Pipeline {
        Pipeline {
            store,
            watchers: Mutex::new(Vec::new()),
            registry,
            stats,
            clock: Clock::now(),
            ids,
            exporter,
        }
    }

    pub fn subscribe(&self, filter: WatchFilter) -> Subscription {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE_BATCHES);
        let dropped = Arc::new(Count::default());
        self.watchers().push(Watcher {
            filter,
            tx,
            dropped: Arc::clone(&dropped),
        });
        Subscription { rx, dropped }
    }

    fn watchers(&self) -> MutexGuard<'_, Vec<Watcher>> {
        self.watchers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs until the reader's side of `rx` is gone.
    pub async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Batch>) {
        while let Some(batch) = rx.recv().await {
            if !batch.io.is_empty() {
                let io = batch
                    .io
                    .iter()
                    .map(|event| Io::from_kernel(event, self.clock, self.ids))
                    .collect();
                self.store.append_io(io);
            }
            self.ingest(batch.spans, batch.texts);
        }
    }

    /// Attributes kernel span records to their probes and hands them on (watchers, exporter,
    /// store), with the strings that came with some of them (`texts`, by kernel span id).
    /// The reader's batches come through [`Pipeline::run`]; the daemon calls this for spans
    /// it makes itself (Go calls open when their process exited).
    pub fn ingest(&self, batch: Vec<scope_common::Span>, texts: Vec<(u64, Vec<String>)>) {
        let mut spans: Vec<Span> = self.registry.with(|lookup| {
            batch
                .iter()
                .filter_map(|span| match lookup(span.probe_id) {
                    // A slot reused by another process's probe cannot be this span's probe.
                    Some(live) if live.probe.pid == span.pid => {
                        live.received.add(1);
                        Some(Span::from_kernel(
                            span,
                            Arc::clone(&live.probe),
                            self.clock,
                            self.ids,
                        ))
                    }
                    _ => {
                        self.stats.orphaned.add(1);
                        None
                    }
                })
                .collect()
        });
        if spans.is_empty() {
            return;
        }
        if !texts.is_empty() {
            attach_texts(&mut spans, texts, self.ids);
        }
        self.fan_out(&spans);
        if let Some(exporter) = &self.exporter {
            // Never blocks: what does not fit is counted in otlp.dropped.
            exporter.offer(spans.clone());
        }
        if !self.store.append(spans) {
            self.registry.count_lost(&batch);
        }
    }

    fn fan_out(&self, spans: &[Span]) {
        self.watchers().retain(|watcher| {
            let matching: Vec<Span> = spans
                .iter()
                .filter(|s| watcher.filter.matches(s))
                .cloned()
                .collect();
            if matching.is_empty() {
                return !watcher.tx.is_closed();
            }
            let count = matching.len() as u64;
            match watcher.tx.try_send(matching) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    watcher.dropped.add(count);
                    self.stats.watch_dropped.add(count);
                    true
                }
                Err(TrySendError::Closed(_)) => false,
            }
        });
    }
}

/// Gives each span that came with strings its text.
fn attach_texts(spans: &mut [Span], texts: Vec<(u64, Vec<String>)>, ids: IdScheme) {
    let mut texts: std::collections::HashMap<u64, Vec<String>> = texts
        .into_iter()
        .map(|(id, strings)| (ids.span(id), strings))
        .collect();
    for span in spans {
        if let Some(strings) = texts.remove(&span.id) {
            span.text = Some(crate::usdt::text(
                &span.probe.function,
                &strings,
                &span.args,
            ));
        }
    }
}
