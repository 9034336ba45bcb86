//! vLLM name maps (`shard-specs/<spec>.vllm.json`): how a rank's checkpoint tensors become
//! the entries of vLLM's `model.state_dict()`, as data next to the specs.
//!
//! A map says, for one architecture family and one vLLM version:
//! - `prefixes`: renames by name prefix (GPT-2's `transformer.`), the first match wins;
//! - `fuse`: checkpoint parts concatenated into one vLLM parameter (`q/k/v_proj` →
//!   `qkv_proj`), along a dimension that may depend on the suffix (GPTQ `qweight` is
//!   `[in/8, out]`, so its parts join on dim 1);
//! - `experts`: FusedMoE stacking, per local expert (in expert-id order) the parts fused as
//!   above, then the experts stacked on a new leading dimension;
//! - `transpose`: 2-D tensors vLLM holds transposed (GPT-2's Conv1D weights);
//! - `aliases`: groups of names vLLM's `state_dict()` lists for one parameter (a module
//!   registered twice, e.g. DeepSeek's `self_attn.o_proj` and `self_attn.mla_attn.o_proj`);
//!   like `ShardedStateLoader`, the smallest name of the group is kept;
//! - `tie`: the names tied embeddings go under (vLLM's `ShardedStateLoader` keeps the
//!   smallest name of tensors sharing storage);
//! - `buffers`: persistent buffers vLLM's model has that no checkpoint provides, with the
//!   value vLLM's default load leaves in them.
//!
//! Names are templates of dot-separated segments; a segment may hold one `{capture}` with a
//! literal prefix and suffix (`w13_{S}`); a capture matches one non-empty segment part.
//! The format is docs/vllm.md's "Name maps".

use serde::Deserialize;

use crate::checkpoint::Dtype;
use crate::sharding::{registry, Spec};
use crate::{Error, Result};

/// One dot-separated segment of a [`Template`]: `prefix{capture}suffix` or a literal.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    prefix: String,
    capture: Option<String>,
    suffix: String,
}

/// A tensor-name template such as `model.layers.{L}.self_attn.qkv_proj.{S}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    text: String,
    segments: Vec<Segment>,
}

/// Captured values by capture name, in template order.
pub type Captures = Vec<(String, String)>;

impl Template {
    /// Parses a template; `key` names it in errors.
    fn parse(text: &str, origin: &str, key: &str) -> Result<Template> {
        let bad = |why: &str| Error::Spec {
            file: origin.to_string(),
            line: None,
            key: Some(key.to_string()),
            reason: format!("{text:?}: {why}"),
        };
        if text.is_empty() {
            return Err(bad("empty name"));
        }
        let mut segments = Vec::new();
        for seg in text.split('.') {
            if seg.is_empty() {
                return Err(bad("empty segment (two dots, or a dot at an end)"));
            }
            let segment = match seg.find('{') {
                None if seg.contains('}') => return Err(bad("`}` without `{`")),
                None => Segment {
                    prefix: seg.to_string(),
                    capture: None,
                    suffix: String::new(),
                },
                Some(open) => {
                    let Some(close) = seg[open..].find('}').map(|c| c + open) else {
                        return Err(bad("`{` without `}`"));
                    };
                    let name = &seg[open + 1..close];
                    let suffix = &seg[close + 1..];
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(bad("a capture name is letters, digits or `_`"));
                    }
                    if suffix.contains('{') || suffix.contains('}') {
                        return Err(bad("at most one capture per segment"));
                    }
                    Segment {
                        prefix: seg[..open].to_string(),
                        capture: Some(name.to_string()),
                        suffix: suffix.to_string(),
                    }
                }
            };
            segments.push(segment);
        }
        let t = Template {
            text: text.to_string(),
            segments,
        };
        let names = t.capture_names();
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(bad(&format!("capture `{{{n}}}` appears twice")));
            }
        }
        Ok(t)
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Capture names, in order.
    pub fn capture_names(&self) -> Vec<&str> {
        self.segments
            .iter()
            .filter_map(|s| s.capture.as_deref())
            .collect()
    }

    /// The captures if `name` matches.
    pub fn matches(&self, name: &str) -> Option<Captures> {
        let mut caps = Vec::new();
        let mut parts = name.split('.');
        for seg in &self.segments {
            let part = parts.next()?;
            match &seg.capture {
                None => {
                    if part != seg.prefix {
                        return None;
                    }
                }
                Some(c) => {
                    let inner = part
                        .strip_prefix(seg.prefix.as_str())?
                        .strip_suffix(seg.suffix.as_str())?;
                    if inner.is_empty() {
                        return None;
                    }
                    caps.push((c.clone(), inner.to_string()));
                }
            }
        }
        parts.next().is_none().then_some(caps)
    }

    /// The name with every capture filled from `caps` (`None` if one is missing).
    pub fn render(&self, caps: &[(String, String)]) -> Option<String> {
        let mut out = String::with_capacity(self.text.len() + 16);
        for (i, seg) in self.segments.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            out.push_str(&seg.prefix);
            if let Some(c) = &seg.capture {
                out.push_str(&caps.iter().find(|(n, _)| n == c)?.1);
            }
            out.push_str(&seg.suffix);
        }
        Some(out)
    }
}

