//! A KServe v2 REST response body from a worker's answer record: the outputs asked for, JSON
//! `data` or the binary extension (`binary_data_size`, the JSON part's size returned for the
//! `Inference-Header-Content-Length` header), in the document layout the Python encoder
//! (`codecs/v2.py`, removed with the Python request path) wrote.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::record::{self, TensorEntry};
use crate::v2::{py_repr, Datatype};

/// Why an answer could not be written as a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// The answer record does not parse (a worker bug: the gateway answers 500).
    #[error("{0}")]
    Record(#[from] record::RecordError),
    /// An output asked for is not in the answer.
    #[error("output {0} is not in the model's answer")]
    Missing(String),
    /// The classification extension cannot be applied as asked (a 400).
    #[error("{0}")]
    Classification(String),
    /// A BYTES output asked for as JSON holds bytes that are not UTF-8 (a 400).
    #[error("output {0} holds bytes that are not UTF-8 text, which JSON cannot carry: ask for it with parameters.binary_data = true")]
    NotText(String),
}

/// What the request asked of the response.
pub struct Wanted<'a> {
    pub model: &'a str,
    pub version: Option<&'a str>,
    pub id: Option<&'a str>,
    pub parameters: Option<&'a Map<String, Value>>,
    /// Requested outputs in order with whether each is binary; `None`: every output.
    pub outputs: Option<&'a [(String, bool)]>,
    pub binary_default: bool,
    /// Outputs asked for with the classification extension, and how many classes each.
    pub classification: &'a [(String, u64)],
    /// The model's class names (`labels` in its config), for the classification extension.
    pub labels: Option<&'a [String]>,
}

/// Most classes the classification extension may ask for.
pub const MAX_CLASS_COUNT: u64 = 1000;

#[derive(Serialize)]
struct Output<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: Cow<'a, [u64]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

#[derive(Serialize)]
struct Document<'a> {
    model_name: &'a str,
    outputs: Vec<Output<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<&'a Map<String, Value>>,
}

fn element(datatype: Datatype, bytes: &[u8]) -> Value {
    macro_rules! int {
        ($t:ty) => {
            Value::from(<$t>::from_le_bytes(bytes.try_into().unwrap_or_default()))
        };
    }
    match (datatype.name, bytes.len()) {
        ("BOOL", _) => Value::Bool(bytes[0] != 0),
        ("UINT8", _) => Value::from(bytes[0]),
        ("INT8", _) => Value::from(bytes[0] as i8),
        ("UINT16", _) => int!(u16),
        ("INT16", _) => int!(i16),
        ("UINT32", _) => int!(u32),
        ("INT32", _) => int!(i32),
        ("UINT64", _) => int!(u64),
        ("INT64", _) => int!(i64),
        ("FP16", _) => Value::from(f64::from(half::f16::from_le_bytes(
            bytes.try_into().unwrap_or_default(),
        ))),
        ("FP32", _) => Value::from(f64::from(f32::from_le_bytes(
            bytes.try_into().unwrap_or_default(),
        ))),
        _ => Value::from(f64::from_le_bytes(bytes.try_into().unwrap_or_default())),
    }
}

fn json_data(entry: &TensorEntry, data: &[u8]) -> Result<Value, ResponseError> {
    let datatype = Datatype::named(entry.datatype).unwrap_or(crate::v2::BYTES);
    if datatype.is_bytes() {
        let mut items = Vec::new();
        let mut rest = data;
        while let Some((prefix, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*prefix) as usize;
            let (item, tail) = tail.split_at(len.min(tail.len()));
            let text = std::str::from_utf8(item)
                .map_err(|_| ResponseError::NotText(py_repr(&entry.name)))?;
            items.push(Value::String(text.to_owned()));
            rest = tail;
        }
        return Ok(Value::Array(items));
    }
    Ok(Value::Array(
        data.chunks_exact(datatype.size)
            .map(|bytes| element(datatype, bytes))
            .collect(),
    ))
}

/// numpy's name of a v2 datatype (the words of the Python refusal).
fn numpy_name(datatype: &str) -> String {
    match datatype {
        "FP16" => "float16".into(),
        "FP32" => "float32".into(),
        "FP64" => "float64".into(),
        "BYTES" => "object".into(),
        other => other.to_ascii_lowercase(),
    }
}

/// Python's `f"{value:f}"`.
fn fixed(value: f64) -> String {
    if value.is_nan() {
        "nan".into()
    } else if value.is_infinite() {
        if value > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{value:.6}")
    }
}

