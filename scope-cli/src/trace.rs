//! `scope trace`: attach, print calls live as trees, detach however we stop.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use scope_proto::v1::{
    DetachRequest, DetachResponse, ListSessionsRequest, Session, SpanBatch, WatchRequest,
    detach_request::Target,
};
use tokio::signal::unix::{Signal, SignalKind, signal};
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
    let mut live = Live {
        session_id,
        trees: TreeBuilder::new(options.grace),
        received: 0,
        dropped: 0,
    };
    let outcome = live
        .run(
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

    let (mut stream, stop) = match outcome {
        Ok(pair) => pair,
        Err(err) => {
            return match detached {
                Ok(_) => Err(err),
                Err(detach_err) => Err(err.context(detach_err)),
            };
        }
    };
    // Calls that ended just before the probes went away may still be in flight: read them for
    // one more grace period (the stream may end sooner now that the session is gone).
    let mut stop = stop;
    let in_flight = matches!(
        stop,
        Stop::Elapsed | Stop::Interrupted | Stop::Terminated | Stop::TargetGone
    );
    let drained = if in_flight {
        live.drain(out, &mut stream, options.grace).await
    } else {
        Ok(())
    };
    if let Err(err) = drained {
        stop = Stop::OutputFailed(err);
    }
    let flushed = if matches!(stop, Stop::OutputFailed(_)) {
        Ok(())
    } else {
        print_trees(out, live.trees.finish())
    };
    if let Err(err) = flushed {
        stop = Stop::OutputFailed(err);
    }

    let mut summary = format!(
        "session {session_id}: {} span{} received",
        live.received,
        if live.received == 1 { "" } else { "s" }
    );
    if live.dropped > 0 {
        summary.push_str(&format!(
            ", {} dropped on the way to this client (it fell behind)",
            live.dropped
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
        Stop::TargetGone => Some(format!("pid {} exited", options.target.pid)),
        Stop::StreamEnded => Some("scoped ended the live stream".to_owned()),
        _ => None,
    };
    if let Some(reason) = reason {
        summary = format!("{reason}; {summary}");
    }
    // No summary when the output itself is what failed (a closed pipe, say).
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

/// The live part of a trace: the trees being built and what was counted.
struct Live {
    session_id: u64,
    trees: TreeBuilder,
    received: u64,
    dropped: u64,
}

impl Live {
    /// Watches the session and prints trees until told to stop. Returns the stream so the
    /// caller can read spans still in flight after detaching.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; a struct would not help"
    )]
    async fn run(
        &mut self,
        client: &Client,
        out: &mut impl Write,
        options: &TraceOptions,
        session: &Session,
        early: Option<Streaming<SpanBatch>>,
        sigint: &mut Signal,
        sigterm: &mut Signal,
    ) -> Result<(Streaming<SpanBatch>, Stop)> {
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
        if let Err(err) = writeln!(out, "{header}").and_then(|()| out.flush()) {
            return Ok((stream, Stop::OutputFailed(err)));
        }

        let mut poll = tokio::time::interval(SESSION_POLL);
        poll.tick().await;
        let far = started + Duration::from_secs(86_400 * 365);
        let stop = loop {
            let flush_at = self.trees.next_ready_at();
            let message = tokio::select! {
                _ = sigint.recv() => break Stop::Interrupted,
                _ = sigterm.recv() => break Stop::Terminated,
                _ = sleep_until(deadline.unwrap_or(far).into()), if deadline.is_some() => {
                    break Stop::Elapsed
                }
                _ = sleep_until(flush_at.unwrap_or(far).into()), if flush_at.is_some() => {
                    if let Err(err) = print_trees(out, self.trees.take_ready(Instant::now())) {
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
            match message {
                Ok(Some(batch)) => {
                    if let Err(err) = self.take_batch(out, batch) {
                        break Stop::OutputFailed(err);
                    }
                }
                Ok(None) => break Stop::StreamEnded,
                Err(status) => break Stop::StreamFailed(status),
            }
        };
        Ok((stream, stop))
    }

    /// Reads whatever arrives within `grace`, or until the stream ends.
    async fn drain(
        &mut self,
        out: &mut impl Write,
        stream: &mut Streaming<SpanBatch>,
        grace: Duration,
    ) -> std::io::Result<()> {
        let until = Instant::now() + grace;
        while let Ok(Ok(Some(batch))) = timeout(
            until.saturating_duration_since(Instant::now()),
            stream.message(),
        )
        .await
        {
            self.take_batch(out, batch)?;
        }
        Ok(())
    }

    fn take_batch(&mut self, out: &mut impl Write, batch: SpanBatch) -> std::io::Result<()> {
        self.dropped = self.dropped.saturating_add(batch.dropped);
        // Warnings name their session; the early stream may carry other sessions' too.
        let ours = format!("session {}:", self.session_id);
        for warning in batch.warnings.iter().filter(|w| w.starts_with(&ours)) {
            eprintln!("scope: warning: {warning}");
        }
        let now = Instant::now();
        for span in batch.spans {
            // The early stream is per pid: leave out other sessions' spans.
            if span.session_id != 0 && span.session_id != self.session_id {
                continue;
            }
            self.received += 1;
            print_trees(out, self.trees.push(span, now))?;
        }
        print_trees(out, self.trees.take_ready(now))
    }
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
