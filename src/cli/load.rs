//! `safeshard load`: the one loading command. `--rank R` loads one rank and `--all-ranks`
//! every rank on threads, each reading its own slices (this file); `--share MODE`, or a
//! launcher (`mpirun`, `srun`) with more than one process, runs the distributed path of
//! [`super::dist`]: one process per rank under the launcher, else every rank on threads, with
//! reads shared between ranks. Both paths print the same [`RankLine`]s.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use safeshard::checkpoint::Checkpoint;
use safeshard::comm::{launch, ShareMode};
use safeshard::load::{self, ArenaInit, IoMode, LoadOptions, LoadStats};
use safeshard::plan::{self, Plan};
use safeshard::sharding::Resolution;
use safeshard::topology::Coords;
use safeshard::{Error, Result};
use sha2::{Digest, Sha256};

use super::common::{human_bytes, PlanFlags, Prepared};

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
    /// process per rank under mpirun/srun (the default mode there is `none`), else every rank
    /// on threads.
    #[arg(long, conflicts_with_all = ["rank", "all_ranks"])]
    pub share: Option<ShareMode>,
    /// With `--share read-once`: read the checkpoint once per node instead of once per job
    /// (the node is `SAFESHARD_NODE`, else the host name).
    #[arg(long)]
    pub per_node: bool,
    /// With `--share read-once`: bytes read per round (bounds staging memory), e.g. `1GiB`.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub round: u64,
    /// Check every tensor against an independent slow path (whole tensor read with pread,
    /// sliced in memory from the spec's layout).
    #[arg(long)]
    pub verify: bool,
    /// Hand out tensors that are one contiguous file span as zero-copy views of the mapping.
    #[arg(long)]
    pub views: bool,
    /// I/O engine: `mmap` or `pread`.
    #[arg(long, default_value = "mmap")]
    pub io: IoMode,
    /// Staging memory budget of the pread engine, e.g. `256MiB`.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub staging_budget: u64,
    /// How fresh arenas are prepared: `hugepages`, `populate` or `lazy`.
    #[arg(long, default_value = "hugepages")]
    pub arena: ArenaInit,
    /// One JSON object per rank per line.
    #[arg(long)]
    pub json: bool,
    /// Add a SHA-256 of each rank's bytes (its arena, in plan order) to the output.
    #[arg(long)]
    pub digest: bool,
}

/// Parses a byte size: `123`, `4KB`, `5GB` (powers of 1000), `4KiB`, `2GiB` (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 5GB)"))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Opens, resolves and plans.
pub fn prepare_plan(checkpoint: &PathBuf, flags: &PlanFlags) -> Result<(Prepared, Plan)> {
    let prep = flags.prepare(checkpoint)?;
    let plan = plan::build(
        &prep.ckpt,
        &prep.resolution,
        &prep.topology,
        &prep.spec.name,
    )?;
    Ok((prep, plan))
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

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
    load_one_with(ckpt, resolution, plan, rank, opts, verify, false)
}

/// [`load_one`], optionally with a digest of the rank's arena.
fn load_one_with(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    plan: &Plan,
    rank: usize,
    opts: &LoadOptions,
    verify: bool,
    digest: bool,
) -> Result<RankReport> {
    let loaded = load::load_rank(plan, rank, opts)?;
    let verified = if verify {
        Some(load::verify_rank(ckpt, resolution, &loaded)?)
    } else {
        None
    };
    let stats = *loaded.stats();
    let sha256 = digest.then(|| {
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
    load_ranks_with(ckpt, resolution, plan, ranks, opts, verify, false, progress)
}

/// [`load_ranks`], optionally with digests.
#[allow(clippy::too_many_arguments)]
fn load_ranks_with(
    ckpt: &Checkpoint,
    resolution: &Resolution,
    plan: &Plan,
    ranks: &[usize],
    opts: &LoadOptions,
    verify: bool,
    digest: bool,
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
                                load_one_with(ckpt, resolution, plan, r, opts, verify, digest);
                            if let Some(p) = progress {
                                p.inc(1);
                            }
                            res
                        })
                        .map_err(|e| {
                            Error::Load(format!("rank {r}: cannot start a loader thread: {e}"))
                        })
                })
                .collect();
            for h in handles {
                results.push(h.and_then(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Load("a rank's loader thread panicked".into()))
                    })
                }));
            }
        });
    }
    results.into_iter().collect()
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// What both paths print about one rank: the same keys for the same things.
pub struct RankLine {
    /// Global rank.
    pub rank: usize,
    /// Where the rank sits, when the plan knows it.
    pub coords: Option<Coords>,
    /// Share mode (`none` for `--rank`/`--all-ranks`).
    pub share: ShareMode,
    /// I/O engine of the bytes read from storage.
    pub io: IoMode,
    /// Tensors held.
    pub tensors: usize,
    /// Bytes held.
    pub bytes: u64,
    /// Bytes this rank read from storage.
    pub read_bytes: u64,
    /// Bytes sent to other ranks.
    pub sent_bytes: u64,
    /// Bytes received from other ranks.
    pub received_bytes: u64,
    /// Bytes handed out as views of the file mapping.
    pub view_bytes: u64,
    /// Peak staging memory of the pread engine (single-process path only).
    pub peak_staging: Option<u64>,
    /// Load wall time, seconds.
    pub seconds: f64,
    /// Tensors verified, when verification ran.
    pub verified: Option<usize>,
    /// SHA-256 of the rank's arena, when asked for.
    pub sha256: Option<String>,
}

