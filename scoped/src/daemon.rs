//! The daemon's domain API: what each gRPC call does, in domain types. `api.rs` only
//! converts to and from the wire.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use scope_common::ProbeCounters;
use scope_symbolizer::{Frame, Module, ProcessMaps, Symbolizer};

use crate::{
    ebpf::ProgramPair,
    error::ScopeError,
    pipeline::{Pipeline, Subscription},
    probes::{ProbeInfo, ProbeManager, Session, release},
    procfs::ProcessInfo,
    resolve::{self, AttachSpec},
    stats::DaemonStats,
    store::{SpanFilter, StoredSpan},
};

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

/// A session as reported to clients.
pub struct SessionSnapshot {
    pub id: u64,
    pub process: ProcessInfo,
    pub patterns: Vec<String>,
    pub created: SystemTime,
    pub alive: bool,
    pub probes: Vec<(Arc<ProbeInfo>, ProbeCounters)>,
    pub spans_received: u64,
    pub spans_dropped: u64,
}

impl SessionSnapshot {
    fn of(session: &Session, manager: &ProbeManager) -> SessionSnapshot {
        let probes: Vec<(Arc<ProbeInfo>, ProbeCounters)> = session
            .probes
            .iter()
            .map(|p| (Arc::clone(p), manager.probe_counters(p)))
            .collect();
        SessionSnapshot {
            id: session.id,
            process: session.process.clone(),
            patterns: session.patterns.clone(),
            created: session.created,
            alive: session.process.is_alive(),
            spans_dropped: probes.iter().map(|(_, c)| c.dropped).sum(),
            spans_received: session.spans_received(),
            probes,
        }
    }
}

/// The daemon's health and counters.
pub struct StatusSnapshot {
    pub uptime: Duration,
    pub spans_received: u64,
    pub spans_dropped: u64,
    pub counters: Vec<(String, u64)>,
    pub sessions: usize,
    pub probes: usize,
    pub stored_spans: usize,
    pub store_capacity: usize,
    pub store_evicted: u64,
    pub ring_bytes_per_cpu: u32,
    pub cpus: u32,
}

/// Limits the daemon enforces on requests.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_session_probes: usize,
}

pub struct Daemon {
    manager: Mutex<ProbeManager>,
    symbolizer: Arc<Symbolizer>,
    pipeline: Arc<Pipeline>,
    stats: Arc<DaemonStats>,
    callers: CallerSymbolizer,
    clock: Clock,
    started: Instant,
    limits: Limits,
    programs: ProgramPair,
}

impl Daemon {
    pub fn new(
        manager: ProbeManager,
        symbolizer: Arc<Symbolizer>,
        pipeline: Arc<Pipeline>,
        stats: Arc<DaemonStats>,
        limits: Limits,
        programs: ProgramPair,
    ) -> Daemon {
        Daemon {
            manager: Mutex::new(manager),
            callers: CallerSymbolizer::new(Arc::clone(&symbolizer)),
            symbolizer,
            pipeline,
            stats,
            clock: Clock::now(),
            started: Instant::now(),
            limits,
            programs,
        }
    }

    fn manager(&self) -> MutexGuard<'_, ProbeManager> {
        self.manager
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Resolves and attaches. Blocking: call from a blocking thread.
    pub fn attach(&self, spec: &AttachSpec) -> Result<SessionSnapshot, ScopeError> {
        let plan = resolve::plan(&self.symbolizer, spec, self.limits.max_session_probes)?;
        let mut manager = self.manager();
        let id = manager.attach(plan, self.programs)?;
        let Some(session) = manager.session(id) else {
            return Err(ScopeError::NoSuchSession { id });
        };
        tracing::info!(
            session = session.id,
            pid = session.process.pid,
            probes = session.probes.len(),
            patterns = ?session.patterns,
            "attached"
        );
        Ok(SessionSnapshot::of(session, &manager))
    }

    /// Detaches one session, or all of them. Blocking.
    pub fn detach(&self, id: Option<u64>) -> Result<(Vec<u64>, Duration), ScopeError> {
        let detached = self.manager().detach(id)?;
        let (ids, took) = release(detached);
        tracing::info!(sessions = ?ids, ms = took.as_secs_f64() * 1e3, "detached");
        Ok((ids, took))
    }

    pub fn sessions(&self) -> Vec<SessionSnapshot> {
        let manager = self.manager();
        manager
            .sessions()
            .map(|s| SessionSnapshot::of(s, &manager))
            .collect()
    }

