//! Checkpoint layouts as data: `shard-specs/NAME.synth.json` lists the tensors of an
//! architecture's Hugging Face checkpoint and its named presets, so the generator knows every
//! shipped architecture without code of its own.
//!
//! ```json
//! {
//!   "about": "what the layout follows (the Hugging Face modeling file)",
//!   "layers": "num_hidden_layers",
//!   "quantization": ["gptq", "awq"],
//!   "let": {"hd": "head_dim ?? hidden_size / num_attention_heads"},
//!   "tensors": [
//!     {"name": "model.embed_tokens.weight", "shape": ["vocab_size", "hidden_size"]},
//!     {"for": "layer", "count": "num_hidden_layers", "tensors": [
//!       {"linear": "model.layers.{layer}.self_attn.q_proj", "out": "num_attention_heads * hd", "in": "hidden_size"},
//!       {"name": "model.layers.{layer}.self_attn.q_norm.weight", "shape": ["hd"], "dtype": "F32", "if": "..."}
//!     ]}
//!   ],
//!   "presets": {"qwen3-tiny": {"config": {"architectures": ["Qwen3ForCausalLM"], "...": 1}, "max_file_bytes": 1048576}}
//! }
//! ```
//!
//! Values are expressions of the spec language over config.json (`??` defaults, arithmetic,
//! conditions), `let`s and the loop variables; `{x}` in a name is replaced by the value of
//! `x`. Tensors are listed in item order, loops innermost-last, which is the order of the
//! model's `state_dict`. A `linear` is `NAME.weight` [out, in], or the tensors of the
//! checkpoint's `quantization_config` when the layout lists its method: GPTQ/AWQ packed int4
//! (`qweight`, `qzeros`, `scales`, GPTQ `g_idx`) or FP8 blocks (`weight` F8_E4M3 and F32
//! `weight_scale_inv`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value as Json;

use super::TensorSpec;
use crate::checkpoint::Dtype;
use crate::sharding::expr::{lex, Env, EvalError, Expr, Parser, Value};
use crate::{Error, Result};

/// Most tensors one layout may list: a config claiming billions of layers is refused
/// instead of filling memory.
const MAX_TENSORS: usize = 10_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayout {
    #[allow(dead_code)]
    about: String,
    #[serde(default = "default_layers")]
    layers: String,
    #[serde(default)]
    quantization: Vec<String>,
    #[serde(default)]
    always_tied: bool,
    #[serde(default, rename = "let")]
    lets: serde_json::Map<String, Json>,
    tensors: Vec<RawItem>,
    presets: serde_json::Map<String, Json>,
}

