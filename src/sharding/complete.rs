//! Completeness: a checkpoint must hold every tensor its spec implies for the configured
//! number of layers (and experts), or planning fails naming what is missing.
//!
//! Data-driven, no per-architecture knowledge: a non-optional rule that holds data
//! - and matched a tensor of layer `l` must match the same name in every layer its condition
//!   allows (`model.layers.{layer}.mlp.down_proj.weight` seen in layers 0, 1, 3 of 4 → layer 2
//!   is missing), and, with `experts(count=N)`, for every expert `0..N` of those layers (an
//!   expert missing from every layer is missing too); a condition that reads `layer` (a
//!   config list such as `mlp_only_layers`, `layer % moe_layer_freq`) says which layers those
//!   are, as the model class decides it;
//! - and matched nothing must match every name its pattern spells out (`model.norm.weight`,
//!   `lm_head.weight if !tie`, `{layer}` over all layers, `{expert}` over `experts(count=..)`),
//!   unless the pattern has wildcards (then it stays a warning).
//!
//! `optional` rules and `skip` rules are exempt: optional means "the model does without it"
//! (a bias, an MTP layer, tied embeddings), and skipped tensors are never loaded.

use std::collections::{BTreeMap, BTreeSet};

use super::parse::{Op, Rule};
use super::resolve::Resolver;
use super::Spec;
use crate::{Error, Result};

/// Most missing names listed in the error.
const MAX_LISTED: usize = 10;
/// Most layer/expert combinations examined in all: a config claiming a million layers for a
/// one-layer checkpoint is refused after this many without enumerating them all.
const MAX_CHECKED: u64 = 1 << 20;

/// Names seen per (rule, name with its `{layer}` and `{expert}` numbers cut out).
#[derive(Default)]
pub(super) struct Completeness {
    templates: BTreeMap<(usize, Template), Seen>,
}

/// A tensor name with its layer (and expert) number cut out, as in the file (`shown`) and
/// after aliases (`normalized`, what rules and `has` see): the name with the hole segments
/// empty, and which segments the holes are (two strings per tensor: the key is built for
/// every tensor of a large checkpoint).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Template {
    shown: String,
    normalized: String,
    /// The layer number's segment: (index in `shown`, index in `normalized`).
    layer: (usize, usize),
    /// The expert number's segment, for a rule with `experts(...)`.
    expert: Option<(usize, usize)>,
}

impl Template {
    /// `blank` with segment `layer.0` set to `layer.1` (and the expert's likewise).
    fn name(blank: &str, layer: (usize, u64), expert: Option<(usize, u64)>) -> String {
        let mut out = String::with_capacity(blank.len() + 8);
        for (k, seg) in blank.split('.').enumerate() {
            if k > 0 {
                out.push('.');
            }
            match (layer, expert) {
                ((i, v), _) if i == k => out.push_str(&v.to_string()),
                (_, Some((i, v))) if i == k => out.push_str(&v.to_string()),
                _ => out.push_str(seg),
            }
        }
        out
    }

    fn shown(&self, layer: u64, expert: u64) -> String {
        Template::name(
            &self.shown,
            (self.layer.0, layer),
            self.expert.map(|e| (e.0, expert)),
        )
    }

    fn normalized(&self, layer: u64, expert: u64) -> String {
        Template::name(
            &self.normalized,
            (self.layer.1, layer),
            self.expert.map(|e| (e.1, expert)),
        )
    }
}

/// `segs` joined with dots, the segments at `holes` empty.
fn blank(segs: &[&str], holes: [Option<usize>; 2]) -> String {
    let mut out = String::with_capacity(segs.iter().map(|s| s.len() + 1).sum());
    for (k, s) in segs.iter().enumerate() {
        if k > 0 {
            out.push('.');
        }
        if !holes.contains(&Some(k)) {
            out.push_str(s);
        }
    }
    out
}

