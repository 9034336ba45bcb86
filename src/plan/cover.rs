//! The file spans that ranks sharing one page cache (one node) read together.
//!
//! An inner-dim split gives each rank a strided run: a few KiB of every row. Read alone, a
//! rank asks for exactly its pages, row by row (one small request per row run), which is
//! what one rank should do. But when the node's ranks together take every byte of those rows
//! (tensor parallelism splits `o_proj`/`down_proj` by columns across the node), the node
//! reads the whole span anyway, and its pages come from storage once whoever asks first
//! (the ranks share the page cache). Then each rank does better to ask for the whole span in
//! large sequential requests: the kernel skips pages that another rank already asked for.
//! [`NodeSpans`] says where that holds.

use super::{merge_intervals, CopyRun, Plan};

/// Per plan file, the sorted, disjoint byte spans that the strided runs of a set of ranks
/// (those sharing one page cache) tile completely: every byte of every row of the span is
/// read by one of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSpans {
    by_file: Vec<Vec<(u64, u64)>>,
    /// This rank's place among the node's ranks, and their number: each asks for a span
    /// in as many parts, its own part first ([`NodeSpans::parts`]).
    place: (usize, usize),
}

impl NodeSpans {
    /// The spans the strided runs of `ranks` (ranks of `plan`; others are ignored) tile,
    /// seen by rank `me` (one of them).
    ///
    /// Runs are grouped by (file, row stride, row count); within a group, runs whose first
    /// rows start within one stride of each other cut the same rows (the columns of one
    /// tensor, or of one block of its rows). Such a cluster tiles its rows when the byte
    /// ranges its runs take from a row cover the row, and then its span is every row, end
    /// to end. Linear in the runs of `ranks` (after sorting), whatever the row count.
    pub fn of(plan: &Plan, ranks: &[usize], me: usize) -> NodeSpans {
        let copies = ranks
            .iter()
            .filter_map(|&r| plan.ranks.get(r))
            .map(|r| &r.copies[..]);
        let place = ranks.iter().position(|&r| r == me).unwrap_or(0);
        NodeSpans {
            place: (place, ranks.len().max(1)),
            ..NodeSpans::of_runs(plan.files.len(), copies)
        }
    }

    /// `[start, end)` cut into as many page-aligned parts as the node has ranks, in the
    /// order this rank asks for them: its own part first, then the next ones, wrapping.
    /// The ranks ask for the same spans at about the same time; starting apart, each first
    /// asks for pages no other rank has asked for (two ranks asking for one range at once
    /// would cut each other's requests into small ones), and later finds the others' parts
    /// asked for already (the kernel skips them) unless a rank lags.
    pub fn parts(&self, start: u64, end: u64, page: u64) -> impl Iterator<Item = (u64, u64)> {
        let (me, n) = (self.place.0 as u64, self.place.1 as u64);
        let pages = (end - start).div_ceil(page);
        let cut = move |i: u64| (start + (pages * i / n) * page).min(end);
        (0..n)
            .map(move |k| (me + k) % n)
            .map(move |i| (cut(i), cut(i + 1)))
            .filter(|(s, e)| e > s)
    }

    /// [`NodeSpans::of`] for the copy runs of each rank, reading `files` plan files.
    pub(crate) fn of_runs<'a>(
        files: usize,
        ranks: impl Iterator<Item = &'a [CopyRun]>,
    ) -> NodeSpans {
        let mut runs: Vec<(u32, u64, u64, u64, u64)> = Vec::new();
        for c in ranks.flatten() {
            if is_strided(c) {
                runs.push((c.file, c.src_stride, c.count, c.src, c.len));
            }
        }
        runs.sort_unstable();
        runs.dedup();
        let mut by_file: Vec<Vec<(u64, u64)>> = vec![Vec::new(); files];
        let mut i = 0;
        while i < runs.len() {
            let (file, stride, count, base, _) = runs[i];
            let mut j = i;
            let mut cols: Vec<(u64, u64)> = Vec::new();
            while let Some(&(f, s, n, src, len)) = runs.get(j) {
                if (f, s, n) != (file, stride, count) || src - base >= stride {
                    break;
                }
                cols.push((src - base, src - base + len));
                j += 1;
            }
            i = j;
            merge_intervals(&mut cols, 0);
            // A run whose row part crosses into the next row is not a column split: left out.
            let tiles = matches!(cols[..], [(0, end)] if end == stride);
            let end = stride
                .checked_mul(count)
                .and_then(|rows| base.checked_add(rows));
            if let (true, Some(end), Some(spans)) = (tiles, end, by_file.get_mut(file as usize)) {
                spans.push((base, end));
            }
        }
        for spans in &mut by_file {
            merge_intervals(spans, 0);
        }
        NodeSpans {
            by_file,
            place: (0, 1),
        }
    }

    /// Whether the node reads every byte of `[start, end)` of plan file `file`.
    pub fn covers(&self, file: u32, start: u64, end: u64) -> bool {
        let Some(spans) = self.by_file.get(file as usize) else {
            return false;
        };
        // The last span starting at or before `start`.
        let i = spans.partition_point(|&(s, _)| s <= start);
        i > 0 && spans[i - 1].1 >= end
    }

    /// Whether no span was found (every run is read on its own).
    pub fn is_empty(&self) -> bool {
        self.by_file.iter().all(Vec::is_empty)
    }
}

