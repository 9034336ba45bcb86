//! MPI communicator through rsmpi (feature `mpi`).
//!
//! MPI counts are C `int`s, so every transfer is chunked: broadcasts in pieces of at most
//! [`CHUNK`] bytes, all-to-all-v in rounds where each pair moves at most `CHUNK / size` bytes
//! (the round's send buffer, and its `int` displacements, stay under 1 GiB).
//!
//! Timeouts: MPI's blocking collectives cannot be interrupted, so broadcasts, barriers and
//! all-to-alls run as non-blocking collectives (`MPI_Ibcast`, ...) polled against the
//! deadline. Every all-gather and barrier (the agreement steps) starts with an arrival
//! handshake, a one-byte message from every rank to every other, so a rank that times out
//! can name the ranks that never arrived. Either way the timed-out rank prints one line and
//! calls `MPI_Abort`, which ends every process of the job.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source};
use mpi::request::{Request, Scope};
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use mpi::Count;

use super::{timeout_error, Communicator};
use crate::{Error, Result};

/// Largest single MPI transfer, bytes (well under `i32::MAX`).
pub const CHUNK: usize = 1 << 30;

/// Tag of the arrival handshake's messages (any tag: collectives never match point-to-point).
const ARRIVAL_TAG: i32 = 0x5afe;

/// The initialized MPI library. Drop it last, after every [`MpiComm`]: dropping it calls
/// `MPI_Finalize`.
pub struct MpiUniverse {
    universe: Universe,
}

impl MpiUniverse {
    /// Initializes MPI (once per process).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::comm("MPI", "already initialized (or failed to initialize)"))?;
        Ok(MpiUniverse { universe })
    }

    /// The rsmpi universe, for callers that also use MPI directly.
    pub fn universe(&self) -> &Universe {
        &self.universe
    }

    /// The world communicator.
    pub fn world(&self) -> MpiComm {
        MpiComm::from_communicator(self.universe.world())
    }
}

/// A communicator over MPI.
pub struct MpiComm {
    comm: SimpleCommunicator,
    chunk: usize,
    timeout: Cell<Option<Duration>>,
    phase: RefCell<String>,
    /// World rank of each member (for messages about ranks that did not arrive).
    world_ranks: Vec<usize>,
}

impl MpiComm {
    /// Wraps an rsmpi communicator (taken to be the world: its ranks name themselves).
    pub fn from_communicator(comm: SimpleCommunicator) -> Self {
        let size = usize::try_from(comm.size()).unwrap_or(0);
        MpiComm {
            comm,
            chunk: CHUNK,
            timeout: Cell::new(None),
            phase: RefCell::new("start".into()),
            world_ranks: (0..size).collect(),
        }
    }

    fn world_rank(&self, r: usize) -> usize {
        self.world_ranks.get(r).copied().unwrap_or(r)
    }

    /// Prints the timeout message and ends the job.
    fn timed_out(&self, timeout: Duration, missing: Option<&[usize]>) -> ! {
        let missing: Option<Vec<usize>> =
            missing.map(|m| m.iter().map(|&r| self.world_rank(r)).collect());
        let e = timeout_error(
            self.world_rank(self.rank()),
            &self.phase.borrow(),
            timeout,
            missing.as_deref(),
        );
        eprintln!("error: {e}");
        self.comm.abort(1)
    }

