//! Jobs with vLLM names (`JobBuilder::names(TensorNames::Vllm)`) on synthetic checkpoints:
//! every fused, stacked and transposed tensor equals the one built by hand from the stored
//! bytes (read with the tests' own safetensors reader, sliced and concatenated here), the
//! buffers hold vLLM's values, every load path agrees, and `reshard --format vllm` names its
//! files as vLLM's sharded_state loader reads them.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use safeshard::comm::run_threads;
use safeshard::synth::SynthOptions;
use safeshard::{Job, LoadOptions, ShareMode, ShareOptions, TensorNames, Topology};

/// Stored tensors of a checkpoint directory: name → (dtype, shape, bytes).
fn stored(dir: &Path) -> HashMap<String, (String, Vec<u64>, Vec<u8>)> {
    let mut out = HashMap::new();
    for f in common::safetensors_files(dir) {
        let bytes = std::fs::read(&f).unwrap();
        let (_, tensors, _) = common::read_file(&f);
        for t in tensors {
            let data = bytes[t.begin as usize..t.end as usize].to_vec();
            out.insert(t.name, (t.dtype, t.shape, data));
        }
    }
    out
}

fn elem(dtype: &str) -> usize {
    match dtype {
        "F32" | "I32" => 4,
        "F16" | "BF16" => 2,
        other => panic!("dtype {other} not used here"),
    }
}

/// Rows `r0..r1` of a row-major 2-D tensor.
fn rows(t: &(String, Vec<u64>, Vec<u8>), r0: usize, r1: usize) -> Vec<u8> {
    let row = t.1[1] as usize * elem(&t.0);
    t.2[r0 * row..r1 * row].to_vec()
}

/// Columns `c0..c1` of a row-major 2-D tensor, as a row-major `[rows, c1 - c0]` tensor.
fn cols(t: &(String, Vec<u64>, Vec<u8>), c0: usize, c1: usize) -> Vec<Vec<u8>> {
    let e = elem(&t.0);
    let width = t.1[1] as usize * e;
    (0..t.1[0] as usize)
        .map(|r| t.2[r * width + c0 * e..r * width + c1 * e].to_vec())
        .collect()
}

fn vllm_job(dir: &Path, topo: Topology) -> Job {
    Job::builder(dir)
        .topology(topo)
        .names(TensorNames::Vllm)
        .open()
        .unwrap()
}

fn tensor(rank: &safeshard::RankTensors, name: &str) -> (String, Vec<u64>, Vec<u8>) {
    let t = rank
        .get(name)
        .unwrap_or_else(|| panic!("rank {} has no {name}", rank.coords().rank));
    (t.dtype.to_string(), t.shape.to_vec(), t.data.to_vec())
}

#[test]
fn llama_qkv_and_gate_up_are_the_parts_row_split_and_concatenated() {
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny").unwrap());
    let src = stored(dir.path());
    let job = vllm_job(dir.path(), Topology::new(2, 1, 1, 1).unwrap());
    for r in 0..2 {
        let rank = job.load_rank(r, &LoadOptions::default()).unwrap();
        for layer in 0..4 {
            let p = |n: &str| src[&format!("model.layers.{layer}.{n}")].clone();
            // 8 query heads and 2 kv heads of 16: each rank holds half of q, one kv head.
            let mut want = rows(&p("self_attn.q_proj.weight"), r * 64, r * 64 + 64);
            want.extend(rows(&p("self_attn.k_proj.weight"), r * 16, r * 16 + 16));
            want.extend(rows(&p("self_attn.v_proj.weight"), r * 16, r * 16 + 16));
            let got = tensor(
                &rank,
                &format!("model.layers.{layer}.self_attn.qkv_proj.weight"),
            );
            assert_eq!(got.1, vec![96, 128]);
            assert!(got.2 == want, "rank {r} layer {layer}: qkv_proj bytes");
            let mut want = rows(&p("mlp.gate_proj.weight"), r * 176, r * 176 + 176);
            want.extend(rows(&p("mlp.up_proj.weight"), r * 176, r * 176 + 176));
            let got = tensor(
                &rank,
                &format!("model.layers.{layer}.mlp.gate_up_proj.weight"),
            );
            assert_eq!(got.1, vec![352, 128]);
            assert!(got.2 == want, "rank {r} layer {layer}: gate_up_proj bytes");
            // Unfused tensors keep their checkpoint names and bytes.
            let o = cols(&p("self_attn.o_proj.weight"), r * 64, r * 64 + 64).concat();
            assert!(
                tensor(
                    &rank,
                    &format!("model.layers.{layer}.self_attn.o_proj.weight")
                )
                .2 == o
            );
            for part in ["q_proj", "k_proj", "v_proj"] {
                let name = format!("model.layers.{layer}.self_attn.{part}.weight");
                assert!(rank.get(&name).is_none(), "{name} is fused away");
            }
            // vLLM's attention scales, 1.0 after its default load.
            for b in ["_k_scale", "_v_scale", "_q_scale", "_prob_scale"] {
                let t = tensor(&rank, &format!("model.layers.{layer}.self_attn.attn.{b}"));
                assert_eq!((t.0.as_str(), t.1.len()), ("F32", 0));
                assert_eq!(t.2, 1.0f32.to_le_bytes().to_vec());
            }
        }
    }
}

