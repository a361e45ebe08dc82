//! Hostile input: whatever bytes a file holds, the symbolizer answers with an error or with
//! less information, never a panic, a hang or an unbounded allocation.
//!
//! `Module` contains panics of the DWARF libraries it calls (so the daemon survives an
//! upstream bug), which would hide them from a plain test; a panic hook counts every panic in
//! this test binary, contained or not, and each test asserts the count stayed zero.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{C_INLINE, compile_c, run};
use object::{Object, ObjectSection};
use scope_symbolizer::{Module, SymbolizeError, Symbolizer};

static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn assert_no_panics() {
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "a panic happened (see the output above)"
    );
}

/// Deterministic xorshift64 so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn fill(&mut self, bytes: &mut [u8]) {
        for byte in bytes {
            *byte = self.next() as u8;
        }
    }
}

/// Calls every query of a module built from `path`.
fn exercise(path: &Path) -> Result<(), SymbolizeError> {
    let module = Symbolizer::new().module(path)?;
    exercise_module(&module);
    Ok(())
}

fn exercise_module(module: &Module) {
    let _ = (module.path(), module.build_id(), module.is_pie_or_shared());
    let _ = (module.has_dwarf(), module.debug_file());
    let mut addresses: Vec<u64> = vec![0, 1, 0x1000, u64::MAX, u64::MAX - 1, i64::MAX as u64];
    for function in module.functions().iter().take(64) {
        addresses.extend([
            function.address,
            function.address.wrapping_add(function.size / 2),
        ]);
        let _ = module.function_at(function.address.wrapping_add(1));
        let _ = function.is_named("main");
    }
    for site in module.inline_sites().iter().take(64) {
        addresses.push(site.address);
    }
    for &vaddr in &addresses {
        let _ = module.frames(vaddr);
        let _ = module.location(vaddr);
        let _ = module.function_at(vaddr);
        if let Some(offset) = module.vaddr_to_file_offset(vaddr) {
            let _ = module.file_offset_to_vaddr(offset);
        }
        let _ = module.file_offset_to_vaddr(vaddr);
    }
    let _ = module.functions_named("caller");
}

fn fixture(dir: &Path, flags: &[&str]) -> PathBuf {
    compile_c("gcc", dir, "inl", "c", C_INLINE, flags)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write fixture");
    path
}

