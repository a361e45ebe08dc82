//! What scope knows about USDT probes beyond their notes, which say where each argument is
//! but not what it means: which arguments point to strings, which sites open and close one
//! span together, and how a span's strings read.
//!
//! Pairs follow the DTrace naming convention every provider scope knows uses: `X__start` is
//! closed by `X__done` (or `X__end`), `X__entry` by `X__return`. When a session attaches
//! both sites of a pair, they become one span with a duration, named `provider:X`
//! (`postgresql:query`, `python:function`), with what the sites nest inside it as its
//! children. A lone site of a pair stays an instant span.

/// Arguments that point to NUL-terminated strings, by `provider:name` (bit `i`: argument
/// `i`). From the providers' probe definitions: PostgreSQL's `probes.d`, CPython's
/// `pydtrace.d`.
const STRING_ARGS: &[(&str, u32)] = &[
    ("postgresql:query__start", 1),
    ("postgresql:query__done", 1),
    ("postgresql:query__parse__start", 1),
    ("postgresql:query__parse__done", 1),
    ("postgresql:query__rewrite__start", 1),
    ("postgresql:query__rewrite__done", 1),
    ("postgresql:statement__status", 1),
    ("python:function__entry", 0b11),
    ("python:function__return", 0b11),
    ("python:line", 0b11),
    ("python:import__find__load__start", 1),
    ("python:import__find__load__done", 1),
    ("python:audit", 1),
];

/// Providers whose begin sites never nest inside an open span of the same pair: a begin
/// while one is open means the open one ended without its end site (PostgreSQL's `ERROR`
/// jumps out of a query without `query__done`), so the kernel reports that one abandoned.
const NON_NESTING: &[&str] = &["postgresql"];

/// Begin sites that a program carries but never fires, by the file name of the module
/// (executable or library) that has them: CPython 3.11 lost the call to `function__entry`
/// when its interpreter loop was rebuilt (python/cpython#98894, fixed only in 3.15), while
/// `function__return` still fires. Pairing them would turn every return into an unmatched
/// end and show nothing.
pub fn broken_begins(module: &std::path::Path) -> &'static [&'static str] {
    let name = module
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or("");
    if name.starts_with("python3.11") || name.starts_with("libpython3.11") {
        &["python:function__entry"]
    } else {
        &[]
    }
}

/// Bit mask of the arguments of `provider:name` that point to strings (0 when none are
/// known to).
pub fn string_args(function: &str) -> u32 {
    STRING_ARGS
        .iter()
        .find(|(name, _)| *name == function)
        .map_or(0, |(_, mask)| *mask)
}

/// Whether a begin site of `provider` nests inside an open span of its own pair.
pub fn nests(provider: &str) -> bool {
    !NON_NESTING.contains(&provider)
}

/// For the end site `name` of a pair, the name of its begin site.
pub fn begin_name(name: &str) -> Option<String> {
    if let Some(stem) = name
        .strip_suffix("__done")
        .or_else(|| name.strip_suffix("__end"))
    {
        Some(format!("{stem}__start"))
    } else {
        name.strip_suffix("__return")
            .map(|stem| format!("{stem}__entry"))
    }
}

/// The name of the span a pair makes, from its begin site's name: `query__start` → `query`.
pub fn pair_name(begin: &str) -> &str {
    begin
        .strip_suffix("__start")
        .or_else(|| begin.strip_suffix("__entry"))
        .unwrap_or(begin)
}

/// A span's text from the strings its probe passed: Python's function sites read
/// `file:function:line` (the line is argument 2); every other probe its strings, joined
/// by a space.
pub fn text(function: &str, strings: &[String], args: &[u64; 6]) -> String {
    let python_frame = matches!(
        function,
        "python:function" | "python:function__entry" | "python:function__return" | "python:line"
    );
    match strings {
        [file, name] if python_frame => format!("{file}:{name}:{}", args[2] as i32),
        _ => strings.join(" "),
    }
}

/// The text of one string slot of a kernel [`scope_common::TextSpan`]: invalid UTF-8 is
/// replaced, and a string the kernel had to cut ends in `…`.
pub fn decode(bytes: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if bytes.len() >= scope_common::MAX_TEXT - 1 {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_follow_the_dtrace_naming_convention() {
        assert_eq!(begin_name("query__done").as_deref(), Some("query__start"));
        assert_eq!(
            begin_name("request__end").as_deref(),
            Some("request__start")
        );
        assert_eq!(
            begin_name("function__return").as_deref(),
            Some("function__entry")
        );
        assert_eq!(begin_name("query__start"), None);
        assert_eq!(begin_name("statement__status"), None);
        assert_eq!(pair_name("query__start"), "query");
        assert_eq!(pair_name("function__entry"), "function");
        assert_eq!(pair_name("gc__start"), "gc");
        assert_eq!(pair_name("audit"), "audit");
        assert!(!nests("postgresql"));
        assert!(nests("python"));
        assert_eq!(
            broken_begins(std::path::Path::new("/usr/bin/python3.11")),
            ["python:function__entry"]
        );
        assert!(broken_begins(std::path::Path::new("/usr/bin/python3.10")).is_empty());
    }

    #[test]
    fn texts_read_as_the_provider_means_them() {
        assert_eq!(string_args("postgresql:query__start"), 1);
        assert_eq!(string_args("python:function__entry"), 0b11);
        assert_eq!(string_args("postgresql:transaction__start"), 0);
        let python = ["/srv/app.py".to_owned(), "handle".to_owned()];
        assert_eq!(
            text("python:function", &python, &[0, 0, 42, 0, 0, 0]),
            "/srv/app.py:handle:42"
        );
        assert_eq!(
            text("postgresql:query", &["SELECT 1;".to_owned()], &[0; 6]),
            "SELECT 1;"
        );
        assert_eq!(decode(b"SELECT 1"), "SELECT 1");
        assert_eq!(decode(b"caf\xff"), "caf\u{fffd}");
        let long = vec![b'x'; scope_common::MAX_TEXT - 1];
        assert!(decode(&long).ends_with('…'));
    }
}
