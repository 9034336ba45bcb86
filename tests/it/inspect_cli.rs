//! `safeshard inspect` through the binary: table and JSON snapshots, exit codes, pipes.

use crate::checkpoint_support;

use std::path::Path;
use std::process::{Command, Stdio};

use checkpoint_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_safeshard");

/// A small two-file indexed checkpoint with mixed dtypes, a scalar and an unpadded header.
fn small_checkpoint(dir: &Path) {
    let (j1, n1) = layout(&[
        ("model.embed_tokens.weight", "BF16", &[16, 8], 2),
        ("model.layers.0.self_attn.q_proj.weight", "BF16", &[8, 8], 2),
        ("model.layers.0.input_layernorm.weight", "F32", &[8], 4),
    ]);
    write_st(dir, "model-00001-of-00002.safetensors", &j1, n1);
    let (j2, n2) = layout(&[
        ("lm_head.weight", "BF16", &[16, 8], 2),
        ("model.norm.weight", "F32", &[8], 4),
        ("step", "I64", &[], 8),
    ]);
    write_st(dir, "model-00002-of-00002.safetensors", &j2, n2);
    write(
        dir,
        "model.safetensors.index.json",
        br#"{"metadata": {"total_size": 872}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.input_layernorm.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors"}}"#,
    );
}

fn inspect(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("inspect")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn table_snapshot() {
    let d = tempfile::tempdir().unwrap();
    small_checkpoint(d.path());
    let out = inspect(&[d.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    // `step` is stored but not indexed: reported, not listed.
    assert_eq!(
        stderr.trim(),
        "warning: model-00002-of-00002.safetensors: tensor \"step\" is not in model.safetensors.index.json (not loaded)"
    );
    insta::assert_snapshot!(String::from_utf8(out.stdout).unwrap());
}

#[test]
fn json_snapshot_and_values() {
    let d = tempfile::tempdir().unwrap();
    small_checkpoint(d.path());
    let out = inspect(&[d.path().to_str().unwrap(), "--json"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    // Independent expectations: sizes from shapes, offsets from the header lengths.
    let (j1, _) = layout(&[
        ("model.embed_tokens.weight", "BF16", &[16, 8], 2),
        ("model.layers.0.self_attn.q_proj.weight", "BF16", &[8, 8], 2),
        ("model.layers.0.input_layernorm.weight", "F32", &[8], 4),
    ]);
    let h1 = 8 + j1.len() as u64;
    assert_eq!(v["files"][0], "model-00001-of-00002.safetensors");
    assert_eq!(v["tensors"].as_array().unwrap().len(), 5);
    assert_eq!(
        v["tensors"][1]["name"],
        "model.layers.0.self_attn.q_proj.weight"
    );
    assert_eq!(v["tensors"][1]["offset"], h1 + 256);
    assert_eq!(v["tensors"][1]["bytes"], 128);
    assert_eq!(v["total_bytes"], 256 + 128 + 32 + 256 + 32);
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    assert_eq!(keys, ["files", "tensors", "total_bytes"]);
    insta::assert_snapshot!(text);
}

#[test]
fn real_mlx_file_table() {
    let out = inspect(&[fixtures()
        .join("chess_cv-arrows.safetensors")
        .to_str()
        .unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("10 tensors, "), "{text}");
    assert!(text.contains("dtypes: F32: 10"), "{text}");
}

#[test]
fn bad_data_exits_1_with_one_line_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "mismatch.safetensors",
            st_bytes(r#"{"model.layers.3.mlp.up_proj.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,4]}}"#, 4),
            "error: mismatch.safetensors: tensor \"model.layers.3.mlp.up_proj.weight\": data_offsets [0, 4] do not match F32 [2, 2] (16 bytes)",
        ),
        ("short.safetensors", vec![1, 2, 3], "error: short.safetensors: file is too short"),
        ("huge.safetensors", st_bytes_n(u64::MAX), "error: huge.safetensors: header length 18446744073709551615 exceeds"),
        ("dup.safetensors", st_bytes(r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1), "error: dup.safetensors: duplicate key \"a\""),
    ];
    for (name, bytes, want) in cases {
        let p = write(d.path(), name, &bytes);
        let out = inspect(&[p.to_str().unwrap()]);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(
            stderr.starts_with(want),
            "{stderr:?} should start with {want:?}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(out.stdout.is_empty());
    }
}

fn st_bytes_n(n: u64) -> Vec<u8> {
    let mut v = n.to_le_bytes().to_vec();
    v.extend_from_slice(b"{}");
    v
}

#[test]
fn usage_errors_exit_2() {
    let out = inspect(&[]);
    assert_eq!(out.status.code(), Some(2));
    let out = inspect(&["x", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn closed_pipe_is_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    // Enough tensors that the output outgrows the pipe buffer.
    let names: Vec<String> = (0..20_000)
        .map(|i| format!("model.layers.{i}.weight"))
        .collect();
    let entries: Vec<(&str, &str, &[u64], u64)> = names
        .iter()
        .map(|n| (n.as_str(), "U8", &[1u64][..], 1))
        .collect();
    let (j, n) = layout(&entries);
    let p = write_st(d.path(), "big.safetensors", &j, n);
    for json in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.arg("inspect").arg(&p);
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read a little, then close our end, like `| head -1`.
        let mut stdout = child.stdout.take().unwrap();
        let mut buf = [0u8; 64];
        std::io::Read::read_exact(&mut stdout, &mut buf).unwrap();
        drop(stdout);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
