//! The buffers pass: persistent buffers vLLM's model has that no checkpoint provides
//! (attention `_k_scale` ...), once per distinct module the rank holds. They are arena
//! tensors without copy runs (zero-filled by the plan); their value is written after the load.

use std::collections::BTreeMap;

use super::{Draft, OutTensor};
use crate::checkpoint::Dtype;
use crate::sharding::TensorKind;
use crate::Result;

/// Adds the rank's buffers as outputs, each next to the first tensor of its module.
pub(super) fn buffers(d: &mut Draft<'_>) -> Result<()> {
    let mut found: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (bi, b) in d.map.buffers.iter().enumerate() {
        for o in &d.outs {
            if let Some(caps) = b.with.matches(&o.name) {
                if let Some(name) = b.name.render(&caps) {
                    found.entry(name).or_insert((bi, o.order));
                }
            }
        }
    }
    for (name, (bi, order)) in found {
        let b = &d.map.buffers[bi];
        let bytes = b
            .dtype
            .byte_size(b.shape.iter().product())
            .ok_or_else(|| d.err(&name, "buffer size overflows".into()))?;
        d.outs.push(OutTensor {
            name,
            dtype: b.dtype,
            shape: b.shape.clone(),
            bytes,
            source: None,
            kind: TensorKind::Other,
            replicated: true,
            order,
            single: None,
            buffer: Some(b.value),
        });
    }
    Ok(())
}

/// The bytes of one element of `dtype` holding `value`, if `dtype` is a float type that
/// represents it exactly.
pub(crate) fn element(dtype: Dtype, value: f64) -> Option<Vec<u8>> {
    let f = value as f32;
    match dtype {
        Dtype::F64 => Some(value.to_le_bytes().to_vec()),
        Dtype::F32 if f as f64 == value => Some(f.to_le_bytes().to_vec()),
        Dtype::BF16 if f as f64 == value && f.to_bits() & 0xffff == 0 => {
            Some(((f.to_bits() >> 16) as u16).to_le_bytes().to_vec())
        }
        Dtype::F16 if f as f64 == value => f16_bits(f).map(|b| b.to_le_bytes().to_vec()),
        _ => None,
    }
}

/// IEEE half bits of `f` when exact (normal halves and zero only).
fn f16_bits(f: f32) -> Option<u16> {
    let bits = f.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if f == 0.0 {
        return Some(sign);
    }
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mant = bits & 0x7f_ffff;
    if !(1..=30).contains(&exp) || mant & 0x1fff != 0 {
        return None;
    }
    Some(sign | ((exp as u16) << 10) | (mant >> 13) as u16)
}
