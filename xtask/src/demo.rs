//! `cargo xtask demo`: start scoped, trace a real redis-server while redis-benchmark drives
//! it, print what scope saw, stop everything.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{root, run, setup::is_root};

/// A child process killed (SIGTERM, then SIGKILL) when dropped.
pub struct Guard {
    pub child: Child,
    name: &'static str,
}

impl Guard {
    pub fn spawn(name: &'static str, command: &mut Command) -> anyhow::Result<Guard> {
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        Ok(Guard { child, name })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("xtask: {} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn release_binary(name: &str) -> PathBuf {
    root().join("target/release").join(name)
}

/// Starts scoped on `socket` and waits until it answers.
pub fn start_scoped(socket: &Path, extra: &[&str]) -> anyhow::Result<Guard> {
    let guard = Guard::spawn(
        "scoped",
        Command::new(release_binary("scoped"))
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .env("SCOPED_LOG", "warn"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let status = Command::new(release_binary("scope"))
            .arg("--socket")
            .arg(socket)
            .arg("status")
            .output();
        if status.is_ok_and(|out| out.status.success()) {
            return Ok(guard);
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "scoped did not start serving on {} within 20 s",
        socket.display()
    )
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts a throwaway redis-server on `port` and waits until it answers PING.
pub fn start_redis(port: u16) -> anyhow::Result<Guard> {
    let guard = Guard::spawn(
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
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ping = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output();
        if ping.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("PONG")) {
            return Ok(guard);
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server did not answer on port {port}")
}

pub fn demo() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs: run it as root");
    }
    let dir = std::env::temp_dir().join(format!("scope-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("scoped.sock");
    let scope = |args: &[&str]| {
        let mut command = Command::new(release_binary("scope"));
        command.arg("--socket").arg(&socket).args(args);
        command
    };

    println!("== starting scoped on {}", socket.display());
    let _scoped = start_scoped(&socket, &[])?;
    let port = free_port()?;
    let redis = start_redis(port)?;
    let pid = redis.pid().to_string();
    println!(
        "== redis-server pid {pid} on port {port}; tracing processCommand and call for 3 s under redis-benchmark"
    );

    let benchmark = thread::spawn(move || {
        thread::sleep(Duration::from_millis(800));
        Command::new("redis-benchmark")
            .args([
                "-p",
                &port.to_string(),
                "-n",
                "300",
                "-c",
                "2",
                "-t",
                "set,get",
                "-q",
            ])
            .stdout(Stdio::null())
            .status()
    });
    let trace = scope(&[
        "trace",
        "--pid",
        &pid,
        "--func",
        "processCommand",
        "--func",
        "call",
        "--duration",
        "3s",
    ])
    .output()
    .context("running scope trace")?;
    let _ = benchmark.join();
    let trace_out = String::from_utf8_lossy(&trace.stdout);
    let lines: Vec<&str> = trace_out.lines().collect();
    for line in lines.iter().take(24) {
        println!("{line}");
    }
    if lines.len() > 30 {
        println!("   ... ({} lines in all) ...", lines.len());
        for line in &lines[lines.len() - 4..] {
            println!("{line}");
        }
    }
    if !trace.status.success() {
        bail!(
            "scope trace failed: {}",
            String::from_utf8_lossy(&trace.stderr)
        );
    }

    println!("\n== the last 5 stored calls (scope calls --limit 5)");
    run(&mut scope(&["calls", "--pid", &pid, "--limit", "5"]))?;
    println!("\n== scope status");
    run(&mut scope(&["status"]))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
