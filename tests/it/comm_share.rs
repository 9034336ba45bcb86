//! Share modes on the in-process thread backend, on real plans of synthetic checkpoints:
//! every rank's tensors are checked against the loader's independent slow path
//! (`Job::verify`: whole tensors read with pread and sliced in memory) and against a local
//! `load_rank`; agreement, timeouts and count checks fail every rank fast with one message.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use safeshard::comm::{run_threads, Communicator};
use safeshard::dist::{
    load_shared, load_shared_with, ShareMode, ShareOptions, SharedPlan, Traffic,
};
use safeshard::load::{IoMode, LoadOptions, RankTensors};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;
use safeshard::Error;
use safeshard::Job;

const ROUND: u64 = 64 << 10;

fn write(dir: &Path, layers: u64) -> PathBuf {
    let opts = SynthOptions::preset("llama-tiny")
        .unwrap()
        .with_layers(layers);
    synth::write_checkpoint(dir, &opts).unwrap();
    dir.to_path_buf()
}

fn topo(tp: usize, pp: usize, dp: usize, pp_layers: Option<Vec<usize>>) -> Topology {
    let mut t = Topology::new(tp, pp, dp, 1).unwrap();
    t.pp_layers = pp_layers;
    t.validate().unwrap();
    t
}

fn opts(mode: ShareMode, io: IoMode) -> ShareOptions {
    ShareOptions {
        mode,
        round_bytes: ROUND,
        // A regression that hangs fails the test instead.
        timeout: Some(Duration::from_secs(60)),
        load: LoadOptions {
            io,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Bytes of the data sections that some rank needs: the union of all ranks' file ranges.
fn union_bytes(job: &Job, ranks: impl Iterator<Item = usize>) -> u64 {
    let mut v: Vec<(u32, u64, u64)> = Vec::new();
    for r in ranks {
        for c in job.plan().ranks()[r].copies() {
            for i in 0..c.count {
                let s = c.src + i * c.src_stride;
                v.push((c.file, s, s + c.len));
            }
        }
    }
    v.sort_unstable();
    let mut total = 0;
    let mut cur: Option<(u32, u64, u64)> = None;
    for (f, s, e) in v {
        match &mut cur {
            Some(c) if c.0 == f && s <= c.2 => c.2 = c.2.max(e),
            _ => {
                if let Some(c) = cur {
                    total += c.2 - c.1;
                }
                cur = Some((f, s, e));
            }
        }
    }
    total + cur.map_or(0, |c| c.2 - c.1)
}

fn check(job: &Job, loads: &[(RankTensors, Traffic)], what: &str) {
    for (rank, (t, _)) in loads.iter().enumerate() {
        assert_eq!(t.stats().rank, rank);
        assert_eq!(
            job.verify(t).unwrap(),
            job.plan().ranks()[rank].tensors().len(),
            "{what}"
        );
        let local = job.load_rank(rank, &LoadOptions::default()).unwrap();
        assert_eq!(t.len(), local.len());
        for l in local.iter() {
            let s = t.get(l.name).unwrap();
            assert_eq!(s.data, l.data, "{what}: rank {rank} tensor {}", l.name);
            assert_eq!((s.shape, s.dtype), (l.shape, l.dtype));
        }
    }
}

fn run_mode(
    job: &Job,
    o: &ShareOptions,
    node: impl Fn(usize) -> String + Sync,
) -> Vec<(RankTensors, Traffic)> {
    run_threads(job.world(), |c| {
        let o = ShareOptions {
            node: Some(node(c.rank())),
            ..o.clone()
        };
        load_shared_with(&SharedPlan::new(job.plan()), c, &o)
    })
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

#[test]
fn every_mode_gives_every_rank_the_tensors_of_a_local_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), 4);
    for (tp, pp, dp) in [(2, 2, 1), (4, 1, 1), (2, 1, 2), (1, 2, 2), (1, 1, 1)] {
        let job = Job::open(&path, topo(tp, pp, dp, None), None, &[]).unwrap();
        let union = union_bytes(&job, 0..job.world());
        for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
            let what = format!("{mode} tp{tp} pp{pp} dp{dp}");
            let loads = run_mode(&job, &opts(mode, IoMode::Pread), |_| "n".into());
            check(&job, &loads, &what);
            let total: u64 = loads.iter().map(|l| l.0.stats().read_bytes).sum();
            let sent: u64 = loads.iter().map(|l| l.1.sent_bytes).sum();
            let received: u64 = loads.iter().map(|l| l.1.received_bytes).sum();
            assert_eq!(sent, received, "{what}");
            match mode {
                ShareMode::None => assert!(total >= union && sent == 0, "{what}"),
                // Every needed byte is read once.
                ShareMode::Broadcast | ShareMode::ReadOnce => assert_eq!(total, union, "{what}"),
            }
        }
    }
}

