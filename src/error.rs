//! The one error type of safeshard.
//!
//! Every message is one line (spec errors add the source line and a caret) that names the
//! file, tensor, spec line, option or rank involved and what is wrong with it. Variants carry
//! typed fields so that a caller can tell, say, a file changed since planning
//! ([`Error::FileChanged`]) from a short read ([`Error::ShortRead`]) or a verification mismatch
//! ([`Error::VerifyMismatch`]). Messages never name command-line flags: options are named by
//! their field ([`Error::InvalidArgument::option`], [`Error::Disagree::option`], hints); each
//! front renders them its own way through [`OptionNames`] ([`Error::render`]), and
//! [`Error::kind`] gives the one mapping to exit codes ([`ErrorKind::exit_code`]).
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

/// How a front spells the library's option names in messages.
///
/// The library names options by their field (`tp`, `pp_layers`, `mode`, `spec`); the
/// command line spells them as flags (`--tp`, `--pp-layers`, `--share`), the Python module as
/// its keyword arguments (`tp`, `share`, `` `spec=` ``). [`Error::render`] asks the front's
/// implementation for every option it prints; no front rewrites message text.
pub trait OptionNames {
    /// An option as the subject of a message (`--tp 0 must be ...`, `ranks disagree on
    /// --share: ...`). `field` may also be one of the job fingerprint's non-option fields
    /// (`version`, `world size`, `plan`).
    fn option(&self, field: &str) -> String;

    /// An option named in a hint, followed by `: what to pass` (`(--spec: a shipped name
    /// ...)`). Defaults to [`OptionNames::option`].
    fn hint(&self, field: &str) -> String {
        self.option(field)
    }
}

/// The library's own spelling, used by `Display`: options by field name, hints as
/// "the `spec` option".
#[derive(Clone, Copy, Debug, Default)]
pub struct FieldNames;

impl OptionNames for FieldNames {
    fn option(&self, field: &str) -> String {
        field.to_string()
    }

    fn hint(&self, field: &str) -> String {
        format!("the `{field}` option")
    }
}

/// The class of an [`Error`]: a stable snake-case name for bindings and the exit status of a
/// command that fails with it. The one place where errors map to exit codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An operating-system I/O error on a path.
    Io,
    /// A malformed safetensors file (or config file).
    InvalidFile,
    /// A malformed tensor entry.
    InvalidTensor,
    /// A malformed or inconsistent index.
    InvalidIndex,
    /// A path that holds no checkpoint.
    NotACheckpoint,
    /// A missing or ill-typed config value.
    Config,
    /// A sharding spec or vLLM name map that does not parse or check.
    Spec,
    /// A spec that cannot place a checkpoint.
    Placement,
    /// A plan that cannot be built or is inconsistent.
    Plan,
    /// A failure while loading.
    Load,
    /// Something this build cannot do for this input.
    Unsupported,
    /// A failure of the communicator or the launcher environment.
    Comm,
    /// Bad usage without one option to blame (ranks that disagree, a world of the wrong size,
    /// an unknown name).
    Usage,
    /// An option with a value that cannot be used.
    InvalidArgument,
    /// A file changed since planning.
    FileChanged,
    /// A short read.
    ShortRead,
    /// A file truncated during a load.
    Truncated,
    /// A tensor that differs from the slow path.
    VerifyMismatch,
    /// An allocation that failed.
    OutOfMemory,
    /// An output directory locked by another process.
    Locked,
    /// One rank of a job failed.
    RankFailed,
}

impl ErrorKind {
    /// Every kind, for bindings that list them.
    pub const ALL: [ErrorKind; 21] = [
        ErrorKind::Io,
        ErrorKind::InvalidFile,
        ErrorKind::InvalidTensor,
        ErrorKind::InvalidIndex,
        ErrorKind::NotACheckpoint,
        ErrorKind::Config,
        ErrorKind::Spec,
        ErrorKind::Placement,
        ErrorKind::Plan,
        ErrorKind::Load,
        ErrorKind::Unsupported,
        ErrorKind::Comm,
        ErrorKind::Usage,
        ErrorKind::InvalidArgument,
        ErrorKind::FileChanged,
        ErrorKind::ShortRead,
        ErrorKind::Truncated,
        ErrorKind::VerifyMismatch,
        ErrorKind::OutOfMemory,
        ErrorKind::Locked,
        ErrorKind::RankFailed,
    ];

