//! USDT probes read from real binaries: one compiled here with `<sys/sdt.h>` (registers,
//! memory, constants, RIP-relative data, semaphores), checked against `readelf -n`, and
//! Debian's PostgreSQL (whose specs include `40+CheckpointStats(%rip)`).
#![expect(clippy::unwrap_used, reason = "tests")]

mod common;

use std::{path::Path, process::Command};

use common::{compile_c, run};
use scope_symbolizer::{ArgLocation, Symbolizer};

const SOURCE: &str = r#"#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <stdio.h>
#include <string.h>

/* With _SDT_HAS_SEMAPHORES every probe has one. */
unsigned short demo_request__start_semaphore __attribute__((section(".probes")));
unsigned short demo_constant_semaphore __attribute__((section(".probes")));
unsigned short demo_local_semaphore __attribute__((section(".probes")));
static long counter = 41;

__attribute__((noinline)) long handle(long id, const char *path, int status) {
    long local = id * 3;
    if (demo_request__start_semaphore)
        DTRACE_PROBE3(demo, request__start, id, path, status);
    STAP_PROBE2(demo, constant, 5, counter);
    STAP_PROBE1(demo, local, local);
    return local + (long)strlen(path) + status;
}

int main(int argc, char **argv) {
    (void)argv;
    printf("%ld\n", handle(argc, "/index.html", 200));
    return 0;
}
"#;

/// `readelf -n`'s (provider, name, location, semaphore, arguments) of each stapsdt note.
fn readelf_notes(path: &Path) -> Vec<(String, String, u64, u64, String)> {
    let text = run(Command::new("readelf").arg("-nW").arg(path));
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap();
    let mut notes = Vec::new();
    let mut lines = text.lines().map(str::trim).peekable();
    while let Some(line) = lines.next() {
        // With -W the provider shares the note header's line.
        let Some(provider) = line.split("Provider: ").nth(1) else {
            continue;
        };
        let name = lines.next().unwrap().strip_prefix("Name: ").unwrap();
        let location = lines.next().unwrap();
        // "Location: 0x..., Base: 0x..., Semaphore: 0x..."
        let fields: Vec<&str> = location.split(", ").collect();
        let pc = hex(fields[0].strip_prefix("Location: ").unwrap());
        let semaphore = hex(fields[2].strip_prefix("Semaphore: ").unwrap());
        let args = lines
            .peek()
            .and_then(|l| l.strip_prefix("Arguments: "))
            .map(str::to_owned)
            .unwrap_or_default();
        notes.push((provider.to_owned(), name.to_owned(), pc, semaphore, args));
    }
    notes
}

#[test]
fn probes_of_a_compiled_program_match_readelf() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile_c("gcc", dir.path(), "sdt", "c", SOURCE, &["-O2", "-g"]);
    let module = Symbolizer::new().module(&binary).unwrap();
    let probes = module.usdt_probes();
    let expected = readelf_notes(&binary);
    assert_eq!(probes.len(), 3, "{probes:?}");
    assert_eq!(probes.len(), expected.len());
    for (probe, (provider, name, pc, semaphore, args)) in probes.iter().zip(&expected) {
        assert_eq!(&probe.provider, provider);
        assert_eq!(&probe.name, name);
        assert_eq!(probe.address, *pc, "{name}");
        assert_eq!(probe.semaphore.unwrap_or(0), *semaphore, "{name}");
        assert_eq!(&probe.arg_specs, args);
        assert_eq!(
            probe.args.len(),
            args.split_whitespace().count(),
            "every spec of {name} parses: {args}"
        );
        // The probe's nop lies in the function that fired it.
        let function = module.function_at(probe.address).unwrap();
        assert_eq!(function.name, "handle", "{name}");
        assert!(module.vaddr_to_file_offset(probe.address).is_some());
    }
    let start = &probes[0];
    assert_eq!(start.name, "request__start");
    assert!(start.semaphore.is_some(), "DTRACE_PROBE with a semaphore");
    assert_eq!(start.args.len(), 3);
    assert_eq!(start.args[0].size, 8);
    assert_eq!(start.args[2].size, 4);
    assert!(start.args[2].signed);
    let constant = &probes[1];
    assert!(
        constant
            .args
            .iter()
            .any(|a| a.location == ArgLocation::Constant(5)),
        "{constant:?}"
    );
    assert!(probes.iter().all(|p| p.semaphore.is_some()));
}

#[test]
fn postgres_carries_every_probe_readelf_shows() {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (`cargo xtask setup`)")
        .flatten()
        .map(|e| e.path().join("bin/postgres"))
        .find(|p| p.exists())
        .expect("a postgres binary");
    let module = Symbolizer::new().module(&bin).unwrap();
    let probes = module.usdt_probes();
    let expected = readelf_notes(&bin);
    let ours: Vec<(&str, u64)> = probes
        .iter()
        .map(|p| (p.name.as_str(), p.address))
        .collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|(_, name, pc, _, _)| !ours.contains(&(name.as_str(), *pc)))
        .collect();
    assert!(missing.is_empty(), "not read: {missing:?}");
    // Every note readelf shows: 71 in Debian's PostgreSQL 15 (the issue counts 72; newer
    // versions add probes).
    assert_eq!(probes.len(), expected.len(), "{}", bin.display());
    assert!(probes.len() >= 70, "{}", probes.len());
    assert!(probes.iter().all(|p| p.provider == "postgresql"));
    let start = probes
        .iter()
        .find(|p| p.name == "query__start")
        .expect("query__start");
    assert_eq!(start.args.len(), 1, "the query text pointer: {start:?}");
    assert_eq!(start.args[0].size, 8);
    assert!(start.semaphore.is_some());
    // `-4@40+CheckpointStats(%rip) -4@NBuffers(%rip) ...`: data it exports, so found even
    // in a stripped binary.
    let checkpoint = probes
        .iter()
        .find(|p| p.name == "checkpoint__done")
        .expect("checkpoint__done");
    let names: Vec<&str> = checkpoint.symbols.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"CheckpointStats") && names.contains(&"NBuffers"),
        "{checkpoint:?}"
    );
    assert!(checkpoint.symbols.iter().all(|&(_, address)| address != 0));
    let unparsed: Vec<_> = probes
        .iter()
        .filter(|p| p.args.len() != p.arg_specs.split_whitespace().count())
        .map(|p| (&p.name, &p.arg_specs))
        .collect();
    assert!(unparsed.is_empty(), "{unparsed:?}");
}
