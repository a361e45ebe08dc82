//! Go programs. A uretprobe breaks them: the kernel swaps the return address on the goroutine's
//! stack for its trampoline, and Go's runtime, which reads those addresses to grow stacks and
//! to collect garbage, aborts ("unexpected return pc"). scope probes a Go function's entry
//! after its stack check and each of its RET instructions instead, and pairs them per
//! goroutine, which may block on one OS thread and return on another.
//!
//! `traced_go_functions_report_durations_and_the_program_runs_on` is privileged (root, BPF)
//! and builds its program with Debian's golang-go; the other test needs only `go`. Both fail,
//! never skip, when what they need is missing.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{collections::HashMap, path::Path, process::Command, time::Duration};

use scope_tests::{Scoped, Target, go_build};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(30);

/// How many goroutines run `handle`.
const GOROUTINES: u64 = 4;
/// What `grow(GROW_DEPTH)` returns: the sum of 1..=GROW_DEPTH.
const GROW_DEPTH: u64 = 8;
const SLEEP_MS: u64 = 20;

const SOURCE: &str = r#"package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"
)

//go:noinline
func leaf(n int) int {
	return n*2 + 1
}

// grow recurses with large frames: the goroutine's 8 KiB stack is copied to a bigger one
// while the calls above it are open.
//go:noinline
func grow(depth int) int {
	var pad [2048]byte
	pad[depth] = byte(depth)
	if depth == 0 {
		return 0
	}
	return grow(depth-1) + int(pad[depth])
}

// work runs the garbage collector, which walks every goroutine's stack, while it is open:
// with a uretprobe on it the runtime aborts.
//go:noinline
func work(n int) int {
	total := 0
	for i := 0; i < n; i++ {
		total += leaf(i)
	}
	total += grow(8)
	runtime.GC()
	return total
}

//go:noinline
func sleepy(ms int) int {
	time.Sleep(time.Duration(ms) * time.Millisecond)
	return ms
}

type move struct{ from, to int }

// wait blocks on the goroutine's channel, then naps until the goroutine runs on another OS
// thread than the one it called wait on: the call returns on another thread.
//go:noinline
func wait(id int, ch chan int, moved *move) int {
	from := syscall.Gettid()
	v := <-ch
	for tries := 0; syscall.Gettid() == from && tries < 2000; tries++ {
		time.Sleep(time.Millisecond)
	}
	*moved = move{from, syscall.Gettid()}
	return v + id
}

// blocked never returns: its call is still open when the program exits.
//go:noinline
func blocked(never chan int) int {
	return <-never
}

//go:noinline
func handle(id int, ch chan int, moved *move) int {
	return wait(id, ch, moved) + work(id) + sleepy(20)
}

func main() {
	const n = 4
	stdin := bufio.NewReader(os.Stdin)
	fmt.Println("ready")
	stdin.ReadString('\n')
	go blocked(make(chan int))
	chans := make([]chan int, n)
	moves := make([]move, n)
	results := make([]int, n)
	var wg sync.WaitGroup
	for g := 0; g < n; g++ {
		chans[g] = make(chan int)
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			results[g] = handle(g+1, chans[g], &moves[g])
		}(g)
	}
	time.Sleep(50 * time.Millisecond)
	for g := n - 1; g >= 0; g-- {
		chans[g] <- 100 * (g + 1)
	}
	wg.Wait()
	moved := 0
	for g, m := range moves {
		fmt.Printf("goroutine %d: thread %d to %d\n", g+1, m.from, m.to)
		if m.from != m.to {
			moved++
		}
	}
	fmt.Printf("moved %d of %d\n", moved, n)
	fmt.Println("results", results)
	stdin.ReadString('\n')
	fmt.Println("bye")
}
"#;

fn u64_of(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not an unsigned integer: {value}"))
}

