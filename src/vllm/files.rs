//! The files a vLLM model directory needs beside `reshard --format vllm`'s weights.

use std::collections::BTreeSet;

use crate::checkpoint::{Checkpoint, Dtype};
use crate::{Error, Result};

/// Generation and tokenizer files copied as they are.
const COPIED: [&str; 9] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// config.json (edited as below) and the generation and tokenizer files found beside the
/// checkpoint. `untie`: write `tie_word_embeddings: false` (vLLM's `sharded_state` loader
/// never unties a tied config, so a model whose ranks hold the head apart from the embedding
/// must say untied).
pub(crate) fn side_files(ckpt: &Checkpoint, untie: bool) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    if let Some(config) = &ckpt.config {
        let mut config = config.clone();
        if untie {
            if let Some(obj) = config.as_object_mut() {
                obj.insert("tie_word_embeddings".into(), serde_json::Value::Bool(false));
            }
        }
        // vLLM's GPTQ config, when config.json does not list the quantized modules, reads
        // them off the checkpoint's files: every module with a non-float tensor. Off the
        // output's fused names that would miss gate_up_proj; write the list the original
        // checkpoint gives (vLLM maps checkpoint module names to its fused layers).
        if let Some(q) = config
            .get_mut("quantization_config")
            .and_then(|q| q.as_object_mut())
        {
            let gptq = q.get("quant_method").and_then(|m| m.as_str()) == Some("gptq");
            if gptq && !q.contains_key("modules_in_block_to_quantize") {
                let floats = [Dtype::F16, Dtype::BF16, Dtype::F32];
                let modules: BTreeSet<&str> = ckpt
                    .tensors
                    .iter()
                    .filter(|t| !floats.contains(&t.dtype))
                    .filter_map(|t| t.name.rsplit_once('.').map(|(m, _)| m))
                    .collect();
                q.insert(
                    "modules_in_block_to_quantize".into(),
                    serde_json::Value::from(modules.into_iter().collect::<Vec<_>>()),
                );
            }
        }
        let mut bytes = serde_json::to_vec_pretty(&config)
            .map_err(|e| Error::io("config.json", std::io::Error::other(e)))?;
        bytes.push(b'\n');
        files.push(("config.json".to_string(), bytes));
    }
    for name in COPIED {
        let path = ckpt.root.join(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {
                let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
                files.push((name.to_string(), bytes));
            }
            _ => {}
        }
    }
    Ok(files)
}
