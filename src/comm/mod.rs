//! Communicators (threads, MPI, NCCL), launcher detection and shared-tensor distribution.
//!
//! A distributed job runs one process (or, in tests and single-node runs, one thread) per
//! global rank. Every rank computes the same [`Plan`](crate::plan::Plan) itself; this module
//! then decides who reads which bytes from storage and moves bytes between ranks:
//!
//! - [`Communicator`] is the small byte-oriented interface every backend implements: rank,
//!   size, split into sub-communicators, barrier, broadcast, all-gather, all-to-all-v, abort.
//!   Backends: [`ThreadComm`] (in-process, channels and condition variables), `MpiComm`
//!   (feature `mpi`, rsmpi; large messages are chunked under MPI's 2 GiB `int` counts) and
//!   `NcclComm` (feature `nccl`, cudarc loaded at run time; device buffers).
//! - [`launch`] reads rank, world size and local rank from the launcher's environment
//!   (Open MPI, MPICH/Hydra, Slurm, torchrun) and checks it against the topology and MPI.
//! - [`share`] runs a rank's load under a [`ShareMode`]: `none` (every rank reads its own
//!   runs), `broadcast` (bytes held by several ranks are read by one owner and broadcast within
//!   the sub-communicator of exactly the ranks that hold them) or `read-once` (every needed byte
//!   is read once per job or per node and distributed with all-to-all-v).
//!
//! Failure handling: every phase that can fail locally (opening or reading a file) ends with
//! [`agree`], an all-gather of each rank's status on the world communicator, so a rank that
//! failed never leaves the others blocked in a later collective: all ranks return an error
//! naming the failed rank and its message.

use crate::{Error, Result};

pub mod exec;
pub mod launch;
pub mod share;
mod threads;
pub mod toy;

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
pub use self::mpi::{MpiComm, MpiUniverse};

#[cfg(feature = "nccl")]
pub mod nccl;

#[cfg(feature = "cuda")]
pub mod device;

pub use launch::{LaunchInfo, Launcher};
pub use share::{load_rank, RankLoad, ShareMode, ShareOptions};
pub use threads::{run_threads, ThreadComm};

/// A group of ranks that can exchange byte buffers.
///
/// All collectives must be called by every rank of the communicator, in the same order, with
/// consistent arguments (the same `root`, the same buffer length for [`broadcast`]).
///
/// [`broadcast`]: Communicator::broadcast
pub trait Communicator {
    /// This rank's index in the communicator, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the communicator.
    fn size(&self) -> usize;
    /// Splits into sub-communicators: ranks passing the same `Some(color)` form one, ordered
    /// by `key` (ties by rank); ranks passing `None` get `None`. Collective.
    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>>;
    /// Blocks until every rank has reached it.
    fn barrier(&self) -> Result<()>;
    /// Copies `buf` of rank `root` into `buf` of every other rank (same length everywhere).
    fn broadcast(&self, root: usize, buf: &mut [u8]) -> Result<()>;
    /// Every rank's `mine`, indexed by rank (meant for small values such as plan hashes).
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// `send[i]` goes to rank `i`; returns what each rank sent to this one, indexed by rank.
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>>;
    /// All-to-all-v on packed buffers: `send` holds `send_counts[0]` bytes for rank 0, then
    /// `send_counts[1]` for rank 1, ...; `recv` (sized to the sum of `recv_counts`) receives
    /// `recv_counts[i]` bytes from rank `i`, in rank order. Every rank must know what it
    /// receives (the share modes compute it from the plan). The default goes through
    /// [`Communicator::all_to_all_v`]; backends override it to avoid the copies.
    fn all_to_all_packed(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        let mut bufs = Vec::with_capacity(send_counts.len());
        let mut off = 0usize;
        for &c in send_counts {
            let part = send.get(off..off + c).ok_or_else(|| {
                Error::Comm("all_to_all_packed: send counts exceed the buffer".into())
            })?;
            bufs.push(part.to_vec());
            off += c;
        }
        let got = self.all_to_all_v(bufs)?;
        let mut off = 0usize;
        for (i, (g, &c)) in got.iter().zip(recv_counts).enumerate() {
            if g.len() != c {
                return Err(Error::Comm(format!(
                    "all_to_all_packed: rank {i} sent {} bytes, {c} expected",
                    g.len()
                )));
            }
            recv.get_mut(off..off + c)
                .ok_or_else(|| Error::Comm("all_to_all_packed: receive buffer too small".into()))?
                .copy_from_slice(g);
            off += c;
        }
        Ok(())
    }
    /// Ends the whole job because of an unrecoverable error on this rank. The MPI backend
    /// prints `msg` and calls `MPI_Abort` (it does not return); the thread backend makes every
    /// other rank's pending and future collectives fail with `msg`, then returns.
    fn abort(&self, code: i32, msg: &str);
}

