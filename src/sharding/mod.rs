//! The sharding spec language.
//!
//! A spec (`*.shard`) maps tensor names to tensor-, pipeline- and expert-parallel placements,
//! as data. [`Spec::parse`] reads one; [`Spec::shipped`] returns the specs embedded in the
//! binary (from `shard-specs/`, listed by [`registry`]); [`Spec::detect`] picks one from `config.json`'s
//! `architectures`. [`resolve`] applies a spec to a checkpoint catalog and a topology and says,
//! for every tensor, which pipeline stages hold it and what slice every TP (or EP) rank holds,
//! as a [`Layout`]: a concatenation of source slices and zero blocks along one dimension.
//!
//! The language reference is docs/spec-language.md.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::topology::Topology;
use crate::{Error, Result};

mod complete;
pub(crate) mod expr;
mod parse;
mod pattern;
pub mod registry;
mod resolve;

/// One piece of a rank-local tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Piece {
    /// A hyper-rectangle of the source tensor: one `[begin, end)` range per source dimension.
    Slice {
        /// Per-dimension ranges, as many as the source tensor has dimensions.
        ranges: Vec<(u64, u64)>,
    },
    /// Zeros (vocab padding), `extent` long along the layout's `concat_dim`; every other
    /// dimension has the local shape's size.
    Zeros {
        /// Length along `concat_dim`.
        extent: u64,
    },
}

/// What one rank holds of one tensor: its local shape, and the pieces that, concatenated in
/// order along `concat_dim`, make it up. A full copy is one slice covering the whole tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    /// Rank-local shape (same rank — number of dims — as the source tensor).
    pub shape: Vec<u64>,
    /// Dimension along which the pieces are concatenated.
    pub concat_dim: usize,
    /// Pieces in order; their extents along `concat_dim` sum to `shape[concat_dim]`.
    pub pieces: Vec<Piece>,
}

impl Layout {
    /// The whole tensor, unsplit.
    pub fn full(shape: &[u64]) -> Self {
        Layout {
            shape: shape.to_vec(),
            concat_dim: 0,
            pieces: vec![Piece::Slice {
                ranges: shape.iter().map(|&n| (0, n)).collect(),
            }],
        }
    }

    /// Number of elements of the local tensor.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// How the ranks of one pipeline stage hold a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shards {
    /// Every TP rank holds `layouts[tp_rank]` (`layouts.len() == tp`); DP replicas hold the same.
    /// A replicated tensor has `tp` identical full layouts.
    PerTp(Vec<Layout>),
    /// Expert parallelism: only EP rank `owner` (`dp_rank * tp + tp_rank`) holds the tensor.
    Expert {
        /// Expert id (from the name's capture).
        expert: u64,
        /// Owning EP rank.
        owner: usize,
        /// What the owner holds (normally the whole tensor).
        layout: Layout,
    },
}

/// Coarse kind of a tensor, for memory pictures and summaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TensorKind {
    /// Attention projections.
    Attention,
    /// Dense MLP (and shared experts).
    Mlp,
    /// Routed MoE experts.
    Experts,
    /// Token embeddings and the LM head.
    Embedding,
    /// Norms and other small vectors.
    Norm,
    /// Anything else (routers, scales, buffers).
    Other,
}

/// The placement of one catalog tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolved {
    /// Not loaded (buffers such as `rotary_emb.inv_freq`, layers outside the main model).
    Skip {
        /// Why, for `spec check` output.
        reason: String,
    },
    /// Loaded by the ranks of `stages`.
    Held {
        /// Pipeline stages holding the tensor (sorted, no duplicates).
        stages: Vec<usize>,
        /// What each rank of those stages holds.
        shards: Shards,
        /// Coarse kind.
        kind: TensorKind,
        /// Whether every rank that holds it holds the same bytes (a replicated tensor).
        replicated: bool,
    },
}

/// The placement of every tensor of a checkpoint under one topology.
#[derive(Clone, Debug)]
pub struct Resolution {
    /// Parallel to [`Checkpoint::tensors`].
    pub tensors: Vec<Resolved>,
    /// Non-fatal findings (rules that matched nothing), one line each.
    pub warnings: Vec<String>,
}

