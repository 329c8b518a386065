//! A queue record's framing: refused or parsed, never a panic; every tensor lies inside it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ppml_core::record::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = parse(data) {
        for tensor in &record.tensors {
            assert!(tensor.offset + tensor.nbytes <= data.len());
        }
    }
});