#[test]
fn gptq_qweight_fuses_on_its_output_columns() {
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny-gptq").unwrap());
    let src = stored(dir.path());
    let job = vllm_job(dir.path(), Topology::new(2, 1, 1, 1).unwrap());
    for r in 0..2 {
        let rank = job.load_rank(r, &LoadOptions::default()).unwrap();
        let p = |n: &str| src[&format!("model.layers.1.self_attn.{n}")].clone();
        // qweight is [in / 8, out]: q's 128 output columns split in halves, k/v one head of 16.
        let q = cols(&p("q_proj.qweight"), r * 64, r * 64 + 64);
        let k = cols(&p("k_proj.qweight"), r * 16, r * 16 + 16);
        let v = cols(&p("v_proj.qweight"), r * 16, r * 16 + 16);
        let want: Vec<u8> = (0..q.len())
            .flat_map(|i| [q[i].clone(), k[i].clone(), v[i].clone()].concat())
            .collect();
        let got = tensor(&rank, "model.layers.1.self_attn.qkv_proj.qweight");
        assert_eq!(got.1, vec![16, 96]);
        assert!(got.2 == want, "rank {r}: qkv_proj.qweight bytes");
        // qzeros [in / group, out / 8]: 16 packed columns for q, 4 for k and v.
        let q = cols(&p("q_proj.qzeros"), r * 8, r * 8 + 8);
        let k = cols(&p("k_proj.qzeros"), r * 2, r * 2 + 2);
        let v = cols(&p("v_proj.qzeros"), r * 2, r * 2 + 2);
        let want: Vec<u8> = (0..q.len())
            .flat_map(|i| [q[i].clone(), k[i].clone(), v[i].clone()].concat())
            .collect();
        let got = tensor(&rank, "model.layers.1.self_attn.qkv_proj.qzeros");
        assert_eq!(got.1, vec![4, 12]);
        assert!(got.2 == want, "rank {r}: qkv_proj.qzeros bytes");
    }
}

#[test]
fn gpt2_conv1d_weights_are_transposed_and_prefixed() {
    let dir = common::write_preset(&SynthOptions::preset("gpt2-tiny").unwrap());
    let src = stored(dir.path());
    let job = vllm_job(dir.path(), Topology::new(2, 1, 1, 1).unwrap());
    for r in 0..2 {
        let rank = job.load_rank(r, &LoadOptions::default()).unwrap();
        // c_attn.weight is Conv1D [in 64, out 3 * 64]: rank r holds the r-th half of q, k
        // and v's columns; vLLM holds them as [3 * 32, 64].
        let w = &src["h.0.attn.c_attn.weight"];
        let e = elem(&w.0);
        let mut want = Vec::new();
        for j in 0..96usize {
            let col = (j / 32) * 64 + r * 32 + j % 32;
            for i in 0..64usize {
                let at = (i * 192 + col) * e;
                want.extend_from_slice(&w.2[at..at + e]);
            }
        }
        let got = tensor(&rank, "transformer.h.0.attn.c_attn.weight");
        assert_eq!(got.1, vec![96, 64]);
        assert!(got.2 == want, "rank {r}: c_attn.weight bytes");
        // mlp.c_proj is row-parallel: Conv1D [in 256, out 64], rows split, then transposed.
        let w = &src["h.1.mlp.c_proj.weight"];
        assert_eq!(w.1, vec![256, 64]);
        let mut want = Vec::new();
        for o in 0..64usize {
            for i in r * 128..r * 128 + 128 {
                let at = (i * 64 + o) * e;
                want.extend_from_slice(&w.2[at..at + e]);
            }
        }
        let got = tensor(&rank, "transformer.h.1.mlp.c_proj.weight");
        assert_eq!(got.1, vec![64, 128]);
        assert!(got.2 == want, "rank {r}: mlp.c_proj.weight bytes");
        // Tied: vLLM's sharded_state keeps the head's name for the shared embedding.
        assert!(rank.get("lm_head.weight").is_some());
        assert!(rank.get("transformer.wte.weight").is_none());
        assert!(rank.get("wte.weight").is_none());
        assert!(rank.get("transformer.ln_f.weight").is_some());
    }
}

#[test]
fn mixtral_experts_stack_w1_w3_and_w2_in_expert_order() {
    let dir = common::write_preset(&SynthOptions::preset("mixtral-tiny").unwrap());
    let src = stored(dir.path());
    let job = vllm_job(dir.path(), Topology::new(2, 1, 1, 1).unwrap());
    let ex = |e: usize, w: &str| {
        src[&format!("model.layers.0.block_sparse_moe.experts.{e}.{w}.weight")].clone()
    };
    for r in 0..2 {
        let rank = job.load_rank(r, &LoadOptions::default()).unwrap();
        let (mut w13, mut w2) = (Vec::new(), Vec::new());
        for e in 0..8 {
            w13.extend(rows(&ex(e, "w1"), r * 128, r * 128 + 128));
            w13.extend(rows(&ex(e, "w3"), r * 128, r * 128 + 128));
            w2.extend(cols(&ex(e, "w2"), r * 128, r * 128 + 128).concat());
        }
        let base = "model.layers.0.block_sparse_moe.experts.routed_experts";
        let got = tensor(&rank, &format!("{base}.w13_weight"));
        assert_eq!(got.1, vec![8, 256, 128]);
        assert!(got.2 == w13, "rank {r}: w13_weight bytes");
        let got = tensor(&rank, &format!("{base}.w2_weight"));
        assert_eq!(got.1, vec![8, 128, 128]);
        assert!(got.2 == w2, "rank {r}: w2_weight bytes");
    }
}

