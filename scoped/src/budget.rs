//! Overhead budgets: what a session's probes cost the traced processes, and throttling the
//! most expensive ones to stay under `--budget`.
//!
//! A probe costs its traced process, per call, a trap into the kernel (an int3 at the entry,
//! and the uretprobe trampoline's trap at the return) plus our two programs. The traps
//! dominate, and they depend on the probed instruction: the kernel emulates a few (`push`,
//! jumps and calls, `nop`) and single-steps the rest out of line, which costs a second trap.
//! So scoped measures, once, both kinds of trap on functions of its own ([`calibrate`]), and
//! takes the programs' cost from the kernel's BPF run-time statistics (enabled while a budget
//! is in force). A probe's cost per second is its call rate times (trap + programs).
//!
//! Sampling only saves the programs' share (a call left out still traps), so when a probe's
//! traps alone exceed what is left of the budget, the probe is detached; otherwise it is
//! sampled down. Budgets are a share of one CPU: `--budget 1%` is 10 ms of CPU a second,
//! summed over the session's processes.

use std::{
    collections::HashMap,
    fs,
    hint::black_box,
    io::{Read, Seek, SeekFrom},
    os::fd::OwnedFd,
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    ebpf::{Kernel, ProgramPair},
    error::ScopeError,
    probes::{ProbeInfo, ProbeManager},
};

/// What one call costs in traps, by how the kernel handles the probed instruction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrapCosts {
    /// Entry + return of a function whose first instruction the kernel emulates.
    pub emulated_ns: f64,
    /// Entry + return of a function whose first instruction is single-stepped.
    pub stepped_ns: f64,
}

impl TrapCosts {
    /// The trap cost of one call of a probe whose first instruction bytes are `code`. Unknown
    /// instructions count as single-stepped: an overestimate keeps the budget.
    pub fn per_call(&self, code: &[u8]) -> f64 {
        if is_emulated(code) {
            self.emulated_ns
        } else {
            self.stepped_ns
        }
    }
}

/// Whether the x86-64 kernel emulates `code`'s first instruction at a uprobe instead of
/// single-stepping it: `push` of a register, relative jumps and calls, and one-byte `nop`.
pub fn is_emulated(code: &[u8]) -> bool {
    match code {
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => true, // push r64
        [0xe8 | 0xe9 | 0xeb, ..] | [0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..] => true,
        [0x90, ..] => true,
        _ => false,
    }
}

// Two functions to calibrate traps on, with the instruction at their entry fixed: one the
// kernel emulates (`push rbp`) and one it must single-step (`lea`).
std::arch::global_asm!(
    ".text",
    ".globl scope_calibrate_emulated",
    ".type scope_calibrate_emulated, @function",
    "scope_calibrate_emulated:",
    "push rbp",
    "lea rax, [rdi + 1]",
    "pop rbp",
    "ret",
    ".size scope_calibrate_emulated, . - scope_calibrate_emulated",
    ".globl scope_calibrate_stepped",
    ".type scope_calibrate_stepped, @function",
    "scope_calibrate_stepped:",
    "lea rax, [rdi + 1]",
    "ret",
    ".size scope_calibrate_stepped, . - scope_calibrate_stepped",
);

unsafe extern "C" {
    fn scope_calibrate_emulated(x: u64) -> u64;
    fn scope_calibrate_stepped(x: u64) -> u64;
}

/// Calls per calibration batch: ~6 ms of traps at 15 µs each.
const CALIBRATION_CALLS: u32 = 400;
/// Batches per measurement; the fastest counts. On a busy machine (the moment a budget or a
/// plan is wanted is often one) a batch the scheduler interrupted is slower by the time
/// the thread waited, which is not the trap's cost: one run of 2,000 calls measured a
/// single-stepped trap at 72 µs under redis-benchmark on 2 CPUs, its fastest batch ~18 µs.
const CALIBRATION_BATCHES: u32 = 5;

