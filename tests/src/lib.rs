//! Harness for scope's end-to-end tests, demo and benchmarks: starts `scoped` on a private
//! socket, runs the `scope` CLI, builds and drives target programs.
//!
//! Everything here loads BPF through the real daemon and needs root. When BPF cannot be used
//! the harness **panics** with what is missing: a skipped privileged test would hide a broken
//! build (see ../shared/STYLE.md).
#![expect(
    clippy::unwrap_used,
    reason = "a test harness: a panic with its location is the report"
)]

pub mod bench;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The C client and server of the IPC tests and benchmark (TCP, unix socket, pipes).
pub const IPC_SOURCE: &str = include_str!("fixtures/ipc.c");

/// A program that calls `work` N times per stdin line (see the file).
pub const WORK_SOURCE: &str = include_str!("fixtures/work.c");

/// A directory of the running executable's build: `target/<profile>`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A workspace binary (`scoped`, `scope`) of the same build profile as the caller.
pub fn bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} is not built; run the suite with `cargo xtask test` (it builds every binary first)",
        path.display()
    );
    path
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A child process that is killed when dropped.
pub struct Proc {
    pub child: Child,
    name: String,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command) -> Proc {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        Proc {
            child,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        if self.wait_exit(Duration::from_secs(5)).is_none() {
            eprintln!("{} did not stop on SIGTERM; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `scoped` on a private socket.
pub struct Scoped {
    pub proc: Proc,
    pub socket: PathBuf,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Scoped {
    pub fn start() -> Scoped {
        Scoped::start_with(&[])
    }

    /// Starts scoped with extra arguments and waits until it answers `scope status`.
    pub fn start_with(args: &[&str]) -> Scoped {
        Scoped::start_wrapped(&[], args)
    }

    /// Starts scoped under a wrapper command (e.g. `ip netns exec NS`).
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Scoped {
        assert!(
            is_root(),
            "this test loads BPF programs through scoped and must run as root (CAP_BPF, CAP_PERFMON); run `sudo cargo xtask test`"
        );
        let dir = tempfile::Builder::new()
            .prefix("scoped-test")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("scoped.sock");
        let log = dir.path().join("scoped.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(bin("scoped"));
                command
            }
            None => Command::new(bin("scoped")),
        };
        let mut proc = Proc::spawn(
            "scoped",
            command
                .arg("--socket")
                .arg(&socket)
                .args(if args.contains(&"--db") {
                    None
                } else {
                    Some("--db")
                })
                .args((!args.contains(&"--db")).then(|| dir.path().join("scope.db")))
                .args(args)
                .env("SCOPED_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log_file),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = proc.child.try_wait().unwrap() {
                panic!(
                    "scoped exited with {status} before serving; BPF may be unusable here. Its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "scoped did not serve within 30 s. Its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
        Scoped {
            proc,
            socket,
            log,
            _dir: dir,
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lets users other than root reach the socket (its directory is root's alone while
    /// the daemon runs as tests start it): the socket's own mode and group decide, as under
    /// /run/scope. The store's file stays root's alone (scoped makes it 0600).
    pub fn open_to_users(&self) {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.socket.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }

    /// Runs `scope --socket S ARGS...` as `user`.
    pub fn scope_as(&self, user: &TestUser, args: &[&str]) -> Output {
        user.command(&bin("scope"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `scope` as `user` and returns stdout, panicking with stderr and the daemon log on
    /// failure.
    pub fn scope_as_ok(&self, user: &TestUser, args: &[&str]) -> String {
        let out = self.scope_as(user, args);
        assert!(
            out.status.success(),
            "scope {args:?} as {} failed ({}):\nstdout: {}\nstderr: {}\nscoped log:\n{}",
            user.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `scope ... --json` as `user` and parses its JSON Lines (or one document).
    pub fn json_lines_as(&self, user: &TestUser, args: &[&str]) -> Vec<Value> {
        self.scope_as_ok(user, args)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("invalid JSON line ({e}): {l}"))
            })
            .collect()
    }

    /// Runs `scope --socket S ARGS...`.
    pub fn scope(&self, args: &[&str]) -> Output {
        Command::new(bin("scope"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `scope` and returns stdout, panicking with stderr and the daemon log on failure.
    pub fn scope_ok(&self, args: &[&str]) -> String {
        let out = self.scope(args);
        assert!(
            out.status.success(),
            "scope {args:?} failed ({}):\nstdout: {}\nstderr: {}\nscoped log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `scope ... --json` and parses one JSON document.
    pub fn scope_json(&self, args: &[&str]) -> Value {
        let out = self.scope_ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("scope {args:?} printed invalid JSON ({e}):\n{out}"))
    }

    /// Runs `scope calls ... --json` and parses its JSON Lines.
    pub fn calls(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["calls", "--json", "--limit", "0"];
        all.extend_from_slice(args);
        self.scope_ok(&all)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("invalid JSON line ({e}): {l}"))
            })
            .collect()
    }

    /// Attaches and returns the session id.
    pub fn attach(&self, pid: u32, funcs: &[&str]) -> Value {
        let pid = pid.to_string();
        let mut args = vec!["attach", "--pid", &pid, "--json"];
        for func in funcs {
            args.extend_from_slice(&["--func", func]);
        }
        self.scope_json(&args)
    }

    pub fn status(&self) -> Value {
        self.scope_json(&["status", "--json"])
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Names of the BPF programs this daemon holds (by its fds, read in /proc/PID/fdinfo,
    /// named by bpftool: Debian's bpftool 7.1 does not show owning pids).
    pub fn program_names(&self) -> Vec<String> {
        self.bpf_programs(false)
    }

    /// Names of the programs of the BPF links this daemon holds, once per link (a program
    /// attached to three tracepoints is listed three times).
    pub fn linked_program_names(&self) -> Vec<String> {
        self.bpf_programs(true)
    }

    fn bpf_programs(&self, links: bool) -> Vec<String> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid()))
            .unwrap()
            .flatten()
        {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let is_link = info.lines().any(|l| l.starts_with("link_type:"));
            if is_link != links {
                continue;
            }
            if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) {
                ids.push(id.trim().parse::<u64>().unwrap());
            }
        }
        let out = Command::new("bpftool")
            .args(["-j", "prog", "show"])
            .output()
            .expect("bpftool lists BPF programs (installed by `cargo xtask setup`)");
        assert!(out.status.success(), "bpftool prog show failed");
        let all: Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: std::collections::HashMap<u64, String> = all
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_owned())))
            .collect();
        ids.iter().filter_map(|id| names.get(id).cloned()).collect()
    }

    /// Waits until the daemon has received at least `n` spans in total.
    pub fn wait_received(&self, n: u64, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            let received = status["spans_received"].as_u64().unwrap();
            if received >= n || Instant::now() > deadline {
                return status;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The status once every span the kernel emitted has been received and every received
    /// span is stored or counted as not stored (or `timeout` passed).
    pub fn settled_status(&self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            let count = |key: &str| status["counters"][key].as_u64().unwrap_or(0);
            let received = status["spans_received"].as_u64().unwrap_or(0);
            let settled = count("kernel.spans_emitted") == received
                && count("store.written") + count("store.queue_full") + count("store.write_failed")
                    == received;
            if settled || Instant::now() > deadline {
                return status;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the number of spans matching `args` stops changing (and is at least `min`).
    pub fn settled_calls(&self, args: &[&str], min: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = usize::MAX;
        loop {
            let calls = self.calls(args);
            if (calls.len() >= min && calls.len() == last) || Instant::now() > deadline {
                return calls;
            }
            last = calls.len();
            thread::sleep(Duration::from_millis(150));
        }
    }

    /// A gRPC client on the daemon's socket, for tests of the wire API itself.
    pub async fn client(
        &self,
    ) -> scope_proto::v1::scope_client::ScopeClient<tonic::transport::Channel> {
        scope_proto::v1::scope_client::ScopeClient::new(self.channel().await)
    }

    /// A gRPC channel to the daemon's socket.
    pub async fn channel(&self) -> tonic::transport::Channel {
        let socket = self.socket.clone();
        tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }
}

/// A user the test creates (not root), in the `scope` group so it may use scoped's socket,
/// and deletes when dropped (also when the test fails). Drop its processes first.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl TestUser {
    /// Creates user `scopetest-TAG-PID` (no home directory, no login shell) in the `scope`
    /// group.
    pub fn create(tag: &str) -> TestUser {
        TestUser::create_in(tag, Some("scope"))
    }

    /// Creates a user outside the `scope` group.
    pub fn create_outside_group(tag: &str) -> TestUser {
        TestUser::create_in(tag, None)
    }

    fn create_in(tag: &str, group: Option<&str>) -> TestUser {
        assert!(
            is_root(),
            "creating test users needs root: run `sudo cargo xtask test`"
        );
        let exists = Command::new("getent")
            .args(["group", "scope"])
            .output()
            .unwrap();
        assert!(
            exists.status.success(),
            "there is no group `scope` (scoped opens its socket to it); `cargo xtask setup` creates it"
        );
        let name = format!("scopetest-{tag}-{}", std::process::id());
        let _ = Command::new("userdel").arg(&name).output();
        let out = Command::new("useradd")
            .args([
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
            ])
            .args(group.map(|group| ["--groups", group]).into_iter().flatten())
            .arg(&name)
            .output()
            .unwrap_or_else(|e| {
                panic!("running useradd failed ({e}); `cargo xtask setup` installs it")
            });
        assert!(
            out.status.success(),
            "useradd {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let user = TestUser {
            uid: id("-u"),
            gid: id("-g"),
            name,
        };
        // Everything the user runs must be reachable by it.
        let scope = bin("scope");
        let out = user.command(&scope).arg("--version").output().unwrap();
        assert!(
            out.status.success(),
            "test user {} cannot run {}: every directory above it must be searchable by others (chmod o+x): {}",
            user.name,
            scope.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        user
    }

    /// A command that runs `program` as this user (its uid, gid and groups).
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid", &self.uid.to_string()])
            .args(["--regid", &self.gid.to_string()])
            .args(["--init-groups", "--"])
            .arg(program);
        command
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let out = Command::new("userdel")
            .args(["--force", &self.name])
            .output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "userdel {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(error) => eprintln!("running userdel {} failed: {error}", self.name),
        }
    }
}

/// A directory anyone may read and run files from (fixtures that test users run).
pub fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("scope-shared")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A target program that prints lines and reads commands on stdin.
pub struct Target {
    pub proc: Proc,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Target {
    pub fn spawn(name: &str, command: &mut Command) -> Target {
        let mut proc = Proc::spawn(name, command.stdin(Stdio::piped()).stdout(Stdio::piped()));
        let stdin = proc.child.stdin.take().unwrap();
        let stdout: ChildStdout = proc.child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Target { proc, stdin, lines }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits for a line starting with `prefix` and returns it.
    pub fn expect_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(e) => panic!("target did not print a line starting with {prefix:?} ({e})"),
            }
        }
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }
}

/// Compiles a fixture with `compiler` (gcc, g++, rustc) into `dir`.
pub fn compile(
    dir: &Path,
    compiler: &str,
    file_name: &str,
    source: &str,
    flags: &[&str],
) -> PathBuf {
    let src = dir.join(file_name);
    std::fs::write(&src, source).unwrap();
    let stem = Path::new(file_name).file_stem().unwrap().to_str().unwrap();
    let out = dir.join(stem);
    let output = Command::new(compiler)
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| {
            panic!("running {compiler} failed ({e}); install it with `cargo xtask setup`")
        });
    assert!(
        output.status.success(),
        "{compiler} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Builds a one-file Go program with the machine's `go` (Debian's golang-go) into `dir`,
/// offline and with its caches inside `dir`, so nothing outside the test is read or written.
pub fn go_build(dir: &Path, file_name: &str, source: &str) -> PathBuf {
    let src = dir.join(file_name);
    std::fs::write(&src, source).unwrap();
    let out = dir.join(Path::new(file_name).file_stem().unwrap());
    let output = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(&src)
        .current_dir(dir)
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        // One file, no module and no network: nothing to download.
        .env("GO111MODULE", "off")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "")
        .env("CGO_ENABLED", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!("running go failed ({e}); install golang-go with `cargo xtask setup`")
        });
    assert!(
        output.status.success(),
        "go build failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// The 1-based line of the first line in `source` containing `needle`.
pub fn line_of(source: &str, needle: &str) -> u32 {
    source
        .lines()
        .position(|l| l.contains(needle))
        .map(|i| i as u32 + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in source"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway `redis-server` (Debian's) on a free port.
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let proc = Proc::spawn(
            "redis-server",
            Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ])
                .stdout(Stdio::null()),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ping = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "ping"])
                .output();
            if ping.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("PONG")) {
                return Redis { proc, port };
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {port} (is it installed? `cargo xtask setup`)"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// A light, steady load: one client sending PING every `every` until the returned value
    /// is dropped (what a planner sees of a server that is up but not busy).
    pub fn trickle(&self, every: Duration) -> Trickle {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let port = self.port;
        let flag = std::sync::Arc::clone(&stop);
        let thread = thread::spawn(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let mut reply = [0u8; 64];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                stream.write_all(b"PING\r\n").unwrap();
                let n = stream.read(&mut reply).unwrap();
                assert!(
                    reply[..n].starts_with(b"+PONG"),
                    "redis answered PING with {:?}",
                    &reply[..n]
                );
                thread::sleep(every);
            }
        });
        Trickle {
            stop,
            thread: Some(thread),
        }
    }

    /// Runs redis-benchmark against this server.
    pub fn benchmark(&self, args: &[&str]) -> Output {
        Command::new("redis-benchmark")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .unwrap()
    }
}

/// The client [`Redis::trickle`] started; stops when dropped.
pub struct Trickle {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for Trickle {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A throwaway PostgreSQL server (Debian's), run as the `postgres` user on a unix socket in
/// its own temporary directory, with a pgbench database initialized at `scale`.
pub struct Postgres {
    pub proc: Proc,
    pub port: u16,
    /// Holds the data directory and the socket.
    pub dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Postgres {
    /// The newest installed server's bin directory (`/usr/lib/postgresql/N/bin`).
    pub fn bin_dir() -> PathBuf {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (`cargo xtask setup` installs it)")
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, path)| path.join("bin"))
            .expect("a PostgreSQL server under /usr/lib/postgresql")
    }

    fn as_postgres(command: &mut Command) -> &mut Command {
        use std::os::unix::process::CommandExt;
        let user = users_entry("postgres").expect("the postgres user (from Debian's postgresql)");
        command.uid(user.0).gid(user.1).env("PGUSER", "postgres")
    }

    /// Starts a server; `wrap` runs it under another program (e.g. `taskset -c 1`).
    pub fn start(scale: u32, wrap: &[&str]) -> Postgres {
        let bin = Self::bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("scope-pg")
            .tempdir_in("/tmp")
            .unwrap();
        let owner = users_entry("postgres").expect("the postgres user");
        std::os::unix::fs::chown(dir.path(), Some(owner.0), Some(owner.1)).unwrap();
        let data = dir.path().join("data");
        let initdb = Self::as_postgres(
            Command::new(bin.join("initdb"))
                .args([
                    "-D",
                    data.to_str().unwrap(),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                ])
                .stdout(Stdio::null()),
        )
        .output()
        .unwrap();
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let port = free_port();
        let mut command = Command::new(wrap.first().copied().unwrap_or("env"));
        command.args(wrap.iter().skip(1));
        command
            .arg(bin.join("postgres"))
            .args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
            .args([
                "-k",
                dir.path().to_str().unwrap(),
                "-c",
                "listen_addresses=",
            ])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let proc = Proc::spawn("postgres", Self::as_postgres(&mut command));
        let server = Postgres {
            proc,
            port,
            dir,
            bin,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !server.psql("select 1").status.success() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start on port {port}"
            );
            thread::sleep(Duration::from_millis(100));
        }
        let init = server.pgbench(&["-i", "-q", "-s", &scale.to_string()]);
        assert!(
            init.status.success(),
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        server
    }

    /// The postmaster: the process to attach to (it forks a backend per connection).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The `postgres` executable.
    pub fn executable(&self) -> PathBuf {
        self.bin.join("postgres")
    }

    fn client(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        command.args([
            "-h",
            self.dir.path().to_str().unwrap(),
            "-p",
            &self.port.to_string(),
        ]);
        Self::as_postgres(&mut command);
        command
    }

    pub fn psql(&self, sql: &str) -> Output {
        self.client("psql")
            .args(["-X", "-q", "-t", "-A", "-c", sql, "postgres"])
            .output()
            .unwrap()
    }

    /// Runs pgbench against the `postgres` database.
    pub fn pgbench(&self, args: &[&str]) -> Output {
        self.client("pgbench")
            .args(args)
            .arg("postgres")
            .output()
            .unwrap()
    }

    /// A pgbench command to spawn (e.g. to pin it).
    pub fn pgbench_command(&self, args: &[&str]) -> Command {
        let mut command = self.client("pgbench");
        command.args(args).arg("postgres");
        command
    }
}

/// (uid, gid) of a user from /etc/passwd.
pub fn users_entry(name: &str) -> Option<(u32, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name))
                .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
                .flatten()
        })
}

/// Reads `len` bytes of a process's memory at `address`.
pub fn read_memory(pid: u32, address: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut buf = vec![0; len];
    mem.read_exact_at(&mut buf, address).unwrap();
    buf
}

/// The runtime address of a function of a process's main executable, from its load base in
/// /proc/PID/maps and the function's ELF address (`nm`).
pub fn runtime_address(pid: u32, binary: &Path, symbol: &str) -> u64 {
    let nm = Command::new("nm").arg(binary).output().unwrap();
    let nm = String::from_utf8(nm.stdout).unwrap();
    let vaddr = nm
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            let (addr, _kind, name) = (parts.next()?, parts.next()?, parts.next()?);
            (name == symbol)
                .then(|| u64::from_str_radix(addr, 16).ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{symbol} not in nm output of {}", binary.display()));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let canonical = std::fs::canonicalize(binary).unwrap();
    let base = maps
        .lines()
        .find_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let path = fields.get(5)?;
            if Path::new(path) != canonical || fields[2] != "00000000" {
                return None;
            }
            u64::from_str_radix(fields[0].split('-').next()?, 16).ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "{} is not mapped at offset 0 in pid {pid}",
                binary.display()
            )
        });
    base + vaddr
}

/// A CPython whose `function__entry` USDT probe fires (Debian 11's 3.9, unpacked by
/// `cargo xtask setup` under `target/python3.9`): the interpreter and its `PYTHONHOME`.
/// Debian 12's own 3.11 never fires that probe (python/cpython#98894).
pub fn probed_python() -> (PathBuf, PathBuf) {
    let home = target_dir().parent().unwrap().join("python3.9").join("usr");
    let python = home.join("bin/python3.9");
    assert!(
        python.exists(),
        "{} is missing: `cargo xtask setup` unpacks it (the suite runs setup first)",
        python.display()
    );
    (python, home)
}

/// The `function` of each probe an attach (or a session of `scope sessions --json`) lists,
/// sorted.
pub fn probe_functions(session: &Value) -> Vec<String> {
    let mut functions: Vec<String> = session["probes"]
        .as_array()
        .unwrap_or_else(|| panic!("no probes in {session}"))
        .iter()
        .map(|p| p["function"].as_str().unwrap().to_owned())
        .collect();
    functions.sort_unstable();
    functions
}
