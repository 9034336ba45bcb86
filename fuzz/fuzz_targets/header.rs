//! Fuzzes the strict header parser: it must never panic, and whatever it accepts the
//! reference implementation must accept too (we are never more lenient).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ours = safeshard::checkpoint::parse_header("fuzz", data, data.len() as u64);
    if let Ok(h) = ours {
        // Only called on inputs we accept: the reference's own overflow bug (PR #808) cannot
        // fire on them.
        let (n, meta) = safetensors::SafeTensors::read_metadata(data)
            .expect("parse_header accepted what the reference refuses");
        assert_eq!(n as u64, h.header_len);
        assert_eq!(meta.tensors().len(), h.tensors.len());
    }
});
