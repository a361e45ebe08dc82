//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while opening an object file or reading a process's maps.
///
/// Problems *inside* debug information (corrupt DWARF, a missing line table, a bogus
/// offset) are not errors: they degrade the answer (no file:line, no inlined frames) because
/// a trace with function names and no lines is still useful.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SymbolizeError {
    /// The file could not be opened or `fstat`ed.
    #[error(
        "cannot open {}: {source}; check that the file exists and that scoped may read it",
        path.display()
    )]
    Open {
        /// The path that was opened.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// The file was opened but could not be mapped into memory.
    #[error("cannot map {} into memory: {source}", path.display())]
    Map {
        /// The path that was mapped.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// The file has no bytes at all.
    #[error("{} is empty; expected an ELF executable or shared library", path.display())]
    Empty {
        /// The empty file.
        path: PathBuf,
    },

    /// The path names a directory, device, FIFO or socket.
    #[error("{} is not a regular file; expected an ELF executable or shared library", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },

    /// The file does not start with the ELF magic (a script, a PE or Mach-O file, text, ...).
    #[error(
        "{} is not an ELF file (no ELF magic); only ELF executables and shared libraries can be symbolized",
        path.display()
    )]
    NotElf {
        /// The file.
        path: PathBuf,
    },

    /// The file is not a parseable object file: not an object at all, truncated or corrupt.
    #[error(
        "cannot parse {} as ELF: {source}; the file is not an executable or shared library, or it is truncated or corrupt",
        path.display()
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// What `object` found wrong.
        #[source]
        source: object::read::Error,
    },

    /// `/proc/PID` does not exist.
    #[error("process {pid} does not exist (no {}); it may have exited", path.display())]
    ProcessNotFound {
        /// The process id that was asked for.
        pid: u32,
        /// The procfs file that was missing.
        path: PathBuf,
    },

    /// `/proc/PID/maps` exists but may not be read by us.
    #[error(
        "permission denied reading {}: {source}; scoped must run as root (or with CAP_SYS_PTRACE) to read another user's process",
        path.display()
    )]
    ProcessAccess {
        /// The process id.
        pid: u32,
        /// The procfs file.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// Reading `/proc/PID/maps` failed for another reason.
    #[error("cannot read {}: {source}", path.display())]
    ReadMaps {
        /// The process id.
        pid: u32,
        /// The procfs file.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// A line of a maps file does not have the `start-end perms offset dev inode [path]` shape.
    #[error("line {line_number} of the process maps is malformed ({reason}): {line:?}")]
    MapsLine {
        /// 1-based line number.
        line_number: usize,
        /// The offending line.
        line: String,
        /// Which field was wrong.
        reason: &'static str,
    },
}
