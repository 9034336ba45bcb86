//! Transport: communicators (threads, MPI), launcher detection and agreement.
//!
//! A distributed job runs one process (or, in tests and single-node runs, one thread) per
//! global rank. This module moves bytes between ranks and knows nothing about plans or
//! loading (the share modes that decide *which* bytes move live in [`crate::dist`]):
//!
//! - [`Communicator`] is the small byte-oriented interface every backend implements: rank,
//!   size, split into sub-communicators, barrier, broadcast, all-gather, all-to-all-v,
//!   point-to-point messages as one step ([`Communicator::exchange`]), abort, and a
//!   collective timeout with a phase name for its message.
//!   Backends: [`ThreadComm`] (in-process, channels and condition variables) and `MpiComm`
//!   (feature `mpi`, rsmpi; large messages are chunked under MPI's 2 GiB `int` counts). The
//!   Python package implements it over `torch.distributed` (gloo or NCCL).
//! - [`launch`] reads rank, world size and local rank from the launcher's environment
//!   (Open MPI, MPICH/Hydra, Slurm, torchrun) and checks it against the topology and MPI.
//! - Agreement: [`agree`] all-gathers every rank's status after a local phase, so a rank that
//!   failed never leaves the others blocked in a later collective; [`agree_fields`] compares
//!   named values (a job fingerprint) across ranks and names the first that differs.
//! - Deadlines: [`Communicator::set_timeout`] bounds every later collective; a rank still
//!   waiting after it ends the job with one line naming the phase
//!   ([`Communicator::set_phase`]) and the ranks that kept it waiting ([`Error::Timeout`]:
//!   those that did not arrive, and, on MPI, those that do not answer a liveness probe, so a rank
//!   that arrived and then stopped inside a broadcast or all-to-all is named too). Waits that
//!   cannot be polled (`MPI_Init`, `MPI_Finalize`, `MPI_Comm_split`, NCCL set-up) are bounded
//!   by the process [`watchdog`], armed before `MPI_Init`.

use std::time::Duration;

use crate::{Error, Result};

pub mod deadline;
pub mod launch;
mod threads;
pub mod watchdog;

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
pub use self::mpi::{MpiComm, MpiUniverse};

pub use launch::{LaunchInfo, Launcher};
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
        packed_through_vectors(self, send, send_counts, recv, recv_counts, |i| i)
    }
    /// Point-to-point messages as one collective step: every rank of the communicator calls
    /// it, with or without messages. `sends` are `(peer, bytes)`, `recvs` `(peer, buffer)`;
    /// the k-th message a rank sends a peer lands in the k-th buffer that peer lists for it
    /// and must have its length (the share modes derive both sides' lists from one plan and
    /// compare their digests first). A message is never written past its buffer.
    ///
    /// It lets the share modes receive straight into the arena. The default packs the
    /// messages per peer through [`Communicator::all_to_all_packed`] (checking each peer's
    /// total; its buffers are allocated fallibly and agreed on before the transfer);
    /// backends override it to move each message from and into the callers' memory.
    fn exchange(&self, sends: &[(usize, &[u8])], recvs: &mut [(usize, &mut [u8])]) -> Result<()> {
        exchange_through_packed(self, sends, recvs)
    }
    /// Ends the whole job because of an unrecoverable error on this rank. The MPI backend
    /// prints `msg` and calls `MPI_Abort` (it does not return); the thread backend makes every
    /// other rank's pending and future collectives fail with `msg`, then returns.
    fn abort(&self, code: i32, msg: &str);
    /// Bounds how long each later collective of this communicator (and of communicators split
    /// from it afterwards) waits for the other ranks; `None` waits forever. A rank that runs
    /// out of time ends the job: the thread backend aborts the thread world and returns
    /// [`Error::Timeout`]; the MPI backend prints the message and calls `MPI_Abort`.
    fn set_timeout(&self, timeout: Option<Duration>);
    /// The timeout set by [`Communicator::set_timeout`] (`None`: none, or the backend keeps
    /// its own, as torch.distributed does).
    fn timeout(&self) -> Option<Duration> {
        None
    }
    /// Names the phase that later collectives belong to, for the timeout message.
    fn set_phase(&self, phase: &str);
}

