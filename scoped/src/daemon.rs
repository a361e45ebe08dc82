//! The daemon's domain API: what each gRPC call does, in domain types. `api.rs` only
//! converts to and from the wire.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use scope_common::{
    ProbeCounters, ProcessEvent, RecordKind, ThreadStack, process_event, span_flags,
};
use scope_symbolizer::{Frame, Module, ProcessMaps, Symbolizer};

use crate::{
    access::{self, Caller},
    budget::{self, Budgets, Throttle},
    ebpf::ProgramPair,
    error::ScopeError,
    export::otlp::ExporterCounters,
    model::{IdScheme, Io, Probe, Span, TraceId, monotonic_ns, now_unix_ns},
    pipeline::{Pipeline, Subscription, WatchFilter},
    planner::{self, Candidate, Library, ModuleView, ProbePlan},
    probes::{Limits, ProbeInfo, ProbeManager, Session, Terms, Tracing, release},
    procfs::ProcessInfo,
    resolve::{self, AttachSpec, Plan},
    stats::DaemonStats,
    store::{
        FunctionStats, NewProbe, ProcessRow, SpanQuery, Store, StoreError, TraceQuery, TraceSummary,
    },
};

/// A session as reported to clients.
pub struct SessionSnapshot {
    pub id: u64,
    pub process: ProcessInfo,
    pub patterns: Vec<String>,
    pub created: SystemTime,
    pub alive: bool,
    pub follow: bool,
    /// The uid that attached it.
    pub owner_uid: u32,
    pub pids: Vec<u32>,
    pub probes: Vec<(Arc<ProbeInfo>, ProbeCounters)>,
    pub spans_received: u64,
    pub spans_dropped: u64,
    /// Calls left out on purpose, by sampling and by the rate limit.
    pub sampled_out: u64,
    pub rate_limited: u64,
    pub limits: Limits,
    /// Estimated cost, a share of one CPU (measured only under a budget).
    pub overhead: Option<f64>,
    pub throttled: Vec<Throttle>,
    /// The plan an `--auto` session applied.
    pub plan: Option<Arc<ProbePlan>>,
}

impl SessionSnapshot {
    fn of(session: &Session, manager: &ProbeManager, budgets: &Budgets) -> SessionSnapshot {
        let probes: Vec<(Arc<ProbeInfo>, ProbeCounters)> = session
            .probes()
            .map(|p| (Arc::clone(p), manager.probe_counters(p)))
            .collect();
        SessionSnapshot {
            id: session.id,
            process: session.root.clone(),
            patterns: session.patterns.clone(),
            created: session.created,
            alive: session.root.is_alive(),
            follow: session.follow,
            owner_uid: session.owner_uid,
            pids: session.members.keys().copied().collect(),
            spans_dropped: probes
                .iter()
                .map(|(p, c)| c.dropped + p.daemon_dropped.get())
                .sum(),
            spans_received: session.spans_received(),
            sampled_out: probes.iter().map(|(_, c)| c.sampled_out).sum(),
            rate_limited: probes.iter().map(|(_, c)| c.rate_limited).sum(),
            probes,
            limits: session.limits,
            overhead: budgets.overhead.get(&session.id).copied(),
            throttled: budgets
                .throttles
                .iter()
                .filter(|t| t.session_id == session.id)
                .cloned()
                .collect(),
            plan: None,
        }
    }
}

/// How to plan probes (`scope analyze`, `scope attach --auto`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlanOptions {
    /// The budget to fit, a share of one CPU.
    pub budget: f64,
    /// How long to sample where the process spends its CPU time.
    pub window: Duration,
    /// How long to count the candidates' calls.
    pub count: Duration,
}

/// The budget a plan fits when none is given: 1% of a CPU.
pub const DEFAULT_PLAN_BUDGET: f64 = 0.01;
/// Sampling long enough for a busy thread's 1,000 samples.
pub const DEFAULT_PLAN_WINDOW: Duration = Duration::from_secs(1);
/// Counting long enough for rates of a few calls a second to show, short enough that a
/// candidate too hot to probe costs its process only this long.
pub const DEFAULT_PLAN_COUNT: Duration = Duration::from_millis(200);
/// The shortest screening count (a quarter of the counting window otherwise).
const MIN_SCREEN: Duration = Duration::from_millis(20);
/// Screening rounds at most before the counting run.
const SCREEN_ROUNDS: usize = 3;
/// The longest sampling or counting window a request may ask for.
pub const MAX_PLAN_WINDOW: Duration = Duration::from_secs(30);

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            budget: DEFAULT_PLAN_BUDGET,
            window: DEFAULT_PLAN_WINDOW,
            count: DEFAULT_PLAN_COUNT,
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
    pub stored_spans: u64,
    pub store_path: String,
    pub store_bytes: u64,
    pub store_evicted: u64,
    pub store_retain_bytes: Option<u64>,
    pub store_retain_age: Option<Duration>,
    pub ring_bytes_per_cpu: u32,
    pub cpus: u32,
    pub io_capture: bool,
    pub throttled: Vec<Throttle>,
}

