//! The span store: an embedded SQLite file in WAL mode, written by one batching writer
//! thread off the hot path, bounded by size and age (retention runs continuously in the
//! writer), read through its own connection. Per-probe, per-minute counts and histograms are
//! maintained as spans are written, so `stats` never loads spans.
//!
//! The schema is in `schema.rs` and described for `sqlite3` users in `docs/store.md`.

mod histogram;
mod query;
mod schema;
mod writer;

use std::{
    collections::HashMap,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::Duration,
};

pub use histogram::RELATIVE_ERROR;
pub use query::{FunctionStats, SpanQuery, TraceQuery};
use rusqlite::{Connection, OpenFlags};
pub use schema::SCHEMA_VERSION;

use crate::{
    model::{Probe, Span},
    procfs::ProcessInfo,
    stats::Count,
};

/// Where the store lives unless `--db` says otherwise.
pub const DEFAULT_DB: &str = "/var/lib/scope/scope.db";
/// Spans plus reads/writes queued for the writer before new ones are dropped (and counted):
/// the bound on the memory waiting for the disk (about 40 MiB), and 1.5 s of a busy
/// request/response loop's spans and reads/writes at the writer's one-core rate.
pub const WRITE_QUEUE_ROWS: usize = 262_144;
/// Commands queued for the writer. The reader sweeps often, so batches can be small: the
/// queue is bounded by rows ([`WRITE_QUEUE_ROWS`]), this only bounds the channel.
const WRITE_QUEUE_COMMANDS: usize = 4096;
/// The longest a written span waits before its transaction commits: what a crash can lose.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);
/// Spans plus reads/writes in one transaction at most: past this many the writer commits
/// at once.
pub const MAX_TRANSACTION_ROWS: usize = 50_000;
/// The smallest `--retain-bytes` accepted: below it the WAL alone would not fit.
pub const MIN_RETAIN_BYTES: u64 = 1 << 20;

/// How the store is bounded.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// Keep the file (with its WAL) under this many bytes, evicting the oldest spans.
    pub retain_bytes: Option<u64>,
    /// Evict spans older than this.
    pub retain_age: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating the store's directory {}", dir.display())]
    Directory {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the span store {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("preparing the span store {}", path.display())]
    Schema {
        path: PathBuf,
        #[source]
        source: schema::SchemaError,
    },
    #[error("making {} readable by root alone", path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--retain-bytes {bytes} is below the minimum of {MIN_RETAIN_BYTES} bytes")]
    RetainTooSmall { bytes: u64 },
    #[error("the span store failed to {what}")]
    Sql {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the span store's writer has stopped (see the daemon log for why)")]
    WriterStopped,
    #[error("starting the span store's writer thread")]
    Thread(#[source] std::io::Error),
}

/// What happened to spans on their way into the file.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Spans committed to the file.
    pub written: Count,
    /// Spans dropped because the writer's queue was full.
    pub queue_full: Count,
    /// Spans lost because a write failed (disk full, I/O error).
    pub write_failed: Count,
    /// Spans deleted by retention (by size or age).
    pub evicted: Count,
    /// Reads and writes not stored (queue full, failed write).
    pub io_dropped: Count,
}

/// A session row as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSession {
    pub id: u64,
    pub pid: u32,
    pub comm: String,
    pub exe: String,
    pub patterns: Vec<String>,
    pub started_ns: u64,
    pub ended_ns: Option<u64>,
    /// The uid that attached it: only it and root see the session's spans.
    pub owner_uid: u32,
}

/// A traced process as the store keeps it: (pid, start) names it, so a reused pid is
/// another process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessRow {
    pub pid: u32,
    pub start_ns: u64,
    pub parent_pid: Option<u32>,
    pub session_id: Option<u64>,
    pub comm: String,
    pub exe: String,
    /// The parent's span that forked it.
    pub fork_span: Option<u64>,
    pub exited_ns: Option<u64>,
}

/// A trace, summarised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSummary {
    pub trace_id: crate::model::TraceId,
    pub start_ns: u64,
    pub end_ns: u64,
    pub spans: u64,
    /// The call the trace started with, if it is stored.
    pub root: Option<Span>,
    pub pids: Vec<u32>,
}

