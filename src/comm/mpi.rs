//! MPI communicator through rsmpi (feature `mpi`).
//!
//! MPI counts are C `int`s, so every transfer is chunked: broadcasts in pieces of at most
//! [`CHUNK`] bytes, all-to-all-v in rounds where each pair moves at most `CHUNK / size` bytes
//! (the round's send buffer, and its `int` displacements, stay under 1 GiB).

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use mpi::Count;

use super::Communicator;
use crate::{Error, Result};

/// Largest single MPI transfer, bytes (well under `i32::MAX`).
pub const CHUNK: usize = 1 << 30;

/// The initialized MPI library. Drop it last, after every [`MpiComm`]: dropping it calls
/// `MPI_Finalize`.
pub struct MpiUniverse {
    universe: Universe,
}

impl MpiUniverse {
    /// Initializes MPI (once per process).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| {
            Error::Comm("MPI is already initialized (or failed to initialize)".into())
        })?;
        Ok(MpiUniverse { universe })
    }

    /// The rsmpi universe, for callers that also use MPI directly.
    pub fn universe(&self) -> &Universe {
        &self.universe
    }

    /// The world communicator.
    pub fn world(&self) -> MpiComm {
        MpiComm {
            comm: self.universe.world(),
            chunk: CHUNK,
        }
    }
}

/// A communicator over MPI.
pub struct MpiComm {
    comm: SimpleCommunicator,
    chunk: usize,
}

impl MpiComm {
    /// Wraps an rsmpi communicator.
    pub fn from_communicator(comm: SimpleCommunicator) -> Self {
        MpiComm { comm, chunk: CHUNK }
    }

    /// Uses transfers of at most `bytes` (clamped to `1..=CHUNK`), inherited by `split`;
    /// small values exercise the chunked paths in tests.
    pub fn with_chunk(mut self, bytes: usize) -> Self {
        self.chunk = bytes.clamp(1, CHUNK);
        self
    }
}

fn count(n: usize) -> Result<Count> {
    Count::try_from(n).map_err(|_| Error::Comm(format!("MPI message of {n} bytes is too large")))
}

/// A zeroed buffer of `len` bytes whose pointer is a real allocation even when `len == 0`:
/// an empty `Vec`'s dangling pointer is `0x1`, which is Open MPI's `MPI_IN_PLACE`.
fn nonempty(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len.max(1));
    v.resize(len, 0);
    v
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
                i32::try_from(c).map_err(|_| Error::Comm(format!("color {c} too large")))?,
            ),
            None => Color::undefined(),
        };
        let key = i32::try_from(key).map_err(|_| Error::Comm(format!("key {key} too large")))?;
        Ok(self.comm.split_by_color_with_key(c, key).map(|comm| {
            Box::new(MpiComm {
                comm,
                chunk: self.chunk,
            }) as Box<dyn Communicator>
        }))
    }

    fn barrier(&self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }

    fn broadcast(&self, root: usize, buf: &mut [u8]) -> Result<()> {
        let root = i32::try_from(root)
            .ok()
            .filter(|&r| r < self.comm.size())
            .ok_or_else(|| Error::Comm(format!("broadcast root {root} out of range")))?;
        let p = self.comm.process_at_rank(root);
        for chunk in buf.chunks_mut(self.chunk) {
            p.broadcast_into(chunk);
        }
        Ok(())
    }

    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.size();
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
        let mut all = nonempty(total);
        let mine = {
            let mut v = nonempty(mine.len());
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
            return Err(Error::Comm(format!(
                "all_to_all_v: {} buffers for {n} ranks",
                send.len()
            )));
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
        let mut recv: Vec<Vec<u8>> = recv_lens
            .iter()
            .map(|&l| Vec::with_capacity(l as usize))
            .collect();
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
            let mut rbuf = nonempty(rcounts.iter().sum());
            let to_counts = |v: &[usize]| -> Result<(Vec<Count>, Vec<Count>)> {
                let mut c = Vec::with_capacity(n);
                let mut d = Vec::with_capacity(n);
                let mut off = 0usize;
                for &x in v {
                    c.push(count(x)?);
                    d.push(count(off)?);
                    off += x;
                }
                Ok((c, d))
            };
            let (sc, sd) = to_counts(&scounts)?;
            let (rc, rd) = to_counts(&rcounts)?;
            {
                let spart = Partition::new(&sbuf[..], &sc[..], &sd[..]);
                let mut rpart = PartitionMut::new(&mut rbuf[..], &rc[..], &rd[..]);
                self.comm.all_to_all_varcount_into(&spart, &mut rpart);
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
            let mut fallback = || -> Result<()> {
                let mut bufs = Vec::with_capacity(n);
                let mut off = 0usize;
                for &c in send_counts {
                    bufs.push(send.get(off..off + c).unwrap_or(&[]).to_vec());
                    off += c;
                }
                let got = self.all_to_all_v(bufs)?;
                let mut off = 0usize;
                for (g, &c) in got.iter().zip(recv_counts) {
                    if let Some(t) = recv.get_mut(off..off + c) {
                        if g.len() == c {
                            t.copy_from_slice(g);
                        }
                    }
                    off += c;
                }
                Ok(())
            };
            return fallback();
        }
        let to_counts = |v: &[usize]| -> Result<(Vec<Count>, Vec<Count>)> {
            let mut c = Vec::with_capacity(n);
            let mut d = Vec::with_capacity(n);
            let mut off = 0usize;
            for &x in v {
                c.push(count(x)?);
                d.push(count(off)?);
                off += x;
            }
            Ok((c, d))
        };
        let (sc, sd) = to_counts(send_counts)?;
        let (rc, rd) = to_counts(recv_counts)?;
        // Empty slices have the dangling pointer 0x1, Open MPI's MPI_IN_PLACE: use a dummy.
        let mut dummy_s = nonempty(0);
        let mut dummy_r = nonempty(0);
        let sbuf: &[u8] = if send.is_empty() { &dummy_s[..] } else { send };
        let rbuf: &mut [u8] = if recv.is_empty() {
            &mut dummy_r[..]
        } else {
            recv
        };
        {
            let spart = Partition::new(sbuf, &sc[..], &sd[..]);
            let mut rpart = PartitionMut::new(rbuf, &rc[..], &rd[..]);
            self.comm.all_to_all_varcount_into(&spart, &mut rpart);
        }
        dummy_s.clear();
        Ok(())
    }

    fn abort(&self, code: i32, msg: &str) {
        eprintln!("error: rank {}: {msg}", self.rank());
        self.comm.abort(code)
    }
}
