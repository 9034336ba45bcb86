//! Shared test support: synthetic checkpoints, an independent safetensors header reader, and
//! the independent vLLM reference layouts ([`vllm_ref`]).
#![allow(dead_code)]

pub mod vllm_ref;

use std::path::{Path, PathBuf};

use safeshard::synth::{self, SynthOptions};

/// The tiny synthetic presets of every shipped architecture (the presets of each
/// `shard-specs/NAME.synth.json` with `-tiny` in the name, quantized ones included): what
/// tests that cover every architecture iterate over.
pub fn tiny_presets() -> Vec<&'static str> {
    synth::PRESETS
        .iter()
        .copied()
        .filter(|n| n.contains("-tiny"))
        .collect()
}

/// Whether a config describes a mixture-of-experts model (it names an expert count).
pub fn is_moe(config: &serde_json::Value) -> bool {
    ["num_local_experts", "num_experts", "n_routed_experts"]
        .iter()
        .any(|k| config.get(k).is_some_and(|v| !v.is_null()))
}

/// One tensor entry read back from a file by [`read_file`].
#[derive(Clone, Debug, PartialEq)]
pub struct RawTensor {
    /// Tensor name.
    pub name: String,
    /// Dtype name as in the header.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Absolute begin and end in the file.
    pub begin: u64,
    /// Absolute end.
    pub end: u64,
}

/// A minimal safetensors reader written for tests, independent of `safeshard::checkpoint`:
/// returns (header length, tensors in header order, `__metadata__`), and checks the
/// structural rules (length prefix, contiguous offsets from 0, file length).
pub fn read_file(path: &Path) -> (u64, Vec<RawTensor>, Option<serde_json::Value>) {
    let bytes = std::fs::metadata(path).unwrap().len();
    let mut f = std::fs::File::open(path).unwrap();
    use std::io::Read;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let n = u64::from_le_bytes(len);
    let mut hdr = vec![0u8; n as usize];
    f.read_exact(&mut hdr).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&hdr).unwrap();
    let mut out = Vec::new();
    let mut meta = None;
    for (k, e) in v.as_object().unwrap() {
        if k == "__metadata__" {
            meta = Some(e.clone());
            continue;
        }
        let off = e["data_offsets"].as_array().unwrap();
        out.push(RawTensor {
            name: k.clone(),
            dtype: e["dtype"].as_str().unwrap().to_string(),
            shape: e["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect(),
            begin: 8 + n + off[0].as_u64().unwrap(),
            end: 8 + n + off[1].as_u64().unwrap(),
        });
    }
    let mut sorted: Vec<&RawTensor> = out.iter().collect();
    sorted.sort_by_key(|t| (t.begin, t.end));
    let mut pos = 8 + n;
    for t in &sorted {
        assert_eq!(
            t.begin,
            pos,
            "{}: {} does not start where the previous ended",
            path.display(),
            t.name
        );
        pos = t.end;
    }
    assert_eq!(pos, bytes, "{}: file length", path.display());
    (n, out, meta)
}

/// Writes a preset (with optional changes) into a fresh temporary directory.
pub fn write_preset(opts: &SynthOptions) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth::write_checkpoint(dir.path(), opts).unwrap();
    dir
}

/// The `.safetensors` files of a directory, sorted.
pub fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

/// Runs a Python snippet with python3; panics with a clear message when python3 or the
/// `safetensors`/`numpy` packages are missing (CI installs them).
pub fn python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 is needed for the reference cross-checks (pip install safetensors numpy)");
    assert!(
        out.status.success(),
        "python3 failed (are `safetensors` and `numpy` installed? pip install safetensors numpy): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The bytes of one tensor as stored in a checkpoint, read through the catalog of
/// `safeshard::checkpoint::Checkpoint` (absolute offset and length in its file).
pub fn stored_tensor_bytes(ck: &safeshard::checkpoint::Checkpoint, name: &str) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let t = ck
        .tensor(name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    let mut f = std::fs::File::open(&ck.files()[t.file].path).unwrap();
    f.seek(SeekFrom::Start(t.offset)).unwrap();
    let mut v = vec![0u8; t.bytes as usize];
    f.read_exact(&mut v).unwrap();
    v
}
