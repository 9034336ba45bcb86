//! Hand-computed checks of the independent vLLM reference in tests/common/vllm_ref.rs, so that
//! other tests can trust it.

use crate::common;

use common::vllm_ref::{expected, local_shape, materialize, pp_counts, rank_bytes, Part, RefSlice};
use safeshard::checkpoint::Dtype;
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;

fn topo(tp: usize, pp: usize, dp: usize, ep: usize) -> Topology {
    Topology::new(tp, pp, dp, ep).unwrap()
}

fn take(start: u64, len: u64) -> Part {
    Part::Take { start, len }
}

fn cat0(parts: Vec<Part>) -> RefSlice {
    RefSlice::Cat { dim: 0, parts }
}

fn exp(preset: &str, t: &Topology, name: &str) -> Vec<(usize, RefSlice)> {
    let o = SynthOptions::preset(preset).unwrap();
    let (_, d, s) = synth::tensors(&o)
        .unwrap()
        .into_iter()
        .find(|x| x.0 == name)
        .unwrap_or_else(|| panic!("{preset} has no {name}"));
    expected(&o.config, t, name, d, &s).unwrap()
}

#[test]
fn vllm_pp_partition() {
    assert_eq!(pp_counts(61, 4, None).unwrap(), vec![15, 15, 16, 15]);
    assert_eq!(pp_counts(32, 3, None).unwrap(), vec![11, 11, 10]);
    assert_eq!(pp_counts(8, 2, None).unwrap(), vec![4, 4]);
    assert_eq!(
        pp_counts(61, 8, None).unwrap(),
        vec![7, 7, 8, 8, 8, 8, 8, 7]
    );
    assert_eq!(pp_counts(3, 2, None).unwrap(), vec![2, 1]);
    assert_eq!(pp_counts(4, 2, Some(&[1, 3])).unwrap(), vec![1, 3]);
    assert!(pp_counts(4, 5, None).is_err());
}

#[test]
fn llama_column_row_and_gqa() {
    // llama-tiny: hidden 128, 8 heads × 16, 2 kv heads, intermediate 352.
    let t = topo(2, 1, 1, 1);
    let q = exp("llama-tiny", &t, "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(
        q,
        vec![(0, cat0(vec![take(0, 64)])), (1, cat0(vec![take(64, 64)]))]
    );
    let o = exp("llama-tiny", &t, "model.layers.0.self_attn.o_proj.weight");
    assert_eq!(
        o[1].1,
        RefSlice::Cat {
            dim: 1,
            parts: vec![take(64, 64)]
        }
    );
    let down = exp("llama-tiny", &t, "model.layers.3.mlp.down_proj.weight");
    assert_eq!(
        down[0].1,
        RefSlice::Cat {
            dim: 1,
            parts: vec![take(0, 176)]
        }
    );
    // tp = 2 = nkv: one head each.
    let k = exp("llama-tiny", &t, "model.layers.0.self_attn.k_proj.weight");
    assert_eq!(k[1].1, cat0(vec![take(16, 16)]));
    // tp = 8 > nkv = 2: rank r holds kv head r / 4.
    let t8 = topo(8, 1, 1, 1);
    let v = exp("llama-tiny", &t8, "model.layers.1.self_attn.v_proj.weight");
    let heads: Vec<u64> = v
        .iter()
        .map(|(_, s)| match s {
            RefSlice::Cat { parts, .. } => match parts[0] {
                Part::Take { start, len } => {
                    assert_eq!(len, 16);
                    start / 16
                }
                _ => panic!(),
            },
            _ => panic!(),
        })
        .collect();
    assert_eq!(heads, vec![0, 0, 0, 0, 1, 1, 1, 1]);
    // Norms replicate; rotary buffers are not loaded.
    let n = exp("llama-tiny", &t, "model.layers.0.input_layernorm.weight");
    assert_eq!(n, vec![(0, RefSlice::Full), (1, RefSlice::Full)]);
    assert!(exp(
        "llama-tiny",
        &t,
        "model.layers.0.self_attn.rotary_emb.inv_freq"
    )
    .is_empty());
}

