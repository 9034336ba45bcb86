//! `safeshard load` end to end, and the library's file-safety guarantees on real checkpoints.

use crate::common;

use std::path::Path;
use std::process::Command;

use safeshard::load::{IoMode, LoadOptions};
use safeshard::synth::SynthOptions;
use safeshard::topology::Topology;
use safeshard::Job;

fn load(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_safeshard"));
    // Without --rank/--all-ranks a launcher's variables would select the distributed path.
    for v in ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "RANK"] {
        c.env_remove(v);
    }
    c.arg("load").arg(dir).args(args).output().unwrap()
}

fn json_lines(o: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `--all-ranks --verify --json` for a preset and topologies: every rank loads, every tensor
/// matches the slow path, and the JSON has the promised fields.
fn verify_all(preset: &str, topologies: &[(usize, usize, &str)]) {
    let opts = SynthOptions::preset(preset).unwrap();
    let dir = common::write_preset(&opts);
    for &(tp, pp, io) in topologies {
        let o = load(
            dir.path(),
            &[
                "--tp",
                &tp.to_string(),
                "--pp",
                &pp.to_string(),
                "--all-ranks",
                "--verify",
                "--json",
                "--io",
                io,
            ],
        );
        assert!(
            o.status.success(),
            "{preset} tp={tp} pp={pp} {io}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let lines = json_lines(&o);
        assert_eq!(lines.len(), tp * pp, "{preset}: one line per rank");
        for (r, v) in lines.iter().enumerate() {
            assert_eq!(v["rank"], r);
            for k in ["tensors", "bytes", "read_bytes", "seconds"] {
                assert!(v.get(k).is_some(), "missing {k}");
            }
            assert_eq!(v["verified"], v["tensors"], "{preset} rank {r}");
            assert!(v["tensors"].as_u64().unwrap() > 0);
            assert!(v["read_bytes"].as_u64().unwrap() > 0);
        }
    }
}

#[test]
fn every_rank_verifies_llama_family() {
    verify_all(
        "llama-tiny",
        &[
            (1, 1, "mmap"),
            (2, 2, "pread"),
            (4, 1, "mmap"),
            (8, 1, "pread"),
        ],
    );
    verify_all("mistral-tiny", &[(2, 1, "mmap"), (4, 2, "mmap")]);
    verify_all("qwen2-tiny", &[(2, 2, "mmap")]);
}

#[test]
fn every_rank_verifies_other_architectures() {
    for preset in [
        "phi3-tiny",
        "gpt2-tiny",
        "mixtral-tiny",
        "qwen2-moe-tiny",
        "deepseek-v3-tiny",
    ] {
        verify_all(preset, &[(1, 1, "mmap"), (2, 1, "pread"), (2, 2, "mmap")]);
    }
}

#[test]
fn views_and_single_rank_output() {
    let opts = SynthOptions::preset("llama-tiny").unwrap();
    let dir = common::write_preset(&opts);
    let o = load(
        dir.path(),
        &["--tp", "2", "--rank", "1", "--views", "--verify", "--json"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["rank"], 1);
    assert!(lines[0]["view_bytes"].as_u64().unwrap() > 0);
    let o = load(dir.path(), &["--tp", "2", "--rank", "1"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("rank 1 (dp 0, pp 0, tp 1): "), "{text}");
    assert!(text.contains("GB/s"));
}

#[test]
fn the_json_says_what_the_engine_chose() {
    let opts = SynthOptions::preset("llama-tiny").unwrap();
    let dir = common::write_preset(&opts);
    let keys = ["pread", "mmap", "direct"];
    for io in ["pread", "mmap", "direct", "auto"] {
        let o = load(
            dir.path(),
            &[
                "--tp",
                "2",
                "--rank",
                "1",
                "--json",
                "--io",
                io,
                "--threads",
                "3",
            ],
        );
        assert!(
            o.status.success(),
            "{io}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v = &json_lines(&o)[0];
        assert_eq!(v["io"], io);
        assert_eq!(v["threads"], 3, "{io}: {v}");
        let by: Vec<u64> = keys
            .iter()
            .map(|k| v["io_bytes"][k].as_u64().unwrap())
            .collect();
        let total: u64 = by.iter().sum();
        // Every copied byte is counted once, on one path; the rank's bytes also hold
        // vocab padding, which is zero-filled, not read.
        assert!(
            total > 0 && total <= v["bytes"].as_u64().unwrap(),
            "{io}: {v}"
        );
        if io == "auto" {
            assert!(keys.contains(&v["io_chosen"].as_str().unwrap()), "{v}");
        } else {
            // A forced engine reads everything its own way.
            assert_eq!(v["io_chosen"], io, "{v}");
            let i = keys.iter().position(|k| *k == io).unwrap();
            assert_eq!(by[i], total, "{io}: {v}");
        }
    }
    let o = load(dir.path(), &["--tp", "2", "--rank", "1", "--threads", "3"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(" on 3 threads)"), "{text}");
}

#[test]
fn usage_errors_exit_2() {
    let opts = SynthOptions::preset("llama-tiny").unwrap();
    let dir = common::write_preset(&opts);
    for args in [
        vec!["--tp", "2"],
        vec!["--tp", "2", "--rank", "2"],
        vec!["--rank", "0", "--all-ranks"],
        vec!["--rank", "0", "--io", "nfs"],
        vec!["--rank", "0", "--share", "broadcast"],
        vec!["--all-ranks", "--share", "none"],
        vec!["--tp", "2", "--share", "everything"],
        vec!["--tp", "2", "--share", "none", "--views"],
    ] {
        let o = load(dir.path(), &args);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn first_file(job: &Job) -> std::path::PathBuf {
    let f = job.plan.ranks[0].copies[0].file as usize;
    job.plan.files[f].path.clone()
}

#[test]
fn file_truncated_after_planning_is_a_clean_error() {
    let opts = SynthOptions::preset("llama-tiny").unwrap();
    let dir = common::write_preset(&opts);
    let job = Job::open(dir.path(), Topology::new(2, 1, 1, 1).unwrap(), None, &[]).unwrap();
    let path = first_file(&job);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    drop(f);
    for io in [IoMode::Mmap, IoMode::Pread] {
        let e = job
            .load_rank(
                0,
                &LoadOptions {
                    io,
                    ..LoadOptions::default()
                },
            )
            .unwrap_err();
        assert!(!e.is_usage());
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            e.to_string().contains(&name) && e.to_string().contains("truncated"),
            "{e}"
        );
    }
    // The CLI (which plans from the truncated file) also fails cleanly, naming the file.
    let o = load(dir.path(), &["--tp", "2", "--rank", "0"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&*path.file_name().unwrap().to_string_lossy()),
        "{err}"
    );
}

#[test]
fn file_replaced_after_planning_is_a_clean_error() {
    let opts = SynthOptions::preset("llama-tiny").unwrap();
    let dir = common::write_preset(&opts);
    let job = Job::open(dir.path(), Topology::new(2, 1, 1, 1).unwrap(), None, &[]).unwrap();
    let path = first_file(&job);
    // Same length, new inode and mtime.
    let bytes = std::fs::read(&path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let tmp = dir.path().join("replacement.tmp");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let e = job.load_rank(0, &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("replaced"), "{e}");
    assert!(!e.is_usage());
}

#[test]
fn demo_runs_and_verifies_every_rank() {
    let o = Command::new(env!("CARGO_BIN_EXE_safeshard"))
        .arg("demo")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.matches("verified").count(), 9, "{text}");
    for r in 0..8 {
        assert!(text.contains(&format!("rank {r} (dp 0, pp {}, tp {})", r / 4, r % 4)));
    }
    assert!(text.contains("memcpy"));
}
