//! Engine tests on hand-built plans; the expected arena is computed by a naive loop over the
//! runs' definition, independent of the engine's task splitting, windows and staging.

use std::io::Write;
use std::path::Path;

use super::*;
use crate::checkpoint::{Dtype, FileIdentity};
use crate::plan::{CopyRun, PlanFile, RankPlan, TensorPlan, ZeroRun};
use crate::sharding::{Layout, Piece, TensorKind};
use crate::topology::Topology;

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> PlanFile {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let identity = FileIdentity::of(&std::fs::File::open(&path).unwrap(), &path).unwrap();
    PlanFile {
        name: name.into(),
        path,
        identity,
    }
}

fn naive(files: &[Vec<u8>], copies: &[CopyRun], zeros: &[ZeroRun], len: usize) -> Vec<u8> {
    let mut out = vec![0xAAu8; len];
    for r in copies {
        for i in 0..r.count {
            let s = (r.src + i * r.src_stride) as usize;
            let d = (r.dst + i * r.dst_stride) as usize;
            let l = r.len as usize;
            out[d..d + l].copy_from_slice(&files[r.file as usize][s..s + l]);
        }
    }
    for z in zeros {
        for i in 0..z.count {
            let d = (z.dst + i * z.dst_stride) as usize;
            out[d..d + z.len as usize].fill(0);
        }
    }
    out
}

fn tensor(name: &str, offset: u64, bytes: u64) -> TensorPlan {
    TensorPlan {
        name: name.into(),
        dtype: Dtype::U8,
        shape: vec![bytes],
        offset,
        bytes,
        source: 0,
        kind: TensorKind::Other,
        replicated: false,
    }
}

/// A plan over two files: a long contiguous run (split into several tasks), a strided
/// "column" slice with small gaps, one with wide gaps, two interleaved strided runs (fused
/// parts split on an inner dim) and zero padding rows.
fn sample(dir: &Path) -> (Plan, Vec<Vec<u8>>) {
    let a = pattern(20 << 20, 1);
    let b = pattern(5 << 20, 2);
    let files = vec![
        write_file(dir, "a.safetensors", &a),
        write_file(dir, "b.safetensors", &b),
    ];
    let big = (17 << 20) + 12345;
    let mut copies = vec![CopyRun {
        file: 0,
        src: 1001,
        dst: 0,
        len: big,
        count: 1,
        src_stride: big,
        dst_stride: big,
    }];
    let mut dst = big;
    // 300 rows of 1000 bytes out of rows of 4000 (tp=4 column split).
    copies.push(CopyRun {
        file: 1,
        src: 7,
        dst,
        len: 1000,
        count: 300,
        src_stride: 4000,
        dst_stride: 1000,
    });
    dst += 300 * 1000;
    // Wide gaps: 10 rows of 100 bytes, 200 KiB apart.
    copies.push(CopyRun {
        file: 1,
        src: 2 << 20,
        dst,
        len: 100,
        count: 10,
        src_stride: 200 << 10,
        dst_stride: 100,
    });
    dst += 1000;
    // Interleaved: rows of 96 bytes made of 64 bytes from one place and 32 from another.
    copies.push(CopyRun {
        file: 0,
        src: 18 << 20,
        dst,
        len: 64,
        count: 50,
        src_stride: 256,
        dst_stride: 96,
    });
    copies.push(CopyRun {
        file: 0,
        src: (19 << 20) + 3,
        dst: dst + 64,
        len: 32,
        count: 50,
        src_stride: 128,
        dst_stride: 96,
    });
    dst += 50 * 96;
    let zeros = vec![ZeroRun {
        dst,
        len: 4096,
        count: 3,
        dst_stride: 4096,
    }];
    dst += 3 * 4096;
    let tensors = vec![
        tensor("big", 0, big),
        tensor("cols", big, 300_000),
        tensor("rest", big + 300_000, dst - big - 300_000),
    ];
    let topo = Topology::default();
    let plan = Plan {
        topology: topo.clone(),
        spec: "test".into(),
        files,
        ranks: vec![RankPlan {
            coords: topo.coords(0),
            tensors,
            copies,
            zeros,
            bytes: dst,
            read_bytes: 0,
            arena_bytes: dst,
            staging_bytes: 0,
        }],
    };
    (plan, vec![a, b])
}

