//! Reading the store: spans by filter, per-function statistics, sessions.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter, types::Value};
use scope_common::{io_op, stream_kind};

use super::{
    ProcessRow, Store, StoreError, StoredSession, TraceSummary, from_sql, histogram::Histogram,
    lock, to_sql,
};
use crate::{
    glob::Glob,
    model::{Io, Probe, Span, TraceId},
};

/// Which spans. `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct SpanQuery {
    /// Only spans of sessions this uid owns (what a non-root caller may see).
    pub owner: Option<u32>,
    pub session_id: Option<u64>,
    pub pid: Option<u32>,
    pub function: Option<Glob>,
    pub since_ns: Option<u64>,
    pub until_ns: Option<u64>,
    pub min_duration_ns: Option<u64>,
    pub trace_id: Option<TraceId>,
}

/// Calls and durations of one function.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionStats {
    pub function: String,
    pub module: String,
    pub count: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p95_ns: u64,
    pub p99_ns: u64,
    pub min_ns: u64,
    pub max_ns: u64,
}

/// Which traces. `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct TraceQuery {
    /// Only traces with spans of sessions this uid owns, summarised from those spans alone.
    pub owner: Option<u32>,
    /// Traces with at least one span in this process.
    pub pid: Option<u32>,
    pub since_ns: Option<u64>,
    pub until_ns: Option<u64>,
    /// The most recent this many (0: all).
    pub limit: usize,
}

const NS_PER_MINUTE: u64 = 60_000_000_000;
const IO_COLUMNS: &str =
    "time_ns, pid, tid, op, stream, stream_key, start, end, bytes, span_id, trace_hi, trace_lo,
     peer_span_id, peer_trace_hi, peer_trace_lo, local_addr, remote_addr";

fn io_from_row(row: &Row<'_>) -> rusqlite::Result<Io> {
    let address = |i: usize| -> rusqlite::Result<Option<std::net::SocketAddr>> {
        Ok(row
            .get::<_, Option<String>>(i)?
            .and_then(|text| text.parse().ok()))
    };
    Ok(Io {
        time_ns: from_sql(row.get(0)?),
        pid: row.get(1)?,
        tid: row.get(2)?,
        op: row.get(3)?,
        stream: row.get(4)?,
        key: from_sql(row.get(5)?),
        start: from_sql(row.get(6)?),
        end: from_sql(row.get(7)?),
        bytes: row.get(8)?,
        span_id: from_sql(row.get(9)?),
        trace_id: TraceId {
            high: from_sql(row.get(10)?),
            low: from_sql(row.get(11)?),
        },
        peer_span_id: from_sql(row.get(12)?),
        peer_trace_id: TraceId {
            high: from_sql(row.get(13)?),
            low: from_sql(row.get(14)?),
        },
        local: address(15)?,
        remote: address(16)?,
    })
}
const SPAN_COLUMNS: &str =
    "span_id, parent_id, trace_hi, trace_lo, probe_id, pid, tid, start_ns, duration_ns, depth,
     arg0, arg1, arg2, arg3, arg4, arg5, ret, caller, flags, text";
const PROBE_COLUMNS: &str =
    "p.id, p.session_id, s.pid, p.function, p.symbol, p.module, p.address, p.file_offset,
     p.file, p.line, p.inlined_into, s.comm, s.exe, s.owner_uid";

fn probe_from_row(row: &Row<'_>) -> rusqlite::Result<Probe> {
    Ok(Probe {
        id: from_sql(row.get(0)?),
        session_id: from_sql(row.get(1)?),
        pid: row.get(2)?,
        function: row.get(3)?,
        symbol: row.get(4)?,
        module: row.get(5)?,
        address: from_sql(row.get(6)?),
        file_offset: from_sql(row.get(7)?),
        file: row.get(8)?,
        line: row.get(9)?,
        inlined_into: row.get(10)?,
        comm: row.get(11)?,
        exe: row.get(12)?,
        owner_uid: row.get(13)?,
    })
}

