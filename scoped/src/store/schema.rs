//! The store's schema and its migrations. `docs/store.md` describes the tables for people
//! who open the file with `sqlite3`.

use rusqlite::{Connection, OptionalExtension};

/// The schema version this daemon writes. Each entry of [`MIGRATIONS`] moves the file one
/// version up; a file newer than this is refused rather than misread.
pub const SCHEMA_VERSION: i64 = 6;

/// `MIGRATIONS[n]` takes a file from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 → 1: the first schema.
    r#"
    CREATE TABLE sessions (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        pid         INTEGER NOT NULL,
        comm        TEXT    NOT NULL,
        exe         TEXT    NOT NULL,
        patterns    TEXT    NOT NULL,   -- JSON array of the attach globs
        started_ns  INTEGER NOT NULL,   -- Unix time, ns
        ended_ns    INTEGER             -- NULL while attached
    );

    CREATE TABLE probes (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id   INTEGER NOT NULL REFERENCES sessions(id),
        function     TEXT    NOT NULL,  -- demangled, without parameters or hash
        symbol       TEXT    NOT NULL,  -- raw ELF symbol ('' for an inlined call site)
        module       TEXT    NOT NULL,  -- ELF file as the process maps it
        address      INTEGER NOT NULL,  -- ELF virtual address
        file_offset  INTEGER NOT NULL,
        file         TEXT,
        line         INTEGER,
        inlined_into TEXT               -- set for an inlined call site
    );
    CREATE INDEX probes_session ON probes(session_id);

    -- One row per traced call. 64-bit ids and register values are stored as SQLite's signed
    -- integers (two's complement): printf('%016x', span_id) prints them as the API does.
    CREATE TABLE spans (
        span_id     INTEGER NOT NULL,
        parent_id   INTEGER NOT NULL,   -- 0 for a root
        trace_hi    INTEGER NOT NULL,   -- trace id, high and low 64 bits
        trace_lo    INTEGER NOT NULL,
        probe_id    INTEGER NOT NULL REFERENCES probes(id),
        pid         INTEGER NOT NULL,
        tid         INTEGER NOT NULL,
        start_ns    INTEGER NOT NULL,   -- Unix time, ns
        duration_ns INTEGER NOT NULL,
        depth       INTEGER NOT NULL,
        arg0 INTEGER NOT NULL, arg1 INTEGER NOT NULL, arg2 INTEGER NOT NULL,
        arg3 INTEGER NOT NULL, arg4 INTEGER NOT NULL, arg5 INTEGER NOT NULL,
        ret         INTEGER NOT NULL,
        caller      INTEGER NOT NULL,   -- return address in the caller
        flags       INTEGER NOT NULL    -- 1 inlined, 2 thread exited, 4 exec'd, 8 abandoned
    );
    CREATE INDEX spans_start ON spans(start_ns);
    CREATE INDEX spans_probe ON spans(probe_id, start_ns);
    CREATE INDEX spans_pid   ON spans(pid, start_ns);
    CREATE INDEX spans_trace ON spans(trace_lo);

    -- Per probe and minute: exact count, total, min and max of the durations...
    CREATE TABLE probe_minutes (
        probe_id INTEGER NOT NULL,
        minute   INTEGER NOT NULL,      -- Unix time / 60 s
        count    INTEGER NOT NULL,
        total_ns INTEGER NOT NULL,
        min_ns   INTEGER NOT NULL,
        max_ns   INTEGER NOT NULL,
        PRIMARY KEY (probe_id, minute)
    ) WITHOUT ROWID;

    -- ...and their log-linear histogram (64 buckets per power of two), for percentiles.
    CREATE TABLE histogram (
        probe_id INTEGER NOT NULL,
        minute   INTEGER NOT NULL,
        bucket   INTEGER NOT NULL,
        count    INTEGER NOT NULL,
        PRIMARY KEY (probe_id, minute, bucket)
    ) WITHOUT ROWID;

    -- The calls, readable.
    CREATE VIEW calls AS
    SELECT strftime('%Y-%m-%d %H:%M:%f', s.start_ns / 1e9, 'unixepoch') AS start_utc,
           s.duration_ns, s.pid, s.tid, s.depth, p.function, p.module, p.file, p.line,
           s.arg0, s.arg1, s.arg2, s.ret, s.flags,
           printf('%016x', s.span_id) AS span_id, printf('%016x', s.parent_id) AS parent_id,
           printf('%016x%016x', s.trace_hi, s.trace_lo) AS trace_id
      FROM spans s JOIN probes p ON p.id = s.probe_id;
    "#,
    // 1 → 2: processes (a tree with start times, so a reused pid is another process) and a
    // summary per trace.
    r#"
    ALTER TABLE probes ADD COLUMN process_start_ns INTEGER NOT NULL DEFAULT 0;

    CREATE TABLE processes (
        pid             INTEGER NOT NULL,
        start_ns        INTEGER NOT NULL,  -- Unix time, ns (10 ms resolution, from /proc)
        parent_pid      INTEGER,
        session_id      INTEGER,
        comm            TEXT    NOT NULL,
        exe             TEXT    NOT NULL,
        fork_span       INTEGER,           -- the span of the parent that forked it, if traced
        exited_ns       INTEGER,
        PRIMARY KEY (pid, start_ns)
    ) WITHOUT ROWID;

    CREATE TABLE traces (
        trace_hi INTEGER NOT NULL,
        trace_lo INTEGER NOT NULL,
        start_ns INTEGER NOT NULL,         -- first span's start, Unix ns
        end_ns   INTEGER NOT NULL,         -- last span's end
        spans    INTEGER NOT NULL,
        PRIMARY KEY (trace_hi, trace_lo)
    ) WITHOUT ROWID;
    CREATE INDEX traces_start ON traces(start_ns);
    INSERT INTO traces (trace_hi, trace_lo, start_ns, end_ns, spans)
         SELECT trace_hi, trace_lo, min(start_ns), max(start_ns + duration_ns), count(*)
           FROM spans GROUP BY trace_hi, trace_lo;
    "#,
    // 2 → 3: reads and writes on pipes and sockets, to link calls across processes and hosts.
    r#"
    CREATE TABLE io (
        time_ns       INTEGER NOT NULL,  -- Unix ns, when the syscall returned
        pid           INTEGER NOT NULL,
        tid           INTEGER NOT NULL,
        op            INTEGER NOT NULL,  -- 1 write, 2 read
        stream        INTEGER NOT NULL,  -- 1 pipe, 2 unix socket, 3 TCP
        stream_key    INTEGER NOT NULL,  -- names the direction (same for writer and reader)
        start         INTEGER NOT NULL,  -- offsets of the bytes (TCP: sequence numbers)
        end           INTEGER NOT NULL,
        bytes         INTEGER NOT NULL,
        span_id       INTEGER NOT NULL,  -- the thread's innermost open traced call, 0 if none
        trace_hi      INTEGER NOT NULL,
        trace_lo      INTEGER NOT NULL,
        peer_span_id  INTEGER NOT NULL,  -- a read: the call that wrote the bytes (0: unknown)
        peer_trace_hi INTEGER NOT NULL,
        peer_trace_lo INTEGER NOT NULL,
        local_addr    TEXT,              -- TCP ends, e.g. 10.0.0.1:5000
        remote_addr   TEXT
    );
    CREATE INDEX io_time  ON io(time_ns);
    CREATE INDEX io_span  ON io(span_id) WHERE span_id != 0;
    CREATE INDEX io_trace ON io(trace_lo) WHERE trace_lo != 0;
    CREATE INDEX io_tcp   ON io(local_addr, remote_addr) WHERE stream = 3;
    "#,
    // 3 → 4: the reads of another host's writes are found by connection and sequence number,
    // without walking every read of a long-lived connection.
    r#"
    DROP INDEX io_tcp;
    CREATE INDEX io_tcp ON io(local_addr, remote_addr, start) WHERE stream = 3;
    "#,
    // 4 → 5: who attached each session. Only that uid and root see its spans. Sessions of
    // earlier versions were root's: until then the socket was open to root alone.
    r#"
    ALTER TABLE sessions ADD COLUMN owner_uid INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX sessions_owner ON sessions(owner_uid);
    "#,
    // 5 → 6: what a USDT probe said about the call in strings (the SQL of a query, a Python
    // call's file:function:line); NULL for every other span, which costs a byte.
    r#"
    ALTER TABLE spans ADD COLUMN text TEXT;
    DROP VIEW calls;
    CREATE VIEW calls AS
    SELECT strftime('%Y-%m-%d %H:%M:%f', s.start_ns / 1e9, 'unixepoch') AS start_utc,
           s.duration_ns, s.pid, s.tid, s.depth, p.function, s.text, p.module, p.file, p.line,
           s.arg0, s.arg1, s.arg2, s.ret, s.flags,
           printf('%016x', s.span_id) AS span_id, printf('%016x', s.parent_id) AS parent_id,
           printf('%016x%016x', s.trace_hi, s.trace_lo) AS trace_id
      FROM spans s JOIN probes p ON p.id = s.probe_id;
    "#,
];

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the file has schema version {found}; this scoped understands up to {supported}: upgrade scoped or use another --db"
    )]
    TooNew { found: i64, supported: i64 },
    #[error("migrating the schema from version {from}")]
    Migrate {
        from: i64,
        #[source]
        source: rusqlite::Error,
    },
}

