//! `safeshard load`: the one loading command. `--rank R` loads one rank and `--all-ranks`
//! every rank on threads, each reading its own slices (this file); `--share MODE`, or a
//! launcher (`mpirun`, `srun`) with more than one process, runs the distributed path of
//! [`super::dist`]: one process per rank under the launcher, else every rank on threads, with
//! reads shared between ranks. Both paths print the same [`RankLine`]s (from
//! [`super::report`], which both use; `dist.rs` does not import this file).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use crate::checkpoint::Checkpoint;
use crate::comm::launch;
use crate::dist::{ShareChoice, ShareMode, DEFAULT_TIMEOUT};
use crate::load::{self, ArenaInit, IoMode, LoadOptions, LoadStats};
use crate::plan::Plan;
use crate::sharding::Resolution;
use crate::{Error, Result};

use super::common::PlanFlags;
use super::dist::Request;
use super::report::{parse_duration, parse_round, print_lines, sha256_hex, RankLine};
pub use super::report::{parse_size, prepare_plan};

/// Arguments of `safeshard load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either.
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub plan: PlanFlags,
    /// Global rank to load (this process only, reading its own slices).
    #[arg(long, conflicts_with = "all_ranks")]
    pub rank: Option<usize>,
    /// Load every rank, in this process, on threads, each reading its own slices.
    #[arg(long)]
    pub all_ranks: bool,
    /// Load every rank of the job, sharing reads: `none` (each rank reads its own slices),
    /// `broadcast` (bytes held by several ranks are read by one and broadcast in the group
    /// holding them) or `read-once` (every byte read once per job, then scattered). One
    /// process per rank under mpirun/srun, else every rank on threads. Under a launcher
    /// without `--share`, the mode is chosen by the job's node count (`none` on one node,
    /// `broadcast` across several; nodes counted by `SAFESHARD_NODE`, else the host name)
    /// and the output says why (`share_default` in `--json`).
    #[arg(long, conflicts_with_all = ["rank", "all_ranks"])]
    pub share: Option<ShareMode>,
    /// With `--share read-once`: read the checkpoint once per node instead of once per job
    /// (the node is `SAFESHARD_NODE`, else the host name).
    #[arg(long)]
    pub per_node: bool,
    /// With `--share read-once`: bytes read per round (bounds staging memory), e.g. `1GiB`;
    /// at least 64KiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_round)]
    pub round: u64,
    /// With `--share` or under a launcher: how long a rank waits for the others in any phase
    /// (MPI start-up and finalize included) before it ends the job naming the phase and the
    /// ranks that did not arrive, e.g. `30s`, `2m`.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Check every tensor against an independent slow path (whole tensor read with pread,
    /// sliced in memory from the spec's layout).
    #[arg(long)]
    pub verify: bool,
    /// Hand out tensors that are one contiguous file span as zero-copy views of the mapping
    /// (only safe while no one truncates or writes the checkpoint files).
    #[arg(long)]
    pub views: bool,
    /// I/O engine: `auto` (by what the page cache holds: cached contiguous runs with
    /// positioned reads, cached strided ones gathered from a mapping, uncached spans through
    /// the page cache, exactly their pages, asked for ahead, where the files fit in half of
    /// the available memory, else contiguous ones with direct I/O), `mmap`, `pread` or
    /// `direct` (`O_DIRECT`, bypassing the page cache).
    #[arg(long, default_value = "auto")]
    pub io: IoMode,
    /// Staging memory budget of the pread engine, e.g. `256MiB`.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub staging_budget: u64,
    /// How fresh arenas are prepared: `ahead` (each reader faults a task's pages in with one
    /// call before reading into them), `lazy`, `populate` or `hugepages`.
    #[arg(long, default_value = "ahead")]
    pub arena: ArenaInit,
    /// Reader threads of a `--rank`/`--all-ranks` load (default: the cores, at least 8, so
    /// that several reads are in flight).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// One JSON object per rank per line.
    #[arg(long)]
    pub json: bool,
    /// Add a SHA-256 of each rank's bytes (its arena, in plan order) to the output.
    #[arg(long)]
    pub digest: bool,
}

/// The line of a single-process load.
fn rank_line(plan: &Plan, r: &RankReport, io: IoMode) -> RankLine {
    let s = &r.stats;
    RankLine {
        rank: s.rank,
        coords: plan.ranks().get(s.rank).map(|p| p.coords()),
        share: ShareMode::None,
        share_why: None,
        io,
        threads: s.threads,
        paths: s.paths,
        tensors: s.tensors,
        bytes: s.bytes,
        read_bytes: s.read_bytes,
        sent_bytes: 0,
        received_bytes: 0,
        view_bytes: s.view_bytes,
        peak_staging: Some(s.peak_staging),
        seconds: s.seconds,
        verified: r.verified,
        sha256: r.sha256.clone(),
    }
}

