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
    let Some((first, rest)) = segs.split_first() else {
        return name.is_empty();
    };
    match first {
        Seg::AnyMany => (0..=name.len()).any(|k| match_segs(rest, &name[k..], caps)),
        Seg::Lit(l) => match name.split_first() {
            Some((n, nrest)) => n == l && match_segs(rest, nrest, caps),
            None => false,
        },
        Seg::Toks(toks) => match name.split_first() {
            Some((n, nrest)) => match_toks(toks, n, caps) && match_segs(rest, nrest, caps),
            None => false,
        },
    }
}

fn match_toks(toks: &[Tok], s: &str, caps: &mut [u64]) -> bool {
    let Some((first, rest)) = toks.split_first() else {
        return s.is_empty();
    };
    match first {
        Tok::Lit(l) => s
            .strip_prefix(l.as_str())
            .is_some_and(|r| match_toks(rest, r, caps)),
        Tok::Alt(alts) => alts.iter().any(|a| {
            s.strip_prefix(a.as_str())
                .is_some_and(|r| match_toks(rest, r, caps))
        }),
        Tok::Capture(slot) => {
            let digits = s.bytes().take_while(u8::is_ascii_digit).count();
            // Try the longest digit run first, then shorter ones (`{a}{b}` is ambiguous anyway).
            (1..=digits).rev().any(|k| {
                let Ok(v) = s[..k].parse::<u64>() else {
                    return false;
                };
                if match_toks(rest, &s[k..], caps) {
                    if let Some(c) = caps.get_mut(*slot) {
                        *c = v;
                    }
                    true
                } else {
                    false
                }
            })
        }
        Tok::Star => s
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(s.len()))
            .any(|i| match_toks(rest, &s[i..], caps)),
    }
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
