//! `safeshard plan` end to end on tiny synthetic checkpoints: table snapshots for every shipped
//! spec, the JSON schema and its consistency, the SVG picture, and the errors' exit codes.

use std::path::Path;
use std::process::{Command, Output};

use safeshard::synth::{self, SynthOptions};

fn write(preset: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions::preset(preset).unwrap();
    synth::write_checkpoint(dir.path(), &opts).unwrap();
    dir
}

fn plan(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safeshard"))
        .arg("plan")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn stdout_ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The table for each shipped architecture on its tiny preset.
#[test]
fn table_snapshots() {
    let cases: &[(&str, &[&str])] = &[
        ("llama-tiny", &["--tp", "2", "--pp", "2"]),
        ("mistral-tiny", &["--tp", "4"]),
        ("qwen2-tiny", &["--tp", "2", "--pp", "2"]),
        ("phi3-tiny", &["--tp", "2", "--pp", "2"]),
        ("mixtral-tiny", &["--tp", "2", "--pp", "2"]),
        ("mixtral-tiny", &["--tp", "2", "--dp", "2", "--ep", "4"]),
        ("qwen2-moe-tiny", &["--tp", "2", "--pp", "2"]),
        ("deepseek-v3-tiny", &["--tp", "2", "--pp", "2"]),
        ("deepseek-v3-tiny", &["--tp", "4", "--ep", "4"]),
        ("gpt2-tiny", &["--tp", "2", "--pp", "2"]),
    ];
    for (preset, args) in cases {
        let dir = write(preset);
        let out = stdout_ok(&plan(dir.path(), args));
        let name = format!("{preset}{}", args.join("").replace("--", "_"));
        insta::assert_snapshot!(name, out);
    }
}

#[test]
fn json_schema_and_consistency() {
    let dir = write("llama-tiny");
    let out = stdout_ok(&plan(dir.path(), &["--tp", "2", "--pp", "2", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for k in ["world_size", "tp", "pp", "dp", "ep", "ranks"] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["world_size"], 4);
    assert_eq!(
        (
            v["tp"].as_u64(),
            v["pp"].as_u64(),
            v["dp"].as_u64(),
            v["ep"].as_u64()
        ),
        (Some(2), Some(2), Some(1), Some(1))
    );
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    let mut all_names = std::collections::BTreeSet::new();
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r["rank"], i);
        assert_eq!(r["tp_rank"], i % 2);
        assert_eq!(r["pp_rank"], i / 2);
        assert_eq!(r["dp_rank"], 0);
        let tensors = r["tensors"].as_array().unwrap();
        let mut sum = 0;
        for t in tensors {
            let shape: Vec<u64> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            let bytes = t["bytes"].as_u64().unwrap();
            assert_eq!(t["dtype"], "BF16");
            // BF16: two bytes per element of the rank-local shape.
            assert_eq!(bytes, 2 * shape.iter().product::<u64>(), "{t}");
            sum += bytes;
            all_names.insert(t["name"].as_str().unwrap().to_string());
        }
        assert_eq!(r["bytes"].as_u64().unwrap(), sum);
        let read = r["read_bytes"].as_u64().unwrap();
        assert_eq!(read % 4096, 0);
        assert!(read >= sum / 2, "rank {i} reads {read} for {sum} held");
    }
    // Stage 0 holds layers 0-1 and the embedding; stage 1 layers 2-3, the final norm, lm_head.
    assert!(all_names.contains("model.embed_tokens.weight"));
    assert!(all_names.contains("lm_head.weight"));
    assert!(
        !all_names.iter().any(|n| n.contains("rotary_emb")),
        "buffers are skipped"
    );
    let stage_of = |name: &str| -> Vec<u64> {
        ranks
            .iter()
            .filter(|r| {
                r["tensors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t["name"] == name)
            })
            .map(|r| r["pp_rank"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(stage_of("model.layers.1.mlp.down_proj.weight"), vec![0, 0]);
    assert_eq!(stage_of("model.layers.2.mlp.down_proj.weight"), vec![1, 1]);
    assert_eq!(stage_of("model.norm.weight"), vec![1, 1]);
}

#[test]
fn svg_is_written_whole() {
    let dir = write("mixtral-tiny");
    let out_dir = tempfile::tempdir().unwrap();
    let svg = out_dir.path().join("mem.svg");
    let out = plan(
        dir.path(),
        &["--tp", "2", "--pp", "2", "--svg", svg.to_str().unwrap()],
    );
    stdout_ok(&out);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    for label in [
        "attention",
        "experts",
        "embeddings",
        "norms",
        "bytes held",
        "global rank",
    ] {
        assert!(text.contains(label), "legend/axis label {label}");
    }
    // One tooltip per rank.
    assert_eq!(text.matches("<title>rank ").count(), 4);
    // Nothing but the SVG is left in the directory (no temp files).
    assert_eq!(std::fs::read_dir(out_dir.path()).unwrap().count(), 1);
}

fn expect_error(out: &Output, code: i32, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(out.stdout.is_empty(), "no partial output");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
}

#[test]
fn errors_have_exit_codes() {
    let dir = write("llama-tiny");
    // 8 heads and 2 kv heads do not split over tp = 3 (bad data for this topology: exit 1).
    expect_error(&plan(dir.path(), &["--tp", "3"]), 1, &["3"]);
    // More stages than the 4 layers (usage: exit 2).
    expect_error(&plan(dir.path(), &["--pp", "5"]), 2, &["--pp 5"]);
    // ep must be 1 or tp × dp.
    expect_error(
        &plan(dir.path(), &["--tp", "2", "--ep", "3"]),
        2,
        &["--ep 3"],
    );
    // A spec whose rules match none of the tensors names them (bad data: exit 1).
    expect_error(
        &plan(dir.path(), &["--spec", "gpt2"]),
        1,
        &["match no rule", "model.embed_tokens.weight"],
    );
    // The tp = 3 error names the tensor and the tp.
    expect_error(&plan(dir.path(), &["--tp", "3"]), 1, &["model.", "tp = 3"]);
    // Not a checkpoint.
    let empty = tempfile::tempdir().unwrap();
    let out = plan(empty.path(), &["--tp", "2"]);
    assert_eq!(out.status.code(), Some(1));
    // An svg into a missing directory is an error, and no plan is printed first.
    let out = plan(dir.path(), &["--svg", "/nonexistent-dir/x.svg"]);
    expect_error(&out, 1, &["nonexistent-dir"]);
}

/// Writes `preset` as one safetensors file without the tensors `drop` selects.
fn write_without(preset: &str, drop: &dyn Fn(&str) -> bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions::preset(preset).unwrap();
    let list: Vec<_> = synth::tensors(&opts)
        .unwrap()
        .into_iter()
        .filter(|(n, _, _)| !drop(n))
        .collect();
    let sizes: Vec<u64> = list
        .iter()
        .map(|(n, d, s)| synth::tensor_bytes(n, *d, s).unwrap())
        .collect();
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for ((n, d, s), b) in list.iter().zip(&sizes) {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": d.name(), "shape": s, "data_offsets": [off, off + b]}),
        );
        off += b;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    for ((n, _, _), b) in list.iter().zip(&sizes) {
        bytes.extend(synth::tensor_data(opts.seed, n, *b as usize));
    }
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&opts.config).unwrap(),
    )
    .unwrap();
    dir
}

/// Issue 9 item 9: a checkpoint missing a layer, the final norm or an untied head is
/// refused with the missing names (capped and counted), not planned with holes; tied
/// embeddings and the MTP layer are not required.
#[test]
fn incomplete_checkpoints_are_refused() {
    // Sanity: the whole checkpoint written this way plans.
    stdout_ok(&plan(
        write_without("llama-tiny", &|_| false).path(),
        &["--tp", "2"],
    ));
    let no_layer = write_without("llama-tiny", &|n| n.starts_with("model.layers.2."));
    expect_error(
        &plan(no_layer.path(), &["--tp", "2", "--pp", "2"]),
        1,
        &[
            "checkpoint is incomplete for spec `llama` with 4 layers: 9 tensor(s) it needs are missing: ",
            "\"model.layers.2.self_attn.q_proj.weight\"",
            "\"model.layers.2.post_attention_layernorm.weight\"",
        ],
    );
    let no_head = write_without("llama-tiny", &|n| {
        n == "lm_head.weight" || n == "model.norm.weight"
    });
    expect_error(
        &plan(no_head.path(), &["--tp", "2"]),
        1,
        &["2 tensor(s) it needs are missing: \"lm_head.weight\", \"model.norm.weight\" "],
    );
    // One expert of one layer (Mixtral): named exactly.
    let no_expert = write_without("mixtral-tiny", &|n| {
        n == "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    });
    expect_error(
        &plan(no_expert.path(), &["--tp", "2"]),
        1,
        &["1 tensor(s) it needs are missing: \"model.layers.1.block_sparse_moe.experts.5.w2.weight\" "],
    );
    // GPT-2 under the `transformer.`-less names: a missing layer norm of layer 0.
    let gpt2 = write_without("gpt2-tiny", &|n| n == "h.0.ln_2.bias");
    expect_error(&plan(gpt2.path(), &[]), 1, &["\"h.0.ln_2.bias\""]);
    // DeepSeek-V3 without its MTP layer, and a tied Qwen2 without a head: complete.
    let no_mtp = write_without("deepseek-v3-tiny", &|n| n.starts_with("model.layers.3."));
    stdout_ok(&plan(no_mtp.path(), &["--tp", "2"]));
    let tied = write_without("qwen2-tiny", &|n| n == "lm_head.weight");
    stdout_ok(&plan(tied.path(), &["--tp", "2", "--pp", "2"]));
    // A dense DeepSeek layer missing its MLP (layer 0 < first_k_dense_replace = 1).
    let no_dense = write_without("deepseek-v3-tiny", &|n| {
        n.starts_with("model.layers.0.mlp.")
    });
    expect_error(
        &plan(no_dense.path(), &["--tp", "2"]),
        1,
        &["\"model.layers.0.mlp.gate_proj.weight\""],
    );
    // Issue 18: Qwen2-MoE with a dense layer (3 layers, decoder_sparse_step 1,
    // mlp_only_layers [1]) plans; its dense layer without its MLP does not.
    stdout_ok(&plan(
        write_without("qwen2-moe-dense-tiny", &|_| false).path(),
        &["--tp", "2", "--pp", "2"],
    ));
    let no_dense = write_without("qwen2-moe-dense-tiny", &|n| {
        n.starts_with("model.layers.1.mlp.")
    });
    expect_error(
        &plan(no_dense.path(), &["--tp", "2"]),
        1,
        &["3 tensor(s) it needs are missing: \"model.layers.1.mlp.gate_proj.weight\", \"model.layers.1.mlp.up_proj.weight\", \"model.layers.1.mlp.down_proj.weight\" "],
    );
    // DeepSeek-V2 layout with first_k_dense_replace 1 and moe_layer_freq 2: layer 3 is dense.
    stdout_ok(&plan(
        write_without("deepseek-v2-tiny", &|_| false).path(),
        &["--tp", "4", "--pp", "2"],
    ));
    let no_dense = write_without("deepseek-v2-tiny", &|n| {
        n.starts_with("model.layers.3.mlp.")
    });
    expect_error(
        &plan(no_dense.path(), &["--tp", "2"]),
        1,
        &["\"model.layers.3.mlp.gate_proj.weight\""],
    );
    // Issue 18 item 4c: an expert missing from every layer (Mixtral expert 5).
    let no_expert = write_without("mixtral-tiny", &|n| n.contains(".experts.5."));
    expect_error(
        &plan(no_expert.path(), &["--tp", "2"]),
        1,
        &["6 tensor(s) it needs are missing: \"model.layers.0.block_sparse_moe.experts.5.w1.weight\""],
    );
    // Many missing: ten names, then the count of the rest.
    let many = write_without("llama-tiny", &|n| {
        n.starts_with("model.layers.") && !n.starts_with("model.layers.0.")
    });
    let out = plan(many.path(), &["--tp", "2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(": 27 tensor(s) it needs are missing: ") && err.contains(" and 17 more "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
