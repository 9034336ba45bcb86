//! Tokens and expressions of the spec language.
//!
//! Expressions are integers, booleans, strings and lists with `+ - * / %` (integer, floor
//! division), comparisons, `x in list` (membership, e.g. in a config list such as
//! `mlp_only_layers`), `&& || !`, `a ?? b` (b when a names a missing config value) and calls
//! (`cdiv`, `min`, `max`, `has`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// A token with its 1-based column.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok {
    Ident(String),
    Int(i64),
    Str(String),
    Sym(&'static str),
}

const SYMS: [&str; 22] = [
    "==", "!=", "<=", ">=", "&&", "||", "??", "(", ")", "[", "]", ",", "=", "<", ">", "+", "-",
    "*", "/", "%", "!", ":",
];

/// Splits a line fragment into tokens; `base_col` is the 1-based column of `text`'s first char.
pub(crate) fn lex(text: &str, base_col: usize) -> Result<Vec<(Tok, usize)>, (usize, String)> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = base_col + i;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            // Dots join identifier parts: `quantization_config.group_size`.
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '_'
                    || (chars[i] == '.'
                        && chars
                            .get(i + 1)
                            .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_')))
            {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), col));
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            let v = s
                .parse::<i64>()
                .map_err(|_| (col, format!("integer `{s}` is too large")))?;
            out.push((Tok::Int(v), col));
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err((col, "unterminated string (missing `\"`)".into())),
                    Some('"') => break,
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some(&e) if e == '"' || e == '\\' => s.push(e),
                            _ => {
                                return Err((
                                    base_col + i,
                                    "unknown escape in string (only \\\" and \\\\ are allowed)"
                                        .into(),
                                ))
                            }
                        }
                        i += 2;
                        continue;
                    }
                    Some(&ch) => s.push(ch),
                }
                i += 1;
            }
            i += 1;
            out.push((Tok::Str(s), col));
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let sym = SYMS.iter().find(|s| rest.starts_with(**s));
            match sym {
                Some(s) => {
                    out.push((Tok::Sym(s), col));
                    i += s.len();
                }
                None => return Err((col, format!("unexpected character `{c}`"))),
            }
        }
    }
    Ok(out)
}

/// Binary operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    And,
    Or,
    Default,
}

/// An expression node; `col` is where it starts on its line.
#[derive(Clone, Debug)]
pub(crate) enum Expr {
    Int(i64),
    Str(String),
    Ident(String, usize),
    Neg(Box<Expr>, usize),
    Not(Box<Expr>, usize),
    Bin(BinOp, Box<Expr>, Box<Expr>, usize),
    Call(String, Vec<Arg>, usize),
    List(Vec<Expr>, usize),
}

/// A call argument: `value`, `key = value`, or `value if cond` (stage lists).
#[derive(Clone, Debug)]
pub(crate) struct Arg {
    pub key: Option<(String, usize)>,
    pub value: Expr,
    pub cond: Option<Expr>,
    pub col: usize,
}

impl Expr {
    pub fn col(&self) -> usize {
        match self {
            Expr::Int(_) | Expr::Str(_) => 0,
            Expr::Ident(_, c)
            | Expr::Neg(_, c)
            | Expr::Not(_, c)
            | Expr::Bin(_, _, _, c)
            | Expr::Call(_, _, c)
            | Expr::List(_, c) => *c,
        }
    }

    /// Whether `f` holds for any identifier of the expression.
    pub fn any_ident<'a>(&'a self, f: &mut dyn FnMut(&'a str) -> bool) -> bool {
        match self {
            Expr::Int(_) | Expr::Str(_) => false,
            Expr::Ident(n, _) => f(n),
            Expr::Neg(e, _) | Expr::Not(e, _) => e.any_ident(f),
            Expr::Bin(_, a, b, _) => a.any_ident(f) || b.any_ident(f),
            Expr::Call(_, args, _) => args
                .iter()
                .any(|a| a.value.any_ident(f) || a.cond.as_ref().is_some_and(|c| c.any_ident(f))),
            Expr::List(items, _) => items.iter().any(|e| e.any_ident(f)),
        }
    }
}