/// A run of several rows that leaves gaps between them (an inner-dim split).
fn is_strided(c: &CopyRun) -> bool {
    c.count > 1 && c.len > 0 && c.src_stride > c.len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranks' runs, over two files.
    struct Runs(Vec<Vec<CopyRun>>);

    fn plan_of(ranks: Vec<Vec<CopyRun>>) -> Runs {
        Runs(ranks)
    }

    impl NodeSpans {
        fn of_test(runs: &Runs, ranks: &[usize]) -> NodeSpans {
            let copies = ranks.iter().filter_map(|&r| runs.0.get(r)).map(|c| &c[..]);
            NodeSpans::of_runs(2, copies)
        }
    }

    /// `count` rows of `stride` bytes from `base`, taking `len` bytes at `col` of each.
    fn cols(file: u32, base: u64, stride: u64, count: u64, col: u64, len: u64) -> CopyRun {
        CopyRun {
            file,
            src: base + col,
            dst: 0,
            len,
            count,
            src_stride: stride,
            dst_stride: len,
        }
    }

    #[test]
    fn column_splits_that_cover_the_rows_make_one_span() {
        // Four ranks, a quarter of each 8 KiB row of a 100-row tensor at 4096.
        let plan = plan_of(
            (0..4)
                .map(|r| vec![cols(1, 4096, 8192, 100, r * 2048, 2048)])
                .collect(),
        );
        let all = NodeSpans::of_test(&plan, &[0, 1, 2, 3]);
        let span = (4096, 4096 + 100 * 8192);
        assert!(all.covers(1, span.0, span.1));
        assert!(all.covers(1, span.0 + 10_000, span.0 + 20_000));
        assert!(!all.covers(1, span.0 - 1, span.1), "starts before the span");
        assert!(!all.covers(1, span.0, span.1 + 1), "ends after it");
        assert!(!all.covers(0, span.0, span.1), "another file");
        // Three of the four ranks leave a quarter of every row unread.
        let some = NodeSpans::of_test(&plan, &[0, 1, 3]);
        assert!(some.is_empty());
        assert!(!some.covers(1, span.0, span.0 + 8192));
        // A rank alone covers nothing; unknown ranks are ignored.
        assert!(NodeSpans::of_test(&plan, &[2, 9]).is_empty());
    }

    #[test]
    fn row_blocks_and_tensors_are_told_apart() {
        // 2-D: rows 0..50 and 50..100 of one tensor, each split by columns between two
        // ranks; a second tensor with the same shape right after it, split by only one.
        let (stride, rows) = (8192, 50);
        let block = |b: u64| 4096 + b * rows * stride;
        let second = block(2);
        let plan = plan_of(vec![
            vec![
                cols(0, block(0), stride, rows, 0, 4096),
                cols(0, second, stride, rows, 0, 4096),
            ],
            vec![cols(0, block(0), stride, rows, 4096, 4096)],
            vec![cols(0, block(1), stride, rows, 0, 4096)],
            vec![cols(0, block(1), stride, rows, 4096, 4096)],
        ]);
        let spans = NodeSpans::of_test(&plan, &[0, 1, 2, 3]);
        assert!(
            spans.covers(0, block(0), block(2)),
            "both row blocks, joined"
        );
        assert!(!spans.covers(0, second, second + stride));
        // Without rank 3 the second row block is not covered.
        let three = NodeSpans::of_test(&plan, &[0, 1, 2]);
        assert!(three.covers(0, block(0), block(1)));
        assert!(!three.covers(0, block(1), block(1) + stride));
    }

    #[test]
    fn each_rank_asks_for_its_own_part_first_and_all_parts_once() {
        let page = 4096;
        for n in 1..6usize {
            for me in 0..n {
                let spans = NodeSpans {
                    place: (me, n),
                    ..NodeSpans::default()
                };
                // 10 pages and a bit: parts are whole pages, the last ends at the end.
                let (s, e) = (8192, 8192 + 10 * page + 100);
                let parts: Vec<_> = spans.parts(s, e, page).collect();
                let mut sorted = parts.clone();
                sorted.sort_unstable();
                assert_eq!(sorted.first().map(|p| p.0), Some(s), "{n} {me}");
                assert!(sorted.windows(2).all(|w| w[0].1 == w[1].0), "{sorted:?}");
                assert_eq!(sorted.last().map(|p| p.1), Some(e));
                assert!(sorted.iter().all(|&(a, _)| (a - s) % page == 0));
                // Its own part first: rank `me` of `n` starts at page 11 * me / n.
                assert_eq!(
                    parts[0].0,
                    s + (11 * me as u64 / n as u64) * page,
                    "{n} {me}"
                );
            }
        }
    }

    #[test]
    fn contiguous_runs_and_runs_crossing_rows_are_not_spans() {
        let whole = CopyRun::contiguous(0, 0, 0, 1 << 20);
        // Row parts that run past the row's end (offset 6 KiB, 4 KiB long in 8 KiB rows).
        let plan = plan_of(vec![
            vec![whole],
            vec![cols(1, 0, 8192, 10, 0, 6144)],
            vec![cols(1, 0, 8192, 10, 6144, 4096)],
        ]);
        assert!(NodeSpans::of_test(&plan, &[0, 1, 2]).is_empty());
    }
}