#[test]
fn every_load_path_gives_the_same_vllm_tensors() {
    for preset in ["gpt2-tiny", "mixtral-tiny"] {
        every_load_path_agrees(preset);
    }
}

fn every_load_path_agrees(preset: &str) {
    let dir = common::write_preset(&SynthOptions::preset(preset).unwrap());
    // tp 2 x dp 2: a share mode moves the relocated runs between ranks.
    let job = vllm_job(dir.path(), Topology::new(2, 1, 2, 1).unwrap());
    let local: Vec<_> = (0..job.world())
        .map(|r| job.load_rank(r, &LoadOptions::default()).unwrap())
        .collect();
    // A caller's buffer, finished by the job (buffers, transposes).
    for (r, mine) in local.iter().enumerate() {
        let mut buf = vec![0xa5u8; job.plan.ranks[r].arena_bytes as usize];
        job.load_rank_into_buffer(r, &LoadOptions::default(), &mut buf)
            .unwrap();
        for (t, plan) in mine.iter().zip(mine.plans()) {
            let at = plan.offset as usize;
            assert!(
                buf[at..at + t.data.len()] == *t.data,
                "{preset} buffer {}",
                t.name
            );
        }
    }
    // Zero-copy views where possible; the transposed tensors are materialized.
    for (r, mine) in local.iter().enumerate() {
        let opts = LoadOptions {
            views: true,
            ..LoadOptions::default()
        };
        // SAFETY: nothing writes the checkpoint while the views live.
        let viewed = unsafe { job.load_rank_views(r, &opts) }.unwrap();
        for t in mine.iter() {
            assert!(
                viewed.get(t.name).unwrap().data == t.data,
                "{preset} views {}",
                t.name
            );
        }
    }
    for mode in [ShareMode::Broadcast, ShareMode::ReadOnce] {
        let opts = ShareOptions {
            mode,
            ..ShareOptions::default()
        };
        for shared in run_threads(job.world(), |comm| job.load_shared(comm, &opts)) {
            let shared = shared.unwrap();
            let mine = &local[shared.coords().rank];
            assert_eq!(shared.len(), mine.len());
            for t in mine.iter() {
                assert!(
                    shared.get(t.name).unwrap().data == t.data,
                    "{mode:?} {}",
                    t.name
                );
            }
        }
    }
    // The names are part of the plan: ranks of a vLLM-named job never agree with a
    // checkpoint-named one.
    let plain = Job::builder(dir.path())
        .topology(Topology::new(2, 1, 2, 1).unwrap())
        .open()
        .unwrap();
    assert_ne!(plain.plan.hash(), job.plan.hash());
}

