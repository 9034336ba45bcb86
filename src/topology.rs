//! The parallel layout of a job: world = dp × pp × tp, plus expert parallelism.
//!
//! Ranks are ordered with TP fastest, as Megatron-LM and vLLM do:
//! `rank = (dp_rank * pp + pp_rank) * tp + tp_rank`.
//! Expert parallelism (vLLM's `enable_expert_parallel`) reuses the TP × DP ranks: when
//! `ep > 1` it must equal `tp * dp`, MoE experts are held whole by one EP rank each, and the
//! EP rank of a global rank is `dp_rank * tp + tp_rank`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Largest world size (`tp × pp × dp`) accepted: each rank's plan is held in memory, so a
/// typo such as `--dp 100000000` must be refused rather than exhaust memory.
pub const MAX_WORLD_SIZE: usize = 1 << 16;

/// Sizes of the parallel dimensions of a job.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Topology {
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline-parallel size (number of stages).
    pub pp: usize,
    /// Data-parallel size (replicas).
    pub dp: usize,
    /// Expert-parallel size: 1 (experts split by TP) or `tp * dp` (whole experts per rank).
    pub ep: usize,
    /// Explicit number of layers per pipeline stage (`--pp-layers`), overriding the default split.
    pub pp_layers: Option<Vec<usize>>,
}

/// Where one global rank sits in the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Coords {
    /// Global rank.
    pub rank: usize,
    /// Index within the tensor-parallel group.
    pub tp_rank: usize,
    /// Pipeline stage.
    pub pp_rank: usize,
    /// Data-parallel replica.
    pub dp_rank: usize,
    /// Expert-parallel rank (`dp_rank * tp + tp_rank`); meaningful when `ep > 1`.
    pub ep_rank: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            tp: 1,
            pp: 1,
            dp: 1,
            ep: 1,
            pp_layers: None,
        }
    }
}

impl Topology {
    /// A topology with the given sizes and no explicit stage split, checked with [`Topology::validate`].
    pub fn new(tp: usize, pp: usize, dp: usize, ep: usize) -> Result<Self> {
        let topo = Topology {
            tp,
            pp,
            dp,
            ep,
            pp_layers: None,
        };
        topo.validate()?;
        Ok(topo)
    }

    /// Checks sizes: all at least 1, `ep` is 1 or `tp * dp`, `pp_layers` has `pp` entries.
    pub fn validate(&self) -> Result<()> {
        for (option, v) in [
            ("tp", self.tp),
            ("pp", self.pp),
            ("dp", self.dp),
            ("ep", self.ep),
        ] {
            if v == 0 {
                return Err(Error::invalid_argument(option, "0: must be at least 1"));
            }
        }
        let Some(world) = self.world_size() else {
            return Err(Error::invalid_argument(
                "tp",
                format!(
                    "{}: tp × pp × dp = {} × {} × {} overflows",
                    self.tp, self.tp, self.pp, self.dp
                ),
            ));
        };
        // Every rank gets its own plan in memory; a world this large is a typo, not a job, and
        // would only exhaust memory slowly.
        if world > MAX_WORLD_SIZE {
            return Err(Error::invalid_argument(
                "tp",
                format!(
                    "{}: tp × pp × dp = {} × {} × {} = {world} ranks is more than the supported {MAX_WORLD_SIZE}",
                    self.tp, self.tp, self.pp, self.dp
                ),
            ));
        }
        if self.ep != 1 && self.ep != self.tp * self.dp {
            return Err(Error::invalid_argument(
                "ep",
                format!(
                    "{} must be 1 or tp × dp = {} × {} = {} (expert parallelism reuses the TP × DP ranks, as in vLLM)",
                    self.ep,
                    self.tp,
                    self.dp,
                    self.tp * self.dp
                ),
            ));
        }
        if let Some(layers) = &self.pp_layers {
            if layers.len() != self.pp {
                return Err(Error::invalid_argument(
                    "pp_layers",
                    format!("has {} entries but pp is {}", layers.len(), self.pp),
                ));
            }
        }
        Ok(())
    }

    /// `tp * pp * dp`, or `None` on overflow.
    pub fn world_size(&self) -> Option<usize> {
        self.tp.checked_mul(self.pp)?.checked_mul(self.dp)
    }

    /// Number of ranks (`tp * pp * dp`). Call [`Topology::validate`] first.
    pub fn world(&self) -> usize {
        self.tp * self.pp * self.dp
    }

