//! The probe manager: sessions, their probes and kernel links.
//!
//! A probe is one traced function in one process, with a kernel *slot* (its id in the attach
//! cookie and its index in the per-probe counters). The [`Registry`] maps slots to
//! [`ProbeInfo`] for the pipeline. Freed slots are reused oldest-first, so spans still in
//! flight when a session detaches are attributed to the right probe.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use aya::programs::uprobe::UProbeLink;
use scope_common::{ProbeCounters, UsdtArgSpec, UsdtSpec, cookie};

use crate::{
    access::{Caller, ROOT_UID},
    ebpf::{Kernel, ProgramPair},
    error::ScopeError,
    model::Probe,
    procfs::ProcessInfo,
    resolve::{Exit, Plan, PlannedProbe, UsdtRole},
    stats::Count,
};

/// A probe while it is attached: its kernel slot, what it is, and what it has delivered.
#[derive(Debug)]
pub struct ProbeInfo {
    pub slot: u32,
    pub probe: Arc<Probe>,
    /// Spans of this probe that reached the pipeline.
    pub received: Count,
    /// Spans of this probe lost in the daemon: its queues were full (to the pipeline, to the
    /// store) or the store could not write them.
    pub daemon_dropped: Count,
    /// The kernel records 1 call in this many (1: every call): the session's `--sample`, or
    /// what the overhead budget set.
    pub sample_every: AtomicU32,
}

impl ProbeInfo {
    pub fn new(slot: u32, probe: Arc<Probe>, sample_every: u32) -> ProbeInfo {
        ProbeInfo {
            slot,
            probe,
            received: Count::default(),
            daemon_dropped: Count::default(),
            sample_every: AtomicU32::new(sample_every.max(1)),
        }
    }

    pub fn sample_every(&self) -> u32 {
        self.sample_every.load(Ordering::Relaxed)
    }
}

/// What a new session is asked to do, and for whom.
#[derive(Clone, Copy, Debug)]
pub struct Terms {
    /// Trace the processes the traced ones fork, too.
    pub follow: bool,
    pub limits: Limits,
    /// The uid that attached it.
    pub owner_uid: u32,
}

/// What share of calls a session's probes record, and the overhead it may cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// Record 1 call in this many per probe (0 or 1: every call).
    pub sample_every: u32,
    /// Record at most this many calls per second per probe (0: no limit).
    pub max_rate: u32,
    /// The share of one CPU the session's probes may cost (0.01 for `--budget 1%`).
    pub budget: Option<f64>,
}

/// Slot → probe, read by the pipeline once per batch.
#[derive(Debug)]
pub struct Registry {
    slots: RwLock<Vec<Option<Arc<ProbeInfo>>>>,
}

impl Registry {
    pub fn new(slots: u32) -> Registry {
        Registry {
            slots: RwLock::new(vec![None; slots as usize]),
        }
    }

    /// Runs `f` with a lookup function; the lock is taken once for the whole batch.
    pub fn with<R>(
        &self,
        f: impl for<'a> FnOnce(&'a dyn Fn(u32) -> Option<&'a Arc<ProbeInfo>>) -> R,
    ) -> R {
        let slots = self
            .slots
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&|slot| slots.get(slot as usize)?.as_ref())
    }

    /// Counts kernel spans lost in the daemon against their probes.
    pub fn count_lost(&self, spans: &[scope_common::Span]) {
        self.with(|lookup| {
            for span in spans {
                if let Some(live) = lookup(span.probe_id).filter(|l| l.probe.pid == span.pid) {
                    live.daemon_dropped.add(1);
                }
            }
        });
    }

    /// Points `slot` at a probe (or at nothing). The probe manager does this on attach and
    /// detach; a synthetic feed (the correlator benchmark) does it to stand in for it.
    pub fn set(&self, slot: u32, probe: Option<Arc<ProbeInfo>>) {
        let mut slots = self
            .slots
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(entry) = slots.get_mut(slot as usize) {
            *entry = probe;
        }
    }
}

