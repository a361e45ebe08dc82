//! The store's one writer: batches spans into transactions (committed at least every
//! [`COMMIT_INTERVAL`]), keeps the per-minute aggregates in step, and enforces retention.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    COMMIT_INTERVAL, Command, MAX_TRANSACTION_ROWS, NewProbe, StoreConfig, StoreCounters,
    StoreError, histogram, to_sql,
};
use crate::model::{Span, now_unix_ns};

/// The writer connection's page cache, in KiB.
const WRITER_CACHE_KIB: u32 = 64 * 1024;
/// How often age retention runs (size retention is checked after every commit).
const AGE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Size retention starts evicting at this fraction of the cap...
const HIGH_WATER: f64 = 0.80;
/// ...and evicts down to this fraction.
const LOW_WATER: f64 = 0.6;
/// Rows deleted per statement, so retention never holds one huge transaction.
const DELETE_CHUNK: i64 = 20_000;
const NS_PER_MINUTE: u64 = 60_000_000_000;

pub(crate) fn run(
    mut conn: Connection,
    rx: Receiver<Command>,
    config: StoreConfig,
    counters: Arc<StoreCounters>,
    queued: Arc<AtomicUsize>,
) {
    // The span indexes (one of them on random trace ids) outgrow SQLite's 2 MiB default
    // cache within a few million spans; a larger cache keeps the write rate up.
    let _ = conn.execute_batch(&format!("PRAGMA cache_size = -{WRITER_CACHE_KIB};"));
    if let Some(cap) = config.retain_bytes {
        // Keep the WAL small relative to the cap: checkpoint often, truncate it after.
        let pages = (cap / 8 / 4096).clamp(16, 1000);
        let _ = conn.execute_batch(&format!(
            "PRAGMA wal_autocheckpoint = {pages}; PRAGMA journal_size_limit = {};",
            pages * 4096
        ));
    }
    // Under a size cap, what one transaction adds must fit the headroom above the
    // high-water mark (20% of the cap). A row costs about 200 bytes in the file, but in the
    // WAL up to a 4 KiB page of the index on random trace ids, as long as that index has
    // more pages than the transaction has rows: a row per 8 KiB of cap keeps a transaction
    // within about 12% of it.
    let max_rows = config.retain_bytes.map_or(MAX_TRANSACTION_ROWS, |cap| {
        ((cap / 8192) as usize).clamp(128, MAX_TRANSACTION_ROWS)
    });
    let mut batch = Batch::default();
    let mut last_age_check = Instant::now();
    loop {
        let timeout = match batch.first {
            Some(first) => COMMIT_INTERVAL.saturating_sub(first.elapsed()),
            None => AGE_CHECK_INTERVAL,
        };
        let command = rx.recv_timeout(timeout);
        let stop = matches!(command, Err(RecvTimeoutError::Disconnected));
        match command {
            Ok(Command::Spans(spans)) => {
                queued.fetch_sub(spans.len(), Ordering::AcqRel);
                batch.add(spans);
                if batch.rows() >= max_rows {
                    commit(&mut conn, &mut batch, &config, &counters);
                }
            }
            Ok(Command::Session {
                process,
                patterns,
                started_ns,
                owner_uid,
                reply,
            }) => {
                commit(&mut conn, &mut batch, &config, &counters);
                let _ = reply.send(insert_session(
                    &conn, &process, &patterns, started_ns, owner_uid,
                ));
            }
            Ok(Command::Probes { session_id, probes }) => {
                commit(&mut conn, &mut batch, &config, &counters);
                if let Err(error) = insert_probes(&mut conn, session_id, &probes) {
                    // Their spans will fail to store too, and be counted (write_failed).
                    tracing::error!(error = %error, session_id, "recording probes failed");
                }
            }
            Ok(Command::EndSession {
                session_id,
                ended_ns,
            }) => {
                if let Err(error) = conn.execute(
                    "UPDATE sessions SET ended_ns = ?2 WHERE id = ?1",
                    params![to_sql(session_id), to_sql(ended_ns)],
                ) {
                    tracing::warn!(%error, session_id, "recording the end of a session failed");
                }
            }
            Ok(Command::Io(io)) => {
                // Batched with spans: one transaction per commit interval, not per batch.
                queued.fetch_sub(io.len(), Ordering::AcqRel);
                batch.add_io(io);
                if batch.rows() >= max_rows {
                    commit(&mut conn, &mut batch, &config, &counters);
                }
            }
            Ok(Command::Process(row)) => {
                if let Err(error) = upsert_process(&conn, &row) {
                    tracing::warn!(%error, pid = row.pid, "recording a process failed");
                }
            }
            Ok(Command::ProcessExited {
                pid,
                start_ns,
                exited_ns,
            }) => {
                if let Err(error) = conn.execute(
                    "UPDATE processes SET exited_ns = ?3 WHERE pid = ?1 AND start_ns = ?2",
                    params![pid, to_sql(start_ns), to_sql(exited_ns)],
                ) {
                    tracing::warn!(%error, pid, "recording a process exit failed");
                }
            }
            Ok(Command::Flush { reply }) => {
                commit(&mut conn, &mut batch, &config, &counters);
                let _ = reply.send(());
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
        if batch
            .first
            .is_some_and(|first| first.elapsed() >= COMMIT_INTERVAL)
            || stop
        {
            commit(&mut conn, &mut batch, &config, &counters);
        }
        if last_age_check.elapsed() >= AGE_CHECK_INTERVAL {
            last_age_check = Instant::now();
            if let Some(age) = config.retain_age
                && let Err(error) = evict_older_than(&conn, age, &counters)
            {
                tracing::warn!(%error, "age retention failed");
            }
        }
        if stop {
            let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
            return;
        }
    }
}

/// Spans waiting for their transaction, with the aggregates they add.
#[derive(Default)]
struct Batch {
    spans: Vec<Span>,
    io: Vec<crate::model::Io>,
    first: Option<Instant>,
}

impl Batch {
    fn add(&mut self, spans: Vec<Span>) {
        self.first.get_or_insert_with(Instant::now);
        self.spans.extend(spans);
    }

    fn add_io(&mut self, io: Vec<crate::model::Io>) {
        self.first.get_or_insert_with(Instant::now);
        self.io.extend(io);
    }

    fn rows(&self) -> usize {
        self.spans.len() + self.io.len()
    }
}

#[derive(Default)]
struct MinuteAggregate {
    count: u64,
    total_ns: u64,
    min_ns: u64,
    max_ns: u64,
    buckets: HashMap<u32, u64>,
}

fn commit(
    conn: &mut Connection,
    batch: &mut Batch,
    config: &StoreConfig,
    counters: &StoreCounters,
) {
    let spans = std::mem::take(&mut batch.spans);
    let io = std::mem::take(&mut batch.io);
    batch.first = None;
    if !io.is_empty()
        && let Err(error) = write_io(conn, &io)
    {
        counters.io_dropped.add(io.len() as u64);
        tracing::warn!(%error, "writing reads and writes to the store failed");
    }
    if spans.is_empty() {
        return;
    }
    let count = spans.len() as u64;
    match write_spans(conn, &spans) {
        Ok(()) => counters.written.add(count),
        Err(error) => {
            counters.write_failed.add(count);
            tracing::error!(%error, spans = count, "writing spans to the store failed; they are lost (counted in store.write_failed)");
        }
    }
    if let Some(cap) = config.retain_bytes
        && let Err(error) = enforce_size(conn, &config.path, cap, counters)
    {
        tracing::warn!(%error, "size retention failed");
    }
}

fn write_spans(conn: &mut Connection, spans: &[Span]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut aggregates: HashMap<(u64, u64), MinuteAggregate> = HashMap::new();
    let mut traces: HashMap<(u64, u64), (u64, u64, u64)> = HashMap::new();
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO spans (span_id, parent_id, trace_hi, trace_lo, probe_id, pid, tid, start_ns, duration_ns,
                                depth, arg0, arg1, arg2, arg3, arg4, arg5, ret, caller, flags, text)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
        )?;
        for span in spans {
            insert.execute(params![
                to_sql(span.id),
                to_sql(span.parent_id),
                to_sql(span.trace_id.high),
                to_sql(span.trace_id.low),
                to_sql(span.probe.id),
                span.pid,
                span.tid,
                to_sql(span.start_ns),
                to_sql(span.duration_ns),
                span.depth,
                to_sql(span.args[0]),
                to_sql(span.args[1]),
                to_sql(span.args[2]),
                to_sql(span.args[3]),
                to_sql(span.args[4]),
                to_sql(span.args[5]),
                to_sql(span.ret),
                to_sql(span.caller),
                span.flags,
                span.text,
            ])?;
            let aggregate = aggregates
                .entry((span.probe.id, span.start_ns / NS_PER_MINUTE))
                .or_insert(MinuteAggregate {
                    min_ns: u64::MAX,
                    ..MinuteAggregate::default()
                });
            aggregate.count += 1;
            aggregate.total_ns = aggregate.total_ns.saturating_add(span.duration_ns);
            aggregate.min_ns = aggregate.min_ns.min(span.duration_ns);
            aggregate.max_ns = aggregate.max_ns.max(span.duration_ns);
            let trace = traces
                .entry((span.trace_id.high, span.trace_id.low))
                .or_insert((u64::MAX, 0, 0));
            trace.0 = trace.0.min(span.start_ns);
            trace.1 = trace.1.max(span.end_ns());
            trace.2 += 1;
            *aggregate
                .buckets
                .entry(histogram::bucket(span.duration_ns))
                .or_insert(0) += 1;
        }
        let mut minute = tx.prepare_cached(
            "INSERT INTO probe_minutes (probe_id, minute, count, total_ns, min_ns, max_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (probe_id, minute) DO UPDATE SET
                count = count + excluded.count, total_ns = total_ns + excluded.total_ns,
                min_ns = min(min_ns, excluded.min_ns), max_ns = max(max_ns, excluded.max_ns)",
        )?;
        let mut bucket = tx.prepare_cached(
            "INSERT INTO histogram (probe_id, minute, bucket, count) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (probe_id, minute, bucket) DO UPDATE SET count = count + excluded.count",
        )?;
        let mut trace = tx.prepare_cached(
            "INSERT INTO traces (trace_hi, trace_lo, start_ns, end_ns, spans) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (trace_hi, trace_lo) DO UPDATE SET
                start_ns = min(start_ns, excluded.start_ns), end_ns = max(end_ns, excluded.end_ns),
                spans = spans + excluded.spans",
        )?;
        for ((high, low), (start, end, count)) in &traces {
            trace.execute(params![
                to_sql(*high),
                to_sql(*low),
                to_sql(*start),
                to_sql(*end),
                to_sql(*count)
            ])?;
        }
        for ((probe_id, minute_index), aggregate) in &aggregates {
            minute.execute(params![
                to_sql(*probe_id),
                to_sql(*minute_index),
                to_sql(aggregate.count),
                to_sql(aggregate.total_ns),
                to_sql(aggregate.min_ns),
                to_sql(aggregate.max_ns),
            ])?;
            for (b, n) in &aggregate.buckets {
                bucket.execute(params![
                    to_sql(*probe_id),
                    to_sql(*minute_index),
                    b,
                    to_sql(*n)
                ])?;
            }
        }
    }
    tx.commit()
}