/// Deepest expression tree (and parser recursion) accepted: real specs nest a handful of
/// levels; the limit keeps parsing, evaluating and dropping a hostile line off the stack's end,
/// even on a 2 MiB thread stack in a debug build (tests/spec_robustness.rs checks that).
pub(crate) const MAX_DEPTH: usize = 64;

/// Most nested evaluation steps (expression levels plus `let`s referring to `let`s) of one
/// evaluation: bounds the evaluator's recursion on long `let` chains.
pub(crate) const MAX_EVAL_DEPTH: usize = 256;

/// Recursive-descent expression parser over one line's tokens.
pub(crate) struct Parser<'a> {
    pub toks: &'a [(Tok, usize)],
    pub pos: usize,
    /// Column just past the end of the line, for "expected ... at end of line".
    pub end_col: usize,
    /// Current recursion depth (parentheses, unary operators, calls, lists).
    pub nest: usize,
}

/// The error for an expression over [`MAX_DEPTH`].
fn too_deep(col: usize) -> (usize, String) {
    (
        col,
        format!("expression nested too deeply (more than {MAX_DEPTH} levels)"),
    )
}

pub(crate) type PResult<T> = Result<T, (usize, String)>;

impl<'a> Parser<'a> {
    pub fn peek(&self) -> Option<&'a Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    pub fn col(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end_col, |(_, c)| *c)
    }

    pub fn at_sym(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Tok::Sym(x)) if *x == s)
    }

    pub fn at_ident(&self, s: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(x)) if x == s)
    }

    pub fn eat_sym(&mut self, s: &str) -> bool {
        if self.at_sym(s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    pub fn expect_sym(&mut self, s: &str, what: &str) -> PResult<()> {
        if self.eat_sym(s) {
            Ok(())
        } else {
            Err((
                self.col(),
                format!("expected `{s}` {what}, found {}", self.describe()),
            ))
        }
    }

    pub fn describe(&self) -> String {
        match self.peek() {
            None => "end of line".into(),
            Some(Tok::Ident(s)) => format!("`{s}`"),
            Some(Tok::Int(v)) => format!("`{v}`"),
            Some(Tok::Str(s)) => format!("\"{s}\""),
            Some(Tok::Sym(s)) => format!("`{s}`"),
        }
    }

    pub fn expr(&mut self) -> PResult<Expr> {
        Ok(self.expr_d()?.0)
    }

    /// An expression and its tree depth.
    fn expr_d(&mut self) -> PResult<(Expr, usize)> {
        self.nest += 1;
        if self.nest > MAX_DEPTH {
            return Err(too_deep(self.col()));
        }
        let r = self.binary(0);
        self.nest -= 1;
        r
    }

    fn binary(&mut self, level: usize) -> PResult<(Expr, usize)> {
        // Lowest to highest precedence.
        const LEVELS: [&[(&str, BinOp)]; 6] = [
            &[("||", BinOp::Or)],
            &[("&&", BinOp::And)],
            &[
                ("==", BinOp::Eq),
                ("!=", BinOp::Ne),
                ("<=", BinOp::Le),
                (">=", BinOp::Ge),
                ("<", BinOp::Lt),
                (">", BinOp::Gt),
            ],
            &[("??", BinOp::Default)],
            &[("+", BinOp::Add), ("-", BinOp::Sub)],
            &[("*", BinOp::Mul), ("/", BinOp::Div), ("%", BinOp::Rem)],
        ];
        let Some(ops) = LEVELS.get(level) else {
            return self.unary();
        };
        let (mut lhs, mut depth) = self.binary(level + 1)?;
        loop {
            let found = ops.iter().find(|(s, _)| self.at_sym(s));
            // `in` is a word, at the level of the comparisons.
            let found = match found {
                None if level == 2 && self.at_ident("in") => Some(&("in", BinOp::In)),
                f => f,
            };
            let Some(&(_, op)) = found else { break };
            let col = self.col();
            self.pos += 1;
            let (rhs, rd) = self.binary(level + 1)?;
            // A long `a + b + c ...` chain builds a deep left-leaning tree without recursing.
            depth = depth.max(rd) + 1;
            if depth > MAX_DEPTH {
                return Err(too_deep(col));
            }
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(rhs), col);
        }
        Ok((lhs, depth))
    }

    fn unary(&mut self) -> PResult<(Expr, usize)> {
        let col = self.col();
        let neg = self.at_sym("-");
        if neg || self.at_sym("!") {
            self.pos += 1;
            self.nest += 1;
            if self.nest > MAX_DEPTH {
                return Err(too_deep(col));
            }
            let (inner, d) = self.unary()?;
            self.nest -= 1;
            let inner = Box::new(inner);
            let e = if neg {
                Expr::Neg(inner, col)
            } else {
                Expr::Not(inner, col)
            };
            return Ok((e, d + 1));
        }
        self.primary()
    }

    fn primary(&mut self) -> PResult<(Expr, usize)> {
        let col = self.col();
        match self.peek().cloned() {
            Some(Tok::Int(v)) => {
                self.pos += 1;
                Ok((Expr::Int(v), 1))
            }
            Some(Tok::Str(s)) => {
                self.pos += 1;
                Ok((Expr::Str(s), 1))
            }
            Some(Tok::Ident(name)) => {
                self.pos += 1;
                if self.at_sym("(") {
                    let (args, d) = self.args_d()?;
                    Ok((Expr::Call(name, args, col), d + 1))
                } else {
                    Ok((Expr::Ident(name, col), 1))
                }
            }
            Some(Tok::Sym("(")) => {
                self.pos += 1;
                let e = self.expr_d()?;
                self.expect_sym(")", "to close `(`")?;
                Ok(e)
            }
            Some(Tok::Sym("[")) => {
                self.pos += 1;
                let mut items = Vec::new();
                let mut depth = 0;
                if !self.eat_sym("]") {
                    loop {
                        let (e, d) = self.expr_d()?;
                        depth = depth.max(d);
                        items.push(e);
                        if self.eat_sym("]") {
                            break;
                        }
                        self.expect_sym(",", "or `]` in list")?;
                    }
                }
                if depth + 1 > MAX_DEPTH {
                    return Err(too_deep(col));
                }
                Ok((Expr::List(items, col), depth + 1))
            }
            _ => Err((col, format!("expected a value, found {}", self.describe()))),
        }
    }

    /// `( arg, arg, ... )` where arg is `expr`, `key = expr` or `expr if expr`.
    pub fn args(&mut self) -> PResult<Vec<Arg>> {
        Ok(self.args_d()?.0)
    }

    /// [`Parser::args`] and the depth of the deepest argument.
    fn args_d(&mut self) -> PResult<(Vec<Arg>, usize)> {
        let open = self.col();
        self.expect_sym("(", "")?;
        let mut args = Vec::new();
        let mut depth = 0;
        if self.eat_sym(")") {
            return Ok((args, depth));
        }
        loop {
            let col = self.col();
            let mut key = None;
            if let (Some((Tok::Ident(k), kc)), Some((Tok::Sym("="), _))) =
                (self.toks.get(self.pos), self.toks.get(self.pos + 1))
            {
                key = Some((k.clone(), *kc));
                self.pos += 2;
            }
            let (value, d) = self.expr_d()?;
            depth = depth.max(d);
            let cond = if self.at_ident("if") {
                self.pos += 1;
                let (c, d) = self.expr_d()?;
                depth = depth.max(d);
                Some(c)
            } else {
                None
            };
            args.push(Arg {
                key,
                value,
                cond,
                col,
            });
            if self.eat_sym(")") {
                break;
            }
            self.expect_sym(",", "or `)` after an argument")?;
        }
        if depth + 1 > MAX_DEPTH {
            return Err(too_deep(open));
        }
        Ok((args, depth))
    }
}

