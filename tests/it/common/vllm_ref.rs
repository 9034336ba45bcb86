//! An independent reference of what each rank holds under vLLM, written straight from
//! `partition-rules.md` (vLLM `linear.py`, `vocab_parallel_embedding.py`, `fused_moe`,
//! `distributed/utils.py::get_pp_indices`), one function per architecture. It does not use
//! the spec engine, the planner or `Topology::stage_layer_counts`, so tests can check those
//! against it.
//!
//! Conventions:
//! - Per source tensor: a merged vLLM parameter (gate_up_proj from separate gate/up tensors,
//!   qkv_proj from q/k/v) is described by the slice each source tensor contributes; fused
//!   source tensors (Phi-3 `qkv_proj`, `gate_up_proj`, GPT-2 `c_attn`) by their parts.
//! - Global rank = (dp_rank * pp + pp_rank) * tp + tp_rank. DP replicas hold what dp_rank 0
//!   holds, except experts under expert parallelism (ep = tp * dp, ep_rank = dp_rank * tp +
//!   tp_rank, `linear` placement: contiguous blocks, remainder to the first ranks).
//! - Pipeline: vLLM's `get_pp_indices` for the layers; the other modules as vLLM 0.33's
//!   model classes build them (checked against the real vLLM by tests/vllm/differential.py):
//!   - `LlamaModel` (Llama, Mistral, Phi-3), `Qwen2Model`: embeddings on the first stage,
//!     final norm and lm_head on the last (`PPMissingLayer` elsewhere), the embeddings also
//!     on the last when tied.
//!   - `Qwen3Model` is a `Qwen2Model` (Qwen3: q_norm/k_norm replicated).
//!   - `MixtralModel`, `Qwen2MoeModel`, `Qwen3MoeModel`, GPT-2 (`wte`, `wpe`, `ln_f`,
//!     `lm_head`): embeddings, final norm and lm_head on every stage.
//!   - `DeepseekV2Model`: embeddings first, norm and lm_head last, never tied.
//!   - Tied config with a stored `lm_head.weight` (the config key `_checkpoint_has_lm_head`
//!     says so; synthetic tied checkpoints store none): vLLM unties and loads the head.

use safeshard::checkpoint::Dtype;
use safeshard::topology::Topology;
use serde_json::Value;

/// The vLLM 0.33 model classes this reference knows, from config.json's `architectures`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM`, `MistralForCausalLM`.
    Llama,
    /// `Qwen2ForCausalLM`.
    Qwen2,
    /// `Phi3ForCausalLM`.
    Phi3,
    /// `MixtralForCausalLM`.
    Mixtral,
    /// `Qwen2MoeForCausalLM`.
    Qwen2Moe,
    /// `Qwen3ForCausalLM` (`qwen3.py`: Qwen2Model with q_norm/k_norm).
    Qwen3,
    /// `Qwen3MoeForCausalLM` (`qwen3_moe.py`).
    Qwen3Moe,
    /// `DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`.
    DeepseekV3,
    /// `GPT2LMHeadModel`.
    Gpt2,
}

impl Arch {
    /// The model class of a config (its first `architectures` entry).
    pub fn of(cfg: &Value) -> Result<Arch, String> {
        let name = cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .ok_or("config has no architectures")?;
        Ok(match name {
            "LlamaForCausalLM" | "MistralForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Phi3ForCausalLM" => Arch::Phi3,
            "MixtralForCausalLM" => Arch::Mixtral,
            "Qwen2MoeForCausalLM" => Arch::Qwen2Moe,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            "Qwen3MoeForCausalLM" => Arch::Qwen3Moe,
            "DeepseekV2ForCausalLM" | "DeepseekV3ForCausalLM" => Arch::DeepseekV3,
            "GPT2LMHeadModel" => Arch::Gpt2,
            other => return Err(format!("no reference for {other}")),
        })
    }
}

/// vLLM pads the vocabulary to a multiple of this (`DEFAULT_VOCAB_PADDING_SIZE`).
pub const VOCAB_PAD: u64 = 64;
/// DeepSeek-V3 FP8 block size (`weight_block_size` [128, 128]).
pub const BLOCK: u64 = 128;

/// One piece of a rank-local tensor along the concatenation dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Indices `start..start + len` of the full tensor along the dimension.
    Take {
        /// First index.
        start: u64,
        /// Number of indices.
        len: u64,
    },
    /// `n` indices of zeros (vocab padding).
    Zeros(u64),
}

