//! Symbolizing binaries built by the test: C at -O0 and -O2 with inlining, C++, Rust (legacy
//! and v0 mangling), and the same binaries stripped with their debug info found separately.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{C_INLINE, C_O0, CPP, RUST, compile_c, compile_rust, line_of, run};
use scope_symbolizer::{Frame, Function, Module, Symbolizer};

fn function<'m>(module: &'m Module, name: &str) -> &'m Function {
    module
        .functions_named(name)
        .into_iter()
        .next()
        .unwrap_or_else(|| {
            let names: Vec<&str> = module.functions().iter().map(|f| f.name.as_str()).collect();
            panic!(
                "no function {name:?} in {}; have {names:?}",
                module.path().display()
            )
        })
}

fn frame_names(frames: &[Frame]) -> Vec<(&str, bool)> {
    frames
        .iter()
        .map(|f| (f.function.as_str(), f.inlined))
        .collect()
}

#[test]
fn c_o0_location_and_frames() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = compile_c("gcc", dir.path(), "prog", "c", C_O0, &["-g", "-O0"]);
    let module = Symbolizer::new().module(&binary).expect("module");

    assert!(module.has_dwarf());
    assert!(
        module.is_pie_or_shared(),
        "Debian's gcc builds PIE by default"
    );
    assert_eq!(module.debug_file(), None);
    assert_eq!(module.build_id().map(<[u8]>::len), Some(20));

    let compute = function(&module, "compute");
    assert_eq!(compute.symbol, "compute");
    assert_eq!(compute.base_name, "compute");
    assert!(compute.size > 0);
    assert!(!compute.ifunc);

    let def_line = line_of(C_O0, "compute-def");
    let (file, line) = module
        .location(compute.address)
        .expect("location of compute");
    assert!(file.ends_with("/prog.c"), "{file}");
    assert_eq!(line, def_line);

    // Some instruction inside the body maps to the body line, as one non-inlined frame.
    let body_line = line_of(C_O0, "compute-body");
    let inside = (compute.address..compute.address + compute.size)
        .find(|&vaddr| module.frames(vaddr).first().and_then(|f| f.line) == Some(body_line))
        .expect("an address on the body line");
    let frames = module.frames(inside);
    assert_eq!(
        frames,
        [Frame {
            function: "compute".into(),
            file: Some(file.clone()),
            line: Some(body_line),
            inlined: false
        }]
    );
    assert_eq!(
        module.function_at(inside).map(|f| f.symbol.as_str()),
        Some("compute")
    );
    // Cached answer is the same answer.
    assert_eq!(module.frames(inside), frames);

    // Nothing is inlined at -O0.
    assert!(module.inline_sites().iter().all(|s| s.name != "compute"));

    // Translation through the load segments round-trips.
    let offset = module
        .vaddr_to_file_offset(compute.address)
        .expect("in a segment");
    assert_eq!(module.file_offset_to_vaddr(offset), Some(compute.address));

    // Addresses outside any function.
    assert!(module.frames(0).is_empty());
    assert!(module.frames(u64::MAX).is_empty());
    assert_eq!(module.location(u64::MAX), None);
}

#[test]
fn c_o2_inline_sites_and_inline_frames() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = compile_c("gcc", dir.path(), "inl", "c", C_INLINE, &["-g", "-O2"]);
    let module = Symbolizer::new().module(&binary).expect("module");

    assert!(
        module.functions_named("mix").is_empty(),
        "always_inline leaves no out-of-line copy"
    );
    let caller = function(&module, "caller");

    let sites: Vec<_> = module
        .inline_sites()
        .iter()
        .filter(|s| s.name == "mix")
        .collect();
    assert!(!sites.is_empty(), "{:#?}", module.inline_sites());
    let site = sites[0];
    assert_eq!(site.inlined_into, "caller");
    assert_eq!(site.call_line, Some(line_of(C_INLINE, "mix-call")));
    assert!(
        site.call_file
            .as_deref()
            .is_some_and(|f| f.ends_with("/inl.c")),
        "{site:?}"
    );
    assert!(site.address >= caller.address && site.address < caller.address + caller.size);

    let frames = module.frames(site.address);
    assert_eq!(
        frame_names(&frames),
        [("mix", true), ("caller", false)],
        "{frames:#?}"
    );
    // The caller's frame is at the call site.
    assert_eq!(frames[1].line, Some(line_of(C_INLINE, "mix-call")));
    assert!(
        frames[0]
            .file
            .as_deref()
            .is_some_and(|f| f.ends_with("/inl.c"))
    );
}