/// One traced process of a session: the process attached to, or one it forked (followed).
#[derive(Debug)]
pub struct Member {
    pub process: ProcessInfo,
    pub probes: Vec<Arc<ProbeInfo>>,
    modules: Vec<AttachedModule>,
    /// Whether its session is a non-root user's (see [`Traced`]).
    restricted: bool,
    /// Whether its session captures its reads and writes ([`Member::captures_io`]).
    io: bool,
    /// USDT semaphores raised in the process (lowered again when it leaves the session).
    semaphores: Vec<u64>,
    /// The end sites of its USDT pairs: (end site's slot, its begin probe's slot). An end
    /// site makes no spans of its own and counts no calls; it goes with its begin probe.
    pair_ends: Vec<(u32, u32)>,
}

/// The probes of one member in one ELF file: what was attached, and the links holding it.
#[derive(Debug)]
struct AttachedModule {
    open_path: PathBuf,
    /// (file offset, cookie) of each entry and exit point.
    entry_points: Vec<(u64, u64)>,
    exit_points: Vec<(u64, u64)>,
    links: Vec<UProbeLink>,
}

/// How many sessions trace a process, and how many of them are users' other than root: the
/// kernel stops tracing a process with such a session the moment it execs into a program
/// that user could not ptrace.
#[derive(Clone, Copy, Debug, Default)]
struct Traced {
    sessions: u32,
    restricted: u32,
    /// Sessions that capture its reads and writes.
    io: u32,
}

impl Member {
    /// Whether a session with these limits captures its processes' reads and writes (the
    /// links between calls across processes and hosts). A session with an overhead budget
    /// does not: IO capture costs per read and write syscall, in programs that are not the
    /// session's probes, so the budget could neither see nor bound that cost.
    pub fn captures_io(limits: &Limits) -> bool {
        limits.budget.is_none()
    }

    /// Lowers the USDT semaphores this member raised (the process may be gone: then there is
    /// nothing to lower).
    fn lower_semaphores(&mut self) {
        let pid = self.process.pid;
        for semaphore in self.semaphores.drain(..) {
            if self.process.is_alive()
                && let Err(error) = crate::procfs::add_u16(pid, semaphore, -1)
            {
                tracing::debug!(pid, %error, "lowering a USDT semaphore failed");
            }
        }
    }

    fn take_links(&mut self) -> Vec<UProbeLink> {
        self.lower_semaphores();
        self.modules
            .iter_mut()
            .flat_map(|m| std::mem::take(&mut m.links))
            .collect()
    }
}

/// An attach request that succeeded: the processes it traces, their probes and the links
/// that keep them.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    /// The process the session was attached to.
    pub root: ProcessInfo,
    pub patterns: Vec<String>,
    /// Whether processes the traced ones fork are traced too.
    pub follow: bool,
    /// The uid that attached it (see `access.rs`).
    pub owner_uid: u32,
    pub created: SystemTime,
    pub limits: Limits,
    /// Traced processes by pid (the root among them while it lives).
    pub members: BTreeMap<u32, Member>,
}

impl Session {
    pub fn probes(&self) -> impl Iterator<Item = &Arc<ProbeInfo>> {
        self.members.values().flat_map(|m| m.probes.iter())
    }

    pub fn spans_received(&self) -> u64 {
        self.probes().map(|p| p.received.get()).sum()
    }
}

/// A session tracing a process, as the lifecycle handling needs it.
#[derive(Clone, Debug)]
pub struct Tracing {
    pub id: u64,
    pub patterns: Vec<String>,
    pub follow: bool,
    pub owner_uid: u32,
}

/// Links taken out of the manager, still to be dropped (which is what takes time).
pub struct Detached {
    pub id: u64,
    links: Vec<UProbeLink>,
}

/// Drops detached links, in parallel: the kernel waits for an RCU grace period per
/// uprobe_multi link, and those waits overlap across threads.
pub fn release(detached: Vec<Detached>) -> (Vec<u64>, Duration) {
    let started = Instant::now();
    let mut ids: Vec<u64> = detached.iter().map(|d| d.id).collect();
    ids.dedup();
    let links: Vec<UProbeLink> = detached.into_iter().flat_map(|d| d.links).collect();
    std::thread::scope(|scope| {
        for link in links {
            scope.spawn(move || drop(link));
        }
    });
    (ids, started.elapsed())
}

