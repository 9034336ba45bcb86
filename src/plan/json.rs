//! The plan as one JSON document: what `safeshard plan --json` prints and what the Python
//! binding's `Plan.to_json()` returns (one renderer for both fronts).

use serde::Serialize;

use super::Plan;

#[derive(Serialize)]
struct JsonPlan<'a> {
    world_size: usize,
    tp: usize,
    pp: usize,
    dp: usize,
    ep: usize,
    spec: &'a str,
    hash: String,
    ranks: Vec<JsonRank<'a>>,
}

#[derive(Serialize)]
struct JsonRank<'a> {
    rank: usize,
    tp_rank: usize,
    pp_rank: usize,
    dp_rank: usize,
    ep_rank: usize,
    bytes: u64,
    read_bytes: u64,
    staging_bytes: u64,
    tensors: Vec<JsonTensor<'a>>,
}

#[derive(Serialize)]
struct JsonTensor<'a> {
    name: &'a str,
    dtype: &'static str,
    shape: &'a [u64],
    bytes: u64,
}

/// The plan's JSON document (one line, no newline): world size, topology, spec, hash, and per
/// rank its coordinates, byte counts and tensors (name, dtype, rank-local shape, bytes).
pub fn json_document(plan: &Plan) -> String {
    let t = &plan.topology;
    let doc = JsonPlan {
        world_size: plan.ranks.len(),
        tp: t.tp,
        pp: t.pp,
        dp: t.dp,
        ep: t.ep,
        spec: &plan.spec,
        hash: plan.hash_hex(),
        ranks: plan
            .ranks
            .iter()
            .map(|r| JsonRank {
                rank: r.coords.rank,
                tp_rank: r.coords.tp_rank,
                pp_rank: r.coords.pp_rank,
                dp_rank: r.coords.dp_rank,
                ep_rank: r.coords.ep_rank,
                bytes: r.bytes,
                read_bytes: r.read_bytes,
                staging_bytes: r.staging_bytes,
                tensors: r
                    .tensors
                    .iter()
                    .map(|t| JsonTensor {
                        name: &t.name,
                        dtype: t.dtype.name(),
                        shape: &t.shape,
                        bytes: t.bytes,
                    })
                    .collect(),
            })
            .collect(),
    };
    // Plain structs of strings and integers: serializing cannot fail.
    serde_json::to_string(&doc).unwrap_or_default()
}
