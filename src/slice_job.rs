//! A job made of explicit slice requests instead of a sharding spec: what a trainer's state
//! dict asks for ([`crate::plan::requests`]), loaded rank by rank or together under a share
//! mode, straight into the caller's memory.

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::comm::{agree, agree_fields, Communicator};
use crate::dist::{choose_share, load_shared_into, ShareMode, ShareOptions, SharedPlan, Traffic};
use crate::load::{load_rank_scattered, RankTensors};
use crate::plan::requests::{build_requests, SliceRequest};
use crate::plan::Plan;
use crate::{Error, Result};

/// Most bytes of one rank's encoded requests accepted from a peer (a state dict of a million
/// tensors stays far below it).
const MAX_REQUEST_BYTES: usize = 1 << 30;

/// Largest world in which ranks that read alone (`ShareMode::None`) still all-gather their
/// requests to find the spans their node reads together; above it the gather costs more
/// than it saves and each rank asks for exactly its pages.
const MAX_NODE_SPANS_WORLD: usize = 256;

/// A checkpoint opened for slice requests (headers only).
///
/// ```
/// # fn main() -> safeshard::Result<()> {
/// use safeshard::comm::{run_threads, Communicator};
/// use safeshard::plan::requests::SliceRequest;
/// use safeshard::{ShareMode, ShareOptions, SliceJob};
/// # let dir = tempfile::tempdir().map_err(|e| safeshard::Error::io("tmp", e))?;
/// # safeshard::synth::write_checkpoint(dir.path(), &safeshard::synth::SynthOptions::preset("llama-tiny")?)?;
/// let job = SliceJob::open(dir.path())?;
/// let name = "model.embed_tokens.weight";
/// let shape = job.checkpoint().tensor(name).map(|t| t.shape.clone()).unwrap_or_default();
/// // Two ranks, each holding half of the rows, read into their own buffers.
/// let opts = ShareOptions { mode: ShareMode::ReadOnce, ..ShareOptions::default() };
/// let results = run_threads(2, |comm| {
///     let half = shape[0] / 2;
///     let rows = if comm.rank() == 0 { (0, half) } else { (half, shape[0]) };
///     let mut ranges = vec![vec![rows]];
///     ranges.extend(shape[1..].iter().map(|&n| vec![(0, n)]));
///     let req = SliceRequest { dest: "embed".into(), source: name.into(), ranges };
///     let mut buf = vec![0u8; ((rows.1 - rows.0) * shape[1] * 2) as usize];
///     job.load_collective(comm, &[req], &opts, &mut [("embed", &mut buf[..])])?;
///     Ok(buf)
/// });
/// for r in results {
///     assert!(r?.iter().any(|&b| b != 0));
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SliceJob {
    ckpt: Checkpoint,
}

impl SliceJob {
    /// Opens a checkpoint: a `.safetensors` file, an index or a directory.
    pub fn open(checkpoint: impl AsRef<Path>) -> Result<SliceJob> {
        Ok(SliceJob {
            ckpt: Checkpoint::open(checkpoint)?,
        })
    }

    /// The catalog: every tensor's name, dtype and shape.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.ckpt
    }

    /// The plan of a job whose rank `r` holds `per_rank[r]` (see
    /// [`crate::plan::requests::build_requests`]).
    pub fn plan(&self, per_rank: &[Vec<SliceRequest>]) -> Result<Plan> {
        build_requests(&self.ckpt, per_rank)
    }

    /// Loads this rank's requests together with the other ranks of `world` (collective: every
    /// rank calls it, each with its own requests), the tensors named in `into` written
    /// straight into those buffers (exactly their bytes, row-major) and the others into the
    /// returned [`RankTensors`].
    ///
    /// With [`ShareMode::None`] each rank plans and reads its own requests; with the other
    /// modes the ranks all-gather their requests, every rank builds the same plan of the
    /// whole job and the share mode reads shared bytes once ([`crate::dist`]: plan hashes
    /// compared first), writing the tensors of `into` straight into their buffers too. Ranks agree
    /// after every step that can fail on one of them (planning, the buffers, the reads), so
    /// a failure anywhere is an error on every rank and no caller buffer is written before
    /// every rank's plan and buffers were checked.
    pub fn load_collective(
        &self,
        world: &dyn Communicator,
        mine: &[SliceRequest],
        opts: &ShareOptions,
        into: &mut [(&str, &mut [u8])],
    ) -> Result<(RankTensors, Traffic)> {
        load_collective(Ok(self), world, mine, opts, into)
    }
}

