//! Turning one tensor's [`Layout`] into byte-range copy and zero runs.
//!
//! A piece of a layout is a hyper-rectangle (a "box") of the row-major source tensor that lands
//! in a box of the row-major local tensor. The innermost dimensions that the box takes whole in
//! *both* tensors, plus the first one it does not, form one contiguous chunk; the next outer
//! dimension with more than one index becomes the run's `count` with its strides; any further
//! outer dimensions are enumerated into several runs. Adjacent outer dimensions whose strides
//! chain (`stride[j] == n[j+1] * stride[j+1]` on both sides) are merged first, so a
//! column slice of a 3-D tensor still gives one run per contiguous stretch.
//!
//! Everything is computed in bits and converted to bytes at the end, so sub-byte dtypes (F4,
//! F6) work whenever every chunk starts and ends on a byte boundary, and fail with a clear
//! error otherwise.

use crate::checkpoint::Dtype;
use crate::sharding::{Layout, Piece};
use crate::{Error, Result};

use super::{page_size, union_len, CopyRun, Strided, ZeroRun};

/// The runs that build one rank-local tensor, with destination offsets relative to the start
/// of the local tensor (the caller shifts them to the tensor's arena offset).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TensorRuns {
    /// Byte size of the local tensor.
    pub bytes: u64,
    /// Copies from the source file, in piece order.
    pub copies: Vec<CopyRun>,
    /// Zero fills (vocab padding), in piece order.
    pub zeros: Vec<ZeroRun>,
}

/// Runs are first computed in element units (a [`CopyRun`] whose offsets count elements and
/// whose `file` is unused), then converted to bytes.
type ElemRun = CopyRun;

fn plan_err(name: &str, msg: impl std::fmt::Display) -> Error {
    Error::plan_tensor(name, msg.to_string())
}

/// Most dimensions a tensor may have (fixed-size scratch keeps planning allocation-free).
pub const MAX_DIMS: usize = 16;

type Dims = [u64; MAX_DIMS];

/// Row-major strides in elements; `None` on overflow.
fn strides(shape: &[u64]) -> Option<Dims> {
    let mut out = [1u64; MAX_DIMS];
    let mut acc = 1u64;
    for d in (0..shape.len()).rev() {
        out[d] = acc;
        acc = acc.checked_mul(shape[d])?;
    }
    Some(out)
}

/// Decomposes the copy of a box of sizes `n` from `src_origin` in a tensor of `src_shape` to
/// `dst_origin` in a tensor of `dst_shape` into element runs, appended to `out`. Returns the
/// dimension whose partial extent bounds the contiguous chunk (for error messages), or `None`
/// on arithmetic overflow. All slices have the same length, at most [`MAX_DIMS`].
fn box_runs(
    n: &[u64],
    src_shape: &[u64],
    src_origin: &[u64],
    dst_shape: &[u64],
    dst_origin: &[u64],
    out: &mut Vec<ElemRun>,
) -> Option<usize> {
    let nd = n.len();
    if nd == 0 || n.contains(&0) {
        return Some(0);
    }
    let ss = strides(src_shape)?;
    let ds = strides(dst_shape)?;
    // Absorb trailing dims taken whole in both tensors, then the first partial one.
    let mut chunk = 1u64;
    let mut k = nd;
    loop {
        k -= 1;
        chunk = chunk.checked_mul(n[k])?;
        let whole = n[k] == src_shape[k] && n[k] == dst_shape[k];
        if k == 0 || !whole {
            break;
        }
    }
    // Outer dims with more than one index, from the inside out, merged where their strides
    // chain (the outer stride is the inner extent times the inner stride, on both sides).
    let mut merged = [(0u64, 0u64, 0u64); MAX_DIMS];
    let mut m = 0;
    for d in (0..k).rev() {
        if n[d] <= 1 {
            continue;
        }
        let dim = (n[d], ss[d], ds[d]);
        if m > 0 {
            let (ni, si, di) = merged[m - 1];
            if Some(dim.1) == ni.checked_mul(si) && Some(dim.2) == ni.checked_mul(di) {
                merged[m - 1] = (ni.checked_mul(dim.0)?, si, di);
                continue;
            }
        }
        merged[m] = dim;
        m += 1;
    }
    let mut src0 = 0u64;
    let mut dst0 = 0u64;
    for d in 0..nd {
        src0 = src0.checked_add(src_origin[d].checked_mul(ss[d])?)?;
        dst0 = dst0.checked_add(dst_origin[d].checked_mul(ds[d])?)?;
    }
    // merged[0] is the innermost: it becomes the run's count; the rest are enumerated.
    let (count, src_stride, dst_stride) = if m > 0 { merged[0] } else { (1, chunk, chunk) };
    let enumerated = if m > 1 { &merged[1..m] } else { &[][..] };
    let mut idx = [0u64; MAX_DIMS];
    loop {
        let mut src = src0;
        let mut dst = dst0;
        for (i, &(_, s, d)) in idx.iter().zip(enumerated) {
            src = src.checked_add(i.checked_mul(s)?)?;
            dst = dst.checked_add(i.checked_mul(d)?)?;
        }
        out.push(normalize(ElemRun {
            file: 0,
            src,
            dst,
            len: chunk,
            count,
            src_stride,
            dst_stride,
        }));
        // Odometer over the enumerated dims (innermost first in `enumerated`, fastest).
        let mut carry = true;
        for (j, &(nj, _, _)) in enumerated.iter().enumerate() {
            idx[j] += 1;
            if idx[j] < nj {
                carry = false;
                break;
            }
            idx[j] = 0;
        }
        if carry {
            break;
        }
    }
    Some(k)
}

