//! The fuse and stack passes: checkpoint parts concatenated into one vLLM parameter
//! (`q/k/v_proj` → `qkv_proj`), and FusedMoE experts fused per expert the same way and
//! stacked on a new leading dimension in expert-id order.

use std::collections::BTreeMap;

use super::relocate::{row_major_strides, Placement};
use super::{Draft, OutTensor, Output};
use crate::vllm::map::FuseRule;
use crate::{Error, Result};

/// A part's role: which plan tensor, and where among the group's parts.
struct Member {
    /// Index of the plan tensor.
    tensor: usize,
    /// (expert id, part index); the expert is 0 for a fuse.
    slot: (u64, usize),
}

/// A group of parts that become one vLLM tensor.
struct Group<'a> {
    rule: &'a FuseRule,
    /// Concatenation dimension.
    dim: usize,
    members: Vec<Member>,
}

/// The fuse pass: every complete set of a `fuse` rule's parts the rank holds (a rule marked
/// `if_complete` leaves an incomplete set's parts alone; any other incomplete set is an
/// error).
pub(super) fn fuse(d: &Draft<'_>) -> Result<Vec<Output>> {
    let groups = find(d, &d.map.fuse, &[], false)?;
    build(d, groups, false)
}

/// The stack pass: FusedMoE experts of the `experts` rules, among the tensors no fuse rule
/// names (fuse rules come first, even where `if_complete` left the parts alone).
pub(super) fn stack(d: &Draft<'_>) -> Result<Vec<Output>> {
    let groups = find(d, &d.map.experts, &d.map.fuse, true)?;
    build(d, groups, true)
}

/// The groups `rules` form among the ungrouped plan tensors that no rule of `before` names,
/// by output name.
fn find<'a>(
    d: &Draft<'_>,
    rules: &'a [FuseRule],
    before: &[FuseRule],
    stack: bool,
) -> Result<BTreeMap<String, Group<'a>>> {
    let mut groups: BTreeMap<String, Group<'a>> = BTreeMap::new();
    for (i, n) in d.names.iter().enumerate() {
        let named_before = || {
            before
                .iter()
                .any(|r| r.parts.iter().any(|p| p.matches(n).is_some()))
        };
        if d.grouped[i] || named_before() {
            continue;
        }
        let Some((j, rule, caps)) = rules.iter().find_map(|rule| {
            rule.parts
                .iter()
                .enumerate()
                .find_map(|(j, part)| part.matches(n).map(|caps| (j, rule, caps)))
        }) else {
            continue;
        };
        let Some(dim) = rule.dim(&caps) else {
            return Err(Error::Unsupported {
                what: format!("tensor {n:?}"),
                why: format!(
                    "{} fuses it into {} but names no dimension for this suffix",
                    d.map.origin,
                    rule.into.as_str()
                ),
            });
        };
        let into = rule
            .into
            .render(&caps)
            .ok_or_else(|| d.err(n, "cannot name its fused tensor".into()))?;
        let expert = if stack {
            let e = caps.iter().find(|(c, _)| c == "E").map(|(_, v)| v.as_str());
            e.and_then(|e| e.parse::<u64>().ok())
                .ok_or_else(|| d.err(n, "the expert id is not a number".into()))?
        } else {
            0
        };
        groups
            .entry(into)
            .or_insert(Group {
                rule,
                dim,
                members: Vec::new(),
            })
            .members
            .push(Member {
                tensor: i,
                slot: (expert, j),
            });
    }
    // A rule marked `if_complete` leaves an incomplete group's parts unfused.
    groups.retain(|_, g| {
        let n = g.rule.parts.len();
        let complete =
            g.members.len() % n == 0 && (0..n).all(|j| g.members.iter().any(|m| m.slot.1 == j));
        !g.rule.if_complete || complete
    });
    Ok(groups)
}

/// One output per group: parts of one expert concatenate along the group's dim, experts
/// stack on a new dim 0.
fn build(d: &Draft<'_>, groups: BTreeMap<String, Group<'_>>, stack: bool) -> Result<Vec<Output>> {
    let mut out = Vec::with_capacity(groups.len());
    for (into, mut g) in groups {
        g.members.sort_by_key(|m| m.slot);
        out.push(build_one(d, into, &g, stack)?);
    }
    Ok(out)
}

fn build_one(d: &Draft<'_>, into: String, g: &Group<'_>, stack: bool) -> Result<Output> {
    let (rule, dim, members) = (g.rule, g.dim, &g.members);
    let tensors = &d.rp.tensors;
    let nparts = rule.parts.len();
    let first = members.first().map(|m| m.tensor).unwrap_or(0);
    let t0 = &tensors[first];
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
            return Err(d.err(
                &into,
                format!(
                    "{}: parts {} are missing{} (the rank holds only some of the parts vLLM fuses)",
                    d.map.origin,
                    missing.join(", "),
                    if stack {
                        format!(" for expert {e}")
                    } else {
                        String::new()
                    }
                ),
            ));
        }
    }
    // Parts of one expert concatenate along `dim`; all experts must agree.
    let part_shapes: Vec<&[u64]> = members
        .iter()
        .take(nparts)
        .map(|m| tensors[m.tensor].shape.as_slice())
        .collect();
    let ndim = t0.shape.len();
    if dim >= ndim {
        return Err(d.err(
            &into,
            format!("{}: fuses on dim {dim} of {}-D parts", d.map.origin, ndim),
        ));
    }
    let mut fused = t0.shape.clone();
    fused[dim] = part_shapes
        .iter()
        .map(|s| s.get(dim).copied().unwrap_or(0))
        .sum();
    for m in members {
        let t = &tensors[m.tensor];
        let want = part_shapes[m.slot.1];
        if t.dtype != t0.dtype || t.shape.as_slice() != want {
            return Err(d.err(
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
            .all(|(k, (a, b))| k == dim || a == b);
        if !same_elsewhere {
            return Err(d.err(
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
        .ok_or_else(|| d.err(&into, "size overflows".into()))?;
    let mut offset_along = vec![0u64; nparts];
    for j in 1..nparts {
        offset_along[j] = offset_along[j - 1] + part_shapes[j - 1][dim];
    }
    let parts = members
        .iter()
        .map(|m| {
            let e_idx = experts.iter().position(|&e| e == m.slot.0).unwrap_or(0) as u64;
            let base =
                e_idx * per_expert_elems * elem + offset_along[m.slot.1] * fused_strides[dim];
            let placement = Placement {
                out: 0,
                base,
                shape: tensors[m.tensor].shape.clone(),
                strides: fused_strides.clone(),
                elem,
            };
            (m.tensor, placement)
        })
        .collect();
    Ok(Output {
        tensor: OutTensor {
            name: into,
            dtype: t0.dtype,
            shape,
            bytes,
            source: Some(t0.source),
            kind: t0.kind,
            replicated: members.iter().all(|m| tensors[m.tensor].replicated),
            order: members.iter().map(|m| m.tensor).min().unwrap_or(0),
            single: None,
            buffer: None,
        },
        parts,
    })
}