/// A probe about to be stored (its id comes from the store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewProbe {
    pub function: String,
    pub symbol: String,
    pub module: String,
    pub address: u64,
    pub file_offset: u64,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined_into: Option<String>,
    /// The start time of the process the probe is in (with its pid, names the process).
    pub process_start_ns: u64,
}

pub(crate) enum Command {
    Spans(Vec<Span>),
    Session {
        process: ProcessInfo,
        patterns: Vec<String>,
        started_ns: u64,
        owner_uid: u32,
        reply: SyncSender<Result<u64, StoreError>>,
    },
    /// Probes with the ids the store gave them: written in order before any span of them.
    Probes {
        session_id: u64,
        probes: Vec<(u64, NewProbe)>,
    },
    EndSession {
        session_id: u64,
        ended_ns: u64,
    },
    Process(ProcessRow),
    Io(Vec<crate::model::Io>),
    ProcessExited {
        pid: u32,
        start_ns: u64,
        exited_ns: u64,
    },
    Flush {
        reply: SyncSender<()>,
    },
}

/// Why rows did not reach the writer.
enum Lost {
    QueueFull,
    WriterGone,
}

pub struct Store {
    path: PathBuf,
    writer: Mutex<Option<SyncSender<Command>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    reader: Mutex<Connection>,
    probes: Mutex<HashMap<u64, Arc<Probe>>>,
    counters: Arc<StoreCounters>,
    /// Rows (spans, reads/writes) sent to the writer and not yet taken by it.
    queued: Arc<AtomicUsize>,
    /// Spans in the file when it was opened.
    initial_spans: u64,
    /// The next probe id: given out here, not by SQLite, so attaching (and following a fork)
    /// never waits for the writer, which may be busy with a backlog of spans.
    next_probe_id: AtomicU64,
    retain_bytes: Option<u64>,
    retain_age: Option<Duration>,
}