/// A strided run whose chunks abut on both sides is one contiguous run; a one-chunk run has
/// strides equal to its length (canonical form, so equal runs compare equal).
fn normalize(mut r: ElemRun) -> ElemRun {
    if r.count > 1 && r.src_stride == r.len && r.dst_stride == r.len {
        r.len *= r.count;
        r.count = 1;
    }
    if r.count == 1 {
        r.src_stride = r.len;
        r.dst_stride = r.len;
    }
    r
}

/// Converts element units to bytes, or `None` when not a whole number of bytes.
fn to_bytes(elems: u64, bits: u64) -> Option<u64> {
    let b = elems.checked_mul(bits)?;
    (b % 8 == 0).then_some(b / 8)
}

/// An element-unit run in bytes, reading from `file` at `src_offset` + its source offset;
/// `None` when a chunk is not whole bytes or an offset overflows.
fn byte_run(r: ElemRun, bits: u64, file: u32, src_offset: u64) -> Option<CopyRun> {
    Some(CopyRun {
        file,
        src: src_offset.checked_add(to_bytes(r.src, bits)?)?,
        dst: to_bytes(r.dst, bits)?,
        len: to_bytes(r.len, bits)?,
        count: r.count,
        src_stride: to_bytes(r.src_stride, bits)?,
        dst_stride: to_bytes(r.dst_stride, bits)?,
    })
}

/// Why a sub-byte slice `[b, e)` of dim `k` cannot be planned: its chunks are not whole bytes.
fn sub_byte_msg(dtype: Dtype, src_shape: &[u64], k: usize, (b, e): (u64, u64)) -> String {
    format!(
        "{dtype} slice [{b}, {e}) of dim {k} (size {}) does not start and end on byte boundaries; sub-byte tensors can only be split where every chunk is whole bytes",
        src_shape.get(k).copied().unwrap_or(0)
    )
}

/// An element-unit zero run in bytes; `None` when a chunk is not whole bytes.
fn zero_byte_run(r: ElemRun, bits: u64) -> Option<ZeroRun> {
    Some(ZeroRun {
        dst: to_bytes(r.dst, bits)?,
        len: to_bytes(r.len, bits)?,
        count: r.count,
        dst_stride: to_bytes(r.dst_stride, bits)?,
    })
}

/// Computes the runs that build one rank-local tensor.
///
/// `name` and `dtype` name the tensor in errors; `src_shape` is the source tensor's shape,
/// `file`/`src_offset` where its first byte lies. Destination offsets are relative to the
/// local tensor's start. Checks that the layout is consistent with the source (ranges inside
/// the tensor, pieces matching the local shape) and that sub-byte chunks are whole bytes.
pub fn tensor_runs(
    name: &str,
    dtype: Dtype,
    src_shape: &[u64],
    file: u32,
    src_offset: u64,
    layout: &Layout,
) -> Result<TensorRuns> {
    // A scalar is treated as a one-element vector.
    let scalar = src_shape.is_empty();
    let one = [1u64];
    let src_shape: &[u64] = if scalar { &one } else { src_shape };
    let local: &[u64] = if scalar && layout.shape.is_empty() {
        &one
    } else {
        &layout.shape
    };
    check_layout_dims(name, src_shape, local, layout)?;
    let t = LocalTensor {
        name,
        dtype,
        bits: dtype.bits(),
        src_shape,
        local,
        concat_dim: layout.concat_dim,
        file,
        src_offset,
        scalar,
    };
    let mut out = TensorRuns {
        bytes: t.bytes(&layout.shape)?,
        copies: Vec::with_capacity(layout.pieces.len()),
        zeros: Vec::new(),
    };
    let mut scratch: Vec<ElemRun> = Vec::with_capacity(layout.pieces.len());
    let mut at = 0u64; // position along concat dim in the local tensor
    for (p, piece) in layout.pieces.iter().enumerate() {
        at = match piece {
            Piece::Slice { ranges } => {
                t.slice_piece(p, ranges, at, &mut scratch, &mut out.copies)?
            }
            Piece::Zeros { extent } => t.zero_piece(*extent, at, &mut scratch, &mut out.zeros)?,
        };
    }
    let c = t.concat_dim;
    if at != local[c] {
        return Err(plan_err(
            name,
            format_args!(
                "pieces cover {at} of the local size {} along dim {c}",
                local[c]
            ),
        ));
    }
    Ok(out)
}

