//! Rank-load throughput on a Llama-3-8B-shaped checkpoint, side by side in one run:
//! warm page cache (engines and arena strategies vs single-thread memcpy into touched memory),
//! the Python `safetensors` reference loop (bench/python_ref.py), and cold cache
//! (posix_fadvise DONTNEED) vs a sequential read of the same number of bytes.
//!
//! `cargo bench --bench load_rank` (env: SAFESHARD_BENCH_DIR, SAFESHARD_BENCH_LAYERS=4,
//! SAFESHARD_BENCH_REPS=5, SAFESHARD_BENCH_TP="1,2,4,8", SAFESHARD_BENCH_PYTHON=1).
//!
//! The placement is built here by hand with the vLLM Llama rules (column-parallel q/k/v/gate/up
//! and vocab on dim 0, row-parallel o/down on dim 1, norms replicated), so the benchmark does
//! not depend on the spec language.

use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use safeshard::checkpoint::{Checkpoint, Dtype};
use safeshard::load::{load_rank, load_rank_into, Arena, ArenaInit, IoMode, LoadOptions};
use safeshard::plan::{self, Plan};
use safeshard::sharding::{Layout, Piece, Resolution, Resolved, Shards, TensorKind};
use safeshard::synth::SynthOptions;
use safeshard::topology::Topology;

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

/// Split dimension of a Llama tensor under vLLM's rules (None: replicated).
fn split_dim(name: &str) -> Option<usize> {
    const DIM0: [&str; 7] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "gate_proj",
        "up_proj",
        "embed_tokens",
        "lm_head",
    ];
    if DIM0.iter().any(|p| name.contains(p)) {
        Some(0)
    } else if name.contains("o_proj") || name.contains("down_proj") {
        Some(1)
    } else {
        None
    }
}