fn arena_of(rt: &RankTensors) -> Vec<u8> {
    let mut out = vec![0u8; rt.stats().bytes as usize];
    for t in rt.iter() {
        let p = rt.plans().iter().find(|p| p.name == t.name).unwrap();
        out[p.offset as usize..(p.offset + p.bytes) as usize].copy_from_slice(t.data);
    }
    out
}

#[test]
fn both_engines_match_the_naive_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let rp = &plan.ranks[0];
    let want = naive(&data, &rp.copies, &rp.zeros, rp.bytes as usize);
    for (io, pread_contiguous) in [
        (IoMode::Auto, false),
        (IoMode::Mmap, false),
        (IoMode::Mmap, true),
        (IoMode::Pread, false),
        (IoMode::Direct, false),
    ] {
        for arena in [
            ArenaInit::Ahead,
            ArenaInit::Lazy,
            ArenaInit::Populate,
            ArenaInit::HugePages,
        ] {
            let opts = LoadOptions {
                io,
                arena,
                pread_contiguous,
                ..LoadOptions::default()
            };
            let rt = load_rank(&plan, 0, &opts).unwrap();
            assert_eq!(rt.len(), 3);
            assert!(arena_of(&rt) == want, "{io:?} {arena:?}");
            assert!(rt.stats().read_bytes >= rp.copies.iter().map(|r| r.len * r.count).sum());
        }
    }
}

/// Fraction of `path`'s pages in the page cache (`mincore` over a mapping), computed here
/// independently of the engine's own probe.
fn cached_fraction(path: &Path) -> f64 {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let page = 4096;
    let mut v = vec![0u8; len.div_ceil(page)];
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, v.as_mut_ptr()) };
    assert_eq!(rc, 0);
    v.iter().filter(|&&b| b & 1 == 1).count() as f64 / v.len() as f64
}