/// What `handle(id)` returns: `wait` (100·id + id) + `work` (id² + grow) + `sleepy`.
fn handle_result(id: u64) -> u64 {
    101 * id + id * id + GROW_DEPTH * (GROW_DEPTH + 1) / 2 + SLEEP_MS
}

/// Builds the test program in `dir` and starts it, waiting for its `ready`; its stderr goes
/// to the returned file.
fn start_program(dir: &std::path::Path) -> (Target, std::path::PathBuf) {
    let binary = go_build(dir, "goprog.go", SOURCE);
    let stderr = dir.join("stderr");
    let target = Target::spawn(
        "goprog",
        Command::new(&binary)
            // Several Ps, so a woken goroutine has other threads to resume on.
            .env("GOMAXPROCS", "4")
            .stderr(std::fs::File::create(&stderr).unwrap()),
    );
    target.expect_line("ready", TIMEOUT);
    (target, stderr)
}

#[test]
fn traced_go_functions_report_durations_and_the_program_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let (mut target, stderr) = start_program(dir.path());
    let pid = target.pid();
    let functions = [
        "main.handle",
        "main.wait",
        "main.work",
        "main.leaf",
        "main.grow",
        "main.sleepy",
        "main.blocked",
    ];
    let session = scoped.attach(pid, &functions);
    assert_eq!(
        session["probes"].as_array().unwrap().len(),
        functions.len(),
        "{session}"
    );

    // The returns are uprobes in the entry link: no uretprobe link exists to break the program.
    let links = scoped.linked_program_names();
    assert!(
        links.iter().any(|name| name == "scope_entry"),
        "the entry link is attached: {links:?}"
    );
    assert!(
        !links.iter().any(|name| name == "scope_exit"),
        "no uretprobe link may be attached to a Go program: {links:?}"
    );

    target.send("go");
    // Which thread each goroutine's `wait` began and ended on.
    let mut moves: HashMap<u64, (u64, u64)> = HashMap::new();
    for _ in 0..GOROUTINES {
        let line = target.expect_line("goroutine ", TIMEOUT);
        let words: Vec<&str> = line.split_whitespace().collect();
        let [_, id, "thread", from, "to", to] = words.as_slice() else {
            panic!("unexpected line {line:?}");
        };
        moves.insert(
            id.trim_end_matches(':').parse().unwrap(),
            (from.parse().unwrap(), to.parse().unwrap()),
        );
    }
    assert_eq!(
        target.expect_line("moved ", TIMEOUT),
        format!("moved {GOROUTINES} of {GOROUTINES}"),
        "every goroutine returned from wait on another thread than it called it on: {moves:?}"
    );
    let results: Vec<String> = (1..=GOROUTINES)
        .map(|id| handle_result(id).to_string())
        .collect();
    assert_eq!(
        target.expect_line("results", TIMEOUT),
        format!("results [{}]", results.join(" "))
    );

    let leaf_calls: u64 = (1..=GOROUTINES).sum();
    // handle, wait, work and sleepy per goroutine, its leaf and grow calls; blocked has not
    // returned.
    let expected = 4 * GOROUTINES + leaf_calls + GOROUTINES * (GROW_DEPTH + 1);
    let spans = scoped.settled_calls(&["--pid", &pid.to_string()], expected as usize, TIMEOUT);
    let named = |name: &str| -> Vec<&Value> {
        spans
            .iter()
            .filter(|span| span["function"] == name)
            .collect()
    };
    let by_id: HashMap<u64, &Value> = spans
        .iter()
        .map(|span| (u64_of(&span["span_id"]), span))
        .collect();
    let parent = |span: &Value| -> &Value {
        by_id
            .get(&u64_of(&span["parent_id"]))
            .unwrap_or_else(|| panic!("the parent of {span} was not recorded"))
    };
    let within = |inner: &Value, outer: &Value| {
        u64_of(&inner["start_ns"]) >= u64_of(&outer["start_ns"])
            && u64_of(&inner["end_ns"]) <= u64_of(&outer["end_ns"])
    };
    assert_eq!(spans.len() as u64, expected, "{spans:#?}");
    for span in &spans {
        assert!(
            span["flags"].as_array().unwrap().is_empty(),
            "every call returned normally: {span}"
        );
    }

    let handles = named("main.handle");
    assert_eq!(handles.len() as u64, GOROUTINES);
    for handle in &handles {
        let id = u64_of(&handle["args"][0]);
        assert_eq!(u64_of(&handle["ret"]), handle_result(id), "{handle}");
        assert_eq!(u64_of(&handle["depth"]), 0, "{handle}");
        assert_eq!(u64_of(&handle["parent_id"]), 0, "{handle}");
    }
    let handle_of = |span: &Value| -> u64 {
        let mut at = span;
        while u64_of(&at["parent_id"]) != 0 {
            at = parent(at);
        }
        assert_eq!(
            at["function"], "main.handle",
            "{span} is inside a handle call"
        );
        u64_of(&at["args"][0])
    };

    // wait blocked on one thread and returned on another: the span is whole, its end on the
    // thread it returned on, nested in its goroutine's handle call.
    let waits = named("main.wait");
    assert_eq!(waits.len() as u64, GOROUTINES);
    for wait in &waits {
        let id = u64_of(&wait["args"][0]);
        let (from, to) = moves[&id];
        assert_ne!(from, to, "goroutine {id} moved");
        assert_eq!(
            u64_of(&wait["tid"]),
            to,
            "the span ends where it returned: {wait}"
        );
        assert_eq!(u64_of(&wait["ret"]), 101 * id, "{wait}");
        assert_eq!(handle_of(wait), id, "{wait}");
        assert_eq!(u64_of(&wait["depth"]), 1, "{wait}");
        assert!(within(wait, parent(wait)), "{wait}");
        // Blocked on its channel until main sent, 50 ms after starting the goroutines (a
        // lower bound that leaves room for a goroutine that started late on a busy machine).
        assert!(
            u64_of(&wait["duration_ns"]) >= 10_000_000,
            "wait blocked on its channel: {wait}"
        );
    }

    let sleeps = named("main.sleepy");
    assert_eq!(sleeps.len() as u64, GOROUTINES);
    for sleep in &sleeps {
        assert_eq!(u64_of(&sleep["args"][0]), SLEEP_MS, "{sleep}");
        assert_eq!(u64_of(&sleep["ret"]), SLEEP_MS, "{sleep}");
        let duration = u64_of(&sleep["duration_ns"]);
        assert!(
            (SLEEP_MS * 1_000_000..2_000_000_000).contains(&duration),
            "sleepy(20) took at least 20 ms: {sleep}"
        );
        assert_eq!(parent(sleep)["function"], "main.handle", "{sleep}");
        assert!(within(sleep, parent(sleep)), "{sleep}");
    }

    let works = named("main.work");
    assert_eq!(works.len() as u64, GOROUTINES);
    for work in &works {
        let n = u64_of(&work["args"][0]);
        assert_eq!(handle_of(work), n, "{work}");
        assert_eq!(parent(work)["function"], "main.handle", "{work}");
        assert_eq!(
            u64_of(&work["ret"]),
            n * n + GROW_DEPTH * (GROW_DEPTH + 1) / 2,
            "{work}"
        );
        assert!(within(work, parent(work)), "{work}");
    }

    let leaves = named("main.leaf");
    assert_eq!(leaves.len() as u64, leaf_calls);
    for leaf in &leaves {
        assert_eq!(parent(leaf)["function"], "main.work", "{leaf}");
        assert_eq!(
            u64_of(&leaf["ret"]),
            2 * u64_of(&leaf["args"][0]) + 1,
            "{leaf}"
        );
        assert!(within(leaf, parent(leaf)), "{leaf}");
    }

    // grow's recursion outgrows the goroutine's stack, which Go copies elsewhere while the
    // calls are open: they still pair, each nested in the one that called it.
    let grows = named("main.grow");
    assert_eq!(grows.len() as u64, GOROUTINES * (GROW_DEPTH + 1));
    for grow in &grows {
        let depth = u64_of(&grow["args"][0]);
        let up = parent(grow);
        if depth == GROW_DEPTH {
            assert_eq!(up["function"], "main.work", "{grow}");
        } else {
            assert_eq!(up["function"], "main.grow", "{grow}");
            assert_eq!(u64_of(&up["args"][0]), depth + 1, "{grow}");
        }
        assert_eq!(u64_of(&grow["depth"]), u64_of(&up["depth"]) + 1, "{grow}");
        assert_eq!(u64_of(&grow["ret"]), depth * (depth + 1) / 2, "{grow}");
        assert!(within(grow, up), "{grow}");
    }

    // Every call accounted for: all of them became spans but the one still open; no return
    // went unpaired.
    let sessions = scoped.scope_json(&["sessions", "--json"]);
    for probe in sessions["sessions"][0]["probes"].as_array().unwrap() {
        let function = probe["function"].as_str().unwrap();
        let open = u64::from(function == "main.blocked");
        assert_eq!(
            u64_of(&probe["calls"]),
            named(function).len() as u64 + open,
            "{probe}"
        );
        assert_eq!(u64_of(&probe["spans_dropped"]), 0, "{probe}");
    }
    let status = scoped.settled_status(TIMEOUT);
    for counter in [
        "kernel.unmatched_exit",
        "kernel.abandoned",
        "kernel.unfinished",
        "kernel.depth_overflow",
        "kernel.stack_map_full",
    ] {
        assert_eq!(
            u64_of(&status["counters"][counter]),
            0,
            "{counter}: {status}"
        );
    }

    target.send("exit");
    assert_eq!(target.expect_line("bye", TIMEOUT), "bye");
    let exit = target
        .proc
        .wait_exit(TIMEOUT)
        .expect("the Go program exits");
    let errors = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        exit.success() && errors.is_empty(),
        "the traced Go program ran to its end: {exit}, stderr:\n{errors}"
    );

    // The call still open when the process exited is reported, as a thread's would be.
    let blocked = scoped.settled_calls(
        &["--pid", &pid.to_string(), "--func", "main.blocked"],
        1,
        TIMEOUT,
    );
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(
        blocked[0]["flags"],
        serde_json::json!(["thread_exited"]),
        "{}",
        blocked[0]
    );
    assert_eq!(u64_of(&blocked[0]["depth"]), 0, "{}", blocked[0]);
}

