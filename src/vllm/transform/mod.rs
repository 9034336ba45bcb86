//! Tensor names as vLLM's model has them: a plan transform.
//!
//! [`vllm_plan`] turns a plan with checkpoint names into one whose ranks hold exactly vLLM's
//! `model.state_dict()` entries (as its `ShardedStateLoader` keeps them), following a
//! [`VllmMap`]. Each rank goes through separate passes over one [`Draft`]:
//!
//! 1. [`tie`]: names after the map's prefixes, tied embeddings under the head's name on
//!    stages that build a head;
//! 2. [`fuse`]: parts concatenated into one parameter (`qkv_proj`, `gate_up_proj`);
//! 3. [`fuse::stack`]: FusedMoE experts, fused per expert and stacked;
//! 4. every tensor no pass grouped is an output of its own, under the smallest of its alias
//!    names;
//! 5. [`transpose`]: 2-D tensors vLLM holds transposed;
//! 6. [`tie::retie`]: the embedding and stored head vLLM may re-tie after loading;
//! 7. [`buffers`]: persistent buffers no checkpoint provides.
//!
//! Then the outputs get arena offsets and every part's copy runs are relocated into its output
//! ([`relocate`]: a dim-0 part moves to an offset, an inner-dim part becomes strided runs
//! through `dst_stride`), so every loader, share mode and the plan hash see vLLM names with no
//! extra copy pass. What runs cannot say is left to [`Finishing`], applied once after a load:
//! buffer values (the plan has no run kind for constants), transposes (as strided runs they
//! would be one element per chunk, measured 500x slower than a pass after the load) and the
//! re-tie, which depends on the loaded bytes.

pub(crate) mod buffers;
mod fuse;
mod relocate;
mod tie;
pub(crate) mod transpose;

use std::collections::HashSet;

use crate::checkpoint::{Checkpoint, Dtype};
use crate::plan::{
    coalesce_copies, coalesce_zeros, read_bytes, Plan, RankPlan, TensorPlan, ZeroRun,
};
use crate::sharding::{Config, TensorKind};
use crate::{Error, Result};

use super::finish::{Finishing, RankFinish, Retie};
use super::map::VllmMap;
use relocate::{relocate_runs, row_major_strides, Placement};
use transpose::Transpose;

pub(crate) use tie::{tie_facts, TieFacts};

/// Which names a job's ranks hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorNames {
    /// The checkpoint's own tensor names, unfused (what other engines and the Python API use).
    #[default]
    Checkpoint,
    /// vLLM's `model.state_dict()` names: fused `qkv_proj`/`gate_up_proj`, stacked experts,
    /// vLLM's module names and layouts, persistent buffers (see [`crate::vllm`]).
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

/// The quantization method config.json names (`none` when unquantized).
fn quant_method(config: &Config) -> String {
    config
        .values
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(|m| m.as_str())
        .unwrap_or("none")
        .to_string()
}

/// `plan` (checkpoint names) with vLLM's names and layouts, and what is left to do after a
/// load. Unknown quantization methods and tensors the map cannot place are
/// [`Error::Unsupported`]; parts that do not fit together are [`Error::Plan`].
pub(crate) fn vllm_plan(
    plan: &Plan,
    ckpt: &Checkpoint,
    config: &Config,
    map: &VllmMap,
) -> Result<(Plan, Finishing)> {
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
    let tie = tie_facts(map, ckpt, config);
    let mut ranks = Vec::with_capacity(plan.ranks.len());
    let mut finishing = Vec::with_capacity(plan.ranks.len());
    for rp in &plan.ranks {
        let (r, f) = vllm_rank(rp, plan.topology.pp, map, tie)?;
        ranks.push(r);
        finishing.push(f);
    }
    Ok((
        Plan {
            topology: plan.topology.clone(),
            // The names are part of what ranks must agree on.
            spec: format!("{}+vllm-{}", plan.spec, map.vllm),
            files: plan.files.clone(),
            ranks,
        },
        Finishing::new(finishing),
    ))
}

/// An output tensor before its arena offset is known.
struct OutTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    bytes: u64,
    /// The checkpoint tensor of its first part (`None`: a buffer).
    source: Option<usize>,
    kind: TensorKind,
    replicated: bool,
    /// Position of its first part in the rank's arena order (keeps file order).
    order: usize,
    /// The plan tensor it is made of alone (not fused, stacked or a buffer).
    single: Option<usize>,
    /// Every element's value (a buffer).
    buffer: Option<f64>,
}

/// An output of a pass: a tensor and where each of its parts (plan tensors) goes in it.
struct Output {
    tensor: OutTensor,
    /// (plan tensor, placement; its `out` is set when the outputs are numbered).
    parts: Vec<(usize, Placement)>,
}

