//! Strict parsing of one safetensors header.
//!
//! The rules follow the reference implementation (`safetensors` 0.8, `read_metadata` and
//! `Metadata::validate`) with these deliberate differences, all stricter:
//! - duplicate JSON keys (tensor names, `__metadata__`, or fields of one entry) are refused,
//!   where serde silently keeps the last one (a parser differential between readers);
//! - shape overflow is checked independently of dimension order: the product of the non-zero
//!   dimensions must fit in a `u64` (the reference accepts `[0, 2^32, 2^32]` but refuses
//!   `[2^32, 2^32, 0]`; we refuse both).
//!
//! Errors are one line naming the file, the tensor when there is one, and what is wrong.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

use super::Dtype;
use crate::{Error, Result};

/// Largest accepted JSON header, as in the reference implementation (checked before allocating).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor entry of a parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape in elements (logical elements for sub-byte dtypes).
    pub shape: Vec<u64>,
    /// `[begin, end)` relative to the start of the data section.
    pub data_offsets: (u64, u64),
}

/// A validated safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Length of the JSON header in bytes (the `n` of the 8-byte prefix).
    pub header_len: u64,
    /// Tensors in the order of their data offsets.
    pub tensors: Vec<HeaderTensor>,
    /// The `__metadata__` map (`None` when absent or `null`).
    pub metadata: Option<BTreeMap<String, String>>,
}

impl Header {
    /// Absolute file offset of the data section: `8 + header_len`.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }
}

/// Reads the 8-byte little-endian header length and checks it against the limits and the file
/// length, so that callers can allocate exactly `n` bytes safely.
///
/// `prefix` holds the first bytes of the file (at least 8 when the file has them).
pub fn header_len(file: &str, prefix: &[u8], file_len: u64) -> Result<u64> {
    let invalid = |reason: String| Error::InvalidFile {
        file: file.to_string(),
        reason,
    };
    let first8: [u8; 8] = match prefix.get(..8).and_then(|b| b.try_into().ok()) {
        Some(b) => b,
        None => {
            return Err(invalid(format!(
                "file is too short for a safetensors header ({} bytes, need at least 8)",
                file_len.min(prefix.len() as u64)
            )))
        }
    };
    let n = u64::from_le_bytes(first8);
    if n > MAX_HEADER_LEN {
        return Err(invalid(format!(
            "header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes"
        )));
    }
    if n == 0 {
        return Err(invalid("header length is 0 (no JSON header)".into()));
    }
    // n <= MAX_HEADER_LEN, so 8 + n cannot overflow.
    if 8 + n > file_len {
        return Err(invalid(format!(
            "header length {n} runs past the end of the file ({file_len} bytes)"
        )));
    }
    Ok(n)
}

