//! The hand-written, line-oriented parser of `.shard` files.
//!
//! Every line is blank, a comment (`# ...`), a directive (`arch`, `let`, `alias`, `layers`,
//! `kind`) or a rule: `PATTERN ACTION [CLAUSE ...]`. Errors say `origin:line:col: message`,
//! then show the line and a caret under the column.

use std::collections::{HashMap, HashSet};

use super::expr::{Arg, Expr, Parser, Tok};
use super::pattern::Pattern;
use super::TensorKind;
use crate::error::escape_controls;
use crate::{Error, Result};

/// How one part of a fused dimension is divided among TP ranks.
#[derive(Clone, Debug)]
pub(crate) enum PartMode {
    /// Even split (or `torch.chunk`-like when uneven).
    Split { uneven: bool },
    /// GQA heads: `count` heads; one head per rank group when tp > count.
    Heads { count: Expr },
    /// Every rank holds the whole part.
    Full,
}

/// One part of a fused (or single) split dimension.
#[derive(Clone, Debug)]
pub(crate) struct PartDef {
    /// Logical size along the dimension; `None` = the whole dimension (single part only).
    pub size: Option<Expr>,
    pub mode: PartMode,
}

/// The TP operation of a rule.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Skip(String),
    Replicate,
    /// Split `dim` into parts (one part = the whole dim), each divided among ranks.
    Parts {
        dim: i64,
        /// Units per element of the source along `dim` (pack factor, block size); part sizes
        /// are logical and are converted with ceil division.
        unit: Option<Expr>,
        parts: Vec<PartDef>,
    },
    /// Vocab-parallel split of `dim` with padding to a multiple of `pad` and zero fill.
    Vocab {
        dim: i64,
        pad: Expr,
    },
}

/// Expert placement under expert parallelism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    Linear,
    RoundRobin,
}

/// `experts(count=..., placement=...)`.
#[derive(Clone, Debug)]
pub(crate) struct ExpertsClause {
    pub count: Expr,
    pub placement: Placement,
}

/// One entry of `stage(...)`.
#[derive(Clone, Debug)]
pub(crate) enum StageWhich {
    First,
    Last,
    All,
    Index(Expr),
}

/// `stage(first, last if cond)` entry.
#[derive(Clone, Debug)]
pub(crate) struct StageItem {
    pub which: StageWhich,
    pub cond: Option<Expr>,
}

/// One rule line.
#[derive(Clone, Debug)]
pub(crate) struct Rule {
    pub line: usize,
    pub pattern_text: String,
    pub pattern: Pattern,
    pub op: Op,
    pub experts: Option<ExpertsClause>,
    pub stages: Option<Vec<StageItem>>,
    pub kind: TensorKind,
    pub cond: Option<Expr>,
    /// Whether `cond` reads captures (then it is evaluated per tensor, else once).
    pub cond_uses_captures: bool,
    pub optional: bool,
    /// Slot of `{layer}` / `{expert}` in the pattern's captures.
    pub layer_slot: Option<usize>,
    pub expert_slot: Option<usize>,
}

/// Everything a spec file says.
#[derive(Clone, Debug, Default)]
pub(crate) struct SpecDef {
    pub architectures: Vec<String>,
    pub lets: HashMap<String, (Expr, usize)>,
    pub aliases: Vec<(String, String)>,
    pub layers: Option<(Expr, usize)>,
    /// `require COND "why"`: checked before any tensor is placed.
    pub requires: Vec<(Expr, Option<String>, usize)>,
    pub rules: Vec<Rule>,
}

const DIRECTIVES: [&str; 6] = ["arch", "let", "alias", "layers", "kind", "require"];
const ACTIONS: [&str; 7] = [
    "replicate",
    "skip",
    "split",
    "heads",
    "vocab",
    "fused",
    "full",
];
const CLAUSES: [&str; 5] = ["stage", "experts", "kind", "optional", "if"];
const KINDS: [&str; 6] = ["attention", "mlp", "experts", "embedding", "norm", "other"];
const BUILTINS: [&str; 4] = ["tp", "pp", "dp", "ep"];