/// Owns the kernel object, the sessions and the slot allocator.
pub struct ProbeManager {
    kernel: Kernel,
    registry: Arc<Registry>,
    sessions: BTreeMap<u64, Session>,
    /// Free slots, oldest-freed first.
    free_slots: VecDeque<u32>,
    /// Session members per traced pid.
    targets: HashMap<u32, Traced>,
    /// Since when the IO tracepoints have been attached with nothing traced.
    io_idle_since: Option<Instant>,
    /// The last number given to a pair of USDT sites ([`UsdtSpec::pair`]); numbers are
    /// never reused while the daemon runs (a stale frame of an old pair can never match).
    last_pair: u32,
}

/// How long the IO tracepoints stay attached after the last traced process leaves: attaching
/// and releasing them costs an RCU grace period each (about 0.5 s for the twelve), which a
/// detach followed by an attach should not pay.
pub const IO_LINGER: Duration = Duration::from_secs(5);

impl ProbeManager {
    pub fn new(kernel: Kernel, registry: Arc<Registry>) -> ProbeManager {
        let slots = kernel.config().max_probes;
        ProbeManager {
            kernel,
            registry,
            sessions: BTreeMap::new(),
            free_slots: (0..slots).collect(),
            targets: HashMap::new(),
            io_idle_since: None,
            last_pair: 0,
        }
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    pub fn kernel_mut(&mut self) -> &mut Kernel {
        &mut self.kernel
    }

    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    pub fn session(&self, id: u64) -> Option<&Session> {
        self.sessions.get(&id)
    }

    pub fn probe_counters(&self, probe: &ProbeInfo) -> ProbeCounters {
        self.kernel.probe_counters(probe.slot)
    }

    /// Sessions tracing `pid`.
    pub fn sessions_of(&self, pid: u32) -> Vec<Tracing> {
        self.sessions
            .values()
            .filter(|s| s.members.contains_key(&pid))
            .map(|s| Tracing {
                id: s.id,
                patterns: s.patterns.clone(),
                follow: s.follow,
                owner_uid: s.owner_uid,
            })
            .collect()
    }

    /// Sessions `owner_uid` holds.
    pub fn sessions_owned(&self, owner_uid: u32) -> usize {
        self.sessions
            .values()
            .filter(|s| s.owner_uid == owner_uid)
            .count()
    }

    /// Attaches a resolved plan as new session `id`. `probes` are the stored probes of the
    /// plan, in plan order. On any failure nothing stays attached.
    pub fn attach(
        &mut self,
        id: u64,
        plan: Plan,
        probes: Vec<Arc<Probe>>,
        pair: ProgramPair,
        terms: Terms,
    ) -> Result<(), ScopeError> {
        let Terms {
            follow,
            limits,
            owner_uid,
        } = terms;
        let root = plan.process.clone();
        let patterns = plan.patterns.clone();
        let member = self.member(plan, probes, pair, limits, owner_uid != ROOT_UID, false)?;
        let mut members = BTreeMap::new();
        members.insert(root.pid, member);
        self.sessions.insert(
            id,
            Session {
                id,
                root,
                patterns,
                follow,
                owner_uid,
                created: SystemTime::now(),
                limits,
                members,
            },
        );
        Ok(())
    }

    /// Adds a process to session `id` (a fork it follows, or the new image after an exec).
    /// A `forked` process already holds the session's USDT semaphore counts, copied from its
    /// parent: they are recorded to lower on detach, not raised again.
    /// Returns the links of a member it replaces, to release.
    pub fn add_member(
        &mut self,
        id: u64,
        plan: Plan,
        probes: Vec<Arc<Probe>>,
        pair: ProgramPair,
        forked: bool,
    ) -> Result<Option<Detached>, ScopeError> {
        let Some(owner_uid) = self.sessions.get(&id).map(|s| s.owner_uid) else {
            return Err(ScopeError::NoSuchSession { id });
        };
        let pid = plan.process.pid;
        let replaced = self.remove_member(id, pid).map(|(links, _)| links);
        let limits = self.sessions.get(&id).map(|s| s.limits).unwrap_or_default();
        let member = self.member(plan, probes, pair, limits, owner_uid != ROOT_UID, forked)?;
        if let Some(session) = self.sessions.get_mut(&id) {
            session.members.insert(pid, member);
        }
        Ok(replaced)
    }

    /// Takes `pid` out of session `id` (it exited, or exec'd into an image being re-resolved):
    /// its links to release, and the process it was.
    pub fn remove_member(&mut self, id: u64, pid: u32) -> Option<(Detached, ProcessInfo)> {
        let mut member = self.sessions.get_mut(&id)?.members.remove(&pid)?;
        self.untarget(pid, member.restricted, member.io);
        self.unregister(&member.probes);
        Some((
            Detached {
                id,
                links: member.take_links(),
            },
            member.process,
        ))
    }

    /// Places the probes of a plan for its process, and counts the process as traced.
    fn member(
        &mut self,
        plan: Plan,
        probes: Vec<Arc<Probe>>,
        pair: ProgramPair,
        limits: Limits,
        restricted: bool,
        forked: bool,
    ) -> Result<Member, ScopeError> {
        let needed = plan.probe_count();
        if needed > self.free_slots.len() {
            return Err(ScopeError::ProbeSlotsExhausted {
                needed,
                free: self.free_slots.len(),
            });
        }
        let pid = plan.process.pid;
        let io = Member::captures_io(&limits);
        let mut member = Member {
            process: plan.process,
            probes: Vec::with_capacity(needed),
            modules: Vec::new(),
            restricted,
            io,
            semaphores: Vec::new(),
            pair_ends: Vec::new(),
        };
        if let Err(error) = self.place(&mut member, plan.modules, probes, pair, limits, forked) {
            self.unregister(&member.probes);
            return Err(error);
        }
        let traced = self.targets.entry(pid).or_default();
        traced.sessions += 1;
        traced.restricted += u32::from(restricted);
        traced.io += u32::from(io);
        let traced = *traced;
        if let Err(error) =
            self.kernel
                .add_target(pid, traced.sessions, traced.restricted != 0, traced.io != 0)
        {
            self.untarget(pid, restricted, io);
            self.unregister(&member.probes);
            return Err(error);
        }
        self.update_io_capture();
        Ok(member)
    }

    fn untarget(&mut self, pid: u32, restricted: bool, io: bool) {
        if let Some(traced) = self.targets.get_mut(&pid) {
            traced.sessions = traced.sessions.saturating_sub(1);
            traced.restricted = traced.restricted.saturating_sub(u32::from(restricted));
            traced.io = traced.io.saturating_sub(u32::from(io));
            let traced = *traced;
            if traced.sessions == 0 {
                self.targets.remove(&pid);
                self.kernel.remove_target(pid);
            } else if let Err(error) =
                self.kernel
                    .add_target(pid, traced.sessions, traced.restricted != 0, traced.io != 0)
            {
                tracing::warn!(pid, error = %error.chain(), "updating a traced process in the kernel failed");
            }
        }
        self.update_io_capture();
    }

    /// Releases the IO tracepoints once nothing has been traced for [`IO_LINGER`]; scoped
    /// calls this a few times a second.
    pub fn release_idle_io(&mut self) {
        let idle = self
            .io_idle_since
            .is_some_and(|since| since.elapsed() >= IO_LINGER);
        if idle && self.targets.is_empty() {
            self.io_idle_since = None;
            if let Err(error) = self.kernel.capture_io(false) {
                tracing::warn!(error = %error, "releasing the IO tracepoints failed");
            }
        }
    }

    /// IO capture's syscall tracepoints stay attached while some process is traced (and
    /// [`IO_LINGER`] after): they tax every read and write on the machine, traced or not (see
    /// BENCHMARKS.md).
    fn update_io_capture(&mut self) {
        if self.targets.values().all(|traced| traced.io == 0) {
            if self.kernel.io_attached() && self.io_idle_since.is_none() {
                self.io_idle_since = Some(Instant::now());
            }
            return;
        }
        self.io_idle_since = None;
        if let Err(error) = self.kernel.capture_io(true) {
            let error = anyhow::Error::from(error);
            tracing::warn!(
                error = format!("{error:#}"),
                "IO capture is unavailable: calls are traced, but requests are not linked across processes by their bytes"
            );
        }
    }

    /// Forgets a pid the kernel started tracing on its own (a fork no session follows).
    pub fn forget_unfollowed(&mut self, pid: u32) {
        if !self.targets.contains_key(&pid) {
            self.kernel.remove_target(pid);
        }
    }

    fn place(
        &mut self,
        member: &mut Member,
        modules: Vec<crate::resolve::PlannedModule>,
        probes: Vec<Arc<Probe>>,
        pair: ProgramPair,
        limits: Limits,
        forked: bool,
    ) -> Result<(), ScopeError> {
        let pid = member.process.pid;
        let mut probes = probes.into_iter();
        for module in modules {
            // The kernel's number of each pair of USDT sites in this module, and the slots
            // of the pairs' begin and end sites.
            let mut pairs: HashMap<usize, u32> = HashMap::new();
            let (mut begins, mut ends) = (Vec::new(), Vec::new());
            let mut entry_points = Vec::with_capacity(module.probes.len());
            let mut exit_points = Vec::with_capacity(module.probes.len());
            let mut planned: Vec<(Arc<Probe>, &PlannedProbe)> =
                Vec::with_capacity(module.probes.len());
            for planned_probe in &module.probes {
                let Some(probe) = probes.next() else {
                    return Err(ScopeError::ProbeSlotsExhausted { needed: 1, free: 0 });
                };
                planned.push((probe, planned_probe));
            }
            // The kernel runs the handlers of probes on one address newest-registered first.
            // Registering inlined call sites (entry-only) before function entries makes a site
            // at the very start of a traced function run after that function's entry, so the
            // site is nested inside the call it belongs to. The end sites of USDT pairs come
            // before everything: the link registers its points in order, and a begin seen
            // before its end is armed would leave a span open until it is reported abandoned.
            planned.sort_by_key(|(_, p)| {
                let end = p
                    .usdt
                    .as_ref()
                    .is_some_and(|u| matches!(u.role, UsdtRole::End { .. }));
                (!end, p.exit != Exit::Instant)
            });
            for (probe, planned_probe) in planned {
                let Some(slot) = self.free_slots.pop_front() else {
                    return Err(ScopeError::ProbeSlotsExhausted { needed: 1, free: 0 });
                };
                self.kernel.reset_probe_counters(slot)?;
                self.kernel
                    .set_probe_control(slot, limits.sample_every, limits.max_rate)?;
                let info = Arc::new(ProbeInfo::new(slot, probe, limits.sample_every));
                self.registry.set(slot, Some(Arc::clone(&info)));
                member.probes.push(info);
                let mut flags = if planned_probe.exit == Exit::Instant {
                    cookie::INSTANT
                } else {
                    0
                };
                if planned_probe.go {
                    flags |= cookie::GO;
                }
                if let Some(usdt) = &planned_probe.usdt {
                    let mut spec = usdt_spec(&usdt.args, &usdt.symbols);
                    spec.strings = usdt.strings;
                    flags = cookie::USDT
                        | match usdt.role {
                            UsdtRole::Site => cookie::INSTANT,
                            UsdtRole::Begin { .. } => cookie::USDT_BEGIN,
                            UsdtRole::End { .. } => cookie::USDT_END,
                        };
                    if let UsdtRole::Begin { pair, .. } | UsdtRole::End { pair } = usdt.role {
                        spec.pair = *pairs.entry(pair).or_insert_with(|| {
                            self.last_pair = self.last_pair.wrapping_add(1).max(1);
                            self.last_pair
                        });
                    }
                    match usdt.role {
                        UsdtRole::Begin { pair, .. } => begins.push((pair, slot)),
                        UsdtRole::End { pair } => ends.push((pair, slot)),
                        UsdtRole::Site => {}
                    }
                    if let UsdtRole::Begin { nests, .. } = usdt.role {
                        spec.nests = u32::from(nests);
                    }
                    self.kernel.set_usdt_args(slot, &spec)?;
                    if let Some(semaphore) = usdt.semaphore {
                        // Tell the program someone listens, or it skips the probe. A process
                        // forked from a member has this session's count already, copied
                        // with its parent's memory: it is ours to lower, not to raise again.
                        let raised = if forked {
                            Ok(())
                        } else {
                            crate::procfs::add_u16(pid, semaphore, 1)
                        };
                        match raised {
                            Ok(()) => member.semaphores.push(semaphore),
                            Err(error) => {
                                tracing::warn!(pid, %error, slot, "cannot raise a USDT semaphore: the program may skip this probe")
                            }
                        }
                    }
                }
                entry_points.push((planned_probe.file_offset, cookie::new(slot, flags)));
                match &planned_probe.exit {
                    Exit::Uretprobe => {
                        exit_points.push((planned_probe.file_offset, cookie::new(slot, 0)))
                    }
                    // The returns of Go code are uprobes too, in the same link as the entries:
                    // the entry program runs the exit's pairing for them.
                    Exit::ReturnSites(offsets) => entry_points.extend(
                        offsets
                            .iter()
                            .map(|&offset| (offset, cookie::new(slot, flags | cookie::RET_SITE))),
                    ),
                    Exit::Instant => {}
                }
            }
            for &(pair, end) in &ends {
                member.pair_ends.extend(
                    begins
                        .iter()
                        .filter(|&&(p, _)| p == pair)
                        .map(|&(_, begin)| (end, begin)),
                );
            }
            let count = entry_points.len();
            let links = self
                .kernel
                .attach(pair, &module.open_path, pid, &entry_points, &exit_points)
                .map_err(|source| ScopeError::Attach {
                    module: module.path.clone(),
                    pid,
                    count,
                    source,
                })?;
            member.modules.push(AttachedModule {
                open_path: module.open_path,
                entry_points,
                exit_points,
                links,
            });
        }
        Ok(())
    }

    /// Records 1 call in `every` of a probe of session `id` from now on.
    pub fn sample_probe(&mut self, id: u64, slot: u32, every: u32) -> Result<(), ScopeError> {
        let session = self
            .sessions
            .get(&id)
            .ok_or(ScopeError::NoSuchSession { id })?;
        let Some(info) = session.probes().find(|p| p.slot == slot) else {
            return Ok(());
        };
        info.sample_every.store(every.max(1), Ordering::Relaxed);
        let max_rate = session.limits.max_rate;
        self.kernel.set_probe_control(slot, every, max_rate)
    }

    /// Takes one probe out of session `id`: its module's links in that process are replaced by
    /// links without it, so it no longer traps at all. Calls of the module's other probes that
    /// enter during the swap are not seen; ones open across it are reported abandoned.
    /// Whether the session had that probe.
    pub fn remove_probe(
        &mut self,
        id: u64,
        slot: u32,
        pair: ProgramPair,
    ) -> Result<bool, ScopeError> {
        let Some(session) = self.sessions.get_mut(&id) else {
            return Err(ScopeError::NoSuchSession { id });
        };
        let cookie_of = |c: u64| (c & cookie::PROBE_ID_MASK) as u32;
        let Some((&pid, member)) = session
            .members
            .iter_mut()
            .find(|(_, m)| m.probes.iter().any(|p| p.slot == slot))
        else {
            return Ok(false);
        };
        // The end sites of a USDT pair go with the last of its begin sites: they make no
        // spans of their own, and would only trap.
        let live = |begin: u32| begin != slot && member.probes.iter().any(|p| p.slot == begin);
        let mut slots = vec![slot];
        for &(end, begin) in &member.pair_ends {
            let others = member.pair_ends.iter().any(|&(e, b)| e == end && live(b));
            if begin == slot && !others && !slots.contains(&end) {
                slots.push(end);
            }
        }
        member
            .pair_ends
            .retain(|&(end, begin)| begin != slot && !slots.contains(&end));
        let Some(module) = member.modules.iter_mut().find(|m| {
            m.entry_points
                .iter()
                .any(|&(_, cookie)| cookie_of(cookie) == slot)
        }) else {
            return Ok(false);
        };
        module
            .entry_points
            .retain(|&(_, c)| !slots.contains(&cookie_of(c)));
        module
            .exit_points
            .retain(|&(_, c)| !slots.contains(&cookie_of(c)));
        // The old links go first: with both attached, each remaining call would trap twice.
        let old = std::mem::take(&mut module.links);
        let (_, took) = release(vec![Detached { id, links: old }]);
        tracing::debug!(
            session = id,
            slot,
            ms = took.as_secs_f64() * 1e3,
            "released a module's links"
        );
        if !module.entry_points.is_empty() {
            let links = self
                .kernel
                .attach(
                    pair,
                    &module.open_path,
                    pid,
                    &module.entry_points,
                    &module.exit_points,
                )
                .map_err(|source| ScopeError::Attach {
                    module: module.open_path.clone(),
                    pid,
                    count: module.entry_points.len(),
                    source,
                })?;
            module.links = links;
        }
        let mut removed = Vec::new();
        member.probes.retain(|p| {
            if slots.contains(&p.slot) {
                removed.push(Arc::clone(p));
                false
            } else {
                true
            }
        });
        self.unregister(&removed);
        Ok(true)
    }

    /// Frees the probes' slots. Their registry entries stay until a slot is reused, so
    /// spans still in the rings are attributed correctly.
    fn unregister(&mut self, probes: &[Arc<ProbeInfo>]) {
        self.free_slots.extend(probes.iter().map(|p| p.slot));
    }

    /// Removes one session, or all of those `caller` owns. The returned links detach the
    /// probes when dropped; call [`release`] outside any lock.
    pub fn detach(
        &mut self,
        id: Option<u64>,
        caller: &Caller,
    ) -> Result<Vec<Detached>, ScopeError> {
        let ids: Vec<u64> = match id.map(|id| (id, self.sessions.get(&id))) {
            Some((id, Some(session))) => {
                caller.check_session(id, session.owner_uid)?;
                vec![id]
            }
            Some((id, None)) => return Err(ScopeError::NoSuchSession { id }),
            None => self
                .sessions
                .values()
                .filter(|s| caller.owns(s.owner_uid))
                .map(|s| s.id)
                .collect(),
        };
        let mut detached = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(session) = self.sessions.remove(&id) else {
                continue;
            };
            for (pid, mut member) in session.members {
                self.untarget(pid, member.restricted, member.io);
                self.unregister(&member.probes);
                detached.push(Detached {
                    id,
                    links: member.take_links(),
                });
            }
            if detached.last().is_none_or(|d| d.id != id) {
                detached.push(Detached {
                    id,
                    links: Vec::new(),
                });
            }
        }
        Ok(detached)
    }
}

