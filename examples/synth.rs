//! Writes a synthetic checkpoint.
//!
//! `cargo run --release --example synth -- PRESET|CONFIG.json OUTDIR [--sparse] [--layers N] [--seed S] [--tied|--untied] [--max-file-bytes B]`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use safeshard::synth::{self, SynthOptions, PRESETS};

const USAGE: &str = "usage: synth PRESET|CONFIG.json OUTDIR [--sparse] [--layers N] [--seed S] [--tied|--untied] [--max-file-bytes B]";

fn parse_u64(flag: &str, v: Option<String>) -> Result<u64, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag}: {v:?} is not a non-negative integer"))
}

fn run() -> Result<(), (String, u8)> {
    let mut args = std::env::args().skip(1);
    let mut pos = Vec::new();
    let (mut sparse, mut layers, mut seed, mut tied, mut max) = (false, None, 0u64, None, None);
    while let Some(a) = args.next() {
        let r = match a.as_str() {
            "--sparse" => {
                sparse = true;
                Ok(())
            }
            "--layers" => parse_u64("--layers", args.next()).map(|v| layers = Some(v)),
            "--seed" => parse_u64("--seed", args.next()).map(|v| seed = v),
            "--max-file-bytes" => parse_u64("--max-file-bytes", args.next()).map(|v| max = Some(v)),
            "--tied" => {
                tied = Some(true);
                Ok(())
            }
            "--untied" => {
                tied = Some(false);
                Ok(())
            }
            "-h" | "--help" => {
                println!("{USAGE}\npresets: {}", PRESETS.join(", "));
                return Ok(());
            }
            s if s.starts_with('-') => Err(format!("unknown flag {s}")),
            _ => {
                pos.push(a);
                Ok(())
            }
        };
        r.map_err(|e| (format!("{e}\n{USAGE}"), 2))?;
    }
    let [preset, out] = pos.as_slice() else {
        return Err((USAGE.to_string(), 2));
    };
    // PRESET may also be a config.json of a real model.
    let mut opts = if preset.ends_with(".json") {
        let text = std::fs::read(preset).map_err(|e| (format!("{preset}: {e}"), 1))?;
        let cfg = serde_json::from_slice(&text).map_err(|e| (format!("{preset}: {e}"), 1))?;
        SynthOptions::from_config(cfg)
    } else {
        SynthOptions::preset(preset)
    }
    .map_err(|e| (e.to_string(), if e.is_usage() { 2 } else { 1 }))?;
    opts = opts.with_sparse(sparse).with_seed(seed);
    if let Some(l) = layers {
        opts = opts.with_layers(l);
    }
    if let Some(t) = tied {
        opts = opts.with_tied(t);
    }
    if let Some(m) = max {
        opts = opts.with_max_file_bytes(m);
    }
    let t0 = Instant::now();
    let dir = PathBuf::from(out);
    let n = synth::write_checkpoint(&dir, &opts)
        .map_err(|e| (e.to_string(), if e.is_usage() { 2 } else { 1 }))?;
    let files = synth::plan_files(&opts).map_err(|e| (e.to_string(), 1))?;
    let bytes: u64 = files.iter().map(|f| f.data_bytes).sum();
    println!(
        "{}: {n} tensors, {} files, {bytes} bytes of tensor data{} in {:.3} s",
        dir.display(),
        files.len(),
        if sparse { " (sparse)" } else { "" },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err((msg, code)) => {
            eprintln!("error: {msg}");
            ExitCode::from(code)
        }
    }
}
