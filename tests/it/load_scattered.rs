//! Loading some tensors straight into caller buffers (`load_rank_scattered`): every tensor,
//! wherever it lands, equals the plain load's (itself checked against the independent slow
//! path here), under every I/O engine, with buffers at unaligned addresses.

use safeshard::load::{load_rank, load_rank_scattered};
use safeshard::synth::SynthOptions;
use safeshard::{Error, IoMode, Job, LoadOptions, TensorNames, Topology};

use crate::common;

/// Loads `rank` of `job` with the tensors `pick` selects redirected into one shared byte
/// vector at odd offsets (so no buffer is aligned), checks both parts against `load_rank`,
/// and returns how many tensors went to caller buffers.
fn check_rank(job: &Job, rank: usize, io: IoMode, pick: &dyn Fn(usize) -> bool) -> usize {
    let opts = LoadOptions {
        io,
        ..LoadOptions::default()
    };
    let want = job.load_rank(rank, &opts).unwrap();
    let plans: Vec<_> = want.plans().to_vec();
    let chosen: Vec<_> = plans.iter().enumerate().filter(|(i, _)| pick(*i)).collect();
    let total: usize = chosen.iter().map(|(_, t)| t.bytes as usize + 3).sum();
    let mut backing = vec![0x5au8; total + 1];
    let mut into: Vec<(&str, &mut [u8])> = Vec::new();
    let mut rest = &mut backing[1..];
    for (_, t) in &chosen {
        let (buf, tail) = std::mem::take(&mut rest).split_at_mut(t.bytes as usize);
        into.push((t.name.as_str(), buf));
        rest = &mut tail[3..];
    }
    let got = job.load_rank_scattered(rank, &opts, &mut into).unwrap();
    assert_eq!(
        got.len(),
        plans.len() - chosen.len(),
        "rank {rank} {io:?}: tensors held"
    );
    for (name, buf) in &into {
        assert!(got.get(name).is_none(), "{name} is also in the arena");
        assert!(
            want.get(name).unwrap().data == &buf[..],
            "rank {rank} {io:?}: {name} in the caller buffer"
        );
    }
    for t in got.iter() {
        assert!(
            want.get(t.name).unwrap().data == t.data,
            "rank {rank} {io:?}: {} in the arena",
            t.name
        );
    }
    // Nothing outside the buffers was written.
    let mut at = 1;
    for (_, t) in &chosen {
        at += t.bytes as usize;
        assert_eq!(&backing[at..at + 3], &[0x5a; 3], "bytes after {}", t.name);
        at += 3;
    }
    assert_eq!(backing[0], 0x5a);
    chosen.len()
}

#[test]
fn caller_buffers_get_the_same_bytes_as_the_arena_under_every_engine() {
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny").unwrap());
    // tp 2: o/down split on their inner dimension (strided runs), embed/q/k/v on rows.
    let job = Job::builder(dir.path())
        .topology(Topology::new(2, 2, 1, 1).unwrap())
        .open()
        .unwrap();
    for rank in 0..job.world() {
        // The plain load itself agrees with the independent slow path.
        let plain = load_rank(job.plan(), rank, &LoadOptions::default()).unwrap();
        assert_eq!(job.verify(&plain).unwrap(), plain.len());
        for io in [IoMode::Auto, IoMode::Pread, IoMode::Mmap, IoMode::Direct] {
            let n = plans_len(&job, rank);
            assert_eq!(check_rank(&job, rank, io, &|_| true), n);
            assert_eq!(check_rank(&job, rank, io, &|i| i % 2 == 1), n / 2);
            assert_eq!(check_rank(&job, rank, io, &|_| false), 0);
        }
    }
}

fn plans_len(job: &Job, rank: usize) -> usize {
    job.plan().ranks()[rank].tensors().len()
}

#[test]
fn vllm_names_are_finished_in_the_caller_buffers_too() {
    // GPT-2: transposed Conv1D weights and attention-scale buffers (no file source);
    // GPTQ: qweight fused on its inner dimension (strided runs into one fused tensor).
    for preset in ["gpt2-tiny", "llama-tiny-gptq", "mixtral-tiny"] {
        let dir = common::write_preset(&SynthOptions::preset(preset).unwrap());
        let job = Job::builder(dir.path())
            .topology(Topology::new(2, 1, 1, 1).unwrap())
            .names(TensorNames::Vllm)
            .open()
            .unwrap();
        for rank in 0..job.world() {
            for pick in [&|_| true, &|i: usize| i % 3 == 0] as [&dyn Fn(usize) -> bool; 2] {
                check_rank(&job, rank, IoMode::Auto, pick);
            }
        }
    }
}

#[test]
fn a_wrong_name_size_or_repeat_is_an_invalid_argument_naming_into() {
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny").unwrap());
    let job = Job::builder(dir.path())
        .topology(Topology::new(2, 1, 1, 1).unwrap())
        .open()
        .unwrap();
    let t = job.plan().ranks()[0].tensors()[0].clone();
    let mut a = vec![0u8; t.bytes as usize];
    let mut b = vec![0u8; t.bytes as usize];
    let mut c = vec![0u8; t.bytes as usize];
    let mut short = vec![0u8; t.bytes as usize - 1];
    let opts = LoadOptions::default();
    type Into<'a> = Vec<(&'a str, &'a mut [u8])>;
    let cases: Vec<(Into, &str)> = vec![
        (vec![("no.such.tensor", &mut c[..])], "holds no tensor"),
        (vec![(t.name.as_str(), &mut short[..])], "has"),
        (
            vec![(t.name.as_str(), &mut a[..]), (t.name.as_str(), &mut b[..])],
            "given twice",
        ),
    ];
    for (mut into, says) in cases {
        match load_rank_scattered(job.plan(), 0, &opts, &mut into) {
            Err(e @ Error::InvalidArgument { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("into") && msg.contains(says), "{msg}");
            }
            other => panic!("expected invalid_argument, got {other:?}"),
        }
    }
    assert!(matches!(
        load_rank_scattered(job.plan(), 9, &opts, &mut []),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn a_reused_arena_holds_the_same_bytes_as_a_fresh_one_for_another_plan() {
    // The arena of a tp 1 load (every byte written) reused for tp 2 ranks: alignment gaps
    // and the tail must be zero again, so the whole arena (its digest) matches a fresh load.
    let dir = common::write_preset(&SynthOptions::preset("llama-tiny").unwrap());
    let one = Job::builder(dir.path()).open().unwrap();
    let two = Job::builder(dir.path())
        .topology(Topology::new(2, 1, 1, 1).unwrap())
        .open()
        .unwrap();
    let opts = LoadOptions::default();
    for rank in 0..2 {
        let (mut arena, _) = load_rank(one.plan(), 0, &opts).unwrap().into_parts();
        arena.fill(0xEE);
        let reused = safeshard::load::load_rank_into(two.plan(), rank, &opts, Some(arena)).unwrap();
        let fresh = load_rank(two.plan(), rank, &opts).unwrap();
        let (a, _) = reused.into_parts();
        let (b, _) = fresh.into_parts();
        assert_eq!(a.len(), b.len());
        assert!(
            a[..] == b[..],
            "rank {rank}: a reused arena differs from a fresh one"
        );
    }
}
