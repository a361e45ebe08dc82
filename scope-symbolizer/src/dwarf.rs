//! DWARF: loading sections zero-copy from the mapped file, and the one full walk of the
//! debug info that finds inlined call sites.
//!
//! Split DWARF (`.dwo`/`.dwp`) is not loaded: `addr2line` lookups skip the split units, so
//! such binaries get function names and lines only where the skeleton units have them.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;

use gimli::{AttributeValue, DebugInfoOffset, Reader as _, UnitOffset};
use memmap2::Mmap;
use object::{CompressionFormat, Object, ObjectSection};

use crate::demangle::demangle;
use crate::elf::Function;

/// Largest section this crate will decompress. A compressed section records its own
/// uncompressed size, which a hostile file can set to anything; real debug sections stay far
/// below this.
pub const MAX_DECOMPRESSED_SECTION_BYTES: u64 = 1 << 30;

/// Most bytes one byte of DEFLATE (zlib) data can decompress to: a 258-byte match costs at
/// least two bits, so 1032:1.
const MAX_ZLIB_RATIO: u64 = 1032;
/// Most bytes one byte of zstd data can decompress to: an RLE block is a 3-byte header and one
/// byte for up to 128 KiB, so 32768:1.
const MAX_ZSTD_RATIO: u64 = 32 * 1024;

/// How many `DW_AT_abstract_origin`/`DW_AT_specification` hops a name lookup follows; real
/// chains are two or three long, a cycle in a corrupt file would otherwise never end.
const MAX_NAME_INDIRECTIONS: usize = 16;

/// The bytes of one DWARF section: a window into the mapped file, or a decompressed copy.
#[derive(Debug, Clone)]
pub(crate) enum SectionBytes {
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Arc<[u8]>),
}

impl Deref for SectionBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            SectionBytes::Mapped { map, start, len } => start
                .checked_add(*len)
                .and_then(|end| map.get(*start..end))
                .unwrap_or(&[]),
            SectionBytes::Owned(bytes) => bytes,
        }
    }
}

// SAFETY: both variants deref into heap or mmap memory owned through an `Arc`; moving or
// cloning a `SectionBytes` moves the `Arc`, never the bytes, and the bytes are never mutated.
// This is the pattern gimli documents for `EndianReader` over an mmap.
unsafe impl gimli::StableDeref for SectionBytes {}
// SAFETY: as above; a clone shares the same `Arc`, so it derefs to the same address.
unsafe impl gimli::CloneStableDeref for SectionBytes {}

/// The gimli reader used everywhere in this crate: `Send + Sync`, owns what it reads.
pub(crate) type Reader = gimli::EndianReader<gimli::RunTimeEndian, SectionBytes>;

/// Loads the DWARF sections of `file` (mapped as `map`). Missing, unreadable or oversized
/// sections load as empty: lookups then find nothing rather than fail.
pub(crate) fn load_dwarf(
    file: &object::File<'_>,
    map: &Arc<Mmap>,
    sup: Option<(&object::File<'_>, &Arc<Mmap>)>,
) -> gimli::Dwarf<Reader> {
    let endian = if file.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    };
    let reader = |file: &object::File<'_>, map: &Arc<Mmap>, id: gimli::SectionId| {
        Ok::<_, std::convert::Infallible>(gimli::EndianReader::new(
            section_bytes(file, map, id.name()),
            endian,
        ))
    };
    let Ok(mut dwarf) = gimli::Dwarf::load(|id| reader(file, map, id));
    if let Some((sup_file, sup_map)) = sup {
        let Ok(()) = dwarf.load_sup(|id| reader(sup_file, sup_map, id));
    }
    dwarf
}

fn empty_section() -> SectionBytes {
    SectionBytes::Owned(Arc::from(&[][..]))
}

fn section_bytes(file: &object::File<'_>, map: &Arc<Mmap>, name: &str) -> SectionBytes {
    let Some(section) = file.section_by_name(name) else {
        return empty_section();
    };
    let Ok(compressed) = section.compressed_data() else {
        return empty_section();
    };
    if compressed.format == CompressionFormat::None {
        // Borrowed from the map: find where, without trusting anything but the pointers.
        let data = compressed.data;
        let base = map.as_ptr() as usize;
        let start = (data.as_ptr() as usize).wrapping_sub(base);
        let in_map = start
            .checked_add(data.len())
            .is_some_and(|end| end <= map.len());
        return if in_map && !data.is_empty() {
            SectionBytes::Mapped {
                map: Arc::clone(map),
                start,
                len: data.len(),
            }
        } else {
            empty_section()
        };
    }
    if compressed.uncompressed_size > MAX_DECOMPRESSED_SECTION_BYTES
        || !plausible_size(
            compressed.format,
            compressed.data.len(),
            compressed.uncompressed_size,
        )
    {
        return empty_section();
    }
    match compressed.decompress() {
        Ok(bytes) => SectionBytes::Owned(Arc::from(bytes.into_owned())),
        Err(_) => empty_section(),
    }
}

