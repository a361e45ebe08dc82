//! Finding separate debug information: by build-id, by `.gnu_debuglink`, and the `dwz`
//! supplementary file named by `.gnu_debugaltlink`.
//!
//! `.gnu_debugdata` (MiniDebugInfo, an xz-compressed ELF holding a reduced `.symtab`, used by
//! Fedora) is not read: decoding it needs an xz decoder, which is not among this crate's
//! dependencies. Such binaries still symbolize through `.dynsym` and, when installed, their
//! `-debuginfo` package found by build-id.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use object::Object;

use crate::elf::MappedFile;

/// Where distributions install separate debug files, relative to a root.
const DEBUG_DIR: &str = "usr/lib/debug";

/// Suffix the kernel appends to the paths of deleted files in `/proc/PID/maps` and in
/// `readlink(/proc/PID/map_files/…)`.
pub(crate) const DELETED_SUFFIX: &str = " (deleted)";

/// `abs` (a path as the target process sees it) under `root`: `/proc/42/root` +
/// `/usr/lib/x.so` → `/proc/42/root/usr/lib/x.so`. `..` components are dropped so a path read
/// from a file cannot climb out of `root`.
pub(crate) fn under_root(root: &Path, abs: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for component in abs.components() {
        if let Component::Normal(part) = component {
            out.push(part);
        }
    }
    out
}

/// The path of `opened` as the target process sees it, for searching next to it: the part
/// under `root` when `opened` is inside it, the link target of a `/proc/PID/map_files` entry
/// (without " (deleted)"), else `opened` itself.
pub(crate) fn logical_path(opened: &Path, root: &Path) -> PathBuf {
    if root != Path::new("/")
        && let Ok(inside) = opened.strip_prefix(root)
    {
        return Path::new("/").join(inside);
    }
    let is_map_files = opened
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|name| name == "map_files");
    if is_map_files && let Ok(target) = std::fs::read_link(opened) {
        let target = target.to_string_lossy();
        let target = Path::new(target.strip_suffix(DELETED_SUFFIX).unwrap_or(&target));
        if target.is_absolute() {
            return target.to_path_buf();
        }
    }
    opened.to_path_buf()
}

/// A separate debug file that was found and verified to belong to the binary.
pub(crate) struct DebugFile {
    pub(crate) file: MappedFile,
}

/// Finds the separate debug file for `main` (located at `logical` inside `root`).
///
/// Order: build-id under `ROOT/usr/lib/debug/.build-id/`, then `.gnu_debuglink` in
/// `ROOT/usr/lib/debug/<dir>/`, `<dir>/` and `<dir>/.debug/`. A candidate is accepted only if
/// it parses and belongs to `main`: same build-id, or, when either side has none, the CRC-32
/// recorded in `.gnu_debuglink`. (With both build-ids present they are compared instead of
/// reading the whole debug file for its CRC: equally strong, and far cheaper for large
/// debug files.)
pub(crate) fn find_debug_file(
    main: &object::File<'_>,
    main_file: &MappedFile,
    logical: &Path,
    root: &Path,
) -> Option<DebugFile> {
    let build_id = main.build_id().ok().flatten().filter(|id| !id.is_empty());

    if let Some(id) = build_id
        && let Some(path) = build_id_path(root, id)
        && let Some(found) = open_candidate(&path, main_file)
        && found_build_id(&found).as_deref() == Some(id)
    {
        return Some(DebugFile { file: found });
    }

    let (link_name, crc) = main.gnu_debuglink().ok().flatten()?;
    let link_name = std::str::from_utf8(link_name).ok()?;
    if link_name.is_empty() || link_name.contains('/') || link_name == "." || link_name == ".." {
        return None;
    }
    let dir = logical.parent().unwrap_or(Path::new("/"));
    let candidates = [
        under_root(&under_root(root, Path::new(DEBUG_DIR)), dir).join(link_name),
        under_root(root, dir).join(link_name),
        under_root(root, dir).join(".debug").join(link_name),
    ];
    for path in candidates {
        let Some(found) = open_candidate(&path, main_file) else {
            continue;
        };
        let belongs = match (build_id, found_build_id(&found)) {
            (Some(main_id), Some(debug_id)) => main_id == debug_id.as_slice(),
            _ => crc32(&found.map) == crc,
        };
        if belongs {
            return Some(DebugFile { file: found });
        }
    }
    None
}

