//! Splitting tensors into files and writing them (dense, in parallel-filled chunks, or sparse).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Map, Value};

use super::{fill, tensor_bytes, tensors, SynthOptions};
use crate::checkpoint::{header_bytes, Dtype};
use crate::{Error, Result};

/// One file of a synthetic checkpoint: its name and the indexes of its tensors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthFile {
    /// File name (`model.safetensors` or `model-0000k-of-0000N.safetensors`).
    pub name: String,
    /// Indexes into the tensor list, in file order.
    pub tensors: Vec<usize>,
    /// Bytes of tensor data in the file.
    pub data_bytes: u64,
}

/// Greedy split like Hugging Face's `max_shard_size`: tensors in order, a new file when the
/// next tensor would pass `max`; a tensor larger than `max` gets a file of its own.
pub(crate) fn split_sizes(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    let mut files: Vec<Vec<usize>> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_bytes = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        if !cur.is_empty() && cur_bytes.saturating_add(s) > max {
            files.push(std::mem::take(&mut cur));
            cur_bytes = 0;
        }
        cur.push(i);
        cur_bytes = cur_bytes.saturating_add(s);
    }
    if !cur.is_empty() || files.is_empty() {
        files.push(cur);
    }
    files
}

/// How `write_checkpoint` splits `opts` into files, with their names.
pub fn plan_files(opts: &SynthOptions) -> Result<Vec<SynthFile>> {
    let list = tensors(opts)?;
    let sizes = list
        .iter()
        .map(|(n, d, s)| tensor_bytes(n, *d, s))
        .collect::<Result<Vec<u64>>>()?;
    let groups = split_sizes(&sizes, opts.max_file_bytes);
    let n = groups.len();
    Ok(groups
        .into_iter()
        .enumerate()
        .map(|(k, tensors)| SynthFile {
            name: if n == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            },
            data_bytes: tensors.iter().filter_map(|&i| sizes.get(i)).sum(),
            tensors,
        })
        .collect())
}

/// The header of one file: its tensors back to back, in list order.
fn header(list: &[(String, Dtype, Vec<u64>)], sizes: &[u64], idx: &[usize]) -> Vec<u8> {
    let entries = idx.iter().filter_map(|&i| {
        let ((name, dtype, shape), &size) = (list.get(i)?, sizes.get(i)?);
        Some((name.as_str(), *dtype, shape.as_slice(), size))
    });
    header_bytes(&[("format", "pt")], entries)
}

/// A temporary name beside `path`, renamed over it when complete.
fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    fs::write(&tmp, body).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Bytes filled per write call; filled in parallel pieces of `PIECE`.
const CHUNK: usize = 32 << 20;
const PIECE: usize = 1 << 20;

