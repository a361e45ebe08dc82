//! The daemon's domain records: a probed function and a traced call, as stored, queried and
//! exported. Self-contained (names resolved, times in Unix nanoseconds), so they outlive the
//! session and the daemon run that produced them.

use std::{fmt, sync::Arc};

use scope_common::span_flags;

/// A traced function (or inlined call site) in one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Unique in the store, across daemon runs.
    pub id: u64,
    pub session_id: u64,
    pub pid: u32,
    /// Demangled name without parameters or hash (`processCommand`, `demo::fib`).
    pub function: String,
    /// Raw symbol name (empty for an inlined call site).
    pub symbol: String,
    /// Path of the ELF file as the process sees it.
    pub module: String,
    /// ELF virtual address and file offset of the probed instruction.
    pub address: u64,
    pub file_offset: u64,
    /// Where the function is defined (for an inlined call site: where it is called).
    pub file: Option<String>,
    pub line: Option<u32>,
    /// For an inlined call site: the function it was inlined into.
    pub inlined_into: Option<String>,
    /// The traced process's command name and executable.
    pub comm: String,
    pub exe: String,
    /// The uid whose session placed the probe: only it and root see its spans.
    pub owner_uid: u32,
}

/// A 128-bit trace id: the host/run half and the root span's id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId {
    pub high: u64,
    pub low: u64,
}

impl TraceId {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&self.high.to_be_bytes());
        bytes[8..].copy_from_slice(&self.low.to_be_bytes());
        bytes
    }

    /// Parses the 32-hex-digit form.
    pub fn parse(text: &str) -> Option<TraceId> {
        if text.len() != 32 || !text.is_ascii() {
            return None;
        }
        let high = u64::from_str_radix(&text[..16], 16).ok()?;
        let low = u64::from_str_radix(&text[16..], 16).ok()?;
        Some(TraceId { high, low })
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.high, self.low)
    }
}

/// One traced call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// Unique in the store (random-looking, like OpenTelemetry span ids).
    pub id: u64,
    /// The enclosing traced call, 0 for a root.
    pub parent_id: u64,
    pub trace_id: TraceId,
    pub pid: u32,
    pub tid: u32,
    /// Unix time of the entry, in nanoseconds.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub depth: u32,
    pub args: [u64; 6],
    pub ret: u64,
    /// Return address in the caller (for an inlined call site, the site itself).
    pub caller: u64,
    /// `scope_common::span_flags` bits.
    pub flags: u32,
    /// What the probe said about the call in strings (USDT probes that pass some): the SQL
    /// of a query, `file:function:line` of a Python call ([`crate::usdt::text`]).
    pub text: Option<String>,
    pub probe: Arc<Probe>,
}

impl Span {
    pub fn end_ns(&self) -> u64 {
        self.start_ns.saturating_add(self.duration_ns)
    }

    /// Names of the flags, as the API reports them.
    pub fn flag_names(&self) -> Vec<&'static str> {
        flag_names(self.flags)
    }

    /// How this call's parent caused it when the parent is on another thread or process:
    /// `"fork"`, `"wakeup"`; `""` for a call nested on its own thread (or a root).
    pub fn link_kind(&self) -> &'static str {
        link_kind(self.flags)
    }
}

/// Names of span flags, as the API reports them.
pub fn flag_names(flags: u32) -> Vec<&'static str> {
    [
        (span_flags::INSTANT, "inlined"),
        (span_flags::THREAD_EXITED, "thread_exited"),
        (span_flags::EXECED, "execed"),
        (span_flags::ABANDONED, "abandoned"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| *name)
    .collect()
}

