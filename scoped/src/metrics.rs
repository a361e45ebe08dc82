//! Prometheus metrics (`scoped --metrics-addr ADDR`): every counter of `scope status`, what
//! each session and probe received, lost and left out, the budgets, and the daemon's own CPU
//! and memory, in the text exposition format at `GET /metrics`.
//!
//! The server is a few lines of HTTP/1.1 over tokio: one request per connection, headers
//! bounded, a timeout on slow clients. A scrape takes the same locks as `scope status`.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    access::Caller,
    daemon::{Daemon, SessionSnapshot, StatusSnapshot},
};

/// The most of a request read before answering.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (fails at once if it cannot) and serves scrapes until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    daemon: Arc<Daemon>,
) -> std::io::Result<impl Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let daemon = Arc::clone(&daemon);
            tokio::spawn(async move {
                if let Err(error) = answer(stream, daemon).await {
                    tracing::debug!(%peer, %error, "a metrics request failed");
                }
            });
        }
    })
}

async fn answer(mut stream: TcpStream, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buffer = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            if request.len() >= MAX_REQUEST_BYTES {
                break;
            }
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buffer[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if read.is_err() {
        return respond(
            &mut stream,
            "408 Request Timeout",
            "text/plain",
            "too slow\n",
        )
        .await;
    }
    read.unwrap_or(Ok(()))?;
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => {
            let body = tokio::task::spawn_blocking(move || render(&daemon))
                .await
                .map_err(std::io::Error::other)?;
            respond(
                &mut stream,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        (b"GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await,
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "GET /metrics\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The whole exposition: one scrape.
pub fn render(daemon: &Daemon) -> String {
    // Everything, as root sees it: the endpoint has no authentication of its own (bind it to
    // a private address).
    let status = daemon.status(&Caller::DAEMON);
    let sessions = daemon.sessions(&Caller::DAEMON);
    let mut out = Exposition::default();
    daemon_metrics(&mut out, &status);
    session_metrics(&mut out, &sessions);
    process_metrics(&mut out);
    out.text
}

fn daemon_metrics(out: &mut Exposition, status: &StatusSnapshot) {
    out.single(
        "scope_uptime_seconds",
        "gauge",
        "Seconds since scoped started.",
        status.uptime.as_secs_f64(),
    );
    out.single(
        "scope_spans_received_total",
        "counter",
        "Spans decoded from the kernel's ring buffers.",
        status.spans_received as f64,
    );
    out.single(
        "scope_spans_dropped_total",
        "counter",
        "Spans lost anywhere between a traced call and the store (by reason in scope_events_total).",
        status.spans_dropped as f64,
    );
    out.header(
        "scope_events_total",
        "counter",
        "Every counter of `scope status`, by name: kernel.* (ring_full, sampled_out, rate_limited, ...), daemon.*, store.*.",
    );
    for (name, value) in &status.counters {
        out.sample("scope_events_total", &[("counter", name)], *value as f64);
    }
    out.single(
        "scope_sessions",
        "gauge",
        "Sessions attached.",
        status.sessions as f64,
    );
    out.single(
        "scope_probes",
        "gauge",
        "Probes attached.",
        status.probes as f64,
    );
    out.single(
        "scope_stored_spans",
        "gauge",
        "Spans in the store.",
        status.stored_spans as f64,
    );
    out.single(
        "scope_store_bytes",
        "gauge",
        "Bytes the store and its write-ahead log take on disk.",
        status.store_bytes as f64,
    );
    out.single(
        "scope_throttles_total",
        "counter",
        "Probes the overhead budgets sampled or detached.",
        status.throttled.len() as f64,
    );
}

fn session_metrics(out: &mut Exposition, sessions: &[SessionSnapshot]) {
    type Field = fn(&SessionSnapshot, usize) -> f64;
    let per_probe: [(&str, &str, Field); 6] = [
        (
            "scope_probe_calls_total",
            "Calls of the probed function.",
            |s, i| s.probes[i].1.calls as f64,
        ),
        (
            "scope_probe_spans_total",
            "Spans of the probe that reached the daemon's pipeline.",
            |s, i| s.probes[i].0.received.get() as f64,
        ),
        (
            "scope_probe_kernel_dropped_total",
            "Spans of the probe lost in the kernel (ring buffer full, stack map full, nesting too deep).",
            |s, i| s.probes[i].1.dropped as f64,
        ),
        (
            "scope_probe_daemon_dropped_total",
            "Spans of the probe lost in the daemon (queues full, store failing).",
            |s, i| s.probes[i].0.daemon_dropped.get() as f64,
        ),
        (
            "scope_probe_sampled_out_total",
            "Calls left out by sampling.",
            |s, i| s.probes[i].1.sampled_out as f64,
        ),
        (
            "scope_probe_rate_limited_total",
            "Calls left out by the probe's rate limit.",
            |s, i| s.probes[i].1.rate_limited as f64,
        ),
    ];
    for (name, help, field) in per_probe {
        out.header(name, "counter", help);
        for session in sessions {
            let id = session.id.to_string();
            for (index, (info, _)) in session.probes.iter().enumerate() {
                let pid = info.probe.pid.to_string();
                let probe_id = info.slot.to_string();
                out.sample(
                    name,
                    &[
                        ("session", &id),
                        ("pid", &pid),
                        ("probe", &probe_id),
                        ("function", &info.probe.function),
                        ("module", &info.probe.module),
                    ],
                    field(session, index),
                );
            }
        }
    }
    out.header(
        "scope_session_spans_dropped_total",
        "counter",
        "Spans of the session lost, in the kernel and the daemon.",
    );
    for session in sessions {
        out.sample(
            "scope_session_spans_dropped_total",
            &[("session", &session.id.to_string())],
            session.spans_dropped as f64,
        );
    }
    out.header(
        "scope_session_budget_ratio",
        "gauge",
        "A session's overhead budget, as a share of one CPU (sessions with a budget).",
    );
    for session in sessions {
        if let Some(budget) = session.limits.budget {
            out.sample(
                "scope_session_budget_ratio",
                &[("session", &session.id.to_string())],
                budget,
            );
        }
    }
    out.header(
        "scope_session_overhead_ratio",
        "gauge",
        "A session's estimated cost, as a share of one CPU (measured under a budget).",
    );
    for session in sessions {
        if let Some(overhead) = session.overhead {
            out.sample(
                "scope_session_overhead_ratio",
                &[("session", &session.id.to_string())],
                overhead,
            );
        }
    }
}

/// The daemon's own CPU time and memory, as Prometheus' process collector names them.
fn process_metrics(out: &mut Exposition) {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the command name (which may hold spaces) start at the state, field 3.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| {
            fields
                .get(n - 3)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        out.single(
            "process_cpu_seconds_total",
            "counter",
            "CPU time scoped has used, user and system, in seconds.",
            (field(14) + field(15)) / ticks,
        );
        out.single(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of scoped, in bytes.",
            field(24) * page,
        );
        out.single(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory of scoped, in bytes.",
            field(23),
        );
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        out.single(
            "process_open_fds",
            "gauge",
            "File descriptors scoped has open.",
            entries.count() as f64,
        );
    }
}

/// Text exposition format 0.0.4.
#[derive(Default)]
struct Exposition {
    text: String,
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape(value));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.header(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// A label value: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
        let mut out = Exposition::default();
        out.single("scope_x", "gauge", "An x.", 1.5);
        out.header("scope_y_total", "counter", "Ys.");
        out.sample(
            "scope_y_total",
            &[("function", "operator\"()"), ("pid", "7")],
            3.0,
        );
        assert_eq!(
            out.text,
            "# HELP scope_x An x.\n# TYPE scope_x gauge\nscope_x 1.5\n\
             # HELP scope_y_total Ys.\n# TYPE scope_y_total counter\n\
             scope_y_total{function=\"operator\\\"()\",pid=\"7\"} 3\n"
        );
    }
}
