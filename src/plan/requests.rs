//! Plans from explicit slice requests instead of a sharding spec.
//!
//! A trainer's state dict already says what every rank holds: each entry is a rank-local
//! tensor made of known index ranges of one checkpoint tensor (a DTensor's mesh and
//! placements give them). A [`SliceRequest`] states that directly: the name the rank holds the
//! tensor under (its destination, e.g. a state-dict key), the checkpoint tensor, and per
//! dimension the ranges of global indices the local tensor takes, in local order (a strided
//! shard takes several ranges of one dimension). [`build_requests`] turns every rank's
//! requests into the same [`Plan`] a spec gives, so the copy runs, validation, the engine and
//! the share modes are the ones every load uses.
//!
//! The plan's topology is `dp = world` (every rank its own "replica" with its own tensors),
//! its spec name [`REQUEST_SPEC`]. Like [`super::build`] it is deterministic: ranks that
//! exchanged their requests compute the same plan and compare [`Plan::hash`].

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::runs::slice_runs;
use super::{
    coalesce_copies, coalesce_zeros, place_next, plan_files, read_bytes, span_bytes, Plan,
    RankPlan, TensorPlan,
};
use crate::checkpoint::Checkpoint;
use crate::sharding::TensorKind;
use crate::topology::Topology;
use crate::{Error, Result};

/// The spec name of plans built from slice requests.
pub const REQUEST_SPEC: &str = "slice-requests";

/// The `[begin, end)` index ranges one dimension takes, in local order.
pub type DimRanges = Vec<(u64, u64)>;

/// One rank-local tensor asked for by explicit index ranges of a checkpoint tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SliceRequest {
    /// The name the rank holds the tensor under (its destination: a state-dict key). Unique
    /// within a rank; it is [`TensorPlan::name`].
    pub dest: String,
    /// The checkpoint tensor it is cut from.
    pub source: String,
    /// Per dimension of the checkpoint tensor, the `[begin, end)` index ranges the local
    /// tensor takes, in local order: the local size along `d` is the sum of `ranges[d]`'s
    /// lengths, and the local tensor is every combination of one range per dimension laid
    /// out row-major. A scalar has no dimensions (`ranges = []`).
    pub ranges: Vec<DimRanges>,
}

impl SliceRequest {
    /// The whole of checkpoint tensor `source` of shape `shape`, held as `dest`.
    pub fn whole(dest: impl Into<String>, source: impl Into<String>, shape: &[u64]) -> Self {
        SliceRequest {
            dest: dest.into(),
            source: source.into(),
            ranges: shape.iter().map(|&n| vec![(0, n)]).collect(),
        }
    }

    /// An error about this request on `rank`: it names the destination as the tensor and,
    /// when it differs, the checkpoint tensor in the reason.
    fn error(&self, rank: usize, reason: impl std::fmt::Display) -> Error {
        let reason = if self.dest == self.source {
            reason.to_string()
        } else {
            format!("checkpoint tensor {:?}: {reason}", self.source)
        };
        Error::Plan {
            rank: Some(rank),
            tensor: Some(self.dest.clone()),
            reason,
        }
    }
}

/// Builds the plan of a job whose rank `r` holds exactly `per_rank[r]`.
///
/// Each rank's tensors are placed in one arena in catalog order (file, offset), 64-byte
/// aligned, like [`super::build`]; `replicated` marks tensors another rank requests with the
/// same source and ranges. Errors ([`Error::Plan`]) name the request's destination and
/// checkpoint tensor: a checkpoint tensor that does not exist, ranges outside it or of the
/// wrong number of dimensions, a sub-byte split off byte boundaries, a destination given
/// twice on one rank.
pub fn build_requests(ckpt: &Checkpoint, per_rank: &[Vec<SliceRequest>]) -> Result<Plan> {
    let topology = Topology::new(1, 1, per_rank.len().max(1), 1)?;
    let mut ranks = per_rank
        .iter()
        .enumerate()
        .map(|(r, reqs)| build_rank(ckpt, &topology, r, reqs))
        .collect::<Result<Vec<_>>>()?;
    mark_replicated(&mut ranks, per_rank);
    Ok(Plan {
        topology,
        spec: REQUEST_SPEC.to_string(),
        files: plan_files(ckpt),
        ranks,
    })
}

fn build_rank(
    ckpt: &Checkpoint,
    topology: &Topology,
    rank: usize,
    reqs: &[SliceRequest],
) -> Result<RankPlan> {
    // Catalog order, then request order: reads walk every file forwards.
    let mut order = Vec::with_capacity(reqs.len());
    let mut dests = HashSet::with_capacity(reqs.len());
    for (i, req) in reqs.iter().enumerate() {
        if !dests.insert(req.dest.as_str()) {
            return Err(req.error(rank, "requested twice"));
        }
        let Some(ci) = ckpt.tensor_index(&req.source) else {
            return Err(req.error(
                rank,
                format_args!("the checkpoint has no tensor {:?}", req.source),
            ));
        };
        order.push((ci, i));
    }
    order.sort_unstable();
    let mut tensors = Vec::with_capacity(reqs.len());
    let mut copies = Vec::with_capacity(reqs.len());
    let mut zeros = Vec::new();
    let (mut cursor, mut bytes, mut staging) = (0u64, 0u64, 0u64);
    for (ci, i) in order {
        let (Some(t), Some(req)) = (ckpt.tensors.get(ci), reqs.get(i)) else {
            continue;
        };
        let file = u32::try_from(t.file)
            .map_err(|_| req.error(rank, format_args!("file index {}", t.file)))?;
        let fail = |reason: String| req.error(rank, reason);
        let (shape, runs) = slice_runs(&fail, t.dtype, &t.shape, file, t.offset, &req.ranges)?;
        let offset = place_next(cursor, &mut zeros);
        staging = staging.max(span_bytes(&runs.copies));
        copies.extend(runs.copies.into_iter().map(|mut c| {
            c.dst += offset;
            c
        }));
        tensors.push(TensorPlan {
            name: req.dest.clone(),
            dtype: t.dtype,
            shape,
            offset,
            bytes: runs.bytes,
            source: ci,
            kind: TensorKind::Other,
            replicated: false,
        });
        bytes += runs.bytes;
        cursor = offset + runs.bytes;
    }
    copies.sort_by_key(|c| (c.file, c.src));
    coalesce_copies(&mut copies);
    zeros.sort_by_key(|z| z.dst);
    coalesce_zeros(&mut zeros);
    Ok(RankPlan {
        coords: topology.coords(rank),
        tensors,
        read_bytes: read_bytes(&copies),
        copies,
        zeros,
        bytes,
        arena_bytes: cursor,
        staging_bytes: staging,
    })
}

/// Marks every tensor whose (source, ranges) another rank requests too.
fn mark_replicated(ranks: &mut [RankPlan], per_rank: &[Vec<SliceRequest>]) {
    let mut seen: HashMap<(&str, &[DimRanges]), usize> = HashMap::new();
    for reqs in per_rank {
        for req in reqs {
            *seen
                .entry((req.source.as_str(), req.ranges.as_slice()))
                .or_insert(0) += 1;
        }
    }
    for (rp, reqs) in ranks.iter_mut().zip(per_rank) {
        let by_dest: HashMap<&str, &SliceRequest> =
            reqs.iter().map(|r| (r.dest.as_str(), r)).collect();
        for t in &mut rp.tensors {
            if let Some(req) = by_dest.get(t.name.as_str()) {
                let key = (req.source.as_str(), req.ranges.as_slice());
                t.replicated = seen.get(&key).copied().unwrap_or(0) > 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
