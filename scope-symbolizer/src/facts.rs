//! What a binary says about how it was built: the toolchains in `.comment`, the libraries it
//! needs (`DT_NEEDED`), whether it keeps a symbol table, and Go's build info. Read once when
//! a module is opened, for `scope analyze`.

use object::{Object, ObjectSection};

/// Build facts of one ELF file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BinaryFacts {
    /// `.comment` strings: compilers and linkers (`GCC: (Debian 12.2.0-14) 12.2.0`, `rustc
    /// version 1.95.0`, `clang version 19`), deduplicated, in file order.
    pub comments: Vec<String>,
    /// Libraries it needs, as `DT_NEEDED` names them (`libc.so.6`).
    pub needed: Vec<String>,
    /// Whether it has a `.symtab` (not stripped).
    pub has_symtab: bool,
    /// The Go version in `.go.buildinfo` (`go1.19.8`), for a Go binary.
    pub go_version: Option<String>,
    /// Built by Go: it has Go's build info or its function table (`.gopclntab`), also when
    /// the build info names no version (before Go 1.18). Tracing treats its functions as Go
    /// code (no uretprobes).
    pub go: bool,
    /// The program interpreter (`/lib64/ld-linux-x86-64.so.2`), for a dynamically linked
    /// executable.
    pub interpreter: Option<String>,
}

pub(crate) fn read(file: &object::File<'_>) -> BinaryFacts {
    let section = |name: &str| file.section_by_name(name).and_then(|s| s.data().ok());
    let mut comments: Vec<String> = Vec::new();
    for text in section(".comment")
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).trim().to_owned())
    {
        if !comments.contains(&text) {
            comments.push(text);
        }
    }
    let go_version = section(".go.buildinfo").and_then(go_version);
    let go = go_version.is_some()
        || file.section_by_name(".go.buildinfo").is_some()
        || file.section_by_name(".gopclntab").is_some();
    let interpreter = section(".interp").map(|bytes| {
        String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
    });
    BinaryFacts {
        comments,
        needed: needed(file),
        has_symtab: file.symbol_table().is_some(),
        go_version,
        go,
        interpreter,
    }
}

/// `go1.N[.M]` in the build info (inline in the section since Go 1.18; older binaries point
/// elsewhere and get no version).
fn go_version(bytes: &[u8]) -> Option<String> {
    let bytes = &bytes[..bytes.len().min(64 * 1024)];
    let start = bytes.windows(4).position(|w| w == b"go1.")?;
    let version: String = bytes[start..]
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b == b'.')
        .map(|&b| b as char)
        .collect();
    (version.len() > 4).then_some(version)
}

/// `DT_NEEDED` names from `.dynamic` and `.dynstr` (64-bit little-endian entries).
fn needed(file: &object::File<'_>) -> Vec<String> {
    let (Some(dynamic), Some(strings)) = (
        file.section_by_name(".dynamic").and_then(|s| s.data().ok()),
        file.section_by_name(".dynstr").and_then(|s| s.data().ok()),
    ) else {
        return Vec::new();
    };
    if !file.is_64() || !file.is_little_endian() {
        return Vec::new();
    }
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    let mut names = Vec::new();
    for entry in dynamic.chunks_exact(16) {
        let tag = u64::from_le_bytes(entry[..8].try_into().unwrap_or_default());
        let value = u64::from_le_bytes(entry[8..].try_into().unwrap_or_default());
        if tag == DT_NULL {
            break;
        }
        if tag != DT_NEEDED {
            continue;
        }
        let Some(name) = usize::try_from(value)
            .ok()
            .and_then(|at| strings.get(at..))
            .and_then(|rest| rest.split(|&b| b == 0).next())
        else {
            continue;
        };
        names.push(String::from_utf8_lossy(name).into_owned());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_versions_are_found_in_build_info() {
        let mut info = b"\xff Go buildinf:\x08\x02".to_vec();
        info.extend(b"\x08go1.19.8\x00more");
        assert_eq!(go_version(&info).as_deref(), Some("go1.19.8"));
        assert_eq!(go_version(b"no version here"), None);
        assert_eq!(go_version(b"go1."), None);
    }
}
