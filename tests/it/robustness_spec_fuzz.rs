//! Fuzz-style property test of the spec language: random edits of the shipped specs (byte
//! flips, token swaps, line duplications, spliced numbers) never panic in `Spec::parse` or in
//! `sharding::resolve` on small checkpoints of the matching architecture.

use std::sync::OnceLock;

use proptest::prelude::*;
use safeshard::checkpoint::Checkpoint;
use safeshard::sharding::{self, Config, Spec};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;

/// (spec, its first tiny preset) for every shipped architecture of the registry.
fn specs() -> Vec<(&'static str, &'static str)> {
    Spec::shipped_names()
        .into_iter()
        .filter_map(|spec| {
            let preset = crate::common::tiny_presets()
                .into_iter()
                .find(|p| SynthOptions::preset(p).is_ok_and(|o| o.arch == spec))?;
            Some((spec, preset))
        })
        .collect()
}

/// (spec source, checkpoint) per architecture; checkpoints are sparse (no data written).
fn fixtures() -> &'static Vec<(String, Checkpoint, tempfile::TempDir)> {
    static F: OnceLock<Vec<(String, Checkpoint, tempfile::TempDir)>> = OnceLock::new();
    F.get_or_init(|| {
        specs()
            .iter()
            .map(|(spec, preset)| {
                let dir = tempfile::tempdir().expect("tempdir");
                let opts = SynthOptions::preset(preset)
                    .expect("preset")
                    .with_sparse(true);
                synth::write_checkpoint(dir.path(), &opts).expect("synth");
                let ckpt = Checkpoint::open(dir.path()).expect("open");
                let path = format!("{}/shard-specs/{spec}.shard", env!("CARGO_MANIFEST_DIR"));
                let src = std::fs::read_to_string(path).expect("spec source");
                (src, ckpt, dir)
            })
            .collect()
    })
}

const SNIPPETS: &[&str] = &[
    "0",
    "-1",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "{layer}",
    "**",
    "*",
    ",",
    "=",
    "==",
    "??",
    "/",
    "%",
    "/ 0",
    "% 0",
    "!",
    "&&",
    "\"",
    "#",
    "if",
    "stage(",
    "split(dim=",
    "heads(",
    "vocab(",
    "fused(",
    "unit=0",
    "count=0",
    "pad=0",
    "dim=9",
    "uneven",
    "optional",
    "experts(count=",
    "layers",
    "let x =",
    "alias \"a\" = \"\"",
    "kind",
    "arch",
    "\u{0}",
    "é",
    "cdiv(",
    "min(",
    "has(",
    "\n",
    "\t",
];

#[derive(Debug, Clone)]
enum Edit {
    Flip(u32, u8),
    Insert(u32, usize),
    DeleteRange(u32, u8),
    DupLine(u32),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<u32>(), any::<u8>()).prop_map(|(p, b)| Edit::Flip(p, b)),
        (any::<u32>(), 0..SNIPPETS.len()).prop_map(|(p, s)| Edit::Insert(p, s)),
        (any::<u32>(), any::<u8>()).prop_map(|(p, n)| Edit::DeleteRange(p, n)),
        any::<u32>().prop_map(Edit::DupLine),
    ]
}

fn apply(src: &str, edits: &[Edit]) -> String {
    let mut b = src.as_bytes().to_vec();
    for e in edits {
        let at = |p: u32, len: usize| if len == 0 { 0 } else { p as usize % (len + 1) };
        match *e {
            Edit::Flip(p, v) => {
                let n = b.len();
                if n > 0 {
                    b[p as usize % n] = v;
                }
            }
            Edit::Insert(p, s) => {
                let i = at(p, b.len());
                b.splice(i..i, SNIPPETS[s].bytes());
            }
            Edit::DeleteRange(p, n) => {
                let i = at(p, b.len());
                let j = (i + n as usize).min(b.len());
                b.drain(i..j);
            }
            Edit::DupLine(p) => {
                let lines: Vec<&[u8]> = b.split(|&c| c == b'\n').collect();
                let k = p as usize % lines.len().max(1);
                let mut out = Vec::new();
                for (i, l) in lines.iter().enumerate() {
                    out.extend_from_slice(l);
                    out.push(b'\n');
                    if i == k {
                        out.extend_from_slice(l);
                        out.push(b'\n');
                    }
                }
                b = out;
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_specs_never_panic(which in 0..specs().len(), edits in proptest::collection::vec(edit(), 1..6)) {
        let (src, ckpt, _) = &fixtures()[which];
        let text = apply(src, &edits);
        let Ok(spec) = Spec::parse(&text, "fuzz.shard") else { return Ok(()); };
        let Ok(config) = Config::from_checkpoint(ckpt, &[]) else { return Ok(()); };
        for (tp, pp, dp, ep) in [(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 2, 8)] {
            let topo = Topology { tp, pp, dp, ep, pp_layers: None };
            let _ = sharding::resolve(&spec, ckpt, &config, &topo);
        }
    }
}