/// The RET instructions and post-stack-check entries scope finds agree with Go's own
/// disassembler, and every function of a Go binary (its runtime's assembly included) decodes.
#[test]
fn go_probe_points_agree_with_go_tool_objdump() {
    let dir = tempfile::tempdir().unwrap();
    let binary = go_build(dir.path(), "goprog.go", SOURCE);
    let symbolizer = scope_symbolizer::Symbolizer::new();
    let module = symbolizer.module(&binary).unwrap();
    assert!(module.facts().go, "{:?}", module.facts());

    let mut decoded = 0;
    // Markers such as runtime.etext have no size: there is nothing to decode.
    for function in module.functions().iter().filter(|f| f.size > 0) {
        if let Err(error) = module.go_probe_points(function) {
            panic!("{} does not decode: {error}", function.symbol);
        }
        decoded += 1;
    }
    assert!(decoded > 1000, "the runtime's functions too: {decoded}");

    for name in [
        "main.handle",
        "main.wait",
        "main.work",
        "main.leaf",
        "main.grow",
    ] {
        let function = module
            .functions()
            .iter()
            .find(|f| f.symbol == name)
            .unwrap();
        let points = module.go_probe_points(function).unwrap();
        let (entry, returns) = objdump(&binary, name);
        assert_eq!(points.returns, returns, "{name}");
        assert!(!returns.is_empty(), "{name}");
        assert_eq!(points.entry, entry.unwrap_or(function.address), "{name}");
    }
}