/// The error of a collective that timed out: the phase, the wait and who did not arrive.
pub fn timeout_error(
    rank: usize,
    phase: &str,
    timeout: Duration,
    missing: Option<&[usize]>,
) -> Error {
    Error::Timeout {
        rank,
        phase: phase.to_string(),
        after: timeout,
        missing: missing.map(<[usize]>::to_vec),
        silent: None,
        stopped_for: None,
    }
}

pub use crate::error::{human_duration, rank_list};

/// Writes `line` and a line break to stderr in one `write`, so that the lines of the ranks of
/// a job, which share the launcher's stderr, never interleave mid-line.
pub fn eprint_line(line: &str) {
    use std::io::Write;
    let mut whole = String::with_capacity(line.len() + 1);
    whole.push_str(line);
    whole.push('\n');
    let _ = std::io::stderr().lock().write_all(whole.as_bytes());
}

/// Agrees on the outcome of a local phase: all-gathers every rank's status on `comm`.
///
/// Returns `Ok(value)` only when every rank succeeded. When this rank failed it returns its own
/// error; when another failed, [`Error::PeerFailed`] naming the lowest failed rank and its message.
/// Call it on the world communicator after every step that can fail on one rank only, before
/// the next collective, so that no rank waits forever for a rank that gave up.
pub fn agree<T, C: Communicator + ?Sized>(comm: &C, local: Result<T>) -> Result<T> {
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
            Some((rank, msg)) => Err(Error::PeerFailed {
                rank,
                message: String::from_utf8_lossy(msg).into_owned(),
            }),
        },
    }
}

/// Checks that every rank holds the same value for every named field (a job fingerprint):
/// all-gathers `fields` and compares them field by field, in order.
///
/// The first field whose values differ gives [`Error::Disagree`], the same on every rank, naming
/// the field, each distinct value and the ranks holding it, e.g.
/// `ranks disagree on mode: rank 0,2,3 broadcast, rank 1 none`. Fields are compared in the
/// order given, so put the ones that explain the others first (a version, then options).
pub fn agree_fields(comm: &dyn Communicator, fields: &[(&str, String)]) -> Result<()> {
    let mut mine = Vec::new();
    for (name, value) in fields {
        for part in [name.as_bytes(), value.as_bytes()] {
            mine.extend_from_slice(&(part.len() as u64).to_le_bytes());
            mine.extend_from_slice(part);
        }
    }
    let all = comm.all_gather(&mine)?;
    let decoded: Vec<Option<Vec<(String, String)>>> =
        all.iter().map(|b| decode_fields(b)).collect();
    if let Some(bad) = decoded.iter().position(Option::is_none) {
        return Err(Error::comm(
            "job fingerprint",
            format!("rank {bad} sent a malformed one (a different safeshard version?)"),
        ));
    }
    let decoded: Vec<Vec<(String, String)>> = decoded.into_iter().flatten().collect();
    let longest = decoded.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        let at = |r: &Vec<(String, String)>| r.get(i).cloned();
        let first = decoded.first().and_then(at);
        if decoded.iter().all(|r| at(r) == first) {
            continue;
        }
        let name = decoded
            .iter()
            .find_map(|r| r.get(i).map(|f| f.0.clone()))
            .unwrap_or_default();
        // Group ranks by value, in order of each value's first rank.
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (rank, r) in decoded.iter().enumerate() {
            let v = match r.get(i) {
                Some((n, v)) if *n == name => v.clone(),
                Some((n, v)) => format!("{n}={v}"),
                None => "(absent)".into(),
            };
            match groups.iter_mut().find(|g| g.0 == v) {
                Some(g) => g.1.push(rank),
                None => groups.push((v, vec![rank])),
            }
        }
        return Err(Error::Disagree {
            option: name,
            values: groups,
        });
    }
    Ok(())
}

