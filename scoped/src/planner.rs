//! The probe planner behind `scope analyze` and `scope attach --auto`: which functions of a
//! program are worth a probe, and which of them fit an overhead budget.
//!
//! 1. **Classify** functions by rules over their names, sizes and libraries ([`classify`]):
//!    request entry points (the known servers' from `analyze`, and names like
//!    `handle_request`), handlers, I/O, locks, allocation, crypto and parsing.
//! 2. **Find candidates**: the entry points of the executable, and every function the
//!    process spent CPU time in ([`crate::sampler`]: a sample per millisecond of each
//!    thread's CPU, with its user call chain) that a rule classifies — or, unclassified, that
//!    is among the hottest (class `cpu`). A sample's position in its call chain gives the
//!    function's position in the call graph: where the thread was (self samples) or a caller
//!    of it (stack samples, as far as frame pointers let the kernel walk).
//! 3. **Count** the candidates' calls for a moment: the daemon attaches them as a session
//!    that records nothing (1 call in `u32::MAX` kept) and reads the kernel's per-probe call
//!    counters. Sampling alone cannot give a call rate (a sample says where time goes, not
//!    how often a function is entered). First short screening counts (a quarter of the
//!    counting window, up to three rounds): a candidate whose cost at the rate seen is over
//!    the budget alone is out — that rate is a floor, since the traps slowed the thread — and
//!    is not counted again, so its traps do not hold the others' rates down. Then the rest
//!    are counted for the whole window. The traps of that run still slow a thread that had
//!    no room for them (busy, in the sampling window, more than 1 − their share of its
//!    time); [`correct`] undoes that for such a process, assuming its calls are paced by
//!    its CPU (an overestimate for calls paced otherwise, timers say, which errs on the side
//!    of the budget).
//! 4. **Fit** ([`fit`]): each candidate's cost is its rate × (the trap of its first
//!    instruction, as `budget::TrapCosts` calibrated it, + the programs' cost per call) —
//!    the model `--budget` enforces. In rank order (entry points, handlers, I/O, locks,
//!    allocation, crypto, parsing, hot code; within a class the ones on the most sampled
//!    stacks first), a candidate is chosen when it fits in what is left of the budget; one
//!    whose cost alone exceeds the budget never is.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
};

use scope_symbolizer::{Function, Module, ProcessMaps};

use crate::sampler::Profile;

/// A function's class, in the order plans rank them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Where a request starts.
    Entry,
    /// Handles one kind of request or event.
    Handler,
    Io,
    Lock,
    Alloc,
    Crypto,
    Parse,
    /// No rule says what it does, but the process spends its CPU time there.
    Cpu,
}

impl Class {
    pub const ALL: [Class; 8] = [
        Class::Entry,
        Class::Handler,
        Class::Io,
        Class::Lock,
        Class::Alloc,
        Class::Crypto,
        Class::Parse,
        Class::Cpu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Entry => "entry",
            Class::Handler => "handler",
            Class::Io => "io",
            Class::Lock => "lock",
            Class::Alloc => "alloc",
            Class::Crypto => "crypto",
            Class::Parse => "parse",
            Class::Cpu => "cpu",
        }
    }
}

/// Functions smaller than this are not planned (unless a known entry point): accessors,
/// thunks and stubs, called often for almost no work, where a trap costs many times the
/// call.
pub const MIN_FUNCTION_BYTES: u64 = 16;
/// The most probes a plan chooses.
pub const MAX_PLAN_PROBES: usize = 16;
/// The most candidates one counting run measures (each is a probe for its duration).
pub const MAX_COUNTED: usize = 48;
/// Unclassified functions kept as `cpu` candidates: the hottest few by self samples.
pub const MAX_CPU_CANDIDATES: usize = 4;
/// An unclassified function is a `cpu` candidate with at least this share of samples
/// innermost ("hot")...
pub const MIN_CPU_SHARE: f64 = 0.02;
/// ...or on at least this share of sampled stacks while innermost in under a fifth of them
/// ("outer": its time is mostly in what it calls, as a dispatcher's is). Only call chains
/// the kernel could walk (frame pointers) show this.
pub const MIN_OUTER_SHARE: f64 = 0.05;
/// Name-rule entry points and timer handlers of the executable (all its handlers, for a
/// file) that are candidates without being sampled, at most: entry points wait for
/// requests more than they compute, timers run a few times a second.
pub const MAX_STATIC_CANDIDATES: usize = 16;
/// Busy-thread trap share above which a counting run's rates cannot be corrected: the
/// thread did little but trap, and the true rate is only known to be very high.
const MAX_CORRECTABLE_SHARE: f64 = 0.9;