#[test]
fn mmap_engine_gives_the_same_tensors_and_reads_whole_pages() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::open(write(dir.path(), 4), topo(2, 2, 1, None), None, &[]).unwrap();
    let union = union_bytes(&job, 0..4);
    for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
        let loads = run_mode(&job, &opts(mode, IoMode::Mmap), |_| "n".into());
        check(&job, &loads, &mode.to_string());
        let total: u64 = loads.iter().map(|l| l.0.stats().read_bytes).sum();
        assert!(total >= union, "{mode}: {total} < {union}");
    }
}

/// Issue 9 item 2: with pipeline stages on different nodes, the nodes need different numbers
/// of read-once rounds; that used to deadlock (rounds agreed on the world communicator).
#[test]
fn read_once_per_node_with_stages_on_different_nodes_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), 8);
    for layers in [vec![2, 6], vec![6, 2], vec![4, 4]] {
        let job = Job::open(&path, topo(2, 2, 1, Some(layers.clone())), None, &[]).unwrap();
        let start = Instant::now();
        let o = ShareOptions {
            per_node: true,
            timeout: Some(Duration::from_secs(30)),
            ..opts(ShareMode::ReadOnce, IoMode::Pread)
        };
        // Ranks 0, 1 (stage 0) on node A; 2, 3 (stage 1) on node B.
        let loads = run_mode(&job, &o, |r| if r < 2 { "A".into() } else { "B".into() });
        assert!(start.elapsed() < Duration::from_secs(30));
        check(&job, &loads, &format!("{layers:?}"));
        // Each node reads the union of its own ranks' bytes, once.
        for (node, ranks) in [(0, 0..2), (1, 2..4)] {
            let read: u64 = loads[ranks.clone()]
                .iter()
                .map(|l| l.0.stats().read_bytes)
                .sum();
            assert_eq!(read, union_bytes(&job, ranks), "node {node} {layers:?}");
        }
    }
}

#[test]
fn read_once_per_node_reads_the_checkpoint_once_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::open(write(dir.path(), 4), topo(2, 1, 2, None), None, &[]).unwrap();
    let o = ShareOptions {
        per_node: true,
        ..opts(ShareMode::ReadOnce, IoMode::Pread)
    };
    // Ranks 0, 2 on node0 and 1, 3 on node1.
    let loads = run_mode(&job, &o, |r| format!("node{}", r % 2));
    check(&job, &loads, "per node");
    for node in 0..2 {
        let read: u64 = loads
            .iter()
            .enumerate()
            .filter(|(r, _)| r % 2 == node)
            .map(|(_, l)| l.0.stats().read_bytes)
            .sum();
        assert_eq!(read, union_bytes(&job, (node..4).step_by(2)), "node {node}");
    }
}

