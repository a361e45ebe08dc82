//! The cost of correlation, measured two ways.
//!
//! - **The correlator on one core.** Most linking happens in the kernel (parents, traces,
//!   fork/wakeup/IO links ride along in each span record); the daemon's share is the
//!   pipeline (attribute each record to its probe, store-wide ids, fan-out) and the store's
//!   writer (spans with every index, trace summaries, reads and writes). A synthetic feed of
//!   kernel-format records of request/response traces goes through exactly that code, with the
//!   feeder, the pipeline and the writer pinned to one CPU.
//! - **IPC capture on a request/response loop.** A C client and server (the IPC test
//!   fixture) over loopback TCP, timed by the client: no daemon; a daemon running but the
//!   processes untraced (the tax on every read and write on the machine); traced with
//!   `--no-io-capture`; traced with capture. Rounds are interleaved, medians kept.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use scope_common::{IoEvent, io_op, span_flags, stream_kind};
use scoped::{
    model::{IdScheme, Probe},
    pipeline::Pipeline,
    probes::{ProbeInfo, Registry},
    procfs::ProcessInfo,
    reader::Batch,
    stats::DaemonStats,
    store::{NewProbe, SpanQuery, Store, StoreConfig, WRITE_QUEUE_ROWS},
};

use super::{machine, today};
use crate::{IPC_SOURCE, Scoped, Target, compile, free_port};

/// Kernel records per batch, as the reader hands them over.
const BATCH_SPANS: usize = 4096;
/// Spans and reads/writes of one synthetic request.
const SPANS_PER_TRACE: u64 = 6;
const IO_PER_TRACE: u64 = 4;
const SHOW_RUNS: usize = 101;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct CorrelationConfig {
    /// Synthetic traces fed to the correlator.
    pub traces: u64,
    /// Requests per round of the IPC loop.
    pub requests: u64,
    /// Rounds per IPC configuration (the median is kept).
    pub rounds: usize,
}

impl CorrelationConfig {
    pub const FULL: CorrelationConfig = CorrelationConfig {
        traces: 500_000,
        requests: 20_000,
        rounds: 7,
    };
    pub const QUICK: CorrelationConfig = CorrelationConfig {
        traces: 20_000,
        requests: 2_000,
        rounds: 2,
    };
}

#[derive(Clone, Debug)]
pub struct CorrelatorResult {
    pub spans: u64,
    pub io: u64,
    pub seconds: f64,
    /// CPU seconds of the whole process and of the store's writer thread.
    pub cpu_seconds: f64,
    pub writer_cpu_seconds: f64,
    /// Median time to assemble one trace as GetTrace does (spans + reply links).
    pub show_ms: f64,
}

impl CorrelatorResult {
    pub fn spans_per_second(&self) -> f64 {
        self.spans as f64 / self.seconds
    }
}

/// One IPC configuration's median.
#[derive(Clone, Debug)]
pub struct IpcMeasurement {
    pub name: &'static str,
    pub what: &'static str,
    pub ns_per_request: f64,
    /// Spans stored in the first round, and how many server handlers were linked to their
    /// client request by the bytes (traced configurations only).
    pub spans: Option<u64>,
    pub io_linked: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct CorrelationReport {
    pub config: CorrelationConfig,
    pub correlator: CorrelatorResult,
    pub ipc: Vec<IpcMeasurement>,
    pub machine: String,
}

impl CorrelationReport {
    fn ipc(&self, name: &str) -> Option<&IpcMeasurement> {
        self.ipc.iter().find(|m| m.name == name)
    }

