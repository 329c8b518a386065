//! KServe v2 / Open Inference Protocol REST request bodies: JSON tensors and the binary tensor
//! extension (`Inference-Header-Content-Length`), decoded from untrusted bytes.
//!
//! Binary inputs are located in the body, not copied. JSON `data` arrays are read straight into
//! typed little-endian buffers, one pass, without a tree of values: a 60 MiB JSON request costs
//! its body and the tensor bytes, not a Python object per number. Every refusal is a
//! [`V2Error`] whose words are those the gateway answers with (HTTP 400).

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::record::{MAX_DIMS, MAX_DIM_SIZE};

/// A refusal of a request body, in the words the client is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct V2Error(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, V2Error> {
    Err(V2Error(message.into()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Unsigned,
    Signed,
    Float,
    Bytes,
}

/// A v2 datatype this service carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datatype {
    /// The v2 name (`FP32`).
    pub name: &'static str,
    /// numpy's name, used in error messages (`float32`).
    pub numpy: &'static str,
    /// Bytes per item; 0 for BYTES, whose items are length-prefixed (see [`bytes_count`]).
    pub size: usize,
    kind: Kind,
}

pub const DATATYPES: [Datatype; 12] = [
    Datatype {
        name: "BOOL",
        numpy: "bool",
        size: 1,
        kind: Kind::Bool,
    },
    Datatype {
        name: "UINT8",
        numpy: "uint8",
        size: 1,
        kind: Kind::Unsigned,
    },
    Datatype {
        name: "UINT16",
        numpy: "uint16",
        size: 2,
        kind: Kind::Unsigned,
    },
    Datatype {
        name: "UINT32",
        numpy: "uint32",
        size: 4,
        kind: Kind::Unsigned,
    },
    Datatype {
        name: "UINT64",
        numpy: "uint64",
        size: 8,
        kind: Kind::Unsigned,
    },
    Datatype {
        name: "INT8",
        numpy: "int8",
        size: 1,
        kind: Kind::Signed,
    },
    Datatype {
        name: "INT16",
        numpy: "int16",
        size: 2,
        kind: Kind::Signed,
    },
    Datatype {
        name: "INT32",
        numpy: "int32",
        size: 4,
        kind: Kind::Signed,
    },
    Datatype {
        name: "INT64",
        numpy: "int64",
        size: 8,
        kind: Kind::Signed,
    },
    Datatype {
        name: "FP16",
        numpy: "float16",
        size: 2,
        kind: Kind::Float,
    },
    Datatype {
        name: "FP32",
        numpy: "float32",
        size: 4,
        kind: Kind::Float,
    },
    Datatype {
        name: "FP64",
        numpy: "float64",
        size: 8,
        kind: Kind::Float,
    },
];

/// Variable-length byte strings (text). In a body or a record a BYTES tensor is its
/// elements in C order, each a 4-byte little-endian length and that many bytes: the binary
/// form of the KServe binary extension and of Triton's `raw_input_contents`.
pub const BYTES: Datatype = Datatype {
    name: "BYTES",
    numpy: "object",
    size: 0,
    kind: Kind::Bytes,
};

/// At most this many elements in one BYTES tensor: each becomes a Python object in the
/// gateway and the worker, so their number is bounded apart from the body's size.
pub const MAX_BYTES_ELEMENTS: u128 = 1 << 20;

impl Datatype {
    pub fn named(name: &str) -> Option<Datatype> {
        DATATYPES
            .iter()
            .copied()
            .find(|d| d.name == name)
            .or((name == BYTES.name).then_some(BYTES))
    }

    /// Whether items are length-prefixed byte strings (BYTES) rather than fixed-size.
    pub fn is_bytes(&self) -> bool {
        self.kind == Kind::Bytes
    }
}

/// The number of elements in a BYTES tensor's binary form, or `None` when `data` is not a
/// whole sequence of length-prefixed elements (a length past the end, a partial prefix).
pub fn bytes_count(data: &[u8]) -> Option<u128> {
    let mut rest = data;
    let mut count = 0u128;
    while !rest.is_empty() {
        let (prefix, tail) = rest.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*prefix)).ok()?;
        rest = tail.get(len..)?;
        count += 1;
    }
    Some(count)
}

/// Refuses a BYTES tensor whose binary form is malformed or does not hold `count` elements.
pub fn check_bytes(
    data: &[u8],
    count: Option<u128>,
    shape: &[u64],
    where_: &str,
) -> Result<(), V2Error> {
    let Some(found) = bytes_count(data) else {
        return refuse(format!(
            "{where_}: BYTES data must be elements each prefixed by its length \
             (4 bytes, little-endian)"
        ));
    };
    if Some(found) != count {
        return refuse(format!(
            "{where_}: BYTES data has {found} elements but shape {} needs {}",
            list(shape),
            count.map_or_else(|| "too many".into(), |n| n.to_string())
        ));
    }
    Ok(())
}

