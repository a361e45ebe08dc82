//! Real system libraries, checked against `readelf` and against this very process's memory.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::run;
use scope_symbolizer::{ProcessMaps, Symbolizer};

unsafe extern "C" {
    fn malloc(size: usize) -> *mut u8;
    fn write(fd: i32, buf: *const u8, count: usize) -> isize;
}

/// The libc this test process runs on, found in its own maps.
fn own_libc(maps: &ProcessMaps) -> PathBuf {
    let path = maps
        .mappings
        .iter()
        .filter_map(|m| m.path.as_deref())
        .find(|p| p.contains("/libc.so"))
        .expect("this process maps a libc.so");
    PathBuf::from(path)
}

/// `readelf -l`: (offset, vaddr, filesz) of each LOAD segment.
fn readelf_loads(path: &Path) -> Vec<(u64, u64, u64)> {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex field");
    run(Command::new("readelf").arg("-lW").arg(path))
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&"LOAD"))
                .then(|| (hex(fields[1]), hex(fields[2]), hex(fields[4])))
        })
        .collect()
}

/// `readelf --dyn-syms`: the value of the function symbol `name` (any version).
fn readelf_symbol(path: &Path, name: &str) -> u64 {
    run(Command::new("readelf")
        .arg("-W")
        .arg("--dyn-syms")
        .arg(path))
    .lines()
    .find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let symbol = fields.get(7)?.split('@').next()?;
        (symbol == name && fields.get(3) == Some(&"FUNC"))
            .then(|| u64::from_str_radix(fields[1], 16).expect("hex value"))
    })
    .unwrap_or_else(|| panic!("readelf shows no {name} in {}", path.display()))
}

#[test]
fn libc_functions_have_correct_file_offsets() {
    let pid = std::process::id();
    let maps = ProcessMaps::read(pid).expect("own maps");
    let libc = own_libc(&maps);
    let module = Symbolizer::new().module(&libc).expect("libc parses");
    assert!(module.is_pie_or_shared());
    assert!(module.build_id().is_some());
    let loads = readelf_loads(&libc);
    assert!(!loads.is_empty());

    let runtime = [
        ("malloc", malloc as *const () as u64),
        ("write", write as *const () as u64),
    ];
    for (name, runtime_address) in runtime {
        let function = *module
            .functions_named(name)
            .first()
            .unwrap_or_else(|| panic!("no {name} in {}", libc.display()));
        assert!(function.size > 0);

        // Independently: the symbol value and the LOAD segment holding it, per readelf.
        let value = readelf_symbol(&libc, name);
        assert_eq!(function.address, value, "{name}");
        let (offset, vaddr, _) = loads
            .iter()
            .copied()
            .find(|&(_, vaddr, filesz)| vaddr <= value && value < vaddr + filesz)
            .expect("a LOAD segment holds the symbol");
        let expected_offset = value - vaddr + offset;
        assert_eq!(
            module.vaddr_to_file_offset(function.address),
            Some(expected_offset),
            "{name}"
        );
        assert_eq!(
            module.file_offset_to_vaddr(expected_offset),
            Some(function.address),
            "{name}"
        );

        // And through this process: its runtime address, via maps, is the same file offset,
        // and maps back to the same function.
        let (mapping, file_offset) = maps
            .lookup(runtime_address)
            .expect("runtime address is mapped");
        assert_eq!(mapping.path.as_deref().map(Path::new), Some(libc.as_path()));
        assert_eq!(file_offset, expected_offset, "{name}");
        let vaddr = module
            .file_offset_to_vaddr(file_offset)
            .expect("back to a vaddr");
        let found = module
            .function_at(vaddr)
            .expect("function at runtime address");
        assert_eq!(found.name, name);

        // Whatever DWARF is installed or not, the outermost frame names the function.
        let frames = module.frames(function.address);
        let outermost = frames.last().expect("at least the symbol-table frame");
        assert_eq!(outermost.function, name, "{frames:?}");
        assert!(!outermost.inlined);
    }

    // libc's executable code is in the executable modules of this process.
    let modules = maps.executable_modules(pid);
    assert!(
        modules
            .iter()
            .any(|m| Path::new(&m.path) == libc && !m.is_main)
    );
}

#[test]
fn libc_module_is_fast_and_cached() {
    let maps = ProcessMaps::read(std::process::id()).expect("own maps");
    let libc = own_libc(&maps);
    let symbolizer = Symbolizer::new();
    let started = Instant::now();
    let module = symbolizer.module(&libc).expect("libc parses");
    let first = started.elapsed();
    let started = Instant::now();
    let again = symbolizer.module(&libc).expect("libc parses");
    let cached = started.elapsed();
    eprintln!(
        "module({}) took {first:?}, cached {cached:?}",
        libc.display()
    );
    assert!(std::sync::Arc::ptr_eq(&module, &again));
    // Milliseconds in release; a generous bound for an unoptimized test build still catches an
    // accidental DWARF walk at open time.
    assert!(
        first < Duration::from_secs(2),
        "module(libc) took {first:?}"
    );
    assert!(module.functions().len() > 1000);
    assert!(
        module
            .functions()
            .windows(2)
            .all(|w| w[0].address < w[1].address)
    );
}

#[test]
fn ifuncs_are_flagged() {
    let maps = ProcessMaps::read(std::process::id()).expect("own maps");
    let module = Symbolizer::new()
        .module(&own_libc(&maps))
        .expect("libc parses");
    // glibc selects memcpy/strlen implementations through IFUNC resolvers on x86-64.
    let strlen = *module.functions_named("strlen").first().expect("strlen");
    assert!(strlen.ifunc, "{strlen:?}");
    assert!(!module.functions_named("malloc")[0].ifunc);
}