/// Vocab 100 padded to 128 over tp = 2: rank 1 holds rows 64..100 and 28 zero rows.
#[test]
fn vocab_padding_values() {
    let cfg = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 2, "num_attention_heads": 2,
        "num_hidden_layers": 1, "vocab_size": 100, "tie_word_embeddings": false});
    let t = topo(2, 1, 1, 1);
    let shape = [100u64, 2];
    let e = expected(&cfg, &t, "lm_head.weight", Dtype::U8, &shape).unwrap();
    assert_eq!(e[0].1, cat0(vec![take(0, 64)]));
    assert_eq!(e[1].1, cat0(vec![take(64, 36), Part::Zeros(28)]));
    let full: Vec<u8> = (0..200).map(|i| i as u8).collect();
    let r1 = materialize(&full, Dtype::U8, &shape, &e[1].1);
    assert_eq!(local_shape(&shape, &e[1].1), vec![64, 2]);
    let mut want: Vec<u8> = (128..200).map(|i| i as u8).collect();
    want.extend(std::iter::repeat_n(0u8, 56));
    assert_eq!(r1, want);
    // gpt2-tiny: vocab 1000 → 1024, tp 2: rank 1 rows 512..1000 and 24 zero rows.
    let w = exp("gpt2-tiny", &t, "wte.weight");
    assert_eq!(w[1].1, cat0(vec![take(512, 488), Part::Zeros(24)]));
}

#[test]
fn materialize_inner_dim_and_multibyte() {
    // [2, 4] F16 (2 bytes per element): columns 1..3 of each row.
    let full: Vec<u8> = (0..16).collect();
    let s = RefSlice::Cat {
        dim: 1,
        parts: vec![take(1, 2)],
    };
    assert_eq!(
        materialize(&full, Dtype::F16, &[2, 4], &s),
        vec![2, 3, 4, 5, 10, 11, 12, 13]
    );
    let s = RefSlice::Cat {
        dim: 1,
        parts: vec![take(3, 1), Part::Zeros(1), take(0, 1)],
    };
    assert_eq!(
        materialize(&full, Dtype::F16, &[2, 4], &s),
        vec![6, 7, 0, 0, 0, 1, 14, 15, 0, 0, 8, 9]
    );
}

#[test]
fn phi3_fused_parts_and_qwen2_biases() {
    // phi3-tiny: 8 heads × 16, 4 kv heads; qkv rows 128 + 64 + 64; intermediate 256.
    let t = topo(2, 1, 1, 1);
    let qkv = exp("phi3-tiny", &t, "model.layers.0.self_attn.qkv_proj.weight");
    assert_eq!(
        qkv[1].1,
        cat0(vec![take(64, 64), take(160, 32), take(224, 32)])
    );
    let t8 = topo(8, 1, 1, 1);
    let qkv = exp("phi3-tiny", &t8, "model.layers.0.self_attn.qkv_proj.weight");
    // Rank 5: q rows 80..96, kv head 5 / 2 = 2.
    assert_eq!(
        qkv[5].1,
        cat0(vec![take(80, 16), take(128 + 32, 16), take(192 + 32, 16)])
    );
    let gu = exp("phi3-tiny", &t, "model.layers.2.mlp.gate_up_proj.weight");
    assert_eq!(gu[1].1, cat0(vec![take(128, 128), take(384, 128)]));
    // qwen2-tiny: 2 kv heads of 16; bias follows the weight's rows.
    let t4 = topo(4, 1, 1, 1);
    let b = exp("qwen2-tiny", &t4, "model.layers.0.self_attn.k_proj.bias");
    assert_eq!(b[3].1, cat0(vec![take(16, 16)]));
    let b = exp("qwen2-tiny", &t4, "model.layers.0.self_attn.q_proj.bias");
    assert_eq!(b[3].1, cat0(vec![take(96, 32)]));
}