fn default_layers() -> String {
    "num_hidden_layers".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem {
    name: Option<String>,
    linear: Option<String>,
    #[serde(rename = "for")]
    each: Option<String>,
    shape: Option<Vec<Json>>,
    dtype: Option<String>,
    out: Option<Json>,
    #[serde(rename = "in")]
    inp: Option<Json>,
    count: Option<Json>,
    tensors: Option<Vec<RawItem>>,
    #[serde(rename = "if")]
    cond: Option<Json>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreset {
    config: serde_json::Map<String, Json>,
    max_file_bytes: u64,
}

/// A tensor name with `{x}` holes.
#[derive(Debug)]
enum Piece {
    Lit(String),
    Var(String),
}

#[derive(Debug)]
enum Item {
    Tensor {
        name: Vec<Piece>,
        shape: Vec<Expr>,
        dtype: Option<Dtype>,
        cond: Option<Expr>,
        at: String,
    },
    Linear {
        name: Vec<Piece>,
        out: Expr,
        inp: Expr,
        cond: Option<Expr>,
        at: String,
    },
    Loop {
        var: String,
        count: Expr,
        cond: Option<Expr>,
        items: Vec<Item>,
        at: String,
    },
}

/// A parsed layout.
#[derive(Debug)]
pub(crate) struct Layout {
    origin: String,
    /// The config key holding the number of decoder layers.
    pub layers_key: String,
    /// Whether checkpoints of this architecture always tie the LM head (no `-untied` preset).
    pub always_tied: bool,
    quantization: Vec<String>,
    lets: HashMap<String, (Expr, usize)>,
    items: Vec<Item>,
    /// Named presets: (name, config, max_file_bytes), in file order.
    pub presets: Vec<(String, Json, u64)>,
}

fn block_size_error(b: &Json) -> Error {
    Error::config(
        "quantization_config.weight_block_size",
        format!("must be two positive integers, got {b}"),
    )
}

fn bad(origin: &str, msg: String) -> Error {
    Error::Spec {
        file: origin.to_string(),
        line: None,
        key: None,
        reason: msg,
    }
}

/// An expression: a string in the spec language, or a JSON integer or boolean.
fn expr(v: &Json, origin: &str, at: &str) -> Result<Expr> {
    let text = match v {
        Json::String(s) => s.clone(),
        Json::Number(n) if n.is_i64() => n.to_string(),
        Json::Bool(b) => b.to_string(),
        other => {
            return Err(bad(
                origin,
                format!("{at}: expected an expression (a string or an integer), got {other}"),
            ))
        }
    };
    let fail = |col: usize, msg: String| bad(origin, format!("{at}: `{text}` column {col}: {msg}"));
    let toks = lex(&text, 1).map_err(|(col, msg)| fail(col, msg))?;
    let mut p = Parser {
        toks: &toks,
        pos: 0,
        end_col: text.chars().count() + 1,
        nest: 0,
    };
    let e = p.expr().map_err(|(col, msg)| fail(col, msg))?;
    if p.pos != toks.len() {
        return Err(fail(p.col(), format!("unexpected {}", p.describe())));
    }
    Ok(e)
}

fn template(text: &str, origin: &str) -> Result<Vec<Piece>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .map(|c| open + c)
            .ok_or_else(|| bad(origin, format!("`{text}`: `{{` without `}}`")))?;
        if open > 0 {
            out.push(Piece::Lit(rest[..open].to_string()));
        }
        let var = &rest[open + 1..close];
        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(bad(origin, format!("`{text}`: `{{{var}}}` is not a name")));
        }
        out.push(Piece::Var(var.to_string()));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(bad(origin, format!("`{text}`: `}}` without `{{`")));
    }
    if !rest.is_empty() {
        out.push(Piece::Lit(rest.to_string()));
    }
    Ok(out)
}

fn items(raw: Vec<RawItem>, origin: &str) -> Result<Vec<Item>> {
    raw.into_iter().map(|r| item(r, origin)).collect()
}

fn item(r: RawItem, origin: &str) -> Result<Item> {
    let cond_of = |at: &str| r.cond.as_ref().map(|c| expr(c, origin, at)).transpose();
    let need = |v: Option<Json>, at: &str, key: &str| {
        v.ok_or_else(|| bad(origin, format!("{at}: needs `{key}`")))
    };
    match (r.name, r.linear, r.each) {
        (Some(name), None, None) => {
            let at = format!("`{name}`");
            if r.out.is_some() || r.inp.is_some() || r.count.is_some() || r.tensors.is_some() {
                return Err(bad(
                    origin,
                    format!("{at}: a tensor has `shape` and `dtype`"),
                ));
            }
            let shape = r
                .shape
                .ok_or_else(|| bad(origin, format!("{at}: needs `shape`")))?
                .iter()
                .enumerate()
                .map(|(i, s)| expr(s, origin, &format!("{at} shape[{i}]")))
                .collect::<Result<_>>()?;
            let dtype = r
                .dtype
                .map(|d| {
                    d.parse::<Dtype>()
                        .map_err(|_| bad(origin, format!("{at}: unknown dtype `{d}`")))
                })
                .transpose()?;
            Ok(Item::Tensor {
                name: template(&name, origin)?,
                shape,
                dtype,
                cond: cond_of(&at)?,
                at,
            })
        }
        (None, Some(name), None) => {
            let at = format!("`{name}`");
            if r.shape.is_some() || r.dtype.is_some() || r.count.is_some() || r.tensors.is_some() {
                return Err(bad(origin, format!("{at}: a linear has `out` and `in`")));
            }
            Ok(Item::Linear {
                out: expr(&need(r.out, &at, "out")?, origin, &format!("{at} out"))?,
                inp: expr(&need(r.inp, &at, "in")?, origin, &format!("{at} in"))?,
                name: template(&name, origin)?,
                cond: cond_of(&at)?,
                at,
            })
        }
        (None, None, Some(var)) => {
            let at = format!("for `{var}`");
            if r.shape.is_some() || r.dtype.is_some() || r.out.is_some() || r.inp.is_some() {
                return Err(bad(
                    origin,
                    format!("{at}: a loop has `count` and `tensors`"),
                ));
            }
            let count = expr(
                &need(r.count, &at, "count")?,
                origin,
                &format!("{at} count"),
            )?;
            let cond = cond_of(&at)?;
            let inner = r
                .tensors
                .ok_or_else(|| bad(origin, format!("{at}: needs `tensors`")))?;
            Ok(Item::Loop {
                items: items(inner, origin)?,
                var,
                count,
                cond,
                at,
            })
        }
        _ => Err(bad(
            origin,
            "every item has exactly one of `name` (a tensor), `linear` or `for` (a loop)".into(),
        )),
    }
}

