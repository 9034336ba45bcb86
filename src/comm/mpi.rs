//! MPI communicator through rsmpi (feature `mpi`).
//!
//! MPI counts are C `int`s, so every transfer is chunked: broadcasts in pieces of at most
//! [`CHUNK`] bytes, all-to-all-v in rounds where each pair moves at most `CHUNK / size` bytes
//! (the round's send buffer, and its `int` displacements, stay under 1 GiB).
//!
//! Deadlines. MPI's blocking collectives cannot be interrupted, so every collective runs as
//! non-blocking ones (`MPI_Ibcast`, `MPI_Iallgather`, ...) polled against the timeout, and
//! starts with an arrival handshake, a one-byte message from every rank to every other, so a
//! rank that times out can name the ranks that never arrived. A rank can also stop after it
//! arrived, in the middle of a transfer: the rank that times out then probes every rank of
//! the world (a one-byte message on `MPI_COMM_WORLD` that every rank answers from whatever
//! wait it polls) and names those that do not answer within a grace period. Either way it
//! prints one line and calls `MPI_Abort`, which ends every process of the job. The waits that
//! cannot be polled (`MPI_Init`, `MPI_Comm_split`, `MPI_Finalize`) are bounded by the process
//! [`watchdog`](super::watchdog), armed before `MPI_Init` by
//! [`MpiUniverse::init_with_timeout`].

use std::cell::{Cell, RefCell};
use std::mem::ManuallyDrop;
use std::time::{Duration, Instant};

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source};
use mpi::request::{Request, Scope, StaticScope};
use mpi::topology::{Color, Communicator as _, Group as _, SimpleCommunicator};
use mpi::Count;

use super::deadline::{probe_grace, stopped_error, Deadline, Expiry};
use super::{watchdog, Communicator};
use crate::{Error, Result};

/// Largest single MPI transfer, bytes (well under `i32::MAX`).
pub const CHUNK: usize = 1 << 30;

/// Tag of the arrival handshake's messages (any tag: collectives never match point-to-point).
const ARRIVAL_TAG: i32 = 0x5afe;
/// Tag of [`Communicator::exchange`]'s messages (between two ranks they match in order).
const EXCHANGE_TAG: i32 = 0x5b01;
/// Tags of the liveness probe after a timeout and of its answers (on `MPI_COMM_WORLD`).
const PROBE_TAG: i32 = 0x5aff;
const ANSWER_TAG: i32 = 0x5b00;

/// Beyond a polled wait's own deadline and probe, the watchdog's margin before it steps in
/// (the polled wait normally aborts the job first, with the better message).
const WATCHDOG_SLACK: Duration = Duration::from_secs(5);

/// The initialized MPI library. Drop it last, after every [`MpiComm`]: dropping it calls
/// `MPI_Finalize` (under the watchdog's deadline when one was given).
pub struct MpiUniverse {
    universe: ManuallyDrop<Universe>,
    timeout: Option<Duration>,
}

impl MpiUniverse {
    /// Initializes MPI (once per process), without deadlines on start-up and finalize.
    pub fn init() -> Result<Self> {
        Self::init_with_timeout(None)
    }

    /// Initializes MPI under a deadline. `MPI_Init` and `MPI_Finalize` wait in the launcher's
    /// fence for every process of the job, so a process stopped before or inside them would
    /// keep the others waiting forever: with `Some(timeout)` the process
    /// [`watchdog`](super::watchdog::arm) is armed first, and a wait in either that outlives
    /// `timeout` prints one line naming the phase (`MPI start-up`, `MPI finalize`) and the
    /// stopped ranks of this node, and ends the process (exit 1; the launcher ends the job).
    /// [`MpiUniverse::world`] starts with the same timeout.
    pub fn init_with_timeout(timeout: Option<Duration>) -> Result<Self> {
        if timeout.is_some() {
            watchdog::arm()?;
        }
        let start = watchdog::watch("MPI start-up", timeout);
        let universe = mpi::initialize()
            .ok_or_else(|| Error::comm("MPI", "already initialized (or failed to initialize)"))?;
        drop(start);
        Ok(MpiUniverse {
            universe: ManuallyDrop::new(universe),
            timeout,
        })
    }

    /// The rsmpi universe, for callers that also use MPI directly.
    pub fn universe(&self) -> &Universe {
        &self.universe
    }

