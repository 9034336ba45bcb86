//! `safeshard inspect`: a checkpoint's tensors as a table or as JSON.
//!
//! Output goes through one locked, buffered stdout; a closed pipe (`| head`) ends the output
//! quietly instead of failing.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;

use crate::checkpoint::{Checkpoint, Dtype};
use crate::{Error, Result};
use serde::Serialize;

use super::common::{human_bytes, printable};

/// Arguments of `safeshard inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either.
    pub path: PathBuf,
    /// Print `{"files": [...], "tensors": [{"name", "dtype", "shape", "file", "offset",
    /// "bytes"}], "total_bytes": N}` instead of the table (offset: absolute in the file).
    #[arg(long)]
    pub json: bool,
}

/// How many unindexed tensors are listed one by one before the rest are counted.
const MAX_LISTED_UNINDEXED: usize = 20;

/// Runs `safeshard inspect`.
pub fn run(args: Args) -> Result<()> {
    let ckpt = Checkpoint::open(&args.path)?;
    warn_unindexed(&ckpt);
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let written = if args.json {
        write_json(&mut out, &ckpt)
    } else {
        write_table(&mut out, &ckpt)
    }
    .and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): not an error of ours.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("<stdout>", e)),
    }
}

fn warn_unindexed(ckpt: &Checkpoint) {
    if ckpt.unindexed().is_empty() {
        return;
    }
    let index = ckpt
        .index()
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (file, tensor) in ckpt.unindexed().iter().take(MAX_LISTED_UNINDEXED) {
        eprintln!(
            "warning: {}: tensor {tensor:?} is not in {} (not loaded)",
            printable(file),
            printable(&index)
        );
    }
    if ckpt.unindexed().len() > MAX_LISTED_UNINDEXED {
        eprintln!(
            "warning: {} more tensors are not in {} (not loaded)",
            ckpt.unindexed().len() - MAX_LISTED_UNINDEXED,
            printable(&index)
        );
    }
}

/// Formats a shape as `[2, 3]`.
fn shape_string(shape: &[u64]) -> String {
    let mut s = String::with_capacity(2 + shape.len() * 6);
    s.push('[');
    for (i, d) in shape.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&d.to_string());
    }
    s.push(']');
    s
}

fn write_table(out: &mut impl Write, ckpt: &Checkpoint) -> io::Result<()> {
    let shapes: Vec<String> = ckpt
        .tensors()
        .iter()
        .map(|t| shape_string(&t.shape))
        .collect();
    let sizes: Vec<String> = ckpt
        .tensors()
        .iter()
        .map(|t| human_bytes(t.bytes))
        .collect();
    let width = |header: &str, cells: &mut dyn Iterator<Item = usize>| {
        cells.fold(header.chars().count(), usize::max)
    };
    let w_name = width(
        "NAME",
        &mut ckpt
            .tensors()
            .iter()
            .map(|t| printable(&t.name).chars().count()),
    );
    let w_dtype = width(
        "DTYPE",
        &mut ckpt.tensors().iter().map(|t| t.dtype.name().len()),
    );
    let w_shape = width("SHAPE", &mut shapes.iter().map(|s| s.len()));
    let w_bytes = width("BYTES", &mut sizes.iter().map(|s| s.len()));
    writeln!(
        out,
        "{:<w_name$}  {:<w_dtype$}  {:<w_shape$}  {:>w_bytes$}  FILE",
        "NAME", "DTYPE", "SHAPE", "BYTES"
    )?;
    for ((t, shape), size) in ckpt.tensors().iter().zip(&shapes).zip(&sizes) {
        // Files are few; look the name up rather than copy it per tensor.
        let file = ckpt.files().get(t.file).map_or("?", |f| f.name.as_str());
        writeln!(
            out,
            "{:<w_name$}  {:<w_dtype$}  {:<w_shape$}  {:>w_bytes$}  {}",
            printable(&t.name),
            t.dtype.name(),
            shape,
            size,
            printable(file)
        )?;
    }

    let mut per_dtype: BTreeMap<Dtype, (usize, u64)> = BTreeMap::new();
    for t in ckpt.tensors() {
        let e = per_dtype.entry(t.dtype).or_default();
        e.0 += 1;
        e.1 += t.bytes;
    }
    let total = ckpt.total_bytes();
    writeln!(out)?;
    writeln!(
        out,
        "{} tensors, {} ({} bytes), {} {}",
        ckpt.tensors().len(),
        human_bytes(total),
        total,
        ckpt.files().len(),
        if ckpt.files().len() == 1 {
            "file"
        } else {
            "files"
        }
    )?;
    let dtypes: Vec<String> = per_dtype
        .iter()
        .map(|(d, (n, b))| format!("{d}: {n} ({})", human_bytes(*b)))
        .collect();
    if !dtypes.is_empty() {
        writeln!(out, "dtypes: {}", dtypes.join(", "))?;
    }
    if !ckpt.unindexed().is_empty() {
        let n = ckpt.unindexed().len();
        writeln!(
            out,
            "unindexed: {n} {} in files but not in the index (not loaded)",
            if n == 1 { "tensor" } else { "tensors" }
        )?;
    }
    Ok(())
}

#[derive(Serialize)]
struct JsonTensor<'a> {
    name: &'a str,
    dtype: &'static str,
    shape: &'a [u64],
    file: &'a str,
    offset: u64,
    bytes: u64,
}

/// The JSON document, one tensor per line so that it stays greppable and diffable.
fn write_json(out: &mut impl Write, ckpt: &Checkpoint) -> io::Result<()> {
    let files: Vec<&str> = ckpt.files().iter().map(|f| f.name.as_str()).collect();
    out.write_all(b"{\"files\": ")?;
    serde_json::to_writer(&mut *out, &files)?;
    out.write_all(b",\n\"tensors\": [")?;
    for (i, t) in ckpt.tensors().iter().enumerate() {
        out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
        let entry = JsonTensor {
            name: &t.name,
            dtype: t.dtype.name(),
            shape: &t.shape,
            file: files.get(t.file).copied().unwrap_or("?"),
            offset: t.offset,
            bytes: t.bytes,
        };
        serde_json::to_writer(&mut *out, &entry)?;
    }
    writeln!(out, "\n],\n\"total_bytes\": {}}}", ckpt.total_bytes())
}
