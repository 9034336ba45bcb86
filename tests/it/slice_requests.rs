//! Explicit slice requests (`SliceJob`, what `safeshard.load_state_dict` drives) loaded by
//! four rank threads under every share mode, straight into caller buffers. The expected
//! bytes come from the `safetensors` crate (the whole tensor read independently) sliced by
//! a naive element loop.

use safeshard::comm::{run_threads, Communicator};
use safeshard::synth::SynthOptions;
use safeshard::{load_collective, Error, ShareMode, ShareOptions, SliceJob, SliceRequest};

const WORLD: usize = 4;

/// The stored tensors of `dir` as (shape, element bytes, data), read by the safetensors crate.
fn reference(dir: &std::path::Path, name: &str) -> (Vec<u64>, usize, Vec<u8>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        if let Ok(t) = st.tensor(name) {
            let shape = t.shape().iter().map(|&d| d as u64).collect();
            return (shape, t.dtype().bitsize() / 8, t.data().to_vec());
        }
    }
    panic!("{name} not found");
}

/// The local tensor the ranges take, one element at a time.
fn gather(data: &[u8], shape: &[u64], ranges: &[Vec<(u64, u64)>], elem: usize) -> Vec<u8> {
    let globals: Vec<Vec<u64>> = ranges
        .iter()
        .map(|rs| rs.iter().flat_map(|&(b, e)| b..e).collect())
        .collect();
    let total: usize = globals.iter().map(Vec::len).product();
    let mut out = Vec::with_capacity(total * elem);
    for flat in 0..total {
        let (mut rem, mut src, mut stride) = (flat, 0u64, 1u64);
        for d in (0..shape.len()).rev() {
            let n = globals[d].len();
            src += globals[d][rem % n] * stride;
            rem /= n;
            stride *= shape[d];
        }
        out.extend_from_slice(&data[src as usize * elem..][..elem]);
    }
    out
}

/// Rank `r`'s requests: the embedding by rows (uneven: rank 3 short), q_proj by a strided
/// pair of row blocks, o_proj by columns, a norm whole on every rank (replicated), and on
/// even ranks the lm_head under a second name.
fn requests(shapes: &dyn Fn(&str) -> Vec<u64>, r: usize) -> Vec<SliceRequest> {
    let embed = shapes("model.embed_tokens.weight");
    let rows = embed[0].div_ceil(WORLD as u64);
    let (b, e) = (
        (r as u64 * rows).min(embed[0]),
        ((r as u64 + 1) * rows).min(embed[0]),
    );
    let q = shapes("model.layers.0.self_attn.q_proj.weight");
    let blk = q[0] / 8;
    let o = shapes("model.layers.0.self_attn.o_proj.weight");
    let cols = o[1] / WORLD as u64;
    let norm = shapes("model.norm.weight");
    let rr = r as u64;
    let mut v = vec![
        SliceRequest {
            dest: "embed".into(),
            source: "model.embed_tokens.weight".into(),
            ranges: vec![vec![(b, e)], vec![(0, embed[1])]],
        },
        SliceRequest {
            dest: "q".into(),
            source: "model.layers.0.self_attn.q_proj.weight".into(),
            ranges: vec![
                vec![(rr * blk, (rr + 1) * blk), ((rr + 4) * blk, (rr + 5) * blk)],
                vec![(0, q[1])],
            ],
        },
        SliceRequest {
            dest: "o".into(),
            source: "model.layers.0.self_attn.o_proj.weight".into(),
            ranges: vec![vec![(0, o[0])], vec![(rr * cols, (rr + 1) * cols)]],
        },
        SliceRequest::whole("norm", "model.norm.weight", &norm),
    ];
    if r % 2 == 0 {
        let head = shapes("lm_head.weight");
        v.push(SliceRequest::whole("head", "lm_head.weight", &head));
    }
    v
}

