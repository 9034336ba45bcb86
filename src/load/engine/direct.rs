//! Direct I/O: `O_DIRECT` handles for the spans read from storage (chosen per span under
//! [`IoMode::Auto`] by page-cache residency and whether the files fit in the page cache),
//! the pool of page-aligned bounce buffers they are read into, and the aligned read itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use memmap2::MmapOptions;

use super::files::open_direct;
use super::mapped::{residency, RESIDENCY_CHUNK};
use super::{bad_plan, truncated};
use crate::load::IoMode;
use crate::plan::PlanFile;
use crate::{Error, Result};

/// `MemAvailable` of `/proc/meminfo` in bytes: what the kernel estimates can be allocated
/// without swapping (free memory plus reclaimable cache); `None` where it cannot be read.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Alignment of direct I/O offsets, lengths and buffers: the largest logical block size in
/// use (4 KiB disks; 512-byte ones accept it too).
pub(super) const DIRECT_ALIGN: u64 = 4096;

/// Per plan file, what direct I/O needs: a second handle opened with `O_DIRECT` (checked
/// against the planned identity like the first) and, for [`IoMode::Auto`], a mapping of the
/// whole file used only to ask `mincore` which pages are cached (never read, so a
/// truncation cannot fault through it).
pub(super) struct DirectFiles {
    /// Per file, the `O_DIRECT` handle uncached spans are read with (under `Auto`, none
    /// where the files fit in [`crate::load::LoadOptions::page_cache_limit`], by default
    /// half of `MemAvailable`: they are read buffered and stay cached).
    handles: Vec<Option<File>>,
    /// Per file, [`residency`] flags (`Auto` only).
    cached: Vec<Option<Vec<bool>>>,
}

impl DirectFiles {
    /// Opens what `mode` needs: nothing for `Mmap`/`Pread`; for `Direct` every file the
    /// runs read (an error naming the file if its filesystem refuses `O_DIRECT`); for `Auto`
    /// the same where possible (a file without it is read buffered).
    pub(super) fn open(
        files: &[PlanFile],
        open: &[Option<File>],
        mode: IoMode,
        page_cache_limit: Option<u64>,
    ) -> Result<DirectFiles> {
        let mut d = DirectFiles {
            handles: Vec::new(),
            cached: Vec::new(),
        };
        if !matches!(mode, IoMode::Auto | IoMode::Direct) {
            return Ok(d);
        }
        let direct = mode == IoMode::Direct || {
            let total: u64 = files
                .iter()
                .zip(open)
                .filter(|(_, f)| f.is_some())
                .map(|(pf, _)| pf.identity.len)
                .sum();
            // Files that fit are read buffered, their pages asked for ahead: faster cold
            // than direct I/O here, quiet or loaded, and the next load finds them cached
            // (docs/performance.md, "One rank"). Larger ones would only evict each other.
            let limit = page_cache_limit.or_else(|| mem_available().map(|m| m / 2));
            limit.is_none_or(|l| total > l)
        };
        for (pf, f) in files.iter().zip(open) {
            let (mut handle, mut cached) = (None, None);
            if let Some(f) = f {
                if direct {
                    match open_direct(pf) {
                        Ok(h) => handle = Some(h),
                        Err(e) if mode == IoMode::Direct => return Err(e),
                        Err(_) => {}
                    }
                }
                if mode == IoMode::Auto && pf.identity.len > 0 {
                    // SAFETY: read-only private mapping that is only passed to mincore,
                    // never dereferenced, and unmapped right after.
                    let probe = unsafe { MmapOptions::new().map(f) }.ok();
                    cached = probe.as_ref().and_then(residency);
                }
            }
            d.handles.push(handle);
            d.cached.push(cached);
        }
        Ok(d)
    }

    /// The direct handle of file `file`, when the span `[src, end)` should be read with it:
    /// always under `Direct`; under `Auto` when fewer than half its pages are cached.
    pub(super) fn for_span(&self, mode: IoMode, file: u32, src: u64, end: u64) -> Option<&File> {
        let h = self.handles.get(file as usize)?.as_ref()?;
        if mode == IoMode::Direct {
            return Some(h);
        }
        (self.is_cached(file, src, end) == Some(false)).then_some(h)
    }