/// Values from `config.json` with `--set key=value` overrides on top.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// The merged JSON object.
    pub values: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// Config of a checkpoint (its `config.json`, or empty), with `overrides` as `key=value`
    /// strings applied on top (values parsed as JSON, else taken as strings; dotted keys reach
    /// into nested objects such as `quantization_config.group_size`).
    pub fn from_checkpoint(ckpt: &Checkpoint, overrides: &[String]) -> Result<Self> {
        Config::from_json(ckpt.config.as_ref(), overrides)
    }

    /// Like [`Config::from_checkpoint`], from a parsed `config.json` (or none).
    pub fn from_json(config: Option<&serde_json::Value>, overrides: &[String]) -> Result<Self> {
        let mut values = match config {
            None => serde_json::Map::new(),
            Some(serde_json::Value::Object(m)) => m.clone(),
            Some(other) => {
                return Err(Error::InvalidFile {
                    file: "config.json".into(),
                    reason: format!(
                        "must hold a JSON object, not {}",
                        match other {
                            serde_json::Value::Array(_) => "an array",
                            serde_json::Value::String(_) => "a string",
                            serde_json::Value::Number(_) => "a number",
                            serde_json::Value::Bool(_) => "a boolean",
                            _ => "null",
                        }
                    ),
                })
            }
        };
        for o in overrides {
            let Some((key, raw)) = o.split_once('=') else {
                return Err(Error::invalid_argument(
                    "set",
                    format!("{o}: expected KEY=VALUE, e.g. num_key_value_heads=8"),
                ));
            };
            let key = key.trim();
            if key.is_empty() || key.split('.').any(str::is_empty) {
                return Err(Error::invalid_argument(
                    "set",
                    format!("{o}: the key is empty or has an empty part"),
                ));
            }
            // JSON if it parses (numbers, true, null, "..."), else the raw text as a string.
            let value = serde_json::from_str(raw.trim())
                .unwrap_or_else(|_| serde_json::Value::String(raw.to_string()));
            let parts: Vec<&str> = key.split('.').collect();
            let mut cur = &mut values;
            for (i, part) in parts.iter().enumerate() {
                if i + 1 == parts.len() {
                    cur.insert(part.to_string(), value);
                    break;
                }
                let entry = cur
                    .entry(part.to_string())
                    .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
                match entry {
                    serde_json::Value::Object(m) => cur = m,
                    _ => {
                        return Err(Error::invalid_argument(
                            "set",
                            format!(
                                "{o}: `{}` is not an object in config.json",
                                parts[..=i].join(".")
                            ),
                        ))
                    }
                }
            }
        }
        Ok(Config { values })
    }
}

/// A parsed, checked sharding spec.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Spec name (file stem, or the shipped name).
    pub name: String,
    /// Architectures (`config.json` `architectures` values) the spec declares.
    pub architectures: Vec<String>,
    /// Where the spec came from, for messages (`llama.shard`, a path).
    pub origin: String,
    def: Arc<parse::SpecDef>,
    source: Arc<str>,
    /// Embedded in the binary (its vLLM name map is too), not read from a path.
    shipped: bool,
}

/// Largest `.shard` file read (shipped specs are a few KB): a bigger file, or a device such as
/// /dev/zero, is refused instead of filling memory.
pub const MAX_SPEC_FILE: u64 = 16 << 20;

