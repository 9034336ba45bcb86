//! Applying a parsed spec to a catalog: first matching rule wins, then stages and layouts.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use super::complete::Completeness;
use super::expr::{Env, EvalError, Expr, Value};
use super::parse::{
    did_you_mean, spec_at, ExpertsClause, Op, PartDef, PartMode, Placement, Rule, StageWhich,
};
use super::{Config, Layout, Piece, Resolution, Resolved, Shards, Spec, TensorKind};
use crate::checkpoint::TensorInfo;
use crate::error::SpecPosition;
use crate::topology::Topology;
use crate::{Error, Result};

/// Most unmatched tensor names listed in the error.
const MAX_LISTED: usize = 10;

/// Most layers a spec may declare: far above any real model, low enough that a typo such as
/// `layers 9223372036854775807` is an error rather than "every layer on stage 0".
pub(crate) const MAX_LAYERS: usize = 1 << 20;

/// Resolves tensors given as a slice (what [`super::resolve`] does for a whole checkpoint).
pub(crate) fn resolve_tensors(
    spec: &Spec,
    tensors: &[TensorInfo],
    config: &Config,
    topo: &Topology,
) -> Result<Resolution> {
    topo.validate()?;
    let def = &spec.def;
    let normalized: Vec<Cow<str>> = tensors.iter().map(|t| normalize(spec, &t.name)).collect();
    let name_set: OnceLock<HashSet<&str>> = OnceLock::new();
    let has = |q: &str| {
        name_set
            .get_or_init(|| normalized.iter().map(|n| n.as_ref()).collect())
            .contains(q)
    };
    let memo = RefCell::new(HashMap::new());
    let builtins = [
        ("tp", topo.tp as i64),
        ("pp", topo.pp as i64),
        ("dp", topo.dp as i64),
        ("ep", topo.ep as i64),
    ];
    let r = Resolver {
        spec,
        config,
        topo,
        builtins,
        has: &has,
        memo: &memo,
    };

    let mut conds: Vec<Option<bool>> = vec![None; def.rules.len()];
    let mut hits = vec![0usize; def.rules.len()];
    let mut layer_stages: Option<(usize, Vec<usize>)> = None;
    // Layouts (and whether they are all equal) per rule, per shape: computed once, cloned
    // per tensor.
    let mut cache: Vec<LayoutCache> = vec![HashMap::new(); def.rules.len()];
    let mut unmatched = Vec::new();
    let mut out = Vec::with_capacity(tensors.len());
    let mut caps: Vec<u64> = Vec::new();
    let mut segs: Vec<&str> = Vec::new();
    let mut completeness = Completeness::default();

    for (t, norm) in tensors.iter().zip(&normalized) {
        segs.clear();
        segs.extend(norm.split('.'));
        let Some(ri) = r.first_rule(&segs, &mut caps, &mut conds)? else {
            unmatched.push(t.name.clone());
            out.push(Resolved::Skip {
                reason: "matches no rule".into(),
            });
            continue;
        };
        hits[ri] += 1;
        let rule = &def.rules[ri];
        let layer = rule.layer_slot.and_then(|s| caps.get(s).copied());
        if let Some(layer) = layer {
            if layer_stages.is_none() {
                layer_stages = Some(r.layer_ends()?);
            }
            if let Some((n, _)) = &layer_stages {
                if layer >= *n as u64 {
                    out.push(Resolved::Skip {
                        reason: format!(
                            "layer {layer} is outside the main model ({n} layers; e.g. a multi-token-prediction layer)"
                        ),
                    });
                    continue;
                }
            }
        }
        if let Op::Skip(reason) = &rule.op {
            out.push(Resolved::Skip {
                reason: format!("{reason} ({}:{})", spec.origin, rule.line),
            });
            continue;
        }
        if let (Some(layer), Some(slot), false) = (layer, rule.layer_slot, rule.optional) {
            completeness.record(ri, rule, slot, layer, &t.name, &segs, &caps);
        }
        let ends = layer_stages.as_ref().map(|(_, ends)| ends.as_slice());
        let stages = r.stages(rule, &caps, layer.zip(ends), &t.name)?;
        if stages.is_empty() {
            out.push(Resolved::Skip {
                reason: format!("no stage selected by {}:{}", spec.origin, rule.line),
            });
            continue;
        }
        // Expert parallelism: whole experts per EP rank.
        if let (Some(ex), Some(slot), true) =
            (&rule.experts, rule.expert_slot, topo.expert_parallel())
        {
            let e = caps.get(slot).copied().unwrap_or(0);
            let owner = r.expert_owner(rule, ex, e, &t.name)?;
            out.push(Resolved::Held {
                stages,
                shards: Shards::Expert {
                    expert: e,
                    owner,
                    layout: Layout::full(&t.shape),
                },
                kind: rule.kind,
                replicated: false,
            });
            continue;
        }
        let (layouts, replicated) = r.layouts_cached(rule, t, &mut cache[ri])?;
        let kind = match (&rule.op, rule.kind) {
            (Op::Vocab { .. }, TensorKind::Other) => TensorKind::Embedding,
            (_, TensorKind::Other) if rule.experts.is_some() => TensorKind::Experts,
            (_, k) => k,
        };
        out.push(Resolved::Held {
            stages,
            shards: Shards::PerTp(layouts),
            kind,
            replicated,
        });
    }

    if !unmatched.is_empty() {
        // Names come from the file: the message quotes them (a newline must not forge an
        // `error:` line) and the list is capped (a 92k-tensor checkpoint would print megabytes).
        return Err(Error::Unmatched {
            spec: spec.name.clone(),
            file: spec.origin.clone(),
            tensors: unmatched
                .iter()
                .take(MAX_LISTED)
                .map(|n| n.to_string())
                .collect(),
            count: unmatched.len(),
        });
    }

    // Requirements last: a split that does not divide is reported with its tensor first.
    r.check_requires()?;
    // A checkpoint that lacks tensors the model needs (a whole layer, the final norm, an
    // untied LM head) is refused here rather than loaded with holes.
    let n_layers = match &layer_stages {
        Some((n, _)) => Some(*n),
        None if def.rules.iter().any(|rule| rule.layer_slot.is_some()) => r.layer_count().ok(),
        None => None,
    };
    let missing = completeness.missing(&r, &hits, &conds, n_layers, &has)?;
    if !missing.is_empty() {
        return Err(missing.error(spec, n_layers));
    }
    let warnings = (0..def.rules.len())
        .filter(|&ri| hits[ri] == 0 && !missing.explained(ri))
        .filter_map(|ri| r.unused_rule_warning(ri, conds[ri], n_layers))
        .collect();
    Ok(Resolution {
        tensors: out,
        warnings,
    })
}

