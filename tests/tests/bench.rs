//! Privileged (root, BPF): the benchmark harness behind `cargo xtask bench` runs end to end
//! in a quick mode — scope, the empty-program floor, bpftrace and perf on one binary — and
//! reports the ratios BENCHMARKS.md carries. (The numbers themselves are measured by
//! `cargo xtask bench`, never asserted here: timing in tests is noise.)

use scope_tests::bench::{self, BenchConfig};

#[test]
fn bench_harness_measures_scope_against_its_peers() {
    let report = bench::run(BenchConfig::QUICK);
    for name in ["untraced", "null pair", "scope", "bpftrace", "perf"] {
        let m = report
            .get(name)
            .unwrap_or_else(|| panic!("{name} was not measured: {report:?}"));
        assert!(m.ns_per_call.is_finite() && m.ns_per_call > 0.0, "{m:?}");
        if name != "untraced" {
            assert!(m.cost_ns > 0.0, "a probe costs something: {m:?}");
        }
    }
    let scope = report.get("scope").expect("measured");
    assert_eq!(
        scope.captured,
        Some(BenchConfig::QUICK.calls),
        "scope captured every call of the round"
    );
    let md = report.markdown();
    for line in [
        "scope ÷ empty uprobe+uretprobe pair",
        "scope ÷ bpftrace",
        "scope ÷ perf probe",
    ] {
        assert!(md.contains(line), "{md}");
    }
}

#[test]
fn correlation_bench_runs_and_checks_what_it_measures() {
    // The harness itself asserts nothing was dropped and every trace is complete.
    let report = bench::correlation::run(bench::correlation::CorrelationConfig::QUICK);
    let md = report.markdown();
    assert!(
        md.contains("spans correlated and stored per second"),
        "{md}"
    );
    let traced = report
        .ipc
        .iter()
        .find(|m| m.name == "traced")
        .expect("the traced configuration ran");
    let requests = bench::correlation::CorrelationConfig::QUICK.requests;
    assert_eq!(
        traced.io_linked,
        Some(requests),
        "every handler linked: {md}"
    );
    assert!(md.contains("IPC capture adds"), "{md}");
}

#[test]
fn redis_bench_runs_scope_and_bpftrace_on_the_real_server() {
    let config = bench::redis::RedisConfig::QUICK;
    let report = bench::redis::run(config);
    for m in &report.results {
        assert!(m.set > 0.0 && m.get > 0.0, "{m:?}");
    }
    let scope = report
        .results
        .iter()
        .find(|m| m.name == "scope")
        .expect("scope ran");
    let (kept, dropped) = scope.spans.expect("scope counts its spans");
    // SET and GET, two spans (processCommand and call) per request.
    assert!(kept >= 4 * config.requests, "{kept} spans kept");
    assert_eq!(dropped, 0);
    assert!(report.markdown().contains("÷ bpftrace"));
}

#[test]
fn pgbench_bench_runs_scope_and_bpftrace_on_a_real_postgres() {
    let config = bench::pgbench::PgbenchConfig::QUICK;
    let report = bench::pgbench::run(config);
    for m in &report.results {
        assert!(m.tps > 0.0, "{m:?}");
    }
    let scope = report.get("scope").expect("scope ran");
    let (kept, dropped) = scope.spans.expect("scope counts its spans");
    // Two spans (PortalRun and ExecutorRun) per select-only transaction, in the backends
    // scope followed from the postmaster: each is traced from when scope hears of its fork,
    // so the first transactions of a short run are not all seen.
    let transactions = scope.tps * f64::from(config.seconds);
    assert!(
        kept > 0 && (kept as f64) <= 2.0 * transactions * 1.1,
        "{kept} spans kept for about {transactions:.0} transactions"
    );
    assert_eq!(dropped, 0);
    // One span per query with the USDT pair.
    let queries = report.get("scope, query spans").expect("the USDT pair ran");
    let (kept, dropped) = queries.spans.expect("scope counts its spans");
    let transactions = queries.tps * f64::from(config.seconds);
    assert!(
        kept > 0 && (kept as f64) <= transactions * 1.1,
        "{kept} query spans for about {transactions:.0} transactions"
    );
    assert_eq!(dropped, 0);
    assert!(report.get("bpftrace, query probes").is_some());
    assert!(report.markdown().contains("÷ bpftrace"));
    assert!(report.markdown().contains("÷ bpftrace, query probes"));
}

#[test]
fn detach_bench_measures_the_emergency_stop() {
    let report = bench::detach::run(3);
    assert_eq!(report.cases.len(), 2);
    for case in &report.cases {
        assert_eq!(case.detach_ns.len(), 3);
        assert!(case.detach_ns.iter().all(|&ns| ns > 0), "{case:?}");
    }
    assert!(report.markdown().contains("| 8 × 16 | 16 |"));
}

#[test]
fn analyze_bench_times_real_binaries() {
    let report = bench::analyze::run(1);
    assert!(report.cases.len() >= 3, "{report:?}");
    for case in &report.cases {
        assert!(case.functions > 0 && case.cold_ms > 0.0, "{case:?}");
    }
    assert!(report.markdown().contains("| cold | warm |"));
}

#[test]
fn auto_bench_compares_the_plans_prediction_with_redis_throughput() {
    let report = bench::auto::run(bench::auto::AutoConfig::QUICK);
    assert_eq!(report.rows.len(), 1, "{report:?}");
    let row = &report.rows[0];
    assert!(row.predicted <= row.budget, "{row:?}");
    assert!(row.untraced > 0.0 && row.traced > 0.0, "{row:?}");
    assert!(report.markdown().contains("| budget | chosen"));
}
