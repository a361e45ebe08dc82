//! USDT probes (SystemTap SDT, `<sys/sdt.h>`): the `.note.stapsdt` notes a binary carries, one
//! per probe site, with the site's address, its semaphore and how to find each argument.
//!
//! A note's descriptor is three addresses (the probe's `nop`, the link-time address of
//! `.stapsdt.base`, the semaphore or 0) and three NUL-terminated strings: provider, name and
//! the argument specs. The addresses are link-time ones; if the binary was prelinked (moved)
//! after, `.stapsdt.base`'s address now differs from the recorded one by how far, and every
//! address moves by that much.
//!
//! Argument specs are GNU assembler operands with a size prefix, space-separated:
//! `-4@%eax` (a signed 4-byte register), `8@-8(%rbp)` (memory), `8@(%rax,%rbx,8)`,
//! `-4@$5` (a constant), `8@foo+16(%rip)` (RIP-relative data). x86-64 only.

use object::{Object, ObjectSection, ObjectSymbol};

/// One probe site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    /// ELF virtual address of the probe's `nop`.
    pub address: u64,
    /// ELF virtual address of its semaphore (a 2-byte counter tools raise while attached, so
    /// the program can skip preparing arguments nobody reads), if it has one.
    pub semaphore: Option<u64>,
    pub args: Vec<UsdtArg>,
    /// The argument specs as the note has them.
    pub arg_specs: String,
    /// ELF virtual addresses of the symbols RIP-relative arguments name (`counter(%rip)`),
    /// from the symbol table or the dynamic one; a symbol found in neither is missing.
    pub symbols: Vec<(String, u64)>,
}

/// One argument: its size and where its value is at the probe site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtArg {
    /// 1, 2, 4 or 8 bytes.
    pub size: u8,
    pub signed: bool,
    pub location: ArgLocation,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgLocation {
    /// A register, by its 64-bit name (`%eax`, `%ax` and `%al` are all `rax`).
    Register(&'static str),
    /// Memory at `base + index * scale + offset`; `symbol` is set for RIP-relative data
    /// (`foo+16(%rip)`), whose address is the symbol's plus `offset`.
    Memory {
        base: Option<&'static str>,
        index: Option<(&'static str, u8)>,
        offset: i64,
        symbol: Option<String>,
    },
    /// An immediate value.
    Constant(i64),
}

/// Why an argument spec could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unsupported USDT argument spec {spec:?}")]
pub struct BadArgSpec {
    pub spec: String,
}

/// The probes of an ELF file; empty without `.note.stapsdt`. Malformed notes are skipped.
pub fn probes(file: &object::File<'_>) -> Vec<UsdtProbe> {
    let Some(notes) = file
        .section_by_name(".note.stapsdt")
        .and_then(|s| s.data().ok())
    else {
        return Vec::new();
    };
    let base_now = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let little = file.is_little_endian();
    let mut probes = Vec::new();
    let mut rest = notes;
    while let Some(note) = next_note(rest, little) {
        rest = note.rest;
        if note.name != b"stapsdt" || note.kind != NT_STAPSDT {
            continue;
        }
        if let Some(probe) = parse_desc(note.desc, base_now, little) {
            probes.push(probe);
        }
    }
    resolve_symbols(file, &mut probes);
    probes
}

/// Fills each probe's `symbols` with the addresses of the data its arguments name.
fn resolve_symbols(file: &object::File<'_>, probes: &mut [UsdtProbe]) {
    let mut wanted: Vec<&str> = probes
        .iter()
        .flat_map(|p| p.args.iter())
        .filter_map(|a| match &a.location {
            ArgLocation::Memory {
                symbol: Some(name), ..
            } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return;
    }
    wanted.sort_unstable();
    wanted.dedup();
    let mut found: Vec<(String, u64)> = Vec::new();
    for symbol in file.symbols().chain(file.dynamic_symbols()) {
        let Ok(name) = symbol.name() else { continue };
        if symbol.is_definition()
            && wanted.binary_search(&name).is_ok()
            && !found.iter().any(|(n, _)| n == name)
        {
            found.push((name.to_owned(), symbol.address()));
        }
    }
    for probe in probes {
        probe.symbols = found
            .iter()
            .filter(|(name, _)| {
                probe.args.iter().any(|a| {
                    matches!(&a.location, ArgLocation::Memory { symbol: Some(s), .. } if s == name)
                })
            })
            .cloned()
            .collect();
    }
}

const NT_STAPSDT: u32 = 3;

fn u32_at(bytes: &[u8], at: usize, little: bool) -> Option<u32> {
    let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if little {
        u32::from_le_bytes(raw)
    } else {
        u32::from_be_bytes(raw)
    })
}

fn u64_at(bytes: &[u8], at: usize, little: bool) -> Option<u64> {
    let raw: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(if little {
        u64::from_le_bytes(raw)
    } else {
        u64::from_be_bytes(raw)
    })
}

/// One ELF note, and the notes after it.
struct Note<'a> {
    kind: u32,
    /// Without its NUL.
    name: &'a [u8],
    desc: &'a [u8],
    rest: &'a [u8],
}

fn next_note(bytes: &[u8], little: bool) -> Option<Note<'_>> {
    let align = |n: usize| n.checked_add(3).map(|n| n & !3);
    let name_size = u32_at(bytes, 0, little)? as usize;
    let desc_size = u32_at(bytes, 4, little)? as usize;
    let kind = u32_at(bytes, 8, little)?;
    let name_end = 12usize.checked_add(name_size)?;
    let name = bytes.get(12..name_end)?;
    let name = name.strip_suffix(&[0]).unwrap_or(name);
    let desc_start = 12usize.checked_add(align(name_size)?)?;
    let desc_end = desc_start.checked_add(desc_size)?;
    let desc = bytes.get(desc_start..desc_end)?;
    let rest = bytes.get(align(desc_end)?.min(bytes.len())..)?;
    Some(Note {
        kind,
        name,
        desc,
        rest,
    })
}

