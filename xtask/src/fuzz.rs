//! `cargo xtask fuzz [--seconds N] [--verbose] [TARGET...]`: builds the cargo-fuzz targets in
//! `fuzz/` and runs each for a bounded time on the corpus kept in the repo, failing with the
//! crash artifact's path when one crashes, hangs or runs out of memory.
//!
//! `cargo xtask fuzz-seeds`: rebuilds the seed corpus (`fuzz/corpus/<target>/seed-*`) and the
//! base ELF files of the `dwarf` target (`fuzz/seeds/*.elf`) from `fuzz/seeds/`.
//!
//! See docs/fuzzing.md.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime},
};

use anyhow::{Context, bail};
use scope_common::{
    IoEvent, MAX_TEXT, ProcessEvent, RecordKind, Span, TextSpan, io_op, process_event, span_flags,
    stream_kind,
};

use crate::{root, run, setup};

/// The fuzz targets, and what each feeds hostile bytes to.
pub const TARGETS: &[(&str, &str)] = &[
    (
        "elf",
        "any bytes as an ELF file: the symbolizer's module loading, symbols, lookups, DWARF",
    ),
    (
        "dwarf",
        "fuzzed DWARF sections spliced into a real ELF: gimli/addr2line parsing, inline sites",
    ),
    (
        "record",
        "ring-buffer records: the reader's decoder and the pipeline's conversion",
    ),
    (
        "maps",
        "/proc/PID/maps text: parsing, module list, address lookup",
    ),
    (
        "glob",
        "function globs from gRPC: compiling and matching, against a reference",
    ),
];

/// Seconds per target of `cargo xtask fuzz` without `--seconds`.
pub const DEFAULT_SECONDS: u64 = 60;
/// Seconds per target in `cargo xtask test`: five targets, two and a half minutes, plus the
/// fuzz build. `SCOPE_FUZZ_SECONDS` overrides it (0 skips fuzzing).
pub const TEST_SECONDS: u64 = 30;
/// One input running longer than this is a hang, and a failure like a crash.
const INPUT_TIMEOUT_SECONDS: u64 = 10;
/// libFuzzer's memory limit per run; more is a failure (a decompression bomb, say).
const RSS_LIMIT_MB: u64 = 2048;

const USAGE: &str = "usage: cargo xtask fuzz [--seconds N] [--verbose] [TARGET...]";

/// What to fuzz, for how long.
#[derive(Debug)]
pub struct Options {
    pub seconds: u64,
    pub targets: Vec<String>,
    /// Show libFuzzer's progress lines (`#N NEW cov: ...`), not only the summary.
    pub verbose: bool,
}

impl Options {
    /// Every target for `seconds` each.
    pub fn all(seconds: u64) -> Options {
        Options {
            seconds,
            targets: TARGETS.iter().map(|(name, _)| (*name).to_owned()).collect(),
            verbose: false,
        }
    }

    pub fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut options = Options::all(DEFAULT_SECONDS);
        let mut targets = Vec::new();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    let value = args.next().context("--seconds needs a number")?;
                    options.seconds = value
                        .parse()
                        .with_context(|| format!("--seconds {value:?} is not a whole number"))?;
                }
                "--verbose" | "-v" => options.verbose = true,
                "-h" | "--help" => {
                    println!("{USAGE}\ntargets:");
                    for (name, what) in TARGETS {
                        println!("  {name:<8} {what}");
                    }
                    std::process::exit(0);
                }
                target if TARGETS.iter().any(|(name, _)| *name == target) => {
                    targets.push(target.to_owned());
                }
                other => {
                    let names: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
                    bail!(
                        "unknown fuzz target or option {other:?}; targets: {}\n{USAGE}",
                        names.join(", ")
                    );
                }
            }
        }
        if options.seconds == 0 {
            bail!("--seconds must be at least 1");
        }
        if !targets.is_empty() {
            options.targets = targets;
        }
        Ok(options)
    }
}

