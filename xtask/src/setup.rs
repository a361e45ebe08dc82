//! `cargo xtask setup`: installs what a fresh machine lacks, and nothing it already has.

use std::{path::Path, process::Command};

use anyhow::{Context, bail};

use crate::run;

/// Debian packages, and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "Debian's rustc, whose prebuilt BPF core builds the eBPF crate",
    ),
    ("libstd-rust-web-dev-bpf", "core for bpfel-unknown-none"),
    ("llvm-22-dev", "bpf-linker links with LLVM 22"),
    ("libpolly-22-dev", "bpf-linker links with LLVM 22"),
    ("libzstd-dev", "bpf-linker"),
    ("zlib1g-dev", "bpf-linker"),
    (
        "gcc",
        "the tests build C fixtures, `xtask fuzz-seeds` the ELF seeds",
    ),
    (
        "g++",
        "the tests build C++ fixtures; libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets",
    ),
    (
        "binutils",
        "strip/objcopy for debug-link fixtures and the fuzz seeds",
    ),
    (
        "systemtap-sdt-dev",
        "<sys/sdt.h>: the tests build programs with USDT probes",
    ),
    (
        "python3",
        "Debian's interpreter, built with its USDT probes (the python test runs it)",
    ),
    ("redis-server", "a real program to trace"),
    ("redis-tools", "redis-benchmark drives it"),
    (
        "postgresql",
        "a real multi-process server to trace; pgbench drives it",
    ),
    (
        "nginx",
        "a real server for `scope analyze` (the tests never start it)",
    ),
    ("bpftrace", "benchmark peer"),
    ("linux-perf", "benchmark peer (perf probe)"),
    ("bpftool", "tests check which BPF programs and links exist"),
    ("golang-go", "the Go tests build a Go program to trace"),
    ("procps", "ps, pgrep in tests"),
    ("iproute2", "netns pairs stand in for two hosts"),
    ("sqlite3", "the tests open the span store as users do"),
    (
        "openssl",
        "the access tests make a CA and certificates for the TLS listener",
    ),
    ("passwd", "the access tests create users (useradd, userdel)"),
    (
        "util-linux",
        "the access tests run the CLI as those users (setpriv)",
    ),
];

/// The group whose members may use scoped's socket (`scoped` gives the socket to it).
const SOCKET_GROUP: &str = "scope";

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> anyhow::Result<()> {
    install_packages()?;
    link_bpf_toolchain()?;
    install_bpf_linker()?;
    install_cargo_fuzz()?;
    python_venv()?;
    probed_python()?;
    socket_group()?;
    mount_if_missing(
        "tracefs",
        "/sys/kernel/tracing",
        "/sys/kernel/tracing/events",
    )?;
    mount_if_missing("bpf", "/sys/fs/bpf", "/sys/fs/bpf/.")?;
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("install ok installed")
        })
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "these Debian packages are missing and installing them needs root: {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask setup: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn link_bpf_toolchain() -> anyhow::Result<()> {
    let list = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&list.stdout)
        .lines()
        .any(|l| l.starts_with("bpf-debian"))
    {
        return Ok(());
    }
    eprintln!("xtask setup: linking Debian's rustc as the bpf-debian toolchain");
    run(Command::new("rustup").args(["toolchain", "link", "bpf-debian", "/usr"]))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if version.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("xtask setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    // Run outside the workspace so its .cargo/config.toml does not apply, and with the
    // machine's stable toolchain.
    run(Command::new("cargo")
        .current_dir("/")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // Without LLVM_PREFIX bpf-linker's build looks for LLVM under /usr/lib64.
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env_remove("RUSTC_BOOTSTRAP")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN"))
}

/// The cargo-fuzz `cargo xtask fuzz` was written against (its options and the artifact
/// directory it reports).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz for `cargo xtask fuzz` (and `cargo xtask test`, which fuzzes after the
/// tests) unless that version is installed.
pub fn install_cargo_fuzz() -> anyhow::Result<()> {
    let version = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output();
    if version.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    eprintln!("xtask setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about half a minute)");
    // Outside the workspace, with the machine's stable toolchain, as for bpf-linker.
    run(Command::new("cargo")
        .current_dir("/")
        .args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ])
        .env_remove("RUSTC_BOOTSTRAP")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN"))
    .context("installing cargo-fuzz from crates.io")
}