/// Longest spec line: far beyond any real spec (the deepest expression test uses 200,000
/// characters), small enough that a hostile 8 MB line is refused before it is lexed.
const MAX_LINE_BYTES: usize = 1 << 20;

/// Longest name pattern: tensor names are at most a few hundred bytes.
const MAX_PATTERN_BYTES: usize = 4096;

/// Longest word (in characters) compared by "did you mean": no keyword or name we suggest is
/// longer, and a hostile 8 MB word must not cost a quadratic table.
const MAX_SUGGEST_CHARS: usize = 64;

/// Edit distance for "did you mean": Levenshtein plus adjacent transpositions (`spilt`),
/// with three rolling rows (the transposition looks two rows back), so memory is linear in
/// the shorter word.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(before[j - 2] + 1);
            }
            cur[j] = v;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ` (did you mean `x`?)` for the closest candidate within a small distance, else "".
/// Bounded whatever the word: words longer than [`MAX_SUGGEST_CHARS`] get no suggestion, and
/// candidates whose length differs by more than the allowed distance are skipped unmeasured.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> String {
    // Counting stops past the bound: an 8 MB word is not walked to its end.
    let len = word.chars().take(MAX_SUGGEST_CHARS + 1).count();
    if len > MAX_SUGGEST_CHARS {
        return String::new();
    }
    let limit = match len {
        0..=3 => 1,
        4..=6 => 2,
        _ => 3,
    };
    candidates
        .into_iter()
        .filter(|c| c.chars().take(MAX_SUGGEST_CHARS + 1).count().abs_diff(len) <= limit)
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// A typed spec error at `origin:line_no:col` with the source line and a caret.
pub(crate) fn spec_at(origin: &str, line_no: usize, col: usize, msg: &str, line: &str) -> Error {
    let col = col.max(1);
    Error::SpecAt {
        file: origin.to_string(),
        line: line_no,
        col,
        message: msg.to_string(),
        excerpt: excerpt(line, col),
    }
}

/// `\n    source line\n    ^` under column `col` (1-based, characters), with a window of a
/// long line around the column and control characters in the line escaped.
pub(crate) fn excerpt(line: &str, col: usize) -> String {
    /// Chars of a long line (over 4 windows) shown on each side of the column.
    const WINDOW: usize = 60;
    let col = col.max(1);
    // A hostile line can be megabytes long: show a window around the column.
    let len = line.chars().count();
    let (skip, take) = if len <= 4 * WINDOW {
        (0, len)
    } else {
        ((col - 1).saturating_sub(WINDOW), 2 * WINDOW)
    };
    let shown: String = line.chars().skip(skip).take(take).collect();
    let cut_end = len > skip + take;
    let (lead, tail) = (
        if skip > 0 { "..." } else { "" },
        if cut_end { "..." } else { "" },
    );
    // An escaped control character is several columns wide: pad the caret by the escaped
    // width of the characters before the column.
    let caret_pad: String = lead
        .chars()
        .chain(line.chars().skip(skip).take(col - 1 - skip))
        .map(|c| match c {
            '\t' => "\t".to_string(),
            c if c.is_control() => " ".repeat(c.escape_default().count()),
            _ => " ".to_string(),
        })
        .collect();
    format!(
        "\n    {lead}{}{tail}\n    {caret_pad}^",
        escape_controls(&shown)
    )
}

struct Ctx<'a> {
    origin: &'a str,
    line_no: usize,
    line: &'a str,
}