/// Per rule: shape -> (layout per TP rank, whether they are all equal).
type LayoutCache = HashMap<Vec<u64>, (Vec<Layout>, bool)>;

fn normalize<'a>(spec: &Spec, name: &'a str) -> Cow<'a, str> {
    for (from, to) in &spec.def.aliases {
        if let Some(rest) = name.strip_prefix(from.as_str()) {
            return Cow::Owned(format!("{to}{rest}"));
        }
    }
    Cow::Borrowed(name)
}

fn caps_named(rule: &Rule, caps: &[u64]) -> Vec<(String, u64)> {
    rule.pattern
        .captures
        .iter()
        .cloned()
        .zip(caps.iter().copied())
        .collect()
}

/// The EP rank owning expert `e` of `count` over `ep` ranks (vLLM `determine_expert_map`).
pub(crate) fn expert_owner(
    e: u64,
    count: i64,
    ep: usize,
    placement: Placement,
) -> std::result::Result<usize, String> {
    let count = u64::try_from(count).map_err(|_| format!("expert count {count} is negative"))?;
    if e >= count {
        return Err(format!("expert {e} is not below the expert count {count}"));
    }
    let ep = ep as u64;
    let owner = match placement {
        Placement::RoundRobin => e % ep,
        Placement::Linear => {
            // Contiguous blocks; the first `rem` ranks get one extra expert.
            let base = count / ep;
            let rem = count % ep;
            if e < rem * (base + 1) {
                e / (base + 1)
            } else {
                rem + (e - rem * (base + 1)) / base.max(1)
            }
        }
    };
    Ok(owner as usize)
}

enum LayoutError {
    Msg(String),
    // Boxed: a typed `Error` is larger than a message.
    Err(Box<Error>),
}

impl From<Error> for LayoutError {
    fn from(e: Error) -> Self {
        LayoutError::Err(Box::new(e))
    }
}

