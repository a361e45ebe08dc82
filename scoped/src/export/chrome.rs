//! Chrome trace-event JSON (the "JSON Object Format" of the Trace Event Format), which
//! Perfetto UI (ui.perfetto.dev) and chrome://tracing open.
//!
//! - Every process and thread gets a named track (`"ph":"M"` metadata events).
//! - Every call is a complete event (`"ph":"X"`); an inlined call site, which has no exit, is
//!   an instant event (`"ph":"i"`, thread scoped).
//! - A call whose parent is in the export but runs on another thread or process (a causal edge
//!   the correlator found) gets a flow arrow from the parent to it (`"ph":"s"` bound to the
//!   parent's slice, `"ph":"f"` with `"bp":"e"` bound to the child's).
//!
//! Timestamps are microseconds since the earliest exported call (as floats with nanosecond
//! digits): viewers read `ts` as a double, and absolute Unix microseconds (~1.7e15) would lose
//! the nanoseconds. The absolute start is in `otherData.epoch_unix_ns`, and each call's exact
//! Unix start is in its `args.start_unix_ns`.
//!
//! Ids (64-bit) are hex strings: JSON readers in JavaScript would round them as numbers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Write};

use serde::Serialize;

use super::{Plain, SpanSink, file_name, location};
use crate::model::Span;
use scope_common::span_flags;

/// `cat` and `name` of the flow events that draw causal edges.
pub const FLOW_CATEGORY: &str = "scope.causal";
pub const FLOW_NAME: &str = "causal";

/// Writes `spans` as one Chrome trace-event JSON document, event by event.
pub fn write(spans: &[Span], out: &mut impl Write) -> io::Result<()> {
    write_to(spans, &mut Plain(out))
}

pub(crate) fn write_to(spans: &[Span], out: &mut impl SpanSink) -> io::Result<()> {
    let epoch = spans.iter().map(|s| s.start_ns).min().unwrap_or(0);
    out.write_all(b"{\"traceEvents\":[")?;
    let mut events = Events { first: true };

    // Named tracks: one per process (comm and pid), one per thread.
    let mut processes: BTreeMap<u32, &str> = BTreeMap::new();
    let mut threads: BTreeSet<(u32, u32)> = BTreeSet::new();
    for span in spans {
        processes.entry(span.pid).or_insert(&span.probe.comm);
        threads.insert((span.pid, span.tid));
    }
    for (&pid, comm) in &processes {
        events.write(
            out,
            &Metadata {
                name: "process_name",
                ph: "M",
                pid,
                tid: None,
                args: NameArg {
                    name: format!("{comm} ({pid})"),
                },
            },
        )?;
    }
    for &(pid, tid) in &threads {
        let name = if pid == tid {
            format!("main thread {tid}")
        } else {
            format!("thread {tid}")
        };
        events.write(
            out,
            &Metadata {
                name: "thread_name",
                ph: "M",
                pid,
                tid: Some(tid),
                args: NameArg { name },
            },
        )?;
    }

    let by_id: HashMap<u64, &Span> = spans.iter().map(|s| (s.id, s)).collect();
    let mut flow_id: u64 = 0;
    for (done, span) in spans.iter().enumerate() {
        let instant = span.flags & span_flags::INSTANT != 0;
        let slice = Slice {
            name: function(span),
            cat: file_name(&span.probe.module),
            ph: if instant { "i" } else { "X" },
            ts: micros(span.start_ns - epoch),
            dur: (!instant).then(|| micros(span.duration_ns)),
            s: instant.then_some("t"),
            pid: span.pid,
            tid: span.tid,
            args: SliceArgs {
                args: span.args.map(Hex),
                ret: Hex(span.ret),
                location: location(span),
                flags: span.flag_names(),
                span_id: Hex(span.id),
                parent_id: Hex(span.parent_id),
                trace_id: span.trace_id.to_string(),
                inlined_into: span.probe.inlined_into.as_deref(),
                start_unix_ns: span.start_ns,
            },
        };
        events.write(out, &slice)?;

        if let Some(parent) = by_id.get(&span.parent_id)
            && (parent.pid, parent.tid) != (span.pid, span.tid)
        {
            flow_id += 1;
            // The start binds to the slice enclosing its ts on the parent's thread: the
            // parent's own start is inside the parent and inside none of its children.
            events.write(
                out,
                &Flow {
                    name: FLOW_NAME,
                    cat: FLOW_CATEGORY,
                    ph: "s",
                    id: flow_id,
                    ts: micros(parent.start_ns - epoch),
                    pid: parent.pid,
                    tid: parent.tid,
                    bp: None,
                },
            )?;
            events.write(
                out,
                &Flow {
                    name: FLOW_NAME,
                    cat: FLOW_CATEGORY,
                    ph: "f",
                    id: flow_id,
                    ts: micros(span.start_ns - epoch),
                    pid: span.pid,
                    tid: span.tid,
                    bp: Some("e"),
                },
            )?;
        }
        out.spans_done(done as u64 + 1);
    }

    out.write_all(b"\n],\"displayTimeUnit\":\"ns\",\"otherData\":")?;
    serde_json::to_writer(
        &mut *out,
        &OtherData {
            producer: "scope",
            version: env!("CARGO_PKG_VERSION"),
            epoch_unix_ns: epoch.to_string(),
            spans: spans.len(),
        },
    )?;
    out.write_all(b"}\n")?;
    out.flush()
}

