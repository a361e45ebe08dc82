//! Loads scope's eBPF object, creates the per-CPU span rings, and attaches the always-on
//! lifecycle tracepoints. The probe manager attaches uprobes through [`Kernel`]; the reader
//! owns the [`Rings`].

use std::{num::NonZeroU32, path::Path, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray, PerCpuValues, RingBuf},
    programs::{
        RawTracePoint, TracePoint, UProbe,
        trace_point::TracePointLink,
        uprobe::{UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use scope_common::{
    Counter, GoroutineKey, KernelOffsets, MAX_CPUS, MAX_PROBES, ProbeControl, ProbeCounters,
    Target, ThreadStack, UsdtSpec, globals, maps, programs,
};

use crate::error::ScopeError;

/// The eBPF object built by `cargo xtask build-ebpf`; `build.rs` refuses to build without it.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("SCOPE_EBPF_OBJECT"));

/// Default size of each CPU's span ring: 32,768 spans of 128 bytes before the reader must
/// have caught up.
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;

/// Default number of probe slots (functions traced at once across all sessions).
pub const DEFAULT_MAX_PROBES: u32 = 8192;

/// What the daemon was asked to create.
#[derive(Clone, Copy, Debug)]
pub struct KernelConfig {
    pub ring_bytes: u32,
    pub max_probes: u32,
    /// Follow reads and writes on pipes and sockets (the syscall tracepoints). Off, every
    /// read and write on the machine is spared a tracepoint, and requests are not linked
    /// across processes.
    pub io_capture: bool,
}

/// Why loading failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "loading scope's eBPF object failed (scoped needs root, or CAP_BPF + CAP_PERFMON + CAP_SYS_RESOURCE)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name}; rebuild it with `cargo xtask build-ebpf`")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("{name}: wrong type in the eBPF object")]
    WrongType {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading program {name} into the kernel failed")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "attaching {name} to tracepoint {category}:{tracepoint} failed (is tracefs mounted at /sys/kernel/tracing?)"
    )]
    Tracepoint {
        name: &'static str,
        category: &'static str,
        tracepoint: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error(
        "creating the {bytes}-byte span ring of cpu {cpu} failed (--ring-bytes must be a power of two and a multiple of the page size)"
    )]
    Ring {
        cpu: u32,
        bytes: u32,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("this machine has {cpus} possible CPUs; scope handles at most {max}")]
    TooManyCpus { cpus: u32, max: u32 },
    #[error("--max-probes {requested} is out of range 1..={max}")]
    MaxProbes { requested: u32, max: u32 },
    #[error("looking up kernel struct layouts")]
    Btf(#[from] crate::btf::BtfError),
    #[error("counting CPUs failed ({path})")]
    Cpus {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One ring buffer per possible CPU, read by the reader thread.
pub struct Rings {
    pub rings: Vec<RingBuf<MapData>>,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// The loaded object: programs to attach and maps the daemon reads or updates.
pub struct Kernel {
    ebpf: Ebpf,
    targets: HashMap<MapData, u32, Target>,
    go_stacks: HashMap<MapData, GoroutineKey, ThreadStack>,
    counters: PerCpuArray<MapData, u64>,
    probe_counters: PerCpuArray<MapData, ProbeCounters>,
    probe_control: Array<MapData, ProbeControl>,
    usdt_args: Array<MapData, UsdtSpec>,
    cpus: u32,
    config: KernelConfig,
    /// The syscall tracepoints of IO capture while attached: only while some process is
    /// traced, so an idle daemon costs other processes' reads and writes nothing.
    io_links: Vec<(&'static str, TracePointLink)>,
}

/// The IO capture programs and the syscall tracepoints each serves.
const IO_PROGRAMS: [(&str, &[&str]); 3] = [
    (
        programs::IO_ENTER_WRITE,
        &["sys_enter_write", "sys_enter_writev", "sys_enter_sendto"],
    ),
    (
        programs::IO_ENTER_READ,
        &["sys_enter_read", "sys_enter_readv", "sys_enter_recvfrom"],
    ),
    (
        programs::IO_EXIT,
        &[
            "sys_exit_write",
            "sys_exit_writev",
            "sys_exit_sendto",
            "sys_exit_read",
            "sys_exit_readv",
            "sys_exit_recvfrom",
        ],
    ),
];

/// Which pair of programs a probe uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramPair {
    /// The real entry/exit pairing programs.
    Scope,
    /// Programs that return at once: the cost floor, for benchmarks.
    Null,
}

impl ProgramPair {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            ProgramPair::Scope => (programs::ENTRY, programs::EXIT),
            ProgramPair::Null => (programs::NULL_ENTRY, programs::NULL_EXIT),
        }
    }
}

impl Kernel {
    /// Loads the object and creates everything. Needs root.
    pub fn load(config: KernelConfig) -> Result<(Kernel, Rings), LoadError> {
        if config.max_probes == 0 || config.max_probes > MAX_PROBES {
            return Err(LoadError::MaxProbes {
                requested: config.max_probes,
                max: MAX_PROBES,
            });
        }
        let cpus =
            aya::util::nr_cpus().map_err(|(path, source)| LoadError::Cpus { path, source })?;
        let cpus = NonZeroU32::get(cpus);
        if cpus > MAX_CPUS {
            return Err(LoadError::TooManyCpus {
                cpus,
                max: MAX_CPUS,
            });
        }
        let offsets = kernel_offsets()?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::PROBE_COUNTERS, config.max_probes)
            .map_max_entries(maps::PROBE_CONTROL, config.max_probes)
            .map_max_entries(maps::USDT_ARGS, config.max_probes)
            .override_global(globals::OFFSETS, &offsets, true)
            .load(OBJECT)
            .map_err(LoadError::Load)?;

        // Diagnostics the programs write with aya-log end up in our log. Keep the logger alive:
        // dropping it closes the log map (see ../shared/TOOLCHAIN.md).
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                tracing::warn!(%error, "eBPF-side logging is unavailable");
                None
            }
        };

        let mut ring_slots: ArrayOfMaps<MapData, RingBuf<MapData>> =
            take_map(&mut ebpf, maps::RINGS)?;
        let mut rings = Vec::with_capacity(cpus as usize);
        for cpu in 0..cpus {
            let ring = RingBuf::create(config.ring_bytes, 0).map_err(|source| LoadError::Ring {
                cpu,
                bytes: config.ring_bytes,
                source,
            })?;
            ring_slots
                .set(cpu, &ring, 0)
                .map_err(|source| LoadError::Ring {
                    cpu,
                    bytes: config.ring_bytes,
                    source,
                })?;
            rings.push(ring);
        }

        for name in [
            programs::ENTRY,
            programs::EXIT,
            programs::NULL_ENTRY,
            programs::NULL_EXIT,
        ] {
            program_mut::<UProbe>(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program {
                    name,
                    source: Box::new(source),
                })?;
        }
        for (name, category, tracepoint) in [
            (programs::THREAD_EXIT, "sched", "sched_process_exit"),
            (programs::EXEC, "sched", "sched_process_exec"),
        ] {
            let program = program_mut::<TracePoint>(&mut ebpf, name)?;
            program.load().map_err(|source| LoadError::Program {
                name,
                source: Box::new(source),
            })?;
            program
                .attach(category, tracepoint)
                .map_err(|source| LoadError::Tracepoint {
                    name,
                    category,
                    tracepoint,
                    source: Box::new(source),
                })?;
        }

        // Reads and writes of traced threads on pipes and sockets, for causality across
        // threads, processes and hosts. Loaded now; attached while some process is traced.
        if config.io_capture {
            for (name, _) in IO_PROGRAMS {
                program_mut::<TracePoint>(&mut ebpf, name)?
                    .load()
                    .map_err(|source| LoadError::Program {
                        name,
                        source: Box::new(source),
                    })?;
            }
        }
        for (name, tracepoint) in [
            (programs::FORK, "sched_process_fork"),
            (programs::WAKEUP, "sched_waking"),
        ] {
            let program = program_mut::<RawTracePoint>(&mut ebpf, name)?;
            program.load().map_err(|source| LoadError::Program {
                name,
                source: Box::new(source),
            })?;
            program
                .attach(tracepoint)
                .map_err(|source| LoadError::Tracepoint {
                    name,
                    category: "raw",
                    tracepoint,
                    source: Box::new(source),
                })?;
        }

        let mut kernel = Kernel {
            targets: take_map(&mut ebpf, maps::TARGETS)?,
            go_stacks: take_map(&mut ebpf, maps::GO_STACKS)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            probe_counters: take_map(&mut ebpf, maps::PROBE_COUNTERS)?,
            probe_control: take_map(&mut ebpf, maps::PROBE_CONTROL)?,
            usdt_args: take_map(&mut ebpf, maps::USDT_ARGS)?,
            ebpf,
            cpus,
            config,
            io_links: Vec::new(),
        };
        // Attach once to find out now, not at the first attach, if the tracepoints are there.
        kernel.capture_io(true)?;
        kernel.capture_io(false)?;
        Ok((kernel, Rings { rings, logger }))
    }

    pub fn cpus(&self) -> u32 {
        self.cpus
    }

    pub fn config(&self) -> KernelConfig {
        self.config
    }

    /// Attaches `pair` to `points` of the ELF file at `path`, for process `pid` only. Returns
    /// the entry link and, when any point needs an exit, the exit link; dropping a link
    /// detaches it.
    pub fn attach(
        &mut self,
        pair: ProgramPair,
        path: &Path,
        pid: u32,
        entry_points: &[(u64, u64)],
        exit_points: &[(u64, u64)],
    ) -> Result<Vec<UProbeLink>, aya::programs::ProgramError> {
        let scope = match NonZeroU32::new(pid) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let (entry_name, exit_name) = pair.names();
        let mut links = Vec::with_capacity(2);
        // Exits first: a call that enters while only one of the links exists then has its
        // entry unseen (its exit is counted unmatched), never its exit unseen, which would
        // leave its frame open until it is wrongly reported abandoned.
        for (name, points) in [(exit_name, exit_points), (entry_name, entry_points)] {
            if points.is_empty() {
                continue;
            }
            let program: &mut UProbe = self
                .ebpf
                .program_mut(name)
                .ok_or(aya::programs::ProgramError::NotLoaded)?
                .try_into()?;
            let points = points.iter().map(|&(offset, cookie)| UProbeAttachPoint {
                location: offset.into(),
                cookie: Some(cookie),
            });
            let link_id = program.attach(points, path, scope)?;
            links.push(program.take_link(link_id)?);
        }
        Ok(links)
    }

    /// Attaches (or detaches) the syscall tracepoints of IO capture; does nothing when they
    /// already are, or when capture is off (`--no-io-capture`).
    pub fn capture_io(&mut self, on: bool) -> Result<(), LoadError> {
        let attached = !self.io_links.is_empty();
        if !self.config.io_capture || on == attached {
            return Ok(());
        }
        if !on {
            // Each tracepoint's release waits for an RCU grace period (tens of ms, twelve
            // of them): release them on their own threads, off the caller's path, which is
            // a detach that should take milliseconds.
            let links = std::mem::take(&mut self.io_links);
            let released = std::thread::Builder::new()
                .name("scoped-io-release".into())
                .spawn(move || {
                    std::thread::scope(|scope| {
                        for (_, link) in links {
                            scope.spawn(move || drop(link));
                        }
                    });
                });
            if let Err(error) = released {
                tracing::warn!(%error, "no thread to release the IO tracepoints on; released them here");
            }
            return Ok(());
        }
        for (name, tracepoints) in IO_PROGRAMS {
            for &tracepoint in tracepoints {
                let attached =
                    program_mut::<TracePoint>(&mut self.ebpf, name).and_then(|program| {
                        program.attach("syscalls", tracepoint).map_err(|source| {
                            LoadError::Tracepoint {
                                name,
                                category: "syscalls",
                                tracepoint,
                                source: Box::new(source),
                            }
                        })
                    });
                let owned = attached.and_then(|link| {
                    program_mut::<TracePoint>(&mut self.ebpf, name)?
                        .take_link(link)
                        .map_err(|source| LoadError::Program {
                            name,
                            source: Box::new(source),
                        })
                });
                match owned {
                    Ok(link) => self.io_links.push((name, link)),
                    Err(error) => {
                        self.capture_io(false)?;
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the syscall tracepoints of IO capture are attached now.
    pub fn io_attached(&self) -> bool {
        !self.io_links.is_empty()
    }

    /// Adds `pid` to the set of traced processes (or updates it); `restricted` while a
    /// session of a user other than root traces it (see [`Target::restricted`]); `io` while
    /// a session captures its reads and writes (see [`Target::skip_io`]).
    pub fn add_target(
        &mut self,
        pid: u32,
        sessions: u32,
        restricted: bool,
        io: bool,
    ) -> Result<(), ScopeError> {
        let target = Target {
            sessions,
            restricted: u32::from(restricted),
            skip_io: u32::from(!io),
            _pad: 0,
        };
        self.targets
            .insert(&pid, &target, 0)
            .map_err(|source| ScopeError::Map {
                map: maps::TARGETS,
                source,
            })
    }

    /// Takes the call stacks of `pid`'s goroutines out of the kernel. A goroutine's stack
    /// is freed when its last traced call returns, but nothing in the kernel ends the calls
    /// still open when the process exits: the daemon reports those.
    pub fn take_go_stacks(&mut self, pid: u32) -> Vec<ThreadStack> {
        let keys: Vec<GoroutineKey> = self
            .go_stacks
            .keys()
            .filter_map(Result::ok)
            .filter(|key| key.pid == pid)
            .collect();
        keys.iter()
            .filter_map(|key| {
                let stack = self.go_stacks.get(key, 0).ok();
                if let Err(error) = self.go_stacks.remove(key) {
                    tracing::debug!(pid, %error, "a goroutine's stack was gone already");
                }
                stack
            })
            .collect()
    }

    /// Removes `pid` from the set of traced processes.
    pub fn remove_target(&mut self, pid: u32) {
        if let Err(error) = self.targets.remove(&pid) {
            tracing::debug!(pid, %error, "target was not in the kernel's set");
        }
    }

    /// The global counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&counter| {
                let total = self
                    .counters
                    .get(&(counter as u32), 0)
                    .map(|values| values.iter().copied().fold(0u64, u64::wrapping_add))
                    .unwrap_or(0);
                (counter, total)
            })
            .collect()
    }

    /// A probe slot's counters, summed over CPUs.
    pub fn probe_counters(&self, slot: u32) -> ProbeCounters {
        let mut total = ProbeCounters::default();
        if let Ok(values) = self.probe_counters.get(&slot, 0) {
            for value in values.iter() {
                total.calls = total.calls.wrapping_add(value.calls);
                total.dropped = total.dropped.wrapping_add(value.dropped);
                total.sampled_out = total.sampled_out.wrapping_add(value.sampled_out);
                total.rate_limited = total.rate_limited.wrapping_add(value.rate_limited);
            }
        }
        total
    }

    /// Sets what share of a probe slot's calls the kernel records: 1 in `sample_every` (0 or
    /// 1: all), at most `max_rate` a second (0: no limit). Starts the rate limit's bucket full.
    pub fn set_probe_control(
        &mut self,
        slot: u32,
        sample_every: u32,
        max_rate: u32,
    ) -> Result<(), ScopeError> {
        let control = ProbeControl {
            sample_every,
            max_rate,
            ..ProbeControl::default()
        };
        self.probe_control
            .set(slot, &control, 0)
            .map_err(|source| ScopeError::Map {
                map: maps::PROBE_CONTROL,
                source,
            })
    }

    /// Run time and run count of the entry and the exit program, summed, since load. Counted
    /// only while BPF run-time statistics are on (`budget::RunStats`).
    pub fn program_runs(&self, pair: ProgramPair) -> (Duration, u64) {
        let (entry, exit) = pair.names();
        let mut total = (Duration::ZERO, 0);
        for name in [entry, exit] {
            let info = self
                .ebpf
                .program(name)
                .and_then(|p| <&UProbe>::try_from(p).ok())
                .and_then(|p| p.info().ok());
            if let Some(info) = info {
                total.0 += info.run_time();
                total.1 += info.run_count();
            }
        }
        total
    }

    /// Where a USDT probe slot's arguments are.
    pub fn set_usdt_args(&mut self, slot: u32, spec: &UsdtSpec) -> Result<(), ScopeError> {
        self.usdt_args
            .set(slot, spec, 0)
            .map_err(|source| ScopeError::Map {
                map: maps::USDT_ARGS,
                source,
            })
    }

    /// Zeroes a probe slot's counters and control before it is reused.
    pub fn reset_probe_counters(&mut self, slot: u32) -> Result<(), ScopeError> {
        self.set_probe_control(slot, 0, 0)?;
        let zeros = PerCpuValues::try_from(vec![ProbeCounters::default(); self.cpus as usize])
            .map_err(|source| ScopeError::Map {
                map: maps::PROBE_COUNTERS,
                source: source.into(),
            })?;
        self.probe_counters
            .set(slot, zeros, 0)
            .map_err(|source| ScopeError::Map {
                map: maps::PROBE_COUNTERS,
                source,
            })
    }
}

/// A program of the object, as its concrete type.
fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| LoadError::Program {
            name,
            source: Box::new(source),
        })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(LoadError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| LoadError::WrongType { name, source })
}

