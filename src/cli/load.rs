//! `safeshard load`: load one rank (or every rank on threads) into host memory.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use safeshard::checkpoint::Checkpoint;
use safeshard::load::{self, ArenaInit, IoMode, LoadOptions, LoadStats};
use safeshard::plan::{self, Plan};
use safeshard::spec::Resolution;
use safeshard::{Error, Result};

use super::common::{human_bytes, PlanFlags, Prepared};

/// Arguments of `safeshard load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A `.safetensors` file, a `model.safetensors.index.json`, or a directory holding either.
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub plan: PlanFlags,
    /// Global rank to load.
    #[arg(
        long,
        required_unless_present = "all_ranks",
        conflicts_with = "all_ranks"
    )]
    pub rank: Option<usize>,
    /// Load every rank, in this process, on threads.
    #[arg(long)]
    pub all_ranks: bool,
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
    let loaded = load::load_rank(plan, rank, opts)?;
    let verified = if verify {
        Some(load::verify_rank(ckpt, resolution, &loaded)?)
    } else {
        None
    };
    Ok(RankReport {
        stats: *loaded.stats(),
        verified,
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
                            let res = load_one(ckpt, resolution, plan, r, opts, verify);
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

/// One human-readable line per rank.
pub fn human_line(plan: &Plan, r: &RankReport) -> String {
    let s = &r.stats;
    let c = plan.ranks.get(s.rank).map(|p| p.coords);
    let coords = c.map_or(String::new(), |c| {
        format!(" (dp {}, pp {}, tp {})", c.dp_rank, c.pp_rank, c.tp_rank)
    });
    let verified = r
        .verified
        .map_or(String::new(), |n| format!(", verified {n} tensors"));
    format!(
        "rank {}{coords}: {} tensors, {} held, {} read, {:.3} s, {:.2} GB/s{verified}",
        s.rank,
        s.tensors,
        human_bytes(s.bytes),
        human_bytes(s.read_bytes),
        s.seconds,
        gbps(s.bytes, s.seconds)
    )
}

/// One JSON object per rank.
pub fn json_line(plan: &Plan, r: &RankReport, io: IoMode) -> serde_json::Value {
    let s = &r.stats;
    let c = plan.ranks.get(s.rank).map(|p| p.coords);
    serde_json::json!({
        "rank": s.rank,
        "tp_rank": c.map(|c| c.tp_rank),
        "pp_rank": c.map(|c| c.pp_rank),
        "dp_rank": c.map(|c| c.dp_rank),
        "tensors": s.tensors,
        "bytes": s.bytes,
        "read_bytes": s.read_bytes,
        "view_bytes": s.view_bytes,
        "peak_staging": s.peak_staging,
        "seconds": s.seconds,
        "gb_per_s": gbps(s.bytes, s.seconds),
        "io": match io { IoMode::Mmap => "mmap", IoMode::Pread => "pread" },
        "verified": r.verified,
    })
}

/// Runs `safeshard load`.
pub fn run(args: Args) -> Result<()> {
    let (prep, plan) = prepare_plan(&args.checkpoint, &args.plan)?;
    let world = plan.ranks.len();
    let ranks: Vec<usize> = match args.rank {
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
    let reports = load_ranks(
        &prep.ckpt,
        &prep.resolution,
        &plan,
        &ranks,
        &opts,
        args.verify,
        progress.as_ref(),
    );
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let reports = reports?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write = || -> std::io::Result<()> {
        for r in &reports {
            if args.json {
                writeln!(out, "{}", json_line(&plan, r, args.io))?;
            } else {
                writeln!(out, "{}", human_line(&plan, r))?;
            }
        }
        out.flush()
    };
    match write() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("<stdout>", e)),
    }
}
