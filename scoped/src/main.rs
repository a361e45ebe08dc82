//! scoped: the scope tracing daemon. See the library (`lib.rs`) for the data flow.

use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Parser;
use scope_proto::v1::scope_server::ScopeServer;
use scope_symbolizer::Symbolizer;
use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::SignalKind,
    sync::{mpsc, watch},
};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{
    service::InterceptorLayer,
    transport::{Certificate, Identity, ServerTlsConfig, server::TcpIncoming},
};
use tower::util::MapResponseLayer;

use scoped::{
    access::{self, DEFAULT_MAX_SESSIONS_PER_CALLER, TcpCaller},
    api,
    daemon::{Daemon, Settings},
    ebpf::{DEFAULT_MAX_PROBES, DEFAULT_RING_BYTES, Kernel, KernelConfig, ProgramPair},
    export::otlp,
    model::IdScheme,
    pipeline::{INGEST_QUEUE_BATCHES, LIFECYCLE_QUEUE_EVENTS, Pipeline},
    probes::{ProbeManager, Registry},
    reader::{Outputs, Reader},
    resolve::DEFAULT_MAX_SESSION_PROBES,
    stats::DaemonStats,
    store::{DEFAULT_DB, Store, StoreConfig},
};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/scope/scoped.sock";
/// How often sessions with an overhead budget are measured and throttled (and idle IO
/// tracepoints released).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(250);
/// The group whose members may use the socket (besides root).
pub const SOCKET_GROUP: &str = "scope";
/// Largest gRPC message the daemon sends or accepts.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The scope tracing daemon: attaches eBPF probes to live processes and serves what they
/// report over gRPC (`scope.v1.Scope`) on a unix socket.
///
/// Root sees and does everything. Members of the `scope` group may use the socket too, as
/// themselves: they trace only processes they could ptrace and see only their own sessions.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Unix socket to serve gRPC on. It is made mode 0660, owned by root and the `scope`
    /// group (only root can use it if that group does not exist).
    #[arg(long, env = "SCOPE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Sessions one user other than root may hold at once.
    #[arg(long, default_value_t = DEFAULT_MAX_SESSIONS_PER_CALLER)]
    max_sessions_per_caller: usize,
    /// Also serve gRPC over TCP on this address (e.g. `0.0.0.0:7443`). Off by default; needs
    /// TLS (--tls-cert, --tls-key), client authentication (--client-ca and/or --token-file)
    /// and --listen-uid.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The TCP listener's certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "listen")]
    tls_cert: Option<PathBuf>,
    /// The TCP listener's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "listen")]
    tls_key: Option<PathBuf>,
    /// Require TCP clients to present a certificate signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "listen")]
    client_ca: Option<PathBuf>,
    /// Require TCP clients to send `authorization: Bearer TOKEN`, TOKEN being this file's
    /// content (surrounding whitespace ignored). With --client-ca too, both are required.
    #[arg(long, value_name = "FILE", requires = "listen")]
    token_file: Option<PathBuf>,
    /// The uid authenticated TCP clients act as: they trace what that user could ptrace and
    /// see that user's sessions. `0` gives them root's access to everything.
    #[arg(long, value_name = "UID", requires = "listen")]
    listen_uid: Option<u32>,
    /// Bytes of span ring buffer per CPU (a power of two, a multiple of the page size).
    #[arg(long, default_value_t = DEFAULT_RING_BYTES)]
    ring_bytes: u32,
    /// Probe slots: functions traced at once across all sessions.
    #[arg(long, default_value_t = DEFAULT_MAX_PROBES)]
    max_probes: u32,
    /// Functions one session may probe.
    #[arg(long, default_value_t = DEFAULT_MAX_SESSION_PROBES)]
    max_session_probes: usize,
    /// The span store (SQLite, WAL mode); created with its directory if missing.
    #[arg(long, env = "SCOPE_DB", default_value = DEFAULT_DB)]
    db: PathBuf,
    /// Keep the store under this size (e.g. `2G`, `500M`, bytes without a suffix), evicting
    /// the oldest spans.
    #[arg(long, value_parser = parse_bytes)]
    retain_bytes: Option<u64>,
    /// Evict spans older than this (e.g. `7d`, `12h`, `30m`, `90s`).
    #[arg(long, value_parser = parse_age)]
    retain_age: Option<Duration>,
    /// Also send every span to this OpenTelemetry Collector (OTLP/gRPC, e.g.
    /// `http://localhost:4317`), batched once a second; spans it cannot take are counted
    /// (`otlp.dropped`), never waited for.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Do not follow reads and writes on pipes and sockets. Saves the syscall tracepoints'
    /// cost on every read and write (see BENCHMARKS.md), but requests are no longer linked
    /// from the process that sent them to the one that handled them.
    #[arg(long)]
    no_io_capture: bool,
    /// Benchmarks only: attach programs that return at once instead of scope's, to measure
    /// the floor cost of an uprobe + uretprobe pair. Spans are not produced.
    #[arg(long, hide = true)]
    bench_null_programs: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. `127.0.0.1:9464`): every
    /// counter of `scope status`, per session and probe what was received, lost and left
    /// out, and scoped's own CPU and memory. No authentication: bind it to a private address.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Log filter, e.g. `info`, `scoped=debug`.
    #[arg(long, env = "SCOPED_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .context("--log is not a valid filter")?,
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("scoped")
        .build()
        .context("starting the async runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Wrong listener options are refused before anything is loaded.
    let tcp = TcpSettings::from_args(&args)?;
    ensure_tracefs()?;
    let stats = Arc::new(DaemonStats::default());
    let (kernel, rings) = Kernel::load(KernelConfig {
        ring_bytes: args.ring_bytes,
        max_probes: args.max_probes,
        io_capture: !args.no_io_capture,
    })?;
    let cpus = kernel.cpus();
    let store = Arc::new(
        Store::open(StoreConfig {
            path: args.db.clone(),
            retain_bytes: args.retain_bytes,
            retain_age: args.retain_age,
        })
        .context("opening the span store (--db)")?,
    );
    let exporter = match &args.otlp_endpoint {
        Some(url) => {
            let (handle, exporter) = otlp::continuous(url, otlp::ExporterConfig::default())
                .context("--otlp-endpoint")?;
            tokio::spawn(exporter.run());
            tracing::info!(endpoint = url, "exporting every span over OTLP");
            Some(handle)
        }
        None => None,
    };
    let exporter_counters = exporter
        .as_ref()
        .map(|handle| Arc::clone(handle.counters()));
    let registry = Arc::new(Registry::new(args.max_probes));
    let ids = IdScheme::for_this_run();
    let pipeline = Arc::new(Pipeline::new(
        Arc::clone(&store),
        Arc::clone(&registry),
        Arc::clone(&stats),
        ids,
        exporter,
    ));
    let (tx, rx) = mpsc::channel(INGEST_QUEUE_BATCHES);
    let (events_tx, mut events) = mpsc::channel(LIFECYCLE_QUEUE_EVENTS);
    let reader = Reader::spawn(
        rings,
        Outputs {
            spans: tx,
            events: events_tx,
            registry: Arc::clone(&registry),
        },
        Arc::clone(&stats),
    )
    .context("starting the ring reader")?;
    let pipeline_task = tokio::spawn(Arc::clone(&pipeline).run(rx));

    let daemon = Arc::new(Daemon::new(
        ProbeManager::new(kernel, registry),
        Arc::new(Symbolizer::new()),
        pipeline,
        store,
        stats,
        exporter_counters,
        Settings {
            max_session_probes: args.max_session_probes,
            max_sessions_per_caller: args.max_sessions_per_caller,
            programs: if args.bench_null_programs {
                ProgramPair::Null
            } else {
                ProgramPair::Scope
            },
            ids,
        },
    ));
    // Forks, execs and exits of traced processes: follow or let go, one at a time.
    let lifecycle_task = tokio::spawn({
        let daemon = Arc::clone(&daemon);
        async move {
            while let Some(event) = events.recv().await {
                let daemon = Arc::clone(&daemon);
                if let Err(error) =
                    tokio::task::spawn_blocking(move || daemon.on_process_event(&event)).await
                {
                    tracing::error!(%error, "handling a process event failed");
                }
            }
        }
    });

    // Overhead budgets and idle IO tracepoints, a few times a second.
    let housekeeping = tokio::spawn({
        let daemon = Arc::clone(&daemon);
        async move {
            let mut every = tokio::time::interval(HOUSEKEEPING_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let daemon = Arc::clone(&daemon);
                if let Err(error) = tokio::task::spawn_blocking(move || daemon.tick()).await {
                    tracing::error!(%error, "housekeeping failed");
                }
            }
        }
    });

    let metrics_task = match args.metrics_addr {
        Some(addr) => {
            let serve = scoped::metrics::serve(addr, Arc::clone(&daemon))
                .await
                .with_context(|| format!("--metrics-addr {addr}: cannot listen"))?;
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
            Some(tokio::spawn(serve))
        }
        None => None,
    };

    let listener = bind(&args.socket)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ScopeServer<api::ScopeService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(scope_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the gRPC reflection service")?;
    let scope = ScopeServer::new(api::ScopeService::new(Arc::clone(&daemon)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    // Both listeners stop on the first SIGTERM/SIGINT.
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut stop: watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|stopped| *stopped).await;
    };
    let tcp_server = match tcp {
        Some(tcp) => {
            let listener = TcpListener::bind(tcp.address)
                .await
                .with_context(|| format!("binding --listen {}", tcp.address))?;
            tracing::info!(
                address = %tcp.address,
                uid = tcp.caller.uid,
                mutual_tls = tcp.mutual_tls,
                token = tcp.caller.token.is_some(),
                "serving gRPC over TCP with TLS"
            );
            let server = tonic::transport::Server::builder()
                .tls_config(tcp.tls)
                .context("--tls-cert/--tls-key/--client-ca")?
                .layer(InterceptorLayer::new(tcp.caller))
                .layer(MapResponseLayer::new(api::malformed_is_invalid_argument))
                .add_service(health_service.clone())
                .add_service(reflection.clone())
                .add_service(scope.clone())
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stopped(stop.clone()),
                );
            Some(tokio::spawn(server))
        }
        None => None,
    };

    tracing::info!(socket = %args.socket.display(), cpus, ring_bytes = args.ring_bytes, "scoped is serving");
    let served = tonic::transport::Server::builder()
        .layer(InterceptorLayer::new(access::unix_caller))
        .layer(MapResponseLayer::new(api::malformed_is_invalid_argument))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(scope)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped(stop))
        .await;
    let tcp_served = match tcp_server {
        Some(server) => server.await.context("the TCP listener's task failed")?,
        None => Ok(()),
    };

    // Leave no probe behind: detach everything before the process goes.
    let detach = {
        let daemon = Arc::clone(&daemon);
        tokio::task::spawn_blocking(move || daemon.detach(&access::Caller::DAEMON, None)).await
    };
    match detach {
        Ok(Ok((ids, took))) if !ids.is_empty() => {
            tracing::info!(
                sessions = ids.len(),
                ms = took.as_secs_f64() * 1e3,
                "detached every session on shutdown"
            );
        }
        Ok(_) => {}
        Err(error) => tracing::error!(%error, "detaching on shutdown failed"),
    }
    drop(reader);
    pipeline_task.abort();
    lifecycle_task.abort();
    housekeeping.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    daemon.close_store();
    if let Err(error) = fs::remove_file(&args.socket) {
        tracing::debug!(%error, "removing the socket");
    }
    served.context("the gRPC server failed")?;
    tcp_served.context("the TCP gRPC server failed")?;
    tracing::info!("scoped stopped");
    Ok(())
}

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        tokio::signal::unix::signal(SignalKind::terminate()),
        tokio::signal::unix::signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(
            "cannot listen for SIGTERM/SIGINT; stop scoped with SIGKILL (probes go with the process)"
        );
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: detaching and stopping"),
        _ = int.recv() => tracing::info!("SIGINT: detaching and stopping"),
    }
}

