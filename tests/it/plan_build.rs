//! `plan::build` on a real two-file checkpoint (written with the reference `safetensors`
//! crate) and hand-made resolutions: every rank's runs, executed against the files, rebuild
//! the slices an element-by-element reference computes; stages, TP ranks, DP replicas and EP
//! owners hold what they should; the arena is aligned and covered exactly; hashes are stable.

use std::collections::HashMap;
use std::path::Path;

use safeshard::checkpoint::Checkpoint;
use safeshard::plan::{self, RankPlan, ALIGN};
use safeshard::sharding::{Layout, Piece, Resolution, Resolved, Shards, TensorKind};
use safeshard::topology::Topology;
use safetensors::tensor::TensorView;

struct Src {
    name: &'static str,
    dtype: safetensors::Dtype,
    elem: usize,
    shape: Vec<usize>,
}

fn sources() -> (Vec<Src>, Vec<Src>) {
    use safetensors::Dtype::*;
    let a = vec![
        Src {
            name: "emb",
            dtype: F32,
            elem: 4,
            shape: vec![10, 4],
        },
        Src {
            name: "l0.w",
            dtype: BF16,
            elem: 2,
            shape: vec![4, 6],
        },
        Src {
            name: "l1.w",
            dtype: F16,
            elem: 2,
            shape: vec![6, 3],
        },
    ];
    let b = vec![
        Src {
            name: "l1.e0",
            dtype: F32,
            elem: 4,
            shape: vec![4, 4],
        },
        Src {
            name: "l1.e1",
            dtype: F32,
            elem: 4,
            shape: vec![4, 4],
        },
        Src {
            name: "l1.e2",
            dtype: F32,
            elem: 4,
            shape: vec![4, 4],
        },
        Src {
            name: "l1.e3",
            dtype: F32,
            elem: 4,
            shape: vec![4, 4],
        },
        Src {
            name: "norm",
            dtype: U8,
            elem: 1,
            shape: vec![5],
        },
    ];
    (a, b)
}