fn insert_session(
    conn: &Connection,
    process: &crate::procfs::ProcessInfo,
    patterns: &[String],
    started_ns: u64,
    owner_uid: u32,
) -> Result<u64, StoreError> {
    let patterns = serde_json::to_string(patterns).unwrap_or_else(|_| "[]".to_owned());
    conn.execute(
        "INSERT INTO sessions (pid, comm, exe, patterns, started_ns, owner_uid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            process.pid,
            process.comm,
            process.exe.display().to_string(),
            patterns,
            to_sql(started_ns),
            owner_uid
        ],
    )
    .map_err(|source| StoreError::Sql {
        what: "record a session",
        source,
    })?;
    Ok(conn.last_insert_rowid() as u64)
}

fn insert_probes(
    conn: &mut Connection,
    session_id: u64,
    probes: &[(u64, NewProbe)],
) -> Result<(), StoreError> {
    let sql = |source| StoreError::Sql {
        what: "record probes",
        source,
    };
    let tx = conn.transaction().map_err(sql)?;
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO probes (id, session_id, function, symbol, module, address, file_offset,
                                     file, line, inlined_into, process_start_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .map_err(sql)?;
        for (id, probe) in probes {
            insert
                .execute(params![
                    to_sql(*id),
                    to_sql(session_id),
                    probe.function,
                    probe.symbol,
                    probe.module,
                    to_sql(probe.address),
                    to_sql(probe.file_offset),
                    probe.file,
                    probe.line,
                    probe.inlined_into,
                    to_sql(probe.process_start_ns),
                ])
                .map_err(sql)?;
        }
    }
    tx.commit().map_err(sql)
}

