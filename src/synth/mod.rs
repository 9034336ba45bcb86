//! Synthetic Hugging Face-layout checkpoints for tests, examples, benchmarks and `safeshard demo`.
//!
//! [`write_checkpoint`] writes `config.json`, sharded `.safetensors` files and
//! `model.safetensors.index.json` with the tensor names and shapes of a chosen architecture,
//! filled with deterministic values ([`fill`]), or, in sparse mode, with file holes so that
//! 70B–671B-parameter layouts can be planned without using disk.
//!
//! Every architecture of the spec registry with a `shard-specs/NAME.synth.json` can be
//! written: that file lists the tensors of its Hugging Face checkpoint (names, shapes as
//! expressions over config.json, loops over layers and experts) and its named presets.
//! Shapes come from the `config.json` of the options ([`SynthOptions::preset`] gives named
//! ones); [`tensors`] lists what would be written without writing anything. Values are a
//! counter-based hash of (seed, tensor name, byte position), so any byte of any tensor can be
//! recomputed by tests without reading the file and independently of how files are split.
//!
//! Files are split like Hugging Face's `max_shard_size` (greedy, in tensor order, a tensor
//! larger than the limit alone in its file), named `model-0000k-of-0000N.safetensors`, with
//! headers padded with spaces to a multiple of 8 like the reference writer. One file is
//! `model.safetensors` with no index. Every file is written under a temporary name and
//! renamed when complete.

mod layout;
mod presets;
mod writer;

use std::path::Path;

use crate::checkpoint::Dtype;
use crate::sharding::{registry, Spec};
use crate::{Error, Result};

pub use crate::sharding::registry::PRESET_NAMES as PRESETS;
pub use writer::{plan_files, SynthFile};

use layout::Layout;

/// One tensor of a synthetic checkpoint: name, dtype, shape.
pub type TensorSpec = (String, Dtype, Vec<u64>);

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// The shipped architecture whose checkpoint layout is written: a spec name of the
    /// registry (`llama` serves Llama and Mistral, `qwen2_moe`, ...), whose
    /// `shard-specs/NAME.synth.json` lists the tensors.
    pub arch: &'static str,
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

/// The layout of a shipped architecture (`shard-specs/NAME.synth.json`).
fn layout(arch: &str) -> Result<Layout> {
    let src = registry::get(arch)
        .and_then(|s| s.synth)
        .ok_or_else(|| Error::Unsupported {
            what: format!("synthetic checkpoints of `{arch}`"),
            why: format!("no layout is shipped (shard-specs/{arch}.synth.json)"),
        })?;
    Layout::parse(src, &format!("{arch}.synth.json"))
}

/// The weight dtype a config's `torch_dtype` names (BF16 when absent).
fn dtype_of(config: &serde_json::Value) -> Result<Dtype> {
    match config.get("torch_dtype").and_then(|d| d.as_str()) {
        None | Some("bfloat16") => Ok(Dtype::BF16),
        Some("float16") => Ok(Dtype::F16),
        Some("float32") => Ok(Dtype::F32),
        Some(other) => Err(Error::config(
            "torch_dtype",
            format!("{other:?} is not one synth writes (bfloat16, float16 or float32)"),
        )),
    }
}

impl SynthOptions {
    /// Options of a named shape; see [`PRESETS`] (the `presets` of every
    /// `shard-specs/NAME.synth.json`). Tiny presets (`llama-tiny`, `qwen2-tiny`, ...) have a
    /// few layers, hidden sizes of 64–256, vocab sizes that are not multiples of 64 and fewer
    /// kv heads than heads; real-size ones (`llama3-8b`, `llama3.1-405b`, `mixtral-8x7b`,
    /// `deepseek-v3`, `gpt2`, `distilgpt2`) have the published shapes and are meant to be
    /// written sparse. A `-tied` or `-untied` suffix sets `tie_word_embeddings`.
    /// `llama-tiny` also carries `rotary_emb.inv_freq` buffers, as some real checkpoints do;
    /// `llama-tiny-gptq` and `llama-tiny-awq` are int4 weight-only quantized (group 32).
    pub fn preset(name: &str) -> Result<SynthOptions> {
        presets::preset(name)
    }

    /// Options for an existing `config.json`: the architecture from `architectures` (the
    /// shipped spec that declares it), the weight dtype from `torch_dtype` (BF16 when
    /// absent), 5 GB files, dense, seed 0.
    pub fn from_config(config: serde_json::Value) -> Result<SynthOptions> {
        let names: Vec<&str> = config
            .get("architectures")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let mut known = Vec::new();
        let mut arch = None;
        for s in registry::all().iter().filter(|s| s.synth.is_some()) {
            let spec = Spec::shipped(s.name)?;
            if arch.is_none()
                && names
                    .iter()
                    .any(|n| spec.architectures.iter().any(|a| a == n))
            {
                arch = Some(s.name);
            }
            known.extend(spec.architectures);
        }
        let arch = arch.ok_or_else(|| {
            Error::config(
                "architectures",
                format!(
                    "{names:?} names no architecture synth knows (known: {})",
                    known.join(", ")
                ),
            )
        })?;
        Ok(SynthOptions {
            arch,
            dtype: dtype_of(&config)?,
            config,
            max_file_bytes: 5_000_000_000,
            sparse: false,
            seed: 0,
        })
    }

