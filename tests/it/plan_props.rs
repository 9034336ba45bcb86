//! Property tests of the planner's layout → byte-run translation.
//!
//! For random shapes, dtypes (sub-byte included), tp, split dims and fused or vocab-padded
//! layouts, executing the runs against an in-memory "file" rebuilds exactly the tensor that a
//! slow element-by-element reference computes from the layout, every arena byte is written
//! exactly once, and the TP ranks of a split tensor together cover every source element once.

use proptest::prelude::*;
use safeshard::checkpoint::Dtype;
use safeshard::plan::{coalesce_copies, page_size, read_bytes, tensor_runs, CopyRun};
use safeshard::sharding::{Layout, Piece};

/// Reads `bits` bits at bit position `pos` (LSB-first within bytes).
fn get_bits(buf: &[u8], pos: u64, bits: u64) -> u64 {
    let mut v = 0u64;
    for b in 0..bits {
        let p = pos + b;
        let bit = (buf[(p / 8) as usize] >> (p % 8)) & 1;
        v |= (bit as u64) << b;
    }
    v
}

fn set_bits(buf: &mut [u8], pos: u64, bits: u64, v: u64) {
    for b in 0..bits {
        let p = pos + b;
        let byte = &mut buf[(p / 8) as usize];
        let mask = 1u8 << (p % 8);
        if (v >> b) & 1 == 1 {
            *byte |= mask;
        } else {
            *byte &= !mask;
        }
    }
}

fn unravel(mut i: u64, shape: &[u64]) -> Vec<u64> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = i % shape[d];
        i /= shape[d];
    }
    idx
}

fn ravel(idx: &[u64], shape: &[u64]) -> u64 {
    idx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i)
}

/// The slow reference: builds the local tensor element by element from the layout.
/// Returns the bytes and, per local element, the source element it came from (None = zero).
fn reference(
    file: &[u8],
    offset: u64,
    dtype: Dtype,
    src_shape: &[u64],
    layout: &Layout,
) -> (Vec<u8>, Vec<Option<u64>>) {
    let bits = dtype.bits();
    let n: u64 = layout.shape.iter().product();
    let mut out = vec![0u8; (n * bits).div_ceil(8) as usize];
    let mut origin = Vec::with_capacity(n as usize);
    for e in 0..n {
        let idx = unravel(e, &layout.shape);
        let c = layout.concat_dim;
        // Find the piece holding idx[c].
        let mut at = 0;
        let mut src = None;
        for p in &layout.pieces {
            match p {
                Piece::Slice { ranges } => {
                    let ext = ranges[c].1 - ranges[c].0;
                    if idx[c] < at + ext {
                        let sidx: Vec<u64> = idx
                            .iter()
                            .enumerate()
                            .map(|(d, &i)| {
                                if d == c {
                                    ranges[d].0 + (i - at)
                                } else {
                                    ranges[d].0 + i
                                }
                            })
                            .collect();
                        src = Some(ravel(&sidx, src_shape));
                        break;
                    }
                    at += ext;
                }
                Piece::Zeros { extent } => {
                    if idx[c] < at + extent {
                        break;
                    }
                    at += extent;
                }
            }
        }
        let v = match src {
            Some(s) => get_bits(file, offset * 8 + s * bits, bits),
            None => 0,
        };
        set_bits(&mut out, e * bits, bits, v);
        origin.push(src);
    }
    (out, origin)
}

/// Executes runs into an arena; returns it and how many times each byte was written.
fn execute(
    file: &[u8],
    bytes: u64,
    copies: &[CopyRun],
    zeros: &[safeshard::plan::ZeroRun],
) -> (Vec<u8>, Vec<u32>) {
    let mut arena = vec![0xA5u8; bytes as usize];
    let mut writes = vec![0u32; bytes as usize];
    for r in copies {
        for i in 0..r.count {
            let s = (r.src + i * r.src_stride) as usize;
            let d = (r.dst + i * r.dst_stride) as usize;
            let l = r.len as usize;
            arena[d..d + l].copy_from_slice(&file[s..s + l]);
            for w in &mut writes[d..d + l] {
                *w += 1;
            }
        }
    }
    for z in zeros {
        for i in 0..z.count {
            let d = (z.dst + i * z.dst_stride) as usize;
            let l = z.len as usize;
            arena[d..d + l].fill(0);
            for w in &mut writes[d..d + l] {
                *w += 1;
            }
        }
    }
    (arena, writes)
}

