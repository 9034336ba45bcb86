//! The rank engine: loads one rank's planned tensors from storage.
//!
//! A [`RankPlan`] lists the tensors a rank holds, in one contiguous arena, and the copy runs
//! that fill the arena from the files. [`load_rank`] executes them:
//!
//! 1. **File safety.** Every file the runs read is opened and its length, modification time,
//!    device and inode compared with the plan's [`crate::checkpoint::FileIdentity`]; every run
//!    must lie inside the file. A file truncated or replaced since planning is an
//!    [`Error::Truncated`] naming it, never a `SIGBUS`; so is a file truncated *while* it is
//!    loaded (short reads name the file; mapped windows are guarded by a `SIGBUS` handler
//!    that recovers faults inside them and fails the load naming the file).
//! 2. **Validation.** Runs must lie inside the arena and never overlap there, which is what
//!    makes the lock-free parallel copy sound; only the validation's token reaches the copy.
//! 3. **I/O.** [`IoMode::Auto`] (the default) reads cached contiguous runs with positioned
//!    reads straight into the arena (at least 8 workers taking tasks of about 8 MiB in file
//!    order, so several reads are in flight and the fresh arena's page faults are paid during
//!    them) and gathers cached strided runs from mapped windows (dropping their pages once
//!    copied); uncached runs go through the page cache, exactly their pages, asked for
//!    ahead of the readers, where the files fit in [`LoadOptions::page_cache_limit`] (half
//!    of `MemAvailable` by default), else contiguous ones with direct I/O.
//!    [`IoMode::Mmap`] maps only the page-aligned windows the runs cover (nearby windows
//!    merged), advises `WillNeed` on dense spans and exactly the touched pages of sparse
//!    strided ones, and copies from the mapping. [`IoMode::Pread`] uses positioned reads,
//!    straight into the arena for contiguous runs and through staging buffers (never more
//!    than [`LoadOptions::staging_budget`] bytes at once) for strided ones.
//! 4. **Views.** Only through the `unsafe` [`load_rank_views`], a tensor
//!    whose bytes are one contiguous span of a file is not copied: [`RankTensors`] hands out a
//!    slice of the mapping instead, valid only while no one truncates or writes the file.
//!
//! [`crate::Job`] bundles the steps before that (open, spec, resolve, plan) for library users, and
//! [`verify_rank`] checks loaded tensors against an independent slow path.

mod arena;
mod engine;
mod scatter;
mod sigbus;
mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use arena::{Arena, ArenaInit};
pub use engine::{execute, ExecStats, IoPaths};
pub use scatter::load_rank_scattered;
pub(crate) use scatter::{buffer_slots, edges, execute_redirected, split_copies};
pub use verify::read_tensor;
pub(crate) use verify::{layout_for, slice_layout};

use crate::checkpoint::{Checkpoint, Dtype};
use crate::plan::{CopyRun, NodeSpans, Plan, RankPlan, TensorPlan};
use crate::sharding::Resolution;
use crate::topology::Coords;
use crate::{Error, Result};

/// Which I/O engine reads the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoMode {
    /// Decided per task by what the page cache holds (`mincore`): cached contiguous runs
    /// with positioned reads straight into the arena (no file pages mapped, several reads
    /// in flight), cached strided runs gathered from a mapping. Uncached spans of files
    /// that fit in [`LoadOptions::page_cache_limit`] (by default half of `MemAvailable`)
    /// are read through the page cache, their pages asked for ahead, and the next load
    /// finds them cached; uncached contiguous spans of at least 1 MiB of larger files are
    /// read with direct I/O (large aligned reads, many in flight, filling and evicting no
    /// page-cache pages), falling back to buffered reads where the filesystem refuses
    /// `O_DIRECT`. Uncached strided spans (inner-dim splits) and small runs are
    /// read through the page cache, exactly their pages: one thread asks for them ahead of
    /// the readers (`POSIX_FADV_WILLNEED`, many requests in flight), kernel readahead is off
    /// for the load's handles, and the pages stay cached; where the ranks of the node read a
    /// strided span together ([`LoadOptions::node_spans`]), the whole span is asked for in
    /// large requests instead. `docs/performance.md` ("One rank")
    /// has the measurements behind each choice.
    #[default]
    Auto,
    /// Memory-map the planned windows and copy from the page cache.
    Mmap,
    /// Positioned reads (`pread`) only, for network filesystems where mmap is slow.
    Pread,
    /// Direct I/O (`O_DIRECT`) only: aligned reads into reused bounce buffers, copied into
    /// the arena; nothing goes through (or stays in) the page cache. `Auto` does this for
    /// spans that are not cached when the files do not fit in the page cache.
    Direct,
}

