//! Issue 9 item 5: a shard truncated by another process *while* it is being loaded never
//! kills safeshard with SIGBUS and never blames the output file. Every try either fails with
//! exit 1 and an error naming the input file, or (when the truncation came too late or too
//! early to matter) succeeds with exactly the bytes of an undisturbed run.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use safeshard::synth::{self, SynthOptions};
use serde_json::json;

/// One Llama layer (2048 hidden, 14336 intermediate) with a small vocabulary: about 260 MB
/// in one file, large enough that loading it takes a while.
fn write_checkpoint(dir: &Path) {
    let cfg = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": 2048, "intermediate_size": 14336, "num_hidden_layers": 1,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 8192,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": false
    });
    let opts = SynthOptions::from_config(cfg).unwrap();
    synth::write_checkpoint(dir, &opts).unwrap();
}

fn shard(dir: &Path) -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    v.pop().unwrap()
}

fn safeshard(args: &[std::ffi::OsString]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_safeshard"));
    for v in ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "RANK"] {
        c.env_remove(v);
    }
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Runs `cmd`, truncating `file` to `keep` bytes after `delay`; returns the output. The
/// file is left truncated.
fn run_truncating(mut cmd: Command, file: &Path, keep: u64, delay: Duration) -> Output {
    let child = cmd.spawn().unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(keep)
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Checks one disturbed run: no signal; exit 0 with `want` stdout-derived digests, or exit 1
/// with one error naming the input file and not `forbidden` (the output directory).
fn check(o: &Output, input: &Path, forbidden: Option<&Path>, ok: impl Fn(&Output)) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.signal(),
        None,
        "killed by a signal (7 is SIGBUS): {err}"
    );
    match o.status.code() {
        Some(0) => ok(o),
        Some(1) => {
            let name = input.file_name().unwrap().to_string_lossy();
            assert!(err.contains(&*name), "error does not name {name}: {err}");
            if let Some(out) = forbidden {
                assert!(
                    !err.contains(&*out.to_string_lossy()),
                    "error names the output: {err}"
                );
            }
            assert!(!err.contains("Bad address"), "{err}");
        }
        other => panic!("exit {other:?}: {err}"),
    }
}

/// Writes back the bytes of `file` from `keep` on, as they were.
fn restore(file: &Path, original: &[u8], keep: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(&original[keep as usize..], keep).unwrap();
}

fn digests(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["sha256"].as_str().unwrap().to_string()
        })
        .collect()
}

/// `load --all-ranks --digest` under every engine, and `reshard`, while the shard shrinks.
#[test]
fn truncation_during_load_is_an_error_naming_the_input_never_sigbus() {
    let ck = tempfile::tempdir().unwrap();
    write_checkpoint(ck.path());
    let file = shard(ck.path());
    let original = std::fs::read(&file).unwrap();
    let full = original.len() as u64;
    let load_args = |io: &str| -> Vec<std::ffi::OsString> {
        ["load".as_ref(), ck.path().as_os_str()]
            .into_iter()
            .map(|s: &std::ffi::OsStr| s.to_owned())
            .chain(["--tp", "2", "--all-ranks", "--json", "--digest", "--io", io].map(Into::into))
            .collect()
    };
    // Undisturbed digests, per engine (every engine gives the same bytes).
    let clean_args = load_args("pread");
    let clean = safeshard(&clean_args).output().unwrap();
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let want = digests(&clean);
    assert_eq!(want.len(), 2);
    let out = tempfile::tempdir().unwrap();
    let reshard_args: Vec<std::ffi::OsString> = vec![
        "reshard".into(),
        ck.path().into(),
        "--tp".into(),
        "2".into(),
        "--out".into(),
        out.path().into(),
    ];
    let clean_reshard = tempfile::tempdir().unwrap();
    let mut clean_reshard_args = reshard_args.clone();
    clean_reshard_args[5] = clean_reshard.path().into();
    let o = safeshard(&clean_reshard_args).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let parts = |d: &Path| -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let want_parts = parts(clean_reshard.path());
    // Keep the header and the first third of the data: later tensors vanish mid-copy.
    let keep = full / 3;
    let mut failures = 0;
    for (i, delay_ms) in [0u64, 30, 80, 150, 300].into_iter().enumerate() {
        let delay = Duration::from_millis(delay_ms);
        for io in ["auto", "mmap", "pread"] {
            let args = load_args(io);
            let o = run_truncating(safeshard(&args), &file, keep, delay);
            check(&o, &file, None, |o| assert_eq!(digests(o), want, "{io}"));
            failures += (o.status.code() == Some(1)) as usize;
            if o.status.code() == Some(1) {
                eprintln!(
                    "{io} after {delay_ms} ms: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            restore(&file, &original, keep);
        }
        if i % 2 == 0 {
            let o = run_truncating(safeshard(&reshard_args), &file, keep, delay);
            check(&o, &file, Some(out.path()), |_| {
                assert!(parts(out.path()) == want_parts, "reshard output differs")
            });
            if o.status.code() == Some(1) {
                eprintln!(
                    "reshard after {delay_ms} ms: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            failures += (o.status.code() == Some(1)) as usize;
            restore(&file, &original, keep);
        }
    }
    // At a delay of 0 the truncation lands before or during the first reads: never all clean.
    assert!(failures > 0, "no try saw the truncation");
}
