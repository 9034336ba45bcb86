//! The shipped specs reproduce vLLM's per-rank layout, tensor by tensor, with values.
//!
//! For every family a tiny synthetic checkpoint is written, resolved with the shipped spec for
//! several (tp, pp, dp, ep), and each rank's bytes — the spec's `Layout` applied to the tensor's
//! bytes read from the file — are compared with what an independent model of vLLM's weight
//! loaders computes with `narrow`/`cat`/zero-pad on the same bytes. The model below is written
//! from docs/partition-rules (vLLM `linear.py`, `vocab_parallel_embedding.py`, `fused_moe`,
//! `get_pp_indices`, `determine_expert_map`), by tensor name, without the spec engine.

use std::path::Path;

use safeshard::checkpoint::Checkpoint;
use safeshard::sharding::{self, Config, Layout, Piece, Resolved, Shards, Spec};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;

/// A dense row-major tensor of fixed-size elements, as bytes.
#[derive(Clone, Debug, PartialEq)]
struct T {
    shape: Vec<u64>,
    esize: usize,
    data: Vec<u8>,
}

impl T {
    fn strides(&self) -> Vec<u64> {
        let mut s = vec![1u64; self.shape.len()];
        for i in (0..self.shape.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * self.shape[i + 1];
        }
        s
    }

    /// torch.narrow.
    fn narrow(&self, dim: usize, start: u64, len: u64) -> T {
        assert!(
            start + len <= self.shape[dim],
            "narrow out of range: vLLM would fail"
        );
        let outer: u64 = self.shape[..dim].iter().product();
        let inner: u64 = self.shape[dim + 1..].iter().product::<u64>() * self.esize as u64;
        let mut data = Vec::new();
        for o in 0..outer {
            let base = (o * self.shape[dim] + start) * inner;
            data.extend_from_slice(&self.data[base as usize..(base + len * inner) as usize]);
        }
        let mut shape = self.shape.clone();
        shape[dim] = len;
        T {
            shape,
            esize: self.esize,
            data,
        }
    }

    /// torch.cat.
    fn cat(parts: &[T], dim: usize) -> T {
        let first = &parts[0];
        let outer: u64 = first.shape[..dim].iter().product();
        let mut data = Vec::new();
        for o in 0..outer {
            for p in parts {
                let inner: u64 = p.shape[dim..].iter().product::<u64>() * p.esize as u64;
                data.extend_from_slice(&p.data[(o * inner) as usize..((o + 1) * inner) as usize]);
            }
        }
        let mut shape = first.shape.clone();
        shape[dim] = parts.iter().map(|p| p.shape[dim]).sum();
        T {
            shape,
            esize: first.esize,
            data,
        }
    }

    fn zeros(shape: Vec<u64>, esize: usize) -> T {
        let n: u64 = shape.iter().product();
        T {
            shape,
            esize,
            data: vec![0; n as usize * esize],
        }
    }
}

/// The slow slicer: what a Layout selects from the full tensor, element by element.
fn apply(layout: &Layout, full: &T) -> T {
    let strides = full.strides();
    let mut parts = Vec::new();
    for p in &layout.pieces {
        match p {
            Piece::Slice { ranges } => {
                let shape: Vec<u64> = ranges.iter().map(|(a, b)| b - a).collect();
                let n: u64 = shape.iter().product();
                let mut data = Vec::with_capacity(n as usize * full.esize);
                for flat in 0..n {
                    let mut rem = flat;
                    let mut src = 0;
                    for d in (0..shape.len()).rev() {
                        let i = rem % shape[d];
                        rem /= shape[d];
                        src += (ranges[d].0 + i) * strides[d];
                    }
                    let s = src as usize * full.esize;
                    data.extend_from_slice(&full.data[s..s + full.esize]);
                }
                parts.push(T {
                    shape,
                    esize: full.esize,
                    data,
                });
            }
            Piece::Zeros { extent } => {
                let mut shape = layout.shape.clone();
                shape[layout.concat_dim] = *extent;
                parts.push(T::zeros(shape, full.esize));
            }
        }
    }
    if parts.is_empty() {
        return T::zeros(layout.shape.clone(), full.esize);
    }
    let t = T::cat(&parts, layout.concat_dim);
    assert_eq!(
        t.shape, layout.shape,
        "layout shape disagrees with its pieces"
    );
    t
}

/// What vLLM holds of one tensor.
#[derive(Debug)]
enum Exp {
    Skip,
    PerTp(Vec<usize>, Vec<T>),
    Expert(Vec<usize>, usize, T),
}

