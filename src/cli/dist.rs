//! `safeshard dist-load`: load every rank of a job with a share mode, either as one process
//! per rank under a launcher (`mpirun`, `srun`; needs the `mpi` feature) or, without one,
//! all ranks in this process on threads.

use std::path::PathBuf;

use safeshard::comm::{self, agree, launch, Communicator, RankLoad, ShareMode, ShareOptions};
use safeshard::load::{self, IoMode, LoadOptions};
use safeshard::plan::Plan;
use safeshard::{Error, Result};
use sha2::{Digest, Sha256};

use super::common::{human_bytes, PlanFlags, Prepared};
use super::load::prepare_plan;

/// Arguments of `safeshard dist-load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either.
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub plan: PlanFlags,
    /// How ranks share reading: `none` (each reads its own slices), `broadcast` (bytes held
    /// by several ranks are read by one and broadcast in the group holding them) or
    /// `read-once` (every byte read once per job, then scattered with all-to-all).
    #[arg(long, default_value = "none")]
    pub share: ShareMode,
    /// With `read-once`: read the checkpoint once per node instead of once per job.
    #[arg(long)]
    pub per_node: bool,
    /// Read-once round size (bounds staging memory), e.g. `1GiB`.
    #[arg(long, default_value = "1GiB", value_parser = parse_round)]
    pub round: u64,
    /// I/O engine for the bytes a rank reads itself: `mmap` or `pread`.
    #[arg(long, default_value = "mmap")]
    pub io: IoMode,
    /// Check every tensor against an independent slow path (whole tensor, sliced in memory).
    #[arg(long)]
    pub verify: bool,
    /// One JSON object per rank per line (with a SHA-256 of the rank's arena).
    #[arg(long)]
    pub json: bool,
}

struct RankOut {
    load: RankLoad,
    tensors: usize,
    bytes: u64,
    verified: Option<usize>,
}

fn verify(prep: &Prepared, plan: &Plan, l: &RankLoad) -> Result<usize> {
    let rp = plan
        .ranks
        .get(l.rank)
        .ok_or_else(|| Error::Load(format!("verify: rank {} not in plan", l.rank)))?;
    for t in &rp.tensors {
        let info =
            prep.ckpt.tensors.get(t.source).ok_or_else(|| {
                Error::Load(format!("verify: tensor {:?}: unknown source", t.name))
            })?;
        let layout = load::layout_for(&prep.resolution, t.source, &rp.coords)
            .ok_or_else(|| Error::Load(format!("verify: tensor {:?} not held", t.name)))?;
        let whole = load::read_tensor(&prep.ckpt, info)?;
        let want = load::slice_layout(&whole, &info.shape, info.dtype.bits(), layout)?;
        let got = l
            .arena
            .get(t.offset as usize..(t.offset + t.bytes) as usize)
            .ok_or_else(|| Error::Load(format!("verify: tensor {:?} outside arena", t.name)))?;
        if want.as_slice() != got {
            return Err(Error::Load(format!(
                "verify: rank {}: tensor {:?} differs from the slow path",
                l.rank, t.name
            )));
        }
    }
    Ok(rp.tensors.len())
}

/// One rank's whole job: plan, agree, load, verify. Collective on `world`.
fn rank_job(args: &Args, world: &dyn Communicator) -> Result<(Plan, RankOut)> {
    let prepared = prepare_plan(&args.checkpoint, &args.plan).and_then(|(prep, plan)| {
        launch::check_world(world.size(), &plan.topology)?;
        Ok((prep, plan))
    });
    let (prep, plan) = agree(world, prepared)?;
    let opts = ShareOptions {
        mode: args.share,
        per_node: args.per_node,
        node: std::env::var("SAFESHARD_NODE").ok(),
        round_bytes: args.round,
        load: LoadOptions {
            io: args.io,
            ..Default::default()
        },
    };
    let load = comm::load_rank(&plan, world, &opts)?;
    let verified = if args.verify {
        Some(agree(world, verify(&prep, &plan, &load))?)
    } else {
        None
    };
    let (tensors, bytes) = plan
        .ranks
        .get(load.rank)
        .map(|r| (r.tensors.len(), r.bytes))
        .unwrap_or_default();
    Ok((
        plan,
        RankOut {
            load,
            tensors,
            bytes,
            verified,
        },
    ))
}

