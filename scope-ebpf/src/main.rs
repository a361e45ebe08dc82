//! scope's kernel side.
//!
//! One generic entry program and one generic exit program serve every probed function: the
//! attach cookie carries the probe id, so tracing N functions loads 2 programs, not 2N.
//! Entry and exit are paired here, per thread, so userspace receives one [`Span`] per call
//! (start, end, depth, args, return value) through a ring buffer of the CPU it ran on.
//! Every place that loses a span increments a counter; nothing is dropped silently.
#![no_std]
#![no_main]
// `AtomicU64` has no read-modify-write operations on the BPF target, so counters use the
// `atomic_xadd` intrinsic and the span-id sequence a line of BPF assembly.
#![feature(core_intrinsics, asm_experimental_arch)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only atomic add on bpfel"
)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    },
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray, RingBuf},
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_probe_read_user_str, bpf_ringbuf_query},
    },
    macros::{btf_map, raw_tracepoint, tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
};
use aya_log_ebpf::{debug, info, warn};
use scope_common::{
    Counter, CpuState, Frame, GO_G_STACK_HI, GO_STACK_TOP, GoroutineKey, IoEvent, KernelOffsets,
    Link, MAX_CPUS, MAX_DEPTH, MAX_PROBES, MAX_STREAMS, MAX_TARGETS, MAX_TEXT, MAX_THREADS,
    MAX_UNWIND, PROVISIONAL_WRITE_BYTES, PendingIo, ProbeControl, ProbeCounters, ProcessEvent,
    RecordKind, STREAM_WRITES, Span, StreamState, StreamWrite, Target, TextSpan, ThreadStack,
    UsdtArgSpec, UsdtSpec, cookie, io_op, process_event, span_flags, stream_kind,
};

/// Size of the template ring in the object. The daemon creates the real per-CPU rings (of the
/// size it was configured with) and puts them in `RINGS`; ring buffers of any size can fill a
/// slot because the kernel does not compare `max_entries` of ring-buffer inner maps.
const TEMPLATE_RING_BYTES: usize = 4096;

/// Wake the reader only when a ring holds this much unread data; below it the reader picks
/// records up on its own short poll interval. One wakeup per record would cost an IPI per call.
const WAKEUP_BYTES: u64 = 64 * 1024;

#[btf_map]
static RINGS: ArrayOfMaps<RingBuf<Span, TEMPLATE_RING_BYTES>, { MAX_CPUS as usize }> =
    ArrayOfMaps::new();

#[btf_map]
static TARGETS: HashMap<u32, Target, { MAX_TARGETS as usize }> = HashMap::new();

#[btf_map]
static STACKS: HashMap<u32, ThreadStack, { MAX_THREADS as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map]
static GO_STACKS: HashMap<
    GoroutineKey,
    ThreadStack,
    { MAX_THREADS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// One zeroed `ThreadStack`, the initial value of a new `STACKS` entry (too big for the BPF stack).
#[btf_map]
static EMPTY_STACK: PerCpuArray<ThreadStack, 1> = PerCpuArray::new();

#[btf_map]
static COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

#[btf_map]
static PROBE_COUNTERS: PerCpuArray<ProbeCounters, { MAX_PROBES as usize }> = PerCpuArray::new();

#[btf_map]
static PROBE_CONTROL: Array<ProbeControl, { MAX_PROBES as usize }> = Array::new();

#[btf_map]
static USDT_ARGS: Array<UsdtSpec, { MAX_PROBES as usize }> = Array::new();

#[btf_map]
static CPU_STATE: PerCpuArray<CpuState, 1> = PerCpuArray::new();

#[btf_map]
static FORK_LINKS: LruHashMap<u32, Link, { MAX_THREADS as usize }> = LruHashMap::new();

#[btf_map]
static WAKE_LINKS: LruHashMap<u32, Link, { MAX_THREADS as usize }> = LruHashMap::new();

#[btf_map]
static PENDING_IO: HashMap<u32, PendingIo, { MAX_THREADS as usize }> = HashMap::new();

#[btf_map]
static STREAMS: LruHashMap<u64, StreamState, { MAX_STREAMS as usize }> = LruHashMap::new();

/// One zeroed `StreamState`, the initial value of a new `STREAMS` entry.
#[btf_map]
static EMPTY_STREAM: PerCpuArray<StreamState, 1> = PerCpuArray::new();

/// Kernel struct offsets, set by the daemon before loading.
#[unsafe(no_mangle)]
static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_inode: 0,
    file_private_data: 0,
    inode_mode: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_protocol: 0,
    sk_daddr: 0,
    sk_rcv_saddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_v6_daddr: 0,
    sk_v6_rcv_saddr: 0,
    tcp_write_seq: 0,
    tcp_copied_seq: 0,
    unix_peer: 0,
    task_mm: 0,
    mm_flags: 0,
});

#[uprobe(multi)]
pub fn scope_entry(ctx: ProbeContext) -> u32 {
    on_entry(&ctx);
    0
}

