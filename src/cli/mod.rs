//! Command-line interface: argument parsing and output formatting only; the work is in the library.

use clap::{Parser, Subcommand};

mod common;
mod demo;
mod dist;
mod inspect;
mod load;
mod plan;
mod reshard;
mod spec;

/// Load safetensors checkpoints into TP/PP/DP/EP jobs: each rank reads only the bytes it needs.
#[derive(Parser, Debug)]
#[command(name = "safeshard", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `safeshard=debug`.
    #[arg(long, global = true, env = "SAFESHARD_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List a checkpoint's tensors (name, dtype, shape, bytes, file) and totals.
    Inspect(inspect::Args),
    /// List shipped sharding specs or check one.
    #[command(subcommand)]
    Spec(spec::SpecCommand),
    /// Dry run: per-rank memory and reads for a topology, without reading tensor data.
    Plan(plan::Args),
    /// Load one rank, every rank on threads, or (with --share, or under mpirun/srun) every
    /// rank of a job with reads shared between ranks.
    Load(load::Args),
    /// Write each rank's tensors as safetensors files (vLLM sharded_state naming).
    Reshard(reshard::Args),
    /// Old name of `load --share MODE --digest` (hidden; kept so scripts keep working).
    #[command(hide = true)]
    DistLoad(dist::Args),
    /// Write a small Llama-shaped checkpoint, plan it, load all ranks with verification.
    Demo(demo::Args),
}

/// Runs the CLI and returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            let _ = e.print();
            return e.exit_code();
        }
    };
    init_tracing(&cli.log);
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Spec(cmd) => spec::run(cmd),
        Command::Plan(args) => plan::run(args),
        Command::Load(args) => load::run(args),
        Command::Reshard(args) => reshard::run(args),
        Command::Demo(args) => demo::run(args),
        Command::DistLoad(args) => load::run(args.into()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
