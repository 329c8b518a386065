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
    #[error("the output buffer has the wrong length")]
    OutputLength,
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

    fn header_len(&self) -> usize {
        4 + self.keys[self.active].id.len() + NONCE_SIZE
    }

    fn write_header(&self, nonce: &[u8; NONCE_SIZE], out: &mut [u8]) {
        let id = &self.keys[self.active].id;
        out[..2].copy_from_slice(MAGIC);
        out[2] = VERSION;
        out[3] = id.len() as u8; // at most 255: checked in new()
        out[4..4 + id.len()].copy_from_slice(id);
        out[4 + id.len()..4 + id.len() + NONCE_SIZE].copy_from_slice(nonce);
    }

    /// Length of the record that sealing `plaintext_len` bytes makes.
    pub fn sealed_len(&self, plaintext_len: usize) -> usize {
        self.header_len() + plaintext_len + TAG_SIZE
    }

    /// Seal `plaintext`, bound to `aad`, under the active key with a fresh random nonce.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut record = vec![0u8; self.sealed_len(plaintext.len())];
        self.seal_into(plaintext, aad, &mut record)?;
        Ok(record)
    }

    /// Seal into `out` (exactly [`Self::sealed_len`] bytes): the ciphertext is written once,
    /// straight from `plaintext`, with no intermediate copy.
    pub fn seal_into(
        &self,
        plaintext: &[u8],
        aad: &[u8],
        out: &mut [u8],
    ) -> Result<(), EnvelopeError> {
        let mut nonce = [0u8; NONCE_SIZE];
        self.random
            .fill(&mut nonce)
            .map_err(|_| EnvelopeError::Random)?;
        self.seal_with_nonce(plaintext, aad, nonce, out)
    }

    /// Seal the concatenation of `parts` into `out` (exactly [`Self::sealed_len`] of their
    /// total): each part is copied once, into place, and encrypted there.
    pub fn seal_parts_into(
        &self,
        parts: &[&[u8]],
        aad: &[u8],
        out: &mut [u8],
    ) -> Result<(), EnvelopeError> {
        let total: usize = parts.iter().map(|part| part.len()).sum();
        if out.len() != self.sealed_len(total) {
            return Err(EnvelopeError::OutputLength);
        }
        let mut nonce = [0u8; NONCE_SIZE];
        self.random
            .fill(&mut nonce)
            .map_err(|_| EnvelopeError::Random)?;
        let header_len = self.header_len();
        self.write_header(&nonce, out);
        let (header, rest) = out.split_at_mut(header_len);
        let (body, tag_out) = rest.split_at_mut(total);
        let mut at = 0;
        for part in parts {
            body[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let bound = [&*header, aad].concat();
        let tag = self.keys[self.active]
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound.as_slice()),
                body,
            )
            .map_err(|_| EnvelopeError::Authentication)?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(())
    }

    fn seal_with_nonce(
        &self,
        plaintext: &[u8],
        aad: &[u8],
        nonce: [u8; NONCE_SIZE],
        out: &mut [u8],
    ) -> Result<(), EnvelopeError> {
        if out.len() != self.sealed_len(plaintext.len()) {
            return Err(EnvelopeError::OutputLength);
        }
        let header_len = self.header_len();
        self.write_header(&nonce, out);
        let (header, body) = out.split_at_mut(header_len);
        let bound = [&*header, aad].concat();
        self.keys[self.active]
            .key
            .seal_in_place_scatter(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(bound.as_slice()),
                &mut [],
                plaintext,
                body,
            )
            .map_err(|_| EnvelopeError::Authentication)
    }

    /// Length of `record`'s plaintext, if it is an envelope of a key held here.
    pub fn opened_len(&self, record: &[u8]) -> Result<usize, EnvelopeError> {
        let (_, header_end) = self.parse(record)?;
        Ok(record.len() - header_end - TAG_SIZE)
    }

    /// The plaintext of `record` if it was sealed under one of these keys and bound to `aad`.
    pub fn open(&self, record: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        let mut plaintext = vec![0u8; self.opened_len(record)?];
        self.open_into(record, aad, &mut plaintext)?;
        Ok(plaintext)
    }

    /// Open into `out` (exactly [`Self::opened_len`] bytes), decrypting straight from the
    /// record. On an error `out` holds garbage and must be discarded.
    pub fn open_into(
        &self,
        record: &[u8],
        aad: &[u8],
        out: &mut [u8],
    ) -> Result<(), EnvelopeError> {
        let (key, header_end) = self.parse(record)?;
        let tag_start = record.len() - TAG_SIZE;
        if out.len() != tag_start - header_end {
            return Err(EnvelopeError::Authentication);
        }
        let bound = [&record[..header_end], aad].concat();
        let nonce = Nonce::try_assume_unique_for_key(&record[header_end - NONCE_SIZE..header_end])
            .map_err(|_| EnvelopeError::Authentication)?;
        key.open_separate_gather(
            nonce,
            Aad::from(bound.as_slice()),
            &record[header_end..tag_start],
            &record[tag_start..],
            out,
        )
        .map_err(|_| EnvelopeError::Authentication)
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
        let mut ours = vec![0u8; ring().sealed_len(12)];
        ring()
            .seal_with_nonce(b"tensor bytes", b"aad", [7u8; 12], &mut ours)
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
