//! Checks that the eBPF object the daemon embeds exists and is a real BPF ELF object.
//!
//! The object is built by `cargo xtask build-ebpf` (it needs the bpf-debian toolchain and
//! bpf-linker, see `cargo xtask setup`). A missing or empty object is a build error here,
//! never a stub that would only fail at run time.
use std::{env, fs, path::PathBuf};

fn main() {
    let object = match env::var_os("SCOPE_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest = PathBuf::from(
                env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
            );
            manifest.join("../target/bpfel-unknown-none/release/scope")
        }
    };
    println!("cargo:rerun-if-env-changed=SCOPE_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    let bytes = fs::read(&object).unwrap_or_else(|error| {
        panic!(
            "\n\nthe eBPF object {} cannot be read ({error}).\n\
             Build it first with `cargo xtask build-ebpf` (after `cargo xtask setup` on a new machine),\n\
             or point SCOPE_EBPF_OBJECT at a built object.\n",
            object.display()
        )
    });
    // ELF magic, 64-bit, little-endian, e_machine = EM_BPF (247).
    let is_bpf_elf = bytes.len() > 64
        && bytes[..4] == *b"\x7fELF"
        && bytes[4] == 2
        && bytes[5] == 1
        && u16::from_le_bytes([bytes[18], bytes[19]]) == 247;
    if !is_bpf_elf {
        panic!(
            "\n\n{} is not a little-endian BPF ELF object ({} bytes). Rebuild it with `cargo xtask build-ebpf`.\n",
            object.display(),
            bytes.len()
        );
    }
    println!(
        "cargo:rustc-env=SCOPE_EBPF_OBJECT={}",
        fs::canonicalize(&object).unwrap_or(object).display()
    );
}
