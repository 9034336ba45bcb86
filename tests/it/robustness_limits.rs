//! Hostile input, second part (issue 9 items 6, 7, 8, 10): names with control characters are
//! escaped wherever they are printed, buffers sized by input fail with an error instead of an
//! abort, outputs are locked and never overlap their input, and a hostile spec word is cheap.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use safeshard::synth::{self, SynthOptions};
use safeshard::{Checkpoint, Error};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_safeshard"));
    c.stdin(Stdio::null());
    c
}

fn tiny(dir: &Path) {
    let opts = SynthOptions::preset("llama-tiny").unwrap();
    synth::write_checkpoint(dir, &opts).unwrap();
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Exit `code`, and stderr is exactly one `error:` line without raw control bytes (stdout
/// too), containing every needle.
fn one_clean_error(o: &Output, code: i32, needles: &[&str]) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err:?}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert!(!lines.is_empty(), "no error line: {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    // Spec errors add the source line and a caret, indented; nothing else follows.
    assert!(
        lines[1..].iter().all(|l| l.starts_with("    ")),
        "one error line: {err:?}"
    );
    for stream in [&o.stderr, &o.stdout] {
        let raw = stream
            .iter()
            .any(|&b| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f);
        assert!(!raw, "raw control bytes: {:?}", text(stream));
    }
    assert!(
        !text(&o.stdout).lines().any(|l| l.starts_with("error:")),
        "{o:?}"
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err:?}");
    }
}

const HOSTILE: &str = "\u{1b}]0;title\u{7}\nerror: forged";

#[test]
fn a_file_name_with_control_characters_is_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{HOSTILE}.safetensors"));
    std::fs::write(&path, b"abc").unwrap();
    let o = bin().arg("inspect").arg(&path).output().unwrap();
    one_clean_error(
        &o,
        1,
        &["\\u{1b}]0;title\\u{7}\\nerror: forged.safetensors"],
    );
}

#[test]
fn an_index_entry_with_control_characters_is_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": {"w": format!("{HOSTILE}.safetensors")},
    });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let o = bin().arg("inspect").arg(dir.path()).output().unwrap();
    one_clean_error(&o, 1, &["\\u{1b}"]);
}

#[test]
fn config_strings_and_overrides_with_control_characters_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["architectures"] = serde_json::json!([HOSTILE]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let o = bin().arg("plan").arg(dir.path()).output().unwrap();
    one_clean_error(&o, 1, &["\\u{1b}"]);
    // An override whose value is a control-character string.
    let o = bin()
        .arg("plan")
        .arg(dir.path())
        .args(["--spec", "llama", "--set"])
        .arg(format!("num_key_value_heads={HOSTILE}"))
        .output()
        .unwrap();
    assert!(matches!(o.status.code(), Some(1 | 2)), "{o:?}");
    one_clean_error(&o, o.status.code().unwrap_or(0), &[]);
}

#[test]
fn a_spec_path_with_control_characters_is_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join(format!("{HOSTILE}.shard"));
    std::fs::write(&spec, "model.* bogus_action\n").unwrap();
    let o = bin().args(["spec", "check"]).arg(&spec).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = text(&o.stderr);
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "{err:?}");
    assert!(
        err.lines()
            .next()
            .unwrap_or("")
            .contains("\\nerror: forged.shard:1:"),
        "{err:?}"
    );
    assert_eq!(
        err.matches("error:").count(),
        2,
        "one real, one escaped: {err:?}"
    );
}