#[test]
fn pipeline_placement_and_dp() {
    // llama-tiny, 4 layers, pp 2, tp 2, dp 2: ranks (dp, pp, tp) = (d*2 + p)*2 + t.
    let t = topo(2, 2, 2, 1);
    let ranks = |v: Vec<(usize, RefSlice)>| v.into_iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(
        ranks(exp("llama-tiny", &t, "model.embed_tokens.weight")),
        vec![0, 1, 4, 5]
    );
    assert_eq!(
        ranks(exp("llama-tiny", &t, "lm_head.weight")),
        vec![2, 3, 6, 7]
    );
    assert_eq!(
        ranks(exp("llama-tiny", &t, "model.norm.weight")),
        vec![2, 3, 6, 7]
    );
    assert_eq!(
        ranks(exp("llama-tiny", &t, "model.layers.1.mlp.up_proj.weight")),
        vec![0, 1, 4, 5]
    );
    assert_eq!(
        ranks(exp("llama-tiny", &t, "model.layers.2.mlp.up_proj.weight")),
        vec![2, 3, 6, 7]
    );
    let e = exp("llama-tiny", &t, "model.layers.2.mlp.up_proj.weight");
    assert_eq!(e[0].1, e[2].1, "dp replica 1 holds what replica 0 holds");
    // Tied (qwen2-tiny): the last stage also holds embed_tokens.
    let t = topo(1, 2, 1, 1);
    assert_eq!(
        ranks(exp("qwen2-tiny", &t, "model.embed_tokens.weight")),
        vec![0, 1]
    );
    // GPT-2 (vLLM 0.33 builds wte, wpe, ln_f on every stage): everything but the layers on
    // both stages.
    assert_eq!(ranks(exp("gpt2-tiny", &t, "wte.weight")), vec![0, 1]);
    assert_eq!(ranks(exp("gpt2-tiny", &t, "wpe.weight")), vec![0, 1]);
    assert_eq!(ranks(exp("gpt2-tiny", &t, "ln_f.bias")), vec![0, 1]);
    assert_eq!(ranks(exp("gpt2-tiny", &t, "h.1.ln_1.bias")), vec![1]);
    // Mixtral too: the final norm on the first stage, the embedding on the last.
    assert_eq!(
        ranks(exp("mixtral-tiny", &t, "model.norm.weight")),
        vec![0, 1]
    );
    assert_eq!(
        ranks(exp("mixtral-tiny", &t, "model.embed_tokens.weight")),
        vec![0, 1]
    );
    // A tied config with an lm_head tensor on disk: vLLM 0.33 unties and loads it on the
    // last stage, and the embedding stays on the first.
    let o = SynthOptions::preset("qwen2-tiny").unwrap();
    let mut cfg = o.config.clone();
    cfg["_checkpoint_has_lm_head"] = serde_json::Value::Bool(true);
    let holders = |name: &str, shape: &[u64]| -> Vec<usize> {
        expected(&cfg, &t, name, Dtype::BF16, shape)
            .unwrap()
            .into_iter()
            .map(|(r, _)| r)
            .collect()
    };
    assert_eq!(holders("lm_head.weight", &[1500, 128]), vec![1]);
    assert_eq!(holders("model.embed_tokens.weight", &[1500, 128]), vec![0]);
    // mistral-tiny: 3 layers over 2 stages → [2, 1].
    assert_eq!(
        ranks(exp("mistral-tiny", &t, "model.layers.1.mlp.up_proj.weight")),
        vec![0]
    );
    assert_eq!(
        ranks(exp("mistral-tiny", &t, "model.layers.2.mlp.up_proj.weight")),
        vec![1]
    );
}

