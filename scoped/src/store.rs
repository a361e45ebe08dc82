//! The span store: a bounded in-memory ring of the most recent spans. When it is full the
//! oldest spans are evicted and counted. (A durable SQLite store replaces it later; the
//! query interface stays.)

use std::{collections::VecDeque, sync::Arc};

use scope_common::Span;

use crate::{glob::Glob, probes::ProbeInfo};

/// Default capacity in spans (about 128 bytes each, plus the probe reference).
pub const DEFAULT_MAX_SPANS: usize = 1_000_000;

/// A span as received from the kernel, with the probe it belongs to.
#[derive(Clone, Debug)]
pub struct StoredSpan {
    pub span: Span,
    pub probe: Arc<ProbeInfo>,
}

/// Which spans a query or a watcher wants. Empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct SpanFilter {
    pub session_id: Option<u64>,
    pub pid: Option<u32>,
    pub function: Option<Glob>,
}

impl SpanFilter {
    pub fn matches(&self, stored: &StoredSpan) -> bool {
        self.pid.is_none_or(|pid| stored.span.pid == pid) && self.wants_probe(&stored.probe)
    }

    /// The part of the filter that depends only on the probe.
    pub fn wants_probe(&self, probe: &ProbeInfo) -> bool {
        self.session_id.is_none_or(|id| probe.session_id == id)
            && self
                .function
                .as_ref()
                .is_none_or(|glob| glob.matches(&probe.function) || glob.matches(&probe.symbol))
    }
}

#[derive(Debug)]
pub struct Store {
    spans: VecDeque<StoredSpan>,
    capacity: usize,
    evicted: u64,
}

impl Store {
    pub fn new(capacity: usize) -> Store {
        Store {
            spans: VecDeque::new(),
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    pub fn insert(&mut self, batch: impl IntoIterator<Item = StoredSpan>) {
        for span in batch {
            if self.spans.len() == self.capacity {
                self.spans.pop_front();
                self.evicted += 1;
            }
            self.spans.push_back(span);
        }
    }

    /// The most recent `limit` spans matching `filter` (all with `limit == 0`), in start order.
    pub fn query(&self, filter: &SpanFilter, limit: usize) -> Vec<StoredSpan> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        // Decide once per probe, not once per span: the glob is the expensive part.
        let mut verdicts: std::collections::HashMap<*const ProbeInfo, bool> = Default::default();
        let mut found: Vec<StoredSpan> = Vec::new();
        for stored in self.spans.iter().rev() {
            if found.len() >= limit {
                break;
            }
            let probe_ok = *verdicts
                .entry(Arc::as_ptr(&stored.probe))
                .or_insert_with(|| filter.wants_probe(&stored.probe));
            if probe_ok && filter.pid.is_none_or(|pid| stored.span.pid == pid) {
                found.push(stored.clone());
            }
        }
        // Arrival order is exit order (and per-CPU rings interleave); users read calls in
        // the order they started.
        found.sort_by_key(|s| s.span.start_ns);
        found
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn evicted(&self) -> u64 {
        self.evicted
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::stats::Count;

    fn probe(session_id: u64, function: &str) -> Arc<ProbeInfo> {
        Arc::new(ProbeInfo {
            slot: 0,
            session_id,
            pid: 1,
            function: function.to_owned(),
            symbol: function.to_owned(),
            module: PathBuf::from("/bin/x"),
            address: 0,
            file_offset: 0,
            file: None,
            line: None,
            inlined_into: None,
            received: Count::default(),
        })
    }

    fn span(pid: u32, start: u64, probe: &Arc<ProbeInfo>) -> StoredSpan {
        StoredSpan {
            span: Span {
                pid,
                start_ns: start,
                ..Span::default()
            },
            probe: Arc::clone(probe),
        }
    }

    #[test]
    fn evicts_oldest_and_counts() {
        let p = probe(1, "f");
        let mut store = Store::new(3);
        store.insert((0..5).map(|i| span(1, i, &p)));
        assert_eq!(store.len(), 3);
        assert_eq!(store.evicted(), 2);
        let all = store.query(&SpanFilter::default(), 0);
        assert_eq!(
            all.iter().map(|s| s.span.start_ns).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }

    #[test]
    fn filters_and_limits_keep_the_newest_in_order() {
        let f = probe(1, "demo::fib");
        let g = probe(2, "main");
        let mut store = Store::new(100);
        store.insert((0..10).map(|i| {
            span(
                if i % 2 == 0 { 7 } else { 8 },
                i,
                if i < 6 { &f } else { &g },
            )
        }));
        let by_func = SpanFilter {
            function: Some(Glob::new("*fib").expect("glob")),
            ..Default::default()
        };
        assert_eq!(store.query(&by_func, 0).len(), 6);
        let newest_two = store.query(&by_func, 2);
        assert_eq!(
            newest_two
                .iter()
                .map(|s| s.span.start_ns)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
        let by_pid = SpanFilter {
            pid: Some(8),
            ..Default::default()
        };
        assert!(store.query(&by_pid, 0).iter().all(|s| s.span.pid == 8));
        let by_session = SpanFilter {
            session_id: Some(2),
            ..Default::default()
        };
        assert_eq!(store.query(&by_session, 0).len(), 4);
    }
}
