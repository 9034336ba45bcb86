//! Scale benchmark of the planner (issue 4): the whole `safeshard plan` command on sparse
//! DeepSeek-V3 (163 files, FP8) and Llama-3.1-405B checkpoints, plus in-process `plan::build`
//! times across topologies to show that planning is linear in tensor placements
//! (held tensors × ranks).
//!
//! ```sh
//! cargo build --release --bin safeshard --example plan_scale
//! target/release/examples/plan_scale [--dir DIR] [--runs N]
//! ```
//!
//! Sparse checkpoints are written once into DIR (default `target/plan-bench`) and reused.
//! Prints medians of wall time and peak RSS of the child `safeshard plan` processes.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use safeshard::checkpoint::Checkpoint;
use safeshard::plan;
use safeshard::sharding::{self, Config, Spec};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Writes the sparse checkpoint unless a previous run completed it.
fn ensure(dir: &Path, preset: &str, files: Option<usize>) -> Result<PathBuf, String> {
    let out = dir.join(preset);
    let done = out.join(".complete");
    if done.exists() {
        return Ok(out);
    }
    let mut opts = SynthOptions::preset(preset)
        .map_err(|e| e.to_string())?
        .with_sparse(true);
    if let Some(n) = files {
        let size = synth::shard_size_for_files(&opts, n).map_err(|e| e.to_string())?;
        opts = opts.with_max_file_bytes(size);
    }
    let t = Instant::now();
    let n = synth::write_checkpoint(&out, &opts).map_err(|e| e.to_string())?;
    std::fs::write(&done, b"").map_err(|e| e.to_string())?;
    eprintln!(
        "wrote {preset}: {n} tensors in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Runs the binary once; returns (wall seconds, CPU seconds (user + sys), peak RSS bytes).
fn run_cli(bin: &Path, ckpt: &Path, args: &[&str]) -> Result<(f64, f64, u64), String> {
    let t = Instant::now();
    let child = Command::new(bin)
        .arg("plan")
        .arg(ckpt)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 reaps the child we spawned (std never waits on it).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let secs = t.elapsed().as_secs_f64();
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("safeshard plan {} {args:?} failed", ckpt.display()));
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    let cpu = tv(ru.ru_utime) + tv(ru.ru_stime);
    Ok((secs, cpu, ru.ru_maxrss as u64 * 1024))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {}", l.trim());
    }
    let mut dir = PathBuf::from("target/plan-bench");
    let mut runs = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => {
                dir = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--dir needs a value")?
            }
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--runs needs a number")?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/examples/plan_scale → target/release/safeshard
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("safeshard"))
        .ok_or("cannot locate the safeshard binary")?;
    if !bin.exists() {
        return Err(format!(
            "{} not found: cargo build --release --bin safeshard",
            bin.display()
        ));
    }
    let dsv3 = ensure(&dir, "deepseek-v3", Some(163))?;
    let l405 = ensure(&dir, "llama3.1-405b", None)?;

    println!("#### Whole command: `safeshard plan CKPT ARGS > /dev/null`, {runs} runs, medians");
    println!("| checkpoint | tensors | files | args | wall s (median) | min..max | CPU s user+sys (median) | peak RSS MiB (median) |");
    println!("|---|---|---|---|---|---|---|---|");
    let cases: [(&Path, &str, &[&str]); 4] = [
        (&dsv3, "deepseek-v3", &["--tp", "8", "--pp", "8"]),
        (&dsv3, "deepseek-v3", &["--tp", "8", "--pp", "8", "--json"]),
        (&l405, "llama3.1-405b", &["--tp", "8", "--pp", "16"]),
        (
            &l405,
            "llama3.1-405b",
            &["--tp", "8", "--pp", "16", "--json"],
        ),
    ];
    for (ckpt, name, a) in cases {
        let c = Checkpoint::open(ckpt).map_err(|e| e.to_string())?;
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        let mut rss = Vec::new();
        for _ in 0..runs {
            let (w, c, r) = run_cli(&bin, ckpt, a)?;
            walls.push(w);
            cpus.push(c);
            rss.push(r as f64);
        }
        let lo = walls.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = walls.iter().cloned().fold(0.0, f64::max);
        println!(
            "| {name} | {} | {} | `{}` | {:.3} | {lo:.3}..{hi:.3} | {:.3} | {:.0} |",
            c.tensors().len(),
            c.files().len(),
            a.join(" "),
            median(walls),
            median(cpus),
            median(rss) / (1024.0 * 1024.0)
        );
    }

    println!();
    println!("#### Phases of one in-process run (median of {runs}), ms");
    println!("| checkpoint | tp × pp | open | config + spec | resolve | build | hash |");
    println!("|---|---|---|---|---|---|---|");
    for (ckpt, name, tp, pp) in [
        (&dsv3, "deepseek-v3", 8, 8),
        (&l405, "llama3.1-405b", 8, 16),
    ] {
        let mut ph: [Vec<f64>; 5] = Default::default();
        for _ in 0..runs {
            let t = Instant::now();
            let c = Checkpoint::open(ckpt).map_err(|e| e.to_string())?;
            ph[0].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let config = Config::from_checkpoint(&c, &[]).map_err(|e| e.to_string())?;
            let s = Spec::detect(&config).map_err(|e| e.to_string())?;
            ph[1].push(t.elapsed().as_secs_f64());
            let topo = Topology::new(tp, pp, 1, 1).map_err(|e| e.to_string())?;
            let t = Instant::now();
            let res = sharding::resolve(&s, &c, &config, &topo).map_err(|e| e.to_string())?;
            ph[2].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let p = plan::build(&c, &res, &topo, &s.name).map_err(|e| e.to_string())?;
            ph[3].push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(p.hash());
            ph[4].push(t.elapsed().as_secs_f64());
        }
        let [a, b, c, d, e] = ph.map(|v| median(v) * 1e3);
        println!("| {name} | {tp} × {pp} | {a:.0} | {b:.0} | {c:.0} | {d:.0} | {e:.0} |");
    }

    println!();
    println!("#### In-process `plan::build` (after open + resolve), {runs} runs, medians");
    println!("| checkpoint | tp × pp | ranks | placements (held tensors × ranks) | build ms | ns per placement |");
    println!("|---|---|---|---|---|---|");
    for (ckpt, name, topos) in [
        (
            &dsv3,
            "deepseek-v3",
            &[(1usize, 1usize), (2, 2), (4, 4), (8, 8), (8, 16)][..],
        ),
        (
            &l405,
            "llama3.1-405b",
            &[(1, 1), (2, 4), (8, 8), (8, 16)][..],
        ),
    ] {
        let c = Checkpoint::open(ckpt).map_err(|e| e.to_string())?;
        let config = Config::from_checkpoint(&c, &[]).map_err(|e| e.to_string())?;
        let s = Spec::detect(&config).map_err(|e| e.to_string())?;
        for &(tp, pp) in topos {
            let topo = Topology::new(tp, pp, 1, 1).map_err(|e| e.to_string())?;
            let res = sharding::resolve(&s, &c, &config, &topo).map_err(|e| e.to_string())?;
            let mut times = Vec::new();
            let mut placements = 0usize;
            for _ in 0..runs {
                let t = Instant::now();
                let p = plan::build(&c, &res, &topo, &s.name).map_err(|e| e.to_string())?;
                times.push(t.elapsed().as_secs_f64());
                placements = p.ranks().iter().map(|r| r.tensors().len()).sum();
            }
            let m = median(times);
            println!(
                "| {name} | {tp} × {pp} | {} | {placements} | {:.1} | {:.0} |",
                tp * pp,
                m * 1e3,
                m * 1e9 / placements.max(1) as f64
            );
        }
    }
    Ok(())
}
