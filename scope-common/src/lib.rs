//! Records, map keys and limits shared by the eBPF programs (`scope-ebpf`) and the daemon
//! (`scoped`).
//!
//! Everything here is `#[repr(C)]`, free of implicit padding and of `bool`, and its size is
//! asserted at compile time, so the kernel and userspace can never disagree silently about a
//! layout. The `user` feature adds `aya::Pod` so userspace can read these out of maps.
#![no_std]

use core::mem::size_of;

/// Names of the maps in the eBPF object, used by the daemon to find them.
pub mod maps {
    /// `ArrayOfMaps` indexed by CPU; each slot holds that CPU's span ring buffer.
    pub const RINGS: &str = "RINGS";
    /// Hash map: tgid → [`super::Target`]. Only processes in it are traced.
    pub const TARGETS: &str = "TARGETS";
    /// Hash map: tid → [`super::ThreadStack`], the in-kernel call stack used to pair entry/exit.
    pub const STACKS: &str = "STACKS";
    /// Hash map: [`super::GoroutineKey`] → [`super::ThreadStack`], the call stack of a
    /// goroutine's traced Go calls ([`super::cookie::GO`]); an entry lives while the
    /// goroutine has a traced call open.
    pub const GO_STACKS: &str = "GO_STACKS";
    /// Per-CPU array indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-CPU array indexed by probe id: [`super::ProbeCounters`].
    pub const PROBE_COUNTERS: &str = "PROBE_COUNTERS";
    /// Array indexed by probe id: [`super::ProbeControl`], what share of calls to keep.
    pub const PROBE_CONTROL: &str = "PROBE_CONTROL";
    /// Array indexed by probe id: [`super::UsdtSpec`], where a USDT probe's arguments are.
    pub const USDT_ARGS: &str = "USDT_ARGS";
    /// Per-CPU array with one [`super::CpuState`] (span id sequence).
    pub const CPU_STATE: &str = "CPU_STATE";
    /// LRU hash: tid → [`super::Link`] from the span that forked/cloned the thread. Applies to
    /// the thread's root calls that have no other cause.
    pub const FORK_LINKS: &str = "FORK_LINKS";
    /// LRU hash: tid → [`super::Link`] from the span that last woke the thread. Consumed by the
    /// thread's next root call.
    pub const WAKE_LINKS: &str = "WAKE_LINKS";
    /// Hash: tid → [`super::PendingIo`], the read/write syscall a traced thread is in.
    pub const PENDING_IO: &str = "PENDING_IO";
    /// LRU hash: stream direction key → [`super::StreamState`]: bytes written and read so far
    /// (for pipes and unix sockets) and the recent writes, to match reads to writers.
    pub const STREAMS: &str = "STREAMS";
}

/// Names of the global variables the daemon sets before loading.
pub mod globals {
    /// [`super::KernelOffsets`] of the running kernel.
    pub const OFFSETS: &str = "OFFSETS";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// Generic `uprobe.multi` entry program for every traced function.
    pub const ENTRY: &str = "scope_entry";
    /// Generic `uretprobe.multi` exit program for every traced function.
    pub const EXIT: &str = "scope_exit";
    /// `sched:sched_process_exit`: flushes the call stack of a thread that exits mid-call.
    pub const THREAD_EXIT: &str = "scope_thread_exit";
    /// `sched:sched_process_exec`: flushes the call stack of a thread that execs mid-call.
    pub const EXEC: &str = "scope_exec";
    /// Raw tracepoint `sched_process_fork`: follows new processes and threads of traced ones.
    pub const FORK: &str = "scope_fork";
    /// Raw tracepoint `sched_waking`: a traced thread in a span waking another traced thread.
    pub const WAKEUP: &str = "scope_wakeup";
    /// `syscalls:sys_enter_{write,writev,sendto}`: a traced thread starts writing to an fd.
    pub const IO_ENTER_WRITE: &str = "scope_io_enter_write";
    /// `syscalls:sys_enter_{read,readv,recvfrom}`: a traced thread starts reading from an fd.
    pub const IO_ENTER_READ: &str = "scope_io_enter_read";
    /// `syscalls:sys_exit_*` of those: the bytes moved, on which stream, at which offsets.
    pub const IO_EXIT: &str = "scope_io_exit";
    /// Empty `uprobe.multi` program: the floor a benchmark compares the real entry program to.
    pub const NULL_ENTRY: &str = "scope_null_entry";
    /// Empty `uretprobe.multi` program: the floor a benchmark compares the real exit program to.
    pub const NULL_EXIT: &str = "scope_null_exit";
}