/// Python packages the tests use as independent peers (an OTLP receiver written with the
/// official OpenTelemetry protos and grpcio), in a venv of the project's own.
const PYTHON_PACKAGES: &[&str] = &["opentelemetry-proto", "grpcio"];

/// Where the test venv lives; the tests look for `bin/python3` under it.
pub fn venv() -> std::path::PathBuf {
    crate::root().join("target/pyenv")
}

fn python_venv() -> anyhow::Result<()> {
    let python = venv().join("bin/python3");
    let ready = Command::new(&python)
        .args([
            "-c",
            "import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc",
        ])
        .output()
        .is_ok_and(|out| out.status.success());
    if ready {
        return Ok(());
    }
    eprintln!(
        "xtask setup: creating the test venv {} ({})",
        venv().display(),
        PYTHON_PACKAGES.join(", ")
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(venv()))?;
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(PYTHON_PACKAGES))
}

/// A CPython that fires its `function__entry` USDT probe, for `tests/tests/python.rs`:
/// Debian 12's 3.11 carries the probe but never fires it (python/cpython#98894); Debian 11's
/// 3.9 does. Its two packages are fetched from bullseye and unpacked, not installed, under
/// `target/python3.9` (the system's python3 is untouched); the test runs
/// `usr/bin/python3.9` with `PYTHONHOME` there.
const PROBED_PYTHON_PACKAGES: &[&str] = &["python3.9-minimal", "libpython3.9-minimal"];

fn probed_python() -> anyhow::Result<()> {
    let dir = crate::root().join("target/python3.9");
    if dir.join("usr/bin/python3.9").exists() {
        return Ok(());
    }
    eprintln!(
        "xtask setup: unpacking Debian 11's CPython 3.9 (it fires its USDT function probes) into {}",
        dir.display()
    );
    let work = crate::root().join("target/python3.9-download");
    std::fs::create_dir_all(work.join("lists/partial"))?;
    std::fs::create_dir_all(work.join("cache/archives/partial"))?;
    let sources = work.join("bullseye.sources");
    std::fs::write(
        &sources,
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bullseye\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )?;
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command
            .current_dir(&work)
            .arg("-q")
            .arg(format!("-oDir::Etc::SourceList={}", sources.display()))
            .arg("-oDir::Etc::SourceParts=/dev/null")
            // Downloads into the project's target directory, which apt's sandbox user cannot write.
            .arg("-oAPT::Sandbox::User=root")
            .arg(format!(
                "-oDir::State::Lists={}",
                work.join("lists").display()
            ))
            .arg(format!("-oDir::Cache={}", work.join("cache").display()))
            .args(args);
        command
    };
    run(&mut apt(&["update"])).context("fetching Debian 11's package lists")?;
    run(apt(&["download"]).args(PROBED_PYTHON_PACKAGES))
        .context("downloading Debian 11's CPython 3.9")?;
    let unpacked = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&unpacked);
    for entry in std::fs::read_dir(&work)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&path).arg(&unpacked))?;
        }
    }
    std::fs::rename(&unpacked, &dir)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Creates the system group `scope`: scoped opens its socket to it, and its members trace as
/// themselves (see README, "Access control").
fn socket_group() -> anyhow::Result<()> {
    let exists = Command::new("getent")
        .args(["group", SOCKET_GROUP])
        .output()
        .is_ok_and(|out| out.status.success());
    if exists {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "xtask setup: there is no group {SOCKET_GROUP}; as root: groupadd --system {SOCKET_GROUP}"
        );
        return Ok(());
    }
    eprintln!("xtask setup: creating the system group {SOCKET_GROUP}");
    run(Command::new("groupadd").args(["--system", SOCKET_GROUP]))
}

fn mount_if_missing(fstype: &str, target: &str, probe: &str) -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(target))
    });
    if mounted || (fstype == "tracefs" && Path::new(probe).exists()) {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "xtask setup: {fstype} is not mounted at {target}; scoped (as root) will need it"
        );
        return Ok(());
    }
    eprintln!("xtask setup: mounting {fstype} at {target}");
    run(Command::new("mount").args(["-t", fstype, fstype, target]))
}