    pub fn markdown(&self) -> String {
        let c = &self.correlator;
        let mut md = String::new();
        let _ = writeln!(md, "## The cost of correlation\n");
        let _ = writeln!(md, "Measured {} on {}.\n", today(), self.machine);
        let _ = writeln!(md, "### The correlator on one core\n");
        let _ = writeln!(
            md,
            "{} synthetic requests in kernel-format records, each a client call whose bytes reach a server \
             handler (IO link) with three nested calls and a worker it wakes (wakeup link): {SPANS_PER_TRACE} \
             spans and {IO_PER_TRACE} reads/writes per request. They go through the daemon's own pipeline \
             (probe attribution, store-wide ids, fan-out) into its store (every span index, trace summaries, \
             reads/writes), with the feeder, the pipeline and the store's writer pinned to one CPU. Nothing \
             was dropped (checked). The parent/trace/link assignment itself happens in the kernel programs; \
             its cost is inside the per-call numbers above.\n",
            c.spans / SPANS_PER_TRACE
        );
        let _ = writeln!(md, "| what | result |");
        let _ = writeln!(md, "| --- | ---: |");
        let _ = writeln!(
            md,
            "| spans correlated and stored per second, one core | {:.0} |",
            c.spans_per_second()
        );
        let _ = writeln!(
            md,
            "| reads/writes stored per second alongside | {:.0} |",
            c.io as f64 / c.seconds
        );
        let _ = writeln!(
            md,
            "| CPU: store writer (SQLite) / pipeline and feed | {:.0}% / {:.0}% |",
            100.0 * c.writer_cpu_seconds / c.cpu_seconds,
            100.0 * (c.cpu_seconds - c.writer_cpu_seconds) / c.cpu_seconds
        );
        let _ = writeln!(
            md,
            "| one trace assembled as `scope show` does (spans + reply links), median of {SHOW_RUNS} over {} spans | {:.2} ms |",
            c.spans, c.show_ms
        );
        let _ = writeln!(md);

        let _ = writeln!(md, "### IPC capture on a request/response loop\n");
        let _ = writeln!(
            md,
            "The IPC test's C client and server over loopback TCP: {} requests per round, each an 8-byte \
             write and read on both sides (4 syscalls), timed by the client, both pinned to one CPU (so the \
             time is CPU spent, not idle-CPU wakeup latency). Traced configurations probe \
             `request` in the client and `handle` in the server. Rounds interleaved, median of {}. A new \
             daemon starts for each round.\n",
            self.config.requests, self.config.rounds
        );
        let _ = writeln!(
            md,
            "| configuration | ns/request | vs no daemon | spans (first round) | handlers linked by bytes |"
        );
        let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: |");
        let baseline = self.ipc("no daemon").map(|m| m.ns_per_request);
        for m in &self.ipc {
            let delta = match (m.name, baseline) {
                ("no daemon", _) => "—".to_owned(),
                (_, Some(base)) => format!("{:+.0} ns", m.ns_per_request - base),
                _ => "?".to_owned(),
            };
            let show = |v: Option<u64>| v.map_or("—".to_owned(), |v| v.to_string());
            let _ = writeln!(
                md,
                "| {} ({}) | {:.0} | {} | {} | {} |",
                m.name,
                m.what,
                m.ns_per_request,
                delta,
                show(m.spans),
                show(m.io_linked)
            );
        }
        let _ = writeln!(md);
        if let (Some(off), Some(on)) = (self.ipc("traced, no capture"), self.ipc("traced")) {
            let extra = on.ns_per_request - off.ns_per_request;
            let _ = writeln!(
                md,
                "- IPC capture adds **{extra:.0} ns per request** on this loop ({:.0} ns per traced read or \
                 write), {:.3}× the request time traced without it.",
                extra / 4.0,
                on.ns_per_request / off.ns_per_request
            );
        }
        if let (Some(none), Some(idle), Some(bystander)) = (
            self.ipc("no daemon"),
            self.ipc("idle daemon"),
            self.ipc("bystander"),
        ) {
            let _ = writeln!(
                md,
                "- An idle scoped costs other processes {:+.0} ns per request (the fork, exec, exit and \
                 wakeup tracepoints; IO capture's syscall tracepoints are attached only while something \
                 is traced).",
                idle.ns_per_request - none.ns_per_request
            );
            let _ = writeln!(
                md,
                "- While scoped traces anything, every other process pays **{:+.0} ns per request** here \
                 ({:+.0} ns per read or write): the syscall tracepoints fire for every process and return \
                 at the first map lookup. `scoped --no-io-capture` removes them.",
                bystander.ns_per_request - idle.ns_per_request,
                (bystander.ns_per_request - idle.ns_per_request) / 4.0
            );
        }
        md
    }
}

pub fn run(config: CorrelationConfig) -> CorrelationReport {
    let correlator = on_one_cpu(|| correlator(config.traces));
    let ipc = ipc(config);
    CorrelationReport {
        config,
        correlator,
        ipc,
        machine: machine(),
    }
}

/// Runs `f` with this thread (and the threads it starts) on one CPU, then restores the mask.
fn on_one_cpu<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: cpu_set_t is plain data; sched_{get,set}affinity(0) act on the calling thread
    // and only read/write the set we pass with its size.
    unsafe {
        let mut before: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(libc::sched_getaffinity(0, size, &mut before), 0);
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        assert_eq!(
            libc::sched_setaffinity(0, size, &one),
            0,
            "pinning to CPU {cpu}"
        );
        let result = f();
        libc::sched_setaffinity(0, size, &before);
        result
    }
}