/// The kernel's form of a USDT probe's argument specs. RIP-relative data becomes an absolute
/// address from `symbols` (runtime addresses); one whose symbol is missing reads as 0.
fn usdt_spec(args: &[scope_symbolizer::UsdtArg], symbols: &[(String, u64)]) -> UsdtSpec {
    use scope_common::usdt_arg;
    use scope_symbolizer::ArgLocation;
    let register = |name: &str| {
        usdt_arg::REGISTERS
            .iter()
            .position(|r| *r == name)
            .map_or(usdt_arg::NO_REGISTER, |i| i as u8)
    };
    let mut spec = UsdtSpec::default();
    for (slot, arg) in spec.args.iter_mut().zip(args) {
        *slot = UsdtArgSpec {
            size: arg.size,
            signed: u8::from(arg.signed),
            base: usdt_arg::NO_REGISTER,
            index: usdt_arg::NO_REGISTER,
            ..UsdtArgSpec::default()
        };
        match &arg.location {
            ArgLocation::Register(name) => {
                slot.kind = usdt_arg::REGISTER;
                slot.base = register(name);
            }
            ArgLocation::Constant(value) => {
                slot.kind = usdt_arg::CONSTANT;
                slot.offset = *value;
            }
            ArgLocation::Memory {
                base,
                index,
                offset,
                symbol: None,
            } => {
                slot.kind = usdt_arg::MEMORY;
                slot.base = base.map_or(usdt_arg::NO_REGISTER, register);
                if let Some((index, scale)) = index {
                    slot.index = register(index);
                    slot.scale = *scale;
                }
                slot.offset = *offset;
            }
            ArgLocation::Memory {
                symbol: Some(name),
                offset,
                ..
            } => match symbols.iter().find(|(n, _)| n == name) {
                Some(&(_, address)) => {
                    slot.kind = usdt_arg::MEMORY;
                    slot.offset = address.wrapping_add(*offset as u64) as i64;
                }
                None => slot.kind = usdt_arg::NONE,
            },
        }
    }
    spec.count = args.len().min(spec.args.len()) as u32;
    spec
}