    /// The world communicator (with the universe's timeout).
    pub fn world(&self) -> MpiComm {
        let world = MpiComm::from_communicator(self.universe.world());
        world.set_timeout(self.timeout);
        world
    }
}

impl Drop for MpiUniverse {
    fn drop(&mut self) {
        let _finalize = watchdog::watch("MPI finalize", self.timeout);
        // SAFETY: dropped once, here; the field is not used afterwards.
        unsafe { ManuallyDrop::drop(&mut self.universe) };
    }
}

/// A communicator over MPI.
pub struct MpiComm {
    comm: SimpleCommunicator,
    chunk: usize,
    timeout: Cell<Option<Duration>>,
    phase: RefCell<String>,
    /// Rank in `MPI_COMM_WORLD` of each member (messages name world ranks; probes go there).
    world_ranks: Vec<usize>,
}

impl MpiComm {
    /// Wraps an rsmpi communicator; its members are named by their `MPI_COMM_WORLD` ranks.
    pub fn from_communicator(comm: SimpleCommunicator) -> Self {
        let size = comm.size();
        let world = SimpleCommunicator::world();
        let world_ranks = comm
            .group()
            .translate_ranks(&(0..size).collect::<Vec<_>>(), &world.group())
            .into_iter()
            .zip(0..)
            .map(|(w, r)| w.map_or(r, |w| w as usize))
            .collect();
        MpiComm {
            comm,
            chunk: CHUNK,
            timeout: Cell::new(None),
            phase: RefCell::new("start".into()),
            world_ranks,
        }
    }

    fn world_rank(&self, r: usize) -> usize {
        self.world_ranks.get(r).copied().unwrap_or(r)
    }

    /// The watchdog's backstop on a polled wait (which normally ends the job itself).
    fn watch(&self) -> Option<watchdog::Watch<'static>> {
        let t = self.timeout.get()?;
        watchdog::watch(
            &self.phase.borrow(),
            Some(t + probe_grace(t) + WATCHDOG_SLACK),
        )
    }

    /// Names the ranks that kept this one waiting past `timeout` and ends the job.
    /// `absent`: members that did not arrive (`None` in the middle of a transfer). A process
    /// that was itself stopped past the deadline (`Frozen`) says so instead.
    fn timed_out(&self, timeout: Duration, how: Expiry, absent: Option<&[usize]>) -> ! {
        if let Expiry::Frozen(gap) = how {
            let e = stopped_error(
                self.world_rank(self.rank()),
                &self.phase.borrow(),
                timeout,
                gap,
            );
            super::eprint_line(&format!("error: {e}"));
            self.comm.abort(1)
        }
        let e = Error::Timeout {
            rank: self.world_rank(self.rank()),
            phase: self.phase.borrow().clone(),
            after: timeout,
            missing: absent.map(|m| m.iter().map(|&r| self.world_rank(r)).collect()),
            silent: Some(silent_ranks(probe_grace(timeout)).into()),
            stopped_for: None,
        };
        super::eprint_line(&format!("error: {e}"));
        self.comm.abort(1)
    }

    /// Waits for `req`, polling against the timeout (plain `MPI_Wait` without one).
    fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, req: Request<'a, D, S>) {
        let Some(timeout) = self.timeout.get() else {
            req.wait();
            return;
        };
        let _watch = self.watch();
        let mut deadline = Deadline::new(timeout);
        let mut req = req;
        let mut spins = 0u32;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            match deadline.poll() {
                Expiry::Pending => {}
                how => self.timed_out(timeout, how, None),
            }
            idle(&mut spins);
        }
    }

    /// Waits for every request of `reqs`, polling against the timeout. A receive (`Some`
    /// with the sender and the length posted) that got fewer bytes is an error naming the
    /// sender (more is MPI's truncation error).
    fn wait_all<'a, S: Scope<'a>>(&self, reqs: Vec<Pending<'a, S>>) -> Result<()> {
        let timeout = self.timeout.get();
        let _watch = self.watch();
        let mut deadline = timeout.map(Deadline::new);
        let mut pending = reqs;
        let mut short: Option<(usize, usize, usize)> = None;
        let mut spins = 0u32;
        while !pending.is_empty() {
            pending = pending
                .into_iter()
                .filter_map(|(recv, r)| match r.test() {
                    Ok(status) => {
                        if let Some((peer, want)) = recv {
                            let got = usize::try_from(status.count(u8::equivalent_datatype()))
                                .unwrap_or(0);
                            if got != want && short.is_none() {
                                short = Some((peer, got, want));
                            }
                        }
                        None
                    }
                    Err(r) => Some((recv, r)),
                })
                .collect();
            if pending.is_empty() {
                break;
            }
            if let (Some(t), Some(d)) = (timeout, deadline.as_mut()) {
                match d.poll() {
                    Expiry::Pending => {}
                    how => self.timed_out(t, how, None),
                }
            }
            idle(&mut spins);
        }
        match short {
            None => Ok(()),
            Some((peer, got, want)) => Err(Error::comm(
                "exchange",
                format!(
                    "rank {} sent a message of {got} bytes, {want} expected",
                    self.world_rank(peer)
                ),
            )),
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
        let _watch = self.watch();
        let mut deadline = timeout.map(Deadline::new);
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
                if let (Some(t), Some(d)) = (timeout, deadline.as_mut()) {
                    match d.poll() {
                        Expiry::Pending => {}
                        how => {
                            let missing: Vec<usize> = recvs.iter().map(|(p, _)| *p).collect();
                            self.timed_out(t, how, Some(&missing));
                        }
                    }
                }
                idle(&mut spins);
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

    /// `MPI_Iallgather` of one value per rank, polled.
    fn gather_each<T: mpi::datatype::Equivalence + Copy + Default>(&self, mine: &T) -> Vec<T> {
        let mut all = vec![T::default(); self.size()];
        mpi::request::scope(|sc| {
            self.wait(self.comm.immediate_all_gather_into(sc, mine, &mut all[..]));
        });
        all
    }
}

/// A request of [`Communicator::exchange`]: for a receive, the sender and the length posted.
type Pending<'a, S> = (Option<(usize, usize)>, Request<'a, [u8], S>);