fn function(span: &Span) -> &str {
    if span.probe.function.is_empty() {
        "?"
    } else {
        &span.probe.function
    }
}

/// Nanoseconds as floating-point microseconds.
fn micros(ns: u64) -> f64 {
    ns as f64 / 1_000.0
}

/// A number written as a `0x…` string.
#[derive(Clone, Copy)]
struct Hex(u64);

impl Serialize for Hex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{:#x}", self.0))
    }
}

#[derive(Serialize)]
struct Metadata {
    name: &'static str,
    ph: &'static str,
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tid: Option<u32>,
    args: NameArg,
}

#[derive(Serialize)]
struct NameArg {
    name: String,
}

#[derive(Serialize)]
struct Slice<'a> {
    name: &'a str,
    cat: &'a str,
    ph: &'static str,
    ts: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dur: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<&'static str>,
    pid: u32,
    tid: u32,
    args: SliceArgs<'a>,
}

#[derive(Serialize)]
struct SliceArgs<'a> {
    args: [Hex; 6],
    ret: Hex,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<String>,
    flags: Vec<&'static str>,
    span_id: Hex,
    parent_id: Hex,
    trace_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    inlined_into: Option<&'a str>,
    start_unix_ns: u64,
}

#[derive(Serialize)]
struct Flow {
    name: &'static str,
    cat: &'static str,
    ph: &'static str,
    id: u64,
    ts: f64,
    pid: u32,
    tid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    bp: Option<&'static str>,
}

#[derive(Serialize)]
struct OtherData {
    producer: &'static str,
    version: &'static str,
    /// A string: a JSON number this large loses its last digits in JavaScript.
    epoch_unix_ns: String,
    spans: usize,
}

/// Writes events with commas between them.
struct Events {
    first: bool,
}

impl Events {
    fn write(&mut self, out: &mut dyn Write, event: &dyn erased::Event) -> io::Result<()> {
        out.write_all(if self.first { b"\n" } else { b",\n" })?;
        self.first = false;
        event.write(out)
    }
}

/// Every kind of event through one `&dyn`, so one closure writes them all.
mod erased {
    use std::io::{self, Write};

    pub trait Event {
        fn write(&self, out: &mut dyn Write) -> io::Result<()>;
    }

    impl<T: serde::Serialize> Event for T {
        fn write(&self, out: &mut dyn Write) -> io::Result<()> {
            serde_json::to_writer(out, self).map_err(io::Error::from)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::Value;

    use super::*;
    use crate::export::fixtures::{T0, TRACE, probe, span};
    use crate::model::Probe;

    fn export(spans: &[Span]) -> Value {
        let mut out = Vec::new();
        write(spans, &mut out).expect("write");
        serde_json::from_slice(&out).expect("the output is JSON")
    }

    fn events<'a>(doc: &'a Value, ph: &str) -> Vec<&'a Value> {
        doc["traceEvents"]
            .as_array()
            .expect("traceEvents is an array")
            .iter()
            .filter(|e| e["ph"] == ph)
            .collect()
    }

