//! The span store on its own: how many spans per second its one writer thread commits with
//! every index on, and how long `stats` and a filtered `calls` take over millions of spans.

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use scoped::{
    glob::Glob,
    model::{IdScheme, Probe, Span},
    procfs::ProcessInfo,
    store::{NewProbe, SpanQuery, Store, StoreConfig},
};

use super::{machine, today};

/// Spans per append, as the pipeline hands them over.
const BATCH: usize = 4096;
const PROBES: usize = 20;
const QUERY_RUNS: usize = 15;
/// CPUs the synthetic kernel ids come from, and spans per trace.
const CPUS: u64 = 4;
const SPANS_PER_TRACE: u64 = 6;

#[derive(Clone, Debug)]
pub struct StoreReport {
    pub spans: u64,
    pub write_seconds: f64,
    pub file_bytes: u64,
    pub stats_all_ms: f64,
    pub stats_one_ms: f64,
    pub calls_one_ms: f64,
    pub machine: String,
}

impl StoreReport {
    pub fn spans_per_second(&self) -> f64 {
        self.spans as f64 / self.write_seconds
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "## The span store\n");
        let _ = writeln!(
            md,
            "{} synthetic spans ({} functions, random durations, {SPANS_PER_TRACE} spans per trace, ids made as \
             the daemon makes them: per-CPU sequences from {CPUS} CPUs, salted) appended in batches of {BATCH} to a fresh \
             store with all four span indexes and the per-minute histograms, then queried. One writer thread \
             does all the writing, so the write rate is one core's. Measured {} on {}.\n",
            self.spans,
            PROBES,
            today(),
            self.machine
        );
        let _ = writeln!(md, "| what | result |");
        let _ = writeln!(md, "| --- | ---: |");
        let _ = writeln!(
            md,
            "| spans written per second (one core, indexes on, committed) | {:.0} |",
            self.spans_per_second()
        );
        let _ = writeln!(
            md,
            "| file size | {:.1} MiB ({:.0} bytes/span) |",
            self.file_bytes as f64 / 1048576.0,
            self.file_bytes as f64 / self.spans as f64
        );
        let _ = writeln!(
            md,
            "| `stats` over all {} spans, every function (median of {QUERY_RUNS}) | {:.1} ms |",
            self.spans, self.stats_all_ms
        );
        let _ = writeln!(
            md,
            "| `stats --func f7` (median) | {:.1} ms |",
            self.stats_one_ms
        );
        let _ = writeln!(
            md,
            "| `calls --func f7 --limit 100` (median) | {:.1} ms |",
            self.calls_one_ms
        );
        md
    }
}

/// xorshift64*: reproducible pseudo-random durations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn median_ms(mut run: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..QUERY_RUNS)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

pub fn run(spans: u64) -> StoreReport {
    let dir = tempfile::tempdir().expect("temp dir");
    let path: PathBuf = dir.path().join("bench.db");
    let store = Store::open(StoreConfig {
        path: path.clone(),
        retain_bytes: None,
        retain_age: None,
    })
    .expect("open store");
    let process = ProcessInfo {
        pid: 4242,
        comm: "bench".into(),
        exe: "/usr/bin/bench".into(),
        start_time: 1,
    };
    let session = store
        .create_session(&process, &["f*".to_owned()], 1, 0)
        .expect("session");
    let new: Vec<NewProbe> = (0..PROBES)
        .map(|i| NewProbe {
            function: format!("f{i}"),
            symbol: format!("f{i}"),
            module: "/usr/bin/bench".into(),
            address: 0x1000 + i as u64 * 0x40,
            file_offset: 0x1000 + i as u64 * 0x40,
            file: Some("bench.c".into()),
            line: Some(10 + i as u32),
            inlined_into: None,
            process_start_ns: 1,
        })
        .collect();
    let ids = store.create_probes(session, new.clone()).expect("probes");
    let probes: Vec<Arc<Probe>> = ids
        .into_iter()
        .zip(new)
        .map(|(id, p)| {
            Arc::new(Probe {
                id,
                session_id: session,
                pid: 4242,
                function: p.function,
                symbol: p.symbol,
                module: p.module,
                address: p.address,
                file_offset: p.file_offset,
                file: p.file,
                line: p.line,
                inlined_into: None,
                comm: "bench".into(),
                exe: "/usr/bin/bench".into(),
                owner_uid: 0,
            })
        })
        .collect();

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Ids as the daemon makes them: kernel ids are per-CPU sequences, salted per run.
    let ids = IdScheme::for_this_run();
    let kernel_id = |n: u64| ((n % CPUS + 1) << 48) | (n / CPUS + 1);
    let t0: u64 = 1_800_000_000_000_000_000;
    let started = Instant::now();
    let mut made = 0u64;
    while made < spans {
        let count = BATCH.min((spans - made) as usize);
        let batch: Vec<Span> = (0..count as u64)
            .map(|i| {
                let n = made + i;
                let random = rng.next();
                let root = n - n % SPANS_PER_TRACE;
                Span {
                    id: ids.span(kernel_id(n)),
                    parent_id: if n == root {
                        0
                    } else {
                        ids.span(kernel_id(root))
                    },
                    trace_id: ids.trace(kernel_id(root)),
                    pid: 4242,
                    tid: 4242 + (n % 4) as u32,
                    start_ns: t0 + n * 50_000,
                    duration_ns: 100 + random % 2_000_000,
                    depth: 0,
                    args: [n, 0, 0, 0, 0, 0],
                    ret: n,
                    caller: 0x4000,
                    flags: 0,
                    text: None,
                    probe: Arc::clone(&probes[(random >> 40) as usize % PROBES]),
                }
            })
            .collect();
        store.append_wait(batch).expect("writer running");
        made += count as u64;
    }
    store.flush().expect("flush");
    let write_seconds = started.elapsed().as_secs_f64();
    assert_eq!(
        store.counters().written.get(),
        spans,
        "every span was committed"
    );

    let all = SpanQuery::default();
    let one = SpanQuery {
        function: Some(Glob::new("f7").expect("glob")),
        ..SpanQuery::default()
    };
    let stats_all_ms = median_ms(|| {
        store.stats(&all).expect("stats");
    });
    let stats_one_ms = median_ms(|| {
        store.stats(&one).expect("stats");
    });
    let calls_one_ms = median_ms(|| {
        store.spans(&one, 100).expect("spans");
    });
    let file_bytes = store.file_bytes();
    drop(store);
    // Let the temp dir go only after the store closed its files.
    std::thread::sleep(Duration::from_millis(10));
    StoreReport {
        spans,
        write_seconds,
        file_bytes,
        stats_all_ms,
        stats_one_ms,
        calls_one_ms,
        machine: machine(),
    }
}
