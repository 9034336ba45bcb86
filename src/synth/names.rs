//! Tensor names, dtypes and shapes of each architecture, derived from a `config.json`.
//!
//! Names and shapes follow the Hugging Face checkpoints of each family (see
//! `partition-rules.md`); the order is the order of the model's `state_dict`, layer by layer.

use serde_json::Value;

use super::{Arch, SynthOptions, TensorSpec};
use crate::checkpoint::Dtype;
use crate::{Error, Result};

/// Integer field of the config, or a `Config` error naming it.
pub(crate) fn cfg_u64(cfg: &Value, key: &str) -> Result<u64> {
    match cfg.get(key) {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| Error::config(key, format!("must be a non-negative integer, got {v}"))),
        None => Err(Error::config(key, "is missing from the config")),
    }
}

/// Optional integer field (absent or null → `None`).
fn cfg_opt_u64(cfg: &Value, key: &str) -> Result<Option<u64>> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => cfg_u64(cfg, key).map(Some),
    }
}

/// Boolean field with a default.
fn cfg_bool(cfg: &Value, key: &str, default: bool) -> Result<bool> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(Error::config(key, format!("must be a boolean, got {v}"))),
    }
}

fn mul(a: u64, b: u64, what: &str) -> Result<u64> {
    a.checked_mul(b)
        .ok_or_else(|| Error::config(what, "overflows"))
}

/// `ceil(n / 128)`: FP8 block-scale extent of a dimension of `n` (block 128).
fn blocks(n: u64, block: u64) -> u64 {
    n.div_ceil(block)
}

struct Out {
    v: Vec<TensorSpec>,
}

impl Out {
    fn push(&mut self, name: impl Into<String>, dtype: Dtype, shape: &[u64]) {
        self.v.push((name.into(), dtype, shape.to_vec()));
    }
}

/// Standard attention shapes: (hidden, heads, kv heads, head_dim).
fn attn_dims(cfg: &Value) -> Result<(u64, u64, u64, u64)> {
    let h = cfg_u64(cfg, "hidden_size")?;
    let nh = cfg_u64(cfg, "num_attention_heads")?;
    if nh == 0 {
        return Err(Error::config("num_attention_heads", "must be at least 1"));
    }
    let nkv = cfg_opt_u64(cfg, "num_key_value_heads")?.unwrap_or(nh);
    let hd = match cfg_opt_u64(cfg, "head_dim")? {
        Some(hd) => hd,
        None => h / nh,
    };
    Ok((h, nh, nkv, hd))
}

/// Lists the tensors of `opts` in Hugging Face order.
pub(crate) fn list(opts: &SynthOptions) -> Result<Vec<TensorSpec>> {
    let cfg = &opts.config;
    let dt = opts.dtype;
    let mut o = Out { v: Vec::new() };
    match opts.arch {
        Arch::Llama | Arch::Mistral | Arch::Qwen2 | Arch::Phi3 | Arch::Mixtral | Arch::Qwen2Moe => {
            dense_family(opts.arch, cfg, dt, &mut o)?
        }
        Arch::DeepseekV3 => deepseek_v3(cfg, dt, &mut o)?,
        Arch::Gpt2 => gpt2(cfg, dt, &mut o)?,
    }
    Ok(o.v)
}

/// Weight-only int4 quantization of the linear layers (`quantization_config.quant_method`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quant {
    None,
    /// GPTQ: `qweight` I32 [in/pf, out], `qzeros` I32 [in/g, out/pf], `scales` [in/g, out],
    /// `g_idx` I32 [in].
    Gptq {
        pf: u64,
        g: u64,
    },
    /// AWQ: `qweight` I32 [in, out/pf], `qzeros` I32 [in/g, out/pf], `scales` [in/g, out].
    Awq {
        pf: u64,
        g: u64,
    },
}

