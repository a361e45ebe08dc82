//! Fixture building shared by the integration tests: every binary is compiled in the test
//! itself, into a temporary directory, from source written here.

#![allow(
    dead_code,
    reason = "each test binary includes this module and uses a different subset of it"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `command`, panicking with its output when it fails or cannot start.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}; is the toolchain installed?"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}:\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Writes `source` to `dir/file_name` and returns its path.
pub fn write_source(dir: &Path, file_name: &str, source: &str) -> PathBuf {
    let path = dir.join(file_name);
    std::fs::write(&path, source).expect("write fixture source");
    path
}

/// Compiles C (`gcc`) or C++ (`g++`) `source` into `dir/name` with `flags`. Always links with a
/// build-id unless `flags` say otherwise.
pub fn compile_c(
    compiler: &str,
    dir: &Path,
    name: &str,
    ext: &str,
    source: &str,
    flags: &[&str],
) -> PathBuf {
    let src = write_source(dir, &format!("{name}.{ext}"), source);
    let out = dir.join(name);
    let mut command = Command::new(compiler);
    if !flags.iter().any(|f| f.contains("--build-id")) {
        command.arg("-Wl,--build-id");
    }
    command.args(flags).arg(&src).arg("-o").arg(&out);
    run(&mut command);
    out
}

/// Compiles Rust `source` as crate `crate_name` into `dir/name`.
///
/// `RUSTC_BOOTSTRAP` (which the workspace's `.cargo/config.toml` sets for aya and cargo
/// passes on to tests) makes rustc act as nightly, whose default symbol mangling differs from
/// stable's; it is removed so the fixture is built as a user's stable rustc would build it,
/// unless `flags` ask for unstable options.
pub fn compile_rust(
    dir: &Path,
    name: &str,
    crate_name: &str,
    source: &str,
    flags: &[&str],
) -> PathBuf {
    let src = write_source(dir, &format!("{crate_name}.rs"), source);
    let out = dir.join(name);
    let mut command = Command::new("rustc");
    if flags.contains(&"-Zunstable-options") {
        command.env("RUSTC_BOOTSTRAP", "1");
    } else {
        command.env_remove("RUSTC_BOOTSTRAP");
    }
    run(command
        .args([
            "--edition",
            "2021",
            "--crate-name",
            crate_name,
            "-C",
            "link-arg=-Wl,--build-id",
        ])
        .args(flags)
        .arg(&src)
        .arg("-o")
        .arg(&out));
    out
}

/// 1-based number of the (only) line of `source` containing `marker`.
pub fn line_of(source: &str, marker: &str) -> u32 {
    let mut lines = source
        .lines()
        .enumerate()
        .filter(|(_, line)| line.contains(marker))
        .map(|(index, _)| index + 1);
    let line = lines
        .next()
        .unwrap_or_else(|| panic!("no line contains {marker:?}"));
    assert!(
        lines.next().is_none(),
        "{marker:?} is on more than one line"
    );
    u32::try_from(line).expect("small line number")
}

/// A C program with a function at a known line, built at `-O0`.
pub const C_O0: &str = r#"#include <stdio.h>

int compute(int x) { /* compute-def */
    int y = x * 3; /* compute-body */
    return y + 1;
}

int main(int argc, char **argv)
{
    (void)argv;
    printf("%d\n", compute(argc));
    return 0;
}
"#;

/// A C program with an always-inline function called from another function, built at `-O2`.
pub const C_INLINE: &str = r#"#include <stdio.h>

static inline __attribute__((always_inline)) int mix(int x)
{
    int acc = x;
    for (volatile int i = 0; i < x; i++)
        acc = acc * 31 + i;
    return acc;
}

__attribute__((noinline)) int caller(int x)
{
    int r = mix(x); /* mix-call */
    return r ^ 0x5a;
}

int main(int argc, char **argv)
{
    (void)argv;
    printf("%d\n", caller(argc));
    return 0;
}
"#;

/// A C++ program with a method in a namespace.
pub const CPP: &str = r#"#include <cstdio>

namespace ns {
struct Foo {
    int k;
    __attribute__((noinline)) int bar(int x);
};

int Foo::bar(int x) { /* bar-def */
    return x * k + 1;
}
}

int main(int argc, char **)
{
    ns::Foo foo{argc};
    std::printf("%d\n", foo.bar(argc));
    return 0;
}
"#;

/// A Rust program with an `#[inline(always)]` function called from an `#[inline(never)]` one.
pub const RUST: &str = r#"#[inline(always)]
fn mix(x: u64) -> u64 {
    (x ^ (x >> 7)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[inline(never)]
fn fib(n: u64) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        let next = a.wrapping_add(b);
        a = b;
        b = mix(next); // mix-call
    }
    a
}

fn main() {
    let n = std::env::args().count() as u64 + 40;
    println!("{}", fib(std::hint::black_box(n)));
}
"#;