/// Deepest nesting of traced calls per thread that the kernel keeps. Deeper calls are counted
/// in [`Counter::DepthOverflow`] and do not produce spans.
pub const MAX_DEPTH: usize = 32;
/// Slots in the per-CPU ring buffer array; CPUs with a higher id than this cannot be traced.
pub const MAX_CPUS: u32 = 1024;
/// Probe ids are indexes into [`maps::PROBE_COUNTERS`]; this is its size.
pub const MAX_PROBES: u32 = 1 << 16;
/// Threads whose call stack the kernel can hold at once (entries are allocated on first use).
pub const MAX_THREADS: u32 = 1 << 15;
/// Stream directions (pipes, unix and TCP sockets) the kernel remembers writes of.
pub const MAX_STREAMS: u32 = 1 << 14;
/// Processes that can be traced at once.
pub const MAX_TARGETS: u32 = 1 << 12;
/// How many frames the exit program walks when it unwinds frames abandoned by `longjmp` or
/// an exception, or searches for a second probe on the same call.
pub const MAX_UNWIND: usize = 8;

/// The attach cookie of every probe: the probe id in the low 32 bits, [`cookie`] flags above.
pub mod cookie {
    /// Mask of the probe id in a cookie.
    pub const PROBE_ID_MASK: u64 = 0xffff_ffff;
    /// The probe has no exit: the entry program emits a zero-length span at once (inlined
    /// call sites, which have no return to hook).
    pub const INSTANT: u64 = 1 << 32;
    /// A USDT probe site: its arguments are where [`super::maps::USDT_ARGS`] says, not in the
    /// argument registers. With [`INSTANT`] (a site of its own), [`USDT_BEGIN`] or
    /// [`USDT_END`].
    pub const USDT: u64 = 1 << 33;
    /// A USDT site that opens a span (`query__start`, `function__entry`): it pushes a frame,
    /// closed by a [`USDT_END`] site of the same pair ([`super::UsdtSpec::pair`]).
    pub const USDT_BEGIN: u64 = 1 << 34;
    /// A USDT site that closes the innermost open span of its pair (`query__done`,
    /// `function__return`). It makes no span of its own, and its calls are not counted: they
    /// are the begin probe's spans.
    pub const USDT_END: u64 = 1 << 35;
    /// Go code (Go's internal register ABI: R14 holds the running goroutine, `g`). Its calls
    /// are kept per goroutine in [`super::maps::GO_STACKS`], not per thread — a goroutine
    /// that blocks may resume on another thread — and its stack positions are measured from
    /// the top of the goroutine's stack, which stays put when Go moves the stack to grow it.
    pub const GO: u64 = 1 << 36;
    /// A uprobe on a RET instruction of the function (Go, which cannot take uretprobes): the
    /// entry program pairs it as the call's exit. Always with [`GO`].
    pub const RET_SITE: u64 = 1 << 37;

    /// Builds the cookie for a probe.
    pub const fn new(probe_id: u32, flags: u64) -> u64 {
        probe_id as u64 | flags
    }
}

/// Kinds of records in the ring buffers; every record starts with its kind as a `u32`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A [`Span`].
    Span = 1,
    /// A [`ProcessEvent`].
    Process = 2,
    /// An [`IoEvent`].
    Io = 3,
    /// A [`TextSpan`]: a span with the strings its USDT probe passed.
    TextSpan = 4,
}