/// The seconds per target `cargo xtask test` fuzzes for: [`TEST_SECONDS`], or
/// `SCOPE_FUZZ_SECONDS` when set.
pub fn test_seconds() -> anyhow::Result<u64> {
    match std::env::var("SCOPE_FUZZ_SECONDS") {
        Ok(value) => value
            .parse()
            .with_context(|| format!("SCOPE_FUZZ_SECONDS={value:?} is not a whole number")),
        Err(_) => Ok(TEST_SECONDS),
    }
}

/// Which rustc builds the fuzz targets. They need `-Zsanitizer` (or, on newer compilers,
/// unstable options around it), so nightly, or stable told to accept nightly flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Toolchain {
    Nightly,
    /// The default (stable) toolchain with `RUSTC_BOOTSTRAP=1`.
    StableBootstrap,
}

impl Toolchain {
    fn detect() -> Toolchain {
        let has_nightly = Command::new("rustup")
            .args(["toolchain", "list"])
            .output()
            .is_ok_and(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|line| line.starts_with("nightly"))
            });
        if has_nightly {
            Toolchain::Nightly
        } else {
            Toolchain::StableBootstrap
        }
    }

    /// How to repeat a run by hand.
    fn cargo_prefix(self) -> &'static str {
        match self {
            Toolchain::Nightly => "cargo +nightly",
            Toolchain::StableBootstrap => "RUSTC_BOOTSTRAP=1 cargo",
        }
    }
}

/// `cargo [+nightly] fuzz ARGS` in the workspace root.
fn cargo_fuzz(toolchain: Toolchain, args: &[&str]) -> Command {
    // `+nightly` is understood by rustup's proxy only: call `cargo` through PATH.
    let mut command = Command::new("cargo");
    command.current_dir(root());
    match toolchain {
        Toolchain::Nightly => {
            command.arg("+nightly");
        }
        Toolchain::StableBootstrap => {
            command.env("RUSTC_BOOTSTRAP", "1");
        }
    }
    command
        .arg("fuzz")
        .args(args)
        // cargo-fuzz sets RUSTFLAGS itself (sanitizer, coverage); the workspace's rustflags in
        // .cargo/config.toml are for aya, which the fuzz crate does not build.
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    command
}

/// Where the fuzz build goes (the repo's ignored `target/`).
fn target_dir() -> PathBuf {
    root().join("target/fuzz")
}

/// Arguments shared by `cargo fuzz build` and `cargo fuzz run`: release with debug
/// assertions, so an integer overflow panics instead of wrapping silently.
fn build_args(target_dir: &str) -> Vec<&str> {
    vec!["--debug-assertions", "--target-dir", target_dir]
}

/// What libFuzzer reported about one run.
#[derive(Debug, Default)]
struct Report {
    target: String,
    seconds: f64,
    executions: Option<u64>,
    execs_per_second: Option<u64>,
    new_units: Option<u64>,
    peak_rss_mb: Option<u64>,
    coverage: Option<String>,
    failure: Option<String>,
}

