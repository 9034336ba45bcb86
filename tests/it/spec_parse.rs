//! Parser errors: every malformed construct is refused naming its line and column, with the
//! source line and a caret; misspellings get a "did you mean".

use safeshard::sharding::Spec;

/// (spec source, the 1-based line that is broken, the column the caret must point at).
const CASES: &[(&str, usize, usize)] = &[
    ("arch X\nmodel.w   spilt(dim=0)\n", 2, 11),
    ("arch X\nmodel.w   split(dmi=0)\n", 2, 17),
    ("arch X\nmodel.w   split(dim=0\n", 2, 22),
    ("arch X\nmodel.w   split(dim=x)\n", 2, 17),
    ("arch X\n\nmodel.{layer.w   replicate\n", 3, 7),
    ("arch X\nmodel..w   replicate\n", 2, 7),
    ("arhc X Y\n", 1, 1),
    ("arch X\nmodel.w   replicate stag(first)\n", 2, 21),
    ("arch X\nmodel.w   replicate stage(frist)\n", 2, 27),
    ("arch X\nmodel.w   replicate kind(atention)\n", 2, 26),
    ("arch X\nmodel.w\n", 2, 8),
    ("arch X\nmodel.w   replicate split(dim=0)\n", 2, 21),
    ("let a = 1 +\n", 1, 12),
    ("let a = (1\n", 1, 11),
    ("let tp = 2\n", 1, 5),
    ("let a = 1\nlet a = 2\n", 2, 5),
    ("alias transformer. = \"\"\n", 1, 7),
    ("model.w  skip(\"unterminated)\n", 1, 15),
    ("model.w  fused(dim=0, parts=[splt(4), 4])\n", 1, 30),
    ("model.w  fused(dim=0)\n", 1, 10),
    ("model.w  heads(dim=0)\n", 1, 10),
    (
        "model.e.{expert}.w  split(dim=0) experts(count=8, placement=roundrobin)\n",
        1,
        61,
    ),
    ("model.w  replicate experts(count=8)\n", 1, 20),
    ("model.w  vocab(pad=64) $\n", 1, 24),
    ("kind mlpp\n", 1, 6),
    ("model.w  replicate if\n", 1, 22),
    ("model.{x}.{x}  replicate\n", 1, 11),
];

#[test]
fn malformed_specs_name_line_and_column() {
    let mut report = String::new();
    for (src, line, col) in CASES {
        let err = Spec::parse(src, "bad.shard").expect_err(src).to_string();
        let first = err.lines().next().unwrap_or_default();
        let prefix = format!("bad.shard:{line}:{col}: ");
        assert!(
            first.starts_with(&prefix),
            "{src:?}: expected {prefix:?}, got:\n{err}"
        );
        // Second line: the source line; third: a caret under the column.
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 3, "{err}");
        let broken = src.lines().nth(line - 1).unwrap();
        assert_eq!(lines[1].trim_start(), broken.trim_start(), "{err}");
        assert_eq!(
            lines[2].find('^').unwrap() - 4,
            col - 1,
            "caret column: {err}"
        );
        report.push_str(&format!("--- {src:?}\n{err}\n"));
    }
    insta::assert_snapshot!(report);
}

#[test]
fn misspellings_suggest_the_right_word() {
    let cases = [
        ("m.w  spilt(dim=0)\n", "did you mean `split`?"),
        ("m.w  split(dmi=0)\n", "did you mean `dim`?"),
        ("arhc X\n", "did you mean `arch`?"),
        ("m.w  replicate stage(frist)\n", "did you mean `first`?"),
        ("m.w  replicate optinal\n", "did you mean `optional`?"),
        ("m.w  split(dim=0, unevne)\n", "did you mean `uneven`?"),
    ];
    for (src, want) in cases {
        let err = Spec::parse(src, "s.shard").unwrap_err().to_string();
        assert!(err.contains(want), "{src:?}: {err}");
    }
}