#[test]
fn cpp_demangled_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = compile_c("g++", dir.path(), "cpp", "cc", CPP, &["-g", "-O0"]);
    let module = Symbolizer::new().module(&binary).expect("module");

    let bar = function(&module, "ns::Foo::bar");
    assert_eq!(bar.symbol, "_ZN2ns3Foo3barEi");
    assert_eq!(bar.name, "ns::Foo::bar(int)");
    assert_eq!(bar.base_name, "ns::Foo::bar");
    assert!(bar.is_named("ns::Foo::bar(int)"));
    assert!(bar.is_named("_ZN2ns3Foo3barEi"));

    let frames = module.frames(bar.address);
    assert_eq!(frame_names(&frames), [("ns::Foo::bar(int)", false)]);
    assert_eq!(frames[0].line, Some(line_of(CPP, "bar-def")));
    assert_eq!(
        module.location(bar.address).map(|(_, line)| line),
        Some(line_of(CPP, "bar-def"))
    );
}

/// Checks what every Rust variant of the fixture must show.
fn check_rust_module(module: &Module) {
    let fib = function(module, "demo::fib");
    assert_eq!(fib.name, "demo::fib", "no hash in the demangled name");
    assert_eq!(fib.base_name, "demo::fib");

    let sites: Vec<_> = module
        .inline_sites()
        .iter()
        .filter(|s| s.name == "demo::mix")
        .collect();
    assert!(
        !sites.is_empty(),
        "{:#?}",
        module
            .inline_sites()
            .iter()
            .filter(|s| s.name.starts_with("demo"))
            .collect::<Vec<_>>()
    );
    let site = sites[0];
    assert_eq!(site.inlined_into, "demo::fib");
    assert_eq!(site.call_line, Some(line_of(RUST, "mix-call")));
    assert!(
        site.call_file
            .as_deref()
            .is_some_and(|f| f.ends_with("demo.rs")),
        "{site:?}"
    );

    // At the inlined code: `mix` (possibly under things inlined into it), then `fib`.
    let frames = module.frames(site.address);
    let names = frame_names(&frames);
    assert!(names.len() >= 2, "{frames:#?}");
    assert_eq!(
        names[names.len() - 2..],
        [("demo::mix", true), ("demo::fib", false)],
        "{frames:#?}"
    );
    assert!(names.iter().rev().skip(1).all(|&(_, inlined)| inlined));
}

#[test]
fn rust_legacy_mangling_names_and_inline_sites() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Selecting legacy mangling explicitly is still an unstable option.
    let binary = compile_rust(
        dir.path(),
        "demo",
        "demo",
        RUST,
        &[
            "-g",
            "-C",
            "opt-level=2",
            "-Zunstable-options",
            "-C",
            "symbol-mangling-version=legacy",
        ],
    );
    let module = Symbolizer::new().module(&binary).expect("module");
    let fib = function(&module, "demo::fib");
    assert!(fib.symbol.starts_with("_ZN4demo3fib17h"), "{fib:?}");
    check_rust_module(&module);
}

#[test]
fn rust_v0_mangling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = compile_rust(
        dir.path(),
        "demo",
        "demo",
        RUST,
        &[
            "-g",
            "-C",
            "opt-level=2",
            "-C",
            "symbol-mangling-version=v0",
        ],
    );
    let module = Symbolizer::new().module(&binary).expect("module");
    assert!(function(&module, "demo::fib").symbol.starts_with("_R"));
    check_rust_module(&module);
}