#[test]
fn a_broken_file_on_one_rank_fails_every_rank_fast() {
    let dir = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..4)
        .map(|r| write(&dir.path().join(format!("node{r}")), 4))
        .collect();
    let jobs: Vec<Job> = dirs
        .iter()
        .map(|d| Job::open(d, topo(2, 2, 1, None), None, &[]).unwrap())
        .collect();
    // Truncated after planning: the load's file check sees it.
    let f = dirs[2].join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    for mode in [ShareMode::None, ShareMode::Broadcast, ShareMode::ReadOnce] {
        let start = Instant::now();
        let out = run_threads(4, |c| {
            load_shared(jobs[c.rank()].plan(), c, &opts(mode, IoMode::Pread))
        });
        assert!(start.elapsed() < Duration::from_secs(20));
        for (rank, r) in out.iter().enumerate() {
            let msg = r.as_ref().unwrap_err().to_string();
            if rank == 2 {
                assert!(
                    msg.contains("node2/model-00002-of-00002.safetensors"),
                    "{mode}: {msg}"
                );
            } else {
                assert!(msg.contains("rank 2"), "{mode} rank {rank}: {msg}");
            }
        }
    }
}

/// Issue 9 item 1: ranks that disagree on an option that shapes communication fail together,
/// fast, with one message naming the option, the values and the ranks.
#[test]
fn ranks_that_disagree_on_an_option_fail_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::open(write(dir.path(), 4), topo(2, 2, 1, None), None, &[]).unwrap();
    type OptionsOf = Box<dyn Fn(usize) -> ShareOptions + Sync>;
    let cases: Vec<(&str, OptionsOf, &str)> = vec![
        (
            "mode",
            Box::new(|r| {
                let mode = if r == 1 {
                    ShareMode::None
                } else {
                    ShareMode::Broadcast
                };
                opts(mode, IoMode::Pread)
            }),
            "ranks disagree on mode: rank 0,2,3 broadcast, rank 1 none",
        ),
        (
            "round",
            Box::new(|r| ShareOptions {
                round_bytes: if r >= 2 { 2 * ROUND } else { ROUND },
                ..opts(ShareMode::ReadOnce, IoMode::Pread)
            }),
            "ranks disagree on round_bytes: rank 0,1 65536, rank 2,3 131072",
        ),
        (
            "per node",
            Box::new(|r| ShareOptions {
                per_node: r == 3,
                ..opts(ShareMode::ReadOnce, IoMode::Pread)
            }),
            "ranks disagree on per_node: rank 0,1,2 false, rank 3 true",
        ),
        (
            "io",
            Box::new(|r| {
                opts(
                    ShareMode::Broadcast,
                    if r == 0 { IoMode::Mmap } else { IoMode::Pread },
                )
            }),
            "ranks disagree on io: rank 0 mmap, rank 1,2,3 pread",
        ),
        (
            "caller's option",
            Box::new(|r| ShareOptions {
                agree_also: vec![("verify".into(), (r == 2).to_string())],
                ..opts(ShareMode::None, IoMode::Pread)
            }),
            "ranks disagree on verify: rank 0,1,3 false, rank 2 true",
        ),
    ];
    for (what, make, want) in &cases {
        let start = Instant::now();
        let out = run_threads(4, |c| load_shared(job.plan(), c, &make(c.rank())));
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        for r in out {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::Disagree { .. }), "{what}: {e:?}");
            assert_eq!(e.to_string(), *want, "{what}");
        }
    }
}

#[test]
fn ranks_with_different_plans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = Job::open(
        write(&dir.path().join("a"), 4),
        topo(2, 1, 1, None),
        None,
        &[],
    )
    .unwrap();
    let b = Job::open(
        write(&dir.path().join("b"), 6),
        topo(2, 1, 1, None),
        None,
        &[],
    )
    .unwrap();
    let out = run_threads(2, |c| {
        let plan = if c.rank() == 1 { b.plan() } else { a.plan() };
        load_shared(plan, c, &ShareOptions::default())
    });
    for r in out {
        let msg = r.unwrap_err().to_string();
        assert!(msg.starts_with("ranks disagree on plan: rank 0 "), "{msg}");
        assert!(msg.contains(", rank 1 "), "{msg}");
    }
}

