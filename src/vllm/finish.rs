//! Finishing a loaded rank of a vLLM-named plan: what the plan's runs cannot say, applied
//! once after the load (see [`crate::vllm::transform`]):
//!
//! 1. transposes (GPT-2's Conv1D weights, loaded in the checkpoint's layout);
//! 2. buffer values (attention `_k_scale` ..., zero-filled by the plan);
//! 3. the re-tie: vLLM 0.33 builds the head of a tied config untied when the checkpoint stores
//!    one, and after loading re-ties it on every rank whose head equals its embedding
//!    (`maybe_retie_word_embeddings`: exactly one head and one embedding on the rank, equal
//!    shapes, `torch.equal` over the whole rank-local tensors, vocab padding rows included,
//!    which its loader zero-fills). A re-tied head *is* the embedding, so the rank keeps one
//!    tensor, the embedding's bytes, under the smaller name (as `ShardedStateLoader` keeps
//!    names sharing storage) and lists the other as an alias
//!    ([`crate::load::RankTensors::aliases`]). It depends on the bytes, so it is decided here,
//!    not in the plan: the plan lists both.
//!
//! A [`RankTensors`] carries whether it is finished, and a finished rank is left as it is, so
//! no transpose is ever applied twice. A caller's buffer carries no state: the only way to
//! finish one is the load that fills it ([`crate::Job::load_rank_into_buffer`]).
//!
//! vLLM compares in the dtype it serves; the rank holds the checkpoint's dtype, which is the
//! same unless the served dtype is changed (then values that differ only in the checkpoint's
//! extra precision are re-tied by vLLM and kept apart here).

use super::transform::buffers::element;
use super::transform::transpose::Transpose;
use crate::checkpoint::Dtype;
use crate::load::RankTensors;
use crate::plan::{Plan, RankPlan, TensorPlan};
use crate::{Error, Result};

/// What every rank of a vLLM-named plan leaves until after its load.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Finishing {
    ranks: Vec<RankFinish>,
}

/// One rank's steps after its load; tensor indices are positions in the rank's plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RankFinish {
    /// Tensors loaded as `[rows, cols]` whose plan shape is vLLM's `[cols, rows]`.
    pub transposes: Vec<Transpose>,
    /// (tensor, value of every element) of buffers no checkpoint provides.
    pub buffers: Vec<(usize, f64)>,
    /// The embedding and stored head vLLM re-ties if they are equal.
    pub retie: Option<Retie>,
}

/// An embedding and a head vLLM compares after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retie {
    /// The embedding's tensor index.
    pub embedding: usize,
    /// The head's tensor index.
    pub head: usize,
}

/// Whether a re-tied pair keeps one name (vLLM's state dict) or both (what vLLM's
/// `sharded_state` loader needs from a model it builds untied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Names {
    /// The smaller name only; the other is an alias.
    Vllm,
    /// Both names, each holding the embedding's bytes.
    Both,
}

/// What the re-tie did on a rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retied {
    /// The rank does not hold both an embedding and a stored head.
    NotApplicable,
    /// vLLM keeps them apart (they differ).
    Apart,
    /// vLLM re-ties them.
    Tied,
}

/// Where a loaded rank's tensors are: its arena, views of the files, caller buffers.
trait Tensors {
    /// Tensor `i`'s bytes.
    fn data(&self, i: usize) -> Result<&[u8]>;
    /// Tensor `i`'s bytes, writable.
    fn data_mut(&mut self, i: usize) -> Result<&mut [u8]>;
    /// Leaves tensor `i` out: tensor `holder` holds its values.
    fn alias(&mut self, i: usize, holder: usize);
}

impl Finishing {
    pub(crate) fn new(ranks: Vec<RankFinish>) -> Finishing {
        Finishing { ranks }
    }

    /// Finishes `loaded` (a load of `plan`'s rank) unless it is finished already.
    pub(crate) fn finish_rank(
        &self,
        plan: &Plan,
        loaded: &mut RankTensors,
        names: Names,
    ) -> Result<Retied> {
        if loaded.is_finished() {
            return Ok(Retied::NotApplicable);
        }
        let rank = loaded.coords().rank;
        let rp = rank_plan(plan, rank)?;
        if loaded.plans() != rp.tensors.as_slice() {
            return Err(Error::load(
                Some(rank),
                "the loaded tensors are not this plan's (finish a rank with the job that loaded it)",
            ));
        }
        let retied = self.apply(rp, &mut ArenaTensors { loaded, rp }, names)?;
        loaded.mark_finished();
        Ok(retied)
    }