impl IoMode {
    /// The name `FromStr` accepts: `auto`, `mmap`, `pread` or `direct`.
    pub fn name(self) -> &'static str {
        match self {
            IoMode::Auto => "auto",
            IoMode::Mmap => "mmap",
            IoMode::Pread => "pread",
            IoMode::Direct => "direct",
        }
    }
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for IoMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "mmap" => Ok(IoMode::Mmap),
            "pread" => Ok(IoMode::Pread),
            "direct" => Ok(IoMode::Direct),
            other => Err(Error::invalid_argument(
                "io",
                format!("{other:?}: unknown engine (expected auto, mmap, pread or direct)"),
            )),
        }
    }
}

/// Default staging budget of the pread engine: 256 MiB.
pub const DEFAULT_STAGING_BUDGET: u64 = 256 << 20;

/// How to load.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// I/O engine.
    pub io: IoMode,
    /// Most bytes of staging buffers held at once (pread engine, strided runs).
    pub staging_budget: u64,
    /// How a fresh arena is prepared.
    pub arena: ArenaInit,
    /// Reader threads (`None`: the engine's measured default, see `pool.rs`; the stats say
    /// how many ran).
    pub threads: Option<usize>,
    /// Mmap engine: read contiguous runs with `pread` straight into the arena and use the
    /// mapping only for strided gathers (and views).
    pub pread_contiguous: bool,
    /// Cancellation and progress shared with the caller (the Python binding's Ctrl-C and
    /// progress bar); `None`: neither.
    pub control: Option<Arc<LoadControl>>,
    /// [`IoMode::Auto`]: uncached contiguous spans go through the page cache (and stay there
    /// for the next load) when the files the rank reads total at most this many bytes, else
    /// they are read with direct I/O, which neither fills the cache nor evicts what it holds
    /// (a model that does not fit is not read into memory twice). `None` (the default): half
    /// of `MemAvailable` when the load starts (direct I/O where that cannot be read);
    /// `Some(0)`: always direct I/O. Buffered reads with their pages asked for ahead were the
    /// faster cold load in the measurements behind this default (`docs/performance.md`,
    /// "One rank"), and a warm next load besides.
    pub page_cache_limit: Option<u64>,
    /// [`IoMode::Auto`]: the file spans this rank's node reads together at the same time
    /// (the ranks sharing its page cache; [`NodeSpans::of`]). Where an uncached strided run
    /// (an inner-dim split) lies inside one, the rank asks for the run's whole span in large
    /// sequential requests instead of its own pages row by row: the other ranks read the
    /// rest of it anyway, and each page comes from storage once. `None`: every rank reads
    /// exactly its pages, as a rank loading alone should.
    pub node_spans: Option<Arc<NodeSpans>>,
}

/// Shared between a running load and whoever watches it: [`LoadControl::cancel`] stops the
/// load between copy tasks (about 8 MiB each) with [`Error::Cancelled`], and
/// [`LoadControl::done_bytes`] counts the arena bytes filled so far.
#[derive(Debug, Default)]
pub struct LoadControl {
    cancelled: AtomicBool,
    done: AtomicU64,
}

