#![no_main]
//! Arbitrary bytes as one ring-buffer record, decoded by `Record::from_bytes` exactly as the
//! reader (`scoped/src/reader.rs`) decodes each item it takes from a ring, then converted by
//! what the pipeline does next (`model::Span::from_kernel`, `model::Io::from_kernel`).
//!
//! Checks that a decoded record is the input's bytes (no field shifted or lost), that only a
//! short or unknown record is rejected, and that `Span::from_bytes` agrees.

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use scope_common::{IoEvent, MAX_TEXT, ProcessEvent, Record, RecordKind, Span, TextSpan};
use scope_fuzz::{
    model::{self, Clock, IdScheme},
    usdt,
};

fuzz_target!(|data: &[u8]| {
    let record = Record::from_bytes(data);
    let kind = data
        .first_chunk::<4>()
        .map(|kind| u32::from_ne_bytes(*kind));
    match record {
        Some(Record::Span(span)) => {
            same_bytes(data, &span);
            assert_eq!(span.kind, RecordKind::Span as u32);
            let probe = Arc::new(probe(span.probe_id, span.pid));
            let converted = model::Span::from_kernel(&span, probe, clock(), ids());
            assert!(converted.end_ns() >= converted.start_ns);
            assert_eq!(
                converted.duration_ns,
                span.end_ns.saturating_sub(span.start_ns)
            );
            let _ = (converted.flag_names(), converted.link_kind());
        }
        Some(Record::TextSpan(text)) => {
            same_bytes(data, &text);
            assert_eq!(text.span.kind, RecordKind::TextSpan as u32);
            // As the reader and the pipeline do: whatever the lengths say, the strings stay
            // within their slots and decode to text.
            let strings: Vec<String> = text.strings().map(usdt::decode).collect();
            assert!(strings.len() <= text.lens.len());
            for (string, bytes) in strings.iter().zip(text.strings()) {
                assert!(bytes.len() <= MAX_TEXT);
                assert!(string.len() >= bytes.len().min(1));
            }
            let _ = usdt::text("python:function", &strings, &text.span.args);
        }
        Some(Record::Process(event)) => {
            same_bytes(data, &event);
            assert_eq!(event.kind, RecordKind::Process as u32);
        }
        Some(Record::Io(event)) => {
            same_bytes(data, &event);
            assert_eq!(event.kind, RecordKind::Io as u32);
            let io = model::Io::from_kernel(&event, clock(), ids());
            let _ = io.read_starts_in(&io);
        }
        None => {
            let needed = match kind {
                Some(k) if k == RecordKind::Span as u32 => size_of::<Span>(),
                Some(k) if k == RecordKind::Process as u32 => size_of::<ProcessEvent>(),
                Some(k) if k == RecordKind::Io as u32 => size_of::<IoEvent>(),
                Some(k) if k == RecordKind::TextSpan as u32 => size_of::<TextSpan>(),
                _ => usize::MAX,
            };
            assert!(
                data.len() < needed,
                "a record of a known kind and full length was rejected"
            );
        }
    }
    assert_eq!(
        Span::from_bytes(data).map(Record::Span),
        record.filter(|r| matches!(r, Record::Span(_)))
    );
});

/// The decoded record is exactly the first `size_of::<T>()` input bytes.
fn same_bytes<T: Copy>(data: &[u8], record: &T) {
    let size = size_of::<T>();
    assert!(data.len() >= size, "decoded from {} bytes", data.len());
    // SAFETY: `record` is a live `#[repr(C)]` record made of integers without padding (sizes
    // asserted in scope-common), so all `size` bytes are initialized.
    let bytes = unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size) };
    assert_eq!(bytes, &data[..size]);
}

fn clock() -> Clock {
    static CLOCK: OnceLock<Clock> = OnceLock::new();
    *CLOCK.get_or_init(Clock::now)
}

fn ids() -> IdScheme {
    IdScheme {
        salt: 0x5eed_5eed_5eed_5eed,
        host: 7,
    }
}

fn probe(id: u32, pid: u32) -> model::Probe {
    model::Probe {
        id: u64::from(id),
        session_id: 1,
        pid,
        function: "fuzz".to_owned(),
        symbol: "fuzz".to_owned(),
        module: "/fuzz".to_owned(),
        address: 0,
        file_offset: 0,
        file: None,
        line: None,
        inlined_into: None,
        comm: "fuzz".to_owned(),
        exe: "/fuzz".to_owned(),
        owner_uid: 0,
    }
}