pub(super) struct Resolver<'a> {
    pub(super) spec: &'a Spec,
    config: &'a Config,
    topo: &'a Topology,
    builtins: [(&'static str, i64); 4],
    has: &'a dyn Fn(&str) -> bool,
    memo: &'a RefCell<HashMap<String, Value>>,
}

fn cdiv(a: u64, b: u64) -> u64 {
    a / b + u64::from(a % b != 0)
}

impl Resolver<'_> {
    /// The first rule whose pattern matches `segs` (captures left in `caps`) and whose
    /// condition holds; conditions that read no capture are evaluated once, into `conds`.
    fn first_rule(
        &self,
        segs: &[&str],
        caps: &mut Vec<u64>,
        conds: &mut [Option<bool>],
    ) -> Result<Option<usize>> {
        for (ri, rule) in self.spec.def.rules.iter().enumerate() {
            caps.clear();
            caps.resize(rule.pattern.captures.len(), 0);
            if !rule.pattern.matches(segs, caps) {
                continue;
            }
            let active = match (&rule.cond, rule.cond_uses_captures) {
                (None, _) => true,
                (Some(c), true) => self.eval_bool(rule, c, caps)?,
                (Some(c), false) => match conds[ri] {
                    Some(v) => v,
                    None => {
                        let v = self.eval_bool(rule, c, &[])?;
                        conds[ri] = Some(v);
                        v
                    }
                },
            };
            if active {
                return Ok(Some(ri));
            }
        }
        Ok(None)
    }

    /// The pipeline stages that hold tensor `name` matched by `rule`: the rule's `stages`
    /// items whose conditions hold, else the stage of its layer (`layer` with the
    /// cumulative layer ends per stage), else every stage. Sorted, without repeats.
    fn stages(
        &self,
        rule: &Rule,
        caps: &[u64],
        layer: Option<(u64, &[usize])>,
        name: &str,
    ) -> Result<Vec<usize>> {
        let pp = self.topo.pp;
        let Some(items) = &rule.stages else {
            return Ok(match layer {
                Some((l, ends)) => vec![ends.partition_point(|&end| end as u64 <= l)],
                None => (0..pp).collect(),
            });
        };
        let mut s = Vec::new();
        for it in items {
            if let Some(c) = &it.cond {
                if !self.eval_bool(rule, c, caps)? {
                    continue;
                }
            }
            match &it.which {
                StageWhich::First => s.push(0),
                StageWhich::Last => s.push(pp - 1),
                StageWhich::All => s.extend(0..pp),
                StageWhich::Index(e) => {
                    let v = self.int_at(rule.line, e, &caps_named(rule, caps))?;
                    match usize::try_from(v) {
                        Ok(v) if v < pp => s.push(v),
                        _ => {
                            return Err(Error::Placement {
                                file: self.spec.origin.clone(),
                                line: rule.line,
                                tensor: Some(name.to_string()),
                                shape: None,
                                reason: format!("stage {v} does not exist (pp = {pp})"),
                            })
                        }
                    }
                }
            }
        }
        s.sort_unstable();
        s.dedup();
        Ok(s)
    }

    /// The spec's `require` lines: these catch topologies whose splits work out but that
    /// vLLM refuses; the first that does not hold is an error quoting it.
    fn check_requires(&self) -> Result<()> {
        let (spec, topo) = (self.spec, self.topo);
        for (cond, why, line) in &spec.def.requires {
            let ok = self
                .env(&[])
                .bool(cond)
                .map_err(|err| self.error(*line, err))?;
            if ok {
                continue;
            }
            let src = spec
                .source
                .lines()
                .nth(line.saturating_sub(1))
                .unwrap_or("")
                .trim();
            return Err(Error::Placement {
                file: spec.origin.clone(),
                line: *line,
                tensor: None,
                shape: None,
                reason: format!(
                    "spec `{}` cannot place this checkpoint at tp = {}, pp = {}, dp = {}, ep = {}: {}",
                    spec.name,
                    topo.tp,
                    topo.pp,
                    topo.dp,
                    topo.ep,
                    match why {
                        Some(w) => format!("{w} (`{src}` does not hold)"),
                        None => format!("`{src}` does not hold"),
                    }
                ),
            });
        }
        Ok(())
    }

    /// The warning for rule `ri`, which matched no tensor: none for an optional rule or
    /// one switched off by its condition, which is not a mistake (one that reads `layer`:
    /// off in every layer, e.g. the dense MLP of a model without dense layers).
    fn unused_rule_warning(
        &self,
        ri: usize,
        cond: Option<bool>,
        n_layers: Option<usize>,
    ) -> Option<String> {
        let rule = self.spec.def.rules.get(ri)?;
        if rule.optional {
            return None;
        }
        let off = match (&rule.cond, rule.cond_uses_captures) {
            (Some(c), false) => cond.or_else(|| self.eval_bool(rule, c, &[]).ok()) == Some(false),
            (Some(_), true) => super::complete::off_in_every_layer(self, rule, n_layers),
            _ => false,
        };
        (!off).then(|| {
            format!(
                "{}:{}: rule `{}` matches no tensor",
                self.spec.origin, rule.line, rule.pattern_text
            )
        })
    }

    /// The EP rank that holds expert `e` of `rule` (`ex`: its count and placement), tensor
    /// `name` named in the error.
    fn expert_owner(&self, rule: &Rule, ex: &ExpertsClause, e: u64, name: &str) -> Result<usize> {
        let count = self.int_at(rule.line, &ex.count, &[])?;
        expert_owner(e, count, self.topo.ep, self.placement(ex.placement)?).map_err(|m| {
            Error::Placement {
                file: self.spec.origin.clone(),
                line: rule.line,
                tensor: Some(name.to_string()),
                shape: None,
                reason: m,
            }
        })
    }

    /// `rule`'s layout per TP rank for tensor `t`, and whether they are all equal: computed
    /// once per shape (`cache`), cloned per tensor.
    fn layouts_cached(
        &self,
        rule: &Rule,
        t: &TensorInfo,
        cache: &mut LayoutCache,
    ) -> Result<(Vec<Layout>, bool)> {
        if let Some((l, rep)) = cache.get(t.shape.as_slice()) {
            return Ok((l.clone(), *rep));
        }
        let l = self.layouts(rule, &t.shape).map_err(|e| match e {
            LayoutError::Msg(m) => Error::Placement {
                file: self.spec.origin.clone(),
                line: rule.line,
                tensor: Some(t.name.clone()),
                shape: Some(t.shape.clone()),
                reason: m,
            },
            LayoutError::Err(e) => *e,
        })?;
        let rep = l.windows(2).all(|w| w[0] == w[1]);
        cache.insert(t.shape.clone(), (l.clone(), rep));
        Ok((l, rep))
    }

    /// The model's layer count and the cumulative layer ends per stage (not a per-layer
    /// table: the count comes from input).
    fn layer_ends(&self) -> Result<(usize, Vec<usize>)> {
        let n = self.layer_count()?;
        let mut ends = self.topo.stage_layer_counts(n)?;
        let mut acc = 0usize;
        for e in ends.iter_mut() {
            acc = acc.saturating_add(*e);
            *e = acc;
        }
        Ok((n, ends))
    }

    fn env<'b>(&'b self, caps: &'b [(String, u64)]) -> Env<'b> {
        Env {
            lets: &self.spec.def.lets,
            builtins: &self.builtins,
            captures: caps,
            config: &self.config.values,
            has: self.has,
            memo: self.memo,
            depth: Cell::new(0),
            stack: RefCell::new(Vec::new()),
            read_capture: Cell::new(false),
        }
    }

    /// Turns an evaluation error at `line` into a user-facing error.
    fn error(&self, line: usize, e: EvalError) -> Error {
        // Errors inside a `let` point at the `let` line.
        let (line, e) = match e {
            EvalError::InLet { line, inner } => (line, *inner),
            e => (line, e),
        };
        let src = self
            .spec
            .source
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or("");
        match e {
            EvalError::Missing { name, col } => {
                let mut known: Vec<&str> = self.config.values.keys().map(String::as_str).collect();
                known.extend(self.spec.def.lets.keys().map(String::as_str));
                // Never suggest the very name that is missing (a `let` of that name exists).
                known.retain(|k| *k != name);
                let hint = did_you_mean(&name, known);
                Error::MissingConfig {
                    file: self.spec.origin.clone(),
                    at: (line != 0).then(|| {
                        Box::new(SpecPosition {
                            line,
                            col,
                            source: src.to_string(),
                        })
                    }),
                    spec: self.spec.name.clone(),
                    key: name,
                    suggestion: hint,
                }
            }
            EvalError::Cyclic { name, col, chain } => {
                let msg = format!(
                    "cyclic let: `{name}` depends on itself ({}) and config.json has no `{name}` to fall back on",
                    chain
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(" -> ")
                );
                self.spec_error(line, col, msg, src)
            }
            // Not produced: `InLet` is unwrapped above and never nests.
            EvalError::InLet { .. } => Error::Spec {
                file: self.spec.origin.clone(),
                line: Some(line),
                key: None,
                reason: "error in a `let`".into(),
            },
            EvalError::Other { col, msg } => self.spec_error(line, col, msg, src),
        }
    }

    /// A spec error at `line:col` with its source line, or at the spec as a whole (line 0).
    fn spec_error(&self, line: usize, col: usize, msg: String, src: &str) -> Error {
        if line == 0 {
            Error::Spec {
                file: self.spec.origin.clone(),
                line: None,
                key: None,
                reason: msg,
            }
        } else {
            spec_at(&self.spec.origin, line, col, &msg, src)
        }
    }

    /// The number of main-model layers (`layers EXPR`, default `num_hidden_layers`).
    fn layer_count(&self) -> Result<usize> {
        let spec = self.spec;
        let (expr, line) = match &spec.def.layers {
            Some((e, l)) => (e.clone(), *l),
            None => (Expr::Ident("num_hidden_layers".into(), 1), 0),
        };
        let n = self.int_at(line, &expr, &[])?;
        let n = usize::try_from(n).map_err(|_| {
            Error::config(
                "num_hidden_layers",
                format!("(the number of layers) must not be negative (got {n})"),
            )
        })?;
        if n > MAX_LAYERS {
            let msg = format!("{n} layers is more than the {MAX_LAYERS} this tool accepts");
            return Err(if line == 0 {
                Error::config("num_hidden_layers", format!("gives {msg}"))
            } else {
                Error::Spec {
                    file: spec.origin.clone(),
                    line: Some(line),
                    key: None,
                    reason: msg,
                }
            });
        }
        Ok(n)
    }

    pub(super) fn eval_bool(&self, rule: &Rule, e: &Expr, caps: &[u64]) -> Result<bool> {
        let named = caps_named(rule, caps);
        self.env(&named)
            .bool(e)
            .map_err(|err| self.error(rule.line, err))
    }

    pub(super) fn int_at(&self, line: usize, e: &Expr, caps: &[(String, u64)]) -> Result<i64> {
        self.env(caps).int(e).map_err(|err| self.error(line, err))
    }

    fn positive(&self, line: usize, e: &Expr, what: &str) -> Result<u64> {
        let v = self.int_at(line, e, &[])?;
        match u64::try_from(v) {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(Error::Spec {
                file: self.spec.origin.clone(),
                line: Some(line),
                key: None,
                reason: format!("{what} must be a positive integer, got {v}"),
            }),
        }
    }

    fn placement(&self, default: Placement) -> Result<Placement> {
        // vLLM's `--expert-placement-strategy`, settable with `--set`.
        match self.config.values.get("expert_placement_strategy") {
            None => Ok(default),
            Some(serde_json::Value::String(s)) if s == "linear" => Ok(Placement::Linear),
            Some(serde_json::Value::String(s)) if s == "round_robin" => Ok(Placement::RoundRobin),
            Some(v) => Err(Error::config(
                "expert_placement_strategy",
                format!("must be \"linear\" or \"round_robin\", got {v}"),
            )),
        }
    }

    /// `rule`'s layout per TP rank for a tensor of `shape`.
    fn layouts(&self, rule: &Rule, shape: &[u64]) -> std::result::Result<Vec<Layout>, LayoutError> {
        match &rule.op {
            Op::Skip(_) | Op::Replicate => Ok(vec![Layout::full(shape); self.topo.tp]),
            Op::Vocab { dim, pad } => {
                self.vocab_layouts(rule.line, shape, dim_index(shape, *dim)?, pad)
            }
            Op::Parts { dim, unit, parts } => {
                let d = dim_index(shape, *dim)?;
                self.parts_layouts(rule.line, shape, d, unit.as_ref(), parts)
            }
        }
    }

    /// Vocab parallelism: dim `d` padded to a multiple of `pad`, an equal share per rank, the
    /// rows past the real vocab zero-filled.
    fn vocab_layouts(
        &self,
        line: usize,
        shape: &[u64],
        d: usize,
        pad: &Expr,
    ) -> std::result::Result<Vec<Layout>, LayoutError> {
        let tp = self.topo.tp as u64;
        let v = shape[d];
        let pad = self.positive(line, pad, "vocab `pad`")?;
        let vp = cdiv(v, pad).checked_mul(pad).ok_or_else(|| {
            LayoutError::Msg(format!(
                "padded vocab of {v} to a multiple of {pad} overflows"
            ))
        })?;
        if vp % tp != 0 {
            return Err(LayoutError::Msg(format!(
                "padded vocab {vp} (= {v} rounded up to a multiple of {pad}) does not divide by tp = {tp}"
            )));
        }
        let per = vp / tp;
        Ok((0..tp)
            .map(|r| {
                let a = (r * per).min(v);
                let b = ((r + 1) * per).min(v);
                let mut pieces = Vec::new();
                if b > a {
                    pieces.push(slice(shape, d, a, b));
                }
                if per > b - a {
                    pieces.push(Piece::Zeros {
                        extent: per - (b - a),
                    });
                }
                let mut s = shape.to_vec();
                s[d] = per;
                Layout {
                    shape: s,
                    concat_dim: d,
                    pieces,
                }
            })
            .collect())
    }

    /// `split`, `heads`, `full` (one part, the whole dim) or `fused`: per rank, the ranges of
    /// dim `d` that each part gives it, in part order.
    fn parts_layouts(
        &self,
        line: usize,
        shape: &[u64],
        d: usize,
        unit: Option<&Expr>,
        parts: &[PartDef],
    ) -> std::result::Result<Vec<Layout>, LayoutError> {
        let n = shape[d];
        let u = match unit {
            Some(e) => self.positive(line, e, "`unit`")?,
            None => 1,
        };
        let (sizes, u_eff) = self.part_sizes(line, parts, n, u)?;
        check_parts_fill_dim(&sizes, u_eff, d, n)?;
        let mut per_rank: Vec<Vec<(u64, u64)>> = vec![Vec::new(); self.topo.tp];
        let mut off = 0u64;
        for (pi, (p, &size)) in parts.iter().zip(&sizes).enumerate() {
            let part = DimPart {
                what: if parts.len() > 1 {
                    format!("part {pi} (size {size}) of dim {d}")
                } else {
                    format!("dim {d} (size {size})")
                },
                mode: &p.mode,
                size,
                src_off: cdiv(off, u_eff),
                units: cdiv(size, u_eff),
                unit: u_eff,
            };
            for (r, ranges) in per_rank.iter_mut().enumerate() {
                let r = r as u64;
                let (idx, loc) = self.rank_share(line, &part, r)?;
                if let Some(range) = part.stored_range(r, idx, loc)? {
                    ranges.push(range);
                }
            }
            off += size;
        }
        Ok(per_rank
            .into_iter()
            .map(|ranges| ranges_layout(shape, d, ranges))
            .collect())
    }

    /// Logical part sizes, and the unit they are counted in (1 for a lone unsized part).
    fn part_sizes(
        &self,
        line: usize,
        parts: &[PartDef],
        n: u64,
        unit: u64,
    ) -> std::result::Result<(Vec<u64>, u64), LayoutError> {
        let mut sizes = Vec::with_capacity(parts.len());
        let mut u_eff = unit;
        for p in parts {
            match &p.size {
                Some(e) => {
                    let v = self.int_at(line, e, &[])?;
                    let v = u64::try_from(v)
                        .map_err(|_| LayoutError::Msg(format!("part size {v} is negative")))?;
                    sizes.push(v);
                }
                None => {
                    // A single unsized part is the whole dim, in source units.
                    sizes.push(n);
                    u_eff = 1;
                }
            }
        }
        Ok((sizes, u_eff))
    }

    /// Rank `r`'s share of `part`: (chunk index, logical local size).
    fn rank_share(
        &self,
        line: usize,
        part: &DimPart,
        r: u64,
    ) -> std::result::Result<(u64, u64), LayoutError> {
        let tp = self.topo.tp as u64;
        let (size, what) = (part.size, &part.what);
        Ok(match part.mode {
            PartMode::Full => (0, size),
            PartMode::Split { uneven: false } => {
                if size % tp != 0 {
                    return Err(LayoutError::Msg(format!(
                        "{what} does not divide by tp = {tp} (the rule does not allow uneven splits)"
                    )));
                }
                (r, size / tp)
            }
            PartMode::Split { uneven: true } => (r, cdiv(size, tp)),
            PartMode::Heads { count } => {
                let c = self.positive(line, count, "head `count`")?;
                if size % c != 0 {
                    return Err(LayoutError::Msg(format!(
                        "{what} is not a whole number of {c} heads"
                    )));
                }
                let hs = size / c;
                if tp >= c {
                    if tp % c != 0 {
                        return Err(LayoutError::Msg(format!(
                            "tp = {tp} is larger than the {c} heads of {what} but not a multiple of them"
                        )));
                    }
                    (r / (tp / c), hs)
                } else {
                    if c % tp != 0 {
                        return Err(LayoutError::Msg(format!(
                            "the {c} heads of {what} do not divide by tp = {tp}"
                        )));
                    }
                    (r, size / tp)
                }
            }
        })
    }
}