/// A BYTES tensor of `count` elements (`None`: past `u128`) within the bound, or the
/// service's words.
pub fn check_bytes_count(count: Option<u128>, where_: &str) -> Result<(), V2Error> {
    if count.is_none_or(|n| n > MAX_BYTES_ELEMENTS) {
        return refuse(format!(
            "{where_}: at most {MAX_BYTES_ELEMENTS} BYTES elements per tensor (split the request)"
        ));
    }
    Ok(())
}

/// Where an input's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputData {
    /// `len` bytes at `offset` of the body (the binary extension).
    Binary { offset: usize, len: usize },
    /// Read from JSON `data` into little-endian items.
    Decoded(Vec<u8>),
}

/// One decoded input tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<u64>,
    pub data: InputData,
}

/// A decoded request: its inputs, and which outputs to return and how.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    pub id: Option<String>,
    pub parameters: Map<String, Value>,
    pub inputs: Vec<Input>,
    /// Requested outputs in request order, with whether each is returned binary; `None`
    /// means every output, as `binary_default` says. A name given twice keeps its first
    /// position and its last setting (as a Python dict built in order would).
    pub outputs: Option<Vec<(String, bool)>>,
    pub binary_default: bool,
    /// Output name -> class count (the classification extension).
    pub classification: Vec<(String, u64)>,
}

/// `text` quoted as Python's `repr` quotes a string, so that messages read as they always have.
pub fn py_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A shape as Python writes a list of ints (`[1, 8, 8]`).
pub fn list(shape: &[u64]) -> String {
    let items: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", items.join(", "))
}

type Object<'a> = BTreeMap<String, &'a RawValue>;

fn first_byte(raw: &RawValue) -> u8 {
    raw.get().as_bytes().first().copied().unwrap_or(b' ')
}

/// `raw` as an object whose values stay unparsed, or `message`.
fn object<'a>(raw: &'a RawValue, message: impl Into<String>) -> Result<Object<'a>, V2Error> {
    if first_byte(raw) != b'{' {
        return refuse(message);
    }
    serde_json::from_str(raw.get()).or_else(|_| refuse(message))
}

/// `raw` as a JSON object of small values (parameters), or `message`.
fn value_object(raw: Option<&RawValue>, message: String) -> Result<Map<String, Value>, V2Error> {
    match raw {
        None => Ok(Map::new()),
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Object(map)) => Ok(map),
            _ => refuse(message),
        },
    }
}

fn value(raw: &RawValue) -> Value {
    serde_json::from_str(raw.get()).unwrap_or(Value::Null)
}

fn flag(parameters: &Map<String, Value>, key: &str, where_: &str) -> Result<bool, V2Error> {
    match parameters.get(key) {
        None => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => refuse(format!("{where_}: parameters.{key} must be true or false")),
    }
}

fn shape_of(raw: Option<&RawValue>, where_: &str) -> Result<Vec<u64>, V2Error> {
    let not_dims = || {
        V2Error(format!(
            "{where_}: shape must be a list of non-negative integers"
        ))
    };
    let dims: Vec<&RawValue> = match raw {
        Some(raw) if first_byte(raw) == b'[' => {
            serde_json::from_str(raw.get()).map_err(|_| not_dims())?
        }
        _ => return Err(not_dims()),
    };
    if dims.len() > MAX_DIMS {
        return refuse(format!(
            "{where_}: shape has {} dimensions (at most {MAX_DIMS})",
            dims.len()
        ));
    }
    let mut shape = Vec::with_capacity(dims.len());
    let mut out_of_range = false;
    for dim in dims {
        // read from the literal: a whole number past u64 is still an integer (and too large),
        // where a parsed JSON number would already be a float
        let text = dim.get();
        let digits = text
            .strip_prefix('-')
            .filter(|d| d.bytes().all(|b| b == b'0'));
        let digits = digits.unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(not_dims());
        }
        match digits.parse::<u64>() {
            Ok(d) if d <= MAX_DIM_SIZE => shape.push(d),
            _ => out_of_range = true,
        }
    }
    if out_of_range {
        return refuse(format!(
            "{where_}: shape dimensions must be between 0 and {MAX_DIM_SIZE}"
        ));
    }
    Ok(shape)
}

fn datatype_of(raw: Option<&RawValue>, where_: &str) -> Result<Datatype, V2Error> {
    let shown = match raw.map(value) {
        Some(Value::String(name)) => return datatype_named(&name, where_),
        None | Some(Value::Null) => py_repr("None"),
        Some(other) => py_repr(&other.to_string()),
    };
    Err(unsupported_datatype(&shown, where_))
}

fn unsupported_datatype(shown: &str, where_: &str) -> V2Error {
    let supported: Vec<&str> = DATATYPES.iter().chain([&BYTES]).map(|d| d.name).collect();
    V2Error(format!(
        "{where_}: unsupported datatype {shown} (supported: {})",
        supported.join(", ")
    ))
}

