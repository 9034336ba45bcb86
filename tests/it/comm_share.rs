//! Share modes on the in-process thread backend: every rank's bytes are checked against
//! slices cut in memory from tensors read by the reference `safetensors` crate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use safeshard::comm::toy::{ToyModel, ToySplit};
use safeshard::comm::{load_rank, run_threads, ShareMode, ShareOptions};
use safeshard::load::{IoMode, LoadOptions};
use safeshard::plan::Plan;
use safeshard::topology::Topology;

const MODEL: ToyModel = ToyModel {
    layers: 3,
    hidden: 32,
    vocab: 45, // not a multiple of 2 or 4: vocab padding
    kv_rows: 8,
};

fn write_model(dir: &Path) -> PathBuf {
    let path = dir.join("toy.safetensors");
    MODEL.write(&path).unwrap();
    path
}

/// The bytes rank `rank` must hold for tensor `name`, cut from the whole tensor.
fn expected_slice(file: &[u8], name: &str, tp: usize, tp_rank: usize) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(file).unwrap();
    let view = st.tensor(name).unwrap();
    let data = view.data();
    let shape = view.shape();
    let t = MODEL
        .tensors()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap();
    match t.split {
        ToySplit::Replicated => data.to_vec(),
        ToySplit::Rows => {
            let (rows, row_bytes) = (shape[0], 2 * shape[1]);
            let per = rows.div_ceil(tp);
            let mut out = vec![0u8; per * row_bytes];
            for i in 0..per {
                let r = tp_rank * per + i;
                if r < rows {
                    out[i * row_bytes..(i + 1) * row_bytes]
                        .copy_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
                }
            }
            out
        }
        ToySplit::Cols => {
            let (rows, cols) = (shape[0], shape[1]);
            let per = cols / tp;
            let mut out = Vec::new();
            for r in 0..rows {
                let start = 2 * (r * cols + tp_rank * per);
                out.extend_from_slice(&data[start..start + 2 * per]);
            }
            out
        }
    }
}

/// Names a rank must hold, from the model's stage assignment.
fn expected_names(topo: &Topology, rank: usize) -> Vec<String> {
    let c = topo.coords(rank);
    let stages = topo.layer_stages(MODEL.layers).unwrap();
    MODEL
        .tensors()
        .into_iter()
        .filter(|t| match t.layer {
            Some(l) => stages[l] == c.pp_rank,
            None if t.first_stage => c.pp_rank == 0,
            None => c.pp_rank + 1 == topo.pp,
        })
        .map(|t| t.name)
        .collect()
}

fn data_bytes() -> u64 {
    MODEL
        .tensors()
        .iter()
        .map(|t| 2 * t.shape.iter().product::<u64>())
        .sum()
}

fn run_mode(
    path: &Path,
    topo: &Topology,
    mode: ShareMode,
    nodes: Option<usize>,
    io: IoMode,
) -> Vec<safeshard::comm::RankLoad> {
    let plan = MODEL.plan(path, topo).unwrap();
    let opts = |rank: usize| ShareOptions {
        mode,
        per_node: nodes.is_some(),
        node: nodes.map(|n| format!("node{}", rank % n)),
        round_bytes: 3000, // several rounds on the toy model
        load: LoadOptions {
            io,
            ..Default::default()
        },
    };
    run_threads(topo.world(), |c| {
        load_rank(&plan, c, &opts(safeshard::comm::Communicator::rank(c)))
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

fn check(plan: &Plan, file: &[u8], loads: &[safeshard::comm::RankLoad]) {
    let topo = &plan.topology;
    for (rank, load) in loads.iter().enumerate() {
        assert_eq!(load.rank, rank);
        let rp = &plan.ranks[rank];
        let names: Vec<String> = rp.tensors.iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, expected_names(topo, rank), "rank {rank}");
        for t in &rp.tensors {
            let got = &load.arena[t.offset as usize..(t.offset + t.bytes) as usize];
            let want = expected_slice(file, &t.name, topo.tp, topo.coords(rank).tp_rank);
            assert!(got == want.as_slice(), "rank {rank} tensor {}", t.name);
        }
    }
}

#[test]
fn every_mode_gives_every_rank_its_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path());
    let file = std::fs::read(&path).unwrap();
    for (tp, pp, dp) in [(2, 2, 1), (4, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 1)] {
        let topo = Topology::new(tp, pp, dp, 1).unwrap();
        let plan = MODEL.plan(&path, &topo).unwrap();
        let planned: u64 = plan.ranks.iter().map(|r| r.read_bytes).sum();
        for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
            let loads = run_mode(&path, &topo, mode, None, IoMode::Pread);
            check(&plan, &file, &loads);
            let total: u64 = loads.iter().map(|l| l.read_bytes).sum();
            match mode {
                // Each rank reads its own slices (the pread engine may read a strided run's
                // whole span), at most the whole file each.
                ShareMode::None => {
                    assert!(total >= planned && total <= (topo.world() * file.len()) as u64)
                }
                // Every distinct slice is read once: together they are the whole data section.
                ShareMode::Broadcast | ShareMode::ReadOnce => {
                    assert_eq!(total, data_bytes(), "{mode} tp{tp} pp{pp} dp{dp}")
                }
            }
            if mode == ShareMode::ReadOnce {
                // Balanced: no rank reads more than its share plus one byte per round.
                let max = loads.iter().map(|l| l.read_bytes).max().unwrap();
                let rounds = data_bytes().div_ceil(3000);
                assert!(max <= data_bytes() / topo.world() as u64 + rounds + 1);
            }
        }
    }
}

