//! Loads a synthetic checkpoint (`llama-tiny`, with a chosen number of layers) under a share
//! mode, on threads or under `mpirun`, through the real planner ([`Job`]) and
//! [`safeshard::dist::load_shared_with`], and prints one JSON line per rank with its bytes read
//! and a SHA-256 of its arena. Used by tests/mpi_jobs.sh to compare real MPI jobs with the
//! in-process result.
//!
//! ```text
//! share_toy write DIR [LAYERS]
//! share_toy threads DIR TP PP DP MODE [options]
//! mpirun -n N share_toy mpi DIR TP PP DP MODE [options]
//! options: --per-node (node: SAFESHARD_NODE) --io mmap --round BYTES --pp-layers A,B,..
//!          --timeout SECONDS
//! ```
//! `DIR` may contain `{rank}` (each rank reads its own copy, as on separate nodes).

use std::time::Duration;

use safeshard::comm::{launch, Communicator};
use safeshard::dist::{load_shared_with, ShareMode, ShareOptions, SharedPlan};
use safeshard::load::{IoMode, LoadOptions};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;
use safeshard::Job;
use safeshard::{Error, Result};
use sha2::{Digest, Sha256};

fn usize_arg(args: &[String], i: usize, what: &str) -> Result<usize> {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::invalid_argument(what, format!("(argument {i}) must be a number")))
}

/// The value after `--flag`, if given.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).map(String::as_str)
}

struct Run {
    dir: String,
    topo: Topology,
    opts: ShareOptions,
}

fn parse(args: &[String]) -> Result<Run> {
    let dir = args
        .get(2)
        .cloned()
        .ok_or_else(|| Error::invalid_argument("dir", "is missing"))?;
    let mut topo = Topology::new(
        usize_arg(args, 3, "TP")?,
        usize_arg(args, 4, "PP")?,
        usize_arg(args, 5, "DP")?,
        1,
    )?;
    if let Some(l) = flag(args, "--pp-layers") {
        let layers: std::result::Result<Vec<usize>, _> = l.split(',').map(str::parse).collect();
        topo.pp_layers =
            Some(layers.map_err(|_| {
                Error::invalid_argument("pp_layers", format!("{l:?}: not numbers"))
            })?);
        topo.validate()?;
    }
    let mode: ShareMode = args.get(6).map(String::as_str).unwrap_or("none").parse()?;
    let round_bytes = match flag(args, "--round") {
        Some(r) => r.parse().map_err(|_| {
            Error::invalid_argument("round", format!("{r:?}: not a number of bytes"))
        })?,
        None => 64 << 10,
    };
    let timeout = match flag(args, "--timeout") {
        Some(t) => Some(Duration::from_secs(t.parse().map_err(|_| {
            Error::invalid_argument("timeout", format!("{t:?}: not a number of seconds"))
        })?)),
        None => Some(Duration::from_secs(120)),
    };
    Ok(Run {
        dir,
        topo,
        opts: ShareOptions {
            mode,
            per_node: args.iter().any(|a| a == "--per-node"),
            node: std::env::var("SAFESHARD_NODE").ok(),
            // Unknown: each rank asks for exactly its pages (the toy counts them).
            node_ranks: Vec::new(),
            round_bytes,
            timeout,
            // pread counts exactly the bytes asked for; `--io mmap` counts whole pages.
            load: LoadOptions {
                io: if flag(args, "--io") == Some("mmap") {
                    IoMode::Mmap
                } else {
                    IoMode::Pread
                },
                ..Default::default()
            },
            agree_also: Vec::new(),
        },
    })
}

