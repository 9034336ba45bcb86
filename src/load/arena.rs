//! The rank's destination buffer: one page-aligned anonymous mapping.
//!
//! Faulting fresh anonymous pages costs far more than copying into them (the kernel zeroes
//! every page on first touch), so how the arena is prepared matters as much as the copy
//! itself. [`ArenaInit`] selects the strategy; `docs/performance.md` has the measurements
//! behind the default.

use std::ops::{Deref, DerefMut};

use memmap2::{MmapMut, MmapOptions};

use crate::{Error, Result};

/// How a fresh arena's pages are made resident before the copies run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ArenaInit {
    /// Pages fault in during the parallel copy (the faults run on every copy thread).
    Lazy,
    /// `MAP_POPULATE`: the kernel allocates and zeroes every page at map time, in one call.
    Populate,
    /// `madvise(MADV_HUGEPAGE)`: transparent huge pages, one fault per 2 MiB (with THP
    /// `defrag=madvise`, a fault may first compact memory: measured slowest here).
    HugePages,
    /// Lazy pages, made resident by each reader just before it reads into them
    /// (`MADV_POPULATE_WRITE` on the task's destination): one batched call per task instead
    /// of one fault per page inside the copy, on every reader thread.
    #[default]
    Ahead,
}

impl std::str::FromStr for ArenaInit {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lazy" => Ok(ArenaInit::Lazy),
            "populate" => Ok(ArenaInit::Populate),
            "hugepages" => Ok(ArenaInit::HugePages),
            "ahead" => Ok(ArenaInit::Ahead),
            other => Err(Error::invalid_argument(
                "arena",
                format!("unknown value {other:?} (expected ahead, lazy, populate or hugepages)"),
            )),
        }
    }
}

/// A zero-initialised, page-aligned byte buffer owned by one rank.
///
/// It can be handed back to [`crate::load::load_rank_into`] to load again without faulting
/// fresh pages.
pub struct Arena {
    map: Option<MmapMut>,
    len: usize,
    fresh: bool,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .field("fresh", &self.fresh)
            .finish()
    }
}

impl Arena {
    /// Allocates `len` zeroed bytes, prepared as `init` says.
    pub fn new(len: u64, init: ArenaInit) -> Result<Arena> {
        let len = usize::try_from(len).map_err(|_| Error::OutOfMemory {
            bytes: len,
            what: "an arena".into(),
            rank: None,
        })?;
        if len == 0 {
            return Ok(Arena {
                map: None,
                len: 0,
                fresh: false,
            });
        }
        let mut opts = MmapOptions::new();
        opts.len(len);
        if init == ArenaInit::Populate {
            opts.populate();
        }
        let map = opts.map_anon().map_err(|_| Error::OutOfMemory {
            bytes: len as u64,
            what: "an arena".into(),
            rank: None,
        })?;
        if init == ArenaInit::HugePages {
            // Advisory only: a kernel without THP simply ignores it.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Arena {
            map: Some(map),
            len,
            // A populated arena is already resident.
            fresh: init != ArenaInit::Populate,
        })
    }

    /// Reuses this arena for `len` bytes if it is large enough (zeroing nothing: every tensor
    /// byte is rewritten by the plan's runs), else allocates a new one.
    pub fn reuse(self, len: u64, init: ArenaInit) -> Result<Arena> {
        match usize::try_from(len) {
            Ok(n) if n <= self.capacity() => Ok(Arena {
                map: self.map,
                len: n,
                fresh: false,
            }),
            _ => Arena::new(len, init),
        }
    }

    /// Whether the pages were never touched (a new arena, not populated at map time): a load
    /// into it pays one page fault per page, which [`ArenaInit::Ahead`] batches.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// Bytes of the underlying mapping.
    pub fn capacity(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }
}

impl Deref for Arena {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.map {
            Some(m) => m.get(..self.len).unwrap_or(&[]),
            None => &[],
        }
    }
}

impl DerefMut for Arena {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        match &mut self.map {
            Some(m) => m.get_mut(..len).unwrap_or(&mut []),
            None => &mut [],
        }
    }
}
