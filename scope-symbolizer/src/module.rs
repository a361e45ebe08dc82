//! One parsed object file: its symbol table, load segments and (lazily) its DWARF.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use object::{Object, ObjectKind};

use crate::{
    facts::{self, BinaryFacts},
    go::{self, GoCodeError, GoProbePoints},
    usdt::{self, UsdtProbe},
};

use crate::debuginfo::{find_debug_file, find_sup_file, logical_path};
use crate::demangle::demangle;
use crate::dwarf::{self, InlineSite, Reader, has_debug_info, load_dwarf};
use crate::elf::{self, Function, MappedFile, Segment};
use crate::error::SymbolizeError;

/// Addresses whose frames one module remembers, per generation. The frame cache keeps two
/// generations (so at most twice this many entries): a hit in the older one moves the entry to
/// the current one, and when the current one fills up the older one is dropped. That keeps
/// hot addresses (the ones a trace hits over and over) at O(1) cost with a hard memory bound.
pub const FRAME_CACHE_GENERATION_ENTRIES: usize = 4096;

/// Most frames returned for one address. Real inline nesting stays in the tens; a corrupt
/// file could claim more.
const MAX_FRAMES_PER_ADDRESS: usize = 128;

/// What `frames` shows for a frame DWARF has no name for and the symbol table cannot name.
const UNKNOWN_FUNCTION: &str = "??";

/// One frame of a symbolized address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Demangled function name (C++ with parameters, Rust without hash).
    pub function: String,
    /// Source file, when DWARF knows it.
    pub file: Option<String>,
    /// Source line, when DWARF knows it.
    pub line: Option<u32>,
    /// This frame is an inlined call inside the next frame.
    pub inlined: bool,
}

/// The file holding the DWARF we use: the binary itself or its separate debug file.
struct DwarfFile {
    file: MappedFile,
    /// Its path as the target process sees it (for resolving a relative `.gnu_debugaltlink`).
    logical: PathBuf,
}

enum ContextState {
    NotBuilt,
    Ready(Box<addr2line::Context<Reader>>),
    Unavailable,
}

/// A parsed ELF file. `Send + Sync`; shared as `Arc<Module>` from the [`crate::Symbolizer`]
/// cache.
///
/// Opening one reads only headers and symbol tables. DWARF is loaded on the first
/// [`frames`](Module::frames), [`location`](Module::location) or
/// [`inline_sites`](Module::inline_sites) call.
pub struct Module {
    path: PathBuf,
    /// The file's bytes, for reading machine code ([`Module::function_code`]).
    file: MappedFile,
    root: PathBuf,
    build_id: Option<Vec<u8>>,
    pie_or_shared: bool,
    segments: Vec<Segment>,
    functions: Vec<Function>,
    debug_file: Option<PathBuf>,
    dwarf_file: Option<DwarfFile>,
    dwarf: OnceLock<Option<Arc<gimli::Dwarf<Reader>>>>,
    // `addr2line::Context` parses units lazily through `OnceCell`s, so it is `Send` but not
    // `Sync`; lookups take turns. The frame cache in front of it absorbs the repeats.
    context: Mutex<ContextState>,
    inline_sites: OnceLock<Vec<InlineSite>>,
    frame_cache: Mutex<FrameCache>,
    usdt: Vec<UsdtProbe>,
    facts: BinaryFacts,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.path)
            .field("functions", &self.functions.len())
            .field("has_dwarf", &self.has_dwarf())
            .field("debug_file", &self.debug_file)
            .finish_non_exhaustive()
    }
}

/// Identity of an opened file for the module cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ModuleKey {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) size: u64,
    pub(crate) mtime_ns: i128,
    pub(crate) build_id: Option<Vec<u8>>,
}

/// A mapped and header-parsed file, before the (more expensive) module build: enough to
/// compute its cache key.
pub(crate) struct Opened {
    main: MappedFile,
    pub(crate) key: ModuleKey,
}

impl Opened {
    pub(crate) fn open(path: &Path) -> Result<Self, SymbolizeError> {
        let main = MappedFile::open(path)?;
        let build_id = main
            .parse()?
            .build_id()
            .ok()
            .flatten()
            .filter(|id| !id.is_empty())
            .map(<[u8]>::to_vec);
        let key = ModuleKey {
            dev: main.dev,
            ino: main.ino,
            size: main.size,
            mtime_ns: main.mtime_ns,
            build_id,
        };
        Ok(Opened { main, key })
    }
}

