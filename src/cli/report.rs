//! What both paths of `safeshard load` share (the single-process path in `load.rs`, the
//! distributed one in `dist.rs`, which must not import each other): planning from the flags,
//! the flags' value parsers and the per-rank output line.

use std::io::Write;

use std::time::Duration;

use crate::dist::{ShareMode, MIN_ROUND_BYTES};
use crate::load::{IoMode, IoPaths};
use crate::plan::Plan;
use crate::topology::Coords;
use crate::{Error, Result};

use super::common::{human_bytes, PlanFlags, Prepared};

/// Parses a byte size: `123`, `4KB`, `5GB` (powers of 1000), `4KiB`, `2GiB` (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 5GB)"))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// `--round`: a size of at least 64 KiB ([`MIN_ROUND_BYTES`]).
pub fn parse_round(s: &str) -> std::result::Result<u64, String> {
    let v = parse_size(s)?;
    if v < MIN_ROUND_BYTES {
        return Err(format!("at least 64KiB, got {v} bytes"));
    }
    Ok(v)
}

/// `--timeout`: `30s`, `2m`, `1h`, `500ms` or plain seconds; positive.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let secs: f64 = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => {
            return Err(format!(
                "unknown unit {u:?} in {s:?} (use ms, s, m or h, e.g. 30s)"
            ))
        }
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 2m)"))?;
    let total = v * secs;
    if !total.is_finite() || total <= 0.0 || total > 1e9 {
        return Err(format!("{s:?}: must be positive (and under 30 years)"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Opens, resolves and plans (through the library's `Job`).
pub fn prepare_plan(checkpoint: &std::path::Path, flags: &PlanFlags) -> Result<(Prepared, Plan)> {
    flags.job(checkpoint).map(super::common::split)
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::load::digest_hex(bytes)
}

/// Gigabytes per second.
pub fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// What both paths print about one rank: the same keys for the same things.
pub struct RankLine {
    /// Global rank.
    pub rank: usize,
    /// Where the rank sits, when the plan knows it.
    pub coords: Option<Coords>,
    /// Share mode (`none` for `--rank`/`--all-ranks`).
    pub share: ShareMode,
    /// Why: set when the mode was the default rather than `--share` (JSON `share_default`).
    pub share_why: Option<String>,
    /// I/O engine of the bytes read from storage (as asked: `auto` unless forced).
    pub io: IoMode,
    /// Reader threads the engine ran on (0 when this rank read nothing itself).
    pub threads: usize,
    /// Arena bytes by how the engine read them (what `auto` chose).
    pub paths: IoPaths,
    /// Tensors held.
    pub tensors: usize,
    /// Bytes held.
    pub bytes: u64,
    /// Bytes this rank read from storage.
    pub read_bytes: u64,
    /// Bytes sent to other ranks.
    pub sent_bytes: u64,
    /// Bytes received from other ranks.
    pub received_bytes: u64,
    /// Bytes handed out as views of the file mapping.
    pub view_bytes: u64,
    /// Peak staging memory of the pread engine (single-process path only).
    pub peak_staging: Option<u64>,
    /// Load wall time, seconds.
    pub seconds: f64,
    /// Tensors verified, when verification ran.
    pub verified: Option<usize>,
    /// SHA-256 of the rank's arena, when asked for.
    pub sha256: Option<String>,
}

impl RankLine {
    /// One human-readable line.
    pub fn human(&self) -> String {
        let coords = self.coords.map_or(String::new(), |c| {
            format!(" (dp {}, pp {}, tp {})", c.dp_rank, c.pp_rank, c.tp_rank)
        });
        let received = if self.share == ShareMode::None {
            String::new()
        } else {
            format!(", {} received", human_bytes(self.received_bytes))
        };
        let why = self
            .share_why
            .as_ref()
            .map_or(String::new(), |w| format!(", share {} ({w})", self.share));
        let verified = self
            .verified
            .map_or(String::new(), |n| format!(", verified {n} tensors"));
        let digest = self
            .sha256
            .as_ref()
            .map_or(String::new(), |d| format!(", sha256 {d}"));
        let via = if self.threads == 0 {
            String::new()
        } else {
            format!(" ({} on {} threads)", self.chosen(), self.threads)
        };
        format!(
            "rank {}{coords}: {} tensors, {} held, {} read{via}{received}, {:.3} s, {:.2} GB/s\
             {why}{verified}{digest}",
            self.rank,
            self.tensors,
            human_bytes(self.bytes),
            human_bytes(self.read_bytes),
            self.seconds,
            gbps(self.bytes, self.seconds)
        )
    }

    /// The I/O path that moved most bytes (`pread`, `mmap`, `direct`, `none`): what `auto`
    /// chose, or what the forced engine did.
    pub fn chosen(&self) -> &'static str {
        self.paths.main()
    }

    /// One JSON object (`sha256` only when a digest was asked for).
    pub fn json(&self) -> serde_json::Value {
        let c = self.coords;
        let mut v = serde_json::json!({
            "rank": self.rank,
            "tp_rank": c.map(|c| c.tp_rank),
            "pp_rank": c.map(|c| c.pp_rank),
            "dp_rank": c.map(|c| c.dp_rank),
            "share": self.share.to_string(),
            "share_default": self.share_why,
            "io": self.io.name(),
            "io_chosen": self.chosen(),
            "io_bytes": {
                "pread": self.paths.pread,
                "prefetched": self.paths.prefetched,
                "mmap": self.paths.mapped,
                "direct": self.paths.direct,
            },
            "threads": self.threads,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "read_bytes": self.read_bytes,
            "sent_bytes": self.sent_bytes,
            "received_bytes": self.received_bytes,
            "view_bytes": self.view_bytes,
            "peak_staging": self.peak_staging,
            "seconds": self.seconds,
            "gb_per_s": gbps(self.bytes, self.seconds),
            "verified": self.verified,
        });
        if let (Some(d), Some(o)) = (&self.sha256, v.as_object_mut()) {
            o.insert("sha256".into(), d.clone().into());
        }
        v
    }

    /// The line in the output format chosen by `--json`.
    pub fn render(&self, json: bool) -> String {
        if json {
            self.json().to_string()
        } else {
            self.human()
        }
    }
}

/// Writes lines to stdout; a closed pipe (`| head`) is not an error.
pub fn print_lines(lines: impl IntoIterator<Item = String>) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let write = || -> std::io::Result<()> {
        for l in lines {
            writeln!(out, "{l}")?;
        }
        out.flush()
    };
    match write() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::io("<stdout>", e)),
    }
}
