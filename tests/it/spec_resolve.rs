//! Resolution semantics on hand-built catalogs: overlap (first match), unmatched tensors,
//! warnings, conditions, config values, uneven splits, GQA, packed/blocked fused parts,
//! pipeline stages and expert placement. Expected layouts are written out by hand.

use safeshard::checkpoint::{Dtype, TensorInfo};
use safeshard::sharding::{
    resolve_tensors, Config, Layout, Piece, Resolution, Resolved, Shards, Spec,
};
use safeshard::topology::Topology;
use serde_json::json;

fn cat(tensors: &[(&str, &[u64])]) -> Vec<TensorInfo> {
    tensors
        .iter()
        .map(|(n, s)| TensorInfo {
            name: n.to_string(),
            dtype: Dtype::BF16,
            shape: s.to_vec(),
            file: 0,
            offset: 0,
            bytes: 2 * s.iter().product::<u64>(),
        })
        .collect()
}

fn run(
    src: &str,
    tensors: &[(&str, &[u64])],
    cfg: serde_json::Value,
    topo: Topology,
) -> safeshard::Result<Resolution> {
    let spec = Spec::parse(src, "t.shard").unwrap();
    let config = Config::from_json(Some(&cfg), &[]).unwrap();
    resolve_tensors(&spec, &cat(tensors), &config, &topo)
}

fn topo(tp: usize, pp: usize) -> Topology {
    Topology::new(tp, pp, 1, 1).unwrap()
}

fn per_tp(r: &Resolved) -> &[Layout] {
    match r {
        Resolved::Held {
            shards: Shards::PerTp(l),
            ..
        } => l,
        other => panic!("not PerTp: {other:?}"),
    }
}

fn rows(shape: &[u64], dim: usize, ranges: &[(u64, u64)]) -> Layout {
    let mut s = shape.to_vec();
    s[dim] = ranges.iter().map(|(a, b)| b - a).sum();
    Layout {
        shape: s,
        concat_dim: dim,
        pieces: ranges
            .iter()
            .map(|&(a, b)| Piece::Slice {
                ranges: shape
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| if i == dim { (a, b) } else { (0, n) })
                    .collect(),
            })
            .collect(),
    }
}

#[test]
fn first_matching_rule_wins() {
    let src = "a.special.w  replicate\na.*.w  split(dim=0)\n";
    let r = run(
        src,
        &[("a.special.w", &[4, 2]), ("a.other.w", &[4, 2])],
        json!({}),
        topo(2, 1),
    )
    .unwrap();
    assert_eq!(
        per_tp(&r.tensors[0]),
        &[Layout::full(&[4, 2]), Layout::full(&[4, 2])]
    );
    assert_eq!(per_tp(&r.tensors[1])[1], rows(&[4, 2], 0, &[(2, 4)]));
    // Reversed order: the general rule shadows the special one, which then matches nothing.
    let src = "a.*.w  split(dim=0)\na.special.w  replicate\n";
    let r = run(src, &[("a.special.w", &[4, 2])], json!({}), topo(2, 1)).unwrap();
    assert_eq!(per_tp(&r.tensors[0])[0], rows(&[4, 2], 0, &[(0, 2)]));
    assert_eq!(
        r.warnings,
        ["t.shard:2: rule `a.special.w` matches no tensor"]
    );
}