/// Converts the kernel's `CLOCK_MONOTONIC` timestamps to Unix time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Unix time minus monotonic time, in nanoseconds.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let realtime = clock_ns(libc::CLOCK_REALTIME);
        let monotonic = clock_ns(libc::CLOCK_MONOTONIC);
        Clock {
            offset_ns: realtime - monotonic,
        }
    }

    pub fn to_unix_ns(self, monotonic_ns: u64) -> u64 {
        u64::try_from(i128::from(monotonic_ns) + self.offset_ns).unwrap_or(0)
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the duration of the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Span {
    /// A kernel span record, attributed to its probe, in Unix time and store-wide ids.
    pub fn from_kernel(
        span: &scope_common::Span,
        probe: Arc<Probe>,
        clock: Clock,
        ids: IdScheme,
    ) -> Span {
        // A root call caused from another thread or process hangs under the span that caused
        // it: the trace crosses threads and processes.
        let parent = if span.parent_id != 0 {
            span.parent_id
        } else {
            span.link_id
        };
        Span {
            id: ids.span(span.span_id),
            parent_id: ids.span(parent),
            trace_id: ids.trace(span.trace_id),
            pid: span.pid,
            tid: span.tid,
            start_ns: clock.to_unix_ns(span.start_ns),
            duration_ns: span.end_ns.saturating_sub(span.start_ns),
            depth: span.depth,
            args: span.args,
            ret: span.ret,
            caller: span.caller,
            flags: span.flags,
            text: None,
            probe,
        }
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the kernel's clock for span times.
pub fn monotonic_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// Unix time now, in nanoseconds.
pub fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The edge kind of span flags: `"fork"`, `"wakeup"`, `"io"` or `""`.
pub fn link_kind(flags: u32) -> &'static str {
    if flags & span_flags::LINK_FORK != 0 {
        "fork"
    } else if flags & span_flags::LINK_WAKEUP != 0 {
        "wakeup"
    } else if flags & span_flags::LINK_IO != 0 {
        "io"
    } else {
        ""
    }
}

/// Bytes a traced thread moved through a pipe or socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Io {
    pub time_ns: u64,
    pub pid: u32,
    pub tid: u32,
    /// `scope_common::io_op`.
    pub op: u32,
    /// `scope_common::stream_kind`.
    pub stream: u32,
    pub key: u64,
    pub start: u64,
    pub end: u64,
    pub bytes: u32,
    /// The thread's innermost open traced call (0 if none).
    pub span_id: u64,
    pub trace_id: TraceId,
    /// For a read: the call that wrote the bytes, when the kernel matched it.
    pub peer_span_id: u64,
    pub peer_trace_id: TraceId,
    /// TCP ends.
    pub local: Option<std::net::SocketAddr>,
    pub remote: Option<std::net::SocketAddr>,
}

impl Io {
    pub fn from_kernel(event: &scope_common::IoEvent, clock: Clock, ids: IdScheme) -> Io {
        let address = |bytes: [u8; 16], port: u16| -> Option<std::net::SocketAddr> {
            match event.family {
                2 => Some(std::net::SocketAddr::from((
                    [bytes[0], bytes[1], bytes[2], bytes[3]],
                    port,
                ))),
                10 => Some(std::net::SocketAddr::from((
                    std::net::Ipv6Addr::from(bytes),
                    port,
                ))),
                _ => None,
            }
        };
        Io {
            time_ns: clock.to_unix_ns(event.time_ns),
            pid: event.pid,
            tid: event.tid,
            op: event.op,
            stream: event.stream,
            key: event.key,
            start: event.start,
            end: event.end,
            bytes: event.bytes,
            span_id: ids.span(event.span_id),
            trace_id: if event.trace_id == 0 {
                TraceId::default()
            } else {
                ids.trace(event.trace_id)
            },
            peer_span_id: ids.span(event.peer_span_id),
            peer_trace_id: if event.peer_trace_id == 0 {
                TraceId::default()
            } else {
                ids.trace(event.peer_trace_id)
            },
            local: address(event.local_addr, event.local_port),
            remote: address(event.remote_addr, event.remote_port),
        }
    }

    /// Whether this read's first byte lies in `write`'s bytes (same stream direction
    /// assumed). TCP sequence numbers wrap at 2^32.
    pub fn read_starts_in(&self, write: &Io) -> bool {
        if self.stream == scope_common::stream_kind::TCP {
            (self.start as u32).wrapping_sub(write.start as u32)
                < (write.end as u32).wrapping_sub(write.start as u32)
        } else {
            write.start <= self.start && self.start < write.end
        }
    }
}

/// Turns kernel span ids (unique within one daemon run) into ids unique across runs and
/// hosts: XOR with a random per-run salt keeps them unique within the run (a bijection) and
/// makes collisions with other runs as unlikely as for random 64-bit ids. The trace id's
/// high half names the host.
#[derive(Clone, Copy, Debug)]
pub struct IdScheme {
    pub salt: u64,
    pub host: u64,
}

impl IdScheme {
    /// A fresh salt for this run; the host half from /etc/machine-id (or the hostname) and
    /// the daemon's network namespace: two daemons in two network namespaces of one machine
    /// see different networks (a container talking to another over a veth), so they count as
    /// two hosts, as they would for an OpenTelemetry collector.
    pub fn for_this_run() -> IdScheme {
        let machine = std::fs::read_to_string("/etc/machine-id")
            .ok()
            .filter(|id| !id.trim().is_empty())
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default()
            });
        let netns = std::fs::read_link("/proc/self/ns/net")
            .map(|link| link.to_string_lossy().into_owned())
            .unwrap_or_default();
        let host = format!("{}/{netns}", machine.trim());
        IdScheme {
            salt: random_u64(),
            host: fnv1a(host.as_bytes()),
        }
    }

    pub fn span(&self, kernel_id: u64) -> u64 {
        if kernel_id == 0 {
            0
        } else {
            kernel_id ^ self.salt
        }
    }

    pub fn trace(&self, kernel_root_id: u64) -> TraceId {
        TraceId {
            high: self.host,
            low: self.span(kernel_root_id),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: the buffer is valid for 8 bytes.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got == 8 {
        return u64::from_ne_bytes(bytes);
    }
    // getrandom cannot fail for 8 bytes on a booted system; still, never return a constant.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    fnv1a(&(now ^ u128::from(std::process::id())).to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_unique_and_zero_stays_zero() {
        let ids = IdScheme {
            salt: 0xdead_beef_1234_5678,
            host: 7,
        };
        assert_eq!(ids.span(0), 0);
        let a = ids.span(1 << 48 | 1);
        let b = ids.span(1 << 48 | 2);
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert_eq!(ids.trace(1 << 48 | 1).low, a);
        assert_eq!(ids.trace(5).high, 7);
    }

    #[test]
    fn trace_id_text_round_trips() {
        let id = TraceId {
            high: 0x0123_4567_89ab_cdef,
            low: 0xfedc_ba98_7654_3210,
        };
        assert_eq!(id.to_string(), "0123456789abcdeffedcba9876543210");
        assert_eq!(TraceId::parse(&id.to_string()), Some(id));
        assert_eq!(TraceId::parse("xyz"), None);
        assert_eq!(id.to_bytes()[0], 0x01);
    }

    #[test]
    fn two_runs_get_different_salts() {
        assert_ne!(IdScheme::for_this_run().salt, IdScheme::for_this_run().salt);
    }
}
