//! Benchmarks behind `cargo xtask bench`: each section measures one thing and renders its
//! part of BENCHMARKS.md. Timing lives here, never in tests.

pub mod analyze;
pub mod auto;
pub mod correlation;
pub mod detach;
pub mod per_call;
pub mod pgbench;
pub mod redis;
pub mod rss;
pub mod store;

pub use per_call::{BenchConfig, BenchReport, Measurement, run};

/// Today's date, for the report.
pub(crate) fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The machine, for the report: CPU model and kernel.
pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} CPUs, Linux {}", kernel.trim())
}

/// Restricts `pid` to `cpus` (benchmarks pin the traced program and its load apart).
pub(crate) fn pin(pid: u32, cpus: impl Iterator<Item = usize>) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        assert_eq!(
            libc::sched_setaffinity(
                pid as libc::pid_t,
                std::mem::size_of::<libc::cpu_set_t>(),
                &set
            ),
            0,
            "pinning {pid}"
        );
    }
}

/// The configurations the real-program benchmarks (redis, pgbench) compare, in run order,
/// with what each does.
pub(crate) const TRACERS: [(&str, &str); 5] = [
    ("untraced", "no probe"),
    (
        "empty pair",
        "scoped's uprobe.multi + uretprobe.multi with empty programs: the traps alone",
    ),
    (
        "scope",
        "span per call, paired in the kernel, stored; every read/write of the server followed",
    ),
    (
        "scope, no capture",
        "`scoped --no-io-capture`: spans only, as bpftrace sees it",
    ),
    ("bpftrace", "uprobe + uretprobe, durations into a histogram"),
];

/// The daemons behind [`TRACERS`], started once for every round.
pub(crate) struct Tracers {
    scope: crate::Scoped,
    no_capture: crate::Scoped,
    empty: crate::Scoped,
}

impl Tracers {
    pub(crate) fn start() -> Tracers {
        Tracers {
            scope: crate::Scoped::start(),
            no_capture: crate::Scoped::start_with(&["--no-io-capture"]),
            empty: crate::Scoped::start_with(&["--no-io-capture", "--bench-null-programs"]),
        }
    }

    /// Runs `measure` under configuration `name` of [`TRACERS`], probing `functions` of the
    /// server `pid` (whose executable is `exe`): scope follows its forks; bpftrace probes
    /// `exe` in the one process (`bpftrace_pid`) or, without it, in every process. Returns
    /// what `measure` returned and, for scope's configurations, the spans stored and dropped.
    pub(crate) fn run<T>(
        &self,
        name: &str,
        pid: u32,
        exe: &str,
        functions: &[&str],
        bpftrace_pid: Option<u32>,
        measure: impl FnOnce() -> T,
    ) -> (T, Option<(u64, u64)>) {
        use std::process::{Command, Stdio};
        use std::time::Duration;
        let daemon = match name {
            "scope" => &self.scope,
            "empty pair" => &self.empty,
            _ => &self.no_capture,
        };
        match name {
            "scope" | "scope, no capture" | "empty pair" => {
                let before = daemon.status();
                let attached = daemon.attach(pid, functions);
                let id = attached["session_id"].to_string();
                let result = measure();
                daemon.scope_ok(&["detach", &id]);
                let after = daemon.settled_status(Duration::from_secs(60));
                let delta = |key: &str| {
                    after[key].as_u64().unwrap_or(0) - before[key].as_u64().unwrap_or(0)
                };
                (
                    result,
                    Some((delta("stored_spans"), delta("spans_dropped"))),
                )
            }
            "bpftrace" => {
                // One start map per function: in a uretprobe, bpftrace's `func` names the
                // caller, not the function returning.
                let program = functions
                    .iter()
                    .map(|f| {
                        format!(
                            "uprobe:{exe}:{f} {{ @{f}[tid] = nsecs; }} \
                             uretprobe:{exe}:{f} /@{f}[tid]/ {{ @ns = hist(nsecs - @{f}[tid]); delete(@{f}[tid]); }}"
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut command = Command::new("bpftrace");
                if let Some(pid) = bpftrace_pid {
                    command.args(["-p", &pid.to_string()]);
                }
                // It warns about RLIMIT_MEMLOCK, which BPF no longer uses.
                command.args(["-e", &program]).stderr(Stdio::null());
                let mut bpftrace = crate::Target::spawn("bpftrace", &mut command);
                bpftrace.expect_line("Attaching", Duration::from_secs(60));
                // "Attaching N probes..." comes before the last of them is in place.
                std::thread::sleep(Duration::from_secs(1));
                let result = measure();
                bpftrace.proc.signal(libc::SIGINT);
                bpftrace.proc.wait_exit(Duration::from_secs(30));
                (result, None)
            }
            _ => (measure(), None),
        }
    }
}