/// Writes the files to disk and drops them from the page cache, retrying while writeback
/// finishes; `Err` says why the kernel kept them (a tmpfs `TMPDIR`, for one, cannot evict).
fn drop_from_cache(plan: &Plan) -> Result<(), String> {
    use std::os::unix::io::AsRawFd;
    const TRIES: u32 = 20;
    let mut kept = 0.0;
    for _ in 0..TRIES {
        kept = 0.0f64;
        for pf in &plan.files {
            let f = std::fs::File::open(&pf.path).unwrap();
            f.sync_all().unwrap();
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            kept = kept.max(cached_fraction(&pf.path));
        }
        if kept < 0.05 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let dir = plan.files[0].path.parent().unwrap();
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let tmpfs = unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0
        && st.f_type as u64 == libc::TMPFS_MAGIC as u64;
    Err(format!(
        "{:.0}% of a file in {} stayed in the page cache after {TRIES} sync + \
         POSIX_FADV_DONTNEED rounds{}",
        kept * 100.0,
        dir.display(),
        if tmpfs {
            " (tmpfs: its pages cannot be evicted; point TMPDIR at a disk)"
        } else {
            ""
        }
    ))
}

/// Reports a test that checked nothing, with the reason, on the process's stderr itself:
/// the test harness swallows `eprintln!` from a passing test, not a direct write.
fn report_skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

#[test]
fn auto_reads_uncached_files_directly_unless_they_fit_the_page_cache_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let rp = &plan.ranks[0];
    let want = naive(&data, &rp.copies, &rp.zeros, rp.bytes as usize);
    if let Err(why) = drop_from_cache(&plan) {
        report_skip(
            "load::tests::auto_reads_uncached_files_directly_unless_they_fit_the_page_cache_limit",
            &why,
        );
        return;
    }
    // Files larger than the limit: direct reads bypass the page cache; a buffered read
    // would have left the whole 17 MiB run of a.safetensors (of 20 MiB) cached.
    let too_big = LoadOptions {
        page_cache_limit: Some(1 << 20),
        ..LoadOptions::default()
    };
    assert!(arena_of(&load_rank(&plan, 0, &too_big).unwrap()) == want);
    let cached = cached_fraction(&plan.files[0].path);
    assert!(cached < 0.25, "{cached}");
    // A limit of 0: uncached contiguous spans are always read directly.
    let always_direct = LoadOptions {
        page_cache_limit: Some(0),
        ..LoadOptions::default()
    };
    let rt = load_rank(&plan, 0, &always_direct).unwrap();
    assert!(arena_of(&rt) == want);
    assert!(
        rt.stats().paths.direct >= 16 << 20,
        "{:?}",
        rt.stats().paths
    );
    let cached = cached_fraction(&plan.files[0].path);
    assert!(cached < 0.25, "{cached}");
    // The default limit (half of MemAvailable, far above these 20 MiB): read through the
    // page cache, pages asked for ahead, and they stay there for the next load.
    let rt = load_rank(&plan, 0, &LoadOptions::default()).unwrap();
    assert!(arena_of(&rt) == want);
    let paths = rt.stats().paths;
    assert!(
        paths.direct == 0 && paths.prefetched >= 16 << 20,
        "{paths:?}"
    );
    assert!(cached_fraction(&plan.files[0].path) > 0.8);
    // An explicit limit the files fit in does the same.
    drop_from_cache(&plan).unwrap();
    let fits = LoadOptions {
        page_cache_limit: Some(1 << 30),
        ..LoadOptions::default()
    };
    assert!(arena_of(&load_rank(&plan, 0, &fits).unwrap()) == want);
    assert!(cached_fraction(&plan.files[0].path) > 0.8);
    // Once cached, the same load reads them from the cache (and leaves them there).
    let rt = load_rank(&plan, 0, &too_big).unwrap();
    assert!(arena_of(&rt) == want);
    assert_eq!(rt.stats().paths.direct, 0, "{:?}", rt.stats().paths);
    assert!(cached_fraction(&plan.files[0].path) > 0.8);
    let forced = LoadOptions {
        io: IoMode::Pread,
        ..LoadOptions::default()
    };
    assert!(arena_of(&load_rank(&plan, 0, &forced).unwrap()) == want);
}

/// Per page of `path`, whether the page cache holds it (`mincore`).
fn cached_pages(path: &Path) -> Vec<bool> {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let mut v = vec![0u8; len.div_ceil(4096)];
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, v.as_mut_ptr()) };
    assert_eq!(rc, 0);
    v.iter().map(|&b| b & 1 == 1).collect()
}

