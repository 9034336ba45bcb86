//! Resharding: write every rank's tensors as safetensors files, plus [`MANIFEST`], the plan
//! as JSON.
//!
//! Two formats ([`ReshardOptions::format`]):
//! - [`TensorNames::Checkpoint`] (the default): checkpoint names, unfused, one file set per
//!   global rank, `model-rank-{rank}-part-{part}.safetensors`;
//! - [`TensorNames::Vllm`]: what vLLM's `sharded_state` loader reads: the plan already holds
//!   vLLM's `state_dict()` names (see [`crate::vllm`]); files are named by the loader's
//!   patterns, `model-rank-{tp_rank}-part-{part}.safetensors` when pp = 1 and
//!   `model-pp-{pp_rank}-tp-{tp_rank}-part-{part}.safetensors` when pp > 1, and the caller's
//!   extra files (config.json, tokenizer files) are written beside them so the directory is a
//!   model vLLM opens with `load_format="sharded_state"`. vLLM has no files per data- or
//!   expert-parallel rank, so dp and ep must be 1.
//!
//! Outputs are safe:
//! - the output directory may not be, contain or lie inside a directory holding an input file
//!   (compared as canonical paths), checked before anything is written or removed;
//! - an exclusive `flock` on the output directory is held for the whole run, so a second
//!   concurrent reshard into it fails with [`Error::Locked`] instead of interleaving parts;
//! - every file is written under a temporary name and renamed when complete, the manifest
//!   last: a directory with a manifest holds exactly that plan's parts.
//!
//! Tensors are copied into an owned arena (never zero-copy views of the mapping), so a file
//! truncated during the run is a load error naming the input file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Component, Path, PathBuf};

use crate::checkpoint::{header_bytes, Checkpoint};
use crate::load::{self, LoadOptions, TensorRef};
use crate::plan::Plan;
use crate::topology::Coords;
use crate::vllm::{self, Names, Retied, TensorNames, VllmNames};
use crate::{Error, Result};

/// Name of the manifest written beside the parts; it marks a complete output.
pub const MANIFEST: &str = "safeshard-plan.json";

/// How to reshard.
#[derive(Clone, Debug)]
pub struct ReshardOptions {
    /// Largest part file (tensor data bytes); a larger tensor gets a part of its own (so 0
    /// means one part per tensor).
    pub max_shard_size: u64,
    /// How each rank is loaded (views are never used).
    pub load: LoadOptions,
    /// File names and layout: [`TensorNames::Vllm`] writes vLLM `sharded_state` files and
    /// needs a plan with vLLM names ([`crate::JobBuilder::names`]).
    pub format: TensorNames,
}

impl Default for ReshardOptions {
    fn default() -> Self {
        ReshardOptions {
            max_shard_size: 5_000_000_000,
            load: LoadOptions::default(),
            format: TensorNames::Checkpoint,
        }
    }
}

/// What `--format vllm` needs besides the plan: the job's vLLM side (finishing every loaded
/// rank, how re-tied heads are written) and the checkpoint (config.json and tokenizer files
/// written beside the parts).
pub(crate) struct VllmOutput<'a> {
    pub names: &'a VllmNames,
    pub ckpt: &'a Checkpoint,
}

/// What a reshard wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReshardSummary {
    /// Part files written (the manifest not counted).
    pub files: usize,
    /// Bytes of the part files.
    pub bytes: u64,
    /// Ranks written.
    pub ranks: usize,
}

/// Splits tensors (by byte size) into parts of at most `max` bytes each, in order.
fn parts(sizes: &[u64], max: u64) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut acc = 0u64;
    for (i, &b) in sizes.iter().enumerate() {
        if i > start && acc.saturating_add(b) > max {
            out.push(start..i);
            start = i;
            acc = 0;
        }
        acc = acc.saturating_add(b);
    }
    if start < sizes.len() || out.is_empty() {
        out.push(start..sizes.len());
    }
    out
}

