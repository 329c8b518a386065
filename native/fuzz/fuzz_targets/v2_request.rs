//! A KServe v2 REST body, with and without the binary extension's header length: refused or
//! decoded, never a panic, and what is decoded lies inside the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ppml_core::v2::{parse_request, InputData};

fuzz_target!(|data: &[u8]| {
    // the first two bytes pick a header length (or none), the rest is the body
    let (choice, body) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => (0, data),
    };
    let length = (choice != 0).then(|| (choice as usize % (body.len() + 2)).to_string());
    if let Ok(request) = parse_request(body, length.as_deref()) {
        for input in &request.inputs {
            let items: u64 = input.shape.iter().product();
            match &input.data {
                InputData::Binary { offset, len } => {
                    assert!(offset + len <= body.len());
                    assert_eq!(*len as u64, items * input.datatype.size as u64);
                }
                InputData::Decoded(bytes) => {
                    assert_eq!(bytes.len() as u64, items * input.datatype.size as u64);
                }
            }
        }
    }
});
