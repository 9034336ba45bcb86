//! Fuzz-style property test: random mutations of a valid small checkpoint (raw byte flips and
//! truncations of a safetensors file, structured edits of its JSON header, of the index and
//! of config.json) never panic anywhere along `Checkpoint::open` → `Config` → `Spec` →
//! `sharding::resolve` → `plan::build` → `load::load_rank`. Errors are fine; panics are not.

use std::path::Path;
use std::sync::OnceLock;

use proptest::prelude::*;
use safeshard::checkpoint::{Checkpoint, INDEX_NAME};
use safeshard::load::{self, IoMode, LoadOptions};
use safeshard::plan;
use safeshard::sharding::{self, Config, Spec};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;
use serde_json::{json, Value};

/// The valid checkpoint: every file's name and bytes.
fn base() -> &'static Vec<(String, Vec<u8>)> {
    static BASE: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        // Two layers and small files: several shards, an index, config.json.
        let opts = SynthOptions::preset("llama-tiny")
            .expect("preset")
            .with_layers(2)
            .with_max_file_bytes(200_000);
        synth::write_checkpoint(dir.path(), &opts).expect("synth");
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).expect("read"))
            })
            .collect();
        files.sort();
        files
    })
}

fn interesting() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(2)),
        Just(json!(3)),
        Just(json!(-1)),
        Just(json!(7)),
        Just(json!(64)),
        Just(json!(1u64 << 31)),
        Just(json!(1u64 << 32)),
        Just(json!(1u64 << 53)),
        Just(json!(i64::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1.5)),
        Just(json!(1e300)),
        Just(json!("x")),
        Just(json!("8")),
        Just(json!("F8_E4M3")),
        Just(json!(null)),
        Just(json!(true)),
        Just(json!([])),
        Just(json!({})),
        Just(json!([1, 2])),
        any::<u32>().prop_map(|v| json!(v)),
        any::<i64>().prop_map(|v| json!(v)),
    ]
}

/// Config keys the shipped specs read, and a few others.
const CONFIG_KEYS: &[&str] = &[
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "head_dim",
    "tie_word_embeddings",
    "architectures",
    "quantization_config",
    "num_local_experts",
    "n_routed_experts",
    "torch_dtype",
];

#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite bytes of a file; positions are fractions of the header region (or the file).
    Bytes {
        file: usize,
        in_header: bool,
        edits: Vec<(u16, u8)>,
    },
    /// Cut a file to a fraction of its length.
    Truncate { file: usize, keep: u16 },
    /// Replace one field of one tensor entry in a safetensors header.
    Header {
        file: usize,
        tensor: usize,
        field: u8,
        value: Value,
    },
    /// Replace one config.json value.
    ConfigValue { key: usize, value: Value },
    /// Point one index entry elsewhere.
    IndexValue { tensor: usize, value: Value },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (
            any::<usize>(),
            any::<bool>(),
            proptest::collection::vec((any::<u16>(), any::<u8>()), 1..8)
        )
            .prop_map(|(file, in_header, edits)| Mutation::Bytes {
                file,
                in_header,
                edits
            }),
        (any::<usize>(), any::<u16>()).prop_map(|(file, keep)| Mutation::Truncate { file, keep }),
        (any::<usize>(), any::<usize>(), 0u8..6, interesting()).prop_map(
            |(file, tensor, field, value)| Mutation::Header {
                file,
                tensor,
                field,
                value
            }
        ),
        (any::<usize>(), interesting())
            .prop_map(|(key, value)| Mutation::ConfigValue { key, value }),
        (any::<usize>(), interesting())
            .prop_map(|(tensor, value)| Mutation::IndexValue { tensor, value }),
    ]
}

fn header_len(bytes: &[u8]) -> usize {
    let n = bytes
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes);
    usize::try_from(n)
        .unwrap_or(0)
        .min(bytes.len().saturating_sub(8))
}