fn decode_fields(mut b: &[u8]) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let take = |b: &mut &[u8]| -> Option<String> {
        let len = usize::try_from(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)).ok()?;
        let s = b.get(8..8usize.checked_add(len)?)?;
        let text = String::from_utf8_lossy(s).into_owned();
        *b = b.get(8 + len..)?;
        Some(text)
    };
    while !b.is_empty() {
        let name = take(&mut b)?;
        let value = take(&mut b)?;
        out.push((name, value));
    }
    Some(out)
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
    let color = u32::try_from(first).map_err(|_| {
        Error::comm(
            "node split",
            format!("rank index {first} does not fit a color"),
        )
    })?;
    let comm = world
        .split(Some(color), world.rank())?
        .ok_or_else(|| Error::comm("node split", "no communicator returned"))?;
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

/// [`Communicator::all_to_all_packed`] through [`Communicator::all_to_all_v`]: the default,
/// and the MPI backend's path for transfers too large for one call. `world_rank` names a
/// communicator rank in errors (the global rank where the backend knows it).
pub(crate) fn packed_through_vectors<C: Communicator + ?Sized>(
    comm: &C,
    send: &[u8],
    send_counts: &[usize],
    recv: &mut [u8],
    recv_counts: &[usize],
    world_rank: impl Fn(usize) -> usize,
) -> Result<()> {
    let mut bufs = Vec::with_capacity(send_counts.len());
    let mut off = 0usize;
    for &c in send_counts {
        let part = off
            .checked_add(c)
            .and_then(|end| send.get(off..end))
            .ok_or_else(|| Error::comm("all_to_all_packed", "send counts exceed the buffer"))?;
        bufs.push(part.to_vec());
        off += c;
    }
    let got = comm.all_to_all_v(bufs)?;
    let mut off = 0usize;
    for (i, (g, &c)) in got.iter().zip(recv_counts).enumerate() {
        if g.len() != c {
            return Err(Error::comm(
                "all_to_all_packed",
                format!(
                    "rank {} sent {} bytes, {c} expected",
                    world_rank(i),
                    g.len()
                ),
            ));
        }
        off.checked_add(c)
            .and_then(|end| recv.get_mut(off..end))
            .ok_or_else(|| Error::comm("all_to_all_packed", "receive buffer too small"))?
            .copy_from_slice(g);
        off += c;
    }
    Ok(())
}

/// [`Communicator::exchange`] through [`Communicator::all_to_all_packed`]: the messages to
/// each peer concatenated in order, one packed all-to-all, and the received bytes cut into
/// the buffers in order. The default, and the fallback of a backend whose override cannot
/// move some messages itself (the Python communicator on NCCL).
pub fn exchange_through_packed<C: Communicator + ?Sized>(
    comm: &C,
    sends: &[(usize, &[u8])],
    recvs: &mut [(usize, &mut [u8])],
) -> Result<()> {
    let n = comm.size();
    // Per-peer totals and the buffers, checked and allocated before any byte moves, and
    // agreed on: a rank that cannot take part must not leave the others in the transfer.
    let prepared = (|| {
        let totals = |peers: &mut dyn Iterator<Item = (usize, usize)>| -> Result<Vec<usize>> {
            let mut t = vec![0usize; n];
            for (p, len) in peers {
                let slot = t.get_mut(p).ok_or_else(|| {
                    Error::comm("exchange", format!("peer {p} out of range for {n} ranks"))
                })?;
                *slot += len;
            }
            Ok(t)
        };
        let send_counts = totals(&mut sends.iter().map(|(p, b)| (*p, b.len())))?;
        let recv_counts = totals(&mut recvs.iter().map(|(p, b)| (*p, b.len())))?;
        let packed = zeroed(send_counts.iter().sum(), "packed messages")?;
        let incoming = zeroed(recv_counts.iter().sum(), "received messages")?;
        Ok((send_counts, recv_counts, packed, incoming))
    })();
    let (send_counts, recv_counts, mut packed, mut incoming) = agree(comm, prepared)?;
    let mut at = starts(&send_counts);
    for (p, bytes) in sends {
        if let Some(a) = at.get_mut(*p) {
            if let Some(d) = packed.get_mut(*a..*a + bytes.len()) {
                d.copy_from_slice(bytes);
            }
            *a += bytes.len();
        }
    }
    comm.all_to_all_packed(&packed, &send_counts, &mut incoming, &recv_counts)?;
    let mut at = starts(&recv_counts);
    for (p, buf) in recvs.iter_mut() {
        if let Some(a) = at.get_mut(*p) {
            if let Some(s) = incoming.get(*a..*a + buf.len()) {
                buf.copy_from_slice(s);
            }
            *a += buf.len();
        }
    }
    Ok(())
}