/// The classification extension as Triton writes it (and the removed Python encoder): the `count`
/// best classes of each row of a float output (`[batch, classes]` or `[classes]`), best
/// first (ties in index order, NaN last), as `"score:index"` or `"score:index:label"`; the
/// BYTES tensor's shape and items.
pub fn classify(
    entry: &TensorEntry,
    data: &[u8],
    count: u64,
    labels: Option<&[String]>,
) -> Result<(Vec<u64>, Vec<String>), ResponseError> {
    let name = py_repr(&entry.name);
    let width = match entry.datatype {
        "FP16" => 2,
        "FP32" => 4,
        "FP64" => 8,
        _ => 0,
    };
    if width == 0 || !(1..=2).contains(&entry.shape.len()) {
        let shape: Vec<String> = entry.shape.iter().map(u64::to_string).collect();
        return Err(ResponseError::Classification(format!(
            "output {name}: classification needs float scores shaped [batch, classes], not {} [{}]",
            numpy_name(entry.datatype),
            shape.join(", ")
        )));
    }
    if count > MAX_CLASS_COUNT {
        return Err(ResponseError::Classification(format!(
            "output {name}: classification may ask for at most {MAX_CLASS_COUNT} classes"
        )));
    }
    let classes = entry.shape[entry.shape.len() - 1] as usize;
    let scores: Vec<f64> = data
        .chunks_exact(width)
        .map(|b| match width {
            2 => f64::from(half::f16::from_le_bytes([b[0], b[1]])),
            4 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => f64::from_le_bytes(b.try_into().unwrap_or_default()),
        })
        .collect();
    let count = (count as usize).min(classes);
    let rows = scores.len().checked_div(classes).unwrap_or(0);
    let mut items = Vec::with_capacity(rows * count);
    for row in scores.chunks_exact(classes.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // numpy's stable argsort of the negated scores: best first, NaN last
        order.sort_by(|&a, &b| match (row[a].is_nan(), row[b].is_nan()) {
            (false, false) => row[b].partial_cmp(&row[a]).unwrap_or(Ordering::Equal),
            (false, true) => Ordering::Less,
            (true, false) => Ordering::Greater,
            (true, true) => Ordering::Equal,
        });
        for &index in order.iter().take(count) {
            let mut text = format!("{}:{index}", fixed(row[index]));
            if let Some(label) = labels.and_then(|l| l.get(index)) {
                text.push(':');
                text.push_str(label);
            }
            items.push(text);
        }
    }
    let shape = if entry.shape.len() == 1 {
        vec![count as u64]
    } else {
        vec![rows as u64, count as u64]
    };
    Ok((shape, items))
}

