//! Hostile and mistaken specs end as one clear error, never a stack overflow, a hang or a
//! Rust `Debug` dump: deep nesting, long `let` chains, `**`-heavy patterns, wrong config
//! types, cyclic `let`s, negative dims, absurd layer counts, special files as specs and
//! tensor names that try to forge output lines.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use safeshard::checkpoint::{Dtype, TensorInfo};
use safeshard::sharding::{resolve_tensors, Config, Resolution, Resolved, Shards, Spec};
use safeshard::topology::Topology;
use serde_json::json;

fn cat(names: &[&str], shape: &[u64]) -> Vec<TensorInfo> {
    names
        .iter()
        .map(|n| TensorInfo {
            name: n.to_string(),
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
            file: 0,
            offset: 0,
            bytes: 2 * shape.iter().product::<u64>(),
        })
        .collect()
}

fn resolve(
    spec: &Spec,
    names: &[&str],
    cfg: serde_json::Value,
    topo: Topology,
) -> safeshard::Result<Resolution> {
    let config = Config::from_json(Some(&cfg), &[]).unwrap();
    resolve_tensors(spec, &cat(names, &[4, 8]), &config, &topo)
}

fn topo(tp: usize, pp: usize) -> Topology {
    Topology::new(tp, pp, 1, 1).unwrap()
}

/// Runs `f` on a thread with a 2 MiB stack (Rust's default for spawned threads, smaller than
/// the main thread's): the limits must hold there too.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

fn parse_err(src: String) -> String {
    on_small_stack(move || match Spec::parse(&src, "t.shard") {
        Ok(_) => panic!("spec parsed"),
        Err(e) => e.to_string(),
    })
}

#[test]
fn deeply_nested_expressions_are_refused_with_the_line() {
    let n = 100_000;
    let cases = [
        format!("let a = {}1{}", "(".repeat(n), ")".repeat(n)),
        format!("let a = {}true", "!".repeat(n)),
        format!("let a = {}1", "-".repeat(n)),
        format!("let a = {}", vec!["1"; n].join("+")),
        format!("let a = max({}1{})", "min(1, ".repeat(n), ")".repeat(n)),
        format!("let a = {}1{}", "[".repeat(n), "]".repeat(n)),
        format!(
            "** split(dim=0) if {}1{} == 1",
            "(".repeat(n),
            ")".repeat(n)
        ),
    ];
    for src in cases {
        let head: String = src.chars().take(30).collect();
        let e = parse_err(format!("# deep\n{src}\n** replicate\n"));
        assert!(e.starts_with("t.shard:2:"), "{head}: {e}");
        assert!(e.contains("expression nested too deeply"), "{head}: {e}");
    }
}

#[test]
fn moderately_nested_expressions_still_work_on_a_small_stack() {
    // 60 levels of parentheses around a 60-term sum (value 60), 60 `!`s: under the limit of 64.
    let inner = vec!["1"; 60].join(" + ");
    let src = format!(
        "let a = {}{inner}{}\nlet b = {}true\nw replicate if a == 60 && b\n",
        "(".repeat(60),
        ")".repeat(60),
        "!!".repeat(30)
    );
    let r = on_small_stack(move || {
        let spec = Spec::parse(&src, "t.shard").unwrap();
        resolve(&spec, &["w"], json!({}), topo(1, 1)).map(|r| r.tensors)
    })
    .unwrap();
    assert!(matches!(r[0], Resolved::Held { .. }), "{r:?}");
}

fn let_chain(n: usize) -> String {
    // a0 = a1 + 1, ..., a{n} = 1: a0 == n + 1.
    let mut s: String = (0..n)
        .map(|i| format!("let a{i} = a{} + 1\n", i + 1))
        .collect();
    s.push_str(&format!("let a{n} = 1\n"));
    s
}