/// Splits a function's name into lower-case words: its last path segment (`a::b::c` → `c`),
/// at `_`, digits' edges and camelCase boundaries (`readQueryFromClient` → read, query,
/// from, client; `SSLRead` → ssl, read).
pub fn words(name: &str) -> Vec<String> {
    let name = name.split('(').next().unwrap_or(name);
    let last = name
        .rsplit("::")
        .find(|s| !s.is_empty() && !s.starts_with('{'))
        .unwrap_or(name);
    let chars: Vec<char> = last.chars().collect();
    let mut words = Vec::new();
    let mut word = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_ascii_alphanumeric() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            continue;
        }
        let prev = i.checked_sub(1).and_then(|p| chars.get(p)).copied();
        let next = chars.get(i + 1).copied();
        let boundary = match prev {
            Some(p) if c.is_ascii_uppercase() => {
                p.is_ascii_lowercase()
                    || p.is_ascii_digit()
                    || (p.is_ascii_uppercase() && next.is_some_and(|n| n.is_ascii_lowercase()))
            }
            _ => false,
        };
        if boundary && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        word.push(c.to_ascii_lowercase());
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Whether a name's words say it runs on a timer (`serverCron`, `on_tick`): called a
/// steady few times a second whatever the load, so cheap to probe and a program's pulse.
fn is_timer(words: &[String]) -> bool {
    matches!(
        words.last().map(String::as_str),
        Some("cron" | "timer" | "tick" | "periodic")
    )
}

/// The library a module is, for the rules that depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// The program's own executable.
    Executable,
    /// glibc: libc, libpthread, the dynamic loader.
    Libc,
    /// libssl and libcrypto.
    Ssl,
    Other,
}

impl Library {
    pub fn of(file_name: &str, is_main: bool) -> Library {
        if is_main {
            Library::Executable
        } else if ["libc.so", "libc-", "libpthread", "ld-linux", "libm.so"]
            .iter()
            .any(|p| file_name.starts_with(p))
        {
            Library::Libc
        } else if file_name.starts_with("libssl") || file_name.starts_with("libcrypto") {
            Library::Ssl
        } else {
            Library::Other
        }
    }
}

fn any(words: &[String], set: &[&str]) -> Option<String> {
    words.iter().find(|w| set.contains(&w.as_str())).cloned()
}

