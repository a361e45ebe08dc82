//! Flame graphs of stored call trees.
//!
//! A span's stack is its chain of ancestors through `parent_id` within the exported spans,
//! root first (`main_loop;processCommand;call`); a span whose parent is not among them starts
//! its own stack. The weight of a stack is the *self* time of its spans in nanoseconds: each
//! span's duration minus the durations of its direct children among the exported spans,
//! floored at 0 (a child can outlast its parent by clock skew between CPUs, or when it runs
//! on another thread). So a frame's width in the graph is the time spent in that call,
//! children included, and the graph's total width is the time the root calls took.
//!
//! Unlike a sampling profiler's flame graph, widths are exact traced time, not sample counts,
//! and only traced functions appear: time in untraced callees counts as the caller's self time.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, Write};

use crate::model::Span;

/// The title of a flame graph unless the caller gives one.
pub const DEFAULT_TITLE: &str = "scope: time in traced calls";

/// What a flame graph is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlameFormat {
    /// An SVG image (inferno), interactive in a browser.
    Svg,
    /// Brendan Gregg's folded stacks, `outer;inner self_time_ns` per line.
    Folded,
}

#[derive(Clone, Debug)]
pub struct FlameOptions {
    /// The SVG's title.
    pub title: String,
    /// Put `comm (pid)` below every root call, so processes get separate towers.
    pub process_root: bool,
}

impl Default for FlameOptions {
    fn default() -> Self {
        FlameOptions {
            title: DEFAULT_TITLE.to_owned(),
            process_root: true,
        }
    }
}

/// Why no flame graph could be drawn.
#[derive(Debug, thiserror::Error)]
pub enum FlameError {
    #[error("no spans to draw: none match the filter (see `scope calls` for what is stored)")]
    NoSpans,
    #[error(
        "the {spans} matching spans take no time (inlined call sites have no duration); \
         a flame graph needs calls with an exit"
    )]
    NoTime { spans: usize },
    #[error("cannot render the flame graph")]
    Render {
        #[source]
        source: io::Error,
    },
}

impl FlameError {
    /// The gRPC status code the daemon should answer with.
    pub fn code(&self) -> tonic::Code {
        match self {
            FlameError::NoSpans => tonic::Code::NotFound,
            FlameError::NoTime { .. } => tonic::Code::FailedPrecondition,
            FlameError::Render { .. } => tonic::Code::Internal,
        }
    }
}

/// The flame graph of `spans` in `format`.
pub fn render(
    spans: &[Span],
    format: FlameFormat,
    options: &FlameOptions,
) -> Result<Vec<u8>, FlameError> {
    if spans.is_empty() {
        return Err(FlameError::NoSpans);
    }
    match format {
        FlameFormat::Svg => svg(spans, options),
        FlameFormat::Folded => {
            let mut out = Vec::new();
            write_folded(spans, options.process_root, &mut out)
                .map_err(|source| FlameError::Render { source })?;
            Ok(out)
        }
    }
}

/// Folded stacks: one `(stack, self time in ns)` per distinct stack with a non-zero weight,
/// sorted by stack (the order flame graph renderers want).
pub fn folded(spans: &[Span], process_root: bool) -> Vec<(String, u64)> {
    let mut stacks = Stacks::default();
    let index: HashMap<u64, usize> = spans
        .iter()
        .enumerate()
        .rev() // the first span with an id wins
        .map(|(i, s)| (s.id, i))
        .collect();
    let parent_of = |i: usize| -> Option<usize> {
        let span = &spans[i];
        if span.parent_id == 0 {
            return None;
        }
        index.get(&span.parent_id).copied().filter(|&p| p != i)
    };

    let mut children_ns = vec![0u64; spans.len()];
    for (i, span) in spans.iter().enumerate() {
        if let Some(p) = parent_of(i) {
            children_ns[p] = children_ns[p].saturating_add(span.duration_ns);
        }
    }

    // Each span's node in the tree of stacks, found by walking up to the first ancestor
    // whose node is known (or a root). Iterative: a chain can be as deep as the span count.
    const UNKNOWN: usize = usize::MAX;
    const ON_PATH: usize = usize::MAX - 1;
    let mut node_of = vec![UNKNOWN; spans.len()];
    let mut path = Vec::new();
    for start in 0..spans.len() {
        if node_of[start] != UNKNOWN {
            continue;
        }
        path.clear();
        let mut current = start;
        let mut base = loop {
            path.push(current);
            node_of[current] = ON_PATH;
            match parent_of(current) {
                Some(p) if node_of[p] == UNKNOWN => current = p,
                // A cycle of parent ids (corrupt data): cut it here.
                Some(p) if node_of[p] == ON_PATH => {
                    break stacks.root_of(&spans[current], process_root);
                }
                Some(p) => break node_of[p],
                None => break stacks.root_of(&spans[current], process_root),
            }
        };
        for &i in path.iter().rev() {
            base = stacks.child(base, frame_name(&spans[i].probe.function));
            node_of[i] = base;
        }
    }

    for (i, span) in spans.iter().enumerate() {
        let own = span.duration_ns.saturating_sub(children_ns[i]);
        let weight = &mut stacks.weights[node_of[i]];
        *weight = weight.saturating_add(own);
    }
    stacks.lines()
}

