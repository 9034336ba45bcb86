//! Named shapes: tiny ones for tests and real-size ones (sparse) for planning benchmarks.

use serde_json::{json, Value};

use super::{Arch, SynthOptions};
use crate::checkpoint::Dtype;
use crate::{Error, Result};

/// Names accepted by [`SynthOptions::preset`] (each also with a `-tied` or `-untied` suffix).
pub const PRESETS: &[&str] = &[
    "llama-tiny",
    "mistral-tiny",
    "qwen2-tiny",
    "phi3-tiny",
    "mixtral-tiny",
    "qwen2-moe-tiny",
    "deepseek-v3-tiny",
    "gpt2-tiny",
    "llama-tiny-gptq",
    "llama-tiny-awq",
    "llama3-8b",
    "llama3.1-405b",
    "mixtral-8x7b",
    "deepseek-v3",
    "gpt2",
    "distilgpt2",
];

const GB: u64 = 1_000_000_000;
/// Hugging Face's default `max_shard_size` for the real-size presets.
const REAL_SHARD: u64 = 5 * GB;
/// Tiny presets split into a few files so that multi-file checkpoints are exercised.
const TINY_SHARD: u64 = 1 << 20;
/// Shard size that splits the `deepseek-v3` preset into exactly 163 files, as published.
pub(crate) const DEEPSEEK_V3_SHARD: u64 = 4_243_538_144;

fn llama_cfg(arch: &str, model_type: &str, fields: Value) -> Value {
    let mut cfg = json!({
        "architectures": [arch],
        "model_type": model_type,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
    });
    if let (Some(c), Some(f)) = (cfg.as_object_mut(), fields.as_object()) {
        for (k, v) in f {
            c.insert(k.clone(), v.clone());
        }
    }
    cfg
}

fn opts(arch: Arch, config: Value, dtype: Dtype, max_file_bytes: u64) -> SynthOptions {
    SynthOptions {
        arch,
        config,
        dtype,
        max_file_bytes,
        sparse: false,
        seed: 0,
    }
}