impl Store {
    /// Opens (creating and migrating as needed) the store and starts its writer. Sessions
    /// left open by a previous run are marked ended: their probes died with that daemon.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        if let Some(bytes) = config.retain_bytes
            && bytes < MIN_RETAIN_BYTES
        {
            return Err(StoreError::RetainTooSmall { bytes });
        }
        let path = config.path.clone();
        let (retain_bytes, retain_age) = (config.retain_bytes, config.retain_age);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            // Root's alone, like the file: it holds every user's spans.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| StoreError::Directory {
                    dir: dir.to_owned(),
                    source,
                })?;
        }
        private_files(&path)?;
        let mut conn = Connection::open(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        schema::prepare(&mut conn).map_err(|source| StoreError::Schema {
            path: path.clone(),
            source,
        })?;
        conn.execute(
            "UPDATE sessions SET ended_ns = started_ns WHERE ended_ns IS NULL",
            [],
        )
        .map_err(|source| StoreError::Sql {
            what: "close the sessions of the previous run",
            source,
        })?;

        let initial_spans: i64 = conn
            .query_row("SELECT count(*) FROM spans", [], |row| row.get(0))
            .map_err(|source| StoreError::Sql {
                what: "count the stored spans",
                source,
            })?;
        // Past every id ever given (AUTOINCREMENT's high-water mark survives deletions).
        let last_probe_id: i64 = conn
            .query_row(
                "SELECT max(COALESCE((SELECT max(id) FROM probes), 0),
                            COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'probes'), 0))",
                [],
                |row| row.get(0),
            )
            .map_err(|source| StoreError::Sql {
                what: "find the last probe id",
                source,
            })?;

        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        reader
            .busy_timeout(Duration::from_secs(10))
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;

        let counters = Arc::new(StoreCounters::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::sync_channel(WRITE_QUEUE_COMMANDS);
        let thread = std::thread::Builder::new()
            .name("scoped-store".into())
            .spawn({
                let counters = Arc::clone(&counters);
                let queued = Arc::clone(&queued);
                move || writer::run(conn, rx, config, counters, queued)
            })
            .map_err(StoreError::Thread)?;
        Ok(Store {
            path,
            writer: Mutex::new(Some(tx)),
            writer_thread: Mutex::new(Some(thread)),
            reader: Mutex::new(reader),
            probes: Mutex::new(HashMap::new()),
            counters,
            queued,
            initial_spans: initial_spans as u64,
            next_probe_id: AtomicU64::new(last_probe_id as u64 + 1),
            retain_bytes,
            retain_age,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn counters(&self) -> &StoreCounters {
        &self.counters
    }

    /// The bounds retention keeps: bytes and age.
    pub fn retention(&self) -> (Option<u64>, Option<Duration>) {
        (self.retain_bytes, self.retain_age)
    }

    /// Bytes the file and its WAL take on disk.
    pub fn file_bytes(&self) -> u64 {
        writer::file_len(&self.path) + writer::file_len(&writer::wal_path(&self.path))
    }

    /// Spans in the file now (kept without counting rows: written minus evicted).
    pub fn stored_spans(&self) -> u64 {
        (self.initial_spans + self.counters.written.get())
            .saturating_sub(self.counters.evicted.get())
    }

    /// Queues spans for the writer; never blocks. Spans that do not fit are counted, and
    /// `false` says they were lost.
    pub fn append(&self, spans: Vec<Span>) -> bool {
        let count = spans.len();
        match self.enqueue(count, Command::Spans(spans)) {
            Ok(()) => return true,
            Err(Lost::QueueFull) => self.counters.queue_full.add(count as u64),
            Err(Lost::WriterGone) => self.counters.write_failed.add(count as u64),
        }
        false
    }

    /// Queues reads and writes; never blocks (what does not fit is counted as dropped).
    pub fn append_io(&self, io: Vec<crate::model::Io>) {
        let count = io.len();
        if self.enqueue(count, Command::Io(io)).is_err() {
            self.counters.io_dropped.add(count as u64);
        }
    }

    /// Sends `rows` rows to the writer if they fit in [`WRITE_QUEUE_ROWS`].
    fn enqueue(&self, rows: usize, command: Command) -> Result<(), Lost> {
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + rows <= WRITE_QUEUE_ROWS).then_some(queued + rows)
            });
        if reserved.is_err() {
            return Err(Lost::QueueFull);
        }
        let writer = lock(&self.writer);
        let sent = match writer.as_ref() {
            None => Err(Lost::WriterGone),
            Some(tx) => tx.try_send(command).map_err(|error| match error {
                TrySendError::Full(_) => Lost::QueueFull,
                TrySendError::Disconnected(_) => Lost::WriterGone,
            }),
        };
        if sent.is_err() {
            self.queued.fetch_sub(rows, Ordering::AcqRel);
        }
        sent
    }

    /// Queues spans, waiting for room in the writer's queue: for bulk loads (imports,
    /// benchmarks), never on the tracing path.
    pub fn append_wait(&self, spans: Vec<Span>) -> Result<(), StoreError> {
        let tx = lock(&self.writer)
            .clone()
            .ok_or(StoreError::WriterStopped)?;
        let rows = spans.len();
        self.queued.fetch_add(rows, Ordering::AcqRel);
        tx.send(Command::Spans(spans)).map_err(|_| {
            self.queued.fetch_sub(rows, Ordering::AcqRel);
            StoreError::WriterStopped
        })
    }

    /// Rows sent to the writer and not yet taken by it.
    pub fn queued_rows(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    fn call<T>(&self, command: impl FnOnce(SyncSender<T>) -> Command) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let tx = lock(&self.writer)
            .clone()
            .ok_or(StoreError::WriterStopped)?;
        tx.send(command(reply))
            .map_err(|_| StoreError::WriterStopped)?;
        answer.recv().map_err(|_| StoreError::WriterStopped)
    }

    /// Records a new session of user `owner_uid` and returns its id (unique across daemon
    /// runs).
    pub fn create_session(
        &self,
        process: &ProcessInfo,
        patterns: &[String],
        started_ns: u64,
        owner_uid: u32,
    ) -> Result<u64, StoreError> {
        self.call(|reply| Command::Session {
            process: process.clone(),
            patterns: patterns.to_vec(),
            started_ns,
            owner_uid,
            reply,
        })?
    }

    /// Records a session's probes; returns their ids, in order.
    pub fn create_probes(
        &self,
        session_id: u64,
        probes: Vec<NewProbe>,
    ) -> Result<Vec<u64>, StoreError> {
        let first = self
            .next_probe_id
            .fetch_add(probes.len() as u64, Ordering::Relaxed);
        let ids: Vec<u64> = (first..first + probes.len() as u64).collect();
        let tx = lock(&self.writer)
            .clone()
            .ok_or(StoreError::WriterStopped)?;
        tx.send(Command::Probes {
            session_id,
            probes: ids.iter().copied().zip(probes).collect(),
        })
        .map_err(|_| StoreError::WriterStopped)?;
        Ok(ids)
    }

    /// Marks a session ended (detached, or its attach failed).
    pub fn end_session(&self, session_id: u64, ended_ns: u64) {
        if let Some(tx) = lock(&self.writer).as_ref() {
            let _ = tx.send(Command::EndSession {
                session_id,
                ended_ns,
            });
        }
    }

    /// Records a traced process (or updates it: an exec changes its program).
    pub fn record_process(&self, row: ProcessRow) {
        if let Some(tx) = lock(&self.writer).as_ref() {
            let _ = tx.send(Command::Process(row));
        }
    }

    /// Records that a process ended.
    pub fn process_exited(&self, pid: u32, start_ns: u64, exited_ns: u64) {
        if let Some(tx) = lock(&self.writer).as_ref() {
            let _ = tx.send(Command::ProcessExited {
                pid,
                start_ns,
                exited_ns,
            });
        }
    }

    /// Waits until everything queued so far is committed.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.call(|reply| Command::Flush { reply })
    }

    /// Commits what is queued and stops the writer. Later appends are counted as failed.
    pub fn close(&self) {
        let _ = self.flush();
        lock(&self.writer).take();
        if let Some(thread) = lock(&self.writer_thread).take() {
            let _ = thread.join();
        }
    }

    fn reader(&self) -> MutexGuard<'_, Connection> {
        lock(&self.reader)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// Creates the store's file readable and writable by its owner (root) alone, and takes
