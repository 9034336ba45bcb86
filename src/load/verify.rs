//! The independent slow path: read a whole source tensor with plain `read_at` and cut the
//! rank's local tensor out of it in memory, following the spec's [`Layout`] (never the plan's
//! runs), so that a bug in the planner or the engine shows up as a mismatch.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::error::try_alloc_zeroed;
use crate::sharding::{Layout, Piece, Resolution, Resolved, Shards};
use crate::topology::Coords;
use crate::{Error, Result};

/// The layout a rank at `coords` holds of catalog tensor `source`, from the resolution.
pub fn layout_for<'a>(
    resolution: &'a Resolution,
    source: usize,
    coords: &Coords,
) -> Option<&'a Layout> {
    match resolution.tensors.get(source)? {
        Resolved::Skip { .. } => None,
        Resolved::Held { shards, .. } => match shards {
            Shards::PerTp(layouts) => layouts.get(coords.tp_rank),
            Shards::Expert { layout, .. } => Some(layout),
        },
    }
}

/// Reads all of `info`'s bytes from its file with `read_at`.
pub fn read_tensor(ckpt: &Checkpoint, info: &TensorInfo) -> Result<Vec<u8>> {
    let fi = ckpt
        .files
        .get(info.file)
        .ok_or_else(|| Error::plan_tensor(&info.name, "unknown file"))?;
    let file = File::open(&fi.path).map_err(|e| Error::io(&fi.path, e))?;
    let mut buf = try_alloc_zeroed(
        info.bytes,
        &format!("verifying tensor {:?} of {}", info.name, fi.name),
        None,
    )?;
    // Positioned reads until the buffer is full: end of file first is a short read naming
    // how far it got (the file shrank since it was opened).
    let mut got = 0usize;
    while got < buf.len() {
        let at = info.offset + got as u64;
        match file.read_at(&mut buf[got..], at) {
            Ok(0) => {
                return Err(Error::ShortRead {
                    file: fi.path.clone(),
                    offset: info.offset,
                    wanted: info.bytes,
                    got: got as u64,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(&fi.path, e)),
        }
    }
    Ok(buf)
}

/// Cuts the local tensor described by `layout` out of the whole source tensor `src` (shape
/// `shape`, `bits` per element): each piece's hyper-rectangle is copied to its place along
/// `concat_dim`; zero pieces stay zero.
pub fn slice_layout(src: &[u8], shape: &[u64], bits: u64, layout: &Layout) -> Result<Vec<u8>> {
    let err = |m: &str| Error::plan(format!("layout: {m}"));
    let nd = shape.len();
    if layout.shape.len() != nd {
        return Err(err("local shape and source shape differ in rank"));
    }
    if nd > 0 && layout.concat_dim >= nd {
        return Err(err("concat_dim outside the tensor's dimensions"));
    }
    // Work in bytes on the innermost dimension: `row_bits` per innermost element.
    let local_elems: u64 = layout.shape.iter().product();
    let out_len = local_elems
        .checked_mul(bits)
        .map(|b| b.div_ceil(8))
        .ok_or_else(|| err("size overflows"))?;
    let mut out = try_alloc_zeroed(out_len, "a verified tensor's local slice", None)?;
    if nd == 0 {
        let n = out.len().min(src.len());
        out[..n].copy_from_slice(&src[..n]);
        return Ok(out);
    }
    let to_bytes = |elems: u64| -> Result<usize> {
        let b = elems * bits;
        if b % 8 != 0 {
            return Err(err("slice not on a byte boundary"));
        }
        Ok((b / 8) as usize)
    };
    // Row-major strides in elements.
    let strides = |s: &[u64]| -> Vec<u64> {
        let mut st = vec![1u64; s.len()];
        for d in (0..s.len().saturating_sub(1)).rev() {
            st[d] = st[d + 1] * s[d + 1];
        }
        st
    };
    let src_st = strides(shape);
    let dst_st = strides(&layout.shape);
    let c = layout.concat_dim;
    let mut at = 0u64; // position of the current piece along concat_dim
    for piece in &layout.pieces {
        match piece {
            Piece::Zeros { extent } => at += extent,
            Piece::Slice { ranges } => {
                if ranges.len() != nd {
                    return Err(err("piece has the wrong number of ranges"));
                }
                for (d, &(b, e)) in ranges.iter().enumerate() {
                    if b > e || e > shape[d] {
                        return Err(err("piece range outside the source tensor"));
                    }
                }
                let ext: Vec<u64> = ranges.iter().map(|&(b, e)| e - b).collect();
                if ext.contains(&0) {
                    at += ext.get(c).copied().unwrap_or(0);
                    continue;
                }
                // Sub-byte dtypes (F4, F6) whose rows are not whole bytes are copied bit by
                // bit (LSB first; any convention agrees with the engine, which only moves
                // whole bytes); everything else row by row as bytes.
                let whole_bytes = bits % 8 == 0;
                let inner = if whole_bytes {
                    to_bytes(ext[nd - 1])?
                } else {
                    0
                };
                // Every index of the piece's outer dimensions, innermost rows copied whole.
                let outer: u64 = ext[..nd - 1].iter().product();
                let mut idx = vec![0u64; nd];
                for flat in 0..outer {
                    let mut rem = flat;
                    for d in (0..nd - 1).rev() {
                        idx[d] = rem % ext[d];
                        rem /= ext[d];
                    }
                    let mut s_el = 0u64;
                    let mut d_el = 0u64;
                    for d in 0..nd {
                        s_el += (ranges[d].0 + idx[d]) * src_st[d];
                        let dpos = idx[d] + if d == c { at } else { 0 };
                        d_el += dpos * dst_st[d];
                    }
                    if !whole_bytes {
                        copy_bits(src, s_el * bits, &mut out, d_el * bits, ext[nd - 1] * bits)
                            .map_err(&err)?;
                        continue;
                    }
                    let s = to_bytes(s_el)?;
                    let o = to_bytes(d_el)?;
                    let from = src
                        .get(s..s + inner)
                        .ok_or_else(|| err("source tensor shorter than its shape"))?;
                    let to = out
                        .get_mut(o..o + inner)
                        .ok_or_else(|| err("piece outside the local shape"))?;
                    to.copy_from_slice(from);
                }
                at += ext[c];
            }
        }
    }
    Ok(out)
}

/// Copies `n` bits from bit `from` of `src` to bit `to` of `dst` (bit `k` is bit `k % 8`,
/// least significant first, of byte `k / 8`).
fn copy_bits(src: &[u8], from: u64, dst: &mut [u8], to: u64, n: u64) -> Result<(), &'static str> {
    for k in 0..n {
        let (sb, db) = (from + k, to + k);
        let byte = src
            .get((sb / 8) as usize)
            .ok_or("source tensor shorter than its shape")?;
        let bit = (byte >> (sb % 8)) & 1;
        let out = dst
            .get_mut((db / 8) as usize)
            .ok_or("piece outside the local shape")?;
        let mask = 1u8 << (db % 8);
        *out = if bit == 1 { *out | mask } else { *out & !mask };
    }
    Ok(())
}