/// Parses and validates a header.
///
/// `file` names the file in error messages. `prefix` holds at least the first `8 + n` bytes of
/// the file (it may hold fewer when the file is shorter: that is an error, not a panic), and
/// `file_len` is the file's full length, checked against `8 + n + last_end`.
pub fn parse_header(file: &str, prefix: &[u8], file_len: u64) -> Result<Header> {
    let invalid = |reason: String| Error::InvalidFile {
        file: file.to_string(),
        reason,
    };
    let n = header_len(file, prefix, file_len)?;
    // n <= MAX_HEADER_LEN fits in usize on every supported target.
    let end = usize::try_from(8 + n).map_err(|_| invalid("header length too large".into()))?;
    let json = match prefix.get(8..end) {
        Some(b) => b,
        None => {
            return Err(invalid(format!(
                "header length {n} runs past the end of the data given ({} bytes)",
                prefix.len()
            )))
        }
    };
    let text = std::str::from_utf8(json).map_err(|e| {
        invalid(format!(
            "header is not valid UTF-8 (at byte {} of the header)",
            e.valid_up_to()
        ))
    })?;
    if json.last() == Some(&0) {
        return Err(invalid(
            "header is padded with NUL bytes (only whitespace padding is allowed)".into(),
        ));
    }

    let mut failure = None;
    let raw = {
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = de
            .deserialize_map(HeaderVisitor {
                failure: &mut failure,
            })
            .and_then(|raw| de.end().map(|()| raw));
        match parsed {
            Ok(raw) => raw,
            Err(e) => {
                return Err(match failure {
                    Some(Failure::Tensor { name, reason }) => Error::InvalidTensor {
                        file: file.to_string(),
                        tensor: name,
                        reason,
                    },
                    Some(Failure::Metadata(reason)) => invalid(format!("__metadata__: {reason}")),
                    None => invalid(format!("invalid JSON header: {e}")),
                })
            }
        }
    };

    // Duplicate tensor names: sort names once instead of hashing every one.
    {
        let mut names: Vec<&str> = raw.tensors.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!(
                "duplicate key {:?} in JSON header (tensor names must be unique)",
                w[0]
            )));
        }
    }

    let mut tensors = Vec::with_capacity(raw.tensors.len());
    for t in raw.tensors {
        let dtype = match t.dtype {
            Ok(d) => d,
            Err(name) => {
                return Err(Error::InvalidTensor {
                    file: file.to_string(),
                    tensor: t.name,
                    reason: format!("unknown dtype {name:?}"),
                })
            }
        };
        tensors.push(HeaderTensor {
            name: t.name,
            dtype,
            shape: t.shape,
            data_offsets: t.data_offsets,
        });
    }
    // As the reference: order by (begin, end), then the data must be one contiguous run from 0.
    tensors.sort_by_key(|t| t.data_offsets);

    let mut pos = 0u64;
    let mut prev: Option<&str> = None;
    for t in &tensors {
        let bad = |reason: String| Error::InvalidTensor {
            file: file.to_string(),
            tensor: t.name.clone(),
            reason,
        };
        let (b, e) = t.data_offsets;
        if e < b {
            return Err(bad(format!("data_offsets [{b}, {e}] begin after they end")));
        }
        if b != pos {
            return Err(bad(match prev {
                None => format!("data_offsets [{b}, {e}]: the first tensor must start at 0"),
                Some(p) if b > pos => format!(
                    "data_offsets [{b}, {e}] leave a hole of {} bytes after tensor {p:?} (ends at {pos})",
                    b - pos
                ),
                Some(p) => format!(
                    "data_offsets [{b}, {e}] overlap tensor {p:?} (ends at {pos})"
                ),
            }));
        }
        let size = tensor_bytes(t.dtype, &t.shape)
            .map_err(|why| bad(format!("{} {}: {why}", t.dtype, ShapeDisplay(&t.shape))))?;
        if e - b != size {
            return Err(bad(format!(
                "data_offsets [{b}, {e}] do not match {} {} ({size} bytes)",
                t.dtype,
                ShapeDisplay(&t.shape)
            )));
        }
        pos = e;
        prev = Some(&t.name);
    }

    // Checked: `pos` comes from the file and may be huge.
    let expected = (8 + n).checked_add(pos);
    match expected {
        Some(x) if x == file_len => {}
        Some(x) if x < file_len => {
            return Err(invalid(format!(
            "{} trailing bytes after the last tensor (data ends at byte {x}, file has {file_len})",
            file_len - x
        )))
        }
        _ => {
            return Err(invalid(format!(
            "file is truncated: the header says data ends at byte {}, file has {file_len} bytes",
            expected.map_or_else(|| "past 2^64".to_string(), |x| x.to_string())
        )))
        }
    }

    Ok(Header {
        header_len: n,
        tensors,
        metadata: raw.metadata,
    })
}

/// The header of a safetensors file whose tensors are stored back to back: compact JSON with
/// `metadata` (string pairs; no `__metadata__` entry when empty), then every
/// `(name, dtype, shape, byte length)` in the given order with its `data_offsets`, padded with
/// spaces to a multiple of 8 bytes (what the Rust and Python writers do).
pub fn header_bytes<'a>(
    metadata: &[(&str, &str)],
    tensors: impl IntoIterator<Item = (&'a str, Dtype, &'a [u64], u64)>,
) -> Vec<u8> {
    let json = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut h = String::from("{");
    if !metadata.is_empty() {
        let pairs: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json(k), json(v)))
            .collect();
        h.push_str(&format!("\"__metadata__\":{{{}}}", pairs.join(",")));
    }
    let mut off = 0u64;
    for (name, dtype, shape, len) in tensors {
        if h.len() > 1 {
            h.push(',');
        }
        let end = off.saturating_add(len);
        let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
        h.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{off},{end}]}}",
            json(name),
            dtype.name(),
            shape.join(",")
        ));
        off = end;
    }
    h.push('}');
    while h.len() % 8 != 0 {
        h.push(' ');
    }
    h.into_bytes()
}

