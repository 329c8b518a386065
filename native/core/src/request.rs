//! A decoded KServe v2 request checked against the model's declared inputs, and laid out as
//! a queue record (the gateway's admission, before sealing). The refusals read word for word
//! as `ppml_serve.codecs.tensors.ModelSpec.check_inputs` writes them.

use serde_json::Map;

use crate::record::{self, RecordError, TensorIn};
use crate::v2::{py_repr, Datatype, InferRequest, InputData};

/// One declared input: its name, datatype and shape (`-1`: any size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<i64>,
}

/// What a model accepts (its name for the messages, its inputs in declared order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    pub model: String,
    pub inputs: Vec<Declared>,
}

/// Why a request does not fit its model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// A 400: what is wrong with which input.
    #[error("{0}")]
    Invalid(String),
    /// More rows than a worker takes in one request (the gateway answers 413).
    #[error("{0}")]
    TooManyRows(String),
}

fn python_list<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// One input of a request, wherever it was decoded from (a REST body, a gRPC message).
#[derive(Debug, Clone, Copy)]
pub struct Tensor<'a> {
    pub name: &'a str,
    pub datatype: Datatype,
    pub shape: &'a [u64],
    /// Raw little-endian items in C order (BYTES: their binary form).
    pub data: &'a [u8],
}

/// The inputs of a decoded REST request, their bytes borrowed from `body` or the request.
pub fn tensors<'a>(request: &'a InferRequest, body: &'a [u8]) -> Vec<Tensor<'a>> {
    request
        .inputs
        .iter()
        .map(|input| Tensor {
            name: &input.name,
            datatype: input.datatype,
            shape: &input.shape,
            data: match &input.data {
                InputData::Binary { offset, len } => &body[*offset..*offset + *len],
                InputData::Decoded(bytes) => bytes.as_slice(),
            },
        })
        .collect()
}