/// [`SliceJob::load_collective`] for a rank that may have failed before it could call it (it
/// could not open the checkpoint, or its own checks of the caller's tensors failed): such a
/// rank passes its error, takes part in the first agreement so that every rank fails with
/// it, and returns it.
pub fn load_collective(
    job: Result<&SliceJob>,
    world: &dyn Communicator,
    mine: &[SliceRequest],
    opts: &ShareOptions,
    into: &mut [(&str, &mut [u8])],
) -> Result<(RankTensors, Traffic)> {
    world.set_timeout(opts.timeout);
    world.set_phase("state dict checks");
    let job = agree(world, job.and_then(|j| opts.validate().map(|()| j)))?;
    // Before the ranks branch on the mode, they agree on it.
    world.set_phase("share options");
    agree_fields(
        world,
        &[
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("world size", world.size().to_string()),
            ("mode", opts.mode.to_string()),
        ],
    )?;
    let me = world.rank();
    // Which ranks share this rank's page cache (node names, all-gathered).
    let node_ranks = choose_share(world, opts.node.as_deref())?.node_ranks;
    world.set_phase("slice requests");
    let per_rank = if opts.mode != ShareMode::None {
        gather_requests(world, mine)?
    } else if world.size() <= MAX_NODE_SPANS_WORLD {
        // Reading alone, a rank still plans its node's requests, to ask for the spans the
        // node reads together whole (NodeSpans); other ranks' requests are not planned.
        let mut all = gather_requests(world, mine)?;
        for (r, reqs) in all.iter_mut().enumerate() {
            if r != me && !node_ranks.contains(&r) {
                reqs.clear();
            }
        }
        all
    } else {
        let mut v = vec![Vec::new(); world.size()];
        if let Some(slot) = v.get_mut(me) {
            *slot = mine.to_vec();
        }
        v
    };
    world.set_phase("plan");
    let planned = job.plan(&per_rank).and_then(|plan| {
        let rp = plan
            .ranks
            .get(me)
            .ok_or_else(|| Error::plan_rank(me, "not in the plan"))?;
        crate::load::buffer_slots(rp, into)?;
        Ok(plan)
    });
    let plan = agree(world, planned)?;
    if opts.mode == ShareMode::None {
        world.set_phase("read");
        let load = opts.load.clone().with_node_spans(&plan, &node_ranks, me);
        let loaded = load_rank_scattered(&plan, me, &load, into);
        return Ok((agree(world, loaded)?, Traffic::default()));
    }
    let opts = ShareOptions {
        node_ranks,
        ..opts.clone()
    };
    load_shared_into(&SharedPlan::new(&plan), world, &opts, into)
}

/// Every rank's requests, all-gathered (JSON: deterministic, and a malformed part from a
/// peer is an error naming it, the same on every rank).
fn gather_requests(
    world: &dyn Communicator,
    mine: &[SliceRequest],
) -> Result<Vec<Vec<SliceRequest>>> {
    let encoded = agree(
        world,
        serde_json::to_vec(mine).map_err(|e| {
            Error::comm(
                "slice requests",
                format!("rank {} cannot encode its requests: {e}", world.rank()),
            )
        }),
    )?;
    let all = world.all_gather(&encoded)?;
    all.iter()
        .enumerate()
        .map(|(r, bytes)| {
            if bytes.len() > MAX_REQUEST_BYTES {
                return Err(Error::comm(
                    "slice requests",
                    format!(
                        "rank {r} sent {} bytes of slice requests, more than {MAX_REQUEST_BYTES}",
                        bytes.len()
                    ),
                ));
            }
            serde_json::from_slice(bytes).map_err(|e| {
                Error::comm(
                    "slice requests",
                    format!(
                        "rank {r} sent malformed slice requests (a different safeshard \
                         version?): {e}"
                    ),
                )
            })
        })
        .collect()
}