/// How the daemon treats requests.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// The most functions one session may probe.
    pub max_session_probes: usize,
    /// The most sessions one non-root uid may hold at once.
    pub max_sessions_per_caller: usize,
    /// The programs attached (the real ones, or the benchmark floor).
    pub programs: ProgramPair,
    /// How kernel span ids become store-wide ones (shared with the pipeline).
    pub ids: IdScheme,
}

pub struct Daemon {
    manager: Mutex<ProbeManager>,
    symbolizer: Arc<Symbolizer>,
    pipeline: Arc<Pipeline>,
    store: Arc<Store>,
    stats: Arc<DaemonStats>,
    exporter: Option<Arc<ExporterCounters>>,
    callers: CallerSymbolizer,
    started: Instant,
    settings: Settings,
    /// Overhead budgets; locked after `manager` when both are needed.
    budgets: Mutex<Budgets>,
    /// Things Watch clients should hear about (a probe the budget throttled).
    warnings: tokio::sync::broadcast::Sender<String>,
    /// The plans `--auto` sessions applied, by session id.
    plans: Mutex<HashMap<u64, Arc<ProbePlan>>>,
}

impl Daemon {
    pub fn new(
        manager: ProbeManager,
        symbolizer: Arc<Symbolizer>,
        pipeline: Arc<Pipeline>,
        store: Arc<Store>,
        stats: Arc<DaemonStats>,
        exporter: Option<Arc<ExporterCounters>>,
        settings: Settings,
    ) -> Daemon {
        Daemon {
            manager: Mutex::new(manager),
            callers: CallerSymbolizer::new(Arc::clone(&symbolizer)),
            symbolizer,
            pipeline,
            store,
            stats,
            exporter,
            started: Instant::now(),
            settings,
            budgets: Mutex::new(Budgets::default()),
            warnings: tokio::sync::broadcast::channel(64).0,
            plans: Mutex::new(HashMap::new()),
        }
    }

    fn plans(&self) -> MutexGuard<'_, HashMap<u64, Arc<ProbePlan>>> {
        self.plans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn budgets(&self) -> MutexGuard<'_, Budgets> {
        self.budgets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Warnings for Watch clients, from now on.
    pub fn warnings(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.warnings.subscribe()
    }

    /// Housekeeping scoped runs a few times a second: keeps overhead budgets, and releases
    /// the IO tracepoints once nothing has been traced for a while. Blocking.
    pub fn tick(&self) {
        self.enforce_budgets();
        self.manager().release_idle_io();
    }

    /// `scope analyze` of a live process's executable (`pid`) or of a file, with a probe plan
    /// fitted to `options.budget`: for a process, from where its CPU time goes and its
    /// candidates' call rates (measured: this takes `options.window + options.count`); for a
    /// file, by the rules alone. A non-root caller may analyze a process it could trace, or a
    /// file it could read. Blocking.
    pub fn analyze(
        &self,
        caller: &Caller,
        pid: u32,
        binary: Option<&std::path::Path>,
        options: PlanOptions,
    ) -> Result<(crate::analyze::Analysis, ProbePlan), ScopeError> {
        match binary {
            Some(path) => {
                caller.check_readable(path)?;
                let (analysis, module) =
                    crate::analyze::binary_and_module(&self.symbolizer, path, None)?;
                let views = [ModuleView {
                    path: path.to_owned(),
                    name: file_name(path),
                    module,
                    library: Library::Executable,
                }];
                let candidates = planner::candidates(&views, None, &analysis.entry_points);
                let mut plan = planner::fit(candidates, options.budget, planner::MAX_PLAN_PROBES);
                plan.notes.push(
                    "a file, not a process: candidates ranked by the rules alone (known entry points, then names); \
                     no call rates, so no costs — analyze a running process (--pid) to fit the budget"
                        .to_owned(),
                );
                Ok((analysis, plan))
            }
            None => {
                if pid == 0 {
                    return Err(ScopeError::PidZero);
                }
                caller.check_trace(pid)?;
                let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                    .map_err(|_| ScopeError::NoSuchProcess { pid })?;
                let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
                let analysis = crate::analyze::binary(&self.symbolizer, &exe, Some(&root))?;
                let plan = self.plan_process(caller, pid, &analysis, options)?;
                Ok((analysis, plan))
            }
        }
    }