/// Every spec of the registry (one per `shard-specs/NAME.shard`) parses, declares at least
/// one architecture, and is the one detection picks for each of them: no architecture is
/// claimed by two shipped specs, so detection does not depend on their order.
#[test]
fn shipped_specs_parse_and_declare_their_architectures() {
    let shipped = safeshard::sharding::registry::all();
    assert_eq!(
        Spec::shipped_names(),
        shipped.iter().map(|s| s.name).collect::<Vec<_>>()
    );
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shard-specs"))
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            n.to_str().unwrap().ends_with(".shard")
        })
        .count();
    assert_eq!(shipped.len(), files, "one registry entry per .shard file");
    let mut claimed = std::collections::BTreeMap::new();
    for s in shipped {
        let spec = Spec::shipped(s.name).unwrap();
        assert_eq!(spec.name, s.name);
        assert!(
            !spec.architectures.is_empty(),
            "{} declares no arch",
            s.name
        );
        for arch in &spec.architectures {
            if let Some(other) = claimed.insert(arch.clone(), s.name) {
                panic!("{arch} is declared by both {other} and {}", s.name);
            }
            let cfg = safeshard::sharding::Config::from_json(
                Some(&serde_json::json!({"architectures": [arch]})),
                &[],
            )
            .unwrap();
            assert_eq!(Spec::detect(&cfg).unwrap().name, s.name);
        }
    }
    let cfg = safeshard::sharding::Config::from_json(
        Some(&serde_json::json!({"architectures": ["FalconForCausalLM"]})),
        &[],
    )
    .unwrap();
    let err = Spec::detect(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("FalconForCausalLM")
            && err.contains("`spec` option")
            && err.contains("spec list"),
        "{err}"
    );
    assert!(Spec::load("lamma")
        .unwrap_err()
        .to_string()
        .contains("did you mean `llama`?"));
}

#[test]
fn load_reads_files_and_names_them_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mine.shard");
    std::fs::write(
        &p,
        "arch MyModel\n\nw  split(dim=0, uneven)\nv  splitt(dim=0)\n",
    )
    .unwrap();
    let err = Spec::load(p.to_str().unwrap()).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:4:4: unknown action `splitt`", p.display())),
        "{err}"
    );
    std::fs::write(&p, "arch MyModel\nw  split(dim=0, uneven)\n").unwrap();
    let s = Spec::load(p.to_str().unwrap()).unwrap();
    assert_eq!(s.name, "mine");
    assert_eq!(s.architectures, ["MyModel"]);
    let missing = Spec::load("/nonexistent/x.shard").unwrap_err();
    assert!(!missing.is_usage());
}

#[test]
fn config_overrides() {
    use safeshard::sharding::Config;
    let base = serde_json::json!({"a": 1, "q": {"bits": 4}});
    let c = Config::from_json(
        Some(&base),
        &[
            "a=2".into(),
            "q.group_size=128".into(),
            "name=llama".into(),
            "t=true".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.values["a"], 2);
    assert_eq!(c.values["q"]["bits"], 4);
    assert_eq!(c.values["q"]["group_size"], 128);
    assert_eq!(c.values["name"], "llama");
    assert_eq!(c.values["t"], true);
    let e = Config::from_json(Some(&base), &["novalue".into()]).unwrap_err();
    assert!(e.is_usage());
    let e = Config::from_json(Some(&base), &["a.b=1".into()]).unwrap_err();
    assert!(e.to_string().contains("`a` is not an object"), "{e}");
    assert!(Config::from_json(Some(&serde_json::json!([1])), &[]).is_err());
}

#[test]
fn documentation_examples_parse() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/spec-language.md"
    ))
    .unwrap();
    let mut blocks = 0;
    for (i, block) in doc.split("```").enumerate() {
        // Odd pieces are inside fences; skip the error-message examples and the JSON of
        // synthetic layouts.
        if i % 2 == 0
            || block.starts_with("text")
            || block.starts_with("sh")
            || block.starts_with("json")
        {
            continue;
        }
        let src = block.trim_start_matches(|c| c != '\n');
        if let Err(e) = Spec::parse(src, "doc.shard") {
            panic!("docs example does not parse: {e}\n{src}");
        }
        blocks += 1;
    }
    assert!(blocks >= 10, "found only {blocks} examples");
}
