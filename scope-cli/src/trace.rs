//! `scope trace`: attach, print calls live as trees, detach however we stop.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use scope_proto::v1::{
    DetachRequest, DetachResponse, ListSessionsRequest, Session, SpanBatch, WatchRequest,
    detach_request::Target,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{sleep_until, timeout};
use tonic::Streaming;

use crate::client::Client;
use crate::commands::{AttachTarget, attach_session};
use crate::duration::format_duration_ns;
use crate::render;
use crate::tree::{ReadyTree, TreeBuilder};

/// How long detaching may take before we give up and tell the user to detach by hand.
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the session is checked, to stop when the target process has exited.
const SESSION_POLL: Duration = Duration::from_secs(1);

/// How long a status query at the end may take before the summary goes out without it.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

pub struct TraceOptions {
    pub target: AttachTarget,
    pub duration: Option<Duration>,
    pub grace: Duration,
}

/// Why the live loop stopped.
enum Stop {
    Elapsed,
    Interrupted,
    Terminated,
    TargetGone,
    StreamEnded,
    StreamFailed(tonic::Status),
    OutputFailed(std::io::Error),
}

struct Counts {
    received: u64,
    dropped: u64,
}

pub async fn trace(client: &Client, out: &mut impl Write, options: TraceOptions) -> Result<()> {
    // Take over Ctrl-C and SIGTERM before anything is attached, so no signal can end the
    // process between Attach and Detach.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    // Open the live stream first, filtered by pid, so calls that end right after Attach are
    // not missed; spans of other sessions on the same pid are filtered out below. If scoped
    // refuses a watch on a pid it does not trace yet, watch the session after attaching.
    let early = client
        .rpc
        .clone()
        .watch(WatchRequest {
            session_id: 0,
            pid: options.target.pid,
            function: String::new(),
        })
        .await
        .ok()
        .map(tonic::Response::into_inner);

    let session = attach_session(client, &options.target).await?;
    let session_id = session.id;
    // From here on, every way out goes through `detach` below.
    let outcome = run(
        client,
        out,
        &options,
        &session,
        early,
        &mut sigint,
        &mut sigterm,
    )
    .await;
    let stats = list_session(client, session_id).await.flatten();
    let detached = detach(client, session_id).await;

    let (counts, stop) = match outcome {
        Ok(pair) => pair,
        Err(err) => {
            return match detached {
                Ok(_) => Err(err),
                Err(detach_err) => Err(err.context(detach_err)),
            };
        }
    };
    let mut summary = format!(
        "session {session_id}: {} span{} received",
        counts.received,
        if counts.received == 1 { "" } else { "s" }
    );
    if counts.dropped > 0 {
        summary.push_str(&format!(
            ", {} dropped on the way to this client (it fell behind)",
            counts.dropped
        ));
    }
    if let Some(stats) = stats.as_ref().filter(|s| s.spans_dropped > 0) {
        summary.push_str(&format!(
            ", {} dropped by scoped for this session (see `scope status`)",
            stats.spans_dropped
        ));
    }
    match &detached {
        Ok(Some(response)) => summary.push_str(&format!(
            "; detached in {}",
            format_duration_ns(response.detach_ns)
        )),
        Ok(None) => summary.push_str("; the session had already ended"),
        Err(_) => summary.push_str("; NOT detached"),
    }
    let reason = match &stop {
        Stop::Elapsed | Stop::Interrupted | Stop::Terminated => None,
        Stop::TargetGone => Some(format!("pid {} exited", options.target.pid)),
        Stop::StreamEnded => Some("scoped ended the live stream".to_owned()),
        Stop::StreamFailed(_) | Stop::OutputFailed(_) => None,
    };
    if let Some(reason) = reason {
        summary = format!("{reason}; {summary}");
    }
    // The summary is best effort when the output itself is what failed.
    if !matches!(stop, Stop::OutputFailed(_)) {
        writeln!(out, "{summary}")?;
        out.flush()?;
    }
    detached?;
    match stop {
        Stop::StreamFailed(status) => Err(client.error(status).into()),
        Stop::OutputFailed(err) => Err(err.into()),
        _ => Ok(()),
    }
}

