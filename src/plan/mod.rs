//! The coordinator: per-rank byte-range plans.
//!
//! [`build`] turns a checkpoint catalog, a [`Resolution`] and a [`Topology`] into a [`Plan`]:
//! for every rank, the tensors it holds (in one contiguous arena per rank) and the exact copy
//! runs that fill the arena from the files. A run copies `count` chunks of `len` bytes, the
//! i-th from file offset `src + i * src_stride` to arena offset `dst + i * dst_stride`; splits
//! on the outermost dimension are single contiguous runs, splits on inner dimensions strided
//! ones. Zero runs fill vocab padding. Adjacent runs are coalesced across tensors.
//!
//! ## Who computes the plan
//!
//! Every rank computes the whole plan itself from the same inputs (headers, spec, config,
//! topology): [`build`] is deterministic (no hash-map iteration order, no clocks, no thread
//! scheduling leaks into the result), so no communication is needed to distribute it. A rank
//! checks that it got the same plan as rank 0 by comparing [`Plan::hash`] (the comm layer does
//! the comparison). The hash leaves out where the files live on this machine (path, device,
//! inode, mtime) so that ranks on different nodes mounting the same checkpoint agree; it keeps
//! file names and lengths.
//!
//! ## The arena
//!
//! A rank's tensors are placed in one contiguous arena in catalog order, which is
//! `(file, offset)` order, so reads walk every file forwards. Each tensor starts at a multiple
//! of [`ALIGN`] (64 bytes: cache-line and SIMD friendly, a multiple of every dtype's size);
//! the gaps are filled by zero runs, so copy and zero runs together cover
//! `[0, arena_bytes)` exactly once. [`RankPlan::bytes`] is the sum of the tensors' sizes
//! (what the rank holds, vocab zero padding included, alignment gaps not), which is what vLLM
//! holds; [`RankPlan::arena_bytes`] is the buffer size a loader allocates.
//!
//! ## Reads and staging
//!
//! [`RankPlan::read_bytes`] is the number of bytes read from storage: the union of the pages (the
//! operating system's page size, [`page_size`]) that the copy runs touch, so a column split of a row-major tensor shows its read
//! amplification. [`RankPlan::staging_bytes`] is the peak staging memory: the largest
//! page-rounded file window that one tensor's copies span, i.e. what a loader maps or buffers
//! at once when it gathers tensor by tensor.

use serde::{Deserialize, Serialize};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, Dtype, FileIdentity};
use crate::sharding::{Resolution, Resolved, Shards, TensorKind};
use crate::topology::{Coords, Topology};
use crate::{Error, Result};

mod cover;
mod json;
pub mod requests;
mod runs;
mod strided;
mod svg;

pub use cover::NodeSpans;
pub use json::json_document;
pub use runs::{
    coalesce_copies, coalesce_zeros, read_bytes, span_bytes, tensor_runs, TensorRuns, MAX_DIMS,
};
pub use strided::{merge_intervals, page_size, union_len, Strided};
pub use svg::memory_svg;

/// Alignment of every tensor's offset in a rank's arena, in bytes.
pub const ALIGN: u64 = 64;

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

