//! Where a process spends its CPU time: `perf_event` sampling of its threads' user stacks,
//! for the planner (`scope analyze --pid`, `scope attach --auto`).
//!
//! Each thread gets a software `task-clock` event that takes a sample every
//! [`SAMPLE_PERIOD_NS`] of that thread's CPU time, so a sample stands for a fixed slice of
//! CPU and counts add up to CPU time. Samples carry the user call chain only
//! (`exclude_callchain_kernel`): the chain's first entry is where the thread was in user
//! space — for a sample taken in a system call, the libc wrapper that made it, so time in
//! `read`/`write`/`epoll_wait` is attributed to the wrapper, which is what a planner looking
//! for I/O wants. The rest of the chain is the kernel's frame-pointer walk; in code built
//! without frame pointers it is short or wrong, so callers use it as a hint only.
//!
//! The records are read from each event's mmap ring in user space. No BPF program: the
//! volume is small (a busy thread makes 1,000 samples a second), the kernel's own perf ring
//! is the cheapest way to get it, and nothing here needs to filter in the kernel.

use std::{
    collections::HashMap,
    fs,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    ptr::NonNull,
    sync::atomic::{Ordering, fence},
    time::{Duration, Instant},
};

/// CPU time one sample stands for: one every millisecond of a thread's CPU.
pub const SAMPLE_PERIOD_NS: u64 = 1_000_000;
/// Deepest user call chain kept per sample.
const MAX_STACK: u16 = 32;
/// Data pages of each thread's ring (plus one header page): 256 KiB, drained every
/// [`DRAIN_EVERY`], holds far more than a thread can produce in between (~300 bytes a
/// sample, 1,000 samples a second).
const RING_DATA_PAGES: usize = 64;
const DRAIN_EVERY: Duration = Duration::from_millis(50);
/// Most threads sampled in one process.
pub const MAX_THREADS: usize = 512;

/// `perf_event_attr`, as of `PERF_ATTR_SIZE_VER8` (136 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
    config3: u64,
}

const _: () = assert!(size_of::<PerfEventAttr>() == 136);

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_TASK_CLOCK: u64 = 1;
const PERF_SAMPLE_IP: u64 = 1 << 0;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_CALLCHAIN: u64 = 1 << 5;
const FLAG_DISABLED: u64 = 1 << 0;
const FLAG_EXCLUDE_HV: u64 = 1 << 6;
const FLAG_EXCLUDE_CALLCHAIN_KERNEL: u64 = 1 << 21;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_SAMPLE: u32 = 9;
/// Markers in a call chain saying whose frames follow (`PERF_CONTEXT_*`).
const PERF_CONTEXT_MAX: u64 = -4095i64 as u64;
const PERF_CONTEXT_USER: u64 = -512i64 as u64;
/// `_IO('$', 0)` and `_IO('$', 1)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;

/// What sampling a process found.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// User call chains, innermost first, each with how many samples had it.
    pub stacks: HashMap<Vec<u64>, u64>,
    /// Samples per thread.
    pub per_thread: HashMap<u32, u64>,
    pub samples: u64,
    /// Samples the kernel could not put in a ring (it reports how many).
    pub lost: u64,
    /// Threads sampled, and those that could not be (gone before the event was opened).
    pub threads: usize,
    pub window: Duration,
    /// Read- and write-family system calls a second over the window (`syscr` + `syscw` of
    /// `/proc/PID/io`), when readable: what IO capture would follow.
    pub io_syscalls_per_second: Option<f64>,
}

