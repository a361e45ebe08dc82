//! The connection to `scoped` and the errors a user sees when it fails.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use scope_proto::v1::scope_client::ScopeClient;
use tokio::net::UnixStream;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri},
};

/// Where `scoped` listens unless `--socket` or `SCOPE_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/scope/scoped.sock";

/// Largest message the client accepts: span batches and session lists can be big.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Where `scoped` is: its unix socket, or its TCP listener (`scoped --listen`), which always
/// speaks TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    /// `https://host:port`.
    Tls(String),
}

impl Address {
    /// A socket path, or an `https://host:port` URL.
    pub fn parse(text: &str) -> Result<Address, String> {
        if text.starts_with("https://") {
            return Ok(Address::Tls(text.to_owned()));
        }
        if text.starts_with("http://") {
            return Err(format!(
                "{text}: scoped's TCP listener speaks TLS only; use https://"
            ));
        }
        Ok(Address::Unix(PathBuf::from(text)))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "{}", path.display()),
            Address::Tls(url) => f.write_str(url),
        }
    }
}

/// What a TCP listener may ask of a client: which CA signed its certificate, a certificate
/// of the client's own (mutual TLS), a token.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
}

/// What went wrong talking to `scoped`, worded for the user.
#[derive(Debug)]
pub enum ClientError {
    /// The socket (or TCP address) could not be opened.
    Connect { socket: Address, source: io::Error },
    /// Connecting failed some other way (TLS, the HTTP/2 handshake, say).
    Transport {
        socket: Address,
        source: tonic::transport::Error,
    },
    /// The credentials for a TCP listener are missing or unreadable.
    Credentials { socket: Address, problem: String },
    /// The daemon answered with an error status.
    Rpc {
        socket: Address,
        status: tonic::Status,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { socket, source } => {
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
                         only to root and the `scope` group; run scope with sudo, or join the \
                         group (`usermod -aG scope $USER`, then log in again)"
                    ),
                    _ => write!(f, "cannot connect to scoped at {socket}: {reason}"),
                }
            }
            Self::Transport { socket, source } => {
                write!(f, "cannot talk to scoped at {socket}: ")?;
                write_chain(f, source)
            }
            Self::Credentials { socket, problem } => {
                write!(f, "cannot connect to scoped at {socket}: {problem}")
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
                        write!(f, "lost the connection to scoped at {socket}: {message}")
                    }
                    tonic::Code::Unimplemented => write!(
                        f,
                        "scoped at {socket} does not support this request ({message}); is it \
                         older than this scope?"
                    ),
                    tonic::Code::Unauthenticated => {
                        write!(
                            f,
                            "scoped at {socket} did not accept this client: {message}"
                        )
                    }
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

/// Adds the bearer token (if any) to every request.
#[derive(Clone)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of `scoped` and where it is, for error messages.
#[derive(Clone)]
pub struct Client {
    pub socket: Address,
    pub rpc: ScopeClient<InterceptedService<Channel, Token>>,
}

impl Client {
    /// Connects to `scoped` at `address`; `credentials` are for a TCP listener.
    pub async fn connect(
        address: &Address,
        credentials: &Credentials,
    ) -> Result<Self, ClientError> {
        match address {
            Address::Unix(path) => Self::connect_unix(path).await,
            Address::Tls(url) => Self::connect_tls(address, url, credentials).await,
        }
    }

