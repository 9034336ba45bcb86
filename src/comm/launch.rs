//! Launcher detection: rank, world size and local rank from the environment a launcher sets.
//!
//! Checked in this order (the first launcher whose rank variable is present wins, because
//! `srun --mpi=pmix` under Slurm also sets PMI variables and torchrun's names are generic):
//!
//! | launcher | rank | size | local rank |
//! |---|---|---|---|
//! | Open MPI | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK` |
//! | MPICH / Hydra | `PMI_RANK` | `PMI_SIZE` | `MPI_LOCALRANKID` |
//! | Slurm | `SLURM_PROCID` | `SLURM_NTASKS` | `SLURM_LOCALID` |
//! | torchrun | `RANK` | `WORLD_SIZE` | `LOCAL_RANK` |
//!
//! An Open MPI binary started by MPICH's `mpirun` (or the reverse) does not fail: every
//! process silently becomes rank 0 of a world of size 1. [`check_mpi_world`] compares the
//! launcher's size with the size MPI reports and refuses such a job.

use crate::topology::Topology;
use crate::{Error, Result};

/// Which launcher started the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// Open MPI's `mpirun`/`mpiexec` (or `srun` with Open MPI's PMIx).
    OpenMpi,
    /// MPICH's Hydra (`mpiexec.hydra`) or another PMI-1/2 launcher.
    Mpich,
    /// Slurm's `srun`.
    Slurm,
    /// PyTorch's `torchrun` (or anything that sets `RANK`/`WORLD_SIZE`).
    Torchrun,
}

impl Launcher {
    /// Names of the (rank, size, local rank) variables of this launcher.
    pub fn variables(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Launcher::OpenMpi => (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ),
            Launcher::Mpich => ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            Launcher::Slurm => ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            Launcher::Torchrun => ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        }
    }

    /// Human-readable name.
    pub fn name(self) -> &'static str {
        match self {
            Launcher::OpenMpi => "Open MPI",
            Launcher::Mpich => "MPICH/Hydra",
            Launcher::Slurm => "Slurm",
            Launcher::Torchrun => "torchrun",
        }
    }
}

/// What the launcher says about this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    /// The launcher.
    pub launcher: Launcher,
    /// Global rank.
    pub rank: usize,
    /// World size.
    pub size: usize,
    /// Rank on this node (0 when the launcher does not say).
    pub local_rank: usize,
}

impl Launcher {
    /// Every launcher, in the order detection checks them (the module's table).
    pub const ALL: [Launcher; 4] = [
        Launcher::OpenMpi,
        Launcher::Mpich,
        Launcher::Slurm,
        Launcher::Torchrun,
    ];
}

fn parse(var: &str, value: &str) -> Result<usize> {
    value.trim().parse::<usize>().map_err(|_| Error::LaunchEnv {
        var: var.to_string(),
        value: Some(value.to_string()),
        reason: "is not a non-negative integer".into(),
    })
}

/// Detects the launcher from an environment lookup (`get(name)`), e.g.
/// `detect(|k| std::env::var(k).ok())`. `Ok(None)` when no launcher variables are set.
pub fn detect(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchInfo>> {
    for launcher in Launcher::ALL {
        let (rv, sv, lv) = launcher.variables();
        let Some(rank) = get(rv) else { continue };
        let rank = parse(rv, &rank)?;
        let size = get(sv).ok_or_else(|| Error::LaunchEnv {
            var: sv.to_string(),
            value: None,
            reason: format!("is not set, but {rv} is ({} launcher)", launcher.name()),
        })?;
        let size = parse(sv, &size)?;
        if size == 0 {
            return Err(Error::LaunchEnv {
                var: sv.to_string(),
                value: Some("0".into()),
                reason: "gives a world without ranks".into(),
            });
        }
        if rank >= size {
            return Err(Error::LaunchEnv {
                var: rv.to_string(),
                value: Some(rank.to_string()),
                reason: format!("is not below {sv}={size}"),
            });
        }
        let local_rank = match get(lv) {
            Some(v) => parse(lv, &v)?,
            None => 0,
        };
        return Ok(Some(LaunchInfo {
            launcher,
            rank,
            size,
            local_rank,
        }));
    }
    Ok(None)
}

/// Detects the launcher from this process's environment.
pub fn detect_env() -> Result<Option<LaunchInfo>> {
    detect(|k| std::env::var(k).ok())
}

/// Checks that the job has exactly `tp × pp × dp` ranks.
pub fn check_world(size: usize, topo: &Topology) -> Result<()> {
    let want = topo
        .world_size()
        .ok_or_else(|| Error::invalid_argument("tp", "× pp × dp overflows"))?;
    if size != want {
        return Err(Error::WorldSize {
            ranks: size,
            planned: want,
            topology: Some([topo.tp, topo.pp, topo.dp]),
        });
    }
    Ok(())
}

/// Compares the launcher's view of the world with MPI's (`MPI_COMM_WORLD` rank and size).
///
/// A mismatch means the binary's MPI library is not the one of the launcher (an Open MPI build
/// started by MPICH's `mpirun` runs N separate worlds of size 1): refuse rather than have every
/// process load rank 0.
pub fn check_mpi_world(
    launch: Option<&LaunchInfo>,
    mpi_rank: usize,
    mpi_size: usize,
) -> Result<()> {
    let Some(l) = launch else { return Ok(()) };
    if l.size != mpi_size || l.rank != mpi_rank {
        let (rv, sv, _) = l.launcher.variables();
        return Err(Error::comm(
            "MPI",
            format!(
                "{} says rank {} of {} ({rv}, {sv}) but MPI_COMM_WORLD says rank {mpi_rank} of \
                 {mpi_size}: safeshard was built against a different MPI library than the \
                 mpirun that started it (e.g. an Open MPI binary under MPICH's mpirun); use the \
                 matching mpirun",
                l.launcher.name(),
                l.rank,
                l.size
            ),
        ));
    }
    Ok(())
}

/// How a process is stalled, from its state in `/proc/PID/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// `T`: stopped by a signal (SIGSTOP, SIGTSTP, Ctrl-Z).
    Stopped,
    /// `t`: stopped by a debugger.
    Traced,
    /// `D`: in uninterruptible sleep, usually I/O on a hung file system.
    Uninterruptible,
}

