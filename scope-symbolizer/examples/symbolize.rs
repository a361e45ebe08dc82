//! Prints what scope-symbolizer sees in an ELF file, and how long parsing took.
//!
//! ```text
//! cargo run --release --ignore-rust-version -p scope-symbolizer --example symbolize -- \
//!     /usr/lib/x86_64-linux-gnu/libc.so.6 [function-name ...]
//! ```

use std::path::PathBuf;
use std::time::Instant;

use scope_symbolizer::Symbolizer;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: symbolize <elf-file> [function-name ...]");
        std::process::exit(2);
    };
    let symbolizer = Symbolizer::new();

    let started = Instant::now();
    let module = match symbolizer.module(&path) {
        Ok(module) => module,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let parsed = started.elapsed();
    let started = Instant::now();
    let _cached = symbolizer.module(&path);
    let cached = started.elapsed();
    println!(
        "{}: {} functions, dwarf: {}, debug file: {:?}; module() {parsed:?}, cached {cached:?}",
        path.display(),
        module.functions().len(),
        module.has_dwarf(),
        module.debug_file()
    );

    for name in args {
        for function in module.functions_named(&name) {
            println!(
                "{:#x} +{:#x} {} ({}) base {} aliases {:?} file offset {:?}",
                function.address,
                function.size,
                function.name,
                function.symbol,
                function.base_name,
                function.aliases,
                module.vaddr_to_file_offset(function.address)
            );
            let started = Instant::now();
            let frames = module.frames(function.address);
            println!("  frames ({:?}): {frames:?}", started.elapsed());
            println!("  location: {:?}", module.location(function.address));
        }
    }

    let started = Instant::now();
    let sites = module.inline_sites().len();
    println!("{sites} inline sites ({:?})", started.elapsed());
}
