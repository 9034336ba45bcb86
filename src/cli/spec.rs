//! `safeshard spec list` and `safeshard spec check`.

use std::io::{self, Write};
use std::path::PathBuf;

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::sharding::{self, Config, Layout, Piece, Resolved, Shards, Spec};
use crate::{Error, Result};
use serde_json::json;

use super::common::{printable, TopologyFlags};

/// `safeshard spec` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SpecCommand {
    /// List the shipped specs and the architectures they cover.
    List,
    /// Check a spec; with --against, resolve it on a checkpoint and report unmatched tensors,
    /// warnings and (with --tp/--pp/--dp/--ep) every tensor's placement.
    Check(CheckArgs),
}

/// Arguments of `safeshard spec check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// A shipped spec name (`safeshard spec list`) or a path to a `.shard` file.
    pub spec: String,
    /// A checkpoint (file, index or directory) to resolve the spec on.
    #[arg(long, value_name = "CHECKPOINT")]
    pub against: Option<PathBuf>,
    /// Topology flags (placements are reported when any is given).
    #[command(flatten)]
    pub topo: TopologyFlags,
    /// Override a config.json value, e.g. `--set num_key_value_heads=8` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `safeshard spec` subcommand.
pub fn run(cmd: SpecCommand) -> Result<()> {
    let mut buf = Vec::new();
    match cmd {
        SpecCommand::List => list(&mut buf)?,
        SpecCommand::Check(args) => check(&args, &mut buf)?,
    }
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match out.write_all(&buf).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("<stdout>", e)),
    }
}

fn list(out: &mut Vec<u8>) -> Result<()> {
    for name in Spec::shipped_names() {
        let s = Spec::shipped(name)?;
        let _ = writeln!(out, "{name:<12} {}", s.architectures.join(" "));
    }
    Ok(())
}

fn check(args: &CheckArgs, out: &mut Vec<u8>) -> Result<()> {
    let topo = args.topo.topology()?;
    let spec = Spec::load(&args.spec)?;
    let Some(path) = &args.against else {
        if !args.set.is_empty() {
            // Still validate the flags' syntax.
            Config::from_json(None, &args.set)?;
        }
        report_spec(&spec, args.json, out);
        return Ok(());
    };
    let ckpt = Checkpoint::open(path)?;
    let config = Config::from_checkpoint(&ckpt, &args.set)?;
    let res = sharding::resolve(&spec, &ckpt, &config, &topo)?;
    for w in &res.warnings {
        eprintln!("warning: {}", printable(w));
    }
    let held = res
        .tensors
        .iter()
        .filter(|r| matches!(r, Resolved::Held { .. }))
        .count();
    if args.json {
        let tensors: Vec<serde_json::Value> = ckpt
            .tensors()
            .iter()
            .zip(&res.tensors)
            .map(|(t, r)| tensor_json(t, r))
            .collect();
        let v = json!({
            "spec": spec.name,
            "origin": spec.origin,
            "checkpoint": path.display().to_string(),
            "tp": topo.tp, "pp": topo.pp, "dp": topo.dp, "ep": topo.ep,
            "tensors_total": ckpt.tensors().len(),
            "held": held,
            "skipped": ckpt.tensors().len() - held,
            "warnings": res.warnings,
            "tensors": tensors,
        });
        let _ = writeln!(out, "{v:#}");
        return Ok(());
    }
    let _ = writeln!(
        out,
        "{}: ok on {} ({} tensors: {held} held, {} skipped; {} warning(s))",
        printable(&spec.origin),
        printable(&path.to_string_lossy()),
        ckpt.tensors().len(),
        ckpt.tensors().len() - held,
        res.warnings.len()
    );
    let show_placement =
        topo.tp > 1 || topo.pp > 1 || topo.dp > 1 || topo.ep > 1 || topo.pp_layers.is_some();
    if show_placement {
        let _ = writeln!(
            out,
            "placement for tp={} pp={} dp={} ep={}:",
            topo.tp, topo.pp, topo.dp, topo.ep
        );
        for (t, r) in ckpt.tensors().iter().zip(&res.tensors) {
            print_placement(t, r, out);
        }
    }
    Ok(())
}