#[test]
fn job_size_must_match_plan() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::open(write(dir.path(), 4), topo(4, 1, 1, None), None, &[]).unwrap();
    let out = run_threads(2, |c| load_shared(job.plan(), c, &ShareOptions::default()));
    for r in out {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("2 ranks but the plan has 4"), "{msg}");
    }
}

/// Issue 9 item 3: one round minimum on every path; small rounds are errors, never hangs.
#[test]
fn rounds_under_64_kib_are_refused_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::open(write(dir.path(), 4), topo(2, 2, 1, None), None, &[]).unwrap();
    for round in [0, 100, ROUND - 1] {
        let start = Instant::now();
        let out = run_threads(4, |c| {
            let o = ShareOptions {
                round_bytes: round,
                ..opts(ShareMode::ReadOnce, IoMode::Pread)
            };
            load_shared(job.plan(), c, &o)
        });
        assert!(start.elapsed() < Duration::from_secs(10));
        for r in out {
            let e = r.unwrap_err();
            assert!(e.is_usage(), "{e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("round_bytes {round}: at least 65536")),
                "{e}"
            );
        }
    }
    // The smallest allowed round works, many rounds and all.
    let loads = run_mode(&job, &opts(ShareMode::ReadOnce, IoMode::Pread), |_| {
        "n".into()
    });
    check(&job, &loads, "64 KiB rounds");
}

/// Issue 9 item 4: a rank that never arrives ends the job after the timeout, with a message
/// naming the phase and the missing rank, on every rank that waited.
#[test]
fn a_rank_that_never_arrives_times_out_naming_phase_and_rank() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::open(write(dir.path(), 4), topo(2, 2, 1, None), None, &[]).unwrap();
    let start = Instant::now();
    let out = run_threads(4, |c| {
        if c.rank() == 2 {
            // Gone without a word (as a stopped process).
            return Ok(None);
        }
        let o = ShareOptions {
            timeout: Some(Duration::from_secs(1)),
            ..opts(ShareMode::Broadcast, IoMode::Pread)
        };
        load_shared(job.plan(), c, &o).map(Some)
    });
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    for (rank, r) in out.iter().enumerate() {
        if rank == 2 {
            continue;
        }
        let msg = r.as_ref().unwrap_err().to_string();
        assert!(
            msg.contains("timed out after 1s in phase \"job fingerprint\": rank 2 did not arrive"),
            "rank {rank}: {msg}"
        );
    }
}

/// The thread backend's deadline on every collective, sub-communicators included: a rank
/// that sleeps past it is named (by its world rank) with the phase.
#[test]
fn a_sleeping_rank_is_named_in_a_sub_communicator_timeout() {
    let start = Instant::now();
    let out = run_threads(4, |c| {
        c.set_timeout(Some(Duration::from_millis(500)));
        let sub = c.split(Some((c.rank() % 2) as u32), c.rank())?.unwrap();
        sub.set_phase("odd barrier");
        if c.rank() == 3 {
            std::thread::sleep(Duration::from_secs(2));
            return Ok(());
        }
        sub.barrier()
    });
    assert!(start.elapsed() < Duration::from_secs(10));
    let msg = out[1].as_ref().unwrap_err().to_string();
    assert_eq!(
        msg,
        "rank 1: timed out after 500ms in phase \"odd barrier\": rank 3 did not arrive"
    );
    // The even ranks were not waiting on rank 3 and finished.
    assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
}

/// No receive buffer is written past its length whatever a peer sends: a peer sending a
/// different count is an error naming it.
#[test]
fn a_peer_sending_another_count_is_named_and_nothing_is_overrun() {
    let out = run_threads(2, |c| {
        let send = [7u8; 16];
        // Rank 1 sends 16 bytes to rank 0, which expects 8.
        let (send_counts, recv_counts) = if c.rank() == 1 {
            (vec![16, 0], vec![0, 0])
        } else {
            (vec![0, 0], vec![0, 8])
        };
        let mut recv = vec![0u8; recv_counts.iter().sum::<usize>() + 4];
        let sent = send.get(..send_counts.iter().sum::<usize>()).unwrap_or(&[]);
        let n: usize = recv_counts.iter().sum();
        let r = c.all_to_all_packed(sent, &send_counts, &mut recv[..n], &recv_counts);
        assert!(recv[n..].iter().all(|&b| b == 0), "overrun");
        r
    });
    let msg = out[0].as_ref().unwrap_err().to_string();
    assert!(msg.contains("rank 1 sent 16 bytes, 8 expected"), "{msg}");
}

