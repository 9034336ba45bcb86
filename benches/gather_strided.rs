//! Micro-benchmark of the strided gather: a tp=8 column slice (rows of 1 KiB out of rows of
//! 8 KiB, like o_proj of a 4096-wide F16 model) and a tp=2 one (4 KiB out of 8 KiB), from a
//! file in the page cache into a touched arena, mmap and pread engines.
//!
//! `cargo bench --bench gather_strided`

use std::io::Write;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use safeshard::checkpoint::FileIdentity;
use safeshard::load::{execute, IoMode, LoadOptions};
use safeshard::plan::{CopyRun, PlanFile};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("w.bin");
    let rows = 4096u64;
    let row = 8192u64;
    let data: Vec<u8> = (0..rows * row).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&data))
        .expect("write");
    let f = std::fs::File::open(&path).expect("open");
    let files = vec![PlanFile {
        name: "w.bin".into(),
        path: path.clone(),
        identity: FileIdentity::of(&f, &path).expect("identity"),
    }];
    let mut g = c.benchmark_group("gather_strided");
    for tp in [2u64, 8] {
        let len = row / tp;
        let run = CopyRun {
            file: 0,
            src: len,
            dst: 0,
            len,
            count: rows,
            src_stride: row,
            dst_stride: len,
        };
        let mut arena = vec![1u8; (len * rows) as usize];
        g.throughput(Throughput::Bytes(len * rows));
        for io in [IoMode::Mmap, IoMode::Pread] {
            let opts = LoadOptions {
                io,
                ..LoadOptions::default()
            };
            g.bench_function(format!("tp{tp}-{io:?}"), |b| {
                b.iter(|| execute(&files, &[run], &[], &mut arena, &opts).expect("execute"))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
