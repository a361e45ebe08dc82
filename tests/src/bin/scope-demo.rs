//! `cargo xtask demo` runs this: start scoped, trace a real redis-server while
//! redis-benchmark drives it, print what scope saw, stop everything.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context, bail};
use scope_tests::{Redis, Scoped, bin, is_root};

fn main() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs: run it as root");
    }
    let scoped = Scoped::start();
    println!("== scoped is serving on {}", scoped.socket.display());
    let redis = Redis::start();
    let pid = redis.pid().to_string();
    println!(
        "== redis-server (Debian's, pid {pid}, port {}): tracing processCommand and call for 3 s while redis-benchmark runs\n",
        redis.port
    );

    let port = redis.port.to_string();
    let benchmark = thread::spawn(move || {
        thread::sleep(Duration::from_millis(700));
        Command::new("redis-benchmark")
            .args(["-p", &port, "-n", "200", "-c", "1", "-t", "set,get", "-q"])
            .stdout(Stdio::null())
            .status()
    });
    let trace = Command::new(bin("scope"))
        .arg("--socket")
        .arg(&scoped.socket)
        .args([
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
    if !trace.status.success() {
        bail!(
            "scope trace failed: {}",
            String::from_utf8_lossy(&trace.stderr)
        );
    }
    let out = String::from_utf8_lossy(&trace.stdout);
    let lines: Vec<&str> = out.lines().collect();
    for line in lines.iter().take(16) {
        println!("{line}");
    }
    if lines.len() > 20 {
        println!("   ... {} more lines ...", lines.len() - 19);
        for line in &lines[lines.len() - 3..] {
            println!("{line}");
        }
    }

    println!("\n== the 6 most recent stored calls: scope calls --pid {pid} --limit 6");
    print!(
        "{}",
        scoped.scope_ok(&["calls", "--pid", &pid, "--limit", "6"])
    );
    println!("\n== scope status");
    print!("{}", scoped.scope_ok(&["status"]));
    Ok(())
}
