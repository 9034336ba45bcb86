//! safeshard loads safetensors checkpoints into tensor-, pipeline-, data- and
//! expert-parallel jobs so that every rank reads only the bytes it needs.
//!
//! The crate follows the flow of data, and a lower layer never imports a higher one:
//!
//! 1. [`checkpoint`] opens a checkpoint (one file, an index, or a directory), validates every
//!    header strictly and builds a [`checkpoint::Checkpoint`] catalog without reading tensor data.
//! 2. [`sharding`] is the sharding spec language: it maps tensor names to TP/PP/EP placements and
//!    resolves them, for a [`topology::Topology`], into per-rank [`sharding::Layout`]s.
//! 3. [`plan`] is the coordinator: it turns layouts into exact byte-range copy runs per rank.
//! 4. [`load`] is the rank engine: it maps only the planned windows and copies them in parallel.
//! 5. [`comm`] is transport: communicators (threads, MPI, NCCL), launchers, agreement.
//! 6. [`dist`] loads a job's ranks together: share modes that read shared bytes once and move
//!    them over a communicator, returning the same [`load::RankTensors`] as a local load.
//!
//! [`synth`] writes synthetic Hugging Face-layout checkpoints for tests, demos and benchmarks.
#![deny(missing_docs)]

pub mod checkpoint;
pub mod comm;
pub mod dist;
pub mod error;
pub mod load;
pub mod plan;
pub mod sharding;
pub mod synth;
pub mod topology;

pub use error::{Error, Result};
