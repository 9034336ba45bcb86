//! Property tests: the parser and resolver never panic on arbitrary or near-miss input
//! (the same checks as fuzz/fuzz_targets/spec.rs, runnable without cargo-fuzz).

use proptest::prelude::*;
use safeshard::checkpoint::{Dtype, TensorInfo};
use safeshard::sharding::{resolve_tensors, Config, Spec};
use safeshard::topology::Topology;

fn catalog() -> Vec<TensorInfo> {
    [
        ("model.embed_tokens.weight", vec![100u64, 8]),
        ("model.layers.0.self_attn.q_proj.weight", vec![8, 8]),
        ("model.layers.1.mlp.experts.3.w1.weight", vec![16, 8]),
        ("model.layers.2.x", vec![]),
        ("lm_head.weight", vec![100, 8]),
    ]
    .into_iter()
    .map(|(n, shape)| TensorInfo {
        name: n.to_string(),
        dtype: Dtype::BF16,
        shape,
        file: 0,
        offset: 0,
        bytes: 0,
    })
    .collect()
}

fn exercise(src: &str) {
    let Ok(spec) = Spec::parse(src, "p.shard") else {
        return;
    };
    let cfg = serde_json::json!({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 8, "n": 4});
    let config = Config::from_json(Some(&cfg), &[]).unwrap();
    for (tp, pp, dp, ep) in [(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 1, 4), (3, 1, 1, 1)] {
        let t = Topology::new(tp, pp, dp, ep).unwrap();
        let _ = resolve_tensors(&spec, &catalog(), &config, &t);
    }
}

/// Fragments that make near-valid specs.
const WORDS: &[&str] = &[
    "model",
    ".",
    "layers",
    "{layer}",
    "{expert}",
    "{a,b}",
    "*",
    "**",
    "weight",
    "w1",
    " ",
    "  ",
    "split(dim=0)",
    "split(dim=-1, uneven)",
    "heads(dim=0, count=",
    "vocab(pad=",
    "fused(dim=0, parts=[",
    "replicate",
    "skip",
    "skip(\"x\")",
    "stage(first, last if ",
    "experts(count=n)",
    "if ",
    "layer",
    ">=",
    "??",
    "/",
    "0",
    "1",
    "3",
    "-7",
    "99999999999999999999",
    "n",
    "tp",
    "has(\"lm_head.weight\")",
    ")",
    "]",
    "(",
    "[",
    ",",
    "\"",
    "#",
    "\n",
    "let x = ",
    "arch A",
    "alias \"model.\" = \"\"",
    "layers ",
    "kind mlp",
    "optional",
    "unit=128",
    "cdiv(",
    "min(",
    "!",
    "&&",
    "||",
    "==",
    "é",
    "\t",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(src in ".{0,200}") {
        exercise(&src);
    }

    #[test]
    fn near_valid_specs_never_panic(idx in proptest::collection::vec(0..WORDS.len(), 0..40)) {
        let src: String = idx.iter().map(|&i| WORDS[i]).collect();
        exercise(&src);
    }
}

const PATTERNS: &[&str] = &[
    "**",
    "model.**",
    "model.layers.{layer}.**",
    "model.layers.{layer}.mlp.experts.{expert}.w1.weight",
    "*.weight",
    "model.layers.{layer}.x",
    "lm_head.weight",
];

fn action(kind: usize, a: i64, b: i64) -> String {
    match kind {
        0 => "replicate".into(),
        1 => "skip".into(),
        2 => format!("split(dim={a})"),
        3 => format!("split(dim={a}, uneven)"),
        4 => format!("heads(dim={a}, count={b})"),
        5 => format!("vocab(dim={a}, pad={b})"),
        6 => format!(
            "fused(dim={a}, parts=[{b}, split({b}), heads({b}, count=2), full(4)], unit={b})"
        ),
        _ => format!("fused(dim={a}, parts=[n * {b}, cdiv({b}, 3)])"),
    }
}

fn clause(kind: usize, a: i64) -> String {
    match kind {
        0 => String::new(),
        1 => format!("stage({a})"),
        2 => "stage(first, last if layer >= 1)".into(),
        3 => format!("experts(count={a})"),
        4 => format!("experts(count=n, placement=round_robin) if layer < {a}"),
        5 => "optional".into(),
        _ => format!("if tp % {a} == 0"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn random_rule_sets_never_panic(
        rules in proptest::collection::vec((0..PATTERNS.len(), 0usize..8, 0usize..7, -3i64..4, prop_oneof![-2i64..130, Just(i64::MAX), Just(i64::MAX / 3), Just(1i64 << 40)]), 1..6),
        layers in prop_oneof![-1i64..4, Just(1i64 << 50)],
    ) {
        let mut src = format!("layers {layers}\n");
        for (p, a, c, x, y) in rules {
            src.push_str(&format!("{}  {} {}\n", PATTERNS[p], action(a, x, y), clause(c, y)));
        }
        exercise(&src);
    }
}