/// What a rank holds of one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefSlice {
    /// The whole tensor.
    Full,
    /// Pieces concatenated along `dim` (other dims whole).
    Cat {
        /// Dimension.
        dim: usize,
        /// Pieces in order.
        parts: Vec<Part>,
    },
}

fn take(start: u64, len: u64) -> Part {
    Part::Take { start, len }
}

fn cat(dim: usize, parts: Vec<Part>) -> RefSlice {
    RefSlice::Cat { dim, parts }
}

/// Rank-local shape of a slice.
pub fn local_shape(shape: &[u64], s: &RefSlice) -> Vec<u64> {
    match s {
        RefSlice::Full => shape.to_vec(),
        RefSlice::Cat { dim, parts } => {
            let mut v = shape.to_vec();
            v[*dim] = parts
                .iter()
                .map(|p| match p {
                    Part::Take { len, .. } => *len,
                    Part::Zeros(n) => *n,
                })
                .sum();
            v
        }
    }
}

/// Bytes a rank holds of a tensor (zero padding included).
pub fn local_bytes(dtype: Dtype, shape: &[u64], s: &RefSlice) -> u64 {
    let n: u64 = local_shape(shape, s).iter().product();
    dtype.byte_size(n).expect("whole bytes")
}

/// The rank-local bytes of a slice, zero padding included, from the full tensor's bytes.
pub fn materialize(full: &[u8], dtype: Dtype, shape: &[u64], s: &RefSlice) -> Vec<u8> {
    let esize = (dtype.bits() / 8) as usize;
    assert!(
        dtype.bits() % 8 == 0,
        "materialize: sub-byte dtypes not supported"
    );
    assert_eq!(
        full.len() as u64,
        shape.iter().product::<u64>() * esize as u64
    );
    match s {
        RefSlice::Full => full.to_vec(),
        RefSlice::Cat { dim, parts } => {
            let outer: u64 = shape[..*dim].iter().product();
            let d = shape[*dim];
            let inner = shape[dim + 1..].iter().product::<u64>() as usize * esize;
            let mut out = Vec::new();
            for o in 0..outer {
                for p in parts {
                    match p {
                        Part::Take { start, len } => {
                            assert!(start + len <= d, "slice past dim {dim}: {p:?} of {d}");
                            let b = ((o * d + start) as usize) * inner;
                            out.extend_from_slice(&full[b..b + *len as usize * inner]);
                        }
                        Part::Zeros(n) => out.resize(out.len() + *n as usize * inner, 0),
                    }
                }
            }
            out
        }
    }
}

/// vLLM's `get_pp_indices`, as layer counts per stage: base = L // pp, and for the
/// remainder k, `partitions[-i] += 1` for i in 2..k+1 (the last stage never gets one).
pub fn pp_counts(layers: u64, pp: u64, explicit: Option<&[usize]>) -> Result<Vec<u64>, String> {
    if let Some(e) = explicit {
        let v: Vec<u64> = e.iter().map(|&x| x as u64).collect();
        if v.iter().sum::<u64>() != layers || v.len() as u64 != pp {
            return Err(format!(
                "explicit partition {v:?} does not cover {layers} layers in {pp} stages"
            ));
        }
        return Ok(v);
    }
    if pp > layers {
        return Err(format!("{pp} stages for {layers} layers"));
    }
    let mut parts = vec![layers / pp; pp as usize];
    let k = (layers % pp) as usize;
    let n = parts.len();
    for i in 2..k + 2 {
        parts[n - i] += 1;
    }
    Ok(parts)
}

/// Stage of a layer index.
fn stage_of(layer: u64, counts: &[u64]) -> usize {
    let mut end = 0;
    for (s, c) in counts.iter().enumerate() {
        end += c;
        if layer < end {
            return s;
        }
    }
    counts.len() - 1
}

fn cfg_u(cfg: &Value, k: &str) -> Result<u64, String> {
    cfg.get(k)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("config has no integer {k}"))
}

fn cfg_tied(cfg: &Value, default: bool) -> bool {
    cfg.get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(default)
}

/// Contiguous split of `n` into `tp` equal parts (must divide): rank r's piece.
fn even(n: u64, tp: u64, r: u64, what: &str) -> Result<Part, String> {
    if n % tp != 0 {
        return Err(format!("{what}: {n} does not divide by tp {tp}"));
    }
    Ok(take(r * (n / tp), n / tp))
}