fn parse_desc(desc: &[u8], base_now: Option<u64>, little: bool) -> Option<UsdtProbe> {
    let pc = u64_at(desc, 0, little)?;
    let base = u64_at(desc, 8, little)?;
    let semaphore = u64_at(desc, 16, little)?;
    let mut strings = desc.get(24..)?.split(|&b| b == 0);
    let text = |s: Option<&[u8]>| s.map(|s| String::from_utf8_lossy(s).into_owned());
    let provider = text(strings.next())?;
    let name = text(strings.next())?;
    let arg_specs = text(strings.next()).unwrap_or_default();
    if provider.is_empty() || name.is_empty() {
        return None;
    }
    // Prelinking moves everything by the same amount as .stapsdt.base.
    let shift = |address: u64| match base_now {
        Some(now) if base != 0 => address.wrapping_add(now.wrapping_sub(base)),
        _ => address,
    };
    let args = parse_args(&arg_specs).unwrap_or_default();
    Some(UsdtProbe {
        provider,
        name,
        address: shift(pc),
        semaphore: (semaphore != 0).then(|| shift(semaphore)),
        args,
        arg_specs,
        symbols: Vec::new(),
    })
}

/// Parses a note's argument specs (`-4@%eax 8@-8(%rbp)`).
pub fn parse_args(specs: &str) -> Result<Vec<UsdtArg>, BadArgSpec> {
    specs.split_whitespace().map(parse_arg).collect()
}

fn parse_arg(spec: &str) -> Result<UsdtArg, BadArgSpec> {
    let bad = || BadArgSpec {
        spec: spec.to_owned(),
    };
    // Old notes may omit the size: `%eax`. Then it is 8 bytes, unsigned.
    let (size, operand) = match spec.split_once('@') {
        Some((size, operand)) => (size.parse::<i8>().map_err(|_| bad())?, operand),
        None => (8, spec),
    };
    let signed = size < 0;
    let size = size.unsigned_abs();
    if ![1, 2, 4, 8].contains(&size) {
        return Err(bad());
    }
    let location = parse_operand(operand).ok_or_else(bad)?;
    Ok(UsdtArg {
        size,
        signed,
        location,
    })
}

