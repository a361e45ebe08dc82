//! Opening ELF files (mmap) and reading what every lookup needs: load segments and the
//! function symbol table.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use object::{Object, ObjectSegment, ObjectSymbol, SegmentFlags, SymbolFlags, SymbolSection};

use crate::demangle::demangle;
use crate::error::SymbolizeError;

/// A file mapped read-only into memory, with the identity it had when it was opened.
/// Cloning shares the mapping.
#[derive(Debug, Clone)]
pub(crate) struct MappedFile {
    pub(crate) path: PathBuf,
    pub(crate) map: Arc<Mmap>,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i128,
}

impl MappedFile {
    /// Opens and maps `path`, which must be a regular, non-empty file starting with the ELF
    /// magic.
    ///
    /// The mapping is shared with the page cache. A file truncated by someone else while it is
    /// mapped would fault on access; running executables cannot be written (`ETXTBSY`) and
    /// package managers replace libraries by rename, so this is the same trade-off every
    /// mmap-based symbolizer makes for not copying hundreds of megabytes of debug info.
    pub(crate) fn open(path: &Path) -> Result<Self, SymbolizeError> {
        // Refuse FIFOs, devices and directories before `open`: opening a FIFO blocks.
        let metadata = std::fs::metadata(path).map_err(|source| SymbolizeError::Open {
            path: path.to_owned(),
            source,
        })?;
        if !metadata.is_file() {
            return Err(SymbolizeError::NotAFile {
                path: path.to_owned(),
            });
        }
        let file = File::open(path).map_err(|source| SymbolizeError::Open {
            path: path.to_owned(),
            source,
        })?;
        // Identity of what was actually opened, not of what `path` pointed to a moment ago.
        let metadata = file.metadata().map_err(|source| SymbolizeError::Open {
            path: path.to_owned(),
            source,
        })?;
        if metadata.len() == 0 {
            return Err(SymbolizeError::Empty {
                path: path.to_owned(),
            });
        }
        // SAFETY: the map is read-only and private to this crate; its bytes are only read
        // through bounds-checked parsers. See the doc comment for the truncation caveat.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| SymbolizeError::Map {
            path: path.to_owned(),
            source,
        })?;
        if !map.starts_with(&object::elf::ELFMAG) {
            return Err(SymbolizeError::NotElf {
                path: path.to_owned(),
            });
        }
        Ok(MappedFile {
            path: path.to_owned(),
            map: Arc::new(map),
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.len(),
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
        })
    }

    /// Parses the ELF headers (cheap: no per-symbol or per-section work).
    pub(crate) fn parse(&self) -> Result<object::File<'_>, SymbolizeError> {
        object::File::parse(&**self.map).map_err(|source| SymbolizeError::Parse {
            path: self.path.clone(),
            source,
        })
    }
}

/// A `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub(crate) vaddr: u64,
    pub(crate) memsz: u64,
    pub(crate) offset: u64,
    pub(crate) filesz: u64,
    pub(crate) executable: bool,
}

impl Segment {
    fn contains_vaddr(&self, vaddr: u64) -> bool {
        vaddr
            .checked_sub(self.vaddr)
            .is_some_and(|delta| delta < self.memsz)
    }
}

/// The `PT_LOAD` segments of `file`, in header order.
pub(crate) fn load_segments(file: &object::File<'_>) -> Vec<Segment> {
    file.segments()
        .map(|segment| {
            let (offset, filesz) = segment.file_range();
            let executable = match segment.flags() {
                SegmentFlags::Elf { p_flags, .. } => p_flags.0 & object::elf::PF_X.0 != 0,
                _ => false,
            };
            Segment {
                vaddr: segment.address(),
                memsz: segment.size(),
                offset,
                filesz,
                executable,
            }
        })
        .collect()
}

/// vaddr → file offset, for addresses backed by file bytes (not `.bss`).
pub(crate) fn vaddr_to_file_offset(segments: &[Segment], vaddr: u64) -> Option<u64> {
    segments.iter().find_map(|segment| {
        let delta = vaddr.checked_sub(segment.vaddr)?;
        (delta < segment.filesz).then(|| segment.offset.checked_add(delta))?
    })
}

/// File offset → vaddr. When two segments share file bytes (possible with
/// `-z noseparate-code`), the executable one wins: callers translate code addresses.
pub(crate) fn file_offset_to_vaddr(segments: &[Segment], offset: u64) -> Option<u64> {
    let translate = |segment: &Segment| {
        let delta = offset.checked_sub(segment.offset)?;
        (delta < segment.filesz).then(|| segment.vaddr.checked_add(delta))?
    };
    segments
        .iter()
        .filter(|segment| segment.executable)
        .find_map(translate)
        .or_else(|| segments.iter().find_map(translate))
}

