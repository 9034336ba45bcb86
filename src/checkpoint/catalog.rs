//! The checkpoint catalog: every tensor of every file, from headers only.
//!
//! [`Checkpoint::open`] finds the files (one file, an index, or a directory), reads each file's
//! header in parallel (8 bytes, then exactly `n` bytes: never the data), validates it with
//! [`parse_header`](super::parse_header), checks the index against the files, and sorts files by
//! name and tensors by (file, offset).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::header::{header_len, parse_header, parse_json_strict, Header};
use super::Dtype;
use crate::{Error, Result};

/// The index file name Hugging Face writers use.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

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
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        Ok(Self::from_metadata(&meta))
    }

    fn from_metadata(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            FileIdentity {
                len: meta.len(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                dev: meta.dev(),
                ino: meta.ino(),
            }
        }
        #[cfg(not(unix))]
        {
            let mtime_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            FileIdentity {
                len: meta.len(),
                mtime_ns,
                dev: 0,
                ino: 0,
            }
        }
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
///
/// Read through its accessors: the catalog is consistent only as [`Checkpoint::open`] built
/// it (tensors sorted by (file, offset), the name index pointing into them).
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Directory holding the checkpoint's files (and `config.json`, if any).
    pub(crate) root: PathBuf,
    /// The index file, when the checkpoint has one.
    pub(crate) index: Option<PathBuf>,
    /// Files in index order (sorted by name), each read once.
    pub(crate) files: Vec<FileInfo>,
    /// Every tensor, sorted by (file, offset).
    pub(crate) tensors: Vec<TensorInfo>,
    /// `config.json` beside the checkpoint, when present.
    pub(crate) config: Option<serde_json::Value>,
    /// Tensors found in files but absent from the index, as (file, tensor) pairs; they are
    /// reported, not loaded.
    pub(crate) unindexed: Vec<(String, String)>,
    by_name: HashMap<String, usize>,
}

/// Where the files of a checkpoint come from.
enum Source {
    /// An index file and the (name → file) map it holds.
    Index(PathBuf, Vec<(String, String)>),
    /// Safetensors files without an index (names relative to the root).
    Files(Vec<String>),
}