/// Watches the session and prints trees until told to stop; never returns before the
/// session should be detached.
async fn run(
    client: &Client,
    out: &mut impl Write,
    options: &TraceOptions,
    session: &Session,
    early: Option<Streaming<SpanBatch>>,
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) -> Result<(Counts, Stop)> {
    let started = Instant::now();
    let deadline = options.duration.map(|d| started + d);
    let mut stream = match early {
        Some(stream) => stream,
        None => client
            .rpc
            .clone()
            .watch(WatchRequest {
                session_id: session.id,
                pid: 0,
                function: String::new(),
            })
            .await
            .map_err(|status| client.error(status))?
            .into_inner(),
    };
    let header = format!(
        "tracing {} function{} in pid {} ({}) as session {}{}; Ctrl-C to stop",
        session.probes.len(),
        if session.probes.len() == 1 { "" } else { "s" },
        session.pid,
        if session.comm.is_empty() {
            &session.exe
        } else {
            &session.comm
        },
        session.id,
        options
            .duration
            .map(|d| format!(" for {}", format_duration_ns(d.as_nanos() as u64)))
            .unwrap_or_default(),
    );
    let mut counts = Counts {
        received: 0,
        dropped: 0,
    };
    if let Err(err) = writeln!(out, "{header}").and_then(|()| out.flush()) {
        return Ok((counts, Stop::OutputFailed(err)));
    }

    let mut trees = TreeBuilder::new(options.grace);
    let mut poll = tokio::time::interval(SESSION_POLL);
    poll.tick().await;
    let far = started + Duration::from_secs(86_400 * 365);
    let stop = loop {
        let flush_at = trees.next_ready_at();
        let batch = tokio::select! {
            _ = sigint.recv() => break Stop::Interrupted,
            _ = sigterm.recv() => break Stop::Terminated,
            _ = sleep_until(deadline.unwrap_or(far).into()), if deadline.is_some() => {
                break Stop::Elapsed
            }
            _ = sleep_until(flush_at.unwrap_or(far).into()), if flush_at.is_some() => {
                if let Err(err) = print_trees(out, trees.take_ready(Instant::now())) {
                    break Stop::OutputFailed(err);
                }
                continue;
            }
            _ = poll.tick() => {
                if !target_alive(client, session.id).await {
                    break Stop::TargetGone;
                }
                continue;
            }
            message = stream.message() => message,
        };
        match batch {
            Ok(Some(batch)) => {
                if let Err(err) = take_batch(out, &mut trees, &mut counts, session.id, batch) {
                    break Stop::OutputFailed(err);
                }
            }
            Ok(None) => break Stop::StreamEnded,
            Err(status) => break Stop::StreamFailed(status),
        }
    };

    // Spans of calls that ended just before we stopped may still be in flight: read them for a
    // grace period more (the stream may end sooner once the session is gone).
    if matches!(
        stop,
        Stop::Elapsed | Stop::Interrupted | Stop::Terminated | Stop::TargetGone
    ) {
        let until = Instant::now() + options.grace;
        while let Ok(Ok(Some(batch))) = timeout(
            until.saturating_duration_since(Instant::now()),
            stream.message(),
        )
        .await
        {
            if let Err(err) = take_batch(out, &mut trees, &mut counts, session.id, batch) {
                return Ok((counts, Stop::OutputFailed(err)));
            }
        }
    }
    let flushed = if matches!(stop, Stop::OutputFailed(_)) {
        Ok(())
    } else {
        print_trees(out, trees.finish())
    };
    if let Err(err) = flushed {
        return Ok((counts, Stop::OutputFailed(err)));
    }
    Ok((counts, stop))
}

fn take_batch(
    out: &mut impl Write,
    trees: &mut TreeBuilder,
    counts: &mut Counts,
    session_id: u64,
    batch: SpanBatch,
) -> std::io::Result<()> {
    counts.dropped = counts.dropped.saturating_add(batch.dropped);
    let now = Instant::now();
    for span in batch.spans {
        // The early stream is per pid: leave out other sessions' spans.
        if span.session_id != 0 && span.session_id != session_id {
            continue;
        }
        counts.received += 1;
        print_trees(out, trees.push(span, now))?;
    }
    print_trees(out, trees.take_ready(now))
}

fn print_trees(out: &mut impl Write, ready: Vec<ReadyTree>) -> std::io::Result<()> {
    if ready.is_empty() {
        return Ok(());
    }
    for tree in &ready {
        for line in render::tree_lines(tree) {
            writeln!(out, "{line}")?;
        }
    }
    out.flush()
}

/// False once the target has exited or the session is gone; true when unsure.
async fn target_alive(client: &Client, session_id: u64) -> bool {
    match list_session(client, session_id).await {
        Some(Some(session)) => session.target_alive,
        Some(None) => false,
        None => true,
    }
}

/// The session as scoped lists it: `Some(None)` when it is not listed, `None` when scoped
/// could not be asked.
async fn list_session(client: &Client, session_id: u64) -> Option<Option<Session>> {
    let response = timeout(
        STATS_TIMEOUT,
        client.rpc.clone().list_sessions(ListSessionsRequest {}),
    )
    .await
    .ok()?
    .ok()?
    .into_inner();
    Some(response.sessions.into_iter().find(|s| s.id == session_id))
}

/// Detaches the session; `None` when scoped no longer has it (it ended on its own).
async fn detach(client: &Client, session_id: u64) -> Result<Option<DetachResponse>> {
    let request = DetachRequest {
        target: Some(Target::SessionId(session_id)),
    };
    let hint = format!("detach it with `scope detach {session_id}`");
    match timeout(DETACH_TIMEOUT, client.rpc.clone().detach(request)).await {
        Ok(Ok(response)) => Ok(Some(response.into_inner())),
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => Ok(None),
        Ok(Err(status)) => Err(anyhow!(
            "could not detach session {session_id}: {}; {hint}",
            client.error(status)
        )),
        Err(_) => Err(anyhow!(
            "scoped did not detach session {session_id} within {}s; {hint}",
            DETACH_TIMEOUT.as_secs()
        )),
    }
}
