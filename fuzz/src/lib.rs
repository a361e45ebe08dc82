//! What the fuzz targets share: handing bytes to the symbolizer the way the daemon does (as a
//! file it opens and maps), asking it everything the daemon asks, and building ELF files whose
//! DWARF sections the fuzzer chose.
//!
//! The targets assert what must hold for any input (sorted tables, lookups that return what
//! contains the address, round trips), so a wrong answer is a finding too, not only a panic.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use scope_symbolizer::{Module, Symbolizer};

/// `scoped/src/glob.rs`, compiled here as it is: the daemon crate itself is not built for
/// fuzzing (aya needs flags cargo-fuzz replaces, and SQLite, tonic and tokio would make every
/// fuzz build minutes longer for code the targets never reach). The file depends on nothing
/// but `thiserror`; if it ever grows a `crate::` import, this stops compiling, loudly.
#[path = "../../scoped/src/glob.rs"]
pub mod glob;

/// `scoped/src/model.rs`, compiled here for the same reason: what the pipeline does with a
/// decoded record next (`Span::from_kernel`, `Io::from_kernel`).
#[path = "../../scoped/src/model.rs"]
pub mod model;

/// `scoped/src/usdt.rs`, for the same reason: how the reader decodes the strings of a
/// `TextSpan` record and the pipeline makes them a span's text.
#[path = "../../scoped/src/usdt.rs"]
pub mod usdt;

/// Where separate debug info is searched. It does not exist, so a fuzzed `.gnu_debuglink` or
/// build-id never reaches a real file on the machine running the fuzzer.
const NO_DEBUG_ROOT: &str = "/nonexistent/scope-fuzz-root";

/// Functions the module queries look at, at most; the rest of a big symbol table costs time
/// per input without reaching new code.
const MAX_FUNCTIONS: usize = 64;
/// Addresses looked up inside each of those functions.
const POINTS_PER_FUNCTION: u64 = 8;
/// Inlined call sites whose frames are looked up.
const MAX_INLINE_SITES: usize = 64;
/// Functions looked up by name (each lookup is a linear scan).
const MAX_NAME_LOOKUPS: usize = 8;

/// An unlinked file that holds the current input. The symbolizer opens it through
/// `/proc/self/fd/N`, as it opens `/proc/PID/map_files/...` for a deleted library: the same
/// `open` + `mmap` + parse path as the daemon, and nothing is left behind when libFuzzer
/// exits.
struct Scratch {
    file: File,
    path: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let name = dir.join(format!("scope-fuzz-{}", std::process::id()));
        // Left by an earlier process with this pid killed between create and unlink.
        let _ = std::fs::remove_file(&name);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&name)
            .expect("creating the scratch file for fuzz inputs");
        std::fs::remove_file(&name).expect("unlinking the scratch file");
        let path = PathBuf::from(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd as _;
            file.as_raw_fd()
        }));
        Scratch { file, path }
    }

    fn replace(&mut self, bytes: &[u8]) {
        self.file.set_len(0).expect("truncating the scratch file");
        self.file
            .write_all_at(bytes, 0)
            .expect("writing the scratch file");
    }
}

fn scratch() -> &'static Mutex<Scratch> {
    static SCRATCH: OnceLock<Mutex<Scratch>> = OnceLock::new();
    SCRATCH.get_or_init(|| Mutex::new(Scratch::new()))
}

/// Opens `bytes` as an ELF file with a fresh [`Symbolizer`] and asks the module everything the
/// daemon asks: functions, lookups by address and name, vaddr/offset translation, frames,
/// source locations and inlined call sites. `addresses` are looked up too.
pub fn symbolize(bytes: &[u8], addresses: &[u64]) {
    with_module(bytes, |module| query(module, addresses));
}