pub fn fuzz(options: &Options) -> anyhow::Result<()> {
    setup::install_cargo_fuzz()?;
    let toolchain = Toolchain::detect();
    if toolchain == Toolchain::StableBootstrap {
        eprintln!(
            "xtask fuzz: no nightly toolchain; building with stable and RUSTC_BOOTSTRAP=1 \
             (see docs/fuzzing.md)"
        );
    }
    let target_dir = target_dir();
    let target_dir_arg = target_dir
        .to_str()
        .context("the workspace path is not UTF-8")?
        .to_owned();

    let mut build = vec!["build"];
    build.extend(build_args(&target_dir_arg));
    eprintln!("xtask fuzz: building the fuzz targets");
    run(&mut cargo_fuzz(toolchain, &build))
        .context("building the fuzz targets (`cargo xtask setup` installs what they need)")?;

    let mut reports = Vec::new();
    for target in &options.targets {
        reports.push(run_target(toolchain, &target_dir_arg, target, options)?);
    }

    eprintln!(
        "\nxtask fuzz: {} s per target\n{:<8} {:>8} {:>12} {:>9} {:>6} {:>8}  result",
        options.seconds, "target", "seconds", "executions", "execs/s", "new", "rss MiB"
    );
    let show = |value: Option<u64>| value.map_or_else(|| "?".to_owned(), |v| v.to_string());
    for report in &reports {
        eprintln!(
            "{:<8} {:>8.1} {:>12} {:>9} {:>6} {:>8}  {}",
            report.target,
            report.seconds,
            show(report.executions),
            show(report.execs_per_second),
            show(report.new_units),
            show(report.peak_rss_mb),
            report.failure.as_deref().unwrap_or("ok"),
        );
        if let Some(coverage) = &report.coverage {
            eprintln!("{:<8} {coverage}", "");
        }
    }
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| r.failure.is_some())
        .map(|r| r.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (crash artifacts and how to reproduce them are above)",
            failed.join(", ")
        );
    }
    Ok(())
}

fn run_target(
    toolchain: Toolchain,
    target_dir: &str,
    target: &str,
    options: &Options,
) -> anyhow::Result<Report> {
    // New inputs go to the first corpus directory: a scratch one under target/, so the repo's
    // corpus stays as committed (and a later local run starts from what this one found).
    let scratch = root().join("target/fuzz/corpus").join(target);
    fs::create_dir_all(&scratch)
        .with_context(|| format!("creating the scratch corpus {}", scratch.display()))?;
    let corpus = root().join("fuzz/corpus").join(target);
    let artifacts = root().join("fuzz/artifacts").join(target);
    let (scratch, corpus) = (
        scratch.to_str().context("non-UTF-8 path")?.to_owned(),
        corpus.to_str().context("non-UTF-8 path")?.to_owned(),
    );
    let max_time = format!("-max_total_time={}", options.seconds);
    let timeout = format!("-timeout={INPUT_TIMEOUT_SECONDS}");
    let rss = format!("-rss_limit_mb={RSS_LIMIT_MB}");

    let mut args = vec!["run"];
    args.extend(build_args(target_dir));
    args.extend([target, &scratch, &corpus, "--"]);
    args.extend([
        max_time.as_str(),
        timeout.as_str(),
        rss.as_str(),
        "-print_final_stats=1",
    ]);
    let mut command = cargo_fuzz(toolchain, &args);
    command.stderr(Stdio::piped());

    eprintln!(
        "xtask fuzz: {target} for {} s ({})",
        options.seconds,
        TARGETS
            .iter()
            .find(|(name, _)| *name == target)
            .map_or("", |(_, what)| what)
    );
    let started_wall = SystemTime::now();
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let mut report = Report {
        target: target.to_owned(),
        ..Report::default()
    };
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .context("reading the fuzzer's output")?
            == 0
        {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        record_stat(&mut report, text);
        // `#N NEW cov: ...`, `#N pulse ...`, `#N REDUCE ...`, the functions first reached and
        // the dictionary: one line per new input, too many for a CI log. The summary below
        // has the totals.
        let progress =
            (text.starts_with('#') && !text.contains("DONE") && !text.contains("INITED"))
                || text.trim_start().starts_with("NEW_FUNC")
                || text.contains("\" # Uses: ");
        if options.verbose || !progress {
            eprintln!("{text}");
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    report.seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        let found = new_artifacts(&artifacts, started_wall);
        let mut failure = format!("FAILED ({status})");
        if found.is_empty() {
            eprintln!(
                "xtask fuzz: {target} failed with {status} and left no artifact in {}",
                artifacts.display()
            );
        }
        for artifact in &found {
            eprintln!(
                "xtask fuzz: {target} crash artifact: {}\n  reproduce: {} fuzz run --debug-assertions --target-dir {target_dir} {target} {}",
                artifact.display(),
                toolchain.cargo_prefix(),
                artifact.display()
            );
            failure = format!("FAILED: {}", artifact.display());
        }
        report.failure = Some(failure);
    }
    Ok(report)
}

/// Picks the numbers out of libFuzzer's final stats and `DONE` line.
fn record_stat(report: &mut Report, line: &str) {
    let number = |prefix: &str| -> Option<u64> { line.strip_prefix(prefix)?.trim().parse().ok() };
    if let Some(n) = number("stat::number_of_executed_units:") {
        report.executions = Some(n);
    } else if let Some(n) = number("stat::average_exec_per_sec:") {
        report.execs_per_second = Some(n);
    } else if let Some(n) = number("stat::new_units_added:") {
        report.new_units = Some(n);
    } else if let Some(n) = number("stat::peak_rss_mb:") {
        report.peak_rss_mb = Some(n);
    } else if line.contains("\tDONE ")
        && let Some(at) = line.find("cov:")
    {
        // "cov: 1234 ft: 5678 corp: 90/21Kb lim: 4096 exec/s: ...": keep coverage and corpus.
        let coverage = &line[at..];
        let end = coverage.find(" lim:").unwrap_or(coverage.len());
        report.coverage = Some(coverage[..end].to_owned());
    }
}

/// Files libFuzzer wrote to `dir` since `since` (crash-, timeout-, oom-, leak-...).
fn new_artifacts(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified >= since)
        })
        .map(|entry| entry.path())
        .collect();
    found.sort();
    found
}