/// The 8 MB first word that took 24 s and 856 MB in did-you-mean.
#[test]
fn an_8_mb_spec_word_fails_fast() {
    let word = "a".repeat(8 << 20);
    // The same word at the limits: a long pattern, and a long line of several words.
    let long_pattern = "a".repeat(5000);
    let many_words = "a ".repeat(300_000);
    for source in [
        format!("{word} split col\n"),
        format!("model.x {word}\n"),
        format!("{word}\n"),
        format!("{long_pattern} replicate\n"),
        format!("{many_words}\n"),
    ] {
        let t = Instant::now();
        let e = safeshard::sharding::Spec::parse(&source, "big.shard").unwrap_err();
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}: {e}");
        assert!(!e.to_string().contains("did you mean"), "{e}");
    }
    // Through the binary: one error (plus its source and caret lines), quickly.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("big.shard");
    std::fs::write(&spec, format!("{word} split col\n")).unwrap();
    let t = Instant::now();
    let o = bin().args(["spec", "check"]).arg(&spec).output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("error: "),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn near_misses_still_get_suggestions() {
    for (source, hint) in [
        ("m.w  spilt(dim=0)\n", "did you mean `split`?"),
        ("layres 4 extra\n", "did you mean `layers`?"),
    ] {
        let e = safeshard::sharding::Spec::parse(source, "s.shard").unwrap_err();
        assert!(e.to_string().contains(hint), "{e}");
    }
}

/// A tensor too large to allocate (a crafted catalog entry of 1 PiB, beyond any address
/// space) is an OutOfMemory error naming it, not an abort.
#[test]
fn verify_of_an_unallocatable_tensor_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let mut info = ckpt.tensors()[0].clone();
    info.bytes = 1 << 50;
    let e = safeshard::load::read_tensor(&ckpt, &info).unwrap_err();
    match &e {
        Error::OutOfMemory { bytes, what, .. } => {
            assert_eq!(*bytes, 1 << 50);
            assert!(what.contains(&info.name), "{what}");
        }
        other => panic!("not OutOfMemory: {other:?}"),
    }
}

#[test]
fn verify_out_of_memory_through_the_binary_names_rank_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let o = bin()
        .env("SAFESHARD_MAX_ALLOC", "64")
        .arg("load")
        .arg(dir.path())
        .args(["--tp", "2", "--rank", "1", "--verify"])
        .output()
        .unwrap();
    one_clean_error(&o, 1, &["rank 1", "cannot allocate", "tensor \"model."]);
}

fn reshard(src: &Path, out: &Path, tp: &str) -> Command {
    let mut c = bin();
    c.arg("reshard")
        .arg(src)
        .args(["--tp", tp, "--out"])
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    walk(dir).into_iter().collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn reshard_refuses_an_output_overlapping_its_input_before_writing() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("ckpt");
    tiny(&src);
    let before = listing(root.path());
    let cases = [
        src.clone(),
        src.join("."),
        src.join("sub/deeper"),
        root.path().to_path_buf(),
        src.join("../ckpt"),
    ];
    for out in &cases {
        let o = reshard(&src, out, "2").output().unwrap();
        one_clean_error(&o, 2, &["--out", "input directory"]);
        assert_eq!(listing(root.path()), before, "{out:?} changed the tree");
    }
    // An index file as the checkpoint: its directory is still the input directory.
    let single = root.path().join("single");
    std::fs::create_dir(&single).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, single.join(p.file_name().unwrap())).unwrap();
    }
    let index = single.join(safeshard::checkpoint::INDEX_NAME);
    let named = if index.exists() {
        index
    } else {
        std::fs::read_dir(&single)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .unwrap()
    };
    let o = reshard(&named, &single, "1").output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
}

/// Checks that `out`'s manifest and parts describe the same plan: every rank's parts hold
/// exactly the tensors the manifest lists for it, and no part belongs to another plan.
fn manifest_matches_parts(out: &Path) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("safeshard-plan.json")).unwrap()).unwrap();
    let ranks = manifest["ranks"].as_array().unwrap();
    let mut want: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (r, rank) in ranks.iter().enumerate() {
        let names = rank["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        want.insert(r, names);
    }
    let mut got: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("model-rank-") else {
            continue;
        };
        let rank: usize = rest.split('-').next().unwrap().parse().unwrap();
        let ck = Checkpoint::open(&p).unwrap();
        got.entry(rank)
            .or_default()
            .extend(ck.tensors().iter().map(|t| t.name.clone()));
    }
    assert_eq!(got, want, "parts and manifest disagree in {out:?}");
}

