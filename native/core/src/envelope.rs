//! AES-256-GCM envelopes (the format of `ppml_serve.crypto.envelope`).
//!
//! Record layout: `b"PE"`, version byte (1), key-id length byte, key id (ASCII), 12-byte
//! nonce, then ciphertext and 16-byte tag. The header is authenticated together with the
//! caller's associated data (which binds model, request id and direction). Every failure to
//! open a record is the same opaque [`EnvelopeError::Authentication`], as Fernet does.

use std::fmt;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

pub const MAGIC: &[u8; 2] = b"PE";
pub const VERSION: u8 = 1;
pub const NONCE_SIZE: usize = NONCE_LEN;
pub const KEY_SIZE: usize = 32;
pub const TAG_SIZE: usize = 16;

/// Why a key ring could not be made, or a record sealed or opened. None carries key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("record is not a ppml-serve envelope")]
    NotEnvelope,
    #[error("record failed authentication")]
    Authentication,
    #[error("{0}")]
    InvalidKey(&'static str),
    #[error("the system's random generator failed")]
    Random,
}

struct DataKey {
    id: Vec<u8>,
    key: LessSafeKey,
}

/// Data keys by id: seals under the active key, opens under any key it holds (older keys
/// after a rotation keep earlier records readable). Its `Debug` names key ids only.
pub struct Keyring {
    keys: Vec<DataKey>,
    active: usize,
    random: SystemRandom,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self
            .keys
            .iter()
            .map(|k| String::from_utf8_lossy(&k.id).into_owned())
            .collect();
        f.debug_struct("Keyring")
            .field("active", &ids[self.active])
            .field("key_ids", &ids)
            .finish()
    }
}