struct Seen {
    /// (layer, expert) of every matching tensor (expert 0 without an expert hole).
    seen: Vec<(u64, u64)>,
    /// The captures of one matching tensor (the layer and expert slots are overwritten).
    caps: Vec<u64>,
    layer_slot: usize,
    expert_slot: Option<usize>,
}

/// The experts a template requires in each layer.
enum Experts {
    /// `0 .. count`.
    Count(u64),
    /// These (the ones seen when the count cannot be evaluated; `[0]` without an expert).
    Seen(Vec<u64>),
}

impl Experts {
    fn iter(&self) -> Box<dyn Iterator<Item = u64> + '_> {
        match self {
            Experts::Count(n) => Box::new(0..*n),
            Experts::Seen(v) => Box::new(v.iter().copied()),
        }
    }
}

/// What is missing, capped.
#[derive(Default)]
pub(super) struct Missing {
    listed: Vec<String>,
    count: u64,
    at_least: bool,
    rules: BTreeSet<usize>,
}

/// The segment of `segs` that holds capture `slot` (= `value`): the one equal to it, or,
/// with several equal numbers (layer 1, expert 1), the one whose change changes the capture.
fn hole(rule: &Rule, segs: &[&str], caps: &[u64], slot: usize, value: u64) -> Option<usize> {
    let vs = value.to_string();
    let candidates: Vec<usize> = (0..segs.len()).filter(|&i| segs[i] == vs).collect();
    if candidates.len() == 1 {
        return candidates.first().copied();
    }
    let other = value.saturating_add(1).to_string();
    candidates.into_iter().find(|&i| {
        let mut v = segs.to_vec();
        v[i] = &other;
        let mut c = vec![0; caps.len()];
        rule.pattern.matches(&v, &mut c) && c.get(slot) == Some(&(value + 1))
    })
}