/// Bits of [`Span::flags`].
pub mod span_flags {
    /// Entry-only probe (an inlined call site): `end_ns == start_ns`, no return value.
    pub const INSTANT: u32 = 1 << 0;
    /// The thread exited while the call was running; `end_ns` is the exit time, no return value.
    pub const THREAD_EXITED: u32 = 1 << 1;
    /// The thread called `exec` while the call was running.
    pub const EXECED: u32 = 1 << 2;
    /// The call never returned normally: a `longjmp` or an exception unwound past it. `end_ns`
    /// is when the kernel noticed (the next return of an enclosing traced call).
    pub const ABANDONED: u32 = 1 << 3;
    /// `link_id` is the span that forked or cloned this thread.
    pub const LINK_FORK: u32 = 1 << 4;
    /// `link_id` is the span whose thread woke this one (futex, condvar, channel...).
    pub const LINK_WAKEUP: u32 = 1 << 5;
    /// `link_id` is the span that wrote the bytes this thread read (pipe, unix or TCP socket).
    pub const LINK_IO: u32 = 1 << 6;
    /// All `LINK_*` bits.
    pub const LINKS: u32 = LINK_FORK | LINK_WAKEUP | LINK_IO;
}

/// One traced call, paired in the kernel: entry and exit in a single record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// [`RecordKind::Span`].
    pub kind: u32,
    /// The probe that fired: index into the daemon's probe table.
    pub probe_id: u32,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// `CLOCK_MONOTONIC` nanoseconds at entry.
    pub start_ns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds at exit.
    pub end_ns: u64,
    /// Unique per daemon run: `(cpu + 1) << 48 | per-CPU sequence`.
    pub span_id: u64,
    /// `span_id` of the enclosing traced call on the same thread, 0 for a root.
    pub parent_id: u64,
    /// `span_id` of the outermost traced call enclosing this one on the thread (its own id
    /// for a root): the thread-local tree this call belongs to.
    pub root_id: u64,
    /// The trace: the span id of the call where the causal chain began, possibly in another
    /// thread or process (followed through forks and wakeups).
    pub trace_id: u64,
    /// For a root call caused from another thread or process: the span that caused it (see
    /// the `LINK_*` [`span_flags`]); 0 otherwise.
    pub link_id: u64,
    /// The first six integer arguments (System V x86-64: rdi, rsi, rdx, rcx, r8, r9).
    pub args: [u64; 6],
    /// The return value (rax); 0 when [`span_flags`] say there was no return.
    pub ret: u64,
    /// Where the call came from: the return address (for an [`span_flags::INSTANT`] span,
    /// the probed address inside the caller itself).
    pub caller: u64,
    /// Nesting depth among traced calls on this thread (0 for the outermost).
    pub depth: u32,
    /// [`span_flags`] bits.
    pub flags: u32,
}

/// One open call on a thread's in-kernel stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Frame {
    pub probe_id: u32,
    /// `LINK_*` [`span_flags`] of a root frame.
    pub link_flags: u32,
    /// Stack pointer at entry (pointing at the return address); the exit sees `sp + 8`. For
    /// Go code ([`cookie::GO`]), where that is on the goroutine's stack: [`GO_STACK_TOP`]
    /// minus its distance from the stack's top, the same at the RET instruction.
    pub sp: u64,
    pub start_ns: u64,
    pub span_id: u64,
    pub root_id: u64,
    pub trace_id: u64,
    pub link_id: u64,
    pub caller: u64,
    pub args: [u64; 6],
    /// For a [`cookie::USDT_BEGIN`] frame: its pair ([`UsdtSpec::pair`]); 0 otherwise.
    pub pair: u32,
    /// Non-zero: the span is reported as a [`TextSpan`], with the strings its probe's
    /// [`UsdtSpec::strings`] arguments point to.
    pub text: u32,
}

/// A thread's in-kernel call stack of traced functions.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ThreadStack {
    /// Frames in use in `frames`.
    pub depth: u32,
    /// Calls entered above the stored frames but not stored (`frames` was full, or sampling
    /// or a rate limit left them out); their exits are ignored.
    pub unstored: u32,
    pub frames: [Frame; MAX_DEPTH],
}