fn quant_of(cfg: &Value) -> Result<Quant> {
    let Some(q) = cfg.get("quantization_config") else {
        return Ok(Quant::None);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "gptq" && method != "awq" {
        return Ok(Quant::None);
    }
    let bits = cfg_u64(q, "bits").or_else(|_| cfg_u64(q, "w_bit"))?;
    let g = cfg_u64(q, "group_size").or_else(|_| cfg_u64(q, "q_group_size"))?;
    if bits == 0 || 32 % bits != 0 || g == 0 {
        return Err(Error::config(
            "quantization_config",
            format!("bits {bits} must divide 32 and group_size {g} be positive"),
        ));
    }
    let pf = 32 / bits;
    Ok(if method == "gptq" {
        Quant::Gptq { pf, g }
    } else {
        Quant::Awq { pf, g }
    })
}

impl Out {
    /// A linear layer `name` (without `.weight`) of shape [out, inp]: a plain weight, or the
    /// quantized tensors of GPTQ/AWQ (scales in the weight dtype).
    fn linear(&mut self, q: Quant, name: &str, dt: Dtype, out: u64, inp: u64) -> Result<()> {
        let need = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(Error::config(
                    "quantization_config",
                    format!("packing/groups do not divide {name}: [{out}, {inp}]"),
                ))
            }
        };
        match q {
            Quant::None => self.push(format!("{name}.weight"), dt, &[out, inp]),
            Quant::Gptq { pf, g } => {
                need(inp % pf == 0 && out % pf == 0 && inp % g == 0)?;
                self.push(format!("{name}.qweight"), Dtype::I32, &[inp / pf, out]);
                self.push(format!("{name}.qzeros"), Dtype::I32, &[inp / g, out / pf]);
                self.push(format!("{name}.scales"), dt, &[inp / g, out]);
                self.push(format!("{name}.g_idx"), Dtype::I32, &[inp]);
            }
            Quant::Awq { pf, g } => {
                need(out % pf == 0 && inp % g == 0)?;
                self.push(format!("{name}.qweight"), Dtype::I32, &[inp, out / pf]);
                self.push(format!("{name}.qzeros"), Dtype::I32, &[inp / g, out / pf]);
                self.push(format!("{name}.scales"), dt, &[inp / g, out]);
            }
        }
        Ok(())
    }
}

