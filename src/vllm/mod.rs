//! vLLM's view of a job: everything safeshard knows about vLLM lives here.
//!
//! A job with [`TensorNames::Vllm`] gives every rank exactly vLLM's `model.state_dict()`
//! entries (as its `ShardedStateLoader` keeps them: of names sharing storage, the smallest).
//! Three parts, in the order a job uses them:
//!
//! - [`map`]: the name maps (`shard-specs/<spec>.vllm.json`), data next to the specs; no
//!   architecture-specific code anywhere else;
//! - `transform`: the plan transform, as separate passes (tie, fuse, stack, transpose,
//!   buffers) over each rank, then the runs relocated into vLLM's tensors;
//! - `finish`: what the runs cannot say, applied once to a loaded rank (transposes, buffer
//!   values, and the re-tie of a stored head, which depends on the loaded bytes).
//!
//! This layer sits above `load` (it finishes a [`crate::load::RankTensors`]) and below
//! `reshard` and the job; `checkpoint`, `sharding`, `plan` and `load` know nothing of vLLM.

mod files;
mod finish;
pub mod map;
pub(crate) mod transform;

pub use transform::TensorNames;
use transform::{tie_facts, TieFacts};

use crate::checkpoint::Checkpoint;
use crate::load::RankTensors;
use crate::plan::Plan;
use crate::sharding::{Config, Spec};
use crate::Result;

use finish::Finishing;
pub(crate) use finish::{Names, Retied};
use map::VllmMap;

/// A job's vLLM side: what each rank of its vLLM-named plan leaves until after its load, and
/// what config and checkpoint say about tied embeddings.
#[derive(Clone, Debug)]
pub(crate) struct VllmNames {
    finishing: Finishing,
    tie: TieFacts,
}

/// How `reshard --format vllm` writes a job whose ranks vLLM may re-tie (see
/// [`VllmNames::reshard_ties`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ReshardTies {
    /// Write `tie_word_embeddings: false` into config.json.
    pub untie_config: bool,
    /// Ranks to write again with both names.
    pub rewrite: Vec<usize>,
}

impl VllmNames {
    /// `plan` (checkpoint names) with vLLM's names, by the map beside `spec`.
    pub(crate) fn plan(
        plan: &Plan,
        ckpt: &Checkpoint,
        config: &Config,
        spec: &Spec,
    ) -> Result<(Plan, VllmNames)> {
        let map = VllmMap::for_spec(spec)?;
        let (plan, finishing) = transform::vllm_plan(plan, ckpt, config, &map)?;
        let tie = tie_facts(&map, ckpt, config);
        Ok((plan, VllmNames { finishing, tie }))
    }

    /// Finishes `loaded`, a load of `plan`'s rank, unless it is finished already.
    pub(crate) fn finish(
        &self,
        plan: &Plan,
        loaded: &mut RankTensors,
        names: Names,
    ) -> Result<Retied> {
        self.finishing.finish_rank(plan, loaded, names)
    }

    /// Finishes a rank loaded partly into caller buffers (`into`).
    pub(crate) fn finish_scattered(
        &self,
        plan: &Plan,
        loaded: &mut RankTensors,
        into: &mut [(&str, &mut [u8])],
    ) -> Result<()> {
        self.finishing.finish_scattered(plan, loaded, into)
    }

    /// Finishes rank `rank` loaded into `arena`; returns the (alias, holder) names it leaves
    /// out.
    pub(crate) fn finish_buffer(
        &self,
        plan: &Plan,
        rank: usize,
        arena: &mut [u8],
    ) -> Result<Vec<(String, String)>> {
        let aliases = self.finishing.finish_buffer(plan, rank, arena)?;
        let tensors = plan.ranks.get(rank).map_or(&[][..], |r| &r.tensors[..]);
        let name = |i: usize| tensors.get(i).map(|t| t.name.clone()).unwrap_or_default();
        Ok(aliases.iter().map(|&(a, h)| (name(a), name(h))).collect())
    }

    /// What `reshard --format vllm` writes, given how every rank's re-tie went
    /// (`retied[rank]`). vLLM's `sharded_state` loader builds every rank tied or every rank
    /// untied, as config.json says, and fails on any missing or unknown name:
    /// - no rank re-tied: config.json says untied when the checkpoint untied the model, each
    ///   rank holds both names where it built both (as before re-ties were followed);
    /// - every rank that held both re-tied: the config stays tied, each rank holds vLLM's own
    ///   state dict (the head's name only), the model vLLM's default load builds;
    /// - some re-tied and some did not (a model vLLM's own `sharded_state` cannot hold): the
    ///   re-tied ranks are written again with both names, the config says untied; every
    ///   value still equals vLLM's default load, only the storage is not shared.
    pub(crate) fn reshard_ties(&self, retied: &[Retied]) -> ReshardTies {
        let tied: Vec<usize> = (0..retied.len())
            .filter(|&r| retied[r] == Retied::Tied)
            .collect();
        let apart = retied.contains(&Retied::Apart);
        let untied_by_checkpoint = self.tie.untied_by_checkpoint();
        ReshardTies {
            untie_config: untied_by_checkpoint && (tied.is_empty() || apart),
            rewrite: if apart { tied } else { Vec::new() },
        }
    }
}

/// config.json and the tokenizer files beside a `reshard --format vllm` output.
pub(crate) fn side_files(ckpt: &Checkpoint, untie: bool) -> Result<Vec<(String, Vec<u8>)>> {
    files::side_files(ckpt, untie)
}
