//! In-process communicator: one thread per rank, for tests and single-node runs without a
//! launcher.
//!
//! Every collective is one round on a shared slot: each rank deposits a buffer, the
//! last one to arrive publishes all deposits and bumps the generation, and every rank takes
//! what it needs from the published round. A rank can only overwrite the published round by
//! completing the next one, which needs every rank to have arrived, so nobody reads a stale
//! or overwritten round.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{timeout_error, Communicator};
use crate::{Error, Result};

/// Job-wide abort flag shared by every communicator of one thread world.
#[derive(Default)]
struct AbortFlag {
    msg: Mutex<Option<String>>,
}

impl AbortFlag {
    fn get(&self) -> Option<String> {
        lock(&self.msg).clone()
    }
    fn set(&self, msg: String) {
        let mut m = lock(&self.msg);
        if m.is_none() {
            *m = Some(msg);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A rank that panicked while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Round = Arc<Vec<Arc<Vec<u8>>>>;

struct Slot {
    generation: u64,
    deposits: Vec<Option<Arc<Vec<u8>>>>,
    arrived: usize,
    last: Round,
    /// Sub-communicators created by `split`, keyed by (split sequence number, color).
    children: HashMap<(u64, u32), Arc<Group>>,
}

struct Group {
    size: usize,
    /// World rank of each member, for messages about ranks that did not arrive.
    world_ranks: Vec<usize>,
    slot: Mutex<Slot>,
    cv: Condvar,
    abort: Arc<AbortFlag>,
}

impl Group {
    fn new(world_ranks: Vec<usize>, abort: Arc<AbortFlag>) -> Arc<Self> {
        let size = world_ranks.len();
        Arc::new(Group {
            size,
            world_ranks,
            slot: Mutex::new(Slot {
                generation: 0,
                deposits: vec![None; size],
                arrived: 0,
                last: Arc::new(Vec::new()),
                children: HashMap::new(),
            }),
            cv: Condvar::new(),
            abort,
        })
    }
}

/// One rank's handle on an in-process communicator. Create a world with [`ThreadComm::world`]
/// (one handle per thread) or run a closure on every rank with [`run_threads`].
pub struct ThreadComm {
    rank: usize,
    group: Arc<Group>,
    splits: Cell<u64>,
    timeout: Cell<Option<Duration>>,
    phase: RefCell<String>,
}

impl ThreadComm {
    /// Handles for a world of `size` ranks; give handle `i` to the thread running rank `i`.
    pub fn world(size: usize) -> Vec<ThreadComm> {
        let group = Group::new((0..size).collect(), Arc::new(AbortFlag::default()));
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                group: group.clone(),
                splits: Cell::new(0),
                timeout: Cell::new(None),
                phase: RefCell::new("start".into()),
            })
            .collect()
    }

    fn world_rank(&self) -> usize {
        self.group
            .world_ranks
            .get(self.rank)
            .copied()
            .unwrap_or(self.rank)
    }

    /// One collective round: deposit `data`, wait for everyone, return all deposits.
    fn round(&self, data: Vec<u8>) -> Result<Round> {
        let g = &self.group;
        if let Some(msg) = g.abort.get() {
            return Err(Error::Aborted {
                message: msg.clone(),
            });
        }
        let deadline = self.timeout.get().map(|t| (t, Instant::now() + t));
        let mut slot = lock(&g.slot);
        let generation = slot.generation;
        if let Some(d) = slot.deposits.get_mut(self.rank) {
            *d = Some(Arc::new(data));
        }
        slot.arrived += 1;
        if slot.arrived == g.size {
            let round: Vec<Arc<Vec<u8>>> = slot
                .deposits
                .iter_mut()
                .map(|d| d.take().unwrap_or_default())
                .collect();
            slot.last = Arc::new(round);
            slot.arrived = 0;
            slot.generation += 1;
            g.cv.notify_all();
            return Ok(slot.last.clone());
        }
        while slot.generation == generation {
            // Wake up now and then to notice an abort on another communicator of the job.
            let (s, _) =
                g.cv.wait_timeout(slot, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner());
            slot = s;
            if slot.generation == generation {
                if let Some(msg) = g.abort.get() {
                    return Err(Error::Aborted {
                        message: msg.clone(),
                    });
                }
                if let Some((timeout, at)) = deadline {
                    if Instant::now() >= at {
                        let missing: Vec<usize> = slot
                            .deposits
                            .iter()
                            .enumerate()
                            .filter(|(_, d)| d.is_none())
                            .map(|(r, _)| g.world_ranks.get(r).copied().unwrap_or(r))
                            .collect();
                        let e = timeout_error(
                            self.world_rank(),
                            &self.phase.borrow(),
                            timeout,
                            Some(&missing),
                        );
                        drop(slot);
                        // Every other rank still waiting anywhere in this world fails too.
                        g.abort.set(e.to_string());
                        return Err(e);
                    }
                }
            }
        }
        Ok(slot.last.clone())
    }
}

fn word(bytes: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = bytes.get(i * 8..i * 8 + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>> {
        let seq = self.splits.get();
        self.splits.set(seq + 1);
        // Encode (has color, color, key) as three little-endian words.
        let mut mine = Vec::with_capacity(24);
        mine.extend_from_slice(&u64::from(color.is_some()).to_le_bytes());
        mine.extend_from_slice(&u64::from(color.unwrap_or(0)).to_le_bytes());
        mine.extend_from_slice(&(key as u64).to_le_bytes());
        let round = self.round(mine)?;
        let Some(color) = color else {
            return Ok(None);
        };
        let mut members: Vec<(u64, usize)> = round
            .iter()
            .enumerate()
            .filter(|(_, d)| word(d, 0) == 1 && word(d, 1) == u64::from(color))
            .map(|(r, d)| (word(d, 2), r))
            .collect();
        members.sort_unstable();
        let new_rank = members
            .iter()
            .position(|&(_, r)| r == self.rank)
            .ok_or_else(|| Error::comm("split", "this rank is missing from its color"))?;
        let child = {
            let mut slot = lock(&self.group.slot);
            slot.children
                .entry((seq, color))
                .or_insert_with(|| {
                    let world_ranks = members
                        .iter()
                        .map(|&(_, r)| self.group.world_ranks.get(r).copied().unwrap_or(r))
                        .collect();
                    Group::new(world_ranks, self.group.abort.clone())
                })
                .clone()
        };
        Ok(Some(Box::new(ThreadComm {
            rank: new_rank,
            group: child,
            splits: Cell::new(0),
            timeout: Cell::new(self.timeout.get()),
            phase: RefCell::new(self.phase.borrow().clone()),
        })))
    }

    fn barrier(&self) -> Result<()> {
        self.round(Vec::new()).map(|_| ())
    }

    fn broadcast(&self, root: usize, buf: &mut [u8]) -> Result<()> {
        if root >= self.size() {
            return Err(Error::comm(
                "broadcast",
                format!("root {root} out of range for {} ranks", self.size()),
            ));
        }
        let data = if self.rank == root {
            buf.to_vec()
        } else {
            Vec::new()
        };
        let round = self.round(data)?;
        if self.rank != root {
            let src = round
                .get(root)
                .ok_or_else(|| Error::comm("broadcast", "root deposit missing"))?;
            if src.len() != buf.len() {
                return Err(Error::comm(
                    "broadcast",
                    format!(
                        "length mismatch: root sent {} bytes, rank {} expects {}",
                        src.len(),
                        self.rank,
                        buf.len()
                    ),
                ));
            }
            buf.copy_from_slice(src);
        }
        Ok(())
    }

    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let round = self.round(mine.to_vec())?;
        Ok(round.iter().map(|d| d.as_ref().clone()).collect())
    }

    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        if send.len() != self.size() {
            return Err(Error::comm(
                "all_to_all_v",
                format!("{} buffers for {} ranks", send.len(), self.size()),
            ));
        }
        // Deposit: a table of (offset, len) per destination, then the concatenated data.
        let n = send.len();
        let total: usize = send.iter().map(Vec::len).sum();
        let mut packed = Vec::with_capacity(16 * n + total);
        let mut off = 0u64;
        for s in &send {
            packed.extend_from_slice(&off.to_le_bytes());
            packed.extend_from_slice(&(s.len() as u64).to_le_bytes());
            off += s.len() as u64;
        }
        for s in &send {
            packed.extend_from_slice(s);
        }
        drop(send);
        let round = self.round(packed)?;
        let me = self.rank;
        round
            .iter()
            .map(|d| {
                let start = word(d, 2 * me) as usize + 16 * n;
                let len = word(d, 2 * me + 1) as usize;
                d.get(start..start + len)
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| Error::comm("all_to_all_v", "malformed deposit"))
            })
            .collect()
    }

    fn exchange(&self, sends: &[(usize, &[u8])], recvs: &mut [(usize, &mut [u8])]) -> Result<()> {
        let n = self.size();
        // Deposit: a table of (offset, len) per destination, then the messages grouped by
        // destination, in order (one copy in; each receiver copies its part out).
        let mut counts = vec![0u64; n];
        for (p, b) in sends {
            let slot = counts.get_mut(*p).ok_or_else(|| {
                Error::comm("exchange", format!("peer {p} out of range for {n} ranks"))
            })?;
            *slot += b.len() as u64;
        }
        let total: u64 = counts.iter().sum();
        let mut deposit = Vec::new();
        deposit
            .try_reserve_exact(16 * n + total as usize)
            .map_err(|_| Error::OutOfMemory {
                bytes: total,
                what: "exchanged messages".into(),
                rank: Some(self.world_rank()),
            })?;
        let mut off = 0u64;
        for &c in &counts {
            deposit.extend_from_slice(&off.to_le_bytes());
            deposit.extend_from_slice(&c.to_le_bytes());
            off += c;
        }
        for d in 0..n {
            for (_, b) in sends.iter().filter(|(p, _)| *p == d) {
                deposit.extend_from_slice(b);
            }
        }
        let round = self.round(deposit)?;
        let me = self.rank;
        for (o, dep) in round.iter().enumerate() {
            let start = word(dep, 2 * me) as usize + 16 * n;
            let len = word(dep, 2 * me + 1) as usize;
            let got = dep
                .get(start..start + len)
                .ok_or_else(|| Error::comm("exchange", "malformed deposit"))?;
            let want: usize = recvs
                .iter()
                .filter(|(p, _)| *p == o)
                .map(|(_, b)| b.len())
                .sum();
            if want != len {
                return Err(Error::comm(
                    "exchange",
                    format!(
                        "rank {} sent {len} bytes, {want} expected",
                        self.group.world_ranks.get(o).copied().unwrap_or(o)
                    ),
                ));
            }
            let mut at = 0;
            for (_, buf) in recvs.iter_mut().filter(|(p, _)| *p == o) {
                if let Some(s) = got.get(at..at + buf.len()) {
                    buf.copy_from_slice(s);
                }
                at += buf.len();
            }
        }
        Ok(())
    }

    fn abort(&self, code: i32, msg: &str) {
        self.group.abort.set(format!(
            "rank {} aborted (code {code}): {msg}",
            self.world_rank()
        ));
    }

    fn set_timeout(&self, timeout: Option<Duration>) {
        self.timeout.set(timeout);
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout.get()
    }

    fn set_phase(&self, phase: &str) {
        phase.clone_into(&mut self.phase.borrow_mut());
    }
}