impl Module {
    /// Builds the module for an opened file; `root` is where separate debug info is searched.
    pub(crate) fn build(opened: Opened, root: &Path) -> Result<Self, SymbolizeError> {
        let Opened { main, key } = opened;
        let parsed = main.parse()?;
        let segments = elf::load_segments(&parsed);
        let pie_or_shared = parsed.kind() == ObjectKind::Dynamic;
        let main_has_dwarf = has_debug_info(&parsed);
        let logical = logical_path(&main.path, root);

        // A binary with both DWARF and a .symtab has nothing to gain from a debug file.
        let debug = if main_has_dwarf && parsed.symbol_table().is_some() {
            None
        } else {
            find_debug_file(&parsed, &main, &logical, root)
        };
        let debug_parsed = debug.as_ref().and_then(|d| d.file.parse().ok());
        let functions = elf::function_table(&parsed, debug_parsed.as_ref());
        let usdt = usdt::probes(&parsed);
        let facts = facts::read(&parsed);

        let dwarf_file = if main_has_dwarf {
            Some(DwarfFile {
                file: main.clone(),
                logical,
            })
        } else {
            match (&debug, &debug_parsed) {
                (Some(debug), Some(parsed)) if has_debug_info(parsed) => Some(DwarfFile {
                    file: debug.file.clone(),
                    logical: logical_path(&debug.file.path, root),
                }),
                _ => None,
            }
        };

        Ok(Module {
            path: main.path.clone(),
            file: main.clone(),
            root: root.to_path_buf(),
            build_id: key.build_id,
            pie_or_shared,
            segments,
            functions,
            debug_file: debug.map(|d| d.file.path),
            dwarf_file,
            dwarf: OnceLock::new(),
            context: Mutex::new(ContextState::NotBuilt),
            inline_sites: OnceLock::new(),
            frame_cache: Mutex::new(FrameCache::default()),
            usdt,
            facts,
        })
    }

    /// The path this module was opened through (the first one, when the cache later served
    /// the same file under another path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GNU build-id, if the file has one.
    pub fn build_id(&self) -> Option<&[u8]> {
        self.build_id.as_deref()
    }

    /// `ET_DYN`: a shared library or a position-independent executable, loaded at a bias.
    pub fn is_pie_or_shared(&self) -> bool {
        self.pie_or_shared
    }

    /// Whether DWARF was found, in the file itself or in separate debug info.
    pub fn has_dwarf(&self) -> bool {
        self.dwarf_file.is_some()
    }

    /// Where separate debug info came from, if any was found.
    pub fn debug_file(&self) -> Option<&Path> {
        self.debug_file.as_deref()
    }

    /// Function symbols from `.symtab` and `.dynsym` (and the debug file's `.symtab` when the
    /// binary is stripped), one per address, sorted by address.
    ///
    /// Includes `STT_FUNC` and `STT_GNU_IFUNC` symbols that are defined and have a size or a
    /// non-zero address. Of several names at one address the `.symtab` one wins, then
    /// global/weak over local, then the least decorated (`malloc` over `__libc_malloc`); the
    /// others are kept in [`Function::aliases`].
    pub fn functions(&self) -> &[Function] {
        &self.functions
    }

    /// The function containing `vaddr` (an ELF virtual address), by symbol table.
    pub fn function_at(&self, vaddr: u64) -> Option<&Function> {
        elf::function_at(&self.functions, &self.segments, vaddr)
    }

    /// Functions named `name` (raw symbol, demangled name, base name, or any alias), in
    /// address order. A linear scan: for resolving what a user typed, not per event.
    pub fn functions_named(&self, name: &str) -> Vec<&Function> {
        self.functions.iter().filter(|f| f.is_named(name)).collect()
    }

    /// How the file was built: toolchains, needed libraries, symbol table, Go build info.
    pub fn facts(&self) -> &BinaryFacts {
        &self.facts
    }

    /// The machine code of `function` in the file: `None` when the symbol table gives it no
    /// size or its bytes are not all in one loaded segment of the file.
    pub fn function_code(&self, function: &Function) -> Option<&[u8]> {
        if function.size == 0 {
            return None;
        }
        let last = function.address.checked_add(function.size - 1)?;
        let start = self.vaddr_to_file_offset(function.address)?;
        let end = self.vaddr_to_file_offset(last)?.checked_add(1)?;
        if end.checked_sub(start)? != function.size {
            return None;
        }
        self.file
            .map
            .get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }

    /// Where to probe a Go function: after its stack check, and on each RET instruction
    /// (see [`crate::go`]).
    pub fn go_probe_points(&self, function: &Function) -> Result<GoProbePoints, GoCodeError> {
        let code = self
            .function_code(function)
            .ok_or(GoCodeError::UnknownSize)?;
        go::probe_points(code, function.address)
    }

