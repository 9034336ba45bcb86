//! The checkpoint catalog: every tensor of every file, from headers only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Dtype;
use crate::Result;

/// What identifies a file's contents at planning time, to detect a file replaced or truncated
/// before loading.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    /// File length in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch (0 if unknown).
    pub mtime_ns: i128,
    /// Device number (0 if unknown).
    pub dev: u64,
    /// Inode number (0 if unknown).
    pub ino: u64,
}

impl FileIdentity {
    /// Reads the identity of an open file.
    pub fn of(file: &std::fs::File, path: &Path) -> Result<Self> {
        let _ = (file, path);
        todo!("issue 2")
    }
}

/// One safetensors file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Name relative to the checkpoint directory (as in the index's `weight_map`).
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// Length and identity at open time.
    pub identity: FileIdentity,
    /// Absolute offset of the data section (`8 + header length`).
    pub data_start: u64,
    /// The header's `__metadata__` map, if any.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// One tensor of the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape in elements.
    pub shape: Vec<u64>,
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Absolute byte offset of the tensor's first byte in its file.
    pub offset: u64,
    /// Byte size.
    pub bytes: u64,
}

/// A checkpoint's catalog, built from headers without reading tensor data.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Directory holding the checkpoint's files (and `config.json`, if any).
    pub root: PathBuf,
    /// The index file, when the checkpoint has one.
    pub index: Option<PathBuf>,
    /// Files in index order (sorted by name), each read once.
    pub files: Vec<FileInfo>,
    /// Every tensor, sorted by (file, offset).
    pub tensors: Vec<TensorInfo>,
    /// `config.json` beside the checkpoint, when present.
    pub config: Option<serde_json::Value>,
    /// Tensors found in files but absent from the index, as (file, tensor) pairs; they are
    /// reported, not loaded.
    pub unindexed: Vec<(String, String)>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, a `model.safetensors.index.json`, or a
    /// directory holding either (the index wins when both exist).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let _ = path;
        todo!("issue 2: catalog")
    }

    /// The tensor with this name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Index of the tensor with this name in [`Checkpoint::tensors`].
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Sum of all tensors' byte sizes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }
}