impl LoadControl {
    /// Asks the load to stop at its next task.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Whether [`LoadControl::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Arena bytes filled so far.
    pub fn done_bytes(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// Runs one copy task of `bytes` arena bytes under `opts.control`: refused once cancelled,
/// counted when done.
pub(crate) fn controlled(
    opts: &LoadOptions,
    bytes: u64,
    task: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let Some(c) = &opts.control else {
        return task();
    };
    if c.is_cancelled() {
        return Err(Error::Cancelled);
    }
    task()?;
    c.done.fetch_add(bytes, Ordering::Relaxed);
    Ok(())
}

impl LoadOptions {
    /// These options with the spans that `node_ranks` (ranks of `plan` loading at the same
    /// time on this machine, sharing its page cache, `rank` among them) read together
    /// ([`LoadOptions::node_spans`]); as they are where the spans would go unused: another
    /// engine than [`IoMode::Auto`], a rank alone, or no span the node covers.
    pub fn with_node_spans(self, plan: &Plan, node_ranks: &[usize], rank: usize) -> LoadOptions {
        if self.io != IoMode::Auto || node_ranks.len() < 2 {
            return self;
        }
        let spans = NodeSpans::of(plan, node_ranks, rank);
        LoadOptions {
            node_spans: (!spans.is_empty()).then(|| Arc::new(spans)),
            ..self
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            io: IoMode::default(),
            staging_budget: DEFAULT_STAGING_BUDGET,
            arena: ArenaInit::default(),
            threads: None,
            pread_contiguous: false,
            control: None,
            page_cache_limit: None,
            node_spans: None,
        }
    }
}

/// What one rank load did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadStats {
    /// Global rank.
    pub rank: usize,
    /// Tensors held.
    pub tensors: usize,
    /// Bytes held (the tensors' sizes, vocab zero padding included).
    pub bytes: u64,
    /// Bytes read from storage (page-rounded for mmap; bytes requested for pread).
    pub read_bytes: u64,
    /// Bytes handed out as views (not copied).
    pub view_bytes: u64,
    /// Most staging memory held at once.
    pub peak_staging: u64,
    /// Wall-clock seconds of the load (file checks, mapping, copies).
    pub seconds: f64,
    /// Reader threads the copies ran on (0: no copy ran in this process, e.g. a rank that
    /// received every byte from others).
    pub threads: usize,
    /// Arena bytes by how they were read: what [`IoMode::Auto`] chose.
    pub paths: IoPaths,
}

impl LoadStats {
    /// The stats of rank `rank` of plan rank `rp` after `exec`, started at `start`.
    pub(crate) fn of(
        rank: usize,
        rp: &RankPlan,
        exec: &ExecStats,
        view_bytes: u64,
        start: Instant,
    ) -> LoadStats {
        LoadStats {
            rank,
            tensors: rp.tensors.len(),
            bytes: rp.bytes,
            read_bytes: exec.read_bytes,
            view_bytes,
            peak_staging: exec.peak_staging,
            seconds: start.elapsed().as_secs_f64(),
            threads: exec.threads,
            paths: exec.paths,
        }
    }
}

/// A view into a mapped file window.
struct ViewRef {
    file: u32,
    src: u64,
}

/// One rank's tensors after loading: an arena plus, with views, slices of file mappings.
pub struct RankTensors {
    coords: Coords,
    tensors: Vec<TensorPlan>,
    by_name: HashMap<String, usize>,
    arena: Arena,
    views: HashMap<usize, ViewRef>,
    mapped: Option<Arc<engine::Mapped>>,
    taken: Vec<bool>,
    stats: LoadStats,
    /// Whether the steps its plan leaves until after the load ran (see
    /// [`RankTensors::is_finished`]).
    finished: bool,
    /// (name, holder) of tensors left out because another tensor holds their values.
    aliases: Vec<(String, String)>,
}

impl std::fmt::Debug for RankTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankTensors")
            .field("coords", &self.coords)
            .field("tensors", &self.tensors.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// A borrowed tensor of a [`RankTensors`].
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    /// Checkpoint tensor name.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Rank-local shape.
    pub shape: &'a [u64],
    /// Little-endian bytes, row-major, as in safetensors.
    pub data: &'a [u8],
    /// Whether `data` borrows the file mapping (a view) rather than the arena.
    pub is_view: bool,
}

/// A tensor taken out of a [`RankTensors`], owning its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnedTensor {
    /// Checkpoint tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Rank-local shape.
    pub shape: Vec<u64>,
    /// Bytes.
    pub data: Vec<u8>,
}

impl RankTensors {
    /// Where the rank sits.
    pub fn coords(&self) -> Coords {
        self.coords
    }

    /// Number of tensors held (not taken out, not loaded elsewhere).
    pub fn len(&self) -> usize {
        self.taken.iter().filter(|&&t| !t).count()
    }

