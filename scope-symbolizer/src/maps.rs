//! `/proc/PID/maps`: which file is mapped where in a process.

use std::io;
use std::path::{Path, PathBuf};

use crate::debuginfo::{DELETED_SUFFIX, under_root};
use crate::error::SymbolizeError;

/// Access permissions of a mapping (the `rwxp` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms {
    /// `r`
    pub read: bool,
    /// `w`
    pub write: bool,
    /// `x`
    pub execute: bool,
    /// `s` (shared) rather than `p` (private, copy-on-write).
    pub shared: bool,
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// First address (inclusive).
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Access permissions.
    pub perms: Perms,
    /// Offset into the file of `start`.
    pub offset: u64,
    /// Device (major, minor) of the file; (0, 0) when anonymous.
    pub dev: (u32, u32),
    /// Inode of the file; 0 when anonymous.
    pub inode: u64,
    /// The file path as the process sees it, without " (deleted)", or a pseudo-name such as
    /// `[heap]`, `[stack]`, `[vdso]` or `[anon:name]`; `None` for anonymous memory.
    pub path: Option<String>,
    /// The file was deleted (or replaced) after it was mapped.
    pub deleted: bool,
}

impl Mapping {
    /// Backed by a file (not anonymous memory or a `[pseudo]` region).
    pub fn is_file_backed(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    /// Whether `addr` lies in this mapping.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// An executable file mapped into a process, with how to open it from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleMapping {
    /// The path as the process sees it (from maps, without " (deleted)").
    pub path: String,
    /// How to open the file from the daemon: `/proc/PID/root/<path>`, or
    /// `/proc/PID/map_files/START-END` when the file was deleted or replaced.
    pub open_path: PathBuf,
    /// The mapped file was deleted or replaced on disk.
    pub deleted: bool,
    /// Device of the mapped file.
    pub dev: (u32, u32),
    /// Inode of the mapped file.
    pub inode: u64,
    /// This is the process's main executable (`/proc/PID/exe`).
    pub is_main: bool,
    /// The first executable mapping of the file: start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// File offset at `start`.
    pub offset: u64,
}

/// The parsed memory map of one process, sorted by address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessMaps {
    /// All mappings, sorted by start address.
    pub mappings: Vec<Mapping>,
}

impl ProcessMaps {
    /// Reads and parses `/proc/PID/maps`.
    pub fn read(pid: u32) -> Result<Self, SymbolizeError> {
        let path = PathBuf::from(format!("/proc/{pid}/maps"));
        let bytes = std::fs::read(&path).map_err(|source| {
            // ESRCH: the process exited between open and read.
            const ESRCH: i32 = 3;
            match source.kind() {
                io::ErrorKind::NotFound => SymbolizeError::ProcessNotFound {
                    pid,
                    path: path.clone(),
                },
                _ if source.raw_os_error() == Some(ESRCH) => SymbolizeError::ProcessNotFound {
                    pid,
                    path: path.clone(),
                },
                io::ErrorKind::PermissionDenied => SymbolizeError::ProcessAccess {
                    pid,
                    path: path.clone(),
                    source,
                },
                _ => SymbolizeError::ReadMaps {
                    pid,
                    path: path.clone(),
                    source,
                },
            }
        })?;
        // Paths are bytes; one that is not UTF-8 is shown lossily (and then cannot be opened
        // by name, but map_files still works for it).
        Self::parse(&String::from_utf8_lossy(&bytes))
    }

