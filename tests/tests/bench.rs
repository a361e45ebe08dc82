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