/// Byte size of a tensor of `shape` elements of `dtype`, with order-independent overflow
/// checks: the product of the non-zero dimensions must fit in a `u64`.
pub(crate) fn tensor_bytes(dtype: Dtype, shape: &[u64]) -> std::result::Result<u64, &'static str> {
    let mut elements = 1u64;
    let mut zero = false;
    for &d in shape {
        if d == 0 {
            zero = true;
        } else {
            elements = elements
                .checked_mul(d)
                .ok_or("shape overflows (too many elements)")?;
        }
    }
    // Bits of the non-zero product must fit too, so that no shape is accepted or refused
    // depending on where a zero sits.
    let bits = elements
        .checked_mul(dtype.bits())
        .ok_or("shape overflows (too many bytes)")?;
    if zero {
        return Ok(0);
    }
    if bits % 8 != 0 {
        return Err("size is not a whole number of bytes");
    }
    Ok(bits / 8)
}

/// Formats a shape as `[2, 3]`.
pub(crate) struct ShapeDisplay<'a>(pub &'a [u64]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// What failed inside the JSON, kept aside so that the error can name the tensor.
enum Failure {
    Tensor { name: String, reason: String },
    Metadata(String),
}

struct RawTensor {
    name: String,
    /// The dtype, or the unknown name (checked after parsing so the error names the tensor).
    dtype: std::result::Result<Dtype, String>,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

struct RawHeader {
    tensors: Vec<RawTensor>,
    metadata: Option<BTreeMap<String, String>>,
}

struct HeaderVisitor<'f> {
    failure: &'f mut Option<Failure>,
}

impl<'de> Visitor<'de> for HeaderVisitor<'_> {
    type Value = RawHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object mapping tensor names to entries")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<RawHeader, A::Error> {
        let mut tensors = Vec::with_capacity(map.size_hint().unwrap_or(0));
        let mut metadata = None;
        let mut seen_metadata = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "__metadata__" {
                if seen_metadata {
                    return Err(de::Error::custom("duplicate key \"__metadata__\""));
                }
                seen_metadata = true;
                match map.next_value_seed(OptionalMetadataSeed) {
                    Ok(m) => metadata = m,
                    Err(e) => {
                        *self.failure = Some(Failure::Metadata(e.to_string()));
                        return Err(e);
                    }
                }
            } else {
                match map.next_value_seed(EntrySeed) {
                    Ok((dtype, shape, data_offsets)) => tensors.push(RawTensor {
                        name: key,
                        dtype,
                        shape,
                        data_offsets,
                    }),
                    Err(e) => {
                        *self.failure = Some(Failure::Tensor {
                            name: key,
                            reason: e.to_string(),
                        });
                        return Err(e);
                    }
                }
            }
        }
        Ok(RawHeader { tensors, metadata })
    }
}

type Entry = (std::result::Result<Dtype, String>, Vec<u64>, (u64, u64));

/// One tensor entry: `dtype`, `shape`, `data_offsets` required, unknown fields ignored (as the
/// reference), duplicate fields refused.
struct EntrySeed;

impl<'de> DeserializeSeed<'de> for EntrySeed {
    type Value = Entry;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Entry, D::Error> {
        d.deserialize_map(EntryVisitor)
    }
}

struct EntryVisitor;

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = Entry;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with dtype, shape and data_offsets")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Entry, A::Error> {
        let mut dtype = None;
        let mut shape = None;
        let mut offsets = None;
        while let Some(key) = map.next_key::<KeyName>()? {
            match key {
                KeyName::Dtype => {
                    if dtype.is_some() {
                        return Err(de::Error::duplicate_field("dtype"));
                    }
                    dtype = Some(map.next_value_seed(DtypeSeed)?);
                }
                KeyName::Shape => {
                    if shape.is_some() {
                        return Err(de::Error::duplicate_field("shape"));
                    }
                    shape = Some(map.next_value::<Vec<u64>>()?);
                }
                KeyName::DataOffsets => {
                    if offsets.is_some() {
                        return Err(de::Error::duplicate_field("data_offsets"));
                    }
                    offsets = Some(map.next_value::<(u64, u64)>()?);
                }
                KeyName::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((
            dtype.ok_or_else(|| de::Error::missing_field("dtype"))?,
            shape.ok_or_else(|| de::Error::missing_field("shape"))?,
            offsets.ok_or_else(|| de::Error::missing_field("data_offsets"))?,
        ))
    }
}

/// A field name of an entry, recognised without allocating.
enum KeyName {
    Dtype,
    Shape,
    DataOffsets,
    Other,
}