impl Checkpoint {
    /// Opens a checkpoint: a `.safetensors` file, a `model.safetensors.index.json`, or a
    /// directory holding either (the index wins when both exist).
    ///
    /// A directory without an index may hold several `.safetensors` files; a tensor stored in
    /// two of them is an error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let (root, source) = if meta.is_dir() {
            (path.to_path_buf(), find_in_dir(path)?)
        } else if meta.is_file() {
            let root = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.ends_with(".json") {
                (root, read_index(path)?)
            } else {
                (root, Source::Files(vec![name]))
            }
        } else {
            return Err(Error::NotACheckpoint {
                path: path.to_path_buf(),
                reason: "not a file or directory".into(),
            });
        };
        Self::build(root, source)
    }

    fn build(root: PathBuf, source: Source) -> Result<Self> {
        let (index, weight_map, mut names) = match source {
            Source::Index(p, map) => {
                let mut names: Vec<String> = map.iter().map(|(_, f)| f.clone()).collect();
                names.sort_unstable();
                names.dedup();
                (Some(p), Some(map), names)
            }
            Source::Files(mut names) => {
                names.sort_unstable();
                names.dedup();
                (None, None, names)
            }
        };
        let index_name = index
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();

        // Resolve every file inside the root before reading any.
        let canon_root = std::fs::canonicalize(&root).map_err(|e| Error::io(&root, e))?;
        let paths: Vec<PathBuf> = names
            .iter()
            .map(|n| {
                resolve(
                    &canon_root,
                    &root,
                    n,
                    index.is_some().then_some(&index_name),
                )
                .map_err(|e| name_first_tensor(e, weight_map.as_deref(), n))
            })
            .collect::<Result<_>>()?;

        let headers: Vec<(FileInfo, Header)> = names
            .par_iter()
            .zip(paths.par_iter())
            .map(|(name, path)| read_file_header(name, path))
            .collect::<Result<_>>()?;
        names.clear();

        let total: usize = headers.iter().map(|(_, h)| h.tensors.len()).sum();
        let mut by_name: HashMap<String, usize> = HashMap::with_capacity(total);
        let mut tensors = Vec::with_capacity(total);
        let mut files = Vec::with_capacity(headers.len());
        for (fi, (info, header)) in headers.into_iter().enumerate() {
            let data_start = info.data_start;
            for t in header.tensors {
                let (b, e) = t.data_offsets;
                if let Some(&other) = by_name.get(&t.name) {
                    let other_file: &TensorInfo = &tensors[other];
                    let first: &FileInfo = &files[other_file.file];
                    let reason = format!(
                        "tensor {:?} is stored in two files: {} and {}",
                        t.name, first.name, info.name
                    );
                    return Err(match &index {
                        Some(_) => Error::InvalidIndex {
                            file: index_name.clone(),
                            reason,
                        },
                        None => Error::NotACheckpoint {
                            path: root.clone(),
                            reason,
                        },
                    });
                }
                by_name.insert(t.name.clone(), tensors.len());
                tensors.push(TensorInfo {
                    name: t.name,
                    dtype: t.dtype,
                    shape: t.shape,
                    file: fi,
                    // Cannot overflow: parse_header checked data_start + end == file length.
                    offset: data_start + b,
                    bytes: e - b,
                });
            }
            files.push(info);
        }

        let mut unindexed = Vec::new();
        if let Some(map) = weight_map {
            // Every indexed tensor must be in the file the index names.
            let mut indexed = vec![false; tensors.len()];
            for (tensor, file) in &map {
                let found = by_name
                    .get(tensor)
                    .map(|&i| (i, &files[tensors[i].file].name));
                match found {
                    Some((i, f)) if f == file => indexed[i] = true,
                    Some((_, f)) => {
                        return Err(Error::InvalidIndex {
                            file: index_name,
                            reason: format!(
                                "tensor {tensor:?} is mapped to {file} but stored in {f}"
                            ),
                        })
                    }
                    None => {
                        return Err(Error::InvalidIndex {
                            file: index_name,
                            reason: format!(
                            "tensor {tensor:?} is mapped to {file} but that file does not hold it"
                        ),
                        })
                    }
                }
            }
            if indexed.iter().any(|&x| !x) {
                let old = std::mem::take(&mut tensors);
                for (t, keep) in old.into_iter().zip(indexed) {
                    if keep {
                        tensors.push(t);
                    } else {
                        unindexed.push((files[t.file].name.clone(), t.name));
                    }
                }
                unindexed.sort();
            }
        }

        // Files are in name order and each file's tensors in offset order already.
        debug_assert!(tensors
            .windows(2)
            .all(|w| (w[0].file, w[0].offset) <= (w[1].file, w[1].offset)));
        if !unindexed.is_empty() {
            by_name.clear();
            by_name.extend(tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)));
        }

        let config = read_config(&root)?;
        Ok(Checkpoint {
            root,
            index,
            files,
            tensors,
            config,
            unindexed,
            by_name,
        })
    }

    /// Directory holding the checkpoint's files (and `config.json`, if any).
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The index file, when the checkpoint has one.
    #[must_use]
    pub fn index(&self) -> Option<&Path> {
        self.index.as_deref()
    }

    /// Files in index order (sorted by name), each read once.
    #[must_use]
    pub fn files(&self) -> &[FileInfo] {
        &self.files
    }

    /// Every tensor, sorted by (file, offset) (the order [`Checkpoint::tensor_index`] and the
    /// plan's [`crate::plan::TensorPlan::source`] index into).
    #[must_use]
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// `config.json` beside the checkpoint, when present.
    #[must_use]
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }

    /// Tensors found in files but absent from the index, as (file, tensor) pairs; they are
    /// reported, not loaded.
    #[must_use]
    pub fn unindexed(&self) -> &[(String, String)] {
        &self.unindexed
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

/// Picks the index or the safetensors files of a directory.
fn find_in_dir(dir: &Path) -> Result<Source> {
    let index = dir.join(INDEX_NAME);
    if index.is_file() {
        return read_index(&index);
    }
    // An index that is there but is not a readable regular file (a directory, a FIFO, a
    // dangling link) must not be silently replaced by whatever .safetensors files lie beside it.
    if std::fs::symlink_metadata(&index).is_ok() {
        return Err(Error::InvalidIndex {
            file: INDEX_NAME.into(),
            reason: "not a regular file (or a link to one)".into(),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut indexes = Vec::new();
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let raw = entry.file_name();
        let Some(name) = raw.to_str().map(str::to_owned) else {
            // Names are kept as strings (index values, messages); a lossy copy would then
            // point at a file that does not exist.
            let lossy = raw.to_string_lossy();
            if lossy.ends_with(".safetensors") || lossy.ends_with(".safetensors.index.json") {
                return Err(Error::NotACheckpoint {
                    path: entry.path(),
                    reason: "file name is not valid UTF-8".into(),
                });
            }
            continue;
        };
        let is_file = entry.path().is_file();
        if !is_file {
            continue;
        }
        if name.ends_with(".safetensors.index.json") {
            indexes.push(name);
        } else if name.ends_with(".safetensors") {
            files.push(name);
        }
    }
    match indexes.len() {
        0 => {}
        1 => return read_index(&dir.join(&indexes[0])),
        _ => {
            indexes.sort();
            return Err(Error::NotACheckpoint {
                path: dir.to_path_buf(),
                reason: format!(
                    "several index files ({}); give the one to use",
                    indexes.join(", ")
                ),
            });
        }
    }
    if files.is_empty() {
        return Err(Error::NotACheckpoint {
            path: dir.to_path_buf(),
            reason: format!("directory holds neither {INDEX_NAME} nor a .safetensors file"),
        });
    }
    Ok(Source::Files(files))
}

/// Reads and checks the shape of an index file: `{"weight_map": {tensor: file, ...}, ...}`.
fn read_index(path: &Path) -> Result<Source> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let bad = |reason: String| Error::InvalidIndex {
        file: name.clone(),
        reason,
    };
    let bytes = match read_small_file(path)? {
        Some(b) => b,
        None => return Err(bad(too_big_or_special())),
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not valid UTF-8".into()))?;
    let value = parse_json_strict(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let wm = obj
        .get("weight_map")
        .ok_or_else(|| bad("no \"weight_map\"".into()))?
        .as_object()
        .ok_or_else(|| bad("\"weight_map\" is not an object".into()))?;
    if wm.is_empty() {
        return Err(bad("\"weight_map\" is empty".into()));
    }
    let mut map = Vec::with_capacity(wm.len());
    for (tensor, file) in wm {
        let file = file.as_str().ok_or_else(|| {
            bad(format!(
                "tensor {tensor:?}: weight_map value is not a file name string"
            ))
        })?;
        map.push((tensor.clone(), file.to_string()));
    }
    Ok(Source::Index(path.to_path_buf(), map))
}

/// Prefixes an index error about file `file` with the first tensor the index maps to it.
fn name_first_tensor(e: Error, map: Option<&[(String, String)]>, file: &str) -> Error {
    match (e, map) {
        (Error::InvalidIndex { file: ix, reason }, Some(map)) => {
            let reason = match map.iter().find(|(_, f)| f == file) {
                Some((t, _)) => format!("tensor {t:?}: {reason}"),
                None => reason,
            };
            Error::InvalidIndex { file: ix, reason }
        }
        (e, _) => e,
    }
}

/// Resolves a file name of the checkpoint inside the root: no absolute paths, no `..`, and no
/// symlink that leads outside the (canonical) root.
fn resolve(canon_root: &Path, root: &Path, name: &str, index: Option<&String>) -> Result<PathBuf> {
    let bad = |reason: String| match index {
        Some(ix) => Error::InvalidIndex {
            file: ix.clone(),
            reason,
        },
        None => Error::InvalidFile {
            file: name.to_string(),
            reason,
        },
    };
    let rel = Path::new(name);
    if name.is_empty() {
        return Err(bad("empty file name in weight_map".into()));
    }
    if name.contains('\0') {
        return Err(bad(format!("file name {name:?} contains a NUL byte")));
    }
    if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad(format!(
            "file {name:?} is not a plain relative path inside the checkpoint directory"
        )));
    }
    let joined = root.join(rel);
    let canon = std::fs::canonicalize(&joined).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            bad(format!("file {name:?} does not exist"))
        } else {
            bad(format!("file {name:?}: {e}"))
        }
    })?;
    // Only names from an index are untrusted data; a file named on the command line or found
    // in the directory may be a symlink elsewhere.
    if index.is_some() && !canon.starts_with(canon_root) && !in_hf_cache_blobs(canon_root, &canon) {
        return Err(bad(format!(
            "file {name:?} resolves outside the checkpoint directory"
        )));
    }
    if !canon.is_file() {
        return Err(bad(format!("file {name:?} is not a regular file")));
    }
    Ok(canon)
}