#[test]
fn a_cold_inner_dim_split_reads_only_the_pages_it_needs() {
    // An o_proj-like column slice: 1024 rows of 16 KiB, of which the rank keeps bytes
    // [6 KiB, 8 KiB) (one page in four), then a contiguous run further on.
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(24 << 20, 9);
    let files = vec![write_file(dir.path(), "w.safetensors", &data)];
    let (row, keep, rows) = (16u64 << 10, 2u64 << 10, 1024u64);
    let copies = vec![
        CopyRun {
            file: 0,
            src: 6 << 10,
            dst: 0,
            len: keep,
            count: rows,
            src_stride: row,
            dst_stride: keep,
        },
        CopyRun {
            file: 0,
            src: (18 << 20) + 100,
            dst: rows * keep,
            len: 3 << 20,
            count: 1,
            src_stride: 3 << 20,
            dst_stride: 3 << 20,
        },
    ];
    let len = rows * keep + (3 << 20);
    let topo = Topology::default();
    let plan = Plan {
        topology: topo.clone(),
        spec: "test".into(),
        files,
        ranks: vec![RankPlan {
            coords: topo.coords(0),
            tensors: vec![tensor("w", 0, len)],
            copies: copies.clone(),
            zeros: vec![],
            bytes: len,
            read_bytes: 0,
            arena_bytes: len,
            staging_bytes: 0,
        }],
    };
    // The pages the strided run touches, counted here chunk by chunk (the contiguous run is
    // read with direct I/O: none of its pages should be cached).
    let mut want_pages = vec![false; (data.len() as u64).div_ceil(4096) as usize];
    for r in &copies[..1] {
        for k in 0..r.count {
            let s = r.src + k * r.src_stride;
            for p in s / 4096..(s + r.len).div_ceil(4096) {
                want_pages[p as usize] = true;
            }
        }
    }
    let want = naive(&[data], &copies, &[], len as usize);
    if let Err(why) = drop_from_cache(&plan) {
        report_skip(
            "load::tests::a_cold_inner_dim_split_reads_only_the_pages_it_needs",
            &why,
        );
        return;
    }
    // Files taken not to fit the page cache, so the contiguous run goes direct.
    let never_fits = LoadOptions {
        page_cache_limit: Some(0),
        ..LoadOptions::default()
    };
    let rt = load_rank(&plan, 0, &never_fits).unwrap();
    assert!(arena_of(&rt) == want);
    let paths = rt.stats().paths;
    assert_eq!(paths.prefetched, rows * keep, "{paths:?}");
    assert_eq!(paths.direct, 3 << 20, "{paths:?}");
    let cached = cached_pages(&plan.files[0].path);
    let union = want_pages.iter().filter(|&&w| w).count();
    let missing = want_pages
        .iter()
        .zip(&cached)
        .filter(|(&w, &c)| w && !c)
        .count();
    let extra = want_pages
        .iter()
        .zip(&cached)
        .filter(|(&w, &c)| !w && c)
        .count();
    // Whole row spans (the old way) would have cached four times the union, plus the
    // kernel's readahead past each span (and the contiguous run read buffered).
    assert!(missing == 0, "{missing} of {union} needed pages not cached");
    assert!(
        extra * 20 <= union,
        "{extra} pages read outside a union of {union}"
    );
}

#[test]
fn a_fresh_arena_is_filled_ahead_and_a_reused_one_is_not_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let rp = &plan.ranks[0];
    let want = naive(&data, &rp.copies, &rp.zeros, rp.bytes as usize);
    for threads in [1, 2, 8] {
        let opts = LoadOptions {
            arena: ArenaInit::Ahead,
            threads: Some(threads),
            ..LoadOptions::default()
        };
        let rt = load_rank(&plan, 0, &opts).unwrap();
        assert!(arena_of(&rt) == want, "{threads} threads");
        let (arena, _) = rt.into_parts();
        assert!(arena.is_fresh());
        let again = load_rank_into(&plan, 0, &opts, Some(arena)).unwrap();
        assert!(arena_of(&again) == want);
        assert!(!again.into_parts().0.is_fresh());
    }
    assert!(!Arena::new(1 << 20, ArenaInit::Populate).unwrap().is_fresh());
}

#[test]
fn a_caller_buffer_gets_the_arena_layout_and_nothing_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let rp = &plan.ranks[0];
    let want = naive(&data, &rp.copies, &rp.zeros, rp.arena_bytes as usize);
    let n = rp.arena_bytes as usize;
    let mut buf = vec![0xABu8; n + 100];
    for io in [IoMode::Auto, IoMode::Pread, IoMode::Direct] {
        let opts = LoadOptions {
            io,
            ..LoadOptions::default()
        };
        let st = load_rank_into_buffer(&plan, 0, &opts, &mut buf).unwrap();
        assert!(buf[..n] == want[..], "{io:?}");
        assert!(buf[n..].iter().all(|&b| b == 0xAB), "{io:?}");
        assert_eq!(st.bytes, rp.bytes);
    }
    let e =
        load_rank_into_buffer(&plan, 0, &LoadOptions::default(), &mut buf[..n - 1]).unwrap_err();
    assert!(
        e.is_usage() && e.to_string().contains(&format!("needs {n}")),
        "{e}"
    );
}