#[uretprobe(multi)]
pub fn scope_exit(ctx: RetProbeContext) -> u32 {
    on_exit(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn scope_thread_exit(_ctx: TracePointContext) -> u32 {
    flush_thread(span_flags::THREAD_EXITED);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let _ = FORK_LINKS.remove(&tid);
    let _ = WAKE_LINKS.remove(&tid);
    // SAFETY: only checked for presence.
    if tid == pid && unsafe { TARGETS.get(&pid) }.is_some() {
        process_event(process_event::EXIT, pid, tid, 0, 0, 0, 0);
    }
    0
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn scope_exec(_ctx: TracePointContext) -> u32 {
    flush_thread(span_flags::EXECED);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: read once, copied.
    let Some(target) = (unsafe { TARGETS.get(&pid) }).copied() else {
        return 0;
    };
    process_event(process_event::EXEC, pid, tid, 0, 0, 0, 0);
    // A user's session must not see a program that user could not ptrace: stop tracing the
    // process before its new program runs. The daemon hears of the exec and re-attaches the
    // sessions that may follow (root's).
    if target.restricted != 0 && !current_dumpable() {
        let _ = TARGETS.remove(&pid);
    }
    0
}

/// `SUID_DUMP_USER`: the dumpable state of a process that anyone with its uid may ptrace.
const SUID_DUMP_USER: u64 = 1;
/// The dumpable state's bits in `mm_struct.flags` (`MMF_DUMPABLE_MASK`).
const MMF_DUMPABLE_MASK: u64 = 3;

/// Whether the current process is dumpable (`get_dumpable(mm) == SUID_DUMP_USER`). An exec
/// that gains privileges (setuid, setgid, file capabilities) makes it undumpable by anyone
/// but root. Anything unreadable counts as undumpable.
#[inline(always)]
fn current_dumpable() -> bool {
    let o = OFFSETS.load();
    if o.task_mm == 0 {
        return false;
    }
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let Some(mm) = kread::<u64>(task + u64::from(o.task_mm)) else {
        return false;
    };
    kread::<u64>(mm + u64::from(o.mm_flags))
        .is_some_and(|flags| flags & MMF_DUMPABLE_MASK == SUID_DUMP_USER)
}

/// A traced process forks or clones: the new thread's root calls hang under the span that
/// was running in the parent, and a new process is traced from its first instruction (the
/// daemon attaches its probes as soon as it hears of it).
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn scope_fork(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: read once, copied.
    let Some(parent) = (unsafe { TARGETS.get(&pid) }).copied() else {
        return 0;
    };
    // TP_PROTO(struct task_struct *parent, struct task_struct *child)
    let child: u64 = ctx.arg(1);
    let (child_tid, child_pid) = task_ids(child);
    if child_tid == 0 {
        return 0;
    }
    let (span_id, trace_id) = innermost_open(tid);
    if span_id != 0 {
        let link = Link {
            span_id,
            trace_id,
            flags: span_flags::LINK_FORK,
            _pad: 0,
        };
        let _ = FORK_LINKS.insert(&child_tid, &link, 0);
    }
    if child_pid != pid {
        let _ = TARGETS.insert(
            &child_pid,
            &Target {
                sessions: 0,
                // Until the daemon decides, a child is as restricted as its parent, and has
                // its reads and writes captured as its parent does.
                restricted: parent.restricted,
                skip_io: parent.skip_io,
                _pad: 0,
            },
            0,
        );
        process_event(
            process_event::FORK,
            child_pid,
            child_tid,
            pid,
            tid,
            span_id,
            trace_id,
        );
    }
    0
}

/// A traced thread inside a traced call wakes another traced thread (a futex, condvar or
/// channel hand-off): the wakee's next root call is caused by the waker's call.
// `sched_waking`, not `sched_wakeup`: the latter fires on the wakee's CPU (in an IPI, with any
// task current) when the kernel queues a remote wakeup; `sched_waking` always runs in the
// waker's context, which is what names the cause.
#[raw_tracepoint(tracepoint = "sched_waking")]
pub fn scope_wakeup(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: only checked for presence.
    if unsafe { TARGETS.get(&pid) }.is_none() {
        return 0;
    }
    let (span_id, trace_id) = innermost_open(tid);
    if span_id == 0 {
        return 0;
    }
    // TP_PROTO(struct task_struct *p)
    let wakee: u64 = ctx.arg(0);
    let (wakee_tid, wakee_pid) = task_ids(wakee);
    // SAFETY: only checked for presence.
    if wakee_tid == 0 || wakee_tid == tid || unsafe { TARGETS.get(&wakee_pid) }.is_none() {
        return 0;
    }
    // A thread woken inside a traced call is getting the answer that call waited for (a
    // reply): that is not what causes its next call.
    if innermost_open(wakee_tid).0 != 0 {
        return 0;
    }
    let link = Link {
        span_id,
        trace_id,
        flags: span_flags::LINK_WAKEUP,
        _pad: 0,
    };
    let _ = WAKE_LINKS.insert(&wakee_tid, &link, 0);
    0
}

/// A traced thread starts writing to a file descriptor (write, writev, sendto: the fd is
/// the first argument of each).
#[tracepoint(category = "syscalls", name = "sys_enter_write")]
pub fn scope_io_enter_write(ctx: TracePointContext) -> u32 {
    io_enter(&ctx, io_op::WRITE);
    0
}

/// A traced thread starts reading from a file descriptor (read, readv, recvfrom).
#[tracepoint(category = "syscalls", name = "sys_enter_read")]
pub fn scope_io_enter_read(ctx: TracePointContext) -> u32 {
    io_enter(&ctx, io_op::READ);
    0
}

/// The read or write returned: which stream, which bytes, and for a read, which traced
/// call wrote them.
#[tracepoint(category = "syscalls", name = "sys_exit_write")]
pub fn scope_io_exit(ctx: TracePointContext) -> u32 {
    io_exit(&ctx);
    0
}

/// Benchmark floor: an entry program that does nothing.
#[uprobe(multi)]
pub fn scope_null_entry(_ctx: ProbeContext) -> u32 {
    0
}

/// Benchmark floor: an exit program that does nothing.
#[uretprobe(multi)]
pub fn scope_null_exit(_ctx: RetProbeContext) -> u32 {
    0
}

#[inline(always)]
fn on_entry(ctx: &ProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: the reference is only checked for presence.
    if unsafe { TARGETS.get(&pid) }.is_none() {
        return;
    }
    // SAFETY: ctx is the program's context.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let probe_id = (cookie & cookie::PROBE_ID_MASK) as u32;
    // SAFETY: regs points at the trapped task's pt_regs for the duration of the program.
    let regs = unsafe { &*ctx.regs };
    if cookie & cookie::RET_SITE != 0 {
        on_go_return(regs, probe_id, pid, tid);
        return;
    }
    if cookie & cookie::USDT_END != 0 {
        usdt_end(regs, probe_id, pid, tid);
        return;
    }
    probe_count(probe_id, ProbeField::Calls);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let sp = regs.rsp;
    let go = cookie & cookie::GO != 0;
    let mut args = call_args(regs, go);
    let usdt_begin = cookie & cookie::USDT_BEGIN != 0;
    let caller = if usdt_begin {
        // A USDT site is inside its function: the site itself says where.
        regs.rip
    } else {
        // At entry, sp points at the return address pushed by the call.
        // SAFETY: bpf_probe_read_user copes with any address.
        unsafe { bpf_probe_read_user(sp as *const u64) }.unwrap_or(0)
    };

    let goroutine = GoroutineKey {
        pid,
        _pad: 0,
        g: regs.r14,
    };
    let stack = if go {
        go_stack(&goroutine, sp)
    } else {
        thread_stack(tid).map(|stack| (stack, sp))
    };
    let Some((stack, sp)) = stack else {
        count(Counter::StackMapFull);
        probe_count(probe_id, ProbeField::Dropped);
        return;
    };
    // SAFETY: only this thread touches its own stack entry (the exit programs run on the same
    // thread), so there is no concurrent writer.
    let stack = unsafe { &mut *stack };
    // A USDT site runs inside its function's frame, at `sp`: frames opened at the same `sp`
    // (by an earlier site in the same function, or by Python calls, which CPython runs in
    // one C frame) are still live; the frames of calls that started below it are not.
    drop_dead_frames(
        stack,
        if usdt_begin { sp.wrapping_sub(1) } else { sp },
        caller,
        probe_id,
        pid,
        tid,
        now,
    );
    if let Some(reason) = left_out(probe_id, now) {
        probe_count(probe_id, reason);
        count(match reason {
            ProbeField::RateLimited => Counter::RateLimited,
            _ => Counter::SampledOut,
        });
        if cookie & cookie::INSTANT == 0 {
            // Its exit will come, and must not be taken for a stored frame's.
            stack.unstored += 1;
        }
        if go {
            release_idle_go_stack(&goroutine, stack);
        }
        return;
    }
    let (pair, strings) = if cookie & cookie::USDT != 0 {
        let Some(spec) = usdt_args(regs, probe_id, &mut args) else {
            return;
        };
        if usdt_begin && spec.nests == 0 {
            abandon_open_pair(stack, spec.pair, pid, tid, now);
        }
        (spec.pair, spec.strings)
    } else {
        (0, 0)
    };
    let depth = stack.depth as usize;
    let span_id = next_span_id();
    let (parent_id, root_id, trace_id, link) = if depth == 0 {
        // A goroutine's calls are not linked to what woke or forked the thread it runs on.
        let link = if go { Link::default() } else { root_link(tid) };
        let trace_id = if link.span_id != 0 {
            link.trace_id
        } else {
            span_id
        };
        (0, span_id, trace_id, link)
    } else {
        let parent = frame(stack, depth - 1);
        (
            parent.span_id,
            parent.root_id,
            parent.trace_id,
            Link::default(),
        )
    };

    if cookie & cookie::INSTANT != 0 {
        // An inlined call site is inside its caller: the probed address itself says where.
        let caller = regs.rip;
        emit(probe_id, strings, |span| {
            *span = Span {
                kind: RecordKind::Span as u32,
                probe_id,
                pid,
                tid,
                start_ns: now,
                end_ns: now,
                span_id,
                parent_id,
                root_id,
                trace_id,
                link_id: link.span_id,
                args,
                ret: 0,
                caller,
                depth: depth as u32,
                flags: span_flags::INSTANT | link.flags,
            }
        });
        if go {
            release_idle_go_stack(&goroutine, stack);
        }
        return;
    }

    if depth >= MAX_DEPTH {
        stack.unstored += 1;
        count(Counter::DepthOverflow);
        probe_count(probe_id, ProbeField::Dropped);
        return;
    }
    let frame = frame_mut(stack, depth);
    frame.probe_id = probe_id;
    frame.sp = sp;
    frame.start_ns = now;
    frame.span_id = span_id;
    frame.root_id = root_id;
    frame.trace_id = trace_id;
    frame.link_id = link.span_id;
    frame.link_flags = link.flags;
    frame.caller = caller;
    // A volatile store (six stores): a plain array assignment can become a `memmove` call,
    // which the BPF backend does not expand and the loader cannot relocate.
    // SAFETY: `frame` is a valid, exclusive reference into the map value.
    unsafe { core::ptr::write_volatile(&raw mut frame.args, args) };
    frame.pair = pair;
    frame.text = strings;
    stack.depth = depth as u32 + 1;
}

/// A [`cookie::USDT_END`] site: closes the innermost open span of its pair, with the end
/// site's first argument as the span's `ret`. Frames opened below the site (calls whose
/// returns were missed) are reported abandoned on the way; a frame of an enclosing call
/// on top means the begin was never seen (the daemon attached mid-span, or the begin was
/// left out), and the end is counted unmatched.
#[inline(always)]
fn usdt_end(regs: &aya_ebpf::bindings::pt_regs, probe_id: u32, pid: u32, tid: u32) {
    let Some(stack) = STACKS.get_ptr_mut(&tid) else {
        count(Counter::UnmatchedExit);
        return;
    };
    // SAFETY: see on_entry: only this thread touches its stack.
    let stack = unsafe { &mut *stack };
    if stack.unstored > 0 {
        // The begin was left out by sampling, a rate limit or depth overflow.
        stack.unstored -= 1;
        return;
    }
    let Some(spec) = USDT_ARGS.get_ptr(probe_id) else {
        return;
    };
    // SAFETY: a valid map value, read only.
    let spec = unsafe { &*spec };
    let ret = if spec.count > 0 {
        usdt_arg(regs, &spec.args[0])
    } else {
        0
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let sp = regs.rsp;
    for _ in 0..MAX_UNWIND {
        let depth = stack.depth as usize;
        if depth == 0 || depth > MAX_DEPTH {
            break;
        }
        let top_index = depth - 1;
        let (top_pair, top_sp) = {
            let top = frame(stack, top_index);
            (top.pair, top.sp)
        };
        if top_pair == spec.pair && top_pair != 0 {
            pop_reported(stack, top_index, pid, tid, now, ret, 0);
            return;
        }
        if top_sp >= sp {
            break;
        }
        pop_reported(stack, top_index, pid, tid, now, 0, span_flags::ABANDONED);
        count(Counter::Abandoned);
    }
    count(Counter::UnmatchedExit);
}

/// Before a begin site of a pair that does not nest: reports the open span of the same pair
/// (and everything above it) abandoned, since its end will never come.
#[inline(always)]
fn abandon_open_pair(stack: &mut ThreadStack, pair: u32, pid: u32, tid: u32, now: u64) {
    let depth = stack.depth as usize;
    if depth > MAX_DEPTH {
        return;
    }
    let mut open = None;
    for distance in 1..=MAX_UNWIND {
        let Some(index) = depth.checked_sub(distance) else {
            break;
        };
        if frame(stack, index).pair == pair {
            open = Some(index);
            break;
        }
    }
    let Some(open) = open else {
        return;
    };
    for _ in 0..MAX_UNWIND {
        let depth = stack.depth as usize;
        if depth <= open || depth > MAX_DEPTH {
            return;
        }
        pop_reported(stack, depth - 1, pid, tid, now, 0, span_flags::ABANDONED);
        count(Counter::Abandoned);
    }
}

/// Where the kernel maps its uprobe page (`[uprobes]`, holding the uretprobe trampoline): the
/// hint it asks for is the last page below the 47-bit user address limit, and nothing else
/// lives that high. A return address there means the caller's return was already hijacked by
/// a uretprobe: the call was a tail call from a traced function.
const UPROBE_PAGE: u64 = 0x7fff_ffff_e000;

/// Reports open frames that a `longjmp` or an exception has already unwound: a live enclosing
/// frame's return-address slot is above the new call's, so frames at or below it are dead.
/// The exit program catches the same frames later; catching them here keeps the new call
/// from nesting under them.
#[inline(always)]
fn drop_dead_frames(
    stack: &mut ThreadStack,
    sp: u64,
    return_address: u64,
    probe_id: u32,
    pid: u32,
    tid: u32,
    now: u64,
) {
    for _ in 0..MAX_UNWIND {
        let depth = stack.depth as usize;
        if depth == 0 || depth > MAX_DEPTH {
            return;
        }
        let top_index = depth - 1;
        let top = *frame(stack, top_index);
        if top.sp > sp {
            return;
        }
        if top.sp == sp {
            // The same slot: a tail call from `top` (its return already goes to the uretprobe
            // trampoline), or another probe on this very call (same return address, another
            // probe id). Otherwise the slot was reused after `top` was unwound.
            let tail_call = return_address >= UPROBE_PAGE && return_address < UPROBE_PAGE + 0x1000;
            let same_call = return_address == top.caller && probe_id != top.probe_id;
            if tail_call || same_call {
                return;
            }
        }
        stack.unstored = 0;
        pop_reported(stack, top_index, pid, tid, now, 0, span_flags::ABANDONED);
        count(Counter::Abandoned);
    }
}

#[inline(always)]
fn on_exit(ctx: &RetProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: ctx is the program's context.
    let probe_id = (unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } & cookie::PROBE_ID_MASK) as u32;
    let Some(stack) = STACKS.get_ptr_mut(&tid) else {
        count(Counter::UnmatchedExit);
        return;
    };
    // SAFETY: see on_entry: only this thread touches its stack.
    let stack = unsafe { &mut *stack };
    // SAFETY: regs points at the task's pt_regs for the duration of the program.
    let regs = unsafe { &*ctx.regs };
    // The return popped the return address: the entry saw sp 8 bytes lower.
    let entry_sp = regs.rsp.wrapping_sub(8);
    on_return(stack, probe_id, entry_sp, regs.rax, pid, tid);
}

/// A Go function reached one of its RET instructions (probed instead of a uretprobe, which
/// Go's runtime cannot live with): the exit of the goroutine's call.
#[inline(always)]
fn on_go_return(regs: &aya_ebpf::bindings::pt_regs, probe_id: u32, pid: u32, tid: u32) {
    let goroutine = GoroutineKey {
        pid,
        _pad: 0,
        g: regs.r14,
    };
    let Some(stack) = GO_STACKS.get_ptr_mut(&goroutine) else {
        count(Counter::UnmatchedExit);
        return;
    };
    // SAFETY: a goroutine runs on one thread at a time, and only its own probes touch its
    // stack.
    let stack = unsafe { &mut *stack };
    // At the RET, sp still points at the return address, as it did at entry.
    let Some(entry_sp) = go_sp(goroutine.g, regs.rsp) else {
        count(Counter::UnmatchedExit);
        return;
    };
    // Go's register ABI returns the first integer result in RAX, as System V does.
    on_return(stack, probe_id, entry_sp, regs.rax, pid, tid);
    release_idle_go_stack(&goroutine, stack);
}

/// Pairs the return of `probe_id`'s call whose entry saw `entry_sp` with its frame, and
/// reports the span (and any frames a longjmp or an exception abandoned on the way).
#[inline(always)]
fn on_return(stack: &mut ThreadStack, probe_id: u32, entry_sp: u64, ret: u64, pid: u32, tid: u32) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    for _ in 0..MAX_UNWIND {
        let depth = stack.depth as usize;
        if depth == 0 || depth > MAX_DEPTH {
            if depth == 0 && stack.unstored > 0 {
                // A root call left out by sampling or a rate limit.
                stack.unstored -= 1;
            } else {
                count(Counter::UnmatchedExit);
            }
            return;
        }
        let top_index = depth - 1;
        let top = *frame(stack, top_index);
        if top.sp == entry_sp {
            if top.probe_id != probe_id {
                // Another probe on the same call (two sessions tracing one function): the
                // kernel runs return handlers in entry order, so ours sits below the top.
                pop_same_call(stack, top_index, probe_id, pid, tid, now, ret);
                return;
            }
            pop_reported(stack, top_index, pid, tid, now, ret, 0);
            // Anything deeper has ended, whether we saw its exit or not.
            stack.unstored = 0;
            return;
        }
        if entry_sp < top.sp {
            // A call deeper than every stored frame: one that overflowed MAX_DEPTH, or was
            // left out by sampling or a rate limit.
            if stack.unstored > 0 {
                stack.unstored -= 1;
            } else {
                count(Counter::UnmatchedExit);
            }
            return;
        }
        // An enclosing call returned while `top` is still open: `top` was unwound by a
        // longjmp or an exception and will never return. Report it and keep looking.
        stack.unstored = 0;
        pop_reported(stack, top_index, pid, tid, now, 0, span_flags::ABANDONED);
        count(Counter::Abandoned);
    }
}

/// The first six integer arguments: System V's RDI, RSI, RDX, RCX, R8, R9, or for Go code
/// those of Go's register ABI, RAX, RBX, RCX, RDI, RSI, R8 (then R9, R10, R11).
// One choice per register: a choice between two arrays of registers is compiled to loads
// through a pointer into `pt_regs` chosen at run time, which the verifier refuses
// ("dereference of modified ctx ptr").
#[inline(always)]
fn call_args(regs: &aya_ebpf::bindings::pt_regs, go: bool) -> [u64; 6] {
    let pick = |go_register: u64, c_register: u64| if go { go_register } else { c_register };
    [
        pick(regs.rax, regs.rdi),
        pick(regs.rbx, regs.rsi),
        pick(regs.rcx, regs.rdx),
        pick(regs.rdi, regs.rcx),
        pick(regs.rsi, regs.r8),
        pick(regs.r8, regs.r9),
    ]
}

/// Deepest a goroutine's stack can be: Go's limit on 64-bit systems (`maxstacksize`, 1 GB).
const GO_MAX_STACK: u64 = 1 << 30;

/// The position of `rsp` on the stack of goroutine `g`, as [`Frame::sp`] keeps it for Go
/// code: [`GO_STACK_TOP`] minus its distance from the top of the goroutine's stack, which a
/// stack copy keeps. `None` when `g`'s stack cannot be read or does not hold `rsp`.
#[inline(always)]
fn go_sp(g: u64, rsp: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_user copes with any address.
    let hi = unsafe { bpf_probe_read_user((g.wrapping_add(GO_G_STACK_HI)) as *const u64) }.ok()?;
    let depth = hi.checked_sub(rsp)?;
    if depth > GO_MAX_STACK {
        return None;
    }
    Some(GO_STACK_TOP - depth)
}

/// A goroutine's stack entry, created on first use, and where `rsp` is on it (see [`go_sp`]).
#[inline(always)]
fn go_stack(goroutine: &GoroutineKey, rsp: u64) -> Option<(*mut ThreadStack, u64)> {
    let sp = go_sp(goroutine.g, rsp)?;
    if let Some(stack) = GO_STACKS.get_ptr_mut(goroutine) {
        return Some((stack, sp));
    }
    let empty = EMPTY_STACK.get(0)?;
    if GO_STACKS
        .insert(goroutine, empty, BPF_NOEXIST as u64)
        .is_err()
    {
        return None;
    }
    Some((GO_STACKS.get_ptr_mut(goroutine)?, sp))
}

/// Forgets a goroutine's stack once no traced call is open on it: goroutines are many and
/// short-lived, and nothing tells the kernel when one ends.
#[inline(always)]
fn release_idle_go_stack(goroutine: &GoroutineKey, stack: &ThreadStack) {
    if stack.depth == 0 && stack.unstored == 0 {
        let _ = GO_STACKS.remove(goroutine);
    }
}

/// The exit of `probe_id` whose frame is below other frames of the same call at `top_index`.
#[inline(always)]
fn pop_same_call(
    stack: &mut ThreadStack,
    top_index: usize,
    probe_id: u32,
    pid: u32,
    tid: u32,
    now: u64,
    ret: u64,
) {
    let top = *frame(stack, top_index);
    for distance in 1..MAX_UNWIND {
        let Some(index) = top_index.checked_sub(distance) else {
            break;
        };
        let candidate = frame(stack, index);
        if candidate.sp != top.sp {
            break;
        }
        if candidate.probe_id == probe_id {
            report(stack, index, pid, tid, now, ret, 0);
            // Frames of one call are interchangeable in order: move the top into the hole.
            *frame_mut(stack, index) = top;
            stack.depth = top_index as u32;
            return;
        }
    }
    if stack.unstored > 0 {
        // This probe's call was left out; the other probe's frame stays open.
        stack.unstored -= 1;
    } else {
        count(Counter::UnmatchedExit);
    }
}

/// Reports every open call of the current thread as unfinished and forgets the thread.
#[inline(always)]
fn flush_thread(flag: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let Some(stack) = STACKS.get_ptr_mut(&tid) else {
        return;
    };
    // SAFETY: the exiting/exec'ing thread is the only one touching its stack.
    let stack = unsafe { &mut *stack };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let open = stack.depth;
    if open > 0 {
        if flag == span_flags::EXECED {
            info!(
                &(),
                "scope: thread {} called exec inside {} traced calls; they are reported as execed",
                tid,
                open
            );
        } else {
            debug!(
                &(),
                "scope: thread {} exited inside {} traced calls", tid, open
            );
        }
    }
    for _ in 0..MAX_DEPTH {
        let depth = stack.depth as usize;
        if depth == 0 || depth > MAX_DEPTH {
            break;
        }
        let index = depth - 1;
        pop_reported(stack, index, pid, tid, now, 0, flag);
        count(Counter::Unfinished);
    }
    let _ = STACKS.remove(&tid);
}

/// The thread's stack entry, created on first use.
#[inline(always)]
fn thread_stack(tid: u32) -> Option<*mut ThreadStack> {
    if let Some(stack) = STACKS.get_ptr_mut(&tid) {
        return Some(stack);
    }
    let empty = EMPTY_STACK.get(0)?;
    if STACKS.insert(&tid, empty, BPF_NOEXIST as u64).is_err() {
        return None;
    }
    STACKS.get_ptr_mut(&tid)
}

/// The parent span id of frame `index`.
#[inline(always)]
fn parent_of(stack: &ThreadStack, index: usize) -> u64 {
    if index == 0 || index > MAX_DEPTH {
        return 0;
    }
    frame(stack, index - 1).span_id
}

/// What causes a new root call on `tid`: the last wakeup (consumed), else the fork that
/// made the thread, else nothing.
#[inline(always)]
fn root_link(tid: u32) -> Link {
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(link) = unsafe { WAKE_LINKS.get(&tid) } {
        let link = *link;
        let _ = WAKE_LINKS.remove(&tid);
        return link;
    }
    // SAFETY: copied out at once.
    match unsafe { FORK_LINKS.get(&tid) } {
        Some(link) => *link,
        None => Link::default(),
    }
}

/// The innermost open traced call of a thread: (span id, trace id), or zeros.
#[inline(always)]
fn innermost_open(tid: u32) -> (u64, u64) {
    let Some(stack) = STACKS.get_ptr(&tid) else {
        return (0, 0);
    };
    // SAFETY: a valid map value; read only.
    let stack = unsafe { &*stack };
    let depth = stack.depth as usize;
    if depth == 0 || depth > MAX_DEPTH {
        return (0, 0);
    }
    let top = frame(stack, depth - 1);
    (top.span_id, top.trace_id)
}

/// (tid, tgid) of a `task_struct`, at the offsets the daemon found in the kernel's BTF.
#[inline(always)]
fn task_ids(task: u64) -> (u32, u32) {
    let offsets = OFFSETS.load();
    if task == 0 || offsets.task_pid == 0 {
        return (0, 0);
    }
    // SAFETY: bpf_probe_read_kernel copes with any address.
    let tid = unsafe { bpf_probe_read_kernel((task + u64::from(offsets.task_pid)) as *const u32) }
        .unwrap_or(0);
    // SAFETY: as above.
    let tgid =
        unsafe { bpf_probe_read_kernel((task + u64::from(offsets.task_tgid)) as *const u32) }
            .unwrap_or(0);
    (tid, tgid)
}

/// Offset of the first syscall argument (and of the return value) in the `syscalls:*`
/// tracepoint records: after the 8-byte common header and the 4-byte syscall number, padded.
const SYSCALL_ARG0: usize = 16;

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const S_IFIFO: u16 = 0o010000;
const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

#[inline(always)]
fn io_enter(ctx: &TracePointContext, op: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    // SAFETY: read once.
    match unsafe { TARGETS.get(&((pid_tgid >> 32) as u32)) } {
        Some(target) if target.skip_io == 0 => {}
        _ => return,
    }
    // SAFETY: the tracepoint record holds the arguments at these offsets.
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(SYSCALL_ARG0) }) else {
        return;
    };
    // Resolved now, not when the syscall returns: the offsets are where the bytes start, and
    // a write is entered in its stream before a reader on another CPU can see its bytes.
    let Some(mut pending) = resolve_stream(fd, op) else {
        return;
    };
    let Some(state) = stream_state(pending.key) else {
        return;
    };
    // SAFETY: a valid map value; the updates race only with other threads on the same stream,
    // which at worst misattributes a write.
    let state = unsafe { &mut *state };
    if pending.stream != stream_kind::TCP {
        pending.start = if op == io_op::WRITE {
            state.written
        } else {
            state.read
        };
    }
    if op == io_op::WRITE {
        let (span_id, trace_id) = innermost_open(tid);
        let slot = (state.next as usize) & (STREAM_WRITES - 1);
        if let Some(write) = state.writes.get_mut(slot) {
            *write = StreamWrite {
                start: pending.start,
                end: pending.start + PROVISIONAL_WRITE_BYTES,
                span_id,
                trace_id,
            };
            pending.slot = slot as u16 + 1;
        }
        state.next = state.next.wrapping_add(1);
    }
    let _ = PENDING_IO.insert(&tid, &pending, 0);
}

