//! Opening checkpoints: single files, directories, indexes, the real fixture files.

use crate::checkpoint_support;

use checkpoint_support::*;
use safeshard::checkpoint::{Checkpoint, Dtype};

#[test]
fn real_mlx_file_reads_with_misaligned_header() {
    let ck = Checkpoint::open(fixtures().join("chess_cv-arrows.safetensors")).unwrap();
    assert_eq!(ck.tensors().len(), 10);
    assert!(ck.tensors().iter().all(|t| t.dtype == Dtype::F32));
    assert_eq!(ck.files().len(), 1);
    // MLX writes unpadded headers: data starts at 8 + 767, not a multiple of 8.
    assert_eq!(ck.files()[0].data_start, 8 + 767);
    assert_eq!(ck.files()[0].metadata, None);
    let fc1 = ck.tensor("fc1.weight").unwrap();
    assert_eq!(fc1.shape, vec![128, 1024]);
    assert_eq!(fc1.bytes, 128 * 1024 * 4);
    let total: u64 = [
        16,
        16 * 27,
        32,
        32 * 9 * 16,
        64,
        64 * 9 * 32,
        128,
        128 * 1024,
        49,
        49 * 128,
    ]
    .iter()
    .sum::<u64>()
        * 4;
    assert_eq!(ck.total_bytes(), total);
    assert_eq!(ck.files()[0].identity.len, 8 + 767 + total);
}

#[test]
fn real_candle_file_reads() {
    let ck = Checkpoint::open(fixtures().join("candle-jfk-codes.safetensors")).unwrap();
    assert_eq!(ck.tensors().len(), 1);
    let t = &ck.tensors()[0];
    assert_eq!((t.name.as_str(), t.dtype), ("codes", Dtype::I64));
    assert_eq!(t.shape, vec![1, 2, 828]);
    assert_eq!(t.bytes, 2 * 828 * 8);
    assert_eq!(t.offset, 8 + 72);
}

#[test]
fn directory_with_index_wins_and_sorts() {
    let d = tempfile::tempdir().unwrap();
    let (j1, n1) = layout(&[("b", "F16", &[2, 2], 2), ("a", "F32", &[3], 4)]);
    let (j2, n2) = layout(&[("c", "U8", &[5], 1)]);
    write_st(d.path(), "model-00002-of-00002.safetensors", &j1, n1);
    write_st(d.path(), "model-00001-of-00002.safetensors", &j2, n2);
    // A stray single file beside the index must be ignored: the index wins.
    write_st(d.path(), "model.safetensors", "{}", 0);
    write(
        d.path(),
        "model.safetensors.index.json",
        br#"{"metadata":{"total_size":25},"weight_map":{"a":"model-00002-of-00002.safetensors","b":"model-00002-of-00002.safetensors","c":"model-00001-of-00002.safetensors"}}"#,
    );
    write(
        d.path(),
        "config.json",
        br#"{"hidden_size": 8, "architectures": ["LlamaForCausalLM"]}"#,
    );
    let ck = Checkpoint::open(d.path()).unwrap();
    let names: Vec<_> = ck.files().iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    let order: Vec<_> = ck
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.file, t.offset))
        .collect();
    let h1 = 8 + j1.len() as u64;
    let h2 = 8 + j2.len() as u64;
    assert_eq!(order, [("c", 0, h2), ("b", 1, h1), ("a", 1, h1 + 8)]);
    assert!(ck.index().is_some());
    assert_eq!(ck.config().unwrap()["hidden_size"], 8);
    assert_eq!(ck.tensor_index("a"), Some(2));
    assert_eq!(ck.total_bytes(), 25);
    assert!(ck.unindexed().is_empty());
    // Opening the index file itself gives the same catalog.
    let ck2 = Checkpoint::open(d.path().join("model.safetensors.index.json")).unwrap();
    assert_eq!(ck2.tensors(), ck.tensors());
}

#[test]
fn directory_with_single_file_and_metadata() {
    let d = tempfile::tempdir().unwrap();
    let j =
        r#"{"__metadata__":{"format":"pt"},"x":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}}"#;
    write_st(d.path(), "model.safetensors", j, 8);
    let ck = Checkpoint::open(d.path()).unwrap();
    assert!(ck.index().is_none());
    assert_eq!(ck.files()[0].name, "model.safetensors");
    assert_eq!(ck.files()[0].metadata.as_ref().unwrap()["format"], "pt");
    assert_eq!(ck.tensor("x").unwrap().offset, 8 + j.len() as u64);
    assert!(ck.config().is_none());
}

#[test]
fn unindexed_tensors_are_reported_not_cataloged() {
    let d = tempfile::tempdir().unwrap();
    let (j, n) = layout(&[("a", "F32", &[1], 4), ("extra", "F32", &[1], 4)]);
    write_st(d.path(), "m.safetensors", &j, n);
    write(
        d.path(),
        "model.safetensors.index.json",
        br#"{"weight_map":{"a":"m.safetensors"}}"#,
    );
    let ck = Checkpoint::open(d.path()).unwrap();
    assert_eq!(ck.tensors().len(), 1);
    assert!(ck.tensor("extra").is_none());
    assert_eq!(
        ck.unindexed(),
        vec![("m.safetensors".to_string(), "extra".to_string())]
    );
}

#[test]
fn file_identity_matches_metadata() {
    let d = tempfile::tempdir().unwrap();
    let p = write_st(d.path(), "a.safetensors", "{}", 0);
    let f = std::fs::File::open(&p).unwrap();
    let id = safeshard::checkpoint::FileIdentity::of(&f, &p).unwrap();
    assert_eq!(id.len, 10);
    assert!(id.ino != 0 && id.mtime_ns > 0);
}