/// Writes the folded stacks, one `stack weight` line each.
pub fn write_folded(spans: &[Span], process_root: bool, out: &mut impl Write) -> io::Result<()> {
    for (stack, weight) in folded(spans, process_root) {
        writeln!(out, "{stack} {weight}")?;
    }
    out.flush()
}

/// An SVG flame graph of `spans` (inferno), titled `options.title`.
pub fn svg(spans: &[Span], options: &FlameOptions) -> Result<Vec<u8>, FlameError> {
    if spans.is_empty() {
        return Err(FlameError::NoSpans);
    }
    let lines: Vec<String> = folded(spans, options.process_root)
        .into_iter()
        .map(|(stack, weight)| format!("{stack} {weight}"))
        .collect();
    if lines.is_empty() {
        return Err(FlameError::NoTime { spans: spans.len() });
    }
    let mut inferno = inferno::flamegraph::Options::default();
    inferno.title = options.title.clone();
    inferno.subtitle = Some(format!(
        "{} traced calls; width is time in the call (children included)",
        spans.len()
    ));
    inferno.count_name = "ns".to_owned();
    inferno.name_type = "Function:".to_owned();
    let mut out = Vec::new();
    inferno::flamegraph::from_lines(&mut inferno, lines.iter().map(String::as_str), &mut out)
        .map_err(|source| FlameError::Render { source })?;
    Ok(out)
}

/// A frame's name as folded stacks allow it: no `;` (the separator) and no line breaks.
fn frame_name(function: &str) -> Cow<'_, str> {
    if function.is_empty() {
        Cow::Borrowed("?")
    } else if function.contains([';', '\n', '\r']) {
        Cow::Owned(function.replace(';', ":").replace(['\n', '\r'], " "))
    } else {
        Cow::Borrowed(function)
    }
}

/// The tree of distinct stacks: node 0 is the empty stack, every other node one frame.
struct Stacks<'a> {
    parent: Vec<usize>,
    name: Vec<Cow<'a, str>>,
    weights: Vec<u64>,
    children: HashMap<(usize, Cow<'a, str>), usize>,
}

impl Default for Stacks<'_> {
    fn default() -> Self {
        Stacks {
            parent: vec![0],
            name: vec![Cow::Borrowed("")],
            weights: vec![0],
            children: HashMap::new(),
        }
    }
}

impl<'a> Stacks<'a> {
    fn child(&mut self, parent: usize, name: Cow<'a, str>) -> usize {
        if let Some(&node) = self.children.get(&(parent, name.clone())) {
            return node;
        }
        let node = self.parent.len();
        self.parent.push(parent);
        self.name.push(name.clone());
        self.weights.push(0);
        self.children.insert((parent, name), node);
        node
    }

    /// Where a root span's stack starts.
    fn root_of(&mut self, span: &Span, process_root: bool) -> usize {
        if process_root {
            let comm = frame_name(&span.probe.comm).into_owned();
            self.child(0, Cow::Owned(format!("{comm} ({})", span.pid)))
        } else {
            0
        }
    }

