//! Synthetic Hugging Face-layout checkpoints for tests, examples, benchmarks and `safeshard demo`.
//!
//! [`write_checkpoint`] writes `config.json`, sharded `.safetensors` files and
//! `model.safetensors.index.json` with the tensor names and shapes of a chosen architecture,
//! filled with deterministic values ([`fill`]), or, in sparse mode, with file holes so that
//! 70B–671B-parameter layouts can be planned without using disk.

use std::path::Path;

use crate::checkpoint::Dtype;
use crate::Result;

/// Architectures the generator knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (q/k/v biases).
    Qwen2,
    /// `Phi3ForCausalLM` (fused qkv_proj and gate_up_proj).
    Phi3,
    /// `MixtralForCausalLM` (block_sparse_moe experts w1/w2/w3).
    Mixtral,
    /// `Qwen2MoeForCausalLM` (experts plus a shared expert).
    Qwen2Moe,
    /// `DeepseekV3ForCausalLM` (MLA attention, FP8 block-quantized weights, MTP layer).
    DeepseekV3,
    /// `GPT2LMHeadModel` (Conv1D weights stored [in, out]).
    Gpt2,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Architecture (tensor names).
    pub arch: Arch,
    /// The `config.json` to write; shapes are derived from it (hidden_size, num_hidden_layers, ...).
    pub config: serde_json::Value,
    /// Element type of weights (architectures with quantized weights use their own dtypes).
    pub dtype: Dtype,
    /// Target maximum file size in bytes (files are split like Hugging Face's `max_shard_size`).
    pub max_file_bytes: u64,
    /// Leave tensor data as file holes instead of writing values.
    pub sparse: bool,
    /// Seed of the deterministic values.
    pub seed: u64,
}

/// Deterministic contents: writes into `out` the bytes `start..start + out.len()` of the
/// tensor `name` for `seed`. Independent of dtype and file layout, so tests can recompute
/// any byte of any tensor.
pub fn fill(seed: u64, name: &str, start: u64, out: &mut [u8]) {
    let _ = (seed, name, start, out);
    todo!("issue 2: synth")
}

/// Writes a checkpoint into `dir` (created if needed) and returns the number of tensors written.
pub fn write_checkpoint(dir: &Path, opts: &SynthOptions) -> Result<usize> {
    let _ = (dir, opts);
    todo!("issue 2: synth")
}