#[inline(always)]
fn kread<T: Copy>(address: u64) -> Option<T> {
    if address == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address.
    unsafe { bpf_probe_read_kernel(address as *const T) }.ok()
}

#[inline(always)]
fn mix(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(0x0100_0000_01b3)
}

/// Follows `fd` of the current task to its pipe or socket: which stream direction, and for
/// TCP the sequence number the bytes start at.
#[inline(always)]
fn resolve_stream(fd: u64, op: u32) -> Option<PendingIo> {
    let o = OFFSETS.load();
    if o.task_files == 0 {
        return None;
    }
    // SAFETY: plain helper call.
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = kread(task + u64::from(o.task_files))?;
    let fdt: u64 = kread(files + u64::from(o.files_fdt))?;
    let max_fds: u32 = kread(fdt + u64::from(o.fdtable_max_fds))?;
    if fd >= u64::from(max_fds) {
        return None;
    }
    let fds: u64 = kread(fdt + u64::from(o.fdtable_fd))?;
    let file: u64 = kread(fds + fd * 8)?;
    let inode: u64 = kread(file + u64::from(o.file_inode))?;
    let mode: u16 = kread(inode + u64::from(o.inode_mode))?;
    let private: u64 = kread(file + u64::from(o.file_private_data))?;
    let mut stream = PendingIo {
        op,
        ..PendingIo::default()
    };
    match mode & S_IFMT {
        S_IFIFO => {
            stream.stream = stream_kind::PIPE;
            stream.key = private;
        }
        S_IFSOCK => {
            let sk: u64 = kread(private + u64::from(o.socket_sk))?;
            stream.family = kread(sk + u64::from(o.sk_family))?;
            match stream.family {
                AF_UNIX => {
                    stream.stream = stream_kind::UNIX;
                    // A direction is named by the socket that writes into it.
                    stream.key = if op == io_op::WRITE {
                        sk
                    } else {
                        kread(sk + u64::from(o.unix_peer))?
                    };
                }
                AF_INET | AF_INET6 => {
                    let protocol: u16 = kread(sk + u64::from(o.sk_protocol))?;
                    if protocol != IPPROTO_TCP {
                        return None;
                    }
                    stream.stream = stream_kind::TCP;
                    if stream.family == AF_INET {
                        let local: u32 = kread(sk + u64::from(o.sk_rcv_saddr))?;
                        let remote: u32 = kread(sk + u64::from(o.sk_daddr))?;
                        stream.local_addr = [u64::from(local), 0];
                        stream.remote_addr = [u64::from(remote), 0];
                    } else {
                        stream.local_addr = kread(sk + u64::from(o.sk_v6_rcv_saddr))?;
                        stream.remote_addr = kread(sk + u64::from(o.sk_v6_daddr))?;
                    }
                    stream.local_port = kread(sk + u64::from(o.sk_num))?;
                    let remote_port: u16 = kread(sk + u64::from(o.sk_dport))?;
                    stream.remote_port = u16::from_be(remote_port);
                    // The direction is named from the writer's side: both ends agree.
                    let (from, to, from_port, to_port) = if op == io_op::WRITE {
                        (
                            stream.local_addr,
                            stream.remote_addr,
                            stream.local_port,
                            stream.remote_port,
                        )
                    } else {
                        (
                            stream.remote_addr,
                            stream.local_addr,
                            stream.remote_port,
                            stream.local_port,
                        )
                    };
                    let mut key = 0xcbf2_9ce4_8422_2325u64;
                    key = mix(key, from[0]);
                    key = mix(key, from[1]);
                    key = mix(key, to[0]);
                    key = mix(key, to[1]);
                    key = mix(key, u64::from(from_port) << 16 | u64::from(to_port));
                    stream.key = key;
                    let seq_offset = if op == io_op::WRITE {
                        o.tcp_write_seq
                    } else {
                        o.tcp_copied_seq
                    };
                    let start: u32 = kread(sk + u64::from(seq_offset))?;
                    stream.start = u64::from(start);
                }
                _ => return None,
            }
        }
        _ => return None,
    }
    if stream.key == 0 { None } else { Some(stream) }
}