fn cfg_u(cfg: &serde_json::Value, k: &str) -> Option<u64> {
    cfg.get(k).and_then(|v| v.as_u64())
}

/// vLLM `get_pp_indices`.
fn pp_stage_of_layer(layers: u64, pp: u64, layer: u64) -> usize {
    let mut parts = vec![layers / pp; pp as usize];
    let rem = layers % pp;
    for i in 2..(rem + 2) {
        let idx = parts.len() - i as usize;
        parts[idx] += 1;
    }
    let mut start = 0;
    for (s, n) in parts.iter().enumerate() {
        if layer < start + n {
            return s;
        }
        start += n;
    }
    panic!("layer {layer} beyond {layers}")
}

/// vLLM `determine_expert_map` (linear) / round robin: the EP rank that owns expert `e`.
fn expert_owner(e: u64, n: u64, ep: u64, round_robin: bool) -> usize {
    if round_robin {
        return (e % ep) as usize;
    }
    let base = n / ep;
    let rem = n % ep;
    for r in 0..ep {
        let local = if r < rem { base + 1 } else { base };
        let start = r * base + r.min(rem);
        if e >= start && e < start + local {
            return r as usize;
        }
    }
    panic!("expert {e} has no owner")
}

struct Ctx<'a> {
    cfg: &'a serde_json::Value,
    tp: u64,
    pp: u64,
    ep: u64,
}

impl Ctx<'_> {
    fn column(&self, t: &T, r: u64) -> T {
        let n = t.shape[0] / self.tp;
        assert_eq!(n * self.tp, t.shape[0], "column split must divide");
        t.narrow(0, r * n, n)
    }
    fn row(&self, t: &T, r: u64) -> T {
        let n = t.shape[1] / self.tp;
        assert_eq!(n * self.tp, t.shape[1], "row split must divide");
        t.narrow(1, r * n, n)
    }
    /// QKVParallelLinear's k/v shard: one head per rank group when tp >= nkv.
    fn kv(&self, t: &T, dim: usize, nkv: u64, r: u64) -> T {
        let hd = t.shape[dim] / nkv;
        if self.tp >= nkv {
            assert_eq!(self.tp % nkv, 0);
            let h = r / (self.tp / nkv);
            t.narrow(dim, h * hd, hd)
        } else {
            let per = nkv / self.tp;
            t.narrow(dim, r * per * hd, per * hd)
        }
    }
    fn vocab(&self, t: &T, r: u64) -> T {
        let v = t.shape[0];
        let vp = v.div_ceil(64) * 64;
        let per = vp / self.tp;
        assert_eq!(per * self.tp, vp);
        let a = (r * per).min(v);
        let b = ((r + 1) * per).min(v);
        let mut parts = vec![];
        if b > a {
            parts.push(t.narrow(0, a, b - a));
        }
        if per > b - a {
            let mut s = t.shape.clone();
            s[0] = per - (b - a);
            parts.push(T::zeros(s, t.esize));
        }
        T::cat(&parts, 0)
    }
    /// Block-scale shard of a column (dim 0) or row (dim 1) layer, from the weight's size.
    fn block_scale(&self, s: &T, dim: usize, weight_dim: u64, r: u64) -> T {
        let local = weight_dim / self.tp;
        let lu = local.div_ceil(128);
        s.narrow(dim, r * lu, lu)
    }
}