    /// Waits for `req`, polling against the timeout (plain `MPI_Wait` without one).
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, req: Request<'a, D, S>) {
        let Some(timeout) = self.timeout.get() else {
            req.wait();
            return;
        };
        let start = Instant::now();
        let mut req = req;
        let mut spins = 0u32;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            if start.elapsed() >= timeout {
                self.timed_out(timeout, None);
            }
            backoff(&mut spins);
        }
    }

    /// The arrival handshake: returns once every rank of the communicator has reached the
    /// same collective; a rank still waiting at the deadline names the absent ranks and ends
    /// the job. Messages between two ranks never overtake each other, so the k-th arrival
    /// matches the k-th collective.
    fn arrive(&self) {
        let n = self.size();
        let me = self.rank();
        if n < 2 {
            return;
        }
        let timeout = self.timeout.get();
        let start = Instant::now();
        let token = [1u8];
        let mut got = vec![[0u8; 1]; n];
        mpi::request::scope(|sc| {
            let mut sends = Vec::with_capacity(n);
            let mut recvs = Vec::with_capacity(n);
            for (peer, slot) in got.iter_mut().enumerate() {
                if peer == me {
                    continue;
                }
                let p = self.comm.process_at_rank(peer as i32);
                sends.push(p.immediate_send_with_tag(sc, &token[..], ARRIVAL_TAG));
                recvs.push((
                    peer,
                    p.immediate_receive_into_with_tag(sc, &mut slot[..], ARRIVAL_TAG),
                ));
            }
            let mut spins = 0u32;
            while !recvs.is_empty() {
                recvs = recvs
                    .into_iter()
                    .filter_map(|(peer, r)| r.test().err().map(|r| (peer, r)))
                    .collect();
                if recvs.is_empty() {
                    break;
                }
                if let Some(t) = timeout {
                    if start.elapsed() >= t {
                        let missing: Vec<usize> = recvs.iter().map(|(p, _)| *p).collect();
                        self.timed_out(t, Some(&missing));
                    }
                }
                backoff(&mut spins);
            }
            for s in sends {
                self.wait(s);
            }
        });
    }

    /// Uses transfers of at most `bytes` (clamped to `1..=CHUNK`), inherited by `split`;
    /// small values exercise the chunked paths in tests.
    pub fn with_chunk(mut self, bytes: usize) -> Self {
        self.chunk = bytes.clamp(1, CHUNK);
        self
    }
}

/// Spin briefly (collectives usually finish within microseconds), then sleep between polls.
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 1000 {
        std::hint::spin_loop();
    } else if *spins < 2000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn count(n: usize) -> Result<Count> {
    Count::try_from(n)
        .map_err(|_| Error::comm("MPI", format!("a message of {n} bytes is too large")))
}

/// MPI counts and displacements (running offsets) of packed blocks of lengths `v`.
fn counts_displs(v: &[usize]) -> Result<(Vec<Count>, Vec<Count>)> {
    let mut c = Vec::with_capacity(v.len());
    let mut d = Vec::with_capacity(v.len());
    let mut off = 0usize;
    for &x in v {
        c.push(count(x)?);
        d.push(count(off)?);
        off += x;
    }
    Ok((c, d))
}