/// Runs `f` on `size` ranks, one thread each, and returns every rank's result in rank order.
///
/// A rank that returns an error or panics aborts the thread world, so ranks waiting in a
/// collective for it fail with [`Error::Aborted`] instead of hanging.
pub fn run_threads<T, F>(size: usize, f: F) -> Vec<Result<T>>
where
    T: Send,
    F: Fn(&ThreadComm) -> Result<T> + Sync,
{
    let comms = ThreadComm::world(size);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let f = &f;
                s.spawn(move || {
                    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&comm)));
                    match out {
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) => {
                            comm.abort(1, &e.to_string());
                            Err(e)
                        }
                        Err(_) => {
                            comm.abort(1, "panicked");
                            Err(Error::RankFailed {
                                rank: comm.rank,
                                message: "panicked".into(),
                            })
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::comm("threads", "a rank thread panicked")))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_on_threads() {
        let out = run_threads(4, |c| {
            let mut buf = vec![c.rank() as u8; 5];
            c.broadcast(2, &mut buf)?;
            assert_eq!(buf, vec![2u8; 5]);
            let all = c.all_gather(&[c.rank() as u8 * 10])?;
            assert_eq!(all, vec![vec![0], vec![10], vec![20], vec![30]]);
            // rank r sends [r, d] repeated d+1 times to rank d
            let send = (0..4)
                .map(|d| [c.rank() as u8, d as u8].repeat(d + 1))
                .collect();
            let recv = c.all_to_all_v(send)?;
            for (src, got) in recv.iter().enumerate() {
                assert_eq!(got, &[src as u8, c.rank() as u8].repeat(c.rank() + 1));
            }
            c.barrier()?;
            // Split into even/odd, reversed order by key.
            let sub = c
                .split(Some((c.rank() % 2) as u32), 10 - c.rank())?
                .ok_or_else(|| Error::comm("split", "no sub"))?;
            assert_eq!(sub.size(), 2);
            assert_eq!(sub.rank(), usize::from(c.rank() < 2));
            let mut b = vec![c.rank() as u8];
            sub.broadcast(0, &mut b)?;
            // Sub-rank 0 is the higher world rank of the pair (smaller key).
            assert_eq!(b, vec![(c.rank() % 2 + 2) as u8]);
            let none = c.split(None, 0)?;
            assert!(none.is_none());
            Ok(c.rank())
        });
        let ranks: Vec<usize> = out.into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(ranks, vec![0, 1, 2, 3]);
    }

    #[test]
    fn failed_rank_does_not_hang_others() {
        let start = std::time::Instant::now();
        let out = run_threads(3, |c| {
            if c.rank() == 1 {
                return Err(Error::InvalidFile {
                    file: "model.safetensors".into(),
                    reason: "broken".into(),
                });
            }
            c.barrier()?;
            Ok(())
        });
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(out.iter().all(|r| r.is_err()));
        let msg = out[0].as_ref().unwrap_err().to_string();
        assert!(msg.contains("model.safetensors: broken"), "{msg}");
    }
}
