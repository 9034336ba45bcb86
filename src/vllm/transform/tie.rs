//! The tie pass: tied word embeddings as vLLM builds and keeps them.
//!
//! vLLM 0.33 ties when config.json says so (`tie_word_embeddings`, the map's `default` when
//! silent) unless the checkpoint stores a head (`ModelConfig.maybe_untie_word_embeddings`): then
//! it builds the head untied, loads it, and after loading re-ties it on every rank whose head
//! equals its embedding (`maybe_retie_word_embeddings`, see [`crate::vllm::finish`]). Tied
//! names go under the smallest of the two, as `ShardedStateLoader` keeps names sharing
//! storage.

use super::{Draft, RankPlan};
use crate::checkpoint::Checkpoint;
use crate::sharding::Config;
use crate::vllm::map::{HeadStages, VllmMap};

/// What config and checkpoint say about tied embeddings, for a map with a `tie` rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TieFacts {
    /// `tie_word_embeddings` (the map's default when config.json does not say).
    pub declared: bool,
    /// The checkpoint stores the head (a tensor named the map's head after its prefixes).
    pub stored_head: bool,
}

impl TieFacts {
    /// Whether vLLM builds the model tied: declared, and no stored head.
    pub(crate) fn tied(self) -> bool {
        self.declared && !self.stored_head
    }

    /// Whether vLLM builds the head untied and re-ties it after loading where it equals the
    /// embedding (its `word_embeddings_untied_by_checkpoint`).
    pub(crate) fn untied_by_checkpoint(self) -> bool {
        self.declared && self.stored_head
    }
}

/// The tie facts of a checkpoint under `map` (all false without a `tie` rule).
pub(crate) fn tie_facts(map: &VllmMap, ckpt: &Checkpoint, config: &Config) -> TieFacts {
    let Some(tie) = &map.tie else {
        return TieFacts::default();
    };
    TieFacts {
        declared: config
            .values
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(tie.default),
        stored_head: ckpt
            .tensors
            .iter()
            .any(|t| map.renamed(&t.name) == tie.head),
    }
}

/// Whether the rank's stage builds the tied head.
fn stage_builds_head(stages: HeadStages, pp_rank: usize, pp: usize) -> bool {
    match stages {
        HeadStages::All => true,
        HeadStages::Last => pp_rank + 1 == pp,
    }
}

/// Every plan tensor's vLLM name after the map's prefixes; when vLLM builds the model tied,
/// the embedding goes under the smaller of its and the head's name on stages that build the
/// head.
pub(super) fn names(rp: &RankPlan, pp: usize, map: &VllmMap, tie: TieFacts) -> Vec<String> {
    let head_here = map
        .tie
        .as_ref()
        .is_some_and(|t| tie.tied() && stage_builds_head(t.head_stages, rp.coords.pp_rank, pp));
    rp.tensors
        .iter()
        .map(|t| {
            let n = map.renamed(&t.name);
            match &map.tie {
                Some(tie) if head_here && n == tie.embedding => std::cmp::min(n, tie.head.clone()),
                _ => n,
            }
        })
        .collect()
}

/// The outputs (embedding, head) vLLM compares after loading and re-ties if equal: on a
/// rank that holds both, of a checkpoint that untied them by storing a head.
pub(super) fn retie(d: &Draft<'_>, tie: TieFacts) -> Option<(usize, usize)> {
    let rule = d.map.tie.as_ref()?;
    if !tie.untied_by_checkpoint() {
        return None;
    }
    let find = |name: &str| {
        d.outs
            .iter()
            .position(|o| o.single.is_some() && o.name == name)
    };
    Some((find(&rule.embedding)?, find(&rule.head)?))
}