/// The checkpoint's files as a plan reads them (name, path, identity when planned).
pub(crate) fn plan_files(ckpt: &Checkpoint) -> Vec<PlanFile> {
    ckpt.files
        .iter()
        .map(|f| PlanFile {
            name: f.name.clone(),
            path: f.path.clone(),
            identity: f.identity.clone(),
        })
        .collect()
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

impl CopyRun {
    /// One contiguous copy: `len` bytes of file `file` at `src` to arena offset `dst`.
    pub fn contiguous(file: u32, src: u64, dst: u64, len: u64) -> CopyRun {
        CopyRun {
            file,
            src,
            dst,
            len,
            count: 1,
            src_stride: len,
            dst_stride: len,
        }
    }

    /// The chunks read from the file.
    pub fn src_pattern(&self) -> Strided {
        Strided {
            start: self.src,
            len: self.len,
            count: self.count,
            stride: self.src_stride,
        }
    }

    /// The chunks written in the arena.
    pub fn dst_pattern(&self) -> Strided {
        Strided {
            start: self.dst,
            len: self.len,
            count: self.count,
            stride: self.dst_stride,
        }
    }

    /// Chunks `first..first + n` as a run of their own.
    pub fn rows(&self, first: u64, n: u64) -> CopyRun {
        CopyRun {
            src: self.src_pattern().chunk_start(first),
            dst: self.dst_pattern().chunk_start(first),
            count: n,
            ..*self
        }
    }

    /// `len` bytes at byte `off` of chunk `row`, as a run of one chunk.
    pub fn part(&self, row: u64, off: u64, len: u64) -> CopyRun {
        let at = self.rows(row, 1);
        CopyRun {
            src: at.src + off,
            dst: at.dst + off,
            len,
            count: 1,
            src_stride: len,
            dst_stride: len,
            ..*self
        }
    }

    /// The same bytes as one chunk when the chunks are back to back on both sides; `None`
    /// when they are not, or when the length overflows.
    pub fn as_one_chunk(&self) -> Option<CopyRun> {
        if !(self.src_pattern().is_contiguous() && self.dst_pattern().is_contiguous()) {
            return None;
        }
        let n = self.len.checked_mul(self.count)?;
        Some(CopyRun {
            len: n,
            count: 1,
            src_stride: n,
            dst_stride: n,
            ..*self
        })
    }
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

impl ZeroRun {
    /// The chunks zeroed in the arena.
    pub fn dst_pattern(&self) -> Strided {
        Strided {
            start: self.dst,
            len: self.len,
            count: self.count,
            stride: self.dst_stride,
        }
    }

    /// Chunks `first..first + n` as a run of their own.
    pub fn rows(&self, first: u64, n: u64) -> ZeroRun {
        ZeroRun {
            dst: self.dst_pattern().chunk_start(first),
            count: n,
            ..*self
        }
    }

    /// `len` bytes at byte `off` of chunk `row`, as a run of one chunk.
    pub fn part(&self, row: u64, off: u64, len: u64) -> ZeroRun {
        ZeroRun {
            dst: self.dst_pattern().chunk_start(row) + off,
            len,
            count: 1,
            dst_stride: len,
        }
    }

    /// The same bytes as one chunk when the chunks are back to back; `None` when they are
    /// not, or when the length overflows.
    pub fn as_one_chunk(&self) -> Option<ZeroRun> {
        if !self.dst_pattern().is_contiguous() {
            return None;
        }
        let n = self.len.checked_mul(self.count)?;
        Some(ZeroRun {
            len: n,
            count: 1,
            dst_stride: n,
            ..*self
        })
    }
}

/// Everything one rank loads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankPlan {
    /// Where the rank sits.
    pub(crate) coords: Coords,
    /// Tensors, in arena order.
    pub(crate) tensors: Vec<TensorPlan>,
    /// Copy runs, sorted by (file, src).
    pub(crate) copies: Vec<CopyRun>,
    /// Zero runs.
    pub(crate) zeros: Vec<ZeroRun>,
    /// Bytes held after loading: the sum of the tensors' sizes (vocab zero padding included,
    /// arena alignment gaps not).
    pub(crate) bytes: u64,
    /// Bytes read from storage: the union of the pages ([`page_size`]) the copy runs touch.
    pub(crate) read_bytes: u64,
    /// Size of the arena buffer: `bytes` plus the alignment gaps between tensors.
    pub(crate) arena_bytes: u64,
    /// Peak staging memory: the largest page-rounded file window one tensor's copies span.
    pub(crate) staging_bytes: u64,
}

/// The plan of a whole job.
///
/// Read through its accessors: [`build`] makes the ranks' runs, tensors and byte counts
/// agree with the files and topology, which editing one field would break.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Topology planned for.
    pub(crate) topology: Topology,
    /// Name of the spec used.
    pub(crate) spec: String,
    /// Files read, indexed by [`CopyRun::file`].
    pub(crate) files: Vec<PlanFile>,
    /// One entry per global rank.
    pub(crate) ranks: Vec<RankPlan>,
}

/// What the ranks of one pipeline stage hold, for summaries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSummary {
    /// Pipeline stage.
    pub stage: usize,
    /// Number of ranks in the stage (tp × dp).
    pub ranks: usize,
    /// Distinct checkpoint tensors held by some rank of the stage.
    pub tensors: usize,
    /// Bytes held, summed over the stage's ranks.
    pub bytes: u64,
    /// Largest `bytes` of one rank of the stage.
    pub max_rank_bytes: u64,
    /// Bytes read from storage, summed over the stage's ranks.
    pub read_bytes: u64,
}

/// Read-only views of a rank's plan: it is built by [`build`] (or deserialized from a plan
/// [`build`] wrote), and its runs, tensors and byte counts agree only as built.
impl RankPlan {
    /// Where the rank sits.
    #[must_use]
    pub fn coords(&self) -> Coords {
        self.coords
    }

    /// Tensors, in arena order.
    #[must_use]
    pub fn tensors(&self) -> &[TensorPlan] {
        &self.tensors
    }

