//! Broadcast benchmark: safeshard's MPI broadcast (chunked under 2 GiB counts) against a raw
//! `MPI_Bcast` of the same buffer, alternating, medians over repetitions.
//!
//! `mpirun -n 4 bcast_bench SIZE_MIB [REPS]` (prints one JSON line from rank 0)

use std::time::Instant;

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::topology::Communicator as _;
use safeshard::comm::{Communicator, MpiComm, MpiUniverse};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(256);
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(7);
    let Ok(universe) = MpiUniverse::init() else {
        eprintln!("error: MPI init failed");
        std::process::exit(1);
    };
    let raw = universe.universe().world();
    let ours = MpiComm::from_communicator(universe.universe().world());
    let mut buf = vec![raw.rank() as u8; mib << 20];
    let (mut t_raw, mut t_ours) = (Vec::new(), Vec::new());
    for rep in 0..reps + 1 {
        for which in [rep % 2, 1 - rep % 2] {
            raw.barrier();
            let t = Instant::now();
            if which == 0 {
                raw.process_at_rank(0).broadcast_into(&mut buf[..]);
            } else if let Err(e) = ours.broadcast(0, &mut buf) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
            raw.barrier();
            let s = t.elapsed().as_secs_f64();
            // The first round warms buffers and connections.
            if rep > 0 {
                if which == 0 {
                    t_raw.push(s)
                } else {
                    t_ours.push(s)
                }
            }
        }
    }
    if buf.iter().any(|&b| b != 0) {
        eprintln!("error: broadcast did not deliver rank 0's bytes");
        std::process::exit(1);
    }
    if raw.rank() == 0 {
        let (r, o) = (median(&mut t_raw), median(&mut t_ours));
        println!(
            "{{\"ranks\":{},\"mib\":{mib},\"reps\":{reps},\"raw_bcast_s\":{r:.6},\"safeshard_s\":{o:.6},\"ratio\":{:.3}}}",
            raw.size(),
            o / r
        );
    }
    drop(ours);
    drop(raw);
    drop(universe);
}