/// The reads of a span that the kernel matched to the span that wrote the bytes (its reply
/// links). `span_id != 0` lets SQLite use the partial index io_span.
pub(crate) const IO_LINKS_SQL: &str = "SELECT peer_span_id, peer_trace_hi, peer_trace_lo FROM io
      WHERE span_id = ?1 AND span_id != 0 AND op = 2 AND peer_span_id != 0";

/// A trace's TCP reads and writes. `trace_lo != 0` lets SQLite use the partial index io_trace
/// (without it, it walks io_time for the ORDER BY).
pub(crate) fn trace_io_sql() -> String {
    format!(
        "SELECT {IO_COLUMNS} FROM io WHERE trace_lo = ?1 AND trace_lo != 0 AND trace_hi = ?2 AND stream = 3
          ORDER BY time_ns"
    )
}

/// The TCP reads on a connection (seen from the reader) whose first byte lies in a write's
/// sequence range `[?3, ?4)`, which `wraps` past 2^32 or not.
pub(crate) fn io_peers_sql(wraps: bool) -> String {
    let range = if wraps {
        "(start >= ?3 OR start < ?4)"
    } else {
        "start >= ?3 AND start < ?4"
    };
    format!(
        "SELECT {IO_COLUMNS} FROM io
          WHERE stream = 3 AND op = 2 AND local_addr = ?1 AND remote_addr = ?2 AND {range}
          ORDER BY time_ns"
    )
}