    /// Plans probes for live process `pid`: samples it, counts its candidates' calls, fits
    /// the budget (see `planner.rs` for the estimator). Blocking.
    fn plan_process(
        &self,
        caller: &Caller,
        pid: u32,
        analysis: &crate::analyze::Analysis,
        options: PlanOptions,
    ) -> Result<ProbePlan, ScopeError> {
        let (traps, program_ns) = {
            let mut manager = self.manager();
            let mut budgets = self.budgets();
            budgets.prepare(manager.kernel_mut())?;
            (budgets.trap_costs(), budgets.program_ns())
        };
        let traps = traps.ok_or_else(|| ScopeError::Calibration {
            why: "the trap costs were not measured".to_owned(),
        })?;
        let maps = ProcessMaps::read(pid).map_err(|source| match ProcessInfo::read(pid) {
            None => ScopeError::NoSuchProcess { pid },
            Some(_) => ScopeError::ProcessMaps { pid, source },
        })?;
        let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
        let mut views = Vec::new();
        for mapping in maps.executable_modules(pid) {
            match self.symbolizer.module_in_root(&mapping.open_path, &root) {
                Ok(module) => {
                    let path = std::path::PathBuf::from(&mapping.path);
                    let name = file_name(&path);
                    views.push(ModuleView {
                        library: Library::of(&name, mapping.is_main),
                        path,
                        name,
                        module,
                    });
                }
                Err(source) if mapping.is_main => {
                    return Err(ScopeError::NotElf {
                        path: mapping.path.into(),
                        source,
                    });
                }
                Err(_) => {}
            }
        }
        let profile = crate::sampler::sample(pid, options.window)
            .map_err(|source| ScopeError::Sample { pid, source })?;
        let mut candidates =
            planner::candidates(&views, Some((&maps, &profile)), &analysis.entry_points);
        planner::keep_for_counting(&mut candidates);
        for candidate in &mut candidates {
            let view = views.iter().find(|v| v.path == candidate.module);
            let code = view
                .and_then(|v| v.module.vaddr_to_file_offset(candidate.address))
                .map(|offset| {
                    budget::first_instruction(pid, &candidate.module.display().to_string(), offset)
                })
                .unwrap_or_default();
            candidate.ns_per_call = traps.per_call(&code) + program_ns;
        }
        // Screening: short counts of the candidates. One whose cost at the rate seen — a
        // floor, as the traps slowed the thread — is over the budget alone is out, and is not
        // counted again, so its traps do not hold the others' rates down; again, as the
        // rates of the rest rise once the hottest are gone.
        let screen_for = (options.count / 4).max(MIN_SCREEN);
        let budget_ns = options.budget * 1e9;
        let mut rest = candidates;
        let mut screened: Vec<Candidate> = Vec::new();
        let mut screen_elapsed = Duration::ZERO;
        for _ in 0..SCREEN_ROUNDS {
            let screen = self.count_calls(caller, pid, &rest, screen_for)?;
            screen_elapsed += screen.elapsed;
            let (out, kept): (Vec<Candidate>, Vec<Candidate>) = rest
                .into_iter()
                .partition(|c| screen.rate(c) * c.ns_per_call > budget_ns);
            rest = kept;
            let done = out.is_empty();
            screened.extend(out.into_iter().map(|mut c| {
                c.calls_per_second = Some(screen.rate(&c));
                c.floor = true;
                c
            }));
            if done {
                break;
            }
        }
        let counted = self.count_calls(caller, pid, &rest, options.count)?;
        // The counting run's traps, as a share of a busy thread's time (see planner::correct).
        let trap_cpu: f64 = rest
            .iter()
            .map(|c| counted.rate(c) * c.ns_per_call / 1e9)
            .sum();
        let busy_threads = profile
            .per_thread
            .values()
            .filter(|&&n| {
                n as f64 * crate::sampler::SAMPLE_PERIOD_NS as f64 / 1e9
                    >= 0.1 * profile.window.as_secs_f64()
            })
            .count()
            .max(1);
        // A thread with room to spare (busy less than 1 − share untraced) absorbs the traps
        // and keeps its callers' pace: no correction. One that had none was slowed.
        let busy = profile.busiest_thread_share();
        let trap_share = trap_cpu / busy_threads as f64;
        let trap_share = if busy + trap_share >= 1.0 {
            trap_share
        } else {
            0.0
        };
        for candidate in &mut rest {
            let (rate, floor) = planner::correct(counted.rate(candidate), trap_share);
            candidate.calls_per_second = Some(rate);
            candidate.floor = floor;
        }
        let screened_out = screened.len();
        let mut candidates = rest;
        candidates.append(&mut screened);
        let mut plan = planner::fit(candidates, options.budget, planner::MAX_PLAN_PROBES);
        plan.window_ms = u64::try_from(profile.window.as_millis()).unwrap_or(u64::MAX);
        plan.samples = profile.samples;
        plan.count_ms = u64::try_from(counted.elapsed.as_millis()).unwrap_or(u64::MAX);
        plan.notes.push(format!(
            "sampled {} thread{} for {:.1} s: {} samples of 1 ms of CPU each ({} lost); busiest thread {:.0}% of a CPU",
            profile.threads,
            if profile.threads == 1 { "" } else { "s" },
            profile.window.as_secs_f64(),
            profile.samples,
            profile.lost,
            profile.busiest_thread_share() * 100.0
        ));
        plan.notes.push(format!(
            "counted calls of {} candidate{} for {:.0} ms ({screened_out} more over the budget alone in {:.0} ms of screening); rates corrected for the counting run's own traps ({:.1}% of a busy thread; 0 when the busiest thread had room for them)",
            counted.probes,
            if counted.probes == 1 { "" } else { "s" },
            counted.elapsed.as_secs_f64() * 1e3,
            screen_elapsed.as_secs_f64() * 1e3,
            trap_share * 100.0
        ));
        if self.manager().kernel().config().io_capture
            && let Some(rate) = profile.io_syscalls_per_second
        {
            plan.notes.push(format!(
                "not in this estimate: IO capture is on, so a session also follows this process's reads and writes ({rate:.0} a second while sampled) to link requests across processes; `scoped --no-io-capture` turns that off"
            ));
        }
        plan.notes.push(format!(
            "cost per call = trap (calibrated here: {:.2} µs emulated first instruction, {:.2} µs single-stepped) + programs ({:.2} µs)",
            traps.emulated_ns / 1e3,
            traps.stepped_ns / 1e3,
            program_ns / 1e3
        ));
        Ok(plan)
    }