/// The datatype `name`, or the service's words for one it does not take.
pub fn datatype_named(name: &str, where_: &str) -> Result<Datatype, V2Error> {
    Datatype::named(name).ok_or_else(|| unsupported_datatype(&py_repr(name), where_))
}

/// A shape given as signed dimensions (gRPC's), within `MAX_DIMS` dimensions of
/// `0..=MAX_DIM_SIZE` each, or the service's words.
pub fn check_dims(dims: &[i64], where_: &str) -> Result<Vec<u64>, V2Error> {
    if dims.len() > MAX_DIMS {
        return refuse(format!(
            "{where_}: shape has {} dimensions (at most {MAX_DIMS})",
            dims.len()
        ));
    }
    dims.iter()
        .map(|d| u64::try_from(*d).ok().filter(|d| *d <= MAX_DIM_SIZE))
        .collect::<Option<Vec<u64>>>()
        .map_or_else(
            || {
                refuse(format!(
                    "{where_}: shape dimensions must be between 0 and {MAX_DIM_SIZE}"
                ))
            },
            Ok,
        )
}

/// The product of `factors` in decimal, however large (Python's integers in messages).
pub fn exact_product(factors: &[u64]) -> String {
    // little-endian limbs of 10^9
    let mut limbs: Vec<u64> = vec![1];
    for &factor in factors {
        let mut carry: u128 = 0;
        for limb in &mut limbs {
            let value = u128::from(*limb) * u128::from(factor) + carry;
            *limb = (value % 1_000_000_000) as u64;
            carry = value / 1_000_000_000;
        }
        while carry > 0 {
            limbs.push((carry % 1_000_000_000) as u64);
            carry /= 1_000_000_000;
        }
    }
    while limbs.len() > 1 && limbs.last() == Some(&0) {
        limbs.pop();
    }
    let mut text = limbs.last().map_or_else(String::new, u64::to_string);
    for limb in limbs.iter().rev().skip(1) {
        text.push_str(&format!("{limb:09}"));
    }
    text
}