/// The class of function `name` (demangled) in a library of kind `library`, and the rule
/// that said so; `None` when no rule applies. Known servers' entry points are not decided
/// here (`analyze` knows them by program).
pub fn classify(name: &str, library: Library) -> Option<(Class, String)> {
    let words = words(name);
    let lower = name.to_ascii_lowercase();
    let first = words.first().map(String::as_str).unwrap_or("");
    let last = words.last().map(String::as_str).unwrap_or("");
    if library == Library::Ssl {
        return Some((Class::Crypto, "in libssl/libcrypto".to_owned()));
    }
    // Where requests start: a verb of handling with a noun of requests.
    const VERBS: &[&str] = &["handle", "process", "serve", "dispatch", "exec", "execute"];
    const NOUNS: &[&str] = &[
        "request",
        "requests",
        "req",
        "conn",
        "connection",
        "command",
        "query",
        "message",
        "msg",
        // An event loop's dispatch (`aeProcessEvents`, `ngx_process_events_and_timers`):
        // where an event-driven server's requests start.
        "event",
        "events",
    ];
    if library != Library::Libc
        && let (Some(verb), Some(noun)) = (any(&words, VERBS), any(&words, NOUNS))
    {
        return Some((Class::Entry, format!("named `{verb}` … `{noun}`")));
    }
    if library != Library::Libc
        && (matches!(last, "handler" | "command" | "cmd" | "callback")
            || matches!(first, "handle" | "on"))
    {
        return Some((Class::Handler, "named as a handler".to_owned()));
    }
    if library != Library::Libc && is_timer(&words) {
        return Some((
            Class::Handler,
            format!("a timer's handler (named `{last}`)"),
        ));
    }
    const CRYPTO: &[&str] = &[
        "ssl", "tls", "evp", "aes", "sha1", "sha256", "sha512", "md5", "hmac", "encrypt",
        "decrypt", "cipher", "crypt",
    ];
    if let Some(word) = any(&words, CRYPTO) {
        return Some((Class::Crypto, format!("named `{word}`")));
    }
    const LOCKS: &[&str] = &[
        "lock",
        "unlock",
        "trylock",
        "mutex",
        "futex",
        "rwlock",
        "spinlock",
        "spin",
        "sem",
        "semaphore",
        "condvar",
    ];
    if let Some(word) = any(&words, LOCKS) {
        return Some((Class::Lock, format!("named `{word}`")));
    }
    const ALLOC: &[&str] = &[
        "malloc", "calloc", "realloc", "free", "alloc", "palloc", "pfree", "zmalloc", "zfree",
        "mallocx",
    ];
    if let Some(word) = any(&words, ALLOC) {
        return Some((Class::Alloc, format!("named `{word}`")));
    }
    if first == "operator" && matches!(words.get(1).map(String::as_str), Some("new" | "delete")) {
        return Some((Class::Alloc, "C++ operator new/delete".to_owned()));
    }
    if words.iter().any(|w| w.contains("alloc")) {
        return Some((Class::Alloc, "named `…alloc…`".to_owned()));
    }
    const IO: &[&str] = &[
        "read",
        "write",
        "readv",
        "writev",
        "pread",
        "pread64",
        "pwrite",
        "pwrite64",
        "send",
        "sendto",
        "sendmsg",
        "recv",
        "recvfrom",
        "recvmsg",
        "accept",
        "accept4",
        "connect",
        "poll",
        "epoll",
        "select",
        "fsync",
        "fdatasync",
        "flush",
        "socket",
        "sendfile",
        "io",
    ];
    if let Some(word) = any(&words, IO) {
        return Some((Class::Io, format!("named `{word}`")));
    }
    if first.starts_with("epoll") {
        return Some((Class::Io, "named `epoll…`".to_owned()));
    }
    const PARSE: &[&str] = &[
        "lex",
        "lexer",
        "tokenize",
        "tokenizer",
        "decode",
        "deserialize",
        "unmarshal",
        "json",
    ];
    if let Some(word) = any(&words, PARSE) {
        return Some((Class::Parse, format!("named `{word}`")));
    }
    if lower.contains("parse") {
        return Some((Class::Parse, "named `…parse…`".to_owned()));
    }
    None
}

/// A function a plan considers.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Demangled name, raw symbol, the module's path and file name.
    pub function: String,
    pub symbol: String,
    pub module: PathBuf,
    pub module_name: String,
    pub address: u64,
    pub size: u64,
    pub class: Class,
    /// A known server's entry point (ranked before name-rule entry points).
    pub known_entry: bool,
    /// Why it is a candidate.
    pub why: String,
    pub self_samples: u64,
    pub stack_samples: u64,
    /// Trap + programs per call, nanoseconds.
    pub ns_per_call: f64,
    /// Measured calls a second (corrected), when counted.
    pub calls_per_second: Option<f64>,
    /// Set when the rate is only a floor: screened out at a rate its own traps held down, or
    /// counted while the thread did little but trap.
    pub floor: bool,
}