impl Stall {
    fn from_state(state: char) -> Option<Self> {
        match state {
            'T' => Some(Stall::Stopped),
            't' => Some(Stall::Traced),
            'D' => Some(Stall::Uninterruptible),
            _ => None,
        }
    }

    /// `stopped`, `stopped by a debugger`, `in uninterruptible sleep: a hung file system?`.
    pub fn describe(self) -> &'static str {
        match self {
            Stall::Stopped => "stopped",
            Stall::Traced => "stopped by a debugger",
            Stall::Uninterruptible => "in uninterruptible sleep: a hung file system?",
        }
    }
}

/// Variables equal in every process of one job and different between jobs (Open MPI/PMIx,
/// Slurm, torchrun).
const JOB_VARS: [&str; 5] = [
    "PMIX_NAMESPACE",
    "OMPI_MCA_ess_base_jobid",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "TORCHELASTIC_RUN_ID",
];

/// The other ranks of this job on this node whose process is stalled (stopped by a signal or
/// a debugger, or in uninterruptible sleep), in rank order.
///
/// Before MPI is up (in `MPI_Init`, `MPI_Finalize`) a waiting rank cannot ask its peers which
/// of them is missing; it can only look at the processes of its own node: those that carry
/// the launcher's rank variable and this job's identity ([`JOB_VARS`] present here; without
/// any, the processes with the same parent, the launcher's daemon). A rank wrapped in a shell
/// counts as the rank. Empty where `/proc` cannot be read.
pub fn stalled_local_ranks(launcher: Launcher, me: usize) -> Vec<(usize, Stall)> {
    let identity: Vec<(String, String)> = JOB_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_string(), v)))
        .collect();
    let parent = identity.is_empty().then(std::os::unix::process::parent_id);
    scan_stalled(
        std::path::Path::new("/proc"),
        launcher.variables().0,
        &identity,
        parent,
        (me, std::process::id()),
    )
}