    /// Finishes a rank loaded with the tensors named in `into` in caller buffers and the rest
    /// in `loaded`.
    pub(crate) fn finish_scattered(
        &self,
        plan: &Plan,
        loaded: &mut RankTensors,
        into: &mut [(&str, &mut [u8])],
    ) -> Result<()> {
        if loaded.is_finished() {
            return Ok(());
        }
        let rp = rank_plan(plan, loaded.coords().rank)?;
        let mut t = Scattered { loaded, into, rp };
        self.apply(rp, &mut t, Names::Vllm)?;
        t.loaded.mark_finished();
        Ok(())
    }

    /// Finishes rank `rank` of `plan` loaded into `arena` (laid out as its plan says); returns
    /// (alias, holder) tensor indices of what it leaves out.
    pub(crate) fn finish_buffer(
        &self,
        plan: &Plan,
        rank: usize,
        arena: &mut [u8],
    ) -> Result<Vec<(usize, usize)>> {
        let rp = rank_plan(plan, rank)?;
        let mut t = Buffer {
            arena,
            rp,
            aliases: Vec::new(),
        };
        self.apply(rp, &mut t, Names::Vllm)?;
        Ok(t.aliases)
    }

    /// Transposes, then buffer values, then the re-tie, on tensors wherever they are.
    fn apply(&self, rp: &RankPlan, t: &mut dyn Tensors, names: Names) -> Result<Retied> {
        let rank = rp.coords.rank;
        let Some(f) = self.ranks.get(rank) else {
            return Ok(Retied::NotApplicable);
        };
        for tr in &f.transposes {
            tr.apply(t.data_mut(tr.tensor)?)?;
        }
        for &(i, value) in &f.buffers {
            let tensor = tensor(rp, i)?;
            let elem = element(tensor.dtype, value).ok_or_else(|| Error::Plan {
                rank: Some(rank),
                tensor: Some(tensor.name.clone()),
                reason: format!("buffer value {value} is not exact in {}", tensor.dtype),
            })?;
            for chunk in t.data_mut(i)?.chunks_exact_mut(elem.len()) {
                chunk.copy_from_slice(&elem);
            }
        }
        match f.retie {
            None => Ok(Retied::NotApplicable),
            Some(r) => retie(rp, r, t, names),
        }
    }
}

/// vLLM's re-tie on one rank (see the module docs).
fn retie(rp: &RankPlan, r: Retie, t: &mut dyn Tensors, names: Names) -> Result<Retied> {
    let (emb, head) = (tensor(rp, r.embedding)?, tensor(rp, r.head)?);
    if emb.dtype != head.dtype
        || emb.shape != head.shape
        || !values_equal(emb.dtype, t.data(r.embedding)?, t.data(r.head)?)
    {
        return Ok(Retied::Apart);
    }
    // The re-tied head is the embedding's storage: whichever name is kept holds its bytes
    // (equal values may differ in bytes: -0 and +0).
    if t.data(r.embedding)? != t.data(r.head)? {
        let src = t.data(r.embedding)?;
        let mut copy = Vec::new();
        copy.try_reserve_exact(src.len())
            .map_err(|_| Error::OutOfMemory {
                bytes: src.len() as u64,
                what: format!("a copy of {:?} for the re-tied head", emb.name),
                rank: Some(rp.coords.rank),
            })?;
        copy.extend_from_slice(src);
        t.data_mut(r.head)?.copy_from_slice(&copy);
    }
    if names == Names::Vllm {
        let (keep, drop) = if head.name <= emb.name {
            (r.head, r.embedding)
        } else {
            (r.embedding, r.head)
        };
        t.alias(drop, keep);
    }
    Ok(Retied::Tied)
}

fn rank_plan(plan: &Plan, rank: usize) -> Result<&RankPlan> {
    plan.ranks
        .get(rank)
        .ok_or_else(|| Error::plan_rank(rank, format!("the plan has {} ranks", plan.ranks.len())))
}

fn tensor(rp: &RankPlan, i: usize) -> Result<&TensorPlan> {
    rp.tensors
        .get(i)
        .ok_or_else(|| Error::plan_rank(rp.coords.rank, format!("no tensor {i} to finish")))
}

/// A rank in its own arena (or views of the files, materialized before a write).
struct ArenaTensors<'a> {
    loaded: &'a mut RankTensors,
    rp: &'a RankPlan,
}

impl Tensors for ArenaTensors<'_> {
    fn data(&self, i: usize) -> Result<&[u8]> {
        self.loaded
            .tensor_data(i)
            .ok_or_else(|| missing(self.rp, i))
    }

    fn data_mut(&mut self, i: usize) -> Result<&mut [u8]> {
        if self.loaded.arena_tensor_mut(i).is_none() {
            self.loaded.materialize();
        }
        let rp = self.rp;
        self.loaded
            .arena_tensor_mut(i)
            .ok_or_else(|| missing(rp, i))
    }

    fn alias(&mut self, i: usize, holder: usize) {
        if let Some(h) = self.rp.tensors.get(holder) {
            self.loaded.alias(i, &h.name);
        }
    }
}

