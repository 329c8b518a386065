//! A sealed record from an untrusted queue: opened only if it is exactly what was sealed, never
//! a panic; a record sealed here opens back, and any change to it is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ppml_core::envelope::Keyring;

fuzz_target!(|data: &[u8]| {
    let ring = Keyring::new([("k1", &[7u8; 32][..]), ("k2", &[9u8; 32][..])], "k1").unwrap();
    let _ = ring.opened_len(data);
    let _ = ring.open(data, b"aad");
    let sealed = ring.seal(data, b"aad").unwrap();
    assert_eq!(ring.open(&sealed, b"aad").unwrap(), data);
    if !data.is_empty() {
        let mut altered = sealed.clone();
        let at = data[0] as usize % altered.len();
        altered[at] ^= 1 << (data.len() % 8);
        assert!(ring.open(&altered, b"aad").is_err());
    }
});