#[test]
fn execute_on_a_sub_list_of_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let rp = &plan.ranks[0];
    let sub = &rp.copies[1..3];
    let want = naive(&data, sub, &[], rp.bytes as usize);
    for io in [IoMode::Auto, IoMode::Mmap, IoMode::Pread, IoMode::Direct] {
        let mut arena = vec![0xAAu8; rp.bytes as usize];
        let opts = LoadOptions {
            io,
            ..LoadOptions::default()
        };
        execute(&plan.files, sub, &[], &mut arena, &opts).unwrap();
        assert!(arena == want, "{io:?}");
    }
}

#[test]
fn staging_budget_is_never_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let rp = &plan.ranks[0];
    let want = naive(&data, &rp.copies, &rp.zeros, rp.bytes as usize);
    for budget in [0u64, 5000, 64 << 10, 1 << 20] {
        for threads in [1, 2, 4] {
            let opts = LoadOptions {
                io: IoMode::Pread,
                staging_budget: budget,
                threads: Some(threads),
                ..LoadOptions::default()
            };
            let rt = load_rank(&plan, 0, &opts).unwrap();
            assert!(arena_of(&rt) == want);
            assert!(
                rt.stats().peak_staging <= budget,
                "peak {} > budget {budget}",
                rt.stats().peak_staging
            );
        }
    }
    // A budget large enough is actually used for the close-together strided rows.
    let opts = LoadOptions {
        io: IoMode::Pread,
        staging_budget: 4 << 20,
        threads: Some(1),
        ..LoadOptions::default()
    };
    assert!(load_rank(&plan, 0, &opts).unwrap().stats().peak_staging > 0);
}

#[test]
fn views_borrow_contiguous_tensors_only() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let rp = &plan.ranks[0];
    let want = naive(&data, &rp.copies, &rp.zeros, rp.bytes as usize);
    let opts = LoadOptions::default();
    // SAFETY: the test's files are neither truncated nor written while `rt` lives.
    let mut rt = unsafe { super::load_rank_views(&plan, 0, &opts) }.unwrap();
    let big = rt.get("big").unwrap();
    assert!(big.is_view);
    assert_eq!(big.data, &data[0][1001..1001 + big.data.len()]);
    assert!(!rt.get("cols").unwrap().is_view);
    assert!(!rt.get("rest").unwrap().is_view);
    assert!(arena_of(&rt) == want);
    assert_eq!(rt.stats().view_bytes, rp.tensors[0].bytes);
    let taken = rt.take("cols").unwrap();
    assert_eq!(taken.data, want[rp.tensors[1].offset as usize..][..300_000]);
    assert!(rt.get("cols").is_none());
    let big_taken = rt.take("big").unwrap();
    assert_eq!(big_taken.data, want[..rp.tensors[0].bytes as usize]);
    assert_eq!(rt.iter().map(|t| t.name).collect::<Vec<_>>(), ["rest"]);
    let (arena, tensors) = rt.into_parts();
    let t = &tensors[2];
    let r = t.offset as usize..(t.offset + t.bytes) as usize;
    assert!(arena[r.clone()] == want[r]);
    // into_parts copies views into the arena first.
    // SAFETY: as above.
    let (arena, tensors) = unsafe { super::load_rank_views(&plan, 0, &opts) }
        .unwrap()
        .into_parts();
    let t = &tensors[0];
    let r = t.offset as usize..(t.offset + t.bytes) as usize;
    assert!(arena[r.clone()] == want[r]);
}

#[test]
fn arena_is_reused_when_large_enough() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let rp = &plan.ranks[0];
    let want = naive(&data, &rp.copies, &rp.zeros, rp.bytes as usize);
    let rt = load_rank(&plan, 0, &LoadOptions::default()).unwrap();
    let (mut arena, _) = rt.into_parts();
    arena.fill(0x55);
    let ptr = arena.as_ptr();
    let rt = load_rank_into(&plan, 0, &LoadOptions::default(), Some(arena)).unwrap();
    assert!(arena_of(&rt) == want);
    let (arena, _) = rt.into_parts();
    assert_eq!(arena.as_ptr(), ptr);
}

