//! Index files and directories: every refusal names the index (or directory) and the problem.

use crate::checkpoint_support;

use std::path::Path;

use checkpoint_support::*;
use safeshard::checkpoint::Checkpoint;
use safeshard::Error;

const INDEX: &str = "model.safetensors.index.json";

/// A directory with two good files: `a` in one.safetensors, `b` in two.safetensors.
fn two_files(dir: &Path) {
    let (j, n) = layout(&[("a", "F32", &[2], 4)]);
    write_st(dir, "one.safetensors", &j, n);
    let (j, n) = layout(&[("b", "U8", &[3], 1)]);
    write_st(dir, "two.safetensors", &j, n);
}

fn index_err(index_json: &str) -> Error {
    let d = tempfile::tempdir().unwrap();
    two_files(d.path());
    write(d.path(), INDEX, index_json.as_bytes());
    Checkpoint::open(d.path()).unwrap_err()
}

fn assert_index_err(index_json: &str, want: &str) {
    let e = index_err(index_json);
    let msg = e.to_string();
    assert!(matches!(e, Error::InvalidIndex { .. }), "{msg}");
    assert!(msg.starts_with(&format!("{INDEX}: ")), "{msg}");
    assert!(msg.contains(want), "{msg:?} should contain {want:?}");
    assert!(!e.is_usage());
}