#[inline(always)]
fn io_exit(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (pid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    // SAFETY: copied out at once.
    let Some(pending) = (unsafe { PENDING_IO.get(&tid) }).copied() else {
        return;
    };
    let _ = PENDING_IO.remove(&tid);
    // SAFETY: the return value sits where the first argument did.
    let ret = unsafe { ctx.read_at::<i64>(SYSCALL_ARG0) }.unwrap_or(-1);
    let Some(state) = stream_state(pending.key) else {
        return;
    };
    // SAFETY: as in io_enter.
    let state = unsafe { &mut *state };
    let start = pending.start;
    let written = if pending.op == io_op::WRITE && pending.slot != 0 {
        state
            .writes
            .get_mut(usize::from(pending.slot - 1) & (STREAM_WRITES - 1))
            .filter(|write| write.start == start)
    } else {
        None
    };
    if ret <= 0 {
        // Nothing was written: the provisional entry must not claim later bytes.
        if let Some(write) = written {
            write.span_id = 0;
        }
        return;
    }
    let bytes = ret as u64;
    let end = if pending.stream == stream_kind::TCP {
        (start + bytes) & 0xffff_ffff
    } else if pending.op == io_op::WRITE {
        state.written = start + bytes;
        start + bytes
    } else {
        state.read = start + bytes;
        start + bytes
    };
    let (span_id, trace_id) = innermost_open(tid);
    let mut peer = StreamWrite::default();
    if let Some(write) = written {
        write.end = end;
    }
    if pending.op == io_op::READ {
        for index in 0..STREAM_WRITES {
            let Some(write) = state.writes.get(index) else {
                break;
            };
            // Offsets compared modulo 2^32: TCP sequence numbers wrap.
            let into = (start as u32).wrapping_sub(write.start as u32);
            let length = (write.end as u32).wrapping_sub(write.start as u32);
            if write.span_id != 0 && into < length {
                peer = *write;
                break;
            }
        }
        if peer.span_id != 0 && span_id == 0 {
            // Not inside a traced call: the thread's next root call handles what it read.
            let link = Link {
                span_id: peer.span_id,
                trace_id: peer.trace_id,
                flags: span_flags::LINK_IO,
                _pad: 0,
            };
            let _ = WAKE_LINKS.insert(&tid, &link, 0);
        }
    }
    io_event(&pending, pid, tid, bytes, end, span_id, trace_id, &peer);
}

/// The stream's state entry, created on first use.
#[inline(always)]
fn stream_state(key: u64) -> Option<*mut StreamState> {
    if let Some(state) = STREAMS.get_ptr_mut(&key) {
        return Some(state);
    }
    let empty = EMPTY_STREAM.get(0)?;
    let _ = STREAMS.insert(&key, empty, BPF_NOEXIST as u64);
    STREAMS.get_ptr_mut(&key)
}

#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "flat arguments keep the verifier's job simple"
)]
fn io_event(
    stream: &PendingIo,
    pid: u32,
    tid: u32,
    bytes: u64,
    end: u64,
    span_id: u64,
    trace_id: u64,
    peer: &StreamWrite,
) {
    // SAFETY: plain helper calls.
    let (cpu, now) = unsafe { (bpf_get_smp_processor_id(), bpf_ktime_get_ns()) };
    let Some(ring) = RINGS.get(cpu) else {
        count(Counter::NoRing);
        return;
    };
    let Some(mut entry) = ring.reserve_untyped::<IoEvent>(0) else {
        count(Counter::RingFull);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: the reservation is exclusive, aligned and the size of an IoEvent. Volatile so
    // LLVM does not merge the stores into a `memset` call the loader cannot relocate.
    unsafe {
        (&raw mut (*e).kind).write_volatile(RecordKind::Io as u32);
        (&raw mut (*e).op).write_volatile(stream.op);
        (&raw mut (*e).pid).write_volatile(pid);
        (&raw mut (*e).tid).write_volatile(tid);
        (&raw mut (*e).time_ns).write_volatile(now);
        (&raw mut (*e).stream).write_volatile(stream.stream);
        (&raw mut (*e).bytes).write_volatile(bytes as u32);
        (&raw mut (*e).key).write_volatile(stream.key);
        (&raw mut (*e).start).write_volatile(stream.start);
        (&raw mut (*e).end).write_volatile(end);
        (&raw mut (*e).span_id).write_volatile(span_id);
        (&raw mut (*e).trace_id).write_volatile(trace_id);
        (&raw mut (*e).peer_span_id).write_volatile(peer.span_id);
        (&raw mut (*e).peer_trace_id).write_volatile(peer.trace_id);
        let local = (&raw mut (*e).local_addr).cast::<[u64; 2]>();
        (&raw mut (*local)[0]).write_volatile(stream.local_addr[0]);
        (&raw mut (*local)[1]).write_volatile(stream.local_addr[1]);
        let remote = (&raw mut (*e).remote_addr).cast::<[u64; 2]>();
        (&raw mut (*remote)[0]).write_volatile(stream.remote_addr[0]);
        (&raw mut (*remote)[1]).write_volatile(stream.remote_addr[1]);
        (&raw mut (*e).local_port).write_volatile(stream.local_port);
        (&raw mut (*e).remote_port).write_volatile(stream.remote_port);
        (&raw mut (*e).family).write_volatile(stream.family);
        (&raw mut (*e)._pad).write_volatile(0);
    }
    let unread =
        // SAFETY: ring is a valid ring buffer map pointer obtained from the outer map.
        unsafe { bpf_ringbuf_query(core::ptr::from_ref(ring).cast_mut().cast(), BPF_RB_AVAIL_DATA as u64) };
    let flags = if unread >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}

/// Writes a process event into this CPU's ring (or counts it lost).
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "flat arguments keep the verifier's job simple"
)]
fn process_event(
    event: u32,
    pid: u32,
    tid: u32,
    parent_pid: u32,
    parent_tid: u32,
    span_id: u64,
    trace_id: u64,
) {
    // SAFETY: plain helper calls.
    let (cpu, now) = unsafe { (bpf_get_smp_processor_id(), bpf_ktime_get_ns()) };
    let Some(ring) = RINGS.get(cpu) else {
        count(Counter::NoRing);
        return;
    };
    let Some(mut entry) = ring.reserve_untyped::<ProcessEvent>(0) else {
        count(Counter::RingFull);
        return;
    };
    // Field by field, volatile: otherwise LLVM merges the stores into a call to `memset`,
    // which the loader cannot relocate.
    let event_ptr = entry.as_mut_ptr();
    // SAFETY: the reservation is exclusive, aligned and the size of a ProcessEvent.
    unsafe {
        (&raw mut (*event_ptr).kind).write_volatile(RecordKind::Process as u32);
        (&raw mut (*event_ptr).event).write_volatile(event);
        (&raw mut (*event_ptr).pid).write_volatile(pid);
        (&raw mut (*event_ptr).tid).write_volatile(tid);
        (&raw mut (*event_ptr).parent_pid).write_volatile(parent_pid);
        (&raw mut (*event_ptr).parent_tid).write_volatile(parent_tid);
        (&raw mut (*event_ptr).time_ns).write_volatile(now);
        (&raw mut (*event_ptr).span_id).write_volatile(span_id);
        (&raw mut (*event_ptr).trace_id).write_volatile(trace_id);
        (&raw mut (*event_ptr).exit_code).write_volatile(0);
        (&raw mut (*event_ptr)._pad).write_volatile(0);
        (&raw mut (*event_ptr)._reserved).write_volatile(0);
    }
    // Lifecycle events are rare and the daemon acts on them (attaching a new child): wake it.
    entry.submit(BPF_RB_FORCE_WAKEUP as u64);
}