#[test]
fn tied_embeddings_go_under_the_head_where_vllm_builds_one() {
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny-tied").unwrap());
    let src = stored(dir.path());
    let job = vllm_job(dir.path(), Topology::new(1, 2, 1, 1).unwrap());
    let first = job.load_rank(0, &LoadOptions::default()).unwrap();
    let last = job.load_rank(1, &LoadOptions::default()).unwrap();
    // Llama builds the head on the last stage only; there it shares the embedding's storage
    // and ShardedStateLoader keeps the smaller name, lm_head.weight.
    assert!(first.get("model.embed_tokens.weight").is_some());
    assert!(first.get("lm_head.weight").is_none());
    assert!(last.get("model.embed_tokens.weight").is_none());
    let head = tensor(&last, "lm_head.weight");
    // Vocab 1000 padded to 1024 rows of zeros.
    let emb = &src["model.embed_tokens.weight"];
    let row = 128 * elem(&emb.0);
    assert_eq!(head.1, vec![1024, 128]);
    assert!(head.2[..1000 * row] == emb.2[..]);
    assert!(head.2[1000 * row..].iter().all(|&b| b == 0));
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn a_user_spec_carries_its_own_map_and_its_errors_name_file_and_key() {
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny").unwrap());
    let specs = tempfile::tempdir().unwrap();
    let shard = specs.path().join("mine.shard");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("shard-specs/llama.shard"),
        &shard,
    )
    .unwrap();
    let open = || {
        Job::builder(dir.path())
            .spec(shard.to_str().unwrap())
            .names(TensorNames::Vllm)
            .open()
    };
    // No map beside the spec: a typed error the plugin can fall back on.
    let e = open().unwrap_err();
    assert_eq!(e.kind().name(), "unsupported", "{e}");
    assert!(e.to_string().contains("mine.vllm.json"), "{e}");
    let map = specs.path().join("mine.vllm.json");
    let cases = [
        ("{", "mine.vllm.json:1:"),
        (
            r#"{"vllm": "0.33.0", "quantization": ["none"], "renames": []}"#,
            "unknown field `renames`",
        ),
        (
            r#"{"vllm": "0.33.0", "quantization": ["none"], "fuse": [{"into": "a.{L}.qkv.{S}", "parts": ["a.{L}.q.{S}", "a.{X}.k.{S}"], "dim": {"weight": 0}}]}"#,
            "`fuse[0].parts[1]`",
        ),
        (
            r#"{"vllm": "0.33.0", "quantization": ["none"], "fuse": [{"into": "a..b", "parts": ["a"], "dim": {"weight": 0}}]}"#,
            "`fuse[0].into`",
        ),
        (
            r#"{"vllm": "0.33.0", "quantization": ["none"], "buffers": [{"name": "x.{L}", "with": "y", "dtype": "F32", "shape": [], "value": 1}]}"#,
            "`buffers[0].name`",
        ),
        (
            r#"{"vllm": "0.33.0", "quantization": ["none"], "buffers": [{"name": "x", "with": "y", "dtype": "I8", "shape": [], "value": 1}]}"#,
            "`buffers[0].dtype`",
        ),
        (
            r#"{"vllm": "0.33.0", "quantization": ["none"], "tie": {"embedding": "e", "head": "h", "default": false, "head_stages": "first"}}"#,
            "`tie.head_stages`",
        ),
        (r#"{"vllm": "", "quantization": ["none"]}"#, "`vllm`"),
    ];
    for (text, want) in cases {
        write(&map, text);
        let e = open().unwrap_err().to_string();
        assert!(e.contains("mine.vllm.json"), "{text}: {e}");
        assert!(e.contains(want), "{text}: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }
    // A map that does not cover the checkpoint's quantization method.
    write(&map, r#"{"vllm": "0.33.0", "quantization": ["gptq"]}"#);
    let e = open().unwrap_err();
    assert_eq!(e.kind().name(), "unsupported", "{e}");
    assert!(e.to_string().contains("`none`"), "{e}");
    // A fused rule that only finds some of its parts on a rank is a plan error naming it.
    write(
        &map,
        r#"{"vllm": "0.33.0", "quantization": ["none"], "fuse": [{"into": "model.layers.{L}.self_attn.qko.{S}", "parts": ["model.layers.{L}.self_attn.q_proj.{S}", "model.layers.{L}.self_attn.nothing.{S}"], "dim": {"weight": 0}}]}"#,
    );
    let e = open().unwrap_err().to_string();
    assert!(e.contains("model.layers.0.self_attn.qko.weight"), "{e}");
    assert!(e.contains("missing"), "{e}");
    // ... unless the rule fuses only complete groups: then the parts keep their names.
    write(
        &map,
        r#"{"vllm": "0.33.0", "quantization": ["none"], "fuse": [{"into": "model.layers.{L}.self_attn.qko.{S}", "parts": ["model.layers.{L}.self_attn.q_proj.{S}", "model.layers.{L}.self_attn.nothing.{S}"], "dim": {"weight": 0}, "if_complete": true}]}"#,
    );
    let rank = open()
        .unwrap()
        .load_rank(0, &LoadOptions::default())
        .unwrap();
    assert!(rank.get("model.layers.0.self_attn.q_proj.weight").is_some());
    assert!(rank.get("model.layers.0.self_attn.qko.weight").is_none());
    // Of two names of one parameter, the smaller is kept (as ShardedStateLoader does).
    write(
        &map,
        r#"{"vllm": "0.33.0", "quantization": ["none"], "aliases": [["model.layers.{L}.self_attn.o_proj.{S}", "model.layers.{L}.self_attn.attn_o.{S}"], ["model.norm.weight", "model.z.weight"]]}"#,
    );
    let job = open().unwrap();
    let rank = job.load_rank(0, &LoadOptions::default()).unwrap();
    assert!(rank.get("model.layers.2.self_attn.attn_o.weight").is_some());
    assert!(rank.get("model.layers.2.self_attn.o_proj.weight").is_none());
    assert!(rank.get("model.norm.weight").is_some());
    write(
        &map,
        r#"{"vllm": "0.33.0", "quantization": ["none"], "aliases": [["a.{L}.b", "a.{X}.c"]]}"#,
    );
    let e = open().unwrap_err().to_string();
    assert!(e.contains("`aliases[0][1]`"), "{e}");
    // A minimal valid map: only the names it mentions change.
    write(&map, r#"{"vllm": "0.33.0", "quantization": ["none"]}"#);
    let job = open().unwrap();
    let rank = job.load_rank(0, &LoadOptions::default()).unwrap();
    assert!(rank.get("model.layers.0.self_attn.q_proj.weight").is_some());
}

fn safeshard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_safeshard"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs the CLI and requires success, showing its stderr otherwise.
fn safeshard_ok(args: &[&str]) {
    let run = safeshard(args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn reshard_format_vllm_writes_sharded_state_files_and_the_config() {
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny").unwrap());
    let ck = dir.path().to_str().unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("pp2");
    safeshard_ok(&[
        "reshard",
        ck,
        "--format",
        "vllm",
        "--tp",
        "2",
        "--pp",
        "2",
        "--out",
        o.to_str().unwrap(),
    ]);
    let mut names: Vec<String> = std::fs::read_dir(&o)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "model-pp-0-tp-0-part-0.safetensors",
            "model-pp-0-tp-1-part-0.safetensors",
            "model-pp-1-tp-0-part-0.safetensors",
            "model-pp-1-tp-1-part-0.safetensors",
            "safeshard-plan.json"
        ]
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o.join("config.json")).unwrap()).unwrap();
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config, original);
    let (_, last, _) = common::read_file(&o.join("model-pp-1-tp-1-part-0.safetensors"));
    let last: Vec<&str> = last.iter().map(|t| t.name.as_str()).collect();
    assert!(
        last.contains(&"lm_head.weight")
            && last.contains(&"model.layers.3.self_attn.qkv_proj.weight")
    );
    assert!(last.contains(&"model.layers.3.self_attn.attn._k_scale"));
    // pp = 1: one file set per TP rank under the TP-only pattern; the pp = 2 files are removed.
    safeshard_ok(&[
        "reshard",
        ck,
        "--format",
        "vllm",
        "--tp",
        "2",
        "--out",
        o.to_str().unwrap(),
    ]);
    let parts: Vec<String> = common::safetensors_files(&o)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        parts,
        [
            "model-rank-0-part-0.safetensors",
            "model-rank-1-part-0.safetensors"
        ]
    );
    // vLLM has no per-replica files: dp or ep > 1 is bad usage (exit 2), nothing written.
    let o2 = out.path().join("dp2");
    let run = safeshard(&[
        "reshard",
        ck,
        "--format",
        "vllm",
        "--tp",
        "2",
        "--dp",
        "2",
        "--out",
        o2.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("--format") && err.contains("dp = 2"), "{err}");
    assert!(!o2.exists());
}

#[test]
fn a_stored_head_under_a_tied_config_is_written_untied() {
    // A tied config whose checkpoint stores lm_head.weight: vLLM's default load unties it,
    // its sharded_state load never does, so the written config must say untied.
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny").unwrap());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("o");
    safeshard_ok(&[
        "reshard",
        dir.path().to_str().unwrap(),
        "--format",
        "vllm",
        "--out",
        o.to_str().unwrap(),
    ]);
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["tie_word_embeddings"], false);
    let (_, t, _) = common::read_file(&o.join("model-rank-0-part-0.safetensors"));
    let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"lm_head.weight") && names.contains(&"model.embed_tokens.weight"));
}