/// A zeroed buffer of `len` bytes whose pointer is a real allocation even when `len == 0`:
/// an empty `Vec`'s dangling pointer is `0x1`, which is Open MPI's `MPI_IN_PLACE`.
fn nonempty(len: usize) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    // Sized by what peers announce: allocated fallibly.
    v.try_reserve_exact(len.max(1))
        .map_err(|_| Error::OutOfMemory {
            bytes: len as u64,
            what: "an MPI receive buffer".into(),
            rank: None,
        })?;
    v.resize(len, 0);
    Ok(v)
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn split(&self, color: Option<u32>, key: usize) -> Result<Option<Box<dyn Communicator>>> {
        let c = match color {
            Some(c) => Color::with_value(
                i32::try_from(c)
                    .map_err(|_| Error::comm("MPI split", format!("color {c} too large")))?,
            ),
            None => Color::undefined(),
        };
        let key = i32::try_from(key)
            .map_err(|_| Error::comm("MPI split", format!("key {key} too large")))?;
        // The world ranks of the new communicator's members, in its rank order.
        let me = self.world_rank(self.rank()) as u64;
        let mut all = vec![0u64; self.size()];
        self.arrive();
        self.comm.all_gather_into(&me, &mut all[..]);
        let mut keys = vec![(0i32, 0i32, 0i32); self.size()];
        let mine = (
            i32::from(color.is_some()),
            color.map_or(0, |c| c as i32),
            key,
        );
        let flat = [mine.0, mine.1, mine.2];
        let mut flat_all = vec![0i32; 3 * self.size()];
        self.comm.all_gather_into(&flat[..], &mut flat_all[..]);
        for (k, w) in keys.iter_mut().zip(flat_all.chunks_exact(3)) {
            if let [a, b, c] = *w {
                *k = (a, b, c);
            }
        }
        let mut members: Vec<(i32, usize)> = keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.0 == 1 && k.0 == mine.0 && k.1 == mine.1)
            .map(|(r, k)| (k.2, r))
            .collect();
        members.sort_unstable();
        let world_ranks: Vec<usize> = members
            .iter()
            .map(|&(_, r)| all.get(r).map_or(r, |&w| w as usize))
            .collect();
        Ok(self.comm.split_by_color_with_key(c, key).map(|comm| {
            Box::new(MpiComm {
                comm,
                chunk: self.chunk,
                timeout: Cell::new(self.timeout.get()),
                phase: RefCell::new(self.phase.borrow().clone()),
                world_ranks,
            }) as Box<dyn Communicator>
        }))
    }

    fn barrier(&self) -> Result<()> {
        self.arrive();
        self.wait(self.comm.immediate_barrier());
        Ok(())
    }

    fn broadcast(&self, root: usize, buf: &mut [u8]) -> Result<()> {
        let root = i32::try_from(root)
            .ok()
            .filter(|&r| r < self.comm.size())
            .ok_or_else(|| Error::comm("broadcast", format!("root {root} out of range")))?;
        let p = self.comm.process_at_rank(root);
        for chunk in buf.chunks_mut(self.chunk) {
            mpi::request::scope(|sc| self.wait(p.immediate_broadcast_into(sc, chunk)));
        }
        Ok(())
    }

    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.size();
        self.arrive();
        let my_len = count(mine.len())?;
        let mut lens = vec![0 as Count; n];
        self.comm.all_gather_into(&my_len, &mut lens[..]);
        let mut displs = Vec::with_capacity(n);
        let mut total: usize = 0;
        for &l in &lens {
            displs.push(count(total)?);
            total += usize::try_from(l).unwrap_or(0);
        }
        count(total)?;
        let mut all = nonempty(total)?;
        let mine = {
            let mut v = nonempty(mine.len())?;
            v.copy_from_slice(mine);
            v
        };
        {
            let mut part = PartitionMut::new(&mut all[..], &lens[..], &displs[..]);
            self.comm.all_gather_varcount_into(&mine[..], &mut part);
        }
        let mut out = Vec::with_capacity(n);
        for (&d, &l) in displs.iter().zip(&lens) {
            let (d, l) = (d as usize, l as usize);
            out.push(all.get(d..d + l).map(<[u8]>::to_vec).unwrap_or_default());
        }
        Ok(out)
    }

    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>> {
        let n = self.size();
        if send.len() != n {
            return Err(Error::comm(
                "all_to_all_v",
                format!("{} buffers for {n} ranks", send.len()),
            ));
        }
        // Sizes first (u64, so no count limit), then rounds of bounded chunks.
        let send_lens: Vec<u64> = send.iter().map(|s| s.len() as u64).collect();
        let mut recv_lens = vec![0u64; n];
        self.comm
            .all_to_all_into(&send_lens[..], &mut recv_lens[..]);
        let per_pair = (self.chunk / n.max(1)).max(1) as u64;
        let my_max = send_lens
            .iter()
            .chain(&recv_lens)
            .copied()
            .max()
            .unwrap_or(0);
        let mut maxes = vec![0u64; n];
        self.comm.all_gather_into(&my_max, &mut maxes[..]);
        let rounds = maxes.iter().copied().max().unwrap_or(0).div_ceil(per_pair);
        // Sized by what peers announce: allocated fallibly.
        let mut recv: Vec<Vec<u8>> = Vec::with_capacity(n);
        for (i, &l) in recv_lens.iter().enumerate() {
            let mut v = Vec::new();
            usize::try_from(l)
                .ok()
                .and_then(|l| v.try_reserve_exact(l).ok())
                .ok_or_else(|| Error::OutOfMemory {
                    bytes: l,
                    what: format!("receiving from rank {}", self.world_rank(i)),
                    rank: Some(self.world_rank(self.rank())),
                })?;
            recv.push(v);
        }
        for k in 0..rounds {
            let lo = k * per_pair;
            let piece = |len: u64| len.saturating_sub(lo).min(per_pair) as usize;
            let scounts: Vec<usize> = send_lens.iter().map(|&l| piece(l)).collect();
            let rcounts: Vec<usize> = recv_lens.iter().map(|&l| piece(l)).collect();
            let mut sbuf = Vec::with_capacity(scounts.iter().sum::<usize>().max(1));
            for (s, &c) in send.iter().zip(&scounts) {
                let start = lo as usize;
                sbuf.extend_from_slice(s.get(start..start + c).unwrap_or(&[]));
            }
            let mut rbuf = nonempty(rcounts.iter().sum())?;
            let (sc, sd) = counts_displs(&scounts)?;
            let (rc, rd) = counts_displs(&rcounts)?;
            {
                let spart = Partition::new(&sbuf[..], &sc[..], &sd[..]);
                let mut rpart = PartitionMut::new(&mut rbuf[..], &rc[..], &rd[..]);
                mpi::request::scope(|scope| {
                    self.wait(
                        self.comm
                            .immediate_all_to_all_varcount_into(scope, &spart, &mut rpart),
                    )
                });
            }
            for ((r, &d), &c) in recv.iter_mut().zip(&rd).zip(&rcounts) {
                let d = d as usize;
                r.extend_from_slice(rbuf.get(d..d + c).unwrap_or(&[]));
            }
        }
        Ok(recv)
    }

    fn all_to_all_packed(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<()> {
        let n = self.size();
        let fits = |counts: &[usize], len: usize| {
            counts.len() == n
                && counts.iter().sum::<usize>() == len
                && len <= i32::MAX as usize
                && counts.iter().all(|&c| c <= self.chunk)
        };
        // Every rank must take the same path: agree on whether all fit in one call.
        let mine = u8::from(fits(send_counts, send.len()) && fits(recv_counts, recv.len()));
        let mut all = vec![0u8; n];
        self.comm.all_gather_into(&mine, &mut all[..]);
        if all.contains(&0) {
            // Too large for one call somewhere: the chunked rounds of all_to_all_v.
            return super::packed_through_vectors(
                self,
                send,
                send_counts,
                recv,
                recv_counts,
                |i| self.world_rank(i),
            );
        }
        let (sc, sd) = counts_displs(send_counts)?;
        let (rc, rd) = counts_displs(recv_counts)?;
        // Empty slices have the dangling pointer 0x1, Open MPI's MPI_IN_PLACE: use a dummy.
        let mut dummy_s = nonempty(0)?;
        let mut dummy_r = nonempty(0)?;
        let sbuf: &[u8] = if send.is_empty() { &dummy_s[..] } else { send };
        let rbuf: &mut [u8] = if recv.is_empty() {
            &mut dummy_r[..]
        } else {
            recv
        };
        {
            let spart = Partition::new(sbuf, &sc[..], &sd[..]);
            let mut rpart = PartitionMut::new(rbuf, &rc[..], &rd[..]);
            mpi::request::scope(|scope| {
                self.wait(
                    self.comm
                        .immediate_all_to_all_varcount_into(scope, &spart, &mut rpart),
                )
            });
        }
        dummy_s.clear();
        Ok(())
    }

    fn abort(&self, code: i32, msg: &str) {
        eprintln!("error: rank {}: {msg}", self.world_rank(self.rank()));
        self.comm.abort(code)
    }

    fn set_timeout(&self, timeout: Option<Duration>) {
        self.timeout.set(timeout);
    }

    fn set_phase(&self, phase: &str) {
        phase.clone_into(&mut self.phase.borrow_mut());
    }
}