    /// The stable snake-case name (`io`, `invalid_file`, `spec`, `usage`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::InvalidFile => "invalid_file",
            ErrorKind::InvalidTensor => "invalid_tensor",
            ErrorKind::InvalidIndex => "invalid_index",
            ErrorKind::NotACheckpoint => "not_a_checkpoint",
            ErrorKind::Config => "config",
            ErrorKind::Spec => "spec",
            ErrorKind::Placement => "placement",
            ErrorKind::Plan => "plan",
            ErrorKind::Load => "load",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Comm => "comm",
            ErrorKind::Usage => "usage",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::FileChanged => "file_changed",
            ErrorKind::ShortRead => "short_read",
            ErrorKind::Truncated => "truncated",
            ErrorKind::VerifyMismatch => "verify_mismatch",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::Locked => "locked",
            ErrorKind::RankFailed => "rank_failed",
        }
    }

    /// The kind called `name` ([`ErrorKind::name`]).
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether the kind is bad usage (an option or argument), as opposed to bad data or a
    /// failure of the system.
    pub fn is_usage(self) -> bool {
        matches!(self, ErrorKind::Usage | ErrorKind::InvalidArgument)
    }

    /// Exit status of a command that fails with this kind: 2 for bad usage, 1 for bad data
    /// and failures of the system.
    pub fn exit_code(self) -> i32 {
        if self.is_usage() {
            2
        } else {
            1
        }
    }
}

/// Where in a spec file a missing config value was asked for ([`Error::MissingConfig`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecPosition {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// The source line, shown under the message.
    pub source: String,
}