const _: () = assert!(MAX_DEPTH.is_power_of_two());

/// Frame `index` (< MAX_DEPTH) of a stack.
///
/// The index goes through a volatile read and a mask: LLVM otherwise folds `frames[d - 2]`
/// into `frames + d * 88 - 176`, a negative offset the verifier cannot prove in bounds, and
/// would drop a plain mask it can prove redundant. The mask is a no-op for valid indexes.
#[inline(always)]
fn frame(stack: &ThreadStack, index: usize) -> &Frame {
    &stack.frames[opaque(index) & (MAX_DEPTH - 1)]
}

#[inline(always)]
fn frame_mut(stack: &mut ThreadStack, index: usize) -> &mut Frame {
    &mut stack.frames[opaque(index) & (MAX_DEPTH - 1)]
}

/// `value`, with everything LLVM knew about it forgotten.
#[inline(always)]
fn opaque(value: usize) -> usize {
    // SAFETY: a volatile read of a local.
    unsafe { core::ptr::read_volatile(&raw const value) }
}

/// Reports the call in frame `index` as ended at `end_ns`.
#[inline(always)]
fn report(
    stack: &ThreadStack,
    index: usize,
    pid: u32,
    tid: u32,
    end_ns: u64,
    ret: u64,
    flags: u32,
) {
    let frame = frame(stack, index);
    let parent_id = parent_of(stack, index);
    // Read as one volatile load (six loads): a plain copy of the array out of the frame is
    // sometimes turned into a `memmove` call, which the BPF backend does not expand and the
    // loader cannot relocate.
    // SAFETY: a reference to a map value is valid to read.
    let args = unsafe { core::ptr::read_volatile(&raw const frame.args) };
    emit(frame.probe_id, frame.text, |span| {
        *span = Span {
            kind: RecordKind::Span as u32,
            probe_id: frame.probe_id,
            pid,
            tid,
            start_ns: frame.start_ns,
            end_ns,
            span_id: frame.span_id,
            parent_id,
            root_id: frame.root_id,
            trace_id: frame.trace_id,
            link_id: frame.link_id,
            args,
            ret,
            caller: frame.caller,
            depth: index as u32,
            flags: flags | frame.link_flags,
        }
    });
}