pub(crate) fn write(dir: &Path, opts: &SynthOptions) -> Result<usize> {
    let list = tensors(opts)?;
    let sizes = list
        .iter()
        .map(|(n, d, s)| tensor_bytes(n, *d, s))
        .collect::<Result<Vec<u64>>>()?;
    let files = plan_files(opts)?;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = serde_json::to_vec_pretty(&opts.config)
        .map_err(|e| Error::io(dir.join("config.json"), std::io::Error::other(e)))?;
    write_atomic(&dir.join("config.json"), &cfg)?;

    // Chunk buffer: no larger than the largest file's data (tiny checkpoints stay small).
    let largest = files.iter().map(|f| f.data_bytes).max().unwrap_or(0);
    let cap = usize::try_from(largest).unwrap_or(CHUNK).clamp(1, CHUNK);
    let mut buf = if opts.sparse {
        Vec::new()
    } else {
        vec![0u8; cap]
    };
    for f in &files {
        let path = dir.join(&f.name);
        let tmp = tmp_path(&path);
        let res = write_file(&tmp, &list, &sizes, f, opts, &mut buf);
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    }

    // A stale single file or index from an earlier run would change what the directory means.
    let index_path = dir.join("model.safetensors.index.json");
    if files.len() == 1 {
        remove_if_exists(&index_path)?;
    } else {
        remove_if_exists(&dir.join("model.safetensors"))?;
        let mut weight_map = Map::new();
        for f in &files {
            for &i in &f.tensors {
                if let Some((name, _, _)) = list.get(i) {
                    weight_map.insert(name.clone(), Value::String(f.name.clone()));
                }
            }
        }
        let total: u64 = sizes.iter().sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let body = serde_json::to_vec_pretty(&index)
            .map_err(|e| Error::io(&index_path, std::io::Error::other(e)))?;
        write_atomic(&index_path, &body)?;
    }
    Ok(list.len())
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// One piece of the chunk buffer: which tensor and where in it.
struct Seg {
    tensor: usize,
    start: u64,
    len: usize,
}

fn write_file(
    tmp: &Path,
    list: &[(String, Dtype, Vec<u64>)],
    sizes: &[u64],
    f: &SynthFile,
    opts: &SynthOptions,
    buf: &mut [u8],
) -> Result<()> {
    let io = |e| Error::io(tmp, e);
    let hdr = header(list, sizes, &f.tensors);
    let mut file = File::create(tmp).map_err(io)?;
    file.write_all(&(hdr.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(&hdr).map_err(io)?;
    if opts.sparse {
        // Holes: the file has its full length but no data blocks.
        let len = 8 + hdr.len() as u64 + f.data_bytes;
        file.set_len(len).map_err(io)?;
        return Ok(());
    }
    let mut segs: Vec<Seg> = Vec::new();
    let mut filled = 0usize;
    for &t in &f.tensors {
        let size = sizes.get(t).copied().unwrap_or(0);
        let mut pos = 0u64;
        while pos < size {
            let room = buf.len() - filled;
            let n = usize::try_from(size - pos).unwrap_or(usize::MAX).min(room);
            segs.push(Seg {
                tensor: t,
                start: pos,
                len: n,
            });
            filled += n;
            pos += n as u64;
            if filled == buf.len() {
                flush(&mut file, buf, filled, &segs, list, opts.seed).map_err(io)?;
                segs.clear();
                filled = 0;
            }
        }
    }
    if filled > 0 {
        flush(&mut file, buf, filled, &segs, list, opts.seed).map_err(io)?;
    }
    Ok(())
}

/// Fills `buf[..filled]` from the segments in parallel and writes it.
fn flush(
    file: &mut File,
    buf: &mut [u8],
    filled: usize,
    segs: &[Seg],
    list: &[(String, Dtype, Vec<u64>)],
    seed: u64,
) -> std::io::Result<()> {
    let mut pieces: Vec<(&mut [u8], &str, u64)> = Vec::new();
    let mut rest: &mut [u8] = &mut buf[..filled];
    for s in segs {
        let (mut seg, tail) = std::mem::take(&mut rest).split_at_mut(s.len);
        rest = tail;
        let name = list.get(s.tensor).map(|t| t.0.as_str()).unwrap_or("");
        let mut start = s.start;
        while !seg.is_empty() {
            let n = seg.len().min(PIECE);
            let (p, t) = seg.split_at_mut(n);
            pieces.push((p, name, start));
            start += n as u64;
            seg = t;
        }
    }
    pieces
        .into_par_iter()
        .for_each(|(p, name, start)| fill(seed, name, start, p));
    file.write_all(&buf[..filled])
}

#[cfg(test)]
mod tests {
    use super::split_sizes;

    #[test]
    fn greedy_split_like_max_shard_size() {
        assert_eq!(split_sizes(&[4, 4, 4], 8), vec![vec![0, 1], vec![2]]);
        // A tensor larger than the limit gets a file of its own.
        assert_eq!(split_sizes(&[1, 20, 1], 8), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(split_sizes(&[3, 3, 3], 100), vec![vec![0, 1, 2]]);
        assert_eq!(split_sizes(&[], 8), vec![Vec::<usize>::new()]);
        // Zero-size tensors never start a new file.
        assert_eq!(split_sizes(&[8, 0, 0, 1], 8), vec![vec![0, 1, 2], vec![3]]);
    }
}