/// A goroutine: the key of [`maps::GO_STACKS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GoroutineKey {
    /// The process (tgid).
    pub pid: u32,
    pub _pad: u32,
    /// Address of the goroutine's `runtime.g`.
    pub g: u64,
}

/// Offset of `stack.hi` in Go's `runtime.g` (`stack.lo` and `stack.hi` come first, and the
/// runtime's assembly relies on it): the top of the goroutine's stack.
pub const GO_G_STACK_HI: u64 = 8;
/// Where [`Frame::sp`] of a Go call counts down from: a frame's `sp` is this minus its
/// distance from the top of the goroutine's stack. Go copies a growing stack to a new place
/// keeping those distances, so entry and return agree, and deeper calls have lower values
/// as on a thread's stack.
pub const GO_STACK_TOP: u64 = 1 << 62;

/// A traced process. The value of [`maps::TARGETS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Target {
    /// Number of sessions tracing this process (informational; the key's presence is the filter).
    pub sessions: u32,
    /// Non-zero while a session of a user other than root traces it. Such a process that
    /// execs into a program it cannot be ptraced in (setuid, setgid, file capabilities: the
    /// kernel makes it undumpable) stops being traced at once, in the kernel, before the new
    /// program runs; the daemon then decides, session by session, who may follow it.
    pub restricted: u32,
    /// Non-zero while no session tracing it captures its reads and writes (every one has an
    /// overhead budget, which a per-syscall cost would escape): the IO programs skip it.
    pub skip_io: u32,
    pub _pad: u32,
}

/// Per-CPU bookkeeping. The value of [`maps::CPU_STATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuState {
    /// Next span id sequence number on this CPU.
    pub next_seq: u64,
}

/// What a probe has seen. The value of [`maps::PROBE_COUNTERS`] (per CPU; userspace sums).
/// Every call is exactly one of: a span sent to userspace, `dropped`, `sampled_out` or
/// `rate_limited`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeCounters {
    /// Entries of the probed function in traced processes.
    pub calls: u64,
    /// Spans of this probe that were lost (ring full, stack full, depth overflow).
    pub dropped: u64,
    /// Calls not recorded because sampling kept only 1 in [`ProbeControl::sample_every`].
    pub sampled_out: u64,
    /// Calls not recorded because the probe was over [`ProbeControl::max_rate`].
    pub rate_limited: u64,
}

/// How much of a probe's calls to record, set by the daemon (`--sample`, `--max-rate`, and
/// the overhead budget). The value of [`maps::PROBE_CONTROL`]; all zeros records every call.
///
/// The rate limit is a token bucket shared by all CPUs: `tokens` and `refilled_ns` are the
/// kernel's state (the daemon writes zeros). Its updates are not atomic across CPUs, so under
/// contention slightly more than `max_rate` calls a second may pass; every call that does not
/// is counted in `rate_limited`, exactly.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeControl {
    /// Record 1 call in this many, per CPU (0 or 1: every call).
    pub sample_every: u32,
    /// Record at most this many calls per second (0: no limit).
    pub max_rate: u32,
    /// Tokens in the bucket, in billionths of a call (a call costs 10^9).
    pub tokens: u64,
    /// When the bucket was last refilled (`bpf_ktime_get_ns`).
    pub refilled_ns: u64,
}

/// Where one USDT argument is at the probe site. `kind` is a [`usdt_arg`] constant; registers
/// are indexes into x86-64 `pt_regs` ([`usdt_arg::REGISTERS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtArgSpec {
    pub kind: u8,
    /// 1, 2, 4 or 8 bytes.
    pub size: u8,
    /// 1: sign-extend from `size`.
    pub signed: u8,
    /// Register index, or [`usdt_arg::NO_REGISTER`].
    pub base: u8,
    pub index: u8,
    pub scale: u8,
    pub _pad: [u8; 2],
    /// The constant, the memory displacement, or (no base register) the absolute address.
    pub offset: i64,
}