    /// Sets the number of decoder layers (the layout's `layers` key: `num_hidden_layers`, or
    /// `n_layer` for GPT-2).
    pub fn with_layers(mut self, layers: u64) -> Self {
        let key = self.layers_key();
        if let Some(c) = self.config.as_object_mut() {
            c.insert(key, layers.into());
        }
        self
    }

    /// Sets `tie_word_embeddings` (a tied checkpoint has no `lm_head.weight`).
    pub fn with_tied(mut self, tied: bool) -> Self {
        if let Some(c) = self.config.as_object_mut() {
            c.insert("tie_word_embeddings".into(), tied.into());
        }
        self
    }

    /// Sets sparse mode.
    pub fn with_sparse(mut self, sparse: bool) -> Self {
        self.sparse = sparse;
        self
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the maximum file size.
    pub fn with_max_file_bytes(mut self, bytes: u64) -> Self {
        self.max_file_bytes = bytes;
        self
    }

    /// Number of main-model decoder layers from the config.
    pub fn layers(&self) -> Result<u64> {
        let key = self.layers_key();
        match self.config.get(&key) {
            Some(v) => v.as_u64().ok_or_else(|| {
                Error::config(&key, format!("must be a non-negative integer, got {v}"))
            }),
            None => Err(Error::config(key, "is missing from the config")),
        }
    }

    fn layers_key(&self) -> String {
        layout(self.arch).map_or_else(|_| "num_hidden_layers".into(), |l| l.layers_key)
    }
}

/// Lists the tensors `write_checkpoint` would write for `opts`, in Hugging Face order,
/// without writing anything. Errors name a missing or malformed config field.
pub fn tensors(opts: &SynthOptions) -> Result<Vec<TensorSpec>> {
    layout(opts.arch)?.list(&opts.config, opts.dtype)
}

/// Byte size of a tensor of `dtype` and `shape`, or an error if it overflows or is not whole bytes.
///
/// The reader's own rule (`checkpoint` header validation), so that synth never writes a shape
/// the reader would refuse.
pub fn tensor_bytes(name: &str, dtype: Dtype, shape: &[u64]) -> Result<u64> {
    crate::checkpoint::tensor_bytes(dtype, shape).map_err(|why| Error::Unsupported {
        what: format!("synthetic tensor {name:?}"),
        why: format!("{dtype} {shape:?} has no whole byte size ({why})"),
    })
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The per-tensor key of [`fill`]: FNV-1a of the name mixed with the seed.
fn tensor_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h ^ mix(seed.wrapping_add(GOLDEN)))
}

/// The 8-byte word `i` of a tensor's contents (splitmix64 of key + i × golden ratio).
#[inline]
fn word(key: u64, i: u64) -> [u8; 8] {
    mix(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GOLDEN))).to_le_bytes()
}

/// Deterministic contents: writes into `out` the bytes `start..start + out.len()` of the
/// tensor `name` for `seed`. Independent of dtype and file layout, so tests can recompute
/// any byte of any tensor.
///
/// Byte `b` of a tensor is byte `b % 8` (little-endian) of splitmix64 word `b / 8`, whose
/// stream is keyed by a hash of (seed, name).
pub fn fill(seed: u64, name: &str, start: u64, out: &mut [u8]) {
    let key = tensor_key(seed, name);
    let mut done = 0usize;
    let head = (start % 8) as usize;
    if head != 0 {
        let w = word(key, start / 8);
        for (o, b) in out.iter_mut().zip(w.iter().skip(head)) {
            *o = *b;
            done += 1;
        }
    }
    // After a partial head the next byte starts a word (no overflow near u64::MAX).
    let mut i = (start / 8).wrapping_add(u64::from(head != 0));
    let rest = out.get_mut(done..).unwrap_or_default();
    let mut chunks = rest.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&word(key, i));
        i = i.wrapping_add(1);
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let w = word(key, i);
        for (o, b) in tail.iter_mut().zip(w.iter()) {
            *o = *b;
        }
    }
}

/// The whole contents of a tensor of `len` bytes (see [`fill`]).
pub fn tensor_data(seed: u64, name: &str, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, name, 0, &mut v);
    v
}

/// Writes a checkpoint into `dir` (created if needed) and returns the number of tensors written.
pub fn write_checkpoint(dir: &Path, opts: &SynthOptions) -> Result<usize> {
    writer::write(dir, opts)
}

/// The smallest `max_file_bytes` for which `opts` is split into at most `files` files
/// (binary search over the greedy split; exactly `files` when tensors are small enough).
pub fn shard_size_for_files(opts: &SynthOptions, files: usize) -> Result<u64> {
    let list = tensors(opts)?;
    let sizes = list
        .iter()
        .map(|(n, d, s)| tensor_bytes(n, *d, s))
        .collect::<Result<Vec<u64>>>()?;
    let total: u64 = sizes.iter().sum();
    let count = |max: u64| writer::split_sizes(&sizes, max).len();
    let (mut lo, mut hi) = (1u64, total.max(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if count(mid) <= files {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}