/// Measures both kinds of trap on this machine: probes (the no-op programs, entry and
/// return) on scoped's own calibration functions, called from this thread, timed against
/// the same calls untraced.
pub fn calibrate(kernel: &mut Kernel) -> Result<TrapCosts, ScopeError> {
    let emulated = scope_calibrate_emulated as unsafe extern "C" fn(u64) -> u64;
    let stepped = scope_calibrate_stepped as unsafe extern "C" fn(u64) -> u64;
    Ok(TrapCosts {
        emulated_ns: trap_cost(kernel, emulated)?,
        stepped_ns: trap_cost(kernel, stepped)?,
    })
}

fn trap_cost(
    kernel: &mut Kernel,
    function: unsafe extern "C" fn(u64) -> u64,
) -> Result<f64, ScopeError> {
    let address = function as usize as u64;
    let offset = own_file_offset(address).ok_or_else(|| ScopeError::Calibration {
        why: format!("no mapping of scoped's executable holds {address:#x}"),
    })?;
    let pid = std::process::id();
    let untraced = fastest(function);
    let links = kernel
        .attach(
            ProgramPair::Null,
            Path::new("/proc/self/exe"),
            pid,
            &[(offset, 0)],
            &[(offset, 0)],
        )
        .map_err(|source| ScopeError::Calibration {
            why: format!("attaching to scoped's own calibration function: {source}"),
        })?;
    let traced = fastest(function);
    drop(links);
    let untraced = untraced.min(fastest(function));
    Ok(traced.saturating_sub(untraced).as_nanos() as f64 / f64::from(CALIBRATION_CALLS))
}

fn fastest(function: unsafe extern "C" fn(u64) -> u64) -> Duration {
    (0..CALIBRATION_BATCHES)
        .map(|_| time_calls(function))
        .min()
        .unwrap_or_default()
}

fn time_calls(function: unsafe extern "C" fn(u64) -> u64) -> Duration {
    let started = Instant::now();
    let mut x = 0;
    for _ in 0..CALIBRATION_CALLS {
        // SAFETY: both calibration functions only compute rdi + 1.
        x = unsafe { black_box(function)(black_box(x)) };
    }
    black_box(x);
    started.elapsed()
}

/// The offset in scoped's executable file of one of its code addresses.
fn own_file_offset(address: u64) -> Option<u64> {
    let exe = fs::read_link("/proc/self/exe").ok()?;
    let maps = fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let range = fields.next()?;
        let _perms = fields.next()?;
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let path = fields.nth(2)?;
        let (start, end) = range.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        );
        (Path::new(path) == exe && (start..end).contains(&address))
            .then(|| address - start + offset)
    })
}

/// The first bytes of a probed function: its module as process `pid` sees it, at
/// `file_offset`. Empty when unreadable.
pub fn first_instruction(pid: u32, module: &str, file_offset: u64) -> Vec<u8> {
    let path = format!("/proc/{pid}/root{module}");
    let read = |path: &str| -> std::io::Result<Vec<u8>> {
        let mut file = fs::File::open(path)?;
        file.seek(SeekFrom::Start(file_offset))?;
        let mut code = vec![0; 4];
        let n = file.read(&mut code)?;
        code.truncate(n);
        Ok(code)
    };
    read(&path).or_else(|_| read(module)).unwrap_or_default()
}

/// The BPF run-time statistics, on while any session has a budget (they cost every program
/// run two clock reads).
pub struct RunStats(#[expect(dead_code, reason = "held: closing it turns the stats off")] OwnedFd);

impl RunStats {
    pub fn enable() -> Result<RunStats, ScopeError> {
        aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .map(RunStats)
            .map_err(|source| ScopeError::Calibration {
                why: format!("enabling BPF run-time statistics: {source}"),
            })
    }
}

/// What a probe is estimated to cost, and what the budget should do about it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeLoad {
    pub slot: u32,
    pub calls_per_second: f64,
    /// Nanoseconds per call in traps, and in our programs for a recorded call.
    pub trap_ns: f64,
    pub program_ns: f64,
    /// 1 in this many calls recorded now.
    pub sample_every: u32,
}