/// Where the fields the programs read live in this kernel's structs.
fn kernel_offsets() -> Result<KernelOffsets, LoadError> {
    let btf = crate::btf::Btf::kernel()?;
    let at = |structure: &str, field: &str| btf.offset(structure, field);
    Ok(KernelOffsets {
        task_pid: at("task_struct", "pid")?,
        task_tgid: at("task_struct", "tgid")?,
        task_files: at("task_struct", "files")?,
        files_fdt: at("files_struct", "fdt")?,
        fdtable_max_fds: at("fdtable", "max_fds")?,
        fdtable_fd: at("fdtable", "fd")?,
        file_inode: at("file", "f_inode")?,
        file_private_data: at("file", "private_data")?,
        inode_mode: at("inode", "i_mode")?,
        socket_sk: at("socket", "sk")?,
        sk_family: at("sock", "__sk_common.skc_family")?,
        sk_protocol: at("sock", "sk_protocol")?,
        sk_daddr: at("sock", "__sk_common.skc_daddr")?,
        sk_rcv_saddr: at("sock", "__sk_common.skc_rcv_saddr")?,
        sk_dport: at("sock", "__sk_common.skc_dport")?,
        sk_num: at("sock", "__sk_common.skc_num")?,
        sk_v6_daddr: at("sock", "__sk_common.skc_v6_daddr")?,
        sk_v6_rcv_saddr: at("sock", "__sk_common.skc_v6_rcv_saddr")?,
        tcp_write_seq: at("tcp_sock", "write_seq")?,
        tcp_copied_seq: at("tcp_sock", "copied_seq")?,
        unix_peer: at("unix_sock", "peer")?,
        task_mm: at("task_struct", "mm")?,
        mm_flags: at("mm_struct", "flags")?,
    })
}
