//! `safeshard reshard`: write each rank's tensors as safetensors files, named as vLLM's
//! `sharded_state` loader expects (`model-rank-{rank}-part-{part}.safetensors`), plus a JSON
//! manifest of the plan. Every file is written under a temporary name and renamed when
//! complete, so a file with a final name is always whole.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safeshard::checkpoint::header_bytes;
use safeshard::load::{self, LoadOptions, TensorRef};
use safeshard::{Error, Result};

use super::common::{human_bytes, PlanFlags};
use super::load::{parse_size, prepare_plan};

/// Arguments of `safeshard reshard`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either.
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub plan: PlanFlags,
    /// Output directory (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Largest part file (tensor data), e.g. `5GB`, `500MiB`; a larger tensor gets a part of
    /// its own.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
}

/// Name of the manifest written beside the parts.
pub const MANIFEST: &str = "safeshard-plan.json";

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
pub fn write_atomic(
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

/// Writes every rank's parts; `names` collects the file names written so far.
fn write_parts(args: &Args, plan: &safeshard::plan::Plan, names: &mut Vec<String>) -> Result<u64> {
    // No views: writing a view hands the file mapping to write(2), which turns a shard
    // truncated meanwhile into `Bad address` naming the output. Copies go through the
    // engine, which names the input.
    let opts = LoadOptions::default();
    let mut written = 0u64;
    for rank in 0..plan.ranks.len() {
        let loaded = load::load_rank(plan, rank, &opts)?;
        let tensors: Vec<TensorRef<'_>> = loaded.iter().collect();
        let sizes: Vec<u64> = tensors.iter().map(|t| t.data.len() as u64).collect();
        for (part, range) in parts(&sizes, args.max_shard_size).into_iter().enumerate() {
            let name = format!("model-rank-{rank}-part-{part}.safetensors");
            let slice = tensors.get(range).unwrap_or(&[]);
            written += write_part(&args.out.join(&name), slice)?;
            names.push(name);
        }
    }
    Ok(written)
}

/// Removes `model-rank-*-part-*.safetensors` files of an earlier run that this run did not
/// write (another topology or shard size), so the directory holds exactly this plan's parts.
fn remove_stale_parts(out: &Path, written: &[String]) -> Result<()> {
    let entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("model-rank-")
            && name.contains("-part-")
            && name.ends_with(".safetensors");
        if ours && !written.iter().any(|w| w == name) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Runs `safeshard reshard`.
pub fn run(args: Args) -> Result<()> {
    let (_prep, plan) = prepare_plan(&args.checkpoint, &args.plan)?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    // The manifest is written last and marks a complete output: remove an earlier run's
    // first, so that a run that fails half-way never leaves a directory that looks complete.
    let manifest = args.out.join(MANIFEST);
    match std::fs::remove_file(&manifest) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::io(&manifest, e));
        }
        _ => {}
    }
    let mut names = Vec::new();
    let written = write_parts(&args, &plan, &mut names).inspect_err(|_| {
        // Parts of a failed run are removed: with no manifest they would still look whole.
        for n in &names {
            let _ = std::fs::remove_file(args.out.join(n));
        }
    })?;
    let files = names.len();
    remove_stale_parts(&args.out, &names)?;
    write_atomic(&manifest, |w| {
        serde_json::to_writer_pretty(&mut *w, &plan).map_err(std::io::Error::other)?;
        w.write_all(b"\n")
    })?;
    println!(
        "wrote {files} files ({}) for {} ranks and {MANIFEST} to {}",
        human_bytes(written),
        plan.ranks.len(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parts;

    #[test]
    fn parts_respect_the_limit_and_keep_order() {
        assert_eq!(parts(&[], 10), vec![0..0]);
        assert_eq!(parts(&[4, 4, 4], 10), vec![0..2, 2..3]);
        assert_eq!(parts(&[20, 1, 1], 10), vec![0..1, 1..3]);
        assert_eq!(parts(&[5, 5], 10), vec![0..2]);
    }
}