/// The response body for the answer `answer` (a record), and the size of its JSON part when
/// any output is binary.
pub fn encode(
    answer: &[u8],
    wanted: &Wanted<'_>,
) -> Result<(Vec<u8>, Option<usize>), ResponseError> {
    let parsed = record::parse(answer)?;
    let all: Vec<(String, bool)>;
    let selected: &[(String, bool)] = match wanted.outputs {
        Some(outputs) => outputs,
        None => {
            all = parsed
                .tensors
                .iter()
                .map(|t| (t.name.clone(), wanted.binary_default))
                .collect();
            &all
        }
    };
    let mut described = Vec::with_capacity(selected.len());
    let mut chunks: Vec<Cow<'_, [u8]>> = Vec::new();
    for (name, binary) in selected {
        let entry = parsed
            .tensors
            .iter()
            .find(|t| t.name == *name)
            .ok_or_else(|| ResponseError::Missing(py_repr(name)))?;
        let data = &answer[entry.offset..entry.offset + entry.nbytes];
        if let Some((_, count)) = wanted.classification.iter().find(|(n, _)| n == name) {
            let (shape, items) = classify(entry, data, *count, wanted.labels)?;
            let (parameters, json) = if *binary {
                let mut serialized = Vec::new();
                for item in &items {
                    serialized.extend_from_slice(&(item.len() as u32).to_le_bytes());
                    serialized.extend_from_slice(item.as_bytes());
                }
                let size = serialized.len();
                chunks.push(Cow::Owned(serialized));
                (
                    Some(BinarySize {
                        binary_data_size: size,
                    }),
                    None,
                )
            } else {
                (
                    None,
                    Some(Value::Array(items.into_iter().map(Value::String).collect())),
                )
            };
            described.push(Output {
                name,
                datatype: "BYTES",
                shape: Cow::Owned(shape),
                parameters,
                data: json,
            });
            continue;
        }
        let (parameters, json) = if *binary {
            chunks.push(Cow::Borrowed(data));
            (
                Some(BinarySize {
                    binary_data_size: data.len(),
                }),
                None,
            )
        } else {
            (None, Some(json_data(entry, data)?))
        };
        described.push(Output {
            name,
            datatype: entry.datatype,
            shape: Cow::Borrowed(&entry.shape),
            parameters,
            data: json,
        });
    }
    let document = Document {
        model_name: wanted.model,
        outputs: described,
        model_version: wanted.version,
        id: wanted.id,
        parameters: wanted.parameters.filter(|p| !p.is_empty()),
    };
    let mut body = serde_json::to_vec(&document).unwrap_or_default();
    if chunks.is_empty() {
        return Ok((body, None));
    }
    let header = body.len();
    body.reserve_exact(chunks.iter().map(|c| c.len()).sum());
    for chunk in chunks {
        body.extend_from_slice(&chunk);
    }
    Ok((body, Some(header)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{pack, TensorIn};

    fn answer() -> Vec<u8> {
        let probabilities: Vec<u8> = [0.25f32, 0.75]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let text = [&2u32.to_le_bytes()[..], "\u{e9}".as_bytes()].concat();
        pack(
            &Map::new(),
            &[
                TensorIn {
                    name: "p",
                    datatype: "FP32",
                    shape: &[1, 2],
                    data: &probabilities,
                },
                TensorIn {
                    name: "t",
                    datatype: "BYTES",
                    shape: &[1],
                    data: &text,
                },
                TensorIn {
                    name: "k",
                    datatype: "INT64",
                    shape: &[1],
                    data: &(-3i64).to_le_bytes(),
                },
            ],
        )
        .unwrap()
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_answers_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let wanted = Wanted { model: "m", version: None, id: None, parameters: None,
                                  outputs: None, binary_default: false, classification: &[],
                                  labels: None };
            let _ = encode(&data, &wanted);
        }
    }

    #[test]
    fn json_and_binary_outputs_in_the_python_layout() {
        let wanted = Wanted {
            model: "m",
            version: Some("2"),
            id: Some("r1"),
            parameters: None,
            outputs: None,
            binary_default: false,
            classification: &[],
            labels: None,
        };
        let (body, size) = encode(&answer(), &wanted).unwrap();
        assert_eq!(size, None);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"model_name":"m","outputs":[{"name":"p","datatype":"FP32","shape":[1,2],"data":[0.25,0.75]},{"name":"t","datatype":"BYTES","shape":[1],"data":["é"]},{"name":"k","datatype":"INT64","shape":[1],"data":[-3]}],"model_version":"2","id":"r1"}"#
        );
        let picked = [("k".to_string(), false), ("p".to_string(), true)];
        let wanted = Wanted {
            outputs: Some(&picked),
            version: None,
            id: None,
            ..wanted
        };
        let (body, size) = encode(&answer(), &wanted).unwrap();
        let header = size.unwrap();
        assert_eq!(
            std::str::from_utf8(&body[..header]).unwrap(),
            r#"{"model_name":"m","outputs":[{"name":"k","datatype":"INT64","shape":[1],"data":[-3]},{"name":"p","datatype":"FP32","shape":[1,2],"parameters":{"binary_data_size":8}}]}"#
        );
        assert_eq!(&body[header..], &[0, 0, 128, 62, 0, 0, 64, 63]);
        let missing = [("q".to_string(), false)];
        let wanted = Wanted {
            outputs: Some(&missing),
            ..wanted
        };
        assert_eq!(
            encode(&answer(), &wanted),
            Err(ResponseError::Missing("'q'".into()))
        );
    }

    #[test]
    fn classification_in_the_python_layout() {
        let labels = ["no".to_string(), "yes".to_string()];
        let asked = [("p".to_string(), 2)];
        let picked = [("p".to_string(), false)];
        let wanted = Wanted {
            model: "m",
            version: None,
            id: None,
            parameters: None,
            outputs: Some(&picked),
            binary_default: false,
            classification: &asked,
            labels: Some(&labels),
        };
        let (body, _) = encode(&answer(), &wanted).unwrap();
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"model_name":"m","outputs":[{"name":"p","datatype":"BYTES","shape":[1,2],"data":["0.750000:1:yes","0.250000:0:no"]}]}"#
        );
        let binary = [("p".to_string(), true)];
        let one = [("p".to_string(), 1)];
        let wanted = Wanted {
            outputs: Some(&binary),
            classification: &one,
            labels: None,
            ..wanted
        };
        let (body, size) = encode(&answer(), &wanted).unwrap();
        let tail = &body[size.unwrap()..];
        assert_eq!(tail, [&10u32.to_le_bytes()[..], b"0.750000:1"].concat());
        let too_many = [("p".to_string(), 1001)];
        let wanted = Wanted {
            classification: &too_many,
            ..wanted
        };
        assert_eq!(
            encode(&answer(), &wanted),
            Err(ResponseError::Classification(
                "output 'p': classification may ask for at most 1000 classes".into()
            ))
        );
    }

    #[test]
    fn classification_ranks_ties_by_index_and_nan_last() {
        let scores: Vec<u8> = [f32::NAN, 0.5, 0.5, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let entry = TensorEntry {
            name: "s".into(),
            datatype: "FP32",
            shape: vec![4],
            offset: 0,
            nbytes: scores.len(),
        };
        let (shape, items) = classify(&entry, &scores, 4, None).unwrap();
        assert_eq!(shape, vec![4]);
        assert_eq!(items, ["1.000000:3", "0.500000:1", "0.500000:2", "nan:0"]);
    }
}