/// From `go tool objdump -s '^NAME$'`: the address after the stack check's `JBE` (when the
/// function starts with `CMPQ 0x10(R14), ...`), and the addresses of its `RET`s.
fn objdump(binary: &Path, name: &str) -> (Option<u64>, Vec<u64>) {
    let out = Command::new("go")
        .args(["tool", "objdump", "-s"])
        .arg(format!("^{}$", name.replace('.', "\\.")))
        .arg(binary)
        .output()
        .expect("go tool objdump runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "  goprog.go:14\t\t0x482e00\t\t488d0400\t\tLEAQ 0(AX)(AX*1), AX\t"
    let instructions: Vec<(u64, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('\t').filter(|f| !f.is_empty()).collect();
            let address =
                u64::from_str_radix(fields.get(1)?.trim().strip_prefix("0x")?, 16).ok()?;
            Some((address, fields.get(3)?.trim().to_owned()))
        })
        .collect();
    assert!(!instructions.is_empty(), "objdump shows {name}");
    let entry = instructions
        .iter()
        .take(4)
        .position(|(_, text)| text.starts_with("CMPQ 0x10(R14)"))
        .and_then(|check| instructions.get(check + 2))
        .map(|(address, _)| *address);
    let returns = instructions
        .iter()
        .filter(|(_, text)| text == "RET")
        .map(|(address, _)| *address)
        .collect();
    (entry, returns)
}