impl ProbeLoad {
    /// CPU nanoseconds a second: every call traps; programs run in full for recorded calls.
    pub fn cost(&self) -> f64 {
        self.calls_per_second
            * (self.trap_ns + self.program_ns / f64::from(self.sample_every.max(1)))
    }
}

/// What the budget does to one probe.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Action {
    /// Record 1 call in this many.
    Sample(u32),
    /// Remove the probe.
    Detach,
}

/// Decides which probes to throttle so the session's cost fits `budget_ns` (CPU nanoseconds
/// a second): the most expensive first, sampled when its traps alone fit in what is left,
/// detached otherwise. Returns the actions and the cost after them.
pub fn plan(loads: &[ProbeLoad], budget_ns: f64) -> (Vec<(ProbeLoad, Action)>, f64) {
    let mut total: f64 = loads.iter().map(ProbeLoad::cost).sum();
    let mut by_cost: Vec<&ProbeLoad> = loads.iter().collect();
    by_cost.sort_by(|a, b| b.cost().total_cmp(&a.cost()));
    let mut actions = Vec::new();
    for load in by_cost {
        if total <= budget_ns {
            break;
        }
        let rest = total - load.cost();
        let traps = load.calls_per_second * load.trap_ns;
        let room = budget_ns - rest - traps;
        let programs = load.calls_per_second * load.program_ns;
        let sample_every = (room > 0.0 && programs > 0.0)
            .then(|| (programs / room).ceil())
            .filter(|&n| n.is_finite() && n <= f64::from(u32::MAX))
            .map(|n| (n as u32).max(2));
        match sample_every {
            Some(every) if every > load.sample_every => {
                let sampled = ProbeLoad {
                    sample_every: every,
                    ..*load
                };
                total = rest + sampled.cost();
                actions.push((*load, Action::Sample(every)));
            }
            _ => {
                total = rest;
                actions.push((*load, Action::Detach));
            }
        }
    }
    (actions, total)
}

/// What the budget did to one probe, for `scope status` and the Watch stream.
#[derive(Clone, Debug)]
pub struct Throttle {
    pub session_id: u64,
    pub slot: u32,
    pub function: String,
    pub pid: u32,
    pub action: Action,
    pub calls_per_second: f64,
    /// The probe's estimated cost, as a share of one CPU (0.05 = 5%).
    pub cost: f64,
    pub reason: String,
    pub at: SystemTime,
}

/// Programs' cost per call before any is measured: about what the per-call benchmark finds.
const DEFAULT_PROGRAM_NS: f64 = 600.0;

/// The budgets' measurements between rounds.
#[derive(Default)]
pub struct Budgets {
    traps: Option<TrapCosts>,
    stats: Option<RunStats>,
    /// Per probe slot: (the probe's store id, its calls, when read).
    last_calls: HashMap<u32, (u64, u64, Instant)>,
    /// The programs' run time and count when last read.
    last_runs: Option<(Duration, u64)>,
    program_ns: Option<f64>,
    /// Trap cost per call by probe store id (its first instruction does not change).
    trap_ns: HashMap<u64, f64>,
    /// Estimated cost per session, a share of one CPU.
    pub overhead: HashMap<u64, f64>,
    /// Every throttle, oldest first.
    pub throttles: Vec<Throttle>,
}

impl Budgets {
    /// Gets ready to keep a budget: measures the traps once and turns run-time statistics on.
    pub fn prepare(&mut self, kernel: &mut Kernel) -> Result<(), ScopeError> {
        if self.traps.is_none() {
            let traps = calibrate(kernel)?;
            tracing::info!(
                emulated_us = traps.emulated_ns / 1e3,
                stepped_us = traps.stepped_ns / 1e3,
                "measured the cost of a probe's traps per call"
            );
            self.traps = Some(traps);
        }
        if self.stats.is_none() {
            self.stats = Some(RunStats::enable()?);
        }
        Ok(())
    }

