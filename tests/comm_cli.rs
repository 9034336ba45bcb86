//! `safeshard dist-load` without a launcher (all ranks on threads): every share mode loads
//! the same bytes, verified against the slow path; read-once reads the checkpoint once.

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
        .arg("dist-load")
        .arg(dir)
        .args(["--tp", "2", "--pp", "2", "--json", "--verify"])
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
            .arg("dist-load")
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
        .arg("dist-load")
        .arg(dir.path())
        .args(["--tp", "2"])
        .env("SLURM_PROCID", "one")
        .env("SLURM_NTASKS", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLURM_PROCID=\"one\""));
    if !cfg!(feature = "mpi") {
        let out = bin()
            .arg("dist-load")
            .arg(dir.path())
            .args(["--tp", "2"])
            .env("RANK", "1")
            .env("WORLD_SIZE", "2")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("built without MPI"));
    }
}