/// group and other access from an existing one and its WAL: the file holds every user's
/// spans, and the daemon decides who sees which. SQLite gives the WAL and shared-memory files
/// it creates the database file's mode.
fn private_files(path: &Path) -> Result<(), StoreError> {
    let denied = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Permissions { path, source }
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(denied(path))?;
    for file in [
        path.to_owned(),
        writer::wal_path(path),
        PathBuf::from(format!("{}-shm", path.display())),
    ] {
        match std::fs::metadata(&file) {
            Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(denied(&file))?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SQLite integers are signed; scope's ids and register values are `u64`. Stored bit for bit.
pub(crate) fn to_sql(value: u64) -> i64 {
    value as i64
}

pub(crate) fn from_sql(value: i64) -> u64 {
    value as u64
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{glob::Glob, model::TraceId};

    fn process(pid: u32) -> ProcessInfo {
        ProcessInfo {
            pid,
            comm: "demo".into(),
            exe: PathBuf::from("/usr/bin/demo"),
            start_time: 1,
        }
    }

    fn new_probe(function: &str) -> NewProbe {
        NewProbe {
            function: function.into(),
            symbol: function.into(),
            module: "/usr/bin/demo".into(),
            address: 0x1000,
            file_offset: 0x1000,
            file: Some("demo.c".into()),
            line: Some(7),
            inlined_into: None,
            process_start_ns: 1,
        }
    }

    fn open(dir: &Path, retain_bytes: Option<u64>, retain_age: Option<Duration>) -> Store {
        Store::open(StoreConfig {
            path: dir.join("scope.db"),
            retain_bytes,
            retain_age,
        })
        .expect("open store")
    }

    /// `EXPLAIN QUERY PLAN` details of `sql` on the store's schema.
    fn plan(store: &Store, sql: &str) -> Vec<String> {
        let conn = store.reader();
        let mut statement = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("the query prepares");
        // The planner does not look at the values; any will do.
        let values = vec![1i64; statement.parameter_count()];
        statement
            .query_map(rusqlite::params_from_iter(values), |row| {
                row.get::<_, String>(3)
            })
            .expect("plan")
            .collect::<Result<_, _>>()
            .expect("plan rows")
    }

    #[test]
    fn probe_ids_are_given_at_once_and_never_reused_across_runs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path(), None, None);
        let first = session(&store, 7, &["a", "b"]);
        let second = session(&store, 7, &["c"]);
        let ids: Vec<u64> = first.iter().chain(&second).map(|p| p.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        // Spans of those probes store (their rows were written first, in order).
        store.append(vec![span(&second[0], 1, 1_000, 10)]);
        store.close();
        let store = open(dir.path(), None, None);
        assert_eq!(store.stored_spans(), 1);
        let again = session(&store, 8, &["d"]);
        assert_eq!(again[0].id, 4, "ids continue past the last run's");
        let spans = store
            .spans(
                &SpanQuery {
                    pid: Some(7),
                    ..SpanQuery::default()
                },
                10,
            )
            .expect("query");
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].probe.function, "c");
    }

    #[test]
    fn trace_and_io_queries_search_an_index_never_scan() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path(), None, None);
        let trace = SpanQuery {
            trace_id: Some(TraceId { high: 1, low: 2 }),
            ..SpanQuery::default()
        };
        let by_pid = SpanQuery {
            pid: Some(7),
            ..SpanQuery::default()
        };
        for (sql, index) in [
            (query::spans_sql(Vec::new(), &trace, 0).0, "spans_trace"),
            (query::spans_sql(Vec::new(), &by_pid, 100).0, "spans_pid"),
            (query::IO_LINKS_SQL.to_owned(), "io_span"),
            (query::trace_io_sql(), "io_trace"),
            (query::io_peers_sql(false), "io_tcp"),
            (query::io_peers_sql(true), "io_tcp"),
        ] {
            let plan = plan(&store, &sql);
            assert!(
                plan.iter()
                    .any(|step| step.contains(&format!("INDEX {index}")))
                    && !plan.iter().any(|step| step.starts_with("SCAN")),
                "{sql}\nshould search {index}, plan: {plan:?}"
            );
        }
    }

    /// A session with probes `functions`, returned as the probes the pipeline would hold.
    fn session(store: &Store, pid: u32, functions: &[&str]) -> Vec<Arc<Probe>> {
        owned_session(store, pid, functions, 0)
    }

    /// A session of user `owner_uid`.
    fn owned_session(
        store: &Store,
        pid: u32,
        functions: &[&str],
        owner_uid: u32,
    ) -> Vec<Arc<Probe>> {
        let session = store
            .create_session(&process(pid), &["*".to_owned()], 1, owner_uid)
            .expect("session");
        let ids = store
            .create_probes(session, functions.iter().map(|f| new_probe(f)).collect())
            .expect("probes");
        ids.into_iter()
            .zip(functions)
            .map(|(id, f)| {
                Arc::new(Probe {
                    id,
                    session_id: session,
                    pid,
                    function: (*f).into(),
                    symbol: (*f).into(),
                    module: "/usr/bin/demo".into(),
                    address: 0x1000,
                    file_offset: 0x1000,
                    file: Some("demo.c".into()),
                    line: Some(7),
                    inlined_into: None,
                    comm: "demo".into(),
                    exe: "/usr/bin/demo".into(),
                    owner_uid,
                })
            })
            .collect()
    }

    fn span(probe: &Arc<Probe>, id: u64, start_ns: u64, duration_ns: u64) -> Span {
        Span {
            id,
            parent_id: 0,
            trace_id: TraceId { high: 1, low: id },
            pid: probe.pid,
            tid: probe.pid,
            start_ns,
            duration_ns,
            depth: 0,
            args: [id, u64::MAX, 0, 0, 0, 0],
            ret: u64::MAX - id,
            caller: 0x4000,
            flags: 0,
            // Every other span carries a text, as USDT spans do, to see it round-trip.
            text: id.is_multiple_of(2).then(|| format!("SELECT {id} -- é")),
            probe: Arc::clone(probe),
        }
    }

    const T0: u64 = 1_800_000_000_000_000_000;

    #[test]
    fn many_small_batches_are_bounded_by_rows_not_by_batches() {
        // The reader hands over whatever a sweep found: a burst of tiny batches must not
        // fill the writer's queue while the rows they hold are few.
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path(), None, None);
        let probes = session(&store, 42, &["f"]);
        for batch in 0..3000u64 {
            let spans = (0..10)
                .map(|i| span(&probes[0], batch * 10 + i + 1, T0 + batch * 10 + i, 5))
                .collect();
            store.append(spans);
        }
        store.flush().expect("flush");
        assert_eq!(store.counters().queue_full.get(), 0);
        assert_eq!(store.counters().written.get(), 30_000);
        assert_eq!(store.queued_rows(), 0);
    }

    #[test]
    fn rows_past_the_queue_bound_are_counted_not_queued() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path(), None, None);
        let probes = session(&store, 42, &["f"]);
        let batch = |first: u64, count: u64| -> Vec<Span> {
            (first..first + count)
                .map(|i| span(&probes[0], i + 1, T0 + i, 5))
                .collect()
        };
        // More than the queue holds in one go: refused whole, and counted.
        store.append(batch(0, WRITE_QUEUE_ROWS as u64 + 1));
        assert_eq!(
            store.counters().queue_full.get(),
            WRITE_QUEUE_ROWS as u64 + 1
        );
        store.append(batch(0, 100));
        store.flush().expect("flush");
        assert_eq!(store.counters().written.get(), 100);
        assert_eq!(store.queued_rows(), 0);
    }

    #[test]
    fn spans_round_trip_with_filters_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path(), None, None);
        let probes = session(&store, 42, &["demo::fib", "main"]);
        let spans: Vec<Span> = (1..=100)
            .map(|i| span(&probes[(i % 2) as usize], i, T0 + i * 1_000, i * 10))
            .collect();
        store.append(spans.clone());
        store.flush().expect("flush");
        assert_eq!(store.counters().written.get(), 100);
        assert_eq!(store.stored_spans(), 100);

        let all = store.spans(&SpanQuery::default(), 0).expect("query");
        assert_eq!(
            all, spans,
            "every field survives, u64 values above i64::MAX included"
        );
        let fib = SpanQuery {
            function: Some(Glob::new("*fib").expect("glob")),
            ..SpanQuery::default()
        };
        assert_eq!(store.spans(&fib, 0).expect("query").len(), 50);
        let newest = store.spans(&fib, 3).expect("query");
        assert_eq!(
            newest.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![96, 98, 100]
        );
        let window = SpanQuery {
            since_ns: Some(T0 + 10_000),
            until_ns: Some(T0 + 20_000),
            ..SpanQuery::default()
        };
        assert_eq!(store.spans(&window, 0).expect("query").len(), 10);
        let slow = SpanQuery {
            min_duration_ns: Some(900),
            ..SpanQuery::default()
        };
        assert_eq!(store.spans(&slow, 0).expect("query").len(), 11);
        let trace = SpanQuery {
            trace_id: Some(TraceId { high: 1, low: 7 }),
            ..SpanQuery::default()
        };
        assert_eq!(
            store
                .spans(&trace, 0)
                .expect("query")
                .iter()
                .map(|s| s.id)
                .collect::<Vec<_>>(),
            vec![7]
        );
        let other_pid = SpanQuery {
            pid: Some(43),
            ..SpanQuery::default()
        };
        assert!(store.spans(&other_pid, 0).expect("query").is_empty());
        drop(store);

        let reopened = open(dir.path(), None, None);
        assert_eq!(reopened.stored_spans(), 100);
        assert_eq!(
            reopened.spans(&SpanQuery::default(), 0).expect("query"),
            spans
        );
        let sessions = reopened.sessions().expect("sessions");
        assert_eq!(sessions.len(), 1);
        assert!(
            sessions[0].ended_ns.is_some(),
            "a session of a previous run is closed"
        );
        assert_eq!(sessions[0].patterns, vec!["*".to_owned()]);
    }

    #[test]
    fn a_user_reads_only_its_own_sessions_also_after_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path(), None, None);
        let user = owned_session(&store, 100, &["client"], 1000);
        let root = session(&store, 200, &["server"]);
        // One trace through both: the user's client call and root's server handling it.
        let trace = TraceId { high: 9, low: 1 };
        let mut client = span(&user[0], 1, T0, 100);
        client.trace_id = trace;
        let mut server = span(&root[0], 2, T0 + 10, 50);
        server.trace_id = trace;
        server.parent_id = 1;
        store.append(vec![client.clone(), server.clone()]);
        for (pid, session_id) in [(100, user[0].session_id), (200, root[0].session_id)] {
            store.record_process(ProcessRow {
                pid,
                start_ns: T0,
                parent_pid: None,
                session_id: Some(session_id),
                comm: "demo".into(),
                exe: "/usr/bin/demo".into(),
                fork_span: None,
                exited_ns: None,
            });
        }
        store.flush().expect("flush");
        drop(store);

        let db = dir.path().join("scope.db");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let store = open(dir.path(), None, None);
        for file in [db.clone(), writer::wal_path(&db)] {
            let mode = std::fs::metadata(&file)
                .expect("the file")
                .permissions()
                .mode();
            assert_eq!(
                mode & 0o777,
                0o600,
                "{} holds every user's spans: root's alone",
                file.display()
            );
        }
        let mine = |owner: Option<u32>| SpanQuery {
            owner,
            ..SpanQuery::default()
        };
        let ids = |spans: Vec<Span>| spans.iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(ids(store.spans(&mine(None), 0).expect("query")), [1, 2]);
        assert_eq!(ids(store.spans(&mine(Some(1000)), 0).expect("query")), [1]);
        assert!(store.spans(&mine(Some(1001)), 0).expect("query").is_empty());
        let root_session = SpanQuery {
            session_id: Some(root[0].session_id),
            ..mine(Some(1000))
        };
        assert!(
            store.spans(&root_session, 0).expect("query").is_empty(),
            "naming root's session does not show its spans"
        );
        let stats = store.stats(&mine(Some(1000))).expect("stats");
        assert_eq!(
            stats
                .iter()
                .map(|s| s.function.as_str())
                .collect::<Vec<_>>(),
            ["client"]
        );

        let traces = |owner| {
            store
                .traces(&TraceQuery {
                    owner,
                    ..TraceQuery::default()
                })
                .expect("traces")
        };
        assert_eq!(
            (traces(None)[0].spans, traces(None)[0].pids.clone()),
            (2, vec![100, 200])
        );
        let users = traces(Some(1000));
        assert_eq!(users.len(), 1);
        assert_eq!(
            (users[0].spans, users[0].pids.clone(), users[0].end_ns),
            (1, vec![100], T0 + 100),
            "summarised from the user's own spans"
        );
        assert!(traces(Some(1001)).is_empty());

        let pids = |owner| {
            store
                .processes(owner)
                .expect("processes")
                .iter()
                .map(|p| p.pid)
                .collect::<Vec<_>>()
        };
        assert_eq!(pids(None), [100, 200]);
        assert_eq!(pids(Some(1000)), [100]);
        let owners: Vec<u32> = store
            .sessions()
            .expect("sessions")
            .iter()
            .map(|s| s.owner_uid)
            .collect();
        assert_eq!(
            owners,
            [0, 1000],
            "newest first, owners kept across a reopen"
        );
    }

    #[test]
    fn stats_percentiles_are_within_the_stated_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path(), None, None);
        let probes = session(&store, 7, &["work", "idle"]);
        // Durations spread over four orders of magnitude, across two minutes.
        let mut durations: Vec<u64> = (0..5000u64)
            .map(|i| 50 + (i * i * 7919) % 3_000_000)
            .collect();
        let spans: Vec<Span> = durations
            .iter()
            .enumerate()
            .map(|(i, &d)| span(&probes[0], i as u64 + 1, T0 + i as u64 * 20_000_000, d))
            .collect();
        store.append(spans);
        store.append(vec![span(&probes[1], 9999, T0, 5)]);
        store.flush().expect("flush");

        let stats = store.stats(&SpanQuery::default()).expect("stats");
        assert_eq!(stats[0].function, "work", "sorted by total time");
        let work = &stats[0];
        durations.sort_unstable();
        let exact = |q: f64| {
            durations[((q * durations.len() as f64).ceil() as usize).clamp(1, durations.len()) - 1]
        };
        assert_eq!(work.count, 5000);
        assert_eq!(work.total_ns, durations.iter().sum::<u64>());
        assert_eq!(work.min_ns, durations[0]);
        assert_eq!(work.max_ns, durations[durations.len() - 1]);
        for (q, got) in [(0.5, work.p50_ns), (0.95, work.p95_ns), (0.99, work.p99_ns)] {
            let want = exact(q);
            let error = (got as f64 - want as f64).abs() / want as f64;
            assert!(
                error <= RELATIVE_ERROR,
                "p{q}: {got} vs exact {want} ({error})"
            );
        }
        let only_idle = SpanQuery {
            function: Some(Glob::new("idle").expect("glob")),
            ..SpanQuery::default()
        };
        let idle = store.stats(&only_idle).expect("stats");
        assert_eq!((idle.len(), idle[0].count, idle[0].p99_ns), (1, 1, 5));
    }

    #[test]
    fn size_retention_keeps_the_file_under_the_cap_and_the_newest_spans() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cap = 2 << 20;
        let store = open(dir.path(), Some(cap), None);
        let probes = session(&store, 1, &["f"]);
        let mut next = 1u64;
        for _ in 0..40 {
            let batch: Vec<Span> = (0..2000)
                .map(|_| {
                    next += 1;
                    span(&probes[0], next, T0 + next * 1000, next)
                })
                .collect();
            store.append(batch);
            store.flush().expect("flush");
            assert!(
                store.file_bytes() <= cap,
                "{} bytes on disk, cap {cap}",
                store.file_bytes()
            );
        }
        assert!(store.counters().evicted.get() > 0, "retention had to evict");
        let kept = store.spans(&SpanQuery::default(), 0).expect("query");
        assert_eq!(
            kept.last().map(|s| s.id),
            Some(next),
            "the newest span is kept"
        );
        assert!(
            kept.windows(2).all(|w| w[1].id == w[0].id + 1),
            "what is kept is the newest contiguous run"
        );
        assert_eq!(store.stored_spans(), kept.len() as u64);
    }

    #[test]
    fn age_retention_evicts_old_spans() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = open(dir.path(), None, Some(Duration::from_secs(3600)));
        let probes = session(&store, 1, &["f"]);
        let now = crate::model::now_unix_ns();
        store.append(vec![
            span(&probes[0], 1, now - 7200 * 1_000_000_000, 5),
            span(&probes[0], 2, now, 5),
        ]);
        store.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(1500));
        store.flush().expect("flush");
        let kept = store.spans(&SpanQuery::default(), 0).expect("query");
        assert_eq!(kept.iter().map(|s| s.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(store.counters().evicted.get(), 1);
    }

    #[test]
    fn bad_configuration_and_newer_files_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            Store::open(StoreConfig {
                path: dir.path().join("a.db"),
                retain_bytes: Some(1000),
                retain_age: None
            }),
            Err(StoreError::RetainTooSmall { .. })
        ));
        let not_a_db = dir.path().join("not.db");
        std::fs::write(&not_a_db, b"this is not a database file at all, but text").expect("write");
        let error = Store::open(StoreConfig {
            path: not_a_db,
            retain_bytes: None,
            retain_age: None,
        })
        .err()
        .expect("a text file is not a store");
        assert!(error.to_string().contains("not.db"), "{error}");
    }
}
