//! Loads the toy checkpoint of `safeshard::comm::toy` under a share mode, on threads or under
//! `mpirun`, and prints one JSON line per rank with its bytes read and a SHA-256 of its arena.
//! Used by tests/run-all.sh to compare real MPI jobs with the in-process result.
//!
//! ```text
//! share_toy write PATH
//! share_toy threads PATH TP PP DP MODE
//! mpirun -n N share_toy mpi PATH TP PP DP MODE [--per-node] [--io mmap]
//! ```
//! `PATH` may contain `{rank}` (each rank reads its own copy, as on separate nodes).

use safeshard::comm::toy::ToyModel;
use safeshard::comm::{launch, load_rank, Communicator, RankLoad, ShareMode, ShareOptions};
use safeshard::topology::Topology;
use safeshard::{Error, Result};
use sha2::{Digest, Sha256};

const MODEL: ToyModel = ToyModel {
    layers: 4,
    hidden: 64,
    vocab: 203,
    kv_rows: 16,
};

fn line(l: &RankLoad) -> String {
    let digest: String = Sha256::digest(&l.arena)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!(
        "{{\"rank\":{},\"bytes\":{},\"read_bytes\":{},\"sent_bytes\":{},\"received_bytes\":{},\"seconds\":{:.6},\"sha256\":\"{digest}\"}}",
        l.rank, l.arena.len(), l.read_bytes, l.sent_bytes, l.received_bytes, l.seconds
    )
}

fn usize_arg(args: &[String], i: usize, what: &str) -> Result<usize> {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Usage(format!("argument {i} ({what}) must be a number")))
}

struct Job {
    path: String,
    topo: Topology,
    opts: ShareOptions,
}

fn job(args: &[String]) -> Result<Job> {
    let path = args
        .get(2)
        .cloned()
        .ok_or_else(|| Error::Usage("missing PATH".into()))?;
    let topo = Topology::new(
        usize_arg(args, 3, "TP")?,
        usize_arg(args, 4, "PP")?,
        usize_arg(args, 5, "DP")?,
        1,
    )?;
    let mode: ShareMode = args.get(6).map(String::as_str).unwrap_or("none").parse()?;
    Ok(Job {
        path,
        topo,
        opts: ShareOptions {
            mode,
            per_node: args.iter().any(|a| a == "--per-node"),
            node: None,
            round_bytes: 64 << 10,
            // pread counts exactly the bytes asked for; `--io mmap` counts whole pages.
            load: safeshard::load::LoadOptions {
                io: if args.iter().any(|a| a == "mmap") {
                    safeshard::load::IoMode::Mmap
                } else {
                    safeshard::load::IoMode::Pread
                },
                ..Default::default()
            },
        },
    })
}

fn load(job: &Job, comm: &dyn Communicator) -> Result<RankLoad> {
    let path = job.path.replace("{rank}", &comm.rank().to_string());
    let plan = MODEL.plan(std::path::Path::new(&path), &job.topo)?;
    load_rank(&plan, comm, &job.opts)
}

fn run(args: &[String]) -> Result<()> {
    match args.get(1).map(String::as_str) {
        Some("write") => {
            let p = args
                .get(2)
                .ok_or_else(|| Error::Usage("missing PATH".into()))?;
            MODEL.write(std::path::Path::new(p))
        }
        Some("threads") => {
            let job = job(args)?;
            let out = safeshard::comm::run_threads(job.topo.world(), |c| load(&job, c));
            for r in out {
                println!("{}", line(&r?));
            }
            Ok(())
        }
        Some("mpi") => {
            let job = job(args)?;
            let launch = launch::detect_env()?;
            let universe = safeshard::comm::MpiUniverse::init()?;
            let mut world = universe.world();
            // Tests: tiny MPI transfers to exercise the chunked broadcast/all-to-all paths.
            if let Some(c) = std::env::var("SHARE_TOY_MPI_CHUNK")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                world = world.with_chunk(c);
            }
            let result = launch::check_mpi_world(launch.as_ref(), world.rank(), world.size())
                .and_then(|_| launch::check_world(world.size(), &job.topo))
                .and_then(|_| load(&job, &world));
            match result {
                Ok(l) => println!("{}", line(&l)),
                // Every failure ends the whole job (MPI_Abort), never a hang.
                Err(e) => world.abort(if e.is_usage() { 2 } else { 1 }, &e.to_string()),
            }
            drop(world);
            drop(universe);
            Ok(())
        }
        _ => Err(Error::Usage(
            "usage: share_toy write PATH | threads|mpi PATH TP PP DP MODE [--per-node]".into(),
        )),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(if e.is_usage() { 2 } else { 1 });
    }
}