    /// A request handled across two processes: the client's `call` (pid 10) → the server's
    /// `processCommand` (pid 20, thread 21) → `lookupKey` on the same thread, plus a worker
    /// thread (22) picking up a job the command queued, and an inlined call site.
    fn world() -> Vec<Span> {
        let call = probe(1, 10, "call");
        let process = probe(2, 20, "processCommand");
        let lookup = probe(3, 20, "lookupKey");
        let job = probe(4, 20, "bioProcessJob");
        let inlined = Arc::new(Probe {
            inlined_into: Some("lookupKey".into()),
            ..(*probe(5, 20, "dictFind")).clone()
        });
        let mut instant = span(6, 3, &inlined, 21, 3_500, 0);
        instant.flags = span_flags::INSTANT;
        instant.depth = 2;
        let mut child = span(3, 2, &lookup, 21, 3_000, 1_000);
        child.depth = 1;
        vec![
            span(1, 0, &call, 10, 1_000, 10_000),
            span(2, 1, &process, 21, 2_000, 5_000),
            child,
            instant,
            span(5, 2, &job, 22, 6_500, 2_000),
        ]
    }

    #[test]
    fn output_is_a_trace_document_with_every_key_typed() {
        let doc = export(&world());
        assert_eq!(doc["displayTimeUnit"], "ns");
        assert_eq!(doc["otherData"]["epoch_unix_ns"], (T0 + 1_000).to_string());
        let all = doc["traceEvents"].as_array().expect("array");
        for e in all {
            assert!(e["ph"].is_string(), "{e}");
            assert!(e["pid"].is_u64(), "{e}");
            assert!(e["name"].is_string(), "{e}");
        }
        let slices = events(&doc, "X");
        assert_eq!(slices.len(), 4);
        for e in &slices {
            assert!(e["ts"].is_f64() || e["ts"].is_u64(), "{e}");
            assert!(e["dur"].is_number(), "{e}");
            assert!(e["tid"].is_u64() && e["cat"].is_string(), "{e}");
            let args = &e["args"];
            let values = args["args"].as_array().expect("args.args");
            assert_eq!(values.len(), 6);
            assert!(
                values
                    .iter()
                    .all(|v| v.as_str().is_some_and(|s| s.starts_with("0x")))
            );
            assert!(args["ret"].as_str().is_some_and(|s| s.starts_with("0x")));
            assert!(args["location"].is_string() && args["flags"].is_array());
            assert!(args["span_id"].is_string() && args["parent_id"].is_string());
            assert_eq!(args["trace_id"], TRACE.to_string());
            assert!(args["start_unix_ns"].is_u64());
        }
        let root = slices
            .iter()
            .find(|e| e["name"] == "call")
            .expect("the root slice");
        assert_eq!(root["cat"], "redis-server");
        assert_eq!(root["ts"].as_f64(), Some(0.0));
        assert_eq!(root["dur"].as_f64(), Some(10.0));
        assert_eq!(
            (root["pid"].as_u64(), root["tid"].as_u64()),
            (Some(10), Some(10))
        );
        assert_eq!(root["args"]["args"][0], "0x55d0c1e0a2c0");
        assert_eq!(root["args"]["args"][5], "0xffffffffffffffff");
        assert_eq!(root["args"]["ret"], "0xffffffffffffffff");
        assert_eq!(root["args"]["location"], "/src/redis/src/server.c:101");
        assert_eq!(root["args"]["span_id"], "0x1");
        assert_eq!(root["args"]["parent_id"], "0x0");
        assert_eq!(root["args"]["start_unix_ns"], T0 + 1_000);
        let lookup = slices
            .iter()
            .find(|e| e["name"] == "lookupKey")
            .expect("lookupKey");
        // Nanosecond digits survive: 2000 ns after the epoch, 1000 ns long.
        assert_eq!(lookup["ts"].as_f64(), Some(2.0));
        assert_eq!(lookup["dur"].as_f64(), Some(1.0));
    }

    #[test]
    fn nanoseconds_are_kept() {
        let p = probe(1, 10, "f");
        let doc = export(&[span(1, 0, &p, 10, 0, 5), span(2, 0, &p, 10, 1_234_567, 1)]);
        let slices = events(&doc, "X");
        assert_eq!(slices[0]["dur"].as_f64(), Some(0.005));
        assert_eq!(slices[1]["ts"].as_f64(), Some(1234.567));
        assert_eq!(slices[1]["dur"].as_f64(), Some(0.001));
    }