    /// Whether the rank holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the load did.
    pub fn stats(&self) -> &LoadStats {
        &self.stats
    }

    /// The plan entries of the tensors, in arena order.
    pub fn plans(&self) -> &[TensorPlan] {
        &self.tensors
    }

    fn tensor_at(&self, i: usize) -> Option<TensorRef<'_>> {
        let t = self.tensors.get(i)?;
        let (data, is_view) = match (self.views.get(&i), &self.mapped) {
            (Some(v), Some(m)) => (m.slice(v.file, v.src, t.bytes)?, true),
            _ => {
                let s = usize::try_from(t.offset).ok()?;
                let e = s.checked_add(usize::try_from(t.bytes).ok()?)?;
                (self.arena.get(s..e)?, false)
            }
        };
        Some(TensorRef {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data,
            is_view,
        })
    }

    /// The arena bytes of tensor `i` (plan order), unless it is a view of the file mapping:
    /// how a job writes buffers that have no file source.
    pub(crate) fn arena_tensor_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        if self.views.contains_key(&i) {
            return None;
        }
        let t = self.tensors.get(i)?;
        let s = usize::try_from(t.offset).ok()?;
        let e = s.checked_add(usize::try_from(t.bytes).ok()?)?;
        self.arena.get_mut(s..e)
    }

    /// The tensor with this checkpoint name.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        self.tensor_at(*self.by_name.get(name)?)
    }

    /// All tensors not taken out with [`RankTensors::take`], in arena order.
    pub fn iter(&self) -> impl Iterator<Item = TensorRef<'_>> + '_ {
        (0..self.tensors.len())
            .filter(move |&i| !self.taken.get(i).copied().unwrap_or(false))
            .filter_map(move |i| self.tensor_at(i))
    }

    /// Copies the view tensors into the arena and drops the file mappings, so that every
    /// tensor lives in the arena.
    pub fn materialize(&mut self) {
        if let Some(m) = self.mapped.take() {
            for (&i, v) in &self.views {
                let Some(t) = self.tensors.get(i) else {
                    continue;
                };
                let (Ok(s), Ok(n)) = (usize::try_from(t.offset), usize::try_from(t.bytes)) else {
                    continue;
                };
                if let (Some(src), Some(dst)) = (
                    m.slice(v.file, v.src, t.bytes),
                    self.arena.get_mut(s..s + n),
                ) {
                    dst.copy_from_slice(src);
                }
            }
            self.views.clear();
        }
    }

    /// Takes one tensor out, copying its bytes into an owned buffer. It is no longer returned
    /// by [`RankTensors::get`] or [`RankTensors::iter`]; its arena bytes are unspecified.
    pub fn take(&mut self, name: &str) -> Option<OwnedTensor> {
        let t = self.get(name)?;
        let owned = OwnedTensor {
            name: t.name.to_string(),
            dtype: t.dtype,
            shape: t.shape.to_vec(),
            data: t.data.to_vec(),
        };
        if let Some(i) = self.by_name.remove(name) {
            self.views.remove(&i);
            if let Some(t) = self.taken.get_mut(i) {
                *t = true;
            }
        }
        Some(owned)
    }

    /// The arena and the tensor table (offsets into it), with views materialized first: for
    /// engines that copy the whole arena to a device at once, or reuse it for the next load.
    pub fn into_parts(mut self) -> (Arena, Vec<TensorPlan>) {
        self.materialize();
        (self.arena, self.tensors)
    }

    /// Whether the steps its plan leaves until after the load ran: for vLLM names
    /// ([`crate::TensorNames::Vllm`]) the transposes, the buffer values and the embeddings
    /// vLLM re-ties (see [`crate::vllm`]). Every [`crate::Job`] load is finished; a load of
    /// the lower layers is not, until [`crate::Job::finish`]. A finished rank is never
    /// finished again, so no step (a transpose) is applied twice.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// `(name, holder)` for every tensor of the plan this rank leaves out because its tensor
    /// `holder` holds the same values under the name vLLM keeps (vLLM's re-tied embeddings:
    /// `("model.embed_tokens.weight", "lm_head.weight")`). Empty for checkpoint names.
    pub fn aliases(&self) -> &[(String, String)] {
        &self.aliases
    }
}

