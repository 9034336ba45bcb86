//! The synthetic checkpoint generator: valid files, real names and counts, values, sparse mode.

use crate::common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;

use common::{read_file, safetensors_files, write_preset};
use safeshard::checkpoint::Dtype;
use safeshard::synth::{self, SynthOptions};

/// The dense tiny presets (every name of `synth::PRESETS` with `-tiny`, quantized included).
fn tiny() -> impl Iterator<Item = &'static str> {
    common::tiny_presets().into_iter()
}

fn elems(shape: &[u64]) -> u64 {
    shape.iter().product()
}

/// Every file is structurally valid, holds exactly the listed tensors with their values, the
/// index maps each tensor to its file and `total_size` is the sum of tensor bytes.
#[test]
fn tiny_presets_are_valid_and_hold_the_fill_values() {
    for name in tiny() {
        let opts = SynthOptions::preset(name).unwrap().with_seed(7);
        let list = synth::tensors(&opts).unwrap();
        let dir = write_preset(&opts);
        let files = safetensors_files(dir.path());
        let mut seen: BTreeMap<String, (String, u64, u64, String)> = BTreeMap::new();
        let bytes_per_file: Vec<Vec<u8>> =
            files.iter().map(|f| std::fs::read(f).unwrap()).collect();
        for (path, bytes) in files.iter().zip(&bytes_per_file) {
            let (n, tensors, meta) = read_file(path);
            assert_eq!(n % 8, 0, "{name}: header padded to 8");
            assert_eq!(meta.unwrap()["format"], "pt");
            let fname = path.file_name().unwrap().to_str().unwrap().to_string();
            for t in tensors {
                let data = bytes[t.begin as usize..t.end as usize].to_vec();
                let expect = synth::tensor_data(7, &t.name, data.len());
                assert!(data == expect, "{name}: {} values", t.name);
                assert!(
                    seen.insert(t.name.clone(), (t.dtype, t.begin, t.end, fname.clone()))
                        .is_none(),
                    "{name}: {} twice",
                    t.name
                );
            }
        }
        assert_eq!(seen.len(), list.len(), "{name}: tensor count");
        let mut total = 0u64;
        for (tname, dtype, shape) in &list {
            let (d, b, e, _) = &seen[tname];
            assert_eq!(d, dtype.name(), "{name}: {tname} dtype");
            let size = dtype.byte_size(elems(shape)).unwrap();
            assert_eq!(e - b, size, "{name}: {tname} size");
            total += size;
        }
        if files.len() > 1 {
            let idx: serde_json::Value = serde_json::from_slice(
                &std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(idx["metadata"]["total_size"].as_u64(), Some(total));
            let wm = idx["weight_map"].as_object().unwrap();
            assert_eq!(wm.len(), list.len());
            for (tname, (_, _, _, file)) in &seen {
                assert_eq!(wm[tname].as_str(), Some(file.as_str()), "{name}: {tname}");
            }
            for (k, f) in files.iter().enumerate() {
                let want = format!("model-{:05}-of-{:05}.safetensors", k + 1, files.len());
                assert_eq!(f.file_name().unwrap().to_str().unwrap(), want);
            }
        } else {
            assert_eq!(files[0].file_name().unwrap(), "model.safetensors");
            assert!(!dir.path().join("model.safetensors.index.json").exists());
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        let arch = cfg["architectures"][0].as_str().unwrap();
        let spec = safeshard::sharding::Spec::shipped(opts.arch).unwrap();
        assert!(
            spec.architectures.iter().any(|a| a == arch),
            "{name}: {arch}"
        );
        // No temporary files left behind.
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            assert!(!n.starts_with('.'), "{name}: leftover {n}");
        }
    }
}

/// Tensor counts of the real-size presets, counted from the published architectures:
/// Llama-3-8B 1 + 32×9 + 2; Llama-3.1-405B 1 + 126×9 + 2; Mixtral-8x7B 1 + 32×(4+1+8×3+2) + 2;
/// GPT-2 2 + 12×13 + 2; DeepSeek-V3 3 dense layers × 20 + 58 MoE layers × 1558 + MTP 1564 + 3.
#[test]
fn real_size_tensor_counts() {
    let count = |p: &str| {
        synth::tensors(&SynthOptions::preset(p).unwrap())
            .unwrap()
            .len()
    };
    assert_eq!(count("llama3-8b"), 1 + 32 * 9 + 2);
    assert_eq!(count("llama3.1-405b"), 1 + 126 * 9 + 2);
    assert_eq!(count("mixtral-8x7b"), 1 + 32 * (4 + 1 + 8 * 3 + 2) + 2);
    assert_eq!(count("gpt2"), 2 + 12 * 13 + 2);
    assert_eq!(count("distilgpt2"), 2 + 6 * 14 + 2);
    let attn = 5 * 2 + 2; // five FP8 projections with scales + two lora norms
    let dense = attn + 2 + 3 * 2;
    let moe = attn + 2 + 2 + 256 * 3 * 2 + 3 * 2;
    assert_eq!(count("deepseek-v3"), 3 * dense + 58 * moe + (moe + 6) + 3);
    assert_eq!(count("deepseek-v3"), 91_991);
    let ds = SynthOptions::preset("deepseek-v3").unwrap();
    assert_eq!(synth::plan_files(&ds).unwrap().len(), 163);
    // The preset's shard size is the smallest that gives 163 files.
    assert_eq!(
        synth::shard_size_for_files(&ds, 163).unwrap(),
        ds.max_file_bytes
    );
    let one_less = ds.clone().with_max_file_bytes(ds.max_file_bytes - 1);
    assert!(synth::plan_files(&one_less).unwrap().len() > 163);
}

/// Shapes of a few DeepSeek-V3 tensors from the published checkpoint.
#[test]
fn deepseek_v3_names_and_shapes() {
    let list = synth::tensors(&SynthOptions::preset("deepseek-v3").unwrap()).unwrap();
    let m: BTreeMap<&str, (Dtype, &Vec<u64>)> =
        list.iter().map(|(n, d, s)| (n.as_str(), (*d, s))).collect();
    let f8 = Dtype::F8_E4M3;
    let cases: &[(&str, Dtype, &[u64])] = &[
        ("model.embed_tokens.weight", Dtype::BF16, &[129280, 7168]),
        (
            "model.layers.0.self_attn.q_a_proj.weight",
            f8,
            &[1536, 7168],
        ),
        (
            "model.layers.0.self_attn.q_a_proj.weight_scale_inv",
            Dtype::F32,
            &[12, 56],
        ),
        (
            "model.layers.0.self_attn.q_b_proj.weight",
            f8,
            &[24576, 1536],
        ),
        (
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
            f8,
            &[576, 7168],
        ),
        (
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
            Dtype::F32,
            &[5, 56],
        ),
        (
            "model.layers.0.self_attn.kv_b_proj.weight",
            f8,
            &[32768, 512],
        ),
        ("model.layers.0.self_attn.o_proj.weight", f8, &[7168, 16384]),
        ("model.layers.0.mlp.down_proj.weight", f8, &[7168, 18432]),
        (
            "model.layers.0.mlp.down_proj.weight_scale_inv",
            Dtype::F32,
            &[56, 144],
        ),
        ("model.layers.3.mlp.gate.weight", Dtype::BF16, &[256, 7168]),
        (
            "model.layers.3.mlp.gate.e_score_correction_bias",
            Dtype::F32,
            &[256],
        ),
        (
            "model.layers.3.mlp.experts.255.down_proj.weight",
            f8,
            &[7168, 2048],
        ),
        (
            "model.layers.3.mlp.experts.255.down_proj.weight_scale_inv",
            Dtype::F32,
            &[56, 16],
        ),
        (
            "model.layers.60.mlp.shared_experts.up_proj.weight",
            f8,
            &[2048, 7168],
        ),
        (
            "model.layers.61.eh_proj.weight",
            Dtype::BF16,
            &[7168, 14336],
        ),
        (
            "model.layers.61.shared_head.head.weight",
            Dtype::BF16,
            &[129280, 7168],
        ),
        ("model.layers.61.enorm.weight", Dtype::BF16, &[7168]),
        ("lm_head.weight", Dtype::BF16, &[129280, 7168]),
    ];
    for (name, d, s) in cases {
        let (gd, gs) = m.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!((*gd, gs.as_slice()), (*d, *s), "{name}");
    }
    assert!(!m.contains_key("model.layers.2.mlp.gate.weight"));
    assert!(!m.contains_key("model.layers.62.input_layernorm.weight"));
}

/// Names of the other families, as in their Hugging Face checkpoints.
#[test]
fn family_names() {
    let names = |p: &str| -> Vec<String> {
        synth::tensors(&SynthOptions::preset(p).unwrap())
            .unwrap()
            .into_iter()
            .map(|t| t.0)
            .collect()
    };
    let has = |v: &[String], n: &str| v.iter().any(|x| x == n);
    let l = names("llama-tiny");
    assert!(has(&l, "model.layers.0.self_attn.rotary_emb.inv_freq"));
    assert!(has(&l, "lm_head.weight"));
    let l = names("llama-tiny-tied");
    assert!(!has(&l, "lm_head.weight"));
    let q = names("qwen2-tiny");
    assert!(has(&q, "model.layers.1.self_attn.k_proj.bias"));
    assert!(!has(&q, "model.layers.1.self_attn.o_proj.bias"));
    assert!(!has(&q, "lm_head.weight"), "qwen2-tiny is tied");
    assert!(has(&names("qwen2-tiny-untied"), "lm_head.weight"));
    let p = names("phi3-tiny");
    assert!(has(&p, "model.layers.0.self_attn.qkv_proj.weight"));
    assert!(has(&p, "model.layers.0.mlp.gate_up_proj.weight"));
    let m = names("mixtral-tiny");
    assert!(has(
        &m,
        "model.layers.1.block_sparse_moe.experts.7.w2.weight"
    ));
    assert!(has(&m, "model.layers.1.block_sparse_moe.gate.weight"));
    let q = names("qwen2-moe-tiny");
    for n in [
        "model.layers.0.mlp.experts.11.up_proj.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert.down_proj.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
    ] {
        assert!(has(&q, n), "{n}");
    }
    // Dense layers from the config (issue 18): Qwen2-MoE's mlp_only_layers [1], DeepSeek's
    // first_k_dense_replace 1 and moe_layer_freq 2 (layers 0, 1, 3 dense, 2 MoE).
    let q = names("qwen2-moe-dense-tiny");
    assert!(has(&q, "model.layers.1.mlp.down_proj.weight"));
    assert!(!has(&q, "model.layers.1.mlp.gate.weight"));
    assert!(!has(&q, "model.layers.1.mlp.experts.0.up_proj.weight"));
    assert!(has(&q, "model.layers.2.mlp.experts.11.up_proj.weight"));
    assert!(!has(&q, "model.layers.2.mlp.down_proj.weight"));
    let d = names("deepseek-v2-tiny");
    for l in [0, 1, 3] {
        assert!(
            has(&d, &format!("model.layers.{l}.mlp.gate_proj.weight")),
            "{l}"
        );
        assert!(
            !has(&d, &format!("model.layers.{l}.mlp.gate.weight")),
            "{l}"
        );
    }
    assert!(has(&d, "model.layers.2.mlp.experts.7.down_proj.weight"));
    assert!(
        has(&d, "model.layers.2.self_attn.q_proj.weight"),
        "no q_lora_rank"
    );
    assert!(!has(&d, "model.layers.2.mlp.gate.e_score_correction_bias"));
    let q = names("llama-tiny-gptq");
    for n in ["qweight", "qzeros", "scales", "g_idx"] {
        assert!(has(&q, &format!("model.layers.1.mlp.down_proj.{n}")), "{n}");
    }
    assert!(!has(&q, "model.layers.1.mlp.down_proj.weight"));
    let a = names("llama-tiny-awq");
    assert!(has(&a, "model.layers.0.self_attn.k_proj.qweight"));
    assert!(!has(&a, "model.layers.0.self_attn.k_proj.g_idx"));
    let g = names("gpt2");
    assert!(
        has(&g, "h.11.attn.c_attn.weight") && has(&g, "h.0.attn.bias") && has(&g, "wte.weight")
    );
    assert!(!has(&g, "lm_head.weight"));
    let d = names("distilgpt2");
    assert!(has(&d, "transformer.h.5.mlp.c_proj.bias") && has(&d, "transformer.ln_f.weight"));
    assert!(SynthOptions::preset("gpt2-untied").is_err());
}

/// `fill` depends only on (seed, name, position): any window equals the same bytes of the
/// whole tensor, whatever its alignment; names and seeds change the values.
#[test]
fn fill_is_positional_and_deterministic() {
    let whole = synth::tensor_data(3, "a.weight", 1000);
    for start in [0usize, 1, 5, 7, 8, 9, 63, 500] {
        for len in [0usize, 1, 3, 8, 13, 64, 300] {
            let mut w = vec![0u8; len];
            synth::fill(3, "a.weight", start as u64, &mut w);
            assert_eq!(w, whole[start..start + len], "start {start} len {len}");
        }
    }
    assert_eq!(whole, synth::tensor_data(3, "a.weight", 1000));
    // Positions near the end of the u64 range do not overflow.
    let mut w = [0u8; 16];
    synth::fill(3, "a.weight", u64::MAX - 20, &mut w);
    let mut w2 = [0u8; 5];
    synth::fill(3, "a.weight", u64::MAX - 15, &mut w2);
    assert_eq!(w2, w[5..10]);
    assert_ne!(whole, synth::tensor_data(4, "a.weight", 1000));
    assert_ne!(whole, synth::tensor_data(3, "b.weight", 1000));
    // Not constant: every byte value appears in 64 KiB of output.
    let big = synth::tensor_data(0, "x", 1 << 16);
    let mut counts = [0u32; 256];
    for b in big {
        counts[b as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c > 100), "{counts:?}");
}

/// Sparse DeepSeek-V3: 163 files, 91,991 tensors, the full logical size, and (almost) no disk
/// blocks: only the headers are written.
#[test]
fn sparse_deepseek_v3_uses_no_data_blocks() {
    let opts = SynthOptions::preset("deepseek-v3")
        .unwrap()
        .with_sparse(true);
    let dir = write_preset(&opts);
    let files = safetensors_files(dir.path());
    assert_eq!(files.len(), 163);
    let (mut tensors, mut len, mut blocks, mut headers) = (0usize, 0u64, 0u64, 0u64);
    for f in &files {
        let md = std::fs::metadata(f).unwrap();
        len += md.len();
        blocks += md.blocks();
        let (n, t, _) = read_file(f);
        headers += 8 + n;
        tensors += t.len();
    }
    assert_eq!(tensors, 91_991);
    let idx: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let total = idx["metadata"]["total_size"].as_u64().unwrap();
    assert_eq!(len, total + headers);
    assert!(total > 680_000_000_000, "{total}");
    // Headers plus at most a few file-system pages per file.
    let allocated = blocks * 512;
    assert!(
        allocated < headers + 163 * 64 * 1024,
        "sparse files allocate {allocated} bytes"
    );
}

#[test]
fn bad_options_are_errors_not_panics() {
    let e = SynthOptions::preset("llama-huge").unwrap_err();
    assert!(e.is_usage());
    assert!(e.to_string().contains("llama-huge"));
    let mut o = SynthOptions::preset("llama-tiny").unwrap();
    o.config
        .as_object_mut()
        .unwrap()
        .remove("intermediate_size");
    let e = synth::tensors(&o).unwrap_err();
    assert!(e.to_string().contains("intermediate_size"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    assert!(synth::write_checkpoint(dir.path(), &o).is_err());
    let mut o = SynthOptions::preset("gpt2-tiny").unwrap();
    o.config["n_embd"] = serde_json::json!("wide");
    assert!(synth::tensors(&o)
        .unwrap_err()
        .to_string()
        .contains("n_embd"));
}

/// Rewriting a directory with a different split does not leave a stale index or single file.
#[test]
fn rewrite_replaces_layout() {
    let dir = tempfile::tempdir().unwrap();
    let o = SynthOptions::preset("llama-tiny").unwrap();
    synth::write_checkpoint(dir.path(), &o).unwrap();
    assert!(dir.path().join("model.safetensors.index.json").exists());
    synth::write_checkpoint(dir.path(), &o.clone().with_max_file_bytes(u64::MAX)).unwrap();
    assert!(!dir.path().join("model.safetensors.index.json").exists());
    assert!(dir.path().join("model.safetensors").exists());
    synth::write_checkpoint(dir.path(), &o).unwrap();
    assert!(!dir.path().join("model.safetensors").exists());
}

/// The reference Python implementation reads every file, with the same names, dtypes and
/// shapes; for F32 tensors (numpy has no BF16) the values match too (SHA-256 of the bytes).
#[test]
fn python_safetensors_reads_them() {
    use sha2::{Digest, Sha256};
    for name in [
        "gpt2-tiny",
        "llama-tiny",
        "deepseek-v3-tiny",
        "qwen2-moe-tiny",
    ] {
        let opts = SynthOptions::preset(name).unwrap();
        let dir = write_preset(&opts);
        let script = r#"
import sys, os, json, hashlib
from safetensors import safe_open
d = sys.argv[1]
out = {}
for f in sorted(os.listdir(d)):
    if not f.endswith(".safetensors"):
        continue
    with safe_open(os.path.join(d, f), "np") as s:
        for k in s.keys():
            sl = s.get_slice(k)
            e = {"dtype": sl.get_dtype(), "shape": sl.get_shape()}
            if e["dtype"] == "F32":
                e["sha"] = hashlib.sha256(s.get_tensor(k).tobytes()).hexdigest()
            out[k] = e
print(json.dumps(out))
"#;
        let got: serde_json::Value =
            serde_json::from_str(&common::python(script, &[dir.path().to_str().unwrap()])).unwrap();
        let list = synth::tensors(&opts).unwrap();
        assert_eq!(got.as_object().unwrap().len(), list.len(), "{name}");
        for (t, d, s) in &list {
            let e = &got[t];
            assert_eq!(e["dtype"], d.name(), "{name}: {t}");
            let shape: Vec<u64> = e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            assert_eq!(&shape, s, "{name}: {t}");
            if *d == Dtype::F32 {
                let bytes = synth::tensor_data(0, t, d.byte_size(elems(s)).unwrap() as usize);
                let sha: String = Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(e["sha"].as_str(), Some(sha.as_str()), "{name}: {t}");
            }
        }
    }
}

/// The crate's own strict reader opens every preset (dense tiny ones, sparse real-size ones)
/// with the listed tensors, dtypes, shapes and config.
#[test]
fn checkpoint_open_reads_every_preset() {
    use safeshard::checkpoint::Checkpoint;
    for name in synth::PRESETS {
        let opts = SynthOptions::preset(name).unwrap();
        let sparse = !name.contains("tiny");
        let opts = opts.with_sparse(sparse);
        let dir = write_preset(&opts);
        let ck = Checkpoint::open(dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let list = synth::tensors(&opts).unwrap();
        assert_eq!(ck.tensors.len(), list.len(), "{name}");
        for (t, d, s) in &list {
            let info = ck
                .tensor(t)
                .unwrap_or_else(|| panic!("{name}: {t} missing"));
            assert_eq!((info.dtype, &info.shape), (*d, s), "{name}: {t}");
        }
        assert_eq!(ck.config.as_ref(), Some(&opts.config), "{name}");
        assert!(ck.unindexed.is_empty(), "{name}");
    }
}

/// Options from an existing config.json reproduce the preset's tensors; unknown
/// architectures and dtypes are errors naming them.
#[test]
fn from_config() {
    for p in [
        "qwen2-tiny",
        "deepseek-v3-tiny",
        "gpt2-tiny",
        "mixtral-8x7b",
    ] {
        let o = SynthOptions::preset(p).unwrap();
        let f = SynthOptions::from_config(o.config.clone()).unwrap();
        assert_eq!(f.arch, o.arch, "{p}");
        assert_eq!(f.dtype, o.dtype, "{p}");
        assert_eq!(
            synth::tensors(&f).unwrap(),
            synth::tensors(&o).unwrap(),
            "{p}"
        );
    }
    let e =
        SynthOptions::from_config(serde_json::json!({"architectures": ["BertModel"]})).unwrap_err();
    assert!(e.to_string().contains("BertModel"), "{e}");
    let e = SynthOptions::from_config(
        serde_json::json!({"architectures": ["LlamaForCausalLM"], "torch_dtype": "int8"}),
    )
    .unwrap_err();
    assert!(e.to_string().contains("int8"), "{e}");
}

/// Bytes read through the catalog's offsets equal the generator's values, for every tensor of
/// a multi-file checkpoint, whatever the split (one file or many).
#[test]
fn catalog_offsets_give_fill_values() {
    use safeshard::checkpoint::Checkpoint;
    for max in [u64::MAX, 300_000] {
        let opts = SynthOptions::preset("qwen2-moe-tiny")
            .unwrap()
            .with_seed(5)
            .with_max_file_bytes(max);
        let dir = write_preset(&opts);
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.files.len() > 1, max != u64::MAX);
        for (name, _, _) in synth::tensors(&opts).unwrap() {
            let got = common::stored_tensor_bytes(&ck, &name);
            assert!(got == synth::tensor_data(5, &name, got.len()), "{name}");
        }
    }
}

/// Synth sizes tensors by the reader's rule: whole bytes only, and a shape whose non-zero
/// dimensions overflow is refused even when another dimension is zero.
#[test]
fn tensor_bytes_follows_the_reader() {
    assert_eq!(synth::tensor_bytes("a", Dtype::BF16, &[3, 5]).unwrap(), 30);
    assert_eq!(synth::tensor_bytes("a", Dtype::F4, &[0, 3]).unwrap(), 0);
    let e = synth::tensor_bytes("odd", Dtype::F4, &[3]).unwrap_err();
    assert!(e.to_string().contains("\"odd\""), "{e}");
    let big = 1u64 << 40;
    assert!(synth::tensor_bytes("a", Dtype::U8, &[0, big, big]).is_err());
    assert!(synth::tensor_bytes("a", Dtype::U8, &[big, big, 0]).is_err());
}