/// What the TCP listener needs, checked before the daemon starts.
struct TcpSettings {
    address: SocketAddr,
    tls: ServerTlsConfig,
    mutual_tls: bool,
    caller: TcpCaller,
}

impl TcpSettings {
    /// `None` without --listen; an error naming what is missing when it is not secured.
    fn from_args(args: &Args) -> anyhow::Result<Option<TcpSettings>> {
        let Some(address) = args.listen else {
            return Ok(None);
        };
        let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
            bail!(
                "--listen {address} serves the API over TCP, which needs TLS: give --tls-cert FILE and --tls-key FILE (PEM)"
            );
        };
        if args.client_ca.is_none() && args.token_file.is_none() {
            bail!(
                "--listen {address} needs client authentication: give --client-ca FILE (clients present a certificate it signed) and/or --token-file FILE (clients send `authorization: Bearer TOKEN`)"
            );
        }
        let Some(uid) = args.listen_uid else {
            bail!(
                "--listen {address} needs --listen-uid UID: the user authenticated TCP clients act as (0 gives them root's access to every session)"
            );
        };
        let read = |file: &PathBuf, what: &str| {
            fs::read(file).with_context(|| format!("reading {what} {}", file.display()))
        };
        let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
            read(cert, "--tls-cert")?,
            read(key, "--tls-key")?,
        ));
        if let Some(ca) = &args.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "--client-ca")?));
        }
        let token = match &args.token_file {
            Some(file) => {
                let token = read(file, "--token-file")?;
                let token = token.trim_ascii();
                if token.is_empty() {
                    bail!("--token-file {} is empty", file.display());
                }
                if fs::metadata(file).is_ok_and(|meta| meta.mode() & 0o077 != 0) {
                    tracing::warn!(
                        file = %file.display(),
                        "the token file is readable by other users; `chmod 600` it"
                    );
                }
                Some(Arc::from(token))
            }
            None => None,
        };
        Ok(Some(TcpSettings {
            address,
            tls,
            mutual_tls: args.client_ca.is_some(),
            caller: TcpCaller { uid, token },
        }))
    }
}