impl Ctx<'_> {
    /// A parser over `toks`, tokens of this line; `end_col` is the column just past the
    /// line's last non-blank character.
    fn parser<'t>(&self, toks: &'t [(Tok, usize)]) -> Parser<'t> {
        Parser {
            toks,
            pos: 0,
            end_col: self.line.trim_end().chars().count() + 1,
            nest: 0,
        }
    }
    fn err(&self, col: usize, msg: impl AsRef<str>) -> Error {
        spec_at(self.origin, self.line_no, col, msg.as_ref(), self.line)
    }
}

/// Parses a whole spec.
pub(crate) fn parse(source: &str, origin: &str) -> Result<SpecDef> {
    let mut def = SpecDef::default();
    let mut kind = TensorKind::Other;
    for (idx, raw) in source.lines().enumerate() {
        let line_no = idx + 1;
        let ctx = Ctx {
            origin,
            line_no,
            line: raw,
        };
        if raw.len() > MAX_LINE_BYTES {
            return Err(ctx.err(
                1,
                format!(
                    "line is {} bytes long; spec lines are at most {MAX_LINE_BYTES} bytes",
                    raw.len()
                ),
            ));
        }
        let code = strip_comment(raw);
        let trimmed = code.trim_start();
        if trimmed.trim().is_empty() {
            continue;
        }
        let indent = code.chars().count() - trimmed.chars().count();
        let word_end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
        let word = &trimmed[..word_end];
        let rest = &trimmed[word_end..];
        let rest_col = indent + word.chars().count() + 1;
        let plain_word = word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if DIRECTIVES.contains(&word) {
            directive(&ctx, word, rest, rest_col, indent + 1, &mut def, &mut kind)?;
        } else if plain_word
            && !did_you_mean(word, DIRECTIVES).is_empty()
            && !rest.trim().is_empty()
        {
            return Err(ctx.err(
                indent + 1,
                format!(
                    "unknown directive `{word}`{}",
                    did_you_mean(word, DIRECTIVES)
                ),
            ));
        } else {
            if word.len() > MAX_PATTERN_BYTES {
                return Err(ctx.err(
                    indent + 1,
                    format!(
                        "name pattern is {} bytes long; patterns are at most {MAX_PATTERN_BYTES} bytes",
                        word.len()
                    ),
                ));
            }
            let pattern =
                Pattern::compile(word).map_err(|(off, msg)| ctx.err(indent + 1 + off, msg))?;
            let rule = rule(&ctx, word, pattern, rest, rest_col, kind)?;
            def.rules.push(rule);
        }
    }
    // A condition reads the captures directly (`if layer < 3`) or through `let`s
    // (`let sparse = layer % 2 == 0` ... `if sparse`); `let`s may follow the rules.
    for rule in &mut def.rules {
        if let Some(c) = &rule.cond {
            rule.cond_uses_captures = reads(c, &rule.pattern.captures, &def.lets);
        }
    }
    Ok(def)
}

/// Whether `e` reads one of `names`, directly or through the `let`s it uses. Iterative over
/// `let`s (a chain may be thousands long); each expression is at most `MAX_DEPTH` deep.
fn reads(e: &Expr, names: &[String], lets: &HashMap<String, (Expr, usize)>) -> bool {
    let mut todo: Vec<&Expr> = vec![e];
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some(x) = todo.pop() {
        let hit = x.any_ident(&mut |id| {
            if names.iter().any(|n| n == id) {
                return true;
            }
            if let Some((k, (def, _))) = lets.get_key_value(id) {
                if seen.insert(k.as_str()) {
                    todo.push(def);
                }
            }
            false
        });
        if hit {
            return true;
        }
    }
    false
}

fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            '\\' if in_str => {
                escaped = !escaped;
                continue;
            }
            '"' if !escaped => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

fn tokens(ctx: &Ctx, text: &str, col: usize) -> Result<Vec<(Tok, usize)>> {
    super::expr::lex(text, col).map_err(|(c, m)| ctx.err(c, m))
}

