//! Byte segments of a plan and a small `pread` executor for them.
//!
//! The share modes work on [`Segment`]s: one contiguous file range copied to one arena range
//! (a plan [`CopyRun`] of `count` chunks is `count` segments). [`FileSet`] opens plan files
//! lazily, checks their length against the plan, and reads with `pread`, counting every byte
//! read from storage.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::plan::{CopyRun, Plan, RankPlan};
use crate::{Error, Result};

/// One contiguous copy: `len` bytes from file `file` at `src` to arena offset `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Segment {
    /// Index into [`Plan::files`].
    pub file: u32,
    /// File offset.
    pub src: u64,
    /// Length in bytes.
    pub len: u64,
    /// Arena offset.
    pub dst: u64,
}

/// The segments of one copy run, chunk by chunk.
pub fn run_segments(run: &CopyRun) -> impl Iterator<Item = Segment> + '_ {
    (0..run.count).map(move |i| Segment {
        file: run.file,
        src: run.src + i * run.src_stride,
        len: run.len,
        dst: run.dst + i * run.dst_stride,
    })
}

/// All segments of a rank, in plan order; empty chunks are dropped.
pub fn rank_segments(rank: &RankPlan) -> Vec<Segment> {
    rank.copies
        .iter()
        .flat_map(run_segments)
        .filter(|s| s.len > 0)
        .collect()
}

/// Checks that every run and zero run of `rank` stays inside its arena (a corrupt or
/// hand-made plan must give an error, not a panic).
pub fn check_rank(plan: &Plan, rank: &RankPlan) -> Result<()> {
    let bad = |what: &str| {
        Error::Plan(format!(
            "rank {}: {what} outside its {}-byte arena",
            rank.coords.rank, rank.bytes
        ))
    };
    let end = |dst: u64, len: u64, count: u64, stride: u64| -> Option<u64> {
        if count == 0 {
            return Some(dst);
        }
        (count - 1)
            .checked_mul(stride)?
            .checked_add(dst)?
            .checked_add(len)
    };
    for r in &rank.copies {
        if (r.file as usize) >= plan.files.len() {
            return Err(Error::Plan(format!(
                "rank {}: copy run names file #{} of {}",
                rank.coords.rank,
                r.file,
                plan.files.len()
            )));
        }
        match end(r.dst, r.len, r.count, r.dst_stride) {
            Some(e) if e <= rank.bytes => {}
            _ => return Err(bad("a copy run ends")),
        }
        if end(r.src, r.len, r.count, r.src_stride).is_none() {
            return Err(bad("a copy run's source overflows;"));
        }
    }
    for z in &rank.zeros {
        match end(z.dst, z.len, z.count, z.dst_stride) {
            Some(e) if e <= rank.bytes => {}
            _ => return Err(bad("a zero run ends")),
        }
    }
    Ok(())
}

/// A fresh zeroed arena for `rank` with its zero runs applied (they are zero already; kept
/// explicit so a reused arena would be correct too).
pub fn new_arena(rank: &RankPlan) -> Result<Vec<u8>> {
    let len = usize::try_from(rank.bytes)
        .map_err(|_| Error::Load(format!("rank {}: arena too large", rank.coords.rank)))?;
    let mut arena = Vec::new();
    arena.try_reserve_exact(len).map_err(|_| {
        Error::Load(format!(
            "rank {}: cannot allocate {len} bytes for its tensors",
            rank.coords.rank
        ))
    })?;
    arena.resize(len, 0);
    Ok(arena)
}

/// Plan files opened on demand, with their lengths checked against the plan.
pub struct FileSet<'p> {
    plan: &'p Plan,
    open: Vec<Option<File>>,
    /// Bytes read from storage so far.
    pub read_bytes: u64,
}

impl<'p> FileSet<'p> {
    /// No file opened yet.
    pub fn new(plan: &'p Plan) -> Self {
        FileSet {
            plan,
            open: (0..plan.files.len()).map(|_| None).collect(),
            read_bytes: 0,
        }
    }

    fn file(&mut self, index: u32) -> Result<&File> {
        let pf = self
            .plan
            .files
            .get(index as usize)
            .ok_or_else(|| Error::Plan(format!("file #{index} is not in the plan")))?;
        let slot = self
            .open
            .get_mut(index as usize)
            .ok_or_else(|| Error::Plan(format!("file #{index} is not in the plan")))?;
        if slot.is_none() {
            let f = File::open(&pf.path).map_err(|e| Error::io(&pf.path, e))?;
            let len = f.metadata().map_err(|e| Error::io(&pf.path, e))?.len();
            if len != pf.identity.len {
                return Err(Error::Load(format!(
                    "{}: file is {len} bytes but was {} bytes when planned (changed or \
                     truncated since, or a different file on this node)",
                    pf.path.display(),
                    pf.identity.len
                )));
            }
            *slot = Some(f);
        }
        slot.as_ref()
            .ok_or_else(|| Error::Plan(format!("file #{index} could not be opened")))
    }

    /// Reads `dst.len()` bytes of file `file` at `offset` into `dst`.
    pub fn read(&mut self, file: u32, offset: u64, dst: &mut [u8]) -> Result<()> {
        let f = self.file(file)?;
        let res = f.read_exact_at(dst, offset);
        if let Err(e) = res {
            let path = self
                .plan
                .files
                .get(file as usize)
                .map(|p| p.path.display().to_string())
                .unwrap_or_default();
            return Err(Error::Load(format!(
                "{path}: cannot read {} bytes at offset {offset}: {e}",
                dst.len()
            )));
        }
        self.read_bytes += dst.len() as u64;
        Ok(())
    }

    /// Reads one segment into the arena.
    pub fn read_segment(&mut self, seg: &Segment, arena: &mut [u8]) -> Result<()> {
        let range = slice_range(seg.dst, seg.len, arena.len())?;
        let dst = arena
            .get_mut(range)
            .ok_or_else(|| Error::Plan("segment outside the arena".into()))?;
        self.read(seg.file, seg.src, dst)
    }
}

/// `start..start + len` as a usize range checked against `limit`.
pub fn slice_range(start: u64, len: u64, limit: usize) -> Result<std::ops::Range<usize>> {
    let s = usize::try_from(start).ok();
    let e = start.checked_add(len).and_then(|e| usize::try_from(e).ok());
    match (s, e) {
        (Some(s), Some(e)) if e <= limit => Ok(s..e),
        _ => Err(Error::Plan(format!(
            "byte range {start}+{len} outside a buffer of {limit} bytes"
        ))),
    }
}