#[test]
fn concurrent_reshards_into_one_directory_never_mix() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("ckpt");
    tiny(&src);
    for attempt in 0..5 {
        let out = root.path().join(format!("out{attempt}"));
        // Different topologies: parts of one beside the manifest of the other would show.
        let a = reshard(&src, &out, "1").spawn().unwrap();
        let b = reshard(&src, &out, "2").spawn().unwrap();
        let results = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        for o in &results {
            match o.status.code() {
                Some(0) => {}
                Some(1) => one_clean_error(o, 1, &["another safeshard process is writing"]),
                _ => panic!("attempt {attempt}: {o:?}"),
            }
        }
        assert!(results.iter().any(|o| o.status.success()));
        manifest_matches_parts(&out);
    }
}

#[test]
fn a_locked_output_directory_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let src = root.path().join("ckpt");
    tiny(&src);
    let out = root.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let held = std::fs::File::open(&out).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let o = reshard(&src, &out, "2").output().unwrap();
    one_clean_error(&o, 1, &["another safeshard process is writing", "out"]);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    drop(held);
    let o = reshard(&src, &out, "2").output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    manifest_matches_parts(&out);
}

#[test]
fn demo_keep_that_fails_midway_leaves_nothing_loadable() {
    let root = tempfile::tempdir().unwrap();
    let keep = root.path().join("demo");
    // Verification cannot allocate: the demo fails after writing the checkpoint.
    let o = bin()
        .env("SAFESHARD_MAX_ALLOC", "64")
        .arg("demo")
        .arg("--keep")
        .arg(&keep)
        .output()
        .unwrap();
    one_clean_error(&o, 1, &["cannot allocate"]);
    assert!(!keep.exists(), "{keep:?} was left behind");
    assert_eq!(
        std::fs::read_dir(root.path()).unwrap().count(),
        0,
        "temporary directory left behind"
    );
    let o = bin()
        .arg("load")
        .arg(&keep)
        .args(["--rank", "0", "--verify"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
}

/// A file that shrinks between load and verification is a typed short read naming the file,
/// the tensor's offset and how many bytes were there.
#[test]
fn verify_after_truncation_is_a_short_read() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let job = safeshard::Job::builder(dir.path()).open().unwrap();
    let loaded = job
        .load_rank(0, &safeshard::LoadOptions::default())
        .unwrap();
    let first = &job.checkpoint().tensors()[0];
    let path = job.checkpoint().files()[first.file].path.clone();
    let keep = 3u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(first.offset + keep)
        .unwrap();
    match job.verify(&loaded) {
        Err(Error::ShortRead {
            file,
            offset,
            wanted,
            got,
        }) => {
            assert_eq!(file, path);
            assert_eq!((offset, wanted, got), (first.offset, first.bytes, keep));
        }
        other => panic!("not a short read: {other:?}"),
    }
}

/// A Hugging Face cache snapshot links its files into `blobs/`: neither the snapshot (which
/// holds config.json and the links) nor `blobs/` may be the output.
#[test]
fn reshard_guards_both_sides_of_a_linked_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let made = root.path().join("made");
    tiny(&made);
    let blobs = root.path().join("blobs");
    let snap = root.path().join("snapshots/rev");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(&made).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_owned();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let blob = blobs.join(format!("blob-{}", name.to_string_lossy()));
            std::fs::rename(&p, &blob).unwrap();
            std::os::unix::fs::symlink(&blob, snap.join(&name)).unwrap();
        } else {
            std::fs::rename(&p, snap.join(&name)).unwrap();
        }
    }
    let before = listing(root.path());
    for out in [snap.clone(), blobs.clone(), snap.join("out")] {
        let o = reshard(&snap, &out, "2").output().unwrap();
        one_clean_error(&o, 2, &["--out", "input directory"]);
        assert_eq!(listing(root.path()), before, "{out:?} changed the tree");
    }
    let out = root.path().join("out");
    let o = reshard(&snap, &out, "2").output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    manifest_matches_parts(&out);
}

#[test]
fn demo_keep_over_a_file_is_refused_before_any_work() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("f");
    std::fs::write(&file, b"keep me").unwrap();
    let o = bin().arg("demo").arg("--keep").arg(&file).output().unwrap();
    one_clean_error(&o, 2, &["--keep", "not a directory"]);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
}