impl Profile {
    /// The busiest thread's share of one CPU over the window.
    pub fn busiest_thread_share(&self) -> f64 {
        let busiest = self.per_thread.values().copied().max().unwrap_or(0);
        let seconds = self.window.as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        busiest as f64 * SAMPLE_PERIOD_NS as f64 / 1e9 / seconds
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("process {pid} has no threads left to sample")]
    NoThreads { pid: u32 },
    #[error(
        "perf_event_open on thread {tid} failed: {source}; sampling needs CAP_PERFMON (scoped runs as root) and a kernel with CONFIG_PERF_EVENTS"
    )]
    Open {
        tid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping thread {tid}'s perf ring failed: {source}")]
    Map {
        tid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// One thread's event and its ring.
struct Ring {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and only read and written through it.
unsafe impl Send for Ring {}

impl Ring {
    fn open(tid: u32) -> Result<Ring, SampleError> {
        let attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_TASK_CLOCK,
            sample_period: SAMPLE_PERIOD_NS,
            sample_type: PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_CALLCHAIN,
            // Kernel samples are kept (their user chain says which call made the system
            // call); their kernel frames are not collected.
            flags: FLAG_DISABLED | FLAG_EXCLUDE_HV | FLAG_EXCLUDE_CALLCHAIN_KERNEL,
            sample_max_stack: MAX_STACK,
            ..PerfEventAttr::default()
        };
        // SAFETY: attr is a valid perf_event_attr of the size it says; the kernel reads it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                tid as libc::pid_t,
                -1 as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(SampleError::Open {
                tid,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the kernel just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let page = page_size();
        let len = page * (1 + RING_DATA_PAGES);
        // SAFETY: a shared read-write mapping of the event's ring, as perf_event_open(2)
        // describes; checked for failure below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(SampleError::Map {
                tid,
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or_else(|| SampleError::Map {
            tid,
            source: std::io::Error::other("mmap returned null"),
        })?;
        Ok(Ring { fd, base, len })
    }

    fn ioctl(&self, request: libc::c_ulong) {
        // SAFETY: enable/disable take no argument and act on this event only.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), request, 0) };
    }

    /// Moves every record in the ring into `profile`.
    fn drain(&self, profile: &mut Profile) {
        let page = page_size();
        // The header page: data_head at 1024, data_tail at 1032 (struct perf_event_mmap_page).
        // SAFETY: both are u64 fields inside the first mapped page.
        let head_ptr = unsafe { self.base.as_ptr().add(1024).cast::<u64>() };
        let tail_ptr = unsafe { self.base.as_ptr().add(1032).cast::<u64>() };
        // SAFETY: the kernel writes data_head; read it once, then order the data reads
        // after it (the documented protocol).
        let head = unsafe { head_ptr.read_volatile() };
        fence(Ordering::Acquire);
        // SAFETY: data_tail is ours to read and write.
        let mut tail = unsafe { tail_ptr.read_volatile() };
        let size = (self.len - page) as u64;
        // SAFETY: the data area is the rest of the mapping.
        let data =
            unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(page), size as usize) };
        let read = |at: u64, n: usize| -> Vec<u8> {
            (0..n as u64)
                .map(|i| data[((at + i) % size) as usize])
                .collect()
        };
        while head.saturating_sub(tail) >= 8 {
            let header = read(tail, 8);
            let kind = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
            let len = u64::from(u16::from_ne_bytes([header[6], header[7]]));
            if len < 8 || tail + len > head {
                break;
            }
            let body = read(tail + 8, (len - 8) as usize);
            match kind {
                PERF_RECORD_SAMPLE => record_sample(&body, profile),
                PERF_RECORD_LOST => {
                    // u64 id, u64 lost.
                    if let Some(lost) = u64_at(&body, 8) {
                        profile.lost += lost;
                    }
                }
                _ => {}
            }
            tail += len;
        }
        fence(Ordering::Release);
        // SAFETY: tells the kernel the space up to tail may be reused.
        unsafe { tail_ptr.write_volatile(tail) };
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what open() mapped; nothing refers to it after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
}

/// A `PERF_RECORD_SAMPLE` with IP, TID and CALLCHAIN, in that order.
fn record_sample(body: &[u8], profile: &mut Profile) {
    let (Some(ip), Some(pid_tid), Some(nr)) = (u64_at(body, 0), u64_at(body, 8), u64_at(body, 16))
    else {
        return;
    };
    let tid = (pid_tid >> 32) as u32;
    let mut stack = Vec::new();
    let mut user = false;
    for i in 0..nr.min(u64::from(MAX_STACK) + 8) as usize {
        let Some(entry) = u64_at(body, 24 + 8 * i) else {
            break;
        };
        if entry >= PERF_CONTEXT_MAX {
            user = entry == PERF_CONTEXT_USER;
            continue;
        }
        if user && entry != 0 {
            stack.push(entry);
        }
    }
    if stack.is_empty() && ip < 0x8000_0000_0000_0000 && ip != 0 {
        // No chain: the sample's own IP, when it is in user space.
        stack.push(ip);
    }
    profile.samples += 1;
    *profile.per_thread.entry(tid).or_default() += 1;
    if !stack.is_empty() {
        *profile.stacks.entry(stack).or_default() += 1;
    }
}

/// The thread ids of process `pid`.
pub fn threads(pid: u32) -> Vec<u32> {
    let mut tids: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    tids.truncate(MAX_THREADS);
    tids
}

/// Samples every thread of process `pid` for `window`. Threads that end meanwhile are
/// fine; threads started meanwhile are not sampled. Blocking.
pub fn sample(pid: u32, window: Duration) -> Result<Profile, SampleError> {
    let mut rings = Vec::new();
    let mut first_error = None;
    for tid in threads(pid) {
        match Ring::open(tid) {
            Ok(ring) => rings.push(ring),
            // A thread that ended between listing and opening.
            Err(SampleError::Open { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => {
            }
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    if rings.is_empty() {
        return Err(first_error.unwrap_or(SampleError::NoThreads { pid }));
    }
    let mut profile = Profile {
        threads: rings.len(),
        ..Profile::default()
    };
    let io_before = io_syscalls(pid);
    let started = Instant::now();
    for ring in &rings {
        ring.ioctl(PERF_EVENT_IOC_ENABLE);
    }
    while started.elapsed() < window {
        std::thread::sleep(DRAIN_EVERY.min(window.saturating_sub(started.elapsed())));
        for ring in &rings {
            ring.drain(&mut profile);
        }
    }
    for ring in &rings {
        ring.ioctl(PERF_EVENT_IOC_DISABLE);
        ring.drain(&mut profile);
    }
    profile.window = started.elapsed();
    profile.io_syscalls_per_second = io_before.zip(io_syscalls(pid)).map(|(before, after)| {
        after.saturating_sub(before) as f64 / profile.window.as_secs_f64().max(1e-3)
    });
    Ok(profile)
}

/// `syscr + syscw` of process `pid`: its read- and write-family system calls so far.
fn io_syscalls(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("syscr:")? + field("syscw:")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_record(ip: u64, tid: u32, chain: &[u64]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&ip.to_ne_bytes());
        body.extend_from_slice(&((u64::from(tid) << 32) | 7).to_ne_bytes());
        body.extend_from_slice(&(chain.len() as u64).to_ne_bytes());
        for entry in chain {
            body.extend_from_slice(&entry.to_ne_bytes());
        }
        body
    }

    #[test]
    fn user_frames_are_kept_and_kernel_markers_skipped() {
        let mut profile = Profile::default();
        let body = sample_record(
            0xffff_ffff_8100_0000,
            42,
            &[PERF_CONTEXT_USER, 0x40_1000, 0x40_2000],
        );
        record_sample(&body, &mut profile);
        assert_eq!(profile.samples, 1);
        assert_eq!(profile.per_thread[&42], 1);
        assert_eq!(profile.stacks[&vec![0x40_1000, 0x40_2000]], 1);
    }

    #[test]
    fn a_sample_without_a_chain_uses_its_user_ip_and_truncated_records_are_ignored() {
        let mut profile = Profile::default();
        record_sample(&sample_record(0x40_1000, 1, &[]), &mut profile);
        assert_eq!(profile.stacks[&vec![0x40_1000]], 1);
        record_sample(&[1, 2, 3], &mut profile);
        assert_eq!(profile.samples, 1);
    }

    #[test]
    fn a_sampled_process_reports_its_busy_thread() {
        // This test's own process: a thread spinning for the window shows up.
        let spin = std::thread::spawn(|| {
            let until = Instant::now() + Duration::from_millis(400);
            let mut x = 0u64;
            while Instant::now() < until {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
            x
        });
        match sample(std::process::id(), Duration::from_millis(300)) {
            Ok(profile) => assert!(profile.samples > 50, "{profile:?}"),
            // Unprivileged test runs may not open perf events on this machine.
            Err(SampleError::Open { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) => {}
            Err(error) => panic!("{error}"),
        }
        let _ = spin.join();
    }
}