#[test]
fn experts_tp_and_ep() {
    // mixtral-tiny: 8 experts, intermediate 256.
    let t = topo(2, 1, 1, 1);
    let w1 = exp(
        "mixtral-tiny",
        &t,
        "model.layers.0.block_sparse_moe.experts.5.w1.weight",
    );
    assert_eq!(w1[1].1, cat0(vec![take(128, 128)]));
    let w2 = exp(
        "mixtral-tiny",
        &t,
        "model.layers.0.block_sparse_moe.experts.5.w2.weight",
    );
    assert_eq!(
        w2[1].1,
        RefSlice::Cat {
            dim: 1,
            parts: vec![take(128, 128)]
        }
    );
    // EP over tp 2 × dp 3 = 6 ranks: 8 experts → blocks of 2, 2, 1, 1, 1, 1.
    let t = topo(2, 1, 3, 6);
    let owner = |e: u64| {
        exp(
            "mixtral-tiny",
            &t,
            &format!("model.layers.1.block_sparse_moe.experts.{e}.w3.weight"),
        )
    };
    let owners: Vec<Vec<(usize, RefSlice)>> = (0..8).map(owner).collect();
    let ranks: Vec<usize> = owners
        .iter()
        .map(|o| {
            assert_eq!(o.len(), 1);
            assert_eq!(o[0].1, RefSlice::Full);
            o[0].0
        })
        .collect();
    // ep_rank = dp*2 + tp and global rank = dp*2 + tp here (pp 1), so they coincide.
    assert_eq!(ranks, vec![0, 0, 1, 1, 2, 3, 4, 5]);
    // The router and attention are still per TP rank and the same on every DP replica.
    let g = exp(
        "mixtral-tiny",
        &t,
        "model.layers.1.block_sparse_moe.gate.weight",
    );
    assert_eq!(g.len(), 6);
    // qwen2-moe-tiny: 12 experts over ep 8 → 2,2,2,2,1,1,1,1; shared expert merged/row.
    let t = topo(4, 1, 2, 8);
    let r = |e: u64| {
        exp(
            "qwen2-moe-tiny",
            &t,
            &format!("model.layers.0.mlp.experts.{e}.down_proj.weight"),
        )[0]
        .0
    };
    assert_eq!(
        (0..12).map(r).collect::<Vec<_>>(),
        vec![0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7]
    );
    let t = topo(4, 1, 1, 1);
    let s = exp(
        "qwen2-moe-tiny",
        &t,
        "model.layers.0.mlp.shared_expert.down_proj.weight",
    );
    assert_eq!(
        s[2].1,
        RefSlice::Cat {
            dim: 1,
            parts: vec![take(128, 64)]
        }
    );
    let sg = exp(
        "qwen2-moe-tiny",
        &t,
        "model.layers.0.mlp.shared_expert_gate.weight",
    );
    assert!(sg.iter().all(|x| x.1 == RefSlice::Full) && sg.len() == 4);
}

#[test]
fn deepseek_mla_fp8_blocks_and_mtp() {
    // Real shapes: q_b_proj [24576, 1536] with scales [192, 12]; tp 8 rank 3.
    let t = topo(8, 1, 1, 1);
    let p = "model.layers.5.self_attn";
    let w = exp("deepseek-v3", &t, &format!("{p}.q_b_proj.weight"));
    assert_eq!(w[3].1, cat0(vec![take(3 * 3072, 3072)]));
    let s = exp("deepseek-v3", &t, &format!("{p}.q_b_proj.weight_scale_inv"));
    assert_eq!(s[3].1, cat0(vec![take(72, 24)]));
    // o_proj [7168, 16384] row: columns 2048 each, scales [56, 128] → 16 columns each.
    let s = exp("deepseek-v3", &t, &format!("{p}.o_proj.weight_scale_inv"));
    assert_eq!(
        s[7].1,
        RefSlice::Cat {
            dim: 1,
            parts: vec![take(112, 16)]
        }
    );
    for n in [
        "q_a_proj.weight",
        "kv_a_proj_with_mqa.weight_scale_inv",
        "kv_a_layernorm.weight",
    ] {
        assert!(exp("deepseek-v3", &t, &format!("{p}.{n}"))
            .iter()
            .all(|x| x.1 == RefSlice::Full));
    }
    let b = exp(
        "deepseek-v3",
        &t,
        "model.layers.5.mlp.gate.e_score_correction_bias",
    );
    assert_eq!(b.len(), 8);
    // Experts under TP: down [7168, 2048] row → 256 columns, scale [56, 16] → 2 columns.
    let s = exp(
        "deepseek-v3",
        &t,
        "model.layers.9.mlp.experts.17.down_proj.weight_scale_inv",
    );
    assert_eq!(
        s[4].1,
        RefSlice::Cat {
            dim: 1,
            parts: vec![take(8, 2)]
        }
    );
    // Layer 61 (MTP) is not loaded by the main model.
    assert!(exp("deepseek-v3", &t, "model.layers.61.eh_proj.weight").is_empty());
    assert!(exp(
        "deepseek-v3",
        &t,
        "model.layers.61.mlp.experts.0.up_proj.weight"
    )
    .is_empty());
    // EP 8 (tp 8): 256 experts → 32 per rank; expert 100 on rank 3.
    let t = topo(8, 1, 1, 8);
    let o = exp(
        "deepseek-v3",
        &t,
        "model.layers.9.mlp.experts.100.up_proj.weight_scale_inv",
    );
    assert_eq!(o, vec![(3, RefSlice::Full)]);
    // Pipeline over 61 layers, pp 4 → [15, 15, 16, 15]: layer 45 is the last of stage 2.
    let t = topo(1, 4, 1, 1);
    assert_eq!(
        exp("deepseek-v3", &t, "model.layers.45.input_layernorm.weight")[0].0,
        2
    );
    assert_eq!(
        exp("deepseek-v3", &t, "model.layers.46.input_layernorm.weight")[0].0,
        3
    );
    // A partition that is not whole 128-blocks is refused, as vLLM does (tiny o_proj at tp 8).
    let o = SynthOptions::preset("deepseek-v3-tiny").unwrap();
    let n = "model.layers.1.self_attn.o_proj.weight";
    assert!(expected(&o.config, &topo(8, 1, 1, 1), n, Dtype::F8_E4M3, &[256, 512]).is_err());
}