/// `cargo xtask fuzz-seeds`: rebuilds the committed seeds from `fuzz/seeds/`, then runs the
/// fuzz crate's unit tests on them.
///
/// Seed files are named `seed-*`; other files in a corpus directory (inputs kept because they
/// once found a bug) are left alone. The ELF seeds depend on the compiler, so rebuilding them
/// on another machine changes their bytes, not what they cover.
pub fn seeds() -> anyhow::Result<()> {
    let fuzz = root().join("fuzz");
    let sources = fuzz.join("seeds");
    let work = root().join("target/fuzz/seeds");
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    for (target, _) in TARGETS {
        let dir = fuzz.join("corpus").join(target);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
            {
                fs::remove_file(&path)?;
            }
        }
    }

    let elf = elf_seeds(&sources, &work)?;
    fs::copy(work.join("demo"), sources.join("dwarf5.elf"))?;
    fs::copy(work.join("demo-dwarf4"), sources.join("dwarf4.elf"))?;
    let dwarf = dwarf_seeds(&work)?;
    let written = [
        ("elf", elf),
        ("dwarf", dwarf),
        ("record", record_seeds()),
        ("maps", text_seeds(MAPS_SEEDS)),
        ("glob", text_seeds(GLOB_SEEDS)),
    ];
    let mut total = 0;
    for (target, seeds) in written {
        let dir = fuzz.join("corpus").join(target);
        for (name, bytes) in &seeds {
            total += bytes.len();
            fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        eprintln!("xtask fuzz-seeds: {target}: {} seeds", seeds.len());
    }
    eprintln!("xtask fuzz-seeds: {total} bytes in all");

    // The harness's own tests: among them, that the new `dwarf` seeds spliced into the new
    // base files still reach the symbolizer's DWARF reader.
    let mut command = Command::new("cargo");
    if Toolchain::detect() == Toolchain::Nightly {
        command.arg("+nightly");
    }
    command
        .current_dir(&fuzz)
        .args(["test", "--lib", "--target-dir"])
        .arg(target_dir())
        .env("RUSTC_BOOTSTRAP", "1")
        // Not the workspace's rustflags (for aya): the fuzz crate does not build aya.
        .env("RUSTFLAGS", "")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    run(&mut command).context("the fuzz harness's tests failed on the new seeds")
}