/// What a TP rank holds of a tensor, ignoring stages: `None` = skipped (not loaded).
type Rule = Box<dyn Fn(u64, u64) -> Result<Option<RefSlice>, String>>;

fn column(shape: &[u64], name: &str) -> Rule {
    let (n, name) = (shape[0], name.to_string());
    Box::new(move |tp, r| Ok(Some(cat(0, vec![even(n, tp, r, &name)?]))))
}

fn split_dim(shape: &[u64], dim: usize, name: &str) -> Rule {
    let (n, name) = (shape[dim], name.to_string());
    Box::new(move |tp, r| Ok(Some(cat(dim, vec![even(n, tp, r, &name)?]))))
}

fn replicate() -> Rule {
    Box::new(|_, _| Ok(Some(RefSlice::Full)))
}

fn skip() -> Rule {
    Box::new(|_, _| Ok(None))
}

/// Vocab-parallel embedding / lm_head: pad V to a multiple of 64, per = Vp / tp rows.
fn vocab(shape: &[u64]) -> Rule {
    let v = shape[0];
    Box::new(move |tp, r| {
        let vp = v.div_ceil(VOCAB_PAD) * VOCAB_PAD;
        if vp % tp != 0 {
            return Err(format!("padded vocab {vp} does not divide by tp {tp}"));
        }
        let per = vp / tp;
        let a = (r * per).min(v);
        let b = ((r + 1) * per).min(v);
        let mut parts = Vec::new();
        if b > a {
            parts.push(take(a, b - a));
        }
        if per > b - a {
            parts.push(Part::Zeros(per - (b - a)));
        }
        Ok(Some(cat(0, parts)))
    })
}

/// The kv-head piece of rank r: one head `r / (tp / nkv)` when tp >= nkv, else nkv/tp heads.
fn kv_part(nkv: u64, hd: u64, tp: u64, r: u64, base: u64) -> Result<Part, String> {
    if tp >= nkv {
        if tp % nkv != 0 {
            return Err(format!("tp {tp} is not a multiple of {nkv} kv heads"));
        }
        let head = r / (tp / nkv);
        Ok(take(base + head * hd, hd))
    } else {
        if nkv % tp != 0 {
            return Err(format!("{nkv} kv heads do not divide by tp {tp}"));
        }
        let per = nkv / tp;
        Ok(take(base + r * per * hd, per * hd))
    }
}

/// Attention dims (nh, nkv, hd) of Llama-like configs.
fn attn(cfg: &Value) -> Result<(u64, u64, u64), String> {
    let h = cfg_u(cfg, "hidden_size")?;
    let nh = cfg_u(cfg, "num_attention_heads")?;
    let nkv = cfg_u(cfg, "num_key_value_heads").unwrap_or(nh);
    let hd = cfg_u(cfg, "head_dim").unwrap_or(h / nh);
    Ok((nh, nkv, hd))
}

/// Block-scale companion of a column- or row-split FP8 weight: the scale's rows (column) or
/// columns (row) in 128-block units. vLLM requires each partition to be whole blocks.
fn block_scale(weight_extent: u64, dim: usize, name: &str) -> Rule {
    let name = name.to_string();
    Box::new(move |tp, r| {
        if weight_extent % tp != 0 {
            return Err(format!(
                "{name}: {weight_extent} does not divide by tp {tp}"
            ));
        }
        let per = weight_extent / tp;
        if tp > 1 && per % BLOCK != 0 {
            return Err(format!(
                "{name}: partition {per} is not a multiple of the {BLOCK} block (vLLM refuses)"
            ));
        }
        let blocks = per.div_ceil(BLOCK);
        Ok(Some(cat(dim, vec![take(r * blocks, blocks)])))
    })
}

/// The layer index in `model.layers.N.` / `h.N.` names.
fn layer_of(name: &str) -> Option<u64> {
    let rest = name
        .strip_prefix("model.layers.")
        .or_else(|| name.strip_prefix("h."))?;
    rest.split('.').next()?.parse().ok()
}

/// Where a tensor lives in the pipeline.
enum Stage {
    Layer(u64),
    First,
    Last,
    FirstAndLast,
    All,
    Skip,
}

/// Expert index in `...experts.E....` names.
fn expert_of(name: &str) -> Option<u64> {
    let i = name.find(".experts.")?;
    name[i + 9..].split('.').next()?.parse().ok()
}

/// How whole experts are placed over EP ranks (vLLM `--expert-placement-strategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Contiguous blocks, the remainder to the first ranks (vLLM's default).
    Linear,
    /// Rank r holds experts r, r + ep, r + 2 ep, ...
    RoundRobin,
}