#[test]
fn gpt2_conv1d_rules() {
    // gpt2-tiny: n_embd 64, tp 2.
    let t = topo(2, 1, 1, 1);
    let w = exp("gpt2-tiny", &t, "h.0.attn.c_attn.weight");
    assert_eq!(
        w[1].1,
        RefSlice::Cat {
            dim: 1,
            parts: vec![take(32, 32), take(96, 32), take(160, 32)]
        }
    );
    let b = exp("gpt2-tiny", &t, "h.0.attn.c_attn.bias");
    assert_eq!(b[0].1, cat0(vec![take(0, 32), take(64, 32), take(128, 32)]));
    assert_eq!(
        exp("gpt2-tiny", &t, "h.1.attn.c_proj.weight")[1].1,
        cat0(vec![take(32, 32)])
    );
    assert_eq!(
        exp("gpt2-tiny", &t, "h.1.mlp.c_proj.weight")[1].1,
        cat0(vec![take(128, 128)])
    );
    assert_eq!(
        exp("gpt2-tiny", &t, "h.1.mlp.c_fc.weight")[1].1,
        RefSlice::Cat {
            dim: 1,
            parts: vec![take(128, 128)]
        }
    );
    assert_eq!(
        exp("gpt2-tiny", &t, "h.1.mlp.c_fc.bias")[1].1,
        cat0(vec![take(128, 128)])
    );
    assert!(exp("gpt2-tiny", &t, "h.1.mlp.c_proj.bias")
        .iter()
        .all(|x| x.1 == RefSlice::Full));
    assert!(exp("gpt2-tiny", &t, "h.1.attn.bias").is_empty());
    // distilgpt2 style: the `transformer.` prefix is accepted.
    assert_eq!(
        exp("distilgpt2", &t, "transformer.h.0.attn.c_proj.weight")[1].1,
        cat0(vec![take(384, 384)])
    );
}

/// Per-rank totals for llama-tiny computed by hand from the shapes.
#[test]
fn rank_bytes_by_hand() {
    let o = SynthOptions::preset("llama-tiny").unwrap();
    let list = synth::tensors(&o).unwrap();
    // tp 1: everything but the rotary buffers, plus 24 zero rows in embed and lm_head.
    let all: u64 = list
        .iter()
        .filter(|t| !t.0.ends_with("inv_freq"))
        .map(|(_, d, s)| d.byte_size(s.iter().product()).unwrap())
        .sum();
    let b = rank_bytes(&o.config, &topo(1, 1, 1, 1), &list).unwrap();
    assert_eq!(b, vec![all + 2 * 24 * 128 * 2]);
    // tp 2, BF16: per layer q 64×128 + k,v 16×128 + o 128×64 + gate/up 176×128 + down 128×176
    // + 2 norms of 128; embed/lm_head 512×128 each; final norm 128.
    let layer = 64 * 128 + 2 * 16 * 128 + 128 * 64 + 2 * 176 * 128 + 128 * 176 + 2 * 128;
    let per_rank = 2 * (4 * layer + 2 * 512 * 128 + 128);
    let b = rank_bytes(&o.config, &topo(2, 1, 1, 1), &list).unwrap();
    assert_eq!(b, vec![per_rank as u64; 2]);
}