/// Checks that the source and local shapes have the same, supported number of dimensions
/// and that the layout's concat dim is one of them.
fn check_layout_dims(name: &str, src_shape: &[u64], local: &[u64], layout: &Layout) -> Result<()> {
    let nd = src_shape.len();
    if nd > MAX_DIMS {
        return Err(plan_err(
            name,
            format_args!("{nd} dimensions are more than the {MAX_DIMS} supported"),
        ));
    }
    if local.len() != nd {
        return Err(plan_err(
            name,
            format_args!(
                "layout shape {:?} has {} dims but the tensor has {}",
                layout.shape,
                layout.shape.len(),
                nd
            ),
        ));
    }
    let c = layout.concat_dim;
    if c >= nd {
        return Err(plan_err(
            name,
            format_args!("layout concat dim {c} is out of range for {nd} dims"),
        ));
    }
    Ok(())
}

/// One rank-local tensor being planned, its dims checked by [`check_layout_dims`]: what each
/// piece's runs are computed against.
struct LocalTensor<'a> {
    name: &'a str,
    dtype: Dtype,
    bits: u64,
    /// The source shape (`[1]` for a scalar).
    src_shape: &'a [u64],
    /// The local shape (`[1]` for a scalar whose layout has no shape).
    local: &'a [u64],
    concat_dim: usize,
    file: u32,
    src_offset: u64,
    scalar: bool,
}

impl LocalTensor<'_> {
    /// The local tensor's byte size; `layout_shape` is the shape as the layout gives it, for
    /// the message.
    fn bytes(&self, layout_shape: &[u64]) -> Result<u64> {
        let elements = self
            .local
            .iter()
            .try_fold(1u64, |acc, &n| acc.checked_mul(n))
            .ok_or_else(|| plan_err(self.name, "local shape overflows"))?;
        to_bytes(elements, self.bits).ok_or_else(|| {
            plan_err(
                self.name,
                format_args!(
                    "local shape {layout_shape:?} of {} is not a whole number of bytes",
                    self.dtype
                ),
            )
        })
    }

    /// Where a piece of `extent` along the concat dim that starts at `at` ends, if it stays
    /// inside the local tensor.
    fn piece_end(&self, at: u64, extent: u64) -> Result<u64> {
        let c = self.concat_dim;
        at.checked_add(extent)
            .filter(|&end| end <= self.local[c])
            .ok_or_else(|| {
                plan_err(
                    self.name,
                    format_args!(
                        "pieces overflow the local size {} of dim {c}",
                        self.local[c]
                    ),
                )
            })
    }

    /// Appends the copies of slice piece `p` placed at `at`; returns where it ends.
    fn slice_piece(
        &self,
        p: usize,
        ranges: &[(u64, u64)],
        at: u64,
        scratch: &mut Vec<ElemRun>,
        copies: &mut Vec<CopyRun>,
    ) -> Result<u64> {
        let whole_scalar = [(0u64, 1u64)];
        let ranges: &[(u64, u64)] = if self.scalar && ranges.is_empty() {
            &whole_scalar
        } else {
            ranges
        };
        let (n, src_origin) = self.slice_box(p, ranges)?;
        let c = self.concat_dim;
        let end = self.piece_end(at, n[c])?;
        let nd = self.src_shape.len();
        let mut dst_origin = [0u64; MAX_DIMS];
        dst_origin[c] = at;
        scratch.clear();
        let k = box_runs(
            &n[..nd],
            self.src_shape,
            &src_origin[..nd],
            self.local,
            &dst_origin[..nd],
            scratch,
        )
        .ok_or_else(|| plan_err(self.name, "offsets overflow"))?;
        for &r in scratch.iter() {
            let run = byte_run(r, self.bits, self.file, self.src_offset).ok_or_else(|| {
                let (b, e) = ranges.get(k).copied().unwrap_or((0, 0));
                plan_err(
                    self.name,
                    sub_byte_msg(self.dtype, self.src_shape, k, (b, e)),
                )
            })?;
            copies.push(run);
        }
        Ok(end)
    }

    /// The box slice piece `p` takes of the source, as sizes and origin per dim: each range
    /// must lie inside the source and, off the concat dim, span the local size.
    fn slice_box(&self, p: usize, ranges: &[(u64, u64)]) -> Result<(Dims, Dims)> {
        let nd = self.src_shape.len();
        if ranges.len() != nd {
            return Err(plan_err(
                self.name,
                format_args!(
                    "piece {p} has {} ranges but the tensor has {nd} dims",
                    ranges.len()
                ),
            ));
        }
        let mut n = [0u64; MAX_DIMS];
        let mut src_origin = [0u64; MAX_DIMS];
        for (d, &(b, e)) in ranges.iter().enumerate() {
            if b > e || e > self.src_shape[d] {
                return Err(plan_err(
                    self.name,
                    format_args!(
                        "piece {p}: range [{b}, {e}) of dim {d} is outside its size {}",
                        self.src_shape[d]
                    ),
                ));
            }
            if d != self.concat_dim && e - b != self.local[d] {
                return Err(plan_err(
                    self.name,
                    format_args!(
                        "piece {p}: range [{b}, {e}) of dim {d} does not match the local size {}",
                        self.local[d]
                    ),
                ));
            }
            n[d] = e - b;
            src_origin[d] = b;
        }
        Ok((n, src_origin))
    }

    /// Appends the zero fills of a zero piece of `extent` placed at `at`; returns where it
    /// ends.
    fn zero_piece(
        &self,
        extent: u64,
        at: u64,
        scratch: &mut Vec<ElemRun>,
        zeros: &mut Vec<ZeroRun>,
    ) -> Result<u64> {
        let end = self.piece_end(at, extent)?;
        let (nd, c) = (self.local.len(), self.concat_dim);
        let mut n = [0u64; MAX_DIMS];
        n[..nd].copy_from_slice(self.local);
        n[c] = extent;
        let mut dst_origin = [0u64; MAX_DIMS];
        dst_origin[c] = at;
        scratch.clear();
        box_runs(
            &n[..nd],
            self.local,
            &dst_origin[..nd],
            self.local,
            &dst_origin[..nd],
            scratch,
        )
        .ok_or_else(|| plan_err(self.name, "offsets overflow"))?;
        for &r in scratch.iter() {
            let run = zero_byte_run(r, self.bits).ok_or_else(|| {
                plan_err(
                    self.name,
                    format_args!(
                        "{} zero padding of {extent} along dim {c} does not fall on byte boundaries",
                        self.dtype
                    ),
                )
            })?;
            zeros.push(run);
        }
        Ok(end)
    }
}