/// A distributed load returns the same type as a local one: names, iteration, take.
#[test]
fn shared_tensors_are_the_local_rank_tensors_type() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::open(write(dir.path(), 4), topo(2, 1, 1, None), None, &[]).unwrap();
    let out = run_threads(2, |c| {
        let mut t = load_shared(job.plan(), c, &opts(ShareMode::Broadcast, IoMode::Pread))?;
        let names: Vec<String> = t.iter().map(|x| x.name.to_string()).collect();
        let first = names.first().cloned().unwrap_or_default();
        let want = t.get(&first).map(|x| x.data.to_vec());
        let taken = t.take(&first).map(|x| x.data);
        assert_eq!(taken, want);
        assert!(t.get(&first).is_none());
        Ok(names.len())
    });
    for (rank, r) in out.into_iter().enumerate() {
        assert_eq!(r.unwrap(), job.plan().ranks()[rank].tensors().len());
    }
}

/// A communicator that keeps only the trait's default `exchange` (packed through
/// `all_to_all_packed`, as a backend that overrides nothing), counts exchanges, and can
/// stall one rank before its n-th exchange.
struct Plain<C> {
    inner: C,
    exchanges: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// (world rank, exchange number from 1, how long) of a stall.
    stall: Option<(usize, usize, Duration)>,
    world_rank: usize,
    /// Whether `exchange` goes to the inner backend's own (overridden) one.
    own_exchange: bool,
}

impl<C> Plain<C> {
    fn new(inner: C, world_rank: usize, own_exchange: bool) -> Self {
        Plain {
            inner,
            exchanges: Default::default(),
            stall: None,
            world_rank,
            own_exchange,
        }
    }
}

impl<C: std::ops::Deref<Target = dyn Communicator>> Communicator for Plain<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn split(
        &self,
        color: Option<u32>,
        key: usize,
    ) -> safeshard::Result<Option<Box<dyn Communicator>>> {
        Ok(self.inner.split(color, key)?.map(|c| {
            Box::new(Plain {
                inner: c,
                exchanges: self.exchanges.clone(),
                stall: self.stall,
                world_rank: self.world_rank,
                own_exchange: self.own_exchange,
            }) as Box<dyn Communicator>
        }))
    }
    fn barrier(&self) -> safeshard::Result<()> {
        self.inner.barrier()
    }
    fn broadcast(&self, root: usize, buf: &mut [u8]) -> safeshard::Result<()> {
        self.inner.broadcast(root, buf)
    }
    fn all_gather(&self, mine: &[u8]) -> safeshard::Result<Vec<Vec<u8>>> {
        self.inner.all_gather(mine)
    }
    fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> safeshard::Result<Vec<Vec<u8>>> {
        self.inner.all_to_all_v(send)
    }
    fn all_to_all_packed(
        &self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> safeshard::Result<()> {
        self.inner
            .all_to_all_packed(send, send_counts, recv, recv_counts)
    }
    fn exchange(
        &self,
        sends: &[(usize, &[u8])],
        recvs: &mut [(usize, &mut [u8])],
    ) -> safeshard::Result<()> {
        use std::sync::atomic::Ordering;
        let n = self.exchanges.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some((rank, at, pause)) = self.stall {
            if rank == self.world_rank && n == at {
                std::thread::sleep(pause);
            }
        }
        if self.own_exchange {
            self.inner.exchange(sends, recvs)
        } else {
            // The trait's default, reached through a shim that overrides nothing.
            struct Default<'a>(&'a dyn Communicator);
            impl Communicator for Default<'_> {
                fn rank(&self) -> usize {
                    self.0.rank()
                }
                fn size(&self) -> usize {
                    self.0.size()
                }
                fn split(
                    &self,
                    c: Option<u32>,
                    k: usize,
                ) -> safeshard::Result<Option<Box<dyn Communicator>>> {
                    self.0.split(c, k)
                }
                fn barrier(&self) -> safeshard::Result<()> {
                    self.0.barrier()
                }
                fn broadcast(&self, root: usize, buf: &mut [u8]) -> safeshard::Result<()> {
                    self.0.broadcast(root, buf)
                }
                fn all_gather(&self, mine: &[u8]) -> safeshard::Result<Vec<Vec<u8>>> {
                    self.0.all_gather(mine)
                }
                fn all_to_all_v(&self, send: Vec<Vec<u8>>) -> safeshard::Result<Vec<Vec<u8>>> {
                    self.0.all_to_all_v(send)
                }
                fn abort(&self, code: i32, msg: &str) {
                    self.0.abort(code, msg)
                }
                fn set_timeout(&self, t: Option<Duration>) {
                    self.0.set_timeout(t)
                }
                fn set_phase(&self, phase: &str) {
                    self.0.set_phase(phase)
                }
            }
            Default(&*self.inner).exchange(sends, recvs)
        }
    }
    fn abort(&self, code: i32, msg: &str) {
        self.inner.abort(code, msg)
    }
    fn set_timeout(&self, timeout: Option<Duration>) {
        self.inner.set_timeout(timeout)
    }
    fn timeout(&self) -> Option<Duration> {
        self.inner.timeout()
    }
    fn set_phase(&self, phase: &str) {
        self.inner.set_phase(phase)
    }
}