/// Whether `compressed_len` bytes of `format` can decompress to `claimed` bytes at all.
///
/// Checked before decompressing because the decompressors `object` calls (flate2 with
/// miniz_oxide, ruzstd) zero-fill an output buffer of the claimed size first: a section of a
/// few bytes claiming 1 GiB would cost 1 GiB of memory and the time to clear it, for nothing.
/// The bounds are the formats' own, so no genuine section is refused.
fn plausible_size(format: CompressionFormat, compressed_len: usize, claimed: u64) -> bool {
    let ratio = match format {
        CompressionFormat::Zlib => MAX_ZLIB_RATIO,
        CompressionFormat::Zstandard => MAX_ZSTD_RATIO,
        // Nothing else decompresses anyway.
        _ => return false,
    };
    claimed <= (compressed_len as u64).saturating_mul(ratio)
}

/// Whether `file` has a non-empty `.debug_info`.
pub(crate) fn has_debug_info(file: &object::File<'_>) -> bool {
    // `file_range` is `None` for `SHT_NOBITS`, which is what `.debug_info` becomes in a
    // binary whose debug info was moved out with `objcopy --only-keep-debug`.
    file.section_by_name(".debug_info")
        .and_then(|section| section.file_range())
        .is_some_and(|(_, size)| size > 0)
}

/// A call site of an inlined function, found in DWARF (`DW_TAG_inlined_subroutine`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineSite {
    /// Demangled base name of the inlined function.
    pub name: String,
    /// Entry vaddr of this inlined instance: `DW_AT_entry_pc`, else `DW_AT_low_pc`, else the
    /// lowest range start.
    pub address: u64,
    /// Demangled base name of the out-of-line function the instance was inlined into.
    pub inlined_into: String,
    /// Source file of the call (`DW_AT_call_file`).
    pub call_file: Option<String>,
    /// Source line of the call (`DW_AT_call_line`).
    pub call_line: Option<u32>,
}

/// All parsed units of one `Dwarf`, sorted by offset, for resolving cross-unit references.
struct Units {
    units: Vec<(DebugInfoOffset<usize>, gimli::Unit<Reader>)>,
}

impl Units {
    fn parse(dwarf: &gimli::Dwarf<Reader>) -> Self {
        let mut units = Vec::new();
        let mut headers = dwarf.units();
        // A header that fails to parse ends the walk: without its length the next unit's
        // start is unknown.
        while let Ok(Some(header)) = headers.next() {
            let Some(offset) = header.debug_info_offset() else {
                continue;
            };
            if let Ok(unit) = dwarf.unit(header) {
                units.push((offset, unit));
            }
        }
        Units { units }
    }

    /// The unit containing `offset`, and the offset within it.
    fn find(
        &self,
        offset: DebugInfoOffset<usize>,
    ) -> Option<(&gimli::Unit<Reader>, UnitOffset<usize>)> {
        let index = self
            .units
            .partition_point(|(start, _)| start.0 <= offset.0)
            .checked_sub(1)?;
        let (_, unit) = self.units.get(index)?;
        let unit_offset = offset.to_unit_offset(&unit.header)?;
        Some((unit, unit_offset))
    }
}

/// Everything a name lookup needs: the main DWARF and its units, and the supplementary ones.
struct Resolver<'a> {
    dwarf: &'a gimli::Dwarf<Reader>,
    units: &'a Units,
    sup_units: Option<&'a Units>,
}

