//! The malformed-input corpus: every refusal rule, each with the error it must give, plus the
//! edge cases real writers produce that must be accepted, and a differential check against the
//! reference implementation (`safetensors::SafeTensors::read_metadata` on the whole buffer).

use crate::checkpoint_support;

use checkpoint_support::*;
use safeshard::checkpoint::{parse_header, Checkpoint, Dtype};
use safetensors::SafeTensors;

/// Why we refuse something the reference accepts (deliberate, stricter differences).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Diff {
    /// The reference refuses it too.
    None,
    /// Duplicate JSON keys: serde keeps the last one silently.
    DuplicateKey,
    /// Shape overflow hidden by a zero dimension placed first.
    OverflowOrder,
}

struct Bad {
    label: &'static str,
    bytes: Vec<u8>,
    /// Substring the error message must contain (after the file name).
    want: &'static str,
    diff: Diff,
}

fn bad(label: &'static str, bytes: Vec<u8>, want: &'static str) -> Bad {
    Bad {
        label,
        bytes,
        want,
        diff: Diff::None,
    }
}

fn entry(name: &str, dtype: &str, shape: &str, offsets: &str) -> String {
    format!(r#""{name}":{{"dtype":{dtype},"shape":{shape},"data_offsets":{offsets}}}"#)
}

/// One-tensor header `{"a": {...}}` with raw JSON pieces, and `data` bytes of data.
fn one(dtype: &str, shape: &str, offsets: &str, data: usize) -> Vec<u8> {
    st_bytes(&format!("{{{}}}", entry("a", dtype, shape, offsets)), data)
}

fn with_n(n: u64, rest: &[u8]) -> Vec<u8> {
    let mut v = n.to_le_bytes().to_vec();
    v.extend_from_slice(rest);
    v
}

/// Eight tensors of 2^61 - 1 bytes each: every size is valid, but 8 + n + end overflows u64.
fn past_u64() -> Vec<u8> {
    let size = (1u64 << 61) - 1;
    let parts: Vec<String> = (0..8u64)
        .map(|i| {
            entry(
                &format!("t{i}"),
                "\"U8\"",
                &format!("[{size}]"),
                &format!("[{},{}]", i * size, (i + 1) * size),
            )
        })
        .collect();
    st_bytes(&format!("{{{}}}", parts.join(",")), 0)
}

fn corpus() -> Vec<Bad> {
    let ok_f32 = r#""a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}"#;
    let two = |a: &str, b: &str, data| st_bytes(&format!("{{{a},{b}}}"), data);
    let mut v = vec![
        bad("empty file", vec![], "too short"),
        bad("5-byte file", vec![1, 0, 0, 0, 0], "too short"),
        bad("7-byte file", vec![2, 0, 0, 0, 0, 0, 0], "too short"),
        bad(
            "header over 100 MB",
            with_n(100_000_001, b"{}"),
            "exceeds the limit",
        ),
        bad(
            "header length u64::MAX",
            with_n(u64::MAX, b"{}"),
            "exceeds the limit",
        ),
        bad("header past EOF", with_n(100, b"{}"), "runs past the end"),
        bad(
            "header one byte past EOF",
            with_n(3, b"{}"),
            "runs past the end",
        ),
        bad("n = 0", with_n(0, b""), "header length is 0"),
        bad("n = 0 with data", with_n(0, b"{}"), "header length is 0"),
        bad(
            "non-UTF-8",
            st_bytes("{\"a\": 1}", 0)
                .into_iter()
                .map(|b| if b == b'a' { 0xff } else { b })
                .collect(),
            "not valid UTF-8",
        ),
        bad("invalid JSON", st_bytes("{", 0), "invalid JSON header"),
        bad("JSON array", st_bytes("[]", 0), "invalid JSON header"),
        bad("JSON number", st_bytes("5", 0), "invalid JSON header"),
        bad("JSON null", st_bytes("null", 0), "invalid JSON header"),
        bad("JSON string", st_bytes("\"x\"", 0), "invalid JSON header"),
        bad(
            "trailing garbage after JSON",
            st_bytes("{} x", 0),
            "invalid JSON header",
        ),
        bad("NUL padding", st_bytes("{}\0\0\0\0\0\0", 0), "NUL"),
        bad(
            "lowercase dtype",
            one("\"bf16\"", "[1]", "[0,2]", 2),
            "unknown dtype \"bf16\"",
        ),
        bad(
            "misspelt dtype",
            one("\"F8_E4M3FN\"", "[1]", "[0,1]", 1),
            "unknown dtype \"F8_E4M3FN\"",
        ),
        bad(
            "empty dtype",
            one("\"\"", "[1]", "[0,1]", 1),
            "unknown dtype",
        ),
        bad(
            "dtype not a string",
            one("5", "[1]", "[0,1]", 1),
            "tensor \"a\": invalid type",
        ),
        bad(
            "negative shape",
            one("\"U8\"", "[-1]", "[0,1]", 1),
            "tensor \"a\": invalid value: integer `-1`",
        ),
        bad(
            "float shape",
            one("\"U8\"", "[1.0]", "[0,1]", 1),
            "tensor \"a\": invalid type: floating point",
        ),
        bad(
            "string shape",
            one("\"U8\"", "[\"1\"]", "[0,1]", 1),
            "tensor \"a\": invalid type: string",
        ),
        bad(
            "shape not an array",
            one("\"U8\"", "1", "[0,1]", 1),
            "tensor \"a\": invalid type",
        ),
        bad(
            "shape above u64",
            one("\"U8\"", "[18446744073709551616]", "[0,1]", 1),
            "tensor \"a\"",
        ),
        bad(
            "negative offset",
            one("\"U8\"", "[1]", "[-1,0]", 1),
            "tensor \"a\": invalid value",
        ),
        bad(
            "float offset",
            one("\"U8\"", "[1]", "[0,1.5]", 1),
            "tensor \"a\": invalid type: floating point",
        ),
        bad(
            "three offsets",
            one("\"U8\"", "[1]", "[0,1,2]", 1),
            "tensor \"a\"",
        ),
        bad(
            "one offset",
            one("\"U8\"", "[1]", "[1]", 1),
            "tensor \"a\": invalid length 1",
        ),
        bad(
            "offsets not an array",
            one("\"U8\"", "[1]", "{}", 1),
            "tensor \"a\": invalid type",
        ),
        bad(
            "missing dtype",
            st_bytes(r#"{"a":{"shape":[1],"data_offsets":[0,1]}}"#, 1),
            "tensor \"a\": missing field `dtype`",
        ),
        bad(
            "missing shape",
            st_bytes(r#"{"a":{"dtype":"U8","data_offsets":[0,1]}}"#, 1),
            "tensor \"a\": missing field `shape`",
        ),
        bad(
            "missing offsets",
            st_bytes(r#"{"a":{"dtype":"U8","shape":[1]}}"#, 1),
            "tensor \"a\": missing field `data_offsets`",
        ),
        bad(
            "entry not an object",
            st_bytes(r#"{"a":5}"#, 0),
            "tensor \"a\": invalid type",
        ),
        bad(
            "entry null",
            st_bytes(r#"{"a":null}"#, 0),
            "tensor \"a\": invalid type",
        ),
        bad(
            "hole between tensors",
            two(ok_f32, &entry("b", "\"F32\"", "[1]", "[8,12]"), 12),
            "tensor \"b\": data_offsets [8, 12] leave a hole of 4 bytes",
        ),
        bad(
            "overlap",
            two(
                &entry("a", "\"F32\"", "[2]", "[0,8]"),
                &entry("b", "\"F32\"", "[2]", "[4,12]"),
                12,
            ),
            "tensor \"b\": data_offsets [4, 12] overlap tensor \"a\"",
        ),
        bad(
            "begin after end",
            one("\"U8\"", "[4]", "[4,0]", 4),
            "begin after they end",
        ),
        bad(
            "not starting at 0",
            one("\"U8\"", "[4]", "[4,8]", 8),
            "the first tensor must start at 0",
        ),
        bad(
            "size mismatch",
            one("\"F32\"", "[2,2]", "[0,4]", 4),
            "tensor \"a\": data_offsets [0, 4] do not match F32 [2, 2] (16 bytes)",
        ),
        bad(
            "size mismatch, too big",
            one("\"F32\"", "[1]", "[0,8]", 8),
            "do not match F32 [1] (4 bytes)",
        ),
        bad(
            "scalar with zero bytes",
            one("\"F32\"", "[]", "[0,0]", 0),
            "do not match F32 [] (4 bytes)",
        ),
        bad(
            "shape overflow",
            one("\"U8\"", "[4294967296,4294967296,2]", "[0,1]", 1),
            "overflows",
        ),
        bad(
            "bits overflow",
            one("\"F64\"", "[4611686018427387904]", "[0,1]", 1),
            "overflows",
        ),
        bad(
            "F4 odd count",
            one("\"F4\"", "[3]", "[0,2]", 2),
            "F4 [3]: size is not a whole number of bytes",
        ),
        bad(
            "F4 scalar",
            one("\"F4\"", "[]", "[0,1]", 1),
            "not a whole number of bytes",
        ),
        bad(
            "F6 not whole bytes",
            one("\"F6_E2M3\"", "[2]", "[0,2]", 2),
            "not a whole number of bytes",
        ),
        bad(
            "trailing byte",
            one("\"F32\"", "[1]", "[0,4]", 5),
            "1 trailing bytes after the last tensor",
        ),
        bad(
            "trailing bytes, no tensors",
            st_bytes("{}", 3),
            "3 trailing bytes",
        ),
        bad(
            "truncated data",
            one("\"F32\"", "[2]", "[0,8]", 7),
            "file is truncated",
        ),
        bad("data end past 2^64", past_u64(), "past 2^64"),
        bad(
            "metadata number",
            st_bytes(r#"{"__metadata__":5}"#, 0),
            "__metadata__: invalid type",
        ),
        bad(
            "metadata string",
            st_bytes(r#"{"__metadata__":"x"}"#, 0),
            "__metadata__: invalid type",
        ),
        bad(
            "metadata array",
            st_bytes(r#"{"__metadata__":["x"]}"#, 0),
            "__metadata__: invalid type",
        ),
        bad(
            "metadata number value",
            st_bytes(r#"{"__metadata__":{"a":1}}"#, 0),
            "__metadata__: invalid type: integer",
        ),
        bad(
            "metadata null value",
            st_bytes(r#"{"__metadata__":{"a":null}}"#, 0),
            "__metadata__: invalid type: null",
        ),
        bad(
            "metadata nested object",
            st_bytes(r#"{"__metadata__":{"a":{}}}"#, 0),
            "__metadata__: invalid type: map",
        ),
    ];
    let dup = |label, bytes, want| Bad {
        label,
        bytes,
        want,
        diff: Diff::DuplicateKey,
    };
    v.push(dup(
        "duplicate tensor name",
        two(ok_f32, ok_f32, 4),
        "duplicate key \"a\"",
    ));
    v.push(dup(
        "duplicate tensor name, different entries",
        two(
            &entry("a", "\"U8\"", "[4]", "[0,4]"),
            &entry("a", "\"F32\"", "[1]", "[0,4]"),
            4,
        ),
        "duplicate key \"a\"",
    ));
    // serde's derived structs refuse these too; the reference refuses them.
    let dup_refused = |label, bytes, want| Bad {
        label,
        bytes,
        want,
        diff: Diff::None,
    };
    v.push(dup_refused(
        "duplicate __metadata__",
        st_bytes(r#"{"__metadata__":{"a":"1"},"__metadata__":{"a":"2"}}"#, 0),
        "duplicate key \"__metadata__\"",
    ));
    v.push(dup(
        "duplicate key inside __metadata__",
        st_bytes(r#"{"__metadata__":{"a":"1","a":"2"}}"#, 0),
        "__metadata__: duplicate key \"a\"",
    ));
    v.push(dup_refused(
        "duplicate dtype field",
        st_bytes(
            r#"{"a":{"dtype":"F32","dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            4,
        ),
        "tensor \"a\": duplicate field `dtype`",
    ));
    v.push(dup_refused(
        "duplicate offsets field",
        st_bytes(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,8],"data_offsets":[0,4]}}"#,
            4,
        ),
        "tensor \"a\": duplicate field `data_offsets`",
    ));
    v.push(Bad {
        label: "overflow hidden by a leading zero",
        bytes: one("\"U8\"", "[0,4294967296,4294967296]", "[0,0]", 0),
        want: "overflows",
        diff: Diff::OverflowOrder,
    });
    v
}

/// Inputs real writers produce: each must be accepted, with the tensors listed.
/// (name, dtype, shape, bytes) of one expected tensor.
type Want = (&'static str, Dtype, Vec<u64>, u64);

fn accepted() -> Vec<(&'static str, Vec<u8>, Vec<Want>)> {
    let pad = |json: &str| {
        let mut s = json.to_string();
        while s.len() % 8 != 0 {
            s.push(' ');
        }
        s
    };
    vec![
        ("empty header", st_bytes("{}", 0), vec![]),
        (
            "empty header, space padded",
            st_bytes("{}      ", 0),
            vec![],
        ),
        ("leading whitespace", st_bytes("  \n\t{}", 0), vec![]),
        (
            "metadata null",
            st_bytes(r#"{"__metadata__":null}"#, 0),
            vec![],
        ),
        (
            "metadata empty",
            st_bytes(r#"{"__metadata__":{}}"#, 0),
            vec![],
        ),
        (
            "padded header",
            st_bytes(
                &pad(r#"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}"#),
                12,
            ),
            vec![("w", Dtype::BF16, vec![2, 3], 12)],
        ),
        (
            "unpadded (MLX) header",
            st_bytes(
                r#"{"w":{"dtype":"F16","shape":[3],"data_offsets":[0,6]}}"#,
                6,
            ),
            vec![("w", Dtype::F16, vec![3], 6)],
        ),
        (
            "keys in any order, unknown fields",
            st_bytes(
                r#"{"w":{"data_offsets":[0,4],"extra":{"x":[1,2]},"shape":[],"dtype":"I32"},"__metadata__":{"format":"mlx"}}"#,
                4,
            ),
            vec![("w", Dtype::I32, vec![], 4)],
        ),
        (
            "zero-size tensors sharing offsets",
            st_bytes(
                r#"{"z1":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"z2":{"dtype":"F16","shape":[3,0],"data_offsets":[4,4]},"z3":{"dtype":"U8","shape":[0,5],"data_offsets":[4,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}"#,
                6,
            ),
            vec![
                ("z1", Dtype::F32, vec![0], 0),
                ("a", Dtype::F32, vec![1], 4),
                ("z2", Dtype::F16, vec![3, 0], 0),
                ("z3", Dtype::U8, vec![0, 5], 0),
                ("b", Dtype::U8, vec![2], 2),
            ],
        ),
        (
            "sub-byte dtypes filling whole bytes",
            st_bytes(
                r#"{"f4":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]},"f6":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[3,6]},"f6b":{"dtype":"F6_E2M3","shape":[8],"data_offsets":[6,12]}}"#,
                12,
            ),
            vec![
                ("f4", Dtype::F4, vec![2, 3], 3),
                ("f6", Dtype::F6_E3M2, vec![4], 3),
                ("f6b", Dtype::F6_E2M3, vec![8], 6),
            ],
        ),
        (
            "empty tensor name",
            st_bytes(r#"{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, 1),
            vec![("", Dtype::U8, vec![1], 1)],
        ),
    ]
}

fn open_bytes(bytes: &[u8]) -> safeshard::Result<Checkpoint> {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "bad.safetensors", bytes);
    Checkpoint::open(&p)
}

#[test]
fn every_malformed_input_is_refused_with_its_message() {
    let mut failures = Vec::new();
    for case in corpus() {
        match open_bytes(&case.bytes) {
            Ok(_) => failures.push(format!("{}: accepted", case.label)),
            Err(e) => {
                let msg = e.to_string();
                if !msg.starts_with("bad.safetensors: ")
                    || !msg.contains(case.want)
                    || msg.contains('\n')
                {
                    failures.push(format!("{}: got {msg:?}, want {:?}", case.label, case.want));
                }
                if e.is_usage() {
                    failures.push(format!("{}: a usage error, not bad data", case.label));
                }
            }
        }
        // The in-memory parser agrees with the file reader.
        if parse_header("bad.safetensors", &case.bytes, case.bytes.len() as u64).is_ok() {
            failures.push(format!("{}: parse_header accepted", case.label));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn reference_refusals_are_ours_too_and_differences_are_deliberate() {
    let mut failures = Vec::new();
    for case in corpus() {
        // The reference panics on `8 + n + end` overflow in debug builds (its known bug, PR
        // #808): a panic counts as a refusal.
        let reference =
            std::panic::catch_unwind(|| SafeTensors::read_metadata(&case.bytes).is_ok())
                .unwrap_or(false);
        let ours = parse_header("f", &case.bytes, case.bytes.len() as u64).is_ok();
        if ours {
            failures.push(format!("{}: we accept", case.label));
        }
        match (reference, case.diff) {
            (false, Diff::None) => {}
            (true, Diff::DuplicateKey | Diff::OverflowOrder) => {}
            (r, d) => failures.push(format!(
                "{}: reference ok={r}, declared difference {d:?}",
                case.label
            )),
        }
    }
    for (label, bytes, _) in accepted() {
        if SafeTensors::read_metadata(&bytes).is_err() {
            failures.push(format!("{label}: reference refuses an accepted case"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn accepted_edge_cases_read_with_their_tensors() {
    for (label, bytes, want) in accepted() {
        let ck = open_bytes(&bytes).unwrap_or_else(|e| panic!("{label}: {e}"));
        let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let mut got: Vec<_> = ck
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.shape.clone(), t.bytes))
            .collect();
        let mut want = want.clone();
        got.sort_by(|a, b| a.0.cmp(b.0));
        want.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(got, want, "{label}");
        // Offsets are absolute and every tensor ends inside the file.
        for t in ck.tensors() {
            assert!(
                t.offset >= data_start && t.offset + t.bytes <= bytes.len() as u64,
                "{label}"
            );
        }
    }
}

#[test]
fn every_dtype_is_accepted_with_its_size() {
    let mut parts = Vec::new();
    let mut pos = 0u64;
    let mut want = Vec::new();
    for d in Dtype::ALL {
        // 8 elements fill whole bytes for every bit width.
        let n = 8 * d.bits() / 8;
        parts.push(entry(
            d.name(),
            &format!("\"{}\"", d.name()),
            "[2,4]",
            &format!("[{pos},{}]", pos + n),
        ));
        want.push((d, n));
        pos += n;
    }
    let bytes = st_bytes(&format!("{{{}}}", parts.join(",")), pos as usize);
    assert!(SafeTensors::read_metadata(&bytes).is_ok());
    let h = parse_header("f", &bytes, bytes.len() as u64).unwrap();
    assert_eq!(h.tensors.len(), 22);
    for (d, n) in want {
        let t = h.tensors.iter().find(|t| t.dtype == d).unwrap();
        assert_eq!(
            (t.name.as_str(), t.data_offsets.1 - t.data_offsets.0),
            (d.name(), n)
        );
    }
}

#[test]
fn a_short_prefix_is_an_error_not_a_panic() {
    let bytes = st_bytes(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        1,
    );
    // The parser needs only the first 8 + n bytes; anything shorter is an error.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for cut in 0..8 + n {
        let e = parse_header("f", &bytes[..cut], bytes.len() as u64).unwrap_err();
        assert!(e.to_string().starts_with("f: "), "{e}");
    }
}
