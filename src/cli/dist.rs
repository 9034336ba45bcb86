//! The distributed path of `safeshard load` (`--share`, or a launcher with more than one
//! process): every rank of the job loads with a share mode through
//! [`crate::dist::load_shared_with`], as one process per rank under a launcher (`mpirun`,
//! `srun`; needs the `mpi` feature) or, without one, all ranks in this process on threads
//! (planned once, the plan and the broadcast schedule shared by the rank threads). Also the
//! hidden `dist-load` alias (its old name), kept so scripts that use it keep working.

use std::path::PathBuf;
use std::time::Duration;

use crate::comm::{self, agree, launch, Communicator};
use crate::dist::{self, ShareMode, ShareOptions, SharedPlan};
use crate::load::{self, ArenaInit, IoMode, LoadOptions};
use crate::{Error, Result};

use super::common::{PlanFlags, Prepared};
use super::report::{parse_round, prepare_plan, print_lines, sha256_hex, RankLine};

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

/// What the distributed path needs from `safeshard load`'s flags.
pub struct Request<'a> {
    /// The checkpoint argument.
    pub checkpoint: &'a PathBuf,
    /// Topology and spec flags.
    pub plan: &'a PlanFlags,
    /// `--share`; `None`: the default for the job's node count ([`dist::choose_share`]).
    pub share: Option<ShareMode>,
    /// `--per-node`.
    pub per_node: bool,
    /// `--round`.
    pub round: u64,
    /// `--timeout`.
    pub timeout: Duration,
    /// `--verify`.
    pub verify: bool,
    /// `--views` (refused here).
    pub views: bool,
    /// `--io`.
    pub io: IoMode,
    /// `--staging-budget`.
    pub staging_budget: u64,
    /// `--arena`.
    pub arena: ArenaInit,
    /// `--json`.
    pub json: bool,
    /// `--digest`.
    pub digest: bool,
}

impl Request<'_> {
    /// The options before the share mode is chosen ([`share_options`]).
    fn share_options(&self) -> ShareOptions {
        ShareOptions {
            per_node: self.per_node,
            node: node_name(),
            round_bytes: self.round,
            timeout: Some(self.timeout),
            load: LoadOptions {
                io: self.io,
                staging_budget: self.staging_budget,
                arena: self.arena,
                ..Default::default()
            },
            // Both add work after the load that every rank must do alike.
            agree_also: vec![
                ("verify".into(), self.verify.to_string()),
                ("digest".into(), self.digest.to_string()),
            ],
            ..ShareOptions::default()
        }
    }
}

/// This rank's node name from `SAFESHARD_NODE` (else the library takes the host name).
fn node_name() -> Option<String> {
    std::env::var("SAFESHARD_NODE").ok()
}

/// The share options: the mode of `--share`, else the default for the job's node count,
/// and why when it was the default. Collective: every rank counts the nodes whether or not
/// it was given `--share`, so ranks whose flags differ still run the same collectives and
/// reach the agreement that names the difference.
fn share_options(
    req: &Request<'_>,
    world: &dyn Communicator,
) -> Result<(ShareOptions, Option<String>)> {
    world.set_timeout(Some(req.timeout));
    let choice = dist::choose_share(world, node_name().as_deref())?;
    let mut opts = req.share_options();
    let why = choice.apply(req.share, &mut opts);
    Ok((opts, why))
}

/// One rank's load, verification and line. Collective on `world`.
fn rank_job(
    req: &Request<'_>,
    prep: &Prepared,
    shared: &SharedPlan<'_>,
    world: &dyn Communicator,
) -> Result<RankLine> {
    let (opts, share_why) = share_options(req, world)?;
    let mode = opts.mode;
    let plan = shared.plan();
    let (tensors, traffic) = dist::load_shared_with(shared, world, &opts)?;
    let verified = if req.verify {
        world.set_phase("verify");
        Some(agree(
            world,
            load::verify_rank(&prep.ckpt, &prep.resolution, &tensors),
        )?)
    } else {
        None
    };
    let stats = *tensors.stats();
    let rp = plan.ranks().get(stats.rank);
    let sha256 = req.digest.then(|| sha256_hex(&tensors.into_parts().0));
    Ok(RankLine {
        rank: stats.rank,
        coords: rp.map(|r| r.coords()),
        share: mode,
        share_why,
        io: req.io,
        threads: stats.threads,
        paths: stats.paths,
        tensors: stats.tensors,
        bytes: stats.bytes,
        read_bytes: stats.read_bytes,
        sent_bytes: traffic.sent_bytes,
        received_bytes: traffic.received_bytes,
        view_bytes: 0,
        peak_staging: None,
        seconds: stats.seconds,
        verified,
        sha256,
    })
}

