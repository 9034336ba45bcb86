//! Property tests of the header parser: random valid headers round-trip (in any key order, with
//! any padding), and random mutations never panic and are never accepted where the reference
//! refuses them.

use crate::checkpoint_support;

use checkpoint_support::st_bytes;
use proptest::prelude::*;
use safeshard::checkpoint::{parse_header, Dtype};
use safetensors::SafeTensors;

#[derive(Debug, Clone)]
struct Spec {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        "[a-z.0-9_]{0,12}",
        proptest::sample::select(Dtype::ALL.to_vec()),
        proptest::collection::vec(0u64..6, 0..4),
    )
        .prop_map(|(name, dtype, mut shape)| {
            // Sub-byte dtypes need element counts that fill whole bytes: 8 elements always do.
            if dtype.bits() % 8 != 0 {
                shape.push(8);
            }
            Spec { name, dtype, shape }
        })
}

/// Expected bytes of a tensor, computed independently of the crate.
fn size(s: &Spec) -> u64 {
    s.shape.iter().product::<u64>() * s.dtype.bits() / 8
}

/// A valid file from unique specs: data laid out in `order`, JSON keys in the specs' order,
/// fields in a chosen order, optional metadata, `pad` spaces after and `lead` before the JSON.
fn build(
    specs: &[Spec],
    order: &[usize],
    field_order: u8,
    lead: usize,
    pad: usize,
    meta: bool,
) -> (Vec<u8>, Vec<(u64, u64)>) {
    let mut offsets = vec![(0, 0); specs.len()];
    let mut pos = 0;
    for &i in order {
        let n = size(&specs[i]);
        offsets[i] = (pos, pos + n);
        pos += n;
    }
    let mut parts = Vec::new();
    if meta {
        parts.push(r#""__metadata__":{"format":"pt"}"#.to_string());
    }
    for (s, (b, e)) in specs.iter().zip(&offsets) {
        let shape: Vec<String> = s.shape.iter().map(u64::to_string).collect();
        let fields = [
            format!(r#""dtype":"{}""#, s.dtype),
            format!(r#""shape":[{}]"#, shape.join(",")),
            format!(r#""data_offsets":[{b},{e}]"#),
        ];
        let f: Vec<&str> = match field_order % 3 {
            0 => vec![&fields[0], &fields[1], &fields[2]],
            1 => vec![&fields[2], &fields[0], &fields[1]],
            _ => vec![&fields[1], &fields[2], &fields[0]],
        };
        parts.push(format!("{:?}:{{{}}}", s.name, f.join(",")));
    }
    let json = format!(
        "{}{{{}}}{}",
        " ".repeat(lead),
        parts.join(","),
        " ".repeat(pad)
    );
    (st_bytes(&json, pos as usize), offsets)
}

fn unique(specs: Vec<Spec>) -> Vec<Spec> {
    let mut seen = std::collections::HashSet::new();
    specs
        .into_iter()
        .filter(|s| seen.insert(s.name.clone()))
        .collect()
}

proptest! {
    #[test]
    fn valid_headers_round_trip(
        specs in proptest::collection::vec(spec(), 0..12).prop_map(unique),
        seed in any::<u64>(),
        field_order in 0u8..3,
        lead in 0usize..3,
        pad in 0usize..8,
        meta in any::<bool>(),
    ) {
        // A permutation of the data order from the seed.
        let mut order: Vec<usize> = (0..specs.len()).collect();
        let mut x = seed | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let (bytes, offsets) = build(&specs, &order, field_order, lead, pad, meta);
        let h = parse_header("p", &bytes, bytes.len() as u64).unwrap();
        prop_assert!(SafeTensors::read_metadata(&bytes).is_ok());
        prop_assert_eq!(h.tensors.len(), specs.len());
        prop_assert_eq!(h.metadata.is_some(), meta);
        for (s, off) in specs.iter().zip(&offsets) {
            let t = h.tensors.iter().find(|t| t.name == s.name).unwrap();
            prop_assert_eq!(t.dtype, s.dtype);
            prop_assert_eq!(&t.shape, &s.shape);
            prop_assert_eq!(t.data_offsets, *off);
        }
        // Tensors come back in data order.
        prop_assert!(h.tensors.windows(2).all(|w| w[0].data_offsets <= w[1].data_offsets));
    }

    #[test]
    fn mutations_never_panic_nor_accept_what_the_reference_refuses(
        specs in proptest::collection::vec(spec(), 1..5).prop_map(unique),
        edits in proptest::collection::vec((any::<u16>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let order: Vec<usize> = (0..specs.len()).collect();
        let (mut bytes, _) = build(&specs, &order, 0, 0, 0, false);
        for (at, byte, kind) in edits {
            let i = usize::from(at) % (bytes.len() + 1);
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                2 if i < bytes.len() => { bytes.remove(i); }
                _ => bytes.truncate(i),
            }
        }
        for len in [bytes.len() as u64, bytes.len() as u64 + 1, 0] {
            let _ = parse_header("p", &bytes, len);
        }
        if parse_header("p", &bytes, bytes.len() as u64).is_ok() {
            prop_assert!(SafeTensors::read_metadata(&bytes).is_ok());
        }
    }
}
