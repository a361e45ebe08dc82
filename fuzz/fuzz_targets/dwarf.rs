#![no_main]
//! DWARF sections chosen by the fuzzer, spliced into a real ELF file built with `gcc -g -O1`
//! (`fuzz/seeds/demo.c`), then symbolized as in the `elf` target. The ELF structure, code and
//! symbols stay valid, so inputs get past the ELF parser and into gimli and addr2line:
//! units, abbreviations, attributes, line programs, ranges, string offsets, inlined
//! subroutines and the name lookups that follow `DW_AT_abstract_origin`.
//!
//! Input format: see `scope_fuzz::parse_replacements`. The first byte picks the base file
//! (DWARF 5 or DWARF 4); the seeds are the bases' own sections.

use libfuzzer_sys::fuzz_target;
use scope_fuzz::{parse_replacements, splice_sections, symbolize};

/// The files DWARF is spliced into (`cargo xtask fuzz-seeds` builds them).
static BASES: [&[u8]; 2] = [
    include_bytes!("../seeds/dwarf5.elf"),
    include_bytes!("../seeds/dwarf4.elf"),
];

fuzz_target!(|data: &[u8]| {
    let Some((base, replacements)) = parse_replacements(data) else {
        return;
    };
    let base = BASES[usize::from(base) % BASES.len()];
    let elf = splice_sections(base, &replacements).expect("the base ELF files are well-formed");
    symbolize(&elf, &[]);
});