impl Layout {
    /// Parses a layout; `origin` names it in errors.
    pub(crate) fn parse(source: &str, origin: &str) -> Result<Layout> {
        let raw: RawLayout = serde_json::from_str(source)
            .map_err(|e| bad(origin, format!("line {}: {e}", e.line())))?;
        let items = items(raw.tensors, origin)?;
        let mut lets = HashMap::new();
        for (i, (name, v)) in raw.lets.iter().enumerate() {
            // A `let` may read loop variables (`layer`): it is then evaluated per use.
            let e = expr(v, origin, &format!("let `{name}`"))?;
            lets.insert(name.clone(), (e, i + 1));
        }
        let mut presets = Vec::new();
        for (name, v) in raw.presets {
            let p: RawPreset = serde_json::from_value(v)
                .map_err(|e| bad(origin, format!("preset `{name}`: {e}")))?;
            presets.push((name, Json::Object(p.config), p.max_file_bytes));
        }
        Ok(Layout {
            origin: origin.to_string(),
            layers_key: raw.layers,
            always_tied: raw.always_tied,
            quantization: raw.quantization,
            lets,
            items,
            presets,
        })
    }

    /// The tensors of a checkpoint with this config, weights in `dtype`, in order.
    pub(crate) fn list(&self, config: &Json, dtype: Dtype) -> Result<Vec<TensorSpec>> {
        let empty = serde_json::Map::new();
        let cfg = config.as_object().unwrap_or(&empty);
        let quant = self.quant(config)?;
        let memo = RefCell::new(HashMap::new());
        let mut l = Lister {
            layout: self,
            cfg,
            memo: &memo,
            dtype,
            quant,
            vars: Vec::new(),
            out: Vec::new(),
        };
        l.items(&self.items)?;
        Ok(l.out)
    }

