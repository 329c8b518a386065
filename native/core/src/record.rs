//! Framing of tensors inside a queue record, before sealing (the format of
//! `ppml_serve.codecs.record`): no pickle, every field checked before anything is sized by it.
//!
//! Layout: `b"PT"`, version byte (1), 4-byte little-endian header length, a JSON header
//! `{"meta": {...}, "tensors": [{"name", "datatype", "shape"}, ...]}`, then each tensor's
//! raw C-order bytes in header order. A BYTES tensor's entry also gives its size
//! (`"nbytes"`), and its bytes are its elements each prefixed by a 4-byte little-endian length.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::v2::{bytes_count, Datatype, MAX_BYTES_ELEMENTS};

pub const MAGIC: &[u8; 3] = b"PT\x01";
pub const PREFIX_SIZE: usize = 7;
pub const MAX_HEADER: usize = 1 << 20;
pub const MAX_TENSORS: usize = 256;
pub const MAX_DIMS: usize = 16;
pub const MAX_DIM_SIZE: u64 = (1 << 31) - 1;

/// Why a record was refused; the words are those of the Python implementation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record too short")]
    TooShort,
    #[error("record has an unknown framing version")]
    UnknownVersion,
    #[error("record header length is invalid")]
    HeaderLength,
    #[error("record header is not valid")]
    Header,
    #[error("record tensor description is not valid")]
    Tensor,
    #[error("record is shorter than its header says")]
    Truncated,
    #[error("record names a tensor twice")]
    Duplicate,
    #[error("record has trailing bytes")]
    Trailing,
    #[error("record holds a malformed BYTES tensor")]
    Bytes,
}

/// One tensor of a record: where its bytes lie in the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<u64>,
    pub offset: usize,
    pub nbytes: usize,
}

/// A parsed record: its metadata object and its tensors, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub meta: Map<String, Value>,
    pub tensors: Vec<TensorEntry>,
}

fn item_size(datatype: &str) -> Option<(&'static str, usize)> {
    Datatype::named(datatype).map(|d| (d.name, d.size))
}