#[test]
fn every_share_mode_fills_caller_buffers_with_exactly_the_requested_slices() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions::preset("llama-tiny").unwrap().with_tied(false);
    safeshard::synth::write_checkpoint(dir.path(), &opts).unwrap();
    let job = SliceJob::open(dir.path()).unwrap();
    let shapes = |n: &str| job.checkpoint().tensor(n).unwrap().shape.clone();
    let mut reads = Vec::new();
    for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
        let share = ShareOptions {
            mode,
            round_bytes: 64 << 10,
            ..ShareOptions::default()
        };
        let results = run_threads(WORLD, |comm| {
            let reqs = requests(&shapes, comm.rank());
            let plan = job.plan(std::slice::from_ref(&reqs)).unwrap();
            // Every tensor but the norm into its own buffer; the norm stays in the arena.
            let mut bufs: Vec<(String, Vec<u8>)> = plan.ranks()[0]
                .tensors()
                .iter()
                .filter(|t| t.name != "norm")
                .map(|t| (t.name.clone(), vec![0xA5u8; t.bytes as usize]))
                .collect();
            let mut into: Vec<(&str, &mut [u8])> = bufs
                .iter_mut()
                .map(|(n, b)| (n.as_str(), &mut b[..]))
                .collect();
            let (rest, _) = job.load_collective(comm, &reqs, &share, &mut into)?;
            let norm = rest.get("norm").map(|t| t.data.to_vec());
            assert_eq!(rest.len(), 1, "only the norm stays in the arena");
            Ok((bufs, norm, rest.stats().read_bytes))
        });
        let mut total_read = 0;
        for (r, res) in results.into_iter().enumerate() {
            let (bufs, norm, read) = res.unwrap();
            total_read += read;
            for req in requests(&shapes, r) {
                let (shape, elem, data) = reference(dir.path(), &req.source);
                let want = gather(&data, &shape, &req.ranges, elem);
                let got = match bufs.iter().find(|(n, _)| *n == req.dest) {
                    Some((_, b)) => b.clone(),
                    None => norm.clone().unwrap(),
                };
                assert!(got == want, "{mode}: rank {r}: {} differs", req.dest);
            }
        }
        reads.push(total_read);
    }
    // Read-once reads every needed byte once; none reads the replicated ones on every rank.
    assert!(reads[2] < reads[0], "bytes read per mode: {reads:?}");
}

#[test]
fn a_failure_on_one_rank_fails_every_rank_before_any_buffer_is_written() {
    let dir = tempfile::tempdir().unwrap();
    safeshard::synth::write_checkpoint(dir.path(), &SynthOptions::preset("llama-tiny").unwrap())
        .unwrap();
    let job = SliceJob::open(dir.path()).unwrap();
    let norm = job
        .checkpoint()
        .tensor("model.norm.weight")
        .unwrap()
        .shape
        .clone();
    for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
        let share = ShareOptions {
            mode,
            ..ShareOptions::default()
        };
        // Rank 1 failed its own checks; rank 2 asks for a tensor the checkpoint lacks.
        let results = run_threads(WORLD, |comm| {
            let r = comm.rank();
            let source = if r == 2 {
                "model.nope"
            } else {
                "model.norm.weight"
            };
            let reqs = vec![SliceRequest::whole("norm", source, &norm)];
            let mut buf = vec![0xA5u8; (norm[0] * 2) as usize];
            let res = {
                let mut into = [("norm", &mut buf[..])];
                let j = if r == 1 {
                    Err(Error::plan_tensor("x", "shape mismatch"))
                } else {
                    Ok(&job)
                };
                load_collective(j, comm, &reqs, &share, &mut into).map(|_| ())
            };
            Ok((res.err().map(|e| e.to_string()), buf))
        });
        for (r, res) in results.into_iter().enumerate() {
            let (err, buf) = res.unwrap();
            let err = err.unwrap_or_else(|| panic!("{mode}: rank {r} did not fail"));
            assert!(err.contains("shape mismatch"), "{mode}: rank {r}: {err}");
            assert!(
                buf.iter().all(|&b| b == 0xA5),
                "{mode}: rank {r} wrote its buffer"
            );
        }
        // Without rank 1's failure, rank 2's missing tensor fails every rank in planning.
        let results = run_threads(WORLD, |comm| {
            let source = if comm.rank() == 2 {
                "model.nope"
            } else {
                "model.norm.weight"
            };
            let reqs = vec![SliceRequest::whole("norm", source, &norm)];
            let mut buf = vec![0xA5u8; (norm[0] * 2) as usize];
            let res = job
                .load_collective(comm, &reqs, &share, &mut [("norm", &mut buf[..])])
                .map(|_| ());
            Ok((res.err().map(|e| e.to_string()), buf))
        });
        for (r, res) in results.into_iter().enumerate() {
            let (err, buf) = res.unwrap();
            let err = err.unwrap_or_else(|| panic!("{mode}: rank {r} did not fail"));
            assert!(err.contains("model.nope"), "{mode}: rank {r}: {err}");
            assert!(
                buf.iter().all(|&b| b == 0xA5),
                "{mode}: rank {r} wrote its buffer"
            );
        }
    }
}