/// CPU seconds of this process and of its thread named `name`.
fn cpu_seconds(name: &str) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let times = |stat: &str| -> f64 {
        // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
        (field(14).unwrap_or(0.0) + field(15).unwrap_or(0.0)) / ticks
    };
    let process = std::fs::read_to_string("/proc/self/stat").map_or(0.0, |s| times(&s));
    let mut thread = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            thread += std::fs::read_to_string(task.path().join("stat")).map_or(0.0, |s| times(&s));
        }
    }
    (process, thread)
}

/// The probes of the synthetic system: the client's request, the server's handler, its three
/// nested calls, and the worker's job.
const FUNCTIONS: [(&str, u32); 6] = [
    ("request", 1000),
    ("handle", 2000),
    ("parse", 2000),
    ("query", 2000),
    ("respond", 2000),
    ("job", 2000),
];

fn correlator(traces: u64) -> CorrelatorResult {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(
        Store::open(StoreConfig {
            path: dir.path().join("correlator.db"),
            retain_bytes: None,
            retain_age: None,
        })
        .expect("open store"),
    );
    let registry = Arc::new(Registry::new(FUNCTIONS.len() as u32));
    for (slot, &(function, pid)) in FUNCTIONS.iter().enumerate() {
        let process = ProcessInfo {
            pid,
            comm: if pid == 1000 { "client" } else { "server" }.into(),
            exe: format!("/usr/bin/{}", if pid == 1000 { "client" } else { "server" }).into(),
            start_time: 1,
        };
        let session = store
            .create_session(&process, &[function.to_owned()], 1, 0)
            .expect("session");
        let new = NewProbe {
            function: function.into(),
            symbol: function.into(),
            module: process.exe.display().to_string(),
            address: 0x1000 + slot as u64 * 0x40,
            file_offset: 0x1000 + slot as u64 * 0x40,
            file: Some("app.c".into()),
            line: Some(10 + slot as u32),
            inlined_into: None,
            process_start_ns: 1,
        };
        let id = store
            .create_probes(session, vec![new.clone()])
            .expect("probe")[0];
        registry.set(
            slot as u32,
            Some(Arc::new(ProbeInfo::new(
                slot as u32,
                Arc::new(Probe {
                    id,
                    session_id: session,
                    pid,
                    function: new.function,
                    symbol: new.symbol,
                    module: new.module,
                    address: new.address,
                    file_offset: new.file_offset,
                    file: new.file,
                    line: new.line,
                    inlined_into: None,
                    comm: process.comm.clone(),
                    exe: process.exe.display().to_string(),
                    owner_uid: 0,
                }),
                1,
            ))),
        );
    }
    let stats = Arc::new(DaemonStats::default());
    let ids = IdScheme::for_this_run();
    let pipeline = Arc::new(Pipeline::new(
        Arc::clone(&store),
        Arc::clone(&registry),
        Arc::clone(&stats),
        ids,
        None,
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let spans = traces * SPANS_PER_TRACE;
    let (cpu_before, writer_before) = cpu_seconds("scoped-store");
    let started = Instant::now();
    runtime.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(scoped::pipeline::INGEST_QUEUE_BATCHES);
        let consumer = tokio::spawn(Arc::clone(&pipeline).run(rx));
        let per_batch = (BATCH_SPANS as u64 / SPANS_PER_TRACE).max(1);
        // One batch at a time in the pipeline's channel, and never more rows queued for the
        // writer than fit: the store never drops, so the rate measured is the rate sustained.
        let rows_per_batch = (per_batch * (SPANS_PER_TRACE + IO_PER_TRACE)) as usize;
        let room = |tx: &tokio::sync::mpsc::Sender<Batch>| {
            tx.capacity() == tx.max_capacity()
                && store.queued_rows() + rows_per_batch <= WRITE_QUEUE_ROWS
        };
        let mut trace = 0u64;
        while trace < traces {
            let count = per_batch.min(traces - trace);
            while !room(&tx) {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let batch = synthetic_batch(trace, count);
            tx.send(batch).await.expect("pipeline running");
            trace += count;
        }
        drop(tx);
        consumer.await.expect("pipeline task");
    });
    store.flush().expect("flush");
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_after, writer_after) = cpu_seconds("scoped-store");
    let counters = store.counters();
    assert_eq!(
        (
            counters.written.get(),
            counters.queue_full.get(),
            counters.io_dropped.get(),
            stats.orphaned.get()
        ),
        (spans, 0, 0, 0),
        "every span and read/write stored, none dropped"
    );

    // One trace at a time, as GetTrace assembles it.
    let mut times = Vec::with_capacity(SHOW_RUNS);
    for run in 0..SHOW_RUNS as u64 {
        let root = kernel_id(run * (traces / SHOW_RUNS as u64).max(1), 0);
        let query = SpanQuery {
            trace_id: Some(ids.trace(root)),
            ..SpanQuery::default()
        };
        let start = Instant::now();
        let found = store.spans(&query, 0).expect("trace query");
        let span_ids: Vec<u64> = found.iter().map(|s| s.id).collect();
        let links = store.io_links(&span_ids, None).expect("io links");
        times.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(found.len() as u64, SPANS_PER_TRACE, "trace {run} complete");
        assert!(!links.is_empty(), "the reply links back in trace {run}");
    }
    times.sort_by(f64::total_cmp);
    CorrelatorResult {
        spans,
        io: traces * IO_PER_TRACE,
        seconds,
        cpu_seconds: cpu_after - cpu_before,
        writer_cpu_seconds: writer_after - writer_before,
        show_ms: times[times.len() / 2],
    }
}

