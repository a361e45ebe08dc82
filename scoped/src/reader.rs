//! The reader: one thread that waits on every CPU's span ring with epoll, decodes records
//! into [`Span`]s and hands them to the pipeline in batches through a bounded channel.
//!
//! The kernel wakes us only when a ring passes a watermark (one wakeup per record would cost
//! an inter-processor interrupt per traced call), so the thread also sweeps every ring after
//! a short timeout: [`FLUSH_INTERVAL`] while spans are flowing, [`IDLE_INTERVAL`] once the
//! rings have been quiet for a while. It never spins and never blocks on the pipeline: a
//! batch that does not fit in the channel is counted as dropped.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use scope_common::{IoEvent, ProcessEvent, Record, Span};
use tokio::sync::mpsc::{self, error::TrySendError};

use crate::{ebpf::Rings, probes::Registry, stats::DaemonStats};

/// Sweep interval while spans are arriving: the most a span waits below the watermark.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(10);
/// Sweep interval after [`QUIET_SWEEPS`] sweeps found nothing.
pub const IDLE_INTERVAL: Duration = Duration::from_millis(200);
const QUIET_SWEEPS: u32 = 50;
/// Where decoded records go: spans to the pipeline, process events to the lifecycle task.
#[derive(Clone)]
pub struct Outputs {
    pub spans: mpsc::Sender<Batch>,
    pub events: mpsc::Sender<ProcessEvent>,
    /// Whose spans they are, to count spans lost on the way against their probes.
    pub registry: Arc<Registry>,
}

/// Spans per batch handed to the pipeline.
pub const BATCH_SPANS: usize = 4096;

const WAKE_TOKEN: u64 = u64::MAX;
const LOG_TOKEN: u64 = u64::MAX - 1;

/// A running reader thread; dropping it stops the thread after a final sweep.
pub struct Reader {
    stop: Arc<AtomicBool>,
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    pub fn spawn(rings: Rings, tx: Outputs, stats: Arc<DaemonStats>) -> io::Result<Reader> {
        let epoll = Epoll::new()?;
        let wake = eventfd()?;
        epoll.add(wake.as_raw_fd(), WAKE_TOKEN)?;
        for (index, ring) in rings.rings.iter().enumerate() {
            epoll.add(ring.as_raw_fd(), index as u64)?;
        }
        if let Some(logger) = &rings.logger {
            epoll.add(logger.as_raw_fd(), LOG_TOKEN)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("scoped-reader".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || run(epoll, rings, tx, stats, stop)
            })?;
        Ok(Reader {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to an eventfd we own.
        unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    epoll: Epoll,
    mut rings: Rings,
    tx: Outputs,
    stats: Arc<DaemonStats>,
    stop: Arc<AtomicBool>,
) {
    let mut quiet_sweeps = 0u32;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; rings.rings.len() + 2];
    loop {
        let timeout = if quiet_sweeps >= QUIET_SWEEPS {
            IDLE_INTERVAL
        } else {
            FLUSH_INTERVAL
        };
        let ready = match epoll.wait(&mut events, timeout) {
            Ok(ready) => ready,
            Err(error) => {
                tracing::error!(%error, "epoll_wait on the span rings failed; the reader stops");
                return;
            }
        };
        if events[..ready].iter().any(|event| event.u64 == LOG_TOKEN)
            && let Some(logger) = rings.logger.as_mut()
        {
            logger.flush();
        }
        let read = sweep(&mut rings, &tx, &stats);
        quiet_sweeps = if read == 0 {
            quiet_sweeps.saturating_add(1)
        } else {
            0
        };
        if stop.load(Ordering::Acquire) {
            sweep(&mut rings, &tx, &stats);
            return;
        }
    }
}

/// Records of one sweep, for the pipeline.
#[derive(Debug, Default)]
pub struct Batch {
    pub spans: Vec<Span>,
    /// The strings of the spans that came with some (USDT probes), by span id.
    pub texts: Vec<(u64, Vec<String>)>,
    pub io: Vec<IoEvent>,
}

impl Batch {
    fn len(&self) -> usize {
        self.spans.len() + self.io.len()
    }
}

/// Drains every ring; returns how many records it read.
fn sweep(rings: &mut Rings, tx: &Outputs, stats: &DaemonStats) -> usize {
    let mut batch = Batch::default();
    let mut read = 0;
    for ring in &mut rings.rings {
        while let Some(item) = ring.next() {
            read += 1;
            match Record::from_bytes(&item) {
                Some(Record::Span(span)) => batch.spans.push(span),
                Some(Record::TextSpan(text)) => {
                    let strings = text.strings().map(crate::usdt::decode).collect();
                    batch.texts.push((text.span.span_id, strings));
                    batch.spans.push(text.span);
                }
                Some(Record::Io(event)) => batch.io.push(event),
                Some(Record::Process(event)) => {
                    stats.process_events.add(1);
                    if tx.events.try_send(event).is_err() {
                        stats.lifecycle_full.add(1);
                    }
                }
                None => stats.decode_errors.add(1),
            }
            if batch.len() >= BATCH_SPANS {
                send(tx, std::mem::take(&mut batch), stats);
            }
        }
    }
    if batch.len() > 0 {
        send(tx, batch, stats);
    }
    read
}

fn send(tx: &Outputs, batch: Batch, stats: &DaemonStats) {
    let spans = batch.spans.len() as u64;
    let io = batch.io.len() as u64;
    stats.spans_received.add(spans);
    stats.io_received.add(io);
    match tx.spans.try_send(batch) {
        Ok(()) => {}
        Err(TrySendError::Full(batch)) => {
            stats.pipeline_full.add(spans);
            stats.io_dropped.add(io);
            tx.registry.count_lost(&batch.spans);
        }
        Err(TrySendError::Closed(batch)) => {
            stats.pipeline_closed.add(spans);
            stats.io_dropped.add(io);
            tx.registry.count_lost(&batch.spans);
        }
    }
}

struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor we own.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are valid and `event` outlives the call.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let timeout = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        loop {
            // SAFETY: `events` is a valid buffer of the given length.
            let n = unsafe {
                libc::epoll_wait(
                    self.0.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    timeout,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
