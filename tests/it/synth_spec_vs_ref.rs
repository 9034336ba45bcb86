//! The shipped specs, resolved by the spec engine, against the independent vLLM reference
//! (tests/common/vllm_ref.rs): every rank's bytes of every tensor of every tiny preset for
//! several topologies (values, zero padding included), and per-rank byte totals at real scale.

use crate::common;

use common::vllm_ref::{expected, local_shape, materialize, rank_bytes};
use safeshard::checkpoint::TensorInfo;
use safeshard::sharding::{self, Config, Layout, Piece, Resolved, Shards, Spec};
use safeshard::synth::{self, SynthOptions, TensorSpec};
use safeshard::topology::Topology;

/// A spec layout applied to a full row-major tensor, written here without the planner:
/// each piece is a hyper-rectangle (or zeros), concatenated along `concat_dim`.
fn apply(full: &[u8], es: usize, shape: &[u64], l: &Layout) -> Vec<u8> {
    let d = l.concat_dim;
    let mut pieces: Vec<(Vec<u64>, Vec<u8>)> = Vec::new();
    for p in &l.pieces {
        match p {
            Piece::Slice { ranges } => {
                let pshape: Vec<u64> = ranges.iter().map(|(a, b)| b - a).collect();
                let n: u64 = pshape.iter().product();
                let nd = shape.len();
                let mut out = Vec::with_capacity(n as usize * es);
                if nd == 0 {
                    out.extend_from_slice(full);
                } else {
                    let strides: Vec<u64> =
                        (0..nd).map(|i| shape[i + 1..].iter().product()).collect();
                    let mut idx = vec![0u64; nd];
                    for _ in 0..n {
                        let off: u64 = (0..nd).map(|i| (ranges[i].0 + idx[i]) * strides[i]).sum();
                        let off = off as usize * es;
                        out.extend_from_slice(&full[off..off + es]);
                        for i in (0..nd).rev() {
                            idx[i] += 1;
                            if idx[i] < pshape[i] {
                                break;
                            }
                            idx[i] = 0;
                        }
                    }
                }
                pieces.push((pshape, out));
            }
            Piece::Zeros { extent } => {
                let mut ps = l.shape.clone();
                ps[d] = *extent;
                let n: u64 = ps.iter().product();
                pieces.push((ps, vec![0u8; n as usize * es]));
            }
        }
    }
    if shape.is_empty() {
        return pieces.into_iter().next().map(|p| p.1).unwrap_or_default();
    }
    let outer: u64 = l.shape[..d].iter().product();
    let mut out = Vec::new();
    for o in 0..outer as usize {
        for (ps, data) in &pieces {
            let inner = ps[d..].iter().product::<u64>() as usize * es;
            out.extend_from_slice(&data[o * inner..(o + 1) * inner]);
        }
    }
    out
}

fn infos(list: &[TensorSpec]) -> Vec<TensorInfo> {
    list.iter()
        .map(|(n, d, s)| TensorInfo {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
            file: 0,
            offset: 0,
            bytes: d.byte_size(s.iter().product()).unwrap(),
        })
        .collect()
}

/// (rank, layout) for every rank holding a resolved tensor, in rank order.
fn holders(r: &Resolved, topo: &Topology) -> Vec<(usize, Layout)> {
    let (tp, pp, dp) = (topo.tp, topo.pp, topo.dp);
    let mut v = Vec::new();
    if let Resolved::Held { stages, shards, .. } = r {
        for d in 0..dp {
            for &p in stages {
                for t in 0..tp {
                    let rank = (d * pp + p) * tp + t;
                    match shards {
                        Shards::PerTp(ls) => v.push((rank, ls[t].clone())),
                        Shards::Expert { owner, layout, .. } if d * tp + t == *owner => {
                            v.push((rank, layout.clone()))
                        }
                        Shards::Expert { .. } => {}
                    }
                }
            }
        }
    }
    v.sort_by_key(|x| x.0);
    v
}

fn resolve(o: &SynthOptions, list: &[TensorSpec], topo: &Topology) -> Vec<Resolved> {
    let cfg = Config::from_json(Some(&o.config), &[]).unwrap();
    let sp = Spec::detect(&cfg).unwrap();
    sharding::resolve_tensors(&sp, &infos(list), &cfg, topo)
        .unwrap_or_else(|e| panic!("{topo:?}: {e}"))
        .tensors
}