/// The kernel span id of the `index`th span of synthetic trace `trace` (never 0).
fn kernel_id(trace: u64, index: u64) -> u64 {
    (1 << 48) | (trace * SPANS_PER_TRACE + index + 1)
}

/// `count` request traces starting at `first`, in the order a ring delivers them (a call's
/// record when it returns: children first).
fn synthetic_batch(first: u64, count: u64) -> Batch {
    let mut spans = Vec::with_capacity((count * SPANS_PER_TRACE) as usize);
    let mut io = Vec::with_capacity((count * IO_PER_TRACE) as usize);
    for trace in first..first + count {
        let t0 = 1_000_000_000 + trace * 100_000;
        let id = |index| kernel_id(trace, index);
        let (request, handler, job) = (id(0), id(1), id(5));
        let span =
            |slot: u32, pid: u32, tid: u32, index: u64, start: u64, end: u64| scope_common::Span {
                kind: scope_common::RecordKind::Span as u32,
                probe_id: slot,
                pid,
                tid,
                start_ns: t0 + start,
                end_ns: t0 + end,
                span_id: id(index),
                parent_id: 0,
                root_id: id(index),
                trace_id: request,
                link_id: 0,
                args: [trace, 8, 0, 0, 0, 0],
                ret: trace * 2,
                caller: 0x4000,
                depth: 0,
                flags: 0,
            };
        for (slot, index, start) in [(2u32, 2u64, 12_000u64), (3, 3, 20_000), (4, 4, 40_000)] {
            spans.push(scope_common::Span {
                parent_id: handler,
                root_id: handler,
                depth: 1,
                ..span(slot, 2000, 2000, index, start, start + 5_000)
            });
        }
        spans.push(scope_common::Span {
            root_id: job,
            link_id: handler,
            flags: span_flags::LINK_WAKEUP,
            ..span(5, 2000, 2001, 5, 30_000, 60_000)
        });
        spans.push(scope_common::Span {
            link_id: request,
            flags: span_flags::LINK_IO,
            ..span(1, 2000, 2000, 1, 10_000, 50_000)
        });
        spans.push(span(0, 1000, 1000, 0, 0, 55_000));
        let event = |op, pid, tid, time, stream_offset: u64, span_id, peer| IoEvent {
            kind: scope_common::RecordKind::Io as u32,
            op,
            pid,
            tid,
            time_ns: t0 + time,
            stream: stream_kind::TCP,
            bytes: 8,
            key: if stream_offset == 0 { 0xc11e } else { 0x5e7e },
            start: trace * 8,
            end: trace * 8 + 8,
            span_id,
            trace_id: request,
            peer_span_id: peer,
            peer_trace_id: if peer == 0 { 0 } else { request },
            family: 2,
            ..IoEvent::default()
        };
        io.push(event(io_op::WRITE, 1000, 1000, 1_000, 0, request, 0));
        io.push(event(io_op::READ, 2000, 2000, 11_000, 0, handler, request));
        io.push(event(io_op::WRITE, 2000, 2000, 45_000, 1, handler, 0));
        io.push(event(io_op::READ, 1000, 1000, 54_000, 1, request, handler));
    }
    Batch {
        spans,
        texts: Vec::new(),
        io,
    }
}