#[test]
fn non_elf_empty_missing_and_special_files_are_errors() {
    count_panics();
    let dir = tempfile::tempdir().expect("tempdir");

    let script = write(dir.path(), "script", b"#!/bin/sh\necho hello\n");
    let err = exercise(&script).expect_err("a shell script is not ELF");
    assert!(matches!(err, SymbolizeError::NotElf { .. }), "{err:?}");
    assert!(err.to_string().contains("not an ELF file"), "{err}");

    let empty = write(dir.path(), "empty", b"");
    let err = exercise(&empty).expect_err("empty");
    assert!(matches!(err, SymbolizeError::Empty { .. }), "{err:?}");

    let magic_only = write(dir.path(), "magic", b"\x7fELF");
    let err = exercise(&magic_only).expect_err("just the magic");
    assert!(matches!(err, SymbolizeError::Parse { .. }), "{err:?}");
    assert!(err.to_string().contains("truncated or corrupt"), "{err}");

    let err = exercise(&dir.path().join("missing")).expect_err("missing");
    assert!(matches!(err, SymbolizeError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");

    let err = exercise(dir.path()).expect_err("a directory");
    assert!(matches!(err, SymbolizeError::NotAFile { .. }), "{err:?}");
    let err = exercise(Path::new("/dev/null")).expect_err("a device");
    assert!(matches!(err, SymbolizeError::NotAFile { .. }), "{err:?}");

    // Opening a FIFO would block until a writer came; it must be refused instead.
    let fifo = dir.path().join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    let err = exercise(&fifo).expect_err("a FIFO");
    assert!(matches!(err, SymbolizeError::NotAFile { .. }), "{err:?}");
    assert_no_panics();
}

#[test]
fn truncated_elf_files() {
    count_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = fixture(dir.path(), &["-g", "-O2"]);
    let bytes = std::fs::read(&binary).expect("read fixture");
    let mut lengths = vec![5, 16, 52, 63, 64, 65, 100, 200, 1000, 4096];
    lengths.extend([
        bytes.len() / 4,
        bytes.len() / 2,
        bytes.len() * 3 / 4,
        bytes.len() - 1,
    ]);
    let mut parsed = 0;
    for len in lengths {
        let path = write(dir.path(), &format!("truncated{len}"), &bytes[..len]);
        if exercise(&path).is_ok() {
            parsed += 1;
        }
    }
    // Cutting off the section headers (at the end of the file) leaves only program headers
    // and dynamic symbols... or nothing; either way no panic. The header-only cuts must fail.
    assert!(parsed < 14);
    assert_no_panics();
}

/// The file range of section `name` in `bytes`.
fn section_range(bytes: &[u8], name: &str) -> Option<std::ops::Range<usize>> {
    let file = object::File::parse(bytes).expect("fixture parses");
    let (offset, size) = file.section_by_name(name)?.file_range()?;
    Some(offset as usize..(offset + size) as usize)
}

#[test]
fn garbage_debug_info_gives_symbol_table_answers() {
    count_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = fixture(dir.path(), &["-g", "-O2"]);
    let mut bytes = std::fs::read(&binary).expect("read fixture");
    let range = section_range(&bytes, ".debug_info").expect("has .debug_info");
    Rng(0x5eed).fill(&mut bytes[range]);
    let path = write(dir.path(), "garbage_info", &bytes);

    let module = Symbolizer::new().module(&path).expect("headers are intact");
    assert!(module.has_dwarf());
    exercise_module(&module);
    // The symbol table still names the function.
    let caller = module.functions_named("caller")[0].clone();
    let frames = module.frames(caller.address + 1);
    assert_eq!(
        frames.last().map(|f| f.function.as_str()),
        Some("caller"),
        "{frames:?}"
    );
    assert_no_panics();
}

#[test]
fn garbage_in_each_section() {
    count_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = fixture(dir.path(), &["-g", "-O2"]);
    let bytes = std::fs::read(&binary).expect("read fixture");
    let names: Vec<String> = {
        let file = object::File::parse(&*bytes).expect("fixture parses");
        file.sections()
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .filter(|n| !n.is_empty())
            .collect()
    };
    assert!(names.iter().any(|n| n == ".debug_line"));
    let mut rng = Rng(42);
    for name in &names {
        let Some(range) = section_range(&bytes, name) else {
            continue;
        };
        for variant in 0..3 {
            let mut corrupt = bytes.clone();
            match variant {
                // All garbage.
                0 => rng.fill(&mut corrupt[range.clone()]),
                // All 0xff: maximal lengths, offsets and counts.
                1 => corrupt[range.clone()].fill(0xff),
                // A few flipped bytes: mostly valid structure with one bad field.
                _ => {
                    for _ in 0..4 {
                        if !range.is_empty() {
                            let at = range.start + rng.below(range.len());
                            corrupt[at] ^= rng.next() as u8 | 1;
                        }
                    }
                }
            }
            let path = write(dir.path(), "corrupt", &corrupt);
            let _ = exercise(&path);
        }
    }
    assert_no_panics();
}

#[test]
fn random_mutations() {
    count_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = fixture(dir.path(), &["-g", "-O2"]);
    let bytes = std::fs::read(&binary).expect("read fixture");
    let mut rng = Rng(0xdead_beef);
    for round in 0..300 {
        let mut corrupt = bytes.clone();
        let flips = 1 + rng.below(16);
        for _ in 0..flips {
            // Half the time aim at the headers, where one byte changes the most.
            let at = if round % 2 == 0 {
                rng.below(512)
            } else {
                rng.below(corrupt.len())
            };
            corrupt[at] = rng.next() as u8;
        }
        let path = write(dir.path(), "mutant", &corrupt);
        let _ = exercise(&path);
    }
    assert_no_panics();
}

#[test]
fn bogus_header_fields() {
    count_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = fixture(dir.path(), &["-g", "-O2"]);
    let bytes = std::fs::read(&binary).expect("read fixture");
    // ELF64 header offsets: e_phoff 0x20 (8), e_shoff 0x28 (8), e_phnum 0x38 (2),
    // e_shnum 0x3c (2), e_shstrndx 0x3e (2).
    let patches: [(usize, &[u8]); 8] = [
        (0x20, &[0xff; 8]),
        (0x28, &[0xff; 8]),
        (0x28, &[0; 8]),
        (0x38, &[0xff, 0xff]),
        (0x3c, &[0xff, 0xff]),
        (0x3e, &[0xfe, 0xff]),
        (0x04, &[1]), // ELFCLASS32 on a 64-bit file
        (0x05, &[2]), // big-endian
    ];
    for (index, (offset, patch)) in patches.iter().enumerate() {
        let mut corrupt = bytes.clone();
        corrupt[*offset..*offset + patch.len()].copy_from_slice(patch);
        let path = write(dir.path(), &format!("header{index}"), &corrupt);
        let _ = exercise(&path);
    }
    assert_no_panics();
}

#[test]
fn compressed_debug_sections_and_lying_sizes() {
    count_panics();
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = fixture(dir.path(), &["-g", "-O2", "-gz=zlib"]);
    let module = Symbolizer::new().module(&binary).expect("module");
    assert!(module.has_dwarf());
    let site = module
        .inline_sites()
        .iter()
        .find(|s| s.name == "mix")
        .expect("inline site read from compressed DWARF")
        .clone();
    assert_eq!(site.inlined_into, "caller");
    assert!(module.frames(site.address).iter().all(|f| f.line.is_some()));

    // Claim a 4 EiB uncompressed size (Elf64_Chdr.ch_size is at +8): must not try to
    // allocate it, just lose the section.
    let mut bytes = std::fs::read(&binary).expect("read fixture");
    let range = section_range(&bytes, ".debug_info").expect("has .debug_info");
    assert_eq!(
        &bytes[range.start..range.start + 4],
        &1u32.to_le_bytes(),
        "ELFCOMPRESS_ZLIB"
    );
    bytes[range.start + 8..range.start + 16].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let path = write(dir.path(), "liar", &bytes);
    let module = Symbolizer::new().module(&path).expect("headers are intact");
    exercise_module(&module);
    assert!(module.inline_sites().is_empty());
    let caller = module.functions_named("caller")[0].clone();
    assert_eq!(
        module
            .frames(caller.address)
            .last()
            .map(|f| f.function.as_str()),
        Some("caller")
    );
    assert_no_panics();
}
