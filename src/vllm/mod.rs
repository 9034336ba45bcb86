//! vLLM's view of a job: everything safeshard knows about vLLM lives here.
//!
//! - [`map`]: the name maps (`shard-specs/<spec>.vllm.json`), data next to the specs;
//! - [`transform`]: a plan with checkpoint names → one whose ranks hold vLLM's
//!   `model.state_dict()` entries.

pub mod map;
pub mod transform;

pub use transform::TensorNames;