/// Llama, Mistral, Qwen2, Phi-3, Mixtral and Qwen2-MoE: `model.layers.N.*` decoder layers.
/// Llama, Mistral and Qwen2 may be GPTQ/AWQ-quantized (`quantization_config`).
fn dense_family(arch: Arch, cfg: &Value, dt: Dtype, o: &mut Out) -> Result<()> {
    let quant = quant_of(cfg)?;
    if quant != Quant::None && !matches!(arch, Arch::Llama | Arch::Mistral | Arch::Qwen2) {
        return Err(Error::config(
            "quantization_config",
            format!(
                "GPTQ/AWQ checkpoints are generated for Llama, Mistral and Qwen2 only, not {}",
                arch.hf_architecture()
            ),
        ));
    }
    let (h, nh, nkv, hd) = attn_dims(cfg)?;
    let v = cfg_u64(cfg, "vocab_size")?;
    let layers = cfg_u64(cfg, "num_hidden_layers")?;
    let tied = cfg_bool(cfg, "tie_word_embeddings", false)?;
    let q_rows = mul(nh, hd, "num_attention_heads × head_dim")?;
    let kv_rows = mul(nkv, hd, "num_key_value_heads × head_dim")?;
    // Some Llama checkpoints carry the rotary buffer; the synthetic config asks for it.
    let inv_freq = cfg_bool(cfg, "_synth_rotary_inv_freq", false)?;
    o.push("model.embed_tokens.weight", dt, &[v, h]);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        if arch == Arch::Phi3 {
            let rows = q_rows + 2 * kv_rows;
            o.push(format!("{p}.self_attn.qkv_proj.weight"), dt, &[rows, h]);
        } else {
            for (n, rows) in [("q", q_rows), ("k", kv_rows), ("v", kv_rows)] {
                o.linear(quant, &format!("{p}.self_attn.{n}_proj"), dt, rows, h)?;
                if matches!(arch, Arch::Qwen2 | Arch::Qwen2Moe) {
                    o.push(format!("{p}.self_attn.{n}_proj.bias"), dt, &[rows]);
                }
            }
        }
        o.linear(quant, &format!("{p}.self_attn.o_proj"), dt, h, q_rows)?;
        if inv_freq {
            o.push(
                format!("{p}.self_attn.rotary_emb.inv_freq"),
                Dtype::F32,
                &[hd / 2],
            );
        }
        match arch {
            Arch::Mixtral => {
                let e = cfg_u64(cfg, "num_local_experts")?;
                let i = cfg_u64(cfg, "intermediate_size")?;
                o.push(format!("{p}.block_sparse_moe.gate.weight"), dt, &[e, h]);
                for x in 0..e {
                    let q = format!("{p}.block_sparse_moe.experts.{x}");
                    o.push(format!("{q}.w1.weight"), dt, &[i, h]);
                    o.push(format!("{q}.w2.weight"), dt, &[h, i]);
                    o.push(format!("{q}.w3.weight"), dt, &[i, h]);
                }
            }
            Arch::Qwen2Moe => {
                let e = cfg_u64(cfg, "num_experts")?;
                let i = cfg_u64(cfg, "moe_intermediate_size")?;
                let si = cfg_u64(cfg, "shared_expert_intermediate_size")?;
                o.push(format!("{p}.mlp.gate.weight"), dt, &[e, h]);
                for x in 0..e {
                    let q = format!("{p}.mlp.experts.{x}");
                    o.push(format!("{q}.gate_proj.weight"), dt, &[i, h]);
                    o.push(format!("{q}.up_proj.weight"), dt, &[i, h]);
                    o.push(format!("{q}.down_proj.weight"), dt, &[h, i]);
                }
                o.push(
                    format!("{p}.mlp.shared_expert.gate_proj.weight"),
                    dt,
                    &[si, h],
                );
                o.push(
                    format!("{p}.mlp.shared_expert.up_proj.weight"),
                    dt,
                    &[si, h],
                );
                o.push(
                    format!("{p}.mlp.shared_expert.down_proj.weight"),
                    dt,
                    &[h, si],
                );
                o.push(format!("{p}.mlp.shared_expert_gate.weight"), dt, &[1, h]);
            }
            Arch::Phi3 => {
                let i = cfg_u64(cfg, "intermediate_size")?;
                o.push(format!("{p}.mlp.gate_up_proj.weight"), dt, &[2 * i, h]);
                o.push(format!("{p}.mlp.down_proj.weight"), dt, &[h, i]);
            }
            _ => {
                let i = cfg_u64(cfg, "intermediate_size")?;
                o.linear(quant, &format!("{p}.mlp.gate_proj"), dt, i, h)?;
                o.linear(quant, &format!("{p}.mlp.up_proj"), dt, i, h)?;
                o.linear(quant, &format!("{p}.mlp.down_proj"), dt, h, i)?;
            }
        }
        o.push(format!("{p}.input_layernorm.weight"), dt, &[h]);
        o.push(format!("{p}.post_attention_layernorm.weight"), dt, &[h]);
    }
    o.push("model.norm.weight", dt, &[h]);
    if !tied {
        o.push("lm_head.weight", dt, &[v, h]);
    }
    Ok(())
}

