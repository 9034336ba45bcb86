//! Fuzzes the spec parser and resolver: any UTF-8 text is parsed as a spec and must never
//! panic; whatever parses is resolved on a small catalog for a few topologies, which must not
//! panic either (errors are fine).
#![no_main]

use libfuzzer_sys::fuzz_target;
use safeshard::checkpoint::{Dtype, TensorInfo};
use safeshard::sharding::{resolve_tensors, Config, Spec};
use safeshard::topology::Topology;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = Spec::parse(src, "fuzz.shard") else {
        return;
    };
    let tensors: Vec<TensorInfo> = [
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
    .collect();
    let cfg = serde_json::json!({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 8, "n": 4});
    let Ok(config) = Config::from_json(Some(&cfg), &[]) else {
        return;
    };
    for (tp, pp, dp, ep) in [(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 1, 4), (3, 1, 1, 1)] {
        if let Ok(t) = Topology::new(tp, pp, dp, ep) {
            let _ = resolve_tensors(&spec, &tensors, &config, &t);
        }
    }
});