fn resolution(ckpt: &Checkpoint, tp: usize) -> Resolution {
    let tensors = ckpt
        .tensors()
        .iter()
        .map(|t| {
            let layouts = (0..tp as u64)
                .map(|r| match split_dim(&t.name) {
                    None => Layout::full(&t.shape),
                    Some(d) => {
                        let n = t.shape[d] / tp as u64;
                        let mut ranges: Vec<(u64, u64)> = t.shape.iter().map(|&s| (0, s)).collect();
                        ranges[d] = (r * n, (r + 1) * n);
                        let mut shape = t.shape.clone();
                        shape[d] = n;
                        Layout {
                            shape,
                            concat_dim: d,
                            pieces: vec![Piece::Slice { ranges }],
                        }
                    }
                })
                .collect();
            Resolved::Held {
                stages: vec![0],
                shards: Shards::PerTp(layouts),
                kind: TensorKind::Other,
                replicated: split_dim(&t.name).is_none(),
            }
        })
        .collect();
    Resolution {
        tensors,
        warnings: vec![],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn drop_cache(ckpt: &Checkpoint) {
    for f in ckpt.files() {
        let file = File::open(&f.path).expect("open");
        // SAFETY: plain syscall on an open descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn warm(ckpt: &Checkpoint) {
    let mut buf = vec![0u8; 8 << 20];
    for f in ckpt.files() {
        let mut file = File::open(&f.path).expect("open");
        while file.read(&mut buf).expect("read") > 0 {}
    }
}

/// Reads `bytes` bytes sequentially from the start of the checkpoint's files (8 MiB reads).
fn sequential_read(ckpt: &Checkpoint, bytes: u64) -> f64 {
    let mut buf = vec![0u8; 8 << 20];
    let t = Instant::now();
    let mut left = bytes;
    for f in ckpt.files() {
        let mut file = File::open(&f.path).expect("open");
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = file.read(&mut buf[..want]).expect("read");
            if n == 0 {
                break;
            }
            left -= n as u64;
        }
    }
    t.elapsed().as_secs_f64()
}

/// Storage bytes read by this process so far (`read_bytes` of /proc/self/io).
fn io_read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("read_bytes: ")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

/// Single-thread memcpy of `dst.len()` bytes from a touched 256 MiB source into touched `dst`.
fn memcpy_into(dst: &mut [u8], src: &[u8]) -> f64 {
    let t = Instant::now();
    for chunk in dst.chunks_mut(src.len()) {
        chunk.copy_from_slice(std::hint::black_box(&src[..chunk.len()]));
    }
    std::hint::black_box(&dst);
    t.elapsed().as_secs_f64()
}

fn timed(plan: &Plan, opts: &LoadOptions, arena: Option<Arena>) -> (f64, Arena) {
    let t = Instant::now();
    let rt = match arena {
        Some(a) => load_rank_into(plan, 0, opts, Some(a)),
        None => load_rank(plan, 0, opts),
    }
    .expect("load");
    let s = t.elapsed().as_secs_f64();
    (s, rt.into_parts().0)
}

fn gbps(bytes: u64, s: f64) -> f64 {
    bytes as f64 / s / 1e9
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs bench binaries
    // without it, and this benchmark writes gigabytes, so it only runs under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("load_rank: run with `cargo bench --bench load_rank`");
        return;
    }
    let dir = PathBuf::from(env_or(
        "SAFESHARD_BENCH_DIR",
        "target/bench-data/llama3-8b-f16",
    ));
    let layers: u64 = env_or("SAFESHARD_BENCH_LAYERS", "4")
        .parse()
        .expect("layers");
    let reps: usize = env_or("SAFESHARD_BENCH_REPS", "5").parse().expect("reps");
    let tps: Vec<usize> = env_or("SAFESHARD_BENCH_TP", "1,2,4,8")
        .split(',')
        .map(|s| s.parse().expect("tp"))
        .collect();
    let python = env_or("SAFESHARD_BENCH_PYTHON", "1") == "1";
    if !dir.join("model.safetensors.index.json").exists() {
        let mut opts = SynthOptions::preset("llama3-8b")
            .expect("preset")
            .with_layers(layers)
            .with_sparse(false)
            .with_max_file_bytes(2_000_000_000);
        opts.dtype = Dtype::F16;
        eprintln!("writing {} ...", dir.display());
        safeshard::synth::write_checkpoint(&dir, &opts).expect("synth");
    }
    let ckpt = Checkpoint::open(&dir).expect("open");
    println!(
        "checkpoint {} ({} tensors, {:.2} GB, {} files)",
        dir.display(),
        ckpt.tensors().len(),
        ckpt.total_bytes() as f64 / 1e9,
        ckpt.files().len()
    );
    let src = vec![7u8; 256 << 20];
    let base = LoadOptions::default();
    let mk = |io: IoMode, arena: ArenaInit| LoadOptions {
        io,
        arena,
        ..base.clone()
    };
    let hybrid = |arena: ArenaInit| LoadOptions {
        pread_contiguous: true,
        ..mk(IoMode::Mmap, arena)
    };
    println!("\n## warm page cache, rank 0, medians of {reps} (GB/s = bytes held / s)");
    println!(
        "{:>3} {:>9} {:>8} | {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} | {:>6} {:>6}",
        "tp",
        "held MB",
        "memcpy",
        "mmap-re",
        "mmap-hp",
        "mmap-pop",
        "mmap-lz",
        "pread-re",
        "pread-hp",
        "hybr-re",
        "hybr-hp",
        "best/m",
        "def/m"
    );
    let mut py_rows = Vec::new();
    let mut cold_rows = Vec::new();
    for &tp in &tps {
        let topo = Topology::new(tp, 1, 1, 1).expect("topo");
        let res = resolution(&ckpt, tp);
        let plan = plan::build(&ckpt, &res, &topo, "bench-llama").expect("plan");
        let rp = &plan.ranks()[0];
        warm(&ckpt);
        let (_, mut reuse) = timed(&plan, &mk(IoMode::Mmap, ArenaInit::HugePages), None);
        let mut t: [Vec<f64>; 9] = Default::default();
        for _ in 0..reps {
            t[0].push(memcpy_into(&mut reuse[..rp.bytes() as usize], &src));
            let (s, a) = timed(&plan, &mk(IoMode::Mmap, ArenaInit::HugePages), Some(reuse));
            reuse = a;
            t[1].push(s);
            t[2].push(timed(&plan, &mk(IoMode::Mmap, ArenaInit::HugePages), None).0);
            t[3].push(timed(&plan, &mk(IoMode::Mmap, ArenaInit::Populate), None).0);
            t[4].push(timed(&plan, &mk(IoMode::Mmap, ArenaInit::Lazy), None).0);
            let (s, a) = timed(&plan, &mk(IoMode::Pread, ArenaInit::HugePages), Some(reuse));
            reuse = a;
            t[5].push(s);
            t[6].push(timed(&plan, &mk(IoMode::Pread, ArenaInit::HugePages), None).0);
            let (s, a) = timed(&plan, &hybrid(ArenaInit::HugePages), Some(reuse));
            reuse = a;
            t[7].push(s);
            t[8].push(timed(&plan, &hybrid(ArenaInit::HugePages), None).0);
        }
        let m: Vec<f64> = t.iter().map(|v| median(v.clone())).collect();
        let g: Vec<f64> = m.iter().map(|&s| gbps(rp.bytes(), s)).collect();
        let best = g[1..].iter().cloned().fold(0.0, f64::max);
        println!(
            "{:>3} {:>9.0} {:>8.2} | {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>6.2} {:>6.2}",
            tp,
            rp.bytes() as f64 / 1e6,
            g[0],
            g[1],
            g[2],
            g[3],
            g[4],
            g[5],
            g[6],
            g[7],
            g[8],
            best / g[0],
            g[2] / g[0]
        );
        drop(reuse);
        if python {
            let out = std::process::Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/python_ref.py"))
                .arg(&dir)
                .arg(tp.to_string())
                .arg("0")
                .arg(reps.min(3).to_string())
                .output()
                .expect("python3");
            let py: Option<f64> = String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
                l.strip_prefix("median_s ")
                    .and_then(|v| v.trim().parse().ok())
            });
            // Ours, measured right after the Python loop, default options.
            let ours = median(
                (0..reps)
                    .map(|_| timed(&plan, &mk(IoMode::Mmap, ArenaInit::HugePages), None).0)
                    .collect(),
            );
            py_rows.push((
                tp,
                py,
                ours,
                String::from_utf8_lossy(&out.stderr).to_string(),
            ));
        }
        // Cold cache: fresh arenas, and a reused (touched) arena to separate I/O from page
        // faults on fresh memory; the sequential read goes into a reused 8 MiB buffer.
        let (_, mut reuse) = timed(&plan, &mk(IoMode::Mmap, ArenaInit::HugePages), None);
        let mut c: [Vec<f64>; 5] = Default::default();
        let mut io = [0u64; 5];
        for _ in 0..reps.min(3) {
            let mut run = |k: usize, f: &mut dyn FnMut() -> f64| {
                drop_cache(&ckpt);
                let b = io_read_bytes();
                c[k].push(f());
                io[k] = io_read_bytes() - b;
            };
            run(0, &mut || {
                timed(&plan, &mk(IoMode::Mmap, ArenaInit::HugePages), None).0
            });
            run(1, &mut || {
                timed(&plan, &mk(IoMode::Pread, ArenaInit::HugePages), None).0
            });
            let mut r = Some(std::mem::replace(
                &mut reuse,
                Arena::new(0, ArenaInit::Lazy).expect("a"),
            ));
            run(2, &mut || {
                let (s, a) = timed(&plan, &mk(IoMode::Mmap, ArenaInit::HugePages), r.take());
                r = Some(a);
                s
            });
            run(3, &mut || {
                let (s, a) = timed(&plan, &mk(IoMode::Pread, ArenaInit::HugePages), r.take());
                r = Some(a);
                s
            });
            reuse = r.take().expect("arena");
            run(4, &mut || sequential_read(&ckpt, rp.read_bytes()));
        }
        drop(reuse);
        cold_rows.push((tp, rp.bytes(), rp.read_bytes(), c.map(median), io));
    }
    if python {
        println!("\n## vs Python safetensors loop (bench/python_ref.py), rank 0, warm cache");
        println!(
            "{:>3} {:>10} {:>10} {:>7}",
            "tp", "python s", "ours s", "ratio"
        );
        for (tp, py, ours, err) in &py_rows {
            match py {
                Some(p) => println!("{tp:>3} {p:>10.3} {ours:>10.3} {:>7.1}", p / ours),
                None => println!("{tp:>3} python failed: {}", err.trim()),
            }
        }
    }
    println!("\n## cold cache (posix_fadvise DONTNEED before each), rank 0, medians");
    println!(
        "{:>3} {:>7} {:>7} {:>5} | {:>7} {:>7} {:>7} {:>7} {:>7} | {:>5} {:>5} {:>5} {:>5} | {:>7} {:>7}",
        "tp", "held MB", "read MB", "rd/hd", "mmap", "pread", "mmap-re", "prd-re", "seq s",
        "mm/sq", "pr/sq", "mr/sq", "prr/sq", "mmap io", "pread io"
    );
    for (tp, held, read, m, io) in cold_rows {
        println!(
            "{tp:>3} {:>7.0} {:>7.0} {:>5.3} | {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>7.3} | {:>5.2} {:>5.2} {:>5.2} {:>5.2} | {:>7.0} {:>7.0}",
            held as f64 / 1e6,
            read as f64 / 1e6,
            read as f64 / held as f64,
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[4] / m[0],
            m[4] / m[1],
            m[4] / m[2],
            m[4] / m[3],
            io[0] as f64 / 1e6,
            io[1] as f64 / 1e6
        );
    }
}