/// Per dimension, a list of `[begin, end)` index ranges.
type RangeLists = [Vec<(u64, u64)>];

/// Most boxes (one per combination of ranges, one range per dimension) that one slice
/// request may make: a bound on planning work that hostile requests cannot exceed.
pub const MAX_SLICE_BOXES: u64 = 1 << 20;

/// Computes the runs that build one rank-local tensor made of explicit index ranges of the
/// source: per source dimension, the ranges `[begin, end)` the local tensor takes, in local
/// order (a dimension may take several, e.g. a strided shard). The local tensor is every
/// combination of one range per dimension, in row-major order of the combinations, so its
/// size along dimension `d` is the sum of `ranges[d]`'s lengths.
///
/// `fail` makes the caller's error from a reason (naming the tensor its own way). Ranges must lie inside the source; abutting ranges are
/// merged first (fewer, longer runs); empty ones are dropped. A scalar takes `ranges = []`.
pub(crate) fn slice_runs(
    fail: &dyn Fn(String) -> Error,
    dtype: Dtype,
    src_shape: &[u64],
    file: u32,
    src_offset: u64,
    ranges: &[Vec<(u64, u64)>],
) -> Result<(Vec<u64>, TensorRuns)> {
    let nd = src_shape.len();
    if nd > MAX_DIMS {
        return Err(fail(format!(
            "{nd} dimensions are more than the {MAX_DIMS} supported"
        )));
    }
    if ranges.len() != nd {
        return Err(fail(format!(
            "{} dimensions of ranges for a tensor of {nd} dimensions {src_shape:?}",
            ranges.len()
        )));
    }
    // Per dimension: the merged ranges and the local size.
    let mut merged: Vec<Vec<(u64, u64)>> = Vec::with_capacity(nd);
    let mut local = Vec::with_capacity(nd);
    let mut boxes = 1u64;
    for (d, rs) in ranges.iter().enumerate() {
        let mut m: Vec<(u64, u64)> = Vec::with_capacity(rs.len());
        let mut size = 0u64;
        for &(b, e) in rs {
            if b > e || e > src_shape[d] {
                return Err(fail(format!(
                    "range [{b}, {e}) of dim {d} is outside its size {}",
                    src_shape[d]
                )));
            }
            size = size
                .checked_add(e - b)
                .ok_or_else(|| fail("local shape overflows".into()))?;
            match m.last_mut() {
                _ if b == e => {}
                Some(last) if last.1 == b => last.1 = e,
                _ => m.push((b, e)),
            }
        }
        boxes = boxes.saturating_mul(m.len() as u64);
        merged.push(m);
        local.push(size);
    }
    let elements = local
        .iter()
        .try_fold(1u64, |acc, &n| acc.checked_mul(n))
        .ok_or_else(|| fail("local shape overflows".into()))?;
    let bits = dtype.bits();
    let bytes = to_bytes(elements, bits).ok_or_else(|| {
        fail(format!(
            "local shape {local:?} of {dtype} is not a whole number of bytes"
        ))
    })?;
    let mut out = TensorRuns {
        bytes,
        copies: Vec::new(),
        zeros: Vec::new(),
    };
    if elements == 0 {
        return Ok((local, out));
    }
    if boxes > MAX_SLICE_BOXES {
        return Err(fail(format!(
            "{boxes} boxes of ranges are more than the {MAX_SLICE_BOXES} supported"
        )));
    }
    // A scalar is one element of a one-element vector.
    let one = [1u64];
    let whole = [vec![(0u64, 1u64)]];
    let (src_dims, dst_dims, merged): (&[u64], &[u64], &RangeLists) = if nd == 0 {
        (&one, &one, &whole)
    } else {
        (src_shape, &local, &merged)
    };
    let nd = src_dims.len();
    // Odometer over one range per dimension, the last dimension fastest.
    let mut pick = [0usize; MAX_DIMS];
    let mut scratch: Vec<ElemRun> = Vec::new();
    loop {
        let mut n = [0u64; MAX_DIMS];
        let mut src_origin = [0u64; MAX_DIMS];
        let mut dst_origin = [0u64; MAX_DIMS];
        for d in 0..nd {
            let rs = &merged[d];
            let (b, e) = rs[pick[d]];
            n[d] = e - b;
            src_origin[d] = b;
            dst_origin[d] = rs[..pick[d]].iter().map(|(b, e)| e - b).sum();
        }
        scratch.clear();
        let k = box_runs(
            &n[..nd],
            src_dims,
            &src_origin[..nd],
            dst_dims,
            &dst_origin[..nd],
            &mut scratch,
        )
        .ok_or_else(|| fail("offsets overflow".into()))?;
        for &r in &scratch {
            let run = byte_run(r, bits, file, src_offset).ok_or_else(|| {
                let range = (src_origin[k], src_origin[k] + n[k]);
                fail(sub_byte_msg(dtype, src_dims, k, range))
            })?;
            out.copies.push(run);
        }
        let mut d = nd;
        loop {
            if d == 0 {
                return Ok((local, out));
            }
            d -= 1;
            pick[d] += 1;
            if pick[d] < merged[d].len() {
                break;
            }
            pick[d] = 0;
        }
    }
}

