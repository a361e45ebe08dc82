//! The pipeline: takes decoded span batches from the reader, attributes them to their probe,
//! stores them and fans them out to live watchers. One task owns this path; every queue on
//! it is bounded and every span that does not fit is counted.

use std::sync::{Arc, Mutex, MutexGuard};

use scope_common::Span;
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::{
    probes::Registry,
    stats::{Count, DaemonStats},
    store::{SpanFilter, Store, StoredSpan},
};

/// Span batches queued between the reader and the pipeline.
pub const INGEST_QUEUE_BATCHES: usize = 1024;
/// Span batches queued for one live watcher before it starts losing them.
pub const WATCH_QUEUE_BATCHES: usize = 256;

/// A live subscriber (one Watch call).
struct Watcher {
    filter: SpanFilter,
    tx: mpsc::Sender<Vec<StoredSpan>>,
    dropped: Arc<Count>,
}

/// What a Watch call reads from.
pub struct Subscription {
    pub rx: mpsc::Receiver<Vec<StoredSpan>>,
    /// Spans this watcher lost because its queue was full.
    pub dropped: Arc<Count>,
}

/// State shared by the pipeline task and the API.
pub struct Pipeline {
    store: Mutex<Store>,
    watchers: Mutex<Vec<Watcher>>,
    registry: Arc<Registry>,
    stats: Arc<DaemonStats>,
}

impl Pipeline {
    pub fn new(store: Store, registry: Arc<Registry>, stats: Arc<DaemonStats>) -> Pipeline {
        Pipeline {
            store: Mutex::new(store),
            watchers: Mutex::new(Vec::new()),
            registry,
            stats,
        }
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn subscribe(&self, filter: SpanFilter) -> Subscription {
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
    pub async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Vec<Span>>) {
        while let Some(batch) = rx.recv().await {
            self.ingest(batch);
        }
    }

    fn ingest(&self, batch: Vec<Span>) {
        let stored: Vec<StoredSpan> = self.registry.with(|lookup| {
            batch
                .into_iter()
                .filter_map(|span| match lookup(span.probe_id) {
                    // A slot reused by another process's probe cannot be this span's probe.
                    Some(probe) if probe.pid == span.pid => {
                        probe.received.add(1);
                        Some(StoredSpan {
                            span,
                            probe: Arc::clone(probe),
                        })
                    }
                    _ => {
                        self.stats.orphaned.add(1);
                        None
                    }
                })
                .collect()
        });
        if stored.is_empty() {
            return;
        }
        self.fan_out(&stored);
        self.store().insert(stored);
    }

    fn fan_out(&self, stored: &[StoredSpan]) {
        self.watchers().retain(|watcher| {
            let matching: Vec<StoredSpan> = stored
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