impl Keyring {
    /// `keys`: (id, 32-byte key) pairs; `active`: the id new records are sealed under.
    pub fn new<'a>(
        keys: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        active: &str,
    ) -> Result<Self, EnvelopeError> {
        let mut ring = Vec::new();
        for (id, key) in keys {
            if id.is_empty() || id.len() > 255 || !id.is_ascii() {
                return Err(EnvelopeError::InvalidKey(
                    "a key id must be 1-255 ASCII characters",
                ));
            }
            if key.len() != KEY_SIZE {
                return Err(EnvelopeError::InvalidKey("data keys must be 256-bit"));
            }
            // the one copy this side makes is wiped once aws-lc holds the key
            let material = Zeroizing::new(key.to_vec());
            let unbound = UnboundKey::new(&AES_256_GCM, &material)
                .map_err(|_| EnvelopeError::InvalidKey("data keys must be 256-bit"))?;
            ring.push(DataKey {
                id: id.as_bytes().to_vec(),
                key: LessSafeKey::new(unbound),
            });
        }
        let active = ring.iter().position(|k| k.id == active.as_bytes()).ok_or(
            EnvelopeError::InvalidKey("the active key id is not among the keys"),
        )?;
        Ok(Self {
            keys: ring,
            active,
            random: SystemRandom::new(),
        })
    }

    pub fn active_key_id(&self) -> &str {
        // ids were checked to be ASCII
        std::str::from_utf8(&self.keys[self.active].id).unwrap_or_default()
    }

    fn header(&self, nonce: &[u8; NONCE_SIZE]) -> Vec<u8> {
        let id = &self.keys[self.active].id;
        let mut header = Vec::with_capacity(4 + id.len() + NONCE_SIZE);
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        header.push(id.len() as u8); // at most 255: checked in new()
        header.extend_from_slice(id);
        header.extend_from_slice(nonce);
        header
    }

    /// Seal `plaintext`, bound to `aad`, under the active key with a fresh random nonce.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut nonce = [0u8; NONCE_SIZE];
        self.random
            .fill(&mut nonce)
            .map_err(|_| EnvelopeError::Random)?;
        self.seal_with_nonce(plaintext, aad, nonce)
    }

    fn seal_with_nonce(
        &self,
        plaintext: &[u8],
        aad: &[u8],
        nonce: [u8; NONCE_SIZE],
    ) -> Result<Vec<u8>, EnvelopeError> {
        let header = self.header(&nonce);
        let mut record = Vec::with_capacity(header.len() + plaintext.len() + TAG_SIZE);
        record.extend_from_slice(&header);
        record.extend_from_slice(plaintext);
        let bound = [header.as_slice(), aad].concat();
        let tag = self.keys[self.active]
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound.as_slice()),
                &mut record[header.len()..],
            )
            .map_err(|_| EnvelopeError::Authentication)?;
        record.extend_from_slice(tag.as_ref());
        Ok(record)
    }

    /// The plaintext of `record` if it was sealed under one of these keys and bound to `aad`.
    pub fn open(&self, record: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let (key, header_end) = self.parse(record)?;
        let mut sealed = record[header_end..].to_vec();
        let bound = [&record[..header_end], aad].concat();
        let nonce = Nonce::try_assume_unique_for_key(&record[header_end - NONCE_SIZE..header_end])
            .map_err(|_| EnvelopeError::Authentication)?;
        let length = key
            .open_in_place(nonce, Aad::from(bound.as_slice()), &mut sealed)
            .map_err(|_| EnvelopeError::Authentication)?
            .len();
        sealed.truncate(length);
        Ok(sealed)
    }

    /// The key a record names and where its ciphertext starts.
    fn parse(&self, record: &[u8]) -> Result<(&LessSafeKey, usize), EnvelopeError> {
        if record.len() < 4 || &record[..2] != MAGIC || record[2] != VERSION {
            return Err(EnvelopeError::NotEnvelope);
        }
        let id_end = 4 + usize::from(record[3]);
        let header_end = id_end + NONCE_SIZE;
        if record.len() < header_end + TAG_SIZE {
            return Err(EnvelopeError::Authentication);
        }
        let id = &record[4..id_end];
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(EnvelopeError::Authentication)?;
        Ok((&key.key, header_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring() -> Keyring {
        Keyring::new([("old", &[1u8; 32][..]), ("new", &[2u8; 32][..])], "new").unwrap()
    }

    #[test]
    fn a_record_the_python_implementation_sealed_opens() {
        // cryptography's AESGCM, key 0x02 * 32, nonce 0x07 * 12, aad b"aad" (the format
        // records already queued or in an AOF were written in)
        let record = hex("504501036e6577070707070707070707070707\
                          f536b3630a36c4864e50bc62d041892b88b3a4a844352fd60812018a");
        assert_eq!(ring().open(&record, b"aad").unwrap(), b"tensor bytes");
        let ours = ring()
            .seal_with_nonce(b"tensor bytes", b"aad", [7u8; 12])
            .unwrap();
        assert_eq!(ours, record, "the same inputs must give the same record");
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn debug_output_names_ids_not_keys() {
        let text = format!("{:?}", ring());
        assert!(text.contains("new") && text.contains("old"));
        assert!(!text.contains("2, 2, 2"));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(Keyring::new([("k", &[0u8; 16][..])], "k").is_err());
        assert!(Keyring::new([("", &[0u8; 32][..])], "").is_err());
        assert!(Keyring::new([("k", &[0u8; 32][..])], "other").is_err());
        assert!(Keyring::new([("é", &[0u8; 32][..])], "é").is_err());
    }

    #[test]
    fn an_older_key_still_opens_its_records() {
        let old = Keyring::new([("old", &[1u8; 32][..])], "old").unwrap();
        let record = old.seal(b"before the rotation", b"a").unwrap();
        assert_eq!(ring().open(&record, b"a").unwrap(), b"before the rotation");
        let unknown = Keyring::new([("new", &[2u8; 32][..])], "new").unwrap();
        assert_eq!(
            unknown.open(&record, b"a"),
            Err(EnvelopeError::Authentication)
        );
    }

    proptest! {
        #[test]
        fn round_trip(plaintext in proptest::collection::vec(any::<u8>(), 0..4096),
                      aad in proptest::collection::vec(any::<u8>(), 0..64)) {
            let ring = ring();
            let record = ring.seal(&plaintext, &aad).unwrap();
            prop_assert_eq!(ring.open(&record, &aad).unwrap(), plaintext);
        }

        #[test]
        fn every_flipped_bit_is_refused(plaintext in proptest::collection::vec(any::<u8>(), 0..256),
                                        position in any::<proptest::sample::Index>(),
                                        bit in 0u8..8) {
            let ring = ring();
            let mut record = ring.seal(&plaintext, b"aad").unwrap();
            let at = position.index(record.len());
            record[at] ^= 1 << bit;
            prop_assert!(ring.open(&record, b"aad").is_err());
        }

        #[test]
        fn other_associated_data_is_refused(plaintext in proptest::collection::vec(any::<u8>(), 0..256)) {
            let ring = ring();
            let record = ring.seal(&plaintext, b"request").unwrap();
            prop_assert_eq!(ring.open(&record, b"reply"), Err(EnvelopeError::Authentication));
        }

        #[test]
        fn arbitrary_bytes_never_panic(record in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ring().open(&record, b"aad");
        }
    }
}
