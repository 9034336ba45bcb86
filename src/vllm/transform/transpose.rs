//! The transpose pass: 2-D tensors vLLM holds transposed (GPT-2's Conv1D weights). They are
//! loaded in the checkpoint's layout and transposed in place after the load (see
//! [`crate::vllm::transform`] for why not as strided runs); the plan gives them vLLM's shape.

use super::Draft;
use crate::{Error, Result};

/// A tensor to transpose after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Transpose {
    /// Tensor index in the rank.
    pub tensor: usize,
    /// Rows as loaded.
    pub rows: u64,
    /// Columns as loaded.
    pub cols: u64,
    /// Element size in bytes.
    pub elem: u64,
}

impl Transpose {
    /// Transposes `data` (`rows x cols` elements, row-major) in place, through a copy.
    pub(crate) fn apply(&self, data: &mut [u8]) -> Result<()> {
        let e = self.elem as usize;
        let (r, c) = (self.rows as usize, self.cols as usize);
        if r.checked_mul(c).and_then(|n| n.checked_mul(e)) != Some(data.len()) {
            return Err(Error::plan(format!(
                "transpose of {r} x {c} elements of {e} bytes over {} bytes",
                data.len()
            )));
        }
        let mut src = Vec::new();
        src.try_reserve_exact(data.len())
            .map_err(|_| Error::OutOfMemory {
                bytes: data.len() as u64,
                what: "a transpose's copy".into(),
                rank: None,
            })?;
        src.extend_from_slice(data);
        // Tiles keep both sides in cache.
        const TILE: usize = 32;
        for i0 in (0..r).step_by(TILE) {
            for j0 in (0..c).step_by(TILE) {
                for i in i0..(i0 + TILE).min(r) {
                    for j in j0..(j0 + TILE).min(c) {
                        let s = (i * c + j) * e;
                        let d = (j * r + i) * e;
                        data[d..d + e].copy_from_slice(&src[s..s + e]);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Gives every tensor the map transposes vLLM's shape `[cols, rows]` and records the
/// transpose (output index) for after the load.
pub(super) fn transpose(d: &mut Draft<'_>) -> Result<()> {
    for oi in 0..d.outs.len() {
        let Some(i) = d.outs[oi].single else {
            continue;
        };
        let name = &d.names[i];
        if !d.map.transpose.iter().any(|p| p.matches(name).is_some()) {
            continue;
        }
        let t = &d.rp.tensors[i];
        let [rows, cols] = t.shape[..] else {
            return Err(d.err(
                &t.name,
                format!("{} transposes it but it is not 2-D", d.map.origin),
            ));
        };
        if t.dtype.bits() < 8 {
            return Err(Error::Unsupported {
                what: format!("tensor {:?}", t.name),
                why: "a transpose of a sub-byte dtype".into(),
            });
        }
        let elem = t.dtype.byte_size(1).unwrap_or(1).max(1);
        d.outs[oi].shape = vec![cols, rows];
        d.transposes.push((
            oi,
            Transpose {
                tensor: oi,
                rows,
                cols,
                elem,
            },
        ));
    }
    Ok(())
}