/// Self-consistency on whole tiny checkpoints: within one (dp, pp) group the TP ranks' pieces
/// cover every index of the split dimension, each exactly once unless kv heads are replicated
/// (tp > nkv); replicated tensors are held whole by every TP rank of their stage.
#[test]
fn tp_pieces_cover_every_tensor() {
    let cases: &[(&str, &[usize])] = &[
        ("llama-tiny", &[1, 2, 4, 8]),
        ("mistral-tiny", &[2, 4, 8]),
        ("qwen2-tiny", &[2, 8]),
        ("phi3-tiny", &[2, 4, 8]),
        ("mixtral-tiny", &[2, 8]),
        ("qwen2-moe-tiny", &[2, 4]),
        ("deepseek-v3-tiny", &[2, 4]),
        ("gpt2-tiny", &[2, 4]),
        ("llama-tiny-gptq", &[2, 4]),
        ("llama-tiny-awq", &[2, 4]),
    ];
    for (preset, tps) in cases {
        let o = SynthOptions::preset(preset).unwrap();
        for &tp in *tps {
            let t = topo(tp, 1, 1, 1);
            for (name, d, shape) in synth::tensors(&o).unwrap() {
                let e = expected(&o.config, &t, &name, d, &shape)
                    .unwrap_or_else(|err| panic!("{preset} tp {tp}: {err}"));
                if e.is_empty() {
                    continue;
                }
                assert_eq!(e.len(), tp, "{preset} tp {tp} {name}: holders");
                if e.iter().all(|x| x.1 == RefSlice::Full) {
                    continue;
                }
                let dim = match &e[0].1 {
                    RefSlice::Cat { dim, .. } => *dim,
                    RefSlice::Full => panic!("{name}: mixed full and split"),
                };
                let mut count = vec![0u32; shape[dim] as usize];
                let mut local = None;
                for (_, s) in &e {
                    let RefSlice::Cat { dim: d2, parts } = s else {
                        panic!()
                    };
                    assert_eq!(*d2, dim);
                    let ls = local_shape(&shape, s);
                    assert!(
                        local.is_none_or(|l| l == ls),
                        "{name}: unequal local shapes"
                    );
                    local = Some(ls);
                    for p in parts {
                        if let Part::Take { start, len } = p {
                            for i in *start..start + len {
                                count[i as usize] += 1;
                            }
                        }
                    }
                }
                let kv =
                    name.contains("k_proj") || name.contains("v_proj") || name.contains("qkv_proj");
                for (i, c) in count.iter().enumerate() {
                    assert!(
                        *c >= 1,
                        "{preset} tp {tp} {name}: index {i} of dim {dim} not held"
                    );
                    assert!(
                        kv || *c == 1,
                        "{preset} tp {tp} {name}: index {i} held {c} times"
                    );
                }
            }
        }
    }
}

/// Values: rank-local bytes built by `expected_with_values` match hand-made slices of the
/// generator's contents for a column split, a row split and a padded vocab.
#[test]
fn expected_values_match_hand_slices() {
    let o = SynthOptions::preset("llama-tiny").unwrap().with_seed(11);
    let t = topo(2, 1, 1, 1);
    let all = common::vllm_ref::expected_with_values(&o, &t).unwrap();
    let get = |rank: usize, name: &str| {
        all.iter()
            .find(|x| x.rank == rank && x.name == name)
            .unwrap_or_else(|| panic!("{rank} {name}"))
    };
    // q_proj [128, 128] BF16, rank 1: rows 64..128 = bytes 64*256.. of the tensor.
    let q = "model.layers.2.self_attn.q_proj.weight";
    let full = synth::tensor_data(11, q, 128 * 128 * 2);
    assert_eq!(get(1, q).bytes, full[64 * 256..]);
    assert_eq!(get(1, q).shape, vec![64, 128]);
    // o_proj [128, 128] row split: rank 0 holds columns 0..64 of each row (128 bytes of 256).
    let on = "model.layers.2.self_attn.o_proj.weight";
    let full = synth::tensor_data(11, on, 128 * 128 * 2);
    let want: Vec<u8> = full.chunks(256).flat_map(|r| r[..128].to_vec()).collect();
    assert_eq!(get(0, on).bytes, want);
    // lm_head [1000, 128]: padded 1024, rank 1 rows 512..1000 then 24 zero rows.
    let full = synth::tensor_data(11, "lm_head.weight", 1000 * 256);
    let mut want = full[512 * 256..].to_vec();
    want.extend(vec![0u8; 24 * 256]);
    assert_eq!(get(1, "lm_head.weight").bytes, want);
    // Tensors on every rank = all minus the 4 rotary buffers, times 2 ranks.
    assert_eq!(all.len(), (43 - 4) * 2);
}