/// Every declared input present with its datatype and shape, nothing else, one batch size,
/// and at most `max_rows` rows.
pub fn check(
    inputs: &[Tensor<'_>],
    model: &Inputs,
    max_rows: Option<u64>,
) -> Result<(), CheckError> {
    for input in inputs {
        if !model
            .inputs
            .iter()
            .any(|declared| declared.name == input.name)
        {
            let mut expected: Vec<&str> = model.inputs.iter().map(|d| d.name.as_str()).collect();
            expected.sort_unstable();
            return Err(CheckError::Invalid(format!(
                "input {} is not an input of model {} (expected: {})",
                py_repr(input.name),
                py_repr(&model.model),
                expected.join(", ")
            )));
        }
    }
    for declared in &model.inputs {
        let where_ = format!("input {}", py_repr(&declared.name));
        let Some(input) = inputs.iter().find(|i| i.name == declared.name) else {
            return Err(CheckError::Invalid(format!("{where_} is missing")));
        };
        if input.datatype.name != declared.datatype.name {
            return Err(CheckError::Invalid(format!(
                "{where_}: datatype {} does not match the model's {}",
                input.datatype.name, declared.datatype.name
            )));
        }
        let fits = input.shape.len() == declared.shape.len()
            && declared
                .shape
                .iter()
                .zip(input.shape)
                .all(|(want, got)| *want == -1 || u64::try_from(*want).ok() == Some(*got));
        if !fits {
            return Err(CheckError::Invalid(format!(
                "{where_}: shape {} does not match the model's {} (-1 = any size)",
                python_list(input.shape),
                python_list(&declared.shape)
            )));
        }
    }
    let mut batch: Option<u64> = None;
    for input in inputs.iter().filter(|i| !i.shape.is_empty()) {
        match batch {
            Some(rows) if rows != input.shape[0] => {
                return Err(CheckError::Invalid(
                    "inputs disagree on the batch size (first dimension)".into(),
                ))
            }
            _ => batch = Some(input.shape[0]),
        }
    }
    if let (Some(rows), Some(limit)) = (batch, max_rows) {
        if rows > limit {
            return Err(CheckError::TooManyRows(format!(
                "the request has {rows} rows; at most {limit} per request (split it, or \
                 raise worker.max_rows_per_request)"
            )));
        }
    }
    Ok(())
}

/// The head (prefix and header) of the record of checked `inputs`, whose bytes follow it in
/// order: sealing writes them straight into the envelope
/// ([`crate::envelope::Keyring::seal_parts_into`]).
pub fn record_head(inputs: &[Tensor<'_>]) -> Result<Vec<u8>, RecordError> {
    let framed: Vec<TensorIn<'_>> = inputs
        .iter()
        .map(|input| TensorIn {
            name: input.name,
            datatype: input.datatype.name,
            shape: input.shape,
            data: input.data,
        })
        .collect();
    record::head(&Map::new(), &framed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Keyring;
    use crate::v2::parse_request;

    fn demo() -> Inputs {
        Inputs {
            model: "demo".into(),
            inputs: vec![Declared {
                name: "image".into(),
                datatype: Datatype::named("UINT8").unwrap(),
                shape: vec![-1, 2, 2],
            }],
        }
    }

    fn request(body: &str) -> InferRequest {
        parse_request(body.as_bytes(), None).unwrap()
    }

    fn checked(body: &str, model: &Inputs, max_rows: Option<u64>) -> Result<(), CheckError> {
        let parsed = request(body);
        check(&tensors(&parsed, body.as_bytes()), model, max_rows)
    }

    fn refusal(body: &str, max_rows: Option<u64>) -> CheckError {
        checked(body, &demo(), max_rows).expect_err("refused")
    }

    #[test]
    fn refusals_read_as_the_python_check_writes_them() {
        let input = |name: &str, datatype: &str, shape: &str, data: &str| {
            format!(
                r#"{{"inputs": [{{"name": "{name}", "datatype": "{datatype}", "shape": {shape}, "data": {data}}}]}}"#
            )
        };
        let cases = [
            (
                input("img", "UINT8", "[1, 2, 2]", "[1, 2, 3, 4]"),
                "input 'img' is not an input of model 'demo' (expected: image)",
            ),
            (
                input("image", "FP32", "[1, 2, 2]", "[1, 2, 3, 4]"),
                "input 'image': datatype FP32 does not match the model's UINT8",
            ),
            (
                input("image", "UINT8", "[1, 4]", "[1, 2, 3, 4]"),
                "input 'image': shape [1, 4] does not match the model's [-1, 2, 2] (-1 = any size)",
            ),
        ];
        for (body, message) in cases {
            assert_eq!(
                refusal(&body, None),
                CheckError::Invalid(message.into()),
                "{body}"
            );
        }
        let two = r#"{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 2], "data": [1, 2, 3, 4, 5, 6, 7, 8]}]}"#;
        assert_eq!(
            refusal(two, Some(1)),
            CheckError::TooManyRows(
                "the request has 2 rows; at most 1 per request (split it, or raise \
                 worker.max_rows_per_request)"
                    .into()
            )
        );
        checked(two, &demo(), Some(2)).unwrap();
        let mut pair = demo();
        pair.inputs.push(Declared {
            name: "mask".into(),
            datatype: Datatype::named("BOOL").unwrap(),
            shape: vec![-1],
        });
        assert_eq!(
            checked(two, &pair, None),
            Err(CheckError::Invalid("input 'mask' is missing".into()))
        );
        let disagree = r#"{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2, 2], "data": [1, 2, 3, 4, 5, 6, 7, 8]}, {"name": "mask", "datatype": "BOOL", "shape": [3], "data": [1, 0, 1]}]}"#;
        assert_eq!(
            checked(disagree, &pair, None),
            Err(CheckError::Invalid(
                "inputs disagree on the batch size (first dimension)".into()
            ))
        );
    }

    #[test]
    fn a_record_sealed_part_by_part_opens_as_the_joined_record() {
        let header = r#"{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2, 2], "parameters": {"binary_data_size": 4}}]}"#;
        let body = [header.as_bytes(), &[9, 8, 7, 6]].concat();
        let parsed = parse_request(&body, Some(&header.len().to_string())).unwrap();
        let inputs = tensors(&parsed, &body);
        check(&inputs, &demo(), None).unwrap();
        let head = record_head(&inputs).unwrap();
        let parts: Vec<&[u8]> = inputs.iter().map(|t| t.data).collect();
        let joined = [head.as_slice(), parts.concat().as_slice()].concat();
        let record = record::parse(&joined).unwrap();
        assert_eq!(record.tensors[0].shape, vec![1, 2, 2]);
        assert_eq!(&joined[record.tensors[0].offset..], &[9, 8, 7, 6]);

        let key = [7u8; 32];
        let keyring = Keyring::new([("k1", &key[..])], "k1").unwrap();
        let mut pieces: Vec<&[u8]> = vec![&head];
        pieces.extend(parts);
        let mut sealed = vec![0u8; keyring.sealed_len(joined.len())];
        keyring
            .seal_parts_into(&pieces, b"aad", &mut sealed)
            .unwrap();
        assert_eq!(keyring.open(&sealed, b"aad").unwrap(), joined);
        assert!(keyring.open(&sealed, b"other").is_err());
    }
}