    /// The calibrated trap costs, once [`Budgets::prepare`] has run.
    pub fn trap_costs(&self) -> Option<TrapCosts> {
        self.traps
    }

    /// The programs' cost per recorded call: as last measured, or the default before any
    /// measurement.
    pub fn program_ns(&self) -> f64 {
        self.program_ns.unwrap_or(DEFAULT_PROGRAM_NS)
    }

    /// One round: measures every budgeted session's probes and throttles what is over.
    /// Returns the throttles made this round.
    pub fn enforce(&mut self, manager: &mut ProbeManager, pair: ProgramPair) -> Vec<Throttle> {
        let budgeted: Vec<(u64, f64)> = manager
            .sessions()
            .filter_map(|s| s.limits.budget.map(|b| (s.id, b)))
            .collect();
        if budgeted.is_empty() {
            // Nothing to keep: stop taxing every program run with the statistics.
            self.stats = None;
            self.last_runs = None;
            self.last_calls.clear();
            self.overhead.clear();
            self.trap_ns.clear();
            return Vec::new();
        }
        let Some(traps) = self.traps else {
            return Vec::new();
        };
        let now = Instant::now();
        let runs = manager.kernel().program_runs(pair);
        if let Some((time, count)) = self.last_runs {
            let calls = runs.1.saturating_sub(count);
            if calls > 0 {
                // Entry and exit each ran once per call.
                let per_run = runs.0.saturating_sub(time).as_nanos() as f64 / calls as f64;
                self.program_ns = Some(per_run * 2.0);
            }
        }
        self.last_runs = Some(runs);
        let program_ns = self.program_ns.unwrap_or(DEFAULT_PROGRAM_NS);

        let mut made = Vec::new();
        for (id, budget) in budgeted {
            let Some(session) = manager.session(id) else {
                continue;
            };
            let created = session.created;
            let probes: Vec<(Arc<ProbeInfo>, u32)> = session
                .members
                .iter()
                .flat_map(|(&pid, m)| m.probes.iter().map(move |p| (Arc::clone(p), pid)))
                .collect();
            let mut loads = Vec::with_capacity(probes.len());
            for (info, pid) in &probes {
                let calls = manager.probe_counters(info).calls;
                let since = match self.last_calls.get(&info.slot) {
                    Some(&(probe, calls, at)) if probe == info.probe.id => Some((calls, at)),
                    _ => None,
                };
                self.last_calls
                    .insert(info.slot, (info.probe.id, calls, now));
                let (before, seconds) = match since {
                    Some((before, at)) => (before, now.duration_since(at).as_secs_f64()),
                    None => (
                        0,
                        SystemTime::now()
                            .duration_since(created)
                            .unwrap_or_default()
                            .as_secs_f64(),
                    ),
                };
                if seconds <= 0.0 {
                    continue;
                }
                let instant = info.probe.inlined_into.is_some();
                let trap_ns = *self.trap_ns.entry(info.probe.id).or_insert_with(|| {
                    let code = first_instruction(*pid, &info.probe.module, info.probe.file_offset);
                    // An inlined call site has no return trap.
                    traps.per_call(&code) * if instant { 0.5 } else { 1.0 }
                });
                loads.push(ProbeLoad {
                    slot: info.slot,
                    calls_per_second: calls.saturating_sub(before) as f64 / seconds,
                    trap_ns,
                    program_ns,
                    sample_every: info.sample_every(),
                });
            }
            let budget_ns = budget * 1e9;
            let (actions, after) = plan(&loads, budget_ns);
            self.overhead.insert(id, after / 1e9);
            let before: f64 = loads.iter().map(ProbeLoad::cost).sum();
            for (load, action) in actions {
                let Some((info, pid)) = probes.iter().find(|(p, _)| p.slot == load.slot) else {
                    continue;
                };
                let applied = match action {
                    Action::Sample(every) => manager.sample_probe(id, load.slot, every),
                    Action::Detach => manager.remove_probe(id, load.slot, pair).map(|_| ()),
                };
                if let Err(error) = applied {
                    tracing::error!(session = id, error = %error.chain(), "throttling a probe failed");
                    continue;
                }
                let reason = format!(
                    "{:.0} calls/s × {:.2} µs ({:.2} µs of traps + {:.2} µs of programs) cost {:.1}% of a CPU; the session's {} probes cost {:.1}%, over its budget of {}%",
                    load.calls_per_second,
                    (load.trap_ns + load.program_ns / f64::from(load.sample_every.max(1))) / 1e3,
                    load.trap_ns / 1e3,
                    load.program_ns / 1e3,
                    load.cost() / 1e7,
                    loads.len(),
                    before / 1e7,
                    budget * 100.0,
                );
                let throttle = Throttle {
                    session_id: id,
                    slot: load.slot,
                    function: info.probe.function.clone(),
                    pid: *pid,
                    action,
                    calls_per_second: load.calls_per_second,
                    cost: load.cost() / 1e9,
                    reason,
                    at: SystemTime::now(),
                };
                tracing::warn!("{}", throttle.describe());
                made.push(throttle);
            }
        }
        self.throttles.extend(made.iter().cloned());
        made
    }
}