impl RankTensors {
    /// Drops tensor `i` from the table (as [`RankTensors::take`] does, without copying it).
    pub(crate) fn leave_out(&mut self, i: usize) {
        if let Some(t) = self.tensors.get(i) {
            self.by_name.remove(&t.name);
        }
        self.views.remove(&i);
        if let Some(t) = self.taken.get_mut(i) {
            *t = true;
        }
    }

    /// Leaves tensor `i` out because tensor `holder` holds its values (see
    /// [`RankTensors::aliases`]).
    pub(crate) fn alias(&mut self, i: usize, holder: &str) {
        if let Some(t) = self.tensors.get(i) {
            self.aliases.push((t.name.clone(), holder.to_string()));
        }
        self.leave_out(i);
    }

    /// Records that the plan's post-load steps ran (see [`RankTensors::is_finished`]).
    pub(crate) fn mark_finished(&mut self) {
        self.finished = true;
    }

    /// The bytes of tensor `i` (plan order), wherever they are (arena or view).
    pub(crate) fn tensor_data(&self, i: usize) -> Option<&[u8]> {
        self.tensor_at(i).map(|t| t.data)
    }

    /// Whether tensor `i` was taken out or loaded elsewhere.
    pub(crate) fn is_left_out(&self, i: usize) -> bool {
        self.taken.get(i).copied().unwrap_or(false)
    }

    /// The tensors of `rp` held in `arena` (laid out as `rp.tensors` says, no views): how both
    /// a local load and a distributed one ([`crate::dist`]) hand back the same type.
    pub(crate) fn from_arena(rp: &RankPlan, arena: Arena, stats: LoadStats) -> RankTensors {
        let by_name = rp
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        RankTensors {
            coords: rp.coords,
            tensors: rp.tensors.clone(),
            by_name,
            arena,
            views: HashMap::new(),
            mapped: None,
            taken: vec![false; rp.tensors.len()],
            stats,
            finished: false,
            aliases: Vec::new(),
        }
    }
}

/// Tensors that are one contiguous file span, as (tensor index, file, source offset).
fn view_candidates(rp: &RankPlan) -> Vec<(usize, u32, u64)> {
    // Contiguous runs by arena start, to find the run covering each tensor.
    let mut runs: Vec<&CopyRun> = rp
        .copies
        .iter()
        .filter(|r| r.count == 1 || (r.src_stride == r.len && r.dst_stride == r.len))
        .collect();
    runs.sort_by_key(|r| r.dst);
    let mut out = Vec::new();
    for (i, t) in rp.tensors.iter().enumerate() {
        if t.bytes == 0 {
            continue;
        }
        let k = runs.partition_point(|r| r.dst <= t.offset);
        let Some(r) = k.checked_sub(1).and_then(|k| runs.get(k)) else {
            continue;
        };
        let run_end = r.dst.saturating_add(r.len.saturating_mul(r.count));
        if t.offset.saturating_add(t.bytes) <= run_end {
            out.push((i, r.file, r.src + (t.offset - r.dst)));
        }
    }
    out
}

/// Contiguous runs with the arena ranges of view tensors cut out.
fn clip_runs(copies: &[CopyRun], cut: &[(u64, u64)]) -> Vec<CopyRun> {
    let mut out = Vec::with_capacity(copies.len());
    for r in copies {
        let contiguous = r.count == 1 || (r.src_stride == r.len && r.dst_stride == r.len);
        if !contiguous || cut.is_empty() {
            out.push(*r);
            continue;
        }
        let total = r.len * r.count;
        let (mut s, e) = (r.dst, r.dst + total);
        let mut k = cut.partition_point(|c| c.1 <= s);
        while s < e {
            match cut.get(k) {
                Some(&(cs, ce)) if cs < e => {
                    if cs > s {
                        out.push(contig(r, s, cs - s));
                    }
                    s = s.max(ce);
                    k += 1;
                }
                _ => {
                    out.push(contig(r, s, e - s));
                    break;
                }
            }
        }
    }
    out
}

fn contig(r: &CopyRun, dst: u64, len: u64) -> CopyRun {
    CopyRun {
        file: r.file,
        src: r.src + (dst - r.dst),
        dst,
        len,
        count: 1,
        src_stride: len,
        dst_stride: len,
    }
}