/// The arguments of one USDT probe. The value of [`maps::USDT_ARGS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsdtSpec {
    pub count: u32,
    /// For the begin and end sites of a pair (`X__start`/`X__done`, `X__entry`/`X__return`):
    /// a number shared by those sites and no others (the daemon uses the first begin site's
    /// probe id + 1); 0 for a site that is not paired.
    pub pair: u32,
    /// Bit `i`: argument `i` points to a NUL-terminated string, read into the span's
    /// [`TextSpan`] (at most [`TEXT_SLOTS`] of them, lowest first). For a paired span, the
    /// begin site's arguments are read when the end site fires.
    pub strings: u32,
    /// For a begin site: 1 if a begin inside an open span of the same pair nests (Python
    /// calls); 0 if it means the open one will never end (PostgreSQL after an error aborted
    /// a query): that one is then reported abandoned.
    pub nests: u32,
    pub args: [UsdtArgSpec; 6],
}

/// Bytes kept of each string a USDT probe passes (longer ones are cut, and flagged).
pub const MAX_TEXT: usize = 256;
/// Strings kept per span.
pub const TEXT_SLOTS: usize = 2;

/// A span with the strings its USDT probe passed (the SQL of a query, a Python function's
/// file and name). The record of [`RecordKind::TextSpan`]; `span.kind` says so.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextSpan {
    pub span: Span,
    /// Bytes read into each slot of `text`, without the NUL; 0 for none. [`MAX_TEXT`] means
    /// the string was cut.
    pub lens: [u32; TEXT_SLOTS],
    /// The strings of the probe's string arguments, in argument order.
    pub text: [[u8; MAX_TEXT]; TEXT_SLOTS],
}

impl TextSpan {
    /// The strings, as far as they were read (a slot that was not read is absent).
    pub fn strings(&self) -> impl Iterator<Item = &[u8]> {
        self.lens
            .iter()
            .zip(&self.text)
            .filter(|(len, _)| **len > 0)
            .map(|(len, text)| &text[..(*len as usize).min(MAX_TEXT)])
    }
}

/// [`UsdtArgSpec::kind`] values and register indexes.
pub mod usdt_arg {
    pub const NONE: u8 = 0;
    pub const REGISTER: u8 = 1;
    pub const MEMORY: u8 = 2;
    pub const CONSTANT: u8 = 3;
    pub const NO_REGISTER: u8 = 0xff;
    /// The x86-64 registers an argument can be in: a register's index is its position here.
    pub const REGISTERS: [&str; 17] = [
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx",
        "rsi", "rdi", "rip", "rsp",
    ];
}

impl ProbeControl {
    /// One call's worth of tokens.
    pub const TOKEN: u64 = 1_000_000_000;

    /// A bucket holds a tenth of a second's calls (at least one): a burst above the rate is
    /// short, and the long-run rate is `max_rate`.
    pub const fn burst_tokens(max_rate: u32) -> u64 {
        let calls = max_rate as u64 / 10;
        (if calls == 0 { 1 } else { calls }) * Self::TOKEN
    }
}

/// What happened to a traced process. The record of [`RecordKind::Process`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEvent {
    /// [`RecordKind::Process`].
    pub kind: u32,
    /// [`process_event`] constant.
    pub event: u32,
    /// The process (tgid) the event is about: the new child for a fork.
    pub pid: u32,
    pub tid: u32,
    /// For a fork: the parent process and thread.
    pub parent_pid: u32,
    pub parent_tid: u32,
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub time_ns: u64,
    /// For a fork: the parent thread's innermost open traced call (0 if none), and its trace.
    pub span_id: u64,
    pub trace_id: u64,
    /// Exit code for an exit (as `wait` reports it), 0 otherwise.
    pub exit_code: u32,
    pub _pad: u32,
    pub _reserved: u64,
}

/// Values of [`ProcessEvent::event`].
pub mod process_event {
    /// A traced process forked a new process.
    pub const FORK: u32 = 1;
    /// A traced process called exec.
    pub const EXEC: u32 = 2;
    /// A traced process exited (its main thread ended).
    pub const EXIT: u32 = 3;
}

