//! Symbol demangling: Rust (legacy and v0), C++ (Itanium) and C.

/// A demangled symbol name in the two forms scope shows and matches against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Demangled {
    /// The readable name. Rust: the path without the `::h<hash>` suffix
    /// (`demo::fib`); C++: the full signature (`ns::Foo::bar(int)`); C: unchanged.
    pub name: String,
    /// The qualified name without parameters or hash, what a user types to pick a
    /// function: `demo::fib`, `ns::Foo::bar`, `processCommand`.
    pub base_name: String,
}

/// Demangles a raw symbol name.
///
/// Recognises Rust legacy (`_ZN…17h<hash>E`) and v0 (`_R…`) mangling, Itanium C++ (`_Z…`,
/// including GCC clone suffixes such as `.cold` or `.isra.0`) and leaves everything else (C
/// names, names that fail to demangle) as it is. An ELF symbol version (`memcpy@GLIBC_2.2.5`,
/// `foo@@V2`) is dropped from both forms; the raw name keeps it.
///
/// Never panics and never allocates more than a bounded multiple of the input: both demanglers
/// limit their recursion and output size.
pub fn demangle(symbol: &str) -> Demangled {
    let unversioned = strip_symbol_version(symbol);

    if let Some(demangled) = demangle_rust(unversioned) {
        return demangled;
    }
    if let Some(demangled) = demangle_cpp(unversioned) {
        return demangled;
    }
    Demangled {
        name: unversioned.to_owned(),
        base_name: strip_c_clone_suffix(unversioned).to_owned(),
    }
}

/// GCC's specialised copies of a C function keep its name with a suffix: `add.constprop.0`,
/// `parse.isra.0`, `run.part.0`, `main.cold`, `f.lto_priv.0`. To a user they are the function.
fn strip_c_clone_suffix(name: &str) -> &str {
    const CLONES: [&str; 6] = [
        ".constprop.",
        ".isra.",
        ".part.",
        ".cold",
        ".lto_priv.",
        ".localalias",
    ];
    match CLONES.iter().filter_map(|clone| name.find(clone)).min() {
        Some(at) if at > 0 => &name[..at],
        _ => name,
    }
}

/// `memcpy@GLIBC_2.2.5` → `memcpy`. Mangled names never contain `@`, so the first one starts
/// the version.
fn strip_symbol_version(symbol: &str) -> &str {
    match symbol.find('@') {
        Some(at) if at > 0 => &symbol[..at],
        _ => symbol,
    }
}

fn demangle_rust(symbol: &str) -> Option<Demangled> {
    // C++ names also start with `_ZN`; `try_demangle` rejects them because a Rust legacy
    // name ends at its `E` while an Itanium function name carries parameter types after it.
    if !(symbol.starts_with("_ZN") || symbol.starts_with("_R") || symbol.starts_with("__R")) {
        return None;
    }
    let demangled = rustc_demangle::try_demangle(symbol).ok()?;
    // The alternate form drops the `::h<hash>` suffix (legacy) and crate disambiguators (v0).
    let name = format!("{demangled:#}");
    Some(Demangled {
        base_name: name.clone(),
        name,
    })
}

fn demangle_cpp(symbol: &str) -> Option<Demangled> {
    if !symbol.starts_with("_Z") {
        return None;
    }
    let parsed = cpp_demangle::Symbol::new(symbol).ok()?;
    let name = parsed.demangle().ok()?;
    let options = cpp_demangle::DemangleOptions::new()
        .no_params()
        .no_return_type();
    let base_name = match parsed.demangle_with_options(&options) {
        Ok(base) => strip_clone_suffix(&base).to_owned(),
        Err(_) => name.clone(),
    };
    Some(Demangled { name, base_name })
}

/// `ns::Foo::bar [clone .cold]` → `ns::Foo::bar`: a clone is still the same function to a user.
fn strip_clone_suffix(name: &str) -> &str {
    match name.find(" [clone ") {
        Some(at) => &name[..at],
        None => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_legacy_drops_the_hash() {
        let d = demangle("_ZN4demo3fib17h0123456789abcdefE");
        assert_eq!(d.name, "demo::fib");
        assert_eq!(d.base_name, "demo::fib");
    }

    #[test]
    fn rust_legacy_with_llvm_suffix() {
        let d = demangle("_ZN4demo3fib17h0123456789abcdefE.llvm.1234567890ABCDEF");
        assert_eq!(d.base_name, "demo::fib");
    }

    #[test]
    fn rust_v0() {
        let d = demangle("_RNvMNtCs6xxl1lAjzDf_1a2nsNtB2_3Foo3bar");
        assert_eq!(d.name, "<a::ns::Foo>::bar");
        assert_eq!(d.base_name, "<a::ns::Foo>::bar");
        let d = demangle("_RNvCs6xxl1lAjzDf_4demo3fib");
        assert_eq!(d.name, "demo::fib");
    }

    #[test]
    fn cpp_full_and_base() {
        let d = demangle("_ZN2ns3Foo3barEi");
        assert_eq!(d.name, "ns::Foo::bar(int)");
        assert_eq!(d.base_name, "ns::Foo::bar");
    }

    #[test]
    fn cpp_const_method_template_and_clone() {
        let d = demangle("_ZNK2ns3Foo3getEv");
        assert_eq!(d.name, "ns::Foo::get() const");
        assert_eq!(d.base_name, "ns::Foo::get");
        let d = demangle("_Z3maxIiET_S0_S0_");
        assert_eq!(d.name, "int max<int>(int, int)");
        assert_eq!(d.base_name, "max<int>");
        assert_eq!(demangle("add.constprop.0").base_name, "add");
        assert_eq!(demangle("add.constprop.0").name, "add.constprop.0");
        assert_eq!(demangle("run.part.0").base_name, "run");
        assert_eq!(demangle("main.cold").base_name, "main");
        assert_eq!(demangle("plain_name").base_name, "plain_name");
        let d = demangle("_ZN2ns3Foo3barEi.cold");
        assert_eq!(d.base_name, "ns::Foo::bar");
    }

    #[test]
    fn c_names_are_unchanged() {
        for name in [
            "main",
            "processCommand",
            "_start",
            "__libc_malloc",
            "_Zfoo",
            "_R",
        ] {
            let d = demangle(name);
            assert_eq!(d.name, name);
            assert_eq!(d.base_name, name);
        }
    }

    #[test]
    fn symbol_versions_are_dropped() {
        assert_eq!(demangle("memcpy@GLIBC_2.2.5").name, "memcpy");
        assert_eq!(demangle("foo@@V2").base_name, "foo");
        assert_eq!(demangle("_ZN2ns3Foo3barEi@@V1").base_name, "ns::Foo::bar");
        // A name that *is* just "@..." stays.
        assert_eq!(demangle("@x").name, "@x");
    }

    #[test]
    fn hostile_names_do_not_panic() {
        let deep = format!("_Z{}", "P".repeat(100_000));
        let _ = demangle(&deep);
        let deep_rust = format!("_RN{}", "B_".repeat(50_000));
        let _ = demangle(&deep_rust);
        let _ = demangle("_ZN");
        let _ = demangle("");
        let _ = demangle("_ZZZZZZZZZZ");
    }
}
