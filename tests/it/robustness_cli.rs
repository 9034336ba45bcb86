//! Hostile input through the binary: every malformed file, index, config, spec and flag must
//! end with exit 1 (bad data) or 2 (bad usage), one `error:` line naming what is wrong, no
//! panic, no signal, no hang, and no output file left looking complete.
//!
//! Valid checkpoints come from `safeshard::synth`; each case breaks one thing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safeshard::synth::{self, SynthOptions};

/// Longest any hostile case may run: they are all tiny, so more means a hang.
const DEADLINE: Duration = Duration::from_secs(20);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary with a deadline; a signal or a hang fails the test.
fn run(args: &[&str]) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_safeshard"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn safeshard");
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = so.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let status = wait_or_fail(&mut child, &format!("{args:?}"));
    let stdout = String::from_utf8_lossy(&t_out.join().expect("stdout thread")).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().expect("stderr thread")).into_owned();
    let Some(code) = status.code() else {
        panic!("safeshard {args:?} was killed by a signal ({status:?}); stderr:\n{stderr}");
    };
    Out {
        code,
        stdout,
        stderr,
    }
}

/// The error lines of stderr (warnings are allowed before the error).
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("warning:"))
        .collect()
}

/// Asserts exit `code`, one `error:` line (spec errors may add source and caret lines when
/// `context` is set) that contains every word of `words`.
fn check(o: &Out, args: &[&str], code: i32, words: &[&str], context: bool) {
    assert!(
        !o.stderr.contains("panicked") && !o.stderr.contains("overflowed its stack"),
        "{args:?}: panic: {}",
        o.stderr
    );
    assert_eq!(o.code, code, "{args:?}: exit code; stderr: {}", o.stderr);
    let lines = error_lines(&o.stderr);
    let first = lines.first().copied().unwrap_or("");
    assert!(
        first.starts_with("error: "),
        "{args:?}: stderr must start with `error: `: {}",
        o.stderr
    );
    if !context {
        assert_eq!(lines.len(), 1, "{args:?}: one error line: {}", o.stderr);
    }
    for w in words {
        assert!(first.contains(w), "{args:?}: {w:?} not in {first:?}");
    }
}

fn fails(args: &[&str], code: i32, words: &[&str]) -> Out {
    let o = run(args);
    check(&o, args, code, words, false);
    o
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// A small valid Llama checkpoint (2 files, index, config.json) in a fresh temp dir.
fn llama() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = SynthOptions::preset("llama-tiny").expect("preset");
    synth::write_checkpoint(dir.path(), &opts).expect("synth");
    dir
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read json")).expect("parse json")
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("json")).expect("write json");
}