    /// Counts the calls of `candidates` in `pid` for `duration`: a session of them that
    /// records nothing (the kernel counts every call and keeps 1 in `u32::MAX`), read and
    /// detached. Blocking.
    fn count_calls(
        &self,
        caller: &Caller,
        pid: u32,
        candidates: &[Candidate],
        duration: Duration,
    ) -> Result<Counted, ScopeError> {
        let mut patterns: Vec<String> = candidates.iter().map(Candidate::pattern).collect();
        patterns.sort();
        patterns.dedup();
        let mut counted = Counted::default();
        if patterns.is_empty() {
            return Ok(counted);
        }
        let spec = AttachSpec {
            pid,
            patterns,
            binary: None,
            follow: false,
            require_matches: false,
            limits: Limits {
                sample_every: u32::MAX,
                max_rate: 0,
                budget: None,
            },
        };
        let session = self.attach(caller, &spec)?;
        let read = |manager: &ProbeManager| -> HashMap<(String, u64), u64> {
            let mut calls = HashMap::new();
            if let Some(session) = manager.session(session.id) {
                for probe in session.probes() {
                    if probe.probe.inlined_into.is_none() {
                        *calls
                            .entry((probe.probe.module.clone(), probe.probe.address))
                            .or_default() += manager.probe_counters(probe).calls;
                    }
                }
            }
            calls
        };
        let before = read(&self.manager());
        let started = Instant::now();
        std::thread::sleep(duration);
        let after = read(&self.manager());
        counted.elapsed = started.elapsed();
        let detached = self.detach(caller, Some(session.id));
        if let Err(error) = detached {
            tracing::error!(session = session.id, error = %error, "detaching a counting run failed");
        }
        counted.probes = after.len();
        let seconds = counted.elapsed.as_secs_f64().max(1e-3);
        counted.rates = after
            .into_iter()
            .map(|(key, calls)| {
                let delta = calls.saturating_sub(before.get(&key).copied().unwrap_or(0));
                (key, delta as f64 / seconds)
            })
            .collect();
        Ok(counted)
    }

    /// `scope attach --auto`: plans `spec.pid`'s probes within the session's budget (1% when
    /// none is given) and attaches the chosen functions as a session that keeps that budget.
    /// Blocking.
    pub fn attach_auto(
        &self,
        caller: &Caller,
        spec: &AttachSpec,
        options: PlanOptions,
    ) -> Result<SessionSnapshot, ScopeError> {
        if !spec.patterns.is_empty() || spec.binary.is_some() {
            return Err(ScopeError::AutoWithPatterns);
        }
        let budget = spec.limits.budget.unwrap_or(DEFAULT_PLAN_BUDGET);
        let options = PlanOptions { budget, ..options };
        let (_, plan) = self.analyze(caller, spec.pid, None, options)?;
        let mut patterns: Vec<String> = plan.chosen().map(Candidate::pattern).collect();
        patterns.dedup();
        if patterns.is_empty() {
            let why = plan
                .functions
                .first()
                .map(|p| format!("{} — {}", p.candidate.function, p.reason))
                .unwrap_or_else(|| "no candidate function was found".to_owned());
            return Err(ScopeError::EmptyPlan {
                pid: spec.pid,
                budget_percent: budget * 100.0,
                why,
            });
        }
        let spec = AttachSpec {
            patterns,
            limits: Limits {
                budget: Some(budget),
                ..spec.limits
            },
            ..spec.clone()
        };
        let mut snapshot = self.attach(caller, &spec)?;
        let plan = Arc::new(plan);
        self.plans().insert(snapshot.id, Arc::clone(&plan));
        snapshot.plan = Some(plan);
        Ok(snapshot)
    }

    /// Measures the sessions with an overhead budget and throttles what is over.
    pub fn enforce_budgets(&self) {
        let mut manager = self.manager();
        let throttles = self.budgets().enforce(&mut manager, self.settings.programs);
        for throttle in throttles {
            // Nobody watching is fine.
            let _ = self.warnings.send(throttle.describe());
        }
    }

