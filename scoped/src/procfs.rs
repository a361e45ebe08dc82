//! What `/proc` says about a process: whether it exists, its name, executable and start time
//! (the start time tells a reused pid from the process we attached to).

use std::{fs, path::PathBuf};

/// Identity and names of a live process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub exe: PathBuf,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
}

/// Unix time of boot, in nanoseconds (`btime` of /proc/stat).
fn boot_unix_ns() -> u64 {
    static BOOT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                stat.lines()
                    .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
            .saturating_mul(1_000_000_000)
    })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

impl ProcessInfo {
    /// Reads the process, or `None` if it does not exist (or is a zombie with no memory map).
    pub fn read(pid: u32) -> Option<ProcessInfo> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let start_time = parse_start_time(&stat)?;
        let comm = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|comm| comm.trim_end().to_owned())
            .unwrap_or_default();
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        Some(ProcessInfo {
            pid,
            comm,
            exe,
            start_time,
        })
    }

    /// When the process started, as Unix nanoseconds (at clock-tick resolution). With the
    /// pid, it names the process: a reused pid starts later.
    pub fn start_unix_ns(&self) -> u64 {
        boot_unix_ns() + self.start_time * (1_000_000_000 / ticks_per_second())
    }

    /// The parent's pid (field 4 of /proc/PID/stat), if the process still exists.
    pub fn parent_pid(&self) -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Whether the same process (not a reused pid) is still alive.
    pub fn is_alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(parse_start_time(&stat)? == self.start_time && state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    }
}

/// Field 22 of /proc/PID/stat. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted after the last ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 200";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn reads_this_process() {
        let me = ProcessInfo::read(std::process::id()).expect("this process exists");
        assert!(me.start_time > 0);
        assert!(me.is_alive());
        assert!(!me.comm.is_empty());
        let reused = ProcessInfo {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!reused.is_alive());
    }

    #[test]
    fn missing_pid() {
        assert_eq!(ProcessInfo::read(u32::MAX), None);
    }
}