fn write_io(conn: &mut Connection, io: &[crate::model::Io]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO io (time_ns, pid, tid, op, stream, stream_key, start, end, bytes, span_id, trace_hi, trace_lo,
                             peer_span_id, peer_trace_hi, peer_trace_lo, local_addr, remote_addr)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?;
        for event in io {
            insert.execute(params![
                to_sql(event.time_ns),
                event.pid,
                event.tid,
                event.op,
                event.stream,
                to_sql(event.key),
                to_sql(event.start),
                to_sql(event.end),
                event.bytes,
                to_sql(event.span_id),
                to_sql(event.trace_id.high),
                to_sql(event.trace_id.low),
                to_sql(event.peer_span_id),
                to_sql(event.peer_trace_id.high),
                to_sql(event.peer_trace_id.low),
                event.local.map(|a| a.to_string()),
                event.remote.map(|a| a.to_string()),
            ])?;
        }
    }
    tx.commit()
}

fn upsert_process(conn: &Connection, row: &super::ProcessRow) -> Result<(), rusqlite::Error> {
    conn.execute(
        "INSERT INTO processes (pid, start_ns, parent_pid, session_id, comm, exe, fork_span, exited_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (pid, start_ns) DO UPDATE SET
            comm = excluded.comm, exe = excluded.exe,
            parent_pid = coalesce(excluded.parent_pid, parent_pid),
            session_id = coalesce(excluded.session_id, session_id),
            fork_span = coalesce(excluded.fork_span, fork_span)",
        params![
            row.pid,
            to_sql(row.start_ns),
            row.parent_pid,
            row.session_id.map(to_sql),
            row.comm,
            row.exe,
            row.fork_span.map(to_sql),
            row.exited_ns.map(to_sql),
        ],
    )?;
    Ok(())
}