/// A test case: a source tensor and the layouts of all tp ranks.
#[derive(Debug, Clone)]
struct Case {
    dtype: Dtype,
    shape: Vec<u64>,
    tp: u64,
    layouts: Vec<Layout>,
    /// Whether the layouts partition the tensor (every element on exactly one rank).
    partition: bool,
}

const DTYPES: [Dtype; 6] = [
    Dtype::F4,
    Dtype::F6_E2M3,
    Dtype::U8,
    Dtype::BF16,
    Dtype::F32,
    Dtype::F64,
];

/// Per-rank ranges `[r*n/tp, (r+1)*n/tp)` of the parts of dim `c`, concatenated (fused layout).
fn fused_layouts(shape: &[u64], c: usize, parts: &[u64], tp: u64) -> Vec<Layout> {
    (0..tp)
        .map(|r| {
            let mut pieces = Vec::new();
            let mut base = 0;
            let mut local_c = 0;
            for &p in parts {
                let per = p / tp;
                let mut ranges: Vec<(u64, u64)> = shape.iter().map(|&n| (0, n)).collect();
                ranges[c] = (base + r * per, base + (r + 1) * per);
                pieces.push(Piece::Slice { ranges });
                base += p;
                local_c += per;
            }
            let mut local = shape.to_vec();
            local[c] = local_c;
            Layout {
                shape: local,
                concat_dim: c,
                pieces,
            }
        })
        .collect()
}

/// vLLM vocab padding (on dim `c`, 0 for real vocab): padded to a multiple of `pad`, indices
/// past the end are zeros.
fn padded_layouts(shape: &[u64], c: usize, pad: u64, tp: u64) -> Vec<Layout> {
    let v = shape[c];
    let vp = v.div_ceil(pad) * pad;
    let per = vp / tp;
    (0..tp)
        .map(|r| {
            let b = (r * per).min(v);
            let e = ((r + 1) * per).min(v);
            let mut pieces = Vec::new();
            if e > b {
                let mut ranges: Vec<(u64, u64)> = shape.iter().map(|&n| (0, n)).collect();
                ranges[c] = (b, e);
                pieces.push(Piece::Slice { ranges });
            }
            if per > e - b {
                pieces.push(Piece::Zeros {
                    extent: per - (e - b),
                });
            }
            let mut local = shape.to_vec();
            local[c] = per;
            Layout {
                shape: local,
                concat_dim: c,
                pieces,
            }
        })
        .collect()
}

