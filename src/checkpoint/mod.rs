//! Reading and validating checkpoints.
//!
//! A checkpoint is one `.safetensors` file, a `model.safetensors.index.json` naming several
//! files, or a directory holding either. [`Checkpoint::open`] reads only headers (never tensor
//! data), validates them at least as strictly as the reference `safetensors` implementation,
//! and builds a catalog: for every tensor its name, dtype, shape, file and absolute byte range.
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON, then the
//! tensor data; tensor offsets in the JSON are relative to the start of the data (`8 + n`).
//! Nothing here assumes the data is aligned: MLX writes unpadded headers.

mod catalog;
mod dtype;
mod header;

pub use catalog::{Checkpoint, FileIdentity, FileInfo, TensorInfo, INDEX_NAME};
pub use dtype::Dtype;
pub use header::{header_len, parse_header, Header, HeaderTensor, MAX_HEADER_LEN};