impl Candidate {
    /// The pattern that attaches exactly this function: its raw symbol in its module.
    pub fn pattern(&self) -> String {
        format!("{}!{}", self.module_name, self.symbol)
    }

    /// Whether [`Candidate::pattern`] is a glob that matches only itself.
    pub fn has_plain_symbol(&self) -> bool {
        !self.symbol.is_empty()
            && !self
                .symbol
                .contains(['*', '?', '[', ']', '\\', '!', '{', '}'])
    }

    /// Estimated cost, CPU nanoseconds a second.
    pub fn cost_ns(&self) -> Option<f64> {
        self.calls_per_second.map(|r| r * self.ns_per_call)
    }

    /// Rank order: by class; a known server's entry point first; then the ones seen called
    /// (a function not called now can wait for the slots left); then the most sampled.
    fn rank(
        &self,
    ) -> (
        Class,
        bool,
        bool,
        std::cmp::Reverse<u64>,
        std::cmp::Reverse<u64>,
    ) {
        (
            self.class,
            !self.known_entry,
            !self.calls_per_second.is_some_and(|r| r > 0.0),
            std::cmp::Reverse(self.stack_samples),
            std::cmp::Reverse(self.self_samples),
        )
    }
}

/// One line of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub candidate: Candidate,
    pub chosen: bool,
    /// Why it is a candidate and why it was chosen or left out.
    pub reason: String,
}

/// A ranked plan fitted to a budget.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbePlan {
    /// Share of one CPU (0.01 = 1%).
    pub budget: f64,
    /// The chosen functions' estimated cost together, share of one CPU.
    pub predicted: f64,
    pub window_ms: u64,
    pub samples: u64,
    pub count_ms: u64,
    /// Chosen first, in rank order; then the rest.
    pub functions: Vec<Planned>,
    pub notes: Vec<String>,
}

impl ProbePlan {
    pub fn chosen(&self) -> impl Iterator<Item = &Candidate> {
        self.functions
            .iter()
            .filter(|p| p.chosen)
            .map(|p| &p.candidate)
    }
}

/// A module of the process (or the file analyzed), as the planner sees it.
pub struct ModuleView {
    /// The path as the process sees it.
    pub path: PathBuf,
    pub name: String,
    pub module: Arc<Module>,
    pub library: Library,
}

/// Samples per function: (module index, function address) → (self, stack).
type Heat = HashMap<(usize, u64), (u64, u64)>;

/// Attributes each sampled stack to the functions on it: the innermost frame's function gets
/// a self sample, every function on the stack (once per sample) a stack sample.
fn heat(views: &[ModuleView], maps: &ProcessMaps, profile: &Profile) -> Heat {
    let by_path: HashMap<&std::path::Path, usize> = views
        .iter()
        .enumerate()
        .map(|(i, v)| (v.path.as_path(), i))
        .collect();
    let function_of = |address: u64| -> Option<(usize, u64)> {
        let (mapping, offset) = maps.lookup(address)?;
        let index = *by_path.get(std::path::Path::new(mapping.path.as_deref()?))?;
        let module = &views[index].module;
        let vaddr = module.file_offset_to_vaddr(offset)?;
        Some((index, module.function_at(vaddr)?.address))
    };
    let mut heat = Heat::new();
    for (stack, &count) in &profile.stacks {
        let mut seen = HashSet::new();
        for (depth, &address) in stack.iter().enumerate() {
            // A caller's frame holds a return address: the call is the byte before it.
            let at = if depth == 0 {
                address
            } else {
                address.saturating_sub(1)
            };
            let Some(key) = function_of(at) else {
                continue;
            };
            let entry = heat.entry(key).or_default();
            if depth == 0 {
                entry.0 += count;
            }
            if seen.insert(key) {
                entry.1 += count;
            }
        }
    }
    heat
}

fn new_candidate(
    view: &ModuleView,
    function: &Function,
    class: Class,
    known_entry: bool,
    why: String,
    (self_samples, stack_samples): (u64, u64),
) -> Candidate {
    Candidate {
        function: function.base_name.clone(),
        symbol: function.symbol.clone(),
        module: view.path.clone(),
        module_name: view.name.clone(),
        address: function.address,
        size: function.size,
        class,
        known_entry,
        why,
        self_samples,
        stack_samples,
        ns_per_call: 0.0,
        calls_per_second: None,
        floor: false,
    }
}