impl Throttle {
    /// One line for logs and the Watch stream.
    pub fn describe(&self) -> String {
        let what = match self.action {
            Action::Sample(every) => format!("sampled to 1 call in {every}"),
            Action::Detach => "detached".to_owned(),
        };
        format!(
            "session {}: probe {} on {} (pid {}) {what} by the overhead budget: {}",
            self.session_id, self.slot, self.function, self.pid, self.reason
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(slot: u32, calls_per_second: f64, trap_ns: f64, program_ns: f64) -> ProbeLoad {
        ProbeLoad {
            slot,
            calls_per_second,
            trap_ns,
            program_ns,
            sample_every: 1,
        }
    }

    #[test]
    fn first_instructions_are_classified_as_the_kernel_handles_them() {
        assert!(is_emulated(&[0x55, 0x48, 0x89, 0xe5])); // push rbp
        assert!(is_emulated(&[0x41, 0x57])); // push r15
        assert!(is_emulated(&[0xe9, 0, 0, 0])); // jmp rel32
        assert!(!is_emulated(&[0x48, 0x8d, 0x47, 0x01])); // lea rax, [rdi+1]
        assert!(!is_emulated(&[0xf3, 0x0f, 0x1e, 0xfa])); // endbr64: unknown, so stepped
        assert!(!is_emulated(&[]));
    }

    #[test]
    fn under_budget_nothing_is_throttled() {
        let loads = [load(1, 100.0, 2_000.0, 500.0)]; // 0.25 ms/s
        let (actions, total) = plan(&loads, 10e6);
        assert!(actions.is_empty());
        assert_eq!(total, 250_000.0);
    }

    #[test]
    fn a_hot_probe_whose_traps_exceed_the_budget_is_detached_and_a_cold_one_stays() {
        // 500k calls/s × 15 µs: 7.5 CPUs against a 1% budget.
        let loads = [
            load(1, 500_000.0, 15_000.0, 500.0),
            load(2, 10.0, 15_000.0, 500.0),
        ];
        let (actions, total) = plan(&loads, 10e6);
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].0.slot, 1);
        assert_eq!(actions[0].1, Action::Detach);
        assert!(total <= 10e6, "{total}");
    }

    #[test]
    fn a_probe_whose_programs_are_the_excess_is_sampled_down() {
        // Traps 5 ms/s fit a 10 ms/s budget; programs add 10 ms/s.
        let loads = [load(1, 10_000.0, 500.0, 1_000.0)];
        let (actions, total) = plan(&loads, 10e6);
        assert_eq!(actions.len(), 1);
        let Action::Sample(every) = actions[0].1 else {
            panic!("expected sampling, got {:?}", actions[0].1)
        };
        assert_eq!(every, 2);
        assert!(total <= 10e6, "{total}");
    }
}
