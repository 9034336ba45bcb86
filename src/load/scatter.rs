//! Loading some of a rank's tensors straight into caller buffers ([`load_rank_scattered`]):
//! the arena layout stays the plan's, and spans of it are redirected to the buffers, so the
//! engine, its tasks and its validation are the ones every load uses.

use std::collections::HashMap;
use std::time::Instant;

use super::{engine, rank_plan, Arena, ArenaInit, ExecStats, LoadOptions, LoadStats, RankTensors};
use crate::plan::{CopyRun, Plan, PlanFile, RankPlan, Strided, ZeroRun};
use crate::{Error, Result};

/// Loads rank `rank` of `plan` with some tensors written straight into caller memory (a
/// model's parameters, say), so that they are copied once, from the files into their final
/// place; the other tensors go into a fresh arena as with [`load_rank`](super::load_rank).
///
/// `into` pairs tensor names of the rank with buffers of exactly their byte size (row-major,
/// as safetensors stores them); a name may appear once. The buffers are borrowed for the
/// load only and hold their tensors when it returns. The returned [`RankTensors`] holds the
/// other tensors; the redirected ones are left out of it (their arena pages are never
/// touched, so they cost no memory). A fresh arena's pages, and the caller buffers' pages,
/// are made resident as [`LoadOptions::arena`] says (`Populate` acts like `Ahead` here, so
/// that the redirected spans are not faulted in).
///
/// ```
/// # fn main() -> safeshard::Result<()> {
/// use safeshard::{Job, LoadOptions, Topology};
/// # let dir = tempfile::tempdir().map_err(|e| safeshard::Error::io("tmp", e))?;
/// # safeshard::synth::write_checkpoint(dir.path(), &safeshard::synth::SynthOptions::preset("llama-tiny")?)?;
/// let job = Job::builder(dir.path()).topology(Topology::new(2, 1, 1, 1)?).open()?;
/// let name = "model.embed_tokens.weight";
/// let bytes = job.plan().ranks()[1].tensors().iter().find(|t| t.name == name).map_or(0, |t| t.bytes);
/// let mut embed = vec![0u8; bytes as usize];
/// let rest = safeshard::load::load_rank_scattered(
///     job.plan(), 1, &LoadOptions::default(), &mut [(name, &mut embed[..])],
/// )?;
/// assert!(rest.get(name).is_none());
/// assert_eq!(embed, safeshard::load::load_rank(job.plan(), 1, &LoadOptions::default())?
///     .get(name).map(|t| t.data.to_vec()).unwrap_or_default());
/// # Ok(())
/// # }
/// ```
pub fn load_rank_scattered(
    plan: &Plan,
    rank: usize,
    opts: &LoadOptions,
    into: &mut [(&str, &mut [u8])],
) -> Result<RankTensors> {
    let start = Instant::now();
    let rp = rank_plan(plan, rank)?;
    let slots = buffer_slots(rp, into)?;
    let redirects: Vec<engine::Redirect> = into
        .iter_mut()
        .zip(&slots)
        .map(|((_, buf), &(_, start))| engine::Redirect { start, dst: buf })
        .collect();
    let init = match opts.arena {
        ArenaInit::Populate => ArenaInit::Ahead,
        other => other,
    };
    // Runs may cross tensor boundaries (the plan merges back-to-back copies); each piece
    // must land in one buffer.
    let edges = edges(redirects.iter().map(|r| (r.start, r.dst.len())));
    let (copies, zeros) = (
        split_copies(&rp.copies, &edges),
        split_zeros(&rp.zeros, &edges),
    );
    let prepared = engine::Request::new(&plan.files, &copies, &zeros)
        .redirect(redirects)
        .prepare()?;
    let mut arena = Arena::new(rp.arena_bytes, init)?;
    let exec = prepared
        .populate_ahead(init == ArenaInit::Ahead)
        .run(&mut arena, opts)?
        .stats;
    let stats = LoadStats::of(rank, rp, &exec, 0, start);
    let mut loaded = RankTensors::from_arena(rp, arena, stats);
    for &(i, _) in &slots {
        loaded.leave_out(i);
    }
    Ok(loaded)
}