    /// Whether MoE experts are placed whole per rank (expert parallelism).
    pub fn expert_parallel(&self) -> bool {
        self.ep > 1
    }

    /// Coordinates of a global rank (`rank < world()`).
    pub fn coords(&self, rank: usize) -> Coords {
        let tp_rank = rank % self.tp;
        let pp_rank = (rank / self.tp) % self.pp;
        let dp_rank = rank / (self.tp * self.pp);
        Coords {
            rank,
            tp_rank,
            pp_rank,
            dp_rank,
            ep_rank: dp_rank * self.tp + tp_rank,
        }
    }

    /// Global rank of the given coordinates.
    pub fn rank_of(&self, dp_rank: usize, pp_rank: usize, tp_rank: usize) -> usize {
        (dp_rank * self.pp + pp_rank) * self.tp + tp_rank
    }

    /// Number of layers in each pipeline stage for a model of `layers` layers: the explicit
    /// `pp_layers` if given (must sum to `layers`), else vLLM's `get_pp_indices` split, where
    /// the remainder goes to the stages before the last, counting back from the second-to-last.
    pub fn stage_layer_counts(&self, layers: usize) -> Result<Vec<usize>> {
        if let Some(explicit) = &self.pp_layers {
            let sum = explicit
                .iter()
                .try_fold(0usize, |acc, &n| acc.checked_add(n));
            if sum != Some(layers) {
                let sum = sum.map_or_else(|| "more than 2^64".to_string(), |s| s.to_string());
                return Err(Error::invalid_argument(
                    "pp_layers",
                    format!(
                        "{} sums to {sum} but the model has {layers} layers",
                        explicit
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                ));
            }
            return Ok(explicit.clone());
        }
        if layers == 0 {
            return Err(Error::config(
                "num_hidden_layers",
                "gives 0 layers (or the spec's `layers` value does): nothing to place",
            ));
        }
        if self.pp > layers {
            return Err(Error::invalid_argument(
                "pp",
                format!(
                    "{} is more pipeline stages than the model's {layers} layers",
                    self.pp
                ),
            ));
        }
        let mut counts = vec![layers / self.pp; self.pp];
        let remainder = layers % self.pp;
        // vLLM: for i in range(2, remainder + 2): partitions[-i] += 1
        for i in 2..remainder + 2 {
            let idx = self.pp - i;
            counts[idx] += 1;
        }
        Ok(counts)
    }

    /// Pipeline stage of every layer index `0..layers`.
    pub fn layer_stages(&self, layers: usize) -> Result<Vec<usize>> {
        let counts = self.stage_layer_counts(layers)?;
        let mut stages = Vec::with_capacity(layers);
        for (stage, &n) in counts.iter().enumerate() {
            stages.extend(std::iter::repeat_n(stage, n));
        }
        Ok(stages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_order_is_tp_fastest() {
        let t = Topology::new(2, 3, 2, 1).unwrap();
        let mut seen = Vec::new();
        for dp in 0..2 {
            for pp in 0..3 {
                for tp in 0..2 {
                    seen.push((dp, pp, tp));
                }
            }
        }
        for (rank, &(dp, pp, tp)) in seen.iter().enumerate() {
            let c = t.coords(rank);
            assert_eq!((c.dp_rank, c.pp_rank, c.tp_rank), (dp, pp, tp));
            assert_eq!(t.rank_of(dp, pp, tp), rank);
        }
    }

    #[test]
    fn vllm_stage_split() {
        // Values from vLLM's get_pp_indices docs and tests.
        let t = |pp| Topology::new(1, pp, 1, 1).unwrap();
        assert_eq!(t(4).stage_layer_counts(61).unwrap(), vec![15, 15, 16, 15]);
        assert_eq!(t(3).stage_layer_counts(32).unwrap(), vec![11, 11, 10]);
        assert_eq!(t(2).stage_layer_counts(8).unwrap(), vec![4, 4]);
        assert_eq!(
            t(8).stage_layer_counts(61).unwrap(),
            vec![7, 7, 8, 8, 8, 8, 8, 7]
        );
        assert!(t(5).stage_layer_counts(4).is_err());
    }

    #[test]
    fn ep_must_be_one_or_tp_times_dp() {
        assert!(Topology::new(4, 1, 2, 8).is_ok());
        assert!(Topology::new(4, 1, 2, 4).is_err());
        assert!(Topology::new(0, 1, 1, 1).is_err());
    }
}