/// Applies one mutation to the in-memory files.
fn apply(files: &mut [(String, Vec<u8>)], m: &Mutation) {
    let st: Vec<usize> = (0..files.len())
        .filter(|&i| files[i].0.ends_with(".safetensors"))
        .collect();
    let pick = |n: usize| st[n % st.len()];
    match m {
        Mutation::Bytes {
            file,
            in_header,
            edits,
        } => {
            let f = &mut files[pick(*file)].1;
            let span = if *in_header {
                8 + header_len(f)
            } else {
                f.len()
            };
            for &(pos, byte) in edits {
                let at = (pos as usize * span) / (u16::MAX as usize + 1);
                if let Some(b) = f.get_mut(at) {
                    *b = byte;
                }
            }
        }
        Mutation::Truncate { file, keep } => {
            let f = &mut files[pick(*file)].1;
            let keep = (*keep as usize * f.len()) / (u16::MAX as usize + 1);
            f.truncate(keep);
        }
        Mutation::Header {
            file,
            tensor,
            field,
            value,
        } => {
            let f = &mut files[pick(*file)].1;
            let n = header_len(f);
            let Ok(mut header) = serde_json::from_slice::<Value>(&f[8..8 + n]) else {
                return;
            };
            let Some(obj) = header.as_object_mut() else {
                return;
            };
            let names: Vec<String> = obj
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            if names.is_empty() {
                return;
            }
            let entry = &mut obj[&names[tensor % names.len()]];
            match field {
                0 => entry["dtype"] = value.clone(),
                1 => entry["shape"] = json!([value.clone()]),
                2 => {
                    if let Some(s) = entry["shape"].as_array_mut().and_then(|a| a.first_mut()) {
                        *s = value.clone();
                    }
                }
                3 => entry["data_offsets"][0] = value.clone(),
                4 => entry["data_offsets"][1] = value.clone(),
                _ => obj
                    .insert("__metadata__".into(), value.clone())
                    .map_or((), |_| ()),
            }
            let new = serde_json::to_vec(&header).expect("serialize");
            let mut out = (new.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&new);
            out.extend_from_slice(&f[8 + n..]);
            *f = out;
        }
        Mutation::ConfigValue { key, value } => {
            if let Some((_, f)) = files.iter_mut().find(|(n, _)| n == "config.json") {
                let mut c: Value = serde_json::from_slice(f).expect("config");
                c[CONFIG_KEYS[key % CONFIG_KEYS.len()]] = value.clone();
                *f = serde_json::to_vec(&c).expect("serialize");
            }
        }
        Mutation::IndexValue { tensor, value } => {
            if let Some((_, f)) = files.iter_mut().find(|(n, _)| n == INDEX_NAME) {
                let mut idx: Value = serde_json::from_slice(f).expect("index");
                if let Some(map) = idx["weight_map"].as_object_mut() {
                    let names: Vec<String> = map.keys().cloned().collect();
                    if !names.is_empty() {
                        map.insert(names[tensor % names.len()].clone(), value.clone());
                    }
                }
                *f = serde_json::to_vec(&idx).expect("serialize");
            }
        }
    }
}