/// The sorted, distinct starts and ends of caller buffers at arena offsets
/// `(start, length)`: where [`split_copies`] cuts.
pub(crate) fn edges(buffers: impl Iterator<Item = (u64, usize)>) -> Vec<u64> {
    let mut e: Vec<u64> = buffers
        .flat_map(|(start, len)| [start, start.saturating_add(len as u64)])
        .collect();
    e.sort_unstable();
    e.dedup();
    e
}

/// A piece of a run's destination pattern that no edge cuts.
enum Piece {
    /// Chunks `first..first + n`.
    Rows { first: u64, n: u64 },
    /// `len` bytes at byte `off` of chunk `row`.
    Part { row: u64, off: u64, len: u64 },
}

/// Cuts pattern `p` at `edges`: whole chunks between the same two edges stay together, a
/// chunk an edge falls inside is cut there. `None` when no edge falls inside the pattern's
/// span (or its end overflows: validation refuses it later), so the run is kept whole.
fn pieces(p: Strided, edges: &[u64]) -> Option<Vec<Piece>> {
    let end = p.end()?;
    let inside = |s: u64, e: u64| {
        let i = edges.partition_point(|&x| x <= s);
        edges.get(i).is_some_and(|&x| x < e)
    };
    if p.len == 0 || p.count == 0 || !inside(p.start, end) {
        return None;
    }
    let region = |s: u64| edges.partition_point(|&x| x <= s);
    let mut out = Vec::new();
    let mut group: Option<(u64, u64, usize)> = None; // (first, n, region)
    for k in 0..p.count {
        let s = p.chunk_start(k);
        let e = s + p.len;
        if !inside(s, e) {
            let r = region(s);
            match &mut group {
                Some((_, n, gr)) if *gr == r => *n += 1,
                _ => {
                    if let Some((first, n, _)) = group.take() {
                        out.push(Piece::Rows { first, n });
                    }
                    group = Some((k, 1, r));
                }
            }
            continue;
        }
        if let Some((first, n, _)) = group.take() {
            out.push(Piece::Rows { first, n });
        }
        let mut at = s;
        let mut i = edges.partition_point(|&x| x <= s);
        while at < e {
            let stop = edges.get(i).copied().filter(|&x| x < e).unwrap_or(e);
            out.push(Piece::Part {
                row: k,
                off: at - s,
                len: stop - at,
            });
            at = stop;
            i += 1;
        }
    }
    if let Some((first, n, _)) = group {
        out.push(Piece::Rows { first, n });
    }
    Some(out)
}

/// `copies` cut at `edges` (sorted arena offsets: the starts and ends of caller buffers),
/// so that every piece lies inside one buffer or outside all; strided runs stay strided
/// where no edge cuts them.
pub(crate) fn split_copies(copies: &[CopyRun], edges: &[u64]) -> Vec<CopyRun> {
    let mut out = Vec::with_capacity(copies.len());
    for r in copies {
        // Both sides back to back: one run of one chunk, which the edges may cut.
        let r = r.as_one_chunk().unwrap_or(*r);
        match pieces(r.dst_pattern(), edges) {
            None => out.push(r),
            Some(ps) => out.extend(ps.into_iter().map(|p| match p {
                Piece::Rows { first, n } => r.rows(first, n),
                Piece::Part { row, off, len } => r.part(row, off, len),
            })),
        }
    }
    out
}

fn split_zeros(zeros: &[ZeroRun], edges: &[u64]) -> Vec<ZeroRun> {
    let mut out = Vec::with_capacity(zeros.len());
    for z in zeros {
        let z = z.as_one_chunk().unwrap_or(*z);
        match pieces(z.dst_pattern(), edges) {
            None => out.push(z),
            Some(ps) => out.extend(ps.into_iter().map(|p| match p {
                Piece::Rows { first, n } => z.rows(first, n),
                Piece::Part { row, off, len } => z.part(row, off, len),
            })),
        }
    }
    out
}