    /// Parses the text of a maps file. Empty lines are skipped; any other malformed line is an
    /// error naming it.
    pub fn parse(text: &str) -> Result<Self, SymbolizeError> {
        let mut mappings = Vec::new();
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mapping = parse_line(line).map_err(|reason| SymbolizeError::MapsLine {
                line_number: index + 1,
                line: line.to_owned(),
                reason,
            })?;
            mappings.push(mapping);
        }
        mappings.sort_by_key(|m| m.start);
        Ok(ProcessMaps { mappings })
    }

    /// File-backed executable mappings, one entry per distinct file, the main executable first
    /// (the rest in address order), each with the path to open it through `/proc/PID/root`
    /// (or `/proc/PID/map_files/START-END` when the file was deleted).
    pub fn executable_modules(&self, pid: u32) -> Vec<ModuleMapping> {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|target| {
                let target = target.to_string_lossy().into_owned();
                match target.strip_suffix(DELETED_SUFFIX) {
                    Some(stripped) => stripped.to_owned(),
                    None => target,
                }
            });
        self.executable_modules_with_exe(pid, exe.as_deref())
    }

    /// [`executable_modules`](Self::executable_modules) with the main executable's path given
    /// (pure; for tests and for callers that already read `/proc/PID/exe`).
    pub fn executable_modules_with_exe(&self, pid: u32, exe: Option<&str>) -> Vec<ModuleMapping> {
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let mut modules: Vec<ModuleMapping> = Vec::new();
        for mapping in &self.mappings {
            if !mapping.perms.execute || !mapping.is_file_backed() {
                continue;
            }
            let Some(path) = mapping.path.as_deref() else {
                continue;
            };
            let seen = modules
                .iter()
                .any(|m| m.path == path && m.inode == mapping.inode && m.dev == mapping.dev);
            if seen {
                continue;
            }
            let open_path = if mapping.deleted {
                PathBuf::from(format!(
                    "/proc/{pid}/map_files/{:x}-{:x}",
                    mapping.start, mapping.end
                ))
            } else {
                under_root(&root, Path::new(path))
            };
            modules.push(ModuleMapping {
                path: path.to_owned(),
                open_path,
                deleted: mapping.deleted,
                dev: mapping.dev,
                inode: mapping.inode,
                is_main: exe == Some(path),
                start: mapping.start,
                end: mapping.end,
                offset: mapping.offset,
            });
        }
        // Stable: the others keep address order.
        modules.sort_by_key(|m| !m.is_main);
        modules
    }

    /// The mapping containing the runtime address `addr`, and the file offset it corresponds
    /// to (meaningful for file-backed mappings).
    pub fn lookup(&self, addr: u64) -> Option<(&Mapping, u64)> {
        let index = self
            .mappings
            .partition_point(|m| m.start <= addr)
            .checked_sub(1)?;
        let mapping = self.mappings.get(index)?;
        if !mapping.contains(addr) {
            return None;
        }
        let offset = mapping.offset.checked_add(addr - mapping.start)?;
        Some((mapping, offset))
    }
}

/// Parses `start-end perms offset major:minor inode [path]`.
fn parse_line(line: &str) -> Result<Mapping, &'static str> {
    let mut rest = line;
    let mut field = |what: &'static str| -> Result<&str, &'static str> {
        let trimmed = rest.trim_start_matches(' ');
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (value, tail) = trimmed.split_at(end);
        if value.is_empty() {
            return Err(what);
        }
        rest = tail;
        Ok(value)
    };

    let range = field("missing address range")?;
    let perms = field("missing permissions")?;
    let offset = field("missing offset")?;
    let dev = field("missing device")?;
    let inode = field("missing inode")?;

    let (start, end) = range.split_once('-').ok_or("address range without '-'")?;
    let start = u64::from_str_radix(start, 16).map_err(|_| "start address is not hex")?;
    let end = u64::from_str_radix(end, 16).map_err(|_| "end address is not hex")?;
    if end < start {
        return Err("end address before start address");
    }
    let perms = parse_perms(perms)?;
    let offset = u64::from_str_radix(offset, 16).map_err(|_| "offset is not hex")?;
    let (major, minor) = dev.split_once(':').ok_or("device without ':'")?;
    let major = u32::from_str_radix(major, 16).map_err(|_| "device major is not hex")?;
    let minor = u32::from_str_radix(minor, 16).map_err(|_| "device minor is not hex")?;
    let inode: u64 = inode.parse().map_err(|_| "inode is not a decimal number")?;

    // The path is the rest of the line after the padding, and may itself contain spaces.
    let path = rest.trim_start_matches(' ');
    let (path, deleted) = match path.strip_suffix(DELETED_SUFFIX) {
        Some(stripped) => (stripped, true),
        None => (path, false),
    };
    let path = (!path.is_empty()).then(|| unescape_newlines(path));

    Ok(Mapping {
        start,
        end,
        perms,
        offset,
        dev: (major, minor),
        inode,
        path,
        deleted,
    })
}