/// The functions worth considering: the executable's entry points — `known_entries` (a
/// known server's, with why) and those the name rules call entry points (and handlers, for a
/// file with no samples) — and, from `profile`, the sampled functions a rule classifies or
/// that are among the hottest. `views[0]` is the executable.
pub fn candidates(
    views: &[ModuleView],
    sampled: Option<(&ProcessMaps, &Profile)>,
    known_entries: &[(String, String)],
) -> Vec<Candidate> {
    let heat = sampled
        .map(|(maps, profile)| heat(views, maps, profile))
        .unwrap_or_default();
    let total_samples = sampled.map_or(0, |(_, p)| p.samples).max(1);
    let mut out: Vec<Candidate> = Vec::new();
    let mut taken: HashSet<(usize, u64)> = HashSet::new();
    let plannable = |f: &Function| !f.ifunc && (f.size == 0 || f.size >= MIN_FUNCTION_BYTES);

    // The executable's entry points, sampled or not.
    if let Some(exe) = views.first() {
        for (name, why) in known_entries {
            for function in exe.module.functions().iter().filter(|f| f.is_named(name)) {
                if function.ifunc || !taken.insert((0, function.address)) {
                    continue;
                }
                let samples = heat
                    .get(&(0, function.address))
                    .copied()
                    .unwrap_or_default();
                out.push(new_candidate(
                    exe,
                    function,
                    Class::Entry,
                    true,
                    why.clone(),
                    samples,
                ));
            }
        }
        let mut by_name: Vec<Candidate> = exe
            .module
            .functions()
            .iter()
            .filter(|f| plannable(f) && !taken.contains(&(0, f.address)))
            .filter_map(|f| {
                let (class, why) = classify(&f.base_name, exe.library)?;
                let wanted = class == Class::Entry
                    || (class == Class::Handler
                        && (sampled.is_none() || is_timer(&words(&f.base_name))));
                wanted.then(|| {
                    let samples = heat.get(&(0, f.address)).copied().unwrap_or_default();
                    new_candidate(exe, f, class, false, why, samples)
                })
            })
            .collect();
        // Entry points before handlers, the larger (more work a call) first.
        by_name.sort_by(|a, b| {
            (a.class, std::cmp::Reverse(a.size), &a.function).cmp(&(
                b.class,
                std::cmp::Reverse(b.size),
                &b.function,
            ))
        });
        by_name.truncate(MAX_STATIC_CANDIDATES);
        for candidate in by_name {
            taken.insert((0, candidate.address));
            out.push(candidate);
        }
    }

    // What the samples found.
    let mut hot: Vec<((usize, u64), (u64, u64))> = heat.into_iter().collect();
    hot.sort_by(|a, b| {
        b.1.1
            .cmp(&a.1.1)
            .then(b.1.0.cmp(&a.1.0))
            .then(a.0.cmp(&b.0))
    });
    let mut cpu = 0usize;
    for ((index, address), samples) in hot {
        if taken.contains(&(index, address)) {
            continue;
        }
        let view = &views[index];
        let Some(function) = view.module.function_at(address) else {
            continue;
        };
        if !plannable(function) || function.address != address {
            continue;
        }
        let share = |n: u64| 100.0 * n as f64 / total_samples as f64;
        let position = format!(
            "on {:.1}% of sampled stacks, innermost in {:.1}%",
            share(samples.1),
            share(samples.0)
        );
        let (class, why) = match classify(&function.base_name, view.library) {
            Some((class, why)) => (class, format!("{why}; {position}")),
            // Unnamed by any rule but where the CPU goes, innermost (hot) or around it (outer,
            // by its position in the call graph). Not libc's string and memory functions:
            // called far too often for a trap each.
            None if view.library != Library::Libc && cpu < MAX_CPU_CANDIDATES => {
                let total = total_samples as f64;
                let hot = samples.0 as f64 >= MIN_CPU_SHARE * total;
                let outer =
                    samples.1 as f64 >= MIN_OUTER_SHARE * total && samples.0 * 5 < samples.1;
                if !(hot || outer) {
                    continue;
                }
                cpu += 1;
                let kind = if hot {
                    "hot"
                } else {
                    "outer (its time is mostly in its callees)"
                };
                (Class::Cpu, format!("{kind}: {position}"))
            }
            None => continue,
        };
        taken.insert((index, address));
        out.push(new_candidate(view, function, class, false, why, samples));
    }
    out.retain(Candidate::has_plain_symbol);
    out
}