/// Cost of vLLM names, printed (`cargo test --test it vllm_names_cost -- --ignored
/// --nocapture`, best with `--release`): planning a real-size sparse Mixtral-8x7B at tp 8
/// with and without the transform, and loading real-size GPT-2 (every Conv1D weight
/// transposed through strided runs) under both names.
#[test]
#[ignore = "a measurement, not a check"]
fn vllm_names_cost() {
    use std::time::Instant;
    let mut opts = SynthOptions::preset("mixtral-8x7b").unwrap();
    opts.sparse = true;
    let dir = common::write_preset(&opts);
    let topo = Topology::new(8, 1, 1, 1).unwrap();
    for names in [
        TensorNames::Checkpoint,
        TensorNames::Vllm,
        TensorNames::Checkpoint,
        TensorNames::Vllm,
    ] {
        let t = Instant::now();
        let job = Job::builder(dir.path())
            .topology(topo.clone())
            .names(names)
            .open()
            .unwrap();
        let runs: usize = job.plan.ranks.iter().map(|r| r.copies.len()).sum();
        println!(
            "mixtral-8x7b tp8 plan {names:?}: {:.3} s, {} tensors on rank 0, {runs} copy runs",
            t.elapsed().as_secs_f64(),
            job.plan.ranks[0].tensors.len()
        );
    }
    let dir = common::write_preset(&SynthOptions::preset("gpt2").unwrap());
    for tp in [1, 4] {
        let topo = Topology::new(tp, 1, 1, 1).unwrap();
        for names in [
            TensorNames::Checkpoint,
            TensorNames::Vllm,
            TensorNames::Checkpoint,
            TensorNames::Vllm,
        ] {
            let job = Job::builder(dir.path())
                .topology(topo.clone())
                .names(names)
                .open()
                .unwrap();
            let t = Instant::now();
            let rank = job.load_rank(tp - 1, &LoadOptions::default()).unwrap();
            println!(
                "gpt2 tp{tp} load rank {} {names:?}: {:.3} s, {} bytes, {} copy runs",
                tp - 1,
                t.elapsed().as_secs_f64(),
                rank.stats().bytes,
                job.plan.ranks[tp - 1].copies.len()
            );
        }
    }
}

