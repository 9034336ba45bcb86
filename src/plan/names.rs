//! Tensor names as vLLM's model has them: a plan transform.
//!
//! [`vllm_plan`] turns a plan with checkpoint names into one whose ranks hold exactly vLLM's
//! `model.state_dict()` entries (as its `ShardedStateLoader` keeps them), following a
//! [`VllmMap`]: each fused or stacked parameter is one [`TensorPlan`] and every part's copy
//! runs are relocated into it (a dim-0 fusion moves a part to an offset; an inner-dim fusion
//! or a transpose turns its runs into strided ones through `dst_stride`). So every loader,
//! share mode and the plan hash see vLLM names with no extra copy pass. Two things the runs
//! cannot say are done after a load ([`BufferFill`]): buffers no checkpoint provides
//! (attention `_k_scale` ...) are arena tensors without copy runs whose value is written then
//! (the plan has no run kind for constants), and transposes (GPT-2's Conv1D weights) are
//! loaded in the checkpoint's layout and transposed in place: as strided runs they would be
//! one element per chunk, measured 500x slower than the copy pass.

use std::collections::{BTreeMap, HashSet};

use super::ZeroRun;
use super::{coalesce_copies, coalesce_zeros, read_bytes, CopyRun, Plan, RankPlan, TensorPlan};
use crate::checkpoint::{Checkpoint, Dtype};
use crate::sharding::vllm::{HeadStages, VllmMap};
use crate::sharding::{Config, TensorKind};
use crate::{Error, Result};

/// Which names a job's ranks hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorNames {
    /// The checkpoint's own tensor names, unfused (what other engines and the Python API use).
    #[default]
    Checkpoint,
    /// vLLM's `model.state_dict()` names: fused `qkv_proj`/`gate_up_proj`, stacked experts,
    /// vLLM's module names and layouts, persistent buffers (see [`vllm_plan`]).
    Vllm,
}

impl std::str::FromStr for TensorNames {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "checkpoint" => Ok(TensorNames::Checkpoint),
            "vllm" => Ok(TensorNames::Vllm),
            other => Err(Error::invalid_argument(
                "format",
                format!("{other:?}: expected `checkpoint` or `vllm`"),
            )),
        }
    }
}

/// What a load of a vLLM-named plan leaves to do, per global rank: buffers to fill and 2-D
/// tensors to transpose.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BufferFill {
    /// Per global rank: (tensor index in the rank, value of every element).
    pub ranks: Vec<Vec<(usize, f64)>>,
    /// Per global rank: tensors loaded as `[rows, cols]` (the checkpoint's layout) whose plan
    /// shape is vLLM's `[cols, rows]`.
    pub transposes: Vec<Vec<Transpose>>,
}