/// Reports the top frame (`index` is `depth - 1`) and pops it.
#[inline(always)]
fn pop_reported(
    stack: &mut ThreadStack,
    index: usize,
    pid: u32,
    tid: u32,
    end_ns: u64,
    ret: u64,
    flags: u32,
) {
    report(stack, index, pid, tid, end_ns, ret, flags);
    stack.depth = index as u32;
}

/// Writes one span into this CPU's ring, or counts it lost: `fill` writes the span straight
/// into the reserved record (a span built on the BPF stack and copied would not fit beside
/// the programs' other locals). With `strings` set (bit `i`: argument `i` points to a
/// string), the record is a [`TextSpan`] and the first `scope_common::TEXT_SLOTS` of those
/// strings are read from the traced process into it.
#[inline(always)]
fn emit(probe_id: u32, strings: u32, fill: impl Fn(&mut Span)) {
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(ring) = RINGS.get(cpu) else {
        count(Counter::NoRing);
        probe_count(probe_id, ProbeField::Dropped);
        warn!(&(), "scope: no span ring for cpu {}", cpu);
        return;
    };
    if strings == 0 {
        let Some(mut entry) = ring.reserve_untyped::<Span>(0) else {
            count(Counter::RingFull);
            probe_count(probe_id, ProbeField::Dropped);
            return;
        };
        // SAFETY: reserved ring memory the size of a Span; `fill` writes every field.
        fill(unsafe { &mut *entry.as_mut_ptr() });
        entry.submit(wakeup_flags(ring));
    } else {
        let Some(mut entry) = ring.reserve_untyped::<TextSpan>(0) else {
            count(Counter::RingFull);
            probe_count(probe_id, ProbeField::Dropped);
            return;
        };
        // SAFETY: reserved ring memory the size of a TextSpan; `fill` writes the span, and
        // the lengths and strings are written below (bytes past a length are never read).
        let record = unsafe { &mut *entry.as_mut_ptr() };
        fill(&mut record.span);
        record.span.kind = RecordKind::TextSpan as u32;
        let mut first = None;
        let mut second = None;
        for (bit, arg) in record.span.args.iter().enumerate() {
            if (strings >> bit) & 1 == 0 {
                continue;
            }
            if first.is_none() {
                first = Some(*arg);
            } else if second.is_none() {
                second = Some(*arg);
            }
        }
        let [first_len, second_len] = &mut record.lens;
        let [first_text, second_text] = &mut record.text;
        *first_len = read_string(first_text, first);
        *second_len = read_string(second_text, second);
        entry.submit(wakeup_flags(ring));
    }
    count(Counter::SpansEmitted);
}

