//! ELF + DWARF symbolization for scope.
//!
//! The daemon's symbolizer stage: given a process's memory map and addresses in it, name the
//! functions (demangled Rust and C++), their source file:line and the inlined calls at each
//! address. Built on `object` (ELF), `gimli` + `addr2line` (DWARF).
//!
//! - [`ProcessMaps`] parses `/proc/PID/maps` and says which files are mapped where and how to
//!   open them from outside the process's mount namespace.
//! - [`Symbolizer`] opens those files as [`Module`]s and caches them by file identity.
//! - [`Module`] answers: functions by symbol table, frames and source locations by DWARF,
//!   inlined call sites, USDT probes ([`UsdtProbe`]), and vaddr ↔ file offset translation for
//!   uprobes.
//! - [`go`] finds where to probe a Go function (after its stack check, and on its RET
//!   instructions: Go cannot take uretprobes), by decoding its machine code.
//!
//! Everything here reads untrusted files (any binary any process maps), so nothing panics on
//! input: a corrupt or truncated file is an error when it cannot be opened as ELF at all, and
//! otherwise yields fewer answers (no lines, no inlined frames), never a crash.
//!
//! Not supported: `.gnu_debugdata` (MiniDebugInfo; needs an xz decoder), split DWARF
//! (`.dwo`/`.dwp`), and debuginfod downloads.

mod debuginfo;
mod demangle;
mod dwarf;
mod elf;
mod error;
mod facts;
pub mod go;
mod maps;
mod module;
mod symbolizer;
mod usdt;

pub use demangle::{Demangled, demangle};
pub use dwarf::{InlineSite, MAX_DECOMPRESSED_SECTION_BYTES};
pub use elf::Function;
pub use error::SymbolizeError;
pub use facts::BinaryFacts;
pub use go::{GoCodeError, GoProbePoints};
pub use maps::{Mapping, ModuleMapping, Perms, ProcessMaps};
pub use module::{FRAME_CACHE_GENERATION_ENTRIES, Frame, Module};
pub use symbolizer::{DEFAULT_MODULE_CACHE_CAPACITY, Symbolizer};
pub use usdt::{ArgLocation, BadArgSpec, UsdtArg, UsdtProbe, parse_args as parse_usdt_args};
