//! Tensor-name patterns: dot-separated segments with captures, alternatives and wildcards.
//!
//! - `{layer}` (any identifier in braces) captures a non-negative integer;
//! - `{gate,up}` matches one of the comma-separated alternatives (which may be empty);
//! - `*` inside a segment matches any run of characters except `.`;
//! - a whole segment `**` matches zero or more segments.

use std::cell::RefCell;

/// Most segments in a pattern, and most elements (`*`, captures, alternatives, literals) in
/// one segment: real patterns have about ten; the limits bound the matcher's recursion.
const MAX_SEGMENTS: usize = 256;
const MAX_TOKS: usize = 64;

/// One element of a segment.
#[derive(Clone, Debug)]
enum Tok {
    Lit(String),
    Alt(Vec<String>),
    Capture(usize),
    Star,
}

#[derive(Clone, Debug)]
enum Seg {
    /// Pure literal: compared directly.
    Lit(String),
    /// Tokens, and whether matching them needs the failure memo (two or more `*`, or three
    /// or more branching tokens); without it the plain backtracking is cheap.
    Toks(Vec<Tok>, bool),
    AnyMany,
}

/// A compiled pattern.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    segs: Vec<Seg>,
    /// Capture names, in slot order.
    pub captures: Vec<String>,
    has_many: bool,
    /// Two or more `**`: only then can matching backtrack more than linearly over segments.
    many_memo: bool,
}

impl Pattern {
    /// Compiles `text`; errors carry a 0-based char offset into `text`.
    pub fn compile(text: &str) -> Result<Pattern, (usize, String)> {
        let mut segs = Vec::new();
        let mut captures: Vec<String> = Vec::new();
        let mut offset = 0;
        let mut has_many = false;
        if text.is_empty() {
            return Err((0, "empty pattern".into()));
        }
        for seg in split_segments(text) {
            let seg_len = seg.chars().count();
            if seg.is_empty() {
                return Err((
                    offset,
                    "empty segment in pattern (two dots in a row, or a leading/trailing dot)"
                        .into(),
                ));
            }
            if seg == "**" {
                segs.push(Seg::AnyMany);
                has_many = true;
                offset += seg_len + 1;
                continue;
            }
            if segs.len() >= MAX_SEGMENTS {
                return Err((
                    offset,
                    format!("pattern has more than {MAX_SEGMENTS} segments"),
                ));
            }
            let mut toks = Vec::new();
            let chars: Vec<char> = seg.chars().collect();
            let mut i = 0;
            let mut lit = String::new();
            while i < chars.len() {
                match chars[i] {
                    '{' => {
                        let close = chars[i..].iter().position(|&c| c == '}').ok_or((
                            offset + i,
                            "unclosed `{` in pattern (alternatives and captures end with `}`)"
                                .to_string(),
                        ))?;
                        let inner: String = chars[i + 1..i + close].iter().collect();
                        if !lit.is_empty() {
                            toks.push(Tok::Lit(std::mem::take(&mut lit)));
                        }
                        if inner.contains('{') {
                            return Err((offset + i, "nested `{` in pattern".into()));
                        }
                        if inner.contains('.') {
                            return Err((
                                offset + i,
                                "`.` inside `{...}`: alternatives and captures stay within one segment (use `alias` for optional prefixes)".into(),
                            ));
                        }
                        if inner.contains(',') {
                            toks.push(Tok::Alt(inner.split(',').map(str::to_string).collect()));
                        } else {
                            let ok = inner
                                .chars()
                                .next()
                                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                                && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                            if !ok {
                                return Err((offset + i, format!("`{{{inner}}}` is neither a capture name (letters, digits, `_`) nor alternatives (`{{a,b}}`)")));
                            }
                            if captures.contains(&inner) {
                                return Err((
                                    offset + i,
                                    format!("capture `{{{inner}}}` appears twice"),
                                ));
                            }
                            captures.push(inner);
                            toks.push(Tok::Capture(captures.len() - 1));
                        }
                        i += close + 1;
                    }
                    '}' => return Err((offset + i, "`}` without `{` in pattern".into())),
                    '*' => {
                        if !lit.is_empty() {
                            toks.push(Tok::Lit(std::mem::take(&mut lit)));
                        }
                        if matches!(toks.last(), Some(Tok::Star)) {
                            return Err((
                                offset + i,
                                "`**` must be a whole segment (`a.**.b`)".into(),
                            ));
                        }
                        toks.push(Tok::Star);
                        i += 1;
                    }
                    c if c.is_whitespace() => {
                        return Err((offset + i, "whitespace in pattern".into()))
                    }
                    c => {
                        lit.push(c);
                        i += 1;
                    }
                }
            }
            if toks.len() >= MAX_TOKS {
                return Err((
                    offset,
                    format!("pattern segment has more than {MAX_TOKS} wildcards, captures, alternatives and literal runs"),
                ));
            }
            if toks.is_empty() {
                segs.push(Seg::Lit(lit));
            } else {
                if !lit.is_empty() {
                    toks.push(Tok::Lit(lit));
                }
                let stars = toks.iter().filter(|t| matches!(t, Tok::Star)).count();
                let branching = toks.iter().filter(|t| !matches!(t, Tok::Lit(_))).count();
                segs.push(Seg::Toks(toks, stars >= 2 || branching >= 3));
            }
            offset += seg_len + 1;
        }
        let many_memo = segs.iter().filter(|s| matches!(s, Seg::AnyMany)).count() >= 2;
        Ok(Pattern {
            segs,
            captures,
            has_many,
            many_memo,
        })
    }