/// The cause a thread's next root call inherits. The value of the link maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub span_id: u64,
    pub trace_id: u64,
    /// `LINK_*` [`span_flags`].
    pub flags: u32,
    pub _pad: u32,
}

/// A traced thread's bytes through a pipe or a socket. The record of [`RecordKind::Io`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoEvent {
    /// [`RecordKind::Io`].
    pub kind: u32,
    /// [`io_op`].
    pub op: u32,
    pub pid: u32,
    pub tid: u32,
    /// `CLOCK_MONOTONIC` nanoseconds at the end of the syscall.
    pub time_ns: u64,
    /// [`stream_kind`].
    pub stream: u32,
    pub bytes: u32,
    /// Names the stream direction the bytes went along, the same for the writer and the
    /// reader: the pipe, the writing unix socket, or the TCP 4-tuple from the writer's side.
    pub key: u64,
    /// The bytes' offsets in that direction: TCP sequence numbers (shared by both hosts), or
    /// bytes written/read since scope first saw the stream.
    pub start: u64,
    pub end: u64,
    /// The thread's innermost open traced call and its trace (0 if none).
    pub span_id: u64,
    pub trace_id: u64,
    /// For a read: the traced call that wrote these bytes, when the kernel matched it.
    pub peer_span_id: u64,
    pub peer_trace_id: u64,
    /// TCP: this end's and the other end's address (IPv4 in the first 4 bytes) and ports.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// `AF_INET`, `AF_INET6`, `AF_UNIX` (0 for a pipe).
    pub family: u16,
    pub _pad: u16,
}

/// Values of [`IoEvent::op`].
pub mod io_op {
    pub const WRITE: u32 = 1;
    pub const READ: u32 = 2;
}

/// Values of [`IoEvent::stream`].
pub mod stream_kind {
    pub const PIPE: u32 = 1;
    pub const UNIX: u32 = 2;
    pub const TCP: u32 = 3;
}

/// The read or write syscall a traced thread is in, on a pipe or socket, resolved when it
/// started. The value of [`maps::PENDING_IO`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingIo {
    /// [`io_op`].
    pub op: u32,
    /// [`stream_kind`].
    pub stream: u32,
    /// Names the stream direction, as [`IoEvent::key`].
    pub key: u64,
    /// Offset of the first byte (TCP: the sequence number) when the syscall started.
    pub start: u64,
    pub local_addr: [u64; 2],
    pub remote_addr: [u64; 2],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    /// A write: its slot in the stream's `writes` plus one (0: none). It is entered there
    /// when the syscall starts, so a reader woken before the writer returns finds it.
    pub slot: u16,
}

/// The length a write is given in [`StreamState::writes`] until its syscall returns with
/// the real one.
pub const PROVISIONAL_WRITE_BYTES: u64 = 1 << 30;

/// One recent write on a stream direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamWrite {
    pub start: u64,
    pub end: u64,
    pub span_id: u64,
    pub trace_id: u64,
}

/// Writes remembered per stream direction to match reads against.
pub const STREAM_WRITES: usize = 8;

/// A stream direction. The value of [`maps::STREAMS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Bytes written and read since scope first saw the stream (pipes and unix sockets).
    pub written: u64,
    pub read: u64,
    /// The next slot of `writes` to fill.
    pub next: u32,
    pub _pad: u32,
    pub writes: [StreamWrite; STREAM_WRITES],
}

/// Field offsets of kernel structs the programs read, from the running kernel's BTF (the
/// daemon fills them in before loading; Rust eBPF has no CO-RE relocations yet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.pid` (the thread id).
    pub task_pid: u32,
    /// `task_struct.tgid` (the process id).
    pub task_tgid: u32,
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_inode: u32,
    pub file_private_data: u32,
    pub inode_mode: u32,
    pub socket_sk: u32,
    pub sk_family: u32,
    pub sk_protocol: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub tcp_write_seq: u32,
    pub tcp_copied_seq: u32,
    pub unix_peer: u32,
    /// `task_struct.mm` and `mm_struct.flags` (its low bits say whether the process is
    /// dumpable).
    pub task_mm: u32,
    pub mm_flags: u32,
}

