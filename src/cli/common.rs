//! Flags shared by every subcommand that plans, and the steps they share.

use std::path::Path;

use crate::plan::Plan;
use crate::sharding::Resolution;
use crate::{Checkpoint, Job, Result, Topology};

/// Topology flags (`--tp --pp --dp --ep --pp-layers`), shared by the planning subcommands
/// and `spec check`.
#[derive(clap::Args, Debug, Clone)]
pub struct TopologyFlags {
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Pipeline-parallel size (stages).
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Data-parallel size (replicas).
    #[arg(long, default_value_t = 1)]
    pub dp: usize,
    /// Expert-parallel size: 1, or tp × dp for whole experts per rank (vLLM).
    #[arg(long, default_value_t = 1)]
    pub ep: usize,
    /// Explicit layers per stage, e.g. `15,15,16,15` (like VLLM_PP_LAYER_PARTITION).
    #[arg(long, value_delimiter = ',')]
    pub pp_layers: Option<Vec<usize>>,
}

impl TopologyFlags {
    /// The topology the flags describe, validated.
    pub fn topology(&self) -> Result<Topology> {
        let topo = Topology {
            tp: self.tp,
            pp: self.pp,
            dp: self.dp,
            ep: self.ep,
            pp_layers: self.pp_layers.clone(),
        };
        topo.validate()?;
        Ok(topo)
    }
}

/// Topology and spec flags (`--tp --pp --dp --ep --pp-layers --spec --set`).
#[derive(clap::Args, Debug, Clone)]
pub struct PlanFlags {
    /// Topology flags.
    #[command(flatten)]
    pub topo: TopologyFlags,
    /// Sharding spec: a shipped name (`safeshard spec list`) or a `.shard` file; default:
    /// detected from config.json `architectures`.
    #[arg(long)]
    pub spec: Option<String>,
    /// Override a config.json value, e.g. `--set num_key_value_heads=8` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// The parts of a [`Job`] that the loading subcommands keep beside its plan (see [`split`]).
pub struct Prepared {
    /// The checkpoint catalog.
    pub ckpt: Checkpoint,
    /// Resolved placements.
    pub resolution: Resolution,
}

/// A job split into its plan and the parts verification needs.
pub fn split(job: Job) -> (Prepared, Plan) {
    let Job {
        ckpt,
        resolution,
        plan,
        ..
    } = job;
    (Prepared { ckpt, resolution }, plan)
}

impl PlanFlags {
    /// The topology the flags describe, validated.
    pub fn topology(&self) -> Result<Topology> {
        self.topo.topology()
    }

    /// The one place where the planning flags meet the library: a [`Job`] (open, spec,
    /// resolve, plan) for `checkpoint`, its warnings printed.
    pub fn job(&self, checkpoint: &Path) -> Result<Job> {
        self.job_named(checkpoint, crate::TensorNames::Checkpoint)
    }

    /// [`PlanFlags::job`] with the names the ranks hold.
    pub fn job_named(&self, checkpoint: &Path, names: crate::TensorNames) -> Result<Job> {
        let mut builder = Job::builder(checkpoint)
            .topology(self.topology()?)
            .names(names);
        if let Some(spec) = &self.spec {
            builder = builder.spec(spec.clone());
        }
        for kv in &self.set {
            builder = builder.set(kv.clone());
        }
        let job = builder.open()?;
        for w in job.warnings() {
            eprintln!("warning: {}", printable(w));
        }
        Ok(job)
    }
}

/// Human-readable byte size (binary units): `512 B`, `1.50 KiB`, `3.25 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

/// `s` with control characters escaped (`\n`, `\u{1b}`), so a name from a file cannot break
/// table lines or send terminal escape sequences; the library's one escaping rule.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    crate::error::escape_controls(s)
}