/// Decode a request body. `header_length` is the `Inference-Header-Content-Length` header's
/// value, if the request has one (the binary tensor extension).
pub fn parse_request(body: &[u8], header_length: Option<&str>) -> Result<InferRequest, V2Error> {
    let json_size = match header_length {
        None => body.len(),
        Some(text) => {
            let size = parse_int(text).ok_or_else(|| {
                V2Error("Inference-Header-Content-Length must be an integer".into())
            })?;
            if size <= 0 || size as u128 > body.len() as u128 {
                return refuse("Inference-Header-Content-Length is outside the body");
            }
            size as usize
        }
    };
    let document = document(&body[..json_size])?;
    let request_id = match document.get("id").map(|raw| value(raw)) {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id),
        Some(_) => return refuse("id must be a string"),
    };
    let parameters = value_object(
        document.get("parameters").copied(),
        "parameters must be a JSON object".into(),
    )?;
    let raw_inputs: Vec<&RawValue> = match document.get("inputs") {
        Some(raw) if first_byte(raw) == b'[' => serde_json::from_str(raw.get())
            .or_else(|_| refuse("inputs must be a non-empty list"))?,
        _ => Vec::new(),
    };
    if raw_inputs.is_empty() {
        return refuse("inputs must be a non-empty list");
    }

    let binary = &body[json_size..];
    let mut offset = 0usize;
    let mut inputs: Vec<Input> = Vec::with_capacity(raw_inputs.len());
    for (position, raw) in raw_inputs.iter().enumerate() {
        let item = object(raw, format!("inputs[{position}] must be a JSON object"))?;
        let name = match item.get("name").map(|raw| value(raw)) {
            Some(Value::String(name)) if !name.is_empty() => name,
            _ => {
                return refuse(format!(
                    "inputs[{position}]: name must be a non-empty string"
                ))
            }
        };
        let where_ = format!("input {}", py_repr(&name));
        if inputs.iter().any(|input| input.name == name) {
            return refuse(format!("{where_} appears more than once"));
        }
        let datatype = datatype_of(item.get("datatype").copied(), &where_)?;
        let shape = shape_of(item.get("shape").copied(), &where_)?;
        // at most 16 dimensions of 2^31 - 1: the product fits in u128 only for a few, so
        // it is computed checked and a shape past any body's size is simply "too large"
        let count = shape
            .iter()
            .try_fold(1u128, |n, d| n.checked_mul(*d as u128));
        let item_parameters = value_object(
            item.get("parameters").copied(),
            format!("{where_}: parameters must be a JSON object"),
        )?;
        if datatype.is_bytes() {
            check_bytes_count(count, &where_)?;
        }
        let data = match item_parameters.get("binary_data_size") {
            Some(size) => {
                let Some(size) = size.as_u64() else {
                    return refuse(format!(
                        "{where_}: binary_data_size must be a non-negative integer"
                    ));
                };
                let needed = count.and_then(|n| n.checked_mul(datatype.size as u128));
                if !datatype.is_bytes() && needed != Some(size as u128) {
                    let needed = needed.map_or_else(|| "too many".into(), |n| n.to_string());
                    return refuse(format!(
                        "{where_}: binary_data_size {size} does not match shape {} of {} \
                         ({needed} bytes)",
                        list(&shape),
                        datatype.numpy
                    ));
                }
                let size = size as usize; // equal to a u128 product that is at most u64
                if offset
                    .checked_add(size)
                    .is_none_or(|end| end > binary.len())
                {
                    return refuse(format!(
                        "{where_}: binary data is shorter than binary_data_size"
                    ));
                }
                if datatype.is_bytes() {
                    let start = json_size + offset;
                    check_bytes(&body[start..start + size], count, &shape, &where_)?;
                }
                let located = InputData::Binary {
                    offset: json_size + offset,
                    len: size,
                };
                offset += size;
                located
            }
            None => {
                let Some(raw_data) = item.get("data") else {
                    return refuse(format!("{where_}: has neither data nor binary_data_size"));
                };
                let decoded = if datatype.is_bytes() {
                    decode_strings(raw_data, count, &shape, &where_)?
                } else {
                    decode_data(raw_data, datatype, count, &shape, &where_)?
                };
                InputData::Decoded(decoded)
            }
        };
        inputs.push(Input {
            name,
            datatype,
            shape,
            data,
        });
    }
    if offset != binary.len() {
        return refuse("binary data is longer than the inputs' binary_data_size");
    }

    let binary_default = flag(&parameters, "binary_data_output", "request")?;
    let mut classification: Vec<(String, u64)> = Vec::new();
    let outputs = match document.get("outputs") {
        None => None,
        Some(raw) => {
            if first_byte(raw) != b'[' {
                return refuse("outputs must be a list");
            }
            let raw_outputs: Vec<&RawValue> =
                serde_json::from_str(raw.get()).or_else(|_| refuse("outputs must be a list"))?;
            let mut outputs: Vec<(String, bool)> = Vec::with_capacity(raw_outputs.len());
            for (position, raw) in raw_outputs.iter().enumerate() {
                let item = object(raw, format!("outputs[{position}] must be a JSON object"))?;
                let name = match item.get("name").map(|raw| value(raw)) {
                    Some(Value::String(name)) => name,
                    _ => return refuse(format!("outputs[{position}]: name must be a string")),
                };
                let where_ = format!("output {}", py_repr(&name));
                let item_parameters = value_object(
                    item.get("parameters").copied(),
                    format!("{where_}: parameters must be a JSON object"),
                )?;
                let binary = if item_parameters.contains_key("binary_data") {
                    flag(&item_parameters, "binary_data", &where_)?
                } else {
                    binary_default
                };
                match outputs.iter_mut().find(|(known, _)| *known == name) {
                    Some(entry) => entry.1 = binary,
                    None => outputs.push((name.clone(), binary)),
                }
                if let Some(count) = item_parameters.get("classification") {
                    let Some(count) = count.as_u64().filter(|n| *n >= 1) else {
                        return refuse(format!(
                            "{where_}: parameters.classification must be a positive integer \
                             (the number of classes to return)"
                        ));
                    };
                    match classification.iter_mut().find(|(known, _)| *known == name) {
                        Some(entry) => entry.1 = count,
                        None => classification.push((name, count)),
                    }
                }
            }
            Some(outputs)
        }
    };
    Ok(InferRequest {
        id: request_id,
        parameters,
        inputs,
        outputs,
        binary_default,
        classification,
    })
}

/// An integer as Python's `int()` reads one from a header: optional spaces and sign, digits.
fn parse_int(text: &str) -> Option<i128> {
    let text = text.trim();
    let digits = text.strip_prefix('+').unwrap_or(text);
    if digits.is_empty() || digits.len() > 30 {
        return None;
    }
    digits.parse::<i128>().ok()
}

fn document(json: &[u8]) -> Result<Object<'_>, V2Error> {
    let not_json = |error: serde_json::Error| {
        if error.to_string().starts_with("recursion limit exceeded") {
            V2Error("request body is nested too deeply".into())
        } else {
            V2Error("request body is not valid JSON".into())
        }
    };
    let start = json.iter().position(|b| !b" \t\r\n".contains(b));
    if start.is_some_and(|at| json[at] == b'{') {
        return serde_json::from_slice::<Object<'_>>(json).map_err(not_json);
    }
    serde_json::from_slice::<Skip>(json).map_err(not_json)?;
    refuse("request must be a JSON object")
}

/// Any JSON value, skipped through `deserialize_any` so that the parser's nesting limit
/// applies (serde's `IgnoredAny` skips without one).
struct Skip;

impl<'de> serde::Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Skip, D::Error> {
        deserializer.deserialize_any(Skip)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = Skip;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// A JSON number or boolean, as the parser met it.