/// How each ELF seed is built from `demo.c` / `demo.cpp`: name, compiler, flags.
const ELF_BUILDS: &[(&str, &str, &[&str])] = &[
    ("demo", "gcc", &["-g", "-O1"]),
    ("demo-dwarf4", "gcc", &["-gdwarf-4", "-O1"]),
    ("demo-gz", "gcc", &["-g", "-O1", "-gz"]),
    ("demo-nopie", "gcc", &["-g", "-O1", "-no-pie"]),
    ("demo-so", "gcc", &["-g", "-O1", "-fPIC", "-shared"]),
    ("demo-cpp", "g++", &["-g", "-O1"]),
];

fn elf_seeds(sources: &Path, work: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    for (name, compiler, flags) in ELF_BUILDS {
        let source = if *compiler == "g++" {
            "demo.cpp"
        } else {
            "demo.c"
        };
        run(Command::new(compiler)
            .current_dir(sources)
            .args(*flags)
            // Code and headers share a page: a 10 KiB file instead of 16 KiB of padding.
            .args(["-Wl,-z,noseparate-code", "-Wl,--build-id", "-o"])
            .arg(work.join(name))
            .arg(source))
        .with_context(|| format!("building the {name} seed (`cargo xtask setup` installs gcc)"))?;
    }
    let demo = work.join("demo");
    run(Command::new("strip")
        .arg("-o")
        .arg(work.join("demo-stripped"))
        .arg(&demo))?;
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&demo)
        .arg(work.join("demo-debug")))?;
    // A stripped binary pointing at its debug file (not found when fuzzing: the search root
    // does not exist), so the debuglink parsing runs.
    run(Command::new("objcopy")
        .current_dir(work)
        .arg("--add-gnu-debuglink=demo-debug")
        .arg("demo-stripped")
        .arg("demo-debuglink"))?;

    let mut seeds = Vec::new();
    for name in ELF_BUILDS.iter().map(|(name, _, _)| *name).chain([
        "demo-stripped",
        "demo-debug",
        "demo-debuglink",
    ]) {
        let bytes = fs::read(work.join(name))?;
        seeds.push((name.to_owned(), bytes));
    }
    // Cut short: the headers promise more than the file has.
    let demo = fs::read(&demo)?;
    for len in [64, 1024, demo.len() / 2] {
        seeds.push((format!("demo-truncated-{len}"), demo[..len].to_vec()));
    }
    Ok(seeds)
}

/// The DWARF sections the `dwarf` seeds carry.
const DWARF_SECTIONS: &[&str] = &[
    ".debug_info",
    ".debug_abbrev",
    ".debug_line",
    ".debug_str",
    ".debug_line_str",
    ".debug_str_offsets",
    ".debug_addr",
    ".debug_rnglists",
    ".debug_ranges",
    ".debug_loclists",
    ".debug_loc",
    ".debug_aranges",
];

/// Seeds in the `dwarf` target's format (`fuzz/src/lib.rs`, `parse_replacements`):
/// `base:u8` then `flags:u8 name_len:u8 name data_len:u16le data` per section.
fn dwarf_seeds(work: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let encode = |base: u8, sections: &[(&str, Vec<u8>)]| {
        let mut out = vec![base];
        for (name, data) in sections {
            let len = u16::try_from(data.len()).unwrap_or(u16::MAX);
            out.push(0);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&data[..usize::from(len)]);
        }
        out
    };
    let mut seeds = Vec::new();
    for (base, file, tag) in [(0u8, "demo", "dwarf5"), (1, "demo-dwarf4", "dwarf4")] {
        let mut sections = Vec::new();
        for name in DWARF_SECTIONS {
            let out = work.join(format!("{file}{name}"));
            let _ = fs::remove_file(&out);
            let dumped = Command::new("objcopy")
                .arg(format!("--dump-section={name}={}", out.display()))
                .arg(work.join(file))
                .arg(work.join("objcopy-scratch"))
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if dumped && let Ok(data) = fs::read(&out) {
                sections.push((*name, data));
            }
        }
        if sections.is_empty() {
            bail!("no DWARF sections found in {file}");
        }
        // The base file as it is, all its sections given back verbatim, and each alone.
        seeds.push((format!("{tag}-unchanged"), vec![base]));
        seeds.push((format!("{tag}-all"), encode(base, &sections)));
        for (name, data) in &sections {
            let one = [(*name, data.clone())];
            seeds.push((
                format!("{tag}-{}", name.trim_start_matches('.')),
                encode(base, &one),
            ));
        }
    }
    Ok(seeds)
}