/// Loads rank `rank` of `plan` into a fresh arena. Every tensor is copied into memory the
/// result owns (zero-copy views of the files: [`load_rank_views`]).
pub fn load_rank(plan: &Plan, rank: usize, opts: &LoadOptions) -> Result<RankTensors> {
    load_rank_into(plan, rank, opts, None)
}

/// Loads rank `rank` of `plan`, reusing `arena` when it is large enough (touched memory
/// avoids the page faults of a fresh allocation).
pub fn load_rank_into(
    plan: &Plan,
    rank: usize,
    opts: &LoadOptions,
    arena: Option<Arena>,
) -> Result<RankTensors> {
    load_rank_impl(plan, rank, opts, arena, Access::Copied)
}

/// Loads rank `rank` of `plan` into `buf`, memory the caller owns (for example pinned host
/// memory for a later device copy), laid out as the rank's arena: tensor `t` at
/// `t.offset`, the gaps between tensors zeroed, bytes past the arena's length untouched.
/// `buf` must hold at least [`RankPlan::arena_bytes`].
pub fn load_rank_into_buffer(
    plan: &Plan,
    rank: usize,
    opts: &LoadOptions,
    buf: &mut [u8],
) -> Result<LoadStats> {
    let start = Instant::now();
    let rp = rank_plan(plan, rank)?;
    let need = rp.arena_bytes;
    let Some(arena) = usize::try_from(need).ok().and_then(|n| buf.get_mut(..n)) else {
        return Err(Error::invalid_argument(
            "out",
            format!("{} bytes: rank {rank} needs {need} (its arena)", buf.len()),
        ));
    };
    zero_gaps(rp, arena);
    let exec = engine::Request::new(&plan.files, &rp.copies, &rp.zeros)
        .prepare()?
        .run(arena, opts)?
        .stats;
    Ok(LoadStats::of(rank, rp, &exec, 0, start))
}

/// Zeroes the arena bytes no tensor covers (alignment gaps and the tail), which a fresh
/// arena has as zeros already and a caller's buffer may not.
fn zero_gaps(rp: &RankPlan, arena: &mut [u8]) {
    let mut spans: Vec<(u64, u64)> = rp
        .tensors
        .iter()
        .map(|t| (t.offset, t.offset.saturating_add(t.bytes)))
        .collect();
    spans.sort_unstable();
    let mut cursor = 0u64;
    for (s, e) in spans
        .into_iter()
        .chain([(arena.len() as u64, arena.len() as u64)])
    {
        if s > cursor {
            let (a, b) = (cursor as usize, (s as usize).min(arena.len()));
            if let Some(gap) = arena.get_mut(a..b) {
                gap.fill(0);
            }
        }
        cursor = cursor.max(e);
    }
}

pub(crate) fn rank_plan(plan: &Plan, rank: usize) -> Result<&RankPlan> {
    plan.ranks.get(rank).ok_or_else(|| {
        Error::invalid_argument(
            "rank",
            format!(
                "{rank}: the plan has {} ranks (0..{})",
                plan.ranks.len(),
                plan.ranks.len()
            ),
        )
    })
}

/// [`load_rank`] with zero-copy views: tensors that are one contiguous span of a file are not
/// copied; [`RankTensors`] hands out slices of the file mapping instead (with
/// [`IoMode::Auto`] or [`IoMode::Mmap`]; the other engines copy every tensor).
///
/// # Safety
///
/// The slices borrow a shared mapping of the checkpoint files, valid for as long as the
/// returned [`RankTensors`] (or until [`RankTensors::materialize`]). The caller must ensure
/// that no file of the plan is truncated or written to while the result is alive: reading a
/// mapped page past a truncated end raises `SIGBUS`, and a write changes bytes behind a
/// shared reference. Checkpoint files that are only ever replaced by rename (as Hugging Face
/// tools do) are safe.
pub unsafe fn load_rank_views(plan: &Plan, rank: usize, opts: &LoadOptions) -> Result<RankTensors> {
    load_rank_impl(plan, rank, opts, None, Access::Views)
}