/// Builds the options of a preset name (see [`PRESETS`]).
pub(crate) fn preset(name: &str) -> Result<SynthOptions> {
    let (base, tie) = if let Some(b) = name.strip_suffix("-untied") {
        (b, Some(false))
    } else if let Some(b) = name.strip_suffix("-tied") {
        (b, Some(true))
    } else {
        (name, None)
    };
    let bf = Dtype::BF16;
    let mut o = match base {
        // Vocab sizes are not multiples of 64 so that vocab padding is exercised; kv heads < heads.
        "llama-tiny" => opts(
            Arch::Llama,
            llama_cfg(
                "LlamaForCausalLM",
                "llama",
                json!({"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
                    "max_position_embeddings": 256, "rope_theta": 500000.0,
                    "tie_word_embeddings": false, "_synth_rotary_inv_freq": true}),
            ),
            bf,
            TINY_SHARD,
        ),
        // Weight-only int4 (pack factor 8, group 32); intermediate 256 so that row-parallel
        // partitions stay whole groups up to tp = 4.
        "llama-tiny-gptq" | "llama-tiny-awq" => {
            let gptq = base.ends_with("gptq");
            let q = if gptq {
                json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": false,
                    "sym": true, "checkpoint_format": "gptq"})
            } else {
                json!({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": true,
                    "version": "gemm"})
            };
            let mut cfg = llama_cfg(
                "LlamaForCausalLM",
                "llama",
                json!({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
                    "max_position_embeddings": 256, "rope_theta": 500000.0,
                    "tie_word_embeddings": false, "torch_dtype": "float16"}),
            );
            if let Some(c) = cfg.as_object_mut() {
                c.insert("quantization_config".into(), q);
            }
            opts(Arch::Llama, cfg, Dtype::F16, TINY_SHARD)
        }
        "mistral-tiny" => opts(
            Arch::Mistral,
            llama_cfg(
                "MistralForCausalLM",
                "mistral",
                json!({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
                    "vocab_size": 1003, "max_position_embeddings": 256, "rope_theta": 1000000.0,
                    "sliding_window": null, "tie_word_embeddings": false}),
            ),
            bf,
            TINY_SHARD,
        ),
        "qwen2-tiny" => opts(
            Arch::Qwen2,
            llama_cfg(
                "Qwen2ForCausalLM",
                "qwen2",
                json!({"hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1500,
                    "max_position_embeddings": 256, "rope_theta": 1000000.0,
                    "tie_word_embeddings": true}),
            ),
            bf,
            TINY_SHARD,
        ),
        "phi3-tiny" => opts(
            Arch::Phi3,
            llama_cfg(
                "Phi3ForCausalLM",
                "phi3",
                json!({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1100,
                    "max_position_embeddings": 256, "rope_theta": 10000.0,
                    "tie_word_embeddings": false}),
            ),
            bf,
            TINY_SHARD,
        ),
        "mixtral-tiny" => opts(
            Arch::Mixtral,
            llama_cfg(
                "MixtralForCausalLM",
                "mixtral",
                json!({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 1000,
                    "num_local_experts": 8, "num_experts_per_tok": 2,
                    "max_position_embeddings": 256, "rope_theta": 1000000.0,
                    "tie_word_embeddings": false}),
            ),
            bf,
            TINY_SHARD,
        ),
        "qwen2-moe-tiny" => opts(
            Arch::Qwen2Moe,
            llama_cfg(
                "Qwen2MoeForCausalLM",
                "qwen2_moe",
                json!({"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1200,
                    "num_experts": 12, "num_experts_per_tok": 4, "moe_intermediate_size": 64,
                    "shared_expert_intermediate_size": 256, "decoder_sparse_step": 1,
                    "mlp_only_layers": [], "norm_topk_prob": false,
                    "max_position_embeddings": 256, "rope_theta": 1000000.0,
                    "tie_word_embeddings": false}),
            ),
            bf,
            TINY_SHARD,
        ),
        // Dimensions are multiples of the 128 FP8 block per rank up to tp = 4 (q_b/kv_b/dense
        // MLP up to tp = 8); use expert parallelism beyond.
        "deepseek-v3-tiny" => opts(
            Arch::DeepseekV3,
            deepseek_cfg(json!({"hidden_size": 256, "intermediate_size": 1024,
                "moe_intermediate_size": 512, "num_hidden_layers": 3, "num_nextn_predict_layers": 1,
                "num_attention_heads": 8, "num_key_value_heads": 8, "n_routed_experts": 8,
                "n_shared_experts": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 1,
                "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
                "qk_rope_head_dim": 64, "v_head_dim": 64, "vocab_size": 1000,
                "n_group": 4, "topk_group": 2, "max_position_embeddings": 256})),
            bf,
            4 << 20,
        ),
        "gpt2-tiny" => opts(
            Arch::Gpt2,
            gpt2_cfg(
                json!({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 32,
                "n_ctx": 32, "vocab_size": 1000}),
            ),
            Dtype::F32,
            TINY_SHARD,
        ),
        "llama3-8b" => opts(
            Arch::Llama,
            llama_cfg(
                "LlamaForCausalLM",
                "llama",
                json!({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 8192, "rope_theta": 500000.0,
                    "tie_word_embeddings": false}),
            ),
            bf,
            REAL_SHARD,
        ),
        "llama3.1-405b" => opts(
            Arch::Llama,
            llama_cfg(
                "LlamaForCausalLM",
                "llama",
                json!({"hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                    "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
                    "max_position_embeddings": 131072, "rope_theta": 500000.0,
                    "tie_word_embeddings": false}),
            ),
            bf,
            REAL_SHARD,
        ),
        "mixtral-8x7b" => opts(
            Arch::Mixtral,
            llama_cfg(
                "MixtralForCausalLM",
                "mixtral",
                json!({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                    "num_local_experts": 8, "num_experts_per_tok": 2,
                    "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                    "tie_word_embeddings": false}),
            ),
            bf,
            REAL_SHARD,
        ),
        "deepseek-v3" => {
            let mut o = opts(
                Arch::DeepseekV3,
                deepseek_cfg(json!({"hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61,
                    "num_nextn_predict_layers": 1, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "q_lora_rank": 1536,
                    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "vocab_size": 129280, "n_group": 8, "topk_group": 4,
                    "max_position_embeddings": 163840})),
                bf,
                REAL_SHARD,
            );
            // The published checkpoint has 163 files; this is the smallest shard size that
            // gives as many (`shard_size_for_files(.., 163)`, checked by a test).
            o.max_file_bytes = DEEPSEEK_V3_SHARD;
            o
        }
        "gpt2" => opts(
            Arch::Gpt2,
            gpt2_cfg(
                json!({"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
                "n_ctx": 1024, "vocab_size": 50257}),
            ),
            Dtype::F32,
            REAL_SHARD,
        ),
        "distilgpt2" => opts(
            Arch::Gpt2,
            gpt2_cfg(
                json!({"n_embd": 768, "n_layer": 6, "n_head": 12, "n_positions": 1024,
                "n_ctx": 1024, "vocab_size": 50257, "_synth_name_prefix": "transformer."}),
            ),
            Dtype::F32,
            REAL_SHARD,
        ),
        _ => {
            return Err(Error::UnknownPreset {
                name: name.to_string(),
                known: PRESETS.iter().map(|p| p.to_string()).collect(),
            })
        }
    };
    if let Some(t) = tie {
        if o.arch == Arch::Gpt2 && !t {
            return Err(Error::invalid_argument(
                "preset",
                format!("{name:?}: GPT-2 checkpoints always tie lm_head to wte"),
            ));
        }
        o = o.with_tied(t);
    }
    Ok(o)
}

fn deepseek_cfg(fields: Value) -> Value {
    let mut cfg = json!({
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "torch_dtype": "bfloat16",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "moe_layer_freq": 1,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": true,
        "rope_theta": 10000,
        "tie_word_embeddings": false,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128]
        },
    });
    if let (Some(c), Some(f)) = (cfg.as_object_mut(), fields.as_object()) {
        for (k, v) in f {
            c.insert(k.clone(), v.clone());
        }
    }
    cfg
}

fn gpt2_cfg(fields: Value) -> Value {
    let mut cfg = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "n_inner": null,
        "torch_dtype": "float32",
        "tie_word_embeddings": true,
    });
    if let (Some(c), Some(f)) = (cfg.as_object_mut(), fields.as_object()) {
        for (k, v) in f {
            c.insert(k.clone(), v.clone());
        }
    }
    cfg
}