#[test]
fn long_let_chains_are_refused_at_evaluation_with_a_line() {
    let src = format!("{}w replicate if a0 == 20001\n", let_chain(20_000));
    let e = on_small_stack(move || {
        let spec = Spec::parse(&src, "t.shard").unwrap();
        resolve(&spec, &["w"], json!({}), topo(1, 1))
            .unwrap_err()
            .to_string()
    });
    assert!(e.starts_with("t.shard:"), "{e}");
    assert!(e.contains("nested too deeply when evaluated"), "{e}");
    // The error points at one of the chain's `let` lines.
    let line: usize = e.split(':').nth(1).unwrap().parse().unwrap();
    assert!((1..=20_001).contains(&line), "{e}");

    // A chain well under the limit evaluates, also on a small stack.
    let src = format!("{}w replicate if a0 == 101\n", let_chain(100));
    let r = on_small_stack(move || {
        let spec = Spec::parse(&src, "t.shard").unwrap();
        resolve(&spec, &["w"], json!({}), topo(1, 1)).map(|r| r.tensors)
    })
    .unwrap();
    assert!(matches!(r[0], Resolved::Held { .. }), "{r:?}");
}

#[test]
fn many_double_star_segments_match_fast_and_correctly() {
    let stars = vec!["**"; 30].join(".");
    let src = format!("{stars}.x skip\n** replicate\n");
    let spec = Spec::parse(&src, "t.shard").unwrap();
    let long: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    let miss = long.join(".");
    let hit = format!("{miss}.x");
    let started = Instant::now();
    let r = resolve(&spec, &[&miss, &hit, "x"], json!({}), topo(1, 1)).unwrap();
    // Exponential backtracking takes hours here; memoized matching takes milliseconds.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(r.tensors[0], Resolved::Held { .. }));
    assert!(matches!(r.tensors[1], Resolved::Skip { .. }));
    assert!(matches!(r.tensors[2], Resolved::Skip { .. }));

    // `*` runs inside one segment: same story.
    let spec = Spec::parse(
        &format!("{}b skip\n** replicate\n", "*a".repeat(30)),
        "t.shard",
    )
    .unwrap();
    let a_run = "a".repeat(200);
    let a_run_b = format!("{a_run}b");
    let started = Instant::now();
    let r = resolve(&spec, &[&a_run, &a_run_b], json!({}), topo(1, 1)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(r.tensors[0], Resolved::Held { .. }));
    assert!(matches!(r.tensors[1], Resolved::Skip { .. }));
}

#[test]
fn many_optional_alternatives_match_fast() {
    // `{a,}` thirty times: 2^30 ways to split a run of a's without memoization.
    let spec = Spec::parse(
        &format!("x.{}b skip\n** replicate\n", "{a,}".repeat(30)),
        "t.shard",
    )
    .unwrap();
    let miss = format!("x.{}", "a".repeat(30));
    let hit = format!("x.{}b", "a".repeat(17));
    let started = Instant::now();
    let r = resolve(&spec, &[&miss, &hit], json!({}), topo(1, 1)).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(r.tensors[0], Resolved::Held { .. }));
    assert!(matches!(r.tensors[1], Resolved::Skip { .. }));
}

#[test]
fn captures_survive_memoized_matching() {
    let spec = Spec::parse(
        "**.layers.{layer}.**.w skip if layer == 3\n** replicate\n",
        "t.shard",
    )
    .unwrap();
    let r = resolve(
        &spec,
        &["m.layers.3.mlp.w", "m.layers.4.mlp.w", "m.layers.3.w"],
        json!({"num_hidden_layers": 8}),
        topo(1, 1),
    )
    .unwrap();
    assert!(matches!(r.tensors[0], Resolved::Skip { .. }), "{r:?}");
    assert!(matches!(r.tensors[1], Resolved::Held { .. }), "{r:?}");
    assert!(matches!(r.tensors[2], Resolved::Skip { .. }), "{r:?}");
}

#[test]
fn huge_patterns_are_refused() {
    let e = parse_err(format!("{} replicate\n", vec!["a"; 300].join(".")));
    assert!(e.starts_with("t.shard:1:"), "{e}");
    assert!(e.contains("more than 256 segments"), "{e}");
    let e = parse_err(format!("{}b replicate\n", "*a".repeat(100)));
    assert!(e.starts_with("t.shard:1:"), "{e}");
    assert!(e.contains("more than 64"), "{e}");
}

