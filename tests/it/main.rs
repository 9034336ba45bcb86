//! The integration tests: one crate (one link of the library) with a module per area.
//! `common` and `checkpoint_support` are shared fixtures and independent references.

mod checkpoint_support;
mod common;

mod checkpoint_index;
mod checkpoint_malformed;
mod checkpoint_open;
mod checkpoint_props;
mod comm_cli;
mod comm_share;
mod inspect_cli;
mod load_cli;
mod load_scattered;
mod load_truncate;
mod plan_build;
mod plan_cli;
mod plan_props;
mod plan_vllm;
mod reshard_roundtrip;
mod robustness_cli;
mod robustness_fuzz;
mod robustness_limits;
mod robustness_spec_fuzz;
mod slice_requests;
mod spec_cli;
mod spec_parse;
mod spec_props;
mod spec_resolve;
mod spec_robustness;
mod spec_vllm;
mod spec_vllm_ref;
mod synth_generator;
mod synth_spec_vs_ref;
mod synth_vllm_ref;
mod vllm_names;