/// Two sessions tracing the same Go functions put two uprobes on each RET: each session still
/// gets every call, paired with its own entry.
#[test]
fn two_sessions_on_one_go_function_each_get_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scoped::start();
    let (mut target, stderr) = start_program(dir.path());
    let pid = target.pid();
    let sessions: Vec<String> = (0..2)
        .map(|_| {
            scoped.attach(pid, &["main.leaf", "main.sleepy"])["session_id"]
                .as_u64()
                .unwrap()
                .to_string()
        })
        .collect();
    target.send("go");
    target.expect_line("results", TIMEOUT);
    let leaf_calls: u64 = (1..=GOROUTINES).sum();
    for session in &sessions {
        let spans = scoped.settled_calls(
            &["--session", session],
            (leaf_calls + GOROUTINES) as usize,
            TIMEOUT,
        );
        assert_eq!(
            spans.len() as u64,
            leaf_calls + GOROUTINES,
            "session {session}: {spans:#?}"
        );
        for span in &spans {
            assert!(span["flags"].as_array().unwrap().is_empty(), "{span}");
            let arg = u64_of(&span["args"][0]);
            if span["function"] == "main.sleepy" {
                assert_eq!(u64_of(&span["ret"]), SLEEP_MS, "{span}");
                assert!(
                    u64_of(&span["duration_ns"]) >= SLEEP_MS * 1_000_000,
                    "{span}"
                );
            } else {
                assert_eq!(u64_of(&span["ret"]), 2 * arg + 1, "{span}");
            }
        }
    }
    let status = scoped.settled_status(TIMEOUT);
    for counter in ["kernel.unmatched_exit", "kernel.abandoned"] {
        assert_eq!(
            u64_of(&status["counters"][counter]),
            0,
            "{counter}: {status}"
        );
    }
    assert_eq!(u64_of(&status["spans_dropped"]), 0, "{status}");
    target.send("exit");
    target.expect_line("bye", TIMEOUT);
    let exit = target
        .proc
        .wait_exit(TIMEOUT)
        .expect("the Go program exits");
    let errors = std::fs::read_to_string(&stderr).unwrap();
    assert!(exit.success() && errors.is_empty(), "{exit}:\n{errors}");
}