/// The outcome of one rank.
pub struct RankReport {
    /// Load statistics.
    pub stats: LoadStats,
    /// Tensors verified, when verification ran.
    pub verified: Option<usize>,
    /// SHA-256 of the rank's arena (views materialized), when asked for.
    pub sha256: Option<String>,
}

/// Loads (and optionally verifies) one rank, dropping its tensors afterwards.
pub fn load_one(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    plan: &Plan,
    rank: usize,
    opts: &LoadOptions,
    verify: bool,
) -> Result<RankReport> {
    load_one_with(
        ckpt,
        resolution,
        plan,
        rank,
        opts,
        verify,
        Extras::default(),
    )
}

/// What a rank load of `safeshard load` does beyond copying the rank's tensors.
#[derive(Clone, Copy, Default)]
struct Extras {
    /// `--digest`: the SHA-256 of the rank's arena.
    digest: bool,
    /// `--views`: zero-copy views of the mapping, through the unsafe loader.
    views: bool,
}

/// [`load_one`], optionally with a digest of the rank's arena or views.
fn load_one_with(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    plan: &Plan,
    rank: usize,
    opts: &LoadOptions,
    verify: bool,
    extras: Extras,
) -> Result<RankReport> {
    let loaded = if extras.views {
        // SAFETY: `--views` is the user's promise (documented in --help) that the checkpoint
        // is not truncated or written during the load; the views are dropped before return.
        unsafe { load::load_rank_views(plan, rank, opts)? }
    } else {
        load::load_rank(plan, rank, opts)?
    };
    let verified = if verify {
        Some(load::verify_rank(ckpt, resolution, &loaded)?)
    } else {
        None
    };
    let stats = *loaded.stats();
    let sha256 = extras.digest.then(|| {
        let (arena, _) = loaded.into_parts();
        sha256_hex(&arena)
    });
    Ok(RankReport {
        stats,
        verified,
        sha256,
    })
}

/// Loads `ranks` concurrently on threads; results in rank order. The first error wins.
pub fn load_ranks(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    plan: &Plan,
    ranks: &[usize],
    opts: &LoadOptions,
    verify: bool,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<RankReport>> {
    load_ranks_with(
        ckpt,
        resolution,
        plan,
        ranks,
        opts,
        verify,
        Extras::default(),
        progress,
    )
}

/// [`load_ranks`], optionally with digests or views.
#[allow(clippy::too_many_arguments)]
fn load_ranks_with(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    plan: &Plan,
    ranks: &[usize],
    opts: &LoadOptions,
    verify: bool,
    extras: Extras,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<RankReport>> {
    // At most MAX_CONCURRENT ranks (threads, arenas) at once: `--dp 16384 --all-ranks`
    // used to spawn 16,384 threads and panic when the system refused one.
    const MAX_CONCURRENT: usize = 64;
    let mut results: Vec<Result<RankReport>> = Vec::with_capacity(ranks.len());
    for chunk in ranks.chunks(MAX_CONCURRENT) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&r| {
                    std::thread::Builder::new()
                        .name(format!("rank-{r}"))
                        .spawn_scoped(s, move || {
                            let res =
                                load_one_with(ckpt, resolution, plan, r, opts, verify, extras);
                            if let Some(p) = progress {
                                p.inc(1);
                            }
                            res
                        })
                        .map_err(|e| {
                            Error::load(Some(r), format!("cannot start a loader thread: {e}"))
                        })
                })
                .collect();
            for h in handles {
                results.push(h.and_then(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::load(None, "a rank's loader thread panicked"))
                    })
                }));
            }
        });
    }
    results.into_iter().collect()
}

/// One human-readable line per rank.
pub fn human_line(plan: &Plan, r: &RankReport) -> String {
    rank_line(plan, r, IoMode::default()).human()
}