/// Reads a spec file: only a regular file of at most [`MAX_SPEC_FILE`] bytes (a FIFO would
/// block, /dev/zero would never end).
fn read_spec_file(path: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let refuse = || Error::InvalidFile {
        file: path.into(),
        reason: format!("a spec must be a regular file of at most {MAX_SPEC_FILE} bytes"),
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() || meta.len() > MAX_SPEC_FILE {
        return Err(refuse());
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    // `take` guards against a file that grew (or was swapped) since `metadata`.
    file.take(MAX_SPEC_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_SPEC_FILE {
        return Err(refuse());
    }
    Ok(bytes)
}

impl Spec {
    /// Parses a spec. `origin` names it in error messages (`file:line:col: ...`).
    pub fn parse(source: &str, origin: &str) -> Result<Spec> {
        let def = parse::parse(source, origin)?;
        let name = std::path::Path::new(origin)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(origin)
            .to_string();
        Ok(Spec {
            name,
            architectures: def.architectures.clone(),
            origin: origin.to_string(),
            def: Arc::new(def),
            source: Arc::from(source),
            shipped: false,
        })
    }

    /// Whether the spec is embedded in the binary (its vLLM name map is too), not read from
    /// a path.
    pub fn is_shipped(&self) -> bool {
        self.shipped
    }

    /// Names of the shipped specs, in name order (one per `shard-specs/NAME.shard`; see
    /// [`registry`]).
    pub fn shipped_names() -> Vec<&'static str> {
        registry::all().iter().map(|s| s.name).collect()
    }

    /// A shipped spec by name (`llama`, `qwen2`, ...).
    pub fn shipped(name: &str) -> Result<Spec> {
        let Some(shipped) = registry::get(name) else {
            return Err(Error::UnknownSpec {
                name: name.to_string(),
                suggestion: parse::did_you_mean(name, Spec::shipped_names()),
                shipped: Spec::shipped_names()
                    .into_iter()
                    .map(str::to_string)
                    .collect(),
            });
        };
        let mut spec = Spec::parse(shipped.spec, &format!("{name}.shard"))?;
        spec.name = name.to_string();
        spec.shipped = true;
        Ok(spec)
    }

    /// `--spec` argument: a shipped name or a path to a `.shard` file.
    pub fn load(name_or_path: &str) -> Result<Spec> {
        let looks_like_path = name_or_path.contains('/')
            || name_or_path.contains(std::path::MAIN_SEPARATOR)
            || name_or_path.ends_with(".shard");
        if !looks_like_path {
            return Spec::shipped(name_or_path);
        }
        let bytes = read_spec_file(name_or_path)?;
        let source = String::from_utf8(bytes).map_err(|e| Error::Spec {
            file: name_or_path.to_string(),
            line: None,
            key: None,
            reason: format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        })?;
        Spec::parse(&source, name_or_path)
    }

    /// The shipped spec for a config's `architectures`; an unknown architecture is an error
    /// ([`Error::NoSpec`]) whose hint names the `spec` option.
    pub fn detect(config: &Config) -> Result<Spec> {
        let archs: Vec<&str> = match config.values.get("architectures") {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
            Some(serde_json::Value::String(s)) => vec![s.as_str()],
            _ => Vec::new(),
        };
        if archs.is_empty() {
            return Err(Error::NoSpec {
                architectures: Vec::new(),
            });
        }
        for arch in &archs {
            for name in Spec::shipped_names() {
                let spec = Spec::shipped(name)?;
                if spec.architectures.iter().any(|a| a == arch) {
                    return Ok(spec);
                }
            }
        }
        Err(Error::NoSpec {
            architectures: archs.iter().map(|a| a.to_string()).collect(),
        })
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.def.rules.len()
    }
}

/// Applies a spec to every tensor of a checkpoint for a topology.
///
/// Errors name the unmatched tensors, splits that do not divide (tensor, dim, size, tp), and
/// config values the spec needs but cannot find.
pub fn resolve(
    spec: &Spec,
    ckpt: &Checkpoint,
    config: &Config,
    topo: &Topology,
) -> Result<Resolution> {
    resolve::resolve_tensors(spec, &ckpt.tensors, config, topo)
}

/// [`resolve`] for a list of tensors (names, dtypes and shapes; offsets are not used), for
/// callers and tests that have no opened checkpoint. The result is parallel to `tensors`.
pub fn resolve_tensors(
    spec: &Spec,
    tensors: &[TensorInfo],
    config: &Config,
    topo: &Topology,
) -> Result<Resolution> {
    resolve::resolve_tensors(spec, tensors, config, topo)
}
