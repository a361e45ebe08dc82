//! The daemon's own counters: what happened to spans after they left the kernel.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing counter that any thread can bump.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters shared by the reader, the pipeline and the API.
#[derive(Debug, Default)]
pub struct DaemonStats {
    /// Spans decoded from the kernel rings.
    pub spans_received: Count,
    /// Ring records that were not a valid span (should stay 0; a layout mismatch otherwise).
    pub decode_errors: Count,
    /// Spans dropped because the pipeline's queue was full.
    pub pipeline_full: Count,
    /// Spans dropped because the pipeline had stopped (shutdown).
    pub pipeline_closed: Count,
    /// Spans whose probe slot was no longer registered (arrived after their session detached).
    pub orphaned: Count,
    /// Spans a live watcher did not receive because its queue was full (they are still stored).
    pub watch_dropped: Count,
    /// Fork/exec/exit events of traced processes decoded from the rings.
    pub process_events: Count,
    /// Process events dropped because the lifecycle queue was full (a fork not followed).
    pub lifecycle_full: Count,
    /// Reads and writes on pipes and sockets decoded from the rings.
    pub io_received: Count,
    /// Reads and writes dropped on the way to the store (queue full or shutdown).
    pub io_dropped: Count,
}

impl DaemonStats {
    /// Every counter by name, for the Status call and metrics.
    pub fn snapshot(&self) -> [(&'static str, u64); 10] {
        [
            ("daemon.spans_received", self.spans_received.get()),
            ("daemon.decode_errors", self.decode_errors.get()),
            ("daemon.pipeline_full", self.pipeline_full.get()),
            ("daemon.pipeline_closed", self.pipeline_closed.get()),
            ("daemon.orphaned", self.orphaned.get()),
            ("daemon.watch_dropped", self.watch_dropped.get()),
            ("daemon.process_events", self.process_events.get()),
            ("daemon.lifecycle_full", self.lifecycle_full.get()),
            ("daemon.io_received", self.io_received.get()),
            ("daemon.io_dropped", self.io_dropped.get()),
        ]
    }

    /// Spans lost after they left the kernel.
    pub fn lost(&self) -> u64 {
        self.decode_errors.get() + self.pipeline_full.get() + self.pipeline_closed.get()
    }
}