    /// The USDT probes (`.note.stapsdt`) the file carries, in note order.
    pub fn usdt_probes(&self) -> &[UsdtProbe] {
        &self.usdt
    }

    /// Inlined call sites from DWARF (`DW_TAG_inlined_subroutine`), sorted by address.
    ///
    /// The first call walks all of the debug info (the only full walk this crate does) and
    /// caches the result; empty without DWARF.
    pub fn inline_sites(&self) -> &[InlineSite] {
        self.inline_sites.get_or_init(|| {
            let Some(dwarf) = self.dwarf() else {
                return Vec::new();
            };
            contain_panics(|| dwarf::inline_sites(dwarf, |address| self.function_at(address)))
                .unwrap_or_default()
        })
    }

    /// ELF vaddr → file offset, through the `PT_LOAD` segments. `None` for addresses outside
    /// them or without file bytes (`.bss`).
    pub fn vaddr_to_file_offset(&self, vaddr: u64) -> Option<u64> {
        elf::vaddr_to_file_offset(&self.segments, vaddr)
    }

    /// File offset → ELF vaddr, through the `PT_LOAD` segments.
    pub fn file_offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        elf::file_offset_to_vaddr(&self.segments, offset)
    }

    /// Frames for `vaddr`, innermost first: inlined frames (`inlined == true`), then the
    /// function the code physically belongs to.
    ///
    /// From DWARF when present, else from the symbol table (one frame, no file or line); empty
    /// when neither knows the address. Results are cached per address (bounded, see
    /// [`FRAME_CACHE_GENERATION_ENTRIES`]).
    pub fn frames(&self, vaddr: u64) -> Vec<Frame> {
        if let Some(hit) = lock(&self.frame_cache).get(vaddr) {
            return hit;
        }
        let frames = self.compute_frames(vaddr);
        lock(&self.frame_cache).insert(vaddr, frames.clone());
        frames
    }

    /// Where code at `vaddr` comes from (DWARF line table): pass a function's entry address to
    /// learn where the function is defined. `None` without DWARF or line info.
    pub fn location(&self, vaddr: u64) -> Option<(String, u32)> {
        self.with_context(vaddr, |context| {
            let location = context.find_location(vaddr).ok().flatten()?;
            Some((location.file?.to_owned(), location.line?))
        })
        .flatten()
    }

    fn compute_frames(&self, vaddr: u64) -> Vec<Frame> {
        let found = self
            .with_context(vaddr, |context| dwarf_frames(context, vaddr))
            .unwrap_or_default();
        let symbol = self.function_at(vaddr);
        let outermost = found.len().checked_sub(1);
        let mut frames: Vec<Frame> = found
            .into_iter()
            .enumerate()
            .map(|(index, frame)| {
                let is_outermost = Some(index) == outermost;
                let function = match (frame.raw_name, symbol) {
                    // The code's own function: when DWARF names one of its symbols (C code
                    // often has `__GI___libc_malloc` in DWARF for `malloc`), show the name
                    // `functions()` shows.
                    (Some(raw), Some(symbol)) if is_outermost && symbol.has_raw_name(&raw) => {
                        symbol.name.clone()
                    }
                    (Some(raw), _) => demangle(&raw).name,
                    (None, Some(symbol)) if is_outermost => symbol.name.clone(),
                    (None, _) => UNKNOWN_FUNCTION.to_owned(),
                };
                Frame {
                    function,
                    file: frame.file,
                    line: frame.line,
                    inlined: !is_outermost,
                }
            })
            .collect();
        if frames.is_empty()
            && let Some(symbol) = symbol
        {
            frames.push(Frame {
                function: symbol.name.clone(),
                file: None,
                line: None,
                inlined: false,
            });
        }
        frames
    }

    /// The loaded DWARF sections (and supplementary file), loaded on first use.
    fn dwarf(&self) -> Option<&Arc<gimli::Dwarf<Reader>>> {
        self.dwarf
            .get_or_init(|| {
                let dwarf_file = self.dwarf_file.as_ref()?;
                let parsed = dwarf_file.file.parse().ok()?;
                let sup = find_sup_file(
                    &parsed,
                    &dwarf_file.file.path,
                    &dwarf_file.logical,
                    &self.root,
                );
                let sup_parsed = sup.as_ref().and_then(|s| Some((s.parse().ok()?, &s.map)));
                let dwarf = contain_panics(|| {
                    load_dwarf(
                        &parsed,
                        &dwarf_file.file.map,
                        sup_parsed.as_ref().map(|(parsed, map)| (parsed, *map)),
                    )
                })?;
                Some(Arc::new(dwarf))
            })
            .as_ref()
    }

    /// Runs `f` with the `addr2line` context, building it on first use. `None` without DWARF,
    /// for an address `addr2line` cannot take, or when `f` panicked.
    fn with_context<T>(
        &self,
        vaddr: u64,
        f: impl FnOnce(&addr2line::Context<Reader>) -> T,
    ) -> Option<T> {
        // addr2line 0.27 probes `[vaddr, vaddr + 1)` without checking for overflow.
        if vaddr == u64::MAX {
            return None;
        }
        let mut state = lock(&self.context);
        if matches!(*state, ContextState::NotBuilt) {
            *state = match self.dwarf().and_then(|dwarf| {
                contain_panics(|| addr2line::Context::from_arc_dwarf(Arc::clone(dwarf)).ok())
                    .flatten()
            }) {
                Some(context) => ContextState::Ready(Box::new(context)),
                None => ContextState::Unavailable,
            };
        }
        match &*state {
            ContextState::Ready(context) => contain_panics(|| f(context)),
            ContextState::NotBuilt | ContextState::Unavailable => None,
        }
    }
}