/// The gid of the socket's group, or `None` if the system has no such group.
fn socket_group() -> anyhow::Result<Option<u32>> {
    let name = CString::new(SOCKET_GROUP).context("the group name")?;
    // SAFETY: `group` is plain C data (integers and pointers); all zeroes is a valid value.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getgrnam_r writes only into `group` and
    // `buffer` (of the length given) and sets `found` to `&group` or null.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 {
        bail!(
            "looking up the group {SOCKET_GROUP}: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    Ok((!found.is_null()).then_some(group.gr_gid))
}

/// Binds the unix socket, replacing a stale one but never a live daemon's, and opens it to
/// root and the `scope` group (mode 0660).
fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        // Searchable by everyone: the socket's own mode and group decide who connects.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => bail!(
            "another scoped is already serving on {}; stop it or pass --socket",
            socket.display()
        ),
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(_) => {
            // Nobody answers: a socket file left by a daemon that was killed.
            fs::remove_file(socket)
                .with_context(|| format!("removing the stale socket {}", socket.display()))?;
        }
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    fs::set_permissions(socket, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", socket.display()))?;
    match socket_group()? {
        Some(gid) => {
            std::os::unix::fs::chown(socket, Some(access::ROOT_UID), Some(gid))
                .with_context(|| format!("giving {} to group {SOCKET_GROUP}", socket.display()))?;
            warn_if_unreachable(socket, gid);
        }
        None => tracing::warn!(
            socket = %socket.display(),
            "there is no group {SOCKET_GROUP}: only root can use the socket; create it with \
             `groupadd --system {SOCKET_GROUP}` (cargo xtask setup does) and add users to it"
        ),
    }
    Ok(listener)
}

