//! safeshard loads safetensors checkpoints into tensor-, pipeline-, data- and
//! expert-parallel jobs so that every rank reads only the bytes it needs.
//!
//! # The entry point
//!
//! A [`Job`] does open → spec → resolve → plan once; then any rank can be loaded
//! ([`Job::load_rank`]), checked against an independent slow path ([`Job::verify`]) or the
//! whole job written out as vLLM `sharded_state` files ([`Job::reshard`]). Everything a
//! trainer needs is re-exported here; errors are one typed [`Error`].
//!
//! ```
//! # fn main() -> safeshard::Result<()> {
//! use safeshard::{Job, LoadOptions, Topology};
//! # let dir = tempfile::tempdir().map_err(|e| safeshard::Error::io("tmp", e))?;
//! # let opts = safeshard::synth::SynthOptions::preset("llama-tiny")?;
//! # safeshard::synth::write_checkpoint(dir.path(), &opts)?;
//! # let model_dir = dir.path();
//! // tp = 2, pp = 1, dp = 1, ep = 1; the spec is detected from config.json.
//! let job = Job::builder(model_dir).topology(Topology::new(2, 1, 1, 1)?).open()?;
//! let rank = job.load_rank(1, &LoadOptions::default())?;
//! let q = rank.get("model.layers.0.self_attn.q_proj.weight").expect("held by every TP rank");
//! println!("{} {:?} {} bytes", q.dtype, q.shape, q.data.len());
//! assert_eq!(job.verify(&rank)?, rank.len());
//! # Ok(())
//! # }
//! ```
//!
//! # Lower-level modules
//!
//! The crate follows the flow of data, and a lower layer never imports a higher one. Most
//! callers never need these; they are public for tools that work on one step:
//!
//! 1. [`checkpoint`] opens a checkpoint (one file, an index, or a directory), validates every
//!    header strictly and builds a [`Checkpoint`] catalog without reading tensor data.
//! 2. [`sharding`] is the sharding spec language: it maps tensor names to TP/PP/EP placements and
//!    resolves them, for a [`Topology`], into per-rank [`sharding::Layout`]s.
//! 3. [`plan`] is the coordinator: it turns layouts into exact byte-range copy runs per rank.
//! 4. [`load`] is the rank engine: it maps only the planned windows and copies them in parallel.
//! 5. [`vllm`] is everything safeshard knows about vLLM: the name maps, the plan transform to
//!    vLLM's `state_dict()` names ([`TensorNames::Vllm`]) and the finishing of a loaded rank.
//! 6. [`comm`] is transport: communicators (threads, MPI, NCCL), launchers, agreement.
//! 7. [`dist`] loads a job's ranks together: share modes that read shared bytes once and move
//!    them over a communicator, returning the same [`load::RankTensors`] as a local load.
//! 8. [`reshard`] writes a planned job back out as per-rank safetensors files.
//!
//! A trainer whose state dict already says what each rank holds (DTensors) loads it with a
//! [`SliceJob`]: explicit [`SliceRequest`]s instead of a sharding spec, planned and loaded by
//! the same layers.
//!
//! `synth` (feature `synth`, on with the default `cli`) writes synthetic Hugging Face-layout
//! checkpoints for tests, demos and benchmarks.
#![deny(missing_docs)]

pub mod checkpoint;
#[cfg(feature = "cli")]
pub mod cli;
pub mod comm;
pub mod dist;
pub mod error;
mod job;
pub mod load;
pub mod plan;
pub mod reshard;
pub mod sharding;
mod slice_job;
#[cfg(feature = "synth")]
pub mod synth;
pub mod topology;
pub mod vllm;

pub use checkpoint::{Checkpoint, Dtype};
pub use dist::{ShareMode, ShareOptions};
pub use error::{Error, Result};
pub use job::{BufferRank, Job, JobBuilder};
pub use load::{IoMode, LoadOptions, LoadStats, OwnedTensor, RankTensors, TensorRef};
pub use plan::requests::SliceRequest;
pub use reshard::{ReshardOptions, ReshardSummary};
pub use slice_job::{load_collective, SliceJob};
pub use topology::{Coords, Topology};
pub use vllm::TensorNames;
