//! Turns "trace these globs in pid P" into a plan: which functions, in which mapped ELF
//! files (the executable and the shared libraries in `/proc/P/maps`), at which file offsets.
//! Everything a user can get wrong is caught here, with a message that says what to do.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use scope_symbolizer::{Module, ProcessMaps, Symbolizer};

use crate::{error::ScopeError, glob::Glob, procfs::ProcessInfo};

/// Most patterns in one request.
pub const MAX_PATTERNS: usize = 64;
/// Longest pattern accepted (with its `LIB!` prefix; the glob alone is held to
/// [`crate::glob::MAX_GLOB_LEN`] too).
pub const MAX_PATTERN_LEN: usize = 1024;
/// Default for the most functions one session may probe.
pub const DEFAULT_MAX_SESSION_PROBES: usize = 4096;

/// What the user asked to trace.
#[derive(Clone, Debug)]
pub struct AttachSpec {
    pub pid: u32,
    pub patterns: Vec<String>,
    /// Restrict resolution to this mapped file.
    pub binary: Option<PathBuf>,
    /// Trace the processes the traced ones fork, too.
    pub follow: bool,
    /// A pattern that matches nothing is an error (an attach request); when following a
    /// fork or an exec into another program, it just places no probe.
    pub require_matches: bool,
    /// Sampling, rate limit and overhead budget of the session's probes.
    pub limits: crate::probes::Limits,
}

/// What will be attached.
#[derive(Debug)]
pub struct Plan {
    pub process: ProcessInfo,
    pub patterns: Vec<String>,
    pub modules: Vec<PlannedModule>,
}

impl Plan {
    pub fn probe_count(&self) -> usize {
        self.modules.iter().map(|m| m.probes.len()).sum()
    }
}

/// The probes in one ELF file.
#[derive(Debug)]
pub struct PlannedModule {
    /// The path as the process sees it (what users recognise).
    pub path: PathBuf,
    /// The path the kernel attaches through (`/proc/P/root/...` or `/proc/P/map_files/...`).
    pub open_path: PathBuf,
    pub module: Arc<Module>,
    pub probes: Vec<PlannedProbe>,
    /// Runtime address minus ELF virtual address, in this process.
    pub load_bias: u64,
}

/// One function (or inlined call site) to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedProbe {
    pub function: String,
    pub symbol: String,
    pub address: u64,
    pub file_offset: u64,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// For an inlined call site: the function it sits in. Such a probe has no exit.
    pub inlined_into: Option<String>,
    /// For a USDT probe site: its arguments and semaphore. Such a probe has no exit.
    pub usdt: Option<PlannedUsdt>,
    /// How the kernel sees the calls end.
    pub exit: Exit,
    /// Go code: the kernel keeps its calls per goroutine, not per thread (see
    /// `scope_common::cookie::GO`).
    pub go: bool,
}

/// How a probe's calls end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A uretprobe on the function (native code).
    Uretprobe,
    /// Uprobes on the function's RET instructions (file offsets): Go code, whose runtime
    /// crashes on the return address a uretprobe puts on the stack.
    ReturnSites(Vec<u64>),
    /// None: inlined call sites, USDT sites, and Go functions without a RET that can be
    /// probed. Their spans have zero length.
    Instant,
}

/// A USDT probe site's arguments, and its semaphore's address in the process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedUsdt {
    pub args: Vec<scope_symbolizer::UsdtArg>,
    pub semaphore: Option<u64>,
    /// Runtime addresses of the symbols RIP-relative arguments name.
    pub symbols: Vec<(String, u64)>,
    /// Bit `i`: argument `i` points to a string ([`crate::usdt::string_args`]).
    pub strings: u32,
    pub role: UsdtRole,
}

/// What a USDT site does in its session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsdtRole {
    /// A zero-length span of its own.
    Site,
    /// Opens a span of pair `pair` (a number shared by the pair's sites in this module).
    Begin { pair: usize, nests: bool },
    /// Closes the innermost open span of pair `pair`.
    End { pair: usize },
}

/// Patterns with this prefix name USDT probes, `usdt:PROVIDER:NAME` (globs), not functions.
pub const USDT_PREFIX: &str = "usdt:";