fn parse_operand(operand: &str) -> Option<ArgLocation> {
    if let Some(register) = operand.strip_prefix('%') {
        return register64(register).map(ArgLocation::Register);
    }
    if let Some(value) = operand.strip_prefix('$') {
        return parse_int(value).map(ArgLocation::Constant);
    }
    // [displacement](base[,index[,scale]])
    let (displacement, inside) = match operand.split_once('(') {
        Some((displacement, rest)) => (displacement, Some(rest.strip_suffix(')')?)),
        None => (operand, None),
    };
    // The displacement: a sum of numbers and at most one symbol (`-8`, `foo+16`,
    // `40+CheckpointStats`).
    let (mut offset, mut symbol) = (0i64, None::<String>);
    let mut term_start = 0;
    let bytes = displacement.as_bytes();
    for end in 1..=bytes.len() {
        if end < bytes.len() && !matches!(bytes[end], b'+' | b'-') {
            continue;
        }
        let term = &displacement[term_start..end];
        term_start = end;
        if let Some(value) = parse_int(term) {
            offset = offset.checked_add(value)?;
            continue;
        }
        let name = term.strip_prefix('+').unwrap_or(term);
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$'));
        if !valid || symbol.is_some() {
            return None;
        }
        symbol = Some(name.to_owned());
    }
    let (base, index) = match inside {
        None => (None, None),
        Some(inside) => {
            let mut parts = inside.split(',').map(str::trim);
            let base = match parts.next()? {
                "" => None,
                base => Some(register64(base.strip_prefix('%')?)?),
            };
            let index = match parts.next() {
                None => None,
                Some(index) => {
                    let index = register64(index.strip_prefix('%')?)?;
                    let scale: u8 = match parts.next() {
                        None => 1,
                        Some(scale) => scale.parse().ok()?,
                    };
                    if ![1, 2, 4, 8].contains(&scale) {
                        return None;
                    }
                    Some((index, scale))
                }
            };
            if parts.next().is_some() {
                return None;
            }
            (base, index)
        }
    };
    if symbol.is_some() && base != Some("rip") {
        // An absolute symbol address: not something a position-independent probe uses.
        return None;
    }
    Some(ArgLocation::Memory {
        base,
        index,
        offset,
        symbol,
    })
}

/// `16`, `-8`, `0x10`, `-0x10`.
fn parse_int(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let value = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<i64>().ok()?,
    };
    Some(if negative {
        value.checked_neg()?
    } else {
        value
    })
}