#[derive(Clone, Copy)]
enum Number {
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

/// Items written so far and where; the buffer is only grown while the count still fits the
/// declared shape, so a shape far larger than the body allocates nothing.
struct Items<'b> {
    datatype: Datatype,
    expected: u128,
    count: u128,
    out: &'b mut Vec<u8>,
    unreadable: bool,
}

impl Items<'_> {
    fn push(&mut self, number: Number) -> bool {
        self.count += 1;
        if self.count > self.expected {
            return true; // counted for the message, never stored
        }
        let out = &mut *self.out;
        let datatype = self.datatype;
        let stored = match datatype.kind {
            Kind::Bool => {
                let truth = match number {
                    Number::Bool(b) => b,
                    Number::Unsigned(n) => n != 0,
                    Number::Signed(n) => n != 0,
                    Number::Float(x) => x != 0.0,
                };
                out.push(u8::from(truth));
                true
            }
            Kind::Float => {
                let x = match number {
                    Number::Bool(b) => f64::from(u8::from(b)),
                    Number::Unsigned(n) => n as f64,
                    Number::Signed(n) => n as f64,
                    Number::Float(x) => x,
                };
                match datatype.size {
                    2 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
                    4 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                    _ => out.extend_from_slice(&x.to_le_bytes()),
                }
                true
            }
            Kind::Unsigned | Kind::Signed => match integer(number) {
                Some(n) => store_integer(out, n, datatype),
                None => false,
            },
            Kind::Bytes => false, // strings are read by `decode_strings`
        };
        if !stored {
            self.unreadable = true;
        }
        stored
    }
}

/// The integer a JSON value stands for: booleans as 0/1, floats only when whole.
fn integer(number: Number) -> Option<i128> {
    match number {
        Number::Bool(b) => Some(i128::from(u8::from(b))),
        Number::Unsigned(n) => Some(i128::from(n)),
        Number::Signed(n) => Some(i128::from(n)),
        Number::Float(x) if x.fract() == 0.0 && x.abs() < 1.9e19 => Some(x as i128),
        Number::Float(_) => None,
    }
}

fn store_integer(out: &mut Vec<u8>, n: i128, datatype: Datatype) -> bool {
    macro_rules! put {
        ($t:ty) => {
            match <$t>::try_from(n) {
                Ok(v) => {
                    out.extend_from_slice(&v.to_le_bytes());
                    true
                }
                Err(_) => false,
            }
        };
    }
    match (datatype.kind, datatype.size) {
        (Kind::Unsigned, 1) => put!(u8),
        (Kind::Unsigned, 2) => put!(u16),
        (Kind::Unsigned, 4) => put!(u32),
        (Kind::Unsigned, _) => put!(u64),
        (Kind::Signed, 1) => put!(i8),
        (Kind::Signed, 2) => put!(i16),
        (Kind::Signed, 4) => put!(i32),
        (_, _) => put!(i64),
    }
}

/// Walks `data` (flat or nested lists, or one scalar) pushing every leaf in order.
struct Leaves<'i, 'b>(&'i mut Items<'b>);

const UNREADABLE: &str = "unreadable";

