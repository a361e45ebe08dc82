//! `cargo xtask bench` runs this: measures the per-call cost of tracing against peers and
//! writes it into BENCHMARKS.md (between markers, so other sections stay).
//!
//! Usage: scope-bench [--quick] [--out PATH]

use std::path::PathBuf;

use anyhow::{Context, bail};
use scope_tests::bench::{self, BenchConfig};

const BEGIN: &str = "<!-- bench:per-call:begin (written by `cargo xtask bench`) -->";
const END: &str = "<!-- bench:per-call:end -->";

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--out" => out = Some(args.next().context("--out needs a path")?.into()),
            other => bail!("unknown argument {other:?}; usage: scope-bench [--quick] [--out PATH]"),
        }
    }
    let config = if quick {
        BenchConfig::QUICK
    } else {
        BenchConfig::FULL
    };
    eprintln!(
        "scope-bench: {} calls × {} rounds per configuration",
        config.calls, config.rounds
    );
    let report = bench::run(config);
    let section = report.markdown();
    print!("{section}");
    if let Some(path) = out {
        let old = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
        let block = format!("{BEGIN}\n{section}{END}\n");
        let new = match (old.find(BEGIN), old.find(END)) {
            (Some(start), Some(end)) if start < end => format!(
                "{}{}{}",
                &old[..start],
                block,
                &old[end + END.len()..].trim_start_matches('\n')
            ),
            _ => format!("{}\n{}", old.trim_end(), format_args!("\n{block}")),
        };
        std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("scope-bench: wrote {}", path.display());
    }
    Ok(())
}
