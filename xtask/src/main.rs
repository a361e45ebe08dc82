//! `cargo xtask`: everything needed to go from a fresh machine to a traced program.
//!
//! - `setup`: install what is missing (Debian packages, the bpf-debian toolchain link,
//!   bpf-linker), mount tracefs and bpffs. Idempotent.
//! - `build-ebpf`: build the eBPF object the daemon embeds.
//! - `build`: setup + build-ebpf + the release binaries.
//! - `demo`: build, start scoped, trace a real redis-server under load, print what it saw.
//! - `test`: build, then the whole test suite (unit + privileged end-to-end), then every fuzz
//!   target for a short bounded time.
//! - `fuzz [--seconds N] [TARGET...]`: run the cargo-fuzz targets in `fuzz/` for a bounded
//!   time on the repo's corpus; `fuzz-seeds` rebuilds that corpus's seeds (docs/fuzzing.md).
//! - `bench [--quick] [--only SECTION]`: measure the per-call cost of tracing against bpftrace
//!   and perf, the cost of correlation, the store and the daemon's memory, and write each into
//!   its section of BENCHMARKS.md.

mod fuzz;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask <setup | build-ebpf | build | demo | test [ARGS...] | bench [--quick] [--only per-call|redis|pgbench|correlation|store|rss|detach|analyze] | fuzz [--seconds N] [--verbose] [TARGET...] | fuzz-seeds | ci>";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    match command.as_str() {
        "setup" => setup::setup(),
        "build-ebpf" => build_ebpf(),
        "build" => build(),
        "demo" => {
            build()?;
            run(&mut cargo(&[
                "run",
                "--quiet",
                "--ignore-rust-version",
                "--release",
                "--package",
                "scope-tests",
                "--bin",
                "scope-demo",
            ]))
        }
        "test" | "ci" => {
            setup::setup()?;
            build_ebpf()?;
            test(&rest)?;
            // After the tests, so a test failure is reported first. A short run on the
            // committed corpus: it replays every seed and earlier finding, then explores.
            match fuzz::test_seconds()? {
                0 => {
                    eprintln!("xtask test: SCOPE_FUZZ_SECONDS=0, not fuzzing");
                    Ok(())
                }
                seconds => fuzz::fuzz(&fuzz::Options::all(seconds)),
            }
        }
        "fuzz" => fuzz::fuzz(&fuzz::Options::parse(&rest)?),
        "fuzz-seeds" => fuzz::seeds(),
        "bench" => {
            build()?;
            let mut args = vec![
                "run",
                "--quiet",
                "--ignore-rust-version",
                "--release",
                "--package",
                "scope-tests",
                "--bin",
                "scope-bench",
                "--",
            ];
            args.extend(rest.iter().map(String::as_str));
            let out = root().join("BENCHMARKS.md");
            let out = out
                .to_str()
                .context("the workspace path is not UTF-8")?
                .to_owned();
            args.extend(["--out", &out]);
            run(&mut cargo(&args))
        }
        "" | "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown xtask command {other:?}\n{USAGE}"),
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A `cargo` command for the workspace. `--ignore-rust-version` is needed until the
/// toolchain reaches aya 0.16's declared 1.98 (see .cargo/config.toml).
pub fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(root()).args(args);
    command
}

/// Runs a command, failing with its command line if it fails.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Builds `scope-ebpf` for `bpfel-unknown-none` with the bpf-debian toolchain and bpf-linker.
pub fn build_ebpf() -> anyhow::Result<()> {
    // The bpf-debian toolchain is selected with `+bpf-debian`, which only rustup's proxy
    // understands, so call `cargo` through PATH rather than the running cargo binary.
    let mut command = Command::new("cargo");
    command
        .current_dir(root())
        .args([
            "+bpf-debian",
            "build",
            "--ignore-rust-version",
            "--release",
            "--package",
            "scope-ebpf",
            "--target",
            "bpfel-unknown-none",
            "--config",
            "target.bpfel-unknown-none.linker=\"bpf-linker\"",
        ])
        // aya-ebpf uses `asm_experimental_arch`; the prebuilt BPF `core` needs no build-std.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF for the BTF-defined maps; BPF v3 for atomic fetch-and-add. RUSTFLAGS replaces
        // the userspace rustflags of .cargo/config.toml, which are not for this target.
        .env("RUSTFLAGS", "-C link-arg=--btf -C target-cpu=v3")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    run(&mut command)
        .context("building the eBPF object (run `cargo xtask setup` first on a new machine)")?;
    let object = root().join("target/bpfel-unknown-none/release/scope");
    let size = std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0);
    if size == 0 {
        bail!(
            "the eBPF build succeeded but {} is missing or empty",
            object.display()
        );
    }
    check_ebpf_calls(&object)
}

/// Functions the eBPF object must never call. LLVM emits calls to them for innocent-looking
/// Rust (an array copy or zeroing, `%`, an index it cannot prove in bounds), the BPF backend
/// does not expand them, and the loader then refuses the whole program at run time with a
/// message that names no source line ("BTF function info for `memmove` does not match the
/// program", or a verifier log that says "processed 0 insns").
const FORBIDDEN_BPF_CALLS: &[&str] = &["memmove", "memcpy", "memset", "memcmp", "panic"];

/// Fails the build when the object calls one of [`FORBIDDEN_BPF_CALLS`], naming the source
/// line of each call: a build error now instead of a load error in every test.
fn check_ebpf_calls(object: &std::path::Path) -> anyhow::Result<()> {
    let output = Command::new("/usr/lib/llvm-22/bin/llvm-objdump")
        .args(["-d", "-l", "-r", "--no-show-raw-insn"])
        .arg(object)
        .output()
        .context("running llvm-objdump (from llvm-22, which `cargo xtask setup` installs)")?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let mut line = "";
    let mut found = Vec::new();
    for text in listing.lines() {
        if let Some(source) = text.strip_prefix("; ") {
            line = source;
        } else if text.contains("R_BPF_64_32")
            && let Some(name) = text.split_whitespace().last()
            && FORBIDDEN_BPF_CALLS.iter().any(|f| name.contains(f))
        {
            found.push(format!("  {name} at {line}"));
        }
    }
    if !found.is_empty() {
        bail!(
            "the eBPF object calls functions the BPF loader cannot relocate:\n{}\n\
             write the code so LLVM needs none (see scope-ebpf/src/main.rs: volatile reads and \
             writes of arrays, zip instead of indexing, checked_rem instead of %)",
            found.join("\n")
        );
    }
    Ok(())
}

/// Setup, the eBPF object, then the release binaries.
pub fn build() -> anyhow::Result<()> {
    setup::setup()?;
    build_ebpf()?;
    run(&mut cargo(&[
        "build",
        "--ignore-rust-version",
        "--release",
        "--package",
        "scoped",
        "--package",
        "scope-cli",
    ]))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    // The end-to-end tests run the `scoped` and `scope` binaries; `cargo test` alone builds a
    // package's binaries only for that package's own integration tests.
    run(&mut cargo(&[
        "build",
        "--ignore-rust-version",
        "--workspace",
        "--exclude",
        "scope-ebpf",
        "--bins",
    ]))?;
    let mut args = vec![
        "test",
        "--ignore-rust-version",
        "--workspace",
        "--exclude",
        "scope-ebpf",
    ];
    args.extend(extra.iter().map(String::as_str));
    let mut command = cargo(&args);
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        command.env("RUST_BACKTRACE", "1");
    }
    run(&mut command)
}