/// The EP rank holding expert `e` of `n` over `ep` ranks.
pub fn expert_owner(e: u64, n: u64, ep: u64, placement: Placement) -> u64 {
    match placement {
        Placement::RoundRobin => e % ep,
        Placement::Linear => {
            let (base, rem) = (n / ep, n % ep);
            // The first `rem` ranks hold base + 1 experts.
            let big = rem * (base + 1);
            if e < big {
                e / (base + 1)
            } else {
                rem + (e - big) / base.max(1)
            }
        }
    }
}

/// What each global rank holds of tensor `name` (full `shape`) under vLLM: (rank, slice)
/// for every rank that holds some of it, in rank order. An empty list means no rank loads it.
/// Experts under expert parallelism use the `linear` placement.
pub fn expected(
    cfg: &Value,
    topo: &Topology,
    name: &str,
    dtype: Dtype,
    shape: &[u64],
) -> Result<Vec<(usize, RefSlice)>, String> {
    expected_placed(cfg, topo, name, dtype, shape, Placement::Linear)
}

/// [`expected`] with a choice of expert placement.
pub fn expected_placed(
    cfg: &Value,
    topo: &Topology,
    name: &str,
    dtype: Dtype,
    shape: &[u64],
    placement: Placement,
) -> Result<Vec<(usize, RefSlice)>, String> {
    let _ = dtype;
    let arch = Arch::of(cfg)?;
    let gpt2 = arch == Arch::Gpt2;
    let layers = if gpt2 {
        cfg_u(cfg, "n_layer")?
    } else {
        cfg_u(cfg, "num_hidden_layers")?
    };
    let local = if gpt2 {
        name.strip_prefix("transformer.").unwrap_or(name)
    } else {
        name
    };
    let stored_head = cfg
        .get("_checkpoint_has_lm_head")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // vLLM 0.33 unties a tied config whose checkpoint stores lm_head; DeepSeek never ties.
    let tied = cfg_tied(cfg, gpt2) && !stored_head && arch != Arch::DeepseekV3;
    let everywhere = matches!(
        arch,
        Arch::Mixtral | Arch::Qwen2Moe | Arch::Qwen3Moe | Arch::Gpt2
    );
    // vLLM: "Total number of attention heads must be divisible by tensor parallel size".
    let heads = cfg_u(
        cfg,
        if gpt2 {
            "n_head"
        } else {
            "num_attention_heads"
        },
    )?;
    if heads % topo.tp as u64 != 0 {
        return Err(format!(
            "{heads} attention heads do not divide by tp {}",
            topo.tp
        ));
    }
    // Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock: "Tensor parallel size ... is greater
    // than the number of experts".
    if matches!(arch, Arch::Qwen2Moe | Arch::Qwen3Moe) && topo.tp as u64 > num_experts(arch, cfg)? {
        return Err(format!("tp {} is more than num_experts", topo.tp));
    }
    let stage = match layer_of(local) {
        Some(l) if l >= layers => {
            if arch == Arch::DeepseekV3 {
                Stage::Skip // the MTP layer is not part of vLLM's main model
            } else {
                return Err(format!("{name}: layer {l} past num_hidden_layers {layers}"));
            }
        }
        Some(l) => Stage::Layer(l),
        None => match local {
            "model.embed_tokens.weight"
            | "wte.weight"
            | "wpe.weight"
            | "model.norm.weight"
            | "lm_head.weight"
            | "ln_f.weight"
            | "ln_f.bias"
                if everywhere =>
            {
                Stage::All
            }
            "model.embed_tokens.weight" => {
                if tied {
                    Stage::FirstAndLast
                } else {
                    Stage::First
                }
            }
            "model.norm.weight" | "lm_head.weight" => Stage::Last,
            _ => return Err(format!("{name}: no reference rule")),
        },
    };
    if matches!(stage, Stage::Skip) {
        return Ok(Vec::new());
    }
    let rule: Rule = match arch {
        Arch::Gpt2 => gpt2_rule(cfg, local, shape)?,
        Arch::DeepseekV3 => deepseek_rule(cfg, local, shape)?,
        _ => llama_family_rule(arch, cfg, local, shape)?,
    };
    let expert = expert_of(local);
    let (tp, pp, dp) = (topo.tp as u64, topo.pp as u64, topo.dp as u64);
    let counts = pp_counts(layers, pp, topo.pp_layers.as_deref())?;
    let holds_stage = |p: u64| -> bool {
        match stage {
            Stage::Layer(l) => stage_of(l, &counts) as u64 == p,
            Stage::First => p == 0,
            Stage::Last => p == pp - 1,
            Stage::FirstAndLast => p == 0 || p == pp - 1,
            Stage::All => true,
            Stage::Skip => false,
        }
    };
    let mut out = Vec::new();
    for d in 0..dp {
        for p in 0..pp {
            if !holds_stage(p) {
                continue;
            }
            for t in 0..tp {
                let rank = ((d * pp + p) * tp + t) as usize;
                let slice = match (expert, topo.ep > 1) {
                    (Some(e), true) => {
                        // Expert parallel: whole experts, linear placement over ep = tp * dp.
                        let ep = tp * dp;
                        let n = num_experts(arch, cfg)?;
                        let ep_rank = d * tp + t;
                        if e >= n {
                            return Err(format!("{name}: expert {e} of {n}"));
                        }
                        if expert_owner(e, n, ep, placement) == ep_rank {
                            Some(RefSlice::Full)
                        } else {
                            None
                        }
                    }
                    _ => rule(tp, t)?,
                };
                if let Some(s) = slice {
                    out.push((rank, s));
                }
            }
        }
    }
    Ok(out)
}

