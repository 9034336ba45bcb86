//! The sharding spec language.
//!
//! A spec (`*.shard`) maps tensor names to tensor-, pipeline- and expert-parallel placements,
//! as data. [`Spec::parse`] reads one; [`Spec::shipped`] returns the specs embedded in the
//! binary (from `shard-specs/`); [`Spec::detect`] picks one from `config.json`'s
//! `architectures`. [`resolve`] applies a spec to a checkpoint catalog and a topology and says,
//! for every tensor, which pipeline stages hold it and what slice every TP (or EP) rank holds,
//! as a [`Layout`]: a concatenation of source slices and zero blocks along one dimension.
//!
//! The language reference is docs/spec-language.md.

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::topology::Topology;
use crate::Result;

/// One piece of a rank-local tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Piece {
    /// A hyper-rectangle of the source tensor: one `[begin, end)` range per source dimension.
    Slice {
        /// Per-dimension ranges, as many as the source tensor has dimensions.
        ranges: Vec<(u64, u64)>,
    },
    /// Zeros (vocab padding), `extent` long along the layout's `concat_dim`; every other
    /// dimension has the local shape's size.
    Zeros {
        /// Length along `concat_dim`.
        extent: u64,
    },
}

/// What one rank holds of one tensor: its local shape, and the pieces that, concatenated in
/// order along `concat_dim`, make it up. A full copy is one slice covering the whole tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    /// Rank-local shape (same rank — number of dims — as the source tensor).
    pub shape: Vec<u64>,
    /// Dimension along which the pieces are concatenated.
    pub concat_dim: usize,
    /// Pieces in order; their extents along `concat_dim` sum to `shape[concat_dim]`.
    pub pieces: Vec<Piece>,
}

impl Layout {
    /// The whole tensor, unsplit.
    pub fn full(shape: &[u64]) -> Self {
        Layout {
            shape: shape.to_vec(),
            concat_dim: 0,
            pieces: vec![Piece::Slice {
                ranges: shape.iter().map(|&n| (0, n)).collect(),
            }],
        }
    }

    /// Number of elements of the local tensor.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// How the ranks of one pipeline stage hold a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shards {
    /// Every TP rank holds `layouts[tp_rank]` (`layouts.len() == tp`); DP replicas hold the same.
    /// A replicated tensor has `tp` identical full layouts.
    PerTp(Vec<Layout>),
    /// Expert parallelism: only EP rank `owner` (`dp_rank * tp + tp_rank`) holds the tensor.
    Expert {
        /// Expert id (from the name's capture).
        expert: u64,
        /// Owning EP rank.
        owner: usize,
        /// What the owner holds (normally the whole tensor).
        layout: Layout,
    },
}

/// Coarse kind of a tensor, for memory pictures and summaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TensorKind {
    /// Attention projections.
    Attention,
    /// Dense MLP (and shared experts).
    Mlp,
    /// Routed MoE experts.
    Experts,
    /// Token embeddings and the LM head.
    Embedding,
    /// Norms and other small vectors.
    Norm,
    /// Anything else (routers, scales, buffers).
    Other,
}

/// The placement of one catalog tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolved {
    /// Not loaded (buffers such as `rotary_emb.inv_freq`, layers outside the main model).
    Skip {
        /// Why, for `spec check` output.
        reason: String,
    },
    /// Loaded by the ranks of `stages`.
    Held {
        /// Pipeline stages holding the tensor (sorted, no duplicates).
        stages: Vec<usize>,
        /// What each rank of those stages holds.
        shards: Shards,
        /// Coarse kind.
        kind: TensorKind,
        /// Whether every rank that holds it holds the same bytes (a replicated tensor).
        replicated: bool,
    },
}

/// The placement of every tensor of a checkpoint under one topology.
#[derive(Clone, Debug)]
pub struct Resolution {
    /// Parallel to [`Checkpoint::tensors`].
    pub tensors: Vec<Resolved>,
    /// Non-fatal findings (rules that matched nothing), one line each.
    pub warnings: Vec<String>,
}

/// Values from `config.json` with `--set key=value` overrides on top.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The merged JSON object.
    pub values: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// Config of a checkpoint (its `config.json`, or empty), with `overrides` as `key=value`
    /// strings applied on top (values parsed as JSON, else taken as strings; dotted keys reach
    /// into nested objects such as `quantization_config.group_size`).
    pub fn from_checkpoint(ckpt: &Checkpoint, overrides: &[String]) -> Result<Self> {
        let _ = (ckpt, overrides);
        todo!("issue 3")
    }
}

/// A parsed, checked sharding spec.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Spec name (file stem, or the shipped name).
    pub name: String,
    /// Architectures (`config.json` `architectures` values) the spec declares.
    pub architectures: Vec<String>,
}

impl Spec {
    /// Parses a spec. `origin` names it in error messages (`file:line:col: ...`).
    pub fn parse(source: &str, origin: &str) -> Result<Spec> {
        let _ = (source, origin);
        todo!("issue 3")
    }

    /// Names of the shipped specs.
    pub fn shipped_names() -> Vec<&'static str> {
        todo!("issue 3")
    }

    /// A shipped spec by name (`llama`, `qwen2`, ...).
    pub fn shipped(name: &str) -> Result<Spec> {
        let _ = name;
        todo!("issue 3")
    }

    /// `--spec` argument: a shipped name or a path to a `.shard` file.
    pub fn load(name_or_path: &str) -> Result<Spec> {
        let _ = name_or_path;
        todo!("issue 3")
    }

    /// The shipped spec for a config's `architectures`; an unknown architecture is an error
    /// that points to `--spec`.
    pub fn detect(config: &Config) -> Result<Spec> {
        let _ = config;
        todo!("issue 3")
    }
}

/// Applies a spec to every tensor of a checkpoint for a topology.
///
/// Errors name the unmatched tensors, splits that do not divide (tensor, dim, size, tp), and
/// config values the spec needs but cannot find.
pub fn resolve(
    spec: &Spec,
    ckpt: &Checkpoint,
    config: &Config,
    topo: &Topology,
) -> Result<Resolution> {
    let _ = (spec, ckpt, config, topo);
    todo!("issue 3")
}
