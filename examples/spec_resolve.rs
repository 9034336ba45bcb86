//! Times `spec::resolve` on real-size tensor lists (no files are written).
//!
//! `cargo run --release --example spec_resolve [-- RUNS]`
//!
//! For DeepSeek-V3 (about 92,000 tensors) and Llama-3.1-405B, builds the catalog from the
//! synthetic generator's name and shape list, then resolves the shipped spec for several
//! topologies, RUNS times each (default 7), interleaved, and prints the median wall time.

use std::time::Instant;

use safeshard::checkpoint::TensorInfo;
use safeshard::sharding::{resolve_tensors, Config, Spec};
use safeshard::synth::{self, SynthOptions};
use safeshard::topology::Topology;

fn main() -> safeshard::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    for preset in ["deepseek-v3", "llama3.1-405b"] {
        let opts = SynthOptions::preset(preset)?;
        let tensors: Vec<TensorInfo> = synth::tensors(&opts)?
            .into_iter()
            .map(|(name, dtype, shape)| TensorInfo {
                name,
                dtype,
                shape,
                file: 0,
                offset: 0,
                bytes: 0,
            })
            .collect();
        let config = Config::from_json(Some(&opts.config), &[])?;
        let spec = Spec::detect(&config)?;
        let topos = [
            ("tp=1", Topology::new(1, 1, 1, 1)?),
            ("tp=8", Topology::new(8, 1, 1, 1)?),
            ("tp=8 pp=8", Topology::new(8, 8, 1, 1)?),
            ("tp=8 pp=16", Topology::new(8, 16, 1, 1)?),
            ("tp=8 dp=2 ep=16", Topology::new(8, 1, 2, 16)?),
        ];
        let mut times = vec![Vec::new(); topos.len()];
        for _ in 0..runs {
            for (i, (_, t)) in topos.iter().enumerate() {
                let start = Instant::now();
                let r = resolve_tensors(&spec, &tensors, &config, t)?;
                times[i].push(start.elapsed().as_secs_f64());
                assert_eq!(r.tensors.len(), tensors.len());
            }
        }
        println!("{preset}: {} tensors, spec {}", tensors.len(), spec.name);
        for ((label, _), mut ts) in topos.iter().zip(times) {
            ts.sort_by(f64::total_cmp);
            let med = ts[ts.len() / 2];
            println!(
                "  {label:<16} median {:>8.1} ms  ({:.0} ns/tensor; min {:.1} ms, max {:.1} ms)",
                med * 1e3,
                med * 1e9 / tensors.len() as f64,
                ts[0] * 1e3,
                ts[ts.len() - 1] * 1e3
            );
        }
    }
    Ok(())
}
