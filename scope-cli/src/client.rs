//! The connection to `scoped` and the errors a user sees when it fails.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use scope_proto::v1::scope_client::ScopeClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where `scoped` listens unless `--socket` or `SCOPE_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/scope/scoped.sock";

/// Largest message the client accepts: span batches and session lists can be big.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// What went wrong talking to `scoped`, worded for the user.
#[derive(Debug)]
pub enum ClientError {
    /// The socket could not be opened.
    Connect { socket: PathBuf, source: io::Error },
    /// Connecting failed some other way (the HTTP/2 handshake, say).
    Transport {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    /// The daemon answered with an error status.
    Rpc {
        socket: PathBuf,
        status: tonic::Status,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { socket, source } => {
                let socket = socket.display();
                let reason = io_reason(source);
                match source.kind() {
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => write!(
                        f,
                        "cannot connect to scoped at {socket}: {reason} — is scoped running? \
                         (start it with `scoped` or `systemctl start scoped`)"
                    ),
                    io::ErrorKind::PermissionDenied => write!(
                        f,
                        "cannot connect to scoped at {socket}: {reason} — the socket is open \
                         only to root and its group; run scope with sudo or as a member of the \
                         socket's group"
                    ),
                    _ => write!(f, "cannot connect to scoped at {socket}: {reason}"),
                }
            }
            Self::Transport { socket, source } => {
                write!(f, "cannot talk to scoped at {}: ", socket.display())?;
                write_chain(f, source)
            }
            Self::Rpc { socket, status } => {
                let message = if status.message().is_empty() {
                    status.code().description()
                } else {
                    status.message()
                };
                match status.code() {
                    // A status the transport made up (it carries the transport error) means
                    // the connection broke; one scoped sent (say, an OpenTelemetry collector
                    // it cannot reach) has a message of its own and no source.
                    tonic::Code::Unavailable
                        if status.source().is_some() || status.message().is_empty() =>
                    {
                        write!(
                            f,
                            "lost the connection to scoped at {}: {message}",
                            socket.display()
                        )
                    }
                    tonic::Code::Unimplemented => write!(
                        f,
                        "scoped at {} does not support this request ({message}); is it older \
                         than this scope?",
                        socket.display()
                    ),
                    // The daemon writes user-facing messages; print them as they are.
                    _ => f.write_str(message),
                }
            }
        }
    }
}

impl StdError for ClientError {}

/// `No such file or directory`, without the `(os error 2)` suffix.
fn io_reason(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(cut) => text[..cut].to_owned(),
        None => text,
    }
}

fn write_chain(f: &mut fmt::Formatter<'_>, err: &dyn StdError) -> fmt::Result {
    write!(f, "{err}")?;
    let mut source = err.source();
    while let Some(cause) = source {
        write!(f, ": {cause}")?;
        source = cause.source();
    }
    Ok(())
}

/// A client of `scoped` and the socket it came from, for error messages.
#[derive(Clone)]
pub struct Client {
    pub socket: PathBuf,
    pub rpc: ScopeClient<Channel>,
}

impl Client {
    /// Connects to the unix socket at `socket`.
    pub async fn connect(socket: &Path) -> Result<Self, ClientError> {
        // Connect once here so a missing socket or a permission problem surfaces as a plain
        // `io::Error`, not buried in a transport error.
        let first = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: socket.to_owned(),
                source,
            })?;
        let first = std::sync::Mutex::new(Some(first));
        let path = socket.to_owned();
        // The URI is ignored: every connection goes to the unix socket.
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let ready = first.lock().ok().and_then(|mut f| f.take());
                let path = path.clone();
                async move {
                    let stream = match ready {
                        Some(stream) => stream,
                        None => UnixStream::connect(path).await?,
                    };
                    Ok::<_, io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| match find_io_error(&source) {
                Some(io) => ClientError::Connect {
                    socket: socket.to_owned(),
                    source: io::Error::new(io.kind(), io_reason(io)),
                },
                None => ClientError::Transport {
                    socket: socket.to_owned(),
                    source,
                },
            })?;
        Ok(Self {
            socket: socket.to_owned(),
            rpc: ScopeClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// Wraps an error status from this daemon.
    pub fn error(&self, status: tonic::Status) -> ClientError {
        ClientError::Rpc {
            socket: self.socket.clone(),
            status,
        }
    }
}

fn find_io_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_say_what_to_do() {
        let err = ClientError::Connect {
            socket: "/run/scope/scoped.sock".into(),
            source: io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            err.to_string(),
            "cannot connect to scoped at /run/scope/scoped.sock: No such file or directory — is \
             scoped running? (start it with `scoped` or `systemctl start scoped`)"
        );
        let err = ClientError::Connect {
            socket: "/s".into(),
            source: io::Error::from_raw_os_error(13),
        };
        assert!(
            err.to_string()
                .starts_with("cannot connect to scoped at /s: Permission denied — ")
        );
    }

    #[test]
    fn rpc_errors_print_the_daemon_message() {
        let err = ClientError::Rpc {
            socket: "/s".into(),
            status: tonic::Status::not_found("pid 4242 does not exist"),
        };
        assert_eq!(err.to_string(), "pid 4242 does not exist");
        let err = ClientError::Rpc {
            socket: "/s".into(),
            status: tonic::Status::new(tonic::Code::Internal, ""),
        };
        assert_eq!(err.to_string(), "Internal error");
        let err = ClientError::Rpc {
            socket: "/s".into(),
            status: tonic::Status::unavailable("cannot reach the collector at http://c:4317"),
        };
        assert_eq!(
            err.to_string(),
            "cannot reach the collector at http://c:4317"
        );
        let mut lost = tonic::Status::unavailable("connection reset");
        lost.set_source(std::sync::Arc::new(io::Error::from(
            io::ErrorKind::ConnectionReset,
        )));
        let err = ClientError::Rpc {
            socket: "/s".into(),
            status: lost,
        };
        assert_eq!(
            err.to_string(),
            "lost the connection to scoped at /s: connection reset"
        );
    }
}
