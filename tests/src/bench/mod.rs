//! Benchmarks behind `cargo xtask bench`: each section measures one thing and renders its
//! part of BENCHMARKS.md. Timing lives here, never in tests.

pub mod correlation;
pub mod per_call;
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