fn load_err(plan: &Plan, io: IoMode) -> String {
    let opts = LoadOptions {
        io,
        ..LoadOptions::default()
    };
    match load_rank(plan, 0, &opts) {
        Ok(_) => panic!("load should fail"),
        Err(e) => {
            assert!(!e.is_usage());
            e.to_string()
        }
    }
}

#[test]
fn truncated_or_replaced_files_are_clean_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, data) = sample(dir.path());
    let path = &plan.files[1].path;
    // Truncated after planning.
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(1 << 20).unwrap();
    drop(f);
    for io in [IoMode::Auto, IoMode::Mmap, IoMode::Pread, IoMode::Direct] {
        let e = load_err(&plan, io);
        assert!(
            e.contains("b.safetensors") && e.contains("truncated"),
            "{e}"
        );
    }
    // Replaced by a file of the same length (new inode, new mtime).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let tmp = dir.path().join("new");
    std::fs::write(&tmp, &data[1]).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    for io in [IoMode::Mmap, IoMode::Pread, IoMode::Direct] {
        let e = load_err(&plan, io);
        assert!(e.contains("b.safetensors") && e.contains("replaced"), "{e}");
    }
    // Missing.
    std::fs::remove_file(path).unwrap();
    let e = load_err(&plan, IoMode::Mmap);
    assert!(e.contains("b.safetensors"), "{e}");
}

#[test]
fn runs_outside_file_or_arena_or_overlapping_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (plan, _) = sample(dir.path());
    let mut p = plan.clone();
    p.ranks[0].copies[1].src = p.files[1].identity.len - 10;
    let e = load_err(&p, IoMode::Mmap);
    assert!(
        e.contains("b.safetensors") && e.contains("reads up to byte"),
        "{e}"
    );
    let mut p = plan.clone();
    p.ranks[0].copies[0].dst = p.ranks[0].arena_bytes;
    assert!(load_err(&p, IoMode::Mmap).contains("arena"));
    let mut p = plan.clone();
    p.ranks[0].copies[4].dst -= 1; // interleaved parts now overlap by one byte
    assert!(load_err(&p, IoMode::Pread).contains("overlap"));
    let mut p = plan.clone();
    p.ranks[0].copies[1].file = 9;
    assert!(load_err(&p, IoMode::Mmap).contains("file #9"));
    let mut p = plan.clone();
    p.ranks[0].copies[1].count = u64::MAX;
    assert!(load_err(&p, IoMode::Mmap).contains("overflow"));
    assert!(load_rank(&plan, 5, &LoadOptions::default()).is_err());
}

/// Naive N-d slicing by element coordinates, independent of `slice_layout`'s strides.
fn elem_at(src: &[u8], shape: &[u64], idx: &[u64], esz: usize) -> Vec<u8> {
    let mut flat = 0u64;
    for (d, &i) in idx.iter().enumerate() {
        flat = flat * shape[d] + i;
    }
    src[flat as usize * esz..][..esz].to_vec()
}