/// Opens `bytes` as a module, as the daemon opens a file, and calls `f` with it; `None` when
/// the symbolizer refuses the file.
pub fn with_module<T>(bytes: &[u8], f: impl FnOnce(&Module) -> T) -> Option<T> {
    let mut scratch = scratch().lock().unwrap_or_else(PoisonError::into_inner);
    scratch.replace(bytes);
    // A fresh symbolizer: its cache is keyed by inode, size and mtime, which the reused
    // scratch file could repeat for a different input.
    let symbolizer = Symbolizer::with_capacity(1);
    let module = symbolizer
        .module_in_root(&scratch.path, Path::new(NO_DEBUG_ROOT))
        .ok()?;
    let result = f(&module);
    // Unmapped before the scratch file is truncated for the next input.
    drop(module);
    Some(result)
}

fn query(module: &Module, addresses: &[u64]) {
    let _ = (
        module.build_id(),
        module.is_pie_or_shared(),
        module.has_dwarf(),
        module.debug_file(),
    );

    let functions = module.functions();
    assert!(
        functions.windows(2).all(|w| w[0].address < w[1].address),
        "functions() is sorted by address, one per address"
    );
    for function in functions.iter().take(MAX_NAME_LOOKUPS) {
        let named = module.functions_named(&function.base_name);
        assert!(
            named.iter().any(|f| f.address == function.address),
            "functions_named({:?}) finds the function it names",
            function.base_name
        );
    }
    for function in functions.iter().take(MAX_FUNCTIONS) {
        let step = (function.size / POINTS_PER_FUNCTION).max(1);
        for point in 0..POINTS_PER_FUNCTION {
            let Some(address) = function
                .address
                .checked_add(point.saturating_mul(step))
                .filter(|&a| point == 0 || a < function.address.saturating_add(function.size))
            else {
                break;
            };
            lookup(module, address);
        }
    }

    let sites = module.inline_sites();
    assert!(
        sites.windows(2).all(|w| w[0].address <= w[1].address),
        "inline_sites() is sorted by address"
    );
    for site in sites.iter().take(MAX_INLINE_SITES) {
        lookup(module, site.address);
    }

    for &address in addresses
        .iter()
        .chain(&[0, 1, u64::MAX - 1, u64::MAX, 1 << 63])
    {
        lookup(module, address);
    }
}

fn lookup(module: &Module, vaddr: u64) {
    if let Some(function) = module.function_at(vaddr) {
        assert!(
            function.address <= vaddr,
            "function_at({vaddr:#x}) returned {:?} starting after it",
            function.symbol
        );
    }
    if let Some(offset) = module.vaddr_to_file_offset(vaddr) {
        assert!(
            module.file_offset_to_vaddr(offset).is_some(),
            "file offset {offset:#x} of vaddr {vaddr:#x} has no vaddr"
        );
    }
    let frames = module.frames(vaddr);
    if let Some((outermost, inner)) = frames.split_last() {
        assert!(!outermost.inlined, "the outermost frame is not inlined");
        assert!(
            inner.iter().all(|frame| frame.inlined),
            "every frame but the outermost is inlined"
        );
    }
    // The second lookup comes from the frame cache.
    assert_eq!(module.frames(vaddr), frames, "cached frames differ");
    let _ = module.location(vaddr);
}

/// `SHF_COMPRESSED`: the section starts with an `Elf64_Chdr`.
const SHF_COMPRESSED: u64 = 0x800;
const SHT_PROGBITS: u32 = 1;
const SHT_NOBITS: u32 = 8;
const ELF64_SHDR_SIZE: usize = 64;

/// One section the fuzzer supplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacement<'a> {
    /// Section name, such as `.debug_info`. A name the base file lacks adds a section.
    pub name: &'a [u8],
    /// Mark the section `SHF_COMPRESSED` (then `data` starts with a compression header).
    pub compressed: bool,
    pub data: &'a [u8],
}

/// Most sections one input replaces.
pub const MAX_REPLACEMENTS: usize = 16;

