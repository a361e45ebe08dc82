//! Benchmarks behind `cargo xtask bench`: each section measures one thing and renders its
//! part of BENCHMARKS.md. Timing lives here, never in tests.

pub mod analyze;
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