/// `ROOT/usr/lib/debug/.build-id/ab/cdef….debug`.
fn build_id_path(root: &Path, id: &[u8]) -> Option<PathBuf> {
    let (first, rest) = id.split_first()?;
    if rest.is_empty() {
        return None;
    }
    let mut file = String::with_capacity(rest.len() * 2 + ".debug".len());
    for byte in rest {
        // Formatting into a String cannot fail.
        let _ = write!(file, "{byte:02x}");
    }
    file.push_str(".debug");
    Some(
        under_root(root, Path::new(DEBUG_DIR))
            .join(".build-id")
            .join(format!("{first:02x}"))
            .join(file),
    )
}

/// Opens a candidate debug file; `None` when it is missing, unreadable, not ELF, or the
/// binary itself.
fn open_candidate(path: &Path, main_file: &MappedFile) -> Option<MappedFile> {
    let found = MappedFile::open(path).ok()?;
    if found.dev == main_file.dev && found.ino == main_file.ino {
        return None;
    }
    found.parse().ok()?;
    Some(found)
}

fn found_build_id(file: &MappedFile) -> Option<Vec<u8>> {
    let parsed = file.parse().ok()?;
    parsed.build_id().ok().flatten().map(<[u8]>::to_vec)
}

/// The CRC-32 `.gnu_debuglink` records (the zlib polynomial).
fn crc32(data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(data);
    hasher.finalize()
}

/// Finds the `dwz` supplementary file named by `.gnu_debugaltlink` in `dwarf_file` (which was
/// opened at `dwarf_path`), verified by its build-id.
pub(crate) fn find_sup_file(
    dwarf_file: &object::File<'_>,
    dwarf_path: &Path,
    logical_dwarf_path: &Path,
    root: &Path,
) -> Option<MappedFile> {
    let (link, expected_id) = dwarf_file.gnu_debugaltlink().ok().flatten()?;
    let link = Path::new(std::str::from_utf8(link).ok()?);
    let path = if link.is_absolute() {
        under_root(root, link)
    } else {
        // Relative to the directory of the file holding the link, as the process sees it.
        let dir = logical_dwarf_path
            .parent()
            .or_else(|| dwarf_path.parent())
            .unwrap_or(Path::new("/"));
        under_root(root, &dir.join(link))
    };
    let found = MappedFile::open(&path).ok()?;
    (found_build_id(&found).as_deref() == Some(expected_id)).then_some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_root_cannot_escape() {
        assert_eq!(
            under_root(Path::new("/proc/1/root"), Path::new("/usr/lib/x.so")),
            PathBuf::from("/proc/1/root/usr/lib/x.so")
        );
        assert_eq!(
            under_root(Path::new("/r"), Path::new("/../../etc/shadow")),
            PathBuf::from("/r/etc/shadow")
        );
        assert_eq!(
            under_root(Path::new("/"), Path::new("/a/b")),
            PathBuf::from("/a/b")
        );
    }

    #[test]
    fn build_id_paths() {
        assert_eq!(
            build_id_path(Path::new("/"), &[0xab, 0xcd, 0x01]),
            Some(PathBuf::from("/usr/lib/debug/.build-id/ab/cd01.debug"))
        );
        assert_eq!(build_id_path(Path::new("/"), &[0xab]), None);
        assert_eq!(build_id_path(Path::new("/"), &[]), None);
    }

    #[test]
    fn logical_paths() {
        assert_eq!(
            logical_path(
                Path::new("/proc/7/root/usr/bin/x"),
                Path::new("/proc/7/root")
            ),
            PathBuf::from("/usr/bin/x")
        );
        assert_eq!(
            logical_path(Path::new("/usr/bin/x"), Path::new("/")),
            PathBuf::from("/usr/bin/x")
        );
    }
}
