//! `safeshard reshard` end to end: the files it writes, read back with an independent reader
//! (and with the reference Python `safetensors`), hold exactly the slices vLLM's rules give,
//! computed here from the synthetic generator's values and the rules in
//! /work/shared/reference/partition-rules.md, independently of the spec and the planner.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use safeshard::synth::{self, SynthOptions};
use sha2::Digest;

/// Independent vLLM reference for Llama-family checkpoints (Llama, Mistral, Qwen2).
struct LlamaRef {
    head_dim: u64,
    kv_heads: u64,
    vocab: u64,
    layers: u64,
    tied: bool,
}

impl LlamaRef {
    fn from_config(cfg: &serde_json::Value) -> Self {
        let g = |k: &str| cfg[k].as_u64().unwrap();
        LlamaRef {
            // `head_dim` when given (Mistral), else hidden / heads.
            head_dim: cfg["head_dim"]
                .as_u64()
                .unwrap_or(g("hidden_size") / g("num_attention_heads")),
            kv_heads: g("num_key_value_heads"),
            vocab: g("vocab_size"),
            layers: g("num_hidden_layers"),
            tied: cfg["tie_word_embeddings"].as_bool().unwrap_or(false),
        }
    }

    /// vLLM `get_pp_indices`: layers of each stage.
    fn stage_of_layer(&self, pp: u64) -> Vec<u64> {
        let base = self.layers / pp;
        let rem = self.layers % pp;
        let mut parts = vec![base; pp as usize];
        for i in 2..rem + 2 {
            let idx = pp as usize - i as usize;
            parts[idx] += 1;
        }
        let mut out = Vec::new();
        for (s, &n) in parts.iter().enumerate() {
            out.extend(std::iter::repeat_n(s as u64, n as usize));
        }
        out
    }

    /// (local shape, local bytes) of `name` for tp rank `r`, from the whole tensor `full`.
    fn local(
        &self,
        name: &str,
        shape: &[u64],
        esz: u64,
        full: &[u8],
        tp: u64,
        r: u64,
    ) -> (Vec<u64>, Vec<u8>) {
        let hd = self.head_dim;
        let rows = |b: u64, e: u64| -> Vec<u8> {
            let row = shape[1..].iter().product::<u64>() * esz;
            full[(b * row) as usize..(e * row) as usize].to_vec()
        };
        let with_rows = |n: u64| -> Vec<u64> {
            let mut s = shape.to_vec();
            s[0] = n;
            s
        };
        if name.contains("embed_tokens") || name.contains("lm_head") {
            let vp = self.vocab.div_ceil(64) * 64;
            let per = vp / tp;
            let b = (r * per).min(self.vocab);
            let e = ((r + 1) * per).min(self.vocab);
            let mut data = rows(b, e);
            data.resize((per * shape[1] * esz) as usize, 0);
            return (with_rows(per), data);
        }
        if name.contains("k_proj") || name.contains("v_proj") {
            let (b, n) = if tp >= self.kv_heads {
                let idx = r / (tp / self.kv_heads);
                (idx * hd, hd)
            } else {
                let n = self.kv_heads / tp * hd;
                (r * n, n)
            };
            return (with_rows(n), rows(b, b + n));
        }
        if name.contains("q_proj") || name.contains("gate_proj") || name.contains("up_proj") {
            let n = shape[0] / tp;
            return (with_rows(n), rows(r * n, (r + 1) * n));
        }
        if name.contains("o_proj") || name.contains("down_proj") {
            let n = shape[1] / tp;
            let mut out = Vec::new();
            for i in 0..shape[0] {
                let s = ((i * shape[1] + r * n) * esz) as usize;
                out.extend_from_slice(&full[s..s + (n * esz) as usize]);
            }
            return (vec![shape[0], n], out);
        }
        (shape.to_vec(), full.to_vec())
    }

    /// Stages holding a tensor (none for skipped ones). With tied embeddings the last stage
    /// holds `embed_tokens` too, as its LM head.
    fn stages(&self, name: &str, pp: u64) -> Vec<u64> {
        if name.contains("embed_tokens") && self.tied && pp > 1 {
            return vec![0, pp - 1];
        }
        self.stage(name, pp).into_iter().collect()
    }

