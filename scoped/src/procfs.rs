//! What `/proc` says about a process: whether it exists, its name, executable and start time
//! (the start time tells a reused pid from the process we attached to), and whose it is.

use std::{fs, os::unix::fs::MetadataExt, path::PathBuf};

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

/// Whose a process is, as far as the ptrace rules care (see `access.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// Real, effective and saved user ids (`Uid:` of /proc/PID/status).
    pub uid: u32,
    pub euid: u32,
    pub suid: u32,
    /// The owner of /proc/PID/status. The kernel gives the files under /proc/PID the
    /// process's effective uid while the process is dumpable and root otherwise
    /// (`task_dump_owner`; the /proc/PID directory itself keeps the effective uid): a setuid,
    /// setgid or file-capability exec, a change of credentials, or
    /// `prctl(PR_SET_DUMPABLE, 0)` makes them root's.
    pub proc_owner: u32,
    /// The process's start time (field 22 of /proc/PID/stat): which process these are, if
    /// the pid is reused.
    pub start_time: u64,
}

impl Credentials {
    /// Reads them, or `None` if the process does not exist.
    pub fn read(pid: u32) -> Option<Credentials> {
        let path = format!("/proc/{pid}/status");
        let before = fs::metadata(&path).ok()?.uid();
        let start_time = parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
        let [uid, euid, suid] = parse_uids(&fs::read_to_string(&path).ok()?)?;
        // Again after reading: credentials that changed in between count as root's.
        let after = fs::metadata(&path).ok()?.uid();
        Some(Credentials {
            uid,
            euid,
            suid,
            proc_owner: if after == before { after } else { 0 },
            start_time,
        })
    }
}

/// Real, effective and saved uid from the `Uid:` line of /proc/PID/status.
fn parse_uids(status: &str) -> Option<[u32; 3]> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|id| id.parse::<u32>().ok());
    Some([ids.next()??, ids.next()??, ids.next()??])
}

/// Field 22 of /proc/PID/stat. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted after the last ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Adds `delta` to the 2-byte counter at `address` in process `pid` (a USDT semaphore),
/// through `/proc/PID/mem`.
pub fn add_u16(pid: u32, address: u64, delta: i16) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mem = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))?;
    let mut value = [0u8; 2];
    mem.read_exact_at(&mut value, address)?;
    let counter = u16::from_ne_bytes(value).wrapping_add_signed(delta);
    mem.write_all_at(&counter.to_ne_bytes(), address)
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
        assert_eq!(Credentials::read(u32::MAX), None);
    }

    #[test]
    fn uids_come_from_the_status_file() {
        let status = "Name:\tsu\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_uids(status), Some([1000, 0, 0]));
        assert_eq!(parse_uids("Name:\tx\n"), None);
        assert_eq!(parse_uids("Uid:\t1000\n"), None);
    }

    #[test]
    fn reads_this_process_credentials() {
        let me = Credentials::read(std::process::id()).expect("this process exists");
        // SAFETY: getuid and geteuid have no preconditions.
        let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
        assert_eq!((me.uid, me.euid), (uid, euid));
        assert_eq!(
            me.start_time,
            ProcessInfo::read(std::process::id())
                .expect("exists")
                .start_time
        );
    }
}
