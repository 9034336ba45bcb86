//! The one strided-range concept: `count` chunks of `len` bytes, chunk `i` at
//! `start + i * stride`, with its end computed in one place ([`Strided::end`]); the one
//! interval-union helper ([`merge_intervals`], [`union_len`]); and the one page size, the
//! operating system's ([`page_size`]), used by both the plan's read accounting and the loader.
//!
//! A copy run is two such patterns (source and destination) sharing `len` and `count`
//! ([`super::CopyRun::src_pattern`], [`super::CopyRun::dst_pattern`]); a zero run is one
//! ([`super::ZeroRun::dst_pattern`]).

use std::sync::OnceLock;

/// `count` chunks of `len` bytes; chunk `i` starts at `start + i * stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Strided {
    /// Offset of the first chunk.
    pub start: u64,
    /// Chunk length in bytes.
    pub len: u64,
    /// Number of chunks.
    pub count: u64,
    /// Distance between chunk starts.
    pub stride: u64,
}

impl Strided {
    /// One contiguous range `[start, start + len)`.
    pub fn contiguous(start: u64, len: u64) -> Strided {
        Strided {
            start,
            len,
            count: 1,
            stride: len,
        }
    }

    /// Whether the pattern covers no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0 || self.count == 0
    }

    /// One past the last byte the pattern touches (`start` when empty), or `None` when the
    /// offsets overflow. The only place a run's end is computed.
    pub fn end(&self) -> Option<u64> {
        if self.is_empty() {
            return Some(self.start);
        }
        (self.count - 1)
            .checked_mul(self.stride)?
            .checked_add(self.start)?
            .checked_add(self.len)
    }

    /// [`Strided::end`] saturating at `u64::MAX` (for accounting on validated runs).
    pub fn end_saturating(&self) -> u64 {
        self.end().unwrap_or(u64::MAX)
    }

    /// Start of chunk `i` (no overflow on a pattern whose [`Strided::end`] is `Some`).
    pub fn chunk_start(&self, i: u64) -> u64 {
        self.start + i * self.stride
    }

    /// Whether the chunks are back to back, so the pattern is one contiguous range.
    pub fn is_contiguous(&self) -> bool {
        self.count <= 1 || self.stride == self.len
    }

    /// The `[start, end)` of every chunk, in order.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let n = if self.len == 0 { 0 } else { self.count };
        (0..n).map(move |i| {
            let s = self.chunk_start(i);
            (s, s + self.len)
        })
    }

    /// Chunks `first..first + n` as a pattern of their own.
    pub fn rows(&self, first: u64, n: u64) -> Strided {
        Strided {
            start: self.chunk_start(first),
            count: n,
            ..*self
        }
    }
}

/// The operating system's page size (`sysconf(_SC_PAGESIZE)`), read once. The plan's
/// `read_bytes` and the loader's mappings both use it, so they agree on 16/64 KiB-page hosts.
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        // A power of two is what every page computation assumes; anything else is a broken
        // sysconf, and the common size is the safe answer.
        match u64::try_from(p) {
            Ok(p) if p.is_power_of_two() => p,
            _ => 4096,
        }
    })
}

/// Sorts half-open intervals and merges those that overlap, abut, or lie closer than `gap`
/// (`gap = 0` gives the exact union). Empty intervals are dropped.
pub fn merge_intervals(v: &mut Vec<(u64, u64)>, gap: u64) {
    v.retain(|&(s, e)| e > s);
    v.sort_unstable();
    let mut out = 0;
    for i in 0..v.len() {
        let (s, e) = v[i];
        if out > 0 && s <= v[out - 1].1.saturating_add(gap) {
            v[out - 1].1 = v[out - 1].1.max(e);
        } else {
            v[out] = (s, e);
            out += 1;
        }
    }
    v.truncate(out);
}

/// Total length of the union of half-open intervals (sorts `v` in place).
pub fn union_len(v: &mut Vec<(u64, u64)>) -> u64 {
    merge_intervals(v, 0);
    v.iter().map(|&(s, e)| e - s).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_of_patterns() {
        let p = Strided {
            start: 10,
            len: 4,
            count: 3,
            stride: 100,
        };
        // Chunks at 10, 110, 210: the last ends at 214.
        assert_eq!(p.end(), Some(214));
        assert_eq!(
            p.chunks().collect::<Vec<_>>(),
            [(10, 14), (110, 114), (210, 214)]
        );
        assert_eq!(Strided::contiguous(7, 0).end(), Some(7));
        let huge = Strided {
            start: 1,
            len: 1,
            count: 3,
            stride: u64::MAX / 2,
        };
        assert_eq!(huge.end(), None);
        assert_eq!(huge.end_saturating(), u64::MAX);
    }

    #[test]
    fn union_and_merge() {
        let mut v = vec![(5, 9), (0, 3), (3, 4), (8, 12), (20, 20), (30, 31)];
        assert_eq!(union_len(&mut v.clone()), 4 + 7 + 1);
        merge_intervals(&mut v, 0);
        assert_eq!(v, [(0, 4), (5, 12), (30, 31)]);
        // A gap of 1 joins (0, 4) and (5, 12) but not (30, 31).
        merge_intervals(&mut v, 1);
        assert_eq!(v, [(0, 12), (30, 31)]);
    }

    #[test]
    fn page_size_is_the_os_page_size() {
        // SAFETY: sysconf has no preconditions.
        let os = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        assert_eq!(page_size() as i64, os as i64);
    }
}
