//! Tensor-name patterns: dot-separated segments with captures, alternatives and wildcards.
//!
//! - `{layer}` (any identifier in braces) captures a non-negative integer;
//! - `{gate,up}` matches one of the comma-separated alternatives (which may be empty);
//! - `*` inside a segment matches any run of characters except `.`;
//! - a whole segment `**` matches zero or more segments.

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
    Toks(Vec<Tok>),
    AnyMany,
}

/// A compiled pattern.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    segs: Vec<Seg>,
    /// Capture names, in slot order.
    pub captures: Vec<String>,
    has_many: bool,
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
            if toks.is_empty() {
                segs.push(Seg::Lit(lit));
            } else {
                if !lit.is_empty() {
                    toks.push(Tok::Lit(lit));
                }
                segs.push(Seg::Toks(toks));
            }
            offset += seg_len + 1;
        }
        Ok(Pattern {
            segs,
            captures,
            has_many,
        })
    }

    /// Matches the dot-split name; on success `caps[slot]` holds each capture.
    pub fn matches(&self, name: &[&str], caps: &mut [u64]) -> bool {
        if !self.has_many && name.len() != self.segs.len() {
            return false;
        }
        match_segs(&self.segs, name, caps)
    }
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

fn match_segs(segs: &[Seg], name: &[&str], caps: &mut [u64]) -> bool {
    // With several `**` plain backtracking is exponential (`**.**.**.…​.x` against a long
    // name); remembering which (segment, name position) pairs failed makes it polynomial.
    // The outcome of a pair does not depend on `caps` (captures are only outputs).
    if segs.iter().filter(|s| matches!(s, Seg::AnyMany)).count() < 2 {
        return match_segs_at(segs, name, 0, 0, caps, &mut None);
    }
    let mut failed = Some(vec![false; (segs.len() + 1) * (name.len() + 1)]);
    match_segs_at(segs, name, 0, 0, caps, &mut failed)
}

fn match_segs_at(
    segs: &[Seg],
    name: &[&str],
    i: usize,
    j: usize,
    caps: &mut [u64],
    failed: &mut Option<Vec<bool>>,
) -> bool {
    let key = i * (name.len() + 1) + j;
    if let Some(f) = failed.as_ref() {
        if f.get(key).copied().unwrap_or(false) {
            return false;
        }
    }
    let ok = match segs.get(i) {
        None => j == name.len(),
        Some(Seg::AnyMany) => {
            (j..=name.len()).any(|k| match_segs_at(segs, name, i + 1, k, caps, failed))
        }
        Some(Seg::Lit(l)) => match name.get(j) {
            Some(n) => n == l && match_segs_at(segs, name, i + 1, j + 1, caps, failed),
            None => false,
        },
        Some(Seg::Toks(toks)) => match name.get(j) {
            Some(n) => {
                match_toks(toks, n, caps) && match_segs_at(segs, name, i + 1, j + 1, caps, failed)
            }
            None => false,
        },
    };
    if !ok {
        if let Some(f) = failed.as_mut() {
            if let Some(slot) = f.get_mut(key) {
                *slot = true;
            }
        }
    }
    ok
}

fn match_toks(toks: &[Tok], s: &str, caps: &mut [u64]) -> bool {
    // Several `*` in one segment backtrack exponentially on long names; memoize failed
    // (token, byte position) pairs as for `**` (see `match_segs`).
    if toks.iter().filter(|t| matches!(t, Tok::Star)).count() < 2 {
        return match_toks_at(toks, s, 0, 0, caps, &mut None);
    }
    let mut failed = Some(vec![false; (toks.len() + 1) * (s.len() + 1)]);
    match_toks_at(toks, s, 0, 0, caps, &mut failed)
}

fn match_toks_at(
    toks: &[Tok],
    s: &str,
    i: usize,
    j: usize,
    caps: &mut [u64],
    failed: &mut Option<Vec<bool>>,
) -> bool {
    let key = i * (s.len() + 1) + j;
    if let Some(f) = failed.as_ref() {
        if f.get(key).copied().unwrap_or(false) {
            return false;
        }
    }
    let rest_s = s.get(j..).unwrap_or("");
    let ok = match toks.get(i) {
        None => rest_s.is_empty(),
        Some(Tok::Lit(l)) => {
            rest_s.starts_with(l.as_str())
                && match_toks_at(toks, s, i + 1, j + l.len(), caps, failed)
        }
        Some(Tok::Alt(alts)) => alts.iter().any(|a| {
            rest_s.starts_with(a.as_str())
                && match_toks_at(toks, s, i + 1, j + a.len(), caps, failed)
        }),
        Some(Tok::Capture(slot)) => {
            let digits = rest_s.bytes().take_while(u8::is_ascii_digit).count();
            // Try the longest digit run first, then shorter ones (`{a}{b}` is ambiguous anyway).
            (1..=digits).rev().any(|k| {
                let Ok(v) = rest_s[..k].parse::<u64>() else {
                    return false;
                };
                if match_toks_at(toks, s, i + 1, j + k, caps, failed) {
                    if let Some(c) = caps.get_mut(*slot) {
                        *c = v;
                    }
                    true
                } else {
                    false
                }
            })
        }
        Some(Tok::Star) => rest_s
            .char_indices()
            .map(|(k, _)| k)
            .chain(std::iter::once(rest_s.len()))
            .any(|k| match_toks_at(toks, s, i + 1, j + k, caps, failed)),
    };
    if !ok {
        if let Some(f) = failed.as_mut() {
            if let Some(slot) = f.get_mut(key) {
                *slot = true;
            }
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