impl Completeness {
    /// Records that rule `ri` matched `name` (normalized segments `segs`, captures `caps`)
    /// in layer `layer`, captured at `slot`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record(
        &mut self,
        ri: usize,
        rule: &Rule,
        slot: usize,
        layer: u64,
        name: &str,
        segs: &[&str],
        caps: &[u64],
    ) {
        let orig: Vec<&str> = name.split('.').collect();
        // The same position counted from the end in the file's name (aliases change the
        // front); a number inside a segment (`h3`) cannot be swapped: not checked.
        let place = |slot: usize, value: u64| -> Option<(usize, usize)> {
            let i = hole(rule, segs, caps, slot, value)?;
            let j = orig.len().checked_sub(segs.len() - i)?;
            (orig.get(j) == Some(&value.to_string().as_str())).then_some((j, i))
        };
        let Some(at_layer) = place(slot, layer) else {
            return;
        };
        let expert = rule.expert_slot.and_then(|s| Some((s, *caps.get(s)?)));
        let at_expert = match expert {
            Some((s, e)) => match place(s, e) {
                Some(p) if p != at_layer => Some(p),
                _ => return,
            },
            None => None,
        };
        let key = Template {
            shown: blank(&orig, [Some(at_layer.0), at_expert.map(|e| e.0)]),
            normalized: blank(segs, [Some(at_layer.1), at_expert.map(|e| e.1)]),
            layer: at_layer,
            expert: at_expert,
        };
        let seen = self.templates.entry((ri, key)).or_insert_with(|| Seen {
            seen: Vec::new(),
            caps: caps.to_vec(),
            layer_slot: slot,
            expert_slot: expert.map(|e| e.0),
        });
        seen.seen.push((layer, expert.map_or(0, |e| e.1)));
    }

    /// Every tensor the spec implies that the checkpoint lacks. `hits[ri]`: tensors rule
    /// `ri` matched; `conds[ri]`: its capture-free condition if evaluated.
    pub(super) fn missing(
        &self,
        r: &Resolver<'_>,
        hits: &[usize],
        conds: &[Option<bool>],
        n_layers: Option<usize>,
        has: &dyn Fn(&str) -> bool,
    ) -> Result<Missing> {
        let mut m = Missing::default();
        let mut budget = MAX_CHECKED;
        let rules = &r.spec.def.rules;
        if let Some(n) = n_layers {
            for ((ri, t), seen) in &self.templates {
                let Some(rule) = rules.get(*ri) else { continue };
                let mut pairs = seen.seen.clone();
                pairs.sort_unstable();
                pairs.dedup();
                // Every expert of the rule's count in every layer its condition allows (an
                // expert missing from all layers too); the experts seen if the count is unknown.
                // A range, not a list: the count comes from input (the budget bounds the work).
                let seen_experts = || {
                    let mut v: Vec<u64> = pairs.iter().map(|p| p.1).collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                };
                let experts: Experts = match (t.expert, &rule.experts) {
                    (Some(_), Some(ex)) => match r.int_at(rule.line, &ex.count, &[]) {
                        Ok(c) => Experts::Count(u64::try_from(c).unwrap_or(0)),
                        Err(_) => Experts::Seen(seen_experts()),
                    },
                    _ => Experts::Seen(vec![0]),
                };
                let mut caps = seen.caps.clone();
                'layers: for l in 0..n as u64 {
                    for e in experts.iter() {
                        if pairs.binary_search(&(l, e)).is_ok() {
                            continue;
                        }
                        if budget == 0 {
                            m.at_least = true;
                            break 'layers;
                        }
                        budget -= 1;
                        if let Some(c) = caps.get_mut(seen.layer_slot) {
                            *c = l;
                        }
                        if let Some(c) = seen.expert_slot.and_then(|s| caps.get_mut(s)) {
                            *c = e;
                        }
                        if !applies(r, rule, &caps) || has(&t.normalized(l, e)) {
                            continue;
                        }
                        m.add(*ri, t.shown(l, e));
                    }
                }
            }
        }
        for (ri, rule) in rules.iter().enumerate() {
            if hits[ri] > 0 || rule.optional || matches!(rule.op, Op::Skip(_)) {
                continue;
            }
            let off = match (&rule.cond, rule.cond_uses_captures) {
                (Some(c), false) => match conds[ri] {
                    Some(v) => !v,
                    None => !r.eval_bool(rule, c, &[])?,
                },
                _ => false,
            };
            if off {
                continue;
            }
            let Some(names) = expand(r, rule, n_layers, &mut budget) else {
                continue;
            };
            // A name that exists was taken by an earlier rule: a shadowed rule (warning),
            // not a hole in the checkpoint.
            if names.iter().any(|n| has(n)) {
                continue;
            }
            for n in names {
                m.add(ri, n);
            }
        }
        Ok(m)
    }
}

/// Whether a rule whose condition reads captures holds in no layer `0..n` (other captures
/// at 0): a rule for a layer kind the config has none of. Unknown (no layer count, no
/// `{layer}`, too many layers): false.
pub(super) fn off_in_every_layer(r: &Resolver<'_>, rule: &Rule, n_layers: Option<usize>) -> bool {
    let (Some(n), Some(slot)) = (n_layers, rule.layer_slot) else {
        return false;
    };
    if n as u64 > MAX_CHECKED {
        return false;
    }
    let mut caps = vec![0u64; rule.pattern.captures.len()];
    (0..n as u64).all(|l| {
        if let Some(c) = caps.get_mut(slot) {
            *c = l;
        }
        !applies(r, rule, &caps)
    })
}

/// Whether `rule`'s condition holds for these captures (an evaluation error counts as "does
/// not apply": completeness never refuses on a guess).
fn applies(r: &Resolver<'_>, rule: &Rule, caps: &[u64]) -> bool {
    match (&rule.cond, rule.cond_uses_captures) {
        (Some(c), true) => r.eval_bool(rule, c, caps).unwrap_or(false),
        _ => true,
    }
}