/// DeepSeek-V3 at full scale, tp 8 × pp 8: every rank holds something, the stages follow
/// [7, 7, 8, 8, 8, 8, 8, 7] and the total equals the hand count of replicated and split bytes.
#[test]
fn deepseek_v3_rank_bytes_at_scale() {
    let o = SynthOptions::preset("deepseek-v3").unwrap();
    let list = synth::tensors(&o).unwrap();
    let t = topo(8, 8, 1, 1);
    let b = rank_bytes(&o.config, &t, &list).unwrap();
    assert_eq!(b.len(), 64);
    // Within a stage all TP ranks hold the same amount (every split divides evenly).
    for s in 0..8 {
        let st = &b[s * 8..s * 8 + 8];
        assert!(st.iter().all(|&x| x == st[0]), "stage {s}: {st:?}");
    }
    // Sum over ranks: tensors outside layer 61, split ones counted once, replicated ones 8×.
    let mut want = 0u64;
    for (name, d, s) in &list {
        if name.starts_with("model.layers.61.") {
            continue;
        }
        let bytes = d.byte_size(s.iter().product()).unwrap();
        let replicated = name.contains("layernorm")
            || name.contains("q_a_proj")
            || name.contains("kv_a_proj_with_mqa")
            || name.ends_with("mlp.gate.weight")
            || name.ends_with("e_score_correction_bias")
            || name == "model.norm.weight";
        want += if replicated { 8 * bytes } else { bytes };
    }
    // Vocab 129280 is a multiple of 64 and of 8: no padding.
    assert_eq!(b.iter().sum::<u64>(), want);
}

/// Expert ownership: linear blocks (remainder first) and round robin, checked against an
/// enumeration of the blocks.
#[test]
fn expert_placements() {
    use common::vllm_ref::{expert_owner, Placement};
    for (n, ep) in [(8u64, 6u64), (12, 8), (256, 8), (256, 48), (3, 8), (16, 16)] {
        let (base, rem) = (n / ep, n % ep);
        let mut want = Vec::new();
        for r in 0..ep {
            let k = base + u64::from(r < rem);
            want.extend(std::iter::repeat_n(r, k as usize));
        }
        let got: Vec<u64> = (0..n)
            .map(|e| expert_owner(e, n, ep, Placement::Linear))
            .collect();
        assert_eq!(got, want, "n {n} ep {ep}");
        let rr: Vec<u64> = (0..n)
            .map(|e| expert_owner(e, n, ep, Placement::RoundRobin))
            .collect();
        assert_eq!(rr, (0..n).map(|e| e % ep).collect::<Vec<_>>());
    }
    // Through `expected_placed`: mixtral-tiny, 8 experts over tp 4 × dp 1 round robin.
    let o = SynthOptions::preset("mixtral-tiny").unwrap();
    let t = topo(4, 1, 1, 4);
    let n = "model.layers.0.block_sparse_moe.experts.6.w1.weight";
    let e = common::vllm_ref::expected_placed(
        &o.config,
        &t,
        n,
        Dtype::BF16,
        &[256, 128],
        Placement::RoundRobin,
    )
    .unwrap();
    assert_eq!(e, vec![(2, RefSlice::Full)]);
}

