//! `safeshard spec list` / `spec check`: output snapshots and exit codes.

use std::process::Command;

use safeshard::synth::{self, SynthOptions};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_safeshard"))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = bin().args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn preset(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth::write_checkpoint(dir.path(), &SynthOptions::preset(name).unwrap()).unwrap();
    dir
}

/// One line per registry entry, in name order: the name padded to 12 columns, then its
/// architectures (the whole output, so adding an architecture needs no snapshot edit).
#[test]
fn list_names_every_shipped_spec() {
    let (code, out, _) = run(&["spec", "list"]);
    assert_eq!(code, 0);
    let want: Vec<String> = safeshard::sharding::Spec::shipped_names()
        .into_iter()
        .map(|name| {
            let spec = safeshard::sharding::Spec::shipped(name).unwrap();
            format!("{name:<12} {}", spec.architectures.join(" "))
        })
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
    assert!(
        out.contains("llama        LlamaForCausalLM MistralForCausalLM\n"),
        "{out}"
    );
}

#[test]
fn check_placements_snapshot() {
    let dir = preset("llama-tiny");
    let p = dir.path().to_str().unwrap();
    let (code, out, err) = run(&[
        "spec",
        "check",
        "llama",
        "--against",
        p,
        "--tp",
        "2",
        "--pp",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!(out.replace(p, "<CKPT>"));
}

#[test]
fn check_expert_parallel_snapshot() {
    let dir = preset("mixtral-tiny");
    let p = dir.path().to_str().unwrap();
    let (code, out, err) = run(&[
        "spec",
        "check",
        "mixtral",
        "--against",
        p,
        "--tp",
        "2",
        "--dp",
        "2",
        "--ep",
        "4",
    ]);
    assert_eq!(code, 0, "{err}");
    insta::assert_snapshot!(out.replace(p, "<CKPT>"));
}

#[test]
fn check_json_has_every_tensor() {
    let dir = preset("gpt2-tiny");
    let p = dir.path().to_str().unwrap();
    let (code, out, err) = run(&[
        "spec",
        "check",
        "gpt2",
        "--against",
        p,
        "--tp",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ckpt = safeshard::checkpoint::Checkpoint::open(dir.path()).unwrap();
    let tensors = v["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), ckpt.tensors.len());
    let c_attn = tensors
        .iter()
        .find(|t| t["name"] == "h.0.attn.c_attn.weight")
        .unwrap();
    // [64, 192] fused q|k|v on dim 1: rank 1 holds 32..64, 96..128, 160..192.
    assert_eq!(c_attn["tp"][1]["shape"], serde_json::json!([64, 96]));
    assert_eq!(
        c_attn["tp"][1]["pieces"],
        serde_json::json!([{"slice": [[0, 64], [32, 64]]}, {"slice": [[0, 64], [96, 128]]}, {"slice": [[0, 64], [160, 192]]}])
    );
    let bias = tensors.iter().find(|t| t["name"] == "h.0.attn.bias");
    if let Some(b) = bias {
        assert!(b["skip"].is_string());
    }
}

#[test]
fn exit_codes() {
    let dir = preset("llama-tiny");
    let p = dir.path().to_str().unwrap();
    // A spec that misses tensors: exit 1, the names listed.
    let (code, _, err) = run(&["spec", "check", "gpt2", "--against", p]);
    assert_eq!(code, 1);
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight"),
        "{err}"
    );
    // A broken spec file: exit 1 naming file:line:col.
    let spec_dir = tempfile::tempdir().unwrap();
    let f = spec_dir.path().join("bad.shard");
    std::fs::write(&f, "arch X\n\nmodel.w  split(dim=0\n").unwrap();
    let (code, _, err) = run(&["spec", "check", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.shard:3:"), "{err}");
    // Bad flags: exit 2.
    assert_eq!(run(&["spec", "check", "llama", "--tp", "0"]).0, 2);
    assert_eq!(
        run(&["spec", "check", "llama", "--tp", "2", "--ep", "3"]).0,
        2
    );
    assert_eq!(run(&["spec", "check", "llama", "--bogus"]).0, 2);
    assert_eq!(run(&["spec", "check", "nosuchspec"]).0, 2);
    assert_eq!(run(&["spec", "check", "llama", "--set", "novalue"]).0, 2);
    // A split that does not divide: exit 1 naming the tensor.
    let (code, _, err) = run(&["spec", "check", "llama", "--against", p, "--tp", "3"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not divide by tp = 3"), "{err}");
    // --set reaches the config: a wrong head count makes the GQA split fail.
    let (code, _, err) = run(&[
        "spec",
        "check",
        "llama",
        "--against",
        p,
        "--tp",
        "4",
        "--set",
        "num_key_value_heads=3",
    ]);
    assert_eq!(code, 1, "{err}");
    // The spec alone.
    let (code, out, _) = run(&["spec", "check", "llama"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("llama.shard: ok"), "{out}");
}