/// The Hugging Face hub cache keeps a revision's files in `<repo>/snapshots/<rev>/` as symlinks
/// to `<repo>/blobs/<hash>`: those targets belong to the checkpoint too.
fn in_hf_cache_blobs(canon_root: &Path, canon: &Path) -> bool {
    let Some(snapshots) = canon_root.parent() else {
        return false;
    };
    let Some(repo) = snapshots.parent() else {
        return false;
    };
    snapshots.file_name() == Some(std::ffi::OsStr::new("snapshots"))
        && canon.parent() == Some(repo.join("blobs").as_path())
}

/// Reads one file's header: 8 bytes, then exactly `n` bytes once `n` has been checked.
fn read_file_header(name: &str, path: &Path) -> Result<(FileInfo, Header)> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let identity = FileIdentity::of(&file, path)?;
    let len = identity.len;
    let mut first = [0u8; 8];
    let got = read_up_to(&mut file, &mut first).map_err(|e| Error::io(path, e))?;
    let n = header_len(name, &first[..got], len)?;
    // header_len checked n <= MAX_HEADER_LEN and 8 + n <= len.
    let mut buf = vec![0u8; 8 + n as usize];
    buf[..8].copy_from_slice(&first);
    let got = read_up_to(&mut file, &mut buf[8..]).map_err(|e| Error::io(path, e))?;
    // A file that shrank since `metadata` gives a short buffer: parse_header reports it.
    buf.truncate(8 + got);
    let mut header = parse_header(name, &buf, len)?;
    let info = FileInfo {
        name: name.to_string(),
        path: path.to_path_buf(),
        identity,
        data_start: header.data_start(),
        metadata: header.metadata.take(),
    };
    Ok((info, header))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Largest index or `config.json` read (real ones are a few MB even for 92k tensors).
const MAX_JSON_FILE: u64 = super::MAX_HEADER_LEN;

fn too_big_or_special() -> String {
    format!("not a regular file of at most {MAX_JSON_FILE} bytes")
}

/// Reads a whole JSON side file, or `None` when it is not a regular file (a FIFO would block)
/// or is larger than [`MAX_JSON_FILE`].
fn read_small_file(path: &Path) -> Result<Option<Vec<u8>>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.len() > MAX_JSON_FILE {
        return Ok(None);
    }
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // `take` guards against a file that grew since `metadata`.
    (&mut file)
        .take(MAX_JSON_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_JSON_FILE {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// Reads `config.json` beside the checkpoint, if there is one.
fn read_config(root: &Path) -> Result<Option<serde_json::Value>> {
    let path = root.join("config.json");
    let bad = |reason: String| Error::InvalidFile {
        file: "config.json".into(),
        reason,
    };
    match std::fs::metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    }
    let bytes = match read_small_file(&path)? {
        Some(b) => b,
        None => return Err(bad(too_big_or_special())),
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not valid UTF-8".into()))?;
    let value = parse_json_strict(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    Ok(Some(value))
}