impl<'de> DeserializeSeed<'de> for Leaves<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Leaves<'_, '_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("numbers, booleans or lists of them")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.number(Number::Bool(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.number(Number::Unsigned(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.number(Number::Signed(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.number(Number::Float(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Leaves(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

impl Leaves<'_, '_> {
    fn number<E: serde::de::Error>(self, number: Number) -> Result<(), E> {
        if self.0.push(number) {
            Ok(())
        } else {
            Err(E::custom(UNREADABLE))
        }
    }
}

fn decode_data(
    raw: &RawValue,
    datatype: Datatype,
    count: Option<u128>,
    shape: &[u64],
    where_: &str,
) -> Result<Vec<u8>, V2Error> {
    let text = raw.get();
    let expected = count.unwrap_or(u128::MAX);
    // every item takes at least one byte of JSON: a larger shape cannot match, so nothing
    // is reserved for it (and the count below only reports how many there were)
    let mut out = Vec::new();
    if expected <= text.len() as u128 {
        out.reserve_exact(expected as usize * datatype.size);
    }
    let mut items = Items {
        datatype,
        expected,
        count: 0,
        out: &mut out,
        unreadable: false,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let walked = Leaves(&mut items).deserialize(&mut deserializer);
    if walked.is_err() || items.unreadable {
        return refuse(format!(
            "{where_}: data cannot be read as {}",
            datatype.numpy
        ));
    }
    if items.count != expected {
        let needed = count.map_or_else(|| "too many".into(), |n| n.to_string());
        return refuse(format!(
            "{where_}: data has {} elements but shape {} needs {needed}",
            items.count,
            list(shape)
        ));
    }
    Ok(out)
}

/// Walks BYTES `data` (a string, or nested lists of strings) writing each string in the
/// binary form; stops storing, and only counts, past `expected`.
struct Strings<'b> {
    expected: u128,
    count: u128,
    out: &'b mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for &mut Strings<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for &mut Strings<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("strings or lists of them")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.count += 1;
        if self.count <= self.expected {
            let len = u32::try_from(v.len()).map_err(|_| E::custom(UNREADABLE))?;
            self.out.extend_from_slice(&len.to_le_bytes());
            self.out.extend_from_slice(v.as_bytes());
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(&mut *self)?.is_some() {}
        Ok(())
    }
}

/// BYTES `data` from JSON strings (UTF-8 text, as JSON can carry) into the binary form.
fn decode_strings(
    raw: &RawValue,
    count: Option<u128>,
    shape: &[u64],
    where_: &str,
) -> Result<Vec<u8>, V2Error> {
    let expected = count.unwrap_or(u128::MAX);
    let mut out = Vec::new();
    let mut strings = Strings {
        expected,
        count: 0,
        out: &mut out,
    };
    let mut deserializer = serde_json::Deserializer::from_str(raw.get());
    if (&mut strings).deserialize(&mut deserializer).is_err() {
        return refuse(format!(
            "{where_}: BYTES data must be strings (or lists of strings); send other bytes \
             with the binary extension"
        ));
    }
    if strings.count != expected {
        let needed = count.map_or_else(|| "too many".into(), |n| n.to_string());
        return refuse(format!(
            "{where_}: data has {} elements but shape {} needs {needed}",
            strings.count,
            list(shape)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(body: &str) -> Result<InferRequest, V2Error> {
        parse_request(body.as_bytes(), None)
    }

    fn refused(body: &str) -> String {
        parse(body).expect_err("must be refused").0
    }

    fn decoded(request: &InferRequest, index: usize) -> &[u8] {
        match &request.inputs[index].data {
            InputData::Decoded(bytes) => bytes,
            InputData::Binary { .. } => panic!("not decoded"),
        }
    }

    #[test]
    fn json_tensors_are_read_into_typed_buffers() {
        let request = parse(
            r#"{"id": "r1", "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2.5], [-3, true]]},
                {"name": "y", "datatype": "INT8", "shape": [3], "data": [-128, 127, 4.0]},
                {"name": "b", "datatype": "BOOL", "shape": [2], "data": [true, 0]},
                {"name": "h", "datatype": "FP16", "shape": [1], "data": 1.5}],
              "outputs": [{"name": "o", "parameters": {"binary_data": true, "classification": 3}}]}"#,
        )
        .unwrap();
        assert_eq!(request.id.as_deref(), Some("r1"));
        let floats: Vec<f32> = decoded(&request, 0)
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, [1.0, 2.5, -3.0, 1.0]);
        assert_eq!(decoded(&request, 1), [0x80, 0x7f, 4]);
        assert_eq!(decoded(&request, 2), [1, 0]);
        assert_eq!(decoded(&request, 3), half::f16::from_f32(1.5).to_le_bytes());
        assert_eq!(request.outputs, Some(vec![("o".into(), true)]));
        assert_eq!(request.classification, vec![("o".into(), 3)]);
    }

    #[test]
    fn bytes_tensors_are_read_from_strings_and_from_the_binary_form() {
        let request = parse(
            r#"{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [2, 1], "data": [["spam"], ["\u00e9"]]}]}"#,
        )
        .unwrap();
        assert_eq!(
            decoded(&request, 0),
            [
                &[4, 0, 0, 0][..],
                b"spam",
                &[2, 0, 0, 0],
                "\u{e9}".as_bytes()
            ]
            .concat()
        );
        let binary = [&[1u8, 0, 0, 0, 0xff][..], &[0, 0, 0, 0]].concat();
        let header = r#"{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}}]}"#;
        let body = [header.as_bytes(), &binary].concat();
        let request = parse_request(&body, Some(&header.len().to_string())).unwrap();
        assert_eq!(
            request.inputs[0].data,
            InputData::Binary {
                offset: header.len(),
                len: 9
            }
        );
        let binary_refused = |shape: &str, data: &[u8]| {
            let header = format!(
                r#"{{"inputs": [{{"name": "t", "datatype": "BYTES", "shape": {shape}, "parameters": {{"binary_data_size": {}}}}}]}}"#,
                data.len()
            );
            let body = [header.as_bytes(), data].concat();
            parse_request(&body, Some(&header.len().to_string()))
                .expect_err("refused")
                .0
        };
        assert_eq!(
            binary_refused("[3]", &binary),
            "input 't': BYTES data has 2 elements but shape [3] needs 3"
        );
        assert!(binary_refused("[1]", &[5, 0, 0, 0, b'a']).contains("prefixed by its length"));
        assert!(binary_refused("[1]", &[0, 0]).contains("prefixed by its length"));
        assert!(binary_refused("[2000000]", &[]).contains("at most 1048576 BYTES elements"));
        for (data, message) in [
            (r#"[1, 2]"#, "BYTES data must be strings"),
            (r#"["a", ["b", 3]]"#, "BYTES data must be strings"),
            (r#"["a"]"#, "data has 1 elements but shape [2] needs 2"),
        ] {
            let body = format!(
                r#"{{"inputs": [{{"name": "t", "datatype": "BYTES", "shape": [2], "data": {data}}}]}}"#
            );
            assert!(
                refused(&body).contains(message),
                "{data}: {}",
                refused(&body)
            );
        }
        assert!(refused(
            r#"{"inputs": [{"name": "t", "datatype": "STRING", "shape": [1], "data": ["a"]}]}"#
        )
        .ends_with("FP64, BYTES)"));
    }

    #[test]
    fn binary_inputs_are_located_not_copied() {
        let header = r#"{"inputs": [
            {"name": "a", "datatype": "UINT8", "shape": [3], "parameters": {"binary_data_size": 3}},
            {"name": "b", "datatype": "INT16", "shape": [1], "parameters": {"binary_data_size": 2}}],
            "parameters": {"binary_data_output": true}}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&[1, 2, 3, 4, 5]);
        let request = parse_request(&body, Some(&header.len().to_string())).unwrap();
        let at = header.len();
        assert_eq!(
            request.inputs[0].data,
            InputData::Binary { offset: at, len: 3 }
        );
        assert_eq!(
            request.inputs[1].data,
            InputData::Binary {
                offset: at + 3,
                len: 2
            }
        );
        assert!(request.binary_default && request.outputs.is_none());
    }

    #[test]
    fn bad_requests_are_refused_in_the_gateways_words() {
        let cases = [
            ("[1]", "request must be a JSON object"),
            ("{", "request body is not valid JSON"),
            (r#"{"inputs": [], "id": 3}"#, "id must be a string"),
            (r#"{"inputs": {}}"#, "inputs must be a non-empty list"),
            (r#"{"inputs": [3]}"#, "inputs[0] must be a JSON object"),
            (
                r#"{"inputs": [{"name": ""}]}"#,
                "inputs[0]: name must be a non-empty string",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "STRING", "shape": [1]}]}"#,
                "input 'x': unsupported datatype 'STRING' (supported: BOOL, UINT8, UINT16, \
                 UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64, BYTES)",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}]}"#,
                "input 'x': shape must be a list of non-negative integers",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2147483648]}]}"#,
                "input 'x': shape dimensions must be between 0 and 2147483647",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 1180591620717411303424]}]}"#,
                "input 'x': shape dimensions must be between 0 and 2147483647",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1.0]}]}"#,
                "input 'x': shape must be a list of non-negative integers",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}"#,
                "input 'x': has neither data nor binary_data_size",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [256]}]}"#,
                "input 'x': data cannot be read as uint8",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}"#,
                "input 'x': data cannot be read as int32",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}]}"#,
                "input 'x': data cannot be read as float32",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]}"#,
                "input 'x': data has 3 elements but shape [2, 2] needs 4",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                               {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}"#,
                "input 'x' appears more than once",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                   "parameters": {"binary_data_output": 1}}"#,
                "request: parameters.binary_data_output must be true or false",
            ),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
                   "outputs": [{"name": "o", "parameters": {"classification": 0}}]}"#,
                "output 'o': parameters.classification must be a positive integer \
                 (the number of classes to return)",
            ),
        ];
        for (body, message) in cases {
            assert_eq!(refused(body), message, "{body}");
        }
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(refused(&deep), "request body is nested too deeply");
        let body = format!(r#"{{"inputs": [{deep}]}}"#);
        assert_eq!(refused(&body), "inputs[0] must be a JSON object");
        let body = format!(
            r#"{{"inputs": [{{"name": "x", "datatype": "FP32", "shape": [0], "data": {deep}}}]}}"#
        );
        assert_eq!(refused(&body), "input 'x': data cannot be read as float32");
    }

    #[test]
    fn binary_sizes_are_checked_against_the_shape_and_the_body() {
        let header = r#"{"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]}"#;
        let error = parse_request(header.as_bytes(), Some(&header.len().to_string())).unwrap_err();
        assert_eq!(
            error.0,
            "input 'a': binary_data_size 4 does not match shape [2] of float32 (8 bytes)"
        );
        let header = r#"{"inputs": [{"name": "a", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.push(7);
        let length = header.len().to_string();
        let error = parse_request(&body, Some(&length)).unwrap_err();
        assert_eq!(
            error.0,
            "input 'a': binary data is shorter than binary_data_size"
        );
        body.extend_from_slice(&[8, 9]);
        let error = parse_request(&body, Some(&length)).unwrap_err();
        assert_eq!(
            error.0,
            "binary data is longer than the inputs' binary_data_size"
        );
        for bad in ["0", "-3", "x", &(body.len() + 1).to_string()] {
            let error = parse_request(&body, Some(bad)).unwrap_err();
            assert!(
                error.0.starts_with("Inference-Header-Content-Length"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn a_huge_shape_with_little_data_allocates_nothing() {
        let body = r#"{"inputs": [{"name": "x", "datatype": "FP64",
            "shape": [2147483647, 2147483647, 2147483647, 2147483647, 2147483647], "data": [1, 2]}]}"#;
        assert!(refused(body).starts_with("input 'x': data has 2 elements but shape"));
    }

    #[test]
    fn names_are_quoted_as_python_quotes_them() {
        assert_eq!(py_repr("x"), "'x'");
        assert_eq!(py_repr("it's"), "\"it's\"");
        assert_eq!(py_repr("a\nb\\"), "'a\\nb\\\\'");
        assert_eq!(py_repr("\u{1}"), "'\\x01'");
    }

    fn datatype() -> impl Strategy<Value = Datatype> {
        proptest::sample::select(DATATYPES.to_vec())
    }

    /// A request's JSON with one input of `datatype` whose `items` are given in `data`.
    fn json_request(datatype: Datatype, items: &[i64]) -> String {
        let data: Vec<String> = items
            .iter()
            .map(|n| match datatype.kind {
                Kind::Bool => (n % 2 != 0).to_string(),
                Kind::Unsigned => (n.unsigned_abs() % 200).to_string(),
                _ => (n % 100).to_string(),
            })
            .collect();
        format!(
            r#"{{"inputs": [{{"name": "t", "datatype": "{}", "shape": [{}], "data": [{}]}}]}}"#,
            datatype.name,
            items.len(),
            data.join(",")
        )
    }

    proptest! {
        #[test]
        fn json_inputs_decode_to_their_item_size(
            datatype in datatype(), items in proptest::collection::vec(any::<i64>(), 0..40)) {
            let request = parse(&json_request(datatype, &items)).unwrap();
            prop_assert_eq!(decoded(&request, 0).len(), items.len() * datatype.size);
            prop_assert_eq!(&request.inputs[0].shape, &vec![items.len() as u64]);
        }

        #[test]
        fn binary_inputs_cover_the_body_exactly(
            tensors in proptest::collection::vec((datatype(), 0u64..5), 1..5),
            payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let specs: Vec<String> = tensors.iter().enumerate().map(|(i, (d, n))| format!(
                r#"{{"name": "t{i}", "datatype": "{}", "shape": [{n}], "parameters": {{"binary_data_size": {}}}}}"#,
                d.name, *n as usize * d.size)).collect();
            let header = format!(r#"{{"inputs": [{}]}}"#, specs.join(","));
            let needed: usize = tensors.iter().map(|(d, n)| *n as usize * d.size).sum();
            let mut body = header.clone().into_bytes();
            body.extend(payload.iter().cycle().take(needed.max(payload.len().min(needed))));
            let parsed = parse_request(&body, Some(&header.len().to_string()));
            if payload.is_empty() && needed > 0 {
                prop_assert!(parsed.is_err());
            } else {
                let request = parsed.unwrap();
                let mut at = header.len();
                for input in &request.inputs {
                    let InputData::Binary { offset, len } = input.data else { panic!() };
                    prop_assert_eq!(offset, at);
                    at += len;
                }
                prop_assert_eq!(at, body.len());
            }
        }

        #[test]
        fn bytes_count_never_panics_and_counts_whole_elements(
            data in proptest::collection::vec(any::<u8>(), 0..64),
            items in proptest::collection::vec("\\PC{0,6}", 0..6)) {
            let _ = bytes_count(&data);
            let form: Vec<u8> = items.iter().flat_map(|item| {
                let mut element = (item.len() as u32).to_le_bytes().to_vec();
                element.extend_from_slice(item.as_bytes());
                element
            }).collect();
            prop_assert_eq!(bytes_count(&form), Some(items.len() as u128));
            let json = serde_json::to_string(&items).unwrap();
            let body = format!(r#"{{"inputs": [{{"name": "t", "datatype": "BYTES", "shape": [{}], "data": {json}}}]}}"#, items.len());
            let request = parse(&body).unwrap();
            prop_assert_eq!(decoded(&request, 0), form.as_slice());
        }

        #[test]
        fn arbitrary_bodies_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            split in proptest::option::of(0usize..320)) {
            let length = split.map(|n| n.to_string());
            let _ = parse_request(&body, length.as_deref());
        }

        #[test]
        fn arbitrary_json_never_panics(text in r#"\{"inputs":\[\{("name":"[a-z]{0,2}"|"datatype":"(FP32|UINT8|BOOL|X)"|"shape":\[[0-9,\-]{0,6}\]|"data":[\[\]0-9.,a-z\-]{0,12}|"parameters":\{"binary_data_size":[0-9]{0,2}\}|,){0,8}\}\]\}"#) {
            let _ = parse(&text);
            let length = text.len().to_string();
            let _ = parse_request(text.as_bytes(), Some(&length));
        }
    }
}
