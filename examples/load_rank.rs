//! Load one rank of a checkpoint with the library API.
//!
//! `cargo run --example load_rank -- [CHECKPOINT [TP [PP [RANK]]]]`
//!
//! Without a checkpoint it writes the `llama-tiny` synthetic one to a temporary directory.

use safeshard::synth::{self, SynthOptions};
use safeshard::{Job, LoadOptions, Topology};

fn main() -> safeshard::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tmp = tempfile::tempdir().map_err(|e| safeshard::Error::io("tempdir", e))?;
    let dir = match args.first() {
        Some(d) => d.into(),
        None => {
            synth::write_checkpoint(tmp.path(), &SynthOptions::preset("llama-tiny")?)?;
            tmp.path().to_path_buf()
        }
    };
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (tp, pp, rank) = (num(1, 2), num(2, 1), num(3, 0));

    // 1. Open, pick the spec from config.json, resolve and plan, once.
    let job = Job::open(&dir, Topology::new(tp, pp, 1, 1)?, None, &[])?;
    // 2. Load one rank: contiguous tensors as zero-copy views of the mapping.
    let opts = LoadOptions::default();
    // SAFETY: this program neither truncates nor writes the checkpoint while the views live
    // (a file truncated underneath a mapping raises SIGBUS; `job.load_rank` copies instead).
    let mut rank_tensors = unsafe { job.load_rank_views(rank, &opts)? };
    // 3. Check it against the independent slow path.
    let verified = job.verify(&rank_tensors)?;
    for t in rank_tensors.iter() {
        let kind = if t.is_view { "view" } else { "owned" };
        println!(
            "{:60} {:5} {:?} {} bytes ({kind})",
            t.name,
            t.dtype,
            t.shape,
            t.data.len()
        );
    }
    let s = rank_tensors.stats();
    println!(
        "rank {rank}: {} tensors, {} bytes, {} read, {:.4} s; {verified} verified",
        s.tensors, s.bytes, s.read_bytes, s.seconds
    );
    // 4. Take one tensor out, then the whole arena (views are copied in first).
    if let Some(t) = rank_tensors.take("model.norm.weight") {
        println!("took {} ({} bytes)", t.name, t.data.len());
    }
    let (arena, tensors) = rank_tensors.into_parts();
    println!(
        "arena of {} bytes holding {} tensors",
        arena.len(),
        tensors.len()
    );
    Ok(())
}