/// Between two polls: spin briefly (collectives usually finish within microseconds), then
/// sleep; now and then answer the liveness probes of ranks that timed out.
fn idle(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins % 256 == 0 || *spins >= 2000 {
        answer_probes();
    }
    backoff(spins);
}

fn backoff(spins: &mut u32) {
    if *spins < 1000 {
        std::hint::spin_loop();
    } else if *spins < 2000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Answers every pending liveness probe (from ranks that timed out somewhere).
fn answer_probes() {
    let world = SimpleCommunicator::world();
    while let Some((msg, status)) = world
        .any_process()
        .immediate_matched_probe_with_tag(PROBE_TAG)
    {
        let mut b = [0u8; 1];
        msg.matched_receive_into(&mut b[..]);
        // One byte: sent eagerly, and the prober has posted its receive.
        world
            .process_at_rank(status.source_rank())
            .send_with_tag(&b[..], ANSWER_TAG);
    }
}

/// The world ranks that do not answer a liveness probe within `grace` (this rank answers the
/// others' probes meanwhile: every rank that timed out probes at about the same time).
/// Called only on the way to `MPI_Abort`.
fn silent_ranks(grace: Duration) -> Vec<usize> {
    static PROBE: [u8; 1] = [1];
    let world = SimpleCommunicator::world();
    let n = usize::try_from(world.size()).unwrap_or(0);
    let me = usize::try_from(world.rank()).unwrap_or(0);
    // Requests to a stopped rank never complete and MPI keeps their buffers: leaked on
    // purpose (once, just before the job ends).
    let answers: &'static mut [[u8; 1]] = Box::leak(vec![[0u8; 1]; n].into_boxed_slice());
    let mut pending = Vec::with_capacity(n);
    let mut sends = Vec::with_capacity(n);
    for (peer, slot) in answers.iter_mut().enumerate() {
        if peer == me {
            continue;
        }
        let p = world.process_at_rank(peer as i32);
        pending.push((
            peer,
            p.immediate_receive_into_with_tag(StaticScope, &mut slot[..], ANSWER_TAG),
        ));
        sends.push(p.immediate_send_with_tag(StaticScope, &PROBE[..], PROBE_TAG));
    }
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        pending = pending
            .into_iter()
            .filter_map(|(peer, r)| r.test().err().map(|r| (peer, r)))
            .collect();
        sends = sends.into_iter().filter_map(|r| r.test().err()).collect();
        if pending.is_empty() || start.elapsed() >= grace {
            break;
        }
        answer_probes();
        spins = spins.saturating_add(1);
        backoff(&mut spins);
    }
    let silent = pending.iter().map(|(peer, _)| *peer).collect();
    for (_, r) in pending {
        // SAFETY: the buffer is 'static; the request is left to MPI until the job ends.
        let _ = unsafe { r.into_raw() };
    }
    for r in sends {
        // SAFETY: as above.
        let _ = unsafe { r.into_raw() };
    }
    silent
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
        self.arrive();
        let all = self.gather_each(&me);
        let mut keys = vec![(0i32, 0i32, 0i32); self.size()];
        let mine = (
            i32::from(color.is_some()),
            color.map_or(0, |c| c as i32),
            key,
        );
        let flat = [mine.0, mine.1, mine.2];
        let mut flat_all = vec![0i32; 3 * self.size()];
        mpi::request::scope(|sc| {
            self.wait(
                self.comm
                    .immediate_all_gather_into(sc, &flat[..], &mut flat_all[..]),
            );
        });
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
        // MPI_Comm_split blocks: every rank arrived just before, the watchdog bounds it.
        let _split = watchdog::watch(&self.phase.borrow(), self.timeout.get());
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
        self.arrive();
        for chunk in buf.chunks_mut(self.chunk) {
            mpi::request::scope(|sc| self.wait(p.immediate_broadcast_into(sc, chunk)));
        }
        Ok(())
    }

    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.size();
        self.arrive();
        let my_len = count(mine.len())?;
        let lens = self.gather_each(&my_len);
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
            mpi::request::scope(|sc| {
                self.wait(
                    self.comm
                        .immediate_all_gather_varcount_into(sc, &mine[..], &mut part),
                );
            });
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
        self.arrive();
        mpi::request::scope(|sc| {
            self.wait(
                self.comm
                    .immediate_all_to_all_into(sc, &send_lens[..], &mut recv_lens[..]),
            );
        });
        let per_pair = (self.chunk / n.max(1)).max(1) as u64;
        let my_max = send_lens
            .iter()
            .chain(&recv_lens)
            .copied()
            .max()
            .unwrap_or(0);
        let maxes = self.gather_each(&my_max);
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
        self.arrive();
        let all = self.gather_each(&mine);
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

    fn exchange(&self, sends: &[(usize, &[u8])], recvs: &mut [(usize, &mut [u8])]) -> Result<()> {
        let n = self.size();
        let peer = |p: usize| {
            i32::try_from(p)
                .ok()
                .filter(|_| p < n)
                .ok_or_else(|| Error::comm("exchange", format!("peer {p} out of range")))
        };
        let targets: Vec<i32> = sends.iter().map(|(p, _)| peer(*p)).collect::<Result<_>>()?;
        let sources: Vec<i32> = recvs.iter().map(|(p, _)| peer(*p)).collect::<Result<_>>()?;
        self.arrive();
        // Every message straight from and into the callers' memory (single-copy for large
        // messages between processes of one node); messages over `chunk` bytes go as
        // consecutive pieces, cut the same way on both sides.
        let chunk = self.chunk;
        mpi::request::scope(|sc| {
            let mut reqs = Vec::with_capacity(sends.len() + recvs.len());
            for ((p, buf), &src) in recvs.iter_mut().zip(&sources) {
                let from = self.comm.process_at_rank(src);
                for piece in buf.chunks_mut(chunk) {
                    let want = Some((*p, piece.len()));
                    reqs.push((
                        want,
                        from.immediate_receive_into_with_tag(sc, piece, EXCHANGE_TAG),
                    ));
                }
            }
            for ((_, bytes), &dst) in sends.iter().zip(&targets) {
                let to = self.comm.process_at_rank(dst);
                for piece in bytes.chunks(chunk) {
                    reqs.push((None, to.immediate_send_with_tag(sc, piece, EXCHANGE_TAG)));
                }
            }
            self.wait_all(reqs)
        })
    }

    fn abort(&self, code: i32, msg: &str) {
        super::eprint_line(&format!(
            "error: rank {}: {msg}",
            self.world_rank(self.rank())
        ));
        self.comm.abort(code)
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
