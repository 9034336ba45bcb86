//! The shipped architectures, built at compile time from the files in `shard-specs/`
//! (build.rs): one entry per `NAME.shard`, with its vLLM name map (`NAME.vllm.json`) and
//! its synthetic checkpoint layout (`NAME.synth.json`) when they exist beside it.
//!
//! Every list of architectures in the crate and its tests comes from here: adding an
//! architecture is adding files (docs/spec-language.md, "Adding an architecture").

/// One shipped architecture: the texts of its files, embedded in the binary.
#[derive(Clone, Copy, Debug)]
pub struct Shipped {
    /// The spec's name: the file stem (`llama` for `llama.shard`).
    pub name: &'static str,
    /// `NAME.shard`.
    pub spec: &'static str,
    /// `NAME.vllm.json`, if shipped.
    pub vllm_map: Option<&'static str>,
    /// `NAME.synth.json`, if shipped.
    pub synth: Option<&'static str>,
}

include!(concat!(env!("OUT_DIR"), "/registry.rs"));

/// Every shipped architecture, in name order.
pub fn all() -> &'static [Shipped] {
    SHIPPED
}

/// The shipped architecture named `name` (a spec name such as `qwen2_moe`).
pub fn get(name: &str) -> Option<&'static Shipped> {
    SHIPPED.iter().find(|s| s.name == name)
}

/// Every synthetic preset (the `presets` of each `NAME.synth.json`) with its entry's name.
#[cfg(feature = "synth")]
pub(crate) fn presets() -> &'static [(&'static str, &'static str)] {
    PRESETS
}