fn num_experts(arch: Arch, cfg: &Value) -> Result<u64, String> {
    match arch {
        Arch::Mixtral => cfg_u(cfg, "num_local_experts"),
        Arch::Qwen2Moe | Arch::Qwen3Moe => cfg_u(cfg, "num_experts"),
        Arch::DeepseekV3 => cfg_u(cfg, "n_routed_experts"),
        _ => Err(format!("{arch:?} has no experts")),
    }
}

/// Llama, Mistral, Qwen2, Phi-3, Mixtral, Qwen2-MoE, Qwen3, Qwen3-MoE.
fn llama_family_rule(arch: Arch, cfg: &Value, name: &str, shape: &[u64]) -> Result<Rule, String> {
    let (nh, nkv, hd) = attn(cfg)?;
    let tail = match layer_of(name) {
        Some(l) => name
            .strip_prefix(&format!("model.layers.{l}."))
            .unwrap_or(name),
        None => name,
    };
    let n = name.to_string();
    if matches!(name, "model.embed_tokens.weight" | "lm_head.weight") {
        return Ok(vocab(shape));
    }
    if name == "model.norm.weight" {
        return Ok(replicate());
    }
    if let Some(r) = quantized_rule(cfg, tail, name, shape, nh, nkv, hd)? {
        return Ok(r);
    }
    let qwen3 = matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe);
    let attention_bias = cfg
        .get("attention_bias")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let rule: Rule = match tail {
        // Qwen3 without attention_bias: no bias parameter; AutoWeightsLoader ignores ".bias".
        "self_attn.q_proj.bias" | "self_attn.k_proj.bias" | "self_attn.v_proj.bias"
            if qwen3 && !attention_bias =>
        {
            skip()
        }
        "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => column(shape, name),
        "self_attn.k_proj.weight"
        | "self_attn.k_proj.bias"
        | "self_attn.v_proj.weight"
        | "self_attn.v_proj.bias" => {
            Box::new(move |tp, r| Ok(Some(cat(0, vec![kv_part(nkv, hd, tp, r, 0)?]))))
        }
        "self_attn.o_proj.weight" => split_dim(shape, 1, name),
        // Qwen3: an RMSNorm over each head's dims, the same weights on every rank.
        "self_attn.q_norm.weight" | "self_attn.k_norm.weight"
            if matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe) =>
        {
            replicate()
        }
        "self_attn.qkv_proj.weight" if arch == Arch::Phi3 => Box::new(move |tp, r| {
            // Fused on disk: cut by the global part sizes, then the qkv rule per part.
            let q = nh * hd;
            let kv = nkv * hd;
            let qp = even(q, tp, r, &n)?;
            Ok(Some(cat(
                0,
                vec![
                    qp,
                    kv_part(nkv, hd, tp, r, q)?,
                    kv_part(nkv, hd, tp, r, q + kv)?,
                ],
            )))
        }),
        "mlp.gate_up_proj.weight" if arch == Arch::Phi3 => {
            let i = shape[0] / 2;
            Box::new(move |tp, r| {
                let Part::Take { start, len } = even(i, tp, r, &n)? else {
                    unreachable!()
                };
                Ok(Some(cat(0, vec![take(start, len), take(i + start, len)])))
            })
        }
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => column(shape, name),
        "mlp.down_proj.weight" => split_dim(shape, 1, name),
        "input_layernorm.weight" | "post_attention_layernorm.weight" => replicate(),
        "self_attn.rotary_emb.inv_freq" => skip(),
        "block_sparse_moe.gate.weight" | "mlp.gate.weight" | "mlp.shared_expert_gate.weight" => {
            replicate()
        }
        "mlp.shared_expert.gate_proj.weight" | "mlp.shared_expert.up_proj.weight" => {
            column(shape, name)
        }
        "mlp.shared_expert.down_proj.weight" => split_dim(shape, 1, name),
        t if expert_of(name).is_some() => {
            // Experts under TP: w1/w3 (gate/up) dim 0, w2 (down) dim 1.
            if t.ends_with(".w1.weight")
                || t.ends_with(".w3.weight")
                || t.ends_with(".gate_proj.weight")
                || t.ends_with(".up_proj.weight")
            {
                column(shape, name)
            } else if t.ends_with(".w2.weight") || t.ends_with(".down_proj.weight") {
                split_dim(shape, 1, name)
            } else {
                return Err(format!("{name}: no reference rule"));
            }
        }
        _ => return Err(format!("{name}: no reference rule")),
    };
    Ok(rule)
}