/// For every caller buffer of `into`: the index in `rp.tensors` and the arena offset of the
/// tensor it replaces, checked to name a tensor of the rank once and to have exactly its
/// bytes. The one check of caller buffers, for local and shared loads alike.
pub(crate) fn buffer_slots(rp: &RankPlan, into: &[(&str, &mut [u8])]) -> Result<Vec<(usize, u64)>> {
    let index: HashMap<&str, usize> = rp
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut taken = vec![false; rp.tensors.len()];
    let mut slots = Vec::with_capacity(into.len());
    for (name, buf) in into {
        let Some(&i) = index.get(*name) else {
            return Err(Error::invalid_argument(
                "into",
                format!(
                    "{name:?}: rank {} holds no tensor of that name",
                    rp.coords.rank
                ),
            ));
        };
        let t = &rp.tensors[i];
        if std::mem::replace(&mut taken[i], true) {
            return Err(Error::invalid_argument(
                "into",
                format!("{name:?}: given twice"),
            ));
        }
        if buf.len() as u64 != t.bytes {
            return Err(Error::invalid_argument(
                "into",
                format!(
                    "{name:?}: a buffer of {} bytes; the tensor ({} {:?}) has {}",
                    buf.len(),
                    t.dtype,
                    t.shape,
                    t.bytes
                ),
            ));
        }
        slots.push((i, t.offset));
    }
    Ok(slots)
}

/// Runs `copies` (single-chunk or strided runs of a plan's files, arena offsets) into
/// `arena`, the spans `(start, buffer)` of `redirects` written to those buffers instead; every
/// run must lie inside one buffer or outside all (checked before any byte is written). The
/// share modes read the bytes a rank reads itself this way when tensors go straight into
/// caller memory.
pub(crate) fn execute_redirected(
    files: &[PlanFile],
    copies: &[CopyRun],
    arena: &mut [u8],
    redirects: Vec<(u64, &mut [u8])>,
    opts: &LoadOptions,
) -> Result<ExecStats> {
    let redirects = redirects
        .into_iter()
        .map(|(start, dst)| engine::Redirect { start, dst })
        .collect();
    Ok(engine::Request::new(files, copies, &[])
        .redirect(redirects)
        .prepare()?
        .run(arena, opts)?
        .stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes_of(copies: &[CopyRun]) -> Vec<(u64, u64)> {
        // (dst byte, src byte) for every byte the runs copy.
        let mut v = Vec::new();
        for r in copies {
            for k in 0..r.count {
                let at = r.rows(k, 1);
                v.extend((0..r.len).map(|b| (at.dst + b, at.src + b)));
            }
        }
        v.sort_unstable();
        v
    }

    proptest! {
        /// Cutting runs at edges copies exactly the same bytes, and no piece crosses an edge.
        #[test]
        fn split_runs_copy_the_same_bytes_and_cross_no_edge(
            dst in 0u64..50, src in 0u64..50, len in 1u64..9, count in 1u64..6,
            gap in 0u64..5, sgap in 0u64..5, raw_edges in proptest::collection::vec(0u64..120, 0..6),
        ) {
            let r = CopyRun { file: 0, src, dst, len, count, src_stride: len + sgap, dst_stride: len + gap };
            let mut edges = raw_edges;
            edges.sort_unstable();
            edges.dedup();
            let split = split_copies(&[r], &edges);
            prop_assert_eq!(bytes_of(&split), bytes_of(&[r]));
            for p in &split {
                let d = p.dst_pattern();
                let (s, e) = (d.start, d.end().unwrap());
                prop_assert!(!edges.iter().any(|&x| s < x && x < e), "{:?} crosses {:?}", p, edges);
            }
            let z = ZeroRun { dst, len, count, dst_stride: len + gap };
            let zs = split_zeros(&[z], &edges);
            let cover = |zs: &[ZeroRun]| {
                let mut v: Vec<u64> = zs.iter().flat_map(|z| {
                    z.dst_pattern().chunks().flat_map(|(s, e)| s..e).collect::<Vec<_>>()
                }).collect();
                v.sort_unstable();
                v
            };
            prop_assert_eq!(cover(&zs), cover(&[z]));
            for p in &zs {
                let d = p.dst_pattern();
                let (s, e) = (d.start, d.end().unwrap());
                prop_assert!(!edges.iter().any(|&x| s < x && x < e));
            }
        }
    }
}