/// The IPC configurations, in the order each round runs them.
const IPC_CONFIGS: [(&str, &str); 5] = [
    ("no daemon", "scoped not running"),
    ("idle daemon", "scoped running, tracing nothing"),
    (
        "bystander",
        "scoped tracing another process; these untraced",
    ),
    (
        "traced, no capture",
        "`scoped --no-io-capture`, both sides traced",
    ),
    ("traced", "scoped, both sides traced, reads/writes followed"),
];

fn ipc(config: CorrelationConfig) -> Vec<IpcMeasurement> {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile(dir.path(), "gcc", "ipc.c", IPC_SOURCE, &["-O2", "-g"]);
    let port = free_port().to_string();
    let server = Target::spawn(
        "ipc server",
        Command::new(&binary).args(["server", "tcp", &port]),
    );
    server.expect_line("ready", Duration::from_secs(10));
    let mut client = Target::spawn(
        "ipc client",
        Command::new(&binary).args(["client", "tcp", &port]),
    );
    client.expect_line("ready", Duration::from_secs(10));
    // Some other process on the machine, traced in the "bystander" configuration.
    let bystander_port = free_port().to_string();
    let bystander = Target::spawn(
        "ipc bystander",
        Command::new(&binary).args(["server", "tcp", &bystander_port]),
    );
    bystander.expect_line("ready", Duration::from_secs(10));
    // Both on one CPU: the loop then measures CPU spent per request, not how long an idle
    // virtual CPU takes to wake up (which dwarfs it here and varies with the neighbours).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    super::pin(server.pid(), std::iter::once(cpus - 1));
    super::pin(client.pid(), std::iter::once(cpus - 1));
    let timeout = Duration::from_secs(300);
    let go = |client: &mut Target| -> f64 {
        client.send(&format!("go {}", config.requests));
        let line = client.expect_line("ns_per_request", timeout);
        client.expect_line("done", timeout);
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("ns_per_request value")
    };
    // Warm up the loop (and the page cache) once.
    go(&mut client);

    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut spans: BTreeMap<&str, u64> = BTreeMap::new();
    let mut io_linked: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..config.rounds {
        for &(name, _) in &IPC_CONFIGS {
            let scoped = match name {
                "no daemon" => None,
                "traced, no capture" => Some(Scoped::start_with(&["--no-io-capture"])),
                _ => Some(Scoped::start()),
            };
            let traced = name.starts_with("traced");
            if let Some(scoped) = scoped.as_ref().filter(|_| traced) {
                scoped.attach(server.pid(), &["handle"]);
                scoped.attach(client.pid(), &["request"]);
            }
            if let Some(scoped) = scoped.as_ref().filter(|_| name == "bystander") {
                scoped.attach(bystander.pid(), &["handle"]);
            }
            samples.entry(name).or_default().push(go(&mut client));
            if round == 0
                && traced
                && let Some(scoped) = &scoped
            {
                // Every span stored, none dropped, before the handlers are counted.
                let want = 2 * config.requests;
                let deadline = Instant::now() + timeout;
                let stored = loop {
                    let status = scoped.status();
                    let stored = status["stored_spans"].as_u64().unwrap_or(0);
                    let dropped = status["spans_dropped"].as_u64().unwrap_or(0);
                    assert_eq!(dropped, 0, "{name}: spans were dropped: {status}");
                    if stored >= want {
                        break stored;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{name}: {stored} of {want} spans stored: {status}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                };
                let handlers = scoped.calls(&["--pid", &server.pid().to_string()]);
                spans.insert(name, stored);
                let linked = handlers.iter().filter(|h| h["link_kind"] == "io").count() as u64;
                io_linked.insert(name, linked);
            }
        }
    }
    IPC_CONFIGS
        .iter()
        .map(|&(name, what)| {
            let values = samples.get_mut(name).expect("measured");
            values.sort_by(f64::total_cmp);
            IpcMeasurement {
                name,
                what,
                ns_per_request: values[values.len() / 2],
                spans: spans.get(name).copied(),
                io_linked: io_linked.get(name).copied(),
            }
        })
        .collect()
}