    /// Connects to a TCP listener with TLS.
    async fn connect_tls(
        address: &Address,
        url: &str,
        credentials: &Credentials,
    ) -> Result<Self, ClientError> {
        let problem = |problem: String| ClientError::Credentials {
            socket: address.clone(),
            problem,
        };
        let read = |file: &PathBuf, what: &str| {
            std::fs::read(file).map_err(|error| {
                problem(format!(
                    "reading {what} {}: {}",
                    file.display(),
                    io_reason(&error)
                ))
            })
        };
        let Some(ca) = &credentials.ca else {
            return Err(problem(
                "give --ca FILE, the CA certificate (PEM) that signed scoped's certificate"
                    .to_owned(),
            ));
        };
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca, "--ca")?));
        match (&credentials.cert, &credentials.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "--cert")?,
                    read(key, "--key")?,
                ));
            }
            (None, None) => {}
            _ => return Err(problem("--cert and --key go together".to_owned())),
        }
        let token = match &credentials.token_file {
            Some(file) => {
                let token = read(file, "--token-file")?;
                let token = String::from_utf8_lossy(token.trim_ascii()).into_owned();
                let value = format!("Bearer {token}").parse().map_err(|_| {
                    problem(format!(
                        "--token-file {}: a token is printable ASCII",
                        file.display()
                    ))
                })?;
                Some(value)
            }
            None => None,
        };
        let transport = |source| ClientError::Transport {
            socket: address.clone(),
            source,
        };
        let channel = Endpoint::from_shared(url.to_owned())
            .map_err(transport)?
            .tls_config(tls)
            .map_err(transport)?
            .connect()
            .await
            .map_err(|source| match find_io_error(&source) {
                Some(io) => ClientError::Connect {
                    socket: address.clone(),
                    source: io::Error::new(io.kind(), io_reason(io)),
                },
                None => transport(source),
            })?;
        Ok(Self {
            socket: address.clone(),
            rpc: ScopeClient::with_interceptor(channel, Token(token))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// Connects to the unix socket at `socket`.
    async fn connect_unix(socket: &std::path::Path) -> Result<Self, ClientError> {
        let address = Address::Unix(socket.to_owned());
        // Connect once here so a missing socket or a permission problem surfaces as a plain
        // `io::Error`, not buried in a transport error.
        let first = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: address.clone(),
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
                    socket: address.clone(),
                    source: io::Error::new(io.kind(), io_reason(io)),
                },
                None => ClientError::Transport {
                    socket: address.clone(),
                    source,
                },
            })?;
        Ok(Self {
            socket: address,
            rpc: ScopeClient::with_interceptor(channel, Token(None))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
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
            socket: Address::Unix("/run/scope/scoped.sock".into()),
            source: io::Error::from_raw_os_error(2),
        };
        assert_eq!(
            err.to_string(),
            "cannot connect to scoped at /run/scope/scoped.sock: No such file or directory — is \
             scoped running? (start it with `scoped` or `systemctl start scoped`)"
        );
        let err = ClientError::Connect {
            socket: Address::Unix("/s".into()),
            source: io::Error::from_raw_os_error(13),
        };
        assert!(
            err.to_string()
                .starts_with("cannot connect to scoped at /s: Permission denied — ")
        );
    }

    #[test]
    fn addresses_are_socket_paths_or_https_urls() {
        assert_eq!(
            Address::parse("/run/scope/scoped.sock"),
            Ok(Address::Unix("/run/scope/scoped.sock".into()))
        );
        assert_eq!(
            Address::parse("https://tracer:7443"),
            Ok(Address::Tls("https://tracer:7443".into()))
        );
        assert!(
            Address::parse("http://tracer:7443")
                .expect_err("no plaintext TCP")
                .contains("use https://")
        );
    }

    #[test]
    fn rpc_errors_print_the_daemon_message() {
        let err = ClientError::Rpc {
            socket: Address::Unix("/s".into()),
            status: tonic::Status::not_found("pid 4242 does not exist"),
        };
        assert_eq!(err.to_string(), "pid 4242 does not exist");
        let err = ClientError::Rpc {
            socket: Address::Unix("/s".into()),
            status: tonic::Status::new(tonic::Code::Internal, ""),
        };
        assert_eq!(err.to_string(), "Internal error");
        let err = ClientError::Rpc {
            socket: Address::Unix("/s".into()),
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
            socket: Address::Unix("/s".into()),
            status: lost,
        };
        assert_eq!(
            err.to_string(),
            "lost the connection to scoped at /s: connection reset"
        );
    }
}
