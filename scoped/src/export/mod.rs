//! Exporters: stored spans in other tools' formats. Pure functions over [`model::Span`]s (the
//! store's query result), so they are tested without a daemon, root or BPF.
//!
//! - [`chrome`]: Chrome trace-event JSON, which Perfetto UI and chrome://tracing open.
//! - [`jsonl`]: JSON Lines with the fields of `scope calls --json`.
//! - [`flame`]: folded stacks of the stored call trees, and a flame graph SVG of them.
//! - [`otlp`]: OpenTelemetry (OTLP/gRPC) requests, a one-shot sender and a continuous exporter.
//!
//! [`stream`] cuts the byte formats into chunks for a streaming gRPC answer.
//!
//! [`model::Span`]: crate::model::Span

pub mod chrome;
pub mod flame;
pub mod jsonl;
pub mod otlp;

use std::io::{self, Write};

use crate::model::Span;

/// Where a span's call came from, innermost frame first. The daemon symbolizes the caller
/// address; exporters that show it take this function.
pub type CallerFrames<'a> = dyn Fn(&Span) -> Vec<scope_symbolizer::Frame> + 'a;

/// Bytes per chunk of a streamed export ([`stream`]): big enough that framing costs nothing,
/// small enough that the first bytes reach the client at once.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;

/// The formats that [`stream`] writes (OTLP goes to a collector instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFormat {
    /// [`chrome::write`].
    Chrome,
    /// [`jsonl::write`].
    JsonLines,
}

/// Writes `spans` in `format` and hands the bytes to `emit` in chunks of about `chunk_bytes`,
/// each with the number of spans completely written so far (for `ExportChunk.spans`). The
/// last chunk says `spans.len()`. An error from `emit` (the client went away) stops the
/// export and is returned.
pub fn stream(
    format: StreamFormat,
    spans: &[Span],
    caller: Option<&CallerFrames<'_>>,
    chunk_bytes: usize,
    emit: impl FnMut(Vec<u8>, u64) -> io::Result<()>,
) -> io::Result<()> {
    let mut chunks = Chunks {
        buffer: Vec::with_capacity(chunk_bytes.max(1)),
        chunk_bytes: chunk_bytes.max(1),
        spans_done: 0,
        emit,
    };
    match format {
        StreamFormat::Chrome => chrome::write_to(spans, &mut chunks)?,
        StreamFormat::JsonLines => jsonl::write_to(spans, caller, &mut chunks)?,
    }
    chunks.finish()
}

/// A writer that learns how many spans the bytes it was given hold.
pub(crate) trait SpanSink: Write {
    /// `done` spans have been written completely.
    fn spans_done(&mut self, done: u64);
}

/// A plain writer, for the one-shot `write` functions.
pub(crate) struct Plain<'a, W: Write>(pub &'a mut W);

impl<W: Write> Write for Plain<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> SpanSink for Plain<'_, W> {
    fn spans_done(&mut self, _done: u64) {}
}

/// Collects bytes and emits them in chunks.
struct Chunks<F> {
    buffer: Vec<u8>,
    chunk_bytes: usize,
    spans_done: u64,
    emit: F,
}

impl<F: FnMut(Vec<u8>, u64) -> io::Result<()>> Chunks<F> {
    fn emit_buffer(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(self.chunk_bytes));
        (self.emit)(chunk, self.spans_done)
    }

    fn finish(mut self) -> io::Result<()> {
        // Always one last chunk, even an empty one, so the client sees the final count.
        self.emit_buffer()
    }
}

impl<F: FnMut(Vec<u8>, u64) -> io::Result<()>> Write for Chunks<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        if self.buffer.len() >= self.chunk_bytes {
            self.emit_buffer()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<F: FnMut(Vec<u8>, u64) -> io::Result<()>> SpanSink for Chunks<F> {
    fn spans_done(&mut self, done: u64) {
        self.spans_done = done;
    }
}

/// The file name of a module path (`/usr/lib/libc.so.6` → `libc.so.6`).
pub(crate) fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `file:line`, `file`, or `None` when debug info had no location.
pub(crate) fn location(span: &Span) -> Option<String> {
    let file = span.probe.file.as_deref()?;
    Some(match span.probe.line {
        Some(line) if line > 0 => format!("{file}:{line}"),
        _ => file.to_owned(),
    })
}

/// Spans for the exporters' tests: a small hand-built world.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::sync::Arc;

