//! The one error type of safeshard.
//!
//! Every message is one line (spec errors add the source line and a caret) that names the
//! file, tensor, spec line, option or rank involved and what is wrong with it. Variants carry
//! typed fields so that a caller can tell, say, a file changed since planning
//! ([`Error::FileChanged`]) from a short read ([`Error::ShortRead`]) or a verification mismatch
//! ([`Error::VerifyMismatch`]). Messages never name command-line flags: options are named by
//! their field ([`Error::InvalidArgument::option`]); the `safeshard` binary maps them to flags
//! and decides exit codes.
//!
//! Names that come from outside (paths, file names, index entries, config strings) are printed
//! through [`Escaped`], so control characters (ESC, BEL, newlines) cannot forge lines or
//! retitle a terminal.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

/// `Result` with safeshard's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Displays a string with control characters escaped (`\n`, `\u{1b}`, `\u{7}`); tabs are kept.
/// The one escaping rule for names from files, indexes, paths and configs.
#[derive(Clone, Copy, Debug)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape_controls(self.0))
    }
}

/// Displays a message that may carry indented context lines (a spec's source line and
/// caret): control characters escaped, line breaks kept only before lines indented by four
/// spaces, so a name inside cannot start a line of its own.
#[derive(Clone, Copy, Debug)]
pub struct WithContext<'a>(pub &'a str);

impl fmt::Display for WithContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, line) in self.0.split('\n').enumerate() {
            if i > 0 {
                f.write_str(if line.starts_with("    ") {
                    "\n"
                } else {
                    "\\n"
                })?;
            }
            f.write_str(&escape_controls(line))?;
        }
        Ok(())
    }
}

/// `s` with control characters other than tab escaped; borrowed when there is nothing to
/// escape (the common case, allocation-free for large tables).
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    let needs = |c: char| c.is_control() && c != '\t';
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A path for messages: lossy UTF-8 with control characters escaped.
pub(crate) fn escaped_path(p: &Path) -> String {
    escape_controls(&p.to_string_lossy()).into_owned()
}