fn line(args: &Args, r: &RankOut) -> String {
    let l = &r.load;
    if args.json {
        let digest: String = Sha256::digest(&l.arena)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        serde_json::json!({
            "rank": l.rank,
            "share": args.share.to_string(),
            "tensors": r.tensors,
            "bytes": r.bytes,
            "read_bytes": l.read_bytes,
            "sent_bytes": l.sent_bytes,
            "received_bytes": l.received_bytes,
            "seconds": l.seconds,
            "verified": r.verified,
            "sha256": digest,
        })
        .to_string()
    } else {
        format!(
            "rank {}: {} tensors, {} held, {} read from storage, {} received, {:.3} s{}",
            l.rank,
            r.tensors,
            human_bytes(r.bytes),
            human_bytes(l.read_bytes),
            human_bytes(l.received_bytes),
            l.seconds,
            r.verified
                .map_or(String::new(), |n| format!(", verified {n} tensors"))
        )
    }
}

/// Runs `safeshard dist-load`.
pub fn run(args: Args) -> Result<()> {
    let launched = launch::detect_env()?;
    match launched {
        Some(l) if l.size > 1 => run_launched(&args, l),
        _ => {
            let world = args
                .plan
                .topology()?
                .world_size()
                .ok_or_else(|| Error::Usage("tp × pp × dp overflows".into()))?;
            // Every rank thread plans the whole world (as separate processes would), so the
            // work grows with world²: 1024 threads ran out of stack after a minute.
            if world > MAX_THREAD_WORLD {
                return Err(Error::Usage(format!(
                    "{world} ranks are too many to run on threads in one process (at most {MAX_THREAD_WORLD}); start the job under mpirun, srun or torchrun"
                )));
            }
            let results = comm::run_threads(world, |c| rank_job(&args, c).map(|(_, r)| r));
            for r in results {
                println!("{}", line(&args, &r?));
            }
            Ok(())
        }
    }
}

#[cfg(feature = "mpi")]
fn run_launched(args: &Args, l: launch::LaunchInfo) -> Result<()> {
    let universe = comm::MpiUniverse::init()?;
    let world = universe.world();
    let result = launch::check_mpi_world(Some(&l), world.rank(), world.size())
        .and_then(|_| rank_job(args, &world));
    match result {
        Ok((_, r)) => println!("{}", line(args, &r)),
        // End the whole job: no rank may wait for this one.
        Err(e) => world.abort(e.exit_code(), &e.to_string()),
    }
    drop(world);
    drop(universe);
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn run_launched(_args: &Args, l: launch::LaunchInfo) -> Result<()> {
    Err(Error::Usage(format!(
        "started by {} as rank {} of {}, but this safeshard was built without MPI: rebuild \
         with `cargo build --release --features mpi`, or run without a launcher to load every \
         rank on threads",
        l.launcher.name(),
        l.rank,
        l.size
    )))
}

/// Smallest `--round`: every round is a collective plus page-rounded reads, so tiny rounds
/// (`--round 1B`) only make a job crawl (millions of rounds) and read more, not less.
const MIN_ROUND: u64 = 64 << 10;

/// `--round`: a size of at least [`MIN_ROUND`].
fn parse_round(s: &str) -> std::result::Result<u64, String> {
    let v = super::load::parse_size(s)?;
    if v < MIN_ROUND {
        return Err(format!("at least 64KiB, got {v} bytes"));
    }
    Ok(v)
}

/// Largest world run on threads in one process (without a launcher).
const MAX_THREAD_WORLD: usize = 256;