/// Plans (as every process of a real job does) and loads this rank; one JSON line.
fn load(run: &Run, comm: &dyn Communicator) -> Result<String> {
    let dir = run.dir.replace("{rank}", &comm.rank().to_string());
    let job = Job::open(&dir, run.topo.clone(), None, &[])?;
    let (tensors, traffic) = load_shared_with(&SharedPlan::new(job.plan()), comm, &run.opts)?;
    let s = *tensors.stats();
    let (arena, _) = tensors.into_parts();
    let digest: String = Sha256::digest(&arena[..])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!(
        "{{\"rank\":{},\"bytes\":{},\"read_bytes\":{},\"sent_bytes\":{},\"received_bytes\":{},\"seconds\":{:.6},\"sha256\":\"{digest}\"}}",
        s.rank, arena.len(), s.read_bytes, traffic.sent_bytes, traffic.received_bytes, s.seconds
    ))
}

fn run(args: &[String]) -> Result<()> {
    match args.get(1).map(String::as_str) {
        Some("write") => {
            let dir = args
                .get(2)
                .ok_or_else(|| Error::invalid_argument("dir", "is missing"))?;
            let layers = args.get(3).and_then(|l| l.parse().ok()).unwrap_or(8);
            let opts = SynthOptions::preset("llama-tiny")?.with_layers(layers);
            synth::write_checkpoint(std::path::Path::new(dir), &opts).map(|_| ())
        }
        Some("threads") => {
            let run = parse(args)?;
            let out = safeshard::comm::run_threads(run.topo.world(), |c| load(&run, c));
            for r in out {
                println!("{}", r?);
            }
            Ok(())
        }
        Some("mpi") => mpi(args),
        _ => Err(Error::NeedsOneOf {
            what: "what to do (share_toy write DIR [LAYERS] | threads|mpi DIR TP PP DP MODE \
                   [options])"
                .into(),
            choices: vec![
                ("write".into(), String::new()),
                ("threads".into(), String::new()),
                ("mpi".into(), String::new()),
            ],
        }),
    }
}

#[cfg(feature = "mpi")]
fn mpi(args: &[String]) -> Result<()> {
    let run = parse(args)?;
    let launch = launch::detect_env()?;
    // Deadlines from before MPI_Init to MPI_Finalize, as `safeshard load` has them.
    let universe = safeshard::comm::MpiUniverse::init_with_timeout(run.opts.timeout)?;
    let mut world = universe.world();
    // Tests: tiny MPI transfers to exercise the chunked broadcast/all-to-all paths.
    if let Some(c) = std::env::var("SHARE_TOY_MPI_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        world = world.with_chunk(c);
    }
    // Tests: this rank stops before its first collective (as a hung or stopped process).
    if std::env::var("SHARE_TOY_STALL_RANK").ok() == Some(world.rank().to_string()) {
        std::thread::sleep(Duration::from_secs(3600));
    }
    let result = launch::check_mpi_world(launch.as_ref(), world.rank(), world.size())
        .and_then(|_| launch::check_world(world.size(), &run.topo))
        .and_then(|_| load(&run, &world));
    // Every rank finished before any prints (see `safeshard load`).
    world.set_phase("finish");
    match safeshard::comm::agree(&world, result) {
        Ok(l) => {
            drop(world);
            drop(universe);
            println!("{l}");
        }
        // Every failure ends the whole job (MPI_Abort), never a hang.
        Err(e) => world.abort(if e.is_usage() { 2 } else { 1 }, &e.to_string()),
    }
    Ok(())
}

#[cfg(not(feature = "mpi"))]
fn mpi(_: &[String]) -> Result<()> {
    Err(Error::invalid_argument(
        "mpi",
        "needs the `mpi` feature (cargo build --features mpi --example share_toy)",
    ))
}

/// Options as this example's arguments: `--pp-layers`, subcommands and positions by name.
struct Words;

impl safeshard::error::OptionNames for Words {
    fn option(&self, field: &str) -> String {
        match field {
            "pp_layers" | "round" | "timeout" => format!("--{}", field.replace('_', "-")),
            "write" | "threads" | "mpi" => field.into(),
            f => f.to_uppercase(),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = run(&args) {
        eprintln!("error: {}", e.render(&Words));
        std::process::exit(e.exit_code());
    }
}