/// One frame as DWARF gives it, before naming.
struct DwarfFrame {
    raw_name: Option<String>,
    file: Option<String>,
    line: Option<u32>,
}

/// Frames from DWARF, innermost first. Stops at the first error: the frames before it are
/// still right.
fn dwarf_frames(context: &addr2line::Context<Reader>, vaddr: u64) -> Vec<DwarfFrame> {
    let mut frames = Vec::new();
    // Split DWARF is not supported (see `dwarf`): skip loads of `.dwo` units.
    let Ok(mut iter) = context.find_frames(vaddr).skip_all_loads() else {
        return frames;
    };
    while let Ok(Some(frame)) = iter.next() {
        if frames.len() >= MAX_FRAMES_PER_ADDRESS {
            break;
        }
        let raw_name = frame
            .function
            .as_ref()
            .and_then(|name| name.raw_name().ok())
            .map(|raw| raw.into_owned());
        let (file, line) = match frame.location {
            Some(location) => (location.file.map(str::to_owned), location.line),
            None => (None, None),
        };
        frames.push(DwarfFrame {
            raw_name,
            file,
            line,
        });
    }
    frames
}

/// Runs third-party DWARF code, turning a panic into `None`.
///
/// gimli and addr2line mean never to panic on any input, but they hold unchecked arithmetic
/// (see `with_context`) and `unwrap`s on paths they believe unreachable. One traced process
/// mapping a corrupt file must not take the daemon down with it; a fuzzer, whose panic hook
/// aborts, still reports such panics so they get fixed upstream.
fn contain_panics<T>(f: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).ok()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here leaves the state half-updated on panic, so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Two-generation bounded cache of frames per address.
#[derive(Default)]
struct FrameCache {
    current: HashMap<u64, Vec<Frame>>,
    previous: HashMap<u64, Vec<Frame>>,
}

impl FrameCache {
    fn get(&mut self, vaddr: u64) -> Option<Vec<Frame>> {
        if let Some(frames) = self.current.get(&vaddr) {
            return Some(frames.clone());
        }
        let frames = self.previous.remove(&vaddr)?;
        self.insert(vaddr, frames.clone());
        Some(frames)
    }

    fn insert(&mut self, vaddr: u64, frames: Vec<Frame>) {
        if self.current.len() >= FRAME_CACHE_GENERATION_ENTRIES {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(vaddr, frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_cache_is_bounded_and_keeps_hot_entries() {
        let mut cache = FrameCache::default();
        let frame = |n: u64| {
            vec![Frame {
                function: n.to_string(),
                file: None,
                line: None,
                inlined: false,
            }]
        };
        cache.insert(0, frame(0));
        for vaddr in 1..(FRAME_CACHE_GENERATION_ENTRIES as u64 * 5) {
            cache.insert(vaddr, frame(vaddr));
            // Address 0 is hot: looked up all the time, so it must survive.
            assert_eq!(cache.get(0), Some(frame(0)));
            assert!(
                cache.current.len() + cache.previous.len() <= 2 * FRAME_CACHE_GENERATION_ENTRIES
            );
        }
        assert_eq!(cache.get(1), None, "cold entries are evicted");
    }

    #[test]
    fn module_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Module>();
    }
}