    #[test]
    fn processes_and_threads_have_named_tracks() {
        let doc = export(&world());
        let meta = events(&doc, "M");
        let names: Vec<(String, u64, Option<u64>, String)> = meta
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().expect("name").to_owned(),
                    e["pid"].as_u64().expect("pid"),
                    e["tid"].as_u64(),
                    e["args"]["name"].as_str().expect("args.name").to_owned(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("process_name".into(), 10, None, "redis-server (10)".into()),
                ("process_name".into(), 20, None, "redis-server (20)".into()),
                ("thread_name".into(), 10, Some(10), "main thread 10".into()),
                ("thread_name".into(), 20, Some(21), "thread 21".into()),
                ("thread_name".into(), 20, Some(22), "thread 22".into()),
            ]
        );
    }

    #[test]
    fn inlined_call_sites_are_instant_events() {
        let doc = export(&world());
        let instants = events(&doc, "i");
        assert_eq!(instants.len(), 1);
        let e = instants[0];
        assert_eq!(e["name"], "dictFind");
        assert_eq!(e["s"], "t");
        assert_eq!(e["ts"].as_f64(), Some(2.5));
        assert!(e.get("dur").is_none());
        assert_eq!(e["args"]["flags"], serde_json::json!(["inlined"]));
        assert_eq!(e["args"]["inlined_into"], "lookupKey");
    }

    #[test]
    fn cross_thread_and_process_parents_get_flow_arrows() {
        let doc = export(&world());
        let starts = events(&doc, "s");
        let ends = events(&doc, "f");
        // call(pid 10) → processCommand(pid 20): another process; processCommand(tid 21) →
        // bioProcessJob(tid 22): another thread. lookupKey and dictFind share their parent's
        // thread: no arrow.
        assert_eq!(starts.len(), 2, "{starts:?}");
        assert_eq!(ends.len(), 2, "{ends:?}");
        let edge = |start: &Value, end: &Value| {
            assert_eq!(start["id"], end["id"], "one id per arrow");
            assert_eq!(start["cat"], FLOW_CATEGORY);
            assert_eq!(end["cat"], FLOW_CATEGORY);
            assert_eq!(start["name"], end["name"]);
            assert_eq!(end["bp"], "e");
            assert!(start.get("bp").is_none());
            (
                start["pid"].as_u64(),
                start["tid"].as_u64(),
                start["ts"].as_f64(),
                end["pid"].as_u64(),
                end["tid"].as_u64(),
                end["ts"].as_f64(),
            )
        };
        // The start sits on the parent's slice, the end on the child's.
        assert_eq!(
            edge(starts[0], ends[0]),
            (Some(10), Some(10), Some(0.0), Some(20), Some(21), Some(1.0))
        );
        assert_eq!(
            edge(starts[1], ends[1]),
            (Some(20), Some(21), Some(1.0), Some(20), Some(22), Some(5.5))
        );
        assert_ne!(starts[0]["id"], starts[1]["id"], "ids are unique");
        assert!(starts.iter().all(|e| e["id"].is_u64()));
    }

    #[test]
    fn parents_outside_the_export_draw_no_arrow() {
        let p = probe(1, 10, "f");
        let q = probe(2, 20, "g");
        let doc = export(&[span(1, 99, &p, 10, 0, 5), span(2, 98, &q, 21, 1, 5)]);
        assert!(events(&doc, "s").is_empty() && events(&doc, "f").is_empty());
    }

    #[test]
    fn an_empty_export_is_still_a_document() {
        let doc = export(&[]);
        assert_eq!(doc["traceEvents"], serde_json::json!([]));
        assert_eq!(doc["displayTimeUnit"], "ns");
    }

    #[test]
    fn names_are_escaped() {
        let weird = Arc::new(Probe {
            function: "operator\"\\\n<>".into(),
            ..(*probe(1, 10, "x")).clone()
        });
        let doc = export(&[span(1, 0, &weird, 10, 0, 5)]);
        assert_eq!(events(&doc, "X")[0]["name"], "operator\"\\\n<>");
    }
}
