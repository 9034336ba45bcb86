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
//!
//! Validation ([`parse_header`]) refuses everything the reference refuses, plus duplicate JSON
//! keys and shape overflow hidden by a zero dimension. An index must name regular files inside
//! the checkpoint directory (or, for the Hugging Face cache, its `blobs/`), every indexed
//! tensor must be in the file named for it, and no tensor may be stored in two files; tensors
//! stored but not indexed go to [`Checkpoint::unindexed`] and are not cataloged.

mod catalog;
mod dtype;
mod header;

pub use catalog::{Checkpoint, FileIdentity, FileInfo, TensorInfo, INDEX_NAME};
pub use dtype::Dtype;
pub(crate) use header::header_bytes;
#[cfg(feature = "synth")]
pub(crate) use header::tensor_bytes;
pub use header::{parse_header, Header, HeaderTensor, MAX_HEADER_LEN};