/// [`stalled_local_ranks`] over a `/proc`-like directory; `me` is (rank, pid) of this process.
fn scan_stalled(
    proc_dir: &std::path::Path,
    rank_var: &str,
    identity: &[(String, String)],
    parent: Option<u32>,
    me: (usize, u32),
) -> Vec<(usize, Stall)> {
    let mut found = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(proc_dir) else {
        return Vec::new();
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me.1 {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) S ppid ...`: comm may hold spaces and parentheses; the state follows
        // the last `)`.
        let mut fields = stat
            .rfind(')')
            .and_then(|i| stat.get(i + 1..))
            .unwrap_or("")
            .split_whitespace();
        let stall = fields
            .next()
            .and_then(|s| s.chars().next())
            .and_then(Stall::from_state);
        let ppid = fields.next().and_then(|s| s.parse::<u32>().ok());
        // Only stalled processes are read further (their environment).
        let Some(stall) = stall else { continue };
        if parent.is_some() && ppid != parent {
            continue;
        }
        let Ok(environ) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let var = |name: &str| {
            environ.split(|&b| b == 0).find_map(|kv| {
                let rest = kv.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
                Some(String::from_utf8_lossy(rest).into_owned())
            })
        };
        if !identity.iter().all(|(k, v)| var(k).as_ref() == Some(v)) {
            continue;
        }
        let Some(rank) = var(rank_var).and_then(|r| r.trim().parse::<usize>().ok()) else {
            continue;
        };
        if rank != me.0 {
            found.entry(rank).or_insert(stall);
        }
    }
    found.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn detects_each_launcher() {
        let cases = [
            (
                Launcher::OpenMpi,
                vec![
                    ("OMPI_COMM_WORLD_RANK", "3"),
                    ("OMPI_COMM_WORLD_SIZE", "8"),
                    ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
                ],
            ),
            (
                Launcher::Mpich,
                vec![
                    ("PMI_RANK", "3"),
                    ("PMI_SIZE", "8"),
                    ("MPI_LOCALRANKID", "1"),
                ],
            ),
            (
                Launcher::Slurm,
                vec![
                    ("SLURM_PROCID", "3"),
                    ("SLURM_NTASKS", "8"),
                    ("SLURM_LOCALID", "1"),
                ],
            ),
            (
                Launcher::Torchrun,
                vec![("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")],
            ),
        ];
        for (launcher, vars) in cases {
            let got = detect(env(&vars)).unwrap().unwrap();
            assert_eq!(
                got,
                LaunchInfo {
                    launcher,
                    rank: 3,
                    size: 8,
                    local_rank: 1
                }
            );
        }
        assert_eq!(detect(env(&[("HOME", "/root")])).unwrap(), None);
    }

    #[test]
    fn open_mpi_wins_over_slurm_and_local_rank_defaults_to_zero() {
        let got = detect(env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(got.launcher, Launcher::OpenMpi);
        assert_eq!((got.rank, got.size, got.local_rank), (2, 4, 0));
    }

    #[test]
    fn malformed_values_are_clear_errors() {
        let e = detect(env(&[("RANK", "x1"), ("WORLD_SIZE", "4")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x1\""), "{e}");
        let e = detect(env(&[("PMI_RANK", "4"), ("PMI_SIZE", "4")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("PMI_RANK=4 is not below PMI_SIZE=4"), "{e}");
        let e = detect(env(&[("SLURM_PROCID", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SLURM_NTASKS is not"), "{e}");
        let e = detect(env(&[("RANK", "0"), ("WORLD_SIZE", "-2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE"), "{e}");
        let e = detect(env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", ""),
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("LOCAL_RANK"), "{e}");
    }

    #[test]
    fn world_must_match_topology() {
        let t = Topology::new(2, 2, 1, 1).unwrap();
        assert!(check_world(4, &t).is_ok());
        let e = check_world(8, &t).unwrap_err();
        assert!(e.is_usage());
        assert!(e.to_string().contains("8 ranks"), "{e}");
    }

    #[test]
    fn mismatched_mpi_library_is_refused() {
        let l = detect(env(&[("PMI_RANK", "2"), ("PMI_SIZE", "4")]))
            .unwrap()
            .unwrap();
        assert!(check_mpi_world(Some(&l), 2, 4).is_ok());
        let e = check_mpi_world(Some(&l), 0, 1).unwrap_err().to_string();
        assert!(e.contains("MPI_COMM_WORLD says rank 0 of 1"), "{e}");
        assert!(check_mpi_world(None, 0, 1).is_ok());
    }

    #[test]
    fn stopped_processes_of_the_same_job_on_this_node_are_found() {
        use std::process::{Command, Stdio};
        let job = format!("safeshard-test-{}", std::process::id());
        let mut child = Command::new("sleep")
            .arg("60")
            .env("OMPI_COMM_WORLD_RANK", "7")
            .env("PMIX_NAMESPACE", &job)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let state = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim().to_string()))
                .and_then(|r| r.chars().next())
        };
        let scan = |identity: &[(String, String)], parent| {
            scan_stalled(
                std::path::Path::new("/proc"),
                "OMPI_COMM_WORLD_RANK",
                identity,
                parent,
                (0, std::process::id()),
            )
        };
        let ours = [("PMIX_NAMESPACE".to_string(), job.clone())];
        let theirs = [("PMIX_NAMESPACE".to_string(), format!("{job}-other"))];
        // Running: not stalled. Wait until it sleeps: while `exec` pages the binary in on a
        // busy disk, the child is briefly in D state, which the scan rightly reports.
        let start = std::time::Instant::now();
        while state() != Some('S') && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(scan(&ours, None), vec![]);
        // SAFETY: signals our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let start = std::time::Instant::now();
        while state() != Some('T') && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(scan(&ours, None), vec![(7, Stall::Stopped)]);
        assert_eq!(scan(&theirs, None), vec![]);
        // Without a job identity: the processes with the same parent.
        assert_eq!(
            scan(&[], Some(std::process::id())),
            vec![(7, Stall::Stopped)]
        );
        assert_eq!(scan(&[], Some(1)), vec![]);
        // This process's own rank is never named.
        let me7 = scan_stalled(
            std::path::Path::new("/proc"),
            "OMPI_COMM_WORLD_RANK",
            &ours,
            None,
            (7, std::process::id()),
        );
        assert_eq!(me7, vec![]);
        let _ = child.kill();
        let _ = child.wait();
    }
}