/// A value of an evaluated expression.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Int(i64),
    Bool(bool),
    Str(String),
    Float(f64),
    /// A config.json array or a `[a, b]` literal.
    List(Vec<Value>),
}

impl Value {
    pub fn from_json(v: &serde_json::Value) -> Option<Value> {
        match v {
            serde_json::Value::Bool(b) => Some(Value::Bool(*b)),
            serde_json::Value::Number(n) => Some(match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            }),
            serde_json::Value::String(s) => Some(Value::Str(s.clone())),
            serde_json::Value::Array(a) => a
                .iter()
                .map(Value::from_json)
                .collect::<Option<_>>()
                .map(Value::List),
            _ => None,
        }
    }

    /// The value in words, for messages: `the string "yes"`, `the number 1e23`.
    fn describe(&self) -> String {
        match self {
            Value::Int(v) => format!("the integer {v}"),
            Value::Bool(b) => format!("the boolean {b}"),
            // {:?} escapes quotes and control characters from config.json.
            Value::Str(s) => format!("the string {s:?}"),
            Value::Float(f) => format!("the non-integer number {f:?}"),
            Value::List(v) => format!("a list of {} value(s)", v.len()),
        }
    }
}

/// An evaluation failure: a missing name (which `??` catches) or anything else.
#[derive(Debug)]
pub(crate) enum EvalError {
    Missing {
        name: String,
        col: usize,
    },
    /// A `let` needed its own value (through `chain`, which starts and ends with `name`) and
    /// config.json has no such key to fall back on. `??` catches it like [`EvalError::Missing`]
    /// (`let x = x ?? 1` reads config.json's `x`, else 1).
    Cyclic {
        name: String,
        col: usize,
        chain: Vec<String>,
    },
    Other {
        col: usize,
        msg: String,
    },
    /// An error while evaluating the `let` defined on `line` (columns are on that line).
    InLet {
        line: usize,
        inner: Box<EvalError>,
    },
}