/// Parts concatenated into one vLLM parameter.
#[derive(Clone, Debug)]
pub struct FuseRule {
    /// The vLLM name.
    pub into: Template,
    /// The checkpoint parts (after `prefixes`), in vLLM's order.
    pub parts: Vec<Template>,
    /// The concatenation dimension per value of the `{S}` capture (the suffix), or for every
    /// suffix when the key is `*`.
    pub dims: Vec<(String, usize)>,
    /// Fuse only when every part is present; otherwise the parts keep their names (DeepSeek
    /// without `q_lora_rank` has no `q_a_proj`, and vLLM keeps `kv_a_proj_with_mqa` alone).
    pub if_complete: bool,
}

impl FuseRule {
    /// The concatenation dimension for these captures, if the rule covers the suffix.
    pub fn dim(&self, caps: &[(String, String)]) -> Option<usize> {
        let suffix = caps.iter().find(|(n, _)| n == "S").map(|(_, v)| v.as_str());
        self.dims
            .iter()
            .find(|(s, _)| s == "*" || Some(s.as_str()) == suffix)
            .map(|&(_, d)| d)
    }
}

/// Which pipeline stages build the LM head that tied embeddings share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadStages {
    /// Only the last stage (Llama-family classes: `PPMissingLayer` elsewhere).
    Last,
    /// Every stage (Mixtral, Qwen2-MoE, GPT-2).
    All,
}

/// Tied word embeddings.
#[derive(Clone, Debug)]
pub struct TieRule {
    /// The embedding's vLLM name.
    pub embedding: String,
    /// The head's vLLM name (also its checkpoint name: a stored head unties).
    pub head: String,
    /// `tie_word_embeddings` when config.json does not say.
    pub default: bool,
    /// Stages whose model builds the head.
    pub head_stages: HeadStages,
}

/// A persistent buffer no checkpoint provides.
#[derive(Clone, Debug)]
pub struct BufferRule {
    /// The buffer's vLLM name.
    pub name: Template,
    /// A rank holds the buffer once for every distinct capture of `with` among its tensors
    /// (vLLM names): the module the buffer belongs to.
    pub with: Template,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    /// Every element's value, as vLLM's load leaves it.
    pub value: f64,
}