/// Runs the distributed path; `launched` is what [`launch::detect_env`] found.
pub fn run(req: &Request<'_>, launched: Option<launch::LaunchInfo>) -> Result<()> {
    if req.views {
        return Err(Error::invalid_argument(
            "views",
            "needs --rank R or --all-ranks (shared loads fill owned arenas)",
        ));
    }
    match launched {
        Some(l) if l.size > 1 => run_launched(req, l),
        _ => {
            let world = req
                .plan
                .topology()?
                .world_size()
                .ok_or_else(|| Error::invalid_argument("tp", "× pp × dp overflows"))?;
            if world > MAX_THREAD_WORLD {
                return Err(Error::ThreadWorld {
                    ranks: world,
                    max: MAX_THREAD_WORLD,
                });
            }
            // One process: plan once, and share the plan, its hash and the broadcast schedule
            // between the rank threads (each used to plan the whole job itself).
            let (prep, plan) = prepare_plan(req.checkpoint, req.plan)?;
            let shared = SharedPlan::new(&plan);
            let results = comm::run_threads(world, |c| rank_job(req, &prep, &shared, c));
            let lines = results.into_iter().collect::<Result<Vec<_>>>()?;
            print_lines(lines.iter().map(|l| l.render(req.json)))
        }
    }
}

#[cfg(feature = "mpi")]
fn run_launched(req: &Request<'_>, l: launch::LaunchInfo) -> Result<()> {
    // Every wait of the job has a deadline, from before MPI_Init (which waits for every
    // process: a stopped one would keep this one there forever) to MPI_Finalize.
    let universe = comm::MpiUniverse::init_with_timeout(Some(req.timeout))?;
    let world = universe.world();
    world.set_phase("planning");
    let prepared = launch::check_mpi_world(Some(&l), world.rank(), world.size())
        .and_then(|_| prepare_plan(req.checkpoint, req.plan))
        .and_then(|(prep, plan)| {
            launch::check_world(world.size(), plan.topology())?;
            Ok((prep, plan))
        });
    let result = agree(&world, prepared)
        .and_then(|(prep, plan)| rank_job(req, &prep, &SharedPlan::new(&plan), &world));
    // Before finalize: every rank has finished. A rank that stopped after its last collective
    // would otherwise leave the others in MPI_Finalize, having printed their lines already.
    world.set_phase("finish");
    let result = agree(&world, result.map(|line| line.render(req.json)));
    let rank = world.rank();
    drop(world);
    // MPI_Finalize, under the watchdog; lines are printed only after it: a job that did not
    // end within its deadlines prints no result that looks complete.
    drop(universe);
    match result {
        Ok(line) => print_lines([line]),
        // Every error above is known to every rank (each phase ends in an agreement, a
        // timeout ends the job itself): each rank reports and exits, nobody waits.
        Err(e) => {
            comm::eprint_line(&format!("error: rank {rank}: {}", super::message(&e)));
            std::process::exit(super::exit_code(&e));
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn run_launched(req: &Request<'_>, l: launch::LaunchInfo) -> Result<()> {
    Err(Error::invalid_argument(
        "mode",
        format!(
            "{} under {} (rank {} of {}) needs MPI, but this safeshard was built without it: \
             rebuild with `cargo build --release --features mpi`, or use --share none (every \
             process reads its own rank)",
            req.share.map_or("(default)".to_string(), |m| m.to_string()),
            l.launcher.name(),
            l.rank,
            l.size
        ),
    ))
}

/// Largest world run on threads in one process (without a launcher).
const MAX_THREAD_WORLD: usize = 256;