/// xorshift64*: a fixed sequence of pseudo-random cases (reproducible, no dependency).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// The pipelined read-once (rounds read ahead, messages straight into the arena, bundles,
/// packed strided runs) gives every rank the bytes of a plain local load, on random plans:
/// models with dim-0, inner-dim and expert splits, random topologies, stage splits, round
/// sizes, engines and node groupings, on the thread backend's own exchange and on the
/// trait's default one. Each group reads its union once.
#[test]
fn pipelined_read_once_equals_a_plain_load_on_random_plans() {
    let dir = tempfile::tempdir().unwrap();
    let models: Vec<(&str, PathBuf)> = ["llama-tiny", "mixtral-tiny", "qwen2-tiny"]
        .iter()
        .map(|m| {
            let opts = SynthOptions::preset(m).unwrap().with_layers(4);
            let p = dir.path().join(m);
            synth::write_checkpoint(&p, &opts).unwrap();
            (*m, p)
        })
        .collect();
    let mut rng = Rng(0x5afe_5eed);
    let mut ran = 0;
    for case in 0..40 {
        let (model, path) = rng.pick(&models);
        let (tp, pp, dp) = (
            *rng.pick(&[1, 2, 4]),
            *rng.pick(&[1, 2]),
            *rng.pick(&[1, 2]),
        );
        let ep = if model.contains("mixtral") && rng.below(2) == 1 {
            tp * dp
        } else {
            1
        };
        let Ok(mut t) = Topology::new(tp, pp, dp, ep) else {
            continue;
        };
        if pp == 2 {
            let first = 1 + rng.below(3) as usize;
            t.pp_layers = Some(vec![first, 4 - first]);
        }
        let Ok(job) = Job::open(path, t, None, &[]) else {
            continue;
        };
        let world = job.world();
        let nodes = 1 + rng.below(3);
        let node_of: Vec<String> = (0..world)
            .map(|_| format!("n{}", rng.below(nodes)))
            .collect();
        let o = ShareOptions {
            per_node: rng.below(2) == 1,
            round_bytes: *rng.pick(&[64 << 10, 100_000, 1 << 20, 7 << 20]),
            load: LoadOptions {
                io: *rng.pick(&[IoMode::Pread, IoMode::Mmap, IoMode::Auto]),
                ..Default::default()
            },
            ..opts(ShareMode::ReadOnce, IoMode::Pread)
        };
        let own_exchange = rng.below(3) != 0;
        let what = format!(
            "case {case}: {model} tp{tp} pp{pp} dp{dp} ep{ep} {:?} per_node {} round {} {:?} \
             nodes {node_of:?} own exchange {own_exchange}",
            job.plan().ranks().len(),
            o.per_node,
            o.round_bytes,
            o.load.io
        );
        let shared = SharedPlan::new(job.plan());
        let loads: Vec<(RankTensors, Traffic)> = run_threads(world, |c| {
            let comm = Plain::new(c as &dyn Communicator, c.rank(), own_exchange);
            let o = ShareOptions {
                node: Some(node_of[c.rank()].clone()),
                ..o.clone()
            };
            load_shared_with(&shared, &comm, &o)
        })
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{what}: {e}")))
        .collect();
        check(&job, &loads, &what);
        let sent: u64 = loads.iter().map(|l| l.1.sent_bytes).sum();
        let received: u64 = loads.iter().map(|l| l.1.received_bytes).sum();
        assert_eq!(sent, received, "{what}");
        // Each group (the job, or a node) reads its union once; Pread reads the bytes asked
        // for, mmap (and Auto's gathers from the page cache) count whole pages.
        let groups: Vec<Vec<usize>> = if o.per_node {
            let mut names: Vec<&String> = node_of.iter().collect();
            names.sort();
            names.dedup();
            names
                .iter()
                .map(|n| (0..world).filter(|&r| &node_of[r] == *n).collect())
                .collect()
        } else {
            vec![(0..world).collect()]
        };
        for g in groups {
            let read: u64 = g.iter().map(|&r| loads[r].0.stats().read_bytes).sum();
            let union = union_bytes(&job, g.iter().copied());
            if o.load.io != IoMode::Pread {
                assert!(read >= union, "{what}: group {g:?} read {read} < {union}");
            } else {
                assert_eq!(read, union, "{what}: group {g:?}");
            }
        }
        ran += 1;
    }
    assert!(ran >= 25, "only {ran} of 40 random cases were valid plans");
}

