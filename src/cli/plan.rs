//! `safeshard plan`: the dry run. Plans every rank from headers only and prints a per-rank
//! table (or `--json`), and optionally an SVG picture of per-rank memory.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::plan::Plan;
use crate::{Error, Result};

use super::common::{human_bytes, printable, PlanFlags};

/// Arguments of `safeshard plan`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either.
    pub checkpoint: PathBuf,
    /// Topology and spec.
    #[command(flatten)]
    pub flags: PlanFlags,
    /// Print `{"world_size","tp","pp","dp","ep","ranks":[{"rank","tp_rank","pp_rank",
    /// "dp_rank","bytes","read_bytes","tensors":[{"name","dtype","shape","bytes"}]}]}`
    /// instead of the table (shape: rank-local; bytes: held after loading).
    #[arg(long)]
    pub json: bool,
    /// Also write an SVG picture of per-rank memory, stacked by tensor kind, to FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

/// Runs `safeshard plan`.
pub fn run(args: Args) -> Result<()> {
    let (prepared, plan) = super::common::split(args.flags.job(&args.checkpoint)?);
    if let Some(path) = &args.svg {
        write_svg(path, &plan)?;
    }
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let written = if args.json {
        write_json(&mut out, &plan)
    } else {
        write_table(&mut out, &plan)
    }
    .and_then(|()| out.flush());
    // The process ends next: freeing millions of small allocations one by one would only cost
    // time (a tenth of a second on DeepSeek-V3 at tp=8 × pp=8), so leave that to the OS.
    std::mem::forget(plan);
    std::mem::forget(prepared);
    match written {
        Ok(()) => Ok(()),
        // The reader went away (`| head`): not an error of ours.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("<stdout>", e)),
    }
}

/// Writes the SVG to a temporary file beside `path` and renames it into place when complete.
fn write_svg(path: &Path, plan: &Plan) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Renaming over a device node or a directory would replace it (we may run as root).
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() {
            return Err(Error::invalid_argument(
                "svg",
                format!(
                    "{}: exists and is not a regular file",
                    printable(&path.to_string_lossy())
                ),
            ));
        }
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".safeshard-plan-")
        .suffix(".svg.tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, strip_path(e)))?;
    tmp.write_all(crate::plan::memory_svg(plan).as_bytes())
        .and_then(|()| tmp.flush())
        .map_err(|e| Error::io(tmp.path().to_path_buf(), e))?;
    // tempfile creates 0600; a picture is for sharing.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(tmp.path().to_path_buf(), e))?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// tempfile adds `at path "..."` with its random name to I/O errors; the message already
/// names the directory.
fn strip_path(e: io::Error) -> io::Error {
    let msg = e.to_string();
    match msg.split_once(" at path \"") {
        Some((head, _)) => io::Error::new(e.kind(), head.to_string()),
        None => e,
    }
}

fn write_json(out: &mut impl Write, plan: &Plan) -> io::Result<()> {
    writeln!(out, "{}", crate::plan::json_document(plan))
}

/// Writes `header` and `rows` as right-aligned columns two spaces apart, each as wide as its
/// widest cell.
fn write_columns<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let mut w = header.map(str::len);
    for row in rows {
        for (wi, cell) in w.iter_mut().zip(row) {
            *wi = (*wi).max(cell.len());
        }
    }
    let mut line = |cells: [&str; N]| -> io::Result<()> {
        let mut s = String::new();
        for (i, (c, wi)) in cells.iter().zip(&w).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(&format!("{c:>wi$}"));
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(header)?;
    for row in rows {
        line(row.each_ref().map(String::as_str))?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, plan: &Plan) -> io::Result<()> {
    let t = plan.topology();
    writeln!(
        out,
        "spec {}: tp={} pp={} dp={} ep={}, {} ranks, {} files",
        plan.spec(),
        t.tp,
        t.pp,
        t.dp,
        t.ep,
        plan.ranks().len(),
        plan.files().len()
    )?;
    let mut rows: Vec<[String; 9]> = plan
        .ranks()
        .iter()
        .map(|r| {
            [
                r.coords().rank.to_string(),
                r.coords().dp_rank.to_string(),
                r.coords().pp_rank.to_string(),
                r.coords().tp_rank.to_string(),
                r.tensors().len().to_string(),
                human_bytes(r.bytes()),
                human_bytes(r.read_bytes()),
                format!("{:.2}x", r.read_amplification()),
                human_bytes(r.staging_bytes()),
            ]
        })
        .collect();
    let total_tensors: usize = plan.ranks().iter().map(|r| r.tensors().len()).sum();
    let total_bytes = plan.total_bytes();
    let total_read = plan.total_read_bytes();
    let total = [
        "total".to_string(),
        String::new(),
        String::new(),
        String::new(),
        total_tensors.to_string(),
        human_bytes(total_bytes),
        human_bytes(total_read),
        if total_bytes > 0 {
            format!("{:.2}x", total_read as f64 / total_bytes as f64)
        } else {
            "0.00x".into()
        },
        human_bytes(
            plan.ranks()
                .iter()
                .map(|r| r.staging_bytes())
                .max()
                .unwrap_or(0),
        ),
    ];
    let header = [
        "RANK", "DP", "PP", "TP", "TENSORS", "BYTES", "READ", "AMPL", "STAGING",
    ];
    rows.push(total);
    write_columns(out, header, &rows)?;

    writeln!(out)?;
    let stages = plan.stages();
    let srows: Vec<[String; 6]> = stages
        .iter()
        .map(|s| {
            [
                s.stage.to_string(),
                s.ranks.to_string(),
                s.tensors.to_string(),
                human_bytes(s.max_rank_bytes),
                human_bytes(s.bytes),
                human_bytes(s.read_bytes),
            ]
        })
        .collect();
    let sheader = ["STAGE", "RANKS", "TENSORS", "MAX/RANK", "BYTES", "READ"];
    write_columns(out, sheader, &srows)?;
    writeln!(out)?;
    writeln!(
        out,
        "bytes: held after loading; read: from storage, whole 4 KiB pages; staging: largest file window one tensor spans"
    )?;
    writeln!(out, "plan hash: {}", plan.hash_hex())
}