/// Runs `safeshard load`: routes to the single-process or the distributed path.
pub fn run(args: Args) -> Result<()> {
    if let Some(r) = args.rank {
        // A generic variable such as torchrun's RANK may be set for other reasons: only a
        // well-formed launcher environment that contradicts --rank is refused.
        if let Ok(Some(l)) = launch::detect_env() {
            if l.size > 1 && l.rank != r {
                return Err(Error::invalid_argument(
                    "rank",
                    format!(
                        "{r}, but {} started this process as rank {} of {}: drop --rank to let \
                         every process load its own rank",
                        l.launcher.name(),
                        l.rank,
                        l.size
                    ),
                ));
            }
        }
        return run_single(args);
    }
    if args.all_ranks {
        return run_single(args);
    }
    let launched = launch::detect_env()?;
    if args.share.is_some() || launched.is_some() {
        // Without MPI the processes of a launcher cannot talk, but `--share none` needs no
        // talking: each process loads the rank the launcher gave it. A rank that fails exits
        // non-zero and the launcher ends the job; plans are not compared across processes.
        // Without `--share` such a process gets `none` (the only mode it can run).
        if !cfg!(feature = "mpi") && args.share.unwrap_or_default() == ShareMode::None {
            if let Some(l) = launched.as_ref().filter(|l| l.size > 1) {
                launch::check_world(l.size, &args.plan.topology()?)?;
                let why = args.share.is_none().then(|| {
                    ShareChoice::without_transport(
                        "built without MPI, so every process reads its own rank",
                    )
                    .why
                });
                return run_ranks(&args, Some(l.rank), why);
            }
        }
        return super::dist::run(&request(&args), launched);
    }
    Err(Error::NeedsOneOf {
        what: "which ranks to load".into(),
        choices: vec![
            ("rank".into(), " R (one rank)".into()),
            ("all_ranks".into(), " (every rank on threads)".into()),
            (
                "share".into(),
                " none|broadcast|read-once (every rank, sharing reads; one process per rank \
                 under mpirun/srun)"
                    .into(),
            ),
        ],
    })
}

/// `--rank R` or `--all-ranks`: each rank reads its own slices, in this process.
fn run_single(args: Args) -> Result<()> {
    run_ranks(&args, args.rank, None)
}

/// The distributed path's request, from the flags.
fn request(args: &Args) -> Request<'_> {
    Request {
        checkpoint: &args.checkpoint,
        plan: &args.plan,
        share: args.share,
        per_node: args.per_node,
        round: args.round,
        timeout: args.timeout,
        verify: args.verify,
        views: args.views,
        io: args.io,
        staging_budget: args.staging_budget,
        arena: args.arena,
        json: args.json,
        digest: args.digest,
    }
}

impl From<super::dist::Args> for Args {
    fn from(a: super::dist::Args) -> Self {
        let d = LoadOptions::default();
        Args {
            checkpoint: a.checkpoint,
            plan: a.plan,
            rank: None,
            all_ranks: false,
            share: Some(a.share),
            per_node: a.per_node,
            round: a.round,
            timeout: DEFAULT_TIMEOUT,
            verify: a.verify,
            views: false,
            io: a.io,
            staging_budget: d.staging_budget,
            arena: d.arena,
            threads: None,
            json: a.json,
            // dist-load always printed the digest.
            digest: true,
        }
    }
}

/// Loads `rank` (or every rank) in this process, each reading its own slices.
/// `share_why`: why these ranks read their own slices when `--share` was not given.
fn run_ranks(args: &Args, rank: Option<usize>, share_why: Option<String>) -> Result<()> {
    let (prep, plan) = prepare_plan(&args.checkpoint, &args.plan)?;
    let world = plan.ranks().len();
    let ranks: Vec<usize> = match rank {
        Some(r) if r >= world => {
            return Err(Error::invalid_argument(
                "rank",
                format!(
                    "{r}: the topology has {world} ranks (0..{})",
                    world.saturating_sub(1)
                ),
            ))
        }
        Some(r) => vec![r],
        None => (0..world).collect(),
    };
    let opts = LoadOptions {
        io: args.io,
        staging_budget: args.staging_budget,
        arena: args.arena,
        threads: args.threads.map(usize::from),
        ..LoadOptions::default()
    };
    let progress = std::io::stderr().is_terminal().then(|| {
        let p = indicatif::ProgressBar::new(ranks.len() as u64);
        p.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} loading ranks {pos}/{len} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        p.enable_steady_tick(std::time::Duration::from_millis(100));
        p
    });
    let reports = load_ranks_with(
        &prep.ckpt,
        &prep.resolution,
        &plan,
        &ranks,
        &opts,
        args.verify,
        Extras {
            digest: args.digest,
            views: args.views,
        },
        progress.as_ref(),
    );
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let reports = reports?;
    print_lines(reports.iter().map(|r| {
        let mut line = rank_line(&plan, r, args.io);
        line.share_why.clone_from(&share_why);
        line.render(args.json)
    }))
}