#[test]
fn wrong_config_types_are_described_in_words_with_the_key() {
    let spec = Spec::shipped("llama").unwrap();
    let cfg = json!({
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "hidden_size": 8, "vocab_size": 4, "tie_word_embeddings": "yes"
    });
    let names = ["model.embed_tokens.weight", "lm_head.weight"];
    let e = resolve(&spec, &names, cfg.clone(), topo(1, 2))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expected a boolean, got the string \"yes\""),
        "{e}"
    );
    assert!(e.contains("`tie_word_embeddings`"), "{e}");
    assert!(!e.contains("Str("), "{e}");

    let spec = Spec::parse("w heads(dim=0, count=nkv)\n", "t.shard").unwrap();
    let e = resolve(&spec, &["w"], json!({"nkv": 1e23}), topo(2, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("got the non-integer number 1e23"), "{e}");
    assert!(e.contains("`nkv`"), "{e}");
    assert!(!e.contains("Float("), "{e}");
}

#[test]
fn cyclic_lets_are_named_as_such() {
    for (src, chain) in [
        (
            "let a = b\nlet b = a\nw replicate if a == 1\n",
            "`a` -> `b` -> `a`",
        ),
        ("let a = a + 1\nw replicate if a == 1\n", "`a` -> `a`"),
    ] {
        let spec = Spec::parse(src, "t.shard").unwrap();
        let e = resolve(&spec, &["w"], json!({}), topo(1, 1))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.shard:"), "{e}");
        assert!(e.contains("cyclic let"), "{e}");
        assert!(e.contains(chain), "{e}");
        assert!(!e.contains("did you mean `a`"), "{e}");
    }
    // A `let` that reads its own config key (with a default) is not a cycle.
    let spec = Spec::parse("let a = a ?? 7\nw replicate if a == 7\n", "t.shard").unwrap();
    let r = resolve(&spec, &["w"], json!({}), topo(1, 1)).unwrap();
    assert!(matches!(r.tensors[0], Resolved::Held { .. }));
    let r = resolve(&spec, &["w"], json!({"a": 3}), topo(1, 1)).unwrap_err();
    assert!(r.to_string().contains("match no rule"), "{r}");
}

fn tp_shapes(r: &Resolved) -> Vec<Vec<u64>> {
    match r {
        Resolved::Held {
            shards: Shards::PerTp(ls),
            ..
        } => ls.iter().map(|l| l.shape.clone()).collect(),
        other => panic!("not held per tp: {other:?}"),
    }
}

