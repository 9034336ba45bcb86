//! The shipped specs against the shared independent vLLM reference (tests/common/vllm_ref.rs,
//! written by another engineer from partition-rules.md): for every preset and many
//! topologies, every global rank must hold exactly the tensors the reference says, with the
//! same bytes (the spec's Layout applied to the generator's values vs. the reference's
//! narrow/cat/zero-pad of the same values). Where the reference refuses a topology (vLLM
//! would fail to load), resolving must fail too.

use crate::common;

use common::vllm_ref;
use safeshard::checkpoint::TensorInfo;
use safeshard::sharding::{resolve_tensors, Config, Layout, Piece, Resolved, Shards, Spec};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;

/// The bytes a Layout selects from a full row-major tensor of `esize`-byte elements.
fn apply(layout: &Layout, shape: &[u64], esize: usize, full: &[u8]) -> Vec<u8> {
    let nd = shape.len();
    let mut strides = vec![1u64; nd];
    for i in (0..nd.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    let local = &layout.shape;
    let d = layout.concat_dim;
    let n: u64 = local.iter().product();
    let mut out = Vec::with_capacity(n as usize * esize);
    for flat in 0..n {
        // Local index -> (piece, source index).
        let mut idx = vec![0u64; nd];
        let mut rem = flat;
        for k in (0..nd).rev() {
            idx[k] = rem % local[k];
            rem /= local[k];
        }
        let mut along = if nd == 0 { 0 } else { idx[d] };
        let mut src = None;
        for p in &layout.pieces {
            let ext = match p {
                Piece::Slice { ranges } => ranges.get(d).map_or(1, |(a, b)| b - a),
                Piece::Zeros { extent } => *extent,
            };
            if along < ext {
                if let Piece::Slice { ranges } = p {
                    let mut s = 0;
                    for k in 0..nd {
                        let i = if k == d { along } else { idx[k] };
                        s += (ranges[k].0 + i) * strides[k];
                    }
                    src = Some(s);
                }
                break;
            }
            along -= ext;
        }
        match src {
            Some(s) => out.extend_from_slice(&full[s as usize * esize..(s as usize + 1) * esize]),
            None => out.extend(std::iter::repeat_n(0u8, esize)),
        }
    }
    out
}

fn check(preset: &str, topos: &[(usize, usize, usize, usize)]) {
    let opts = SynthOptions::preset(preset).unwrap();
    let list = synth::tensors(&opts).unwrap();
    let tensors: Vec<TensorInfo> = list
        .iter()
        .map(|(name, dtype, shape)| TensorInfo {
            name: name.clone(),
            dtype: *dtype,
            shape: shape.clone(),
            file: 0,
            offset: 0,
            bytes: dtype.byte_size(shape.iter().product()).unwrap(),
        })
        .collect();
    let config = Config::from_json(Some(&opts.config), &[]).unwrap();
    let spec = Spec::detect(&config).unwrap();
    let fulls: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| synth::tensor_data(opts.seed, &t.name, t.bytes as usize))
        .collect();
    let mut checked = 0;
    for &(tp, pp, dp, ep) in topos {
        let topo = Topology::new(tp, pp, dp, ep).unwrap();
        let label = format!("{preset} tp={tp} pp={pp} dp={dp} ep={ep}");
        let want: Result<Vec<_>, String> = tensors
            .iter()
            .map(|t| vllm_ref::expected(&opts.config, &topo, &t.name, t.dtype, &t.shape))
            .collect();
        let got = resolve_tensors(&spec, &tensors, &config, &topo);
        let (want, got) = match (want, got) {
            (Ok(w), Ok(g)) => (w, g),
            (Err(_), Err(_)) => continue,
            (Err(w), Ok(_)) => panic!("{label}: the reference refuses ({w}) but the spec resolves"),
            (Ok(_), Err(g)) => panic!("{label}: the spec fails: {g}"),
        };
        assert!(got.warnings.is_empty(), "{label}: {:?}", got.warnings);
        for (i, t) in tensors.iter().enumerate() {
            let mut mine: Vec<(usize, &Layout)> = Vec::new();
            if let Resolved::Held { stages, shards, .. } = &got.tensors[i] {
                for rank in 0..topo.world() {
                    let c = topo.coords(rank);
                    if !stages.contains(&c.pp_rank) {
                        continue;
                    }
                    match shards {
                        Shards::PerTp(ls) => mine.push((rank, &ls[c.tp_rank])),
                        Shards::Expert { owner, layout, .. } => {
                            if *owner == c.ep_rank {
                                mine.push((rank, layout));
                            }
                        }
                    }
                }
            }
            let ranks_mine: Vec<usize> = mine.iter().map(|m| m.0).collect();
            let ranks_ref: Vec<usize> = want[i].iter().map(|m| m.0).collect();
            assert_eq!(ranks_mine, ranks_ref, "{label} {}: holding ranks", t.name);
            let esize = (t.dtype.bits() / 8) as usize;
            for ((rank, l), (_, s)) in mine.iter().zip(&want[i]) {
                assert_eq!(
                    l.shape,
                    vllm_ref::local_shape(&t.shape, s),
                    "{label} {} rank {rank}: shape",
                    t.name
                );
                let a = apply(l, &t.shape, esize, &fulls[i]);
                let b = vllm_ref::materialize(&fulls[i], t.dtype, &t.shape, s);
                assert!(
                    a == b,
                    "{label} {} rank {rank}: bytes differ ({l:?} vs {s:?})",
                    t.name
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "{preset}: nothing compared");
}

const DENSE: &[(usize, usize, usize, usize)] = &[
    (1, 1, 1, 1),
    (2, 1, 1, 1),
    (4, 1, 1, 1),
    (8, 1, 1, 1),
    (2, 2, 1, 1),
    (4, 3, 1, 1),
    (2, 4, 2, 1),
    (3, 1, 1, 1),
    (16, 1, 1, 1),
];

const MOE: &[(usize, usize, usize, usize)] = &[
    (1, 1, 1, 1),
    (2, 1, 1, 1),
    (4, 2, 1, 1),
    (2, 1, 1, 2),
    (4, 1, 1, 4),
    (2, 2, 2, 4),
    (2, 1, 3, 6),
    (4, 1, 2, 8),
    (2, 1, 5, 10),
];

/// Every tiny preset of the registry under the dense topologies, and the expert-parallel
/// ones for MoE architectures; unquantized dense ones also with their tie flipped (where the
/// architecture allows it; DeepSeek is never tied in vLLM).
#[test]
fn every_shipped_architecture() {
    let mut checked = std::collections::BTreeSet::new();
    for base in crate::common::tiny_presets() {
        let cfg = SynthOptions::preset(base).unwrap().config;
        let moe = crate::common::is_moe(&cfg);
        let flip = match cfg.get("tie_word_embeddings").and_then(|t| t.as_bool()) {
            _ if moe || cfg.get("quantization_config").is_some() => None,
            Some(true) => Some("-untied"),
            _ => Some("-tied"),
        };
        for suffix in [Some(""), flip].into_iter().flatten() {
            let preset = format!("{base}{suffix}");
            let Ok(opts) = SynthOptions::preset(&preset) else {
                continue;
            };
            check(&preset, if moe { MOE } else { DENSE });
            checked.insert(opts.arch);
        }
    }
    // Every shipped spec with a synthetic layout was checked.
    for s in safeshard::sharding::registry::all() {
        assert!(
            s.synth.is_none() || checked.contains(s.name),
            "{} not checked",
            s.name
        );
    }
}
