//! Who may do what. `scoped` runs as root and serves every user who can reach its socket
//! (root and the members of the `scope` group), so it must never let one user spy on another.
//! Every rule is here; the daemon asks, the store filters by what [`Caller::visible_owner`]
//! says:
//!
//! - The caller is whoever the kernel says connected (`SO_PEERCRED` on the unix socket), or
//!   the uid `scoped --listen-uid` gives authenticated TCP clients.
//! - Root (uid 0) does and sees everything.
//! - Another uid may trace only a process it could ptrace itself ([`may_trace`]), also when
//!   the daemon follows a traced process's forks and execs.
//! - It sees its own sessions and nothing else: their spans, traces, statistics, IO and
//!   processes. A session's owner is stored with it, so this holds across daemon restarts.
//! - It may detach only its own sessions, and hold only so many at once.

use std::{path::Path, sync::Arc};

use scope_symbolizer::ProcessMaps;
use tonic::{Request, Status, transport::server::UdsConnectInfo};

use crate::{error::ScopeError, procfs::Credentials};

/// The uid that may do everything.
pub const ROOT_UID: u32 = 0;

/// Sessions one non-root uid may hold at once, unless `--max-sessions-per-caller` says
/// otherwise. Probe slots are shared by everyone: this keeps one user from taking them all.
pub const DEFAULT_MAX_SESSIONS_PER_CALLER: usize = 16;

/// Who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// The calling process, when the transport tells (the unix socket); for logs.
    pub pid: Option<u32>,
}

/// Why a process may not be traced by a non-root caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// One of its real, effective or saved uids is another user's.
    OtherUser { uid: u32, euid: u32, suid: u32 },
    /// It is not dumpable: the kernel refuses ptrace to anyone but root.
    NotDumpable,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::OtherUser { uid, euid, suid } => write!(
                f,
                "it runs as uid {uid} (effective {euid}, saved {suid}); a user may trace only its own processes"
            ),
            Denial::NotDumpable => f.write_str(
                "it is not dumpable (a setuid, setgid or file-capability program, or one that \
                 changed credentials or called prctl(PR_SET_DUMPABLE, 0)); only root may trace it",
            ),
        }
    }
}

impl Caller {
    /// The daemon itself (shutdown, internal work): root.
    pub const DAEMON: Caller = Caller {
        uid: ROOT_UID,
        pid: None,
    };