/// The 64-bit register a register name is part of.
fn register64(name: &str) -> Option<&'static str> {
    const REGISTERS: [(&str, [&str; 4]); 17] = [
        ("rax", ["rax", "eax", "ax", "al"]),
        ("rbx", ["rbx", "ebx", "bx", "bl"]),
        ("rcx", ["rcx", "ecx", "cx", "cl"]),
        ("rdx", ["rdx", "edx", "dx", "dl"]),
        ("rsi", ["rsi", "esi", "si", "sil"]),
        ("rdi", ["rdi", "edi", "di", "dil"]),
        ("rbp", ["rbp", "ebp", "bp", "bpl"]),
        ("rsp", ["rsp", "esp", "sp", "spl"]),
        ("r8", ["r8", "r8d", "r8w", "r8b"]),
        ("r9", ["r9", "r9d", "r9w", "r9b"]),
        ("r10", ["r10", "r10d", "r10w", "r10b"]),
        ("r11", ["r11", "r11d", "r11w", "r11b"]),
        ("r12", ["r12", "r12d", "r12w", "r12b"]),
        ("r13", ["r13", "r13d", "r13w", "r13b"]),
        ("r14", ["r14", "r14d", "r14w", "r14b"]),
        ("r15", ["r15", "r15d", "r15w", "r15b"]),
        ("rip", ["rip", "eip", "ip", "ip"]),
    ];
    let high_byte = |name: &str| match name {
        "ah" => Some("rax"),
        "bh" => Some("rbx"),
        "ch" => Some("rcx"),
        "dh" => Some("rdx"),
        _ => None,
    };
    REGISTERS
        .iter()
        .find(|(_, names)| names.contains(&name))
        .map(|(full, _)| *full)
        .or_else(|| high_byte(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(spec: &str) -> UsdtArg {
        parse_arg(spec).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn register_memory_and_constant_specs_parse() {
        assert_eq!(
            arg("-4@%eax"),
            UsdtArg {
                size: 4,
                signed: true,
                location: ArgLocation::Register("rax")
            }
        );
        assert_eq!(arg("8@%r12").location, ArgLocation::Register("r12"));
        assert_eq!(arg("1@%sil").location, ArgLocation::Register("rsi"));
        assert_eq!(
            arg("8@-8(%rbp)").location,
            ArgLocation::Memory {
                base: Some("rbp"),
                index: None,
                offset: -8,
                symbol: None
            }
        );
        assert_eq!(
            arg("8@(%rax,%rbx,8)").location,
            ArgLocation::Memory {
                base: Some("rax"),
                index: Some(("rbx", 8)),
                offset: 0,
                symbol: None
            }
        );
        assert_eq!(
            arg("-4@0x10(,%rcx,4)").location,
            ArgLocation::Memory {
                base: None,
                index: Some(("rcx", 4)),
                offset: 16,
                symbol: None
            }
        );
        assert_eq!(arg("-4@$5").location, ArgLocation::Constant(5));
        assert_eq!(arg("-8@$-1").location, ArgLocation::Constant(-1));
        assert_eq!(
            arg("8@counter+16(%rip)").location,
            ArgLocation::Memory {
                base: Some("rip"),
                index: None,
                offset: 16,
                symbol: Some("counter".into())
            }
        );
        assert_eq!(arg("%eax").size, 8, "a spec without a size is 8 bytes");
        assert_eq!(
            arg("-4@40+CheckpointStats(%rip)").location,
            ArgLocation::Memory {
                base: Some("rip"),
                index: None,
                offset: 40,
                symbol: Some("CheckpointStats".into())
            }
        );
        assert_eq!(
            arg("-4@NBuffers(%rip)").location,
            ArgLocation::Memory {
                base: Some("rip"),
                index: None,
                offset: 0,
                symbol: Some("NBuffers".into())
            }
        );
    }

    #[test]
    fn nonsense_specs_are_errors_not_panics() {
        for spec in [
            "3@%eax",
            "8@%xmm0",
            "8@(%rax",
            "8@(%rax,%rbx,3)",
            "8@$",
            "x@%eax",
            "8@foo(%rax)",
            "8@(,,)",
            "-128@%eax",
            "8@a+b(%rip)",
            "8@-(%rip)",
        ] {
            assert!(parse_arg(spec).is_err(), "{spec}");
        }
        assert!(parse_args("8@%rdi -4@%esi").is_ok());
    }

    #[test]
    fn truncated_and_hostile_notes_are_skipped() {
        // namesz larger than the section, descsz overflowing, empty strings.
        assert!(next_note(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 3, 0, 0, 0], true).is_none());
        let mut note = Vec::new();
        note.extend(8u32.to_le_bytes());
        note.extend(u32::MAX.to_le_bytes());
        note.extend(3u32.to_le_bytes());
        note.extend(b"stapsdt\0");
        assert!(next_note(&note, true).is_none());
        assert!(parse_desc(&[0; 24], None, true).is_none());
        assert!(parse_desc(&[0; 10], None, true).is_none());
    }
}