    /// Matches the dot-split name; on success `caps[slot]` holds each capture.
    ///
    /// Runs in polynomial time: every (pattern position, name position) state that failed is
    /// remembered, so `**.**.**...` and `*a*a*a...` do not backtrack exponentially.
    pub fn matches(&self, name: &[&str], caps: &mut [u64]) -> bool {
        if !self.has_many && name.len() != self.segs.len() {
            return false;
        }
        if !self.many_memo {
            // An empty memo: plain backtracking, at most linear with one `**`.
            return match_segs(&self.segs, 0, name, 0, caps, &mut []);
        }
        SEG_FAILED.with(|f| {
            let Ok(mut failed) = f.try_borrow_mut() else {
                return false;
            };
            failed.clear();
            failed.resize((self.segs.len() + 1) * (name.len() + 1), false);
            match_segs(&self.segs, 0, name, 0, caps, &mut failed)
        })
    }
}

thread_local! {
    /// Scratch memo of failed (segment, name segment) states, reused across calls.
    static SEG_FAILED: RefCell<Vec<bool>> = const { RefCell::new(Vec::new()) };
    /// Scratch memo of failed (token, byte offset) states within one segment.
    static TOK_FAILED: RefCell<Vec<bool>> = const { RefCell::new(Vec::new()) };
}

/// Splits on dots outside braces (alternatives never contain dots, but a stray one inside
/// braces should produce the "unclosed" error rather than a confusing split).
fn split_segments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            '.' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// Whether `segs[si..]` matches `name[ni..]`; `failed[si * (name.len() + 1) + ni]` marks
/// states known not to match (captures are written only on success, so a failure is final).
/// An empty `failed` means no memo.
fn match_segs(
    segs: &[Seg],
    si: usize,
    name: &[&str],
    ni: usize,
    caps: &mut [u64],
    failed: &mut [bool],
) -> bool {
    let key = si * (name.len() + 1) + ni;
    if failed.get(key).copied().unwrap_or(false) {
        return false;
    }
    let ok = match segs.get(si) {
        None => ni == name.len(),
        Some(Seg::AnyMany) => {
            (ni..=name.len()).any(|k| match_segs(segs, si + 1, name, k, caps, failed))
        }
        Some(Seg::Lit(l)) => match name.get(ni) {
            Some(n) => n == l && match_segs(segs, si + 1, name, ni + 1, caps, failed),
            None => false,
        },
        Some(Seg::Toks(toks, memo)) => match name.get(ni) {
            Some(n) => {
                match_one_seg(toks, *memo, n, caps)
                    && match_segs(segs, si + 1, name, ni + 1, caps, failed)
            }
            None => false,
        },
    };
    if !ok {
        if let Some(f) = failed.get_mut(key) {
            *f = true;
        }
    }
    ok
}

