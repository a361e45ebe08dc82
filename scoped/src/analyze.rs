//! `scope analyze`: what a binary (or a live process's executable) is, and what it runs on,
//! read from the file alone by rules — language and toolchain, build id, stripped or not,
//! DWARF, PIE, the libraries it needs, the runtimes and known servers it is, its USDT
//! probes, and the functions where a known server handles a request.
//!
//! It also counts the executable's functions by the planner's classes (`planner::classify`);
//! the probe plan itself is the planner's (`planner.rs`), from these facts and, for a live
//! process, from measurements.

use std::path::{Path, PathBuf};

use scope_symbolizer::{Module, Symbolizer};

use crate::{
    error::ScopeError,
    planner::{self, Class, Library},
};

/// What `scope analyze` reports about one ELF file.
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    pub path: PathBuf,
    /// `rust`, `go`, `c++`, `c` or `unknown`.
    pub language: &'static str,
    /// Compilers and linkers from `.comment` (and Go's version).
    pub toolchain: Vec<String>,
    pub build_id: Option<String>,
    pub stripped: bool,
    pub dwarf: bool,
    pub pie: bool,
    pub libraries: Vec<String>,
    /// Runtimes and known programs: `glibc`, `libssl`, `libpq`, `tokio`, `python`, `node`,
    /// `redis`, `postgres`, `nginx`.
    pub runtimes: Vec<&'static str>,
    pub functions: usize,
    /// `provider:name` of each USDT probe site (repeated names are one entry each site).
    pub usdt: Vec<String>,
    /// Functions where a request starts, for the servers it recognises, with why.
    pub entry_points: Vec<(String, String)>,
    /// How many of the executable's functions each class of the planner's rules has.
    pub classes: Vec<(Class, usize)>,
}

/// A server scope recognises, and where it handles a request.
struct Server {
    name: &'static str,
    /// A function only it has.
    marker: &'static str,
    /// (function, why it is an entry point).
    entry_points: &'static [(&'static str, &'static str)],
}

const SERVERS: [Server; 3] = [
    Server {
        name: "redis",
        marker: "processCommand",
        entry_points: &[
            (
                "processCommand",
                "redis: dispatches every command a client sends",
            ),
            ("call", "redis: runs one command (inside processCommand)"),
        ],
    },
    Server {
        name: "postgres",
        marker: "PostgresMain",
        entry_points: &[
            (
                "exec_simple_query",
                "postgres: runs a simple-protocol query (static: needs a symbol table)",
            ),
            ("PortalRun", "postgres: runs each query's portal"),
            ("ExecutorRun", "postgres: executes a plan"),
        ],
    },
    Server {
        name: "nginx",
        marker: "ngx_http_process_request",
        entry_points: &[(
            "ngx_http_process_request",
            "nginx: starts processing an HTTP request",
        )],
    },
];

/// Analyzes the ELF file at `path` (opened through `root`, the process's view of the
/// filesystem, for a live process).
pub fn binary(
    symbolizer: &Symbolizer,
    path: &Path,
    root: Option<&Path>,
) -> Result<Analysis, ScopeError> {
    binary_and_module(symbolizer, path, root).map(|(analysis, _)| analysis)
}

/// [`binary`], and the parsed module (for the planner).
pub fn binary_and_module(
    symbolizer: &Symbolizer,
    path: &Path,
    root: Option<&Path>,
) -> Result<(Analysis, std::sync::Arc<Module>), ScopeError> {
    let module = match root {
        Some(root) => symbolizer.module_in_root(path, root),
        None => symbolizer.module(path),
    }
    .map_err(|source| ScopeError::NotElf {
        path: path.to_owned(),
        source,
    })?;
    Ok((of(&module, path), module))
}

fn of(module: &Module, path: &Path) -> Analysis {
    let facts = module.facts();
    let functions = module.functions();
    let has = |name: &str| {
        functions
            .iter()
            .any(|f| f.has_raw_name(name) || f.base_name == name)
    };
    let needs = |prefix: &str| facts.needed.iter().any(|l| l.starts_with(prefix));
    let rust_symbols = functions.iter().any(|f| {
        f.symbol.starts_with("_R")
            || (f.symbol.starts_with("_ZN") && f.symbol.contains("17h") && f.symbol.ends_with('E'))
    });
    let comment_says = |needle: &str| facts.comments.iter().any(|c| c.contains(needle));
    let language = if facts.go_version.is_some() {
        "go"
    } else if comment_says("rustc version") || rust_symbols {
        "rust"
    } else if needs("libstdc++")
        || needs("libc++")
        || functions.iter().any(|f| f.symbol.starts_with("_Z"))
    {
        "c++"
    } else if !facts.comments.is_empty() || !functions.is_empty() {
        "c"
    } else {
        "unknown"
    };
    let mut toolchain = facts.comments.clone();
    if let Some(go) = &facts.go_version {
        toolchain.push(go.clone());
    }

    let exe_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut runtimes = Vec::new();
    let mut note = |yes: bool, name: &'static str| {
        if yes && !runtimes.contains(&name) {
            runtimes.push(name);
        }
    };
    note(
        needs("libc.so")
            || facts
                .interpreter
                .as_deref()
                .is_some_and(|i| i.contains("ld-linux")),
        "glibc",
    );
    note(needs("libssl") || has("SSL_read"), "libssl");
    note(needs("libpq") || has("PQexec"), "libpq");
    note(
        functions.iter().any(|f| f.base_name.starts_with("tokio::")),
        "tokio",
    );
    note(
        needs("libpython") || has("Py_Initialize") || exe_name.starts_with("python"),
        "python",
    );
    note(has("node::Start") || exe_name == "node", "node");
    let mut entry_points = Vec::new();
    for server in &SERVERS {
        let is = has(server.marker)
            || exe_name.starts_with(server.name)
            || (server.name == "postgres" && exe_name == "postmaster");
        note(is, server.name);
        if is {
            entry_points.extend(
                server
                    .entry_points
                    .iter()
                    .filter(|(function, _)| has(function))
                    .map(|(function, why)| ((*function).to_owned(), (*why).to_owned())),
            );
        }
    }

    let mut classes: Vec<(Class, usize)> = Class::ALL.iter().map(|&c| (c, 0)).collect();
    for function in functions {
        if let Some((class, _)) = planner::classify(&function.base_name, Library::Executable)
            && let Some(count) = classes.iter_mut().find(|(c, _)| *c == class)
        {
            count.1 += 1;
        }
    }
    classes.retain(|&(c, n)| n > 0 && c != Class::Cpu);

    Analysis {
        path: path.to_owned(),
        language,
        toolchain,
        build_id: module
            .build_id()
            .map(|id| id.iter().map(|b| format!("{b:02x}")).collect()),
        stripped: !facts.has_symtab,
        dwarf: module.has_dwarf(),
        pie: module.is_pie_or_shared(),
        libraries: facts.needed.clone(),
        runtimes,
        functions: functions.len(),
        usdt: module
            .usdt_probes()
            .iter()
            .map(|p| format!("{}:{}", p.provider, p.name))
            .collect(),
        entry_points,
        classes,
    }
}