/// `objcopy --only-keep-debug` into `debug`, then strip everything from a copy of `binary`
/// (`.symtab` included) and, when `link`, point it at the debug file with
/// `--add-gnu-debuglink`. Returns the stripped binary.
fn split_debug(binary: &Path, debug: &Path, stripped: &Path, link: bool) {
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(binary)
        .arg(debug));
    run(Command::new("strip")
        .arg("--strip-all")
        .arg(binary)
        .arg("-o")
        .arg(stripped));
    if link {
        run(Command::new("objcopy")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(stripped));
    }
}

fn rust_fixture(dir: &Path) -> PathBuf {
    compile_rust(dir, "demo", "demo", RUST, &["-g", "-C", "opt-level=2"])
}

#[test]
fn stripped_rust_binary_uses_debuglink_next_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = rust_fixture(dir.path());
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir(&bin_dir).expect("mkdir");
    let stripped = bin_dir.join("demo");
    let debug = bin_dir.join("demo.debug");
    split_debug(&binary, &debug, &stripped, true);

    let symbolizer = Symbolizer::new();
    let module = symbolizer.module(&stripped).expect("module");
    assert!(module.has_dwarf());
    assert_eq!(module.debug_file(), Some(debug.as_path()));
    // `fib` is only in the debug file's .symtab: the stripped binary has no .symtab and `fib`
    // is not exported.
    check_rust_module(&module);
}

#[test]
fn stripped_binary_uses_debuglink_in_dot_debug() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = rust_fixture(dir.path());
    let stripped = dir.path().join("stripped");
    let debug = dir.path().join("demo.debug");
    split_debug(&binary, &debug, &stripped, true);
    let dot_debug = dir.path().join(".debug");
    std::fs::create_dir(&dot_debug).expect("mkdir");
    std::fs::rename(&debug, dot_debug.join("demo.debug")).expect("move debug file");

    let module = Symbolizer::new().module(&stripped).expect("module");
    assert_eq!(
        module.debug_file(),
        Some(dot_debug.join("demo.debug").as_path())
    );
    check_rust_module(&module);
}

#[test]
fn stripped_binary_uses_build_id_under_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = rust_fixture(dir.path());
    let stripped = dir.path().join("stripped");
    let debug = dir.path().join("demo.debug");
    // No debuglink: only the build-id can find the debug file.
    split_debug(&binary, &debug, &stripped, false);

    let plain = Symbolizer::new().module(&stripped).expect("module");
    assert!(
        !plain.has_dwarf(),
        "nothing under the real /usr/lib/debug for a fresh build"
    );
    assert!(plain.functions_named("demo::fib").is_empty());
    assert!(plain.inline_sites().is_empty());

    let root = dir.path().join("root");
    let hex: String = plain
        .build_id()
        .expect("linked with --build-id")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let build_id_dir = root.join("usr/lib/debug/.build-id").join(&hex[..2]);
    std::fs::create_dir_all(&build_id_dir).expect("mkdir");
    let installed = build_id_dir.join(format!("{}.debug", &hex[2..]));
    std::fs::copy(&debug, &installed).expect("install debug file");

    let module = Symbolizer::new()
        .module_in_root(&stripped, &root)
        .expect("module");
    assert_eq!(module.debug_file(), Some(installed.as_path()));
    check_rust_module(&module);
}

#[test]
fn debuglink_without_build_id_is_verified_by_crc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = compile_c(
        "gcc",
        dir.path(),
        "inl",
        "c",
        C_INLINE,
        &["-g", "-O2", "-Wl,--build-id=none"],
    );
    let stripped = dir.path().join("inl.stripped");
    let debug = dir.path().join("inl.debug");
    split_debug(&binary, &debug, &stripped, true);

    let module = Symbolizer::new().module(&stripped).expect("module");
    assert_eq!(module.build_id(), None);
    assert_eq!(module.debug_file(), Some(debug.as_path()));
    assert!(
        module
            .inline_sites()
            .iter()
            .any(|s| s.name == "mix" && s.inlined_into == "caller")
    );

    // A debug file of the same name whose CRC does not match is not used.
    let mut bytes = std::fs::read(&debug).expect("read debug file");
    bytes.push(0);
    std::fs::write(&debug, bytes).expect("rewrite debug file");
    let module = Symbolizer::new().module(&stripped).expect("module");
    assert_eq!(module.debug_file(), None);
    assert!(!module.has_dwarf());
    assert!(module.inline_sites().is_empty());
}

