//! The run machinery of the vLLM transform: every plan tensor's copy and zero runs are
//! relocated into the output tensor a pass placed it in ([`Placement`]), cut at tensor
//! boundaries and rejoined into strided runs where the pieces form one pattern.

use crate::plan::{CopyRun, RankPlan, ZeroRun};
use crate::{Error, Result};

/// Where a part's bytes go inside its vLLM tensor: element `i` of the part (row-major over
/// `shape`) lands at byte `base + sum(i_d * strides[d])`.
#[derive(Clone, Debug)]
pub(super) struct Placement {
    /// Output tensor index.
    pub out: usize,
    /// Byte offset of the part's first element in the output tensor.
    pub base: u64,
    /// The part's shape (as the plan tensor has it).
    pub shape: Vec<u64>,
    /// Byte strides in the output tensor, per part dimension.
    pub strides: Vec<u64>,
    /// Element size in bytes.
    pub elem: u64,
}

impl Placement {
    /// Bytes of the largest trailing block that stays contiguous, and the dimension just
    /// outside it (`None`: the whole part is contiguous).
    fn block(&self) -> (u64, Option<usize>) {
        let mut b = self.elem;
        for d in (0..self.shape.len()).rev() {
            if self.strides[d] != b {
                return (b, Some(d));
            }
            b *= self.shape[d];
        }
        (b, None)
    }

    /// Output byte offset of part byte `o` (`o` a multiple of the block size or inside one).
    fn map(&self, o: u64) -> u64 {
        let (elem_idx, intra) = (o / self.elem, o % self.elem);
        let mut rest = elem_idx;
        let mut off = self.base + intra;
        for d in (0..self.shape.len()).rev() {
            let n = self.shape[d].max(1);
            off += (rest % n) * self.strides[d];
            rest /= n;
        }
        off
    }
}

/// Where relocated runs go.
struct Sink<'a> {
    copies: &'a mut Vec<CopyRun>,
    zeros: &'a mut Vec<ZeroRun>,
}

impl Sink<'_> {
    /// `count` chunks of `len` bytes, output `dst + i * dst_stride`, source
    /// `src + i * src_stride` (zeros when `src` is None).
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        file: u32,
        src: Option<u64>,
        dst: u64,
        len: u64,
        count: u64,
        src_stride: u64,
        dst_stride: u64,
    ) {
        if len == 0 || count == 0 {
            return;
        }
        let (src_stride, dst_stride) = if count == 1 {
            (len, len)
        } else {
            (src_stride, dst_stride)
        };
        match src {
            Some(src) => self.copies.push(CopyRun {
                file,
                src,
                dst,
                len,
                count,
                src_stride,
                dst_stride,
            }),
            None => self.zeros.push(ZeroRun {
                dst,
                len,
                count,
                dst_stride,
            }),
        }
    }
}

/// Relocates `[at, at + len)` of a part (contiguous in the source when `src` is Some) into
/// its output tensor at arena offset `out_offset`.
fn relocate(
    p: &Placement,
    out_offset: u64,
    file: u32,
    src: Option<u64>,
    at: u64,
    len: u64,
    sink: &mut Sink<'_>,
) {
    let (block, outer) = p.block();
    let Some(k) = outer else {
        sink.push(file, src, out_offset + p.base + at, len, 1, len, len);
        return;
    };
    // Blocks along dimension k (outer indices fixed) follow each other at stride[k].
    let row = block * p.shape[k].max(1);
    let (mut x, end) = (at, at + len);
    let src_at = |x: u64| src.map(|s| s + (x - at));
    while x < end {
        let row_end = ((x / row) + 1) * row;
        let seg_end = end.min(row_end);
        // Head: the rest of a block x starts inside.
        let head_end = seg_end.min((x / block + 1) * block);
        if x % block != 0 {
            sink.push(
                file,
                src_at(x),
                out_offset + p.map(x),
                head_end - x,
                1,
                0,
                0,
            );
            x = head_end;
        }
        let full = (seg_end - x) / block;
        if full > 0 {
            sink.push(
                file,
                src_at(x),
                out_offset + p.map(x),
                block,
                full,
                block,
                p.strides[k],
            );
            x += full * block;
        }
        if x < seg_end {
            sink.push(file, src_at(x), out_offset + p.map(x), seg_end - x, 1, 0, 0);
            x = seg_end;
        }
    }
}

/// Byte strides of a row-major tensor of `shape` with `elem`-byte elements.
pub(super) fn row_major_strides(shape: &[u64], elem: u64) -> Vec<u64> {
    let mut s = vec![0; shape.len()];
    let mut acc = elem;
    for d in (0..shape.len()).rev() {
        s[d] = acc;
        acc *= shape[d];
    }
    s
}