    /// Copy runs, sorted by (file, src).
    #[must_use]
    pub fn copies(&self) -> &[CopyRun] {
        &self.copies
    }

    /// Zero runs.
    #[must_use]
    pub fn zeros(&self) -> &[ZeroRun] {
        &self.zeros
    }

    /// Bytes held after loading: the sum of the tensors' sizes (vocab zero padding included,
    /// arena alignment gaps not).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes read from storage: the union of the pages ([`page_size`]) the copy runs touch.
    #[must_use]
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes
    }

    /// Size of the arena buffer: [`RankPlan::bytes`] plus the alignment gaps between tensors.
    #[must_use]
    pub fn arena_bytes(&self) -> u64 {
        self.arena_bytes
    }

    /// Peak staging memory: the largest page-rounded file window one tensor's copies span.
    #[must_use]
    pub fn staging_bytes(&self) -> u64 {
        self.staging_bytes
    }
}

/// Read-only views of a job's plan (see [`RankPlan`]'s).
impl Plan {
    /// Topology planned for.
    #[must_use]
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Name of the spec used.
    #[must_use]
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Files read, indexed by [`CopyRun::file`].
    #[must_use]
    pub fn files(&self) -> &[PlanFile] {
        &self.files
    }

    /// One entry per global rank.
    #[must_use]
    pub fn ranks(&self) -> &[RankPlan] {
        &self.ranks
    }
}

impl RankPlan {
    /// Bytes held per tensor kind, in [`TensorKind`] order, kinds with no bytes left out.
    pub fn bytes_by_kind(&self) -> Vec<(TensorKind, u64)> {
        let mut map = std::collections::BTreeMap::new();
        for t in &self.tensors {
            *map.entry(t.kind).or_insert(0u64) += t.bytes;
        }
        map.into_iter().filter(|&(_, b)| b > 0).collect()
    }

    /// Read amplification: bytes read from storage per byte held (0 when nothing is held).
    pub fn read_amplification(&self) -> f64 {
        if self.bytes == 0 {
            0.0
        } else {
            self.read_bytes as f64 / self.bytes as f64
        }
    }
}

/// Feeds a canonical binary encoding into SHA-256 through a buffer (hashing millions of tiny
/// fields one call at a time would cost more than the hashing).
struct Feed {
    hasher: Sha256,
    buf: Vec<u8>,
}

