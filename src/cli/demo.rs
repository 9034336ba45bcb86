//! `safeshard demo`: the whole flow on a small synthetic Llama in a temporary directory.

use std::time::Instant;

use crate::checkpoint::Dtype;
use crate::synth::{self, SynthOptions};
use crate::topology::Topology;
use crate::{Error, Result};
use crate::{Job, LoadOptions};

use super::common::{human_bytes, printable};
use super::load::{human_line, load_one, load_ranks};

/// Arguments of `safeshard demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep the checkpoint in this directory instead of a temporary one.
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
}

/// The demo model: Llama-shaped, about 110 MB in F16.
fn config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "torch_dtype": "float16"
    })
}

/// Median single-thread memcpy speed (GB/s) into already-touched memory.
pub fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let mut times = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let med = times.get(times.len() / 2).copied().unwrap_or(0.0);
    if med > 0.0 {
        bytes as f64 / med / 1e9
    } else {
        0.0
    }
}

/// Runs `safeshard demo`.
pub fn run(args: Args) -> Result<()> {
    // Everything is written to a temporary directory; with `--keep` it is renamed into place
    // only after every rank loaded and verified, so a demo that fails half-way leaves nothing
    // that looks like a checkpoint (the temporary directory is removed on the way out).
    let tmp = match &args.keep {
        Some(d) => {
            // Writing into a checkpoint directory would replace its config.json and index
            // and leave its old shards beside the new ones.
            let non_empty = std::fs::read_dir(d).is_ok_and(|mut r| r.next().is_some());
            if d.exists() && !d.is_dir() {
                return Err(Error::invalid_argument(
                    "keep",
                    format!(
                        "{}: exists and is not a directory; give a new or empty directory",
                        printable(&d.to_string_lossy())
                    ),
                ));
            }
            if non_empty {
                return Err(Error::invalid_argument(
                    "keep",
                    format!(
                        "{}: directory is not empty; give a new or empty directory",
                        printable(&d.to_string_lossy())
                    ),
                ));
            }
            let parent = match d.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => std::path::Path::new("."),
            };
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            tempfile::Builder::new()
                .prefix(".safeshard-demo-")
                .tempdir_in(parent)
                .map_err(|e| Error::io(parent, e))?
        }
        None => tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?,
    };
    let dir = tmp.path().to_path_buf();
    let shown = args.keep.clone().unwrap_or_else(|| dir.clone());
    let t = Instant::now();
    let n = synth::write_checkpoint(
        &dir,
        &SynthOptions {
            dtype: Dtype::F16,
            max_file_bytes: 40 << 20,
            seed: 7,
            ..SynthOptions::from_config(config())?
        },
    )?;
    println!(
        "1. wrote a Llama-shaped checkpoint ({n} tensors) to {} in {:.2} s",
        printable(&shown.to_string_lossy()),
        t.elapsed().as_secs_f64()
    );

    let topo = Topology::new(4, 2, 1, 1)?;
    let job = Job::open(&dir, topo, None, &[])?;
    println!(
        "2. plan for tp=4 x pp=2 (spec {}, {} files, {} held in total):",
        job.spec().name,
        job.plan().files().len(),
        human_bytes(job.plan().ranks().iter().map(|r| r.bytes()).sum())
    );
    println!(
        "   {:>4} {:>3} {:>3} {:>3} {:>8} {:>12} {:>12}",
        "rank", "dp", "pp", "tp", "tensors", "held", "read"
    );
    for r in job.plan().ranks() {
        println!(
            "   {:>4} {:>3} {:>3} {:>3} {:>8} {:>12} {:>12}",
            r.coords().rank,
            r.coords().dp_rank,
            r.coords().pp_rank,
            r.coords().tp_rank,
            r.tensors().len(),
            human_bytes(r.bytes()),
            human_bytes(r.read_bytes())
        );
    }

    println!("3. loading each of the 8 ranks (all cores per rank), verifying every tensor:");
    let ranks: Vec<usize> = (0..job.world()).collect();
    let mut reports = Vec::with_capacity(ranks.len());
    for &r in &ranks {
        reports.push(load_one(
            job.checkpoint(),
            job.resolution(),
            job.plan(),
            r,
            &LoadOptions::default(),
            true,
        )?);
    }
    for r in &reports {
        println!("   {}", human_line(job.plan(), r));
    }
    let verified: usize = reports.iter().filter_map(|r| r.verified).sum();
    // Throughput: all 8 ranks in-process on threads, concurrently, timed as a whole.
    let held: u64 = reports.iter().map(|r| r.stats.bytes).sum();
    let mut walls = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        load_ranks(
            job.checkpoint(),
            job.resolution(),
            job.plan(),
            &ranks,
            &LoadOptions::default(),
            false,
            None,
        )?;
        walls.push(t.elapsed().as_secs_f64());
    }
    walls.sort_by(f64::total_cmp);
    let wall = walls.get(1).copied().unwrap_or(0.0);
    let memcpy = memcpy_gbps(64 << 20);
    println!(
        "4. {verified} tensors verified. All 8 ranks ({}) load in {wall:.3} s (median of 3): \
         {:.2} GB/s, beside single-thread memcpy {memcpy:.2} GB/s on this machine \
         ({} threads available)",
        human_bytes(held),
        if wall > 0.0 {
            held as f64 / wall / 1e9
        } else {
            0.0
        },
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if let Some(keep) = &args.keep {
        // An empty directory given with --keep is replaced (rename(2) onto an empty
        // directory succeeds on Linux; remove it first for other systems).
        let _ = std::fs::remove_dir(keep);
        let done = tmp.keep();
        std::fs::rename(&done, keep).map_err(|e| {
            let _ = std::fs::remove_dir_all(&done);
            Error::io(keep, e)
        })?;
    }
    Ok(())
}