/// The index of `dim` (negative counts from the end) in a tensor of `shape`.
fn dim_index(shape: &[u64], dim: i64) -> std::result::Result<usize, LayoutError> {
    let n = shape.len() as i64;
    let d = if dim < 0 { dim + n } else { dim };
    if d < 0 || d >= n {
        return Err(LayoutError::Msg(format!(
            "dim {dim} does not exist in a {n}-dimensional tensor"
        )));
    }
    Ok(d as usize)
}

/// Checks that the logical part `sizes`, in units of `unit`, make up dim `d` of size `n`.
fn check_parts_fill_dim(
    sizes: &[u64],
    unit: u64,
    d: usize,
    n: u64,
) -> std::result::Result<(), LayoutError> {
    let total = sizes
        .iter()
        .try_fold(0u64, |a, &b| a.checked_add(b))
        .ok_or_else(|| LayoutError::Msg("fused part sizes overflow".into()))?;
    if cdiv(total, unit) != n {
        return Err(LayoutError::Msg(format!(
            "fused parts [{}] sum to {total}{} but dim {d} has size {n}",
            sizes
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            if unit > 1 {
                format!(" ({} in units of {unit})", cdiv(total, unit))
            } else {
                String::new()
            }
        )));
    }
    Ok(())
}

/// One part of a split dim (the whole dim for `split`, `heads` and `full`).
struct DimPart<'a> {
    /// How messages name the part.
    what: String,
    mode: &'a PartMode,
    /// Logical size.
    size: u64,
    /// Where the part starts in the tensor, and how long it is, in stored units of `unit`.
    src_off: u64,
    units: u64,
    unit: u64,
}