/// Deletes the spans that started before `cutoff` (stored form), a chunk per statement so
/// no single statement holds a huge transaction.
fn delete_spans_before(
    conn: &Connection,
    cutoff: i64,
    counters: &StoreCounters,
) -> Result<(), rusqlite::Error> {
    loop {
        let deleted = conn.execute(
            "DELETE FROM spans WHERE rowid IN
               (SELECT rowid FROM spans WHERE start_ns < ?1 ORDER BY start_ns LIMIT ?2)",
            params![cutoff, DELETE_CHUNK],
        )?;
        counters.evicted.add(deleted as u64);
        if (deleted as i64) < DELETE_CHUNK {
            return Ok(());
        }
    }
}

/// Deletes spans (and their minutes of aggregates) older than `age`.
fn evict_older_than(
    conn: &Connection,
    age: Duration,
    counters: &StoreCounters,
) -> Result<(), rusqlite::Error> {
    let cutoff = now_unix_ns().saturating_sub(age.as_nanos() as u64);
    delete_spans_before(conn, to_sql(cutoff), counters)?;
    let minute = to_sql(cutoff / NS_PER_MINUTE);
    conn.execute("DELETE FROM traces WHERE end_ns < ?1", [to_sql(cutoff)])?;
    conn.execute("DELETE FROM io WHERE time_ns < ?1", [to_sql(cutoff)])?;
    conn.execute("DELETE FROM probe_minutes WHERE minute < ?1", [minute])?;
    conn.execute("DELETE FROM histogram WHERE minute < ?1", [minute])?;
    conn.execute_batch("PRAGMA incremental_vacuum;")?;
    Ok(())
}

