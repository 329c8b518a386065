//! ppml-serve's wire contract, in one place for both languages: the AES-256-GCM envelope every
//! queue record is sealed in ([`envelope`]) and the framing of tensors inside a record
//! ([`record`]). The Python package uses them through the `ppml_serve._native` module; the
//! formats are those the Python implementation wrote before, so records already queued (or in
//! an AOF) still open.

pub mod batch;
pub mod envelope;
pub mod record;
pub mod request;
pub mod response;
pub mod v2;
