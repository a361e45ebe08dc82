//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find where a field lives
//! in a kernel struct. The eBPF programs read a few kernel structs (a file descriptor's
//! socket, a TCP socket's sequence numbers); their layout differs between kernel builds, so
//! the daemon looks the offsets up here at start and hands them to the programs — the
//! relocation libbpf's CO-RE would do, done by hand because Rust eBPF cannot emit it yet.

use std::path::Path;

/// Where the running kernel describes its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: the kernel's BTF is needed to trace sockets and pipes")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the kernel BTF is malformed: {what}")]
    Malformed { what: &'static str },
    #[error("the kernel has no struct {name} in its BTF")]
    NoStruct { name: String },
    #[error("struct {structure} has no field {field} in this kernel's BTF")]
    NoField { structure: String, field: String },
}

/// BTF kinds this parser needs to tell apart.
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    /// Bit offset within the struct.
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// The referenced type for modifiers, typedefs and pointers.
    target: u32,
    members: Vec<Member>,
}

/// The parsed type section of a BTF blob.
pub struct Btf {
    /// Index = type id (0 is void).
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Btf, BtfError> {
        Btf::load(Path::new(VMLINUX_BTF))
    }

    pub fn load(path: &Path) -> Result<Btf, BtfError> {
        let bytes = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Btf::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        let malformed = |what| BtfError::Malformed { what };
        if u16_at(bytes, 0) != Some(MAGIC) {
            return Err(malformed("bad magic (not little-endian BTF)"));
        }
        let header_len = u32_at(bytes, 4).ok_or(malformed("short header"))? as usize;
        let type_off = u32_at(bytes, 8).ok_or(malformed("short header"))? as usize;
        let type_len = u32_at(bytes, 12).ok_or(malformed("short header"))? as usize;
        let str_off = u32_at(bytes, 16).ok_or(malformed("short header"))? as usize;
        let str_len = u32_at(bytes, 20).ok_or(malformed("short header"))? as usize;
        let type_start = header_len
            .checked_add(type_off)
            .ok_or(malformed("type section offset"))?;
        let type_end = type_start
            .checked_add(type_len)
            .ok_or(malformed("type section length"))?;
        let str_start = header_len
            .checked_add(str_off)
            .ok_or(malformed("string section offset"))?;
        let str_end = str_start
            .checked_add(str_len)
            .ok_or(malformed("string section length"))?;
        let section = bytes
            .get(type_start..type_end)
            .ok_or(malformed("type section out of bounds"))?;
        let strings = bytes
            .get(str_start..str_end)
            .ok_or(malformed("string section out of bounds"))?
            .to_vec();

        let mut types = vec![Type {
            name: 0,
            kind: 0,
            target: 0,
            members: Vec::new(),
        }];
        let mut at = 0usize;
        while at < section.len() {
            let name = u32_at(section, at).ok_or(malformed("truncated type"))?;
            let info = u32_at(section, at + 4).ok_or(malformed("truncated type"))?;
            let size_or_type = u32_at(section, at + 8).ok_or(malformed("truncated type"))?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                kind::INT | kind::VAR | kind::DECL_TAG => 4,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION => {
                    for i in 0..vlen {
                        let base = at + i * 12;
                        let member_name =
                            u32_at(section, base).ok_or(malformed("truncated member"))?;
                        let type_id =
                            u32_at(section, base + 4).ok_or(malformed("truncated member"))?;
                        let offset =
                            u32_at(section, base + 8).ok_or(malformed("truncated member"))?;
                        let bit_offset = if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        };
                        members.push(Member {
                            name: member_name,
                            type_id,
                            bit_offset,
                        });
                    }
                    vlen * 12
                }
                kind::ENUM | kind::FUNC_PROTO => vlen * 8,
                kind::DATASEC | kind::ENUM64 => vlen * 12,
                kind::PTR
                | kind::FWD
                | kind::TYPEDEF
                | kind::VOLATILE
                | kind::CONST
                | kind::RESTRICT
                | kind::FUNC
                | kind::FLOAT
                | kind::TYPE_TAG => 0,
                _ => return Err(malformed("unknown type kind")),
            };
            at += extra;
            types.push(Type {
                name,
                kind,
                target: size_or_type,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, offset: u32) -> &str {
        let Some(rest) = self.strings.get(offset as usize..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// The id of a struct by name.
    fn struct_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| {
                t.kind == kind::STRUCT && self.name(t.name) == name && !t.members.is_empty()
            })
            .map(|i| i as u32)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = ty.target
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// Bit offset of `field` in the struct/union `ty`, looking inside anonymous members.
    fn find(&self, ty: &Type, field: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        for member in &ty.members {
            if self.name(member.name) == field {
                return Some((member.bit_offset, member.type_id));
            }
        }
        for member in ty.members.iter().filter(|m| m.name == 0) {
            let inner = self.resolve(member.type_id)?;
            if matches!(inner.kind, kind::STRUCT | kind::UNION)
                && let Some((offset, type_id)) = self.find(inner, field, depth + 1)
            {
                return Some((member.bit_offset + offset, type_id));
            }
        }
        None
    }

    /// Byte offset of `path` (`field` or `outer.inner`, anonymous members searched) in
    /// `struct structure`.
    pub fn offset(&self, structure: &str, path: &str) -> Result<u32, BtfError> {
        let no_field = || BtfError::NoField {
            structure: structure.to_owned(),
            field: path.to_owned(),
        };
        let id = self
            .struct_id(structure)
            .ok_or_else(|| BtfError::NoStruct {
                name: structure.to_owned(),
            })?;
        let mut ty = self.types.get(id as usize).ok_or_else(no_field)?;
        let mut bits = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let (offset, type_id) = self.find(ty, part, 0).ok_or_else(no_field)?;
            bits += offset;
            if parts.peek().is_some() {
                ty = self
                    .resolve(type_id)
                    .filter(|t| matches!(t.kind, kind::STRUCT | kind::UNION))
                    .ok_or_else(no_field)?;
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(no_field()); // a bitfield: not something the programs can read
        }
        Ok(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_fields_of_the_running_kernel() {
        let btf = Btf::kernel().expect("this kernel has BTF (the programs need it too)");
        // Fields at known places on every kernel: sock_common starts struct sock.
        assert_eq!(
            btf.offset("sock", "__sk_common").expect("sock.__sk_common"),
            0
        );
        // Inside anonymous unions/structs.
        let daddr = btf.offset("sock_common", "skc_daddr").expect("skc_daddr");
        let rcv = btf
            .offset("sock_common", "skc_rcv_saddr")
            .expect("skc_rcv_saddr");
        assert_eq!(rcv, daddr + 4, "the address pair is laid out together");
        assert_eq!(
            btf.offset("sock", "__sk_common.skc_family").expect("path"),
            btf.offset("sock_common", "skc_family").expect("direct")
        );
        let files = btf
            .offset("task_struct", "files")
            .expect("task_struct.files");
        assert!(files > 0);
        assert!(btf.offset("tcp_sock", "write_seq").is_ok());
        assert!(btf.offset("unix_sock", "peer").is_ok());
        assert!(matches!(
            btf.offset("task_struct", "no_such_field"),
            Err(BtfError::NoField { .. })
        ));
        assert!(matches!(
            btf.offset("no_such_struct", "x"),
            Err(BtfError::NoStruct { .. })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Btf::parse(b"").is_err());
        assert!(
            Btf::parse(&[
                0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff
            ])
            .is_err()
        );
        let mut real = std::fs::read(VMLINUX_BTF).expect("kernel BTF");
        real.truncate(real.len() / 2);
        assert!(Btf::parse(&real).is_err());
    }
}