/// Sets the connection up and migrates the file to [`SCHEMA_VERSION`].
pub fn prepare(conn: &mut Connection) -> Result<(), SchemaError> {
    let migrate = |from: i64| move |source| SchemaError::Migrate { from, source };
    // Must precede the first table: lets retention give freed pages back to the file system.
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")
        .map_err(migrate(0))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = OFF;
         PRAGMA temp_store = MEMORY;",
    )
    .map_err(migrate(0))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;",
    )
    .map_err(migrate(0))?;
    let version: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .optional()
        .map_err(migrate(0))?
        .unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(SchemaError::TooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let from = from as i64;
        let tx = conn.transaction().map_err(migrate(from))?;
        tx.execute_batch(sql).map_err(migrate(from))?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [from + 1],
        )
        .map_err(migrate(from))?;
        tx.commit().map_err(migrate(from))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_file_is_migrated_with_its_data() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut conn = Connection::open(dir.path().join("v1.db")).expect("open");
        conn.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;")
            .expect("meta");
        conn.execute_batch(MIGRATIONS[0]).expect("v1 schema");
        conn.execute("INSERT INTO meta VALUES ('schema_version', 1)", [])
            .expect("version");
        conn.execute_batch(
            "INSERT INTO sessions VALUES (1, 100, 'demo', '/usr/bin/demo', '[\"f\"]', 900, NULL);
             INSERT INTO probes VALUES (1, 1, 'f', 'f', '/usr/bin/demo', 4096, 4096, 'demo.c', 3, NULL);
             INSERT INTO spans VALUES (1, 0, 7, 9, 1, 100, 100, 1000, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
             INSERT INTO spans VALUES (2, 1, 7, 9, 1, 100, 100, 1010, 20, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0);",
        )
        .expect("spans");
        prepare(&mut conn).expect("migrate");
        let (start, end, spans): (i64, i64, i64) = conn
            .query_row(
                "SELECT start_ns, end_ns, spans FROM traces WHERE trace_hi = 7 AND trace_lo = 9",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("the trace summary was built from the spans");
        assert_eq!((start, end, spans), (1000, 1050, 2));
    }

    #[test]
    fn a_version_4_file_is_migrated_and_its_sessions_are_roots() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut conn = Connection::open(dir.path().join("v4.db")).expect("open");
        conn.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;")
            .expect("meta");
        for sql in &MIGRATIONS[..4] {
            conn.execute_batch(sql).expect("v4 schema");
        }
        conn.execute("INSERT INTO meta VALUES ('schema_version', 4)", [])
            .expect("version");
        conn.execute_batch(
            "INSERT INTO sessions VALUES (3, 100, 'demo', '/usr/bin/demo', '[\"f\"]', 900, 950);",
        )
        .expect("a session");
        prepare(&mut conn).expect("migrate");
        let (id, owner): (i64, i64) = conn
            .query_row("SELECT id, owner_uid FROM sessions", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .expect("the session is still there");
        assert_eq!(
            (id, owner),
            (3, 0),
            "sessions of earlier versions are root's"
        );
        conn.execute(
            "INSERT INTO sessions (pid, comm, exe, patterns, started_ns, owner_uid)
             VALUES (1, 'x', '/x', '[]', 1, 1000)",
            [],
        )
        .expect("new sessions record their owner");
    }

    #[test]
    fn migrates_a_new_file_and_refuses_a_newer_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.db");
        let mut conn = Connection::open(&path).expect("open");
        prepare(&mut conn).expect("migrate");
        prepare(&mut conn).expect("idempotent");
        let version: i64 = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "wal");
        conn.execute(
            "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
            [],
        )
        .expect("bump");
        assert!(matches!(
            prepare(&mut conn),
            Err(SchemaError::TooNew { found: 99, .. })
        ));
    }
}