/// Everything that can go wrong, with plain one-line messages.
///
/// Variants named after a string (`Config(String)`, `Plan(String)`, ...) are the older, coarser
/// kinds; newer code uses the typed ones.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on a path.
    #[error("{}: {source}", escaped_path(path))]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file whose header or layout is malformed.
    #[error("{}: {}", Escaped(file), Escaped(reason))]
    InvalidFile {
        /// File name (as given, or relative to the checkpoint directory).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// One tensor entry of a safetensors header is malformed.
    #[error("{}: tensor {tensor:?}: {}", Escaped(file), Escaped(reason))]
    InvalidTensor {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A `model.safetensors.index.json` that is malformed or inconsistent with its files.
    #[error("{}: {}", Escaped(file), Escaped(reason))]
    InvalidIndex {
        /// Index file name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint path that is neither a safetensors file, an index nor a directory with one.
    #[error("{}: {}", escaped_path(path), Escaped(reason))]
    NotACheckpoint {
        /// The path given.
        path: PathBuf,
        /// What was expected.
        reason: String,
    },
    /// A value from `config.json` (or an override) that is missing or has the wrong type.
    #[error("config: {}", Escaped(.0))]
    Config(String),
    /// A sharding spec error without a source position (see [`Error::SpecAt`] for those).
    #[error("{}", WithContext(.0))]
    Spec(String),
    /// A sharding spec that does not parse or does not type-check at a known position. The
    /// message is followed by the source line and a caret on two further lines.
    #[error("{}:{line}:{col}: {}{excerpt}", Escaped(file), WithContext(message))]
    SpecAt {
        /// The spec's origin: its path, or `<shipped name>.shard`.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column (characters).
        col: usize,
        /// What is wrong.
        message: String,
        /// `\n    source line\n    ^` (empty when there is no line to show).
        excerpt: String,
    },
    /// A spec that cannot place some tensors of a checkpoint (unmatched names, bad splits).
    #[error("{}", WithContext(.0))]
    Placement(String),
    /// A plan that cannot be built or does not match the files it was made for.
    #[error("{}", Escaped(.0))]
    Plan(String),
    /// A failure while loading a rank's tensors.
    #[error("{}", Escaped(.0))]
    Load(String),
    /// Something this build cannot do for this input (an architecture or quantization method
    /// without a vLLM name map, a tensor the map cannot place): a caller with another path
    /// (the vLLM plugin's default loader) can fall back to it.
    #[error("{}: {}", Escaped(what), Escaped(why))]
    Unsupported {
        /// What is unsupported (an architecture, a quantization method, a tensor).
        what: String,
        /// Why, and what would make it work.
        why: String,
    },
    /// A failure of the communicator (launcher environment, MPI, NCCL).
    #[error("{}", Escaped(.0))]
    Comm(String),
    /// Bad usage: invalid flags, topology or arguments (the binary exits with status 2).
    #[error("{}", Escaped(.0))]
    Usage(String),
    /// An option (named by its field, e.g. `tp`, `out`, `rank`) with a value that cannot be
    /// used. Bad usage.
    #[error("{option} {message}")]
    InvalidArgument {
        /// The option's field name (snake case).
        option: String,
        /// What is wrong, starting with the value given.
        message: String,
    },
    /// A file whose length, modification time or identity changed since it was planned.
    #[error("{}: {change}", escaped_path(file))]
    FileChanged {
        /// The file.
        file: PathBuf,
        /// What changed.
        change: FileChange,
    },
    /// A positioned read that returned fewer bytes than planned.
    #[error(
        "{}: short read at offset {offset}: wanted {wanted} bytes, got {got}",
        escaped_path(file)
    )]
    ShortRead {
        /// The file.
        file: PathBuf,
        /// Absolute file offset of the read.
        offset: u64,
        /// Bytes asked for.
        wanted: u64,
        /// Bytes returned before end of file.
        got: u64,
    },
    /// A file that was truncated while it was being loaded (a short read, or a recovered
    /// fault in a mapped window).
    #[error("{}: file truncated during load ({detail})", escaped_path(file))]
    Truncated {
        /// The file.
        file: PathBuf,
        /// Where it was noticed, e.g. `short read at offset 4096: file ended 12 bytes early`.
        detail: String,
    },
    /// A loaded tensor that differs from the independent slow path.
    #[error(
        "verify: rank {rank}: tensor {tensor:?} differs from the slow path at byte {byte} \
         ({loaded} bytes loaded, {expected} expected)"
    )]
    VerifyMismatch {
        /// Global rank.
        rank: usize,
        /// Tensor name.
        tensor: String,
        /// First differing byte.
        byte: u64,
        /// Bytes loaded.
        loaded: u64,
        /// Bytes the slow path produced.
        expected: u64,
    },
    /// A buffer sized by input that could not be allocated.
    #[error("{}cannot allocate {bytes} bytes for {}", rank.map(|r| format!("rank {r}: ")).unwrap_or_default(), Escaped(what))]
    OutOfMemory {
        /// Bytes asked for.
        bytes: u64,
        /// What the buffer is for (tensor or file name).
        what: String,
        /// The rank, when the buffer belongs to one.
        rank: Option<usize>,
    },
    /// An output directory that another process is writing to.
    #[error(
        "{}: another safeshard process is writing to this directory",
        escaped_path(path)
    )]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// A rank waited longer than its deadline for the others (a collective, MPI start-up or
    /// finalize); `message` is the whole line, naming the phase and the missing ranks.
    #[error("{}", Escaped(message))]
    Timeout {
        /// The rank that gave up waiting.
        rank: usize,
        /// The phase it was waiting in.
        phase: String,
        /// The ranks it names as missing (empty when it cannot tell).
        missing: Vec<usize>,
        /// The message.
        message: String,
    },
    /// One rank of a job failed; `message` is its error.
    #[error("rank {rank}: {message}")]
    RankFailed {
        /// The rank that failed.
        rank: usize,
        /// Its error message.
        message: String,
    },
}

/// How a file differs from the one that was planned ([`Error::FileChanged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileChange {
    /// Its length differs.
    Length {
        /// Length now.
        now: u64,
        /// Length at planning time.
        planned: u64,
    },
    /// Same length, but another modification time, device or inode: rewritten or replaced.
    Replaced,
}

