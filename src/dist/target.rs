//! Where a shared load writes: the rank's arena, with the spans of some tensors redirected to
//! caller buffers (a trainer's parameters), so that shared bytes land in their final memory
//! without passing through the arena.

use crate::load::{edges, execute_redirected, split_copies, ExecStats, LoadOptions};
use crate::plan::{CopyRun, PlanFile};
use crate::{Error, Result};

/// The arena and the caller buffers that replace spans of it.
pub(crate) struct Target<'a> {
    arena: &'a mut [u8],
    /// `(first arena byte, buffer)`, sorted by start, disjoint, inside the arena.
    redirects: Vec<(u64, &'a mut [u8])>,
}

fn outside(start: u64, len: u64, what: &str) -> Error {
    Error::plan(format!(
        "{what} [{start}, {}) crosses the edge of a caller buffer",
        start.saturating_add(len)
    ))
}

impl<'a> Target<'a> {
    /// `redirects` as `(start, buffer)` in any order; they must lie inside the arena and not
    /// overlap.
    pub(crate) fn new(
        arena: &'a mut [u8],
        mut redirects: Vec<(u64, &'a mut [u8])>,
    ) -> Result<Self> {
        redirects.sort_by_key(|(s, _)| *s);
        let mut end = 0u64;
        for (s, b) in &redirects {
            let e = s.checked_add(b.len() as u64);
            match e {
                Some(e) if *s >= end && e <= arena.len() as u64 => end = e,
                _ => {
                    return Err(Error::plan(format!(
                        "a caller buffer of {} bytes at arena offset {s} overlaps another or \
                         ends past the {}-byte arena",
                        b.len(),
                        arena.len()
                    )))
                }
            }
        }
        Ok(Target { arena, redirects })
    }

    /// The buffer holding `start` (index), if any, and where it ends.
    fn holder(&self, start: u64) -> Option<(usize, u64, u64)> {
        let i = self
            .redirects
            .partition_point(|(s, _)| *s <= start)
            .checked_sub(1)?;
        let (s, b) = self.redirects.get(i)?;
        let e = s + b.len() as u64;
        (start < e).then_some((i, *s, e))
    }

    /// The next buffer start after `start`, or the arena's end.
    fn next_edge(&self, start: u64) -> u64 {
        let i = self.redirects.partition_point(|(s, _)| *s <= start);
        self.redirects
            .get(i)
            .map_or(self.arena.len() as u64, |(s, _)| *s)
    }

    /// The bytes at `[start, start + len)` of the rank's layout: inside one caller buffer or
    /// outside all of them (a whole tensor always is).
    pub(crate) fn span_mut(&mut self, start: u64, len: u64) -> Result<&mut [u8]> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| outside(start, len, "span"))?;
        let range = |a: u64, b: u64| -> Option<std::ops::Range<usize>> {
            Some(usize::try_from(a).ok()?..usize::try_from(b).ok()?)
        };
        let r = match self.holder(start) {
            Some((i, s, e)) if end <= e => {
                let r = range(start - s, end - s).ok_or_else(|| outside(start, len, "span"))?;
                return self
                    .redirects
                    .get_mut(i)
                    .and_then(|(_, b)| b.get_mut(r))
                    .ok_or_else(|| outside(start, len, "span"));
            }
            Some(_) => return Err(outside(start, len, "span")),
            None if end <= self.next_edge(start) || len == 0 => range(start, end),
            None => return Err(outside(start, len, "span")),
        };
        r.and_then(|r| self.arena.get_mut(r))
            .ok_or_else(|| outside(start, len, "span"))
    }

    /// Copies `data` to `[start, start + data.len())`, across the buffers' edges.
    pub(crate) fn write(&mut self, start: u64, data: &[u8]) -> Result<()> {
        let mut at = 0usize;
        while at < data.len() {
            let pos = start + at as u64;
            let stop = match self.holder(pos) {
                Some((_, _, e)) => e,
                None => self.next_edge(pos),
            };
            let n = usize::try_from(stop - pos).map_or(data.len() - at, |n| n.min(data.len() - at));
            if n == 0 {
                return Err(outside(start, data.len() as u64, "write"));
            }
            self.span_mut(pos, n as u64)?
                .copy_from_slice(&data[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Reads copy runs (arena offsets: a rank's own runs, strided ones kept strided so that
    /// the engine sees the rows a run takes and the spans its node reads together, or
    /// single-chunk segments) from `files` into the arena and the caller buffers, each run
    /// cut at the buffers' edges first; returns what the engine did.
    pub(crate) fn read(
        &mut self,
        files: &[PlanFile],
        runs: &[CopyRun],
        opts: &LoadOptions,
    ) -> Result<ExecStats> {
        let edges = edges(self.redirects.iter().map(|(s, b)| (*s, b.len())));
        let cut = split_copies(runs, &edges);
        let redirects = self
            .redirects
            .iter_mut()
            .map(|(s, b)| (*s, &mut **b))
            .collect();
        execute_redirected(files, &cut, self.arena, redirects, opts)
    }

    /// Length of the rank's layout (the arena).
    pub(crate) fn len(&self) -> usize {
        self.arena.len()
    }

    /// Whether `[start, start + len)` lies inside one caller buffer or outside all of them
    /// (then [`Target::span_mut`] gives it as one slice).
    pub(crate) fn is_whole(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        match self.holder(start) {
            Some((_, _, e)) => end <= e,
            None => len == 0 || end <= self.next_edge(start),
        }
    }

    /// The arena and the caller buffers (`(first arena byte, buffer)`, sorted by start), to
    /// cut several disjoint spans at once.
    pub(crate) fn parts_mut(&mut self) -> (&mut [u8], Vec<(u64, &mut [u8])>) {
        let redirects = self
            .redirects
            .iter_mut()
            .map(|(s, b)| (*s, &mut **b))
            .collect();
        (&mut *self.arena, redirects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_writes_follow_the_buffers() {
        let mut arena = vec![0u8; 32];
        let (mut a, mut b) = (vec![0u8; 8], vec![0u8; 4]);
        let mut t = Target::new(&mut arena, vec![(20, &mut b[..]), (4, &mut a[..])]).unwrap();
        t.span_mut(4, 8).unwrap().fill(1); // all of a
        t.span_mut(0, 4).unwrap().fill(2); // arena before a
        assert!(t.span_mut(2, 4).is_err(), "crosses a's start");
        let data: Vec<u8> = (0..24).collect();
        t.write(2, &data).unwrap(); // arena 2..4, a, arena 12..20, b, arena 24..26
        assert_eq!(t.len(), 32);
        drop(t);
        assert_eq!(a, (2..10).collect::<Vec<u8>>());
        assert_eq!(b, (18..22).collect::<Vec<u8>>());
        assert_eq!(&arena[..4], &[2, 2, 0, 1]);
        assert_eq!(&arena[12..20], &(10..18).collect::<Vec<u8>>()[..]);
        assert_eq!(&arena[24..26], &[22, 23]);
        assert!(
            arena[4..12].iter().all(|&x| x == 0),
            "a's span of the arena untouched"
        );
    }

    #[test]
    fn overlapping_or_outside_buffers_are_refused() {
        let mut arena = vec![0u8; 16];
        let (mut a, mut b) = (vec![0u8; 8], vec![0u8; 8]);
        assert!(Target::new(&mut arena, vec![(0, &mut a[..]), (4, &mut b[..])]).is_err());
        let mut arena = vec![0u8; 16];
        assert!(Target::new(&mut arena, vec![(12, &mut a[..])]).is_err());
    }
}