/// The copy and zero runs of `rp` relocated into the output tensors: plan tensor `i` lands
/// as `place[i]` says, in the output tensor at arena offset `offsets[place[i].out]`. `zeros`
/// already holds the new layout's alignment gaps and buffers.
pub(super) fn relocate_runs(
    rp: &RankPlan,
    place: &[Option<Placement>],
    offsets: &[u64],
    mut zeros: Vec<ZeroRun>,
) -> Result<(Vec<CopyRun>, Vec<ZeroRun>)> {
    let rank = rp.coords.rank;
    // Cut at the old tensors' boundaries.
    let mut bounds: Vec<(u64, u64, usize)> = rp
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.offset, t.offset + t.bytes, i))
        .collect();
    bounds.sort_unstable();
    let mut copies = Vec::with_capacity(rp.copies.len());
    let mut sink = Sink {
        copies: &mut copies,
        zeros: &mut zeros,
    };
    let emit =
        |file: u32, src: Option<u64>, dst: u64, len: u64, sink: &mut Sink<'_>| -> Result<()> {
            let (mut x, end) = (dst, dst + len);
            while x < end {
                let k = bounds.partition_point(|b| b.1 <= x);
                let Some(&(ts, te, ti)) = bounds.get(k).filter(|b| b.0 <= x) else {
                    // Alignment gaps hold zeros only; a copy there is a plan inconsistency.
                    if src.is_some() {
                        return Err(Error::plan_rank(
                            rank,
                            format!("a copy run at arena offset {x} lies outside every tensor"),
                        ));
                    }
                    let next = bounds.get(k).map(|b| b.0).unwrap_or(end).min(end);
                    x = next.max(x + 1).min(end);
                    continue;
                };
                let piece_end = end.min(te);
                let Some(p) = &place[ti] else {
                    return Err(Error::plan_rank(
                        rank,
                        format!("tensor {ti} has no placement"),
                    ));
                };
                let out_offset = offsets[p.out];
                relocate(
                    p,
                    out_offset,
                    file,
                    src.map(|s| s + (x - dst)),
                    x - ts,
                    piece_end - x,
                    sink,
                );
                x = piece_end;
            }
            Ok(())
        };
    for r in &rp.copies {
        // Fast path: a run inside one tensor that lands contiguously (renamed, or a dim-0
        // part) moves as a whole; a strided run of a big expert would be millions of chunks.
        let first = r.dst;
        let last_end = r.dst + r.count.saturating_sub(1) * r.dst_stride + r.len;
        let k = bounds.partition_point(|b| b.1 <= first);
        if let Some(&(ts, _, ti)) = bounds.get(k).filter(|b| b.0 <= first && last_end <= b.1) {
            if let Some(p) = place[ti].as_ref().filter(|p| p.block().1.is_none()) {
                sink.copies.push(CopyRun {
                    dst: offsets[p.out] + p.base + (first - ts),
                    ..*r
                });
                continue;
            }
        }
        let start = sink.copies.len();
        for c in 0..r.count {
            emit(
                r.file,
                Some(r.src + c * r.src_stride),
                r.dst + c * r.dst_stride,
                r.len,
                &mut sink,
            )?;
        }
        // Rejoin the pieces of this one run into strided runs; never across runs, which
        // could make a two-chunk run spanning a whole file (a huge gather window).
        let mut pieces = sink.copies.split_off(start);
        merge_strided(&mut pieces);
        sink.copies.extend(pieces);
    }
    for z in &rp.zeros {
        for c in 0..z.count {
            emit(0, None, z.dst + c * z.dst_stride, z.len, &mut sink)?;
        }
    }
    Ok((copies, zeros))
}

/// Joins consecutive runs (in source order) that form one strided pattern (equal lengths,
/// constant source and destination strides), which relocation produces chunk by chunk.
fn merge_strided(runs: &mut Vec<CopyRun>) {
    let mut out: Vec<CopyRun> = Vec::with_capacity(runs.len());
    for r in runs.drain(..) {
        if let Some(last) = out.last_mut() {
            if last.file == r.file && last.len == r.len && r.count == 1 {
                if last.count == 1 && r.src > last.src && r.dst != last.dst {
                    let (ss, ds) = (r.src - last.src, r.dst.wrapping_sub(last.dst));
                    // Only forward, non-overlapping strides make a valid pattern.
                    if ss >= last.len && r.dst > last.dst && ds >= last.len {
                        last.count = 2;
                        last.src_stride = ss;
                        last.dst_stride = ds;
                        continue;
                    }
                } else if last.count > 1
                    && last.src + last.count * last.src_stride == r.src
                    && last.dst + last.count * last.dst_stride == r.dst
                {
                    last.count += 1;
                    continue;
                }
            }
        }
        out.push(r);
    }
    *runs = out;
}