#[test]
fn debuglink_to_another_build_is_rejected_by_build_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = rust_fixture(dir.path());
    let stripped = dir.path().join("stripped");
    let debug = dir.path().join("demo.debug");
    split_debug(&binary, &debug, &stripped, true);

    // Replace the debug file with one from a different program (different build-id).
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = compile_c("gcc", other_dir.path(), "prog", "c", C_O0, &["-g"]);
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&other)
        .arg(&debug));

    let module = Symbolizer::new().module(&stripped).expect("module");
    assert_eq!(module.debug_file(), None);
    assert!(!module.has_dwarf());
}

#[test]
fn cache_shares_modules_and_reparses_replaced_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = compile_c("gcc", dir.path(), "prog", "c", C_O0, &["-g", "-O0"]);
    let symbolizer = Arc::new(Symbolizer::new());

    let a = symbolizer.module(&first).expect("module");
    let again = symbolizer.module(&first).expect("module");
    assert!(Arc::ptr_eq(&a, &again), "same file, same module");

    // Another path to the same inode (as /proc/PID/root/... would be) hits the cache.
    let link = dir.path().join("hardlink");
    std::fs::hard_link(&first, &link).expect("hard link");
    assert!(Arc::ptr_eq(&a, &symbolizer.module(&link).expect("module")));
    assert_eq!(symbolizer.cached_modules(), 1);

    // Replace the file on disk (new inode, as a package upgrade does): parsed again.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let second = compile_c(
        "gcc",
        other_dir.path(),
        "inl",
        "c",
        C_INLINE,
        &["-g", "-O2"],
    );
    let tmp = dir.path().join("prog.new");
    std::fs::copy(&second, &tmp).expect("copy");
    std::fs::rename(&tmp, &first).expect("replace");
    let b = symbolizer.module(&first).expect("module");
    assert!(!Arc::ptr_eq(&a, &b));
    assert!(!b.functions_named("caller").is_empty());
    assert!(b.functions_named("compute").is_empty());
    // The old module is still usable by whoever holds it.
    assert!(!a.functions_named("compute").is_empty());
    assert!(!a.frames(function(&a, "compute").address).is_empty());

    // Rewrite the same inode in place (cp over it): size/mtime/build-id change, parsed again.
    std::fs::copy(&link, &first).expect("copy in place");
    let c = symbolizer.module(&first).expect("module");
    assert!(!Arc::ptr_eq(&b, &c));
    assert!(!c.functions_named("compute").is_empty());

    symbolizer.clear();
    assert_eq!(symbolizer.cached_modules(), 0);
}

#[test]
fn cache_capacity_is_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = compile_c("gcc", dir.path(), "prog", "c", C_O0, &["-O0"]);
    let symbolizer = Symbolizer::with_capacity(2);
    for i in 0..4 {
        let copy = dir.path().join(format!("copy{i}"));
        std::fs::copy(&binary, &copy).expect("copy");
        symbolizer.module(&copy).expect("module");
        assert!(symbolizer.cached_modules() <= 2);
    }
}

#[test]
fn concurrent_frames_from_many_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = compile_c("gcc", dir.path(), "inl", "c", C_INLINE, &["-g", "-O2"]);
    let symbolizer = Arc::new(Symbolizer::new());
    let module = symbolizer.module(&binary).expect("module");
    let caller = function(&module, "caller").clone();
    let expected: Vec<Vec<Frame>> = (caller.address..caller.address + caller.size)
        .map(|vaddr| module.frames(vaddr))
        .collect();
    let expected = Arc::new(expected);

    let threads: Vec<_> = (0..4)
        .map(|_| {
            let symbolizer = Arc::clone(&symbolizer);
            let binary = binary.clone();
            let expected = Arc::clone(&expected);
            let caller = caller.clone();
            std::thread::spawn(move || {
                let module = symbolizer.module(&binary).expect("module");
                for (i, vaddr) in (caller.address..caller.address + caller.size).enumerate() {
                    assert_eq!(module.frames(vaddr), expected[i]);
                }
                assert!(!module.inline_sites().is_empty());
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread");
    }
}
