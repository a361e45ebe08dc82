//! `cargo xtask bench` runs this: the benchmarks of `scope_tests::bench`, each written into
//! its own section of BENCHMARKS.md (between markers, so the rest of the file stays).
//!
//! Usage: scope-bench [--quick] [--only per-call|redis|pgbench|correlation|store|rss|detach|analyze|auto] [--out PATH]

use std::{path::Path, time::Duration};

use anyhow::{Context, bail};
use scope_tests::bench::{
    self, BenchConfig, auto::AutoConfig, correlation::CorrelationConfig, pgbench::PgbenchConfig,
    redis::RedisConfig,
};

const SECTIONS: [&str; 9] = [
    "per-call",
    "redis",
    "pgbench",
    "correlation",
    "store",
    "rss",
    "detach",
    "analyze",
    "auto",
];

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut only: Option<String> = None;
    let mut out: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => only = Some(args.next().context("--only needs a section")?),
            "--out" => out = Some(args.next().context("--out needs a path")?.into()),
            other => bail!(
                "unknown argument {other:?}; usage: scope-bench [--quick] [--only per-call|redis|pgbench|correlation|store|rss|detach|analyze|auto] [--out PATH]"
            ),
        }
    }
    if let Some(section) = &only
        && !SECTIONS.contains(&section.as_str())
    {
        bail!("unknown section {section:?}; one of {SECTIONS:?}");
    }
    let wanted = |section: &str| only.as_deref().is_none_or(|o| o == section);
    let write = |section: &str, markdown: String| -> anyhow::Result<()> {
        println!("{markdown}");
        if let Some(path) = &out {
            replace_section(path, section, &markdown)?;
            eprintln!(
                "scope-bench: wrote the {section} section of {}",
                path.display()
            );
        }
        Ok(())
    };

    if wanted("per-call") {
        let config = if quick {
            BenchConfig::QUICK
        } else {
            BenchConfig::FULL
        };
        eprintln!(
            "scope-bench: per-call cost, {} calls × {} rounds per configuration",
            config.calls, config.rounds
        );
        write("per-call", bench::run(config).markdown())?;
    }
    if wanted("redis") {
        let config = if quick {
            RedisConfig::QUICK
        } else {
            RedisConfig::FULL
        };
        eprintln!(
            "scope-bench: redis-server under redis-benchmark, {} requests × {} rounds",
            config.requests, config.rounds
        );
        write("redis", bench::redis::run(config).markdown())?;
    }
    if wanted("pgbench") {
        let config = if quick {
            PgbenchConfig::QUICK
        } else {
            PgbenchConfig::FULL
        };
        eprintln!(
            "scope-bench: PostgreSQL under pgbench, {} s × {} rounds",
            config.seconds, config.rounds
        );
        write("pgbench", bench::pgbench::run(config).markdown())?;
    }
    if wanted("correlation") {
        let config = if quick {
            CorrelationConfig::QUICK
        } else {
            CorrelationConfig::FULL
        };
        eprintln!(
            "scope-bench: correlation, {} synthetic traces; IPC loop {} requests × {} rounds",
            config.traces, config.requests, config.rounds
        );
        write("correlation", bench::correlation::run(config).markdown())?;
    }
    if wanted("store") {
        let spans = if quick { 200_000 } else { 10_000_000 };
        eprintln!("scope-bench: store, {spans} spans");
        write("store", bench::store::run(spans).markdown())?;
    }
    if wanted("detach") {
        let rounds = if quick { 3 } else { 30 };
        eprintln!("scope-bench: detach --all, {rounds} rounds");
        write("detach", bench::detach::run(rounds).markdown())?;
    }
    if wanted("analyze") {
        let rounds = if quick { 1 } else { 5 };
        eprintln!("scope-bench: scope analyze, {rounds} rounds");
        write("analyze", bench::analyze::run(rounds).markdown())?;
    }
    if wanted("auto") {
        let config = if quick {
            AutoConfig::QUICK
        } else {
            AutoConfig::FULL
        };
        eprintln!(
            "scope-bench: --auto on redis at budgets {:?}%, {} rounds",
            config.budgets, config.rounds
        );
        write("auto", bench::auto::run(config).markdown())?;
    }
    if wanted("rss") {
        let duration = if quick {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(600)
        };
        eprintln!(
            "scope-bench: daemon RSS under steady load for {} s",
            duration.as_secs()
        );
        write("rss", bench::rss::run(duration).markdown())?;
    }
    Ok(())
}

/// Replaces (or appends) the block between this section's markers.
fn replace_section(path: &Path, section: &str, markdown: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- bench:{section}:begin (written by `cargo xtask bench`) -->");
    let end = format!("<!-- bench:{section}:end -->");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let block = format!("{begin}\n{markdown}{end}\n");
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(start), Some(stop)) if start < stop => {
            format!(
                "{}{}{}",
                &old[..start],
                block,
                old[stop + end.len()..].trim_start_matches('\n')
            )
        }
        _ => format!("{}\n\n{block}", old.trim_end()),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}