/// Values: for each tensor and rank, the spec's layout applied to the generator's bytes equals
/// the reference's slice of the same bytes (shape, zero padding and order included): every
/// tiny preset of the registry at tp 1 and tp 2 × pp 2 (and EP 4 over tp 2 × dp 2 for MoE),
/// plus the topologies below.
#[test]
fn shipped_specs_match_the_reference_with_values() {
    let mut cases: Vec<(&str, usize, usize, usize, usize)> = Vec::new();
    for p in common::tiny_presets() {
        cases.push((p, 1, 1, 1, 1));
        cases.push((p, 2, 2, 1, 1));
        let o = SynthOptions::preset(p).unwrap();
        if common::is_moe(&o.config) {
            cases.push((p, 2, 1, 2, 4));
        }
    }
    cases.extend_from_slice(&[
        ("llama-tiny", 1, 1, 1, 1),
        ("llama-tiny", 2, 2, 1, 1),
        ("llama-tiny", 8, 1, 1, 1),
        ("llama-tiny-tied", 4, 2, 2, 1),
        ("mistral-tiny", 8, 2, 1, 1),
        ("qwen2-tiny", 2, 2, 1, 1),
        ("qwen2-tiny", 8, 1, 1, 1),
        ("qwen2-tiny-untied", 4, 1, 1, 1),
        ("phi3-tiny", 2, 1, 1, 1),
        ("phi3-tiny", 8, 2, 1, 1),
        ("mixtral-tiny", 2, 2, 1, 1),
        ("mixtral-tiny", 2, 1, 3, 6),
        ("mixtral-tiny", 8, 1, 1, 8),
        ("qwen2-moe-tiny", 4, 1, 1, 1),
        ("qwen2-moe-tiny", 4, 2, 2, 8),
        ("deepseek-v3-tiny", 2, 1, 1, 1),
        ("deepseek-v3-tiny", 4, 3, 1, 1),
        ("deepseek-v3-tiny", 4, 1, 2, 8),
        ("gpt2-tiny", 2, 2, 1, 1),
        ("gpt2-tiny", 4, 1, 1, 1),
        ("llama-tiny-gptq", 2, 1, 1, 1),
        ("llama-tiny-gptq", 4, 2, 1, 1),
        ("llama-tiny-awq", 2, 1, 1, 1),
        ("llama-tiny-awq", 4, 1, 1, 1),
    ]);
    let mut bad = Vec::new();
    for &(preset, tp, pp, dp, ep) in &cases {
        let o = SynthOptions::preset(preset).unwrap().with_seed(3);
        let list = synth::tensors(&o).unwrap();
        let topo = Topology::new(tp, pp, dp, ep).unwrap();
        let res = resolve(&o, &list, &topo);
        for ((name, dt, shape), r) in list.iter().zip(&res) {
            let want = expected(&o.config, &topo, name, *dt, shape)
                .unwrap_or_else(|e| panic!("{preset} {topo:?}: {e}"));
            let es = (dt.bits() / 8) as usize;
            let full = synth::tensor_data(3, name, shape.iter().product::<u64>() as usize * es);
            let got: Vec<(usize, Vec<u64>, Vec<u8>)> = holders(r, &topo)
                .into_iter()
                .map(|(rank, l)| (rank, l.shape.clone(), apply(&full, es, shape, &l)))
                .collect();
            let want: Vec<(usize, Vec<u64>, Vec<u8>)> = want
                .iter()
                .map(|(rank, s)| {
                    (
                        *rank,
                        local_shape(shape, s),
                        materialize(&full, *dt, shape, s),
                    )
                })
                .collect();
            if got != want {
                let g: Vec<_> = got.iter().map(|x| (x.0, x.1.clone())).collect();
                let w: Vec<_> = want.iter().map(|x| (x.0, x.1.clone())).collect();
                bad.push(format!(
                    "{preset} tp{tp} pp{pp} dp{dp} ep{ep} {name}: spec {g:?}, reference {w:?}"
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

/// Real scale, shapes only: per-rank bytes from the spec's layouts equal the reference's
/// `rank_bytes` for DeepSeek-V3 (tp 8 × pp 8, and EP 8 × pp 4) and Llama-3.1-405B (tp 8 × pp 16).
#[test]
fn real_scale_rank_bytes_match_the_reference() {
    for (preset, tp, pp, dp, ep) in [
        ("deepseek-v3", 8, 8, 1, 1),
        ("deepseek-v3", 8, 4, 1, 8),
        ("llama3.1-405b", 8, 16, 1, 1),
        ("mixtral-8x7b", 4, 2, 2, 8),
    ] {
        let o = SynthOptions::preset(preset).unwrap();
        let list = synth::tensors(&o).unwrap();
        let topo = Topology::new(tp, pp, dp, ep).unwrap();
        let res = resolve(&o, &list, &topo);
        let mut got = vec![0u64; topo.world()];
        for ((_, dt, _), r) in list.iter().zip(&res) {
            for (rank, l) in holders(r, &topo) {
                got[rank] += dt.byte_size(l.elements()).unwrap();
            }
        }
        let want = rank_bytes(&o.config, &topo, &list).unwrap();
        assert_eq!(got, want, "{preset} tp{tp} pp{pp} dp{dp} ep{ep}");
    }
}