#[test]
fn a_finished_rank_is_never_finished_again() {
    let dir = common::write_preset(&SynthOptions::preset("gpt2-tiny").unwrap());
    let src = stored(dir.path());
    let job = vllm_job(dir.path(), Topology::new(2, 1, 1, 1).unwrap());
    // c_attn.weight is Conv1D [in 64, out 3 * 64]; vLLM holds rank r's columns transposed.
    let w = &src["h.0.attn.c_attn.weight"];
    let e = elem(&w.0);
    let want = |r: usize| {
        let mut want = Vec::new();
        for j in 0..96usize {
            let col = (j / 32) * 64 + r * 32 + j % 32;
            for i in 0..64usize {
                let at = (i * 192 + col) * e;
                want.extend_from_slice(&w.2[at..at + e]);
            }
        }
        want
    };
    let name = "transformer.h.0.attn.c_attn.weight";
    for r in 0..2 {
        // Through the lower layer: loaded as stored, finished by the job once.
        let mut raw = safeshard::load::load_rank(&job.plan, r, &LoadOptions::default()).unwrap();
        assert!(!raw.is_finished());
        assert!(
            tensor(&raw, name).2 != want(r),
            "rank {r}: not transposed yet"
        );
        job.finish(&mut raw).unwrap();
        assert!(raw.is_finished());
        assert!(tensor(&raw, name).2 == want(r), "rank {r}: transposed once");
        job.finish(&mut raw).unwrap();
        assert!(
            tensor(&raw, name).2 == want(r),
            "rank {r}: a second finish changes nothing"
        );
        // Every Job load is finished already.
        let mut loaded = job.load_rank(r, &LoadOptions::default()).unwrap();
        assert!(loaded.is_finished());
        job.finish(&mut loaded).unwrap();
        assert!(
            tensor(&loaded, name).2 == want(r),
            "rank {r}: load_rank then finish"
        );
        let opts = ShareOptions::default();
        for mut shared in run_threads(job.world(), |comm| job.load_shared(comm, &opts)) {
            let shared = shared.as_mut().unwrap();
            job.finish(shared).unwrap();
            let sr = shared.coords().rank;
            assert!(tensor(shared, name).2 == want(sr), "shared rank {sr}");
        }
    }
    // A rank of another plan (checkpoint names) is refused, not transposed.
    let plain = Job::builder(dir.path())
        .topology(Topology::new(2, 1, 1, 1).unwrap())
        .open()
        .unwrap();
    let mut other = safeshard::load::load_rank(&plain.plan, 0, &LoadOptions::default()).unwrap();
    let e = job.finish(&mut other).unwrap_err().to_string();
    assert!(e.contains("rank 0") && e.contains("not this plan's"), "{e}");
}

/// A tied Llama checkpoint that also stores `lm_head.weight` (its own file, listed in the
/// index): `head(embedding bytes)` gives the head's bytes. Returns the embedding and head as
/// stored (dtype, shape, bytes).
type Stored = (String, Vec<u64>, Vec<u8>);

fn store_head(dir: &Path, head: impl Fn(&[u8]) -> Vec<u8>) -> (Stored, Stored) {
    let emb = stored(dir)["model.embed_tokens.weight"].clone();
    let bytes = head(&emb.2);
    let header = serde_json::json!({
        "__metadata__": {"format": "pt"},
        "lm_head.weight": {"dtype": emb.0, "shape": emb.1, "data_offsets": [0, bytes.len()]},
    });
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&bytes);
    std::fs::write(dir.join("lm_head.safetensors"), file).unwrap();
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["weight_map"]["lm_head.weight"] = "lm_head.safetensors".into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let head = (emb.0.clone(), emb.1.clone(), bytes);
    (emb, head)
}

/// Rewrites the stored embedding's bytes in place (same length).
fn rewrite_embedding(dir: &Path, f: impl Fn(&mut [u8])) {
    for path in common::safetensors_files(dir) {
        let (_, tensors, _) = common::read_file(&path);
        if let Some(t) = tensors
            .iter()
            .find(|t| t.name == "model.embed_tokens.weight")
        {
            let mut bytes = std::fs::read(&path).unwrap();
            f(&mut bytes[t.begin as usize..t.end as usize]);
            std::fs::write(&path, bytes).unwrap();
        }
    }
}

fn is_bf16_nan(b: &[u8]) -> bool {
    let v = u16::from_le_bytes([b[0], b[1]]);
    v & 0x7f80 == 0x7f80 && v & 0x007f != 0
}

/// Rank `r`'s vocab rows of a stored `[vocab, hidden]` tensor as vLLM pads them: the vocab
/// padded to a multiple of 64, split evenly over `tp`, rows past the vocab zero.
fn vocab_shard(t: &Stored, tp: usize, r: usize) -> Vec<u8> {
    let (vocab, row) = (t.1[0] as usize, t.1[1] as usize * elem(&t.0));
    let per = vocab.div_ceil(64) * 64 / tp;
    let mut out = vec![0u8; per * row];
    let (lo, hi) = ((r * per).min(vocab), ((r + 1) * per).min(vocab));
    out[..(hi - lo) * row].copy_from_slice(&t.2[lo * row..hi * row]);
    out
}

/// `(load path, rank, tensor bytes by name, aliases)`.
type Check<'a> = &'a dyn Fn(&str, usize, &dyn Fn(&str) -> Option<Vec<u8>>, &[(String, String)]);

