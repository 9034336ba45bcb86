//! The request planner against an independent reference: the runs are executed by a naive
//! loop over their definition on the file's bytes, and the expected local tensor is gathered
//! element by element from the stored tensor by the ranges' definition (every combination
//! of one range per dimension, row-major).

use std::path::Path;

use proptest::prelude::*;
use safetensors::tensor::{Dtype as StDtype, TensorView};

use super::*;
use crate::checkpoint::Dtype;

/// Writes one safetensors file holding `tensors` (name, dtype, shape, bytes) and opens it.
fn checkpoint(dir: &Path, tensors: &[(&str, StDtype, Vec<usize>, Vec<u8>)]) -> Checkpoint {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, shape, data)| {
            (
                n.to_string(),
                TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    Checkpoint::open(&path).unwrap()
}

/// What the plan's runs put in rank `r`'s arena, by their definition.
fn execute(plan: &Plan, r: usize, file: &[u8]) -> Vec<u8> {
    let rp = &plan.ranks[r];
    let mut out = vec![0xEEu8; rp.arena_bytes as usize];
    for c in &rp.copies {
        for i in 0..c.count {
            let s = (c.src + i * c.src_stride) as usize;
            let d = (c.dst + i * c.dst_stride) as usize;
            out[d..d + c.len as usize].copy_from_slice(&file[s..s + c.len as usize]);
        }
    }
    for z in &rp.zeros {
        for i in 0..z.count {
            let d = (z.dst + i * z.dst_stride) as usize;
            out[d..d + z.len as usize].fill(0);
        }
    }
    out
}

/// The local tensor by the ranges' definition: for every local index, the global index it
/// takes, gathered one element (of `elem` bytes) at a time from row-major `data`.
fn gather(data: &[u8], shape: &[u64], ranges: &[Vec<(u64, u64)>], elem: usize) -> Vec<u8> {
    let globals: Vec<Vec<u64>> = ranges
        .iter()
        .map(|rs| rs.iter().flat_map(|&(b, e)| b..e).collect())
        .collect();
    let mut out = Vec::new();
    let total: usize = globals.iter().map(Vec::len).product();
    for flat in 0..total {
        let mut rem = flat;
        let mut src = 0u64;
        let mut stride = 1u64;
        for d in (0..shape.len()).rev() {
            let n = globals[d].len();
            let local = rem % n;
            rem /= n;
            src += globals[d][local] * stride;
            stride *= shape[d];
        }
        let s = src as usize * elem;
        out.extend_from_slice(&data[s..s + elem]);
    }
    out
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

#[test]
fn a_strided_shard_of_two_ranges_gathers_exactly_those_rows() {
    let dir = tempfile::tempdir().unwrap();
    let w = bytes(10 * 3 * 4, 7);
    let ckpt = checkpoint(dir.path(), &[("w", StDtype::F32, vec![10, 3], w.clone())]);
    let file = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    // Rows 0..2 and 5..7 (FSDP over TP on 2 x 2 ranks), all columns.
    let ranges = vec![vec![(0, 2), (5, 7)], vec![(0, 3)]];
    let reqs = vec![vec![SliceRequest {
        dest: "model.w".into(),
        source: "w".into(),
        ranges: ranges.clone(),
    }]];
    let plan = build_requests(&ckpt, &reqs).unwrap();
    let t = &plan.ranks[0].tensors[0];
    assert_eq!(
        (t.name.as_str(), t.shape.as_slice()),
        ("model.w", &[4u64, 3][..])
    );
    let arena = execute(&plan, 0, &file);
    let got = &arena[t.offset as usize..(t.offset + t.bytes) as usize];
    assert_eq!(got, gather(&w, &[10, 3], &ranges, 4));
    assert_eq!(plan.spec, REQUEST_SPEC);
}

#[test]
fn replicated_requests_are_marked_and_errors_name_destination_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), &[("w", StDtype::U8, vec![4, 4], bytes(16, 1))]);
    let whole = SliceRequest::whole("a", "w", &[4, 4]);
    let half = SliceRequest {
        dest: "a".into(),
        source: "w".into(),
        ranges: vec![vec![(0, 2)], vec![(0, 4)]],
    };
    let plan = build_requests(
        &ckpt,
        &[vec![whole.clone()], vec![whole.clone()], vec![half]],
    )
    .unwrap();
    let flags: Vec<bool> = plan.ranks.iter().map(|r| r.tensors[0].replicated).collect();
    assert_eq!(flags, [true, true, false]);
    assert_eq!(plan.topology.dp, 3);

    let missing = SliceRequest::whole("key.w", "nope", &[4, 4]);
    let e = build_requests(&ckpt, &[vec![missing]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"key.w\"") && e.contains("\"nope\""), "{e}");
    let outside = SliceRequest {
        dest: "key.w".into(),
        source: "w".into(),
        ranges: vec![vec![(0, 5)], vec![(0, 4)]],
    };
    let e = build_requests(&ckpt, &[vec![outside]])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"key.w\"") && e.contains("\"w\"") && e.contains("[0, 5)"),
        "{e}"
    );
    let e = build_requests(&ckpt, &[vec![whole.clone(), whole]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("requested twice"), "{e}");
}