impl Resolver<'_> {
    /// The linkage name (preferred: it is qualified) or name of the DIE at `offset`,
    /// following `DW_AT_abstract_origin` and `DW_AT_specification`.
    fn name_at(
        &self,
        dwarf: &gimli::Dwarf<Reader>,
        unit: &gimli::Unit<Reader>,
        offset: UnitOffset<usize>,
        hops_left: usize,
    ) -> Option<String> {
        let entry = unit.entry(offset).ok()?;
        self.name_of(dwarf, unit, &entry, hops_left)
    }

    fn name_of(
        &self,
        dwarf: &gimli::Dwarf<Reader>,
        unit: &gimli::Unit<Reader>,
        entry: &gimli::DebuggingInformationEntry<Reader>,
        hops_left: usize,
    ) -> Option<String> {
        let string = |value| {
            dwarf
                .attr_string(unit, value)
                .ok()
                .and_then(|s| s.to_string_lossy().ok().map(|s| s.into_owned()))
        };
        for attr in [gimli::DW_AT_linkage_name, gimli::DW_AT_MIPS_linkage_name] {
            if let Some(name) = entry.attr_value(attr).and_then(string) {
                return Some(name);
            }
        }
        if let Some(name) = entry.attr_value(gimli::DW_AT_name).and_then(string) {
            return Some(name);
        }
        let hops_left = hops_left.checked_sub(1)?;
        let next = entry
            .attr_value(gimli::DW_AT_abstract_origin)
            .or_else(|| entry.attr_value(gimli::DW_AT_specification))?;
        match next {
            AttributeValue::UnitRef(offset) => self.name_at(dwarf, unit, offset, hops_left),
            AttributeValue::DebugInfoRef(offset) => {
                let units = if std::ptr::eq(dwarf, self.dwarf) {
                    self.units
                } else {
                    self.sup_units?
                };
                let (unit, offset) = units.find(offset)?;
                self.name_at(dwarf, unit, offset, hops_left)
            }
            AttributeValue::DebugInfoRefSup(offset) => {
                let sup = self.dwarf.sup()?;
                let (unit, offset) = self.sup_units?.find(offset)?;
                self.name_at(sup, unit, offset, hops_left)
            }
            _ => None,
        }
    }
}

/// Walks every unit of `dwarf` and returns all inlined call sites, sorted by address.
///
/// `function_at` looks an address up in the symbol table: the containing function is named as
/// `functions()` names it when DWARF names one of its symbols, and from the symbol table when
/// DWARF has no name. A unit that fails to parse part-way contributes the sites read before
/// the failure.
pub(crate) fn inline_sites<'f>(
    dwarf: &gimli::Dwarf<Reader>,
    function_at: impl Fn(u64) -> Option<&'f Function>,
) -> Vec<InlineSite> {
    let units = Units::parse(dwarf);
    let sup_units = dwarf.sup().map(Units::parse);
    let resolver = Resolver {
        dwarf,
        units: &units,
        sup_units: sup_units.as_ref(),
    };

    let mut sites = Vec::new();
    for (_, unit) in &units.units {
        walk_unit(&resolver, unit, &function_at, &mut sites);
    }
    sites.sort_by(|a, b| a.address.cmp(&b.address).then_with(|| a.name.cmp(&b.name)));
    sites
}

fn walk_unit<'f>(
    resolver: &Resolver<'_>,
    unit: &gimli::Unit<Reader>,
    function_at: &impl Fn(u64) -> Option<&'f Function>,
    sites: &mut Vec<InlineSite>,
) {
    let dwarf = resolver.dwarf;
    // Enclosing out-of-line functions: (depth, demangled base name).
    let mut enclosing: Vec<(isize, Option<String>)> = Vec::new();
    let mut file_names: HashMap<u64, Option<String>> = HashMap::new();
    let mut entries = unit.entries();
    while let Ok(Some(entry)) = entries.next_dfs() {
        let depth = entry.depth();
        while enclosing.last().is_some_and(|(d, _)| *d >= depth) {
            enclosing.pop();
        }
        match entry.tag() {
            gimli::DW_TAG_subprogram => {
                // Only concrete (out-of-line) instances have code; declarations and abstract
                // instances get no name so nothing below them is attributed to an outer
                // function.
                let name = entry_address(dwarf, unit, entry).and_then(|address| {
                    let symbol = function_at(address);
                    match resolver.name_of(dwarf, unit, entry, MAX_NAME_INDIRECTIONS) {
                        Some(raw) => Some(match symbol {
                            Some(symbol) if symbol.has_raw_name(&raw) => symbol.base_name.clone(),
                            _ => demangle(&raw).base_name,
                        }),
                        None => symbol.map(|symbol| symbol.base_name.clone()),
                    }
                });
                enclosing.push((depth, name));
            }
            gimli::DW_TAG_inlined_subroutine => {
                let Some(address) = entry_address(dwarf, unit, entry) else {
                    continue;
                };
                let Some(name) = resolver
                    .name_of(dwarf, unit, entry, MAX_NAME_INDIRECTIONS)
                    .map(|raw| demangle(&raw).base_name)
                else {
                    continue;
                };
                let inlined_into = enclosing
                    .last()
                    .and_then(|(_, name)| name.clone())
                    .or_else(|| function_at(address).map(|f| f.base_name.clone()))
                    .unwrap_or_default();
                let call_line = entry
                    .attr_value(gimli::DW_AT_call_line)
                    .and_then(|v| v.udata_value())
                    .and_then(|line| u32::try_from(line).ok())
                    .filter(|&line| line != 0);
                // gimli normalizes DW_AT_call_file to `FileIndex`.
                let call_file = entry
                    .attr_value(gimli::DW_AT_call_file)
                    .and_then(|v| match v {
                        AttributeValue::FileIndex(index) => Some(index),
                        other => other.udata_value(),
                    })
                    .and_then(|index| {
                        file_names
                            .entry(index)
                            .or_insert_with(|| file_name(dwarf, unit, index))
                            .clone()
                    });
                sites.push(InlineSite {
                    name,
                    address,
                    inlined_into,
                    call_file,
                    call_line,
                });
            }
            _ => {}
        }
    }
}