/// GPTQ and AWQ (llama-tiny-gptq/-awq: hidden 128, 8 heads × 16, 2 kv heads, intermediate
/// 256, 4 bits → pack factor 8, group 32), tp 2, by hand.
#[test]
fn gptq_awq_splits() {
    let t = topo(2, 1, 1, 1);
    let d1 = |parts: Vec<Part>| RefSlice::Cat { dim: 1, parts };
    // GPTQ column q_proj: qweight [16, 128] dim 1 → 64 columns; qzeros [4, 16] → 8 packed
    // columns; scales [4, 128] → 64 columns.
    let p = "model.layers.0.self_attn.q_proj";
    let g = "llama-tiny-gptq";
    assert_eq!(
        exp(g, &t, &format!("{p}.qweight"))[1].1,
        d1(vec![take(64, 64)])
    );
    assert_eq!(
        exp(g, &t, &format!("{p}.qzeros"))[1].1,
        d1(vec![take(8, 8)])
    );
    assert_eq!(
        exp(g, &t, &format!("{p}.scales"))[1].1,
        d1(vec![take(64, 64)])
    );
    // vLLM 0.33 loads no GPTQ g_idx.
    assert!(exp(g, &t, &format!("{p}.g_idx")).is_empty());
    // GQA k_proj at tp 2 = nkv: head 1 = columns 16..32, qzeros packed columns 2..4.
    let k = "model.layers.1.self_attn.k_proj";
    assert_eq!(
        exp(g, &t, &format!("{k}.qweight"))[1].1,
        d1(vec![take(16, 16)])
    );
    assert_eq!(
        exp(g, &t, &format!("{k}.qzeros"))[1].1,
        d1(vec![take(2, 2)])
    );
    // GPTQ row down_proj: in 256 → 128 per rank; qweight [32, 128] rows 16..32 (packed),
    // qzeros/scales [8, ..] rows 4..8 (groups).
    let dp = "model.layers.0.mlp.down_proj";
    assert_eq!(
        exp(g, &t, &format!("{dp}.qweight"))[1].1,
        cat0(vec![take(16, 16)])
    );
    assert_eq!(
        exp(g, &t, &format!("{dp}.qzeros"))[1].1,
        cat0(vec![take(4, 4)])
    );
    assert_eq!(
        exp(g, &t, &format!("{dp}.scales"))[1].1,
        cat0(vec![take(4, 4)])
    );
    assert!(exp(g, &t, &format!("{dp}.g_idx")).is_empty());
    // AWQ column up_proj: qweight [128, 32] dim 1 packed → 16 packed columns; scales [4, 256]
    // → 128 columns. AWQ row o_proj: qweight [128, 16] rows 64..128; scales [4, 128] rows 2..4.
    let a = "llama-tiny-awq";
    let up = "model.layers.0.mlp.up_proj";
    assert_eq!(
        exp(a, &t, &format!("{up}.qweight"))[1].1,
        d1(vec![take(16, 16)])
    );
    assert_eq!(
        exp(a, &t, &format!("{up}.qzeros"))[1].1,
        d1(vec![take(16, 16)])
    );
    assert_eq!(
        exp(a, &t, &format!("{up}.scales"))[1].1,
        d1(vec![take(128, 128)])
    );
    let o = "model.layers.0.self_attn.o_proj";
    assert_eq!(
        exp(a, &t, &format!("{o}.qweight"))[1].1,
        cat0(vec![take(64, 64)])
    );
    assert_eq!(
        exp(a, &t, &format!("{o}.scales"))[1].1,
        cat0(vec![take(2, 2)])
    );
    // desc_act GPTQ: row-layer scales and qzeros are copied whole.
    let mut og = SynthOptions::preset(g).unwrap();
    og.config["quantization_config"]["desc_act"] = serde_json::json!(true);
    let e = expected(
        &og.config,
        &t,
        &format!("{dp}.scales"),
        Dtype::F16,
        &[8, 128],
    )
    .unwrap();
    assert!(e.iter().all(|x| x.1 == RefSlice::Full));
    // tp 8: o_proj input 128 / 8 = 16 is not a whole group of 32: refused, as vLLM does.
    let og = SynthOptions::preset(g).unwrap();
    let e = expected(
        &og.config,
        &topo(8, 1, 1, 1),
        &format!("{o}.qzeros"),
        Dtype::I32,
        &[4, 16],
    );
    assert!(e.is_err());
}
