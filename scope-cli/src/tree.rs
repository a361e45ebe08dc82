//! Rebuilds per-thread call trees from live spans.
//!
//! Spans arrive when calls *end*, so children come before their parents, and because the
//! kernel writes through per-CPU rings, a span can arrive slightly after one that ended later.
//! [`TreeBuilder`] holds spans per `(pid, tid)` until their root call has ended, waits a short
//! grace period for stragglers, and then hands out the whole tree.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use scope_proto::v1::Span;

/// Spans held while waiting for their root before the oldest waiting trees are printed as
/// incomplete, so a call that never returns cannot grow memory without bound.
pub const MAX_PENDING_SPANS: usize = 1_000_000;

/// How many printed span ids are remembered to recognise a child that arrives after its tree
/// was printed.
const REMEMBERED_PRINTED: usize = 65_536;

/// One call and the traced calls it made, children sorted by start time.
#[derive(Clone, Debug, PartialEq)]
pub struct CallTree {
    pub span: Span,
    pub children: Vec<CallTree>,
}

impl CallTree {
    /// Number of spans in the tree.
    pub fn len(&self) -> usize {
        1 + self.children.iter().map(CallTree::len).sum::<usize>()
    }
}

/// Why a tree is handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TreeKind {
    /// A root call (depth 0) that ended, with every child that arrived in time.
    Complete,
    /// A call whose parent was already printed: it arrived after the grace period.
    Late { parent_function: String },
    /// A call whose parent never arrived (it was still running, or its span was lost).
    Incomplete,
}

/// A tree ready to print.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadyTree {
    pub kind: TreeKind,
    pub tree: CallTree,
}

#[derive(Default)]
struct ThreadSpans {
    spans: HashMap<u64, Span>,
    /// parent span id → child span ids, also for parents that have not arrived yet.
    children: HashMap<u64, Vec<u64>>,
}

/// Top of a tree waiting out its grace period.
struct Waiting {
    ready_at: Instant,
    thread: (u32, u32),
    span_id: u64,
    kind: TreeKind,
}

/// Collects spans and releases whole call trees; see the module docs.
pub struct TreeBuilder {
    grace: Duration,
    max_pending: usize,
    threads: HashMap<(u32, u32), ThreadSpans>,
    waiting: Vec<Waiting>,
    pending: usize,
    printed: HashMap<u64, String>,
    printed_order: VecDeque<u64>,
}

impl TreeBuilder {
    pub fn new(grace: Duration) -> Self {
        Self::with_limit(grace, MAX_PENDING_SPANS)
    }

    pub fn with_limit(grace: Duration, max_pending: usize) -> Self {
        Self {
            grace,
            max_pending: max_pending.max(1),
            threads: HashMap::new(),
            waiting: Vec::new(),
            pending: 0,
            printed: HashMap::new(),
            printed_order: VecDeque::new(),
        }
    }

    /// Adds a span received at `now`. Returns trees forced out because too many spans were
    /// waiting (normally none).
    pub fn push(&mut self, span: Span, now: Instant) -> Vec<ReadyTree> {
        let thread = (span.pid, span.tid);
        let span_id = span.span_id;
        let is_root = span.parent_id == 0 || span.depth == 0;
        let parent_id = span.parent_id;
        let state = self.threads.entry(thread).or_default();
        if state.spans.insert(span_id, span).is_some() {
            // The same span twice (a retransmission); keep the newest copy, nothing to link.
            return Vec::new();
        }
        self.pending += 1;
        if is_root {
            self.waiting.push(Waiting {
                ready_at: now + self.grace,
                thread,
                span_id,
                kind: TreeKind::Complete,
            });
        } else {
            state.children.entry(parent_id).or_default().push(span_id);
            if let Some(parent) = self.printed.get(&parent_id) {
                self.waiting.push(Waiting {
                    ready_at: now + self.grace,
                    thread,
                    span_id,
                    kind: TreeKind::Late {
                        parent_function: parent.clone(),
                    },
                });
            }
        }
        if self.pending > self.max_pending {
            return self.finish();
        }
        Vec::new()
    }

