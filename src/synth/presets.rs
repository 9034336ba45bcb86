//! Named shapes, from the `presets` of every `shard-specs/NAME.synth.json`: tiny ones for
//! tests and real-size ones (sparse) for planning benchmarks.

use super::{dtype_of, layout, SynthOptions, PRESETS};
use crate::sharding::registry;
use crate::{Error, Result};

/// Builds the options of a preset name (see [`PRESETS`]), with an optional `-tied` or
/// `-untied` suffix.
pub(crate) fn preset(name: &str) -> Result<SynthOptions> {
    let (base, tie) = if let Some(b) = name.strip_suffix("-untied") {
        (b, Some(false))
    } else if let Some(b) = name.strip_suffix("-tied") {
        (b, Some(true))
    } else {
        (name, None)
    };
    let Some(&(_, arch)) = registry::presets().iter().find(|(p, _)| *p == base) else {
        return Err(Error::UnknownPreset {
            name: name.to_string(),
            known: PRESETS.iter().map(|p| p.to_string()).collect(),
        });
    };
    let layout = layout(arch)?;
    let Some((_, config, max_file_bytes)) = layout.presets.into_iter().find(|(p, ..)| p == base)
    else {
        return Err(Error::Spec {
            file: format!("{arch}.synth.json"),
            line: None,
            key: Some("presets".into()),
            reason: format!("has no preset {base:?}, which the registry lists"),
        });
    };
    let mut o = SynthOptions {
        arch,
        dtype: dtype_of(&config)?,
        config,
        max_file_bytes,
        sparse: false,
        seed: 0,
    };
    if let Some(t) = tie {
        if layout.always_tied && !t {
            return Err(Error::invalid_argument(
                "preset",
                format!("{name:?}: {arch} checkpoints always tie the LM head to the embedding"),
            ));
        }
        o = o.with_tied(t);
    }
    Ok(o)
}