/// One piece of a pattern segment: literal text, alternatives, or a capture.
enum Piece<'a> {
    Lit(&'a str),
    Alt(Vec<&'a str>),
    Cap(usize),
}

/// Every name `rule`'s pattern spells out, for layers `0..n` and experts `0..count`, where
/// its condition holds; `None` when the pattern has wildcards or unknown ranges (or when the
/// budget runs out).
fn expand(
    r: &Resolver<'_>,
    rule: &Rule,
    n_layers: Option<usize>,
    budget: &mut u64,
) -> Option<Vec<String>> {
    let text = rule.pattern_text.as_str();
    if text.contains('*') {
        return None;
    }
    let caps = &rule.pattern.captures;
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let end = rest.find('}')?;
                let inner = &rest[1..end];
                match caps.iter().position(|c| c == inner) {
                    Some(slot) => pieces.push(Piece::Cap(slot)),
                    None => pieces.push(Piece::Alt(inner.split(',').collect())),
                }
                rest = &rest[end + 1..];
            }
            Some(k) => {
                pieces.push(Piece::Lit(&rest[..k]));
                rest = &rest[k..];
            }
            None => {
                pieces.push(Piece::Lit(rest));
                rest = "";
            }
        }
    }
    // The range of every capture: layers 0..n, experts 0..count; anything else is unknown.
    let mut ranges = vec![0u64; caps.len()];
    for (slot, range) in ranges.iter_mut().enumerate() {
        *range = if Some(slot) == rule.layer_slot {
            n_layers? as u64
        } else if Some(slot) == rule.expert_slot {
            let count = r
                .int_at(rule.line, &rule.experts.as_ref()?.count, &[])
                .ok()?;
            u64::try_from(count).ok()?
        } else {
            return None;
        };
    }
    let combos = ranges.iter().try_fold(1u64, |a, &b| a.checked_mul(b))?;
    if combos > *budget {
        return None;
    }
    *budget -= combos;
    let mut out = Vec::new();
    let mut values = vec![0u64; caps.len()];
    for mut k in 0..combos {
        for (v, &range) in values.iter_mut().zip(&ranges) {
            *v = k % range;
            k /= range;
        }
        if !applies(r, rule, &values) {
            continue;
        }
        let mut names = vec![String::new()];
        for p in &pieces {
            match p {
                Piece::Lit(s) => names.iter_mut().for_each(|n| n.push_str(s)),
                Piece::Cap(slot) => {
                    let v = values[*slot].to_string();
                    names.iter_mut().for_each(|n| n.push_str(&v));
                }
                Piece::Alt(alts) => {
                    names = names
                        .iter()
                        .flat_map(|n| alts.iter().map(move |a| format!("{n}{a}")))
                        .collect();
                }
            }
        }
        out.extend(names);
    }
    Some(out)
}

impl Missing {
    fn add(&mut self, ri: usize, name: String) {
        self.count += 1;
        self.rules.insert(ri);
        if self.listed.len() < MAX_LISTED {
            self.listed.push(name);
        }
    }

    /// Whether nothing is missing.
    pub(super) fn is_empty(&self) -> bool {
        self.count == 0 && !self.at_least
    }

    /// Whether rule `ri`'s lack of matches is already reported as missing tensors.
    pub(super) fn explained(&self, ri: usize) -> bool {
        self.rules.contains(&ri)
    }

    /// The one-line error.
    pub(super) fn error(&self, spec: &Spec, n_layers: Option<usize>) -> Error {
        Error::Incomplete {
            spec: spec.name.clone(),
            file: spec.origin.clone(),
            layers: n_layers,
            missing: self.listed.clone().into(),
            count: self.count,
            at_least: self.at_least,
            lines: self
                .rules
                .iter()
                .filter_map(|&ri| spec.def.rules.get(ri).map(|r| r.line))
                .collect::<Vec<_>>()
                .into(),
        }
    }
}