fn directive(
    ctx: &Ctx,
    word: &str,
    rest: &str,
    rest_col: usize,
    word_col: usize,
    def: &mut SpecDef,
    kind: &mut TensorKind,
) -> Result<()> {
    if word == "alias" && !rest.trim_start().starts_with('"') {
        let ws = rest.chars().count() - rest.trim_start().chars().count();
        return Err(ctx.err(
            rest_col + ws,
            "expected a quoted prefix: alias \"transformer.\" = \"\"",
        ));
    }
    let toks = tokens(ctx, rest, rest_col)?;
    let mut p = ctx.parser(&toks);
    let e = |r: (usize, String)| ctx.err(r.0, r.1);
    match word {
        "arch" => {
            if toks.is_empty() {
                return Err(ctx.err(
                    p.end_col,
                    "`arch` needs at least one architecture name (config.json `architectures`)",
                ));
            }
            for (t, c) in &toks {
                match t {
                    Tok::Ident(s) => def.architectures.push(s.clone()),
                    _ => return Err(ctx.err(*c, "expected an architecture name")),
                }
            }
            return Ok(());
        }
        "let" => {
            let (name, col) = match toks.first() {
                Some((Tok::Ident(n), c)) => (n.clone(), *c),
                _ => return Err(ctx.err(p.col(), "expected a name after `let`")),
            };
            if BUILTINS.contains(&name.as_str()) || name == "true" || name == "false" {
                return Err(ctx.err(
                    col,
                    format!("`{name}` is a built-in name and cannot be redefined"),
                ));
            }
            if def.lets.contains_key(&name) {
                return Err(ctx.err(col, format!("`{name}` is already defined")));
            }
            p.pos = 1;
            p.expect_sym("=", "after the name in `let NAME = VALUE`")
                .map_err(e)?;
            let value = p.expr().map_err(e)?;
            end_of_line(ctx, &p)?;
            def.lets.insert(name, (value, ctx.line_no));
        }
        "alias" => {
            let from = match p.peek() {
                Some(Tok::Str(s)) => s.clone(),
                _ => {
                    return Err(ctx.err(
                        p.col(),
                        "expected a quoted prefix: alias \"transformer.\" = \"\"",
                    ))
                }
            };
            p.pos += 1;
            p.expect_sym("=", "in `alias \"FROM\" = \"TO\"`")
                .map_err(e)?;
            let to = match p.peek() {
                Some(Tok::Str(s)) => s.clone(),
                _ => return Err(ctx.err(p.col(), "expected a quoted prefix after `=`")),
            };
            p.pos += 1;
            end_of_line(ctx, &p)?;
            if from.is_empty() {
                return Err(ctx.err(rest_col, "the prefix to rewrite must not be empty"));
            }
            def.aliases.push((from, to));
        }
        "require" => {
            let cond = p.expr().map_err(e)?;
            let why = match p.peek() {
                Some(Tok::Str(w)) => {
                    p.pos += 1;
                    Some(w.clone())
                }
                _ => None,
            };
            end_of_line(ctx, &p)?;
            def.requires.push((cond, why, ctx.line_no));
        }
        "layers" => {
            if def.layers.is_some() {
                return Err(ctx.err(word_col, "`layers` is given twice"));
            }
            let value = p.expr().map_err(e)?;
            end_of_line(ctx, &p)?;
            def.layers = Some((value, ctx.line_no));
        }
        "kind" => {
            let (k, c) = match toks.first() {
                Some((Tok::Ident(k), c)) => (k.clone(), *c),
                _ => return Err(ctx.err(p.col(), format!("expected a kind: {}", KINDS.join(", ")))),
            };
            *kind = parse_kind(ctx, &k, c)?;
            p.pos = 1;
            end_of_line(ctx, &p)?;
        }
        _ => unreachable!("checked by the caller"),
    }
    Ok(())
}