#[test]
fn negative_dims_count_from_the_end_and_out_of_range_ones_are_refused() {
    // Documented in docs/spec-language.md: `dim=-1` is the last dim.
    let neg = Spec::parse("w split(dim=-1)\n", "t.shard").unwrap();
    let pos = Spec::parse("w split(dim=1)\n", "t.shard").unwrap();
    let a = resolve(&neg, &["w"], json!({}), topo(2, 1)).unwrap();
    let b = resolve(&pos, &["w"], json!({}), topo(2, 1)).unwrap();
    assert_eq!(a.tensors, b.tensors);
    // [4, 8] split along the last dim by 2: [4, 4] each.
    assert_eq!(tp_shapes(&a.tensors[0]), vec![vec![4, 4], vec![4, 4]]);
    for d in ["-3", "2", "-9223372036854775807"] {
        let spec = Spec::parse(&format!("w split(dim={d})\n"), "t.shard").unwrap();
        let e = resolve(&spec, &["w"], json!({}), topo(2, 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not exist in a 2-dimensional tensor"),
            "{e}"
        );
        assert!(e.contains("t.shard:1"), "{e}");
    }
}

#[test]
fn absurd_layer_counts_are_refused() {
    let spec = Spec::parse(
        "layers 9223372036854775807\nm.{layer}.w replicate\n",
        "t.shard",
    )
    .unwrap();
    let e = resolve(&spec, &["m.0.w", "m.1.w"], json!({}), topo(1, 2))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("t.shard:1:"), "{e}");
    assert!(e.contains("9223372036854775807 layers"), "{e}");
    // From config.json, too.
    let spec = Spec::parse("m.{layer}.w replicate\n", "t.shard").unwrap();
    let e = resolve(
        &spec,
        &["m.0.w"],
        json!({"num_hidden_layers": 1u64 << 40}),
        topo(1, 2),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("num_hidden_layers"), "{e}");
    // A real count still splits the stages: 2 layers over 2 stages.
    let spec = Spec::parse("layers 2\nm.{layer}.w replicate\n", "t.shard").unwrap();
    let r = resolve(&spec, &["m.0.w", "m.1.w"], json!({}), topo(1, 2)).unwrap();
    let stages: Vec<_> = r
        .tensors
        .iter()
        .map(|t| match t {
            Resolved::Held { stages, .. } => stages.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(stages, vec![vec![0], vec![1]]);
}

#[test]
fn unmatched_names_are_quoted_and_capped() {
    let spec = Spec::parse("keep.w replicate\n", "t.shard").unwrap();
    let mut names: Vec<String> = (0..24).map(|i| format!("other.{i}")).collect();
    names.insert(0, "model.norm.weight\nerror: fake".to_string());
    names.push("keep.w".to_string());
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let e = resolve(&spec, &refs, json!({}), topo(1, 1))
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(e.contains(r#""model.norm.weight\nerror: fake""#), "{e}");
    assert!(e.starts_with("25 tensor(s) match no rule"), "{e}");
    // The first 10 are listed, then a count of the rest.
    assert!(e.contains("\"other.8\""), "{e}");
    assert!(!e.contains("\"other.9\""), "{e}");
    assert!(e.contains("and 15 more"), "{e}");
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_safeshard"))
}

/// Runs the binary with a deadline (a hang fails the test instead of blocking it).
fn run_bounded(args: &[&str]) -> (i32, String) {
    let mut child = bin()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain stderr on a thread so a long message cannot block the child.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        use std::io::Read;
        stderr.read_to_string(&mut err).unwrap();
        err
    });
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), reader.join().unwrap());
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("safeshard {args:?} did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn special_and_huge_files_are_refused_as_specs() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("f.shard");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let big = dir.path().join("big.shard");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    let fifo = fifo.to_str().unwrap().to_string();
    let big = big.to_str().unwrap().to_string();
    for path in [fifo.as_str(), "/dev/zero", big.as_str()] {
        let (code, err) = run_bounded(&["spec", "check", path]);
        assert_eq!(code, 1, "{path}: {err}");
        assert_eq!(err.lines().count(), 1, "{path}: {err}");
        assert!(err.contains(path), "{err}");
        assert!(err.contains("regular file of at most"), "{err}");
    }
}

#[test]
fn deep_spec_through_the_binary_is_exit_1_with_the_location() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.shard");
    std::fs::write(
        &p,
        format!(
            "let a = {}1{}\n** replicate if a == 1\n",
            "(".repeat(100_000),
            ")".repeat(100_000)
        ),
    )
    .unwrap();
    let p = p.to_str().unwrap();
    let (code, err) = run_bounded(&["spec", "check", p]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("{p}:1:")), "{err}");
    assert!(err.contains("expression nested too deeply"), "{err}");
    // The 200,000-char line is shown as a window around the column, not whole.
    assert!(err.len() < 1000, "{} bytes", err.len());
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    // The caret sits under the reported column's char: the window starts 60 chars before
    // it, after the 4-space indent and "...".
    // "error: PATH:1:COL: ..."
    let col: usize = lines[0].split(':').nth(3).unwrap().parse().unwrap();
    assert!(lines[1].starts_with("    ..."), "{err}");
    assert_eq!(lines[2].find('^'), Some(4 + 3 + 60), "{err}");
    assert!(col > 61, "{err}");
}