fn page_floor(x: u64, page: u64) -> u64 {
    x / page
}

fn page_ceil(x: u64, page: u64) -> u64 {
    x.div_ceil(page)
}

/// Pages of size `page` touched by one pattern (the union of its chunks' pages), in
/// O(min(count, period)).
///
/// Chunk `i` starts at `s_i = start + i * stride`. Chunks are sorted, so the pages that chunk
/// `i+1` adds beyond chunk `i` depend only on `s_i mod page`, which repeats with period
/// `page / gcd(stride mod page, page)`; one period is summed and multiplied out.
fn run_pages(p: Strided, page: u64) -> u64 {
    if p.is_empty() {
        return 0;
    }
    let (src, len, count, stride) = (p.start, p.len, p.count, p.stride);
    if count == 1 || stride <= len {
        return page_ceil(p.end_saturating(), page) - page_floor(src, page);
    }
    let first = page_ceil(src + len, page) - page_floor(src, page);
    // Pages added by chunk i+1 given s_i mod page.
    let added = |m: u64| -> u64 {
        let end_i = page_ceil(m + len, page);
        let start_n = page_floor(m + stride, page);
        let end_n = page_ceil(m + stride + len, page);
        end_n - start_n.max(end_i)
    };
    let step = stride % page;
    let period = page / gcd(step, page);
    let transitions = count - 1;
    let sum_over = |n: u64| -> u64 {
        let mut m = src % page;
        let mut total = 0u64;
        for _ in 0..n {
            total += added(m);
            m = (m + step) % page;
        }
        total
    };
    if transitions <= period {
        first + sum_over(transitions)
    } else {
        let per = sum_over(period);
        first + (transitions / period) * per + sum_over(transitions % period)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Bytes read from storage by a set of copy runs sorted by `(file, src)`: the union of the
/// pages ([`page_size`]) their chunks touch, so a page shared by two runs counts once and the
/// read amplification of strided splits is visible.
pub fn read_bytes(copies: &[CopyRun]) -> u64 {
    read_bytes_with_page(copies, page_size())
}

/// [`read_bytes`] for pages of `page` bytes (a power of two).
///
/// Runs whose extents do not interleave are counted in closed form; groups of interleaving
/// runs (fused parts cut on an inner dimension) are enumerated chunk by chunk.
pub(crate) fn read_bytes_with_page(copies: &[CopyRun], page: u64) -> u64 {
    let mut pages = 0u64;
    let mut i = 0;
    // Last page end counted so far in the current file.
    let mut covered: Option<(u32, u64)> = None;
    while i < copies.len() {
        let first = copies[i];
        let mut end = first.src_pattern().end_saturating();
        let mut j = i + 1;
        while j < copies.len() && copies[j].file == first.file && copies[j].src < end {
            end = end.max(copies[j].src_pattern().end_saturating());
            j += 1;
        }
        let group = &copies[i..j];
        let start_page = page_floor(first.src, page);
        let mut n = if group.len() == 1 {
            run_pages(first.src_pattern(), page)
        } else {
            let mut spans: Vec<(u64, u64)> = group
                .iter()
                .flat_map(|r| {
                    r.src_pattern()
                        .chunks()
                        .map(|(s, e)| (page_floor(s, page), page_ceil(e, page)))
                        .collect::<Vec<_>>()
                })
                .collect();
            union_len(&mut spans)
        };
        let end_page = page_ceil(end, page);
        // A page shared with the previous group (same file) was already counted.
        if let Some((f, prev_end)) = covered {
            if f == first.file && start_page < prev_end && n > 0 {
                n -= 1;
            }
        }
        pages += n;
        let prev = match covered {
            Some((f, e)) if f == first.file => e,
            _ => 0,
        };
        covered = Some((first.file, end_page.max(prev)));
        i = j;
    }
    pages * page
}

/// The page-rounded window `[start, end)` of the file that a tensor's copies span, in bytes:
/// what a loader maps or buffers to gather that tensor at once.
pub fn span_bytes(copies: &[CopyRun]) -> u64 {
    let page = page_size();
    let start = copies.iter().map(|r| r.src).min();
    let end = copies
        .iter()
        .map(|r| r.src_pattern().end_saturating())
        .max();
    match (start, end) {
        (Some(s), Some(e)) if e > s => (page_ceil(e, page) - page_floor(s, page)) * page,
        _ => 0,
    }
}

/// Merges adjacent runs that continue each other on both sides: contiguous runs that abut,
/// or strided runs with equal chunk and strides where the second starts where the first's
/// next chunk would. Runs must be sorted by `(file, src)`.
pub fn coalesce_copies(runs: &mut Vec<CopyRun>) {
    let mut out: Vec<CopyRun> = Vec::with_capacity(runs.len());
    for r in runs.drain(..) {
        if let Some(last) = out.last_mut() {
            if last.file == r.file {
                if last.count == 1
                    && r.count == 1
                    && last.src + last.len == r.src
                    && last.dst + last.len == r.dst
                {
                    last.len += r.len;
                    last.src_stride = last.len;
                    last.dst_stride = last.len;
                    continue;
                }
                if last.count > 1
                    && r.count > 1
                    && last.len == r.len
                    && last.src_stride == r.src_stride
                    && last.dst_stride == r.dst_stride
                    && last.src + last.count * last.src_stride == r.src
                    && last.dst + last.count * last.dst_stride == r.dst
                {
                    last.count += r.count;
                    continue;
                }
            }
        }
        out.push(r);
    }
    *runs = out;
}

/// Merges zero runs that abut (contiguous, or strided continuations). Runs must be sorted by `dst`.
pub fn coalesce_zeros(runs: &mut Vec<ZeroRun>) {
    let mut out: Vec<ZeroRun> = Vec::with_capacity(runs.len());
    for r in runs.drain(..) {
        if let Some(last) = out.last_mut() {
            if last.count == 1 && r.count == 1 && last.dst + last.len == r.dst {
                last.len += r.len;
                last.dst_stride = last.len;
                continue;
            }
            if last.count > 1
                && r.count > 1
                && last.len == r.len
                && last.dst_stride == r.dst_stride
                && last.dst + last.count * last.dst_stride == r.dst
            {
                last.count += r.count;
                continue;
            }
        }
        out.push(r);
    }
    *runs = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(ranges: &[(u64, u64)]) -> Piece {
        Piece::Slice {
            ranges: ranges.to_vec(),
        }
    }

    #[test]
    fn row_split_is_one_contiguous_run() {
        // [8, 4] BF16, rows 2..6: 4 rows of 8 bytes starting at byte 2*8.
        let l = Layout {
            shape: vec![4, 4],
            concat_dim: 0,
            pieces: vec![slice(&[(2, 6), (0, 4)])],
        };
        let r = tensor_runs("w", Dtype::BF16, &[8, 4], 0, 100, &l).unwrap();
        assert_eq!(r.bytes, 32);
        assert_eq!(
            r.copies,
            vec![CopyRun {
                file: 0,
                src: 116,
                dst: 0,
                len: 32,
                count: 1,
                src_stride: 32,
                dst_stride: 32
            }]
        );
    }

    #[test]
    fn column_split_is_strided() {
        // [3, 8] F32, cols 4..6: 3 chunks of 2 floats, source stride 32 bytes, dest stride 8.
        let l = Layout {
            shape: vec![3, 2],
            concat_dim: 1,
            pieces: vec![slice(&[(0, 3), (4, 6)])],
        };
        let r = tensor_runs("w", Dtype::F32, &[3, 8], 0, 0, &l).unwrap();
        assert_eq!(
            r.copies,
            vec![CopyRun {
                file: 0,
                src: 16,
                dst: 0,
                len: 8,
                count: 3,
                src_stride: 32,
                dst_stride: 8
            }]
        );
    }

    #[test]
    fn sub_byte_misaligned_split_is_an_error() {
        // F4 [2, 3] split on dim 1 at 1: chunk of 1 element = 4 bits.
        let l = Layout {
            shape: vec![2, 1],
            concat_dim: 1,
            pieces: vec![slice(&[(0, 2), (1, 2)])],
        };
        let e = tensor_runs("q", Dtype::F4, &[2, 3], 0, 0, &l).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("\"q\"") && msg.contains("dim 1"), "{msg}");
    }

    #[test]
    fn inconsistent_layout_is_an_error() {
        let l = Layout {
            shape: vec![4, 4],
            concat_dim: 0,
            pieces: vec![slice(&[(0, 3), (0, 4)])],
        };
        assert!(tensor_runs("w", Dtype::F32, &[8, 4], 0, 0, &l).is_err());
        let l = Layout {
            shape: vec![4, 4],
            concat_dim: 0,
            pieces: vec![slice(&[(6, 10), (0, 4)])],
        };
        assert!(tensor_runs("w", Dtype::F32, &[8, 4], 0, 0, &l).is_err());
    }

    /// The reason of `tensor_runs`' error for tensor `w`.
    fn reason(dtype: Dtype, src_shape: &[u64], l: &Layout) -> String {
        match tensor_runs("w", dtype, src_shape, 0, 0, l) {
            Err(Error::Plan {
                rank: None,
                tensor: Some(t),
                reason,
            }) if t == "w" => reason,
            other => panic!("{l:?}: not a plan error of `w`: {other:?}"),
        }
    }

    fn layout(shape: &[u64], concat_dim: usize, pieces: Vec<Piece>) -> Layout {
        Layout {
            shape: shape.to_vec(),
            concat_dim,
            pieces,
        }
    }

    #[test]
    fn each_inconsistent_layout_names_what_is_wrong() {
        let rows = |b, e| slice(&[(b, e), (0, 4)]);
        let cases: Vec<(Dtype, Vec<u64>, Layout, &str)> = vec![
            (
                Dtype::F32,
                vec![1; 17],
                layout(&[1; 17], 0, vec![]),
                "17 dimensions are more than the 16 supported",
            ),
            (
                Dtype::F32,
                vec![4, 4],
                layout(&[4], 0, vec![]),
                "layout shape [4] has 1 dims but the tensor has 2",
            ),
            (
                Dtype::F32,
                vec![4, 4],
                layout(&[4, 4], 2, vec![]),
                "layout concat dim 2 is out of range for 2 dims",
            ),
            (
                Dtype::F32,
                vec![u64::MAX, 2],
                layout(&[u64::MAX, 2], 0, vec![]),
                "local shape overflows",
            ),
            (
                Dtype::F4,
                vec![4],
                layout(&[3], 0, vec![]),
                "local shape [3] of F4 is not a whole number of bytes",
            ),
            (
                Dtype::F32,
                vec![8, 4],
                layout(&[4, 4], 0, vec![slice(&[(0, 4)])]),
                "piece 0 has 1 ranges but the tensor has 2 dims",
            ),
            (
                Dtype::F32,
                vec![8, 4],
                layout(&[4, 4], 0, vec![rows(0, 2), rows(6, 10)]),
                "piece 1: range [6, 10) of dim 0 is outside its size 8",
            ),
            (
                Dtype::F32,
                vec![8, 4],
                layout(&[4, 4], 0, vec![rows(3, 2)]),
                "piece 0: range [3, 2) of dim 0 is outside its size 8",
            ),
            (
                Dtype::F32,
                vec![8, 4],
                layout(&[4, 4], 0, vec![slice(&[(0, 4), (0, 3)])]),
                "piece 0: range [0, 3) of dim 1 does not match the local size 4",
            ),
            (
                Dtype::F32,
                vec![8, 4],
                layout(&[4, 4], 0, vec![rows(0, 4), rows(4, 5)]),
                "pieces overflow the local size 4 of dim 0",
            ),
            (
                Dtype::F32,
                vec![8, 4],
                layout(&[4, 4], 0, vec![rows(0, 4), Piece::Zeros { extent: 1 }]),
                "pieces overflow the local size 4 of dim 0",
            ),
            (
                Dtype::F32,
                vec![8, 4],
                layout(&[4, 4], 0, vec![rows(0, 1), Piece::Zeros { extent: 2 }]),
                "pieces cover 3 of the local size 4 along dim 0",
            ),
            (
                // One F4 column of three: a 4-bit chunk.
                Dtype::F4,
                vec![2, 3],
                layout(&[2, 1], 1, vec![slice(&[(0, 2), (1, 2)])]),
                "F4 slice [1, 2) of dim 1 (size 3) does not start and end on byte boundaries; sub-byte tensors can only be split where every chunk is whole bytes",
            ),
            (
                // One F4 element of zeros: 4 bits.
                Dtype::F4,
                vec![1, 1],
                layout(
                    &[1, 2],
                    1,
                    vec![Piece::Zeros { extent: 1 }, slice(&[(0, 1), (0, 1)])],
                ),
                "F4 zero padding of 1 along dim 1 does not fall on byte boundaries",
            ),
        ];
        for (dtype, src_shape, l, want) in cases {
            assert_eq!(reason(dtype, &src_shape, &l), want, "{l:?}");
        }
    }

    #[test]
    fn scalars_and_zero_padding() {
        // A scalar is one element at the tensor's offset.
        let l = layout(&[], 0, vec![slice(&[])]);
        let r = tensor_runs("s", Dtype::F32, &[], 3, 40, &l).unwrap();
        assert_eq!(r.bytes, 4);
        assert_eq!(
            r.copies,
            [CopyRun {
                file: 3,
                src: 40,
                dst: 0,
                len: 4,
                count: 1,
                src_stride: 4,
                dst_stride: 4
            }]
        );
        assert!(r.zeros.is_empty());
        // BF16 [3, 2], rows 1..3 then two zero rows: rows start 4 bytes apart, so the copy
        // reads 8 bytes from 10 + 4 and the zeros fill local bytes 8..16.
        let l = layout(
            &[4, 2],
            0,
            vec![slice(&[(1, 3), (0, 2)]), Piece::Zeros { extent: 2 }],
        );
        let r = tensor_runs("v", Dtype::BF16, &[3, 2], 1, 10, &l).unwrap();
        assert_eq!(r.bytes, 16);
        assert_eq!(
            r.copies,
            [CopyRun {
                file: 1,
                src: 14,
                dst: 0,
                len: 8,
                count: 1,
                src_stride: 8,
                dst_stride: 8
            }]
        );
        assert_eq!(
            r.zeros,
            [ZeroRun {
                dst: 8,
                len: 8,
                count: 1,
                dst_stride: 8
            }]
        );
        // Zeros along an inner dim are strided: [2, 3] F32 with one zero column.
        let l = layout(
            &[2, 3],
            1,
            vec![slice(&[(0, 2), (0, 2)]), Piece::Zeros { extent: 1 }],
        );
        let r = tensor_runs("c", Dtype::F32, &[2, 2], 0, 0, &l).unwrap();
        assert_eq!(
            r.copies,
            [CopyRun {
                file: 0,
                src: 0,
                dst: 0,
                len: 8,
                count: 2,
                src_stride: 8,
                dst_stride: 12
            }]
        );
        assert_eq!(
            r.zeros,
            [ZeroRun {
                dst: 8,
                len: 4,
                count: 2,
                dst_stride: 12
            }]
        );
    }

    #[test]
    fn pages_of_strided_runs() {
        const PAGE: u64 = 4096;
        let run_pages = |start, len, count, stride| {
            run_pages(
                Strided {
                    start,
                    len,
                    count,
                    stride,
                },
                PAGE,
            )
        };
        // 3 chunks of 100 bytes every 8192 bytes: 3 pages.
        assert_eq!(run_pages(0, 100, 3, 8192), 3);
        // Chunks of 100 bytes every 1000 bytes, 10 chunks: bytes 0..9100 → pages 0..3 (3 pages).
        assert_eq!(run_pages(0, 100, 10, 1000), 3);
        // A chunk straddling a page boundary touches two pages.
        assert_eq!(run_pages(4090, 10, 1, 10), 2);
        // Brute force against the closed form for a long run with an odd stride.
        let brute = |src: u64, len: u64, count: u64, stride: u64| {
            let mut pages = std::collections::BTreeSet::new();
            for i in 0..count {
                let s = src + i * stride;
                for p in s / PAGE..(s + len).div_ceil(PAGE) {
                    pages.insert(p);
                }
            }
            pages.len() as u64
        };
        for &(src, len, count, stride) in &[
            (17, 300, 5000, 6000),
            (4000, 200, 9000, 4500),
            (0, 4096, 100, 8192),
            (123, 5000, 77, 9001),
            (5, 1, 20000, 2048),
        ] {
            assert_eq!(
                run_pages(src, len, count, stride),
                brute(src, len, count, stride),
                "{src} {len} {count} {stride}"
            );
        }
    }

    #[test]
    fn read_bytes_follows_the_page_size() {
        // Two runs in one file: 3 chunks of 10 bytes every 20,000 bytes from 0, and one
        // contiguous run of 100 bytes at 70,000. With 4 KiB pages: chunks at 0, 20000, 40000
        // touch pages 0, 4, 9 and the run page 17: 4 pages. With 64 KiB pages: pages 0 (three
        // chunks) and 1 (the run at 70,000): 2 pages.
        let runs = [
            CopyRun {
                file: 0,
                src: 0,
                dst: 0,
                len: 10,
                count: 3,
                src_stride: 20_000,
                dst_stride: 10,
            },
            CopyRun {
                file: 0,
                src: 70_000,
                dst: 30,
                len: 100,
                count: 1,
                src_stride: 100,
                dst_stride: 100,
            },
        ];
        assert_eq!(read_bytes_with_page(&runs, 4096), 4 * 4096);
        assert_eq!(read_bytes_with_page(&runs, 65536), 2 * 65536);
        assert_eq!(read_bytes(&runs), read_bytes_with_page(&runs, page_size()));
    }
}