/// Submit flags that wake the reader only once the ring holds [`WAKEUP_BYTES`].
#[inline(always)]
fn wakeup_flags<T>(ring: &RingBuf<T, TEMPLATE_RING_BYTES>) -> u64 {
    // SAFETY: ring is a valid ring buffer map pointer obtained from the outer map.
    let unread = unsafe {
        bpf_ringbuf_query(
            core::ptr::from_ref(ring).cast_mut().cast(),
            BPF_RB_AVAIL_DATA as u64,
        )
    };
    (if unread >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }) as u64
}

/// Reads the NUL-terminated string at `address` in the traced process into `text`; returns
/// its length without the NUL (`MAX_TEXT - 1` when it was cut), 0 when there is none.
#[inline(always)]
fn read_string(text: &mut [u8; MAX_TEXT], address: Option<u64>) -> u32 {
    let Some(address) = address else {
        return 0;
    };
    // SAFETY: the helper copes with any source address and writes at most MAX_TEXT bytes.
    let read = unsafe {
        bpf_probe_read_user_str(
            text.as_mut_ptr().cast(),
            MAX_TEXT as u32,
            address as *const core::ffi::c_void,
        )
    };
    if read > 1 { (read - 1) as u32 } else { 0 }
}

/// A unique span id: the CPU in the top bits, a per-CPU sequence below.
#[inline(always)]
fn next_span_id() -> u64 {
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    let seq = match CPU_STATE.get_ptr_mut(0) {
        // SAFETY: a valid per-CPU map value; atomic because a preempting task on this CPU may
        // run the same program between our load and store.
        Some(state) => unsafe { fetch_add(&raw mut (*state).next_seq) },
        None => 0,
    };
    (cpu + 1) << 48 | (seq & ((1 << 48) - 1))
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a valid per-CPU map value; atomic for the same reason as next_span_id.
        unsafe { add(value) };
    }
}