/// A parsed `[LIB!]GLOB`.
#[derive(Debug)]
struct Pattern {
    text: String,
    library: Option<String>,
    glob: Glob,
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, ScopeError> {
        if text.len() > MAX_PATTERN_LEN {
            return Err(ScopeError::BadPattern {
                pattern: text.chars().take(64).collect::<String>() + "…",
                source: crate::glob::GlobError::TooLong,
            });
        }
        let (library, glob) = match text.split_once('!') {
            Some((library, glob)) if !library.is_empty() => (Some(library.to_owned()), glob),
            _ => (None, text),
        };
        let glob = Glob::new(glob).map_err(|source| ScopeError::BadPattern {
            pattern: text.to_owned(),
            source,
        })?;
        Ok(Pattern {
            text: text.to_owned(),
            library,
            glob,
        })
    }

    fn wants_module(&self, path: &Path) -> bool {
        match &self.library {
            None => true,
            Some(library) => path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with(library.as_str()) || path.to_str() == Some(library.as_str())
                }),
        }
    }
}

/// Resolves `spec` against the live process. `max_probes` bounds the plan's size.
pub fn plan(
    symbolizer: &Symbolizer,
    spec: &AttachSpec,
    max_probes: usize,
) -> Result<Plan, ScopeError> {
    let pid = spec.pid;
    if pid == 0 {
        return Err(ScopeError::PidZero);
    }
    if spec.patterns.is_empty() {
        return Err(ScopeError::NoPatterns);
    }
    if spec.patterns.len() > MAX_PATTERNS {
        return Err(ScopeError::TooManyPatterns {
            count: spec.patterns.len(),
            limit: MAX_PATTERNS,
        });
    }
    let patterns = spec
        .patterns
        .iter()
        .map(|p| Pattern::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let process = ProcessInfo::read(pid).ok_or(ScopeError::NoSuchProcess { pid })?;
    let maps = ProcessMaps::read(pid).map_err(|source| match ProcessInfo::read(pid) {
        None => ScopeError::NoSuchProcess { pid },
        Some(_) => ScopeError::ProcessMaps { pid, source },
    })?;
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut mapped = maps.executable_modules(pid);

    if let Some(binary) = &spec.binary {
        // The file must be an ELF file first: that is the error a user most needs to see.
        symbolizer
            .module(binary)
            .map_err(|source| ScopeError::NotElf {
                path: binary.clone(),
                source,
            })?;
        let wanted = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.clone());
        let listing = mapped
            .iter()
            .map(|m| m.path.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        mapped.retain(|m| Path::new(&m.path) == wanted || Path::new(&m.path) == binary.as_path());
        if mapped.is_empty() {
            return Err(ScopeError::BinaryNotMapped {
                path: binary.clone(),
                pid,
                mapped: listing,
            });
        }
    }

    let mut modules = Vec::new();
    for (index, mapping) in mapped.iter().enumerate() {
        match symbolizer.module_in_root(&mapping.open_path, &root) {
            Ok(module) => {
                let bias = module
                    .file_offset_to_vaddr(mapping.offset)
                    .map_or(0, |vaddr| mapping.start.wrapping_sub(vaddr));
                modules.push((
                    PathBuf::from(&mapping.path),
                    mapping.open_path.clone(),
                    module,
                    bias,
                ))
            }
            // The executable (or the file the user named) must be traceable; a library
            // that is not (an odd mapped file) is skipped.
            Err(source) if index == 0 || spec.binary.is_some() => {
                return Err(ScopeError::NotElf {
                    path: PathBuf::from(&mapping.path),
                    source,
                });
            }
            Err(error) => {
                tracing::warn!(pid, path = %mapping.path, %error, "skipping a mapped file that is not a traceable ELF")
            }
        }
    }

    let mut planned: Vec<PlannedModule> = modules
        .iter()
        .map(|(path, open_path, module, bias)| PlannedModule {
            path: path.clone(),
            open_path: open_path.clone(),
            module: Arc::clone(module),
            probes: Vec::new(),
            load_bias: *bias,
        })
        .collect();
    // (module, address, inlined): an inlined call site can share its address with the entry of
    // the function it was inlined into; both are probed.
    let mut seen: HashSet<(usize, u64, bool)> = HashSet::new();
    let mut total = 0usize;
    for pattern in &patterns {
        let mut matched = 0usize;
        let mut ifuncs = Vec::new();
        if let Some(usdt) = pattern.glob.as_str().strip_prefix(USDT_PREFIX) {
            let glob = Glob::new(usdt).map_err(|source| ScopeError::BadPattern {
                pattern: pattern.text.clone(),
                source,
            })?;
            for (index, target) in planned.iter_mut().enumerate() {
                if !pattern.wants_module(&target.path) {
                    continue;
                }
                let module = Arc::clone(&target.module);
                for probe in module.usdt_probes() {
                    let name = format!("{}:{}", probe.provider, probe.name);
                    if !glob.matches(&name) {
                        continue;
                    }
                    matched += 1;
                    if !seen.insert((index, probe.address, true)) {
                        continue;
                    }
                    let Some(file_offset) = module.vaddr_to_file_offset(probe.address) else {
                        continue;
                    };
                    let strings = crate::usdt::string_args(&name);
                    target.probes.push(PlannedProbe {
                        function: name,
                        symbol: String::new(),
                        address: probe.address,
                        file_offset,
                        file: None,
                        line: None,
                        inlined_into: None,
                        usdt: Some(PlannedUsdt {
                            args: probe.args.clone(),
                            semaphore: probe
                                .semaphore
                                .map(|vaddr| vaddr.wrapping_add(target.load_bias)),
                            symbols: probe
                                .symbols
                                .iter()
                                .map(|(name, vaddr)| {
                                    (name.clone(), vaddr.wrapping_add(target.load_bias))
                                })
                                .collect(),
                            strings,
                            role: UsdtRole::Site,
                        }),
                        exit: Exit::Instant,
                        go: false,
                    });
                }
            }
            if matched == 0 && spec.require_matches {
                return Err(ScopeError::NoUsdtMatch {
                    pattern: usdt.to_owned(),
                    pid,
                });
            }
            total += matched;
            continue;
        }
        for (index, target) in planned.iter_mut().enumerate() {
            if !pattern.wants_module(&target.path) {
                continue;
            }
            let module = Arc::clone(&target.module);
            let is_go = module.facts().go;
            for function in module.functions() {
                let names = std::iter::once(function.base_name.as_str())
                    .chain(std::iter::once(function.name.as_str()))
                    .chain(std::iter::once(function.symbol.as_str()))
                    .chain(function.aliases.iter().map(String::as_str));
                if !names.into_iter().any(|name| pattern.glob.matches(name)) {
                    continue;
                }
                if function.ifunc {
                    // The symbol's address is the resolver that picks an implementation at
                    // load time, called once; probing it would trace nothing useful.
                    ifuncs.push(function.base_name.clone());
                    continue;
                }
                matched += 1;
                if !seen.insert((index, function.address, false)) {
                    continue;
                }
                let Some(file_offset) = module.vaddr_to_file_offset(function.address) else {
                    tracing::warn!(function = %function.name, "function is outside every loadable segment; skipped");
                    continue;
                };
                let (file, line) = module
                    .location(function.address)
                    .map_or((None, None), |(f, l)| (Some(f), Some(l)));
                let mut probe = PlannedProbe {
                    function: function.base_name.clone(),
                    symbol: function.symbol.clone(),
                    address: function.address,
                    file_offset,
                    file,
                    line,
                    inlined_into: None,
                    usdt: None,
                    exit: Exit::Uretprobe,
                    go: false,
                };
                if is_go {
                    plan_go(&module, function, &mut probe);
                }
                target.probes.push(probe);
            }
            for site in module.inline_sites() {
                if !pattern.glob.matches(&site.name) {
                    continue;
                }
                matched += 1;
                if !seen.insert((index, site.address, true)) {
                    continue;
                }
                let Some(file_offset) = module.vaddr_to_file_offset(site.address) else {
                    continue;
                };
                target.probes.push(PlannedProbe {
                    function: site.name.clone(),
                    symbol: String::new(),
                    address: site.address,
                    file_offset,
                    file: site.call_file.clone(),
                    line: site.call_line,
                    inlined_into: Some(site.inlined_into.clone()),
                    usdt: None,
                    exit: Exit::Instant,
                    go: false,
                });
            }
        }
        if matched == 0 {
            if !spec.require_matches {
                continue;
            }
            return Err(no_match(pattern, pid, &planned, &ifuncs));
        }
        total += matched;
        if total > max_probes {
            return Err(ScopeError::TooManyMatches {
                pattern: pattern.text.clone(),
                count: total,
                limit: max_probes,
            });
        }
    }
    planned.retain(|m| !m.probes.is_empty());
    for module in &mut planned {
        let broken = crate::usdt::broken_begins(&module.path);
        pair_usdt_sites(&mut module.probes, broken);
    }
    Ok(Plan {
        process,
        patterns: spec.patterns.clone(),
        modules: planned,
    })
}

/// Makes the begin and end sites of each pair planned in one module one span
/// ([`crate::usdt`]): both get the pair's number, and the begin sites take the pair's name
/// (`postgresql:query__start` → `postgresql:query`), which their spans carry. A site whose
/// other half is not planned stays a [`UsdtRole::Site`], and so do both halves of pairs whose
/// begin site the program never fires (`broken`, see [`crate::usdt::broken_begins`]): their
/// end sites are then still seen, as instants.
fn pair_usdt_sites(probes: &mut [PlannedProbe], broken: &[&str]) {
    let mut pairs: Vec<String> = Vec::new();
    // (end site's index, its begin site's `provider:name`).
    let ends: Vec<(usize, String)> = probes
        .iter()
        .enumerate()
        .filter(|(_, probe)| probe.usdt.is_some())
        .filter_map(|(index, probe)| {
            let (provider, name) = probe.function.split_once(':')?;
            let begin = crate::usdt::begin_name(name)?;
            Some((index, format!("{provider}:{begin}")))
        })
        .collect();
    for (end, begin_name) in &ends {
        let end = *end;
        let planned = probes
            .iter()
            .any(|p| p.usdt.is_some() && &p.function == begin_name);
        if !planned {
            continue;
        }
        if broken.contains(&begin_name.as_str()) {
            tracing::warn!(
                begin = %begin_name,
                end = %probes[end].function,
                "this program never fires the begin site: its end sites are reported as instants"
            );
            continue;
        }
        let pair = match pairs.iter().position(|name| name == begin_name) {
            Some(pair) => pair,
            None => {
                pairs.push(begin_name.clone());
                pairs.len() - 1
            }
        };
        if let Some(usdt) = &mut probes[end].usdt {
            usdt.role = UsdtRole::End { pair };
        }
    }
    for (pair, begin_name) in pairs.iter().enumerate() {
        let Some((provider, name)) = begin_name.split_once(':') else {
            continue;
        };
        let renamed = format!("{provider}:{}", crate::usdt::pair_name(name));
        for probe in probes.iter_mut() {
            if &probe.function != begin_name {
                continue;
            }
            if let Some(usdt) = &mut probe.usdt {
                usdt.role = UsdtRole::Begin {
                    pair,
                    nests: crate::usdt::nests(provider),
                };
                probe.function = renamed.clone();
            }
        }
    }
}

/// Suffix Go's linker gives the assembly (ABI0) version of a function that also has a Go
/// (ABIInternal) one. ABI0 code does not keep the goroutine in R14.
const GO_ABI0_SUFFIX: &str = ".abi0";

/// Turns a Go function's probe into an entry after its stack check plus uprobes on its RET
/// instructions. Never a uretprobe: the Go runtime walks goroutine stacks (growing them, for
/// the garbage collector) and aborts on the kernel trampoline's return address. A function
/// whose returns cannot be probed (it only tail-jumps or never returns, or its code does not
/// decode) is traced at its entry alone, as a zero-length span, and the log says why.
fn plan_go(module: &Module, function: &scope_symbolizer::Function, probe: &mut PlannedProbe) {
    probe.exit = Exit::Instant;
    if function.symbol.ends_with(GO_ABI0_SUFFIX) {
        tracing::warn!(function = %function.symbol, "Go assembly (ABI0) function: its calls are reported as zero-length spans at entry; trace its Go wrapper for durations");
        return;
    }
    probe.go = true;
    let points = match module.go_probe_points(function) {
        Ok(points) => points,
        Err(error) => {
            tracing::warn!(function = %function.symbol, %error, "cannot find the returns of this Go function: its calls are reported as zero-length spans at entry");
            return;
        }
    };
    let offsets: Option<Vec<u64>> = points
        .returns
        .iter()
        .map(|&ret| module.vaddr_to_file_offset(ret))
        .collect();
    let Some(entry_offset) = module.vaddr_to_file_offset(points.entry) else {
        return;
    };
    probe.address = points.entry;
    probe.file_offset = entry_offset;
    match offsets {
        // A function that is a lone RET returns where it is entered: zero length is right.
        Some(offsets) if !offsets.is_empty() && !offsets.contains(&entry_offset) => {
            probe.exit = Exit::ReturnSites(offsets);
        }
        Some(offsets) if offsets.is_empty() => {
            tracing::warn!(function = %function.symbol, "this Go function has no RET instruction (it ends in a tail jump or never returns): its calls are reported as zero-length spans at entry");
        }
        _ => {}
    }
}

/// The error for a pattern that matched nothing, with the closest name as a suggestion.
fn no_match(
    pattern: &Pattern,
    pid: u32,
    modules: &[PlannedModule],
    ifuncs: &[String],
) -> ScopeError {
    let searched_modules: Vec<&PlannedModule> = modules
        .iter()
        .filter(|m| pattern.wants_module(&m.path))
        .collect();
    let searched = match searched_modules.as_slice() {
        [] => format!(
            "no mapped file is named '{}*'; mapped: {}",
            pattern.library.as_deref().unwrap_or(""),
            modules
                .iter()
                .filter_map(|m| m.path.file_name()?.to_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        [only] => only.path.display().to_string(),
        [first, rest @ ..] => format!("{} and {} libraries", first.path.display(), rest.len()),
    };
    if let Some(name) = ifuncs.first() {
        return ScopeError::Ifunc { name: name.clone() };
    }
    let suggestion = suggest(
        pattern.glob.as_str(),
        searched_modules
            .iter()
            .flat_map(|m| m.module.functions().iter().map(|f| f.base_name.as_str())),
    );
    ScopeError::NoMatch {
        pattern: pattern.text.clone(),
        pid,
        searched,
        suggestion,
    }
}

/// The candidate closest to `pattern` (wildcards removed), if it is close enough to be what
/// the user meant: same name in another case, or a few typos away.
pub fn suggest<'a>(pattern: &str, candidates: impl Iterator<Item = &'a str>) -> Option<String> {
    let wanted: String = pattern
        .chars()
        .filter(|c| !matches!(c, '*' | '?' | '[' | ']' | '\\'))
        .collect();
    if wanted.is_empty() {
        return None;
    }
    let wanted_lower = wanted.to_lowercase();
    let budget = (wanted.chars().count() / 4).clamp(1, 3);
    let mut best: Option<(usize, &str)> = None;
    for candidate in candidates {
        // Compare against the full name and its last path component, so `fib` finds `demo::fib`.
        let leaf = candidate.rsplit("::").next().unwrap_or(candidate);
        let distance = [candidate, leaf]
            .iter()
            .map(|name| strsim::damerau_levenshtein(&wanted_lower, &name.to_lowercase()))
            .min()
            .unwrap_or(usize::MAX);
        if distance <= budget
            && best
                .is_none_or(|(d, c)| distance < d || (distance == d && candidate.len() < c.len()))
        {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, name)| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names() {
        let names = ["processCommand", "call", "processInlineBuffer", "demo::fib"];
        assert_eq!(
            suggest("procesCommand", names.iter().copied()).as_deref(),
            Some("processCommand")
        );
        assert_eq!(
            suggest("processcommand", names.iter().copied()).as_deref(),
            Some("processCommand")
        );
        assert_eq!(
            suggest("fbi", names.iter().copied()).as_deref(),
            Some("demo::fib")
        );
        assert_eq!(suggest("completelyDifferent", names.iter().copied()), None);
        assert_eq!(suggest("*", names.iter().copied()), None);
    }

    #[test]
    fn patterns_parse_library_prefix() {
        let p = Pattern::parse("libc.so.6!malloc").expect("valid");
        assert_eq!(p.library.as_deref(), Some("libc.so.6"));
        assert!(p.glob.matches("malloc"));
        assert!(p.wants_module(Path::new("/usr/lib/x86_64-linux-gnu/libc.so.6")));
        assert!(!p.wants_module(Path::new("/usr/bin/redis-server")));
        let p = Pattern::parse("ns::Foo::bar").expect("valid");
        assert!(p.library.is_none());
        assert!(Pattern::parse("f[oo").is_err());
        assert!(Pattern::parse(&"x".repeat(MAX_PATTERN_LEN + 1)).is_err());
    }
}