/// Warns when a directory above the socket keeps the `scope` group from reaching it.
fn warn_if_unreachable(socket: &Path, gid: u32) {
    for dir in socket.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let searchable = mode & 0o001 != 0 || (meta.gid() == gid && mode & 0o010 != 0);
        if !searchable {
            tracing::warn!(
                directory = %dir.display(),
                mode = format!("{:o}", mode & 0o7777),
                "members of group {SOCKET_GROUP} cannot reach the socket through this directory; \
                 make it searchable (chmod o+x, or give it to the group with g+x)"
            );
            return;
        }
    }
}

/// Tracepoints need tracefs; a fresh machine may not have it mounted.
fn ensure_tracefs() -> anyhow::Result<()> {
    let events = Path::new("/sys/kernel/tracing/events");
    if events.exists() {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted at /sys/kernel/tracing and mounting it failed ({error}); run `mount -t tracefs tracefs /sys/kernel/tracing` as root"
        );
    }
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

/// `2G`, `500M`, `64K` or plain bytes.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len()),
    );
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 500M or 2G"))?;
    let scale: f64 = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "T" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use K, M, G or T)"
            ));
        }
    };
    Ok((number * scale) as u64)
}

/// `7d`, `12h`, `30m`, `90s`.
fn parse_age(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not an age like 7d or 12h"))?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use s, m, h, d or w)"
            ));
        }
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_parse() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("500M"), Ok(500 << 20));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("1.5K"), Ok(1536));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5X").is_err());
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert!(parse_age("soon").is_err());
    }

    #[test]
    fn a_tcp_listener_must_be_secured() {
        let refusal = |extra: &[&str]| {
            let args = Args::try_parse_from(
                ["scoped", "--listen", "127.0.0.1:7443"]
                    .iter()
                    .chain(extra)
                    .copied(),
            )
            .expect("the options parse");
            match TcpSettings::from_args(&args) {
                Ok(_) => panic!("{extra:?} is not enough to serve TCP"),
                Err(error) => error.to_string(),
            }
        };
        assert!(refusal(&[]).contains("needs TLS"));
        let tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        assert!(refusal(&tls).contains("needs client authentication"));
        let authenticated = [&tls[..], &["--token-file", "t"]].concat();
        assert!(refusal(&authenticated).contains("needs --listen-uid"));
        let complete = [&authenticated[..], &["--listen-uid", "0"]].concat();
        assert!(
            refusal(&complete).contains("reading --tls-cert c.pem"),
            "the files are read before anything starts"
        );
        assert!(
            Args::try_parse_from(["scoped", "--token-file", "t"]).is_err(),
            "TLS options need --listen"
        );
        let plain = Args::try_parse_from(["scoped"]).expect("parses");
        assert!(
            TcpSettings::from_args(&plain)
                .expect("no listener")
                .is_none()
        );
    }
}