#[test]
fn malformed_index_json() {
    assert_index_err("{", "invalid JSON");
    assert_index_err("[1]", "not a JSON object");
    assert_index_err(r#"{"metadata":{}}"#, "no \"weight_map\"");
    assert_index_err(r#"{"weight_map":[]}"#, "\"weight_map\" is not an object");
    assert_index_err(r#"{"weight_map":{}}"#, "\"weight_map\" is empty");
    assert_index_err(
        r#"{"weight_map":{"a":1}}"#,
        "tensor \"a\": weight_map value is not a file name string",
    );
    assert_index_err(
        r#"{"weight_map":{"a":"one.safetensors","a":"two.safetensors"}}"#,
        "duplicate key \"a\"",
    );
}

#[test]
fn index_paths_must_stay_inside_the_directory() {
    assert_index_err(
        r#"{"weight_map":{"a":"../one.safetensors"}}"#,
        "file \"../one.safetensors\" is not a plain relative path",
    );
    assert_index_err(
        r#"{"weight_map":{"a":"/etc/passwd"}}"#,
        "file \"/etc/passwd\" is not a plain relative path",
    );
    assert_index_err(r#"{"weight_map":{"a":""}}"#, "empty file name");
    assert_index_err(
        r#"{"weight_map":{"a":"missing.safetensors"}}"#,
        "tensor \"a\": file \"missing.safetensors\" does not exist",
    );
}

#[test]
fn symlink_escaping_the_directory_is_refused_inside_is_fine() {
    let outer = tempfile::tempdir().unwrap();
    let d = outer.path().join("ckpt");
    std::fs::create_dir(&d).unwrap();
    two_files(&d);
    let (j, n) = layout(&[("c", "U8", &[1], 1)]);
    write_st(outer.path(), "outside.safetensors", &j, n);
    std::os::unix::fs::symlink(
        outer.path().join("outside.safetensors"),
        d.join("link.safetensors"),
    )
    .unwrap();
    write(&d, INDEX, br#"{"weight_map":{"c":"link.safetensors"}}"#);
    let msg = Checkpoint::open(&d).unwrap_err().to_string();
    assert!(
        msg.contains("file \"link.safetensors\" resolves outside the checkpoint directory"),
        "{msg}"
    );

    // A symlink (and a subdirectory) that stay inside are fine.
    std::fs::create_dir(d.join("sub")).unwrap();
    std::os::unix::fs::symlink(d.join("two.safetensors"), d.join("sub/inner.safetensors")).unwrap();
    write(
        &d,
        INDEX,
        br#"{"weight_map":{"a":"one.safetensors","b":"sub/inner.safetensors"}}"#,
    );
    let ck = Checkpoint::open(&d).unwrap();
    assert_eq!(ck.files()[1].name, "sub/inner.safetensors");
    assert_eq!(ck.tensor("b").unwrap().bytes, 3);
}

#[test]
fn index_and_files_must_agree() {
    assert_index_err(
        r#"{"weight_map":{"a":"one.safetensors","b":"one.safetensors","x":"two.safetensors"}}"#,
        "tensor \"b\" is mapped to one.safetensors but stored in two.safetensors",
    );
    // two.safetensors is never named, so `b` is nowhere the index looks.
    assert_index_err(
        r#"{"weight_map":{"a":"one.safetensors","zz":"one.safetensors"}}"#,
        "tensor \"zz\" is mapped to one.safetensors but that file does not hold it",
    );
}

#[test]
fn tensor_stored_in_two_files_is_refused() {
    let d = tempfile::tempdir().unwrap();
    two_files(d.path());
    let (j, n) = layout(&[("a", "F32", &[1], 4)]);
    write_st(d.path(), "three.safetensors", &j, n);
    write(
        d.path(),
        INDEX,
        br#"{"weight_map":{"a":"one.safetensors","b":"two.safetensors","x":"three.safetensors"}}"#,
    );
    let msg = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(msg.starts_with(INDEX), "{msg}");
    assert!(
        msg.contains("tensor \"a\" is stored in two files: one.safetensors and three.safetensors"),
        "{msg}"
    );

    // Without an index the directory's files are read together, with the same rule.
    std::fs::remove_file(d.path().join(INDEX)).unwrap();
    let msg = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(msg.contains("tensor \"a\" is stored in two files"), "{msg}");
}

#[test]
fn bad_file_named_by_index_is_named_in_the_error() {
    let d = tempfile::tempdir().unwrap();
    two_files(d.path());
    write_st(
        d.path(),
        "two.safetensors",
        r#"{"b":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#,
        2,
    );
    write(
        d.path(),
        INDEX,
        br#"{"weight_map":{"a":"one.safetensors","b":"two.safetensors"}}"#,
    );
    let msg = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(
        msg.starts_with("two.safetensors: file is truncated"),
        "{msg}"
    );
}

#[test]
fn not_a_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "readme.txt", b"hi");
    let e = Checkpoint::open(d.path()).unwrap_err();
    assert!(matches!(e, Error::NotACheckpoint { .. }), "{e}");
    assert!(e
        .to_string()
        .contains("neither model.safetensors.index.json nor a .safetensors file"));

    let e = Checkpoint::open(d.path().join("nope")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("nope"));

    write(d.path(), "a.safetensors.index.json", b"{}");
    write(d.path(), "b.safetensors.index.json", b"{}");
    let e = Checkpoint::open(d.path()).unwrap_err();
    assert!(e.to_string().contains("several index files"), "{e}");
}

#[test]
fn bad_config_json_is_refused() {
    let d = tempfile::tempdir().unwrap();
    two_files(d.path());
    write(
        d.path(),
        "config.json",
        br#"{"hidden_size": 1, "hidden_size": 2}"#,
    );
    let msg = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(
        msg.starts_with("config.json: invalid JSON: duplicate key \"hidden_size\""),
        "{msg}"
    );
}

#[test]
fn hugging_face_cache_layout_is_followed() {
    // <repo>/snapshots/<rev>/x -> ../../blobs/<hash>, as huggingface_hub writes it.
    let repo = tempfile::tempdir().unwrap();
    let snap = repo.path().join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    let (j, n) = layout(&[("a", "F32", &[2], 4)]);
    write_st(repo.path(), "blobs/1111", &j, n);
    std::os::unix::fs::symlink(
        "../../blobs/1111",
        snap.join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    write(
        repo.path(),
        "blobs/2222",
        br#"{"weight_map":{"a":"model-00001-of-00001.safetensors"}}"#,
    );
    std::os::unix::fs::symlink("../../blobs/2222", snap.join(INDEX)).unwrap();
    let ck = Checkpoint::open(&snap).unwrap();
    assert_eq!(ck.tensor("a").unwrap().bytes, 8);

    // Anything else outside the snapshot is still refused.
    write_st(repo.path(), "elsewhere/x.safetensors", &j, n);
    std::os::unix::fs::symlink(
        "../../elsewhere/x.safetensors",
        snap.join("model-00001-of-00001.safetensors.tmp"),
    )
    .unwrap();
    std::fs::remove_file(snap.join(INDEX)).unwrap();
    write(
        &snap,
        INDEX,
        br#"{"weight_map":{"a":"model-00001-of-00001.safetensors.tmp"}}"#,
    );
    let msg = Checkpoint::open(&snap).unwrap_err().to_string();
    assert!(
        msg.contains("resolves outside the checkpoint directory"),
        "{msg}"
    );
}

#[test]
fn fifo_config_is_refused_not_waited_on() {
    let d = tempfile::tempdir().unwrap();
    two_files(d.path());
    let fifo = std::ffi::CString::new(d.path().join("config.json").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let msg = Checkpoint::open(d.path()).unwrap_err().to_string();
    assert!(msg.starts_with("config.json: not a regular file"), "{msg}");
}