/// Bytes of a tensor of `shape` with items of `item` bytes; None past what a `u64` holds
/// (sixteen dimensions of 2^31 overflow any integer).
fn byte_size(item: usize, shape: &[u64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(item as u64, |size, d| size.checked_mul(*d))
}

/// A tensor's description: name, datatype, item size (0 for BYTES), shape and, for BYTES,
/// its declared size in bytes.
type Spec = (String, &'static str, usize, Vec<u64>, Option<u64>);

fn tensor_spec(spec: &Value) -> Result<Spec, RecordError> {
    let spec = spec.as_object().ok_or(RecordError::Tensor)?;
    let name = spec.get("name").and_then(Value::as_str);
    let datatype = spec.get("datatype").and_then(Value::as_str);
    let shape = spec.get("shape").and_then(Value::as_array);
    let (Some(name), Some(datatype), Some(shape)) = (name, datatype, shape) else {
        return Err(RecordError::Tensor);
    };
    let (datatype, item) = item_size(datatype).ok_or(RecordError::Tensor)?;
    if shape.len() > MAX_DIMS {
        return Err(RecordError::Tensor);
    }
    let dims = shape
        .iter()
        .map(|d| d.as_u64().filter(|d| *d <= MAX_DIM_SIZE))
        .collect::<Option<Vec<u64>>>()
        .ok_or(RecordError::Tensor)?;
    let nbytes = match (item, spec.get("nbytes")) {
        (0, Some(size)) => Some(size.as_u64().ok_or(RecordError::Tensor)?),
        (0, None) => return Err(RecordError::Tensor),
        (_, None) => None,
        (_, Some(_)) => return Err(RecordError::Tensor),
    };
    Ok((name.to_owned(), datatype, item, dims, nbytes))
}

/// Parse and check a record's framing; tensor bytes are located, not copied.
pub fn parse(data: &[u8]) -> Result<Record, RecordError> {
    if data.len() < PREFIX_SIZE {
        return Err(RecordError::TooShort);
    }
    if &data[..3] != MAGIC {
        return Err(RecordError::UnknownVersion);
    }
    let header_len = u32::from_le_bytes([data[3], data[4], data[5], data[6]]) as usize;
    if header_len > MAX_HEADER || PREFIX_SIZE + header_len > data.len() {
        return Err(RecordError::HeaderLength);
    }
    let mut offset = PREFIX_SIZE + header_len;
    let header: Value =
        serde_json::from_slice(&data[PREFIX_SIZE..offset]).map_err(|_| RecordError::Header)?;
    let (Some(meta), Some(specs)) = (
        header.get("meta").and_then(Value::as_object),
        header.get("tensors").and_then(Value::as_array),
    ) else {
        return Err(RecordError::Header);
    };
    if specs.len() > MAX_TENSORS {
        return Err(RecordError::Header);
    }
    let mut tensors: Vec<TensorEntry> = Vec::with_capacity(specs.len());
    for spec in specs {
        let (name, datatype, item, shape, declared) = tensor_spec(spec)?;
        let nbytes = declared
            .or_else(|| byte_size(item, &shape))
            .and_then(|size| usize::try_from(size).ok())
            .ok_or(RecordError::Truncated)?;
        let end = offset.checked_add(nbytes).ok_or(RecordError::Truncated)?;
        if end > data.len() {
            return Err(RecordError::Truncated);
        }
        if declared.is_some() {
            check_bytes(&data[offset..end], &shape)?;
        }
        if tensors.iter().any(|t| t.name == name) {
            return Err(RecordError::Duplicate);
        }
        tensors.push(TensorEntry {
            name,
            datatype,
            shape,
            offset,
            nbytes,
        });
        offset = end;
    }
    if offset != data.len() {
        return Err(RecordError::Trailing);
    }
    Ok(Record {
        meta: meta.clone(),
        tensors,
    })
}

/// A BYTES tensor's elements must be whole and as many as its shape says (and bounded).
fn check_bytes(data: &[u8], shape: &[u64]) -> Result<(), RecordError> {
    let count = byte_size(1, shape).map(u128::from);
    match (bytes_count(data), count) {
        (Some(found), Some(count)) if found == count && count <= MAX_BYTES_ELEMENTS => Ok(()),
        _ => Err(RecordError::Bytes),
    }
}

#[derive(Serialize)]
struct HeaderOut<'a> {
    meta: &'a Map<String, Value>,
    tensors: Vec<TensorOut<'a>>,
}

#[derive(Serialize)]
struct TensorOut<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    nbytes: Option<usize>,
}

/// One tensor to frame: its name, datatype, shape and raw C-order bytes (for BYTES, its
/// binary form).
pub struct TensorIn<'a> {
    pub name: &'a str,
    pub datatype: &'a str,
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