/// Independent model of vLLM for the tensor `name` of `arch`.
fn expected(arch: &str, name: &str, full: &T, c: &Ctx, shape_of: &dyn Fn(&str) -> Vec<u64>) -> Exp {
    let cfg = c.cfg;
    let tp = c.tp;
    let gpt2 = arch == "GPT2LMHeadModel";
    let name_ns = name.strip_prefix("transformer.").unwrap_or(name);
    let layers = cfg_u(cfg, "num_hidden_layers")
        .or(cfg_u(cfg, "n_layer"))
        .unwrap();
    let tied = cfg
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(gpt2);
    let parts: Vec<&str> = name_ns.split('.').collect();
    let layer = if gpt2 && parts[0] == "h" {
        Some(parts[1].parse::<u64>().unwrap())
    } else if parts.len() > 2 && parts[1] == "layers" {
        Some(parts[2].parse::<u64>().unwrap())
    } else {
        None
    };
    if name.ends_with("rotary_emb.inv_freq")
        || (gpt2 && (name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias")))
    {
        return Exp::Skip;
    }
    if let Some(l) = layer {
        if l >= layers {
            return Exp::Skip;
        }
    }
    // vLLM 0.33 unties a tied config whose checkpoint stores lm_head (the synthetic tied
    // checkpoints here store none), and DeepSeek never ties.
    let tied = tied && arch != "DeepseekV3ForCausalLM";
    // These vLLM model classes build embeddings, final norm and head on every stage.
    let everywhere = matches!(
        arch,
        "MixtralForCausalLM" | "Qwen2MoeForCausalLM" | "GPT2LMHeadModel"
    );
    let last = (c.pp - 1) as usize;
    let stages = match layer {
        Some(l) => vec![pp_stage_of_layer(layers, c.pp, l)],
        None if everywhere => (0..c.pp as usize).collect(),
        None => {
            if name_ns == "model.embed_tokens.weight" {
                let mut s = vec![0];
                if tied && last != 0 {
                    s.push(last);
                }
                s
            } else {
                vec![last]
            }
        }
    };
    let per = |f: &dyn Fn(u64) -> T| Exp::PerTp(stages.clone(), (0..tp).map(f).collect());
    let nh = cfg_u(cfg, "num_attention_heads")
        .or(cfg_u(cfg, "n_head"))
        .unwrap();
    let nkv = cfg_u(cfg, "num_key_value_heads").unwrap_or(nh);
    let leaf = |s: &str| name_ns.ends_with(s);

    if name_ns == "model.embed_tokens.weight"
        || name_ns == "lm_head.weight"
        || name_ns == "wte.weight"
    {
        return per(&|r| c.vocab(full, r));
    }
    if gpt2 {
        let h = cfg_u(cfg, "n_embd").unwrap();
        if leaf("attn.c_attn.weight") || leaf("attn.c_attn.bias") {
            let dim = if leaf("weight") { 1 } else { 0 };
            return per(&|r| {
                let ps: Vec<T> = (0..3)
                    .map(|i| {
                        let p = full.narrow(dim, i * h, h);
                        let n = h / tp;
                        p.narrow(dim, r * n, n)
                    })
                    .collect();
                T::cat(&ps, dim)
            });
        }
        if leaf("attn.c_proj.weight") || leaf("mlp.c_proj.weight") {
            return per(&|r| c.column(full, r)); // Conv1D [in, out]: row-parallel = dim 0
        }
        if leaf("mlp.c_fc.weight") {
            return per(&|r| c.row(full, r));
        }
        if leaf("mlp.c_fc.bias") {
            return per(&|r| c.column(full, r));
        }
        return per(&|_| full.clone()); // biases of row layers, ln_*, wpe
    }
    // Experts.
    let is_expert = name_ns.contains(".experts.") && !name_ns.contains("shared_expert");
    if is_expert {
        let e: u64 = parts[parts.iter().position(|p| *p == "experts").unwrap() + 1]
            .parse()
            .unwrap();
        let n = cfg_u(cfg, "num_local_experts")
            .or(cfg_u(cfg, "n_routed_experts"))
            .or(cfg_u(cfg, "num_experts"))
            .unwrap();
        if c.ep > 1 {
            return Exp::Expert(stages, expert_owner(e, n, c.ep, false), full.clone());
        }
        let w2 = leaf("w2.weight") || name_ns.contains("down_proj");
        if leaf("weight_scale_inv") {
            let w = shape_of(&name.replace("weight_scale_inv", "weight"));
            return if w2 {
                per(&|r| c.block_scale(full, 1, w[1], r))
            } else {
                per(&|r| c.block_scale(full, 0, w[0], r))
            };
        }
        return if w2 {
            per(&|r| c.row(full, r))
        } else {
            per(&|r| c.column(full, r))
        };
    }
    // FP8 block scales of column / row layers (DeepSeek-V3).
    if leaf("weight_scale_inv") {
        let w = shape_of(&name.replace("weight_scale_inv", "weight"));
        if leaf("q_a_proj.weight_scale_inv") || leaf("kv_a_proj_with_mqa.weight_scale_inv") {
            return per(&|_| full.clone());
        }
        if leaf("o_proj.weight_scale_inv") || leaf("down_proj.weight_scale_inv") {
            return per(&|r| c.block_scale(full, 1, w[1], r));
        }
        return per(&|r| c.block_scale(full, 0, w[0], r));
    }
    if leaf("self_attn.q_proj.weight") || leaf("self_attn.q_proj.bias") {
        return per(&|r| c.column(full, r));
    }
    if leaf("self_attn.k_proj.weight")
        || leaf("self_attn.v_proj.weight")
        || leaf("self_attn.k_proj.bias")
        || leaf("self_attn.v_proj.bias")
    {
        return per(&|r| c.kv(full, 0, nkv, r));
    }
    if leaf("self_attn.qkv_proj.weight") {
        let hd = cfg_u(cfg, "head_dim").unwrap_or(cfg_u(cfg, "hidden_size").unwrap() / nh);
        return per(&|r| {
            let q = full.narrow(0, 0, nh * hd);
            let k = full.narrow(0, nh * hd, nkv * hd);
            let v = full.narrow(0, (nh + nkv) * hd, nkv * hd);
            T::cat(
                &[c.column(&q, r), c.kv(&k, 0, nkv, r), c.kv(&v, 0, nkv, r)],
                0,
            )
        });
    }
    if leaf("mlp.gate_up_proj.weight") {
        let i = cfg_u(cfg, "intermediate_size").unwrap();
        return per(&|r| {
            let g = full.narrow(0, 0, i);
            let u = full.narrow(0, i, i);
            T::cat(&[c.column(&g, r), c.column(&u, r)], 0)
        });
    }
    if leaf("o_proj.weight") || leaf("down_proj.weight") {
        return per(&|r| c.row(full, r));
    }
    if leaf("gate_proj.weight")
        || leaf("up_proj.weight")
        || leaf("q_b_proj.weight")
        || leaf("kv_b_proj.weight")
    {
        return per(&|r| c.column(full, r));
    }
    // Replicated: norms, routers, low-rank projections, shared_expert_gate.
    per(&|_| full.clone())
}

/// Resolves `preset` for each topology and compares every rank of every tensor with the model.
fn check(preset: &str, topos: &[(usize, usize, usize, usize)]) {
    check_opts(preset, SynthOptions::preset(preset).unwrap(), topos)
}

fn check_opts(label: &str, opts: SynthOptions, topos: &[(usize, usize, usize, usize)]) {
    let dir = tempfile::tempdir().unwrap();
    synth::write_checkpoint(dir.path(), &opts).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let config = Config::from_checkpoint(&ckpt, &[]).unwrap();
    let spec = Spec::detect(&config).unwrap();
    let cfg = ckpt.config().unwrap();
    let arch = cfg["architectures"][0].as_str().unwrap().to_string();
    let fulls: Vec<T> = ckpt
        .tensors()
        .iter()
        .map(|t| read_full(dir.path(), &ckpt, t))
        .collect();
    let shape_of = |n: &str| ckpt.tensor(n).map(|t| t.shape.clone()).unwrap_or_default();
    for &(tp, pp, dp, ep) in topos {
        let topo = Topology::new(tp, pp, dp, ep).unwrap();
        let res = sharding::resolve(&spec, &ckpt, &config, &topo)
            .unwrap_or_else(|e| panic!("{label} tp={tp} pp={pp} dp={dp} ep={ep}: {e}"));
        assert!(
            res.warnings.is_empty(),
            "{label}: unexpected warnings {:?}",
            res.warnings
        );
        let ctx = Ctx {
            cfg,
            tp: tp as u64,
            pp: pp as u64,
            ep: ep as u64,
        };
        let mut held = 0;
        for ((t, full), got) in ckpt.tensors().iter().zip(&fulls).zip(&res.tensors) {
            let what = format!("{label} tp={tp} pp={pp} dp={dp} ep={ep} {}", t.name);
            match (expected(&arch, &t.name, full, &ctx, &shape_of), got) {
                (Exp::Skip, Resolved::Skip { .. }) => {}
                (
                    Exp::PerTp(stages, want),
                    Resolved::Held {
                        stages: s,
                        shards: Shards::PerTp(ls),
                        replicated,
                        ..
                    },
                ) => {
                    held += 1;
                    assert_eq!(&stages, s, "{what}: stages");
                    assert_eq!(ls.len(), tp, "{what}: one layout per TP rank");
                    for (r, (l, w)) in ls.iter().zip(&want).enumerate() {
                        assert_eq!(&apply(l, full), w, "{what}: tp rank {r} bytes");
                    }
                    assert_eq!(
                        *replicated,
                        want.windows(2).all(|w| w[0] == w[1]),
                        "{what}: replicated"
                    );
                }
                (
                    Exp::Expert(stages, owner, want),
                    Resolved::Held {
                        stages: s,
                        shards:
                            Shards::Expert {
                                owner: o, layout, ..
                            },
                        ..
                    },
                ) => {
                    held += 1;
                    assert_eq!(&stages, s, "{what}: stages");
                    assert_eq!(owner, *o, "{what}: expert owner");
                    assert_eq!(apply(layout, full), want, "{what}: expert bytes");
                }
                (e, g) => panic!("{what}: expected {e:?}, got {g:?}"),
            }
        }
        assert!(held > 0);
    }
}

fn read_full(dir: &Path, ckpt: &Checkpoint, t: &safeshard::checkpoint::TensorInfo) -> T {
    let _ = dir;
    let file = &ckpt.files()[t.file];
    let bytes = std::fs::read(&file.path).unwrap();
    let data = bytes[t.offset as usize..(t.offset + t.bytes) as usize].to_vec();
    let n: u64 = t.shape.iter().product();
    let esize = t.bytes.checked_div(n).unwrap_or(1) as usize;
    assert_eq!(
        esize as u64 * n,
        t.bytes,
        "whole-byte dtypes only in these tests"
    );
    T {
        shape: t.shape.clone(),
        esize,
        data,
    }
}

#[test]
fn llama_matches_vllm() {
    check(
        "llama-tiny",
        &[
            (1, 1, 1, 1),
            (2, 1, 1, 1),
            (4, 2, 1, 1),
            (8, 3, 1, 1),
            (2, 4, 2, 1),
        ],
    );
}

#[test]
fn llama_tied_matches_vllm() {
    check("llama-tiny-tied", &[(2, 2, 1, 1), (4, 1, 1, 1)]);
}

#[test]
fn mistral_matches_vllm() {
    check(
        "mistral-tiny",
        &[(1, 1, 1, 1), (2, 3, 1, 1), (4, 1, 1, 1), (8, 1, 1, 1)],
    );
}

#[test]
fn qwen2_matches_vllm() {
    // Tied: the last stage also holds embed_tokens.
    check(
        "qwen2-tiny",
        &[(1, 1, 1, 1), (2, 2, 1, 1), (4, 4, 1, 1), (8, 1, 1, 1)],
    );
}

#[test]
fn phi3_matches_vllm() {
    check(
        "phi3-tiny",
        &[(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 1, 1), (8, 2, 1, 1)],
    );
}

/// vLLM refuses a tp that does not divide the attention heads (gpt2-tiny has 4), even where
/// every split would divide elementwise; so do the shipped specs.
#[test]
fn gpt2_tp_not_dividing_heads_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions::preset("gpt2-tiny").unwrap();
    synth::write_checkpoint(dir.path(), &opts).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let config = Config::from_checkpoint(&ckpt, &[]).unwrap();
    let spec = Spec::detect(&config).unwrap();
    let topo = Topology::new(8, 1, 1, 1).unwrap();
    let err = sharding::resolve(&spec, &ckpt, &config, &topo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("n_head must divide by tp"), "{err}");
}

#[test]
fn mixtral_matches_vllm() {
    check(
        "mixtral-tiny",
        &[
            (1, 1, 1, 1),
            (2, 2, 1, 1),
            (4, 1, 1, 1),
            (2, 1, 1, 2),
            (4, 2, 1, 4),
            (2, 1, 3, 6),
        ],
    );
}

#[test]
fn qwen2_moe_matches_vllm() {
    check(
        "qwen2-moe-tiny",
        &[
            (1, 1, 1, 1),
            (2, 2, 1, 1),
            (4, 1, 1, 1),
            (4, 1, 2, 8),
            (2, 1, 5, 10),
        ],
    );
}

#[test]
fn deepseek_v3_matches_vllm() {
    // Layer 3 is the MTP layer and is skipped.
    check(
        "deepseek-v3-tiny",
        &[
            (1, 1, 1, 1),
            (2, 1, 1, 1),
            (4, 3, 1, 1),
            (2, 2, 1, 2),
            (4, 1, 2, 8),
        ],
    );
}

#[test]
fn gpt2_matches_vllm() {
    check(
        "gpt2-tiny",
        &[(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 1, 1), (4, 2, 1, 1)],
    );
}

#[test]
fn distilgpt2_prefix_alias_matches_vllm() {
    // Same shapes with the `transformer.` prefix that distilgpt2 files carry.
    let mut o = SynthOptions::preset("gpt2-tiny").unwrap();
    o.config["_synth_name_prefix"] = "transformer.".into();
    check_opts("gpt2-tiny-prefixed", o, &[(2, 2, 1, 1)]);
}