/// A rank whose read fails in a later round (its copy of the second file is truncated after
/// planning) fails every rank after rounds have been exchanged: the failed rank names the
/// file, every other rank names the failed rank, and no rank hangs.
#[test]
fn a_read_failing_mid_load_fails_every_rank_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..4)
        .map(|r| write(&dir.path().join(format!("node{r}")), 4))
        .collect();
    let jobs: Vec<Job> = dirs
        .iter()
        .map(|d| Job::open(d, topo(4, 1, 1, None), None, &[]).unwrap())
        .collect();
    let f = dirs[2].join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    for own_exchange in [true, false] {
        let start = Instant::now();
        let counts: Vec<_> = (0..4)
            .map(|_| std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)))
            .collect();
        let out = run_threads(4, |c| {
            let mut comm = Plain::new(c as &dyn Communicator, c.rank(), own_exchange);
            comm.exchanges = counts[c.rank()].clone();
            load_shared(
                jobs[c.rank()].plan(),
                &comm,
                &opts(ShareMode::ReadOnce, IoMode::Pread),
            )
        });
        assert!(start.elapsed() < Duration::from_secs(20));
        // Rounds were exchanged before the failing one.
        let done = counts[0].load(std::sync::atomic::Ordering::SeqCst);
        assert!(done >= 2, "only {done} rounds exchanged before the failure");
        for (rank, r) in out.iter().enumerate() {
            let msg = r.as_ref().unwrap_err().to_string();
            if rank == 2 {
                assert!(
                    msg.contains("node2/model-00002-of-00002.safetensors"),
                    "{msg}"
                );
            } else {
                assert!(msg.contains("rank 2"), "rank {rank}: {msg}");
            }
        }
    }
}

