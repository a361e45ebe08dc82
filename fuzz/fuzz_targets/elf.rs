#![no_main]
//! Arbitrary bytes as an ELF file, opened by the symbolizer the way scoped opens any binary a
//! traced process maps (open, mmap, parse headers and symbol tables), then asked everything
//! the daemon asks of it: functions, lookups by address and name, vaddr/offset translation,
//! frames from DWARF (lines, inlined calls), source locations, inlined call sites. Most
//! mutations of the seeds break the ELF structure itself: section and program headers,
//! symbol and string tables, notes (build-id), compressed sections.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The last eight bytes double as one more address to look up.
    let address = data
        .last_chunk::<8>()
        .map(|bytes| u64::from_le_bytes(*bytes));
    scope_fuzz::symbolize(data, address.as_slice());
});