/// Splits a `dwarf` target input into the base selector and the sections it replaces.
///
/// ```text
/// input  = base:u8 record*
/// record = flags:u8 name_len:u8 name[name_len] data_len:u16le data[data_len]
/// ```
///
/// `flags` bit 0 marks the section compressed. A record cut short at the end keeps the bytes
/// that are there; later records for the same name win.
pub fn parse_replacements(input: &[u8]) -> Option<(u8, Vec<Replacement<'_>>)> {
    let (&base, mut rest) = input.split_first()?;
    let mut replacements = Vec::new();
    while replacements.len() < MAX_REPLACEMENTS {
        let [flags, name_len, tail @ ..] = rest else {
            break;
        };
        let Some((name, tail)) = tail.split_at_checked(usize::from(*name_len)) else {
            break;
        };
        let (data_len, tail) = match tail {
            [low, high, tail @ ..] => (usize::from(u16::from_le_bytes([*low, *high])), tail),
            _ => (0, &[][..]),
        };
        let (data, tail) = tail.split_at(data_len.min(tail.len()));
        replacements.push(Replacement {
            name,
            compressed: flags & 1 != 0,
            data,
        });
        rest = tail;
    }
    Some((base, replacements))
}

/// Encodes replacements in the format [`parse_replacements`] reads (for seeds).
pub fn encode_replacements(base: u8, replacements: &[Replacement<'_>]) -> Vec<u8> {
    let mut out = vec![base];
    for replacement in replacements {
        let name_len = u8::try_from(replacement.name.len()).expect("section name too long");
        let data_len = u16::try_from(replacement.data.len()).expect("section too long");
        out.push(u8::from(replacement.compressed));
        out.push(name_len);
        out.extend_from_slice(replacement.name);
        out.extend_from_slice(&data_len.to_le_bytes());
        out.extend_from_slice(replacement.data);
    }
    out
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn write_u16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

fn write_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn write_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn pad_to_8(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(8), 0);
}

/// The name of the section whose header is `header`, from the section name table.
fn section_name<'a>(names: &'a [u8], header: &[u8]) -> &'a [u8] {
    let start = read_u32(header, 0).map_or(usize::MAX, |n| n as usize);
    let tail = names.get(start..).unwrap_or(&[]);
    let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
    &tail[..end]
}