    /// When the next waiting tree becomes ready, if any.
    pub fn next_ready_at(&self) -> Option<Instant> {
        self.waiting.iter().map(|w| w.ready_at).min()
    }

    /// Spans received but not yet handed out.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Trees whose grace period has passed at `now`, in the order their roots ended.
    pub fn take_ready(&mut self, now: Instant) -> Vec<ReadyTree> {
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.ready_at <= now);
        self.waiting = waiting;
        self.release(ready)
    }

    /// Everything still held: waiting trees first, then calls whose parent never arrived.
    pub fn finish(&mut self) -> Vec<ReadyTree> {
        let waiting = std::mem::take(&mut self.waiting);
        let mut out = self.release(waiting);
        let mut orphans: Vec<((u32, u32), u64, u64)> = Vec::new();
        for (&thread, state) in &self.threads {
            for span in state.spans.values() {
                if !state.spans.contains_key(&span.parent_id) {
                    orphans.push((thread, span.start_unix_ns, span.span_id));
                }
            }
        }
        orphans.sort_unstable();
        for (thread, _, span_id) in orphans {
            if let Some(tree) = self.take_tree(thread, span_id) {
                out.push(ReadyTree {
                    kind: TreeKind::Incomplete,
                    tree,
                });
            }
        }
        // Whatever is left has a parent chain that loops back on itself (bad ids from the
        // daemon); hand each span out alone rather than lose it.
        let mut leftovers: Vec<Span> = self
            .threads
            .drain()
            .flat_map(|(_, state)| state.spans.into_values())
            .collect();
        leftovers.sort_by_key(|s| (s.pid, s.tid, s.start_unix_ns, s.span_id));
        self.pending = 0;
        out.extend(leftovers.into_iter().map(|span| ReadyTree {
            kind: TreeKind::Incomplete,
            tree: CallTree {
                span,
                children: Vec::new(),
            },
        }));
        out
    }

    fn release(&mut self, mut tops: Vec<Waiting>) -> Vec<ReadyTree> {
        // Roots in the order they ended; ties (same thread, same moment) by start time.
        let end = |w: &Waiting, threads: &HashMap<(u32, u32), ThreadSpans>| {
            threads
                .get(&w.thread)
                .and_then(|t| t.spans.get(&w.span_id))
                .map(|s| {
                    (
                        s.start_unix_ns.saturating_add(s.duration_ns),
                        s.start_unix_ns,
                    )
                })
        };
        tops.sort_by_key(|w| (w.ready_at, end(w, &self.threads)));
        let mut out = Vec::new();
        for top in tops {
            if let Some(tree) = self.take_tree(top.thread, top.span_id) {
                out.push(ReadyTree {
                    kind: top.kind,
                    tree,
                });
            }
        }
        out
    }

    /// Removes the span and every descendant that has arrived, remembering them as printed.
    fn take_tree(&mut self, thread: (u32, u32), span_id: u64) -> Option<CallTree> {
        let state = self.threads.get_mut(&thread)?;
        let mut visiting = HashSet::new();
        let tree = take_subtree(state, span_id, &mut visiting)?;
        let parent_id = tree.span.parent_id;
        if let Some(siblings) = state.children.get_mut(&parent_id) {
            siblings.retain(|&id| id != span_id);
            if siblings.is_empty() {
                state.children.remove(&parent_id);
            }
        }
        if state.spans.is_empty() && state.children.is_empty() {
            self.threads.remove(&thread);
        }
        self.pending = self.pending.saturating_sub(tree.len());
        self.remember(&tree);
        Some(tree)
    }

    fn remember(&mut self, tree: &CallTree) {
        self.printed
            .insert(tree.span.span_id, tree.span.function.clone());
        self.printed_order.push_back(tree.span.span_id);
        while self.printed_order.len() > REMEMBERED_PRINTED {
            if let Some(old) = self.printed_order.pop_front() {
                self.printed.remove(&old);
            }
        }
        for child in &tree.children {
            self.remember(child);
        }
    }
}