/// The whole library path; errors are expected, panics fail the property.
fn exercise(dir: &Path) {
    let Ok(ckpt) = Checkpoint::open(dir) else {
        return;
    };
    let Ok(config) = Config::from_checkpoint(&ckpt, &[]) else {
        return;
    };
    let spec = match Spec::detect(&config) {
        Ok(s) => s,
        Err(_) => match Spec::load("llama") {
            Ok(s) => s,
            Err(_) => return,
        },
    };
    for (tp, pp, dp, ep) in [(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 1, 1), (2, 1, 2, 4)] {
        let topo = Topology {
            tp,
            pp,
            dp,
            ep,
            pp_layers: None,
        };
        let Ok(res) = sharding::resolve(&spec, &ckpt, &config, &topo) else {
            continue;
        };
        let Ok(plan) = plan::build(&ckpt, &res, &topo, &spec.name) else {
            continue;
        };
        for io in [IoMode::Mmap, IoMode::Pread] {
            let opts = LoadOptions {
                io,
                ..LoadOptions::default()
            };
            let _ = load::load_rank(&plan, topo.world() - 1, &opts);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_checkpoints_never_panic(mutations in proptest::collection::vec(mutation(), 1..4)) {
        let mut files = base().clone();
        for m in &mutations {
            apply(&mut files, m);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, bytes) in &files {
            std::fs::write(dir.path().join(name), bytes).expect("write");
        }
        exercise(dir.path());
    }
}

/// The unmutated checkpoint goes all the way through (so the property above is not vacuous).
#[test]
fn the_base_checkpoint_plans_and_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bytes) in base() {
        std::fs::write(dir.path().join(name), bytes).expect("write");
    }
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    assert!(ckpt.files().len() >= 2, "several shards");
    let config = Config::from_checkpoint(&ckpt, &[]).expect("config");
    let spec = Spec::detect(&config).expect("spec");
    let topo = Topology {
        tp: 2,
        pp: 2,
        dp: 1,
        ep: 1,
        pp_layers: None,
    };
    let res = sharding::resolve(&spec, &ckpt, &config, &topo).expect("resolve");
    let plan = plan::build(&ckpt, &res, &topo, &spec.name).expect("plan");
    let r = load::load_rank(&plan, 3, &LoadOptions::default()).expect("load");
    assert!(!r.is_empty());
}

/// A shard cut short or swapped for another file after planning is a clean error on both
/// engines (never a SIGBUS from a mapping past the end of the file).
#[test]
fn files_changed_between_plan_and_load_are_clean_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bytes) in base() {
        std::fs::write(dir.path().join(name), bytes).expect("write");
    }
    let ckpt = Checkpoint::open(dir.path()).expect("open");
    let config = Config::from_checkpoint(&ckpt, &[]).expect("config");
    let spec = Spec::detect(&config).expect("spec");
    let topo = Topology {
        tp: 1,
        pp: 1,
        dp: 1,
        ep: 1,
        pp_layers: None,
    };
    let res = sharding::resolve(&spec, &ckpt, &config, &topo).expect("resolve");
    let plan = plan::build(&ckpt, &res, &topo, &spec.name).expect("plan");
    // The last shard: rank 0 of tp=1 reads every file.
    let victim = ckpt.files().last().expect("a file").path.clone();
    let name = victim
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    let original = std::fs::read(&victim).expect("read");
    let engines = [IoMode::Mmap, IoMode::Pread];

    // Truncated in place (same inode).
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .expect("open");
    f.set_len(original.len() as u64 / 2).expect("truncate");
    drop(f);
    for io in engines {
        let opts = LoadOptions {
            io,
            ..LoadOptions::default()
        };
        let err = load::load_rank(&plan, 0, &opts).expect_err("truncated file must fail");
        let msg = err.to_string();
        assert!(msg.contains(&name), "{io:?}: {msg}");
        assert!(!msg.contains('\n'), "{io:?}: one line: {msg}");
    }

    // Replaced by another file of the same length (a new inode, different bytes).
    let tmp = dir.path().join("replacement.tmp");
    let mut other = original.clone();
    if let Some(b) = other.last_mut() {
        *b ^= 0xff;
    }
    std::fs::write(&tmp, &other).expect("write");
    std::fs::rename(&tmp, &victim).expect("rename");
    for io in engines {
        let opts = LoadOptions {
            io,
            ..LoadOptions::default()
        };
        let err = load::load_rank(&plan, 0, &opts).expect_err("replaced file must fail");
        let msg = err.to_string();
        assert!(msg.contains(&name), "{io:?}: {msg}");
    }
}