/// Every load path of a vLLM-named job, rank by rank: `load_rank`, views, a caller's buffer,
/// the two share modes, and a scattered load with the head (or the embedding) in a caller
/// buffer; `check(rank, name -> bytes, aliases)` sees each.
fn every_vllm_load(job: &Job, check: Check<'_>) {
    for r in 0..job.world() {
        let loaded = job.load_rank(r, &LoadOptions::default()).unwrap();
        check(
            "load_rank",
            r,
            &|n| loaded.get(n).map(|t| t.data.to_vec()),
            loaded.aliases(),
        );
        let opts = LoadOptions {
            views: true,
            ..LoadOptions::default()
        };
        // SAFETY: nothing writes the checkpoint while the views live.
        let viewed = unsafe { job.load_rank_views(r, &opts) }.unwrap();
        check(
            "views",
            r,
            &|n| viewed.get(n).map(|t| t.data.to_vec()),
            viewed.aliases(),
        );
        let mut buf = vec![0xa5u8; job.plan.ranks[r].arena_bytes as usize];
        let b = job
            .load_rank_into_buffer(r, &LoadOptions::default(), &mut buf)
            .unwrap();
        let get = |n: &str| {
            let t = b.tensors.iter().find(|t| t.name == n)?;
            Some(buf[t.offset as usize..(t.offset + t.bytes) as usize].to_vec())
        };
        check("buffer", r, &get, &b.aliases);
        for into_name in ["lm_head.weight", "model.embed_tokens.weight"] {
            let Some(t) = job.plan.ranks[r]
                .tensors
                .iter()
                .find(|t| t.name == into_name)
            else {
                continue;
            };
            let mut mine = vec![0x5au8; t.bytes as usize];
            let mut into = [(into_name, &mut mine[..])];
            let s = job
                .load_rank_scattered(r, &LoadOptions::default(), &mut into)
                .unwrap();
            let held = |n: &str| s.get(n).map(|t| t.data.to_vec());
            // A tensor in the caller's buffer is not held; a name the rank keeps is there.
            let get = |n: &str| {
                if n == into_name && !s.aliases().iter().any(|(a, _)| a == n) {
                    return Some(mine.clone());
                }
                held(n)
            };
            check(&format!("scattered into {into_name}"), r, &get, s.aliases());
        }
    }
    for mode in [ShareMode::Broadcast, ShareMode::ReadOnce] {
        let opts = ShareOptions {
            mode,
            ..ShareOptions::default()
        };
        for shared in run_threads(job.world(), |comm| job.load_shared(comm, &opts)) {
            let shared = shared.unwrap();
            let r = shared.coords().rank;
            let get = |n: &str| shared.get(n).map(|t| t.data.to_vec());
            check(&format!("{mode:?}"), r, &get, shared.aliases());
        }
    }
}

#[test]
fn a_stored_head_equal_to_the_embedding_is_retied_on_every_rank() {
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny-tied").unwrap());
    // No NaN (vLLM's torch.equal never equals a NaN), and zeros whose sign the head flips:
    // -0 equals +0, so vLLM still re-ties, and the tied head is the embedding's storage.
    rewrite_embedding(dir.path(), |b| {
        for (k, x) in b.chunks_exact_mut(2).enumerate() {
            if is_bf16_nan(x) || k % 7 == 0 {
                x.copy_from_slice(&[0, 0]);
            }
        }
    });
    let (emb, head) = store_head(dir.path(), |e| {
        let mut h = e.to_vec();
        for x in h.chunks_exact_mut(2) {
            if x == [0, 0] {
                x.copy_from_slice(&[0, 0x80]);
            }
        }
        h
    });
    assert!(emb.2 != head.2, "the head differs in bytes (signed zeros)");
    for tp in [1, 2, 4, 8] {
        let job = vllm_job(dir.path(), Topology::new(tp, 1, 1, 1).unwrap());
        every_vllm_load(&job, &|path, r, get, aliases| {
            let got = get("lm_head.weight").unwrap_or_else(|| panic!("{path} tp {tp} rank {r}"));
            assert!(
                got == vocab_shard(&emb, tp, r),
                "{path} tp {tp} rank {r}: the head holds the embedding's bytes"
            );
            assert!(
                get("model.embed_tokens.weight").is_none(),
                "{path} tp {tp} rank {r}"
            );
            assert_eq!(
                aliases,
                [(
                    "model.embed_tokens.weight".to_string(),
                    "lm_head.weight".to_string()
                )],
                "{path} tp {tp} rank {r}"
            );
        });
    }
}

#[test]
fn a_stored_head_is_kept_apart_where_vllm_sees_a_difference_or_a_nan() {
    // The synthetic embedding holds NaNs: an exact byte copy is still not equal for
    // torch.equal, so vLLM keeps the stored head; so must every load path.
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny-tied").unwrap());
    let (emb, head) = store_head(dir.path(), |e| e.to_vec());
    assert!(
        emb.2.chunks_exact(2).any(is_bf16_nan),
        "the preset's embedding holds a NaN"
    );
    for tp in [1, 2] {
        let job = vllm_job(dir.path(), Topology::new(tp, 1, 1, 1).unwrap());
        every_vllm_load(&job, &|path, r, get, aliases| {
            assert!(
                get("lm_head.weight") == Some(vocab_shard(&head, tp, r)),
                "{path} tp {tp} rank {r}"
            );
            assert!(
                get("model.embed_tokens.weight") == Some(vocab_shard(&emb, tp, r)),
                "{path} tp {tp} rank {r}"
            );
            assert!(aliases.is_empty(), "{path} tp {tp} rank {r}: {aliases:?}");
        });
    }
}

