//! `safeshard reshard`: flags in, [`crate::reshard`] does the work, one line out.

use std::path::PathBuf;

use crate::reshard::MANIFEST;
use crate::{ReshardOptions, Result, TensorNames};

use super::common::{human_bytes, printable, PlanFlags};
use super::load::parse_size;

/// Arguments of `safeshard reshard`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either.
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub plan: PlanFlags,
    /// Output directory (created if needed); it must not be, contain or lie inside the
    /// checkpoint's directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Largest part file (tensor data), e.g. `5GB`, `500MiB`; a larger tensor gets a part of
    /// its own.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    pub max_shard_size: u64,
    /// `checkpoint`: checkpoint tensor names, one file set per global rank; `vllm`: what vLLM's
    /// `sharded_state` loader reads (its state_dict names, fused and stacked parameters,
    /// buffers, per-(pp, tp) file names, config.json and tokenizer files beside them).
    #[arg(long, default_value = "checkpoint", value_parser = ["checkpoint", "vllm"])]
    pub format: String,
}

/// Runs `safeshard reshard`.
pub fn run(args: Args) -> Result<()> {
    let format: TensorNames = args.format.parse()?;
    let job = args.plan.job_named(&args.checkpoint, format)?;
    let done = job.reshard(
        &args.out,
        &ReshardOptions {
            max_shard_size: args.max_shard_size,
            format,
            ..ReshardOptions::default()
        },
    )?;
    println!(
        "wrote {} files ({}) for {} ranks and {MANIFEST} to {}",
        done.files,
        human_bytes(done.bytes),
        done.ranks,
        printable(&args.out.to_string_lossy())
    );
    Ok(())
}