/// The safetensors header of `tensors`, stored back to back in this order.
fn header(tensors: &[TensorRef<'_>]) -> Vec<u8> {
    let entries = tensors
        .iter()
        .map(|t| (t.name, t.dtype, t.shape, t.data.len() as u64));
    header_bytes(&[("format", "pt"), ("writer", "safeshard")], entries)
}

/// Writes `path` through a temporary file in the same directory, renamed when complete.
pub(crate) fn write_atomic(
    path: &Path,
    f: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".safeshard-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        f(&mut w)
            .and_then(|()| w.flush())
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    // tempfile creates 0600; shards are meant to be read by the serving job's user too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes one safetensors file holding `tensors`.
fn write_part(path: &Path, tensors: &[TensorRef<'_>]) -> Result<u64> {
    let h = header(tensors);
    let mut total = 8 + h.len() as u64;
    write_atomic(path, |w| {
        w.write_all(&(h.len() as u64).to_le_bytes())?;
        w.write_all(&h)?;
        for t in tensors {
            w.write_all(t.data)?;
        }
        Ok(())
    })?;
    total += tensors.iter().map(|t| t.data.len() as u64).sum::<u64>();
    Ok(total)
}

/// The file name of part `part` of the rank at `c`.
fn part_name(plan: &Plan, format: TensorNames, c: Coords, part: usize) -> String {
    let rank = c.rank;
    match format {
        TensorNames::Checkpoint => format!("model-rank-{rank}-part-{part}.safetensors"),
        // ShardedStateLoader's TP_ONLY_PATTERN and PP_AND_TP_PATTERN.
        TensorNames::Vllm if plan.topology.pp == 1 => {
            format!("model-rank-{}-part-{part}.safetensors", c.tp_rank)
        }
        TensorNames::Vllm => format!(
            "model-pp-{}-tp-{}-part-{part}.safetensors",
            c.pp_rank, c.tp_rank
        ),
    }
}

/// Loads, finishes and writes one rank; `names` collects the file names written.
fn write_rank(
    plan: &Plan,
    rank: usize,
    out: &Path,
    opts: &ReshardOptions,
    vllm: Option<(&VllmNames, Names)>,
    names: &mut Vec<String>,
) -> Result<(u64, Retied)> {
    let load_opts = LoadOptions {
        views: false,
        ..opts.load.clone()
    };
    let mut loaded = load::load_rank(plan, rank, &load_opts)?;
    let retied = match vllm {
        Some((v, n)) => v.finish(plan, &mut loaded, n)?,
        None => Retied::NotApplicable,
    };
    let tensors: Vec<TensorRef<'_>> = loaded.iter().collect();
    let sizes: Vec<u64> = tensors.iter().map(|t| t.data.len() as u64).collect();
    let mut written = 0;
    for (part, range) in parts(&sizes, opts.max_shard_size).into_iter().enumerate() {
        let name = part_name(plan, opts.format, loaded.coords(), part);
        let slice = tensors.get(range).unwrap_or(&[]);
        written += write_part(&out.join(&name), slice)?;
        names.push(name);
    }
    Ok((written, retied))
}

/// Writes every rank's parts; `names` collects the file names written so far. For vLLM
/// names, ranks whose re-tie vLLM's `sharded_state` cannot load as written are written again
/// (see [`VllmNames::reshard_ties`]); returns whether config.json must say untied.
fn write_parts(
    plan: &Plan,
    out: &Path,
    opts: &ReshardOptions,
    vllm: Option<&VllmNames>,
    names: &mut Vec<String>,
) -> Result<(u64, bool)> {
    let mut written = 0u64;
    let mut retied = Vec::with_capacity(plan.ranks.len());
    let mut by_rank = Vec::with_capacity(plan.ranks.len());
    for rank in 0..plan.ranks.len() {
        let start = names.len();
        let (bytes, r) = write_rank(plan, rank, out, opts, vllm.map(|v| (v, Names::Vllm)), names)?;
        written += bytes;
        retied.push(r);
        by_rank.push(start..names.len());
    }
    let Some(v) = vllm else {
        return Ok((written, false));
    };
    let ties = v.reshard_ties(&retied);
    for &rank in &ties.rewrite {
        let Some(old) = by_rank.get(rank).cloned() else {
            continue;
        };
        let mut again = Vec::new();
        let (bytes, _) = write_rank(plan, rank, out, opts, Some((v, Names::Both)), &mut again)?;
        written += bytes;
        for n in &names[old.clone()] {
            if !again.contains(n) {
                let path = out.join(n);
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
        }
        names.extend(again);
    }
    // Parts written twice count once.
    names.sort();
    names.dedup();
    Ok((written, ties.untie_config))
}

/// Removes `model-rank-*-part-*.safetensors` and `model-pp-*-tp-*-part-*.safetensors` files
/// of an earlier run that this run did not write (another topology, shard size or format), so
/// the directory holds exactly this plan's parts.
fn remove_stale_parts(out: &Path, written: &[String]) -> Result<()> {
    let entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = (name.starts_with("model-rank-") || name.starts_with("model-pp-"))
            && name.contains("-part-")
            && name.ends_with(".safetensors");
        if ours && !written.iter().any(|w| w == name) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// `path` made absolute and canonical as far as it exists; components that do not exist yet
/// are appended as given (after `..` and `.` are resolved lexically).
fn canonical_prefix(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io(".", e))?
            .join(path)
    };
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(c) => {
                let mut out = c;
                for part in rest.iter().rev() {
                    if part == ".." {
                        out.pop();
                    } else if part != "." {
                        out.push(part);
                    }
                }
                return Ok(out);
            }
            Err(_) => match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                // `..` as the last component has no file name: resolve it lexically.
                _ if existing.components().next_back() == Some(Component::ParentDir) => {
                    rest.push("..".into());
                    existing.pop();
                }
                _ => return Ok(abs),
            },
        }
    }
}

