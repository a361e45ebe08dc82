//! A compressed debug section that lies about its uncompressed size must not cost the size it
//! claims. Its own test binary, because it measures the process's peak memory (`VmHWM`).
//!
//! Found by the `elf` fuzz target (`fuzz/`): its runs peaked at 1 GiB of memory. The
//! decompressors `object` calls (flate2 with miniz_oxide, ruzstd) zero-fill the whole output
//! buffer, sized by the section's `ch_size`, before decompressing; a few bytes of zlib
//! claiming 1 GiB (the cap, `MAX_DECOMPRESSED_SECTION_BYTES`) cost 1 GiB of zeroed memory per
//! section, for every module such a file was opened as.

mod common;

use std::path::Path;

use common::{C_INLINE, compile_c};
use object::{Object, ObjectSection};
use scope_symbolizer::{MAX_DECOMPRESSED_SECTION_BYTES, Symbolizer};

/// Peak resident memory of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// The file range of section `name` in `bytes`.
fn section_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
    let file = object::File::parse(bytes).expect("fixture parses");
    let (offset, size) = file
        .section_by_name(name)
        .and_then(|section| section.file_range())
        .unwrap_or_else(|| panic!("fixture has {name}"));
    offset as usize..(offset + size) as usize
}

#[test]
fn lying_uncompressed_sizes_cost_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = compile_c(
        "gcc",
        dir.path(),
        "inl",
        "c",
        C_INLINE,
        &["-g", "-O2", "-gz=zlib"],
    );
    let mut bytes = std::fs::read(&binary).expect("read fixture");
    // Every compressed DWARF section claims the most the symbolizer accepts (Elf64_Chdr:
    // ch_type at +0, ch_size at +8).
    for name in [".debug_info", ".debug_abbrev", ".debug_line", ".debug_str"] {
        let range = section_range(&bytes, name);
        assert_eq!(
            &bytes[range.start..range.start + 4],
            &1u32.to_le_bytes(),
            "{name} is ELFCOMPRESS_ZLIB"
        );
        bytes[range.start + 8..range.start + 16]
            .copy_from_slice(&MAX_DECOMPRESSED_SECTION_BYTES.to_le_bytes());
    }
    let path = dir.path().join("liar");
    std::fs::write(&path, &bytes).expect("write fixture");

    let before = peak_rss_kib();
    let module = Symbolizer::new()
        .module(Path::new(&path))
        .expect("headers are intact");
    assert!(module.has_dwarf());
    let caller = module.functions_named("caller")[0].clone();
    // Loads the DWARF (and finds it unusable): the symbol table still names the function.
    let frames = module.frames(caller.address);
    assert_eq!(
        frames.last().map(|f| f.function.as_str()),
        Some("caller"),
        "{frames:?}"
    );
    assert!(module.inline_sites().is_empty());
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "opening a 20 KB file raised peak memory by {grown_mib} MiB"
    );
}