fn take_subtree(
    state: &mut ThreadSpans,
    span_id: u64,
    visiting: &mut HashSet<u64>,
) -> Option<CallTree> {
    // A span listed as its own ancestor would loop forever; the ids come from the daemon, so
    // do not trust them blindly.
    if !visiting.insert(span_id) {
        return None;
    }
    let span = state.spans.remove(&span_id)?;
    let mut children: Vec<CallTree> = state
        .children
        .remove(&span_id)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|child| take_subtree(state, child, visiting))
        .collect();
    children.sort_by_key(|c| (c.span.start_unix_ns, c.span.span_id));
    Some(CallTree { span, children })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(pid: u32, tid: u32, id: u64, parent: u64, depth: u32, start: u64, dur: u64) -> Span {
        Span {
            span_id: id,
            parent_id: parent,
            pid,
            tid,
            depth,
            function: format!("f{id}"),
            start_unix_ns: start,
            duration_ns: dur,
            ..Span::default()
        }
    }

    /// The tree as `id(child, child(grandchild))` for compact assertions.
    fn shape(tree: &CallTree) -> String {
        if tree.children.is_empty() {
            return tree.span.span_id.to_string();
        }
        let children: Vec<String> = tree.children.iter().map(shape).collect();
        format!("{}({})", tree.span.span_id, children.join(","))
    }

    #[test]
    fn children_before_parent_make_one_tree_after_grace() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::new(Duration::from_millis(100));
        // Calls end in this order: 3 (2nd child), 2 (1st child, later end), then root 1.
        assert!(b.push(span(1, 1, 3, 1, 1, 300, 10), t0).is_empty());
        assert!(b.push(span(1, 1, 2, 1, 1, 200, 50), t0).is_empty());
        assert!(b.push(span(1, 1, 1, 0, 0, 100, 500), t0).is_empty());
        assert_eq!(b.next_ready_at(), Some(t0 + Duration::from_millis(100)));
        assert!(b.take_ready(t0 + Duration::from_millis(50)).is_empty());
        let ready = b.take_ready(t0 + Duration::from_millis(100));
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].kind, TreeKind::Complete);
        // Children sorted by start time, not arrival.
        assert_eq!(shape(&ready[0].tree), "1(2,3)");
        assert_eq!(b.pending(), 0);
        assert!(b.finish().is_empty());
    }

    #[test]
    fn grandchildren_nest_under_their_parents() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::new(Duration::from_millis(100));
        b.push(span(7, 7, 4, 2, 2, 210, 5), t0);
        b.push(span(7, 7, 5, 2, 2, 220, 5), t0);
        b.push(span(7, 7, 2, 1, 1, 200, 50), t0);
        b.push(span(7, 7, 6, 3, 2, 310, 5), t0);
        b.push(span(7, 7, 3, 1, 1, 300, 50), t0);
        b.push(span(7, 7, 1, 0, 0, 100, 500), t0);
        let ready = b.take_ready(t0 + Duration::from_secs(1));
        assert_eq!(ready.len(), 1);
        assert_eq!(shape(&ready[0].tree), "1(2(4,5),3(6))");
        assert_eq!(ready[0].tree.len(), 6);
    }

    #[test]
    fn out_of_order_child_arriving_after_root_within_grace_is_included() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::new(Duration::from_millis(100));
        b.push(span(1, 2, 10, 0, 0, 100, 500), t0);
        // The children were on another CPU's ring and arrive after the root.
        b.push(
            span(1, 2, 12, 10, 1, 300, 20),
            t0 + Duration::from_millis(30),
        );
        b.push(
            span(1, 2, 13, 12, 2, 305, 5),
            t0 + Duration::from_millis(60),
        );
        b.push(
            span(1, 2, 11, 10, 1, 150, 20),
            t0 + Duration::from_millis(90),
        );
        let ready = b.take_ready(t0 + Duration::from_millis(100));
        assert_eq!(ready.len(), 1);
        assert_eq!(shape(&ready[0].tree), "10(11,12(13))");
    }

    #[test]
    fn two_threads_interleaved_stay_apart() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::new(Duration::from_millis(100));
        // Thread 11 and thread 12 of pid 10 interleave their spans.
        b.push(span(10, 11, 101, 100, 1, 110, 5), t0);
        b.push(span(10, 12, 201, 200, 1, 115, 5), t0);
        b.push(span(10, 12, 202, 200, 1, 125, 5), t0);
        b.push(span(10, 11, 100, 0, 0, 100, 50), t0);
        b.push(
            span(10, 11, 102, 100, 1, 120, 5),
            t0 + Duration::from_millis(10),
        );
        b.push(
            span(10, 12, 200, 0, 0, 105, 60),
            t0 + Duration::from_millis(20),
        );
        let early = b.take_ready(t0 + Duration::from_millis(105));
        assert_eq!(early.len(), 1);
        assert_eq!((early[0].tree.span.pid, early[0].tree.span.tid), (10, 11));
        assert_eq!(shape(&early[0].tree), "100(101,102)");
        let late = b.take_ready(t0 + Duration::from_millis(120));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].tree.span.tid, 12);
        assert_eq!(shape(&late[0].tree), "200(201,202)");
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn same_span_ids_in_two_threads_do_not_mix() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::new(Duration::ZERO);
        b.push(span(1, 1, 2, 1, 1, 10, 1), t0);
        b.push(span(1, 9, 3, 1, 1, 10, 1), t0);
        b.push(span(1, 1, 1, 0, 0, 5, 10), t0);
        let ready = b.take_ready(t0);
        assert_eq!(shape(&ready[0].tree), "1(2)");
        let rest = b.finish();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].kind, TreeKind::Incomplete);
        assert_eq!(rest[0].tree.span.tid, 9);
    }

    #[test]
    fn child_after_its_printed_root_is_reported_late() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::new(Duration::from_millis(100));
        b.push(span(1, 1, 1, 0, 0, 100, 500), t0);
        assert_eq!(b.take_ready(t0 + Duration::from_millis(100)).len(), 1);
        // Grandchild first, then its parent, both after the root was printed.
        b.push(span(1, 1, 3, 2, 2, 210, 5), t0 + Duration::from_millis(150));
        b.push(
            span(1, 1, 2, 1, 1, 200, 50),
            t0 + Duration::from_millis(160),
        );
        let ready = b.take_ready(t0 + Duration::from_millis(260));
        assert_eq!(ready.len(), 1);
        assert_eq!(
            ready[0].kind,
            TreeKind::Late {
                parent_function: "f1".into()
            }
        );
        assert_eq!(shape(&ready[0].tree), "2(3)");
    }

    #[test]
    fn finish_returns_waiting_roots_then_orphans() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::new(Duration::from_secs(10));
        // A call whose parent is still running when tracing stops.
        b.push(span(1, 1, 5, 4, 1, 50, 5), t0);
        b.push(span(1, 1, 6, 5, 2, 51, 1), t0);
        b.push(span(1, 1, 1, 0, 0, 10, 5), t0);
        let out = b.finish();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].kind, TreeKind::Complete);
        assert_eq!(shape(&out[0].tree), "1");
        assert_eq!(out[1].kind, TreeKind::Incomplete);
        assert_eq!(shape(&out[1].tree), "5(6)");
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn too_many_pending_spans_are_forced_out() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::with_limit(Duration::from_secs(10), 3);
        assert!(b.push(span(1, 1, 2, 1, 1, 1, 1), t0).is_empty());
        assert!(b.push(span(1, 1, 3, 1, 1, 2, 1), t0).is_empty());
        assert!(b.push(span(1, 1, 4, 1, 1, 3, 1), t0).is_empty());
        let forced = b.push(span(1, 1, 5, 1, 1, 4, 1), t0);
        assert_eq!(forced.len(), 4);
        assert!(forced.iter().all(|t| t.kind == TreeKind::Incomplete));
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn duplicate_and_self_parented_spans_do_not_hang() {
        let t0 = Instant::now();
        let mut b = TreeBuilder::new(Duration::ZERO);
        b.push(span(1, 1, 1, 0, 0, 1, 10), t0);
        b.push(span(1, 1, 1, 0, 0, 1, 10), t0);
        b.push(span(1, 1, 9, 9, 1, 1, 10), t0);
        assert_eq!(b.take_ready(t0).len(), 1);
        let rest = b.finish();
        assert_eq!(rest.len(), 1, "a self-parented span is still handed out");
        assert_eq!(rest[0].tree.span.span_id, 9);
        assert_eq!(b.pending(), 0);
    }
}