/// `spec check` without a checkpoint: the spec parsed and what it declares.
fn report_spec(spec: &Spec, as_json: bool, out: &mut Vec<u8>) {
    if as_json {
        let v = json!({
            "spec": spec.name,
            "origin": spec.origin,
            "architectures": spec.architectures,
            "rules": spec.rule_count(),
            "ok": true,
        });
        let _ = writeln!(out, "{v:#}");
    } else {
        let _ = writeln!(
            out,
            "{}: ok ({} rules; architectures: {})",
            printable(&spec.origin),
            spec.rule_count(),
            if spec.architectures.is_empty() {
                "none declared".to_string()
            } else {
                spec.architectures.join(", ")
            }
        );
    }
}

/// One tensor's entry in `spec check --json`: name, dtype, shape and where it goes.
fn tensor_json(t: &TensorInfo, r: &Resolved) -> serde_json::Value {
    let mut v = json!({"name": t.name, "dtype": t.dtype.to_string(), "shape": t.shape});
    match r {
        Resolved::Skip { reason } => v["skip"] = json!(reason),
        Resolved::Held {
            stages,
            shards,
            kind,
            replicated,
        } => {
            v["stages"] = json!(stages);
            v["kind"] = json!(format!("{kind:?}").to_lowercase());
            v["replicated"] = json!(replicated);
            match shards {
                Shards::PerTp(ls) => {
                    v["tp"] = ls
                        .iter()
                        .enumerate()
                        .map(|(r, l)| json!({"tp_rank": r, "shape": l.shape, "concat_dim": l.concat_dim, "pieces": pieces_json(l)}))
                        .collect();
                }
                Shards::Expert {
                    expert,
                    owner,
                    layout,
                } => {
                    v["expert"] = json!({"id": expert, "ep_rank": owner, "shape": layout.shape, "pieces": pieces_json(layout)});
                }
            }
        }
    }
    v
}

/// One tensor's lines of the text placement: skipped with its reason, the layout every tp
/// rank holds, each tp rank's layout, or the expert and its ep rank.
fn print_placement(t: &TensorInfo, r: &Resolved, out: &mut Vec<u8>) {
    let shape = dims(&t.shape);
    let (stages, shards, kind, replicated) = match r {
        Resolved::Skip { reason } => {
            let _ = writeln!(
                out,
                "{}  {} {shape}  skip: {}",
                printable(&t.name),
                t.dtype,
                printable(reason)
            );
            return;
        }
        Resolved::Held {
            stages,
            shards,
            kind,
            replicated,
        } => (stages, shards, kind, replicated),
    };
    let st = stages
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let kind = format!("{kind:?}").to_lowercase();
    match shards {
        Shards::PerTp(ls) if *replicated => {
            let l = ls.first().map(describe).unwrap_or_default();
            let _ = writeln!(
                out,
                "{}  {} {shape}  stage {st}  {kind}  every tp rank: {l}",
                printable(&t.name),
                t.dtype
            );
        }
        Shards::PerTp(ls) => {
            let _ = writeln!(
                out,
                "{}  {} {shape}  stage {st}  {kind}",
                printable(&t.name),
                t.dtype
            );
            for (i, l) in ls.iter().enumerate() {
                let _ = writeln!(out, "    tp {i}: {}", describe(l));
            }
        }
        Shards::Expert {
            expert,
            owner,
            layout,
        } => {
            let _ = writeln!(
                out,
                "{}  {} {shape}  stage {st}  {kind}  expert {expert} on ep rank {owner}: {}",
                printable(&t.name),
                t.dtype,
                describe(layout)
            );
        }
    }
}

fn dims(shape: &[u64]) -> String {
    format!(
        "[{}]",
        shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `[64, 128] = [0:64, :] ++ zeros(24)`.
fn describe(l: &Layout) -> String {
    let pieces: Vec<String> = l
        .pieces
        .iter()
        .map(|p| match p {
            Piece::Slice { ranges } => format!(
                "[{}]",
                ranges
                    .iter()
                    .map(|(a, b)| format!("{a}:{b}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Piece::Zeros { extent } => format!("zeros({extent})"),
        })
        .collect();
    let body = if pieces.is_empty() {
        "nothing".to_string()
    } else {
        pieces.join(" ++ ")
    };
    if l.pieces.len() > 1 {
        format!("{} = {body} along dim {}", dims(&l.shape), l.concat_dim)
    } else {
        format!("{} = {body}", dims(&l.shape))
    }
}

fn pieces_json(l: &Layout) -> serde_json::Value {
    l.pieces
        .iter()
        .map(|p| match p {
            Piece::Slice { ranges } => {
                json!({"slice": ranges.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>()})
            }
            Piece::Zeros { extent } => json!({"zeros": extent}),
        })
        .collect()
}