/// Agrees on the outcome of a local phase: all-gathers every rank's status on `comm`.
///
/// Returns `Ok(value)` only when every rank succeeded. When this rank failed it returns its own
/// error; when another failed, [`Error::Comm`] naming the lowest failed rank and its message.
/// Call it on the world communicator after every step that can fail on one rank only, before
/// the next collective, so that no rank waits forever for a rank that gave up.
pub fn agree<T>(comm: &dyn Communicator, local: Result<T>) -> Result<T> {
    let status = match &local {
        Ok(_) => Vec::new(),
        Err(e) => {
            let msg = e.to_string();
            if msg.is_empty() {
                b"failed".to_vec()
            } else {
                msg.into_bytes()
            }
        }
    };
    let all = comm.all_gather(&status)?;
    match local {
        Err(e) => Err(e),
        Ok(v) => match all.iter().enumerate().find(|(_, s)| !s.is_empty()) {
            None => Ok(v),
            Some((rank, msg)) => Err(Error::Comm(format!(
                "rank {rank} failed: {}",
                String::from_utf8_lossy(msg)
            ))),
        },
    }
}

/// Checks that every rank computed the same plan: all-gathers `hash` and compares.
pub fn check_same_plan(comm: &dyn Communicator, hash: &[u8]) -> Result<()> {
    let all = comm.all_gather(hash)?;
    let differing: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, h)| h.as_slice() != all.first().map(|v| v.as_slice()).unwrap_or(&[]))
        .map(|(r, _)| r)
        .collect();
    if differing.is_empty() {
        Ok(())
    } else {
        Err(Error::Comm(format!(
            "ranks {differing:?} computed a different plan than rank 0 (different checkpoint \
             files, flags or safeshard version on their nodes?)"
        )))
    }
}

/// A sub-communicator of the node-local ranks: ranks whose `node` names are equal.
///
/// `node` is this rank's host name (see [`host_name`]), or any string that names its node
/// (tests simulate several nodes on one machine that way). Returns the communicator and the
/// world ranks of its members in order.
pub fn node_comm(
    world: &dyn Communicator,
    node: &str,
) -> Result<(Box<dyn Communicator>, Vec<usize>)> {
    let names = world.all_gather(node.as_bytes())?;
    let first = names
        .iter()
        .position(|n| n.as_slice() == node.as_bytes())
        .unwrap_or(world.rank());
    let members: Vec<usize> = names
        .iter()
        .enumerate()
        .filter(|(_, n)| n.as_slice() == node.as_bytes())
        .map(|(r, _)| r)
        .collect();
    let color = u32::try_from(first)
        .map_err(|_| Error::Comm(format!("rank index {first} does not fit a color")))?;
    let comm = world
        .split(Some(color), world.rank())?
        .ok_or_else(|| Error::Comm("node split returned no communicator".into()))?;
    Ok((comm, members))
}

/// This machine's host name (`gethostname`), or `"localhost"` if it cannot be read.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
    // (truncated names may lack the NUL, handled by the position search).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(buf.get(..end).unwrap_or(&[])).into_owned()
}