/// DeepSeek-V3: MLA attention, FP8 (F8_E4M3) weights with F32 `weight_scale_inv` block
/// scales, the first `first_k_dense_replace` layers dense, then MoE layers, then
/// `num_nextn_predict_layers` multi-token-prediction layers with their extra tensors.
fn deepseek_v3(cfg: &Value, dt: Dtype, o: &mut Out) -> Result<()> {
    let h = cfg_u64(cfg, "hidden_size")?;
    let v = cfg_u64(cfg, "vocab_size")?;
    let layers = cfg_u64(cfg, "num_hidden_layers")?;
    let mtp = cfg_opt_u64(cfg, "num_nextn_predict_layers")?.unwrap_or(0);
    let nh = cfg_u64(cfg, "num_attention_heads")?;
    let q_lora = cfg_u64(cfg, "q_lora_rank")?;
    let kv_lora = cfg_u64(cfg, "kv_lora_rank")?;
    let nope = cfg_u64(cfg, "qk_nope_head_dim")?;
    let rope = cfg_u64(cfg, "qk_rope_head_dim")?;
    let vhd = cfg_u64(cfg, "v_head_dim")?;
    let inter = cfg_u64(cfg, "intermediate_size")?;
    let moe_i = cfg_u64(cfg, "moe_intermediate_size")?;
    let e = cfg_u64(cfg, "n_routed_experts")?;
    let shared = cfg_opt_u64(cfg, "n_shared_experts")?.unwrap_or(0);
    let dense = cfg_u64(cfg, "first_k_dense_replace")?;
    let tied = cfg_bool(cfg, "tie_word_embeddings", false)?;
    let (bo, bi) = block_size(cfg)?;
    let f8 = Dtype::F8_E4M3;
    // An FP8 linear weight [out, in] and its block scales.
    let fp8 = |o: &mut Out, name: String, out: u64, inp: u64| {
        o.push(format!("{name}.weight"), f8, &[out, inp]);
        o.push(
            format!("{name}.weight_scale_inv"),
            Dtype::F32,
            &[blocks(out, bo), blocks(inp, bi)],
        );
    };
    o.push("model.embed_tokens.weight", dt, &[v, h]);
    for l in 0..layers + mtp {
        let p = format!("model.layers.{l}");
        let is_mtp = l >= layers;
        if is_mtp {
            o.push(format!("{p}.embed_tokens.weight"), dt, &[v, h]);
            o.push(format!("{p}.enorm.weight"), dt, &[h]);
            o.push(format!("{p}.hnorm.weight"), dt, &[h]);
            o.push(format!("{p}.eh_proj.weight"), dt, &[h, 2 * h]);
        }
        o.push(format!("{p}.input_layernorm.weight"), dt, &[h]);
        fp8(o, format!("{p}.self_attn.q_a_proj"), q_lora, h);
        o.push(format!("{p}.self_attn.q_a_layernorm.weight"), dt, &[q_lora]);
        fp8(
            o,
            format!("{p}.self_attn.q_b_proj"),
            nh * (nope + rope),
            q_lora,
        );
        fp8(
            o,
            format!("{p}.self_attn.kv_a_proj_with_mqa"),
            kv_lora + rope,
            h,
        );
        o.push(
            format!("{p}.self_attn.kv_a_layernorm.weight"),
            dt,
            &[kv_lora],
        );
        fp8(
            o,
            format!("{p}.self_attn.kv_b_proj"),
            nh * (nope + vhd),
            kv_lora,
        );
        fp8(o, format!("{p}.self_attn.o_proj"), h, nh * vhd);
        o.push(format!("{p}.post_attention_layernorm.weight"), dt, &[h]);
        if l < dense {
            fp8(o, format!("{p}.mlp.gate_proj"), inter, h);
            fp8(o, format!("{p}.mlp.up_proj"), inter, h);
            fp8(o, format!("{p}.mlp.down_proj"), h, inter);
        } else {
            o.push(format!("{p}.mlp.gate.weight"), dt, &[e, h]);
            o.push(
                format!("{p}.mlp.gate.e_score_correction_bias"),
                Dtype::F32,
                &[e],
            );
            for x in 0..e {
                let q = format!("{p}.mlp.experts.{x}");
                fp8(o, format!("{q}.gate_proj"), moe_i, h);
                fp8(o, format!("{q}.up_proj"), moe_i, h);
                fp8(o, format!("{q}.down_proj"), h, moe_i);
            }
            if shared > 0 {
                let si = shared * moe_i;
                fp8(o, format!("{p}.mlp.shared_experts.gate_proj"), si, h);
                fp8(o, format!("{p}.mlp.shared_experts.up_proj"), si, h);
                fp8(o, format!("{p}.mlp.shared_experts.down_proj"), h, si);
            }
        }
        if is_mtp {
            o.push(format!("{p}.shared_head.norm.weight"), dt, &[h]);
            o.push(format!("{p}.shared_head.head.weight"), dt, &[v, h]);
        }
    }
    o.push("model.norm.weight", dt, &[h]);
    if !tied {
        o.push("lm_head.weight", dt, &[v, h]);
    }
    Ok(())
}