    fn lines(&self) -> Vec<(String, u64)> {
        let mut lines: Vec<(String, u64)> = Vec::new();
        let mut frames = Vec::new();
        for (node, &weight) in self.weights.iter().enumerate() {
            if weight == 0 || node == 0 {
                continue;
            }
            frames.clear();
            let mut current = node;
            while current != 0 {
                frames.push(self.name[current].as_ref());
                current = self.parent[current];
            }
            frames.reverse();
            lines.push((frames.join(";"), weight));
        }
        lines.sort_unstable();
        lines
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::export::fixtures::{probe, span};
    use crate::model::Probe;

    /// main_loop (1000 ns)
    /// ├─ processCommand (600)
    /// │  ├─ call (200)
    /// │  └─ call (100)
    /// └─ processCommand (100)
    /// orphan (50; its parent was not exported)
    /// skewed (10) └─ inner (20): the child outlasts its parent
    /// dictFind (0 ns, inlined): no weight, no line
    fn tree() -> Vec<Span> {
        let main = probe(1, 10, "main_loop");
        let process = probe(2, 10, "processCommand");
        let call = probe(3, 10, "call");
        let orphan = probe(4, 10, "orphan");
        let skewed = probe(5, 10, "skewed");
        let inner = probe(6, 10, "inner");
        let inlined = probe(7, 10, "dictFind");
        vec![
            span(1, 0, &main, 10, 0, 1_000),
            span(2, 1, &process, 10, 100, 600),
            span(3, 2, &call, 10, 200, 200),
            span(4, 2, &call, 10, 450, 100),
            span(5, 1, &process, 10, 800, 100),
            span(6, 999, &orphan, 11, 0, 50),
            span(7, 0, &skewed, 12, 0, 10),
            span(8, 7, &inner, 12, 0, 20),
            span(9, 3, &inlined, 10, 250, 0),
        ]
    }

    fn lines(folded: Vec<(String, u64)>) -> Vec<String> {
        folded
            .into_iter()
            .map(|(stack, weight)| format!("{stack} {weight}"))
            .collect()
    }

    #[test]
    fn folded_stacks_weigh_self_time_and_merge() {
        assert_eq!(
            lines(folded(&tree(), false)),
            [
                "main_loop 300",
                "main_loop;processCommand 400",
                "main_loop;processCommand;call 300",
                "orphan 50",
                "skewed;inner 20",
            ]
        );
    }

    #[test]
    fn processes_get_their_own_root_frame() {
        let mut spans = tree();
        let other = Arc::new(Probe {
            comm: "redis-cli".into(),
            ..(*probe(8, 20, "main_loop")).clone()
        });
        spans.push(span(20, 0, &other, 20, 0, 70));
        assert_eq!(
            lines(folded(&spans, true)),
            [
                "redis-cli (20);main_loop 70",
                "redis-server (10);main_loop 300",
                "redis-server (10);main_loop;processCommand 400",
                "redis-server (10);main_loop;processCommand;call 300",
                "redis-server (10);orphan 50",
                "redis-server (10);skewed;inner 20",
            ]
        );
    }

    #[test]
    fn a_cross_process_child_stays_under_its_parent() {
        let client = probe(1, 10, "call");
        let server = Arc::new(Probe {
            comm: "server".into(),
            ..(*probe(2, 20, "handle")).clone()
        });
        let spans = [
            span(1, 0, &client, 10, 0, 100),
            span(2, 1, &server, 21, 10, 60),
        ];
        assert_eq!(
            lines(folded(&spans, true)),
            [
                "redis-server (10);call 40",
                "redis-server (10);call;handle 60"
            ]
        );
    }

    #[test]
    fn odd_names_and_cycles_do_not_break_the_format() {
        let weird = probe(1, 10, "operator;\nthing");
        let unnamed = probe(2, 10, "");
        // 5 → 6 → 5: corrupt parent links must not hang.
        let spans = [
            span(5, 6, &weird, 10, 0, 30),
            span(6, 5, &unnamed, 10, 0, 10),
        ];
        // The cycle is cut where the walk finds it: 6 becomes a root, 5 its child. Each is
        // the other's child for self time, so only 5 (30 - 10 ns) has weight.
        assert_eq!(lines(folded(&spans, false)), ["?;operator: thing 20"]);
    }

    #[test]
    fn render_folded_is_the_text_form() {
        let bytes = render(&tree(), FlameFormat::Folded, &FlameOptions::default()).expect("render");
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(
            text.starts_with("redis-server (10);main_loop 300\n"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 5);
    }

    #[test]
    fn svg_is_well_formed_and_names_every_function() {
        use quick_xml::{Reader, events::Event};

        let options = FlameOptions {
            title: "redis <latency> & more".into(),
            process_root: true,
        };
        let bytes = svg(&tree(), &options).expect("svg");
        let text = String::from_utf8(bytes).expect("utf-8");
        let mut reader = Reader::from_str(&text);
        reader.config_mut().check_end_names = true;
        let mut depth = 0i32;
        let mut in_title = false;
        let mut titles: Vec<String> = Vec::new();
        let mut texts = String::new();
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(e) => {
                    depth += 1;
                    in_title = e.name().as_ref() == b"title";
                    if in_title {
                        titles.push(String::new());
                    }
                }
                Event::End(_) => {
                    depth -= 1;
                    in_title = false;
                }
                Event::Text(t) => {
                    let t = t.decode().expect("text");
                    if in_title && let Some(last) = titles.last_mut() {
                        last.push_str(&t);
                    }
                    texts.push_str(&t);
                }
                Event::GeneralRef(r) => texts.push_str(&format!("&{};", r.decode().expect("ref"))),
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(depth, 0, "every element is closed");
        for function in [
            "main_loop",
            "processCommand",
            "call",
            "orphan",
            "inner",
            "redis-server (10)",
        ] {
            assert!(
                titles
                    .iter()
                    .any(|t| t.starts_with(&format!("{function} ("))),
                "a frame for {function} in {titles:?}"
            );
        }
        // The weight of a frame is its inclusive time: processCommand is 700 ns of 1080.
        assert!(
            titles
                .iter()
                .any(|t| t.starts_with("processCommand (700 ns")),
            "{titles:?}"
        );
        assert!(
            texts.contains("redis &lt;latency&gt; &amp; more"),
            "the title is escaped: {texts}"
        );
    }

    #[test]
    fn nothing_to_draw_is_an_error_that_says_why() {
        assert!(matches!(
            svg(&[], &FlameOptions::default()),
            Err(FlameError::NoSpans)
        ));
        let p = probe(1, 10, "inlined");
        let err = svg(&[span(1, 0, &p, 10, 0, 0)], &FlameOptions::default()).expect_err("no time");
        assert!(matches!(err, FlameError::NoTime { spans: 1 }));
        assert!(err.to_string().contains("take no time"));
    }
}