/// A rank with some tensors in caller buffers.
struct Scattered<'a, 'b, 'c> {
    loaded: &'a mut RankTensors,
    into: &'a mut [(&'b str, &'c mut [u8])],
    rp: &'a RankPlan,
}

impl Scattered<'_, '_, '_> {
    fn buffer(&self, i: usize) -> Option<usize> {
        let name = self.rp.tensors.get(i)?.name.as_str();
        self.into.iter().position(|(n, _)| *n == name)
    }
}

impl Tensors for Scattered<'_, '_, '_> {
    fn data(&self, i: usize) -> Result<&[u8]> {
        match self.buffer(i) {
            Some(b) => Ok(&*self.into[b].1),
            None => self
                .loaded
                .tensor_data(i)
                .ok_or_else(|| missing(self.rp, i)),
        }
    }

    fn data_mut(&mut self, i: usize) -> Result<&mut [u8]> {
        match self.buffer(i) {
            Some(b) => Ok(&mut *self.into[b].1),
            None => {
                let rp = self.rp;
                self.loaded
                    .arena_tensor_mut(i)
                    .ok_or_else(|| missing(rp, i))
            }
        }
    }

    fn alias(&mut self, i: usize, holder: usize) {
        if let Some(h) = self.rp.tensors.get(holder) {
            self.loaded.alias(i, &h.name);
        }
    }
}

/// A rank in a caller's buffer laid out as its plan says.
struct Buffer<'a> {
    arena: &'a mut [u8],
    rp: &'a RankPlan,
    aliases: Vec<(usize, usize)>,
}

impl Buffer<'_> {
    fn span(&self, i: usize) -> Result<std::ops::Range<usize>> {
        let t = tensor(self.rp, i)?;
        let s = usize::try_from(t.offset).ok();
        let e = s.and_then(|s| s.checked_add(usize::try_from(t.bytes).ok()?));
        match (s, e) {
            (Some(s), Some(e)) if e <= self.arena.len() => Ok(s..e),
            _ => Err(Error::Plan {
                rank: Some(self.rp.coords.rank),
                tensor: Some(t.name.clone()),
                reason: format!("lies outside the {}-byte buffer", self.arena.len()),
            }),
        }
    }
}

impl Tensors for Buffer<'_> {
    fn data(&self, i: usize) -> Result<&[u8]> {
        let r = self.span(i)?;
        Ok(&self.arena[r])
    }

    fn data_mut(&mut self, i: usize) -> Result<&mut [u8]> {
        let r = self.span(i)?;
        Ok(&mut self.arena[r])
    }

    fn alias(&mut self, i: usize, holder: usize) {
        self.aliases.push((i, holder));
    }
}

fn missing(rp: &RankPlan, i: usize) -> Error {
    let name = rp.tensors.get(i).map_or("?", |t| t.name.as_str());
    Error::plan_rank(
        rp.coords.rank,
        format!("tensor {name:?} to finish is not loaded"),
    )
}

/// How a float format marks NaN and zero, for [`values_equal`].
#[derive(Clone, Copy)]
enum Format {
    /// IEEE-style: an all-ones exponent with a non-zero mantissa is NaN; ±0 are equal.
    Ieee { sign: u64, exp: u64, mant: u64 },
    /// F8 E4M3 "fn": `S.1111.111` is NaN (no infinities); ±0 are equal.
    E4m3Fn,
    /// F8 "fnuz": `0x80` is NaN and the only zero is `0x00`.
    Fnuz,
    /// F8 E8M0: `0xff` is NaN; no zero.
    E8m0,
}

impl Format {
    fn of(dtype: Dtype) -> Option<(Format, usize)> {
        let ieee = |sign, exp, mant| Format::Ieee { sign, exp, mant };
        Some(match dtype {
            Dtype::F16 => (ieee(0x8000, 0x7c00, 0x03ff), 2),
            Dtype::BF16 => (ieee(0x8000, 0x7f80, 0x007f), 2),
            Dtype::F32 | Dtype::C64 => (ieee(0x8000_0000, 0x7f80_0000, 0x007f_ffff), 4),
            Dtype::F64 => (
                ieee(1 << 63, 0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff),
                8,
            ),
            Dtype::F8_E5M2 => (ieee(0x80, 0x7c, 0x03), 1),
            Dtype::F8_E4M3 => (Format::E4m3Fn, 1),
            Dtype::F8_E4M3FNUZ | Dtype::F8_E5M2FNUZ => (Format::Fnuz, 1),
            Dtype::F8_E8M0 => (Format::E8m0, 1),
            _ => return None,
        })
    }

    fn is_nan(self, x: u64) -> bool {
        match self {
            Format::Ieee { exp, mant, .. } => x & exp == exp && x & mant != 0,
            Format::E4m3Fn => x & 0x7f == 0x7f,
            Format::Fnuz => x == 0x80,
            Format::E8m0 => x == 0xff,
        }
    }