impl EvalError {
    /// Whether a config value is missing (what `??` catches), directly or inside a `let`.
    pub fn is_missing(&self) -> bool {
        match self {
            EvalError::Missing { .. } | EvalError::Cyclic { .. } => true,
            EvalError::Other { .. } => false,
            EvalError::InLet { inner, .. } => inner.is_missing(),
        }
    }
}

/// Where names come from while evaluating: `let`s, the topology, captures, config.json.
pub(crate) struct Env<'a> {
    pub lets: &'a HashMap<String, (Expr, usize)>,
    pub builtins: &'a [(&'static str, i64)],
    pub captures: &'a [(String, u64)],
    pub config: &'a serde_json::Map<String, serde_json::Value>,
    pub has: &'a dyn Fn(&str) -> bool,
    /// Values of the `let`s that read no capture, computed once.
    pub memo: &'a RefCell<HashMap<String, Value>>,
    /// Current evaluation depth (see [`MAX_EVAL_DEPTH`]).
    pub depth: Cell<usize>,
    /// The `let`s being evaluated, outermost first (to name a cycle).
    pub stack: RefCell<Vec<&'a str>>,
    /// Whether the evaluation read a capture (`layer`): a `let` that did is evaluated again
    /// for every tensor instead of being remembered.
    pub read_capture: Cell<bool>,
}