impl Feed {
    fn new() -> Self {
        Feed {
            hasher: Sha256::new(),
            buf: Vec::with_capacity(1 << 16),
        }
    }
    fn bytes(&mut self, b: &[u8]) {
        if self.buf.len() + b.len() > (1 << 16) {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
        if b.len() > (1 << 16) {
            self.hasher.update(b);
        } else {
            self.buf.extend_from_slice(b);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn usize(&mut self, v: usize) {
        self.u64(v as u64);
    }
    /// Length-prefixed, so field boundaries are unambiguous.
    fn str(&mut self, s: &str) {
        self.usize(s.len());
        self.bytes(s.as_bytes());
    }
    fn finish(mut self) -> [u8; 32] {
        self.hasher.update(&self.buf);
        self.hasher.finalize().into()
    }
}

fn kind_code(k: TensorKind) -> u64 {
    match k {
        TensorKind::Attention => 0,
        TensorKind::Mlp => 1,
        TensorKind::Experts => 2,
        TensorKind::Embedding => 3,
        TensorKind::Norm => 4,
        TensorKind::Other => 5,
    }
}

impl RankPlan {
    /// SHA-256 of the rank's canonical encoding (see [`Plan::hash`]).
    pub fn hash(&self) -> [u8; 32] {
        let mut f = Feed::new();
        let c = &self.coords;
        for v in [c.rank, c.tp_rank, c.pp_rank, c.dp_rank, c.ep_rank] {
            f.usize(v);
        }
        // read_bytes and staging_bytes are page-rounded accounting (the OS page size): ranks
        // on 4 KiB and 64 KiB-page hosts compute the same runs, so they must agree.
        for v in [self.bytes, self.arena_bytes] {
            f.u64(v);
        }
        f.usize(self.tensors.len());
        for t in &self.tensors {
            f.str(&t.name);
            f.str(t.dtype.name());
            f.usize(t.shape.len());
            for &d in &t.shape {
                f.u64(d);
            }
            for v in [t.offset, t.bytes, t.source as u64, kind_code(t.kind)] {
                f.u64(v);
            }
            f.u64(t.replicated as u64);
        }
        f.usize(self.copies.len());
        for r in &self.copies {
            for v in [
                r.file as u64,
                r.src,
                r.dst,
                r.len,
                r.count,
                r.src_stride,
                r.dst_stride,
            ] {
                f.u64(v);
            }
        }
        f.usize(self.zeros.len());
        for z in &self.zeros {
            for v in [z.dst, z.len, z.count, z.dst_stride] {
                f.u64(v);
            }
        }
        f.finish()
    }
}

impl Plan {
    /// A stable hash of the plan's contents, to check that every rank computed the same plan.
    ///
    /// SHA-256 of a canonical binary encoding: a version tag, the topology, the spec name,
    /// every file's name and length (not its path, device, inode or mtime, which differ
    /// between nodes mounting the same checkpoint), then the SHA-256 of every rank's own
    /// encoding ([`RankPlan::hash`]: every field of the rank except the page-rounded
    /// accounting `read_bytes`/`staging_bytes`, which depend on the host's page size;
    /// integers as little-endian u64, strings and lists length-prefixed). Ranks are hashed in
    /// parallel.
    pub fn hash(&self) -> [u8; 32] {
        let rank_hashes: Vec<[u8; 32]> = self.ranks.par_iter().map(RankPlan::hash).collect();
        let mut f = Feed::new();
        f.str("safeshard-plan-v2");
        let t = &self.topology;
        for v in [t.tp, t.pp, t.dp, t.ep] {
            f.usize(v);
        }
        match &t.pp_layers {
            Some(l) => {
                f.u64(1);
                f.usize(l.len());
                for &n in l {
                    f.usize(n);
                }
            }
            None => f.u64(0),
        }
        f.str(&self.spec);
        f.usize(self.files.len());
        for file in &self.files {
            f.str(&file.name);
            f.u64(file.identity.len);
        }
        f.usize(rank_hashes.len());
        for h in &rank_hashes {
            f.bytes(h);
        }
        f.finish()
    }

    /// [`Plan::hash`] as lowercase hex.
    pub fn hash_hex(&self) -> String {
        self.hash().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The plan of global rank `rank`, if it exists.
    pub fn rank(&self, rank: usize) -> Option<&RankPlan> {
        self.ranks.get(rank)
    }

    /// Per-stage summary, one entry per pipeline stage in order.
    pub fn stages(&self) -> Vec<StageSummary> {
        let pp = self.topology.pp.max(1);
        let mut out: Vec<StageSummary> = (0..pp)
            .map(|stage| StageSummary {
                stage,
                ranks: 0,
                tensors: 0,
                bytes: 0,
                max_rank_bytes: 0,
                read_bytes: 0,
            })
            .collect();
        let mut seen: Vec<std::collections::HashSet<usize>> = vec![Default::default(); pp];
        for r in &self.ranks {
            let Some(s) = out.get_mut(r.coords.pp_rank) else {
                continue;
            };
            s.ranks += 1;
            s.bytes += r.bytes;
            s.read_bytes += r.read_bytes;
            s.max_rank_bytes = s.max_rank_bytes.max(r.bytes);
            if let Some(set) = seen.get_mut(r.coords.pp_rank) {
                set.extend(r.tensors.iter().map(|t| t.source));
            }
        }
        for (s, set) in out.iter_mut().zip(seen) {
            s.tensors = set.len();
        }
        out
    }

    /// Sum of every rank's `bytes`.
    pub fn total_bytes(&self) -> u64 {
        self.ranks.iter().map(|r| r.bytes).sum()
    }

    /// Sum of every rank's `read_bytes`.
    pub fn total_read_bytes(&self) -> u64 {
        self.ranks.iter().map(|r| r.read_bytes).sum()
    }
}

/// The arena offset of the next tensor after `cursor`: rounded up to [`ALIGN`], with the gap
/// zeroed (so a rank's arena bytes, and its digest, never depend on what memory held before).
pub(crate) fn place_next(cursor: u64, zeros: &mut Vec<ZeroRun>) -> u64 {
    let offset = cursor.div_ceil(ALIGN) * ALIGN;
    if offset > cursor {
        zeros.push(ZeroRun {
            dst: cursor,
            len: offset - cursor,
            count: 1,
            dst_stride: offset - cursor,
        });
    }
    offset
}

/// Builds the plan. Deterministic: the same inputs give the same plan on every rank.
///
/// Ranks are built in parallel (rayon); the work is linear in held tensors × ranks. Errors
/// (`Error::Plan`) name the tensor whose placement is inconsistent: a layout that does not fit
/// the tensor, a sub-byte split off byte boundaries, a stage or owner outside the topology,
/// or a resolution that does not match the catalog.
pub fn build(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    topo: &Topology,
    spec_name: &str,
) -> Result<Plan> {
    topo.validate()?;
    if resolution.tensors.len() != ckpt.tensors.len() {
        return Err(Error::plan(format!(
            "the resolution has {} entries but the checkpoint has {} tensors",
            resolution.tensors.len(),
            ckpt.tensors.len()
        )));
    }
    let world = topo.world();
    // Tensors held by each stage, in catalog order ((file, offset) order).
    let mut by_stage: Vec<Vec<usize>> = vec![Vec::new(); topo.pp];
    for (i, (t, r)) in ckpt.tensors.iter().zip(&resolution.tensors).enumerate() {
        let Resolved::Held { stages, shards, .. } = r else {
            continue;
        };
        if t.file >= ckpt.files.len() || t.file > u32::MAX as usize {
            return Err(Error::plan_tensor(
                &t.name,
                format!("file index {} is out of range", t.file),
            ));
        }
        match shards {
            Shards::PerTp(layouts) if layouts.len() != topo.tp => {
                return Err(Error::plan_tensor(
                    &t.name,
                    format!("{} per-rank layouts for tp = {}", layouts.len(), topo.tp),
                ))
            }
            Shards::Expert { owner, .. } if *owner >= topo.tp * topo.dp => {
                return Err(Error::plan_tensor(
                    &t.name,
                    format!(
                        "expert owner {owner} is not an EP rank (ep ranks are 0..{})",
                        topo.tp * topo.dp
                    ),
                ))
            }
            _ => {}
        }
        let mut last = None;
        for &s in stages {
            if s >= topo.pp {
                return Err(Error::plan_tensor(
                    &t.name,
                    format!("stage {s} is outside pp = {}", topo.pp),
                ));
            }
            if last != Some(s) {
                by_stage[s].push(i);
            }
            last = Some(s);
        }
    }
    let ranks = (0..world)
        .into_par_iter()
        .map(|r| build_rank(ckpt, resolution, topo.coords(r), &by_stage))
        .collect::<Result<Vec<_>>>()?;
    Ok(Plan {
        topology: topo.clone(),
        spec: spec_name.to_string(),
        files: plan_files(ckpt),
        ranks,
    })
}

fn build_rank(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    coords: Coords,
    by_stage: &[Vec<usize>],
) -> Result<RankPlan> {
    let held = by_stage
        .get(coords.pp_rank)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let mut tensors = Vec::with_capacity(held.len());
    let mut copies = Vec::with_capacity(held.len());
    let mut zeros = Vec::new();
    let mut cursor = 0u64;
    let mut bytes = 0u64;
    let mut staging = 0u64;
    for &i in held {
        let (
            Some(t),
            Some(Resolved::Held {
                shards,
                kind,
                replicated,
                ..
            }),
        ) = (ckpt.tensors.get(i), resolution.tensors.get(i))
        else {
            continue;
        };
        let layout = match shards {
            Shards::PerTp(layouts) => match layouts.get(coords.tp_rank) {
                Some(l) => l,
                None => continue,
            },
            Shards::Expert { owner, layout, .. } => {
                if *owner != coords.ep_rank {
                    continue;
                }
                layout
            }
        };
        // `build` checked that the file index fits u32.
        let runs = tensor_runs(&t.name, t.dtype, &t.shape, t.file as u32, t.offset, layout)?;
        let offset = place_next(cursor, &mut zeros);
        staging = staging.max(span_bytes(&runs.copies));
        copies.extend(runs.copies.into_iter().map(|mut c| {
            c.dst += offset;
            c
        }));
        zeros.extend(runs.zeros.into_iter().map(|mut z| {
            z.dst += offset;
            z
        }));
        tensors.push(TensorPlan {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: layout.shape.clone(),
            offset,
            bytes: runs.bytes,
            source: i,
            kind: *kind,
            replicated: *replicated,
        });
        bytes += runs.bytes;
        cursor = offset + runs.bytes;
    }
    // Stable: runs of one tensor keep their order; catalog order is already (file, src) order.
    copies.sort_by_key(|c| (c.file, c.src));
    coalesce_copies(&mut copies);
    zeros.sort_by_key(|z| z.dst);
    coalesce_zeros(&mut zeros);
    let read_bytes = read_bytes(&copies);
    Ok(RankPlan {
        coords,
        tensors,
        copies,
        zeros,
        bytes,
        read_bytes,
        arena_bytes: cursor,
        staging_bytes: staging,
    })
}