fn write(dir: &Path) {
    let (a, b) = sources();
    for (file, srcs) in [("a.safetensors", a), ("b.safetensors", b)] {
        let datas: Vec<Vec<u8>> = srcs
            .iter()
            .map(|s| {
                let n: usize = s.shape.iter().product::<usize>() * s.elem;
                // Distinct bytes per tensor so misplaced reads are caught.
                (0..n)
                    .map(|i| {
                        (i * 7 + s.name.len() * 31 + s.name.as_bytes()[s.name.len() - 1] as usize)
                            as u8
                    })
                    .collect()
            })
            .collect();
        let views: Vec<(String, TensorView)> = srcs
            .iter()
            .zip(&datas)
            .map(|(s, d)| {
                (
                    s.name.to_string(),
                    TensorView::new(s.dtype, s.shape.clone(), d).unwrap(),
                )
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join(file)).unwrap();
    }
    let mut map = serde_json::Map::new();
    let (a, b) = sources();
    for s in &a {
        map.insert(s.name.into(), "a.safetensors".into());
    }
    for s in &b {
        map.insert(s.name.into(), "b.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn split(shape: &[u64], dim: usize, tp: u64) -> Vec<Layout> {
    (0..tp)
        .map(|r| {
            let per = shape[dim] / tp;
            let mut ranges: Vec<(u64, u64)> = shape.iter().map(|&n| (0, n)).collect();
            ranges[dim] = (r * per, (r + 1) * per);
            let mut local = shape.to_vec();
            local[dim] = per;
            Layout {
                shape: local,
                concat_dim: dim,
                pieces: vec![Piece::Slice { ranges }],
            }
        })
        .collect()
}

/// emb: vocab-padded on dim 0 (10 rows → 12, 6 per rank for tp=2), stage 0.
fn vocab(shape: &[u64], tp: u64) -> Vec<Layout> {
    let v = shape[0];
    let per = v.div_ceil(12) * 12 / tp;
    (0..tp)
        .map(|r| {
            let (b, e) = ((r * per).min(v), ((r + 1) * per).min(v));
            let mut pieces = vec![];
            if e > b {
                pieces.push(Piece::Slice {
                    ranges: vec![(b, e), (0, shape[1])],
                });
            }
            if per > e - b {
                pieces.push(Piece::Zeros {
                    extent: per - (e - b),
                });
            }
            Layout {
                shape: vec![per, shape[1]],
                concat_dim: 0,
                pieces,
            }
        })
        .collect()
}

fn resolve(ckpt: &Checkpoint, topo: &Topology) -> Resolution {
    let tp = topo.tp as u64;
    let last = topo.pp - 1;
    let tensors = ckpt
        .tensors()
        .iter()
        .map(|t| {
            let held = |stages: Vec<usize>, shards, kind, replicated| Resolved::Held {
                stages,
                shards,
                kind,
                replicated,
            };
            match t.name.as_str() {
                "emb" => held(
                    vec![0, last],
                    Shards::PerTp(vocab(&t.shape, tp)),
                    TensorKind::Embedding,
                    false,
                ),
                "l0.w" => held(
                    vec![0],
                    Shards::PerTp(split(&t.shape, 1, tp)),
                    TensorKind::Attention,
                    false,
                ),
                "l1.w" => held(
                    vec![last],
                    Shards::PerTp(split(&t.shape, 0, tp)),
                    TensorKind::Mlp,
                    false,
                ),
                "norm" => held(
                    vec![last],
                    Shards::PerTp(vec![Layout::full(&t.shape); topo.tp]),
                    TensorKind::Norm,
                    true,
                ),
                name => {
                    let e: u64 = name.trim_start_matches("l1.e").parse().unwrap();
                    if topo.expert_parallel() {
                        let owner = (e as usize) % topo.ep;
                        held(
                            vec![last],
                            Shards::Expert {
                                expert: e,
                                owner,
                                layout: Layout::full(&t.shape),
                            },
                            TensorKind::Experts,
                            false,
                        )
                    } else {
                        held(
                            vec![last],
                            Shards::PerTp(split(&t.shape, 1, tp)),
                            TensorKind::Experts,
                            false,
                        )
                    }
                }
            }
        })
        .collect();
    Resolution {
        tensors,
        warnings: vec![],
    }
}

/// Element-by-element reference of a layout (dtypes here are whole bytes).
fn reference(data: &[u8], elem: u64, src_shape: &[u64], layout: &Layout) -> Vec<u8> {
    let n: u64 = layout.shape.iter().product();
    let mut out = Vec::new();
    for e in 0..n {
        let mut idx = vec![0; layout.shape.len()];
        let mut rem = e;
        for d in (0..idx.len()).rev() {
            idx[d] = rem % layout.shape[d];
            rem /= layout.shape[d];
        }
        let c = layout.concat_dim;
        let mut at = 0;
        let mut src = None;
        for p in &layout.pieces {
            match p {
                Piece::Slice { ranges } => {
                    let ext = ranges[c].1 - ranges[c].0;
                    if idx[c] < at + ext {
                        let mut lin = 0;
                        for d in 0..idx.len() {
                            let i = if d == c { idx[d] - at } else { idx[d] };
                            lin = lin * src_shape[d] + ranges[d].0 + i;
                        }
                        src = Some(lin);
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
        match src {
            Some(s) => out.extend_from_slice(&data[(s * elem) as usize..((s + 1) * elem) as usize]),
            None => out.extend(std::iter::repeat_n(0u8, elem as usize)),
        }
    }
    out
}

fn execute(files: &[Vec<u8>], r: &RankPlan) -> Vec<u8> {
    let mut arena = vec![0xEEu8; r.arena_bytes() as usize];
    let mut writes = vec![0u8; r.arena_bytes() as usize];
    for c in r.copies() {
        for i in 0..c.count {
            let s = (c.src + i * c.src_stride) as usize;
            let d = (c.dst + i * c.dst_stride) as usize;
            arena[d..d + c.len as usize]
                .copy_from_slice(&files[c.file as usize][s..s + c.len as usize]);
            writes[d..d + c.len as usize]
                .iter_mut()
                .for_each(|w| *w += 1);
        }
    }
    for z in r.zeros() {
        for i in 0..z.count {
            let d = (z.dst + i * z.dst_stride) as usize;
            arena[d..d + z.len as usize].fill(0);
            writes[d..d + z.len as usize]
                .iter_mut()
                .for_each(|w| *w += 1);
        }
    }
    assert!(
        writes.iter().all(|&w| w == 1),
        "rank {}: runs cover the arena exactly once",
        r.coords().rank
    );
    arena
}

fn check(topo: Topology) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let res = resolve(&ckpt, &topo);
    let plan = plan::build(&ckpt, &res, &topo, "test").unwrap();
    assert_eq!(plan.ranks().len(), topo.tp * topo.pp * topo.dp);
    let files: Vec<Vec<u8>> = ckpt
        .files()
        .iter()
        .map(|f| std::fs::read(&f.path).unwrap())
        .collect();
    let elem: HashMap<&str, u64> = {
        let (a, b) = sources();
        a.iter()
            .chain(&b)
            .map(|s| (s.name, s.elem as u64))
            .collect()
    };
    for r in plan.ranks() {
        let c = r.coords();
        assert_eq!(c, topo.coords(c.rank));
        let arena = execute(&files, r);
        let mut expected_names = vec![];
        for (i, t) in ckpt.tensors().iter().enumerate() {
            let Resolved::Held { stages, shards, .. } = &res.tensors[i] else {
                continue;
            };
            if !stages.contains(&c.pp_rank) {
                continue;
            }
            let layout = match shards {
                Shards::PerTp(l) => &l[c.tp_rank],
                Shards::Expert { owner, layout, .. } => {
                    if *owner != c.ep_rank {
                        continue;
                    }
                    layout
                }
            };
            expected_names.push(t.name.clone());
            let tp = r.tensors().iter().find(|x| x.name == t.name).unwrap();
            assert_eq!(tp.shape, layout.shape);
            assert_eq!(tp.offset % ALIGN, 0);
            let data = &files[t.file][t.offset as usize..(t.offset + t.bytes) as usize];
            let want = reference(data, elem[t.name.as_str()], &t.shape, layout);
            assert_eq!(tp.bytes, want.len() as u64);
            assert_eq!(
                &arena[tp.offset as usize..(tp.offset + tp.bytes) as usize],
                &want[..],
                "rank {} tensor {}",
                c.rank,
                t.name
            );
        }
        let mut got: Vec<String> = r.tensors().iter().map(|t| t.name.clone()).collect();
        got.sort();
        expected_names.sort();
        assert_eq!(got, expected_names, "rank {}", c.rank);
        assert_eq!(r.bytes(), r.tensors().iter().map(|t| t.bytes).sum::<u64>());
        assert!(r.read_bytes() % 4096 == 0 && (r.bytes() == 0 || r.read_bytes() >= 4096));
    }
    // DP replicas hold the same PerTp tensors; every expert is held exactly once per stage.
    if topo.expert_parallel() {
        for e in 0..4 {
            let name = format!("l1.e{e}");
            let holders = plan
                .ranks()
                .iter()
                .filter(|r| r.tensors().iter().any(|t| t.name == name))
                .count();
            assert_eq!(holders, 1, "{name}");
        }
    }
    // Deterministic: building again gives the same hash; another topology a different one.
    let again = plan::build(&ckpt, &res, &topo, "test").unwrap();
    assert_eq!(plan, again);
    assert_eq!(plan.hash(), again.hash());
    let renamed = plan::build(&ckpt, &res, &topo, "other").unwrap();
    assert_ne!(plan.hash(), renamed.hash());
    // The stage summary adds up.
    let stages = plan.stages();
    assert_eq!(
        stages.iter().map(|s| s.bytes).sum::<u64>(),
        plan.total_bytes()
    );
    assert_eq!(
        stages.iter().map(|s| s.ranks).sum::<usize>(),
        plan.ranks().len()
    );
}

#[test]
fn tp2_pp2() {
    check(Topology::new(2, 2, 1, 1).unwrap());
}

#[test]
fn tp1_pp1() {
    check(Topology::new(1, 1, 1, 1).unwrap());
}

#[test]
fn tp2_pp1_dp2() {
    check(Topology::new(2, 1, 2, 1).unwrap());
}

#[test]
fn expert_parallel_tp2_dp2_pp2() {
    check(Topology::new(2, 2, 2, 4).unwrap());
}

#[test]
fn inconsistent_resolutions_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let topo = Topology::new(2, 2, 1, 1).unwrap();
    let mut res = resolve(&ckpt, &topo);
    res.tensors.pop();
    let e = plan::build(&ckpt, &res, &topo, "t").unwrap_err();
    assert!(e.to_string().contains("resolution"), "{e}");

    let mut res = resolve(&ckpt, &topo);
    if let Resolved::Held { stages, .. } = &mut res.tensors[0] {
        stages.push(7);
    }
    let e = plan::build(&ckpt, &res, &topo, "t").unwrap_err();
    assert!(e.to_string().contains("stage 7"), "{e}");

    let mut res = resolve(&ckpt, &topo);
    let i = ckpt.tensor_index("l0.w").unwrap();
    if let Resolved::Held {
        shards: Shards::PerTp(l),
        ..
    } = &mut res.tensors[i]
    {
        l[1].shape[1] = 4; // pieces cover 3 of 4
    }
    let e = plan::build(&ckpt, &res, &topo, "t").unwrap_err();
    assert!(e.to_string().contains("l0.w"), "{e}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Random topologies (tp, pp, dp, with or without expert parallelism).
    #[test]
    fn random_topologies(tp in 1usize..=2, pp in 1usize..=3, dp in 1usize..=3, ep in proptest::bool::ANY) {
        let ep = if ep && tp * dp > 1 { tp * dp } else { 1 };
        check(Topology::new(tp, pp, dp, ep).unwrap());
    }
}

#[test]
fn hash_ignores_where_files_live_but_not_contents() {
    let topo = Topology::new(2, 2, 1, 1).unwrap();
    let a = tempfile::tempdir().unwrap();
    write(a.path());
    let b = tempfile::tempdir().unwrap();
    for f in [
        "a.safetensors",
        "b.safetensors",
        "model.safetensors.index.json",
    ] {
        std::fs::copy(a.path().join(f), b.path().join(f)).unwrap();
    }
    let plan_of = |dir: &Path| {
        let ckpt = Checkpoint::open(dir).unwrap();
        plan::build(&ckpt, &resolve(&ckpt, &topo), &topo, "test").unwrap()
    };
    let (pa, pb) = (plan_of(a.path()), plan_of(b.path()));
    assert_ne!(pa.files()[0].path, pb.files()[0].path);
    assert_eq!(pa.hash(), pb.hash(), "same checkpoint at another path");
    assert_eq!(pa.hash_hex().len(), 64);
    // A plan's fields are read-only outside the crate: edited copies go through its JSON form
    // (which round-trips exactly, see below).
    let edited = |edits: &[(&str, u64)]| -> plan::Plan {
        let mut v = serde_json::to_value(&pa).unwrap();
        for &(pointer, by) in edits {
            let field = v.pointer_mut(pointer).unwrap();
            *field = match &*field {
                serde_json::Value::String(s) => format!("{s}x").into(),
                n => (n.as_u64().unwrap() + by).into(),
            };
        }
        serde_json::from_value(v).unwrap()
    };
    let changed = edited(&[("/ranks/3/copies/0/len", 1)]);
    assert_ne!(pa.hash(), changed.hash());
    let changed = edited(&[("/ranks/1/tensors/0/name", 0)]);
    assert_ne!(pa.hash(), changed.hash());
    let changed = edited(&[("/files/1/identity/len", 1)]);
    assert_ne!(pa.hash(), changed.hash());
    // Page-rounded accounting depends on the host's page size (4 KiB vs 64 KiB); hosts with
    // different page sizes compute the same runs and must agree on the plan.
    let other_pages = edited(&[
        ("/ranks/2/read_bytes", 60 << 10),
        ("/ranks/2/staging_bytes", 60 << 10),
    ]);
    assert_eq!(pa.hash(), other_pages.hash());
    let changed = edited(&[("/ranks/2/bytes", 1)]);
    assert_ne!(pa.hash(), changed.hash());
    // Serializable: a plan survives a JSON round trip unchanged.
    let json = serde_json::to_string(&pa).unwrap();
    let back: plan::Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, pa);
    assert_eq!(back.hash(), pa.hash());
}