/// A safetensors file from a raw header and data.
fn st_bytes(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(data);
    v
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(p(path)).expect("cstring");
    // SAFETY: `c` is a valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_fifo())
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// Malformed safetensors files.

#[test]
fn malformed_safetensors_files_are_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok_header = br#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let ok = st_bytes(ok_header, &[0u8; 16]);
    let deep_array = {
        let mut h = vec![b'['; 200_000];
        h.extend(vec![b']'; 200_000]);
        h
    };
    let deep_object = {
        let mut h = b"{\"a\":".repeat(100_000);
        h.push(b'1');
        h.extend(vec![b'}'; 100_000]);
        h
    };
    let deep_meta = {
        let mut h = br#"{"__metadata__":{"x":"#.to_vec();
        h.extend(vec![b'['; 100_000]);
        h.extend(vec![b']'; 100_000]);
        h.extend_from_slice(b"}}");
        h
    };
    let mut huge_len = (1u64 << 63).to_le_bytes().to_vec();
    huge_len.extend_from_slice(b"{}");
    let mut len_past_end = 1000u64.to_le_bytes().to_vec();
    len_past_end.extend_from_slice(b"{}");
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("empty", vec![], &["too short"]),
        ("short", vec![1, 2], &["too short"]),
        ("huge_len", huge_len, &["header length", "limit"]),
        ("len_past_end", len_past_end, &["past the end"]),
        ("garbage", st_bytes(b"{not json", &[]), &["JSON"]),
        ("array", st_bytes(b"[1,2]", &[]), &["JSON object"]),
        (
            "non_utf8",
            st_bytes(
                b"{\"\xff\xfe\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                &[0; 4],
            ),
            &["UTF-8"],
        ),
        (
            "bad_dtype",
            st_bytes(
                br#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            &["\"a\"", "F33"],
        ),
        (
            "overlap",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
            &["\"b\"", "overlap"],
        ),
        (
            "nan_shape",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            &["\"a\""],
        ),
        (
            "negative_shape",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            &["\"a\"", "-1"],
        ),
        (
            "float_shape",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            &["\"a\"", "floating point"],
        ),
        (
            "shape_overflow",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            &["\"a\"", "overflow"],
        ),
        (
            "offset_past_u64",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,18446744073709551616]}}"#,
                &[0; 4],
            ),
            &["\"a\""],
        ),
        (
            "negative_offset",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}"#,
                &[0; 4],
            ),
            &["\"a\""],
        ),
        ("deep_array", st_bytes(&deep_array, &[]), &["JSON"]),
        ("deep_object", st_bytes(&deep_object, &[]), &["deep_object"]),
        ("deep_metadata", st_bytes(&deep_meta, &[]), &["__metadata__"]),
        ("truncated", ok[..ok.len() - 3].to_vec(), &["truncated"]),
        ("trailing", [ok.as_slice(), b"xx"].concat(), &["trailing"]),
        ("nul_padding", st_bytes(b"{}\0\0\0\0\0\0", &[]), &["NUL"]),
        (
            "duplicate_key",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                &[0; 4],
            ),
            &["duplicate"],
        ),
        (
            "sub_byte",
            st_bytes(
                br#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
                &[0; 2],
            ),
            &["\"a\"", "whole number of bytes"],
        ),
        (
            "hole_at_start",
            st_bytes(
                br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                &[0; 8],
            ),
            &["\"a\"", "start at 0"],
        ),
    ];
    for (name, bytes, words) in cases {
        let path = dir.path().join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).expect("write case");
        let file = format!("{name}.safetensors");
        let mut words = words.to_vec();
        words.push(&file);
        fails(&["inspect", p(&path)], 1, &words);
        // The planning subcommands go through the same reader.
        fails(&["plan", p(&path), "--spec", "llama"], 1, &[&file]);
    }
}

#[test]
fn special_files_as_checkpoints_are_refused_without_blocking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo.safetensors");
    mkfifo(&fifo);
    fails(&["inspect", p(&fifo)], 1, &["fifo.safetensors"]);
    fails(&["load", p(&fifo), "--rank", "0"], 1, &["fifo.safetensors"]);

    let a = dir.path().join("loop-a.safetensors");
    let b = dir.path().join("loop-b.safetensors");
    std::os::unix::fs::symlink(&b, &a).expect("symlink");
    std::os::unix::fs::symlink(&a, &b).expect("symlink");
    fails(&["inspect", p(&a)], 1, &["loop-a.safetensors"]);

    let empty = dir.path().join("empty-dir");
    std::fs::create_dir(&empty).expect("mkdir");
    fails(&["inspect", p(&empty)], 1, &["empty-dir", "neither"]);
    fails(
        &["inspect", p(&dir.path().join("missing.safetensors"))],
        1,
        &["missing.safetensors"],
    );
    fails(&["inspect", "/dev/null"], 1, &["/dev/null"]);
}

// ---------------------------------------------------------------------------------------
// Indexes and config.json.

#[test]
fn an_index_that_is_not_a_regular_file_is_refused_not_skipped() {
    // Before: a directory or FIFO named model.safetensors.index.json was silently ignored and
    // the .safetensors files beside it were loaded instead.
    let ck = llama();
    let index = ck.path().join(safeshard::checkpoint::INDEX_NAME);
    std::fs::remove_file(&index).expect("rm index");
    std::fs::create_dir(&index).expect("mkdir index");
    fails(
        &["inspect", p(ck.path())],
        1,
        &["index.json", "regular file"],
    );
    std::fs::remove_dir(&index).expect("rmdir");
    mkfifo(&index);
    fails(
        &["inspect", p(ck.path())],
        1,
        &["index.json", "regular file"],
    );
    fails(&["plan", p(ck.path()), "--tp", "2"], 1, &["index.json"]);
}