/// Whether `a` and `b` lie in the same executable segment.
pub(crate) fn same_executable_segment(segments: &[Segment], a: u64, b: u64) -> bool {
    segments
        .iter()
        .any(|segment| segment.executable && segment.contains_vaddr(a) && segment.contains_vaddr(b))
}

/// A function symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// ELF virtual address of the entry (for an ifunc: of the resolver).
    pub address: u64,
    /// Size in bytes; 0 when the symbol table does not say.
    pub size: u64,
    /// Raw symbol name as in the symbol table.
    pub symbol: String,
    /// Demangled name: Rust without the `::h<hash>` suffix, C++ with parameters.
    pub name: String,
    /// Demangled qualified name without parameters or hash: `ns::Foo::bar`, `demo::fib`,
    /// `processCommand`.
    pub base_name: String,
    /// `STT_GNU_IFUNC`: the address is the resolver, not the implementation.
    pub ifunc: bool,
    /// Other raw symbol names at the same address (e.g. `__libc_malloc` for `malloc`).
    pub aliases: Vec<String>,
}

impl Function {
    /// Whether `raw` is this function's symbol or one of its aliases.
    pub fn has_raw_name(&self, raw: &str) -> bool {
        self.symbol == raw || self.aliases.iter().any(|alias| alias == raw)
    }

    /// Whether `name` names this function: the raw symbol, its demangled or base name, or any
    /// alias (raw or demangled).
    pub fn is_named(&self, name: &str) -> bool {
        self.symbol == name
            || self.name == name
            || self.base_name == name
            || self.aliases.iter().any(|alias| {
                if alias == name {
                    return true;
                }
                let demangled = demangle(alias);
                demangled.name == name || demangled.base_name == name
            })
    }
}

/// One function symbol before deduplication.
struct Candidate<'data> {
    address: u64,
    size: u64,
    name: &'data str,
    from_symtab: bool,
    non_local: bool,
    ifunc: bool,
}

impl Candidate<'_> {
    /// Ordering of names at one address, best first: `.symtab` over `.dynsym`, global/weak
    /// over local, then the least decorated name (`malloc` over `__libc_malloc`, `write` over
    /// `__write`), then shorter, then alphabetical so the choice is deterministic.
    fn preference(&self) -> impl Ord + '_ {
        let underscores = self.name.bytes().take_while(|&b| b == b'_').count();
        (
            std::cmp::Reverse(self.from_symtab),
            std::cmp::Reverse(self.non_local),
            underscores,
            self.name.len(),
            self.name,
        )
    }
}

/// Collects the function symbols of `symbols`.
fn collect_candidates<'data: 'file, 'file>(
    symbols: impl Iterator<Item = object::Symbol<'data, 'file>>,
    from_symtab: bool,
    out: &mut Vec<Candidate<'data>>,
) {
    for symbol in symbols {
        let SymbolFlags::Elf { st_info, .. } = symbol.flags() else {
            continue;
        };
        let st_type = st_info.st_type();
        let ifunc = st_type == object::elf::STT_GNU_IFUNC;
        if st_type != object::elf::STT_FUNC && !ifunc {
            continue;
        }
        if matches!(symbol.section(), SymbolSection::Undefined) {
            continue;
        }
        let (address, size) = (symbol.address(), symbol.size());
        if size == 0 && address == 0 {
            continue;
        }
        // Names that are not UTF-8 cannot be shown or matched; skip rather than mangle them.
        let Ok(name) = symbol.name() else { continue };
        if name.is_empty() {
            continue;
        }
        out.push(Candidate {
            address,
            size,
            name,
            from_symtab,
            non_local: st_info.st_bind() != object::elf::STB_LOCAL,
            ifunc,
        });
    }
}