fn case() -> impl Strategy<Value = Case> {
    (
        0usize..DTYPES.len(),
        1usize..=4,
        prop::sample::select(vec![1u64, 2, 3, 4]),
        0usize..4,
        1usize..=3,
        0u8..3,
        prop::collection::vec(1u64..=4, 4),
    )
        .prop_map(|(di, nd, tp, dim, nparts, mode, mults)| {
            let dtype = DTYPES[di];
            let c = dim % nd;
            // Sub-byte dtypes: keep the last dim a multiple of 8 elements per piece and rank so
            // every chunk is whole bytes.
            let sub = dtype.bits() < 8;
            let mut shape: Vec<u64> = mults[..nd].to_vec();
            let last = nd - 1;
            if sub {
                shape[last] *= 8;
            }
            match mode {
                0 => {
                    // Plain split of dim c.
                    shape[c] *= tp;
                    let layouts = fused_layouts(&shape, c, &[shape[c]], tp);
                    Case {
                        dtype,
                        shape,
                        tp,
                        layouts,
                        partition: true,
                    }
                }
                1 => {
                    // Fused parts of different sizes, each split (merged column / GPT-2 c_attn).
                    let parts: Vec<u64> = (0..nparts as u64)
                        .map(|j| tp * (j + 1) * if sub && c == last { 8 } else { 1 })
                        .collect();
                    shape[c] = parts.iter().sum();
                    let layouts = fused_layouts(&shape, c, &parts, tp);
                    Case {
                        dtype,
                        shape,
                        tp,
                        layouts,
                        partition: true,
                    }
                }
                _ => {
                    // Vocab-style zero padding along dim c.
                    // Sub-byte vectors pad in units of 8 elements to stay on byte boundaries.
                    let unit = if sub && c == last { 8 } else { 1 };
                    shape[c] = (mults[c] * 5 + 1) * unit;
                    let layouts = padded_layouts(&shape, c, 4 * tp * unit, tp);
                    Case {
                        dtype,
                        shape,
                        tp,
                        layouts,
                        partition: true,
                    }
                }
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn runs_rebuild_the_layout(case in case(), offset in 0u64..300, seed in any::<u64>()) {
        let bits = case.dtype.bits();
        let elems: u64 = case.shape.iter().product();
        let tbytes = (elems * bits).div_ceil(8);
        // Source tensor starts on a byte boundary, at `offset` in the file.
        let mut file = vec![0u8; (offset + tbytes + 64) as usize];
        let mut x = seed | 1;
        for b in file.iter_mut() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            *b = x as u8;
        }
        let mut seen = vec![0u32; elems as usize];
        for layout in &case.layouts {
            let runs = tensor_runs("t", case.dtype, &case.shape, 0, offset, layout)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let (expected, origin) = reference(&file, offset, case.dtype, &case.shape, layout);
            prop_assert_eq!(runs.bytes, expected.len() as u64);
            let mut copies = runs.copies.clone();
            copies.sort_by_key(|c| (c.file, c.src));
            coalesce_copies(&mut copies);
            let (arena, writes) = execute(&file, runs.bytes, &copies, &runs.zeros);
            prop_assert_eq!(&arena, &expected);
            prop_assert!(writes.iter().all(|&w| w == 1), "every byte written exactly once: {:?}", writes);
            // Every copy stays inside the source tensor.
            for c in &copies {
                prop_assert!(c.src >= offset && c.src_pattern().end() <= Some(offset + tbytes));
            }
            // Page-union read bytes: at least the bytes copied, at most the pages of the tensor.
            let rb = read_bytes(&copies);
            let copied: u64 = copies.iter().map(|c| c.len * c.count).sum();
            prop_assert!(rb >= copied);
            let page = page_size();
            prop_assert!(rb <= ((offset + tbytes).div_ceil(page) - offset / page) * page);
            for s in origin.into_iter().flatten() {
                seen[s as usize] += 1;
            }
        }
        if case.partition {
            prop_assert!(seen.iter().all(|&n| n == 1), "the tp={} ranks cover every element once: {:?}", case.tp, seen);
        }
    }
}

/// Brute force: every chunk's pages, per file, collected in a set.
fn page_union_bytes(runs: &[CopyRun]) -> u64 {
    let page = page_size();
    let mut pages = std::collections::BTreeSet::new();
    for r in runs {
        for i in 0..r.count {
            let s = r.src + i * r.src_stride;
            for p in s / page..(s + r.len).div_ceil(page) {
                pages.insert((r.file, p));
            }
        }
    }
    pages.len() as u64 * page
}

#[test]
fn read_bytes_of_strided_runs_matches_brute_force() {
    // Interleaving runs (fused parts split on an inner dim) and shared boundary pages.
    let runs = vec![
        CopyRun {
            file: 0,
            src: 0,
            dst: 0,
            len: 256,
            count: 40,
            src_stride: 768,
            dst_stride: 256,
        },
        CopyRun {
            file: 0,
            src: 256,
            dst: 10240,
            len: 256,
            count: 40,
            src_stride: 768,
            dst_stride: 256,
        },
        CopyRun {
            file: 0,
            src: 40 * 768 + 10,
            dst: 20480,
            len: 5000,
            count: 1,
            src_stride: 5000,
            dst_stride: 5000,
        },
        CopyRun {
            file: 1,
            src: 100,
            dst: 30000,
            len: 10,
            count: 3,
            src_stride: 10000,
            dst_stride: 10,
        },
    ];
    assert_eq!(read_bytes(&runs), page_union_bytes(&runs));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Page-union read bytes of arbitrary sorted runs (overlapping, interleaving, sharing
    /// boundary pages, several files) equal a brute-force page set.
    #[test]
    fn read_bytes_is_the_page_union(
        raw in prop::collection::vec((0u32..2, 0u64..40_000, 1u64..6000, 1u64..40, 0u64..9000), 0..12)
    ) {
        let mut runs: Vec<CopyRun> = raw
            .into_iter()
            .map(|(file, src, len, count, gap)| CopyRun {
                file,
                src,
                dst: 0,
                len,
                count,
                src_stride: if count == 1 { len } else { len + gap },
                dst_stride: len,
            })
            .collect();
        runs.sort_by_key(|r| (r.file, r.src));
        prop_assert_eq!(read_bytes(&runs), page_union_bytes(&runs));
    }
}