/// Where each peer's part starts in a buffer packed in peer order.
fn starts(counts: &[usize]) -> Vec<usize> {
    let mut off = 0;
    counts
        .iter()
        .map(|&c| {
            let s = off;
            off += c;
            s
        })
        .collect()
}

/// A zeroed buffer of `len` bytes, allocated fallibly.
fn zeroed(len: usize, what: &str) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
        bytes: len as u64,
        what: what.into(),
        rank: None,
    })?;
    v.resize(len, 0);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(absent: Option<Vec<usize>>, silent: Option<Vec<usize>>) -> (String, Vec<usize>) {
        let e = Error::Timeout {
            rank: 1,
            phase: "broadcast".into(),
            after: Duration::from_secs(3),
            missing: absent,
            silent: silent.map(Vec::into_boxed_slice),
            stopped_for: None,
        };
        (e.to_string(), e.missing_ranks().unwrap_or_default())
    }

    #[test]
    fn timeout_lines_name_the_missing_ranks_first() {
        let head = "rank 1: timed out after 3s in phase \"broadcast\": ";
        // Absent and silent: stopped before the collective.
        let (l, m) = line(Some(vec![2]), Some(vec![2]));
        assert_eq!(l, format!("{head}rank 2 did not arrive"));
        assert_eq!(m, vec![2]);
        // Absent but answering: waiting elsewhere, a victim; the silent one is the cause.
        let (l, m) = line(Some(vec![0, 2]), Some(vec![2]));
        assert_eq!(
            l,
            format!(
                "{head}rank 2 did not arrive; rank 0 did not arrive but answers (waiting in \
                 another collective)"
            )
        );
        assert_eq!(m, vec![2]);
        // Absent, all answering; a rank of another group does not answer.
        let (l, m) = line(Some(vec![0, 3]), Some(vec![5]));
        assert_eq!(
            l,
            format!(
                "{head}rank 0,3 did not arrive but answer (waiting in another collective); \
                 rank 5 does not answer (stopped or hung)"
            )
        );
        assert_eq!(m, vec![0, 3]);
        // In the middle of a transfer: every rank arrived, rank 2 stopped answering.
        let (l, m) = line(None, Some(vec![2, 3]));
        assert_eq!(l, format!("{head}rank 2,3 do not answer (stopped or hung)"));
        assert_eq!(m, vec![2, 3]);
        let (l, m) = line(None, Some(vec![]));
        assert_eq!(
            l,
            format!("{head}every rank answers, but the transfer did not finish")
        );
        assert!(m.is_empty());
        // Without a probe (the thread backend): the absent ranks.
        let (l, _) = line(Some(vec![3]), None);
        assert_eq!(l, format!("{head}rank 3 did not arrive"));
        let (l, _) = line(Some(vec![]), None);
        assert_eq!(
            l,
            format!("{head}every rank arrived, but the collective did not finish")
        );
        let (l, _) = line(None, None);
        assert_eq!(l, format!("{head}some ranks of this group did not arrive"));
    }

    #[test]
    fn durations_read_as_the_flag_spells_them() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_secs(3)), "3s");
        assert_eq!(human_duration(Duration::from_secs(600)), "10m");
        assert_eq!(human_duration(Duration::from_secs(90)), "1m30s");
    }
}