impl fmt::Display for FileChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FileChange::Length { now, planned } => write!(
                f,
                "file {} since planning: {now} bytes, plan expects {planned}",
                if now < planned { "truncated" } else { "grown" }
            ),
            FileChange::Replaced => f.write_str(
                "file replaced or modified since planning (modification time or inode changed); \
                 plan again",
            ),
        }
    }
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidArgument`] for option field `option`.
    pub fn invalid_argument(option: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            option: option.into(),
            message: message.into(),
        }
    }

    /// The variant as a stable snake-case name (`io`, `invalid_file`, `spec`,
    /// `file_changed`, `out_of_memory`, ...), for bindings that expose error kinds.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::InvalidFile { .. } => "invalid_file",
            Error::InvalidTensor { .. } => "invalid_tensor",
            Error::InvalidIndex { .. } => "invalid_index",
            Error::NotACheckpoint { .. } => "not_a_checkpoint",
            Error::Config(_) => "config",
            Error::Spec(_) | Error::SpecAt { .. } => "spec",
            Error::Placement(_) => "placement",
            Error::Plan(_) => "plan",
            Error::Load(_) => "load",
            Error::Unsupported { .. } => "unsupported",
            Error::Comm(_) => "comm",
            Error::Usage(_) => "usage",
            Error::InvalidArgument { .. } => "invalid_argument",
            Error::FileChanged { .. } => "file_changed",
            Error::ShortRead { .. } => "short_read",
            Error::Truncated { .. } => "truncated",
            Error::VerifyMismatch { .. } => "verify_mismatch",
            Error::OutOfMemory { .. } => "out_of_memory",
            Error::Locked { .. } => "locked",
            Error::RankFailed { .. } => "rank_failed",
            Error::Timeout { .. } => "timeout",
        }
    }

    /// Whether the error is bad usage (an option or argument), as opposed to bad data or a
    /// failure of the system.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Usage(_) | Error::InvalidArgument { .. })
    }
}

/// Allocates a zeroed buffer of `bytes` bytes, or fails with [`Error::OutOfMemory`] naming
/// `what` and `rank`. Every buffer sized by input goes through here (or `try_reserve`), so
/// that a hostile size is an error rather than an abort.
///
/// `SAFESHARD_MAX_ALLOC` (bytes), read here and only here, lowers the limit so tests can
/// exercise the failure without exhausting memory.
pub(crate) fn try_alloc_zeroed(bytes: u64, what: &str, rank: Option<usize>) -> Result<Vec<u8>> {
    let oom = || Error::OutOfMemory {
        bytes,
        what: what.to_string(),
        rank,
    };
    if let Some(limit) = std::env::var("SAFESHARD_MAX_ALLOC")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        if bytes > limit {
            return Err(oom());
        }
    }
    let len = usize::try_from(bytes).map_err(|_| oom())?;
    if len == 0 {
        return Ok(Vec::new());
    }
    // `alloc_zeroed` (calloc) rather than `try_reserve` + fill: the kernel hands out zero
    // pages lazily, so a large buffer is not touched twice, and failure is a null pointer
    // instead of an abort.
    let layout = std::alloc::Layout::array::<u8>(len).map_err(|_| oom())?;
    // SAFETY: `layout` has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Err(oom());
    }
    // SAFETY: `ptr` comes from the global allocator with `layout` (size `len`, align 1) and
    // its `len` bytes are initialized (zeroed); length and capacity are both `len`.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_and_tabs_kept() {
        assert_eq!(escape_controls("a\tb"), "a\tb");
        assert_eq!(
            escape_controls("x\u{1b}]0;t\u{7}\ny"),
            "x\\u{1b}]0;t\\u{7}\\ny"
        );
        let e = Error::io("/tmp/a\nerror: forged", std::io::Error::other("boom"));
        assert_eq!(e.to_string(), "/tmp/a\\nerror: forged: boom");
    }

    #[test]
    fn file_changes_read_as_before() {
        let e = Error::FileChanged {
            file: "/m/a.safetensors".into(),
            change: FileChange::Length {
                now: 80,
                planned: 100,
            },
        };
        assert_eq!(
            e.to_string(),
            "/m/a.safetensors: file truncated since planning: 80 bytes, plan expects 100"
        );
        let e = Error::Truncated {
            file: "/m/a.safetensors".into(),
            detail: "short read at offset 8".into(),
        };
        assert_eq!(
            e.to_string(),
            "/m/a.safetensors: file truncated during load (short read at offset 8)"
        );
    }

    #[test]
    fn context_lines_survive_and_forged_lines_do_not() {
        let e = Error::Spec("a.shard:1:2: bad `x\ny`\n    x y\n     ^".into());
        assert_eq!(e.to_string(), "a.shard:1:2: bad `x\\ny`\n    x y\n     ^");
    }

    #[test]
    fn oversized_allocation_is_an_error() {
        let e = try_alloc_zeroed(u64::MAX, "tensor \"w\"", Some(3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "rank 3: cannot allocate {} bytes for tensor \"w\"",
                u64::MAX
            )
        );
        assert_eq!(try_alloc_zeroed(3, "x", None).unwrap(), vec![0, 0, 0]);
    }
}