/// Global counters, an index into [`maps::COUNTERS`]. Every place in the kernel that loses a
/// span counts it here; nothing is dropped silently.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Spans written to a ring buffer.
    SpansEmitted = 0,
    /// A ring buffer was full: span lost.
    RingFull = 1,
    /// No ring buffer for this CPU (CPU id ≥ [`MAX_CPUS`]): span lost.
    NoRing = 2,
    /// The thread (or goroutine) stack map was full, or a Go call's goroutine could not be
    /// read: the call could not be tracked, span lost.
    StackMapFull = 3,
    /// Nesting deeper than [`MAX_DEPTH`]: span lost.
    DepthOverflow = 4,
    /// An exit with no matching entry (e.g. the probe was attached while the call ran).
    UnmatchedExit = 5,
    /// Frames abandoned by `longjmp`/exceptions, reported with [`span_flags::ABANDONED`].
    Abandoned = 6,
    /// Open calls flushed because their thread exited or exec'd.
    Unfinished = 7,
    /// Calls left out by sampling (`--sample`, or the budget).
    SampledOut = 8,
    /// Calls left out by a probe's rate limit (`--max-rate`).
    RateLimited = 9,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 10] = [
        Counter::SpansEmitted,
        Counter::RingFull,
        Counter::NoRing,
        Counter::StackMapFull,
        Counter::DepthOverflow,
        Counter::UnmatchedExit,
        Counter::Abandoned,
        Counter::Unfinished,
        Counter::SampledOut,
        Counter::RateLimited,
    ];
    /// Size of the [`maps::COUNTERS`] array.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// A stable snake_case name for APIs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::SpansEmitted => "spans_emitted",
            Counter::RingFull => "ring_full",
            Counter::NoRing => "no_ring",
            Counter::StackMapFull => "stack_map_full",
            Counter::DepthOverflow => "depth_overflow",
            Counter::UnmatchedExit => "unmatched_exit",
            Counter::Abandoned => "abandoned",
            Counter::Unfinished => "unfinished",
            Counter::SampledOut => "sampled_out",
            Counter::RateLimited => "rate_limited",
        }
    }

    /// Whether this counter counts spans that were lost. Calls left out on purpose
    /// (sampling, rate limits) are counted, but are not losses.
    pub const fn is_loss(self) -> bool {
        matches!(
            self,
            Counter::RingFull | Counter::NoRing | Counter::StackMapFull | Counter::DepthOverflow
        )
    }
}

const _: () = assert!(size_of::<Span>() == 144);
const _: () = assert!(size_of::<Frame>() == 120);
const _: () = assert!(size_of::<ThreadStack>() == 8 + 120 * MAX_DEPTH);
const _: () = assert!(size_of::<TextSpan>() == 144 + 8 + MAX_TEXT * TEXT_SLOTS);
const _: () = assert!(size_of::<ProcessEvent>() == 64);
const _: () = assert!(size_of::<Link>() == 24);
const _: () = assert!(size_of::<KernelOffsets>() == 92);
const _: () = assert!(size_of::<IoEvent>() == 128);
const _: () = assert!(size_of::<StreamState>() == 24 + 32 * STREAM_WRITES);
const _: () = assert!(size_of::<Target>() == 16);
const _: () = assert!(size_of::<GoroutineKey>() == 16);
const _: () = assert!(size_of::<CpuState>() == 8);
const _: () = assert!(size_of::<ProbeCounters>() == 32);
const _: () = assert!(size_of::<ProbeControl>() == 24);
const _: () = assert!(size_of::<UsdtArgSpec>() == 16);
const _: () = assert!(size_of::<UsdtSpec>() == 112);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers, with no padding
    // (asserted by the size checks above).
    unsafe impl aya::Pod for super::Span {}
    unsafe impl aya::Pod for super::Frame {}
    unsafe impl aya::Pod for super::ThreadStack {}
    unsafe impl aya::Pod for super::Target {}
    unsafe impl aya::Pod for super::GoroutineKey {}
    unsafe impl aya::Pod for super::CpuState {}
    unsafe impl aya::Pod for super::ProbeCounters {}
    unsafe impl aya::Pod for super::ProbeControl {}
    unsafe impl aya::Pod for super::UsdtSpec {}
    unsafe impl aya::Pod for super::TextSpan {}
    unsafe impl aya::Pod for super::ProcessEvent {}
    unsafe impl aya::Pod for super::Link {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::IoEvent {}
    unsafe impl aya::Pod for super::PendingIo {}
    unsafe impl aya::Pod for super::StreamState {}
}