#[test]
fn a_file_that_changes_before_the_read_fails_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SynthOptions::preset("llama-tiny").unwrap().with_tied(false);
    safeshard::synth::write_checkpoint(dir.path(), &opts).unwrap();
    let job = SliceJob::open(dir.path()).unwrap();
    let head = job.checkpoint().tensor("lm_head.weight").unwrap().clone();
    let file = job.checkpoint().files()[head.file].path.clone();
    // Shrunk after planning: only rank 3 reads the head, every rank must fail.
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let norm = job
        .checkpoint()
        .tensor("model.norm.weight")
        .unwrap()
        .shape
        .clone();
    for mode in [ShareMode::None, ShareMode::ReadOnce] {
        let share = ShareOptions {
            mode,
            ..ShareOptions::default()
        };
        let results = run_threads(WORLD, |comm| {
            let mut reqs = vec![SliceRequest::whole("norm", "model.norm.weight", &norm)];
            if comm.rank() == 3 {
                reqs.push(SliceRequest::whole("head", "lm_head.weight", &head.shape));
            }
            job.load_collective(comm, &reqs, &share, &mut [])
                .map(|_| ())
                .err()
                .map(|e| e.to_string())
                .ok_or_else(|| Error::plan("no error"))
        });
        for (r, res) in results.into_iter().enumerate() {
            let err = res.unwrap_or_else(|e| panic!("{mode}: rank {r}: {e}"));
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            assert!(err.contains(&name), "{mode}: rank {r}: {err}");
        }
    }
}

#[test]
fn whole_replicas_into_buffers_cross_no_buffer_edge_wrongly() {
    // Every rank holds every tensor whole (DDP, Replicate): runs of adjacent tensors are
    // coalesced across tensor boundaries, and read-once's transfers follow those runs, so
    // the writes into caller buffers must be cut at the buffers' edges.
    whole_replicas_into_buffers(SynthOptions::preset("llama-tiny").unwrap(), 64 << 10);
}

#[test]
fn whole_replicas_into_buffers_with_read_once_messages_across_buffer_edges() {
    // Tensors over read-once's 64 KiB bundling threshold: a message of adjacent transfers
    // spans several caller buffers, so it lands in the bounce buffer and is copied out.
    let mut opts = SynthOptions::preset("llama-tiny").unwrap();
    opts.config["hidden_size"] = serde_json::json!(256);
    opts.config["intermediate_size"] = serde_json::json!(512);
    whole_replicas_into_buffers(opts, 1 << 20);
}

fn whole_replicas_into_buffers(opts: SynthOptions, round_bytes: u64) {
    let dir = tempfile::tempdir().unwrap();
    safeshard::synth::write_checkpoint(dir.path(), &opts).unwrap();
    let job = SliceJob::open(dir.path()).unwrap();
    let reqs: Vec<SliceRequest> = job
        .checkpoint()
        .tensors()
        .iter()
        .map(|t| SliceRequest::whole(t.name.clone(), t.name.clone(), &t.shape))
        .collect();
    let plan = job.plan(std::slice::from_ref(&reqs)).unwrap();
    let crossing = plan.ranks()[0].copies().iter().any(|c| {
        let end = c.dst + c.len * c.count;
        plan.ranks()[0]
            .tensors()
            .iter()
            .any(|t| c.dst < t.offset && t.offset < end)
    });
    assert!(
        crossing,
        "no run crosses a tensor boundary: the test would not test the cut"
    );
    for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
        let share = ShareOptions {
            mode,
            round_bytes,
            ..ShareOptions::default()
        };
        let results = run_threads(WORLD, |comm| {
            let mut bufs: Vec<(String, Vec<u8>)> = plan.ranks()[0]
                .tensors()
                .iter()
                .map(|t| (t.name.clone(), vec![0xA5u8; t.bytes as usize]))
                .collect();
            let mut into: Vec<(&str, &mut [u8])> = bufs
                .iter_mut()
                .map(|(n, b)| (n.as_str(), &mut b[..]))
                .collect();
            let (rest, _) = job.load_collective(comm, &reqs, &share, &mut into)?;
            assert!(rest.is_empty());
            Ok(bufs)
        });
        for (r, res) in results.into_iter().enumerate() {
            for (name, got) in res.unwrap() {
                let (_, _, want) = reference(dir.path(), &name);
                assert!(got == want, "{mode}: rank {r}: {name} differs");
            }
        }
    }
}