/// The SQL and parameters of a span query: `conditions` (already inlined) and the query's
/// own filters, latest-starting first.
pub(crate) fn spans_sql(
    mut conditions: Vec<String>,
    query: &SpanQuery,
    limit: usize,
) -> (String, Vec<Value>) {
    let mut values: Vec<Value> = Vec::new();
    let mut push = |condition: &str, value: i64| {
        conditions.push(condition.replace('?', &format!("?{}", values.len() + 1)));
        values.push(Value::Integer(value));
    };
    if let Some(pid) = query.pid {
        push("pid = ?", i64::from(pid));
    }
    if let Some(since) = query.since_ns {
        push("start_ns >= ?", to_sql(since));
    }
    if let Some(until) = query.until_ns {
        push("start_ns < ?", to_sql(until));
    }
    if let Some(min) = query.min_duration_ns {
        push("duration_ns >= ?", to_sql(min));
    }
    if let Some(trace) = query.trace_id {
        push("trace_lo = ?", to_sql(trace.low));
        push("trace_hi = ?", to_sql(trace.high));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let limit = if limit == 0 { -1 } else { limit as i64 };
    let sql =
        format!("SELECT {SPAN_COLUMNS} FROM spans {filter} ORDER BY start_ns DESC LIMIT {limit}");
    (sql, values)
}

impl Store {
    /// Every probe the store knows, filtered by the probe-level parts of `query`.
    fn probes_matching(
        &self,
        conn: &Connection,
        query: &SpanQuery,
    ) -> Result<Vec<Arc<Probe>>, StoreError> {
        let sql = |source| StoreError::Sql {
            what: "read probes",
            source,
        };
        let mut statement = conn
            .prepare_cached(&format!(
                "SELECT {PROBE_COLUMNS} FROM probes p JOIN sessions s ON s.id = p.session_id"
            ))
            .map_err(sql)?;
        let rows = statement.query_map([], probe_from_row).map_err(sql)?;
        let mut cache = lock(&self.probes);
        let mut matching = Vec::new();
        for probe in rows {
            let probe = probe.map_err(sql)?;
            let wanted = query.owner.is_none_or(|uid| probe.owner_uid == uid)
                && query.session_id.is_none_or(|id| probe.session_id == id)
                && query.pid.is_none_or(|pid| probe.pid == pid)
                && query.function.as_ref().is_none_or(|glob| {
                    glob.matches(&probe.function) || glob.matches(&probe.symbol)
                });
            let probe = Arc::clone(cache.entry(probe.id).or_insert_with(|| Arc::new(probe)));
            if wanted {
                matching.push(probe);
            }
        }
        Ok(matching)
    }

    fn probe(&self, conn: &Connection, id: u64) -> Result<Option<Arc<Probe>>, StoreError> {
        if let Some(probe) = lock(&self.probes).get(&id) {
            return Ok(Some(Arc::clone(probe)));
        }
        let probe = conn
            .query_row(
                &format!("SELECT {PROBE_COLUMNS} FROM probes p JOIN sessions s ON s.id = p.session_id WHERE p.id = ?1"),
                [to_sql(id)],
                probe_from_row,
            )
            .optional()
            .map_err(|source| StoreError::Sql { what: "read a probe", source })?;
        Ok(probe.map(|probe| {
            Arc::clone(
                lock(&self.probes)
                    .entry(id)
                    .or_insert_with(|| Arc::new(probe)),
            )
        }))
    }

    /// The `limit` latest-starting spans matching `query` (all with `limit == 0`), in start
    /// order. Ordering by start time lets SQLite walk an index backwards instead of sorting.
    pub fn spans(&self, query: &SpanQuery, limit: usize) -> Result<Vec<Span>, StoreError> {
        let conn = self.reader();
        let mut conditions: Vec<String> = Vec::new();
        if query.owner.is_some() || query.session_id.is_some() || query.function.is_some() {
            let probes = self.probes_matching(&conn, query)?;
            if probes.is_empty() {
                return Ok(Vec::new());
            }
            let ids: Vec<String> = probes.iter().map(|p| to_sql(p.id).to_string()).collect();
            conditions.push(format!("probe_id IN ({})", ids.join(",")));
        }
        let (sql, values) = spans_sql(conditions, query, limit);
        let mut spans = self.read_spans(&conn, &sql, params_from_iter(values))?;
        spans.sort_by_key(|s| s.start_ns);
        Ok(spans)
    }

    /// Runs a `SELECT {SPAN_COLUMNS} ...` and builds the spans (skipping any whose probe is gone).
    fn read_spans(
        &self,
        conn: &Connection,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Span>, StoreError> {
        let read = |source| StoreError::Sql {
            what: "read spans",
            source,
        };
        let mut statement = conn.prepare_cached(sql).map_err(read)?;
        let mut rows = statement.query(params).map_err(read)?;
        let mut spans = Vec::new();
        while let Some(row) = rows.next().map_err(read)? {
            let get = |i: usize| row.get::<_, i64>(i).map(from_sql).map_err(read);
            let Some(probe) = self.probe(conn, get(4)?)? else {
                continue;
            };
            spans.push(Span {
                id: get(0)?,
                parent_id: get(1)?,
                trace_id: TraceId {
                    high: get(2)?,
                    low: get(3)?,
                },
                pid: get(5)? as u32,
                tid: get(6)? as u32,
                start_ns: get(7)?,
                duration_ns: get(8)?,
                depth: get(9)? as u32,
                args: [get(10)?, get(11)?, get(12)?, get(13)?, get(14)?, get(15)?],
                ret: get(16)?,
                caller: get(17)?,
                flags: get(18)? as u32,
                text: row.get::<_, Option<String>>(19).map_err(read)?,
                probe,
            });
        }
        Ok(spans)
    }

    /// `AND probe_id IN (...)` restricting spans to those of `owner`'s sessions (empty for
    /// no owner), or `None` when the owner has no probes at all.
    fn owned_probes_sql(
        &self,
        conn: &Connection,
        owner: Option<u32>,
    ) -> Result<Option<String>, StoreError> {
        let Some(owner) = owner else {
            return Ok(Some(String::new()));
        };
        let query = SpanQuery {
            owner: Some(owner),
            ..SpanQuery::default()
        };
        let probes = self.probes_matching(conn, &query)?;
        if probes.is_empty() {
            return Ok(None);
        }
        let ids: Vec<String> = probes.iter().map(|p| to_sql(p.id).to_string()).collect();
        Ok(Some(format!(" AND probe_id IN ({})", ids.join(","))))
    }

    /// The most recent traces (by first start) matching `query`.
    pub fn traces(&self, query: &TraceQuery) -> Result<Vec<TraceSummary>, StoreError> {
        let conn = self.reader();
        let read = |source| StoreError::Sql {
            what: "read traces",
            source,
        };
        let Some(owned) = self.owned_probes_sql(&conn, query.owner)? else {
            return Ok(Vec::new());
        };
        let mut conditions = Vec::new();
        if query.owner.is_some() {
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM spans s WHERE s.trace_lo = t.trace_lo AND s.trace_hi = t.trace_hi{owned})"
            ));
        }
        let mut values: Vec<Value> = Vec::new();
        if let Some(since) = query.since_ns {
            values.push(Value::Integer(to_sql(since)));
            conditions.push(format!("t.start_ns >= ?{}", values.len()));
        }
        if let Some(until) = query.until_ns {
            values.push(Value::Integer(to_sql(until)));
            conditions.push(format!("t.start_ns < ?{}", values.len()));
        }
        if let Some(pid) = query.pid {
            values.push(Value::Integer(i64::from(pid)));
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM spans s WHERE s.trace_lo = t.trace_lo AND s.trace_hi = t.trace_hi AND s.pid = ?{})",
                values.len()
            ));
        }
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let limit = if query.limit == 0 {
            -1
        } else {
            query.limit as i64
        };
        let mut statement = conn
            .prepare(&format!(
                "SELECT t.trace_hi, t.trace_lo, t.start_ns, t.end_ns, t.spans FROM traces t {filter}
                  ORDER BY t.start_ns DESC LIMIT {limit}"
            ))
            .map_err(read)?;
        let found: Vec<(TraceId, u64, u64, u64)> = statement
            .query_map(params_from_iter(values), |row| {
                Ok((
                    TraceId {
                        high: from_sql(row.get(0)?),
                        low: from_sql(row.get(1)?),
                    },
                    from_sql(row.get(2)?),
                    from_sql(row.get(3)?),
                    from_sql(row.get(4)?),
                ))
            })
            .map_err(read)?
            .collect::<Result<_, _>>()
            .map_err(read)?;
        let mut traces = Vec::with_capacity(found.len());
        for (trace_id, mut start_ns, mut end_ns, mut spans) in found {
            let (high, low) = (to_sql(trace_id.high), to_sql(trace_id.low));
            if query.owner.is_some() {
                // Summarised from the caller's own spans: another user's part of the trace
                // (a server it called, say) is not theirs to see, not even as a count.
                (start_ns, end_ns, spans) = conn
                    .query_row(
                        &format!(
                            "SELECT min(start_ns), max(start_ns + duration_ns), count(*) FROM spans
                              WHERE trace_lo = ?1 AND trace_hi = ?2{owned}"
                        ),
                        [low, high],
                        |row| {
                            Ok((
                                from_sql(row.get(0)?),
                                from_sql(row.get(1)?),
                                from_sql(row.get(2)?),
                            ))
                        },
                    )
                    .map_err(read)?;
            }
            let root = self
                .read_spans(
                    &conn,
                    &format!(
                        "SELECT {SPAN_COLUMNS} FROM spans WHERE trace_lo = ?1 AND trace_hi = ?2{owned}
                          ORDER BY (span_id = trace_lo) DESC, start_ns LIMIT 1"
                    ),
                    [low, high],
                )?
                .pop();
            let mut pids = conn
                .prepare_cached(&format!(
                    "SELECT DISTINCT pid FROM spans WHERE trace_lo = ?1 AND trace_hi = ?2{owned} ORDER BY pid"
                ))
                .map_err(read)?;
            let pids: Vec<u32> = pids
                .query_map([low, high], |row| row.get(0))
                .map_err(read)?
                .collect::<Result<_, _>>()
                .map_err(read)?;
            traces.push(TraceSummary {
                trace_id,
                start_ns,
                end_ns,
                spans,
                root,
                pids,
            });
        }
        Ok(traces)
    }

    /// For each of `spans` that read bytes while it ran, the calls that wrote them (a reply
    /// to a request, say): span id → [(writer span id, writer trace)]. With an `owner`, only
    /// writers in that uid's sessions.
    pub fn io_links(
        &self,
        spans: &[u64],
        owner: Option<u32>,
    ) -> Result<HashMap<u64, Vec<(u64, TraceId)>>, StoreError> {
        let conn = self.reader();
        let read = |source| StoreError::Sql {
            what: "read io links",
            source,
        };
        let Some(owned) = self.owned_probes_sql(&conn, owner)? else {
            return Ok(HashMap::new());
        };
        let mut visible = conn
            .prepare_cached(&format!(
                "SELECT 1 FROM spans WHERE trace_lo = ?1 AND trace_hi = ?2 AND span_id = ?3{owned} LIMIT 1"
            ))
            .map_err(read)?;
        let mut links: HashMap<u64, Vec<(u64, TraceId)>> = HashMap::new();
        let mut statement = conn.prepare_cached(IO_LINKS_SQL).map_err(read)?;
        for &span in spans {
            let rows = statement
                .query_map([to_sql(span)], |row| {
                    Ok((
                        from_sql(row.get(0)?),
                        TraceId {
                            high: from_sql(row.get(1)?),
                            low: from_sql(row.get(2)?),
                        },
                    ))
                })
                .map_err(read)?;
            for row in rows {
                let (peer, trace) = row.map_err(read)?;
                if owner.is_some()
                    && !visible
                        .exists([to_sql(trace.low), to_sql(trace.high), to_sql(peer)])
                        .map_err(read)?
                {
                    continue;
                }
                let entry = links.entry(span).or_default();
                if !entry.iter().any(|(p, _)| *p == peer) {
                    entry.push((peer, trace));
                }
            }
        }
        Ok(links)
    }

    /// The TCP reads and writes made by calls of a trace: what another host's daemon needs
    /// to find the other half. With an `owner`, only those of that uid's sessions' calls.
    pub fn trace_io(&self, trace: TraceId, owner: Option<u32>) -> Result<Vec<Io>, StoreError> {
        let conn = self.reader();
        let read = |source| StoreError::Sql {
            what: "read a trace's io",
            source,
        };
        let Some(owned) = self.owned_probes_sql(&conn, owner)? else {
            return Ok(Vec::new());
        };
        let mut statement = conn.prepare_cached(&trace_io_sql()).map_err(read)?;
        let rows = statement
            .query_map([to_sql(trace.low), to_sql(trace.high)], io_from_row)
            .map_err(read)?;
        let io: Vec<Io> = rows.collect::<Result<_, _>>().map_err(read)?;
        if owner.is_none() {
            return Ok(io);
        }
        let mut own_spans = conn
            .prepare(&format!(
                "SELECT span_id FROM spans WHERE trace_lo = ?1 AND trace_hi = ?2{owned}"
            ))
            .map_err(read)?;
        let own_spans: std::collections::HashSet<u64> = own_spans
            .query_map([to_sql(trace.low), to_sql(trace.high)], |row| {
                row.get(0).map(from_sql)
            })
            .map_err(read)?
            .collect::<Result<_, _>>()
            .map_err(read)?;
        Ok(io
            .into_iter()
            .filter(|io| own_spans.contains(&io.span_id))
            .collect())
    }

    /// For TCP writes made on another host: the reads of the same bytes here, and the call
    /// each read caused (the reading thread's call that was open, or its next root call).
    /// Returns (the write's span, the caused call). With an `owner`, only calls of that uid's
    /// sessions.
    pub fn io_peers(
        &self,
        writes: &[Io],
        owner: Option<u32>,
    ) -> Result<Vec<(u64, Span)>, StoreError> {
        let conn = self.reader();
        let read = |source| StoreError::Sql {
            what: "match remote writes",
            source,
        };
        let mut found = Vec::new();
        for write in writes
            .iter()
            .filter(|w| w.op == io_op::WRITE && w.stream == stream_kind::TCP)
        {
            let (Some(local), Some(remote)) = (write.remote, write.local) else {
                continue;
            };
            // Reads that start inside the write's sequence range; TCP sequence numbers are
            // 32 bits and the range may wrap.
            let (first, end) = (write.start as u32, write.end as u32);
            let mut statement = conn
                .prepare_cached(&io_peers_sql(first > end))
                .map_err(read)?;
            let reads: Vec<Io> = statement
                .query_map(
                    params![local.to_string(), remote.to_string(), first, end],
                    io_from_row,
                )
                .map_err(read)?
                .collect::<Result<_, _>>()
                .map_err(read)?;
            for reading in reads.iter().filter(|r| r.read_starts_in(write)) {
                let caused = if reading.span_id != 0 {
                    self.read_spans(
                        &conn,
                        &format!("SELECT {SPAN_COLUMNS} FROM spans WHERE span_id = ?1 LIMIT 1"),
                        [to_sql(reading.span_id)],
                    )?
                } else {
                    self.read_spans(
                        &conn,
                        &format!(
                            "SELECT {SPAN_COLUMNS} FROM spans WHERE pid = ?1 AND tid = ?2 AND depth = 0 AND start_ns >= ?3
                              ORDER BY start_ns LIMIT 1"
                        ),
                        [i64::from(reading.pid), i64::from(reading.tid), to_sql(reading.time_ns)],
                    )?
                };
                if let Some(span) = caused
                    .into_iter()
                    .next()
                    .filter(|span| owner.is_none_or(|uid| span.probe.owner_uid == uid))
                {
                    found.push((write.span_id, span));
                }
            }
        }
        Ok(found)
    }

    /// Every traced process the store knows (with an `owner`, those recorded for that uid's
    /// sessions), oldest first.
    pub fn processes(&self, owner: Option<u32>) -> Result<Vec<ProcessRow>, StoreError> {
        let conn = self.reader();
        let read = |source| StoreError::Sql {
            what: "read processes",
            source,
        };
        let mut statement = conn
            .prepare(
                "SELECT pid, start_ns, parent_pid, session_id, comm, exe, fork_span, exited_ns
                   FROM processes
                  WHERE ?1 IS NULL
                     OR session_id IN (SELECT id FROM sessions WHERE owner_uid = ?1)
                  ORDER BY start_ns, pid",
            )
            .map_err(read)?;
        let rows = statement
            .query_map([owner], |row| {
                Ok(ProcessRow {
                    pid: row.get(0)?,
                    start_ns: from_sql(row.get(1)?),
                    parent_pid: row.get(2)?,
                    session_id: row.get::<_, Option<i64>>(3)?.map(from_sql),
                    comm: row.get(4)?,
                    exe: row.get(5)?,
                    fork_span: row.get::<_, Option<i64>>(6)?.map(from_sql),
                    exited_ns: row.get::<_, Option<i64>>(7)?.map(from_sql),
                })
            })
            .map_err(read)?;
        rows.collect::<Result<_, _>>().map_err(read)
    }

    /// Per-function statistics over the matching probes, from the per-minute aggregates
    /// (time bounds apply at minute resolution). Sorted by total time, largest first.
    pub fn stats(&self, query: &SpanQuery) -> Result<Vec<FunctionStats>, StoreError> {
        let conn = self.reader();
        let probes = self.probes_matching(&conn, query)?;
        if probes.is_empty() {
            return Ok(Vec::new());
        }
        let first_minute = to_sql(query.since_ns.map_or(0, |ns| ns / NS_PER_MINUTE));
        let last_minute = to_sql(
            query
                .until_ns
                .map_or(u64::MAX >> 1, |ns| ns.saturating_sub(1) / NS_PER_MINUTE),
        );
        let ids: Vec<String> = probes.iter().map(|p| to_sql(p.id).to_string()).collect();
        let ids = ids.join(",");
        let read = |source| StoreError::Sql {
            what: "read statistics",
            source,
        };

        #[derive(Default)]
        struct Accumulated {
            count: u64,
            total_ns: u64,
            min_ns: u64,
            max_ns: u64,
            histogram: Histogram,
        }
        let key_of: BTreeMap<u64, (String, String)> = probes
            .iter()
            .map(|p| (p.id, (p.function.clone(), p.module.clone())))
            .collect();
        let mut by_function: BTreeMap<(String, String), Accumulated> = BTreeMap::new();

        let mut totals = conn
            .prepare(&format!(
                "SELECT probe_id, sum(count), sum(total_ns), min(min_ns), max(max_ns) FROM probe_minutes
                  WHERE probe_id IN ({ids}) AND minute BETWEEN ?1 AND ?2 GROUP BY probe_id"
            ))
            .map_err(read)?;
        let mut rows = totals.query([first_minute, last_minute]).map_err(read)?;
        while let Some(row) = rows.next().map_err(read)? {
            let Some(key) = key_of.get(&from_sql(row.get(0).map_err(read)?)) else {
                continue;
            };
            let entry = by_function
                .entry(key.clone())
                .or_insert_with(|| Accumulated {
                    min_ns: u64::MAX,
                    ..Default::default()
                });
            entry.count += from_sql(row.get(1).map_err(read)?);
            entry.total_ns = entry
                .total_ns
                .saturating_add(from_sql(row.get(2).map_err(read)?));
            entry.min_ns = entry.min_ns.min(from_sql(row.get(3).map_err(read)?));
            entry.max_ns = entry.max_ns.max(from_sql(row.get(4).map_err(read)?));
        }
        let mut buckets = conn
            .prepare(&format!(
                "SELECT probe_id, bucket, sum(count) FROM histogram
                  WHERE probe_id IN ({ids}) AND minute BETWEEN ?1 AND ?2 GROUP BY probe_id, bucket"
            ))
            .map_err(read)?;
        let mut rows = buckets.query([first_minute, last_minute]).map_err(read)?;
        while let Some(row) = rows.next().map_err(read)? {
            let Some(key) = key_of.get(&from_sql(row.get(0).map_err(read)?)) else {
                continue;
            };
            if let Some(entry) = by_function.get_mut(key) {
                entry.histogram.add(
                    row.get::<_, u32>(1).map_err(read)?,
                    from_sql(row.get(2).map_err(read)?),
                );
            }
        }
        let mut stats: Vec<FunctionStats> = by_function
            .into_iter()
            .filter(|(_, a)| a.count > 0)
            .map(|((function, module), a)| FunctionStats {
                function,
                module,
                count: a.count,
                total_ns: a.total_ns,
                mean_ns: a.total_ns / a.count,
                p50_ns: a.histogram.percentile(0.50, a.min_ns, a.max_ns),
                p95_ns: a.histogram.percentile(0.95, a.min_ns, a.max_ns),
                p99_ns: a.histogram.percentile(0.99, a.min_ns, a.max_ns),
                min_ns: a.min_ns,
                max_ns: a.max_ns,
            })
            .collect();
        stats.sort_by(|a, b| {
            b.total_ns
                .cmp(&a.total_ns)
                .then_with(|| a.function.cmp(&b.function))
        });
        Ok(stats)
    }

    /// Every session the store has seen, newest first.
    pub fn sessions(&self) -> Result<Vec<StoredSession>, StoreError> {
        let conn = self.reader();
        let read = |source| StoreError::Sql {
            what: "read sessions",
            source,
        };
        let mut statement = conn
            .prepare("SELECT id, pid, comm, exe, patterns, started_ns, ended_ns, owner_uid FROM sessions ORDER BY id DESC")
            .map_err(read)?;
        let rows = statement
            .query_map([], |row| {
                let patterns: String = row.get(4)?;
                Ok(StoredSession {
                    id: from_sql(row.get(0)?),
                    pid: row.get(1)?,
                    comm: row.get(2)?,
                    exe: row.get(3)?,
                    patterns: serde_json::from_str(&patterns).unwrap_or_default(),
                    started_ns: from_sql(row.get(5)?),
                    ended_ns: row.get::<_, Option<i64>>(6)?.map(from_sql),
                    owner_uid: row.get(7)?,
                })
            })
            .map_err(read)?;
        rows.collect::<Result<_, _>>().map_err(read)
    }
}