    fn manager(&self) -> MutexGuard<'_, ProbeManager> {
        self.manager
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Checks that `caller` may, resolves, records the session and its probes in the store,
    /// attaches. Blocking: call from a blocking thread.
    pub fn attach(
        &self,
        caller: &Caller,
        spec: &AttachSpec,
    ) -> Result<SessionSnapshot, ScopeError> {
        if spec.pid == 0 {
            return Err(ScopeError::PidZero);
        }
        let limit = self.settings.max_sessions_per_caller;
        caller.check_session_limit(self.manager().sessions_owned(caller.uid), limit)?;
        // Before reading anything of the process: what resolving says (its libraries, its
        // functions) is not for a caller who may not trace it.
        let checked = caller.check_trace(spec.pid)?;
        if let Some(binary) = &spec.binary {
            caller.check_binary(spec.pid, binary)?;
        }
        if spec.limits.budget.is_some() {
            let mut manager = self.manager();
            self.budgets().prepare(manager.kernel_mut())?;
        }
        let plan = resolve::plan(&self.symbolizer, spec, self.settings.max_session_probes)?;
        if checked.is_some_and(|c| c.start_time != plan.process.start_time) {
            // The pid was reused in between: not the process that was checked.
            return Err(ScopeError::NoSuchProcess { pid: spec.pid });
        }
        let id =
            self.store
                .create_session(&plan.process, &plan.patterns, now_unix_ns(), caller.uid)?;
        let attached = self
            .stored_probes(id, caller.uid, &plan)
            .and_then(|probes| {
                let mut manager = self.manager();
                caller.check_session_limit(manager.sessions_owned(caller.uid), limit)?;
                manager.attach(
                    id,
                    plan,
                    probes,
                    self.settings.programs,
                    Terms {
                        follow: spec.follow,
                        limits: spec.limits,
                        owner_uid: caller.uid,
                    },
                )
            });
        if let Err(error) = attached {
            self.store.end_session(id, now_unix_ns());
            return Err(error);
        }
        // Once more, now that the kernel reports the process's execs: one between the first
        // check and the attach would have gone unseen.
        if let Err(error) = caller.check_trace(spec.pid) {
            let detached = self.manager().detach(Some(id), caller);
            if let Ok(detached) = detached {
                release(detached);
            }
            self.store.end_session(id, now_unix_ns());
            return Err(error);
        }
        self.record_process(&spec_process(spec.pid), Some(id), None);
        let manager = self.manager();
        let Some(session) = manager.session(id) else {
            return Err(ScopeError::NoSuchSession { id });
        };
        tracing::info!(
            session = session.id,
            pid = session.root.pid,
            probes = session.probes().count(),
            patterns = ?session.patterns,
            uid = caller.uid,
            caller_pid = caller.pid,
            "attached"
        );
        Ok(SessionSnapshot::of(session, &manager, &self.budgets()))
    }

    /// Acts on a traced process's fork, exec or exit: follows new processes into the sessions
    /// that follow forks, re-resolves a session's globs in a program a process exec'd into,
    /// and lets go of processes that ended. Blocking.
    pub fn on_process_event(&self, event: &ProcessEvent) {
        match event.event {
            process_event::FORK => self.follow_fork(event),
            process_event::EXEC => {
                self.end_go_calls(event.pid, span_flags::EXECED);
                self.follow_exec(event.pid)
            }
            process_event::EXIT => {
                self.end_go_calls(event.pid, span_flags::THREAD_EXITED);
                self.process_exited(event.pid)
            }
            other => tracing::warn!(event = other, "unknown process event from the kernel"),
        }
    }

    /// Records a traced process in the store (again after an exec: its program changed).
    fn record_process(
        &self,
        process: &Option<ProcessInfo>,
        session_id: Option<u64>,
        fork_span: Option<u64>,
    ) {
        let Some(process) = process else { return };
        self.store.record_process(ProcessRow {
            pid: process.pid,
            start_ns: process.start_unix_ns(),
            parent_pid: process.parent_pid(),
            session_id,
            comm: process.comm.clone(),
            exe: process.exe.display().to_string(),
            fork_span,
            exited_ns: None,
        });
    }

    fn follow_fork(&self, event: &ProcessEvent) {
        let child = event.pid;
        let (following, refused) = may_follow(
            self.manager()
                .sessions_of(event.parent_pid)
                .into_iter()
                .filter(|s| s.follow),
            child,
        );
        log_refused(&refused, child, Followed::Fork);
        if following.is_empty() {
            self.manager().forget_unfollowed(child);
            return;
        }
        let fork_span = (event.span_id != 0).then(|| self.settings.ids.span(event.span_id));
        self.record_process(
            &spec_process(child),
            following.first().map(|s| s.id),
            fork_span,
        );
        for session in following {
            self.trace_member(&session, child, Followed::Fork);
        }
    }

    /// Re-resolves the sessions' globs in the program `pid` exec'd into; a session of a user
    /// who could not ptrace the new program (a setuid one, say) lets go of the process.
    fn follow_exec(&self, pid: u32) {
        let (following, refused) = may_follow(self.manager().sessions_of(pid), pid);
        log_refused(&refused, pid, Followed::Exec);
        let mut removed = Vec::new();
        for session in &refused {
            if let Some((member, _)) = self.manager().remove_member(session.id, pid) {
                removed.push(member);
            }
        }
        release(removed);
        if following.is_empty() {
            return;
        }
        self.record_process(&spec_process(pid), following.first().map(|s| s.id), None);
        for session in following {
            self.trace_member(&session, pid, Followed::Exec);
        }
    }