    /// Who sent `request`, as the listener that took it established ([`unix_caller`],
    /// [`TcpCaller`]).
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .copied()
            .ok_or_else(|| {
                Status::unauthenticated("scoped cannot tell who is calling on this connection")
            })
    }

    pub fn is_root(&self) -> bool {
        self.uid == ROOT_UID
    }

    /// Whose sessions' data this caller may read: `None` for everyone's (root), `Some(uid)`
    /// for those its own uid owns.
    pub fn visible_owner(&self) -> Option<u32> {
        (!self.is_root()).then_some(self.uid)
    }

    /// Whether this caller may see and manage a session owned by `owner_uid`.
    pub fn owns(&self, owner_uid: u32) -> bool {
        self.is_root() || owner_uid == self.uid
    }

    /// Session `id`, owned by `owner_uid`, may be detached by this caller.
    pub fn check_session(&self, id: u64, owner_uid: u32) -> Result<(), ScopeError> {
        if self.owns(owner_uid) {
            Ok(())
        } else {
            Err(ScopeError::NotYourSession { id, uid: self.uid })
        }
    }

    /// This caller, holding `open` sessions, may start one more.
    pub fn check_session_limit(&self, open: usize, limit: usize) -> Result<(), ScopeError> {
        if self.is_root() || open < limit {
            Ok(())
        } else {
            Err(ScopeError::TooManySessions {
                uid: self.uid,
                limit,
            })
        }
    }

    /// This caller may trace `pid`; returns the process's credentials as checked (`None`
    /// for root, who is not checked).
    pub fn check_trace(&self, pid: u32) -> Result<Option<Credentials>, ScopeError> {
        if self.is_root() {
            return Ok(None);
        }
        may_trace(self.uid, pid).map(Some)
    }

    /// A non-root caller may have the daemon read only files it could read itself (owner or
    /// other read permission; groups are not considered).
    pub fn check_readable(&self, path: &Path) -> Result<(), ScopeError> {
        use std::os::unix::fs::MetadataExt;
        if self.is_root() {
            return Ok(());
        }
        let readable = std::fs::metadata(path).is_ok_and(|meta| {
            meta.mode() & 0o004 != 0 || (meta.uid() == self.uid && meta.mode() & 0o400 != 0)
        });
        if readable {
            Ok(())
        } else {
            Err(ScopeError::NotReadable {
                path: path.to_owned(),
                uid: self.uid,
            })
        }
    }

    /// A non-root caller's `--binary` must be a file the target maps: the daemon opens it as
    /// root, and must not parse (or say anything about) a file the caller could not read.
    pub fn check_binary(&self, pid: u32, binary: &Path) -> Result<(), ScopeError> {
        if self.is_root() {
            return Ok(());
        }
        let maps =
            ProcessMaps::read(pid).map_err(|source| ScopeError::ProcessMaps { pid, source })?;
        let mapped = maps.executable_modules(pid);
        let canonical = std::fs::canonicalize(binary).ok();
        let wanted = |path: &Path| path == binary || canonical.as_deref() == Some(path);
        if mapped.iter().any(|m| wanted(Path::new(&m.path))) {
            return Ok(());
        }
        Err(ScopeError::BinaryNotMapped {
            path: binary.to_owned(),
            pid,
            mapped: mapped
                .iter()
                .map(|m| m.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Whether `uid` (not root) could ptrace `pid`, by the kernel's own rule
/// (`__ptrace_may_access`): the process's real, effective and saved uids must all be `uid`,
/// and it must be dumpable. Gids are not compared: an exec or a call that changes a
/// process's gids also makes it undumpable (unless it explicitly asks to be dumpable again,
/// which it may do only for itself), and the daemon has no view of the caller's groups.
/// The Yama LSM's stricter `ptrace_scope` (descendants only) is not applied: a user may
/// trace any of its own processes.
pub fn may_trace(uid: u32, pid: u32) -> Result<Credentials, ScopeError> {
    let credentials = Credentials::read(pid).ok_or(ScopeError::NoSuchProcess { pid })?;
    let denied = |reason| ScopeError::NotTraceable { uid, pid, reason };
    let Credentials {
        uid: real,
        euid,
        suid,
        ..
    } = credentials;
    if [real, euid, suid] != [uid; 3] {
        return Err(denied(Denial::OtherUser {
            uid: real,
            euid,
            suid,
        }));
    }
    if credentials.proc_owner != euid {
        return Err(denied(Denial::NotDumpable));
    }
    Ok(credentials)
}

/// The unix socket's interceptor: the caller is the process at the other end, as the kernel
/// reports it (`SO_PEERCRED`, taken when it connected).
pub fn unix_caller(mut request: Request<()>) -> Result<Request<()>, Status> {
    let credentials = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| {
            Status::unauthenticated("the kernel did not say who is at the other end of the socket")
        })?;
    let caller = Caller {
        uid: credentials.uid(),
        pid: credentials.pid().and_then(|pid| u32::try_from(pid).ok()),
    };
    request.extensions_mut().insert(caller);
    Ok(request)
}

/// The TCP listener's interceptor. TLS (and, with `--client-ca`, the client's certificate)
/// was checked when the connection was made; this checks the bearer token, if one is
/// required, and makes the caller the uid TCP clients act as (`--listen-uid`).
#[derive(Clone)]
pub struct TcpCaller {
    /// The uid every authenticated TCP client acts as.
    pub uid: u32,
    /// The token clients must send as `authorization: Bearer TOKEN`, if any.
    pub token: Option<Arc<[u8]>>,
}

impl tonic::service::Interceptor for TcpCaller {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.token {
            let sent = request
                .metadata()
                .get("authorization")
                .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
            match sent {
                Some(sent) if constant_time_eq(sent, token) => {}
                Some(_) => return Err(Status::unauthenticated("the bearer token is not scoped's")),
                None => {
                    return Err(Status::unauthenticated(
                        "scoped needs a token on this listener: send `authorization: Bearer TOKEN` (scope --token-file FILE)",
                    ));
                }
            }
        }
        request.extensions_mut().insert(Caller {
            uid: self.uid,
            pid: None,
        });
        Ok(request)
    }
}

/// Compares two secrets in time that depends only on their lengths, not on where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: Caller = Caller {
        uid: 1000,
        pid: None,
    };

    #[test]
    fn root_sees_everything_others_their_own() {
        assert_eq!(Caller::DAEMON.visible_owner(), None);
        assert_eq!(USER.visible_owner(), Some(1000));
        assert!(Caller::DAEMON.owns(1000));
        assert!(USER.owns(1000));
        assert!(!USER.owns(0));
        assert!(!USER.owns(1001));
        assert!(matches!(
            USER.check_session(7, 0),
            Err(ScopeError::NotYourSession { id: 7, uid: 1000 })
        ));
    }

    #[test]
    fn the_session_limit_binds_all_but_root() {
        assert!(USER.check_session_limit(15, 16).is_ok());
        assert!(matches!(
            USER.check_session_limit(16, 16),
            Err(ScopeError::TooManySessions {
                uid: 1000,
                limit: 16
            })
        ));
        assert!(Caller::DAEMON.check_session_limit(1000, 16).is_ok());
    }

    #[test]
    fn a_user_may_not_trace_root_processes() {
        // pid 1 runs as root in every namespace these tests run in.
        let error = USER.check_trace(1).expect_err("pid 1 is root's");
        assert!(
            matches!(
                error,
                ScopeError::NotTraceable {
                    pid: 1,
                    uid: 1000,
                    reason: Denial::OtherUser { .. }
                }
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.starts_with("permission denied"), "{message}");
        assert!(message.contains("pid 1"), "{message}");
        assert!(matches!(
            USER.check_trace(u32::MAX),
            Err(ScopeError::NoSuchProcess { .. })
        ));
        assert_eq!(Caller::DAEMON.check_trace(1).expect("root may"), None);
    }

    #[test]
    fn a_process_may_be_traced_by_its_own_uid() {
        // This test process is its own uid's, and dumpable.
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let me = may_trace(uid, std::process::id()).expect("a process is traceable by its uid");
        assert_eq!(me.euid, uid);
    }

    #[test]
    fn tcp_callers_need_the_token_and_get_the_listener_uid() {
        use tonic::service::Interceptor;
        let mut tcp = TcpCaller {
            uid: 1000,
            token: Some(Arc::from(&b"s3cret"[..])),
        };
        let with = |value: Option<&str>| {
            let mut request = Request::new(());
            if let Some(value) = value {
                request
                    .metadata_mut()
                    .insert("authorization", value.parse().expect("ascii"));
            }
            request
        };
        let caller = tcp
            .call(with(Some("Bearer s3cret")))
            .expect("the token lets it in");
        assert_eq!(Caller::of(&caller).expect("a caller"), USER);
        for refused in [
            None,
            Some("Bearer s3cre"),
            Some("s3cret"),
            Some("Bearer s3cretX"),
        ] {
            let status = tcp.call(with(refused)).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
        let mut open = TcpCaller {
            uid: 0,
            token: None,
        };
        let request = open
            .call(with(None))
            .expect("certificate-only: no token needed");
        assert!(Caller::of(&request).expect("a caller").is_root());
        assert_eq!(
            Caller::of(&Request::new(()))
                .expect_err("no listener said")
                .code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(constant_time_eq(b"token", b"token"));
        assert!(!constant_time_eq(b"token", b"tokeN"));
        assert!(!constant_time_eq(b"token", b"token2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