    fn quant(&self, config: &Json) -> Result<Quant> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(Quant::None);
        };
        let method = q.get("quant_method").and_then(Json::as_str).unwrap_or("");
        if !matches!(method, "gptq" | "awq" | "fp8") {
            return Ok(Quant::None);
        }
        if !self.quantization.iter().any(|m| m == method) {
            return Err(bad(
                &self.origin,
                format!(
                    "quant_method {method:?} is not generated for this architecture (generated: none{})",
                    self.quantization
                        .iter()
                        .map(|m| format!(", {m}"))
                        .collect::<String>()
                ),
            ));
        }
        let uint = |keys: &[&str]| -> Result<u64> {
            keys.iter()
                .find_map(|k| q.get(*k).and_then(Json::as_u64))
                .ok_or_else(|| {
                    Error::config(
                        format!("quantization_config.{}", keys[0]),
                        "must be a non-negative integer",
                    )
                })
        };
        if method == "fp8" {
            let block = match q.get("weight_block_size") {
                None => (128, 128),
                Some(b) => match b.as_array().map(Vec::as_slice) {
                    Some([x, y]) => match (x.as_u64(), y.as_u64()) {
                        (Some(x), Some(y)) if x > 0 && y > 0 => (x, y),
                        _ => return Err(block_size_error(b)),
                    },
                    _ => return Err(block_size_error(b)),
                },
            };
            return Ok(Quant::Fp8 { block });
        }
        let bits = uint(&["bits", "w_bit"])?;
        let g = uint(&["group_size", "q_group_size"])?;
        if bits == 0 || 32 % bits != 0 || g == 0 {
            return Err(Error::config(
                "quantization_config",
                format!("bits {bits} must divide 32 and group_size {g} be positive"),
            ));
        }
        let pf = 32 / bits;
        Ok(if method == "gptq" {
            Quant::Gptq { pf, g }
        } else {
            Quant::Awq { pf, g }
        })
    }
}

/// How `linear` items are stored.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quant {
    None,
    /// GPTQ: `qweight` I32 [in/pf, out], `qzeros` I32 [in/g, out/pf], `scales` [in/g, out],
    /// `g_idx` I32 [in].
    Gptq {
        pf: u64,
        g: u64,
    },
    /// AWQ: `qweight` I32 [in, out/pf], `qzeros` I32 [in/g, out/pf], `scales` [in/g, out].
    Awq {
        pf: u64,
        g: u64,
    },
    /// FP8 blocks: `weight` F8_E4M3 [out, in], `weight_scale_inv` F32
    /// [ceil(out/b0), ceil(in/b1)].
    Fp8 {
        block: (u64, u64),
    },
}

struct Lister<'a> {
    layout: &'a Layout,
    cfg: &'a serde_json::Map<String, Json>,
    memo: &'a RefCell<HashMap<String, Value>>,
    dtype: Dtype,
    quant: Quant,
    vars: Vec<(String, u64)>,
    out: Vec<TensorSpec>,
}