/// A record's bytes as the kernel writes them into a ring.
fn bytes_of<T: Copy>(record: &T) -> Vec<u8> {
    // SAFETY: the records of scope-common are `#[repr(C)]` integers without padding (their
    // sizes are asserted there), so every byte is initialized.
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

fn record_seeds() -> Vec<(String, Vec<u8>)> {
    let span = Span {
        kind: RecordKind::Span as u32,
        probe_id: 3,
        pid: 4242,
        tid: 4243,
        start_ns: 1_000_000,
        end_ns: 1_002_500,
        span_id: 1 << 48 | 7,
        parent_id: 1 << 48 | 6,
        root_id: 1 << 48 | 5,
        trace_id: 1 << 48 | 5,
        link_id: 0,
        args: [1, 2, 3, 4, 5, 6],
        ret: 42,
        caller: 0x5555_5555_1234,
        depth: 2,
        flags: 0,
    };
    let linked = Span {
        parent_id: 0,
        link_id: 2 << 48 | 9,
        depth: 0,
        flags: span_flags::LINK_IO,
        ..span
    };
    let abandoned = Span {
        end_ns: 0,
        flags: span_flags::ABANDONED | span_flags::THREAD_EXITED,
        ..span
    };
    let fork = ProcessEvent {
        kind: RecordKind::Process as u32,
        event: process_event::FORK,
        pid: 4300,
        tid: 4300,
        parent_pid: 4242,
        parent_tid: 4243,
        time_ns: 1_000_100,
        span_id: 1 << 48 | 7,
        trace_id: 1 << 48 | 5,
        ..ProcessEvent::default()
    };
    let exit = ProcessEvent {
        event: process_event::EXIT,
        exit_code: 256,
        ..fork
    };
    let mut local_v4 = [0u8; 16];
    local_v4[..4].copy_from_slice(&[127, 0, 0, 1]);
    let tcp = IoEvent {
        kind: RecordKind::Io as u32,
        op: io_op::WRITE,
        pid: 4242,
        tid: 4243,
        time_ns: 1_001_000,
        stream: stream_kind::TCP,
        bytes: 17,
        key: 0xfeed,
        start: u64::from(u32::MAX) - 5,
        end: u64::from(u32::MAX) + 12,
        span_id: 1 << 48 | 7,
        trace_id: 1 << 48 | 5,
        local_addr: local_v4,
        remote_addr: local_v4,
        local_port: 40000,
        remote_port: 6379,
        family: 2,
        ..IoEvent::default()
    };
    let tcp6 = IoEvent {
        op: io_op::READ,
        local_addr: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        family: 10,
        peer_span_id: 3 << 48 | 1,
        peer_trace_id: 3 << 48 | 1,
        ..tcp
    };
    let pipe = IoEvent {
        stream: stream_kind::PIPE,
        family: 0,
        start: 0,
        end: 17,
        ..tcp
    };
    let mut python = TextSpan {
        span: Span {
            kind: RecordKind::TextSpan as u32,
            args: [0x1000, 0x2000, 42, 0, 0, 0],
            ..span
        },
        lens: [11, 6],
        text: [[0; MAX_TEXT]; 2],
    };
    python.text[0][..11].copy_from_slice(b"/srv/app.py");
    python.text[1][..6].copy_from_slice(b"handle");
    let span_bytes = bytes_of(&span);
    vec![
        ("text-python".to_owned(), bytes_of(&python)),
        ("span".to_owned(), span_bytes.clone()),
        ("span-linked".to_owned(), bytes_of(&linked)),
        ("span-abandoned".to_owned(), bytes_of(&abandoned)),
        ("span-short".to_owned(), span_bytes[..100].to_vec()),
        ("process-fork".to_owned(), bytes_of(&fork)),
        ("process-exit".to_owned(), bytes_of(&exit)),
        ("io-tcp".to_owned(), bytes_of(&tcp)),
        ("io-tcp6".to_owned(), bytes_of(&tcp6)),
        ("io-pipe".to_owned(), bytes_of(&pipe)),
        ("unknown-kind".to_owned(), [9, 0, 0, 0, 1, 2, 3, 4].to_vec()),
    ]
}

fn text_seeds(seeds: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    seeds
        .iter()
        .map(|(name, text)| ((*name).to_owned(), text.as_bytes().to_vec()))
        .collect()
}

const MAPS_SEEDS: &[(&str, &str)] = &[
    (
        "redis",
        "\
55d0a0e00000-55d0a0e2a000 r--p 00000000 08:01 1234567                    /usr/bin/redis-server
55d0a0e2a000-55d0a0f6b000 r-xp 0002a000 08:01 1234567                    /usr/bin/redis-server
55d0a0f6b000-55d0a0fc0000 r--p 0016b000 08:01 1234567                    /usr/bin/redis-server
55d0a1200000-55d0a1400000 rw-p 00000000 00:00 0                          [heap]
7f2a1c000000-7f2a1c028000 r--p 00000000 08:01 2345678                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f2a1c028000-7f2a1c1bd000 r-xp 00028000 08:01 2345678                    /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
7ffd1c1f0000-7ffd1c1f2000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
",
    ),
    (
        "odd-paths",
        "\
7f0000000000-7f0000020000 r-xp 00000000 fd:02 42                         /opt/my app/lib with spaces.so
7f0000100000-7f0000101000 r-xp 00001000 fd:02 43                         /tmp/old.so (deleted)
7f0000200000-7f0000210000 rw-p 00000000 00:00 0 
7f0000300000-7f0000310000 rw-s 00000000 00:05 77                         /dev/zero (deleted)
7f0000400000-7f0000401000 r-xp 00000000 fd:02 44                         /tmp/new\\012line.so
7f0000500000-7f0000501000 r-xp 00000000 fd:02 45                         /a/../../etc/x.so
7fff00003000-7fff00004000 r--p 00000000 00:00 0                          [anon:scope buffer]
",
    ),
    ("malformed", "10-20 r--p 00000000 08:01 1 /x\n20-10 r--p 0 08:01 1 /y\nzz\n"),
];

const GLOB_SEEDS: &[(&str, &str)] = &[
    ("literal", "processCommand\0processCommand"),
    ("prefix", "process*\0processCommand"),
    ("suffix", "*Command\0processCommand"),
    ("qualified", "demo::*\0demo::inner::helper"),
    ("many-stars", "*a*a*a*a*b\0aaaaaaaaaaaaaaaaaaaaaaaa"),
    ("any", "fib?\0fib2"),
    ("class", "f[io]b\0fib"),
    ("range", "f[a-j]b\0fib"),
    ("negated", "f[!a-j]b\0fzb"),
    ("bracket-member", "[]]x\0]x"),
    ("dash-member", "x[-a]\0x-"),
    ("escape", "a\\*b\0a*b"),
    ("unicode", "d\u{e9}mo::*\0d\u{e9}mo::\u{1f600}"),
    ("unclosed", "f[ab\0fab"),
    ("trailing-escape", "f\\\0f"),
    ("empty", "\0x"),
];