/// The directories an output must stay clear of: each input file's directory, as named and
/// as resolved (a Hugging Face snapshot links its files into `blobs/`), plus `extra` (the
/// checkpoint's own directory, holding its index and config).
fn input_dirs(plan: &Plan, extra: &[&Path]) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let canonical = |p: &Path| std::fs::canonicalize(p).map_err(|e| Error::io(p, e));
    for f in &plan.files {
        if let Some(dir) = canonical(&f.path)?.parent() {
            dirs.push(dir.to_path_buf());
        }
        match f.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => dirs.push(canonical(p)?),
            _ => dirs.push(canonical(Path::new("."))?),
        }
    }
    for d in extra {
        if !d.as_os_str().is_empty() {
            dirs.push(canonical(d)?);
        }
    }
    dirs.sort();
    dirs.dedup();
    Ok(dirs)
}

/// Refuses an output directory that is, contains or lies inside an input directory (see
/// [`input_dirs`]), before anything is created, written or removed.
fn check_disjoint(plan: &Plan, extra: &[&Path], out: &Path) -> Result<()> {
    let out_c = canonical_prefix(out)?;
    for dir in input_dirs(plan, extra)? {
        let relation = if out_c == dir {
            "is"
        } else if dir.starts_with(&out_c) {
            "contains"
        } else if out_c.starts_with(&dir) {
            "lies inside"
        } else {
            continue;
        };
        return Err(Error::invalid_argument(
            "out",
            format!(
                "{}: the output directory {relation} the input directory {} (it would overwrite or delete the checkpoint); choose a separate directory",
                crate::error::escaped_path(out),
                crate::error::escaped_path(&dir)
            ),
        ));
    }
    Ok(())
}

/// An exclusive, non-blocking `flock` on a directory, released when dropped (or when the
/// process dies, so a crashed run never leaves the directory locked).
#[derive(Debug)]
struct DirLock {
    _dir: File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock> {
        use std::os::fd::AsRawFd;
        let f = File::open(dir).map_err(|e| Error::io(dir, e))?;
        // SAFETY: flock on a file descriptor we own; it has no memory effects.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::Locked {
                    path: dir.to_path_buf(),
                }
            } else {
                Error::io(dir, e)
            });
        }
        Ok(DirLock { _dir: f })
    }
}

/// Writes every rank of `plan` into `out` (created if needed); [`crate::Job::reshard`] is
/// the public entry. See the module docs for the guarantees.
/// `inputs` names directories besides the files' own that the output must not overlap (the
/// checkpoint's directory).
pub(crate) fn reshard(
    plan: &Plan,
    inputs: &[&Path],
    out: &Path,
    opts: &ReshardOptions,
    vllm: Option<VllmOutput<'_>>,
) -> Result<ReshardSummary> {
    if opts.format == TensorNames::Vllm {
        let t = &plan.topology;
        if t.dp != 1 || t.ep != 1 {
            return Err(Error::invalid_argument(
                "format",
                format!(
                    "vllm with dp = {} and ep = {}: vLLM's sharded_state files are per (pp, tp) rank only (every data-parallel replica reads the same files); reshard with dp = 1 and ep = 1",
                    t.dp, t.ep
                ),
            ));
        }
    }
    check_disjoint(plan, inputs, out)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let _lock = DirLock::acquire(out)?;
    // The manifest is written last and marks a complete output: remove an earlier run's
    // first, so that a run that fails half-way never leaves a directory that looks complete.
    let manifest = out.join(MANIFEST);
    match std::fs::remove_file(&manifest) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(&manifest, e));
        }
        _ => {}
    }
    let mut names = Vec::new();
    let (written, untie) = write_parts(plan, out, opts, vllm.as_ref().map(|v| v.names), &mut names)
        .inspect_err(|_| {
            // Parts of a failed run are removed: with no manifest they would still look whole.
            for n in &names {
                let _ = std::fs::remove_file(out.join(n));
            }
        })?;
    remove_stale_parts(out, &names)?;
    if let Some(v) = &vllm {
        for (name, bytes) in vllm::side_files(v.ckpt, untie)? {
            write_atomic(&out.join(&name), |w| w.write_all(&bytes))?;
        }
    }
    write_atomic(&manifest, |w| {
        serde_json::to_writer_pretty(&mut *w, plan).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    })?;
    Ok(ReshardSummary {
        files: names.len(),
        bytes: written,
        ranks: plan.ranks.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_respect_the_limit_and_keep_order() {
        assert_eq!(parts(&[], 10), vec![0..0]);
        assert_eq!(parts(&[4, 4, 4], 10), vec![0..2, 2..3]);
        assert_eq!(parts(&[20, 1, 1], 10), vec![0..1, 1..3]);
        assert_eq!(parts(&[5, 5], 10), vec![0..2]);
    }

    #[test]
    fn canonical_prefix_resolves_missing_tails() {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        assert_eq!(
            canonical_prefix(&tmp.path().join("a/b/../c")).unwrap(),
            base.join("a/c")
        );
        assert_eq!(canonical_prefix(tmp.path()).unwrap(), base);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(tmp.path()).unwrap();
        let second = DirLock::acquire(tmp.path());
        assert!(matches!(second, Err(Error::Locked { .. })), "{second:?}");
        drop(first);
        assert!(DirLock::acquire(tmp.path()).is_ok());
    }
}
