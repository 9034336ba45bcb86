//! The coordinator: per-rank byte-range plans.
//!
//! [`build`] turns a checkpoint catalog, a [`Resolution`] and a [`Topology`] into a [`Plan`]:
//! for every rank, the tensors it holds (in one contiguous arena per rank) and the exact copy
//! runs that fill the arena from the files. A run copies `count` chunks of `len` bytes, the
//! i-th from file offset `src + i * src_stride` to arena offset `dst + i * dst_stride`; splits
//! on the outermost dimension are single contiguous runs, splits on inner dimensions strided
//! ones. Zero runs fill vocab padding. Adjacent runs are coalesced across tensors.
//!
//! Every rank computes the same plan from the same inputs (it is deterministic); a rank can
//! compare [`Plan::hash`] with rank 0's to check it.

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, Dtype, FileIdentity};
use crate::spec::{Resolution, TensorKind};
use crate::topology::{Coords, Topology};
use crate::Result;

/// A file the plan reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanFile {
    /// Name relative to the checkpoint directory.
    pub name: String,
    /// Full path at planning time.
    pub path: std::path::PathBuf,
    /// Identity at planning time; the loader refuses a file whose identity changed.
    pub identity: FileIdentity,
}

/// A tensor a rank holds after loading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorPlan {
    /// Checkpoint tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Rank-local shape.
    pub shape: Vec<u64>,
    /// Offset of the tensor in the rank's arena.
    pub offset: u64,
    /// Byte size in the arena (zero padding included).
    pub bytes: u64,
    /// Index of the source tensor in [`Checkpoint::tensors`].
    pub source: usize,
    /// Coarse kind.
    pub kind: TensorKind,
    /// Whether other ranks hold the same bytes.
    pub replicated: bool,
}

/// Copy `count` chunks of `len` bytes: chunk `i` from `src + i * src_stride` in file `file`
/// to `dst + i * dst_stride` in the rank's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CopyRun {
    /// Index into [`Plan::files`].
    pub file: u32,
    /// Absolute file offset of the first chunk.
    pub src: u64,
    /// Arena offset of the first chunk.
    pub dst: u64,
    /// Chunk length in bytes.
    pub len: u64,
    /// Number of chunks (1 for a contiguous run).
    pub count: u64,
    /// Distance between chunk starts in the file.
    pub src_stride: u64,
    /// Distance between chunk starts in the arena.
    pub dst_stride: u64,
}

/// Fill `count` chunks of `len` bytes with zeros, chunk `i` at `dst + i * dst_stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ZeroRun {
    /// Arena offset of the first chunk.
    pub dst: u64,
    /// Chunk length in bytes.
    pub len: u64,
    /// Number of chunks.
    pub count: u64,
    /// Distance between chunk starts in the arena.
    pub dst_stride: u64,
}

/// Everything one rank loads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankPlan {
    /// Where the rank sits.
    pub coords: Coords,
    /// Tensors, in arena order.
    pub tensors: Vec<TensorPlan>,
    /// Copy runs, sorted by (file, src).
    pub copies: Vec<CopyRun>,
    /// Zero runs.
    pub zeros: Vec<ZeroRun>,
    /// Arena size: bytes held after loading (zero padding included).
    pub bytes: u64,
    /// Bytes read from storage, rounded out to whole pages per run (read amplification).
    pub read_bytes: u64,
}

/// The plan of a whole job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Topology planned for.
    pub topology: Topology,
    /// Name of the spec used.
    pub spec: String,
    /// Files read, indexed by [`CopyRun::file`].
    pub files: Vec<PlanFile>,
    /// One entry per global rank.
    pub ranks: Vec<RankPlan>,
}

impl Plan {
    /// A stable hash of the plan's contents (SHA-256 of its canonical JSON), to check that
    /// every rank computed the same plan.
    pub fn hash(&self) -> [u8; 32] {
        todo!("issue 4")
    }
}

/// Builds the plan. Deterministic: the same inputs give the same plan on every rank.
pub fn build(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    topo: &Topology,
    spec_name: &str,
) -> Result<Plan> {
    let _ = (ckpt, resolution, topo, spec_name);
    todo!("issue 4")
}