/// A rank that stops in the middle of the rounds (before its third exchange) is named by
/// every rank waiting for it, with the round's phase, within the timeout.
#[test]
fn a_rank_stalled_mid_round_is_named_with_the_round() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::open(write(dir.path(), 4), topo(4, 1, 1, None), None, &[]).unwrap();
    let start = Instant::now();
    let out = run_threads(4, |c| {
        let mut comm = Plain::new(c as &dyn Communicator, c.rank(), true);
        comm.stall = Some((2, 3, Duration::from_secs(3)));
        let o = ShareOptions {
            timeout: Some(Duration::from_secs(1)),
            ..opts(ShareMode::ReadOnce, IoMode::Pread)
        };
        load_shared(job.plan(), &comm, &o)
    });
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    for (rank, r) in out.iter().enumerate() {
        let msg = r.as_ref().unwrap_err().to_string();
        if rank == 2 {
            continue;
        }
        assert!(
            msg.contains("timed out after 1s in phase \"read-once round 3 of ")
                && msg.ends_with("rank 2 did not arrive"),
            "rank {rank}: {msg}"
        );
    }
    assert!(out[2].is_err());
}

/// `exchange` on the thread backend and through the trait's default: several messages per
/// pair, in order, of any length (none at all between some pairs); a sender whose total
/// differs from what the receiver lists is named, and nothing is written past a buffer.
#[test]
fn exchange_delivers_messages_in_order_and_names_a_wrong_sender() {
    let msg = |from: usize, to: usize, k: usize| -> Vec<u8> {
        (0..(from * 7 + to * 3 + k * 1000) % 5000)
            .map(|i| (i * 31 + from * 5 + to * 11 + k) as u8)
            .collect()
    };
    // Rank r sends (r + d) % 3 messages to d != r.
    let count = |from: usize, to: usize| if from == to { 0 } else { (from + to) % 3 };
    for own_exchange in [true, false] {
        let out = run_threads(4, |c| {
            let comm = Plain::new(c as &dyn Communicator, c.rank(), own_exchange);
            let me = c.rank();
            let owned: Vec<(usize, Vec<u8>)> = (0..4)
                .flat_map(|d| (0..count(me, d)).map(move |k| (d, msg(me, d, k))))
                .collect();
            let sends: Vec<(usize, &[u8])> = owned.iter().map(|(d, b)| (*d, &b[..])).collect();
            let mut bufs: Vec<(usize, Vec<u8>)> = (0..4)
                .flat_map(|o| (0..count(o, me)).map(move |k| (o, vec![0u8; msg(o, me, k).len()])))
                .collect();
            let mut recvs: Vec<(usize, &mut [u8])> =
                bufs.iter_mut().map(|(o, b)| (*o, &mut b[..])).collect();
            comm.exchange(&sends, &mut recvs)?;
            let mut k = [0usize; 4];
            for (o, b) in &bufs {
                assert_eq!(*b, msg(*o, me, k[*o]), "rank {me} from {o}");
                k[*o] += 1;
            }
            Ok(())
        });
        for r in out {
            r.unwrap();
        }
        // Rank 1 sends 16 bytes to rank 0, which lists 8.
        let out = run_threads(2, |c| {
            let comm = Plain::new(c as &dyn Communicator, c.rank(), own_exchange);
            let data = [7u8; 16];
            let mut buf = [0u8; 12];
            let sends: Vec<(usize, &[u8])> = if c.rank() == 1 {
                vec![(0, &data[..])]
            } else {
                vec![]
            };
            let mut recvs: Vec<(usize, &mut [u8])> = if c.rank() == 1 {
                vec![]
            } else {
                vec![(1, &mut buf[..8])]
            };
            let r = comm.exchange(&sends, &mut recvs);
            assert!(buf[8..].iter().all(|&b| b == 0), "overrun");
            r
        });
        let msg = out[0].as_ref().unwrap_err().to_string();
        assert!(
            msg.contains("rank 1 sent 16 bytes, 8 expected"),
            "{own_exchange}: {msg}"
        );
    }
}