    use crate::model::{Probe, Span, TraceId};

    pub const TRACE: TraceId = TraceId {
        high: 0x0123_4567_89ab_cdef,
        low: 0x1111,
    };
    /// 2023-11-14T22:13:20Z, in Unix nanoseconds.
    pub const T0: u64 = 1_700_000_000_000_000_000;

    pub fn probe(id: u64, pid: u32, function: &str) -> Arc<Probe> {
        Arc::new(Probe {
            id,
            session_id: 7,
            pid,
            function: function.to_owned(),
            symbol: function.to_owned(),
            module: "/usr/bin/redis-server".to_owned(),
            address: 0x4000 + id * 0x100,
            file_offset: 0x3000 + id * 0x100,
            file: Some("/src/redis/src/server.c".to_owned()),
            line: Some(100 + id as u32),
            inlined_into: None,
            comm: "redis-server".to_owned(),
            exe: "/usr/bin/redis-server".to_owned(),
            owner_uid: 0,
        })
    }

    /// A span of `probe` on thread `tid` of the probe's process, `start` ns after [`T0`].
    pub fn span(
        id: u64,
        parent_id: u64,
        probe: &Arc<Probe>,
        tid: u32,
        start: u64,
        duration: u64,
    ) -> Span {
        Span {
            id,
            parent_id,
            trace_id: TRACE,
            pid: probe.pid,
            tid,
            start_ns: T0 + start,
            duration_ns: duration,
            depth: 0,
            args: [0x55d0_c1e0_a2c0, 1, 0, 0, 0, u64::MAX],
            ret: u64::MAX,
            caller: 0x4242,
            flags: 0,
            text: None,
            probe: Arc::clone(probe),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fixtures::{probe, span};

    #[test]
    fn stream_cuts_chunks_and_counts_spans() {
        let p = probe(1, 10, "f");
        let spans: Vec<Span> = (1..=100).map(|i| span(i, 0, &p, 10, i * 10, 5)).collect();
        let mut chunks: Vec<(Vec<u8>, u64)> = Vec::new();
        stream(StreamFormat::JsonLines, &spans, None, 1000, |data, done| {
            chunks.push((data, done));
            Ok(())
        })
        .expect("stream");
        assert!(chunks.len() > 5, "cut into chunks: {}", chunks.len());
        let counts: Vec<u64> = chunks.iter().map(|c| c.1).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(counts.last(), Some(&100));
        let all: Vec<u8> = chunks.iter().flat_map(|c| c.0.clone()).collect();
        let mut whole = Vec::new();
        jsonl::write(&spans, None, &mut whole).expect("write");
        assert_eq!(all, whole, "chunks add up to the one-shot output");
        // Every chunk's count is at most the lines completed in it and the chunks before.
        let mut bytes = 0;
        for (data, done) in &chunks {
            bytes += data.len();
            let lines = all[..bytes].iter().filter(|&&b| b == b'\n').count() as u64;
            assert!(*done <= lines, "{done} > {lines}");
        }
    }

    #[test]
    fn stream_stops_when_the_client_goes_away() {
        let p = probe(1, 10, "f");
        let spans: Vec<Span> = (1..=100).map(|i| span(i, 0, &p, 10, i * 10, 5)).collect();
        let mut calls = 0;
        let result = stream(StreamFormat::Chrome, &spans, None, 100, |_, _| {
            calls += 1;
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "gone"))
        });
        assert_eq!(result.expect_err("stops").kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(calls, 1);
    }

    #[test]
    fn empty_stream_still_says_zero() {
        let mut chunks = Vec::new();
        stream(StreamFormat::JsonLines, &[], None, 100, |data, done| {
            chunks.push((data, done));
            Ok(())
        })
        .expect("stream");
        assert_eq!(chunks, vec![(Vec::new(), 0)]);
    }
}