/// `quantization_config.weight_block_size` (default [128, 128]).
fn block_size(cfg: &Value) -> Result<(u64, u64)> {
    let Some(b) = cfg
        .get("quantization_config")
        .and_then(|q| q.get("weight_block_size"))
    else {
        return Ok((128, 128));
    };
    match b.as_array().map(|a| a.as_slice()) {
        Some([x, y]) => match (x.as_u64(), y.as_u64()) {
            (Some(x), Some(y)) if x > 0 && y > 0 => Ok((x, y)),
            _ => Err(block_size_error(b)),
        },
        _ => Err(block_size_error(b)),
    }
}

fn block_size_error(b: &Value) -> Error {
    Error::config(
        "quantization_config.weight_block_size",
        format!("must be two positive integers, got {b}"),
    )
}

/// GPT-2: Conv1D weights stored [in, out]; `attn.bias` causal-mask buffers; tied `wte`.
/// The optional config key `_synth_name_prefix` (e.g. `"transformer."`, as in distilgpt2's
/// files) prefixes every name; with a prefix the old `attn.masked_bias` scalar is written too.
fn gpt2(cfg: &Value, dt: Dtype, o: &mut Out) -> Result<()> {
    let h = cfg_u64(cfg, "n_embd")?;
    let layers = cfg_u64(cfg, "n_layer")?;
    let v = cfg_u64(cfg, "vocab_size")?;
    let pos = cfg_u64(cfg, "n_positions")?;
    let inner = cfg_opt_u64(cfg, "n_inner")?.unwrap_or(4 * h);
    let pre = cfg
        .get("_synth_name_prefix")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    o.push(format!("{pre}wte.weight"), dt, &[v, h]);
    o.push(format!("{pre}wpe.weight"), dt, &[pos, h]);
    for l in 0..layers {
        let p = format!("{pre}h.{l}");
        o.push(format!("{p}.ln_1.weight"), dt, &[h]);
        o.push(format!("{p}.ln_1.bias"), dt, &[h]);
        o.push(format!("{p}.attn.bias"), dt, &[1, 1, pos, pos]);
        if !pre.is_empty() {
            o.push(format!("{p}.attn.masked_bias"), dt, &[]);
        }
        o.push(format!("{p}.attn.c_attn.weight"), dt, &[h, 3 * h]);
        o.push(format!("{p}.attn.c_attn.bias"), dt, &[3 * h]);
        o.push(format!("{p}.attn.c_proj.weight"), dt, &[h, h]);
        o.push(format!("{p}.attn.c_proj.bias"), dt, &[h]);
        o.push(format!("{p}.ln_2.weight"), dt, &[h]);
        o.push(format!("{p}.ln_2.bias"), dt, &[h]);
        o.push(format!("{p}.mlp.c_fc.weight"), dt, &[h, inner]);
        o.push(format!("{p}.mlp.c_fc.bias"), dt, &[inner]);
        o.push(format!("{p}.mlp.c_proj.weight"), dt, &[inner, h]);
        o.push(format!("{p}.mlp.c_proj.bias"), dt, &[h]);
    }
    o.push(format!("{pre}ln_f.weight"), dt, &[h]);
    o.push(format!("{pre}ln_f.bias"), dt, &[h]);
    Ok(())
}