pub(crate) fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub(crate) fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

/// Keeps the file and its WAL under `cap`: past the high-water mark, deletes the oldest spans
/// down to the low-water mark and gives the freed pages back to the file system.
fn enforce_size(
    conn: &Connection,
    path: &Path,
    cap: u64,
    counters: &StoreCounters,
) -> Result<(), rusqlite::Error> {
    let high = (cap as f64 * HIGH_WATER) as u64;
    if file_len(path) + file_len(&wal_path(path)) <= high {
        return Ok(());
    }
    // A large WAL is the cheapest thing to shrink.
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let live = ((pages - free) * page_size) as u64;
    let target = (cap as f64 * LOW_WATER) as u64;
    if live > target {
        let (oldest, newest): (Option<i64>, Option<i64>) =
            conn.query_row("SELECT min(rowid), max(rowid) FROM spans", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        if let (Some(oldest), Some(newest)) = (oldest, newest) {
            // The oldest by start time, not by arrival: spans of one thread reach the store
            // through the rings of every CPU it ran on, not quite in order.
            // How many: the rowid range estimates the row count without counting (deletions
            // leave few holes); when it overshoots, count.
            let fraction = 1.0 - target as f64 / live as f64;
            let nth_start = |rows: i64| -> Result<Option<i64>, rusqlite::Error> {
                let evict = ((rows as f64 * fraction).ceil() as i64).clamp(1, rows.max(1));
                conn.query_row(
                    "SELECT start_ns FROM spans ORDER BY start_ns LIMIT 1 OFFSET ?1",
                    [evict],
                    |r| r.get(0),
                )
                .optional()
            };
            let cutoff = match nth_start(newest - oldest + 1)? {
                Some(cutoff) => Some(cutoff),
                None => {
                    let rows: i64 =
                        conn.query_row("SELECT count(*) FROM spans", [], |r| r.get(0))?;
                    nth_start(rows)?
                }
            };
            if let Some(cutoff) = cutoff {
                delete_spans_before(conn, cutoff, counters)?;
            }
            // Summaries of traces, and aggregates of minutes, that no longer have any span.
            let first_start: Option<i64> =
                conn.query_row("SELECT min(start_ns) FROM spans", [], |r| r.get(0))?;
            if let Some(first) = first_start {
                conn.execute("DELETE FROM traces WHERE end_ns < ?1", [first])?;
                conn.execute("DELETE FROM io WHERE time_ns < ?1", [first])?;
            }
            let first_minute: Option<i64> =
                conn.query_row("SELECT min(start_ns) / 60000000000 FROM spans", [], |r| {
                    r.get(0)
                })?;
            if let Some(minute) = first_minute {
                conn.execute("DELETE FROM probe_minutes WHERE minute < ?1", [minute])?;
                conn.execute("DELETE FROM histogram WHERE minute < ?1", [minute])?;
            }
        }
    }
    conn.execute_batch("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")?;
    Ok(())
}