#[test]
fn ranks_whose_vocab_rows_are_all_padding_retie_even_when_the_head_differs() {
    // Vocab 65, padded to 128 rows: at tp 4 rank 3 (rows 96..128), at tp 8 ranks 5-7 hold
    // only padding, zeros in both tensors, so vLLM re-ties there; the others keep the head.
    let mut opts = SynthOptions::preset("llama-tiny-tied").unwrap();
    opts.config["vocab_size"] = 65.into();
    let dir = common::write_preset(&opts);
    let (emb, head) = store_head(dir.path(), |e| {
        e.chunks_exact(2)
            .flat_map(|x| [x[0], x[1] ^ 0x80]) // every value negated
            .collect()
    });
    for (tp, padding_only) in [(4, vec![3]), (8, vec![5, 6, 7])] {
        let job = vllm_job(dir.path(), Topology::new(tp, 1, 1, 1).unwrap());
        every_vllm_load(&job, &|path, r, get, aliases| {
            let at = format!("{path} tp {tp} rank {r}");
            if padding_only.contains(&r) {
                let zeros = vocab_shard(&emb, tp, r);
                assert!(zeros.iter().all(|&b| b == 0), "{at}");
                assert!(get("lm_head.weight") == Some(zeros), "{at}");
                assert!(get("model.embed_tokens.weight").is_none(), "{at}");
                assert_eq!(aliases.len(), 1, "{at}");
            } else {
                assert!(
                    get("lm_head.weight") == Some(vocab_shard(&head, tp, r)),
                    "{at}"
                );
                assert!(
                    get("model.embed_tokens.weight") == Some(vocab_shard(&emb, tp, r)),
                    "{at}"
                );
                assert!(aliases.is_empty(), "{at}: {aliases:?}");
            }
        });
    }
}

/// Tensor names and bytes of every part file of `out` for one TP-only rank.
fn written_rank(out: &Path, tp_rank: usize) -> HashMap<String, Vec<u8>> {
    let mut got = HashMap::new();
    for f in common::safetensors_files(out) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with(&format!("model-rank-{tp_rank}-part-")) {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap();
        for t in common::read_file(&f).1 {
            got.insert(t.name, bytes[t.begin as usize..t.end as usize].to_vec());
        }
    }
    got
}

#[test]
fn reshard_format_vllm_writes_retied_heads_as_vllm_sharded_state_loads_them() {
    let config = |out: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap()
    };
    // Every rank re-ties: the config stays tied (vLLM's sharded_state loader builds every
    // rank tied) and each rank holds the head's name only, with the embedding's bytes.
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny-tied").unwrap());
    rewrite_embedding(dir.path(), |b| {
        for x in b.chunks_exact_mut(2) {
            if is_bf16_nan(x) {
                x.copy_from_slice(&[0, 0]);
            }
        }
    });
    let (emb, _) = store_head(dir.path(), |e| e.to_vec());
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("copy");
    let args = |o: &Path, tp: &str| {
        let (d, o) = (
            dir.path().to_str().unwrap().to_string(),
            o.to_str().unwrap().to_string(),
        );
        [
            "reshard".into(),
            d,
            "--format".into(),
            "vllm".into(),
            "--tp".into(),
            tp.into(),
            "--out".into(),
            o,
        ]
    };
    let a = args(&o, "2");
    safeshard_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(config(&o)["tie_word_embeddings"], true);
    for r in 0..2 {
        let got = written_rank(&o, r);
        assert!(got["lm_head.weight"] == vocab_shard(&emb, 2, r), "rank {r}");
        assert!(!got.contains_key("model.embed_tokens.weight"), "rank {r}");
    }
    // Only the padding rank of a vocab-65 model re-ties: no config says that to vLLM's
    // sharded_state loader, so the config says untied and every rank holds both names
    // (the re-tied rank's head with the embedding's bytes), as the loader needs.
    let mut opts = SynthOptions::preset("llama-tiny-tied").unwrap();
    opts.config["vocab_size"] = 65.into();
    let dir = common::write_preset(&opts);
    let (emb, head) = store_head(dir.path(), |e| {
        e.chunks_exact(2)
            .flat_map(|x| [x[0], x[1] ^ 0x80])
            .collect()
    });
    let o = out.path().join("mixed");
    let (d, os) = (dir.path().to_str().unwrap(), o.to_str().unwrap());
    safeshard_ok(&["reshard", d, "--format", "vllm", "--tp", "4", "--out", os]);
    assert_eq!(config(&o)["tie_word_embeddings"], false);
    for r in 0..4 {
        let got = written_rank(&o, r);
        let want_head = if r == 3 {
            vocab_shard(&emb, 4, r)
        } else {
            vocab_shard(&head, 4, r)
        };
        assert!(got["lm_head.weight"] == want_head, "rank {r}");
        assert!(
            got["model.embed_tokens.weight"] == vocab_shard(&emb, 4, r),
            "rank {r}"
        );
    }
    let parts: Vec<String> = common::safetensors_files(&o)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(parts.len(), 4, "{parts:?}");
}