/// One rank on its way to vLLM's names.
struct Draft<'a> {
    rp: &'a RankPlan,
    map: &'a VllmMap,
    /// vLLM name of every plan tensor after prefixes and tying (before fusion).
    names: Vec<String>,
    /// Plan tensors a pass has placed.
    grouped: Vec<bool>,
    /// Outputs by index (numbered once every part is placed).
    outs: Vec<OutTensor>,
    /// Where every plan tensor's bytes go.
    place: Vec<Option<Placement>>,
    /// Tensors to transpose after the load, by output index.
    transposes: Vec<(usize, Transpose)>,
    /// The embedding and stored head vLLM may re-tie, by output index.
    retie: Option<(usize, usize)>,
}

impl Draft<'_> {
    /// A plan error naming the rank and tensor.
    fn err(&self, tensor: &str, why: String) -> Error {
        Error::Plan {
            rank: Some(self.rp.coords.rank),
            tensor: Some(tensor.to_string()),
            reason: why,
        }
    }

    /// Numbers `outputs` after the ones already there and places their parts.
    fn push(&mut self, outputs: Vec<Output>) {
        for o in outputs {
            let out = self.outs.len();
            for (tensor, mut p) in o.parts {
                p.out = out;
                self.grouped[tensor] = true;
                self.place[tensor] = Some(p);
            }
            self.outs.push(o.tensor);
        }
    }

    /// Every plan tensor no pass grouped, as an output of its own.
    fn singles(&self) -> Vec<Output> {
        let mut out = Vec::new();
        for (i, t) in self.rp.tensors.iter().enumerate() {
            if self.grouped[i] {
                continue;
            }
            let elem = t.dtype.byte_size(1).unwrap_or(1).max(1);
            out.push(Output {
                tensor: OutTensor {
                    name: self.names[i].clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    bytes: t.bytes,
                    source: Some(t.source),
                    kind: t.kind,
                    replicated: t.replicated,
                    order: i,
                    single: Some(i),
                    buffer: None,
                },
                parts: vec![(
                    i,
                    Placement {
                        out: 0,
                        base: 0,
                        shape: t.shape.clone(),
                        strides: row_major_strides(&t.shape, elem),
                        elem,
                    },
                )],
            });
        }
        out
    }
}

/// One rank's plan with vLLM names and what is left to do after its load.
fn vllm_rank(
    rp: &RankPlan,
    pp: usize,
    map: &VllmMap,
    tie: TieFacts,
) -> Result<(RankPlan, RankFinish)> {
    let mut d = Draft {
        rp,
        map,
        names: tie::names(rp, pp, map, tie),
        grouped: vec![false; rp.tensors.len()],
        outs: Vec::new(),
        place: vec![None; rp.tensors.len()],
        transposes: Vec::new(),
        retie: None,
    };
    let fused = fuse::fuse(&d)?;
    // Fused parts are claimed first: a tensor a fuse rule names is never stacked.
    for o in &fused {
        for &(t, _) in &o.parts {
            d.grouped[t] = true;
        }
    }
    let stacked = fuse::stack(&d)?;
    let mut groups: Vec<Output> = fused.into_iter().chain(stacked).collect();
    groups.sort_by(|a, b| a.tensor.name.cmp(&b.tensor.name));
    for o in &groups {
        for &(t, _) in &o.parts {
            d.grouped[t] = true;
        }
    }
    // Singles first (plan order), then fused and stacked tensors by name: the order buffers
    // are found in, as before the passes were split.
    let singles = d.singles();
    d.push(singles);
    d.push(groups);
    // Of names vLLM lists twice for one parameter, ShardedStateLoader keeps the smallest.
    for o in &mut d.outs {
        o.name = map.kept_alias(&o.name);
    }
    transpose::transpose(&mut d)?;
    d.retie = tie::retie(&d, tie);
    buffers::buffers(&mut d)?;
    layout(d)
}

/// Arena offsets for every output (first-part order, which is file order, then names), the
/// relocated runs and the finishing steps by arena position.
fn layout(d: Draft<'_>) -> Result<(RankPlan, RankFinish)> {
    let Draft {
        rp,
        map,
        outs,
        place,
        transposes,
        retie,
        ..
    } = d;
    let rank = rp.coords.rank;
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
            return Err(Error::Plan {
                rank: Some(rank),
                tensor: Some(o.name.clone()),
                reason: format!("{}: two tensors get this vLLM name", map.origin),
            });
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
        let offset = crate::plan::place_next(cursor, &mut zeros);
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
            source: o.source.unwrap_or(0),
            kind: o.kind,
            replicated: o.replicated,
        });
        cursor = offset + o.bytes;
    }
    let (mut copies, mut zeros) = relocate_runs(rp, &place, &offsets, zeros)?;
    copies.sort_by_key(|c| (c.file, c.src));
    coalesce_copies(&mut copies);
    zeros.sort_by_key(|z| z.dst);
    coalesce_zeros(&mut zeros);
    let bytes = tensors.iter().map(|t| t.bytes).sum();
    let read = read_bytes(&copies);
    let finish = RankFinish {
        transposes: transposes
            .into_iter()
            .map(|(oi, t)| Transpose {
                tensor: position[oi],
                ..t
            })
            .collect(),
        buffers,
        retie: retie.map(|(e, h)| Retie {
            embedding: position[e],
            head: position[h],
        }),
    };
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
        finish,
    ))
}