/// Frame tensors (and a small metadata object) as one record; refuses what `parse` would.
pub fn pack(meta: &Map<String, Value>, tensors: &[TensorIn<'_>]) -> Result<Vec<u8>, RecordError> {
    let mut record = head(meta, tensors)?;
    for tensor in tensors {
        record.extend_from_slice(tensor.data);
    }
    Ok(record)
}

/// A record's prefix and header for `tensors`, whose bytes follow it in order (so that a
/// record can be written straight into its envelope, part by part, without being joined).
pub fn head(meta: &Map<String, Value>, tensors: &[TensorIn<'_>]) -> Result<Vec<u8>, RecordError> {
    if tensors.len() > MAX_TENSORS {
        return Err(RecordError::Header);
    }
    for (index, tensor) in tensors.iter().enumerate() {
        let (_, item) = item_size(tensor.datatype).ok_or(RecordError::Tensor)?;
        if tensor.shape.len() > MAX_DIMS || tensor.shape.iter().any(|d| *d > MAX_DIM_SIZE) {
            return Err(RecordError::Tensor);
        }
        if item == 0 {
            check_bytes(tensor.data, tensor.shape)?;
        } else if byte_size(item, tensor.shape) != Some(tensor.data.len() as u64) {
            return Err(RecordError::Tensor);
        }
        if tensors[..index].iter().any(|t| t.name == tensor.name) {
            return Err(RecordError::Duplicate);
        }
    }
    let header = serde_json::to_vec(&HeaderOut {
        meta,
        tensors: tensors
            .iter()
            .map(|t| TensorOut {
                name: t.name,
                datatype: t.datatype,
                shape: t.shape,
                nbytes: item_size(t.datatype)
                    .filter(|(_, item)| *item == 0)
                    .map(|_| t.data.len()),
            })
            .collect(),
    })
    .map_err(|_| RecordError::Header)?;
    if header.len() > MAX_HEADER {
        return Err(RecordError::HeaderLength);
    }
    let body: usize = tensors.iter().map(|t| t.data.len()).sum();
    let mut record = Vec::with_capacity(PREFIX_SIZE + header.len() + body);
    record.extend_from_slice(MAGIC);
    record.extend_from_slice(&(header.len() as u32).to_le_bytes());
    record.extend_from_slice(&header);
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(header: &str, body: &[u8]) -> Vec<u8> {
        let mut record = MAGIC.to_vec();
        record.extend_from_slice(&(header.len() as u32).to_le_bytes());
        record.extend_from_slice(header.as_bytes());
        record.extend_from_slice(body);
        record
    }

    #[test]
    fn a_python_record_parses() {
        // what ppml_serve.codecs.record.pack writes for {"image": uint8 [1, 2, 2]}
        let header =
            r#"{"meta":{},"tensors":[{"name":"image","datatype":"UINT8","shape":[1,2,2]}]}"#;
        let record = parse(&frame(header, &[1, 2, 3, 4])).unwrap();
        assert_eq!(record.tensors.len(), 1);
        let tensor = &record.tensors[0];
        assert_eq!((tensor.name.as_str(), tensor.datatype), ("image", "UINT8"));
        assert_eq!(
            (tensor.shape.as_slice(), tensor.offset, tensor.nbytes),
            (&[1, 2, 2][..], 7 + header.len(), 4)
        );
        let packed = pack(
            &Map::new(),
            &[TensorIn {
                name: "image",
                datatype: "UINT8",
                shape: &[1, 2, 2],
                data: &[1, 2, 3, 4],
            }],
        )
        .unwrap();
        assert_eq!(
            packed,
            frame(header, &[1, 2, 3, 4]),
            "byte for byte what Python writes"
        );
    }

    fn single(datatype: &str, shape: &str) -> String {
        format!(
            r#"{{"meta":{{}},"tensors":[{{"name":"x","datatype":"{datatype}","shape":{shape}}}]}}"#
        )
    }

    #[test]
    fn malformed_records_are_refused_with_their_reason() {
        let twice = r#"{"meta":{},"tensors":[{"name":"x","datatype":"UINT8","shape":[1]},{"name":"x","datatype":"UINT8","shape":[1]}]}"#;
        let cases: Vec<(String, &[u8], RecordError)> = vec![
            ("{}".into(), b"", RecordError::Header),
            (single("FP32", "[2]"), b"1234", RecordError::Truncated),
            (single("UINT8", "[1]"), b"12", RecordError::Trailing),
            (single("UINT8", "[true]"), b"1", RecordError::Tensor),
            (single("UINT8", "[1.0]"), b"1", RecordError::Tensor),
            (single("UINT8", "[-1]"), b"1", RecordError::Tensor),
            (single("BF16", "[1]"), b"12", RecordError::Tensor),
            (
                single("UINT8", &format!("[{}]", ["2147483647"; 5].join(","))),
                b"",
                RecordError::Truncated,
            ),
            (twice.into(), b"12", RecordError::Duplicate),
        ];
        for (header, body, error) in cases {
            assert_eq!(parse(&frame(&header, body)), Err(error), "{header}");
        }
        assert_eq!(parse(b"PT\x01"), Err(RecordError::TooShort));
        assert_eq!(parse(b"PT\x02\0\0\0\0"), Err(RecordError::UnknownVersion));
        assert_eq!(
            parse(b"PT\x01\xff\xff\xff\x7f"),
            Err(RecordError::HeaderLength)
        );
    }

    fn binary_form(items: &[&[u8]]) -> Vec<u8> {
        items
            .iter()
            .flat_map(|item| {
                let mut element = (item.len() as u32).to_le_bytes().to_vec();
                element.extend_from_slice(item);
                element
            })
            .collect()
    }

    #[test]
    fn bytes_tensors_carry_their_size_and_whole_elements() {
        let data = binary_form(&[b"spam", b"", "\u{e9}t\u{e9}".as_bytes()]);
        let packed = pack(
            &Map::new(),
            &[TensorIn {
                name: "text",
                datatype: "BYTES",
                shape: &[3],
                data: &data,
            }],
        )
        .unwrap();
        let header = format!(
            r#"{{"meta":{{}},"tensors":[{{"name":"text","datatype":"BYTES","shape":[3],"nbytes":{}}}]}}"#,
            data.len()
        );
        assert_eq!(packed, frame(&header, &data), "what Python writes");
        let parsed = parse(&packed).unwrap();
        let entry = &parsed.tensors[0];
        assert_eq!(&packed[entry.offset..entry.offset + entry.nbytes], data);

        let bytes = |shape: &str, nbytes: &str| {
            format!(
                r#"{{"meta":{{}},"tensors":[{{"name":"t","datatype":"BYTES","shape":{shape}{nbytes}}}]}}"#
            )
        };
        let cases: Vec<(String, Vec<u8>, RecordError)> = vec![
            (bytes("[3]", ""), data.clone(), RecordError::Tensor),
            (
                bytes("[2]", &format!(r#","nbytes":{}"#, data.len())),
                data.clone(),
                RecordError::Bytes,
            ),
            (
                bytes("[1]", r#","nbytes":5"#),
                vec![9, 0, 0, 0, b'x'],
                RecordError::Bytes,
            ),
            (
                bytes("[1]", r#","nbytes":3"#),
                vec![0, 0, 0],
                RecordError::Bytes,
            ),
            (
                bytes("[1]", r#","nbytes":9"#),
                vec![0, 0, 0, 0],
                RecordError::Truncated,
            ),
            (bytes("[1]", r#","nbytes":-1"#), vec![], RecordError::Tensor),
            (
                single("UINT8", r#"[1],"nbytes":1"#),
                vec![1],
                RecordError::Tensor,
            ),
        ];
        for (header, body, error) in cases {
            assert_eq!(parse(&frame(&header, &body)), Err(error), "{header}");
        }
        let short = binary_form(&[b"a"]);
        let refused = pack(
            &Map::new(),
            &[TensorIn {
                name: "t",
                datatype: "BYTES",
                shape: &[2],
                data: &short,
            }],
        );
        assert_eq!(refused, Err(RecordError::Bytes));
    }

    fn datatype() -> impl Strategy<Value = (&'static str, usize)> {
        proptest::sample::select(
            crate::v2::DATATYPES
                .iter()
                .map(|d| (d.name, d.size))
                .collect::<Vec<_>>(),
        )
    }

    proptest! {
        #[test]
        fn packed_records_parse_back(tensors in proptest::collection::vec(
            (datatype(), proptest::collection::vec(0u64..4, 0..4)), 0..6)) {
            let named: Vec<(String, &str, Vec<u64>, Vec<u8>)> = tensors.iter().enumerate()
                .map(|(i, ((dt, size), shape))| {
                    let count: u64 = shape.iter().product();
                    (format!("t{i}"), *dt, shape.clone(), vec![i as u8; count as usize * size])
                }).collect();
            let inputs: Vec<TensorIn<'_>> = named.iter().map(|(n, dt, s, d)|
                TensorIn { name: n, datatype: dt, shape: s, data: d }).collect();
            let record = pack(&Map::new(), &inputs).unwrap();
            let parsed = parse(&record).unwrap();
            prop_assert_eq!(parsed.tensors.len(), named.len());
            for (entry, (name, dt, shape, data)) in parsed.tensors.iter().zip(&named) {
                prop_assert_eq!(&entry.name, name);
                prop_assert_eq!(entry.datatype, *dt);
                prop_assert_eq!(&entry.shape, shape);
                prop_assert_eq!(&record[entry.offset..entry.offset + entry.nbytes], data.as_slice());
            }
        }

        #[test]
        fn bytes_elements_parse_back(items in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..12), 0..8)) {
            let slices: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
            let data = binary_form(&slices);
            let shape = [items.len() as u64];
            let record = pack(&Map::new(), &[TensorIn {
                name: "t", datatype: "BYTES", shape: &shape, data: &data }]).unwrap();
            let parsed = parse(&record).unwrap();
            let entry = &parsed.tensors[0];
            prop_assert_eq!(&record[entry.offset..entry.offset + entry.nbytes], data.as_slice());
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&data);
        }

        #[test]
        fn arbitrary_headers_never_panic(header in "\\PC{0,200}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&frame(&header, &body));
        }
    }
}