/// Divides every piece by `unit` (packed or group units), refusing pieces that are not whole.
fn in_units(parts: Vec<Part>, unit: u64, what: &str) -> Result<Vec<Part>, String> {
    parts
        .into_iter()
        .map(|p| match p {
            Part::Take { start, len } if start % unit == 0 && len % unit == 0 => {
                Ok(take(start / unit, len / unit))
            }
            Part::Take { start, len } => Err(format!(
                "{what}: piece {start}+{len} is not a whole number of {unit}-units (vLLM refuses)"
            )),
            z => Ok(z),
        })
        .collect()
}

/// GPTQ / AWQ tensors of Llama-like linears (vLLM `gptq.py`, `awq.py`):
/// column layers split the output dim (dim 1; packed units for GPTQ qzeros and all AWQ
/// packed tensors); row layers split the input dim (dim 0; packed units for the GPTQ
/// qweight, group units for qzeros/scales, copied whole with desc_act). vLLM 0.33 loads no
/// GPTQ `g_idx`.
#[allow(clippy::too_many_arguments)]
fn quantized_rule(
    cfg: &Value,
    tail: &str,
    name: &str,
    shape: &[u64],
    nh: u64,
    nkv: u64,
    hd: u64,
) -> Result<Option<Rule>, String> {
    let Some((module, kind)) = tail.rsplit_once('.') else {
        return Ok(None);
    };
    // vLLM 0.33's GPTQ (AutoGPTQ) has no g_idx parameter: a stored one is not loaded.
    if kind == "g_idx" {
        return Ok(Some(skip()));
    }
    if !matches!(kind, "qweight" | "qzeros" | "scales") {
        return Ok(None);
    }
    let q = cfg
        .get("quantization_config")
        .ok_or_else(|| format!("{name}: quantized tensor without quantization_config"))?;
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    let gptq = match method {
        "gptq" => true,
        "awq" => false,
        m => return Err(format!("{name}: unsupported quant_method {m:?}")),
    };
    let bits = cfg_u(q, "bits")?;
    let pf = 32 / bits;
    let g = cfg_u(q, "group_size")?;
    let desc_act = q.get("desc_act").and_then(Value::as_bool).unwrap_or(false);
    // Logical [out, in] of the layer, from the stored tensor.
    let (out, inp) = match (gptq, kind) {
        (true, "qweight") => (shape[1], shape[0] * pf),
        (false, "qweight") => (shape[1] * pf, shape[0]),
        (_, "qzeros") => (shape[1] * pf, shape[0] * g),
        (_, "scales") => (shape[1], shape[0] * g),
        (_, _) => (0, shape[0]), // g_idx: only the input size matters
    };
    let n = name.to_string();
    let kind = kind.to_string();
    enum Cut {
        Q,
        Kv,
        Even,
        Row,
    }
    let cut = match module {
        "self_attn.q_proj" => Cut::Q,
        "self_attn.k_proj" | "self_attn.v_proj" => Cut::Kv,
        "mlp.gate_proj" | "mlp.up_proj" => Cut::Even,
        "self_attn.o_proj" | "mlp.down_proj" => Cut::Row,
        _ => return Err(format!("{name}: no reference rule")),
    };
    let _ = nh;
    Ok(Some(match cut {
        Cut::Row => Box::new(move |tp, r| {
            // The input dim is split: pieces in input features first.
            let p = even(inp, tp, r, &n)?;
            let s = match (gptq, kind.as_str()) {
                (true, "qweight") => cat(0, in_units(vec![p], pf, &n)?),
                (false, "qweight") | (true, "g_idx") => cat(0, vec![p]),
                (_, "qzeros") | (_, "scales") if gptq && desc_act => RefSlice::Full,
                (_, "qzeros") | (_, "scales") => cat(0, in_units(vec![p], g, &n)?),
                _ => return Err(format!("{n}: no reference rule")),
            };
            Ok(Some(s))
        }),
        cut => Box::new(move |tp, r| {
            // The output dim is split: pieces in output features first.
            let p = match cut {
                Cut::Kv => kv_part(nkv, hd, tp, r, 0)?,
                _ => even(out, tp, r, &n)?,
            };
            let s = match (gptq, kind.as_str()) {
                (_, "g_idx") => RefSlice::Full,
                (_, "scales") | (true, "qweight") => cat(1, vec![p]),
                (_, "qzeros") | (false, "qweight") => cat(1, in_units(vec![p], pf, &n)?),
                _ => return Err(format!("{n}: no reference rule")),
            };
            Ok(Some(s))
        }),
    }))
}