/// Overwrites `args` with a USDT probe's arguments, decoded as its note says (see
/// [`UsdtArgSpec`]); arguments it does not have read 0. Returns the probe's spec.
// Written in place, element by element: a zeroed local array would be a `memset` call, which
// the BPF loader cannot relocate.
#[inline(always)]
fn usdt_args(
    regs: &aya_ebpf::bindings::pt_regs,
    probe_id: u32,
    args: &mut [u64; 6],
) -> Option<&'static UsdtSpec> {
    let spec = USDT_ARGS.get_ptr(probe_id)?;
    // SAFETY: a valid map value, read only.
    let spec = unsafe { &*spec };
    // zip, not indexing: an index that could be out of bounds would bring the panic path in.
    for (i, (value, arg)) in args.iter_mut().zip(spec.args.iter()).enumerate() {
        *value = if (i as u32) < spec.count {
            usdt_arg(regs, arg)
        } else {
            0
        };
    }
    Some(spec)
}

#[inline(always)]
fn usdt_arg(regs: &aya_ebpf::bindings::pt_regs, arg: &UsdtArgSpec) -> u64 {
    use scope_common::usdt_arg;
    let raw = match arg.kind {
        usdt_arg::REGISTER => register(regs, arg.base),
        usdt_arg::CONSTANT => arg.offset as u64,
        usdt_arg::MEMORY => {
            let mut address =
                (arg.offset as u64).wrapping_add(if arg.base == usdt_arg::NO_REGISTER {
                    0
                } else {
                    register(regs, arg.base)
                });
            if arg.index != usdt_arg::NO_REGISTER {
                address = address
                    .wrapping_add(register(regs, arg.index).wrapping_mul(u64::from(arg.scale)));
            }
            // SAFETY: bpf_probe_read_user copes with any address.
            unsafe { bpf_probe_read_user(address as *const u64) }.unwrap_or(0)
        }
        _ => 0,
    };
    // Keep `size` bytes, sign-extended when signed.
    let bits = u32::from(arg.size.clamp(1, 8)) * 8;
    if bits >= 64 {
        return raw;
    }
    let shift = 64 - bits;
    if arg.signed != 0 {
        (((raw << shift) as i64) >> shift) as u64
    } else {
        (raw << shift) >> shift
    }
}

/// The register at index `index` of `scope_common::usdt_arg::REGISTERS`.
#[inline(always)]
fn register(regs: &aya_ebpf::bindings::pt_regs, index: u8) -> u64 {
    match index {
        0 => regs.r15,
        1 => regs.r14,
        2 => regs.r13,
        3 => regs.r12,
        4 => regs.rbp,
        5 => regs.rbx,
        6 => regs.r11,
        7 => regs.r10,
        8 => regs.r9,
        9 => regs.r8,
        10 => regs.rax,
        11 => regs.rcx,
        12 => regs.rdx,
        13 => regs.rsi,
        14 => regs.rdi,
        15 => regs.rip,
        16 => regs.rsp,
        _ => 0,
    }
}

#[derive(Clone, Copy)]
enum ProbeField {
    Calls,
    Dropped,
    SampledOut,
    RateLimited,
}

/// Whether to leave a call out, by the probe's sampling or rate limit (see
/// [`ProbeControl`]), and which counter says so.
#[inline(always)]
fn left_out(probe_id: u32, now: u64) -> Option<ProbeField> {
    let control = PROBE_CONTROL.get_ptr_mut(probe_id)?;
    // SAFETY: a valid map value. Other CPUs may update the bucket at the same time; see
    // ProbeControl for why that is tolerated.
    let control = unsafe { &mut *control };
    if control.sample_every > 1 {
        let counters = PROBE_COUNTERS.get_ptr(probe_id)?;
        // SAFETY: a valid per-CPU map value; this CPU's count of calls, this one included.
        let calls = unsafe { (*counters).calls };
        // checked_rem: a `%` that could panic would bring the panic machinery into the program.
        if calls.checked_rem(u64::from(control.sample_every)) != Some(0) {
            return Some(ProbeField::SampledOut);
        }
    }
    if control.max_rate > 0 {
        let elapsed = now
            .saturating_sub(control.refilled_ns)
            .min(ProbeControl::TOKEN);
        let tokens = (control.tokens + elapsed * u64::from(control.max_rate))
            .min(ProbeControl::burst_tokens(control.max_rate));
        control.refilled_ns = now;
        if tokens < ProbeControl::TOKEN {
            control.tokens = tokens;
            return Some(ProbeField::RateLimited);
        }
        control.tokens = tokens - ProbeControl::TOKEN;
    }
    None
}

#[inline(always)]
fn probe_count(probe_id: u32, field: ProbeField) {
    if let Some(counters) = PROBE_COUNTERS.get_ptr_mut(probe_id) {
        // SAFETY: a valid per-CPU map value; atomic for the same reason as next_span_id.
        let value = unsafe {
            match field {
                ProbeField::Calls => &raw mut (*counters).calls,
                ProbeField::Dropped => &raw mut (*counters).dropped,
                ProbeField::SampledOut => &raw mut (*counters).sampled_out,
                ProbeField::RateLimited => &raw mut (*counters).rate_limited,
            }
        };
        // SAFETY: see above.
        unsafe { add(value) };
    }
}

/// Atomically adds one to a map value.
///
/// # Safety
/// `value` must point into a map value.
#[inline(always)]
unsafe fn add(value: *mut u64) {
    // SAFETY: the caller passes a valid map value pointer.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(value, 1) };
}

/// Atomically adds one to a map value and returns the value before.
///
/// Written in assembly: LLVM 22 lowers `atomic_xadd` whose result is used to the BPF add
/// *without* BPF_FETCH (imm 0x00, not 0x01) and then reads the unchanged register as the old
/// value, so every caller got the same number.
///
/// # Safety
/// `value` must point into a map value.
#[inline(always)]
unsafe fn fetch_add(value: *mut u64) -> u64 {
    let mut old: u64 = 1;
    // SAFETY: the caller passes a valid map value pointer; the instruction touches only it.
    unsafe {
        core::arch::asm!(
            "{old} = atomic_fetch_add((u64 *)({ptr} + 0), {old})",
            old = inout(reg) old,
            ptr = in(reg) value,
        );
    }
    old
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