impl Env<'_> {
    pub fn config_lookup(&self, name: &str) -> Option<Value> {
        let mut parts = name.split('.');
        let first = parts.next()?;
        let mut cur = self.config.get(first)?;
        for p in parts {
            cur = cur.get(p)?;
        }
        Value::from_json(cur)
    }

    fn lookup(&self, name: &str, col: usize) -> Result<Value, EvalError> {
        if let Some((_, v)) = self.captures.iter().find(|(n, _)| n == name) {
            self.read_capture.set(true);
            return Ok(Value::Int(*v as i64));
        }
        if let Some((_, v)) = self.builtins.iter().find(|(n, _)| *n == name) {
            return Ok(Value::Int(*v));
        }
        if let Some((key, (e, let_line))) = self.lets.get_key_value(name) {
            // Inside its own definition a name means the config value:
            // `let head_dim = head_dim ?? hidden_size / num_attention_heads`.
            if self.stack.borrow().contains(&name) {
                return self.config_lookup(name).ok_or_else(|| {
                    let stack = self.stack.borrow();
                    let from = stack.iter().position(|n| *n == name).unwrap_or(0);
                    let mut chain: Vec<String> = stack
                        .get(from..)
                        .unwrap_or(&[])
                        .iter()
                        .map(|n| n.to_string())
                        .collect();
                    chain.push(name.to_string());
                    EvalError::Cyclic {
                        name: name.to_string(),
                        col,
                        chain,
                    }
                });
            }
            if let Some(v) = self.memo.borrow().get(name) {
                return Ok(v.clone());
            }
            // No allocation on this path: a `let` read per tensor (it uses `layer`) is
            // evaluated for every tensor of a large checkpoint.
            self.stack.borrow_mut().push(key.as_str());
            let outer = self.read_capture.replace(false);
            let r = self.eval(e);
            let per_tensor = self.read_capture.get();
            self.read_capture.set(outer || per_tensor);
            self.stack.borrow_mut().pop();
            let r = r.map_err(|err| match err {
                EvalError::InLet { .. } => err,
                _ => EvalError::InLet {
                    line: *let_line,
                    inner: Box::new(err),
                },
            });
            // A `let` that reads `layer` (say) has a value per tensor: not remembered.
            if let (Ok(v), false) = (&r, per_tensor) {
                self.memo.borrow_mut().insert(name.to_string(), v.clone());
            }
            return r;
        }
        self.config_lookup(name).ok_or(EvalError::Missing {
            name: name.to_string(),
            col,
        })
    }

    pub fn eval(&self, e: &Expr) -> Result<Value, EvalError> {
        // Trees are at most MAX_DEPTH deep, but `let`s referring to `let`s chain them.
        let depth = self.depth.get() + 1;
        if depth > MAX_EVAL_DEPTH {
            return Err(EvalError::Other {
                col: e.col(),
                msg: format!(
                    "expression nested too deeply when evaluated (more than {MAX_EVAL_DEPTH} levels, counting `let`s that use other `let`s)"
                ),
            });
        }
        self.depth.set(depth);
        let r = self.eval_inner(e);
        self.depth.set(depth - 1);
        r
    }

    fn eval_inner(&self, e: &Expr) -> Result<Value, EvalError> {
        match e {
            Expr::Int(v) => Ok(Value::Int(*v)),
            Expr::Str(s) => Ok(Value::Str(s.clone())),
            Expr::Ident(n, col) => match n.as_str() {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                _ => self.lookup(n, *col),
            },
            Expr::Neg(x, col) => {
                let v = self.int(x)?;
                v.checked_neg().map(Value::Int).ok_or(EvalError::Other {
                    col: *col,
                    msg: "integer overflow".into(),
                })
            }
            Expr::Not(x, _) => Ok(Value::Bool(!self.bool(x)?)),
            Expr::Bin(op, a, b, col) => self.binop(*op, a, b, *col),
            Expr::Call(name, args, col) => self.call(name, args, *col),
            Expr::List(items, _) => items
                .iter()
                .map(|e| self.eval(e))
                .collect::<Result<_, _>>()
                .map(Value::List),
        }
    }

    pub fn int(&self, e: &Expr) -> Result<i64, EvalError> {
        match self.eval(e)? {
            Value::Int(v) => Ok(v),
            other => Err(self.wrong_type(e, "an integer", &other)),
        }
    }

    pub fn bool(&self, e: &Expr) -> Result<bool, EvalError> {
        match self.eval(e)? {
            Value::Bool(v) => Ok(v),
            other => Err(self.wrong_type(e, "a boolean", &other)),
        }
    }

    /// The config key `e`'s value comes straight from, if any: `key`, `key ?? default`, or a
    /// `let` defined so (followed at most `hops` deep).
    fn config_source(&self, e: &Expr, hops: usize) -> Option<String> {
        match e {
            Expr::Ident(n, _) => {
                if self.captures.iter().any(|(c, _)| c == n)
                    || self.builtins.iter().any(|(b, _)| b == n)
                {
                    return None;
                }
                match self.lets.get(n) {
                    Some((def, _)) if !self.stack.borrow().iter().any(|s| s == n) => {
                        self.config_source(def, hops.checked_sub(1)?)
                    }
                    _ => self.config_lookup(n).map(|_| n.clone()),
                }
            }
            Expr::Bin(BinOp::Default, a, b, _) => self
                .config_source(a, hops)
                .or_else(|| self.config_source(b, hops)),
            _ => None,
        }
    }

    /// "expected X, got the string "yes"", naming the config key when the value came
    /// straight from config.json or `--set`.
    fn wrong_type(&self, e: &Expr, expected: &str, got: &Value) -> EvalError {
        let source = match self.config_source(e, 8) {
            Some(n) => format!(" from config key `{n}` (config.json or an override)"),
            None => String::new(),
        };
        EvalError::Other {
            col: e.col(),
            msg: format!("expected {expected}, got {}{source}", got.describe()),
        }
    }

    fn binop(&self, op: BinOp, a: &Expr, b: &Expr, col: usize) -> Result<Value, EvalError> {
        let overflow = || EvalError::Other {
            col,
            msg: "integer overflow".into(),
        };
        match op {
            BinOp::Default => match self.eval(a) {
                Err(e) if e.is_missing() => self.eval(b),
                r => r,
            },
            BinOp::And => Ok(Value::Bool(self.bool(a)? && self.bool(b)?)),
            BinOp::Or => Ok(Value::Bool(self.bool(a)? || self.bool(b)?)),
            BinOp::Eq | BinOp::Ne => {
                let (x, y) = (self.eval(a)?, self.eval(b)?);
                let eq = x == y;
                Ok(Value::Bool(if op == BinOp::Eq { eq } else { !eq }))
            }
            BinOp::In => {
                let x = self.eval(a)?;
                match self.eval(b)? {
                    Value::List(items) => Ok(Value::Bool(items.contains(&x))),
                    other => Err(self.wrong_type(b, "a list after `in`", &other)),
                }
            }
            _ => {
                let (x, y) = (self.int(a)?, self.int(b)?);
                let v = match op {
                    BinOp::Add => Value::Int(x.checked_add(y).ok_or_else(overflow)?),
                    BinOp::Sub => Value::Int(x.checked_sub(y).ok_or_else(overflow)?),
                    BinOp::Mul => Value::Int(x.checked_mul(y).ok_or_else(overflow)?),
                    BinOp::Div | BinOp::Rem => {
                        if y == 0 {
                            return Err(EvalError::Other {
                                col,
                                msg: "division by zero".into(),
                            });
                        }
                        if op == BinOp::Div {
                            Value::Int(x.checked_div_euclid(y).ok_or_else(overflow)?)
                        } else {
                            Value::Int(x.checked_rem_euclid(y).ok_or_else(overflow)?)
                        }
                    }
                    BinOp::Lt => Value::Bool(x < y),
                    BinOp::Le => Value::Bool(x <= y),
                    BinOp::Gt => Value::Bool(x > y),
                    BinOp::Ge => Value::Bool(x >= y),
                    _ => unreachable!("handled above"),
                };
                Ok(v)
            }
        }
    }

    fn call(&self, name: &str, args: &[Arg], col: usize) -> Result<Value, EvalError> {
        let bad = |msg: String| EvalError::Other { col, msg };
        if let Some(a) = args.iter().find(|a| a.key.is_some() || a.cond.is_some()) {
            return Err(EvalError::Other {
                col: a.col,
                msg: format!("`{name}` takes plain arguments"),
            });
        }
        match (name, args) {
            ("has", [a]) => match self.eval(&a.value)? {
                Value::Str(s) => Ok(Value::Bool((self.has)(&s))),
                _ => Err(bad("`has` takes a tensor name string".into())),
            },
            ("cdiv", [a, b]) => {
                let (x, y) = (self.int(&a.value)?, self.int(&b.value)?);
                if y <= 0 || x < 0 {
                    return Err(bad(format!("cdiv({x}, {y}) needs x >= 0 and y > 0")));
                }
                Ok(Value::Int(x / y + i64::from(x % y != 0)))
            }
            ("min", [a, b]) => Ok(Value::Int(self.int(&a.value)?.min(self.int(&b.value)?))),
            ("max", [a, b]) => Ok(Value::Int(self.int(&a.value)?.max(self.int(&b.value)?))),
            ("has" | "cdiv" | "min" | "max", _) => Err(bad(format!(
                "`{name}` takes {} argument(s), got {}",
                if name == "has" { 1 } else { 2 },
                args.len()
            ))),
            _ => Err(bad(format!(
                "unknown function `{name}`{} (functions: cdiv, min, max, has)",
                super::parse::did_you_mean(name, ["cdiv", "min", "max", "has"])
            ))),
        }
    }
}
