//! Helpers shared by the checkpoint and inspect tests: write hand-made safetensors files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Bytes of a safetensors file: 8-byte length, the JSON text as given, `data` zero bytes.
pub fn st_bytes(json: &str, data: usize) -> Vec<u8> {
    let mut v = (json.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v.resize(v.len() + data, 0);
    v
}

/// A well-formed file from (name, dtype, shape, bytes per element) entries laid out in order.
/// Returns the JSON header (unpadded) and the data length.
pub fn layout(entries: &[(&str, &str, &[u64], u64)]) -> (String, usize) {
    let mut pos = 0u64;
    let mut parts = Vec::new();
    for (name, dtype, shape, elem) in entries {
        let n: u64 = shape.iter().product::<u64>() * elem;
        let shape_s: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        parts.push(format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{pos},{}]}}",
            shape_s.join(","),
            pos + n
        ));
        pos += n;
    }
    (format!("{{{}}}", parts.join(",")), pos as usize)
}

/// Writes `bytes` to `dir/name` (creating parent directories) and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Writes a file whose header is `json` followed by `data` zero bytes.
pub fn write_st(dir: &Path, name: &str, json: &str, data: usize) -> PathBuf {
    write(dir, name, &st_bytes(json, data))
}

/// The directory of real files written by other tools (MLX, candle), kept in the repository
/// (tests/fixtures/real/README.md names their origin and license).
pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/real"))
}
