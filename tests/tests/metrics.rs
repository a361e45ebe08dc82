//! Privileged end-to-end test (root, BPF) of `scoped --metrics-addr`: a Prometheus scrape
//! accounts for every call of a traced function per probe, agrees with `scope status`, and
//! carries the daemon's own CPU and memory.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use scope_tests::{Scoped, Target, WORK_SOURCE, compile, free_port};

const TIMEOUT: Duration = Duration::from_secs(60);
const CALLS: u64 = 50_000;

/// (status line, headers and body) of one HTTP request.
fn http(port: u16, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (status, rest) = response.split_once("\r\n").unwrap();
    (status.to_owned(), rest.to_owned())
}

/// A sample: metric name and labels → value. Checks the exposition format on the way: every
/// sample's metric was declared by a `# TYPE` line before it.
fn parse(body: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut typed = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').unwrap()),
            None => (series, ""),
        };
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        assert!(typed.contains(name), "no # TYPE before {line}");
        let mut parsed = BTreeMap::new();
        // Values in these tests hold no commas or escaped quotes.
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap();
            let value = value.strip_prefix('"').unwrap().strip_suffix('"').unwrap();
            parsed.insert(key.to_owned(), value.to_owned());
        }
        samples.insert((name.to_owned(), parsed), value);
    }
    samples
}

fn find(
    samples: &BTreeMap<(String, BTreeMap<String, String>), f64>,
    name: &str,
    label: (&str, &str),
) -> f64 {
    samples
        .iter()
        .find(|((n, labels), _)| {
            n == name && labels.get(label.0).map(String::as_str) == Some(label.1)
        })
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} with {label:?}"))
}

#[test]
fn a_scrape_accounts_for_every_call_and_reports_the_daemon_itself() {
    let dir = tempfile::tempdir().unwrap();
    let binary = compile(dir.path(), "gcc", "metrics.c", WORK_SOURCE, &["-g", "-O2"]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let scoped = Scoped::start_with(&["--metrics-addr", &addr]);
    let mut target = Target::spawn("metrics", &mut Command::new(&binary));
    target.expect_line("ready", TIMEOUT);
    let pid = target.pid().to_string();
    scoped.scope_json(&[
        "attach", "--pid", &pid, "--func", "work", "--sample", "2", "--json",
    ]);
    target.send(&CALLS.to_string());
    target.expect_line("done", TIMEOUT);

    // Wait until every span the kernel sent has been received.
    let deadline = Instant::now() + TIMEOUT;
    let samples = loop {
        let (status, rest) = http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let (head, body) = rest.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        let samples = parse(body);
        let emitted = find(
            &samples,
            "scope_events_total",
            ("counter", "kernel.spans_emitted"),
        );
        let received = samples[&("scope_spans_received_total".to_owned(), BTreeMap::new())];
        if emitted == received || Instant::now() > deadline {
            break samples;
        }
        thread::sleep(Duration::from_millis(100));
    };

    let calls = find(&samples, "scope_probe_calls_total", ("function", "work"));
    let spans = find(&samples, "scope_probe_spans_total", ("function", "work"));
    let kernel_dropped = find(
        &samples,
        "scope_probe_kernel_dropped_total",
        ("function", "work"),
    );
    let daemon_dropped = find(
        &samples,
        "scope_probe_daemon_dropped_total",
        ("function", "work"),
    );
    let sampled_out = find(
        &samples,
        "scope_probe_sampled_out_total",
        ("function", "work"),
    );
    let rate_limited = find(
        &samples,
        "scope_probe_rate_limited_total",
        ("function", "work"),
    );
    assert_eq!(calls, CALLS as f64);
    assert!(sampled_out >= (CALLS / 2 - 2) as f64, "{sampled_out}");
    assert_eq!(
        spans + kernel_dropped + daemon_dropped + sampled_out + rate_limited,
        calls,
        "every call is a span, a loss or left out"
    );
    assert_eq!(
        find(
            &samples,
            "scope_events_total",
            ("counter", "kernel.sampled_out")
        ),
        sampled_out
    );
    // The same numbers as `scope status`.
    let status = scoped.status();
    assert_eq!(
        status["counters"]["kernel.sampled_out"].as_f64().unwrap(),
        sampled_out
    );
    assert_eq!(
        samples[&("scope_sessions".to_owned(), BTreeMap::new())],
        1.0
    );
    // The daemon's own resources.
    let rss = samples[&("process_resident_memory_bytes".to_owned(), BTreeMap::new())];
    assert!(rss > f64::from(1u32 << 20), "{rss}");
    let cpu = samples[&("process_cpu_seconds_total".to_owned(), BTreeMap::new())];
    assert!(cpu > 0.0, "{cpu}");

    // Anything but GET /metrics gets a clear HTTP error.
    let (status, _) = http(port, "GET /other HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(port, "POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, _) = http(port, "garbage\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
}