impl<'de> serde::Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<KeyName, E> {
                Ok(match v {
                    "dtype" => KeyName::Dtype,
                    "shape" => KeyName::Shape,
                    "data_offsets" => KeyName::DataOffsets,
                    _ => KeyName::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// The dtype string, parsed without allocating unless it is unknown.
struct DtypeSeed;

impl<'de> DeserializeSeed<'de> for DtypeSeed {
    type Value = std::result::Result<Dtype, String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = std::result::Result<Dtype, String>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a dtype name string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(v.parse::<Dtype>().map_err(|_| v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// `__metadata__`: `null` or an object of string values with unique keys.
struct OptionalMetadataSeed;

impl<'de> DeserializeSeed<'de> for OptionalMetadataSeed {
    type Value = Option<BTreeMap<String, String>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_option(OptionalMetadataVisitor)
    }
}

struct OptionalMetadataVisitor;

impl<'de> Visitor<'de> for OptionalMetadataVisitor {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("null or an object of string values")
    }

    fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_map(MetadataVisitor).map(Some)
    }
}

struct MetadataVisitor;

impl<'de> Visitor<'de> for MetadataVisitor {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of string values")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value::<String>()?;
            if out.contains_key(&k) {
                return Err(de::Error::custom(format_args!("duplicate key {k:?}")));
            }
            out.insert(k, v);
        }
        Ok(out)
    }
}

/// Parses JSON like `serde_json`, but refuses duplicate object keys at any depth (serde_json
/// keeps the last one silently). Used for index files and `config.json`.
pub(crate) fn parse_json_strict(text: &str) -> std::result::Result<serde_json::Value, String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = de.deserialize_any(StrictValue).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = serde_json::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(StrictValue)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            out.push(v);
        }
        Ok(serde_json::Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(StrictValue)?;
            if out.contains_key(&k) {
                return Err(de::Error::custom(format_args!("duplicate key {k:?}")));
            }
            out.insert(k, v);
        }
        Ok(serde_json::Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        parse_header("f.safetensors", bytes, bytes.len() as u64)
    }

    #[test]
    fn written_headers_equal_serde_json_and_parse_back() {
        let shapes: [&[u64]; 3] = [&[2, 3], &[], &[4]];
        let entries = [
            ("a.weight", Dtype::BF16, shapes[0], 12u64),
            ("quote\"back\\slash é", Dtype::F32, shapes[1], 4),
            ("z", Dtype::U8, shapes[2], 4),
        ];
        let h = header_bytes(&[("format", "pt"), ("k\"", "v")], entries);
        assert_eq!(h.len() % 8, 0);
        // Independent encoding: serde_json with insertion order (preserve_order).
        let mut map = serde_json::Map::new();
        map.insert(
            "__metadata__".into(),
            serde_json::json!({"format": "pt", "k\"": "v"}),
        );
        let mut off = 0u64;
        for (n, d, s, l) in entries {
            map.insert(
                n.into(),
                serde_json::json!({"dtype": d.name(), "shape": s, "data_offsets": [off, off + l]}),
            );
            off += l;
        }
        let want = serde_json::to_string(&serde_json::Value::Object(map)).unwrap();
        assert_eq!(std::str::from_utf8(&h).unwrap().trim_end(), want);
        let got = parse(&file(std::str::from_utf8(&h).unwrap(), 20)).unwrap();
        let names: Vec<&str> = got.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.weight", "quote\"back\\slash é", "z"]);
        assert_eq!(got.tensors[2].data_offsets, (16, 20));
        assert_eq!(header_bytes(&[], []), b"{}      ");
    }

    #[test]
    fn parses_and_sorts_by_offset() {
        let b = file(
            r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"__metadata__":{"format":"pt"}}"#,
            12,
        );
        let h = parse(&b).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[0].name, "a");
        assert_eq!(h.tensors[1].data_offsets, (4, 12));
        assert_eq!(h.metadata.unwrap()["format"], "pt");
    }

    #[test]
    fn overflow_is_order_independent() {
        let big = 1u64 << 32;
        assert!(tensor_bytes(Dtype::U8, &[0, big, big]).is_err());
        assert!(tensor_bytes(Dtype::U8, &[big, big, 0]).is_err());
        assert_eq!(tensor_bytes(Dtype::U8, &[0, big]), Ok(0));
        assert_eq!(
            tensor_bytes(Dtype::F4, &[]),
            Err("size is not a whole number of bytes")
        );
        assert_eq!(tensor_bytes(Dtype::F4, &[0, 3]), Ok(0));
    }

    #[test]
    fn strict_json_refuses_nested_duplicates() {
        assert!(parse_json_strict(r#"{"a":{"b":1,"b":2}}"#).is_err());
        assert!(parse_json_strict(r#" {"a":[1,2.5,null,"x"]} "#).is_ok());
    }
}