    fn stage(&self, name: &str, pp: u64) -> Option<u64> {
        if name.contains("rotary_emb") {
            return None;
        }
        if name.contains("embed_tokens") {
            return Some(0);
        }
        if name.starts_with("lm_head") || name == "model.norm.weight" {
            return Some(pp - 1);
        }
        let l: u64 = name
            .strip_prefix("model.layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()?;
        self.stage_of_layer(pp).get(l as usize).copied()
    }
}

type Expected = BTreeMap<String, (String, Vec<u64>, Vec<u8>)>;

/// Expected contents of every rank: name → (dtype, shape, bytes).
fn expected(dir: &Path, opts: &SynthOptions, tp: u64, pp: u64) -> Vec<Expected> {
    let rf = LlamaRef::from_config(&opts.config);
    let mut ranks = vec![Expected::new(); (tp * pp) as usize];
    for file in common::safetensors_files(dir) {
        let (_, tensors, _) = common::read_file(&file);
        for t in tensors {
            let stages = rf.stages(&t.name, pp);
            let bytes = t.end - t.begin;
            let elems: u64 = t.shape.iter().product::<u64>().max(1);
            let esz = bytes / elems;
            let full = synth::tensor_data(opts.seed, &t.name, bytes as usize);
            for &stage in &stages {
                for r in 0..tp {
                    let (shape, data) = rf.local(&t.name, &t.shape, esz, &full, tp, r);
                    ranks[(stage * tp + r) as usize]
                        .insert(t.name.clone(), (t.dtype.clone(), shape, data));
                }
            }
        }
    }
    ranks
}

fn reshard(dir: &Path, out: &Path, tp: u64, pp: u64, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_safeshard"))
        .arg("reshard")
        .arg(dir)
        .args(["--tp", &tp.to_string(), "--pp", &pp.to_string(), "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Every rank's part files, read back with the independent reader.
fn read_back(out: &Path, world: u64) -> Vec<Expected> {
    let mut ranks = Vec::new();
    for r in 0..world {
        let mut got = Expected::new();
        let mut part = 0;
        loop {
            let p = out.join(format!("model-rank-{r}-part-{part}.safetensors"));
            if !p.exists() {
                break;
            }
            let (_, tensors, _) = common::read_file(&p);
            let data = std::fs::read(&p).unwrap();
            for t in tensors {
                let bytes = data[t.begin as usize..t.end as usize].to_vec();
                assert!(got
                    .insert(t.name.clone(), (t.dtype, t.shape, bytes))
                    .is_none());
            }
            part += 1;
        }
        assert!(part > 0, "rank {r} has no part files");
        ranks.push(got);
    }
    ranks
}

fn check_preset(preset: &str, topologies: &[(u64, u64)]) {
    let opts = SynthOptions::preset(preset).unwrap();
    let src = common::write_preset(&opts);
    for &(tp, pp) in topologies {
        let out = tempfile::tempdir().unwrap();
        // A small part limit so that ranks are split into several parts.
        let o = reshard(
            src.path(),
            out.path(),
            tp,
            pp,
            &["--max-shard-size", "100KB"],
        );
        assert!(
            o.status.success(),
            "{preset} tp={tp} pp={pp}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want = expected(src.path(), &opts, tp, pp);
        let got = read_back(out.path(), tp * pp);
        for (r, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.keys().collect::<Vec<_>>(),
                w.keys().collect::<Vec<_>>(),
                "{preset} tp={tp} pp={pp} rank {r}: tensor names"
            );
            for (name, (dt, shape, bytes)) in w {
                let (gdt, gshape, gbytes) = &g[name];
                assert_eq!((gdt, gshape), (dt, shape), "{preset} rank {r} {name}");
                assert!(
                    gbytes == bytes,
                    "{preset} tp={tp} pp={pp} rank {r} {name}: bytes"
                );
            }
        }
        let manifest = out.path().join("safeshard-plan.json");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
        assert_eq!(v["ranks"].as_array().unwrap().len() as u64, tp * pp);
        // No temporary files left behind.
        for e in std::fs::read_dir(out.path()).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.ends_with(".tmp"), "leftover {n}");
        }
    }
}

#[test]
fn llama_reshard_matches_vllm_slices() {
    check_preset(
        "llama-tiny",
        &[(1, 1), (2, 1), (4, 1), (2, 2), (8, 1), (1, 3)],
    );
}

#[test]
fn mistral_and_qwen2_reshard_match_vllm_slices() {
    check_preset("mistral-tiny", &[(2, 1), (4, 2)]);
    check_preset("qwen2-tiny", &[(2, 1), (2, 2)]);
}

#[test]
fn reference_python_safetensors_reads_the_parts() {
    // F16 so that numpy can hand out the bytes (it has no bfloat16).
    let mut opts = SynthOptions::preset("llama-tiny").unwrap();
    opts.dtype = safeshard::checkpoint::Dtype::F16;
    let src = common::write_preset(&opts);
    let out = tempfile::tempdir().unwrap();
    let o = reshard(src.path(), out.path(), 2, 2, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script = r#"
import sys, glob, hashlib, os
from safetensors import safe_open
for p in sorted(glob.glob(os.path.join(sys.argv[1], "model-rank-*-part-*.safetensors"))):
    with safe_open(p, framework="np") as f:
        for k in sorted(f.keys()):
            t = f.get_slice(k)
            h = hashlib.sha256(f.get_tensor(k).tobytes()).hexdigest()
            print(os.path.basename(p), k, t.get_dtype(), h, list(t.get_shape()))
"#;
    let listing = common::python(script, &[out.path().to_str().unwrap()]);
    let got = read_back(out.path(), 4);
    let n: usize = got.iter().map(|r| r.len()).sum();
    assert_eq!(listing.lines().count(), n);
    for line in listing.lines() {
        let mut it = line.split_whitespace();
        let file = it.next().unwrap();
        let name = it.next().unwrap();
        let dtype = it.next().unwrap();
        let hash = it.next().unwrap();
        let rank: usize = file.split('-').nth(2).unwrap().parse().unwrap();
        let (dt, shape, bytes) = &got[rank][name];
        assert_eq!(dt, dtype);
        let want: String = sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(hash, want, "{line}");
        let shape_s = format!("{shape:?}");
        assert!(line.ends_with(&shape_s), "{line} vs {shape_s}");
    }
}

#[test]
fn bad_usage_and_bad_data_exit_codes() {
    let opts = SynthOptions::preset("llama-tiny").unwrap();
    let src = common::write_preset(&opts);
    let out = tempfile::tempdir().unwrap();
    let o = reshard(src.path(), out.path(), 2, 1, &["--max-shard-size", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    let o = reshard(&src.path().join("missing"), out.path(), 2, 1, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing"));
}

/// Every shipped architecture (tiny presets) under several topologies, against synth's
/// independent vLLM reference (`tests/common/vllm_ref.rs`), bit for bit.
#[test]
fn every_architecture_matches_the_vllm_reference() {
    // One tiny preset per architecture (the quantized `-tiny-gptq`/`-tiny-awq` variants left out).
    let presets = safeshard::synth::PRESETS
        .iter()
        .filter(|n| n.ends_with("-tiny"));
    let topos: [(usize, usize, usize, usize); 5] = [
        (1, 1, 1, 1),
        (2, 1, 1, 1),
        (2, 2, 1, 1),
        (4, 1, 1, 1),
        (2, 1, 2, 4),
    ];
    let mut checked = 0;
    for preset in presets {
        let opts = SynthOptions::preset(preset).unwrap();
        let src = common::write_preset(&opts);
        for (tp, pp, dp, ep) in topos {
            let label = format!("{preset} tp={tp} pp={pp} dp={dp} ep={ep}");
            let topo = safeshard::topology::Topology::new(tp, pp, dp, ep).unwrap();
            let out = tempfile::tempdir().unwrap();
            let o = Command::new(env!("CARGO_BIN_EXE_safeshard"))
                .arg("reshard")
                .arg(src.path())
                .args(["--tp", &tp.to_string(), "--pp", &pp.to_string()])
                .args(["--dp", &dp.to_string(), "--ep", &ep.to_string(), "--out"])
                .arg(out.path())
                .output()
                .unwrap();
            let want = match common::vllm_ref::expected_with_values(&opts, &topo) {
                Ok(w) => w,
                Err(e) => {
                    assert!(
                        !o.status.success(),
                        "{label}: reference refuses ({e}), we accept"
                    );
                    continue;
                }
            };
            assert!(
                o.status.success(),
                "{label}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let mut ranks = vec![Expected::new(); topo.world()];
            for t in want {
                ranks[t.rank].insert(t.name, (t.dtype.name().to_string(), t.shape, t.bytes));
            }
            let got = read_back(out.path(), topo.world() as u64);
            for (r, (g, w)) in got.iter().zip(&ranks).enumerate() {
                assert_eq!(
                    g.keys().collect::<Vec<_>>(),
                    w.keys().collect::<Vec<_>>(),
                    "{label} rank {r}: names"
                );
                for (name, want) in w {
                    assert!(&g[name] == want, "{label} rank {r} {name}: differs");
                    checked += 1;
                }
            }
        }
    }
    // Most (preset, topology) pairs are accepted by the reference; none may be skipped
    // silently en masse.
    assert!(checked > 1000, "only {checked} tensors checked");
}
