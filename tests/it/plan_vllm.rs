//! Per-rank bytes of `safeshard plan --json` equal what vLLM holds, per the independent
//! reference in tests/common/vllm_ref.rs, for every shipped architecture under several
//! topologies, and on a DeepSeek-V3-scale sparse checkpoint. Rank-local shapes are checked
//! tensor by tensor as well.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::vllm_ref::{expected, local_bytes, local_shape};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;

fn plan_json(dir: &Path, topo: &Topology) -> Result<serde_json::Value, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_safeshard"));
    cmd.arg("plan").arg(dir).arg("--json");
    for (flag, v) in [
        ("--tp", topo.tp),
        ("--pp", topo.pp),
        ("--dp", topo.dp),
        ("--ep", topo.ep),
    ] {
        cmd.arg(flag).arg(v.to_string());
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap())
}

/// Compares one checkpoint under one topology: `Ok(true)` when both accept it and agree,
/// `Ok(false)` when both refuse it, else a description of the first mismatch.
fn compare(
    opts: &SynthOptions,
    dir: &Path,
    topo: &Topology,
    per_tensor: bool,
) -> Result<bool, String> {
    let list = synth::tensors(opts).map_err(|e| e.to_string())?;
    let world = topo.tp * topo.pp * topo.dp;
    let mut want_bytes = vec![0u64; world];
    // rank → name → (shape, bytes)
    let mut want: Vec<BTreeMap<String, (Vec<u64>, u64)>> = vec![BTreeMap::new(); world];
    let mut ref_err = None;
    for (name, dtype, shape) in &list {
        match expected(&opts.config, topo, name, *dtype, shape) {
            Ok(holders) => {
                for (rank, s) in holders {
                    let b = local_bytes(*dtype, shape, &s);
                    want_bytes[rank] += b;
                    if per_tensor {
                        want[rank].insert(name.clone(), (local_shape(shape, &s), b));
                    }
                }
            }
            Err(e) => {
                ref_err = Some(e);
                break;
            }
        }
    }
    let got = plan_json(dir, topo);
    let v = match (ref_err, got) {
        // Both refuse the topology (a split that does not divide): agreed.
        (Some(_), Err(_)) => return Ok(false),
        (Some(e), Ok(_)) => return Err(format!("vLLM reference refuses ({e}) but plan accepts")),
        (None, Err(e)) => return Err(format!("plan refuses: {e}")),
        (None, Ok(v)) => v,
    };
    let ranks = v["ranks"].as_array().ok_or("no ranks")?;
    if ranks.len() != world {
        return Err(format!("{} ranks, want {world}", ranks.len()));
    }
    for (r, rank) in ranks.iter().enumerate() {
        let bytes = rank["bytes"].as_u64().unwrap();
        if per_tensor {
            let mut got: BTreeMap<String, (Vec<u64>, u64)> = BTreeMap::new();
            for t in rank["tensors"].as_array().unwrap() {
                let shape = t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect();
                got.insert(
                    t["name"].as_str().unwrap().to_string(),
                    (shape, t["bytes"].as_u64().unwrap()),
                );
            }
            for (name, w) in &want[r] {
                match got.get(name) {
                    Some(g) if g == w => {}
                    Some(g) => return Err(format!("rank {r} {name}: plan {g:?}, vLLM {w:?}")),
                    None => return Err(format!("rank {r} lacks {name}")),
                }
            }
            for name in got.keys() {
                if !want[r].contains_key(name) {
                    return Err(format!("rank {r} holds {name}, vLLM does not"));
                }
            }
        }
        if bytes != want_bytes[r] {
            return Err(format!(
                "rank {r}: plan {bytes} bytes, vLLM {}",
                want_bytes[r]
            ));
        }
    }
    Ok(true)
}

#[test]
fn tiny_presets_match_vllm() {
    // Every shipped architecture's tiny presets, and a tied and an untied variant.
    let mut presets = common::tiny_presets();
    presets.extend(["llama-tiny-tied", "qwen2-tiny-untied"]);
    // (tp, pp, dp, ep)
    let topos = [
        (1, 1, 1, 1),
        (2, 1, 1, 1),
        (4, 1, 1, 1),
        (2, 2, 1, 1),
        (1, 2, 1, 1),
        (2, 1, 2, 1),
        (4, 2, 1, 1),
        (2, 1, 2, 4),
        (4, 1, 1, 4),
        (2, 2, 2, 4),
        (8, 1, 1, 1),
        (3, 1, 1, 1),
    ];
    let mut failures = Vec::new();
    let mut compared = 0;
    let mut refused = 0;
    for preset in presets {
        let opts = SynthOptions::preset(preset).unwrap();
        let dir = tempfile::tempdir().unwrap();
        synth::write_checkpoint(dir.path(), &opts).unwrap();
        for &(tp, pp, dp, ep) in &topos {
            let Ok(topo) = Topology::new(tp, pp, dp, ep) else {
                continue;
            };
            // Expert parallelism only for MoE architectures.
            if ep > 1 && !common::is_moe(&opts.config) {
                continue;
            }
            match compare(&opts, dir.path(), &topo, true) {
                Ok(true) => compared += 1,
                Ok(false) => refused += 1,
                Err(e) => failures.push(format!("{preset} tp={tp} pp={pp} dp={dp} ep={ep}: {e}")),
            }
        }
    }
    // Most topologies are valid for the tiny presets; tp = 3 and some tp = 8 are refused.
    assert!(
        compared >= 70 && refused >= 10,
        "compared {compared}, refused by both {refused}"
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn deepseek_v3_scale_matches_vllm() {
    let opts = SynthOptions::preset("deepseek-v3")
        .unwrap()
        .with_sparse(true);
    let dir = tempfile::tempdir().unwrap();
    synth::write_checkpoint(dir.path(), &opts).unwrap();
    for (tp, pp, dp, ep) in [(8, 8, 1, 1), (8, 4, 2, 16)] {
        let topo = Topology::new(tp, pp, dp, ep).unwrap();
        compare(&opts, dir.path(), &topo, false)
            .unwrap_or_else(|e| panic!("tp={tp} pp={pp} dp={dp} ep={ep}: {e}"));
    }
}
