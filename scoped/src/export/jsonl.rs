//! JSON Lines: one object per span with the keys and types of `scope calls --json`, so a
//! script written against one reads the other. Integers stay JSON numbers (u64 exact).

use std::io::{self, Write};

use serde::Serialize;

use super::{CallerFrames, Plain, SpanSink};
use crate::model::Span;

/// Writes one JSON object per line per span. `caller` symbolizes where each call came from;
/// without it `caller` is `[]`.
pub fn write(
    spans: &[Span],
    caller: Option<&CallerFrames<'_>>,
    out: &mut impl Write,
) -> io::Result<()> {
    write_to(spans, caller, &mut Plain(out))
}

pub(crate) fn write_to(
    spans: &[Span],
    caller: Option<&CallerFrames<'_>>,
    out: &mut impl SpanSink,
) -> io::Result<()> {
    for (done, span) in spans.iter().enumerate() {
        let frames = caller.map(|f| f(span)).unwrap_or_default();
        serde_json::to_writer(&mut *out, &SpanLine::new(span, &frames))?;
        out.write_all(b"\n")?;
        out.spans_done(done as u64 + 1);
    }
    out.flush()
}

/// One line: the fields of scope-cli's `SpanJson` but `links`, which only `scope show` fills
/// (a reply link is found by assembling a whole trace; an export streams spans).
#[derive(Serialize)]
struct SpanLine<'a> {
    pid: u32,
    tid: u32,
    function: &'a str,
    module: &'a str,
    file: &'a str,
    line: u32,
    start_ns: u64,
    duration_ns: u64,
    end_ns: u64,
    depth: u32,
    args: [u64; 6],
    ret: u64,
    span_id: u64,
    parent_id: u64,
    session_id: u64,
    probe_id: u64,
    flags: Vec<&'static str>,
    inlined_into: &'a str,
    caller: Vec<FrameLine<'a>>,
    trace_id: String,
    /// How `parent_id` (on another thread or process) caused this call: fork, wakeup, io.
    link_kind: &'static str,
    /// What a USDT probe said in strings (SQL, a Python call's file:function:line).
    #[serde(skip_serializing_if = "str::is_empty")]
    text: &'a str,
}

#[derive(Serialize)]
struct FrameLine<'a> {
    function: &'a str,
    file: &'a str,
    line: u32,
    inlined: bool,
}

impl<'a> SpanLine<'a> {
    fn new(span: &'a Span, frames: &'a [scope_symbolizer::Frame]) -> Self {
        let probe = &span.probe;
        SpanLine {
            pid: span.pid,
            tid: span.tid,
            function: &probe.function,
            module: &probe.module,
            file: probe.file.as_deref().unwrap_or(""),
            line: probe.line.unwrap_or(0),
            start_ns: span.start_ns,
            duration_ns: span.duration_ns,
            end_ns: span.end_ns(),
            depth: span.depth,
            args: span.args,
            ret: span.ret,
            span_id: span.id,
            parent_id: span.parent_id,
            session_id: probe.session_id,
            probe_id: probe.id,
            flags: span.flag_names(),
            inlined_into: probe.inlined_into.as_deref().unwrap_or(""),
            text: span.text.as_deref().unwrap_or(""),
            caller: frames
                .iter()
                .map(|f| FrameLine {
                    function: &f.function,
                    file: f.file.as_deref().unwrap_or(""),
                    line: f.line.unwrap_or(0),
                    inlined: f.inlined,
                })
                .collect(),
            trace_id: span.trace_id.to_string(),
            link_kind: span.link_kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::export::fixtures::{T0, TRACE, probe, span};
    use scope_common::span_flags;

    /// The keys of `scope calls --json` (scope-cli/src/render.rs `SpanJson`) but `links`.
    const KEYS: [&str; 21] = [
        "pid",
        "tid",
        "function",
        "module",
        "file",
        "line",
        "start_ns",
        "duration_ns",
        "end_ns",
        "depth",
        "args",
        "ret",
        "span_id",
        "parent_id",
        "session_id",
        "probe_id",
        "flags",
        "inlined_into",
        "caller",
        "trace_id",
        "link_kind",
    ];

    fn lines(spans: &[Span], caller: Option<&CallerFrames<'_>>) -> Vec<Value> {
        let mut out = Vec::new();
        write(spans, caller, &mut out).expect("write");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.ends_with('\n'));
        text.lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    #[test]
    fn every_line_has_exactly_the_cli_keys_with_their_types() {
        let p = probe(3, 10, "processCommand");
        let mut exited = span(2, 1, &p, 11, 2_000, 700);
        exited.flags = span_flags::THREAD_EXITED;
        exited.depth = 1;
        let got = lines(&[span(1, 0, &p, 11, 1_000, 12_345), exited], None);
        assert_eq!(got.len(), 2);
        for v in &got {
            let obj = v.as_object().expect("object");
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            let mut want = KEYS.to_vec();
            want.sort_unstable();
            assert_eq!(keys, want);
            for key in [
                "pid",
                "tid",
                "line",
                "start_ns",
                "duration_ns",
                "end_ns",
                "depth",
                "ret",
                "span_id",
                "parent_id",
                "session_id",
                "probe_id",
            ] {
                assert!(obj[key].is_u64(), "{key} is an integer: {}", obj[key]);
            }
            for key in ["function", "module", "file", "inlined_into", "trace_id"] {
                assert!(obj[key].is_string(), "{key} is a string");
            }
            let args = obj["args"].as_array().expect("args");
            assert_eq!(args.len(), 6);
            assert!(args.iter().all(Value::is_u64));
            assert!(obj["flags"].is_array() && obj["caller"].is_array());
        }
        let root = &got[0];
        assert_eq!(root["function"], "processCommand");
        assert_eq!(root["module"], "/usr/bin/redis-server");
        assert_eq!(root["file"], "/src/redis/src/server.c");
        assert_eq!(root["line"], 103);
        assert_eq!(root["start_ns"], T0 + 1_000);
        assert_eq!(root["end_ns"], T0 + 1_000 + 12_345);
        assert_eq!(root["ret"].as_u64(), Some(u64::MAX), "u64 kept exact");
        assert_eq!(root["args"][5].as_u64(), Some(u64::MAX));
        assert_eq!(root["session_id"], 7);
        assert_eq!(root["probe_id"], 3);
        assert_eq!(root["trace_id"], TRACE.to_string());
        assert_eq!(root["caller"], serde_json::json!([]));
        assert_eq!(got[1]["flags"], serde_json::json!(["thread_exited"]));
        assert_eq!(got[1]["parent_id"], 1);
    }

    #[test]
    fn caller_frames_come_from_the_symbolizer() {
        let p = probe(1, 10, "lookupKey");
        let symbolize = |span: &Span| {
            vec![scope_symbolizer::Frame {
                function: format!("caller_of_{}", span.id),
                file: Some("db.c".into()),
                line: None,
                inlined: true,
            }]
        };
        let got = lines(&[span(5, 0, &p, 10, 0, 1)], Some(&symbolize));
        assert_eq!(
            got[0]["caller"],
            serde_json::json!([{"function": "caller_of_5", "file": "db.c", "line": 0, "inlined": true}])
        );
    }
}
