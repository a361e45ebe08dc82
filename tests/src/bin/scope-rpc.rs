//! The access tests run this as a test user: raw gRPC calls on scoped's socket, so they can
//! check status codes and live streams as that user sees them (the `scope` CLI prints
//! messages, not codes, and has no plain Watch command).
//!
//! ```text
//! scope-rpc SOCKET attach PID FUNC     prints `ok SESSION_ID` or `error CODE MESSAGE`
//! scope-rpc SOCKET detach SESSION_ID   prints `ok` or `error CODE MESSAGE`
//! scope-rpc SOCKET watch SECONDS       prints `span PID SESSION_ID` per span it receives
//! ```

use std::time::Duration;

use anyhow::{Context, bail};
use scope_proto::v1 as pb;
use tokio_stream::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, command, rest @ ..] = args.as_slice() else {
        bail!("usage: scope-rpc SOCKET attach PID FUNC | detach SESSION_ID | watch SECONDS");
    };
    let socket = socket.clone();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .context("connecting to scoped")?;
    let mut client = pb::scope_client::ScopeClient::new(channel);
    let report = |status: tonic::Status| {
        println!("error {:?} {}", status.code(), status.message());
    };
    match (command.as_str(), rest) {
        ("attach", [pid, function]) => {
            let request = pb::AttachRequest {
                pid: pid.parse().context("PID")?,
                functions: vec![function.clone()],
                ..Default::default()
            };
            match client.attach(request).await {
                Ok(response) => {
                    println!("ok {}", response.into_inner().session.map_or(0, |s| s.id))
                }
                Err(status) => report(status),
            }
        }
        ("detach", [id]) => {
            let request = pb::DetachRequest {
                target: Some(pb::detach_request::Target::SessionId(
                    id.parse().context("SESSION_ID")?,
                )),
            };
            match client.detach(request).await {
                Ok(_) => println!("ok"),
                Err(status) => report(status),
            }
        }
        ("watch", [seconds]) => {
            let seconds: u64 = seconds.parse().context("SECONDS")?;
            let mut stream = match client.watch(pb::WatchRequest::default()).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    report(status);
                    return Ok(());
                }
            };
            println!("watching");
            let deadline = tokio::time::sleep(Duration::from_secs(seconds));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    batch = stream.next() => match batch {
                        Some(Ok(batch)) => {
                            for span in batch.spans {
                                println!("span {} {}", span.pid, span.session_id);
                            }
                        }
                        Some(Err(status)) => {
                            report(status);
                            break;
                        }
                        None => break,
                    },
                }
            }
        }
        _ => bail!("unknown command {command} {rest:?}"),
    }
    Ok(())
}
