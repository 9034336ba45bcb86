//! Strict parsing of one safetensors header.

use std::collections::BTreeMap;

use super::Dtype;
use crate::Result;

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

/// Parses and validates a header.
///
/// `file` names the file in error messages. `prefix` holds at least the first `8 + n` bytes of
/// the file (it may hold fewer when the file is shorter: that is an error, not a panic), and
/// `file_len` is the file's full length, checked against `8 + n + last_end`.
pub fn parse_header(file: &str, prefix: &[u8], file_len: u64) -> Result<Header> {
    let _ = (file, prefix, file_len);
    todo!("issue 2: strict header parser")
}