fn parse_perms(perms: &str) -> Result<Perms, &'static str> {
    let &[r, w, x, s] = perms.as_bytes() else {
        return Err("permissions are not 4 characters");
    };
    let flag = |c: u8, set: u8| match c {
        b'-' => Ok(false),
        c if c == set => Ok(true),
        _ => Err("unknown permission character"),
    };
    Ok(Perms {
        read: flag(r, b'r')?,
        write: flag(w, b'w')?,
        execute: flag(x, b'x')?,
        shared: match s {
            b's' => true,
            b'p' => false,
            _ => return Err("sharing flag is neither 's' nor 'p'"),
        },
    })
}

/// The kernel writes a newline in a mapped path as `\012` (it would otherwise end the line).
fn unescape_newlines(path: &str) -> String {
    path.replace("\\012", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0a0e00000-55d0a0e2a000 r--p 00000000 08:01 1234567                    /usr/bin/redis-server
55d0a0e2a000-55d0a0f6b000 r-xp 0002a000 08:01 1234567                    /usr/bin/redis-server
55d0a1200000-55d0a1400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000020000 r-xp 00000000 fd:02 42                         /opt/my app/lib with spaces.so
7f0000100000-7f0000101000 r-xp 00001000 fd:02 43                         /tmp/old.so (deleted)
7f0000200000-7f0000210000 rw-p 00000000 00:00 0 
7f0000300000-7f0000310000 rw-s 00000000 00:05 77                         /dev/zero (deleted)
7f0000400000-7f0000401000 r-xp 00000000 fd:02 44                         /tmp/new\\012line.so
7fff00000000-7fff00002000 r-xp 00000000 00:00 0                          [vdso]
7fff00003000-7fff00004000 r--p 00000000 00:00 0                          [anon:scope buffer]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_hand_written_lines() {
        let maps = ProcessMaps::parse(SAMPLE).expect("sample parses");
        assert_eq!(maps.mappings.len(), 11);

        let text = &maps.mappings[1];
        assert_eq!(text.start, 0x55d0a0e2a000);
        assert_eq!(text.end, 0x55d0a0f6b000);
        assert_eq!(
            text.perms,
            Perms {
                read: true,
                write: false,
                execute: true,
                shared: false
            }
        );
        assert_eq!(text.offset, 0x2a000);
        assert_eq!(text.dev, (8, 1));
        assert_eq!(text.inode, 1234567);
        assert_eq!(text.path.as_deref(), Some("/usr/bin/redis-server"));
        assert!(!text.deleted);
        assert!(text.is_file_backed());

        let heap = &maps.mappings[2];
        assert_eq!(heap.path.as_deref(), Some("[heap]"));
        assert!(!heap.is_file_backed());

        let spaces = &maps.mappings[3];
        assert_eq!(
            spaces.path.as_deref(),
            Some("/opt/my app/lib with spaces.so")
        );
        assert_eq!(spaces.dev, (0xfd, 2));

        let deleted = &maps.mappings[4];
        assert_eq!(deleted.path.as_deref(), Some("/tmp/old.so"));
        assert!(deleted.deleted);

        let anonymous = &maps.mappings[5];
        assert_eq!(anonymous.path, None);
        assert!(!anonymous.is_file_backed());

        assert!(maps.mappings[6].perms.shared);
        assert_eq!(maps.mappings[7].path.as_deref(), Some("/tmp/new\nline.so"));
        assert_eq!(maps.mappings[8].path.as_deref(), Some("[vdso]"));
        assert!(!maps.mappings[8].is_file_backed());
        assert_eq!(
            maps.mappings[9].path.as_deref(),
            Some("[anon:scope buffer]")
        );
        assert_eq!(maps.mappings[10].end, 0xffffffffff601000);
    }

    #[test]
    fn executable_modules_main_first_deleted_through_map_files() {
        let maps = ProcessMaps::parse(SAMPLE).expect("sample parses");
        let modules = maps.executable_modules_with_exe(77, Some("/usr/bin/redis-server"));
        let paths: Vec<&str> = modules.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/usr/bin/redis-server",
                "/opt/my app/lib with spaces.so",
                "/tmp/old.so",
                "/tmp/new\nline.so"
            ]
        );
        assert!(modules[0].is_main);
        assert_eq!(modules[0].start, 0x55d0a0e2a000);
        assert_eq!(modules[0].offset, 0x2a000);
        assert_eq!(
            modules[0].open_path,
            PathBuf::from("/proc/77/root/usr/bin/redis-server")
        );
        assert_eq!(
            modules[1].open_path,
            PathBuf::from("/proc/77/root/opt/my app/lib with spaces.so")
        );
        assert!(modules[2].deleted);
        assert_eq!(
            modules[2].open_path,
            PathBuf::from("/proc/77/map_files/7f0000100000-7f0000101000")
        );

        // Main executable listed last in the maps still comes first.
        let modules = maps.executable_modules_with_exe(77, Some("/tmp/old.so"));
        assert_eq!(modules[0].path, "/tmp/old.so");
        assert!(modules[0].is_main);
        assert_eq!(modules[1].path, "/usr/bin/redis-server");
    }

    #[test]
    fn lookup_gives_mapping_and_file_offset() {
        let maps = ProcessMaps::parse(SAMPLE).expect("sample parses");
        let (mapping, offset) = maps.lookup(0x55d0a0e2a010).expect("in text");
        assert_eq!(mapping.path.as_deref(), Some("/usr/bin/redis-server"));
        assert_eq!(offset, 0x2a010);
        let (_, offset) = maps.lookup(0x55d0a0e00000).expect("first byte");
        assert_eq!(offset, 0);
        assert!(maps.lookup(0x55d0a0f6b000).is_none(), "gap after text");
        assert!(maps.lookup(0).is_none());
        assert!(maps.lookup(u64::MAX).is_none());
    }

    #[test]
    fn malformed_lines_are_errors_naming_the_line() {
        for (text, line_number) in [
            ("garbage\n", 1),
            ("\n55d0a0e00000-55d0a0e2a000 r--p 00000000 08:01\n", 2),
            ("zz-10 r--p 00000000 08:01 1 /x\n", 1),
            ("10-zz r--p 00000000 08:01 1 /x\n", 1),
            ("20-10 r--p 00000000 08:01 1 /x\n", 1),
            ("10-20 rwx 00000000 08:01 1 /x\n", 1),
            ("10-20 rwxq 00000000 08:01 1 /x\n", 1),
            ("10-20 r--p 0000000g 08:01 1 /x\n", 1),
            ("10-20 r--p 00000000 0801 1 /x\n", 1),
            ("10-20 r--p 00000000 08:01 x /x\n", 1),
            ("10-20 r--p 00000000 08:01 99999999999999999999999 /x\n", 1),
            ("10-20 r\u{e9}-p 00000000 08:01 1 /x\n", 1),
        ] {
            match ProcessMaps::parse(text) {
                Err(SymbolizeError::MapsLine { line_number: n, .. }) => {
                    assert_eq!(n, line_number, "{text:?}")
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        assert_eq!(ProcessMaps::parse("").expect("empty").mappings, []);
    }

    #[test]
    fn reads_own_maps() {
        let pid = std::process::id();
        let maps = ProcessMaps::read(pid).expect("own maps are readable");
        assert!(maps.mappings.len() > 5);
        assert!(maps.mappings.windows(2).all(|w| w[0].start <= w[1].start));
        let modules = maps.executable_modules(pid);
        let main = modules.first().expect("at least the test binary");
        assert!(main.is_main, "{modules:#?}");
        let exe = std::env::current_exe().expect("current_exe");
        assert_eq!(Path::new(&main.path), exe);
        assert!(main.open_path.starts_with(format!("/proc/{pid}/root")));
        assert!(main.open_path.exists());
        assert!(modules.iter().any(|m| m.path.contains("libc.so")));

        // An address in our own code maps back into the test binary.
        let here = reads_own_maps as *const () as usize as u64;
        let (mapping, _) = maps.lookup(here).expect("own code is mapped");
        assert_eq!(mapping.path.as_deref().map(Path::new), Some(exe.as_path()));
        assert!(mapping.perms.execute);
    }

    #[test]
    fn missing_process_is_a_clear_error() {
        // Above the kernel's PID_MAX_LIMIT (4194304), so it cannot exist.
        let err = ProcessMaps::read(4_194_305 + 17).expect_err("no such process");
        assert!(
            matches!(err, SymbolizeError::ProcessNotFound { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