/// Ranks `candidates` and keeps the first [`MAX_COUNTED`]: those a counting run measures.
pub fn keep_for_counting(candidates: &mut Vec<Candidate>) {
    candidates.sort_by(|a, b| a.rank().cmp(&b.rank()).then(a.function.cmp(&b.function)));
    candidates.truncate(MAX_COUNTED);
}

/// Undoes the slowdown a counting run's traps caused: with `trap_share` of a busy thread's
/// time spent in traps, a CPU-bound thread made `1 − share` of its untraced calls. Returns
/// the corrected rate and whether the share was too high to correct (then the rate is a
/// floor).
pub fn correct(rate: f64, trap_share: f64) -> (f64, bool) {
    if trap_share >= MAX_CORRECTABLE_SHARE {
        (rate / (1.0 - MAX_CORRECTABLE_SHARE), true)
    } else {
        (rate / (1.0 - trap_share.max(0.0)), false)
    }
}

/// Ranks `candidates` and chooses, greedily in rank order, those whose cost fits in what is
/// left of `budget` (a share of one CPU), at most `max_probes`. Candidates without a
/// measured rate (a file, not a process) are chosen in rank order up to `max_probes` with
/// their cost unknown.
pub fn fit(mut candidates: Vec<Candidate>, budget: f64, max_probes: usize) -> ProbePlan {
    candidates.sort_by(|a, b| a.rank().cmp(&b.rank()).then(a.function.cmp(&b.function)));
    let budget_ns = budget * 1e9;
    let mut spent = 0.0;
    let mut chosen = 0usize;
    let mut planned = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let percent = |ns: f64| ns / 1e7;
        let (take, verdict) = match candidate.cost_ns() {
            None if chosen >= max_probes => (
                false,
                format!("left out: the plan already has {max_probes} probes"),
            ),
            None => (
                true,
                "chosen by rank; cost unknown (no running process to measure)".to_owned(),
            ),
            Some(cost) if cost > budget_ns => (
                false,
                format!(
                    "left out: alone it would cost {}{:.2}% of a CPU, over the {:.2}% budget",
                    if candidate.floor { "at least " } else { "" },
                    percent(cost),
                    percent(budget_ns)
                ),
            ),
            Some(_) if candidate.floor => (
                false,
                "left out: counting its calls kept its thread trapping, so its rate is only known to be at least this".to_owned(),
            ),
            Some(cost) if spent + cost > budget_ns => (
                false,
                format!(
                    "left out: {:.2}% would bring the plan to {:.2}%, over the {:.2}% budget",
                    percent(cost),
                    percent(spent + cost),
                    percent(budget_ns)
                ),
            ),
            Some(_) if chosen >= max_probes => (
                false,
                format!("left out: the plan already has {max_probes} probes"),
            ),
            Some(cost) => {
                spent += cost;
                (
                    true,
                    format!(
                        "chosen: {:.2}% of a CPU, {:.2}% with the ones before it",
                        percent(cost),
                        percent(spent)
                    ),
                )
            }
        };
        if take {
            chosen += 1;
        }
        let rate = match candidate.calls_per_second {
            Some(rate) => format!(
                "; {}{rate:.0} calls/s × {:.2} µs",
                if candidate.floor { "≥ " } else { "" },
                candidate.ns_per_call / 1e3
            ),
            None => String::new(),
        };
        planned.push(Planned {
            reason: format!("{}{rate}; {verdict}", candidate.why),
            candidate,
            chosen: take,
        });
    }
    // Chosen first, each group in rank order (the sort is stable).
    planned.sort_by_key(|p| !p.chosen);
    ProbePlan {
        budget,
        predicted: spent / 1e9,
        functions: planned,
        ..ProbePlan::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str) -> Option<Class> {
        classify(name, Library::Executable).map(|(c, _)| c)
    }

    #[test]
    fn names_split_into_words() {
        assert_eq!(
            words("readQueryFromClient"),
            ["read", "query", "from", "client"]
        );
        assert_eq!(words("SSL_read"), ["ssl", "read"]);
        assert_eq!(words("SSLRead"), ["ssl", "read"]);
        assert_eq!(words("demo::server::handle_request"), ["handle", "request"]);
        assert_eq!(words("ns::Foo::bar(int, char)"), ["bar"]);
        assert_eq!(words("LWLockAcquire"), ["lw", "lock", "acquire"]);
    }

    #[test]
    fn rules_classify_the_usual_suspects() {
        assert_eq!(class("processCommand"), Some(Class::Entry));
        assert_eq!(class("ngx_http_process_request"), Some(Class::Entry));
        assert_eq!(class("exec_simple_query"), Some(Class::Entry));
        assert_eq!(class("analyzed::handle_request"), Some(Class::Entry));
        assert_eq!(class("aeProcessEvents"), Some(Class::Entry));
        assert_eq!(class("setCommand"), Some(Class::Handler));
        assert_eq!(class("ngx_http_static_handler"), Some(Class::Handler));
        assert_eq!(class("serverCron"), Some(Class::Handler));
        assert_eq!(class("readQueryFromClient"), Some(Class::Io));
        assert_eq!(class("connSocketWrite"), Some(Class::Io));
        assert_eq!(class("pthread_mutex_lock"), Some(Class::Lock));
        assert_eq!(class("LWLockAcquire"), Some(Class::Lock));
        assert_eq!(class("je_malloc"), Some(Class::Alloc));
        assert_eq!(class("zmalloc_usable"), Some(Class::Alloc));
        assert_eq!(class("AllocSetAlloc"), Some(Class::Alloc));
        assert_eq!(class("EVP_DigestUpdate"), Some(Class::Crypto));
        assert_eq!(class("raw_parser"), Some(Class::Parse));
        assert_eq!(class("siphash"), None);
        // In libc, only what the rules name: no entry points or handlers there.
        assert_eq!(
            classify("read", Library::Libc).map(|(c, _)| c),
            Some(Class::Io)
        );
        assert_eq!(
            classify("__libc_start_call_main", Library::Libc).map(|(c, _)| c),
            None
        );
        assert_eq!(
            classify("BN_mul", Library::Ssl).map(|(c, _)| c),
            Some(Class::Crypto)
        );
    }

    fn candidate(name: &str, class: Class, rate: Option<f64>, stack: u64) -> Candidate {
        Candidate {
            function: name.to_owned(),
            symbol: name.to_owned(),
            module: PathBuf::from("/bin/x"),
            module_name: "x".to_owned(),
            address: 0x1000,
            size: 100,
            class,
            known_entry: false,
            why: "test".to_owned(),
            self_samples: 0,
            stack_samples: stack,
            ns_per_call: 2_000.0,
            calls_per_second: rate,
            floor: false,
        }
    }

    #[test]
    fn the_fit_takes_entry_points_first_and_never_one_over_the_budget() {
        // 1% = 10 ms/s; at 2 µs a call that is 5,000 calls/s.
        let plan = fit(
            vec![
                candidate("hot_io", Class::Io, Some(2_000.0), 50), // 4 ms/s
                candidate("malloc", Class::Alloc, Some(1e6), 90),  // 2 s/s: never
                candidate("handle_request", Class::Entry, Some(2_500.0), 10), // 5 ms/s
                candidate("lock", Class::Lock, Some(1_000.0), 5),  // 2 ms/s: over what is left
                candidate("parse", Class::Parse, Some(100.0), 1),  // 0.2 ms/s
            ],
            0.01,
            MAX_PLAN_PROBES,
        );
        let chosen: Vec<&str> = plan.chosen().map(|c| c.function.as_str()).collect();
        assert_eq!(chosen, ["handle_request", "hot_io", "parse"]);
        assert!((plan.predicted - 0.0092).abs() < 1e-9, "{}", plan.predicted);
        let reason = |name: &str| {
            plan.functions
                .iter()
                .find(|p| p.candidate.function == name)
                .map(|p| p.reason.clone())
                .unwrap_or_default()
        };
        assert!(reason("malloc").contains("alone it would cost"), "{plan:?}");
        assert!(reason("lock").contains("over the 1.00% budget"), "{plan:?}");
    }

    #[test]
    fn unmeasured_candidates_are_ranked_and_capped() {
        let mut known = candidate("PortalRun", Class::Entry, None, 0);
        known.known_entry = true;
        let plan = fit(
            vec![
                candidate("setCommand", Class::Handler, None, 0),
                candidate("exec_query", Class::Entry, None, 0),
                known,
            ],
            0.01,
            2,
        );
        let chosen: Vec<&str> = plan.chosen().map(|c| c.function.as_str()).collect();
        assert_eq!(chosen, ["PortalRun", "exec_query"]);
        assert!(!plan.functions[2].chosen);
    }

    /// A request handler of this test binary, for the rules to find.
    #[inline(never)]
    fn handle_request(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (x >> 7)
    }

    #[inline(never)]
    fn crunch_numbers(x: u64) -> u64 {
        (0..64).fold(x, |a, i| std::hint::black_box(a.rotate_left(i) ^ i as u64))
    }

    #[test]
    fn candidates_come_from_names_and_from_where_samples_land() {
        let symbolizer = scope_symbolizer::Symbolizer::new();
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        let Ok(module) = symbolizer.module(&exe) else {
            panic!("this test binary is an ELF file: {}", exe.display())
        };
        let views = [ModuleView {
            path: exe.clone(),
            name: exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            module,
            library: Library::Executable,
        }];
        let maps = ProcessMaps::read(std::process::id()).unwrap_or_else(|e| panic!("{e}"));
        // Every sample innermost in crunch_numbers, called from handle_request.
        let crunch = crunch_numbers as fn(u64) -> u64 as usize as u64;
        let handle = handle_request as fn(u64) -> u64 as usize as u64;
        assert_ne!(handle_request(1), crunch_numbers(1));
        let profile = Profile {
            stacks: [(vec![crunch + 2, handle + 5], 100)].into_iter().collect(),
            samples: 100,
            ..Profile::default()
        };
        let found = candidates(&views, Some((&maps, &profile)), &[]);
        let by_suffix = |suffix: &str| {
            found
                .iter()
                .find(|c| c.function.ends_with(suffix))
                .unwrap_or_else(|| panic!("no candidate {suffix}: {found:#?}"))
        };
        let handler = by_suffix("::handle_request");
        assert_eq!(handler.class, Class::Entry);
        assert_eq!((handler.self_samples, handler.stack_samples), (0, 100));
        let hot = by_suffix("::crunch_numbers");
        assert_eq!(hot.class, Class::Cpu);
        assert_eq!((hot.self_samples, hot.stack_samples), (100, 100));
        assert!(hot.why.starts_with("hot"), "{}", hot.why);
        assert!(hot.pattern().ends_with(&format!("!{}", hot.symbol)));
    }

    #[test]
    fn counting_rates_are_corrected_for_their_own_traps() {
        assert_eq!(correct(1_000.0, 0.0), (1_000.0, false));
        let (rate, saturated) = correct(1_000.0, 0.5);
        assert!((rate - 2_000.0).abs() < 1e-9 && !saturated);
        assert!(correct(1_000.0, 0.95).1);
    }
}