#[test]
fn sub_byte_slices_must_fall_on_byte_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), &[("q", StDtype::F4, vec![2, 4], bytes(4, 3))]);
    let ok = SliceRequest {
        dest: "q".into(),
        source: "q".into(),
        ranges: vec![vec![(0, 2)], vec![(2, 4)]],
    };
    assert!(build_requests(&ckpt, &[vec![ok]]).is_ok());
    let odd = SliceRequest {
        dest: "q".into(),
        source: "q".into(),
        ranges: vec![vec![(0, 2)], vec![(1, 2)]],
    };
    let e = build_requests(&ckpt, &[vec![odd]]).unwrap_err().to_string();
    assert!(e.contains("byte boundaries"), "{e}");
}

#[test]
fn empty_and_scalar_requests() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(
        dir.path(),
        &[
            ("s", StDtype::BF16, vec![], bytes(2, 5)),
            ("w", StDtype::U8, vec![3, 2], bytes(6, 9)),
        ],
    );
    let file = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let reqs = vec![vec![
        SliceRequest::whole("s", "s", &[]),
        SliceRequest {
            dest: "w".into(),
            source: "w".into(),
            ranges: vec![vec![(3, 3)], vec![(0, 2)]],
        },
    ]];
    let plan = build_requests(&ckpt, &reqs).unwrap();
    let rp = &plan.ranks[0];
    let s = rp.tensors.iter().find(|t| t.name == "s").unwrap();
    let w = rp.tensors.iter().find(|t| t.name == "w").unwrap();
    assert_eq!((s.shape.as_slice(), s.bytes), (&[][..], 2));
    assert_eq!((w.shape.as_slice(), w.bytes), (&[0u64, 2][..], 0));
    let arena = execute(&plan, 0, &file);
    assert_eq!(&arena[s.offset as usize..][..2], &bytes(2, 5)[..]);
}

/// Shapes up to 4 dims and per-dim range lists (possibly empty, abutting or out of order).
fn case() -> impl Strategy<Value = (Vec<u64>, Vec<DimRanges>, usize)> {
    proptest::collection::vec(1u64..7, 1..5).prop_flat_map(|shape| {
        let ranges: Vec<_> = shape
            .iter()
            .map(|&n| {
                proptest::collection::vec((0..=n, 0..=n), 1..4).prop_map(|v| {
                    v.into_iter()
                        .map(|(a, b)| (a.min(b), a.max(b)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        (
            Just(shape),
            ranges,
            prop_oneof![Just(1usize), Just(2), Just(4)],
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever the ranges, the runs put exactly the gathered elements at the tensor's place.
    #[test]
    fn runs_copy_exactly_the_requested_elements((shape, ranges, elem) in case()) {
        let dir = tempfile::tempdir().unwrap();
        let n: u64 = shape.iter().product();
        let data = bytes(n as usize * elem, 11);
        let dt = match elem { 1 => StDtype::U8, 2 => StDtype::BF16, _ => StDtype::F32 };
        let ushape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let ckpt = checkpoint(dir.path(), &[("t", dt, ushape, data.clone())]);
        let file = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let req = SliceRequest { dest: "t".into(), source: "t".into(), ranges: ranges.clone() };
        let plan = build_requests(&ckpt, &[vec![req]]).unwrap();
        let t = &plan.ranks[0].tensors[0];
        let want = gather(&data, &shape, &ranges, elem);
        prop_assert_eq!(t.bytes as usize, want.len());
        let arena = execute(&plan, 0, &file);
        prop_assert_eq!(&arena[t.offset as usize..(t.offset + t.bytes) as usize], &want[..]);
        prop_assert_eq!(t.dtype, match elem { 1 => Dtype::U8, 2 => Dtype::BF16, _ => Dtype::F32 });
    }
}