#[test]
fn slice_layout_concatenates_pieces_and_zeros() {
    // Source [6, 8] of 2-byte elements. Local tensor [6, 5] along dim 1: columns 2..4,
    // one zero column, columns 6..8.
    let shape = [6u64, 8];
    let src = pattern(6 * 8 * 2, 9);
    let layout = Layout {
        shape: vec![6, 5],
        concat_dim: 1,
        pieces: vec![
            Piece::Slice {
                ranges: vec![(0, 6), (2, 4)],
            },
            Piece::Zeros { extent: 1 },
            Piece::Slice {
                ranges: vec![(0, 6), (6, 8)],
            },
        ],
    };
    let got = slice_layout(&src, &shape, 16, &layout).unwrap();
    let mut want = Vec::new();
    for r in 0..6 {
        for c in [2u64, 3, 99, 6, 7] {
            if c == 99 {
                want.extend([0, 0]);
            } else {
                want.extend(elem_at(&src, &shape, &[r, c], 2));
            }
        }
    }
    assert_eq!(got, want);

    // 3-d, concat on dim 0 with a zero block (vocab padding style).
    let shape = [4u64, 3, 2];
    let src = pattern(4 * 3 * 2 * 4, 3);
    let layout = Layout {
        shape: vec![3, 3, 1],
        concat_dim: 0,
        pieces: vec![
            Piece::Slice {
                ranges: vec![(1, 3), (0, 3), (1, 2)],
            },
            Piece::Zeros { extent: 1 },
        ],
    };
    let got = slice_layout(&src, &shape, 32, &layout).unwrap();
    let mut want = Vec::new();
    for a in 1..3 {
        for b in 0..3 {
            want.extend(elem_at(&src, &shape, &[a, b, 1], 4));
        }
    }
    want.extend([0u8; 12]);
    assert_eq!(got, want);

    // Out-of-range pieces are errors, not panics.
    let bad = Layout {
        shape: vec![6, 2],
        concat_dim: 1,
        pieces: vec![Piece::Slice {
            ranges: vec![(0, 6), (7, 9)],
        }],
    };
    assert!(slice_layout(&pattern(96, 1), &[6, 8], 16, &bad).is_err());
}

#[test]
fn identity_fields_recorded_as_unknown_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut plan, data) = sample(dir.path());
    for f in &mut plan.files {
        f.identity = FileIdentity {
            len: f.identity.len,
            mtime_ns: 0,
            dev: 0,
            ino: 0,
        };
    }
    let rp = &plan.ranks[0];
    let want = naive(&data, &rp.copies, &rp.zeros, rp.bytes as usize);
    assert!(arena_of(&load_rank(&plan, 0, &LoadOptions::default()).unwrap()) == want);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// (src, len, count, src_stride gap, dst gap) of one run; placed back to back in the arena.
    fn runs() -> impl Strategy<Value = Vec<(u64, u64, u64, u64, u64)>> {
        prop::collection::vec(
            (0u64..200_000, 1u64..5000, 1u64..40, 0u64..9000, 0u64..300),
            1..12,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn engines_equal_the_naive_copy(spec in runs(), budget in 0u64..200_000) {
            let dir = tempfile::tempdir().unwrap();
            let data = pattern(600_000, 5);
            let files = vec![write_file(dir.path(), "f.bin", &data)];
            let mut copies = Vec::new();
            let mut zeros = Vec::new();
            let mut cursor = 0u64;
            for (i, &(src, len, count, sgap, dgap)) in spec.iter().enumerate() {
                let (src_stride, dst_stride) = (len + sgap, len + dgap);
                if src + (count - 1) * src_stride + len > data.len() as u64 {
                    continue;
                }
                copies.push(CopyRun { file: 0, src, dst: cursor, len, count, src_stride, dst_stride });
                cursor += count * dst_stride;
                if i % 3 == 0 {
                    zeros.push(ZeroRun { dst: cursor, len: 100, count: 2, dst_stride: 150 });
                    cursor += 300;
                }
            }
            let want = naive(&[data], &copies, &zeros, cursor as usize);
            for (io, pread_contiguous) in [(IoMode::Auto, false), (IoMode::Mmap, false), (IoMode::Mmap, true), (IoMode::Pread, false), (IoMode::Direct, false)] {
                let mut arena = vec![0xAAu8; cursor as usize];
                let opts = LoadOptions { io, pread_contiguous, staging_budget: budget, ..LoadOptions::default() };
                let st = execute(&files, &copies, &zeros, &mut arena, &opts).unwrap();
                prop_assert!(arena == want, "{:?} {}", io, pread_contiguous);
                prop_assert!(st.peak_staging <= budget);
            }
        }
    }
}