/// A tensor to transpose after loading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transpose {
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
    pub fn apply(&self, data: &mut [u8]) -> Result<()> {
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

impl BufferFill {
    /// The bytes of one element of `dtype` holding `value`, if `dtype` is a float type that
    /// represents it exactly.
    pub fn element(dtype: Dtype, value: f64) -> Option<Vec<u8>> {
        let f = value as f32;
        match dtype {
            Dtype::F64 => Some(value.to_le_bytes().to_vec()),
            Dtype::F32 if f as f64 == value => Some(f.to_le_bytes().to_vec()),
            Dtype::BF16 if f as f64 == value && f.to_bits() & 0xffff == 0 => {
                Some(((f.to_bits() >> 16) as u16).to_le_bytes().to_vec())
            }
            Dtype::F16 if f as f64 == value => f16_bits(f).map(|b| b.to_le_bytes().to_vec()),
            _ => None,
        }
    }
}

/// IEEE half bits of `f` when exact (normal halves and zero only).
fn f16_bits(f: f32) -> Option<u16> {
    let bits = f.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if f == 0.0 {
        return Some(sign);
    }
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mant = bits & 0x7f_ffff;
    if !(1..=30).contains(&exp) || mant & 0x1fff != 0 {
        return None;
    }
    Some(sign | ((exp as u16) << 10) | (mant >> 13) as u16)
}

/// Where a part's bytes go inside its vLLM tensor: element `i` of the part (row-major over
/// `shape`) lands at byte `base + sum(i_d * strides[d])`.
#[derive(Clone, Debug)]
struct Placement {
    /// Output tensor index.
    out: usize,
    base: u64,
    shape: Vec<u64>,
    /// Byte strides in the output tensor, per part dimension.
    strides: Vec<u64>,
    elem: u64,
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

/// A piece of a part: `len` bytes at part offset `at`, from file `src` (None: zeros).
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

/// An output tensor before its arena offset is known.
struct OutTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    bytes: u64,
    source: usize,
    kind: TensorKind,
    replicated: bool,
    /// Position of its first part in the rank's arena order (keeps file order).
    order: usize,
    buffer: Option<f64>,
}

fn row_major_strides(shape: &[u64], elem: u64) -> Vec<u64> {
    let mut s = vec![0; shape.len()];
    let mut acc = elem;
    for d in (0..shape.len()).rev() {
        s[d] = acc;
        acc *= shape[d];
    }
    s
}

/// Whether the rank's stage builds the tied head.
fn stage_builds_head(stages: HeadStages, pp_rank: usize, pp: usize) -> bool {
    match stages {
        HeadStages::All => true,
        HeadStages::Last => pp_rank + 1 == pp,
    }
}

/// Whether embeddings are tied as vLLM builds the model: `tie_word_embeddings` (the map's
/// default when config.json is silent) and no stored head (vLLM 0.33 unties a checkpoint that
/// stores one).
pub fn vllm_ties(map: &VllmMap, ckpt: &Checkpoint, config: &Config) -> bool {
    let Some(tie) = &map.tie else { return false };
    let declared = config
        .values
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(tie.default);
    declared
        && !ckpt
            .tensors
            .iter()
            .any(|t| map.renamed(&t.name) == tie.head)
}

/// The quantization method config.json names (`none` when unquantized).
pub fn quant_method(config: &Config) -> String {
    config
        .values
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .unwrap_or("none")
        .to_string()
}

/// `plan` (checkpoint names) with vLLM's names and layouts, and the buffers to fill after a
/// load. Unknown quantization methods and tensors the map cannot place are
/// [`Error::Unsupported`]; parts that do not fit together are [`Error::Plan`].
pub fn vllm_plan(
    plan: &Plan,
    ckpt: &Checkpoint,
    config: &Config,
    map: &VllmMap,
) -> Result<(Plan, BufferFill)> {
    let qm = quant_method(config);
    if !map.quantization.contains(&qm) {
        return Err(Error::Unsupported {
            what: format!("quantization method `{qm}`"),
            why: format!(
                "{} covers {} (vLLM {})",
                map.origin,
                map.quantization.join(", "),
                map.vllm
            ),
        });
    }
    let tied = vllm_ties(map, ckpt, config);
    let mut ranks = Vec::with_capacity(plan.ranks.len());
    let mut fill = BufferFill::default();
    for rp in &plan.ranks {
        let (r, f, t) = vllm_rank(rp, plan.topology.pp, map, tied)?;
        ranks.push(r);
        fill.ranks.push(f);
        fill.transposes.push(t);
    }
    Ok((
        Plan {
            topology: plan.topology.clone(),
            // The names are part of what ranks must agree on.
            spec: format!("{}+vllm-{}", plan.spec, map.vllm),
            files: plan.files.clone(),
            ranks,
        },
        fill,
    ))
}

/// A part's role: which output and where inside it.
struct Member {
    /// Index of the plan tensor.
    tensor: usize,
    /// Position among the group's parts (expert-major for stacks).
    slot: (u64, usize),
}

/// One rank's plan with vLLM names, its buffers and its transposes.
type VllmRank = (RankPlan, Vec<(usize, f64)>, Vec<Transpose>);

fn vllm_rank(rp: &RankPlan, pp: usize, map: &VllmMap, tied: bool) -> Result<VllmRank> {
    let rank = rp.coords.rank;
    let plain_err = |t: &str, why: String| Error::Plan {
        rank: Some(rank),
        tensor: Some(t.to_string()),
        reason: why,
    };
    // 1. Names after prefixes and tying.
    let head_here = map
        .tie
        .as_ref()
        .is_some_and(|t| tied && stage_builds_head(t.head_stages, rp.coords.pp_rank, pp));
    let names: Vec<String> = rp
        .tensors
        .iter()
        .map(|t| {
            let n = map.renamed(&t.name);
            match &map.tie {
                // ShardedStateLoader keeps the smallest of the names sharing storage.
                Some(tie) if head_here && n == tie.embedding => {
                    std::cmp::min(n.clone(), tie.head.clone())
                }
                _ => n,
            }
        })
        .collect();
    // 2. Groups: output name -> (rule, dim, members).
    enum Rule<'a> {
        Fuse(&'a crate::sharding::vllm::FuseRule, usize),
        Stack(&'a crate::sharding::vllm::FuseRule, usize),
    }
    let mut groups: BTreeMap<String, (Rule<'_>, Vec<Member>)> = BTreeMap::new();
    let mut grouped = vec![false; names.len()];
    for (i, n) in names.iter().enumerate() {
        let mut found = None;
        'rules: for (rules, stack) in [(&map.fuse, false), (&map.experts, true)] {
            for rule in rules.iter() {
                for (j, part) in rule.parts.iter().enumerate() {
                    let Some(caps) = part.matches(n) else {
                        continue;
                    };
                    let Some(dim) = rule.dim(&caps) else {
                        return Err(Error::Unsupported {
                            what: format!("tensor {n:?}"),
                            why: format!(
                                "{} fuses it into {} but names no dimension for this suffix",
                                map.origin,
                                rule.into.as_str()
                            ),
                        });
                    };
                    let into = rule
                        .into
                        .render(&caps)
                        .ok_or_else(|| plain_err(n, "cannot name its fused tensor".into()))?;
                    let expert = if stack {
                        let e = caps.iter().find(|(c, _)| c == "E").map(|(_, v)| v.as_str());
                        e.and_then(|e| e.parse::<u64>().ok())
                            .ok_or_else(|| plain_err(n, "the expert id is not a number".into()))?
                    } else {
                        0
                    };
                    let r = if stack {
                        Rule::Stack(rule, dim)
                    } else {
                        Rule::Fuse(rule, dim)
                    };
                    found = Some((
                        into,
                        r,
                        Member {
                            tensor: i,
                            slot: (expert, j),
                        },
                    ));
                    break 'rules;
                }
            }
        }
        if let Some((into, rule, member)) = found {
            grouped[i] = true;
            groups
                .entry(into)
                .or_insert((rule, Vec::new()))
                .1
                .push(member);
        }
    }
    // A rule marked `if_complete` leaves an incomplete group's parts unfused.
    groups.retain(|_, (rule, members)| {
        let (Rule::Fuse(r, _) | Rule::Stack(r, _)) = rule;
        let complete = members.len() % r.parts.len() == 0
            && (0..r.parts.len()).all(|j| members.iter().any(|m| m.slot.1 == j));
        if !r.if_complete || complete {
            return true;
        }
        for m in members.iter() {
            grouped[m.tensor] = false;
        }
        false
    });
    // 3. Output tensors and each plan tensor's placement.
    let mut outs: Vec<OutTensor> = Vec::new();
    let mut place: Vec<Option<Placement>> = vec![None; rp.tensors.len()];
    let mut transposes: Vec<(usize, u64, u64, u64)> = Vec::new();
    for (i, t) in rp.tensors.iter().enumerate() {
        if grouped[i] {
            continue;
        }
        let elem = t.dtype.byte_size(1).unwrap_or(1).max(1);
        let transpose = map.transpose.iter().any(|p| p.matches(&names[i]).is_some());
        let (shape, strides) = if transpose {
            let [r, c] = t.shape[..] else {
                return Err(plain_err(
                    &t.name,
                    format!("{} transposes it but it is not 2-D", map.origin),
                ));
            };
            if t.dtype.bits() < 8 {
                return Err(Error::Unsupported {
                    what: format!("tensor {:?}", t.name),
                    why: "a transpose of a sub-byte dtype".into(),
                });
            }
            // Loaded as stored; transposed in place after the load (see the module docs).
            transposes.push((outs.len(), r, c, elem));
            (vec![c, r], row_major_strides(&t.shape, elem))
        } else {
            (t.shape.clone(), row_major_strides(&t.shape, elem))
        };
        place[i] = Some(Placement {
            out: outs.len(),
            base: 0,
            shape: t.shape.clone(),
            strides,
            elem,
        });
        outs.push(OutTensor {
            name: names[i].clone(),
            dtype: t.dtype,
            shape,
            bytes: t.bytes,
            source: t.source,
            kind: t.kind,
            replicated: t.replicated,
            order: i,
            buffer: None,
        });
    }
    for (into, (rule, mut members)) in groups {
        members.sort_by_key(|m| m.slot);
        let (rule, dim, stack) = match rule {
            Rule::Fuse(r, d) => (r, d, false),
            Rule::Stack(r, d) => (r, d, true),
        };
        let nparts = rule.parts.len();
        let first = members.first().map(|m| m.tensor).unwrap_or(0);
        let t0 = &rp.tensors[first];
        // Every expert (or the one fused tensor) needs all its parts.
        let mut experts: Vec<u64> = members.iter().map(|m| m.slot.0).collect();
        experts.dedup();
        for &e in &experts {
            let have: Vec<usize> = members
                .iter()
                .filter(|m| m.slot.0 == e)
                .map(|m| m.slot.1)
                .collect();
            if have != (0..nparts).collect::<Vec<_>>() {
                let missing: Vec<&str> = (0..nparts)
                    .filter(|j| !have.contains(j))
                    .map(|j| rule.parts[j].as_str())
                    .collect();
                return Err(plain_err(
                    &into,
                    format!(
                        "{}: parts {} are missing{} (the rank holds only some of the parts vLLM fuses)",
                        map.origin,
                        missing.join(", "),
                        if stack { format!(" for expert {e}") } else { String::new() }
                    ),
                ));
            }
        }
        // Parts of one expert concatenate along `dim`; all experts must agree.
        let part_shapes: Vec<&[u64]> = members
            .iter()
            .take(nparts)
            .map(|m| rp.tensors[m.tensor].shape.as_slice())
            .collect();
        let ndim = t0.shape.len();
        if dim >= ndim {
            return Err(plain_err(
                &into,
                format!("{}: fuses on dim {dim} of {}-D parts", map.origin, ndim),
            ));
        }
        let mut fused = t0.shape.clone();
        fused[dim] = part_shapes
            .iter()
            .map(|s| s.get(dim).copied().unwrap_or(0))
            .sum();
        for m in &members {
            let t = &rp.tensors[m.tensor];
            let want = part_shapes[m.slot.1];
            if t.dtype != t0.dtype || t.shape.as_slice() != want {
                return Err(plain_err(
                    &into,
                    format!(
                        "part {} is {} {:?}, expected {} {:?} like the other parts",
                        t.name, t.dtype, t.shape, t0.dtype, want
                    ),
                ));
            }
            let same_elsewhere = t
                .shape
                .iter()
                .zip(&fused)
                .enumerate()
                .all(|(d, (a, b))| d == dim || a == b);
            if !same_elsewhere {
                return Err(plain_err(
                    &into,
                    format!(
                        "part {} {:?} differs from the others outside dim {dim}",
                        t.name, t.shape
                    ),
                ));
            }
            if t.dtype.bits() < 8 && dim + 1 == ndim {
                return Err(Error::Unsupported {
                    what: format!("tensor {:?}", t.name),
                    why: "fusing a sub-byte dtype on its last dimension".into(),
                });
            }
        }
        let elem = t0.dtype.byte_size(1).unwrap_or(1).max(1);
        let per_expert_elems: u64 = fused.iter().product();
        let shape = if stack {
            let mut s = vec![experts.len() as u64];
            s.extend_from_slice(&fused);
            s
        } else {
            fused.clone()
        };
        let fused_strides = row_major_strides(&fused, elem);
        let bytes = t0
            .dtype
            .byte_size(shape.iter().product())
            .ok_or_else(|| plain_err(&into, "size overflows".into()))?;
        let out = outs.len();
        let mut offset_along = vec![0u64; nparts];
        for j in 1..nparts {
            offset_along[j] = offset_along[j - 1] + part_shapes[j - 1][dim];
        }
        for m in &members {
            let e_idx = experts.iter().position(|&e| e == m.slot.0).unwrap_or(0) as u64;
            let base =
                e_idx * per_expert_elems * elem + offset_along[m.slot.1] * fused_strides[dim];
            let t = &rp.tensors[m.tensor];
            place[m.tensor] = Some(Placement {
                out,
                base,
                shape: t.shape.clone(),
                strides: fused_strides.clone(),
                elem,
            });
        }
        outs.push(OutTensor {
            name: into,
            dtype: t0.dtype,
            shape,
            bytes,
            source: t0.source,
            kind: t0.kind,
            replicated: members.iter().all(|m| rp.tensors[m.tensor].replicated),
            order: members.iter().map(|m| m.tensor).min().unwrap_or(0),
            buffer: None,
        });
    }
    // Of names vLLM lists twice for one parameter, ShardedStateLoader keeps the smallest.
    for o in &mut outs {
        o.name = map.kept_alias(&o.name);
    }
    // 4. Buffers, once per distinct module the rank holds.
    let mut buffer_names: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (bi, b) in map.buffers.iter().enumerate() {
        for (oi, o) in outs.iter().enumerate() {
            if let Some(caps) = b.with.matches(&o.name) {
                if let Some(name) = b.name.render(&caps) {
                    buffer_names.entry(name).or_insert((bi, outs[oi].order));
                }
            }
        }
    }
    for (name, (bi, order)) in buffer_names {
        let b = &map.buffers[bi];
        let bytes = b
            .dtype
            .byte_size(b.shape.iter().product())
            .ok_or_else(|| plain_err(&name, "buffer size overflows".into()))?;
        outs.push(OutTensor {
            name,
            dtype: b.dtype,
            shape: b.shape.clone(),
            bytes,
            source: usize::MAX,
            kind: TensorKind::Other,
            replicated: true,
            order,
            buffer: Some(b.value),
        });
    }
    // 5. Arena layout in first-part order (file order), then names.
    let mut order: Vec<usize> = (0..outs.len()).collect();
    order.sort_by(|&a, &b| {
        (outs[a].order, outs[a].buffer.is_some(), &outs[a].name).cmp(&(
            outs[b].order,
            outs[b].buffer.is_some(),
            &outs[b].name,
        ))
    });
    let mut seen: HashSet<&str> = HashSet::new();
    for o in &outs {
        if !seen.insert(&o.name) {
            return Err(plain_err(
                &o.name,
                format!("{}: two tensors get this vLLM name", map.origin),
            ));
        }
    }
    let mut tensors = Vec::with_capacity(outs.len());
    let mut zeros = Vec::new();
    let mut buffers = Vec::new();
    let mut cursor = 0u64;
    let mut offsets = vec![0u64; outs.len()];
    let mut position = vec![0usize; outs.len()];
    for (pos, &oi) in order.iter().enumerate() {
        position[oi] = pos;
        let o = &outs[oi];
        let offset = super::place_next(cursor, &mut zeros);
        offsets[oi] = offset;
        if let Some(v) = o.buffer {
            zeros.push(ZeroRun {
                dst: offset,
                len: o.bytes,
                count: 1,
                dst_stride: o.bytes,
            });
            buffers.push((pos, v));
        }
        tensors.push(TensorPlan {
            name: o.name.clone(),
            dtype: o.dtype,
            shape: o.shape.clone(),
            offset,
            bytes: o.bytes,
            // A buffer has no checkpoint source: its first neighbour's keeps the index valid.
            source: if o.source == usize::MAX { 0 } else { o.source },
            kind: o.kind,
            replicated: o.replicated,
        });
        cursor = offset + o.bytes;
    }
    // 6. Runs, cut at the old tensors' boundaries and relocated.
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
    copies.sort_by_key(|c| (c.file, c.src));
    coalesce_copies(&mut copies);
    zeros.sort_by_key(|z| z.dst);
    coalesce_zeros(&mut zeros);
    let bytes = tensors.iter().map(|t| t.bytes).sum();
    let read = read_bytes(&copies);
    Ok((
        RankPlan {
            coords: rp.coords,
            tensors,
            copies,
            zeros,
            bytes,
            read_bytes: read,
            arena_bytes: cursor,
            // Same reads as the checkpoint-named plan, so the same staging peak.
            staging_bytes: rp.staging_bytes,
        },
        buffers,
        transposes
            .into_iter()
            .map(|(oi, rows, cols, elem)| Transpose {
                tensor: position[oi],
                rows,
                cols,
                elem,
            })
            .collect(),
    ))
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