/// Entry address of a code-bearing DIE: `DW_AT_entry_pc`, else `DW_AT_low_pc`, else the lowest
/// start of its `DW_AT_ranges`. `None` for DIEs without code (declarations, abstract
/// instances) and for ranges the linker discarded (tombstones).
fn entry_address(
    dwarf: &gimli::Dwarf<Reader>,
    unit: &gimli::Unit<Reader>,
    entry: &gimli::DebuggingInformationEntry<Reader>,
) -> Option<u64> {
    let low_pc = entry
        .attr_value(gimli::DW_AT_low_pc)
        .and_then(|v| dwarf.attr_address(unit, v).ok().flatten());
    let base = || {
        low_pc.or_else(|| {
            let mut ranges = dwarf.die_ranges(unit, entry).ok()?;
            let mut lowest: Option<u64> = None;
            while let Ok(Some(range)) = ranges.next() {
                if range.begin < range.end && !unit.header.is_tombstone_address(range.begin) {
                    lowest = Some(lowest.map_or(range.begin, |l| l.min(range.begin)));
                }
            }
            lowest
        })
    };
    let address = match entry.attr_value(gimli::DW_AT_entry_pc) {
        // DWARF 5: a constant is an offset from the entity's base address.
        Some(AttributeValue::Udata(delta)) => base().and_then(|b| b.checked_add(delta)),
        Some(
            value @ (AttributeValue::Data1(_)
            | AttributeValue::Data2(_)
            | AttributeValue::Data4(_)
            | AttributeValue::Data8(_)),
        ) => value
            .udata_value()
            .and_then(|delta| base()?.checked_add(delta)),
        Some(value) => dwarf.attr_address(unit, value).ok().flatten().or_else(base),
        None => base(),
    }?;
    (address != 0 && !unit.header.is_tombstone_address(address)).then_some(address)
}

/// The path of file `index` of `unit`'s line table, joined as `addr2line` does (comp dir,
/// include dir, file name).
fn file_name(
    dwarf: &gimli::Dwarf<Reader>,
    unit: &gimli::Unit<Reader>,
    index: u64,
) -> Option<String> {
    let header = unit.line_program.as_ref()?.header();
    let file = header.file(index)?;
    let string = |value| {
        dwarf
            .attr_string(unit, value)
            .ok()
            .and_then(|s| s.to_string_lossy().ok().map(|s| s.into_owned()))
    };
    let mut path = unit
        .comp_dir
        .as_ref()
        .and_then(|dir| dir.to_string_lossy().ok().map(|d| d.into_owned()))
        .unwrap_or_default();
    // Directory 0 is the compilation directory, already in `path`.
    if file.directory_index() != 0
        && let Some(directory) = file.directory(header).and_then(string)
    {
        path_push(&mut path, &directory);
    }
    path_push(&mut path, &string(file.path_name())?);
    Some(path)
}

fn path_push(path: &mut String, part: &str) {
    if part.starts_with('/') {
        *path = part.to_owned();
    } else {
        if !path.is_empty() && !path.ends_with('/') {
            path.push('/');
        }
        path.push_str(part);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claimed_sizes_beyond_the_format_ratio_are_refused() {
        assert!(plausible_size(CompressionFormat::Zlib, 100, 100 * 1032));
        assert!(!plausible_size(
            CompressionFormat::Zlib,
            100,
            100 * 1032 + 1
        ));
        assert!(plausible_size(
            CompressionFormat::Zstandard,
            100,
            100 * 32768
        ));
        assert!(!plausible_size(CompressionFormat::Zstandard, 10, 1 << 30));
        assert!(!plausible_size(CompressionFormat::Zlib, 0, 1));
        assert!(plausible_size(CompressionFormat::Zlib, 0, 0));
        assert!(plausible_size(
            CompressionFormat::Zlib,
            usize::MAX,
            u64::MAX
        ));
    }
}