    fn is_zero(self, x: u64) -> bool {
        match self {
            Format::Ieee { sign, .. } => x & !sign == 0,
            Format::E4m3Fn => x & 0x7f == 0,
            Format::Fnuz => x == 0,
            Format::E8m0 => false,
        }
    }
}

/// Whether two tensors of `dtype` hold equal values as `torch.equal` compares them: floats
/// element by element (a NaN equals nothing, -0 equals +0), other dtypes (integers, the
/// sub-byte floats) by bytes.
pub(crate) fn values_equal(dtype: Dtype, a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let Some((format, size)) = Format::of(dtype) else {
        return a == b;
    };
    let word = |c: &[u8]| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    };
    a.chunks_exact(size)
        .zip(b.chunks_exact(size))
        .all(|(x, y)| {
            let (x, y) = (word(x), word(y));
            !format.is_nan(x)
                && !format.is_nan(y)
                && (x == y || (format.is_zero(x) && format.is_zero(y)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eq(dtype: Dtype, a: &[u8], b: &[u8]) -> bool {
        values_equal(dtype, a, b)
    }

    // Expected values are torch 2.x's `torch.equal` on one-element tensors (checked with the
    // venv's torch: NaN never equal, even to itself; -0 equal to +0).
    #[test]
    fn values_compare_as_torch_equal_does() {
        let f32b = |x: f32| x.to_le_bytes().to_vec();
        assert!(eq(Dtype::F32, &f32b(1.5), &f32b(1.5)));
        assert!(!eq(Dtype::F32, &f32b(1.5), &f32b(2.5)));
        assert!(!eq(Dtype::F32, &f32b(f32::NAN), &f32b(f32::NAN)));
        assert!(eq(Dtype::F32, &f32b(0.0), &f32b(-0.0)));
        assert!(eq(Dtype::F32, &f32b(f32::INFINITY), &f32b(f32::INFINITY)));
        // bf16: 0x7fc0 NaN, 0x8000 -0, 0x7f80 +inf.
        assert!(!eq(Dtype::BF16, &[0xc0, 0x7f], &[0xc0, 0x7f]));
        assert!(eq(Dtype::BF16, &[0x00, 0x80], &[0x00, 0x00]));
        assert!(eq(Dtype::BF16, &[0x80, 0x7f], &[0x80, 0x7f]));
        // f16: 0x7e00 NaN, 0x7c00 inf.
        assert!(!eq(Dtype::F16, &[0x00, 0x7e], &[0x00, 0x7e]));
        assert!(eq(Dtype::F16, &[0x00, 0x7c], &[0x00, 0x7c]));
        assert!(eq(Dtype::F16, &[0x00, 0x80], &[0x00, 0x00]));
        assert!(!eq(
            Dtype::F64,
            &f64::NAN.to_le_bytes(),
            &f64::NAN.to_le_bytes()
        ));
        assert!(eq(
            Dtype::F64,
            &(-0.0f64).to_le_bytes(),
            &0.0f64.to_le_bytes()
        ));
        // float8_e4m3fn: 0x7f NaN, 0x80 -0; e5m2: 0x7e NaN, 0x7c inf.
        assert!(!eq(Dtype::F8_E4M3, &[0x7f], &[0x7f]));
        assert!(eq(Dtype::F8_E4M3, &[0x80], &[0x00]));
        assert!(eq(Dtype::F8_E4M3, &[0x7e], &[0x7e]));
        assert!(!eq(Dtype::F8_E5M2, &[0x7e], &[0x7e]));
        assert!(eq(Dtype::F8_E5M2, &[0x7c], &[0x7c]));
        // fnuz: 0x80 is NaN; e8m0: 0xff is NaN, 0x00 is 2^-127.
        assert!(!eq(Dtype::F8_E4M3FNUZ, &[0x80], &[0x80]));
        assert!(!eq(Dtype::F8_E5M2FNUZ, &[0x80], &[0x80]));
        assert!(!eq(Dtype::F8_E8M0, &[0xff], &[0xff]));
        assert!(eq(Dtype::F8_E8M0, &[0x00], &[0x00]));
        // Integers by bytes; a length difference is never equal.
        assert!(eq(Dtype::I32, &[1, 2, 3, 4], &[1, 2, 3, 4]));
        assert!(!eq(Dtype::I32, &[1, 2, 3, 4], &[1, 2, 3, 5]));
        assert!(!eq(Dtype::F32, &[0; 4], &[0; 8]));
        // One NaN anywhere makes the whole tensor unequal.
        let mut a = f32b(1.0);
        a.extend(f32b(f32::NAN));
        assert!(!eq(Dtype::F32, &a, &a.clone()));
    }
}