    /// Whether at least half of the bytes `[src, end)` lie in residency chunks found cached,
    /// each chunk weighed by its overlap with the span (`None`: unknown).
    pub(super) fn is_cached(&self, file: u32, src: u64, end: u64) -> Option<bool> {
        let flags = self.cached.get(file as usize)?.as_ref()?;
        let end = end.max(src + 1);
        let (a, b) = (
            (src / RESIDENCY_CHUNK) as usize,
            end.div_ceil(RESIDENCY_CHUNK) as usize,
        );
        let span = flags.get(a..b.min(flags.len()))?;
        let (mut cached, mut all) = (0u64, 0u64);
        for (i, &c) in span.iter().enumerate() {
            let chunk = (a + i) as u64 * RESIDENCY_CHUNK;
            let overlap = end.min(chunk + RESIDENCY_CHUNK) - src.max(chunk);
            all += overlap;
            if c {
                cached += overlap;
            }
        }
        (all > 0).then_some(cached * 2 >= all)
    }

    /// Whether most of the bytes will be read directly from storage: under `Direct` always,
    /// under `Auto` when fewer than half the pages of the files with a direct handle are
    /// cached (files that fit in the page cache have none: they are read buffered).
    pub(super) fn mostly_uncached(&self, mode: IoMode) -> bool {
        if mode == IoMode::Direct {
            return self.handles.iter().any(Option::is_some);
        }
        let (mut cached, mut all) = (0usize, 0usize);
        for (flags, h) in self.cached.iter().zip(&self.handles) {
            if let (Some(flags), Some(_)) = (flags, h) {
                cached += flags.iter().filter(|&&c| c).count();
                all += flags.len();
            }
        }
        cached * 2 < all
    }
}

/// Page-aligned buffers for direct reads, reused across tasks so that their pages are
/// faulted once per load, not once per read. Buffers in use are counted by the staging
/// [`super::budget::Budget`]; the pool keeps at most as many bytes as that budget.
pub(super) struct BouncePool {
    free: Mutex<Vec<memmap2::MmapMut>>,
}

impl BouncePool {
    pub(super) fn new() -> Self {
        BouncePool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of at least `n` bytes (page-aligned: an anonymous mapping); a kept buffer
    /// too small for it is dropped, so the pool holds one buffer per concurrent reader.
    pub(super) fn take(&self, n: u64) -> Result<memmap2::MmapMut> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = free.iter().position(|b| b.len() as u64 >= n) {
            return Ok(free.swap_remove(i));
        }
        let small = free.pop();
        drop(free);
        drop(small);
        let len = usize::try_from(n).map_err(|_| Error::OutOfMemory {
            bytes: n,
            what: "a bounce buffer".into(),
            rank: None,
        })?;
        MmapOptions::new()
            .len(len.max(1))
            .map_anon()
            .map_err(|_| Error::OutOfMemory {
                bytes: n,
                what: "a bounce buffer".into(),
                rank: None,
            })
    }

    /// Keeps `b` for the next reader unless the pool already holds `limit` bytes.
    pub(super) fn give(&self, b: memmap2::MmapMut, limit: u64) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let kept: u64 = free.iter().map(|b| b.len() as u64).sum();
        if kept + b.len() as u64 <= limit {
            free.push(b);
        }
    }
}

/// Reads bytes `[off, off + len)` of `file` (opened with `O_DIRECT`) by reading the
/// enclosing [`DIRECT_ALIGN`]ed range into `buf`, and returns the wanted bytes and the bytes
/// read. A file that ends before `off + len` is a truncation error naming it.
pub(super) fn read_direct<'b>(
    file: &File,
    pf: &PlanFile,
    buf: &'b mut [u8],
    off: u64,
    len: u64,
) -> Result<(&'b [u8], u64)> {
    let start = off / DIRECT_ALIGN * DIRECT_ALIGN;
    let want_end = off
        .checked_add(len)
        .ok_or_else(|| bad_plan(format!("{}: offsets overflow", pf.path.display())))?;
    let n = (want_end.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN - start) as usize;
    let need = (want_end - start) as usize;
    let buf = buf
        .get_mut(..n)
        .ok_or_else(|| Error::load(None, format!("bounce buffer smaller than {n} bytes")))?;
    let mut got = 0;
    while got < need {
        let Some(rest) = buf.get_mut(got..) else {
            break;
        };
        match file.read_at(rest, start + got as u64) {
            Ok(0) => break,
            Ok(k) => {
                got += k;
                // Only the file's last block comes back short; reading on from an
                // unaligned offset would be refused.
                if k as u64 % DIRECT_ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(&pf.path, e)),
        }
    }
    if got < need {
        return Err(truncated(
            pf,
            format_args!(
                "short read at offset {}: file ended {} bytes early",
                start + got as u64,
                need - got
            ),
        ));
    }
    let s = (off - start) as usize;
    Ok((&buf[s..need], got as u64))
}
