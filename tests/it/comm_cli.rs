//! `safeshard load --share` without a launcher (all ranks on threads): every share mode loads
//! the same bytes as `load --all-ranks`, verified against the slow path; read-once reads the
//! checkpoint once; launcher environments are checked.

use std::path::Path;
use std::process::Command;

use safeshard::synth::{self, SynthOptions};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_safeshard"));
    // A launcher's variables in the test environment must not change the mode.
    for v in [
        "OMPI_COMM_WORLD_RANK",
        "PMI_RANK",
        "SLURM_PROCID",
        "RANK",
        "WORLD_SIZE",
    ] {
        c.env_remove(v);
    }
    c
}

fn checkpoint(dir: &Path) {
    synth::write_checkpoint(dir, &SynthOptions::preset("llama-tiny").unwrap()).unwrap();
}

fn data_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let b = std::fs::read(&p).unwrap();
            let n = u64::from_le_bytes(b[..8].try_into().unwrap());
            total += b.len() as u64 - 8 - n;
        }
    }
    total
}

fn run(dir: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = bin()
        .arg("load")
        .arg(dir)
        .args(["--tp", "2", "--pp", "2", "--json", "--verify", "--digest"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_share_mode_loads_the_same_verified_bytes() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint(dir.path());
    let data = data_bytes(dir.path());
    let mut digests = Vec::new();
    for mode in ["none", "broadcast", "read-once"] {
        for io in ["mmap", "pread"] {
            let lines = run(dir.path(), &["--share", mode, "--io", io]);
            assert_eq!(lines.len(), 4);
            for (r, l) in lines.iter().enumerate() {
                assert_eq!(l["rank"], r);
                assert_eq!(l["verified"], l["tensors"], "{mode} rank {r}");
            }
            let d: Vec<String> = lines.iter().map(|l| l["sha256"].to_string()).collect();
            digests.push(d);
            let read: u64 = lines
                .iter()
                .map(|l| l["read_bytes"].as_u64().unwrap())
                .sum();
            if mode == "read-once" {
                // Once per job: the data (less skipped buffers such as rotary inv_freq) plus at
                // most two partial pages per owner piece.
                assert!(
                    read >= data - data / 100 && read <= data + 4 * 2 * 4096,
                    "{io}: {read} vs {data}"
                );
            }
        }
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn a_truncated_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint(dir.path());
    // Plan first (headers intact), then truncate inside the data: the header check sees it.
    let f = dir.path().join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    for mode in ["none", "read-once"] {
        let out = bin()
            .arg("load")
            .arg(dir.path())
            .args(["--tp", "2", "--pp", "2", "--share", mode])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn launcher_environment_errors() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint(dir.path());
    let out = bin()
        .arg("load")
        .arg(dir.path())
        .args(["--tp", "2"])
        .env("SLURM_PROCID", "one")
        .env("SLURM_NTASKS", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLURM_PROCID=\"one\""));
    if !cfg!(feature = "mpi") {
        // Started by a launcher without MPI: --share broadcast/read-once need MPI and say so
        // in one line; plain `load` (share none) loads the launcher's rank in this process,
        // the same bytes as --rank.
        let launched = |extra: &[&str]| {
            bin()
                .arg("load")
                .arg(dir.path())
                .args(["--tp", "2", "--json", "--digest"])
                .args(extra)
                .env("RANK", "1")
                .env("WORLD_SIZE", "2")
                .output()
                .unwrap()
        };
        let out = launched(&["--share", "broadcast"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("built"), "{err}");
        assert!(
            err.contains("without it") && err.contains("rank 1 of 2"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
        let out = launched(&[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value =
            serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(line["rank"], 1);
        let alone = bin()
            .arg("load")
            .arg(dir.path())
            .args(["--tp", "2", "--json", "--digest", "--rank", "1"])
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap();
        let alone: serde_json::Value =
            serde_json::from_slice(alone.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(line["sha256"], alone["sha256"]);
        assert!(line["sha256"].is_string());
        // A launcher world that does not match the topology is refused.
        let out = bin()
            .arg("load")
            .arg(dir.path())
            .args(["--tp", "4", "--json"])
            .env("RANK", "1")
            .env("WORLD_SIZE", "2")
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0));
    }
    // --rank that contradicts the launcher's rank is a usage error; the matching one loads.
    let with_rank = |r: &str| {
        bin()
            .arg("load")
            .arg(dir.path())
            .args(["--tp", "2", "--json", "--rank", r])
            .env("OMPI_COMM_WORLD_RANK", "1")
            .env("OMPI_COMM_WORLD_SIZE", "2")
            .output()
            .unwrap()
    };
    let out = with_rank("0");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--rank 0") && err.contains("rank 1 of 2"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = with_rank("1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["rank"], 1);
}

/// `load --share MODE` (threads) and `load --all-ranks` (each rank reads its own slices) hold
/// the same bytes per rank, and print the same keys for the same things.
#[test]
fn share_modes_equal_all_ranks() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint(dir.path());
    let all = bin()
        .arg("load")
        .arg(dir.path())
        .args([
            "--tp",
            "2",
            "--pp",
            "2",
            "--all-ranks",
            "--json",
            "--digest",
        ])
        .output()
        .unwrap();
    assert!(
        all.status.success(),
        "{}",
        String::from_utf8_lossy(&all.stderr)
    );
    let all: Vec<serde_json::Value> = String::from_utf8(all.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(all.len(), 4);
    for mode in ["broadcast", "read-once", "none"] {
        let shared = run(dir.path(), &["--share", mode]);
        assert_eq!(shared.len(), 4);
        for (a, s) in all.iter().zip(&shared) {
            for k in ["rank", "tp_rank", "pp_rank", "tensors", "bytes", "sha256"] {
                assert_eq!(a[k], s[k], "{mode}: {k}");
            }
            let (ak, sk): (Vec<_>, Vec<_>) = (
                a.as_object().unwrap().keys().collect(),
                s.as_object().unwrap().keys().collect(),
            );
            assert_eq!(ak, sk, "{mode}: the two paths print different keys");
            assert_eq!(s["share"], mode);
            assert_eq!(a["share"], "none");
        }
    }
    // The hidden old name still works (and always prints the digest).
    let old = bin()
        .arg("dist-load")
        .arg(dir.path())
        .args(["--tp", "2", "--pp", "2", "--share", "broadcast", "--json"])
        .output()
        .unwrap();
    assert!(
        old.status.success(),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    let old: Vec<serde_json::Value> = String::from_utf8(old.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let d = |v: &[serde_json::Value]| v.iter().map(|l| l["sha256"].clone()).collect::<Vec<_>>();
    assert_eq!(d(&old), d(&all));
    let help = bin().arg("--help").output().unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("dist-load"));
}

/// Issue 9 item 3: `--round` has one minimum (64 KiB) on every path, `load` included; smaller
/// rounds are usage errors naming the flag, never hangs.
#[test]
fn small_rounds_and_bad_timeouts_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    checkpoint(dir.path());
    for (flag, value) in [
        ("--round", "0"),
        ("--round", "100"),
        ("--round", "65535"),
        ("--timeout", "0"),
        ("--timeout", "soon"),
    ] {
        for cmd in ["load", "dist-load"] {
            if cmd == "dist-load" && flag == "--timeout" {
                continue;
            }
            let start = std::time::Instant::now();
            let out = bin()
                .arg(cmd)
                .arg(dir.path())
                .args(["--tp", "2", "--share", "read-once", flag, value])
                .output()
                .unwrap();
            assert!(start.elapsed() < std::time::Duration::from_secs(30));
            assert_eq!(out.status.code(), Some(2), "{cmd} {flag} {value}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(flag) && err.contains(value), "{err}");
        }
    }
    // The smallest round and a short timeout load and verify.
    let lines = run(
        dir.path(),
        &[
            "--share",
            "read-once",
            "--round",
            "64KiB",
            "--timeout",
            "30s",
        ],
    );
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().all(|l| l["verified"] == l["tensors"]));
}
