//! The distributed path of `safeshard load` (`--share`, or a launcher with more than one
//! process): every rank of the job loads with a share mode, as one process per rank under a
//! launcher (`mpirun`, `srun`; needs the `mpi` feature) or, without one, all ranks in this
//! process on threads. Also the hidden `dist-load` alias (its old name), kept so scripts that
//! use it keep working.

use std::path::PathBuf;

use safeshard::comm::{self, agree, launch, Communicator, RankLoad, ShareMode, ShareOptions};
use safeshard::load::{self, IoMode, LoadOptions};
use safeshard::plan::Plan;
use safeshard::{Error, Result};

use super::common::{PlanFlags, Prepared};
use super::load::{prepare_plan, print_lines, sha256_hex, RankLine};

/// Arguments of the hidden `safeshard dist-load` (= `safeshard load --share MODE --digest`).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either.
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub plan: PlanFlags,
    /// `none`, `broadcast` or `read-once` (see `safeshard load --help`).
    #[arg(long, default_value = "none")]
    pub share: ShareMode,
    /// With `read-once`: read the checkpoint once per node instead of once per job.
    #[arg(long)]
    pub per_node: bool,
    /// Read-once round size (bounds staging memory), e.g. `1GiB`.
    #[arg(long, default_value = "1GiB", value_parser = parse_round)]
    pub round: u64,
    /// I/O engine for the bytes a rank reads itself: `mmap` or `pread`.
    #[arg(long, default_value = "auto")]
    pub io: IoMode,
    /// Check every tensor against an independent slow path (whole tensor, sliced in memory).
    #[arg(long)]
    pub verify: bool,
    /// One JSON object per rank per line (with a SHA-256 of the rank's arena).
    #[arg(long)]
    pub json: bool,
}

impl From<Args> for super::load::Args {
    fn from(a: Args) -> Self {
        let d = LoadOptions::default();
        super::load::Args {
            checkpoint: a.checkpoint,
            plan: a.plan,
            rank: None,
            all_ranks: false,
            share: Some(a.share),
            per_node: a.per_node,
            round: a.round,
            verify: a.verify,
            views: false,
            io: a.io,
            staging_budget: d.staging_budget,
            arena: d.arena,
            json: a.json,
            // dist-load always printed the digest.
            digest: true,
        }
    }
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
fn rank_job(args: &super::load::Args, world: &dyn Communicator) -> Result<RankLine> {
    let prepared = prepare_plan(&args.checkpoint, &args.plan).and_then(|(prep, plan)| {
        launch::check_world(world.size(), &plan.topology)?;
        Ok((prep, plan))
    });
    let (prep, plan) = agree(world, prepared)?;
    let share = args.share.unwrap_or_default();
    let opts = ShareOptions {
        mode: share,
        per_node: args.per_node,
        node: std::env::var("SAFESHARD_NODE").ok(),
        round_bytes: args.round,
        load: LoadOptions {
            io: args.io,
            staging_budget: args.staging_budget,
            arena: args.arena,
            ..Default::default()
        },
    };
    let load = comm::load_rank(&plan, world, &opts)?;
    let verified = if args.verify {
        Some(agree(world, verify(&prep, &plan, &load))?)
    } else {
        None
    };
    let rp = plan.ranks.get(load.rank);
    Ok(RankLine {
        rank: load.rank,
        coords: rp.map(|r| r.coords),
        share,
        io: args.io,
        tensors: rp.map_or(0, |r| r.tensors.len()),
        bytes: rp.map_or(0, |r| r.bytes),
        read_bytes: load.read_bytes,
        sent_bytes: load.sent_bytes,
        received_bytes: load.received_bytes,
        view_bytes: 0,
        peak_staging: None,
        seconds: load.seconds,
        verified,
        sha256: args.digest.then(|| sha256_hex(&load.arena)),
    })
}

/// Runs the distributed path; `launched` is what [`launch::detect_env`] found.
pub fn run(args: &super::load::Args, launched: Option<launch::LaunchInfo>) -> Result<()> {
    if args.views {
        return Err(Error::Usage(
            "--views needs --rank R or --all-ranks (shared loads fill owned arenas)".into(),
        ));
    }
    match launched {
        Some(l) if l.size > 1 => run_launched(args, l),
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
            let results = comm::run_threads(world, |c| rank_job(args, c));
            let lines = results.into_iter().collect::<Result<Vec<_>>>()?;
            print_lines(lines.iter().map(|l| l.render(args.json)))
        }
    }
}

#[cfg(feature = "mpi")]
fn run_launched(args: &super::load::Args, l: launch::LaunchInfo) -> Result<()> {
    let universe = comm::MpiUniverse::init()?;
    let world = universe.world();
    let result = launch::check_mpi_world(Some(&l), world.rank(), world.size())
        .and_then(|_| rank_job(args, &world));
    match result {
        Ok(line) => print_lines([line.render(args.json)])?,
        // End the whole job: no rank may wait for this one.
        Err(e) => world.abort(super::exit_code(&e), &e.to_string()),
    }
    drop(world);
    drop(universe);
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn run_launched(args: &super::load::Args, l: launch::LaunchInfo) -> Result<()> {
    let share = args.share.unwrap_or_default();
    if share != ShareMode::None {
        return Err(Error::Usage(format!(
            "--share {share} under {} (rank {} of {}) needs MPI, but this safeshard was built \
             without it: rebuild with `cargo build --release --features mpi`, or use --share \
             none (every process reads its own rank)",
            l.launcher.name(),
            l.rank,
            l.size
        )));
    }
    // Without MPI the processes cannot talk, but `--share none` needs no talking: each
    // process loads the rank the launcher gave it. A rank that fails exits non-zero and the
    // launcher ends the job; plans are not compared across processes.
    launch::check_world(l.size, &args.plan.topology()?)?;
    super::load::run_single_rank(args, l.rank)
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