    /// (Re)attaches a session's globs in process `pid` as it is now.
    fn trace_member(&self, session: &Tracing, pid: u32, why: Followed) {
        let id = session.id;
        let spec = AttachSpec {
            pid,
            patterns: session.patterns.clone(),
            binary: None,
            follow: true,
            require_matches: false,
            limits: Limits::default(),
        };
        let started = Instant::now();
        let attached = resolve::plan(&self.symbolizer, &spec, self.settings.max_session_probes)
            .and_then(|plan| {
                let resolved = started.elapsed();
                let probes = self.stored_probes(id, session.owner_uid, &plan)?;
                let stored = started.elapsed();
                let count = probes.len();
                // A forked child has its parent's memory, USDT semaphores this session
                // raised included; an exec'd image starts from its file.
                let replaced = self.manager().add_member(
                    id,
                    plan,
                    probes,
                    self.settings.programs,
                    why == Followed::Fork,
                )?;
                tracing::debug!(
                    resolve_ms = resolved.as_secs_f64() * 1e3,
                    store_ms = (stored - resolved).as_secs_f64() * 1e3,
                    attach_ms = (started.elapsed() - stored).as_secs_f64() * 1e3,
                    pid,
                    "followed"
                );
                Ok((count, replaced))
            });
        match attached {
            Ok((count, replaced)) => {
                tracing::info!(
                    session = id,
                    pid,
                    probes = count,
                    "following a process after {why}"
                );
                if let Some(replaced) = replaced {
                    release(vec![replaced]);
                }
            }
            Err(error) => {
                tracing::warn!(session = id, pid, error = %error.chain(), "cannot follow a process after {why}")
            }
        }
    }

    /// Reports the Go calls of `pid` still open when it exited or exec'd (`flag`), as the
    /// kernel does a thread's, and frees their goroutine stacks. Called before the process's
    /// probes are let go, so the spans are still attributed to them.
    fn end_go_calls(&self, pid: u32, flag: u32) {
        let stacks = self.manager().kernel_mut().take_go_stacks(pid);
        let open = unfinished_go_calls(pid, &stacks, monotonic_ns(), flag);
        if !open.is_empty() {
            tracing::info!(
                pid,
                calls = open.len(),
                "Go calls were open when their process exited or exec'd; they are reported unfinished"
            );
            self.pipeline.ingest(open, Vec::new());
        }
    }

    fn process_exited(&self, pid: u32) {
        let sessions = self.manager().sessions_of(pid);
        let mut detached = Vec::new();
        let mut started = None;
        for session in sessions {
            if let Some((member, process)) = self.manager().remove_member(session.id, pid) {
                started = Some(process.start_unix_ns());
                detached.push(member);
            }
        }
        if let Some(start_ns) = started {
            self.store.process_exited(pid, start_ns, now_unix_ns());
        }
        if !detached.is_empty() {
            tracing::info!(pid, "a traced process exited");
            release(detached);
        }
    }

    /// The plan's probes, recorded in the store, in plan order.
    fn stored_probes(
        &self,
        session_id: u64,
        owner_uid: u32,
        plan: &Plan,
    ) -> Result<Vec<Arc<Probe>>, ScopeError> {
        let planned: Vec<(String, &resolve::PlannedProbe)> = plan
            .modules
            .iter()
            .flat_map(|m| {
                m.probes
                    .iter()
                    .map(move |p| (m.path.display().to_string(), p))
            })
            .collect();
        let new: Vec<NewProbe> = planned
            .iter()
            .map(|(module, p)| NewProbe {
                function: p.function.clone(),
                symbol: p.symbol.clone(),
                module: module.clone(),
                address: p.address,
                file_offset: p.file_offset,
                file: p.file.clone(),
                line: p.line,
                inlined_into: p.inlined_into.clone(),
                process_start_ns: plan.process.start_unix_ns(),
            })
            .collect();
        let ids = self.store.create_probes(session_id, new.clone())?;
        Ok(ids
            .into_iter()
            .zip(new)
            .map(|(id, p)| {
                Arc::new(Probe {
                    id,
                    session_id,
                    pid: plan.process.pid,
                    function: p.function,
                    symbol: p.symbol,
                    module: p.module,
                    address: p.address,
                    file_offset: p.file_offset,
                    file: p.file,
                    line: p.line,
                    inlined_into: p.inlined_into,
                    comm: plan.process.comm.clone(),
                    exe: plan.process.exe.display().to_string(),
                    owner_uid,
                })
            })
            .collect())
    }

    /// Detaches one session, or all `caller` owns (every session, for root). Blocking.
    pub fn detach(
        &self,
        caller: &Caller,
        id: Option<u64>,
    ) -> Result<(Vec<u64>, Duration), ScopeError> {
        let detached = self.manager().detach(id, caller)?;
        let (ids, took) = release(detached);
        {
            let mut plans = self.plans();
            for id in &ids {
                plans.remove(id);
            }
        }
        let now = now_unix_ns();
        for id in &ids {
            self.store.end_session(*id, now);
        }
        tracing::info!(sessions = ?ids, ms = took.as_secs_f64() * 1e3, "detached");
        Ok((ids, took))
    }

