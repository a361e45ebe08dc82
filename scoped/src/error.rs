//! The daemon's errors, and the one place they become gRPC statuses.

use std::{error::Error as _, path::PathBuf};

use scope_symbolizer::SymbolizeError;

/// Everything a request can fail with. Every message says what was wrong and, where there is
/// something to do about it, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("pid {pid} does not exist")]
    NoSuchProcess { pid: u32 },

    #[error("pid 0 is not a process: give the pid of the process to trace")]
    PidZero,

    #[error("no function pattern given: pass at least one --func GLOB")]
    NoPatterns,

    #[error("invalid function pattern {pattern:?}")]
    BadPattern {
        pattern: String,
        #[source]
        source: crate::glob::GlobError,
    },

    #[error("too many function patterns: {count} (at most {limit})")]
    TooManyPatterns { count: usize, limit: usize },

    #[error("no function matches '{pattern}' in pid {pid} ({searched}){}",
        suggestion.as_ref().map(|s| format!("; did you mean {s}?")).unwrap_or_default())]
    NoMatch {
        pattern: String,
        pid: u32,
        searched: String,
        suggestion: Option<String>,
    },

    #[error(
        "{name} is an IFUNC: its symbol is the resolver that picks an implementation once, at load time; trace the implementations instead (e.g. '__{name}_*')"
    )]
    Ifunc { name: String },

    #[error(
        "'{pattern}' matches {count} functions, more than the {limit} one session may probe; narrow the pattern"
    )]
    TooManyMatches {
        pattern: String,
        count: usize,
        limit: usize,
    },

    #[error(
        "out of probe slots: {needed} needed, {free} free (scoped --max-probes raises the limit)"
    )]
    ProbeSlotsExhausted { needed: usize, free: usize },

    #[error("{} is not an ELF file that can be traced", path.display())]
    NotElf {
        path: PathBuf,
        #[source]
        source: SymbolizeError,
    },

    #[error("{} is not mapped by pid {pid}; the process maps: {mapped}", path.display())]
    BinaryNotMapped {
        path: PathBuf,
        pid: u32,
        mapped: String,
    },

    #[error("cannot read the memory map of pid {pid}")]
    ProcessMaps {
        pid: u32,
        #[source]
        source: SymbolizeError,
    },

    #[error("no session {id} (see `scope sessions`)")]
    NoSuchSession { id: u64 },

    #[error("permission denied: uid {uid} may not trace pid {pid}: {reason}")]
    NotTraceable {
        uid: u32,
        pid: u32,
        reason: crate::access::Denial,
    },

    #[error(
        "permission denied: session {id} is another user's; uid {uid} may detach only its own sessions (see `scope sessions`)"
    )]
    NotYourSession { id: u64, uid: u32 },

    #[error(
        "uid {uid} already has {limit} sessions, the most one user may hold (scoped --max-sessions-per-caller); detach one first"
    )]
    TooManySessions { uid: u32, limit: usize },

    #[error("attaching {count} probes to {} in pid {pid} failed", module.display())]
    Attach {
        module: PathBuf,
        pid: u32,
        count: usize,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error(transparent)]
    Store(#[from] crate::store::StoreError),

    #[error("cannot measure what probes cost, so an overhead budget cannot be kept: {why}")]
    Calibration { why: String },

    #[error("cannot sample pid {pid} to plan probes: {source}")]
    Sample {
        pid: u32,
        #[source]
        source: crate::sampler::SampleError,
    },

    #[error(
        "no function of pid {pid} fits a budget of {budget_percent}% of a CPU: {why} (`scope analyze --pid {pid}` shows the plan; a larger --budget, or --func with --sample, may do)"
    )]
    EmptyPlan {
        pid: u32,
        budget_percent: f64,
        why: String,
    },

    #[error(
        "--auto chooses the functions itself (in the executable and its libraries): give either --auto or --func/--usdt/--binary, not both"
    )]
    AutoWithPatterns,

    #[error(
        "no USDT probe matches '{pattern}' in pid {pid} (`scope analyze --pid {pid}` lists them)"
    )]
    NoUsdtMatch { pattern: String, pid: u32 },

    #[error("{} is not readable by uid {uid}", path.display())]
    NotReadable { path: PathBuf, uid: u32 },

    #[error("kernel map {map} could not be updated")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

impl ScopeError {
    /// The message with its chain of causes, `outer: inner: innermost`.
    pub fn chain(&self) -> String {
        let mut message = self.to_string();
        let mut source = self.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }
}

impl From<ScopeError> for tonic::Status {
    fn from(error: ScopeError) -> Self {
        use ScopeError::*;
        let message = error.chain();
        match error {
            NoSuchProcess { .. } | NoSuchSession { .. } => tonic::Status::not_found(message),
            PidZero
            | NoPatterns
            | BadPattern { .. }
            | TooManyPatterns { .. }
            | NoMatch { .. }
            | Ifunc { .. }
            | TooManyMatches { .. }
            | NotElf { .. }
            | BinaryNotMapped { .. }
            | NoUsdtMatch { .. } => tonic::Status::invalid_argument(message),
            NotTraceable { .. } | NotYourSession { .. } | NotReadable { .. } => {
                tonic::Status::permission_denied(message)
            }
            ProbeSlotsExhausted { .. } | TooManySessions { .. } => {
                tonic::Status::resource_exhausted(message)
            }
            ProcessMaps { .. } => tonic::Status::failed_precondition(message),
            Attach { .. } | Map { .. } | Store(_) => tonic::Status::internal(message),
            Calibration { .. } | Sample { .. } | EmptyPlan { .. } => {
                tonic::Status::failed_precondition(message)
            }
            AutoWithPatterns => tonic::Status::invalid_argument(message),
        }
    }
}
