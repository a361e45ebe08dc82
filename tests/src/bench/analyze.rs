//! What `scope analyze` costs: the Analyze call on real binaries, from 1 MB (nginx) to
//! 150 MB (libLLVM, which xtask setup installs for bpf-linker), with a cold cache (a new
//! daemon) and warm (the same file again).

use std::{fmt::Write as _, path::PathBuf, time::Instant};

use super::{machine, today};
use crate::{Postgres, Scoped};

#[derive(Clone, Debug)]
pub struct AnalyzeCase {
    pub path: PathBuf,
    pub bytes: u64,
    pub functions: u64,
    pub usdt: usize,
    /// Median milliseconds of the first call of a new daemon, and of a repeated call.
    pub cold_ms: f64,
    pub warm_ms: f64,
}

#[derive(Clone, Debug)]
pub struct AnalyzeReport {
    pub rounds: usize,
    pub cases: Vec<AnalyzeCase>,
    pub machine: String,
}

impl AnalyzeReport {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## `scope analyze` on real binaries\n");
        let _ = writeln!(
            md,
            "The Analyze call, timed by the client (`scope analyze --binary PATH --json`, the CLI's own start \
             included), median of {} rounds; *cold* is a new daemon's first look at the file (parse the ELF \
             file, its symbol table and notes), *warm* the same file again (the module cache). Measured {} on {}.\n",
            self.rounds,
            today(),
            self.machine
        );
        let _ = writeln!(
            md,
            "| binary | size | functions | USDT sites | cold | warm |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: |");
        for case in &self.cases {
            let _ = writeln!(
                md,
                "| `{}` | {:.1} MB | {} | {} | {:.0} ms | {:.0} ms |",
                case.path.display(),
                case.bytes as f64 / 1e6,
                case.functions,
                case.usdt,
                case.cold_ms,
                case.warm_ms
            );
        }
        md
    }
}

/// The binaries measured: those present of nginx, redis, postgres and libLLVM.
fn binaries() -> Vec<PathBuf> {
    let mut paths = vec![
        PathBuf::from("/usr/sbin/nginx"),
        PathBuf::from("/usr/bin/redis-check-rdb"),
        Postgres::bin_dir().join("postgres"),
    ];
    if let Some(llvm) = std::fs::read_dir("/usr/lib/x86_64-linux-gnu")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM") && !p.is_symlink())
        })
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
    {
        paths.push(llvm);
    }
    paths.into_iter().filter(|p| p.exists()).collect()
}

pub fn run(rounds: usize) -> AnalyzeReport {
    let mut cases = Vec::new();
    for path in binaries() {
        let path_arg = path.to_str().expect("UTF-8 path").to_owned();
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        let mut last = serde_json::Value::Null;
        for _ in 0..rounds {
            let scoped = Scoped::start();
            for times in [&mut cold, &mut warm] {
                let started = Instant::now();
                last = scoped.scope_json(&["analyze", "--binary", &path_arg, "--json"]);
                times.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        let median = |values: &mut Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        cases.push(AnalyzeCase {
            bytes: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            functions: last["functions"].as_u64().unwrap_or(0),
            usdt: last["usdt"].as_array().map_or(0, Vec::len),
            cold_ms: median(&mut cold),
            warm_ms: median(&mut warm),
            path,
        });
    }
    AnalyzeReport {
        rounds,
        cases,
        machine: machine(),
    }
}