/// Everything that can go wrong, as typed variants with one-line messages.
///
/// `Display` names options by their field; a front renders the same error with its own
/// spelling through [`Error::render`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on a path.
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file (or a checkpoint's config.json) whose content or layout is
    /// malformed.
    InvalidFile {
        /// File name (as given, or relative to the checkpoint directory).
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// One tensor entry of a safetensors header is malformed.
    InvalidTensor {
        /// File name.
        file: String,
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A `model.safetensors.index.json` that is malformed or inconsistent with its files.
    InvalidIndex {
        /// Index file name.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint path that is neither a safetensors file, an index nor a directory with one.
    NotACheckpoint {
        /// The path given.
        path: PathBuf,
        /// What was expected.
        reason: String,
    },
    /// A config value (config.json, an override, or a synthetic model's config) that is
    /// missing or has the wrong type or value.
    Config {
        /// The config key, e.g. `num_hidden_layers` or `quantization_config.bits`.
        key: String,
        /// What is wrong with it, as a predicate (`must be a positive integer, got -1`).
        reason: String,
    },
    /// No spec was named and none could be picked from config.json `architectures`.
    NoSpec {
        /// The architectures config.json lists (empty: none, or no config.json).
        architectures: Vec<String>,
    },
    /// A spec needs a config value that config.json does not have.
    MissingConfig {
        /// The spec's origin (path or `<name>.shard`).
        file: String,
        /// Where it is needed, when known.
        at: Option<Box<SpecPosition>>,
        /// The spec's name.
        spec: String,
        /// The missing key.
        key: String,
        /// `; did you mean ...?`, or empty.
        suggestion: String,
    },
    /// A sharding spec or vLLM name map error without a column (see [`Error::SpecAt`]).
    Spec {
        /// The file's origin (path or `<name>.shard` / `<name>.vllm.json`).
        file: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The key of a name map involved, when there is one.
        key: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// A sharding spec that does not parse or does not type-check at a known position. The
    /// message is followed by the source line and a caret on two further lines.
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
    /// A spec rule that cannot place a tensor (bad split, stage or expert), or a requirement
    /// of the spec that this topology breaks.
    Placement {
        /// The spec's origin.
        file: String,
        /// The rule's (or requirement's) line.
        line: usize,
        /// The tensor, when one is involved.
        tensor: Option<String>,
        /// Its shape, when it explains the failure.
        shape: Option<Vec<u64>>,
        /// What is wrong.
        reason: String,
    },
    /// Tensors of the checkpoint that no rule of the spec matches.
    Unmatched {
        /// The spec's name.
        spec: String,
        /// The spec's origin.
        file: String,
        /// The first few unmatched names.
        tensors: Vec<String>,
        /// How many there are in all.
        count: usize,
    },
    /// A checkpoint that lacks tensors the spec requires.
    Incomplete {
        /// The spec's name.
        spec: String,
        /// The spec's origin.
        file: String,
        /// The model's layer count, when known.
        layers: Option<usize>,
        /// The first few missing names.
        missing: Box<[String]>,
        /// How many are missing (a lower bound when `at_least`).
        count: u64,
        /// Whether `count` is only a lower bound.
        at_least: bool,
        /// The spec lines of the rules that require them.
        lines: Box<[usize]>,
    },
    /// A plan that cannot be built or does not fit what it is applied to (rank, tensor or
    /// buffer).
    Plan {
        /// The rank involved, when there is one.
        rank: Option<usize>,
        /// The tensor involved, when there is one.
        tensor: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// A failure while loading a rank's tensors.
    Load {
        /// The rank involved, when there is one.
        rank: Option<usize>,
        /// The file involved, when there is one.
        file: Option<PathBuf>,
        /// What went wrong.
        reason: String,
    },
    /// Mapped reads of `file` cannot be guarded against truncation (no `SIGBUS` handler, or
    /// too many mappings at once): reading with `pread` avoids mappings.
    NoSigbusGuard {
        /// The file.
        file: PathBuf,
    },
    /// A load cancelled through its `LoadControl` (Ctrl-C in Python).
    Cancelled,
    /// Something this build cannot do for this input (an architecture or quantization method
    /// without a vLLM name map, a tensor the map cannot place): a caller with another path
    /// (the vLLM plugin's default loader) can fall back to it.
    Unsupported {
        /// What is unsupported (an architecture, a quantization method, a tensor).
        what: String,
        /// Why, and what would make it work.
        why: String,
    },
    /// A failure of the communicator (MPI, threads, a front's transport).
    Comm {
        /// The operation or backend (`broadcast`, `all_to_all_v`, `MPI`, ...).
        op: String,
        /// What went wrong.
        reason: String,
    },
    /// A launcher environment variable (`RANK`, `OMPI_COMM_WORLD_SIZE`, ...) that is
    /// malformed or contradicts another.
    LaunchEnv {
        /// The variable.
        var: String,
        /// Its value, when set.
        value: Option<String>,
        /// What is wrong with it.
        reason: String,
    },
    /// Another rank of the job failed a step this rank agreed on.
    PeerFailed {
        /// The lowest failed rank.
        rank: usize,
        /// Its message.
        message: String,
    },
    /// A wait of a job (a collective, MPI start-up or finalize) that did not end before its
    /// deadline. [`Error::missing_ranks`] gives the ranks the message names as missing.
    Timeout {
        /// The rank that waited (world rank).
        rank: usize,
        /// The phase it was in.
        phase: String,
        /// How long it waited.
        after: std::time::Duration,
        /// The ranks of the group that did not arrive, when known (`None` in the middle of a
        /// transfer, or before MPI is up).
        missing: Option<Vec<usize>>,
        /// The ranks that did not answer a liveness probe within a grace period, when probed
        /// (MPI). A rank answers while it waits in any collective: one that did not arrive
        /// but answers waits elsewhere; one that does not answer is stopped, hung or busy.
        silent: Option<Box<[usize]>>,
        /// `Some(d)`: this rank's own process did not run for `d` during the wait (stopped
        /// by SIGSTOP or a debugger): the other ranks have given up on it.
        stopped_for: Option<std::time::Duration>,
    },
    /// The job was aborted by another rank (its message).
    Aborted {
        /// Why, as the aborting rank said.
        message: String,
    },
    /// Ranks of one job that hold different values for an option (or another field of the
    /// job fingerprint: `version`, `world size`, `plan`). Bad usage.
    Disagree {
        /// The option's field name.
        option: String,
        /// Each distinct value, with the ranks holding it, in order of first rank.
        values: Vec<(String, Vec<usize>)>,
    },
    /// A job whose number of ranks is not the plan's. Bad usage.
    WorldSize {
        /// Ranks the launcher started.
        ranks: usize,
        /// Ranks the plan has.
        planned: usize,
        /// `[tp, pp, dp]` when the plan's world comes from them.
        topology: Option<[usize; 3]>,
    },
    /// More ranks than one process runs on threads. Bad usage.
    ThreadWorld {
        /// Ranks asked for.
        ranks: usize,
        /// The most that run on threads.
        max: usize,
    },
    /// A name that is not a shipped spec. Bad usage.
    UnknownSpec {
        /// The name given.
        name: String,
        /// `; did you mean ...?`, or empty.
        suggestion: String,
        /// The shipped names.
        shipped: Vec<String>,
    },
    /// A name that is not a synthetic preset. Bad usage.
    UnknownPreset {
        /// The name given.
        name: String,
        /// The known presets.
        known: Vec<String>,
    },
    /// A command that needs one of several options and got none. Bad usage.
    NeedsOneOf {
        /// What the options decide (`which ranks to load`).
        what: String,
        /// Each option's field and what follows its name (`" R (one rank)"`).
        choices: Vec<(String, String)>,
    },
    /// An option (named by its field, e.g. `tp`, `out`, `rank`) with a value that cannot be
    /// used. Bad usage.
    InvalidArgument {
        /// The option's field name (snake case).
        option: String,
        /// What is wrong, starting with the value given.
        message: String,
    },
    /// A file whose length, modification time or identity changed since it was planned.
    FileChanged {
        /// The file.
        file: PathBuf,
        /// What changed.
        change: FileChange,
    },
    /// A positioned read that returned fewer bytes than planned.
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
    Truncated {
        /// The file.
        file: PathBuf,
        /// Where it was noticed, e.g. `short read at offset 4096: file ended 12 bytes early`.
        detail: String,
    },
    /// A loaded tensor that differs from the independent slow path.
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
    OutOfMemory {
        /// Bytes asked for.
        bytes: u64,
        /// What the buffer is for (tensor or file name).
        what: String,
        /// The rank, when the buffer belongs to one.
        rank: Option<usize>,
    },
    /// An output directory that another process is writing to.
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// One rank of a job failed; `message` is its error.
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

/// What a timeout says about the ranks that kept it waiting (`missing`: the group's ranks
/// that did not arrive; `silent`: those that do not answer a liveness probe), most telling
/// first: `rank 2 did not arrive; rank 0 did not arrive but answers (waiting in another
/// collective)`.
fn stragglers(missing: Option<&[usize]>, silent: Option<&[usize]>) -> String {
    let absent = missing.unwrap_or(&[]);
    let answers = |r: &usize| silent.is_some_and(|s| !s.contains(r));
    let (waiting, gone): (Vec<usize>, Vec<usize>) = absent.iter().partition(|r| answers(r));
    let others: Vec<usize> = silent
        .unwrap_or(&[])
        .iter()
        .copied()
        .filter(|r| !absent.contains(r))
        .collect();
    let mut parts = Vec::new();
    if !gone.is_empty() {
        parts.push(format!("rank {} did not arrive", rank_list(&gone)));
    }
    if !waiting.is_empty() {
        parts.push(format!(
            "rank {} did not arrive but {} (waiting in another collective)",
            rank_list(&waiting),
            if waiting.len() == 1 {
                "answers"
            } else {
                "answer"
            }
        ));
    }
    if !others.is_empty() {
        parts.push(format!(
            "rank {} {} not answer (stopped or hung)",
            rank_list(&others),
            if others.len() == 1 { "does" } else { "do" }
        ));
    }
    if parts.is_empty() {
        parts.push(match (missing, silent) {
            (_, Some(_)) => "every rank answers, but the transfer did not finish".into(),
            (Some(_), None) => "every rank arrived, but the collective did not finish".into(),
            (None, None) => "some ranks of this group did not arrive".into(),
        });
    }
    parts.join("; ")
}

/// `0,2,3`: ranks joined by commas.
pub fn rank_list(ranks: &[usize]) -> String {
    ranks
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `30s`, `2m`, `1m30s`, `250ms`: a duration as the `--timeout` flag spells it.
pub fn human_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match (s / 60, s % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

/// `"a", "b" and 3 more`: quoted names (a newline in a name must not forge a line).
fn quoted_list(names: &[String], more: &str) -> String {
    let mut list = names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    list.push_str(more);
    list
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

    /// An [`Error::Config`] for config key `key`.
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// An [`Error::Plan`] about `tensor`.
    pub fn plan_tensor(tensor: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Plan {
            rank: None,
            tensor: Some(tensor.into()),
            reason: reason.into(),
        }
    }

    /// An [`Error::Plan`] about rank `rank`.
    pub fn plan_rank(rank: usize, reason: impl Into<String>) -> Self {
        Error::Plan {
            rank: Some(rank),
            tensor: None,
            reason: reason.into(),
        }
    }

    /// An [`Error::Plan`] naming neither a rank nor a tensor (a plan that does not fit its
    /// own files or arena).
    pub fn plan(reason: impl Into<String>) -> Self {
        Error::Plan {
            rank: None,
            tensor: None,
            reason: reason.into(),
        }
    }

    /// An [`Error::Load`] on rank `rank`, if known.
    pub fn load(rank: Option<usize>, reason: impl Into<String>) -> Self {
        Error::Load {
            rank,
            file: None,
            reason: reason.into(),
        }
    }

    /// An [`Error::Comm`] in operation `op`.
    pub fn comm(op: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Comm {
            op: op.into(),
            reason: reason.into(),
        }
    }

    /// The ranks a [`Error::Timeout`] names as missing: those that did not arrive and do not
    /// answer, else those that did not arrive, else those that do not answer, else this
    /// rank itself when it was the one stopped (`None` for other errors).
    pub fn missing_ranks(&self) -> Option<Vec<usize>> {
        let Error::Timeout {
            rank,
            missing,
            silent,
            stopped_for,
            ..
        } = self
        else {
            return None;
        };
        if stopped_for.is_some() {
            return Some(vec![*rank]);
        }
        let absent = missing.clone().unwrap_or_default();
        let silent: Vec<usize> = silent.as_deref().map(<[usize]>::to_vec).unwrap_or_default();
        let both: Vec<usize> = absent
            .iter()
            .copied()
            .filter(|r| silent.contains(r))
            .collect();
        Some(if !both.is_empty() {
            both
        } else if !absent.is_empty() {
            absent
        } else {
            silent
        })
    }

    /// The error's class: its name for bindings and its exit status.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::InvalidFile { .. } => ErrorKind::InvalidFile,
            Error::InvalidTensor { .. } => ErrorKind::InvalidTensor,
            Error::InvalidIndex { .. } => ErrorKind::InvalidIndex,
            Error::NotACheckpoint { .. } => ErrorKind::NotACheckpoint,
            Error::Config { .. } | Error::NoSpec { .. } | Error::MissingConfig { .. } => {
                ErrorKind::Config
            }
            Error::Spec { .. } | Error::SpecAt { .. } => ErrorKind::Spec,
            Error::Placement { .. } | Error::Unmatched { .. } | Error::Incomplete { .. } => {
                ErrorKind::Placement
            }
            Error::Plan { .. } => ErrorKind::Plan,
            Error::Load { .. } | Error::NoSigbusGuard { .. } | Error::Cancelled => ErrorKind::Load,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Comm { .. }
            | Error::LaunchEnv { .. }
            | Error::PeerFailed { .. }
            | Error::Timeout { .. }
            | Error::Aborted { .. } => ErrorKind::Comm,
            Error::Disagree { .. }
            | Error::WorldSize { .. }
            | Error::ThreadWorld { .. }
            | Error::UnknownSpec { .. }
            | Error::UnknownPreset { .. }
            | Error::NeedsOneOf { .. } => ErrorKind::Usage,
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::FileChanged { .. } => ErrorKind::FileChanged,
            Error::ShortRead { .. } => ErrorKind::ShortRead,
            Error::Truncated { .. } => ErrorKind::Truncated,
            Error::VerifyMismatch { .. } => ErrorKind::VerifyMismatch,
            Error::OutOfMemory { .. } => ErrorKind::OutOfMemory,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::RankFailed { .. } => ErrorKind::RankFailed,
        }
    }

    /// Whether the error is bad usage (an option or argument), as opposed to bad data or a
    /// failure of the system.
    pub fn is_usage(&self) -> bool {
        self.kind().is_usage()
    }

    /// Exit status of a command that fails with this error ([`ErrorKind::exit_code`]).
    pub fn exit_code(&self) -> i32 {
        self.kind().exit_code()
    }

    /// The one-line message with options spelled by `names` (each front passes its own):
    /// control characters escaped; spec and placement errors keep their indented source and
    /// caret lines, any other line break is escaped so a name cannot forge a second line.
    pub fn render(&self, names: &dyn OptionNames) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = self.write_message(&mut text, names);
        if matches!(self.kind(), ErrorKind::Spec | ErrorKind::Placement) {
            WithContext(&text).to_string()
        } else {
            escape_controls(&text).into_owned()
        }
    }

    fn write_message(&self, f: &mut dyn fmt::Write, names: &dyn OptionNames) -> fmt::Result {
        match self.kind() {
            ErrorKind::Config | ErrorKind::Spec | ErrorKind::Placement => {
                self.write_spec_message(f, names)
            }
            ErrorKind::Comm | ErrorKind::Usage | ErrorKind::InvalidArgument => {
                self.write_job_message(f, names)
            }
            _ => self.write_data_message(f, names),
        }
    }

    /// Config, spec and placement errors.
    fn write_spec_message(&self, f: &mut dyn fmt::Write, names: &dyn OptionNames) -> fmt::Result {
        match self {
            Error::Config { key, reason } => {
                write!(f, "config: `{}` {}", Escaped(key), Escaped(reason))
            }
            Error::NoSpec { architectures } => {
                f.write_str("config: ")?;
                if architectures.is_empty() {
                    f.write_str(
                        "no `architectures` in config.json (or no config.json beside the \
                         checkpoint), so no spec can be picked",
                    )?;
                } else {
                    let archs: Vec<String> = architectures
                        .iter()
                        .map(|a| format!("`{}`", Escaped(a)))
                        .collect();
                    write!(f, "no shipped spec for architecture {}", archs.join(", "))?;
                }
                write!(
                    f,
                    "; name one ({}: a shipped name or a .shard file; `safeshard spec list`)",
                    names.hint("spec")
                )
            }
            Error::MissingConfig {
                file,
                at,
                spec,
                key,
                suggestion,
            } => {
                write!(f, "config: {}:", Escaped(file))?;
                if let Some(p) = at {
                    write!(f, "{}:{}:", p.line, p.col)?;
                }
                write!(
                    f,
                    " spec `{spec}` needs `{key}`, which config.json does not have{suggestion}; \
                     add it or override it ({}: {key}=VALUE)",
                    names.hint("set")
                )?;
                if let Some(p) = at {
                    write!(f, "\n    {}", Escaped(&p.source))?;
                }
                Ok(())
            }
            Error::Spec {
                file,
                line,
                key,
                reason,
            } => {
                write!(f, "{}", Escaped(file))?;
                if let Some(l) = line {
                    write!(f, ":{l}")?;
                }
                if let Some(k) = key {
                    write!(f, ": `{}`", Escaped(k))?;
                }
                write!(f, ": {reason}")
            }
            Error::SpecAt {
                file,
                line,
                col,
                message,
                excerpt,
            } => write!(
                f,
                "{}:{line}:{col}: {}{excerpt}",
                Escaped(file),
                WithContext(message)
            ),
            Error::Placement {
                file,
                line,
                tensor,
                shape,
                reason,
            } => {
                write!(f, "{}:{line}: ", Escaped(file))?;
                match (tensor, shape) {
                    (Some(t), Some(s)) => write!(f, "tensor {t:?} {s:?}: ")?,
                    (Some(t), None) => write!(f, "tensor {t:?}: ")?,
                    _ => {}
                }
                f.write_str(reason)
            }
            Error::Unmatched {
                spec,
                file,
                tensors,
                count,
            } => {
                let more = if *count > tensors.len() {
                    format!(" and {} more", count - tensors.len())
                } else {
                    String::new()
                };
                write!(
                    f,
                    "{count} tensor(s) match no rule of spec `{spec}` ({}): {}; add rules for \
                     them (or a catch-all rule such as `** replicate`)",
                    Escaped(file),
                    quoted_list(tensors, &more)
                )
            }
            Error::Incomplete {
                spec,
                file,
                layers,
                missing,
                count,
                at_least,
                lines,
            } => {
                let rest = count.saturating_sub(missing.len() as u64);
                let at_least = if *at_least { "at least " } else { "" };
                let more = if rest > 0 || !at_least.is_empty() {
                    format!(" and {at_least}{rest} more")
                } else {
                    String::new()
                };
                write!(
                    f,
                    "checkpoint is incomplete for spec `{spec}`{}: {at_least}{count} tensor(s) \
                     it needs are missing: {} (required by {} line(s) {}; a rule marked \
                     `optional` may match nothing)",
                    layers
                        .map(|n| format!(" with {n} layers"))
                        .unwrap_or_default(),
                    quoted_list(missing, &more),
                    Escaped(file),
                    lines
                        .iter()
                        .map(usize::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            // Not of this family (never reached through write_message).
            other => write!(f, "{other:?}"),
        }
    }

    /// Errors of a job: its communicator, its ranks and its options.
    fn write_job_message(&self, f: &mut dyn fmt::Write, names: &dyn OptionNames) -> fmt::Result {
        match self {
            Error::Comm { op, reason } => write!(f, "{op}: {}", Escaped(reason)),
            Error::LaunchEnv { var, value, reason } => {
                write!(f, "environment variable {var}")?;
                match value {
                    // A number as it is; anything else quoted (it may be empty or odd).
                    Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                        write!(f, "={v}")?
                    }
                    Some(v) => write!(f, "={v:?}")?,
                    None => {}
                }
                write!(f, " {reason}")
            }
            Error::PeerFailed { rank, message } => write!(f, "rank {rank} failed: {message}"),
            Error::Timeout {
                rank,
                phase,
                after,
                stopped_for: Some(gap),
                ..
            } => write!(
                f,
                "rank {rank}: this process was stopped for {} (SIGSTOP or a debugger?) while \
                 waiting in phase {phase:?} (deadline {}): the other ranks have given up on it",
                human_duration(std::time::Duration::from_secs(gap.as_secs().max(1))),
                human_duration(*after)
            ),
            Error::Timeout {
                rank,
                phase,
                after,
                missing,
                silent,
                stopped_for: None,
            } => write!(
                f,
                "rank {rank}: timed out after {} in phase {phase:?}: {}",
                human_duration(*after),
                stragglers(missing.as_deref(), silent.as_deref())
            ),
            Error::Aborted { message } => write!(f, "job aborted: {message}"),
            Error::Disagree { option, values } => {
                let list: Vec<String> = values
                    .iter()
                    .map(|(v, ranks)| format!("rank {} {v}", rank_list(ranks)))
                    .collect();
                write!(
                    f,
                    "ranks disagree on {}: {}",
                    names.option(option),
                    list.join(", ")
                )
            }
            Error::WorldSize {
                ranks,
                planned,
                topology,
            } => match topology {
                Some([tp, pp, dp]) => write!(
                    f,
                    "the job has {ranks} ranks but {} {tp} × {} {pp} × {} {dp} = {planned}; \
                     start it with `mpirun -n {planned}` or change the topology",
                    names.option("tp"),
                    names.option("pp"),
                    names.option("dp")
                ),
                None => write!(f, "the job has {ranks} ranks but the plan has {planned}"),
            },
            Error::ThreadWorld { ranks, max } => write!(
                f,
                "{ranks} ranks are too many to run on threads in one process (at most {max}); \
                 start the job under mpirun, srun or torchrun"
            ),
            Error::UnknownSpec {
                name,
                suggestion,
                shipped,
            } => write!(
                f,
                "no shipped spec named `{}`{suggestion} (shipped: {}); pass a path to a .shard \
                 file instead",
                Escaped(name),
                shipped.join(", ")
            ),
            Error::UnknownPreset { name, known } => write!(
                f,
                "unknown synthetic preset {name:?}; known: {} (each also with -tied or -untied)",
                known.join(", ")
            ),
            Error::NeedsOneOf { what, choices } => {
                write!(f, "say {what}: ")?;
                for (i, (option, rest)) in choices.iter().enumerate() {
                    if i > 0 {
                        f.write_str(if i + 1 == choices.len() { " or " } else { ", " })?;
                    }
                    write!(f, "{}{rest}", names.option(option))?;
                }
                Ok(())
            }
            Error::InvalidArgument { option, message } => {
                write!(f, "{} {message}", names.option(option))
            }
            // Not of this family (never reached through write_message).
            other => write!(f, "{other:?}"),
        }
    }

    /// Errors of files, plans and loads.
    fn write_data_message(&self, f: &mut dyn fmt::Write, names: &dyn OptionNames) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", escaped_path(path)),
            Error::InvalidFile { file, reason } | Error::InvalidIndex { file, reason } => {
                write!(f, "{}: {}", Escaped(file), Escaped(reason))
            }
            Error::InvalidTensor {
                file,
                tensor,
                reason,
            } => write!(
                f,
                "{}: tensor {tensor:?}: {}",
                Escaped(file),
                Escaped(reason)
            ),
            Error::NotACheckpoint { path, reason } => {
                write!(f, "{}: {}", escaped_path(path), Escaped(reason))
            }
            Error::Plan {
                rank,
                tensor,
                reason,
            } => {
                if let Some(r) = rank {
                    write!(f, "rank {r}: ")?;
                }
                if let Some(t) = tensor {
                    write!(f, "tensor {t:?}: ")?;
                }
                if rank.is_none() && tensor.is_none() {
                    f.write_str("plan: ")?;
                }
                write!(f, "{}", Escaped(reason))
            }
            Error::Load { rank, file, reason } => {
                if let Some(r) = rank {
                    write!(f, "rank {r}: ")?;
                }
                if let Some(p) = file {
                    write!(f, "{}: ", escaped_path(p))?;
                }
                write!(f, "{}", Escaped(reason))
            }
            Error::NoSigbusGuard { file } => write!(
                f,
                "{}: cannot guard the file mapping against truncation (SIGBUS handler \
                 unavailable or too many mappings at once); read without mappings ({}: pread)",
                escaped_path(file),
                names.hint("io")
            ),
            Error::Cancelled => f.write_str("load cancelled"),
            Error::Unsupported { what, why } => {
                write!(f, "{}: {}", Escaped(what), Escaped(why))
            }
            Error::FileChanged { file, change } => {
                write!(f, "{}: {change}", escaped_path(file))
            }
            Error::ShortRead {
                file,
                offset,
                wanted,
                got,
            } => write!(
                f,
                "{}: short read at offset {offset}: wanted {wanted} bytes, got {got}",
                escaped_path(file)
            ),
            Error::Truncated { file, detail } => write!(
                f,
                "{}: file truncated during load ({detail})",
                escaped_path(file)
            ),
            Error::VerifyMismatch {
                rank,
                tensor,
                byte,
                loaded,
                expected,
            } => write!(
                f,
                "verify: rank {rank}: tensor {tensor:?} differs from the slow path at byte \
                 {byte} ({loaded} bytes loaded, {expected} expected)"
            ),
            Error::OutOfMemory { bytes, what, rank } => {
                if let Some(r) = rank {
                    write!(f, "rank {r}: ")?;
                }
                write!(f, "cannot allocate {bytes} bytes for {}", Escaped(what))
            }
            Error::Locked { path } => write!(
                f,
                "{}: another safeshard process is writing to this directory",
                escaped_path(path)
            ),
            Error::RankFailed { rank, message } => write!(f, "rank {rank}: {message}"),
            // Not of this family (never reached through write_message).
            other => write!(f, "{other:?}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&FieldNames))
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
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
        let e = Error::SpecAt {
            file: "a.shard".into(),
            line: 1,
            col: 2,
            message: "bad `x\ny`".into(),
            excerpt: "\n    x y\n     ^".into(),
        };
        assert_eq!(e.to_string(), "a.shard:1:2: bad `x\\ny`\n    x y\n     ^");
    }

    #[test]
    fn fronts_spell_options_their_own_way() {
        struct Flags;
        impl OptionNames for Flags {
            fn option(&self, field: &str) -> String {
                format!("--{}", field.replace('_', "-"))
            }
        }
        let e = Error::Disagree {
            option: "round_bytes".into(),
            values: vec![("65536".into(), vec![0, 2]), ("1".into(), vec![1])],
        };
        assert_eq!(
            e.to_string(),
            "ranks disagree on round_bytes: rank 0,2 65536, rank 1 1"
        );
        assert_eq!(
            e.render(&Flags),
            "ranks disagree on --round-bytes: rank 0,2 65536, rank 1 1"
        );
        assert_eq!(e.exit_code(), 2);
        let e = Error::NoSpec {
            architectures: vec!["Foo".into()],
        };
        assert!(
            e.to_string().contains("(the `spec` option: a shipped name"),
            "{e}"
        );
        assert!(e.render(&Flags).contains("(--spec: a shipped name"), "{e}");
        assert_eq!(e.kind().name(), "config");
        assert_eq!(e.exit_code(), 1);
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(k.name()), Some(k));
        }
    }

    #[test]
    fn errors_stay_small() {
        // Every `Result` carries one: keep it well under clippy's `result_large_err` limit.
        assert!(std::mem::size_of::<Error>() <= 112);
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