impl DimPart<'_> {
    /// The source range of the part that rank `r` holds, given its share (chunk `idx` of
    /// logical size `loc`); `None` when an uneven split leaves the rank nothing of it.
    fn stored_range(
        &self,
        r: u64,
        idx: u64,
        loc: u64,
    ) -> std::result::Result<Option<(u64, u64)>, LayoutError> {
        let what = &self.what;
        let lu = cdiv(loc, self.unit);
        let (mut start, mut end) = idx
            .checked_mul(lu)
            .and_then(|s| Some((s, s.checked_add(lu)?)))
            .ok_or_else(|| LayoutError::Msg(format!("{what}: offsets overflow")))?;
        if end > self.units {
            if matches!(self.mode, PartMode::Split { uneven: true }) {
                start = start.min(self.units);
                end = end.min(self.units);
            } else {
                return Err(LayoutError::Msg(format!(
                    "rank {r}'s range [{start}, {end}) of {what} exceeds its {} units of {}",
                    self.units, self.unit
                )));
            }
        }
        Ok((end > start).then_some((self.src_off + start, self.src_off + end)))
    }
}

/// The layout holding `ranges` of dim `d`, concatenated in order.
fn ranges_layout(shape: &[u64], d: usize, ranges: Vec<(u64, u64)>) -> Layout {
    let mut s = shape.to_vec();
    s[d] = ranges.iter().map(|(a, b)| b - a).sum();
    Layout {
        shape: s,
        concat_dim: d,
        pieces: ranges
            .into_iter()
            .map(|(a, b)| slice(shape, d, a, b))
            .collect(),
    }
}

fn slice(shape: &[u64], d: usize, a: u64, b: u64) -> Piece {
    Piece::Slice {
        ranges: shape
            .iter()
            .enumerate()
            .map(|(i, &n)| if i == d { (a, b) } else { (0, n) })
            .collect(),
    }
}