    /// The sessions `caller` may see: its own (every one, for root).
    pub fn sessions(&self, caller: &Caller) -> Vec<SessionSnapshot> {
        let manager = self.manager();
        let budgets = self.budgets();
        manager
            .sessions()
            .filter(|s| caller.owns(s.owner_uid))
            .map(|s| {
                let mut snapshot = SessionSnapshot::of(s, &manager, &budgets);
                snapshot.plan = self.plans().get(&s.id).cloned();
                snapshot
            })
            .collect()
    }

    /// Stored spans `caller` may see. Blocking.
    pub fn query(
        &self,
        caller: &Caller,
        query: &SpanQuery,
        limit: usize,
    ) -> Result<Vec<Span>, StoreError> {
        self.store.spans(&visible(caller, query), limit)
    }

    /// Per-function statistics of what `caller` may see. Blocking.
    pub fn stats(
        &self,
        caller: &Caller,
        query: &SpanQuery,
    ) -> Result<Vec<FunctionStats>, StoreError> {
        self.store.stats(&visible(caller, query))
    }

    /// Summaries of the traces `caller` has spans in, from those spans. Blocking.
    pub fn traces(
        &self,
        caller: &Caller,
        query: &TraceQuery,
    ) -> Result<Vec<TraceSummary>, StoreError> {
        let query = TraceQuery {
            owner: caller.visible_owner(),
            ..query.clone()
        };
        self.store.traces(&query)
    }

    /// Calls `caller` may see whose bytes each of `spans` read while it ran. Blocking.
    pub fn io_links(
        &self,
        caller: &Caller,
        spans: &[u64],
    ) -> Result<std::collections::HashMap<u64, Vec<(u64, TraceId)>>, StoreError> {
        self.store.io_links(spans, caller.visible_owner())
    }

    /// The TCP reads and writes of a trace's calls that `caller` may see. Blocking.
    pub fn trace_io(&self, caller: &Caller, trace: TraceId) -> Result<Vec<Io>, StoreError> {
        self.store.trace_io(trace, caller.visible_owner())
    }

    /// Calls here, of those `caller` may see, caused by another host's TCP writes. Blocking.
    pub fn io_peers(&self, caller: &Caller, writes: &[Io]) -> Result<Vec<(u64, Span)>, StoreError> {
        self.store.io_peers(writes, caller.visible_owner())
    }

    /// Traced processes of the sessions `caller` may see. Blocking.
    pub fn processes(&self, caller: &Caller) -> Result<Vec<ProcessRow>, StoreError> {
        self.store.processes(caller.visible_owner())
    }

    /// Live spans, of those `caller` may see.
    pub fn subscribe(&self, caller: &Caller, filter: WatchFilter) -> Subscription {
        self.pipeline.subscribe(WatchFilter {
            owner: caller.visible_owner(),
            ..filter
        })
    }

    /// Commits everything queued for the store and stops its writer (shutdown).
    pub fn close_store(&self) {
        self.store.close();
    }

    /// Daemon-wide counters; sessions and probes are counted of those `caller` may see.
    pub fn status(&self, caller: &Caller) -> StatusSnapshot {
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
        let store = self.store.counters();
        let store_lost = store.queue_full.get() + store.write_failed.get();
        counters.extend([
            ("store.written".to_owned(), store.written.get()),
            ("store.queue_full".to_owned(), store.queue_full.get()),
            ("store.write_failed".to_owned(), store.write_failed.get()),
            ("store.evicted".to_owned(), store.evicted.get()),
        ]);
        if let Some(exporter) = &self.exporter {
            counters.extend(
                exporter
                    .snapshot()
                    .iter()
                    .map(|(name, n)| ((*name).to_owned(), *n)),
            );
        }
        let config = kernel.config();
        StatusSnapshot {
            uptime: self.started.elapsed(),
            spans_received: self.stats.spans_received.get(),
            spans_dropped: kernel_lost + self.stats.lost() + store_lost,
            counters,
            sessions: manager
                .sessions()
                .filter(|s| caller.owns(s.owner_uid))
                .count(),
            probes: manager
                .sessions()
                .filter(|s| caller.owns(s.owner_uid))
                .map(|s| s.probes().count())
                .sum(),
            stored_spans: self.store.stored_spans(),
            store_path: self.store.path().display().to_string(),
            store_bytes: self.store.file_bytes(),
            store_evicted: store.evicted.get(),
            store_retain_bytes: self.store.retention().0,
            store_retain_age: self.store.retention().1,
            ring_bytes_per_cpu: config.ring_bytes,
            cpus: kernel.cpus(),
            io_capture: config.io_capture,
            throttled: self.budgets().throttles.clone(),
        }
    }