#[test]
fn mmap_engine_gives_the_same_bytes_and_reads_whole_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path());
    let file = std::fs::read(&path).unwrap();
    let topo = Topology::new(2, 2, 1, 1).unwrap();
    let plan = MODEL.plan(&path, &topo).unwrap();
    for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
        let loads = run_mode(&path, &topo, mode, None, IoMode::Mmap);
        check(&plan, &file, &loads);
        let total: u64 = loads.iter().map(|l| l.read_bytes).sum();
        // Page-rounded, never more than the whole file per rank.
        let pages = file.len().div_ceil(4096) as u64 * 4096;
        // Read-once pieces of 3000-byte rounds: each adds at most two partial pages.
        let bound = match mode {
            ShareMode::ReadOnce => data_bytes() + data_bytes().div_ceil(3000) * 4 * 2 * 4096,
            _ => 4 * pages,
        };
        assert!(total >= data_bytes() && total <= bound, "{mode}: {total}");
    }
}

#[test]
fn read_once_per_node_reads_the_checkpoint_once_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path());
    let file = std::fs::read(&path).unwrap();
    let topo = Topology::new(2, 2, 1, 1).unwrap();
    let plan = MODEL.plan(&path, &topo).unwrap();
    // Ranks 0, 2 on node0 and 1, 3 on node1.
    let loads = run_mode(&path, &topo, ShareMode::ReadOnce, Some(2), IoMode::Pread);
    check(&plan, &file, &loads);
    for node in 0..2 {
        // A node reads the union of what its ranks need, once.
        let mut need = std::collections::BTreeSet::new();
        for r in (node..4).step_by(2) {
            for run in &plan.ranks[r].copies {
                for i in 0..run.count {
                    let s = run.src + i * run.src_stride;
                    need.extend(s..s + run.len);
                }
            }
        }
        let read: u64 = loads
            .iter()
            .filter(|l| l.rank % 2 == node)
            .map(|l| l.read_bytes)
            .sum();
        assert_eq!(read, need.len() as u64, "node {node}");
    }
}

#[test]
fn a_broken_file_on_one_rank_fails_every_rank_fast() {
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::new(2, 2, 1, 1).unwrap();
    let paths: Vec<PathBuf> = (0..4)
        .map(|r| {
            // One copy per simulated node, same file name.
            let node = dir.path().join(format!("node{r}"));
            std::fs::create_dir(&node).unwrap();
            let p = node.join("toy.safetensors");
            MODEL.write(&p).unwrap();
            p
        })
        .collect();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[2])
        .unwrap();
    f.set_len(1000).unwrap();
    for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
        let start = Instant::now();
        let out = run_threads(4, |c| {
            let rank = safeshard::comm::Communicator::rank(c);
            let plan = MODEL.plan(&paths[rank], &topo)?;
            load_rank(
                &plan,
                c,
                &ShareOptions {
                    mode,
                    ..Default::default()
                },
            )
        });
        assert!(start.elapsed() < Duration::from_secs(20));
        for (rank, r) in out.iter().enumerate() {
            let msg = r.as_ref().unwrap_err().to_string();
            if rank == 2 {
                assert!(
                    msg.contains("node2/toy.safetensors: file truncated"),
                    "{mode}: {msg}"
                );
            } else {
                assert!(msg.contains("rank 2"), "{mode} rank {rank}: {msg}");
            }
        }
    }
}

#[test]
fn ranks_with_different_plans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path());
    let topo = Topology::new(2, 1, 1, 1).unwrap();
    let out = run_threads(2, |c| {
        let model = ToyModel {
            hidden: if safeshard::comm::Communicator::rank(c) == 1 {
                16
            } else {
                32
            },
            ..MODEL
        };
        let plan = model.plan(&path, &topo)?;
        load_rank(&plan, c, &ShareOptions::default())
    });
    for r in out {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("different plan"), "{msg}");
    }
}

#[test]
fn job_size_must_match_plan() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path());
    let plan = MODEL
        .plan(&path, &Topology::new(4, 1, 1, 1).unwrap())
        .unwrap();
    let out = run_threads(2, |c| load_rank(&plan, c, &ShareOptions::default()));
    for r in out {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("2 ranks but the plan has 4"), "{msg}");
    }
}