/// A parsed, checked vLLM name map.
#[derive(Clone, Debug)]
pub struct VllmMap {
    /// Where the map came from, for messages.
    pub origin: String,
    /// The vLLM version the map matches.
    pub vllm: String,
    /// `quantization_config.quant_method` values the map covers (`none`: unquantized).
    pub quantization: Vec<String>,
    /// Prefix renames, first match wins.
    pub prefixes: Vec<(String, String)>,
    /// Fused parameters.
    pub fuse: Vec<FuseRule>,
    /// FusedMoE expert stacking (parts hold `{E}`).
    pub experts: Vec<FuseRule>,
    /// Tensors vLLM holds transposed (vLLM names, 2-D).
    pub transpose: Vec<Template>,
    /// Names of one parameter (same captures in every template of a group).
    pub aliases: Vec<Vec<Template>>,
    /// Tied embeddings.
    pub tie: Option<TieRule>,
    /// Buffers no checkpoint provides.
    pub buffers: Vec<BufferRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    vllm: String,
    #[serde(default)]
    about: Option<String>,
    quantization: Vec<String>,
    #[serde(default)]
    prefixes: Vec<RawPrefix>,
    #[serde(default)]
    fuse: Vec<RawFuse>,
    #[serde(default)]
    experts: Vec<RawFuse>,
    #[serde(default)]
    transpose: Vec<String>,
    #[serde(default)]
    aliases: Vec<Vec<String>>,
    #[serde(default)]
    tie: Option<RawTie>,
    #[serde(default)]
    buffers: Vec<RawBuffer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrefix {
    from: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFuse {
    into: String,
    parts: Vec<String>,
    dim: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    if_complete: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTie {
    embedding: String,
    head: String,
    default: bool,
    head_stages: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    name: String,
    with: String,
    dtype: String,
    shape: Vec<u64>,
    value: f64,
}

/// Largest map file read (shipped maps are a few KB).
const MAX_MAP_FILE: u64 = 1 << 20;

impl VllmMap {
    /// Parses a map; `origin` names it in errors (`file: \`key\`: what is wrong`).
    pub fn parse(source: &str, origin: &str) -> Result<VllmMap> {
        let raw: RawMap = serde_json::from_str(source).map_err(|e| Error::SpecAt {
            file: origin.to_string(),
            line: e.line(),
            col: e.column(),
            message: strip_position(&e.to_string()).to_string(),
            excerpt: String::new(),
        })?;
        let _ = raw.about;
        let check = MapChecker { origin };
        check.version_and_quantization(&raw.vllm, &raw.quantization)?;
        let prefixes = raw
            .prefixes
            .into_iter()
            .map(|p| (p.from, p.to))
            .collect::<Vec<_>>();
        let fuse = check.fuse_rules(raw.fuse, "fuse", false)?;
        let experts = check.fuse_rules(raw.experts, "experts", true)?;
        let transpose = raw
            .transpose
            .iter()
            .enumerate()
            .map(|(i, s)| check.template(s, &format!("transpose[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let aliases = raw
            .aliases
            .iter()
            .enumerate()
            .map(|(i, group)| check.alias_group(i, group))
            .collect::<Result<Vec<_>>>()?;
        let tie = raw.tie.map(|r| check.tie_rule(r)).transpose()?;
        let buffers = raw
            .buffers
            .into_iter()
            .enumerate()
            .map(|(i, b)| check.buffer_rule(b, &format!("buffers[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        Ok(VllmMap {
            origin: origin.to_string(),
            vllm: raw.vllm,
            quantization: raw.quantization,
            prefixes,
            fuse,
            experts,
            transpose,
            aliases,
            tie,
            buffers,
        })
    }

    /// The map beside `spec`: the shipped map of a shipped spec, `<dir>/<stem>.vllm.json` for
    /// a spec read from `<dir>/<stem>.shard`. A spec without one is [`Error::Unsupported`].
    pub fn for_spec(spec: &Spec) -> Result<VllmMap> {
        if spec.is_shipped() {
            let Some(src) = registry::get(&spec.name).and_then(|s| s.vllm_map) else {
                return Err(Error::Unsupported {
                    what: format!("spec `{}`", spec.name),
                    why: "no vLLM name map is shipped for it".into(),
                });
            };
            return VllmMap::parse(src, &format!("{}.vllm.json", spec.name));
        }
        let shard = std::path::Path::new(&spec.origin);
        let path = shard.with_extension("vllm.json");
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Unsupported {
                what: format!("spec {}", crate::error::escaped_path(shard)),
                why: format!(
                    "no vLLM name map beside it ({} does not exist)",
                    crate::error::escaped_path(&path)
                ),
            }),
            Err(e) => Err(Error::io(&path, e)),
            Ok(m) if !m.is_file() || m.len() > MAX_MAP_FILE => Err(Error::InvalidFile {
                file: path.to_string_lossy().into_owned(),
                reason: format!(
                    "a name map must be a regular file of at most {MAX_MAP_FILE} bytes"
                ),
            }),
            Ok(_) => {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                VllmMap::parse(&text, &path.to_string_lossy())
            }
        }
    }

    /// The name `ShardedStateLoader` keeps for a parameter named `name`: the smallest of its
    /// alias group, or `name` itself.
    pub fn kept_alias(&self, name: &str) -> String {
        for group in &self.aliases {
            for t in group {
                if let Some(caps) = t.matches(name) {
                    return group
                        .iter()
                        .filter_map(|g| g.render(&caps))
                        .min()
                        .unwrap_or_else(|| name.to_string());
                }
            }
        }
        name.to_string()
    }

    /// The vLLM name of a checkpoint tensor after `prefixes` (before fusion).
    pub fn renamed(&self, name: &str) -> String {
        for (from, to) in &self.prefixes {
            if let Some(rest) = name.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        name.to_string()
    }
}

/// Checks a [`RawMap`]'s sections into rules; every error names the map and the offending key.
struct MapChecker<'a> {
    origin: &'a str,
}

impl MapChecker<'_> {
    /// A template at `key`.
    fn template(&self, text: &str, key: &str) -> Result<Template> {
        Template::parse(text, self.origin, key)
    }

    /// The error for `key`.
    fn error(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Spec {
            file: self.origin.to_string(),
            line: None,
            key: Some(key.to_string()),
            reason: reason.into(),
        }
    }

    fn version_and_quantization(&self, vllm: &str, quantization: &[String]) -> Result<()> {
        if vllm.trim().is_empty() {
            return Err(self.error("vllm", "the vLLM version the map matches is empty"));
        }
        if quantization.is_empty() {
            return Err(self.error(
                "quantization",
                "lists no quant_method (`none` for unquantized checkpoints)",
            ));
        }
        Ok(())
    }

    /// The rules of a `fuse` section, or of `experts` (whose parts add the `{E}` capture).
    fn fuse_rules(
        &self,
        raws: Vec<RawFuse>,
        section: &str,
        experts: bool,
    ) -> Result<Vec<FuseRule>> {
        raws.into_iter()
            .enumerate()
            .map(|(i, r)| self.fuse_rule(r, &format!("{section}[{i}]"), experts))
            .collect()
    }

    fn fuse_rule(&self, r: RawFuse, key: &str, experts: bool) -> Result<FuseRule> {
        let into = self.template(&r.into, &format!("{key}.into"))?;
        if r.parts.is_empty() {
            return Err(self.error(&format!("{key}.parts"), "lists no parts"));
        }
        let parts = r
            .parts
            .iter()
            .enumerate()
            .map(|(j, p)| self.fuse_part(&into, p, key, &format!("{key}.parts[{j}]"), experts))
            .collect::<Result<Vec<_>>>()?;
        let dims = self.fuse_dims(&r.dim, key)?;
        Ok(FuseRule {
            into,
            parts,
            dims,
            if_complete: r.if_complete,
        })
    }

    /// One part of the rule at `rule_key`: its captures must be those of `into` (plus `{E}`
    /// for experts), so that every part of one vLLM name is found from that name's captures.
    fn fuse_part(
        &self,
        into: &Template,
        text: &str,
        rule_key: &str,
        part_key: &str,
        experts: bool,
    ) -> Result<Template> {
        let part = self.template(text, part_key)?;
        let mut need: Vec<&str> = into.capture_names();
        if experts {
            if into.capture_names().contains(&"E") {
                return Err(self.error(
                    &format!("{rule_key}.into"),
                    "the stacked name cannot hold the expert capture `{E}`",
                ));
            }
            need.push("E");
        }
        let mut have = part.capture_names();
        have.sort_unstable();
        need.sort_unstable();
        if have != need {
            return Err(self.error(
                part_key,
                format!(
                    "captures {{{}}} must be those of `into`{} ({{{}}})",
                    have.join("}, {"),
                    if experts { " plus `{E}`" } else { "" },
                    need.join("}, {")
                ),
            ));
        }
        Ok(part)
    }

    /// The rule's concatenation dimension per suffix, in the file's order.
    fn fuse_dims(
        &self,
        dim: &serde_json::Map<String, serde_json::Value>,
        key: &str,
    ) -> Result<Vec<(String, usize)>> {
        if dim.is_empty() {
            return Err(self.error(
                &format!("{key}.dim"),
                "maps no suffix to a dimension (e.g. {\"weight\": 0})",
            ));
        }
        dim.iter()
            .map(|(suffix, v)| {
                let d = v.as_u64().filter(|&d| d < 8).ok_or_else(|| {
                    self.error(
                        &format!("{key}.dim.{suffix}"),
                        format!("{v} is not a dimension (0..8)"),
                    )
                })?;
                Ok((suffix.clone(), d as usize))
            })
            .collect()
    }

    /// Alias group `i`: at least two names, all with the same captures (one name is
    /// rendered from another's captures).
    fn alias_group(&self, i: usize, group: &[String]) -> Result<Vec<Template>> {
        if group.len() < 2 {
            return Err(self.error(
                &format!("aliases[{i}]"),
                "a group names one parameter at least twice",
            ));
        }
        let group = group
            .iter()
            .enumerate()
            .map(|(j, n)| self.template(n, &format!("aliases[{i}][{j}]")))
            .collect::<Result<Vec<_>>>()?;
        let mut first = group[0].capture_names();
        first.sort_unstable();
        for (j, g) in group.iter().enumerate().skip(1) {
            let mut c = g.capture_names();
            c.sort_unstable();
            if c != first {
                return Err(self.error(
                    &format!("aliases[{i}][{j}]"),
                    format!(
                        "captures differ from aliases[{i}][0] ({})",
                        group[0].as_str()
                    ),
                ));
            }
        }
        Ok(group)
    }

    fn tie_rule(&self, r: RawTie) -> Result<TieRule> {
        let head_stages = match r.head_stages.as_str() {
            "last" => HeadStages::Last,
            "all" => HeadStages::All,
            other => {
                return Err(self.error(
                    "tie.head_stages",
                    format!("{other:?} is not \"last\" or \"all\""),
                ))
            }
        };
        Ok(TieRule {
            embedding: r.embedding,
            head: r.head,
            default: r.default,
            head_stages,
        })
    }

    /// The buffer at `key`: a float of bounded size, named from captures of `with`.
    fn buffer_rule(&self, b: RawBuffer, key: &str) -> Result<BufferRule> {
        let name = self.template(&b.name, &format!("{key}.name"))?;
        let with = self.template(&b.with, &format!("{key}.with"))?;
        let dtype = self.buffer_dtype(&b.dtype, key)?;
        for c in name.capture_names() {
            if !with.capture_names().contains(&c) {
                return Err(self.error(
                    &format!("{key}.name"),
                    format!("capture `{{{c}}}` is not in `with`"),
                ));
            }
        }
        if b.shape.iter().product::<u64>() > 1 << 20 {
            return Err(self.error(&format!("{key}.shape"), "more than 2^20 elements"));
        }
        Ok(BufferRule {
            name,
            with,
            dtype,
            shape: b.shape,
            value: b.value,
        })
    }

    fn buffer_dtype(&self, text: &str, key: &str) -> Result<Dtype> {
        let dtype = text.parse::<Dtype>().map_err(|_| {
            self.error(
                &format!("{key}.dtype"),
                format!("{text:?} is not a safetensors dtype (F32, BF16, ...)"),
            )
        })?;
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64) {
            return Err(self.error(
                &format!("{key}.dtype"),
                format!("{dtype}: buffers are floating point (F64, F32, F16, BF16)"),
            ));
        }
        Ok(dtype)
    }
}

/// serde_json's message without its trailing " at line L column C" (the caller puts the
/// position first, as `file:line:col:`).
fn strip_position(msg: &str) -> &str {
    match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_and_render() {
        let t = Template::parse("model.layers.{L}.mlp.experts.w13_{S}", "m", "k").unwrap();
        let caps = t.matches("model.layers.3.mlp.experts.w13_weight").unwrap();
        assert_eq!(
            caps,
            vec![("L".into(), "3".into()), ("S".into(), "weight".into())]
        );
        assert_eq!(
            t.render(&caps).unwrap(),
            "model.layers.3.mlp.experts.w13_weight"
        );
        assert!(t.matches("model.layers.3.mlp.experts.w13_").is_none());
        assert!(t
            .matches("model.layers.3.mlp.experts.w13_weight.x")
            .is_none());
        assert!(t.matches("model.layers.3.mlp.experts").is_none());
    }

    /// The key and reason of a map's `Error::Spec`, or a panic naming what came instead.
    fn spec_error(json: &str) -> (String, String) {
        match VllmMap::parse(json, "m.vllm.json") {
            Err(Error::Spec {
                file,
                line: None,
                key: Some(key),
                reason,
            }) => {
                assert_eq!(file, "m.vllm.json");
                (key, reason)
            }
            other => panic!("{json}: not a keyed spec error: {other:?}"),
        }
    }

    /// A map with `body` (JSON members, no braces) after a valid `vllm` and `quantization`.
    fn with(body: &str) -> String {
        format!(r#"{{"vllm": "0.33.0", "quantization": ["none"], {body}}}"#)
    }

    #[test]
    fn every_section_parses_into_its_rules() {
        let src = with(
            r#""about": "test map",
            "prefixes": [{"from": "transformer.", "to": "model."}, {"from": "lm.", "to": ""}],
            "fuse": [{"into": "m.{L}.qkv.{S}", "parts": ["m.{L}.q.{S}", "m.{L}.k.{S}"],
                      "dim": {"weight": 0, "qweight": 1}, "if_complete": true}],
            "experts": [{"into": "m.{L}.w13_{S}", "parts": ["m.{L}.e.{E}.w1.{S}", "m.{L}.e.{E}.w3.{S}"],
                         "dim": {"*": 0}}],
            "transpose": ["m.{L}.fc.weight"],
            "aliases": [["m.{L}.o", "m.{L}.attn.o"]],
            "tie": {"embedding": "m.embed.weight", "head": "lm_head.weight", "default": true,
                    "head_stages": "last"},
            "buffers": [{"name": "m.{L}.scale", "with": "m.{L}.attn.{S}", "dtype": "BF16",
                         "shape": [1024, 1024], "value": 0.5}]"#,
        );
        let m = VllmMap::parse(&src, "m.vllm.json").unwrap();
        assert_eq!(m.origin, "m.vllm.json");
        assert_eq!(m.vllm, "0.33.0");
        assert_eq!(m.quantization, ["none"]);
        assert_eq!(
            m.prefixes,
            [
                ("transformer.".to_string(), "model.".to_string()),
                ("lm.".to_string(), String::new())
            ]
        );
        assert_eq!(m.fuse.len(), 1);
        let f = &m.fuse[0];
        assert_eq!(f.into.as_str(), "m.{L}.qkv.{S}");
        let parts: Vec<&str> = f.parts.iter().map(Template::as_str).collect();
        assert_eq!(parts, ["m.{L}.q.{S}", "m.{L}.k.{S}"]);
        // preserve_order: the dims keep the file's order.
        assert_eq!(
            f.dims,
            [("weight".to_string(), 0), ("qweight".to_string(), 1)]
        );
        assert!(f.if_complete);
        assert_eq!(m.experts.len(), 1);
        let e = &m.experts[0];
        assert_eq!(e.into.as_str(), "m.{L}.w13_{S}");
        assert_eq!(e.parts[1].as_str(), "m.{L}.e.{E}.w3.{S}");
        assert_eq!(e.dims, [("*".to_string(), 0)]);
        assert!(!e.if_complete);
        let transpose: Vec<&str> = m.transpose.iter().map(Template::as_str).collect();
        assert_eq!(transpose, ["m.{L}.fc.weight"]);
        assert_eq!(m.aliases.len(), 1);
        let group: Vec<&str> = m.aliases[0].iter().map(Template::as_str).collect();
        assert_eq!(group, ["m.{L}.o", "m.{L}.attn.o"]);
        let tie = m.tie.as_ref().unwrap();
        assert_eq!(tie.embedding, "m.embed.weight");
        assert_eq!(tie.head, "lm_head.weight");
        assert!(tie.default);
        assert_eq!(tie.head_stages, HeadStages::Last);
        assert_eq!(m.buffers.len(), 1);
        let b = &m.buffers[0];
        assert_eq!(b.name.as_str(), "m.{L}.scale");
        assert_eq!(b.with.as_str(), "m.{L}.attn.{S}");
        assert_eq!(b.dtype, Dtype::BF16);
        // 2^20 elements is the largest buffer allowed.
        assert_eq!(b.shape, [1024, 1024]);
        assert_eq!(b.value, 0.5);
        // Sections left out are empty.
        let m = VllmMap::parse(
            &with(
                r#""tie": {"embedding": "e", "head": "h", "default": false, "head_stages": "all"}"#,
            ),
            "m",
        )
        .unwrap();
        assert!(m.prefixes.is_empty() && m.fuse.is_empty() && m.experts.is_empty());
        assert!(m.transpose.is_empty() && m.aliases.is_empty() && m.buffers.is_empty());
        assert_eq!(m.tie.unwrap().head_stages, HeadStages::All);
    }

    #[test]
    fn each_bad_map_names_its_key_and_reason() {
        let fuse = |into: &str, parts: &str, dim: &str| {
            with(&format!(
                r#""fuse": [{{"into": "{into}", "parts": {parts}, "dim": {dim}}}]"#
            ))
        };
        let experts = |into: &str, parts: &str| {
            with(&format!(
                r#""experts": [{{"into": "{into}", "parts": {parts}, "dim": {{"weight": 0}}}}]"#
            ))
        };
        let buffer = |name: &str, with_: &str, dtype: &str, shape: &str| {
            with(&format!(
                r#""buffers": [{{"name": "{name}", "with": "{with_}", "dtype": "{dtype}", "shape": {shape}, "value": 1}}]"#
            ))
        };
        let cases: Vec<(String, &str, &str)> = vec![
            // The version is checked before the quantization list.
            (
                r#"{"vllm": " ", "quantization": []}"#.into(),
                "vllm",
                "the vLLM version the map matches is empty",
            ),
            (
                r#"{"vllm": "0.33.0", "quantization": []}"#.into(),
                "quantization",
                "lists no quant_method (`none` for unquantized checkpoints)",
            ),
            (
                fuse("a..b", "[]", "{}"),
                "fuse[0].into",
                "\"a..b\": empty segment (two dots, or a dot at an end)",
            ),
            (fuse("a.{L}", "[]", "{}"), "fuse[0].parts", "lists no parts"),
            (
                fuse("a.{L}", r#"["b.{L}", "c.{L"]"#, "{}"),
                "fuse[0].parts[1]",
                "\"c.{L\": `{` without `}`",
            ),
            (
                fuse("a.{L}.qkv.{S}", r#"["a.{L}.q.{S}", "a.{X}.k.{S}"]"#, "{}"),
                "fuse[0].parts[1]",
                "captures {S}, {X} must be those of `into` ({L}, {S})",
            ),
            (
                fuse("a.{L}", r#"["b.{L}"]"#, "{}"),
                "fuse[0].dim",
                "maps no suffix to a dimension (e.g. {\"weight\": 0})",
            ),
            (
                fuse("a.{L}", r#"["b.{L}"]"#, r#"{"weight": 0, "bias": 8}"#),
                "fuse[0].dim.bias",
                "8 is not a dimension (0..8)",
            ),
            (
                fuse("a.{L}", r#"["b.{L}"]"#, r#"{"weight": "x"}"#),
                "fuse[0].dim.weight",
                "\"x\" is not a dimension (0..8)",
            ),
            (
                experts("a.{E}.w", r#"["a.{E}.e.w"]"#),
                "experts[0].into",
                "the stacked name cannot hold the expert capture `{E}`",
            ),
            (
                experts("a.{L}.w13.{S}", r#"["a.{L}.e.{X}.w1.{S}"]"#),
                "experts[0].parts[0]",
                "captures {L}, {S}, {X} must be those of `into` plus `{E}` ({E}, {L}, {S})",
            ),
            // `fuse` is checked before `experts`.
            (
                with(
                    r#""experts": [{"into": "a", "parts": [], "dim": {}}],
                       "fuse": [{"into": "b", "parts": [], "dim": {}}]"#,
                ),
                "fuse[0].parts",
                "lists no parts",
            ),
            (
                with(r#""transpose": ["a.b", "a."]"#),
                "transpose[1]",
                "\"a.\": empty segment (two dots, or a dot at an end)",
            ),
            (
                with(r#""aliases": [["a.b", "a.c"], ["a.d"]]"#),
                "aliases[1]",
                "a group names one parameter at least twice",
            ),
            (
                with(r#""aliases": [["a.{L}.o", "a.{L}.{L}"]]"#),
                "aliases[0][1]",
                "\"a.{L}.{L}\": capture `{L}` appears twice",
            ),
            (
                with(r#""aliases": [["a.{L}.o", "a.{L}.m", "a.{L}.m.{X}"]]"#),
                "aliases[0][2]",
                "captures differ from aliases[0][0] (a.{L}.o)",
            ),
            (
                with(
                    r#""tie": {"embedding": "e", "head": "h", "default": false, "head_stages": "first"}"#,
                ),
                "tie.head_stages",
                "\"first\" is not \"last\" or \"all\"",
            ),
            (
                buffer("x", "y..z", "F32", "[]"),
                "buffers[0].with",
                "\"y..z\": empty segment (two dots, or a dot at an end)",
            ),
            (
                buffer("x", "y", "X9", "[]"),
                "buffers[0].dtype",
                "\"X9\" is not a safetensors dtype (F32, BF16, ...)",
            ),
            (
                buffer("x", "y", "I8", "[]"),
                "buffers[0].dtype",
                "I8: buffers are floating point (F64, F32, F16, BF16)",
            ),
            (
                buffer("x.{L}.{S}", "y.{L}", "F16", "[]"),
                "buffers[0].name",
                "capture `{S}` is not in `with`",
            ),
            (
                buffer("x", "y", "F64", "[1025, 1024]"),
                "buffers[0].shape",
                "more than 2^20 elements",
            ),
        ];
        for (json, key, reason) in cases {
            assert_eq!(
                spec_error(&json),
                (key.to_string(), reason.to_string()),
                "{json}"
            );
        }
    }

    #[test]
    fn a_json_error_names_its_position() {
        // A JSON error carries its position, without serde's own " at line L column C".
        match VllmMap::parse("{\n  \"vllm\": 1}", "m.vllm.json") {
            Err(Error::SpecAt {
                file,
                line,
                col,
                message,
                ..
            }) => {
                assert_eq!((file.as_str(), line), ("m.vllm.json", 2));
                assert!(col > 0);
                assert!(
                    message.starts_with("invalid type: integer `1`"),
                    "{message}"
                );
                assert!(!message.contains(" at line "), "{message}");
            }
            other => panic!("not a positioned error: {other:?}"),
        }
    }

    #[test]
    fn every_shipped_map_parses() {
        for s in registry::all() {
            if let Some(src) = s.vllm_map {
                VllmMap::parse(src, &format!("{}.vllm.json", s.name)).unwrap();
            }
        }
    }
}