/// Whether a load may hand out views of the file mapping: only the unsafe
/// [`load_rank_views`] asks for them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Every tensor copied into the arena.
    Copied,
    /// Contiguous tensors as views of the mapping.
    Views,
}

fn load_rank_impl(
    plan: &Plan,
    rank: usize,
    opts: &LoadOptions,
    arena: Option<Arena>,
    access: Access,
) -> Result<RankTensors> {
    let start = Instant::now();
    let rp = rank_plan(plan, rank)?;
    let mut views = HashMap::new();
    let mut view_bytes = 0;
    // Views need a mapping of every contiguous tensor, whatever the engine.
    let views_on = access == Access::Views && matches!(opts.io, IoMode::Auto | IoMode::Mmap);
    let clipped;
    let request = if views_on {
        let cands = view_candidates(rp);
        let mut cut: Vec<(u64, u64)> = Vec::with_capacity(cands.len());
        for &(i, file, src) in &cands {
            if let Some(t) = rp.tensors.get(i) {
                cut.push((t.offset, t.offset + t.bytes));
                view_bytes += t.bytes;
                views.insert(i, ViewRef { file, src });
            }
        }
        cut.sort_unstable();
        clipped = clip_runs(&rp.copies, &cut);
        engine::Request::new(&plan.files, &clipped, &rp.zeros).views_of(&rp.copies)
    } else {
        engine::Request::new(&plan.files, &rp.copies, &rp.zeros)
    };
    let prepared = request.prepare()?;
    let mut arena = match arena {
        Some(a) => a.reuse(rp.arena_bytes, opts.arena)?,
        None => Arena::new(rp.arena_bytes, opts.arena)?,
    };
    let ahead = !views_on && arena.is_fresh() && opts.arena == ArenaInit::Ahead;
    let executed = prepared.populate_ahead(ahead).run(&mut arena, opts)?;
    let (exec, mapped) = (executed.stats, executed.mapped.map(Arc::new));
    let stats = LoadStats::of(rank, rp, &exec, view_bytes, start);
    let mut loaded = RankTensors::from_arena(rp, arena, stats);
    loaded.views = views;
    loaded.mapped = mapped;
    Ok(loaded)
}

/// Checks every tensor of a loaded rank against the independent slow path: the whole source
/// tensor read with `read_at` and sliced in memory by its spec [`crate::sharding::Layout`].
/// Returns the number of tensors checked; a mismatch names the tensor and the first differing
/// byte.
pub fn verify_rank(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    loaded: &RankTensors,
) -> Result<usize> {
    let coords = loaded.coords();
    let mut n = 0;
    for (i, t) in loaded.plans().iter().enumerate() {
        if loaded.is_left_out(i) {
            continue;
        }
        let Some(got) = loaded.tensor_at(i) else {
            return Err(Error::plan_tensor(
                &t.name,
                "verify: missing from the loaded rank",
            ));
        };
        let info = ckpt
            .tensors
            .get(t.source)
            .ok_or_else(|| Error::plan_tensor(&t.name, "verify: unknown source"))?;
        let layout = layout_for(resolution, t.source, &coords).ok_or_else(|| {
            Error::plan_tensor(
                &t.name,
                format!("verify: not held by rank {} in the resolution", coords.rank),
            )
        })?;
        let on_rank = |e: Error| match e {
            Error::OutOfMemory {
                bytes,
                what,
                rank: None,
            } => Error::OutOfMemory {
                bytes,
                what,
                rank: Some(coords.rank),
            },
            other => other,
        };
        let whole = read_tensor(ckpt, info).map_err(on_rank)?;
        let want = slice_layout(&whole, &info.shape, info.dtype.bits(), layout).map_err(on_rank)?;
        drop(whole);
        if want.as_slice() != got.data {
            let first = want
                .iter()
                .zip(got.data)
                .position(|(a, b)| a != b)
                .unwrap_or(want.len().min(got.data.len()));
            return Err(Error::VerifyMismatch {
                rank: coords.rank,
                tensor: t.name.clone(),
                byte: first as u64,
                loaded: got.data.len() as u64,
                expected: want.len() as u64,
            });
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests;

/// SHA-256 (lower-case hex) of a loaded rank's arena: `safeshard load --digest` and the
/// Python `Rank.digest()` print the same string.
pub fn digest_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