fn parse_kind(ctx: &Ctx, k: &str, col: usize) -> Result<TensorKind> {
    Ok(match k {
        "attention" => TensorKind::Attention,
        "mlp" => TensorKind::Mlp,
        "experts" => TensorKind::Experts,
        "embedding" => TensorKind::Embedding,
        "norm" => TensorKind::Norm,
        "other" => TensorKind::Other,
        _ => {
            return Err(ctx.err(
                col,
                format!(
                    "unknown kind `{k}`{} (kinds: {})",
                    did_you_mean(k, KINDS),
                    KINDS.join(", ")
                ),
            ))
        }
    })
}

fn end_of_line(ctx: &Ctx, p: &Parser) -> Result<()> {
    if p.pos < p.toks.len() {
        return Err(ctx.err(
            p.col(),
            format!("unexpected {} at end of line", p.describe()),
        ));
    }
    Ok(())
}

fn rule(
    ctx: &Ctx,
    pattern_text: &str,
    pattern: Pattern,
    rest: &str,
    rest_col: usize,
    kind: TensorKind,
) -> Result<Rule> {
    let toks = tokens(ctx, rest, rest_col)?;
    let mut p = ctx.parser(&toks);
    let e = |r: (usize, String)| ctx.err(r.0, r.1);
    // The action.
    let (name, col) = match p.peek() {
        Some(Tok::Ident(n)) => (n.clone(), p.col()),
        _ => {
            return Err(ctx.err(
                p.col(),
                format!(
                    "expected an action after the pattern ({}), found {}",
                    ACTIONS.join(", "),
                    p.describe()
                ),
            ))
        }
    };
    p.pos += 1;
    let args = if p.at_sym("(") {
        p.args().map_err(e)?
    } else {
        Vec::new()
    };
    let op = action(ctx, &name, col, args)?;
    let layer_slot = pattern.captures.iter().position(|c| c == "layer");
    let expert_slot = pattern.captures.iter().position(|c| c == "expert");
    let mut rule = Rule {
        line: ctx.line_no,
        pattern_text: pattern_text.to_string(),
        pattern,
        op,
        experts: None,
        stages: None,
        kind,
        cond: None,
        cond_uses_captures: false,
        optional: false,
        layer_slot,
        expert_slot,
    };
    let mut kind_given = false;
    // Clauses.
    while let Some(t) = p.peek() {
        let col = p.col();
        let Tok::Ident(word) = t else {
            return Err(ctx.err(
                col,
                format!(
                    "expected a clause ({}), found {}",
                    CLAUSES.join(", "),
                    p.describe()
                ),
            ));
        };
        let word = word.clone();
        p.pos += 1;
        match word.as_str() {
            "optional" => rule.optional = true,
            "if" => {
                if rule.cond.is_some() {
                    return Err(ctx.err(col, "a rule has at most one `if`"));
                }
                let c = p.expr().map_err(e)?;
                rule.cond = Some(c);
            }
            "stage" | "experts" | "kind" => {
                if !p.at_sym("(") {
                    return Err(ctx.err(p.col(), format!("expected `(` after `{word}`")));
                }
                let args = p.args().map_err(e)?;
                match word.as_str() {
                    "stage" => {
                        if rule.stages.is_some() {
                            return Err(ctx.err(col, "`stage` is given twice"));
                        }
                        rule.stages = Some(stage_clause(ctx, col, args)?);
                    }
                    "experts" => {
                        if rule.expert_slot.is_none() {
                            return Err(ctx.err(
                                col,
                                "`experts(...)` needs an `{expert}` capture in the pattern",
                            ));
                        }
                        rule.experts = Some(experts_clause(ctx, col, args)?);
                    }
                    _ => {
                        if kind_given {
                            return Err(ctx.err(col, "`kind` is given twice"));
                        }
                        kind_given = true;
                        match args.as_slice() {
                            [Arg {
                                key: None,
                                value: Expr::Ident(k, c),
                                cond: None,
                                ..
                            }] => rule.kind = parse_kind(ctx, k, *c)?,
                            _ => {
                                return Err(ctx.err(
                                    col,
                                    format!("`kind` takes one of: {}", KINDS.join(", ")),
                                ))
                            }
                        }
                    }
                }
            }
            _ => {
                let hint = did_you_mean(&word, CLAUSES.iter().chain(ACTIONS.iter()).copied());
                return Err(ctx.err(
                    col,
                    if ACTIONS.contains(&word.as_str()) {
                        format!("a rule has exactly one action; `{word}` is a second one")
                    } else {
                        format!(
                            "unknown clause `{word}`{hint} (clauses: {})",
                            CLAUSES.join(", ")
                        )
                    },
                ));
            }
        }
    }
    Ok(rule)
}