/// Matches one name segment against a segment's tokens.
fn match_one_seg(toks: &[Tok], memo: bool, s: &str, caps: &mut [u64]) -> bool {
    if !memo {
        return match_toks(toks, 0, s, 0, caps, &mut []);
    }
    TOK_FAILED.with(|f| {
        // A nested borrow cannot happen (match_toks does not call back here), but never panic.
        let Ok(mut failed) = f.try_borrow_mut() else {
            return false;
        };
        failed.clear();
        failed.resize((toks.len() + 1) * (s.len() + 1), false);
        match_toks(toks, 0, s, 0, caps, &mut failed)
    })
}

/// Whether `toks[ti..]` matches `s[pos..]` (`pos` a char boundary); `failed` as in
/// [`match_segs`], indexed `ti * (s.len() + 1) + pos`.
fn match_toks(
    toks: &[Tok],
    ti: usize,
    s: &str,
    pos: usize,
    caps: &mut [u64],
    failed: &mut [bool],
) -> bool {
    let key = ti * (s.len() + 1) + pos;
    if failed.get(key).copied().unwrap_or(false) {
        return false;
    }
    let Some(rest) = s.get(pos..) else {
        return false;
    };
    let ok = match toks.get(ti) {
        None => rest.is_empty(),
        Some(Tok::Lit(l)) => {
            rest.starts_with(l.as_str()) && match_toks(toks, ti + 1, s, pos + l.len(), caps, failed)
        }
        Some(Tok::Alt(alts)) => alts.iter().any(|a| {
            rest.starts_with(a.as_str()) && match_toks(toks, ti + 1, s, pos + a.len(), caps, failed)
        }),
        Some(Tok::Capture(slot)) => {
            // A u64 has at most 20 digits: longer runs cannot parse, so never try them.
            let digits = rest.bytes().take_while(u8::is_ascii_digit).take(20).count();
            // Try the longest digit run first, then shorter ones (`{a}{b}` is ambiguous anyway).
            (1..=digits).rev().any(|k| {
                let Some(Ok(v)) = rest.get(..k).map(str::parse::<u64>) else {
                    return false;
                };
                if match_toks(toks, ti + 1, s, pos + k, caps, failed) {
                    if let Some(c) = caps.get_mut(*slot) {
                        *c = v;
                    }
                    true
                } else {
                    false
                }
            })
        }
        Some(Tok::Star) => rest
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(rest.len()))
            .any(|i| match_toks(toks, ti + 1, s, pos + i, caps, failed)),
    };
    if !ok {
        if let Some(f) = failed.get_mut(key) {
            *f = true;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, name: &str) -> Option<Vec<u64>> {
        let p = Pattern::compile(p).unwrap();
        let segs: Vec<&str> = name.split('.').collect();
        let mut caps = vec![u64::MAX; p.captures.len()];
        p.matches(&segs, &mut caps).then_some(caps)
    }

    #[test]
    fn captures_alternatives_wildcards() {
        assert_eq!(
            m(
                "model.layers.{layer}.self_attn.{q,k,v}_proj.weight",
                "model.layers.17.self_attn.k_proj.weight"
            ),
            Some(vec![17])
        );
        assert_eq!(
            m(
                "model.layers.{layer}.self_attn.{q,k,v}_proj.weight",
                "model.layers.17.self_attn.o_proj.weight"
            ),
            None
        );
        assert_eq!(m("model.layers.{layer}.x", "model.layers.a1.x"), None);
        assert_eq!(m("a.w{n}.weight", "a.w13.weight"), Some(vec![13]));
        assert_eq!(
            m(
                "**.inv_freq",
                "model.layers.0.self_attn.rotary_emb.inv_freq"
            ),
            Some(vec![])
        );
        assert_eq!(m("**", "x"), Some(vec![]));
        assert_eq!(
            m("a.*_layernorm.weight", "a.input_layernorm.weight"),
            Some(vec![])
        );
        assert_eq!(
            m("a.*_layernorm.weight", "a.b.input_layernorm.weight"),
            None
        );
        assert_eq!(m("a.{x,}b", "a.b"), Some(vec![]));
        assert_eq!(m("e.{e}.w{w}", "e.3.w2"), Some(vec![3, 2]));
    }

    #[test]
    fn compile_errors() {
        assert!(Pattern::compile("a..b").is_err());
        assert!(Pattern::compile("a.{layer").is_err());
        assert!(Pattern::compile("a.{la yer}").is_err());
        assert!(Pattern::compile("a.{x}.{x}").is_err());
        assert!(Pattern::compile("a}").is_err());
        assert!(Pattern::compile("{,transformer.}h").is_err());
    }
}