/// DeepSeek-V2/V3 (main model layers; the MTP layer is skipped before this). FP8 block
/// quantization (`quant_method` "fp8") needs whole 128-blocks per partition; bf16 does not.
fn deepseek_rule(cfg: &Value, name: &str, shape: &[u64]) -> Result<Rule, String> {
    let fp8 = cfg
        .get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str)
        == Some("fp8");
    if matches!(name, "model.embed_tokens.weight" | "lm_head.weight") {
        return Ok(vocab(shape));
    }
    if name == "model.norm.weight" {
        return Ok(replicate());
    }
    let tail = match layer_of(name) {
        Some(l) => name
            .strip_prefix(&format!("model.layers.{l}."))
            .unwrap_or(name),
        None => name,
    };
    // Column/row kind of each FP8 linear (by its module path).
    let module = tail
        .strip_suffix(".weight_scale_inv")
        .or_else(|| tail.strip_suffix(".weight"))
        .unwrap_or(tail);
    let is_scale = tail.ends_with(".weight_scale_inv");
    enum K {
        Rep,
        Col,
        Row,
    }
    let kind = match module {
        "input_layernorm"
        | "post_attention_layernorm"
        | "self_attn.q_a_layernorm"
        | "self_attn.kv_a_layernorm"
        | "self_attn.q_a_proj"
        | "self_attn.kv_a_proj_with_mqa"
        | "mlp.gate"
        | "mlp.gate.e_score_correction_bias" => K::Rep,
        // q_proj: DeepSeek-V2-Lite style, without q_lora_rank.
        "self_attn.q_b_proj" | "self_attn.kv_b_proj" | "self_attn.q_proj" => K::Col,
        "self_attn.o_proj" => K::Row,
        "mlp.gate_proj"
        | "mlp.up_proj"
        | "mlp.shared_experts.gate_proj"
        | "mlp.shared_experts.up_proj" => K::Col,
        "mlp.down_proj" | "mlp.shared_experts.down_proj" => K::Row,
        m if expert_of(name).is_some() => {
            if m.ends_with(".gate_proj") || m.ends_with(".up_proj") {
                K::Col
            } else if m.ends_with(".down_proj") {
                K::Row
            } else {
                return Err(format!("{name}: no reference rule"));
            }
        }
        _ => return Err(format!("{name}: no reference rule")),
    };
    if tail == "mlp.gate.e_score_correction_bias" {
        return Ok(replicate());
    }
    Ok(match (kind, is_scale) {
        (K::Rep, _) => replicate(),
        (K::Col, false) if !fp8 => column(shape, name),
        (K::Row, false) if !fp8 => split_dim(shape, 1, name),
        (K::Col, false) => block_checked(shape, 0, name),
        (K::Row, false) => block_checked(shape, 1, name),
        // The scale's extent comes from the weight: ceil(out/128) rows, so the partition
        // in weight units is scale rows × 128 (exact when vLLM accepts the split).
        (K::Col, true) => block_scale(shape[0] * BLOCK, 0, name),
        (K::Row, true) => block_scale(shape[1] * BLOCK, 1, name),
    })
}