    /// Where a span's call came from, innermost frame first. For an inlined call site the
    /// probed address is inside the inlined function itself: frames of functions inlined
    /// *into it* are dropped, so the first frame is the inlined function, then the
    /// function(s) it sits in. Empty once the process is gone.
    pub fn caller_frames(&self, span: &Span) -> Vec<Frame> {
        let instant = span.flags & scope_common::span_flags::INSTANT != 0;
        let mut frames = self.callers.frames(span.pid, span.caller, !instant);
        if instant
            && let Some(own) = frames
                .iter()
                .position(|f| f.function == span.probe.function)
        {
            frames.drain(..own);
        }
        frames
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

/// `query` narrowed to what `caller` may see.
fn visible(caller: &Caller, query: &SpanQuery) -> SpanQuery {
    SpanQuery {
        owner: caller.visible_owner(),
        ..query.clone()
    }
}

/// Splits the sessions tracing a process into those whose owner may follow it into `pid` (a
/// child, or the program it exec'd) and those whose owner could not ptrace it there.
fn may_follow(
    sessions: impl IntoIterator<Item = Tracing>,
    pid: u32,
) -> (Vec<Tracing>, Vec<Tracing>) {
    sessions.into_iter().partition(|s| {
        s.owner_uid == access::ROOT_UID || access::may_trace(s.owner_uid, pid).is_ok()
    })
}

/// Why a session traces a process it did not attach to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Followed {
    /// A traced process forked it: it has its parent's memory.
    Fork,
    /// It exec'd a new program: its memory is the new image's.
    Exec,
}

impl std::fmt::Display for Followed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Followed::Fork => "fork",
            Followed::Exec => "exec",
        })
    }
}

fn log_refused(refused: &[Tracing], pid: u32, why: Followed) {
    for session in refused {
        let reason = access::may_trace(session.owner_uid, pid)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        tracing::info!(
            session = session.id,
            pid,
            uid = session.owner_uid,
            %reason,
            "not following a process after {why}: its session's owner may not trace it"
        );
    }
}

/// The process as /proc shows it now (`None` if it is already gone).
fn spec_process(pid: u32) -> Option<ProcessInfo> {
    ProcessInfo::read(pid)
}

/// What a counting run measured.
#[derive(Default)]
struct Counted {
    /// Calls a second by (module, function address).
    rates: HashMap<(String, u64), f64>,
    probes: usize,
    elapsed: Duration,
}

impl Counted {
    fn rate(&self, candidate: &Candidate) -> f64 {
        self.rates
            .get(&(candidate.module.display().to_string(), candidate.address))
            .copied()
            .unwrap_or(0.0)
    }
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The Go calls open on `stacks` (goroutines of process `pid`) as spans that ended at `now_ns`
/// with `flag` ([`span_flags::THREAD_EXITED`] or [`span_flags::EXECED`]), as the kernel
/// reports the open calls of a thread that exits. They carry no thread: a goroutine has none
/// of its own.
fn unfinished_go_calls(
    pid: u32,
    stacks: &[ThreadStack],
    now_ns: u64,
    flag: u32,
) -> Vec<scope_common::Span> {
    let mut spans = Vec::new();
    for stack in stacks {
        let depth = (stack.depth as usize).min(stack.frames.len());
        let frames = &stack.frames[..depth];
        for (index, frame) in frames.iter().enumerate() {
            spans.push(scope_common::Span {
                kind: RecordKind::Span as u32,
                probe_id: frame.probe_id,
                pid,
                tid: 0,
                start_ns: frame.start_ns,
                end_ns: now_ns.max(frame.start_ns),
                span_id: frame.span_id,
                parent_id: index
                    .checked_sub(1)
                    .map_or(0, |parent| frames[parent].span_id),
                root_id: frame.root_id,
                trace_id: frame.trace_id,
                link_id: frame.link_id,
                args: frame.args,
                ret: 0,
                caller: frame.caller,
                depth: index as u32,
                flags: flag | frame.link_flags,
            });
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use scope_common::{Frame, MAX_DEPTH};

    use super::*;

    #[test]
    fn open_go_calls_become_thread_exited_spans_nested_as_they_were() {
        let mut frames = [Frame::default(); MAX_DEPTH];
        for (index, frame) in frames.iter_mut().take(2).enumerate() {
            frame.probe_id = index as u32 + 7;
            frame.span_id = index as u64 + 100;
            frame.start_ns = 1_000 + index as u64;
        }
        frames[0].link_flags = span_flags::LINK_WAKEUP;
        let stack = ThreadStack {
            depth: 2,
            unstored: 0,
            frames,
        };
        let spans = unfinished_go_calls(42, &[stack], 5_000, span_flags::THREAD_EXITED);
        assert_eq!(spans.len(), 2);
        assert_eq!(
            (spans[0].probe_id, spans[0].parent_id, spans[0].depth),
            (7, 0, 0)
        );
        assert_eq!(
            (spans[1].probe_id, spans[1].parent_id, spans[1].depth),
            (8, 100, 1)
        );
        assert!(spans.iter().all(|s| s.pid == 42 && s.end_ns == 5_000));
        assert_eq!(
            spans[0].flags,
            span_flags::THREAD_EXITED | span_flags::LINK_WAKEUP
        );
        assert_eq!(spans[1].flags, span_flags::THREAD_EXITED);
        // A corrupt depth reads no more frames than there are.
        let deep = ThreadStack {
            depth: u32::MAX,
            unstored: 0,
            frames,
        };
        assert_eq!(
            unfinished_go_calls(42, &[deep], 5_000, span_flags::EXECED).len(),
            MAX_DEPTH
        );
    }
}