/// A record from the rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "decoded one at a time on the reader's stack; this no_std crate has no Box"
)]
pub enum Record {
    Span(Span),
    TextSpan(TextSpan),
    Process(ProcessEvent),
    Io(IoEvent),
}

impl Record {
    /// Decodes a ring-buffer record by its kind; `None` for a short or unknown record.
    pub fn from_bytes(bytes: &[u8]) -> Option<Record> {
        let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
        match kind {
            k if k == RecordKind::Span as u32 => Span::from_bytes(bytes).map(Record::Span),
            k if k == RecordKind::Process as u32 => {
                read::<ProcessEvent>(bytes).map(Record::Process)
            }
            k if k == RecordKind::Io as u32 => read::<IoEvent>(bytes).map(Record::Io),
            k if k == RecordKind::TextSpan as u32 => read::<TextSpan>(bytes)
                .filter(|text| text.span.kind == RecordKind::TextSpan as u32)
                .map(Record::TextSpan),
            _ => None,
        }
    }
}

/// Copies a plain-integer record out of bytes of at least its size.
fn read<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked; callers only use this for `#[repr(C)]` records made of
    // integers (any bit pattern is valid); `read_unaligned` assumes no alignment.
    Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl Span {
    /// Decodes a span from ring-buffer bytes, checking length and kind.
    pub fn from_bytes(bytes: &[u8]) -> Option<Span> {
        read::<Span>(bytes).filter(|span| span.kind == RecordKind::Span as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_round_trips_through_bytes() {
        let span = Span {
            kind: RecordKind::Span as u32,
            probe_id: 7,
            pid: 10,
            tid: 11,
            start_ns: 100,
            end_ns: 250,
            span_id: 1 << 48 | 3,
            parent_id: 0,
            root_id: 1 << 48 | 3,
            trace_id: 1 << 48 | 3,
            link_id: 0,
            args: [1, 2, 3, 4, 5, 6],
            ret: 42,
            caller: 0x4000,
            depth: 2,
            flags: 0,
        };
        // SAFETY: Span is plain integers with no padding.
        let bytes: [u8; size_of::<Span>()] = unsafe { core::mem::transmute(span) };
        assert_eq!(Span::from_bytes(&bytes), Some(span));
        assert_eq!(Span::from_bytes(&bytes[..100]), None);
        let mut wrong_kind = bytes;
        wrong_kind[0] = 9;
        assert_eq!(Span::from_bytes(&wrong_kind), None);
    }

    #[test]
    fn records_decode_by_kind() {
        let event = ProcessEvent {
            kind: RecordKind::Process as u32,
            event: process_event::FORK,
            pid: 9,
            ..Default::default()
        };
        // SAFETY: ProcessEvent is plain integers with no padding.
        let bytes: [u8; size_of::<ProcessEvent>()] = unsafe { core::mem::transmute(event) };
        assert_eq!(Record::from_bytes(&bytes), Some(Record::Process(event)));
        assert_eq!(Record::from_bytes(&bytes[..10]), None);
        assert_eq!(Record::from_bytes(&[7, 0, 0, 0, 1, 2, 3, 4]), None);
    }

    #[test]
    fn cookie_carries_probe_id_and_flags() {
        let c = cookie::new(12345, cookie::INSTANT);
        assert_eq!(c & cookie::PROBE_ID_MASK, 12345);
        assert_ne!(c & cookie::INSTANT, 0);
    }
}