/// A column/row split of an FP8 weight, refused like vLLM when a partition is not whole blocks.
fn block_checked(shape: &[u64], dim: usize, name: &str) -> Rule {
    let (n, name) = (shape[dim], name.to_string());
    Box::new(move |tp, r| {
        let p = even(n, tp, r, &name)?;
        if tp > 1 && (n / tp) % BLOCK != 0 {
            return Err(format!(
                "{name}: partition {} is not a multiple of the {BLOCK} block (vLLM refuses)",
                n / tp
            ));
        }
        Ok(Some(cat(dim, vec![p])))
    })
}

/// GPT-2 (Conv1D weights [in, out]; names without the `transformer.` prefix).
fn gpt2_rule(cfg: &Value, name: &str, shape: &[u64]) -> Result<Rule, String> {
    let h = cfg_u(cfg, "n_embd")?;
    if name == "wte.weight" {
        return Ok(vocab(shape));
    }
    if matches!(name, "wpe.weight" | "ln_f.weight" | "ln_f.bias") {
        return Ok(replicate());
    }
    let tail = match layer_of(name) {
        Some(l) => name.strip_prefix(&format!("h.{l}.")).unwrap_or(name),
        None => name,
    };
    let n = name.to_string();
    Ok(match tail {
        "attn.c_attn.weight" | "attn.c_attn.bias" => {
            let dim = if tail.ends_with("weight") { 1 } else { 0 };
            Box::new(move |tp, r| {
                let mut parts = Vec::new();
                for k in 0..3 {
                    let Part::Take { start, len } = even(h, tp, r, &n)? else {
                        unreachable!()
                    };
                    parts.push(take(k * h + start, len));
                }
                Ok(Some(cat(dim, parts)))
            })
        }
        "attn.c_proj.weight" | "mlp.c_proj.weight" => split_dim(shape, 0, name),
        "attn.c_proj.bias" | "mlp.c_proj.bias" => replicate(),
        "mlp.c_fc.weight" => split_dim(shape, 1, name),
        "mlp.c_fc.bias" => split_dim(shape, 0, name),
        "ln_1.weight" | "ln_1.bias" | "ln_2.weight" | "ln_2.bias" => replicate(),
        "attn.bias" | "attn.masked_bias" => skip(),
        _ => return Err(format!("{name}: no reference rule")),
    })
}

/// Total bytes each global rank holds after loading, as vLLM would (zero padding included).
pub fn rank_bytes(
    cfg: &Value,
    topo: &Topology,
    tensors: &[(String, Dtype, Vec<u64>)],
) -> Result<Vec<u64>, String> {
    let world = topo.tp * topo.pp * topo.dp;
    let mut out = vec![0u64; world];
    for (name, dtype, shape) in tensors {
        for (rank, s) in expected(cfg, topo, name, *dtype, shape)? {
            out[rank] += local_bytes(*dtype, shape, &s);
        }
    }
    Ok(out)
}

/// What one rank holds of one tensor, with values: the rank-local shape and bytes (zero
/// padding included), computed from the generator's deterministic contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankTensor {
    /// Global rank.
    pub rank: usize,
    /// Tensor name.
    pub name: String,
    /// Dtype.
    pub dtype: Dtype,
    /// Rank-local shape.
    pub shape: Vec<u64>,
    /// Rank-local bytes.
    pub bytes: Vec<u8>,
}

/// Every (rank, tensor) a synthetic checkpoint written with `opts` yields under `topo`, with
/// the expected values, in tensor order then rank order. Only for small checkpoints (it
/// builds every full tensor in memory).
pub fn expected_with_values(
    opts: &safeshard::synth::SynthOptions,
    topo: &Topology,
) -> Result<Vec<RankTensor>, String> {
    let list = safeshard::synth::tensors(opts).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, dtype, shape) in list {
        let holders = expected(&opts.config, topo, &name, dtype, &shape)?;
        if holders.is_empty() {
            continue;
        }
        let n = dtype
            .byte_size(shape.iter().product())
            .ok_or_else(|| format!("{name}: not whole bytes"))?;
        let full = safeshard::synth::tensor_data(opts.seed, &name, n as usize);
        for (rank, s) in holders {
            out.push(RankTensor {
                rank,
                name: name.clone(),
                dtype,
                shape: local_shape(&shape, &s),
                bytes: materialize(&full, dtype, &shape, &s),
            });
        }
    }
    Ok(out)
}