/// Named and positional arguments of an action, checked against what it accepts.
struct Args<'c, 'a> {
    ctx: &'c Ctx<'a>,
    action: String,
    col: usize,
    named: Vec<(String, usize, Expr)>,
    flags: Vec<(String, usize)>,
    positional: Vec<Expr>,
}

impl<'c, 'a> Args<'c, 'a> {
    fn new(
        ctx: &'c Ctx<'a>,
        action: &str,
        col: usize,
        args: Vec<Arg>,
        allowed: &[&str],
        flags: &[&str],
    ) -> Result<Self> {
        let mut a = Args {
            ctx,
            action: action.to_string(),
            col,
            named: Vec::new(),
            flags: Vec::new(),
            positional: Vec::new(),
        };
        for arg in args {
            if let Some(c) = &arg.cond {
                return Err(ctx.err(
                    c.col().max(arg.col),
                    format!("`if` is not allowed in `{action}(...)`"),
                ));
            }
            match (arg.key, arg.value) {
                (Some((k, kc)), v) => {
                    if !allowed.contains(&k.as_str()) {
                        return Err(ctx.err(
                            kc,
                            format!(
                                "`{action}` has no argument `{k}`{} (arguments: {})",
                                did_you_mean(&k, allowed.iter().chain(flags.iter()).copied()),
                                allowed
                                    .iter()
                                    .chain(flags.iter())
                                    .copied()
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                    if a.named.iter().any(|(n, _, _)| *n == k) {
                        return Err(ctx.err(kc, format!("argument `{k}` is given twice")));
                    }
                    a.named.push((k, kc, v));
                }
                (None, Expr::Ident(f, fc)) if flags.contains(&f.as_str()) => a.flags.push((f, fc)),
                (None, Expr::Ident(f, fc))
                    if !did_you_mean(&f, flags.iter().copied()).is_empty() =>
                {
                    return Err(ctx.err(
                        fc,
                        format!(
                            "unknown flag `{f}`{}",
                            did_you_mean(&f, flags.iter().copied())
                        ),
                    ));
                }
                (None, v) => a.positional.push(v),
            }
        }
        Ok(a)
    }

    fn take(&mut self, key: &str) -> Option<(Expr, usize)> {
        let i = self.named.iter().position(|(n, _, _)| n == key)?;
        let (_, c, v) = self.named.remove(i);
        Some((v, c))
    }

    fn flag(&self, f: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == f)
    }

    fn dim(&mut self, required: bool) -> Result<Option<i64>> {
        match self.take("dim") {
            Some((Expr::Int(v), _)) => Ok(Some(v)),
            Some((Expr::Neg(inner, _), _)) if matches!(*inner, Expr::Int(_)) => match *inner {
                Expr::Int(v) => Ok(Some(-v)),
                _ => unreachable!("matched above"),
            },
            Some((_, c)) => Err(self.ctx.err(
                c,
                "`dim` must be an integer literal (negative counts from the last dim)",
            )),
            None if required => Err(self
                .ctx
                .err(self.col, format!("`{}` needs `dim=N`", self.action))),
            None => Ok(None),
        }
    }

    fn no_positional(&self, max: usize) -> Result<()> {
        if let Some(e) = self.positional.get(max) {
            return Err(self.ctx.err(
                e.col().max(self.col),
                format!("unexpected argument to `{}`", self.action),
            ));
        }
        Ok(())
    }
}

fn action(ctx: &Ctx, name: &str, col: usize, args: Vec<Arg>) -> Result<Op> {
    match name {
        "replicate" => {
            Args::new(ctx, name, col, args, &[], &[])?.no_positional(0)?;
            Ok(Op::Replicate)
        }
        "skip" => {
            let a = Args::new(ctx, name, col, args, &[], &[])?;
            a.no_positional(1)?;
            match a.positional.first() {
                None => Ok(Op::Skip("skipped by the spec".into())),
                Some(Expr::Str(s)) => Ok(Op::Skip(s.clone())),
                Some(e) => Err(ctx.err(e.col().max(col), "`skip` takes an optional quoted reason")),
            }
        }
        "split" | "heads" | "full" => {
            let (allowed, flags): (&[&str], &[&str]) = match name {
                "split" => (&["dim", "unit"], &["uneven"]),
                "heads" => (&["dim", "count", "unit"], &[]),
                _ => (&["dim"], &[]),
            };
            let mut a = Args::new(ctx, name, col, args, allowed, flags)?;
            let dim = a.dim(true)?.unwrap_or(0);
            let unit = a.take("unit").map(|x| x.0);
            let mode = match name {
                "split" => PartMode::Split {
                    uneven: a.flag("uneven"),
                },
                "heads" => {
                    let count = match a.take("count") {
                        Some((c, _)) => c,
                        None => match a.positional.pop() {
                            Some(c) => c,
                            None => {
                                return Err(ctx.err(
                                    col,
                                    "`heads` needs `count=N` (number of heads in the tensor)",
                                ))
                            }
                        },
                    };
                    PartMode::Heads { count }
                }
                _ => PartMode::Full,
            };
            a.no_positional(0)?;
            Ok(Op::Parts {
                dim,
                unit,
                parts: vec![PartDef { size: None, mode }],
            })
        }
        "vocab" => {
            let mut a = Args::new(ctx, name, col, args, &["dim", "pad"], &[])?;
            a.no_positional(0)?;
            let dim = a.dim(false)?.unwrap_or(0);
            let pad = a.take("pad").map_or(Expr::Int(64), |x| x.0);
            Ok(Op::Vocab { dim, pad })
        }
        "fused" => {
            let mut a = Args::new(ctx, name, col, args, &["dim", "parts", "unit"], &[])?;
            a.no_positional(0)?;
            let dim = a.dim(true)?.unwrap_or(0);
            let unit = a.take("unit").map(|x| x.0);
            let (list, lcol) = a.take("parts").ok_or_else(|| {
                ctx.err(
                    col,
                    "`fused` needs `parts=[...]`, e.g. parts=[split(q), heads(kv, count=nkv)]",
                )
            })?;
            let Expr::List(items, _) = list else {
                return Err(ctx.err(lcol, "`parts` must be a list `[...]`"));
            };
            if items.is_empty() {
                return Err(ctx.err(lcol, "`parts` must not be empty"));
            }
            let parts = items
                .into_iter()
                .map(|it| part(ctx, it))
                .collect::<Result<Vec<_>>>()?;
            Ok(Op::Parts { dim, unit, parts })
        }
        _ => Err(ctx.err(
            col,
            format!(
                "unknown action `{name}`{} (actions: {})",
                did_you_mean(name, ACTIONS),
                ACTIONS.join(", ")
            ),
        )),
    }
}

/// A `fused` part: `split(SIZE)`, `split(SIZE, uneven)`, `heads(SIZE, count=N)`, `full(SIZE)`
/// or a bare `SIZE` (= split).
fn part(ctx: &Ctx, item: Expr) -> Result<PartDef> {
    match item {
        Expr::Call(name, args, col)
            if ACTIONS.contains(&name.as_str())
                || !did_you_mean(&name, ["split", "heads", "full"]).is_empty() =>
        {
            let (allowed, flags): (&[&str], &[&str]) = match name.as_str() {
                "split" => (&[], &["uneven"]),
                "heads" => (&["count"], &[]),
                "full" => (&[], &[]),
                _ => {
                    return Err(ctx.err(col, format!(
                        "unknown part `{name}`{} (parts: split(SIZE), heads(SIZE, count=N), full(SIZE), or a bare SIZE)",
                        did_you_mean(&name, ["split", "heads", "full"])
                    )))
                }
            };
            let mut a = Args::new(ctx, &name, col, args, allowed, flags)?;
            if a.positional.len() != 1 {
                return Err(ctx.err(
                    col,
                    format!("`{name}(SIZE...)` takes the part's size as its one plain argument"),
                ));
            }
            let size = a.positional.pop();
            let mode = match name.as_str() {
                "split" => PartMode::Split {
                    uneven: a.flag("uneven"),
                },
                "heads" => PartMode::Heads {
                    count: a
                        .take("count")
                        .ok_or_else(|| ctx.err(col, "`heads` part needs `count=N`"))?
                        .0,
                },
                _ => PartMode::Full,
            };
            Ok(PartDef { size, mode })
        }
        other => Ok(PartDef {
            size: Some(other),
            mode: PartMode::Split { uneven: false },
        }),
    }
}

fn stage_clause(ctx: &Ctx, col: usize, args: Vec<Arg>) -> Result<Vec<StageItem>> {
    if args.is_empty() {
        return Err(ctx.err(
            col,
            "`stage(...)` needs at least one of first, last, all or a stage number",
        ));
    }
    let mut items = Vec::new();
    for a in args {
        if let Some((k, kc)) = a.key {
            return Err(ctx.err(kc, format!("`stage` takes no named arguments (`{k}=`)")));
        }
        let which = match a.value {
            Expr::Ident(w, wc) => match w.as_str() {
                "first" => StageWhich::First,
                "last" => StageWhich::Last,
                "all" => StageWhich::All,
                _ => {
                    let hint = did_you_mean(&w, ["first", "last", "all"]);
                    if hint.is_empty() {
                        StageWhich::Index(Expr::Ident(w, wc))
                    } else {
                        return Err(ctx.err(wc, format!("unknown stage `{w}`{hint}")));
                    }
                }
            },
            other => StageWhich::Index(other),
        };
        items.push(StageItem {
            which,
            cond: a.cond,
        });
    }
    Ok(items)
}

fn experts_clause(ctx: &Ctx, col: usize, args: Vec<Arg>) -> Result<ExpertsClause> {
    let mut a = Args::new(ctx, "experts", col, args, &["count", "placement"], &[])?;
    let count = match a.take("count") {
        Some((c, _)) => c,
        None => a
            .positional
            .pop()
            .ok_or_else(|| ctx.err(col, "`experts` needs `count=N` (number of routed experts)"))?,
    };
    a.no_positional(0)?;
    let placement = match a.take("placement") {
        None => Placement::Linear,
        Some((Expr::Ident(p, pc), _)) => match p.as_str() {
            "linear" => Placement::Linear,
            "round_robin" => Placement::RoundRobin,
            _ => {
                return Err(ctx.err(
                    pc,
                    format!(
                        "unknown placement `{p}`{} (linear or round_robin)",
                        did_you_mean(&p, ["linear", "round_robin"])
                    ),
                ))
            }
        },
        Some((_, pc)) => return Err(ctx.err(pc, "placement is `linear` or `round_robin`")),
    };
    Ok(ExpertsClause { count, placement })
}