    pub fn query(&self, filter: &SpanFilter, limit: usize) -> Vec<StoredSpan> {
        self.pipeline.store().query(filter, limit)
    }

    pub fn subscribe(&self, filter: SpanFilter) -> Subscription {
        self.pipeline.subscribe(filter)
    }

    pub fn status(&self) -> StatusSnapshot {
        let manager = self.manager();
        let kernel = manager.kernel();
        let kernel_counters = kernel.counters();
        let kernel_lost: u64 = kernel_counters
            .iter()
            .filter(|(c, _)| c.is_loss())
            .map(|(_, n)| n)
            .sum();
        let mut counters: Vec<(String, u64)> = kernel_counters
            .iter()
            .map(|(c, n)| (format!("kernel.{}", c.name()), *n))
            .collect();
        counters.extend(
            self.stats
                .snapshot()
                .iter()
                .map(|(name, n)| ((*name).to_owned(), *n)),
        );
        let store = self.pipeline.store();
        counters.push(("store.evicted".to_owned(), store.evicted()));
        let config = kernel.config();
        StatusSnapshot {
            uptime: self.started.elapsed(),
            spans_received: self.stats.spans_received.get(),
            spans_dropped: kernel_lost + self.stats.lost(),
            counters,
            sessions: manager.sessions().count(),
            probes: manager.sessions().map(|s| s.probes.len()).sum(),
            stored_spans: store.len(),
            store_capacity: store.capacity(),
            store_evicted: store.evicted(),
            ring_bytes_per_cpu: config.ring_bytes,
            cpus: kernel.cpus(),
        }
    }

    /// Where a call came from, innermost frame first. `is_return_address` says `address`
    /// points just after a call instruction (the call itself is one byte earlier).
    pub fn caller_frames(&self, pid: u32, address: u64, is_return_address: bool) -> Vec<Frame> {
        self.callers.frames(pid, address, is_return_address)
    }
}

/// How long a process's memory map is trusted before an unknown address makes us re-read it.
const MAPS_REFRESH: Duration = Duration::from_secs(1);

/// Processes whose maps are cached at once.
const MAX_PROCESS_VIEWS: usize = 1024;

/// Symbolizes return addresses in traced processes, caching each process's map.
struct CallerSymbolizer {
    symbolizer: Arc<Symbolizer>,
    processes: Mutex<HashMap<u32, ProcessView>>,
}

struct ProcessView {
    maps: ProcessMaps,
    read_at: Instant,
    modules: HashMap<String, Option<Arc<Module>>>,
}

impl CallerSymbolizer {
    fn new(symbolizer: Arc<Symbolizer>) -> CallerSymbolizer {
        CallerSymbolizer {
            symbolizer,
            processes: Mutex::new(HashMap::new()),
        }
    }

    fn frames(&self, pid: u32, address: u64, is_return_address: bool) -> Vec<Frame> {
        if address == 0 {
            return Vec::new();
        }
        let mut processes = self
            .processes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let stale = processes.get(&pid).is_none_or(|view| {
            view.maps.lookup(address).is_none() && view.read_at.elapsed() > MAPS_REFRESH
        });
        if stale {
            if processes.len() >= MAX_PROCESS_VIEWS {
                processes.clear();
            }
            match ProcessMaps::read(pid) {
                Ok(maps) => {
                    processes.insert(
                        pid,
                        ProcessView {
                            maps,
                            read_at: Instant::now(),
                            modules: HashMap::new(),
                        },
                    );
                }
                Err(_) if processes.contains_key(&pid) => {}
                Err(_) => return Vec::new(),
            }
        }
        let Some(view) = processes.get_mut(&pid) else {
            return Vec::new();
        };
        let Some((mapping, file_offset)) = view.maps.lookup(address) else {
            return Vec::new();
        };
        let Some(path) = mapping.path.clone() else {
            return Vec::new();
        };
        let open_path = if mapping.deleted {
            format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                mapping.start, mapping.end
            )
        } else {
            format!("/proc/{pid}/root{path}")
        };
        let module = view
            .modules
            .entry(path)
            .or_insert_with(|| {
                self.symbolizer
                    .module_in_root(open_path.as_ref(), format!("/proc/{pid}/root").as_ref())
                    .ok()
            })
            .clone();
        let Some(module) = module else {
            return Vec::new();
        };
        let Some(vaddr) = module.file_offset_to_vaddr(file_offset) else {
            return Vec::new();
        };
        module.frames(if is_return_address {
            vaddr.saturating_sub(1)
        } else {
            vaddr
        })
    }
}