/// Builds the deduplicated, address-sorted function table from `.symtab` and `.dynsym` of
/// `main`, and from the `.symtab` of `debug` when `main` has none (a stripped binary).
pub(crate) fn function_table(
    main: &object::File<'_>,
    debug: Option<&object::File<'_>>,
) -> Vec<Function> {
    let mut candidates = Vec::new();
    collect_candidates(main.symbols(), true, &mut candidates);
    if main.symbol_table().is_none()
        && let Some(debug) = debug
    {
        collect_candidates(debug.symbols(), true, &mut candidates);
    }
    collect_candidates(main.dynamic_symbols(), false, &mut candidates);

    candidates.sort_by(|a, b| {
        a.address
            .cmp(&b.address)
            .then_with(|| a.preference().cmp(&b.preference()))
    });

    let mut functions: Vec<Function> = Vec::new();
    let mut rest = candidates.as_slice();
    while let Some(first) = rest.first() {
        let group_len = rest
            .iter()
            .position(|c| c.address != first.address)
            .unwrap_or(rest.len());
        let (group, tail) = rest.split_at(group_len);
        rest = tail;

        let demangled = demangle(first.name);
        let mut aliases: Vec<String> = Vec::new();
        for candidate in group.iter().skip(1) {
            if candidate.name != first.name && !aliases.iter().any(|a| a == candidate.name) {
                aliases.push(candidate.name.to_owned());
            }
        }
        functions.push(Function {
            address: first.address,
            size: group.iter().map(|c| c.size).max().unwrap_or(0),
            symbol: first.name.to_owned(),
            name: demangled.name,
            base_name: demangled.base_name,
            ifunc: group.iter().any(|c| c.ifunc),
            aliases,
        });
    }
    functions
}

/// How far back `function_at` looks for an enclosing function when the nearest preceding
/// symbol ends before the address (a small local symbol inside a larger function).
const MAX_ENCLOSING_LOOKBACK: usize = 8;

/// The function of `functions` (sorted by address) containing `vaddr`.
pub(crate) fn function_at<'f>(
    functions: &'f [Function],
    segments: &[Segment],
    vaddr: u64,
) -> Option<&'f Function> {
    let nearest = functions
        .partition_point(|f| f.address <= vaddr)
        .checked_sub(1)?;
    let nearest_function = functions.get(nearest)?;
    if nearest_function.size == 0 {
        // No size: it extends to the next symbol, but not beyond its segment.
        return (nearest_function.address == vaddr
            || same_executable_segment(segments, nearest_function.address, vaddr))
        .then_some(nearest_function);
    }
    let first = nearest.saturating_sub(MAX_ENCLOSING_LOOKBACK);
    functions.get(first..=nearest)?.iter().rev().find(|f| {
        f.size > 0
            && vaddr
                .checked_sub(f.address)
                .is_some_and(|delta| delta < f.size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(address: u64, size: u64, name: &str) -> Function {
        Function {
            address,
            size,
            symbol: name.to_owned(),
            name: name.to_owned(),
            base_name: name.to_owned(),
            ifunc: false,
            aliases: Vec::new(),
        }
    }

    #[test]
    fn function_at_uses_sizes_and_enclosing_functions() {
        let segments = [Segment {
            vaddr: 0x1000,
            memsz: 0x1000,
            offset: 0x1000,
            filesz: 0x1000,
            executable: true,
        }];
        let functions = [
            function(0x1000, 0x100, "big"),
            function(0x1010, 0x10, "inner_label"),
            function(0x1200, 0, "sizeless"),
            function(0x1300, 0x10, "after"),
        ];
        let at = |vaddr| function_at(&functions, &segments, vaddr).map(|f| f.symbol.as_str());
        assert_eq!(at(0xfff), None);
        assert_eq!(at(0x1000), Some("big"));
        assert_eq!(at(0x1015), Some("inner_label"));
        assert_eq!(
            at(0x1050),
            Some("big"),
            "enclosing function after a nested symbol"
        );
        assert_eq!(at(0x1100), None, "gap between functions");
        assert_eq!(at(0x1250), Some("sizeless"));
        assert_eq!(at(0x1310), None);
        assert_eq!(at(u64::MAX), None);
    }

    #[test]
    fn segment_translation() {
        let segments = [
            Segment {
                vaddr: 0,
                memsz: 0x500,
                offset: 0,
                filesz: 0x500,
                executable: false,
            },
            Segment {
                vaddr: 0x1000,
                memsz: 0x800,
                offset: 0x1000,
                filesz: 0x800,
                executable: true,
            },
            Segment {
                vaddr: 0x3de0,
                memsz: 0x300,
                offset: 0x2de0,
                filesz: 0x100,
                executable: false,
            },
        ];
        assert_eq!(vaddr_to_file_offset(&segments, 0x1234), Some(0x1234));
        assert_eq!(vaddr_to_file_offset(&segments, 0x3de8), Some(0x2de8));
        assert_eq!(
            vaddr_to_file_offset(&segments, 0x3f00),
            None,
            ".bss has no file bytes"
        );
        assert_eq!(vaddr_to_file_offset(&segments, u64::MAX), None);
        assert_eq!(file_offset_to_vaddr(&segments, 0x2de8), Some(0x3de8));
        assert_eq!(file_offset_to_vaddr(&segments, 0x1800), None);
        assert_eq!(file_offset_to_vaddr(&segments, u64::MAX), None);
    }
}