impl RankLine {
    /// The line of a single-process load.
    pub fn from_report(plan: &Plan, r: &RankReport, io: IoMode) -> RankLine {
        let s = &r.stats;
        RankLine {
            rank: s.rank,
            coords: plan.ranks.get(s.rank).map(|p| p.coords),
            share: ShareMode::None,
            io,
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

    /// One human-readable line.
    pub fn human(&self) -> String {
        let coords = self.coords.map_or(String::new(), |c| {
            format!(" (dp {}, pp {}, tp {})", c.dp_rank, c.pp_rank, c.tp_rank)
        });
        let received = if self.share == ShareMode::None {
            String::new()
        } else {
            format!(", {} received", human_bytes(self.received_bytes))
        };
        let verified = self
            .verified
            .map_or(String::new(), |n| format!(", verified {n} tensors"));
        let digest = self
            .sha256
            .as_ref()
            .map_or(String::new(), |d| format!(", sha256 {d}"));
        format!(
            "rank {}{coords}: {} tensors, {} held, {} read{received}, {:.3} s, {:.2} GB/s\
             {verified}{digest}",
            self.rank,
            self.tensors,
            human_bytes(self.bytes),
            human_bytes(self.read_bytes),
            self.seconds,
            gbps(self.bytes, self.seconds)
        )
    }

    /// One JSON object (`sha256` only when a digest was asked for).
    pub fn json(&self) -> serde_json::Value {
        let c = self.coords;
        let mut v = serde_json::json!({
            "rank": self.rank,
            "tp_rank": c.map(|c| c.tp_rank),
            "pp_rank": c.map(|c| c.pp_rank),
            "dp_rank": c.map(|c| c.dp_rank),
            "share": self.share.to_string(),
            "io": match self.io { IoMode::Mmap => "mmap", IoMode::Pread => "pread" },
            "tensors": self.tensors,
            "bytes": self.bytes,
            "read_bytes": self.read_bytes,
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "view_bytes": self.view_bytes,
            "peak_staging": self.peak_staging,
            "seconds": self.seconds,
            "gb_per_s": gbps(self.bytes, self.seconds),
            "verified": self.verified,
        });
        if let (Some(d), Some(o)) = (&self.sha256, v.as_object_mut()) {
            o.insert("sha256".into(), d.clone().into());
        }
        v
    }

    /// The line in the output format chosen by `--json`.
    pub fn render(&self, json: bool) -> String {
        if json {
            self.json().to_string()
        } else {
            self.human()
        }
    }
}

/// One human-readable line per rank.
pub fn human_line(plan: &Plan, r: &RankReport) -> String {
    RankLine::from_report(plan, r, IoMode::default()).human()
}

/// Writes lines to stdout; a closed pipe (`| head`) is not an error.
pub fn print_lines(lines: impl IntoIterator<Item = String>) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let write = || -> std::io::Result<()> {
        for l in lines {
            writeln!(out, "{l}")?;
        }
        out.flush()
    };
    match write() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("<stdout>", e)),
    }
}

/// Runs `safeshard load`: routes to the single-process or the distributed path.
pub fn run(args: Args) -> Result<()> {
    if let Some(r) = args.rank {
        // A generic variable such as torchrun's RANK may be set for other reasons: only a
        // well-formed launcher environment that contradicts --rank is refused.
        if let Ok(Some(l)) = launch::detect_env() {
            if l.size > 1 && l.rank != r {
                return Err(Error::Usage(format!(
                    "--rank {r}, but {} started this process as rank {} of {}: drop --rank \
                     to let every process load its own rank",
                    l.launcher.name(),
                    l.rank,
                    l.size
                )));
            }
        }
        return run_single(args);
    }
    if args.all_ranks {
        return run_single(args);
    }
    let launched = launch::detect_env()?;
    if args.share.is_some() || launched.is_some() {
        return super::dist::run(&args, launched);
    }
    Err(Error::Usage(
        "say which ranks to load: --rank R (one rank), --all-ranks (every rank on threads) or \
         --share none|broadcast|read-once (every rank, sharing reads; one process per rank \
         under mpirun/srun)"
            .into(),
    ))
}

/// `--rank R` or `--all-ranks`: each rank reads its own slices, in this process.
fn run_single(args: Args) -> Result<()> {
    run_ranks(&args, args.rank)
}

/// Loads only `rank` in this process, as `--rank` does (used under a launcher without MPI).
#[cfg_attr(feature = "mpi", allow(dead_code))]
pub fn run_single_rank(args: &Args, rank: usize) -> Result<()> {
    run_ranks(args, Some(rank))
}

/// Loads `rank` (or every rank) in this process, each reading its own slices.
fn run_ranks(args: &Args, rank: Option<usize>) -> Result<()> {
    let (prep, plan) = prepare_plan(&args.checkpoint, &args.plan)?;
    let world = plan.ranks.len();
    let ranks: Vec<usize> = match rank {
        Some(r) if r >= world => {
            return Err(Error::Usage(format!(
                "--rank {r}: the topology has {world} ranks (0..{})",
                world.saturating_sub(1)
            )))
        }
        Some(r) => vec![r],
        None => (0..world).collect(),
    };
    let opts = LoadOptions {
        io: args.io,
        views: args.views,
        staging_budget: args.staging_budget,
        arena: args.arena,
        threads: None,
        pread_contiguous: false,
        control: None,
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
        args.digest,
        progress.as_ref(),
    );
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let reports = reports?;
    print_lines(
        reports
            .iter()
            .map(|r| RankLine::from_report(&plan, r, args.io).render(args.json)),
    )
}