impl Lister<'_> {
    fn env(&self) -> Env<'_> {
        Env {
            lets: &self.layout.lets,
            builtins: &[],
            captures: &self.vars,
            config: self.cfg,
            has: &|_| false,
            memo: self.memo,
            depth: Cell::new(0),
            stack: RefCell::new(Vec::new()),
            read_capture: Cell::new(false),
        }
    }

    fn fail(&self, at: &str, err: EvalError) -> Error {
        bad(&self.layout.origin, format!("{at}: {}", describe(err)))
    }

    fn eval(&self, e: &Expr, at: &str) -> Result<Value> {
        self.env().eval(e).map_err(|err| self.fail(at, err))
    }

    fn uint(&self, e: &Expr, at: &str) -> Result<u64> {
        let v = self.env().int(e).map_err(|err| self.fail(at, err))?;
        u64::try_from(v).map_err(|_| {
            bad(
                &self.layout.origin,
                format!("{at}: expected a non-negative integer, got {v}"),
            )
        })
    }

    fn holds(&self, cond: &Option<Expr>, at: &str) -> Result<bool> {
        match cond {
            None => Ok(true),
            Some(c) => self
                .env()
                .bool(c)
                .map_err(|err| self.fail(&format!("{at} if"), err)),
        }
    }

    fn name(&self, pieces: &[Piece], at: &str) -> Result<String> {
        let mut s = String::new();
        for p in pieces {
            match p {
                Piece::Lit(t) => s.push_str(t),
                Piece::Var(v) => match self.eval(&Expr::Ident(v.clone(), 0), at)? {
                    Value::Int(i) => s.push_str(&i.to_string()),
                    Value::Str(t) => s.push_str(&t),
                    other => {
                        return Err(bad(
                            &self.layout.origin,
                            format!("{at}: `{{{v}}}` is {other:?}, not an integer or a string"),
                        ))
                    }
                },
            }
        }
        Ok(s)
    }

    fn push(&mut self, name: String, dtype: Dtype, shape: Vec<u64>) -> Result<()> {
        if self.out.len() >= MAX_TENSORS {
            return Err(bad(
                &self.layout.origin,
                format!("more than {MAX_TENSORS} tensors; check the config's sizes"),
            ));
        }
        self.out.push((name, dtype, shape));
        Ok(())
    }

    fn items(&mut self, items: &[Item]) -> Result<()> {
        for it in items {
            match it {
                Item::Tensor {
                    name,
                    shape,
                    dtype,
                    cond,
                    at,
                } => {
                    if !self.holds(cond, at)? {
                        continue;
                    }
                    let dims = shape
                        .iter()
                        .enumerate()
                        .map(|(i, e)| self.uint(e, &format!("{at} shape[{i}]")))
                        .collect::<Result<Vec<u64>>>()?;
                    let n = self.name(name, at)?;
                    self.push(n, dtype.unwrap_or(self.dtype), dims)?;
                }
                Item::Linear {
                    name,
                    out,
                    inp,
                    cond,
                    at,
                } => {
                    if !self.holds(cond, at)? {
                        continue;
                    }
                    let o = self.uint(out, &format!("{at} out"))?;
                    let i = self.uint(inp, &format!("{at} in"))?;
                    let n = self.name(name, at)?;
                    self.linear(&n, o, i)?;
                }
                Item::Loop {
                    var,
                    count,
                    cond,
                    items,
                    at,
                } => {
                    if !self.holds(cond, at)? {
                        continue;
                    }
                    let n = self.uint(count, &format!("{at} count"))?;
                    for v in 0..n {
                        self.vars.push((var.clone(), v));
                        let r = self.items(items);
                        self.vars.pop();
                        r?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A linear layer `name` of logical shape [out, inp], stored as the quantization says.
    fn linear(&mut self, name: &str, out: u64, inp: u64) -> Result<()> {
        let dt = self.dtype;
        let need = |ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(Error::config(
                    "quantization_config",
                    format!("packing/groups do not divide {name}: [{out}, {inp}]"),
                ))
            }
        };
        match self.quant {
            Quant::None => self.push(format!("{name}.weight"), dt, vec![out, inp]),
            Quant::Gptq { pf, g } => {
                need(inp % pf == 0 && out % pf == 0 && inp % g == 0)?;
                self.push(format!("{name}.qweight"), Dtype::I32, vec![inp / pf, out])?;
                self.push(
                    format!("{name}.qzeros"),
                    Dtype::I32,
                    vec![inp / g, out / pf],
                )?;
                self.push(format!("{name}.scales"), dt, vec![inp / g, out])?;
                self.push(format!("{name}.g_idx"), Dtype::I32, vec![inp])
            }
            Quant::Awq { pf, g } => {
                need(out % pf == 0 && inp % g == 0)?;
                self.push(format!("{name}.qweight"), Dtype::I32, vec![inp, out / pf])?;
                self.push(
                    format!("{name}.qzeros"),
                    Dtype::I32,
                    vec![inp / g, out / pf],
                )?;
                self.push(format!("{name}.scales"), dt, vec![inp / g, out])
            }
            Quant::Fp8 { block: (bo, bi) } => {
                self.push(format!("{name}.weight"), Dtype::F8_E4M3, vec![out, inp])?;
                self.push(
                    format!("{name}.weight_scale_inv"),
                    Dtype::F32,
                    vec![out.div_ceil(bo), inp.div_ceil(bi)],
                )
            }
        }
    }
}

/// An evaluation error in words, naming the config key where one is missing.
fn describe(e: EvalError) -> String {
    match e {
        EvalError::Missing { name, .. } => format!("config has no `{name}`"),
        EvalError::Cyclic { name, chain, .. } => format!(
            "cyclic let: `{name}` depends on itself ({})",
            chain.join(" -> ")
        ),
        EvalError::Other { msg, .. } => msg,
        EvalError::InLet { inner, .. } => describe(*inner),
    }
}