#[test]
fn unmatched_tensors_are_listed_unless_a_default_rule_exists() {
    let src = "a.w  replicate\n";
    let e = run(
        src,
        &[("a.w", &[2]), ("b.x", &[2]), ("c.y.z", &[2])],
        json!({}),
        topo(1, 1),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("2 tensor(s) match no rule"), "{msg}");
    assert!(msg.contains(r#""b.x", "c.y.z""#), "{msg}");
    assert!(!e.is_usage());
    let src = "a.w  replicate\n**  skip(\"not needed\")\n";
    let r = run(src, &[("a.w", &[2]), ("b.x", &[2])], json!({}), topo(1, 1)).unwrap();
    assert!(matches!(&r.tensors[1], Resolved::Skip { reason } if reason.starts_with("not needed")));
}

#[test]
fn optional_and_switched_off_rules_do_not_warn() {
    // A wildcard rule that matches nothing only warns (a literal one is a missing tensor).
    let src = "a.w  replicate\nb.w  replicate optional\nc.w  replicate if (quantization_config.quant_method ?? \"\") == \"gptq\"\nd.*  replicate\n";
    let r = run(src, &[("a.w", &[2])], json!({}), topo(1, 1)).unwrap();
    assert_eq!(r.warnings, ["t.shard:4: rule `d.*` matches no tensor"]);
    // Switched on, the conditional rule wins over a later one.
    let src = "a.w  split(dim=0) if quant_method == \"gptq\"\na.w  replicate\n";
    let r = run(
        src,
        &[("a.w", &[4])],
        json!({"quant_method": "gptq"}),
        topo(2, 1),
    )
    .unwrap();
    assert_eq!(per_tp(&r.tensors[0])[1], rows(&[4], 0, &[(2, 4)]));
    let r = run(
        src,
        &[("a.w", &[4])],
        json!({"quant_method": "awq"}),
        topo(2, 1),
    )
    .unwrap();
    assert!(per_tp(&r.tensors[0])
        .iter()
        .all(|l| *l == Layout::full(&[4])));
}

#[test]
fn missing_config_values_are_named_with_a_suggestion() {
    let src = "let nkv = num_key_value_heads\nk.w  heads(dim=0, count=nkv)\n";
    let e = run(
        src,
        &[("k.w", &[8, 4])],
        json!({"num_key_value_head": 2}),
        topo(2, 1),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("needs `num_key_value_heads`"), "{msg}");
    // The location is the `let` that reads it (line 1, column of the name).
    assert!(msg.starts_with("config: t.shard:1:11: "), "{msg}");
    assert!(msg.contains("did you mean `num_key_value_head`?"), "{msg}");
    assert!(msg.contains("`set` option: num_key_value_heads="), "{msg}");
    assert!(
        !msg.contains("--"),
        "library messages name options, not flags: {msg}"
    );
    // Defaults: `??` falls back; a let may default the config value of the same name.
    let src = "let head_dim = head_dim ?? hidden_size / num_attention_heads\nq.w  fused(dim=0, parts=[head_dim, head_dim])\n";
    let r = run(
        src,
        &[("q.w", &[8, 4])],
        json!({"hidden_size": 16, "num_attention_heads": 4}),
        topo(2, 1),
    )
    .unwrap();
    assert_eq!(
        per_tp(&r.tensors[0])[1],
        rows(&[8, 4], 0, &[(2, 4), (6, 8)])
    );
    let r = run(
        src,
        &[("q.w", &[6, 4])],
        json!({"head_dim": 3, "hidden_size": 16, "num_attention_heads": 4}),
        topo(1, 1),
    );
    assert!(r.is_ok());
}

#[test]
fn splits_must_divide_unless_uneven() {
    let e = run(
        "w  split(dim=1)\n",
        &[("w", &[2, 10])],
        json!({}),
        topo(4, 1),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("tensor \"w\" [2, 10]")
            && e.contains("dim 1 (size 10) does not divide by tp = 4"),
        "{e}"
    );
    // torch.chunk-like: 3, 3, 3, 1.
    let r = run(
        "w  split(dim=1, uneven)\n",
        &[("w", &[2, 10])],
        json!({}),
        topo(4, 1),
    )
    .unwrap();
    let got: Vec<u64> = per_tp(&r.tensors[0]).iter().map(|l| l.shape[1]).collect();
    assert_eq!(got, [3, 3, 3, 1]);
    assert_eq!(per_tp(&r.tensors[0])[3], rows(&[2, 10], 1, &[(9, 10)]));
    let e = run(
        "w  split(dim=2)\n",
        &[("w", &[2, 10])],
        json!({}),
        topo(2, 1),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("dim 2 does not exist"), "{e}");
    // Negative dims count from the end.
    let r = run(
        "w  split(dim=-1)\n",
        &[("w", &[2, 10])],
        json!({}),
        topo(2, 1),
    )
    .unwrap();
    assert_eq!(per_tp(&r.tensors[0])[1], rows(&[2, 10], 1, &[(5, 10)]));
}

#[test]
fn gqa_heads() {
    // 2 kv heads of size 3, tp 4: ranks 0,1 hold head 0; ranks 2,3 head 1.
    let src = "k  heads(dim=0, count=2)\n";
    let r = run(src, &[("k", &[6, 5])], json!({}), topo(4, 1)).unwrap();
    let l = per_tp(&r.tensors[0]);
    assert_eq!(l[1], rows(&[6, 5], 0, &[(0, 3)]));
    assert_eq!(l[2], rows(&[6, 5], 0, &[(3, 6)]));
    // tp 3 neither divides nor is a multiple of 2 heads.
    let e = run(src, &[("k", &[6, 5])], json!({}), topo(3, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a multiple"), "{e}");
}

#[test]
fn vocab_padding() {
    // 100 rows padded to 128, tp 2: rank 1 holds rows 64..100 then 28 zero rows.
    let r = run(
        "e  vocab(dim=0, pad=64)\n",
        &[("e", &[100, 8])],
        json!({}),
        topo(2, 1),
    )
    .unwrap();
    let l = &per_tp(&r.tensors[0])[1];
    assert_eq!(l.shape, [64, 8]);
    assert_eq!(
        l.pieces[0],
        Piece::Slice {
            ranges: vec![(64, 100), (0, 8)]
        }
    );
    assert_eq!(l.pieces[1], Piece::Zeros { extent: 28 });
    // tp 4: rank 3 (rows 96..128) holds 4 real rows and 28 zeros; with tp 8 the last rank only zeros.
    let r = run(
        "e  vocab(pad=64)\n",
        &[("e", &[100, 8])],
        json!({}),
        topo(8, 1),
    )
    .unwrap();
    assert_eq!(
        per_tp(&r.tensors[0])[7].pieces,
        [Piece::Zeros { extent: 16 }]
    );
}

#[test]
fn packed_and_blocked_fused_parts() {
    // GPTQ qzeros of a merged gate_up layer, packed 8 per int32 on dim 1: logical parts of
    // 64 outputs each = 8 packed columns each; tp 2 -> 4 columns of each part.
    let src = "qz  fused(dim=1, unit=8, parts=[64, 64])\n";
    let r = run(src, &[("qz", &[2, 16])], json!({}), topo(2, 1)).unwrap();
    assert_eq!(
        per_tp(&r.tensors[0])[1],
        rows(&[2, 16], 1, &[(4, 8), (12, 16)])
    );
    // FP8 block scales of a fused [q(192) | k(256, 2 heads)] column layer, block 128: part
    // offsets and sizes in blocks use ceil: q = blocks 0..2, k starts at ceil(192/128) = 2.
    // tp 2: q holds ceil(96/128) = 1 block per rank, k one head (1 block) per rank.
    let src = "s  fused(dim=0, unit=128, parts=[split(192), heads(256, count=2)])\n";
    let r = run(src, &[("s", &[4, 4])], json!({}), topo(2, 1)).unwrap();
    let l = per_tp(&r.tensors[0]);
    assert_eq!(l[0], rows(&[4, 4], 0, &[(0, 1), (2, 3)]));
    assert_eq!(l[1], rows(&[4, 4], 0, &[(1, 2), (3, 4)]));
    let e = run(
        "s  fused(dim=0, parts=[3, 4])\n",
        &[("s", &[8])],
        json!({}),
        topo(1, 1),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sum to 7 but dim 0 has size 8"), "{e}");
}

#[test]
fn stages_layers_pinning_tied_and_outside_layers() {
    let src = "let tie = tie_word_embeddings ?? false\n\
               emb  vocab(pad=4) stage(first, last if tie && !has(\"head\"))\n\
               head  vocab(pad=4) stage(last) optional\n\
               norm  replicate stage(last)\n\
               l.{layer}.w  split(dim=0)\n\
               l.{layer}.**  skip(\"extra\") if layer >= num_hidden_layers\n";
    let t: &[(&str, &[u64])] = &[
        ("emb", &[8, 2]),
        ("l.0.w", &[2]),
        ("l.1.w", &[2]),
        ("l.2.w", &[2]),
        ("l.3.w", &[2]),
        ("l.4.w", &[2]),
        ("l.4.mtp", &[2]),
        ("norm", &[2]),
    ];
    let stages = |r: &Resolution| -> Vec<Option<Vec<usize>>> {
        r.tensors
            .iter()
            .map(|x| match x {
                Resolved::Held { stages, .. } => Some(stages.clone()),
                Resolved::Skip { .. } => None,
            })
            .collect()
    };
    // 4 layers over 3 stages: vLLM gives [1, 2, 1]; layer 4 is outside the model.
    let cfg = json!({"num_hidden_layers": 4, "tie_word_embeddings": true});
    let r = run(src, t, cfg.clone(), topo(1, 3)).unwrap();
    let want = vec![
        Some(vec![0, 2]),
        Some(vec![0]),
        Some(vec![1]),
        Some(vec![1]),
        Some(vec![2]),
        None,
        None,
        Some(vec![2]),
    ];
    assert_eq!(stages(&r), want);
    // Untied, or with a head present: embeddings only on the first stage.
    let r = run(src, t, json!({"num_hidden_layers": 4}), topo(1, 3)).unwrap();
    assert_eq!(stages(&r)[0], Some(vec![0]));
    let mut with_head = t.to_vec();
    with_head.push(("head", &[8, 2]));
    let r = run(src, &with_head, cfg.clone(), topo(1, 3)).unwrap();
    assert_eq!(stages(&r)[0], Some(vec![0]));
    assert_eq!(stages(&r)[8], Some(vec![2]));
    // Explicit stage split.
    let mut tp = topo(1, 2);
    tp.pp_layers = Some(vec![3, 1]);
    let r = run(src, t, cfg.clone(), tp).unwrap();
    assert_eq!(stages(&r)[3], Some(vec![0]));
    assert_eq!(stages(&r)[4], Some(vec![1]));
    // More stages than layers is bad usage.
    let e = run(src, t, cfg, topo(1, 5)).unwrap_err();
    assert!(e.is_usage());
}

#[test]
fn expert_parallel_placement() {
    let src = "e.{expert}.w  split(dim=0) experts(count=n)\n";
    let names: Vec<String> = (0..10).map(|e| format!("e.{e}.w")).collect();
    let t: Vec<(&str, &[u64])> = names.iter().map(|n| (n.as_str(), &[4u64, 2][..])).collect();
    let owners = |cfg: serde_json::Value, ep_topo: Topology| -> Vec<usize> {
        run(src, &t, cfg, ep_topo)
            .unwrap()
            .tensors
            .iter()
            .map(|r| match r {
                Resolved::Held {
                    shards: Shards::Expert { owner, layout, .. },
                    ..
                } => {
                    assert_eq!(*layout, Layout::full(&[4, 2]));
                    *owner
                }
                other => panic!("{other:?}"),
            })
            .collect()
    };
    // 10 experts over 4 EP ranks, linear: 3, 3, 2, 2.
    let ep4 = Topology::new(2, 1, 2, 4).unwrap();
    assert_eq!(
        owners(json!({"n": 10}), ep4.clone()),
        [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    );
    assert_eq!(
        owners(
            json!({"n": 10, "expert_placement_strategy": "round_robin"}),
            ep4
        ),
        [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    );
    // Without EP the TP rule applies.
    let r = run(src, &t, json!({"n": 10}), topo(2, 1)).unwrap();
    assert_eq!(per_tp(&r.tensors[0])[1], rows(&[4, 2], 0, &[(2, 4)]));
    // An expert id beyond the count is an error naming the tensor.
    let e = run(src, &t, json!({"n": 8}), Topology::new(2, 1, 1, 2).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("e.8.w") && e.contains("expert 8 is not below the expert count 8"),
        "{e}"
    );
}

#[test]
fn aliases_rewrite_prefixes() {
    let src = "alias \"transformer.\" = \"\"\nh.{layer}.w  split(dim=0)\nwte  replicate\n";
    let r = run(
        src,
        &[("transformer.h.0.w", &[4]), ("wte", &[2]), ("h.1.w", &[4])],
        json!({"num_hidden_layers": 2}),
        topo(2, 2),
    )
    .unwrap();
    assert!(matches!(&r.tensors[0], Resolved::Held { stages, .. } if *stages == [0]));
    assert!(matches!(&r.tensors[2], Resolved::Held { stages, .. } if *stages == [1]));
}

/// Appends to `tensors` every tensor of a one-layer Llama checkpoint that it lacks, each
/// projection with the tensor names `suffixes` (placeholder shapes that divide by tp up to 4),
/// so that the checkpoint is complete; the tensors under test keep their indices.
fn complete_llama(tensors: &mut Vec<(String, Vec<u64>)>, suffixes: &[&str]) {
    let mut want = vec![
        ("model.embed_tokens.weight".to_string(), vec![64, 8]),
        ("lm_head.weight".to_string(), vec![64, 8]),
        ("model.norm.weight".to_string(), vec![8]),
        ("model.layers.0.input_layernorm.weight".to_string(), vec![8]),
        (
            "model.layers.0.post_attention_layernorm.weight".to_string(),
            vec![8],
        ),
    ];
    for p in [
        "self_attn.q",
        "self_attn.k",
        "self_attn.v",
        "self_attn.o",
        "mlp.gate",
        "mlp.up",
        "mlp.down",
    ] {
        for t in suffixes {
            want.push((format!("model.layers.0.{p}_proj.{t}"), vec![8, 8]));
        }
    }
    for (n, s) in want {
        if !tensors.iter().any(|(m, _)| *m == n) {
            tensors.push((n, s));
        }
    }
}

/// GPTQ / AWQ tensors of one Llama layer (hidden 128, 8 heads, 2 kv heads of 16, intermediate
/// 256, 4-bit: pack factor 8, group size 32) resolved with the shipped llama spec.
#[test]
fn shipped_llama_spec_places_gptq_and_awq_like_vllm() {
    let spec = Spec::shipped("llama").unwrap();
    let l = "model.layers.0.";
    let mut gptq: Vec<(String, Vec<u64>)> = vec![
        ("self_attn.q_proj.qweight", vec![16, 128]),
        ("self_attn.q_proj.g_idx", vec![128]),
        ("self_attn.k_proj.qzeros", vec![4, 4]),
        ("self_attn.k_proj.scales", vec![4, 32]),
        ("self_attn.o_proj.qweight", vec![16, 128]),
        ("self_attn.o_proj.qzeros", vec![4, 16]),
        ("self_attn.o_proj.g_idx", vec![128]),
        ("mlp.down_proj.scales", vec![8, 128]),
    ]
    .into_iter()
    .map(|(n, s)| (format!("{l}{n}"), s))
    .collect();
    complete_llama(&mut gptq, &["qweight", "qzeros", "scales"]);
    let tensors: Vec<(&str, &[u64])> = gptq
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let base = |desc_act: bool| {
        json!({"num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 1,
               "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": desc_act}})
    };
    let resolve = |cfg: serde_json::Value, tp: usize| {
        let config = Config::from_json(Some(&cfg), &[]).unwrap();
        resolve_tensors(&spec, &cat(&tensors), &config, &topo(tp, 1)).unwrap()
    };
    let r = resolve(base(false), 2);
    let at = |r: &Resolution, i: usize, rank: usize| per_tp(&r.tensors[i])[rank].clone();
    assert_eq!(at(&r, 0, 1), rows(&[16, 128], 1, &[(64, 128)]));
    // vLLM 0.33's GPTQ has no g_idx parameter: not loaded.
    let skipped = |r: &Resolution, i: usize| matches!(&r.tensors[i], Resolved::Skip { .. });
    assert!(skipped(&r, 1) && skipped(&r, 6), "g_idx is not loaded");
    assert_eq!(
        at(&r, 2, 1),
        rows(&[4, 4], 1, &[(2, 4)]),
        "kv qzeros by head, packed"
    );
    assert_eq!(at(&r, 3, 1), rows(&[4, 32], 1, &[(16, 32)]));
    assert_eq!(
        at(&r, 4, 1),
        rows(&[16, 128], 0, &[(8, 16)]),
        "row qweight in packed rows"
    );
    assert_eq!(
        at(&r, 5, 1),
        rows(&[4, 16], 0, &[(2, 4)]),
        "row qzeros by group"
    );
    assert_eq!(at(&r, 7, 1), rows(&[8, 128], 0, &[(4, 8)]));
    // tp 4 > 2 kv heads: ranks 2 and 3 hold kv head 1.
    let r4 = resolve(base(false), 4);
    assert_eq!(at(&r4, 2, 1), rows(&[4, 4], 1, &[(0, 2)]));
    assert_eq!(at(&r4, 2, 3), rows(&[4, 4], 1, &[(2, 4)]));
    // Act-order with groups: row scales/qzeros become full copies.
    let r = resolve(base(true), 2);
    assert_eq!(at(&r, 5, 1), Layout::full(&[4, 16]));
    assert_eq!(at(&r, 7, 1), Layout::full(&[8, 128]));

    // AWQ: packed on the output dim.
    let mut awq: Vec<(String, Vec<u64>)> = vec![
        ("self_attn.k_proj.qweight", vec![128, 4]),
        ("self_attn.o_proj.qweight", vec![128, 16]),
        ("self_attn.o_proj.scales", vec![4, 128]),
        ("mlp.down_proj.qzeros", vec![8, 16]),
        ("mlp.up_proj.qzeros", vec![4, 32]),
    ]
    .into_iter()
    .map(|(n, s)| (format!("{l}{n}"), s))
    .collect();
    complete_llama(&mut awq, &["qweight", "qzeros", "scales"]);
    let tensors: Vec<(&str, &[u64])> = awq
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let cfg = json!({"num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 1,
                     "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32}});
    let config = Config::from_json(Some(&cfg), &[]).unwrap();
    let r = resolve_tensors(&spec, &cat(&tensors), &config, &topo(2, 1)).unwrap();
    assert_eq!(at(&r, 0, 1), rows(&[128, 4], 1, &[(2, 4)]));
    assert_eq!(at(&r, 1, 1), rows(&[128, 16], 0, &[(64, 128)]));
    assert_eq!(at(&r, 2, 1), rows(&[4, 128], 0, &[(2, 4)]));
    assert_eq!(at(&r, 3, 1), rows(&[8, 16], 0, &[(4, 8)]));
    assert_eq!(at(&r, 4, 1), rows(&[4, 32], 1, &[(16, 32)]));
    // FP8 per-tensor scales are scalars copied whole.
    let mut fp8: Vec<(String, Vec<u64>)> = vec![
        (
            "model.layers.0.self_attn.q_proj.weight_scale".into(),
            vec![],
        ),
        ("model.layers.0.mlp.down_proj.input_scale".into(), vec![]),
    ];
    complete_llama(&mut fp8, &["weight"]);
    let t: Vec<(&str, &[u64])> = fp8
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let config = Config::from_json(
        Some(&json!({"num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 1})),
        &[],
    )
    .unwrap();
    let r = resolve_tensors(&spec, &cat(&t), &config, &topo(4, 1)).unwrap();
    assert!(per_tp(&r.tensors[0])
        .iter()
        .all(|l| *l == Layout::full(&[])));
}

#[test]
fn requirements_are_checked_after_placement() {
    let src = "require heads % tp == 0 \"heads must divide\"\nw  split(dim=0)\n";
    let t: &[(&str, &[u64])] = &[("w", &[16])];
    assert!(run(src, t, json!({"heads": 4}), topo(4, 1)).is_ok());
    // 16 rows split over 8 ranks, but 4 heads do not: the requirement refuses.
    let e = run(src, t, json!({"heads": 4}), topo(8, 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("t.shard:1: spec `t` cannot place this checkpoint at tp = 8"),
        "{e}"
    );
    assert!(e.contains("heads must divide"), "{e}");
    // A split that does not divide is reported first, with its tensor.
    let e = run(src, t, json!({"heads": 4}), topo(3, 1))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tensor \"w\" [16]") && e.contains("tp = 3"),
        "{e}"
    );
    // A missing value in a requirement is named.
    let e = run(src, t, json!({}), topo(2, 1)).unwrap_err().to_string();
    assert!(e.contains("needs `heads`"), "{e}");
}

/// A checkpoint missing tensors the spec implies is refused, naming them (issue 9 item 9).
#[test]
fn incomplete_checkpoints_are_refused_naming_what_is_missing() {
    let src = "layers num_hidden_layers\nm.{layer}.a.w  split(dim=0)\nm.{layer}.b.{w,bias}  replicate\nm.{layer}.opt.w  replicate optional\nnorm.w  replicate\nhead.w  replicate if !tie\n";
    let full: Vec<(String, Vec<u64>)> = (0..3)
        .flat_map(|l| {
            [
                (format!("m.{l}.a.w"), vec![4]),
                (format!("m.{l}.b.w"), vec![2]),
                (format!("m.{l}.b.bias"), vec![2]),
            ]
        })
        .chain([
            ("norm.w".to_string(), vec![2]),
            ("m.0.opt.w".to_string(), vec![2]),
        ])
        .collect();
    let cfg = json!({"num_hidden_layers": 3, "tie": true});
    let without = |drop: &dyn Fn(&str) -> bool| -> Vec<(String, Vec<u64>)> {
        full.iter().filter(|(n, _)| !drop(n)).cloned().collect()
    };
    let resolve = |t: &[(String, Vec<u64>)], cfg: serde_json::Value| {
        let t: Vec<(&str, &[u64])> = t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        run(src, &t, cfg, topo(2, 1))
    };
    // Complete (the optional rule's tensor exists in one layer only; the head is tied).
    resolve(&full, cfg.clone()).unwrap();
    // A whole layer missing: every one of its tensors is named, in rule order.
    let e = resolve(&without(&|n| n.starts_with("m.1.")), cfg.clone()).unwrap_err();
    assert!(!e.is_usage());
    assert_eq!(e.kind().name(), "placement");
    assert_eq!(
        e.to_string(),
        "checkpoint is incomplete for spec `t` with 3 layers: 3 tensor(s) it needs are missing: \"m.1.a.w\", \"m.1.b.bias\", \"m.1.b.w\" (required by t.shard line(s) 2, 3; a rule marked `optional` may match nothing)"
    );
    // The final norm, and the head once untied.
    let e = resolve(
        &without(&|n| n == "norm.w"),
        json!({"num_hidden_layers": 3, "tie": false}),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(": 2 tensor(s) it needs are missing: \"norm.w\", \"head.w\" "),
        "{e}"
    );
    // Many missing: the list is capped at 10 names and the rest counted.
    let cfg40 = json!({"num_hidden_layers": 40, "tie": true});
    let e = resolve(&full, cfg40).unwrap_err().to_string();
    assert!(
        e.contains(": 111 tensor(s) it needs are missing: \"m.3.a.w\", "),
        "{e}"
    );
    assert!(e.contains(" and 101 more "), "{e}");
    assert_eq!(e.matches("\"m.").count(), 10, "{e}");
}

/// Issue 18 item 1: which layers a rule covers comes from config values through a condition
/// that reads `layer` (here through a `let`, with `in` over a config list and `%`), and
/// completeness follows those layer kinds: a dense layer needs its MLP, a sparse layer every
/// expert, and an expert missing from every layer is named (item 4c).
#[test]
fn layer_kinds_from_config_values_decide_completeness() {
    let src = "layers num_hidden_layers\n\
        let sparse = !(layer in (mlp_only_layers ?? [])) && (layer + 1) % (step ?? 1) == 0\n\
        m.{layer}.attn.w  split(dim=0)\n\
        m.{layer}.experts.{expert}.w  split(dim=0) experts(count=n_experts) if sparse\n\
        m.{layer}.mlp.w  split(dim=0) if !sparse\n";
    // 4 layers, experts 0..3; layer 1 dense by the list.
    let cfg = json!({"num_hidden_layers": 4, "n_experts": 3, "mlp_only_layers": [1], "step": 1});
    let names = |sparse: &[u64], dense: &[u64], experts: &[u64]| -> Vec<(String, Vec<u64>)> {
        let mut v: Vec<(String, Vec<u64>)> =
            (0..4).map(|l| (format!("m.{l}.attn.w"), vec![4])).collect();
        for &l in sparse {
            for &e in experts {
                v.push((format!("m.{l}.experts.{e}.w"), vec![4]));
            }
        }
        for &l in dense {
            v.push((format!("m.{l}.mlp.w"), vec![4]));
        }
        v
    };
    let resolve = |t: &[(String, Vec<u64>)], cfg: &serde_json::Value| {
        let t: Vec<(&str, &[u64])> = t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        run(src, &t, cfg.clone(), topo(2, 2))
    };
    // Complete, no warnings; the dense layer's MLP is split like any other rule.
    let r = resolve(&names(&[0, 2, 3], &[1], &[0, 1, 2]), &cfg).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // A dense layer missing its MLP is refused (its experts are no substitute).
    let e = resolve(&names(&[0, 2, 3], &[], &[0, 1, 2]), &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(": 1 tensor(s) it needs are missing: \"m.1.mlp.w\" "),
        "{e}"
    );
    // A sparse layer missing its experts is refused.
    let e = resolve(&names(&[0, 3], &[1], &[0, 1, 2]), &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(": 3 tensor(s) it needs are missing: \"m.2.experts.0.w\", \"m.2.experts.1.w\", \"m.2.experts.2.w\" "),
        "{e}"
    );
    // An expert missing from every layer is named in each sparse layer.
    let e = resolve(&names(&[0, 2, 3], &[1], &[0, 2]), &cfg)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(": 3 tensor(s) it needs are missing: \"m.0.experts.1.w\", \"m.2.experts.1.w\", \"m.3.experts.1.w\" "),
        "{e}"
    );
    // decoder_sparse_step 2 with no list: layers 1 and 3 sparse, 0 and 2 dense.
    let step2 = json!({"num_hidden_layers": 4, "n_experts": 3, "step": 2});
    let r = resolve(&names(&[1, 3], &[0, 2], &[0, 1, 2]), &step2).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // Without dense layers the dense rule is off everywhere: no warning.
    let all = json!({"num_hidden_layers": 4, "n_experts": 3});
    let r = resolve(&names(&[0, 1, 2, 3], &[], &[0, 1, 2]), &all).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // `in` needs a list: a config value of another type is named.
    let bad = json!({"num_hidden_layers": 4, "n_experts": 3, "mlp_only_layers": 1});
    let e = resolve(&names(&[0, 1, 2, 3], &[], &[0, 1, 2]), &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "expected a list after `in`, got the integer 1 from config key `mlp_only_layers`"
        ),
        "{e}"
    );
}

/// An expert count from input far beyond any checkpoint (spec_props found i64::MAX
/// overflowing a list of the experts to check) is refused as incomplete, within the check
/// budget, not a panic.
#[test]
fn a_huge_expert_count_is_bounded() {
    let src = "layers 2\nmodel.layers.{layer}.mlp.experts.{expert}.w1.weight  replicate experts(count=9223372036854775807)\n";
    let e = run(
        src,
        &[("model.layers.0.mlp.experts.0.w1.weight", &[2])],
        json!({}),
        topo(1, 1),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("tensor(s) it needs are missing"), "{e}");
    assert!(e.contains(" and at least "), "{e}");
}

/// The reason of the placement error `src` gives for one BF16 tensor `t` of `shape`.
fn placement_reason(src: &str, shape: &[u64], tp: usize) -> String {
    match run(src, &[("t", shape)], json!({}), topo(tp, 1)) {
        Err(safeshard::Error::Placement {
            tensor: Some(t),
            shape: Some(s),
            reason,
            ..
        }) if t == "t" && s == shape => reason,
        other => panic!("{src}: not a placement error of `t`: {other:?}"),
    }
}

#[test]
fn each_unplaceable_rule_says_why() {
    let cases: &[(&str, &[u64], usize, &str)] = &[
        (
            "t  split(dim=-3)\n",
            &[2, 10],
            2,
            "dim -3 does not exist in a 2-dimensional tensor",
        ),
        // 10 rows padded to a multiple of 5 stay 10, which 4 ranks cannot share.
        (
            "t  vocab(pad=5)\n",
            &[10, 8],
            4,
            "padded vocab 10 (= 10 rounded up to a multiple of 5) does not divide by tp = 4",
        ),
        (
            "t  fused(dim=0, parts=[4, -1])\n",
            &[3],
            1,
            "part size -1 is negative",
        ),
        // 8 + 9 = 17 logical rows are ceil(17 / 4) = 5 stored ones, not 4.
        (
            "t  fused(dim=0, unit=4, parts=[8, 9])\n",
            &[4],
            1,
            "fused parts [8, 9] sum to 17 (5 in units of 4) but dim 0 has size 4",
        ),
        (
            "t  heads(dim=0, count=4)\n",
            &[6, 5],
            2,
            "dim 0 (size 6) is not a whole number of 4 heads",
        ),
        (
            "t  heads(dim=0, count=3)\n",
            &[6, 5],
            2,
            "the 3 heads of dim 0 (size 6) do not divide by tp = 2",
        ),
        (
            "t  heads(dim=0, count=2)\n",
            &[6, 5],
            3,
            "tp = 3 is larger than the 2 heads of dim 0 (size 6) but not a multiple of them",
        ),
        // With several parts, the message names the part.
        (
            "t  fused(dim=0, parts=[4, heads(6, count=4)])\n",
            &[10],
            2,
            "part 1 (size 6) of dim 0 is not a whole number of 4 heads",
        ),
        (
            "t  fused(dim=0, parts=[3, 4])\n",
            &[7],
            2,
            "part 0 (size 3) of dim 0 does not divide by tp = 2 (the rule does not allow uneven splits)",
        ),
        // Part 0 is one stored row of 8: its halves (4 each) round up to a row each, and
        // rank 1's row [1, 2) is past the part.
        (
            "t  fused(dim=0, unit=8, parts=[8, 8])\n",
            &[2],
            2,
            "rank 1's range [1, 2) of part 0 (size 8) of dim 0 exceeds its 1 units of 8",
        ),
    ];
    for &(src, shape, tp, want) in cases {
        assert_eq!(placement_reason(src, shape, tp), want, "{src}");
    }
    // Values that must be positive are spec errors on the rule's line.
    for (src, want) in [
        (
            "t  vocab(pad=0)\n",
            "vocab `pad` must be a positive integer, got 0",
        ),
        (
            "t  split(dim=0, unit=0)\n",
            "`unit` must be a positive integer, got 0",
        ),
        (
            "t  heads(dim=0, count=-2)\n",
            "head `count` must be a positive integer, got -2",
        ),
    ] {
        let e = run(src, &[("t", &[8])], json!({}), topo(2, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.shard:1") && e.contains(want), "{src}: {e}");
    }
}

#[test]
fn full_uneven_and_unit_parts() {
    // `full` parts go whole to every rank; the split part after them is shared.
    let r = run(
        "t  fused(dim=0, parts=[full(2), 4])\n",
        &[("t", &[6, 3])],
        json!({}),
        topo(2, 1),
    )
    .unwrap();
    let l = per_tp(&r.tensors[0]);
    assert_eq!(l[0], rows(&[6, 3], 0, &[(0, 2), (2, 4)]));
    assert_eq!(l[1], rows(&[6, 3], 0, &[(0, 2), (4, 6)]));
    // A whole-tensor `full` is every rank's whole dim.
    let r = run("t  full(dim=1)\n", &[("t", &[4, 6])], json!({}), topo(2, 1)).unwrap();
    for l in per_tp(&r.tensors[0]) {
        assert_eq!(*l, rows(&[4, 6], 1, &[(0, 6)]));
    }
    // Fewer ranks than heads: each rank takes whole heads (4 heads of 2 rows, tp 2).
    let r = run(
        "t  heads(dim=0, count=4)\n",
        &[("t", &[8, 2])],
        json!({}),
        topo(2, 1),
    )
    .unwrap();
    assert_eq!(per_tp(&r.tensors[0])[1], rows(&[8, 2], 0, &[(4, 8)]));
    // An uneven part in stored units of 8: part 0 is one stored row, rank 0's ceil(8/2) = 4
    // logical rows round up to it and rank 1's row is past the part, so rank 1 holds
    // nothing of it; part 1 (rows 1..3) gives each rank one row.
    let r = run(
        "t  fused(dim=0, unit=8, parts=[split(8, uneven), 16])\n",
        &[("t", &[3])],
        json!({}),
        topo(2, 1),
    )
    .unwrap();
    let l = per_tp(&r.tensors[0]);
    assert_eq!(l[0], rows(&[3], 0, &[(0, 1), (1, 2)]));
    assert_eq!(l[1], rows(&[3], 0, &[(2, 3)]));
    // A lone split ignores `unit` for its offsets (the part is the whole dim, in stored rows).
    let r = run(
        "t  split(dim=0, unit=8)\n",
        &[("t", &[4])],
        json!({}),
        topo(2, 1),
    )
    .unwrap();
    assert_eq!(per_tp(&r.tensors[0])[1], rows(&[4], 0, &[(2, 4)]));
}
