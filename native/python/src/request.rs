//! The gateway's admission of a REST inference request in one native call: decode the body
//! (ppml-core's v2 parser), check it against the model's declared inputs, and seal it as
//! its queue record, written part by part straight into the returned ``bytes``.

use ppml_core::envelope::Keyring;
use ppml_core::request::{check, record_head, tensors, CheckError, Declared, Inputs, Tensor};
use ppml_core::response;
use ppml_core::v2::{self, Datatype};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use crate::package_error;

/// A model's declared inputs, built once per served version.
#[pyclass(frozen, module = "ppml_serve._native")]
pub struct ModelInputs {
    pub(crate) inner: Inputs,
}

#[pymethods]
impl ModelInputs {
    /// ``model``'s name and its inputs as (name, v2 datatype, shape with -1 for any size).
    #[new]
    fn new(model: String, inputs: Vec<(String, String, Vec<i64>)>) -> PyResult<Self> {
        let inputs = inputs
            .into_iter()
            .map(|(name, datatype, shape)| {
                let datatype = Datatype::named(&datatype).ok_or_else(|| {
                    pyo3::exceptions::PyValueError::new_err(format!(
                        "input {name}: unknown datatype {datatype}"
                    ))
                })?;
                Ok(Declared {
                    name,
                    datatype,
                    shape,
                })
            })
            .collect::<PyResult<Vec<Declared>>>()?;
        Ok(Self {
            inner: Inputs { model, inputs },
        })
    }
}

/// The record (sealed, or plain for the insecure benchmark sealer) and what the response
/// needs: request id, parameters as JSON text ("" when none), requested outputs with
/// whether each is binary (None: all), the binary default and the classification counts.
pub type Prepared<'py> = (
    Bound<'py, PyBytes>,
    Option<String>,
    String,
    Option<Vec<(String, bool)>>,
    bool,
    Vec<(String, u64)>,
);

fn refusal(py: Python<'_>, error: CheckError) -> PyErr {
    match error {
        CheckError::Invalid(message) => package_error(py, "InvalidInput", message),
        CheckError::TooManyRows(message) => package_error(py, "PayloadTooLarge", message),
    }
}

/// `inputs` checked against `model` and written as one record, sealed (or plain), into the
/// returned ``bytes``: the one admission of REST and gRPC requests alike.
fn admit<'py>(
    py: Python<'py>,
    inputs: &[Tensor<'_>],
    model: &ModelInputs,
    max_rows: Option<u64>,
    seal: Option<(&Keyring, &[u8])>,
) -> PyResult<Bound<'py, PyBytes>> {
    check(inputs, &model.inner, max_rows).map_err(|error| refusal(py, error))?;
    let head = record_head(inputs)
        .map_err(|error| package_error(py, "InvalidInput", error.to_string()))?;
    let mut parts: Vec<&[u8]> = Vec::with_capacity(inputs.len() + 1);
    parts.push(&head);
    parts.extend(inputs.iter().map(|input| input.data));
    let total: usize = parts.iter().map(|part| part.len()).sum();
    match seal {
        Some((keyring, aad)) => PyBytes::new_with(py, keyring.sealed_len(total), |out| {
            py.detach(|| keyring.seal_parts_into(&parts, aad, out))
                .map_err(|error| package_error(py, "IntegrityError", error.to_string()))
        }),
        None => PyBytes::new_with(py, total, |out| {
            let mut at = 0;
            for part in &parts {
                out[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            Ok(())
        }),
    }
}

pub fn prepare<'py>(
    py: Python<'py>,
    body: &[u8],
    header_length: Option<&str>,
    model: &ModelInputs,
    max_rows: Option<u64>,
    seal: Option<(&Keyring, &[u8])>,
) -> PyResult<Prepared<'py>> {
    let request = py
        .detach(|| v2::parse_request(body, header_length))
        .map_err(|error| package_error(py, "InvalidInput", error.0))?;
    let record = admit(py, &tensors(&request, body), model, max_rows, seal)?;
    let parameters = if request.parameters.is_empty() {
        String::new()
    } else {
        serde_json::Value::Object(request.parameters).to_string()
    };
    Ok((
        record,
        request.id,
        parameters,
        request.outputs,
        request.binary_default,
        request.classification,
    ))
}

/// ``Keyring.seal_v2_request`` without the envelope: the plain record (the insecure
/// benchmark sealer frames it itself).
#[pyfunction]
#[pyo3(signature = (body, header_length, model, max_rows))]
pub fn pack_v2_request<'py>(
    py: Python<'py>,
    body: &[u8],
    header_length: Option<&str>,
    model: PyRef<'_, ModelInputs>,
    max_rows: Option<u64>,
) -> PyResult<Prepared<'py>> {
    prepare(py, body, header_length, &model, max_rows, None)
}

/// The REST response body for a worker's answer record (the layout of the Python
/// ``encode_response``), and the size of its JSON part when any output is binary.
#[pyfunction]
#[pyo3(signature = (answer, model, version, request_id, outputs, binary_default))]
pub fn encode_v2_response<'py>(
    py: Python<'py>,
    answer: &[u8],
    model: &str,
    version: Option<&str>,
    request_id: Option<&str>,
    outputs: Option<Vec<(String, bool)>>,
    binary_default: bool,
) -> PyResult<(Bound<'py, PyBytes>, Option<usize>)> {
    let wanted = response::Wanted {
        model,
        version,
        id: request_id,
        parameters: None,
        outputs: outputs.as_deref(),
        binary_default,
        classification: &[],
        labels: None,
    };
    let (body, size) = py
        .detach(|| response::encode(answer, &wanted))
        .map_err(|error| {
            let class = match error {
                response::ResponseError::NotText(_) => "InvalidInput",
                _ => "ProtocolError",
            };
            package_error(py, class, error.to_string())
        })?;
    Ok((PyBytes::new(py, &body), size))
}

/// Tensors another front end decoded (gRPC: name, v2 datatype, shape, raw bytes) checked
/// against ``model`` and written as one record: sealed with ``seal``'s keyring and
/// associated data, or plain. The same admission as REST bodies get.
pub fn admit_tensors<'py>(
    py: Python<'py>,
    decoded: &[(String, String, Vec<u64>, PyBackedBytes)],
    model: &ModelInputs,
    max_rows: Option<u64>,
    seal: Option<(&Keyring, &[u8])>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut inputs = Vec::with_capacity(decoded.len());
    for (name, datatype, shape, data) in decoded {
        let datatype = Datatype::named(datatype).ok_or_else(|| {
            package_error(
                py,
                "InvalidInput",
                format!("input {name}: unknown datatype"),
            )
        })?;
        inputs.push(Tensor {
            name,
            datatype,
            shape,
            data,
        });
    }
    admit(py, &inputs, model, max_rows, seal)
}

/// ``Keyring.seal_tensors`` without the envelope (the insecure benchmark sealer).
#[pyfunction]
pub fn pack_tensors<'py>(
    py: Python<'py>,
    decoded: Vec<(String, String, Vec<u64>, PyBackedBytes)>,
    model: PyRef<'_, ModelInputs>,
    max_rows: Option<u64>,
) -> PyResult<Bound<'py, PyBytes>> {
    admit_tensors(py, &decoded, &model, max_rows, None)
}