#[test]
fn malformed_indexes_name_the_index_and_the_tensor() {
    let ck = llama();
    let index = ck.path().join(safeshard::checkpoint::INDEX_NAME);
    let good = read_json(&index);
    let tensor = "model.norm.weight";
    let set = |file: serde_json::Value| {
        let mut v = good.clone();
        v["weight_map"][tensor] = file;
        write_json(&index, &v);
    };
    let cases: Vec<(serde_json::Value, Vec<&str>)> = vec![
        (serde_json::json!("../x.safetensors"), vec![tensor, "../x"]),
        (
            serde_json::json!("/etc/passwd"),
            vec![tensor, "/etc/passwd"],
        ),
        (
            serde_json::json!("nope.safetensors"),
            vec![tensor, "nope.safetensors", "does not exist"],
        ),
        (
            serde_json::json!("model-00001-of-00002.safetensors"),
            vec![tensor, "model-00001-of-00002.safetensors"],
        ),
        (serde_json::json!(5), vec![tensor]),
        (serde_json::json!(""), vec![tensor, "empty"]),
    ];
    for (file, words) in cases {
        set(file);
        let mut words = words;
        words.push("index.json");
        fails(&["inspect", p(ck.path())], 1, &words);
        fails(&["plan", p(ck.path()), "--tp", "2"], 1, &words);
    }
    for (raw, word) in [
        (b"{oops".to_vec(), "JSON"),
        (b"[]".to_vec(), "object"),
        (br#"{"weight_map":{}}"#.to_vec(), "empty"),
        (br#"{"weight_map":[1]}"#.to_vec(), "weight_map"),
        (br#"{"weight_map":{"a":"x","a":"y"}}"#.to_vec(), "duplicate"),
        (
            [
                b"{\"weight_map\":".as_slice(),
                &[b'['; 100_000],
                &[b']'; 100_000],
                b"}",
            ]
            .concat(),
            "JSON",
        ),
    ] {
        std::fs::write(&index, raw).expect("write index");
        fails(&["inspect", p(ck.path())], 1, &["index.json", word]);
    }
}

#[test]
fn a_broken_shard_behind_an_index_names_that_shard() {
    let ck = llama();
    let shard = ck.path().join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&shard).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .expect("open");
    f.set_len(len - 1).expect("truncate");
    for args in [
        vec!["inspect", p(ck.path())],
        vec!["plan", p(ck.path()), "--tp", "2"],
        vec!["load", p(ck.path()), "--tp", "2", "--rank", "1"],
    ] {
        fails(&args, 1, &["model-00002-of-00002.safetensors", "truncated"]);
    }
}

#[test]
fn malformed_config_json_is_a_data_error_naming_config_json() {
    let ck = llama();
    let config = ck.path().join("config.json");
    for (raw, word) in [
        (b"{oops".to_vec(), "invalid JSON"),
        (b"[1]".to_vec(), "object"),
        (b"{\"a\":\"\xff\"}".to_vec(), "UTF-8"),
        (
            [
                b"{\"a\":".as_slice(),
                &[b'['; 100_000],
                &[b']'; 100_000],
                b"}",
            ]
            .concat(),
            "JSON",
        ),
    ] {
        std::fs::write(&config, raw).expect("write config");
        fails(
            &["plan", p(ck.path()), "--tp", "2"],
            1,
            &["config.json", word],
        );
    }
    std::fs::remove_file(&config).expect("rm config");
    mkfifo(&config);
    fails(&["plan", p(ck.path()), "--tp", "2"], 1, &["config.json"]);
}

#[test]
fn wrong_config_values_are_data_errors_naming_the_value() {
    let ck = llama();
    let config = ck.path().join("config.json");
    let good = read_json(&config);
    let with = |key: &str, value: Option<serde_json::Value>| {
        let mut v = good.clone();
        match value {
            Some(x) => v[key] = x,
            None => {
                v.as_object_mut().expect("object").remove(key);
            }
        }
        write_json(&config, &v);
    };
    use serde_json::json;
    let cases: Vec<(&str, Option<serde_json::Value>, Vec<&str>)> = vec![
        // num_hidden_layers = 0 used to blame `--pp 1` with the usage exit code.
        ("num_hidden_layers", Some(json!(0)), vec!["0 layers"]),
        ("num_hidden_layers", Some(json!(-1)), vec!["negative"]),
        ("num_hidden_layers", Some(json!("4")), vec!["integer"]),
        ("num_hidden_layers", Some(json!(4.5)), vec!["integer"]),
        ("num_hidden_layers", None, vec!["num_hidden_layers"]),
        ("num_key_value_heads", Some(json!(0)), vec!["count"]),
        ("num_key_value_heads", Some(json!(-2)), vec!["count"]),
        ("num_key_value_heads", Some(json!(3)), vec!["3 heads"]),
        (
            "num_key_value_heads",
            Some(json!(u64::MAX)),
            vec!["integer"],
        ),
        (
            "architectures",
            Some(json!(["Nope"])),
            vec!["Nope", "--spec"],
        ),
        ("architectures", None, vec!["architectures", "--spec"]),
        ("tie_word_embeddings", Some(json!("yes")), vec!["boolean"]),
    ];
    for (key, value, words) in cases {
        with(key, value.clone());
        for args in [
            vec!["plan", p(ck.path()), "--tp", "2", "--pp", "2"],
            vec!["load", p(ck.path()), "--tp", "2", "--rank", "0"],
            vec![
                "spec",
                "check",
                "llama",
                "--against",
                p(ck.path()),
                "--tp",
                "2",
            ],
        ] {
            // `spec check` names the spec itself, so a missing `architectures` is fine there.
            if args[0] == "spec" && key == "architectures" {
                continue;
            }
            let o = run(&args);
            check(&o, &args, 1, &words, true);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Flags.

#[test]
fn bad_flags_are_usage_errors_on_one_line() {
    let ck = llama();
    let d = p(ck.path());
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["plan", d, "--tp", "0"], vec!["--tp"]),
        (vec!["plan", d, "--pp", "0"], vec!["--pp"]),
        (vec!["plan", d, "--dp", "0"], vec!["--dp"]),
        (vec!["plan", d, "--ep", "0"], vec!["--ep"]),
        (vec!["plan", d, "--tp", "x"], vec!["--tp", "x"]),
        (vec!["plan", d, "--tp", "-1"], vec!["-1"]),
        (vec!["plan", d, "--pp", "5"], vec!["--pp 5", "4 layers"]),
        (
            vec!["plan", d, "--pp", "2", "--pp-layers", "1,2"],
            vec!["--pp-layers", "4 layers"],
        ),
        (
            vec!["plan", d, "--pp", "2", "--pp-layers", "1,1,2"],
            vec!["--pp-layers", "3 entries"],
        ),
        (
            vec!["plan", d, "--pp", "2", "--pp-layers", "a,b"],
            vec!["--pp-layers"],
        ),
        (
            vec!["plan", d, "--pp", "2", "--pp-layers", ""],
            vec!["--pp-layers"],
        ),
        // Used to panic: the sum of the entries overflowed.
        (
            vec![
                "plan",
                d,
                "--pp",
                "2",
                "--pp-layers",
                "18446744073709551615,5",
            ],
            vec!["--pp-layers"],
        ),
        (vec!["plan", d, "--ep", "2"], vec!["--ep 2"]),
        (vec!["plan", d, "--tp", "2", "--ep", "3"], vec!["--ep 3"]),
        // tp × dp in the --ep check used to overflow before the world-size check ran.
        (
            vec![
                "plan",
                d,
                "--tp",
                "99",
                "--ep",
                "7",
                "--dp",
                "186413796968473129",
            ],
            vec!["overflows"],
        ),
        (
            vec!["plan", d, "--tp", "4294967296", "--pp", "4294967296"],
            vec!["overflows"],
        ),
        // Used to build 10^8 rank plans until memory ran out.
        (
            vec!["plan", d, "--dp", "100000000"],
            vec!["100000000", "supported"],
        ),
        (
            vec!["plan", d, "--set", "foo"],
            vec!["--set foo", "KEY=VALUE"],
        ),
        (vec!["plan", d, "--set", "=5"], vec!["--set =5"]),
        (vec!["plan", d, "--spec", "nope"], vec!["nope", "shipped"]),
        (vec!["load", d], vec!["--rank"]),
        (vec!["load", d, "--rank", "1"], vec!["--rank 1"]),
        (
            vec!["load", d, "--tp", "2", "--rank", "2"],
            vec!["--rank 2"],
        ),
        (
            vec!["load", d, "--rank", "18446744073709551615"],
            vec!["--rank"],
        ),
        (
            vec!["load", d, "--rank", "0", "--all-ranks"],
            vec!["--all-ranks"],
        ),
        (
            vec!["load", d, "--rank", "0", "--io", "xyz"],
            vec!["--io", "xyz"],
        ),
        (
            vec!["load", d, "--rank", "0", "--arena", "xx"],
            vec!["--arena"],
        ),
        (
            vec!["load", d, "--rank", "0", "--staging-budget", "garbage"],
            vec!["--staging-budget"],
        ),
        (
            vec![
                "load",
                d,
                "--rank",
                "0",
                "--staging-budget",
                "99999999999999999999GB",
            ],
            vec!["--staging-budget"],
        ),
        (vec!["reshard", d], vec!["--out"]),
        (
            vec!["reshard", d, "--out", "x", "--max-shard-size", "garbage"],
            vec!["--max-shard-size"],
        ),
        (vec!["spec", "check", "llama", "--tp", "0"], vec!["--tp"]),
        (vec!["spec", "list", "extra"], vec!["extra"]),
        (vec!["inspect", d, d], vec!["unexpected argument"]),
        (vec!["bogus"], vec!["bogus"]),
        // Used to print the whole help text to stderr.
        (vec![], vec!["needs a subcommand", "inspect", "load"]),
        (
            vec!["spec"],
            vec!["spec needs a subcommand", "list", "check"],
        ),
    ];
    for (args, words) in cases {
        fails(&args, 2, &words);
    }
    // Help and version still go to stdout with status 0.
    for args in [vec!["--help"], vec!["plan", "--help"], vec!["--version"]] {
        let o = run(&args);
        assert_eq!(o.code, 0, "{args:?}: {}", o.stderr);
        assert!(!o.stdout.is_empty() && o.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn splits_that_do_not_divide_name_the_tensor_and_tp() {
    let ck = llama();
    fails(
        &["plan", p(ck.path()), "--tp", "3"],
        1,
        &["model.embed_tokens.weight", "tp = 3"],
    );
    fails(
        &["plan", p(ck.path()), "--tp", "18446744073709551615"],
        2,
        &["supported"],
    );
}

// ---------------------------------------------------------------------------------------
// Outputs: never replace what is not ours, never leave a partial file.

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(".tmp"))
        })
        .collect()
}

#[test]
fn plan_svg_never_replaces_a_special_file_and_leaves_no_temp_file() {
    let ck = llama();
    let out = tempfile::tempdir().expect("tempdir");
    // `--svg /dev/full` used to rename the picture over the device node (as root).
    let fifo = out.path().join("picture.svg");
    mkfifo(&fifo);
    fails(
        &["plan", p(ck.path()), "--svg", p(&fifo)],
        2,
        &["--svg", "picture.svg", "not a regular file"],
    );
    assert!(is_fifo(&fifo), "the FIFO must still be there");
    fails(
        &["plan", p(ck.path()), "--svg", p(out.path())],
        2,
        &["--svg", "not a regular file"],
    );
    assert!(out.path().is_dir());
    let missing = out.path().join("no-such-dir").join("x.svg");
    let o = fails(
        &["plan", p(ck.path()), "--svg", p(&missing)],
        1,
        &["no-such-dir"],
    );
    assert!(
        !o.stderr.contains(".svg.tmp"),
        "no temp name in {}",
        o.stderr
    );
    assert!(leftovers(out.path()).is_empty());

    // A good run writes a complete, readable SVG.
    let svg = out.path().join("ok.svg");
    let o = run(&["plan", p(ck.path()), "--tp", "2", "--svg", p(&svg)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let body = std::fs::read_to_string(&svg).expect("svg");
    assert!(body.trim_end().ends_with("</svg>"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&svg).expect("stat").permissions().mode();
    assert_eq!(mode & 0o044, 0o044, "svg readable by others: {mode:o}");
    assert!(leftovers(out.path()).is_empty());
}

#[test]
fn reshard_out_that_cannot_be_a_directory_is_a_clean_error() {
    let ck = llama();
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    fails(
        &["reshard", p(ck.path()), "--out", p(&file)],
        1,
        &["a-file"],
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"x");
    let o = run(&["reshard", p(ck.path()), "--out", "/dev/null"]);
    check(
        &o,
        &["reshard", "--out", "/dev/null"],
        1,
        &["/dev/null"],
        false,
    );
    assert!(o.stdout.is_empty(), "nothing reported as written");
}

#[test]
fn inspect_escapes_control_characters_in_tensor_names() {
    // A name from a file must not break the table's lines or reach the terminal as an
    // escape sequence.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ctrl.safetensors");
    let header = br#"{"a\nb\u001b[31m":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    std::fs::write(&path, st_bytes(header, &[0; 4])).expect("write");
    let o = run(&["inspect", p(&path)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(!o.stdout.contains('\u{1b}'), "raw escape: {:?}", o.stdout);
    let row = o
        .stdout
        .lines()
        .find(|l| l.contains("ctrl.safetensors"))
        .expect("tensor row");
    assert!(row.starts_with(r"a\nb\u{1b}[31m"), "{row:?}");
    // JSON output keeps the exact name (JSON escapes it itself).
    let o = run(&["inspect", p(&path), "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    assert_eq!(v["tensors"][0]["name"], "a\nb\u{1b}[31m");
}

#[test]
fn a_non_utf8_file_name_in_a_checkpoint_directory_is_named_as_such() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = st_bytes(
        br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0; 4],
    );
    let name = std::ffi::OsStr::from_bytes(b"x\xff.safetensors");
    std::fs::write(dir.path().join(name), ok).expect("write");
    // Used to say the file "does not exist" (its lossy name was opened instead).
    fails(&["inspect", p(dir.path())], 1, &["not valid UTF-8"]);
}

/// Runs with stdout closed from the start (`| head` that already exited) or on a full disk.
fn run_with_stdout(args: &[&str], stdout: Stdio) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_safeshard"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut se = child.stderr.take().expect("stderr");
    let t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = se.read_to_end(&mut s);
        s
    });
    let status = wait_or_fail(&mut child, &format!("{args:?}"));
    let stderr = String::from_utf8_lossy(&t.join().expect("join")).into_owned();
    let code = status
        .code()
        .unwrap_or_else(|| panic!("{args:?}: killed by a signal: {stderr}"));
    (code, stderr)
}

#[test]
fn a_closed_or_full_stdout_is_not_a_panic() {
    let ck = llama();
    let d = p(ck.path());
    let out = tempfile::tempdir().expect("tempdir");
    let rs = out.path().join("rs");
    let commands: Vec<Vec<&str>> = vec![
        vec!["inspect", d],
        vec!["plan", d, "--tp", "2"],
        vec!["load", d, "--tp", "2", "--all-ranks"],
        vec!["reshard", d, "--tp", "2", "--out", p(&rs)],
        vec!["spec", "list"],
        vec!["demo"],
    ];
    for args in &commands {
        // A reader that went away: like `| head`, quietly successful.
        let (r, w) = std::io::pipe().expect("pipe");
        drop(r);
        let (code, stderr) = run_with_stdout(args, Stdio::from(w));
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(code, 0, "{args:?}: {stderr}");
        // A full device: exit 1 with one error line.
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let (code, stderr) = run_with_stdout(args, Stdio::from(full));
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(code, 1, "{args:?}: {stderr}");
        let lines = error_lines(&stderr);
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(
            lines[0].starts_with("error: <stdout>"),
            "{args:?}: {stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Specs: nesting, cycles, backtracking, special files, names from files in messages.

fn write_spec(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write spec");
    path
}

#[test]
fn deeply_nested_spec_expressions_are_errors_not_stack_overflows() {
    let ck = llama();
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 100_000;
    let cases = [
        (
            "parens",
            format!(
                "let a = {}1{}\n** replicate if a == 1\n",
                "(".repeat(n),
                ")".repeat(n)
            ),
        ),
        (
            "nots",
            format!("let a = {}true\n** replicate if a\n", "!".repeat(n)),
        ),
        (
            "negs",
            format!("let a = {}1\n** replicate if a == 1\n", "-".repeat(n)),
        ),
        (
            "chain",
            format!("let a = 1{}\n** replicate if a == 1\n", "+1".repeat(n)),
        ),
        (
            "lists",
            format!(
                "** fused(dim=0, parts={}1{})\n",
                "[".repeat(n),
                "]".repeat(n)
            ),
        ),
    ];
    for (name, text) in cases {
        let spec = write_spec(dir.path(), &format!("{name}.shard"), &text);
        for args in [
            vec!["spec", "check", p(&spec)],
            vec!["plan", p(ck.path()), "--spec", p(&spec)],
        ] {
            let o = run(&args);
            check(
                &o,
                &args,
                1,
                &[&format!("{name}.shard:"), "nested too deeply"],
                true,
            );
        }
    }
}

#[test]
fn a_very_long_let_chain_is_an_error_not_a_stack_overflow() {
    let ck = llama();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = String::new();
    for i in 0..20_000 {
        text.push_str(&format!("let a{i} = a{} + 1\n", i + 1));
    }
    text.push_str("let a20000 = 0\n** replicate if a0 == 20000\n");
    let spec = write_spec(dir.path(), "chain.shard", &text);
    let args = ["plan", p(ck.path()), "--spec", p(&spec)];
    let o = run(&args);
    check(
        &o,
        &args,
        1,
        &["chain.shard:", "nested too deeply when evaluated"],
        true,
    );
    // A chain of ordinary length still evaluates.
    let mut text = String::new();
    for i in 0..50 {
        text.push_str(&format!("let a{i} = a{} + 1\n", i + 1));
    }
    text.push_str("let a50 = 0\n** replicate if a0 == 50\n");
    let spec = write_spec(dir.path(), "short.shard", &text);
    let o = run(&["plan", p(ck.path()), "--spec", p(&spec)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn many_double_star_segments_do_not_backtrack_exponentially() {
    let ck = llama();
    let dir = tempfile::tempdir().expect("tempdir");
    // Used to run for minutes: 30 `**` before a literal that never matches.
    let stars = vec!["**"; 30].join(".");
    let spec = write_spec(
        dir.path(),
        "stars.shard",
        &format!("{stars}.x replicate\n** replicate\n"),
    );
    let o = run(&["plan", p(ck.path()), "--spec", p(&spec)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("matches no tensor"), "{}", o.stderr);
    // Several `*` inside one segment against a long name.
    let spec = write_spec(
        dir.path(),
        "star.shard",
        &format!("model.{}q replicate\n** replicate\n", "*e".repeat(30)),
    );
    let o = run(&["plan", p(ck.path()), "--spec", p(&spec)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // And the matching still captures: a layer rule with `**` around it places layers.
    let spec = write_spec(
        dir.path(),
        "mid.shard",
        "**.layers.{layer}.**.weight replicate\n** replicate\n",
    );
    let o = run(&[
        "plan",
        p(ck.path()),
        "--spec",
        p(&spec),
        "--pp",
        "2",
        "--json",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
    let names = |r: usize| -> Vec<String> {
        v["ranks"][r]["tensors"]
            .as_array()
            .expect("tensors")
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .filter(|n| n.ends_with(".weight"))
            .collect()
    };
    // llama-tiny: 4 layers, 2 per stage (other tensors of a layer, such as its
    // `rotary_emb.inv_freq`, fall to `** replicate`: every stage).
    assert!(names(0).iter().any(|n| n.starts_with("model.layers.1.")));
    assert!(!names(0).iter().any(|n| n.starts_with("model.layers.2.")));
    assert!(names(1).iter().any(|n| n.starts_with("model.layers.3.")));
}

#[test]
fn a_spec_that_is_not_a_regular_file_is_refused_without_blocking() {
    let ck = llama();
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo.shard");
    mkfifo(&fifo);
    fails(
        &["spec", "check", p(&fifo)],
        1,
        &["fifo.shard", "regular file"],
    );
    fails(
        &["plan", p(ck.path()), "--spec", p(&fifo)],
        1,
        &["fifo.shard", "regular file"],
    );
    fails(
        &["spec", "check", "/dev/zero"],
        1,
        &["/dev/zero", "regular file"],
    );
}

#[test]
fn unmatched_tensor_names_are_quoted_and_the_list_is_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A name with a newline must not forge a second `error:` line.
    let path = dir.path().join("nl.safetensors");
    let header =
        br#"{"model.norm.weight\nerror: forged":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    std::fs::write(&path, st_bytes(header, &[0; 4])).expect("write");
    let o = fails(&["plan", p(&path), "--spec", "gpt2"], 1, &["match no rule"]);
    assert!(
        o.stderr.contains(r#""model.norm.weight\nerror: forged""#),
        "{}",
        o.stderr
    );
    // Many unmatched tensors: a count, not thousands of names.
    let ck = tempfile::tempdir().expect("tempdir");
    let opts = SynthOptions::preset("deepseek-v3-tiny")
        .expect("preset")
        .with_sparse(true);
    synth::write_checkpoint(ck.path(), &opts).expect("synth");
    let o = fails(&["plan", p(ck.path()), "--spec", "gpt2"], 1, &["more"]);
    assert!(o.stderr.len() < 10_000, "{} bytes", o.stderr.len());
}

#[test]
fn config_type_errors_show_values_not_rust_debug() {
    let ck = llama();
    let config = ck.path().join("config.json");
    let mut v = read_json(&config);
    v["tie_word_embeddings"] = serde_json::json!("yes");
    write_json(&config, &v);
    let args = ["plan", p(ck.path())];
    let o = run(&args);
    check(&o, &args, 1, &["boolean", r#""yes""#], true);
    assert!(!o.stderr.contains("Str("), "{}", o.stderr);
}

#[test]
fn a_self_referencing_let_does_not_suggest_its_own_name() {
    let ck = llama();
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(
        dir.path(),
        "cycle.shard",
        "let aaa = bbb\nlet bbb = aaa\n** replicate if aaa == 1\n",
    );
    let args = ["plan", p(ck.path()), "--spec", p(&spec)];
    let o = run(&args);
    check(&o, &args, 1, &["aaa"], true);
    assert!(!o.stderr.contains("did you mean `aaa`"), "{}", o.stderr);
}

// ---------------------------------------------------------------------------------------
// Load, reshard, demo, dist-load.

#[test]
fn verify_handles_sub_byte_tensors_whose_rows_are_not_whole_bytes() {
    // F4 [4, 3]: rows of 12 bits; whole tensor and halves [2, 3] are whole bytes.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f4.safetensors");
    let data: Vec<u8> = (0u8..6)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let header = br#"{"a":{"dtype":"F4","shape":[4,3],"data_offsets":[0,6]}}"#;
    std::fs::write(&path, st_bytes(header, &data)).expect("write");
    for rule in ["** replicate", "** split(dim=0)"] {
        let spec = write_spec(dir.path(), "s.shard", &format!("{rule}\n"));
        let o = run(&[
            "load",
            p(&path),
            "--spec",
            p(&spec),
            "--tp",
            "2",
            "--all-ranks",
            "--verify",
        ]);
        assert_eq!(o.code, 0, "{rule}: {}", o.stderr);
        assert!(
            o.stdout.contains("verified 1 tensors"),
            "{rule}: {}",
            o.stdout
        );
    }
}

fn rank_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-rank-"))
        .collect();
    v.sort();
    v
}

#[test]
fn reshard_output_never_mixes_runs_or_looks_complete_after_a_failure() {
    let ck = llama();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = out_dir.path().join("out");
    let ok = |tp: &str| {
        let o = run(&["reshard", p(ck.path()), "--tp", tp, "--out", p(&out)]);
        assert_eq!(o.code, 0, "{}", o.stderr);
    };
    ok("4");
    assert_eq!(rank_files(&out).len(), 4);
    // A tp=2 run into the same directory: exactly its own two parts remain.
    ok("2");
    assert_eq!(
        rank_files(&out),
        vec![
            "model-rank-0-part-0.safetensors",
            "model-rank-1-part-0.safetensors"
        ]
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("model-rank-0-part-0.safetensors"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o044, 0o044, "shards readable by others: {mode:o}");
    // A run that fails half-way (rank 1's part name is taken by a directory) leaves neither
    // a manifest nor rank 0's part.
    let fresh = out_dir.path().join("fresh");
    std::fs::create_dir_all(fresh.join("model-rank-1-part-0.safetensors")).expect("mkdir");
    let o = run(&["reshard", p(ck.path()), "--tp", "2", "--out", p(&fresh)]);
    check(
        &o,
        &["reshard"],
        1,
        &["model-rank-1-part-0.safetensors"],
        false,
    );
    assert!(!fresh.join("safeshard-plan.json").exists());
    assert!(!fresh.join("model-rank-0-part-0.safetensors").exists());
}

#[test]
fn demo_keep_refuses_a_non_empty_directory() {
    let ck = llama();
    let before = std::fs::read(ck.path().join("config.json")).expect("config");
    fails(
        &["demo", "--keep", p(ck.path())],
        2,
        &["--keep", "not empty"],
    );
    assert_eq!(
        std::fs::read(ck.path().join("config.json")).expect("config"),
        before,
        "the checkpoint is untouched"
    );
}

#[test]
fn dist_load_refuses_tiny_read_once_rounds() {
    let ck = llama();
    // `--round 1B` used to run for minutes (millions of rounds).
    fails(
        &[
            "dist-load",
            p(ck.path()),
            "--tp",
            "2",
            "--share",
            "read-once",
            "--round",
            "1B",
        ],
        2,
        &["--round"],
    );
}

#[test]
fn dist_load_on_threads_refuses_a_huge_world() {
    let ck = llama();
    // `--dp 1024` on threads used to abort with a stack overflow after a minute.
    fails(
        &["dist-load", p(ck.path()), "--dp", "1024"],
        2,
        &["1024 ranks", "mpirun"],
    );
}

#[test]
fn load_all_ranks_of_a_large_world_does_not_start_a_thread_per_rank_at_once() {
    let ck = llama();
    // 4096 threads at once need more than 4 GB of address space for their stacks alone;
    // bounded concurrency runs in far less.
    let cmd = format!(
        "ulimit -v 4000000 && exec '{}' load '{}' --dp 4096 --all-ranks --json",
        env!("CARGO_BIN_EXE_safeshard"),
        p(ck.path())
    );
    let o = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .stdin(Stdio::null())
        .output()
        .expect("sh");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 4096);
}

/// Waits for `child`; one still running after [`DEADLINE`] is killed and fails the test (a hang).
fn wait_or_fail(child: &mut std::process::Child, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("safeshard {what} still running after {DEADLINE:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