/// `base` (a valid little-endian ELF64 file) with the contents of the named sections
/// replaced, or added when `base` has no such section: the new contents, a new section name
/// table and a new section header table are appended, and the ELF header points at them.
/// Code, symbols and segments stay as they were, so everything but the replaced sections is
/// valid. `None` if `base` is not a well-formed little-endian ELF64 file.
pub fn splice_sections(base: &[u8], replacements: &[Replacement<'_>]) -> Option<Vec<u8>> {
    if base.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = usize::try_from(read_u64(base, 0x28)?).ok()?;
    if usize::from(read_u16(base, 0x3a)?) != ELF64_SHDR_SIZE {
        return None;
    }
    let shnum = usize::from(read_u16(base, 0x3c)?);
    let shstrndx = usize::from(read_u16(base, 0x3e)?);
    let table = base.get(shoff..shoff.checked_add(shnum * ELF64_SHDR_SIZE)?)?;
    let mut headers: Vec<[u8; ELF64_SHDR_SIZE]> = table
        .chunks_exact(ELF64_SHDR_SIZE)
        .map(|chunk| chunk.try_into().ok())
        .collect::<Option<_>>()?;
    let names_header = headers.get(shstrndx)?;
    let names_offset = usize::try_from(read_u64(names_header, 24)?).ok()?;
    let names_size = usize::try_from(read_u64(names_header, 32)?).ok()?;
    let mut names = base
        .get(names_offset..names_offset.checked_add(names_size)?)?
        .to_vec();

    let mut out = base.to_vec();
    for replacement in replacements {
        let index = match headers
            .iter()
            .position(|header| section_name(&names, header) == replacement.name)
        {
            Some(index) => index,
            None => {
                if replacement.name.is_empty() || replacement.name.contains(&0) {
                    continue;
                }
                let name_offset = u32::try_from(names.len()).ok()?;
                names.extend_from_slice(replacement.name);
                names.push(0);
                let mut header = [0u8; ELF64_SHDR_SIZE];
                write_u32(&mut header, 0, name_offset);
                write_u32(&mut header, 4, SHT_PROGBITS);
                write_u64(&mut header, 48, 1);
                headers.push(header);
                headers.len() - 1
            }
        };
        pad_to_8(&mut out);
        let header = &mut headers[index];
        if read_u32(header, 4)? == SHT_NOBITS {
            write_u32(header, 4, SHT_PROGBITS);
        }
        let flags = read_u64(header, 8)?;
        let flags = if replacement.compressed {
            flags | SHF_COMPRESSED
        } else {
            flags & !SHF_COMPRESSED
        };
        write_u64(header, 8, flags);
        write_u64(header, 24, out.len() as u64);
        write_u64(header, 32, replacement.data.len() as u64);
        out.extend_from_slice(replacement.data);
    }

    pad_to_8(&mut out);
    let names_header = &mut headers[shstrndx];
    write_u64(names_header, 24, out.len() as u64);
    write_u64(names_header, 32, names.len() as u64);
    out.extend_from_slice(&names);

    pad_to_8(&mut out);
    let new_shoff = out.len() as u64;
    for header in &headers {
        out.extend_from_slice(header);
    }
    write_u64(&mut out, 0x28, new_shoff);
    write_u16(&mut out, 0x3c, u16::try_from(headers.len()).ok()?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacements_round_trip() {
        let replacements = [
            Replacement {
                name: b".debug_info",
                compressed: false,
                data: b"abc",
            },
            Replacement {
                name: b".debug_new",
                compressed: true,
                data: b"",
            },
        ];
        let encoded = encode_replacements(1, &replacements);
        assert_eq!(
            parse_replacements(&encoded),
            Some((1, replacements.to_vec()))
        );
        assert_eq!(parse_replacements(&[]), None);
        let cut = &encoded[..encoded.len() - 15];
        let (_, parsed) = parse_replacements(cut).expect("base byte");
        assert_eq!(parsed[0].data, b"ab", "a cut record keeps what is there");
    }

    fn inline_names(bytes: &[u8]) -> Vec<String> {
        with_module(bytes, |module| {
            assert!(module.has_dwarf());
            module
                .inline_sites()
                .iter()
                .map(|site| format!("{} in {}", site.name, site.inlined_into))
                .collect()
        })
        .expect("opens as a module")
    }

    /// The `dwarf` target reaches DWARF parsing: the base file's own sections spliced back in
    /// (the `-all` seed) give the same answers as the base, garbage gives none.
    #[test]
    fn spliced_sections_are_what_the_symbolizer_reads() {
        let base = include_bytes!("../seeds/dwarf5.elf");
        let expected = inline_names(base);
        assert!(
            expected.iter().any(|site| site == "square in distance2"),
            "{expected:?}"
        );

        let seed = include_bytes!("../corpus/dwarf/seed-dwarf5-all");
        let (selector, sections) = parse_replacements(seed).expect("seed parses");
        assert_eq!(selector, 0);
        assert!(sections.len() >= 5, "{sections:?}");
        let spliced = splice_sections(base, &sections).expect("base is well-formed");
        assert!(spliced.len() > base.len(), "the sections were appended");
        assert_eq!(inline_names(&spliced), expected);

        let garbage = [Replacement {
            name: b".debug_info",
            compressed: false,
            data: &[0xff; 64],
        }];
        let spliced = splice_sections(base, &garbage).expect("base is well-formed");
        assert_eq!(inline_names(&spliced), Vec::<String>::new());
    }
}
