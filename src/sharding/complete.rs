//! Completeness: a checkpoint must hold every tensor its spec implies for the configured
//! number of layers (and experts), or planning fails naming what is missing.
//!
//! Data-driven, no per-architecture knowledge: a non-optional rule that holds data
//! - and matched a tensor of layer `l` must match the same name in every layer its condition
//!   allows (`model.layers.{layer}.mlp.down_proj.weight` seen in layers 0, 1, 3 of 4 → layer 2
//!   is missing);
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

/// Names seen per (rule, name around its `{layer}` number).
#[derive(Default)]
pub(super) struct Completeness {
    templates: BTreeMap<(usize, Template), Seen>,
}

/// A tensor name with its layer number cut out: `head` + layer + `tail`, as in the file
/// (`shown`) and after aliases (`normalized`, what rules and `has` see).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Template {
    shown: (String, String),
    normalized: (String, String),
}

impl Template {
    fn name(parts: &(String, String), layer: u64) -> String {
        format!("{}{layer}{}", parts.0, parts.1)
    }
}

struct Seen {
    layers: Vec<u64>,
    /// The captures of one matching tensor (the layer slot is overwritten per layer).
    caps: Vec<u64>,
    slot: usize,
}

/// What is missing, capped.
#[derive(Default)]
pub(super) struct Missing {
    listed: Vec<String>,
    count: u64,
    at_least: bool,
    rules: BTreeSet<usize>,
}

/// `segs` joined with dots around position `i`: ("a.b.", ".d") for ["a","b","3","d"], i = 2.
fn around(segs: &[&str], i: usize) -> (String, String) {
    let mut head = segs[..i].join(".");
    if i > 0 {
        head.push('.');
    }
    let mut tail = String::new();
    if i + 1 < segs.len() {
        tail.push('.');
        tail.push_str(&segs[i + 1..].join("."));
    }
    (head, tail)
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
        let ls = layer.to_string();
        let candidates: Vec<usize> = (0..segs.len()).filter(|&i| segs[i] == ls).collect();
        // With several equal numbers (layer 1, expert 1) the layer is the one whose change
        // changes the capture.
        let pos = if candidates.len() == 1 {
            candidates.first().copied()
        } else {
            let other = layer.saturating_add(1).to_string();
            candidates.into_iter().find(|&i| {
                let mut v = segs.to_vec();
                v[i] = &other;
                let mut c = vec![0; caps.len()];
                rule.pattern.matches(&v, &mut c) && c.get(slot) == Some(&(layer + 1))
            })
        };
        // A layer number inside a segment (`h3`) cannot be swapped: not checked.
        let Some(i) = pos else { return };
        let orig: Vec<&str> = name.split('.').collect();
        let Some(j) = orig.len().checked_sub(segs.len() - i) else {
            return;
        };
        if orig.get(j) != Some(&ls.as_str()) {
            return;
        }
        let key = Template {
            shown: around(&orig, j),
            normalized: around(segs, i),
        };
        let seen = self.templates.entry((ri, key)).or_insert_with(|| Seen {
            layers: Vec::new(),
            caps: caps.to_vec(),
            slot,
        });
        seen.layers.push(layer);
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
                let mut layers = seen.layers.clone();
                layers.sort_unstable();
                layers.dedup();
                let mut caps = seen.caps.clone();
                for l in 0..n as u64 {
                    if layers.binary_search(&l).is_ok() {
                        continue;
                    }
                    if budget == 0 {
                        m.at_least = true;
                        break;
                    }
                    budget -= 1;
                    if let Some(c) = caps.get_mut(seen.slot) {
                        *c = l;
                    }
                    if !applies(r, rule, &caps) || has(&Template::name(&t.normalized, l)) {
                        continue;
                    }
                    m.add(*ri, Template::name(&t.shown, l));
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
