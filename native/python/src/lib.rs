//! `ppml_serve._native`: ppml-core's envelope and record framing for the Python package.
//! Crypto runs with the GIL released; errors are the package's own exception classes.

mod batch;
mod front;
mod request;

use ppml_core::envelope::{EnvelopeError, Keyring as CoreKeyring};
use ppml_core::record;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyType};

pub(crate) fn package_error(py: Python<'_>, class: &str, message: String) -> PyErr {
    let found = py
        .import("ppml_serve.errors")
        .and_then(|errors| errors.getattr(class));
    match found.map(|class| class.cast_into::<PyType>()) {
        Ok(Ok(class)) => PyErr::from_type(class, message),
        Ok(Err(_)) => PyRuntimeError::new_err(message),
        Err(error) => error,
    }
}

fn envelope_error(py: Python<'_>, error: EnvelopeError) -> PyErr {
    match error {
        EnvelopeError::InvalidKey(why) => PyValueError::new_err(why),
        other => package_error(py, "IntegrityError", other.to_string()),
    }
}

/// Data keys by id: seals under the active key, opens under any key it holds.
#[pyclass(frozen, module = "ppml_serve._native")]
pub(crate) struct Keyring {
    pub(crate) inner: std::sync::Arc<CoreKeyring>,
}

#[pymethods]
impl Keyring {
    #[new]
    fn new(keys: &Bound<'_, PyDict>, active_key_id: &str) -> PyResult<Self> {
        let mut pairs: Vec<(String, Vec<u8>)> = Vec::with_capacity(keys.len());
        for (id, key) in keys.iter() {
            pairs.push((id.extract()?, key.extract()?));
        }
        let inner = CoreKeyring::new(
            pairs.iter().map(|(id, key)| (id.as_str(), key.as_slice())),
            active_key_id,
        )
        .map_err(|error| envelope_error(keys.py(), error))?;
        Ok(Self {
            inner: std::sync::Arc::new(inner),
        })
    }

    #[getter]
    fn active_key_id(&self) -> &str {
        self.inner.active_key_id()
    }

    /// Seal straight into the returned ``bytes`` (one allocation, no copy), GIL released.
    fn seal<'py>(
        &self,
        py: Python<'py>,
        plaintext: &[u8],
        aad: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let length = self.inner.sealed_len(plaintext.len());
        PyBytes::new_with(py, length, |out| {
            py.detach(|| self.inner.seal_into(plaintext, aad, out))
                .map_err(|error| envelope_error(py, error))
        })
    }

    /// Open straight into the returned ``bytes`` (one allocation, no copy), GIL released.
    fn open<'py>(
        &self,
        py: Python<'py>,
        record: &[u8],
        aad: &[u8],
    ) -> PyResult<Bound<'py, PyBytes>> {
        let length = self
            .inner
            .opened_len(record)
            .map_err(|error| envelope_error(py, error))?;
        PyBytes::new_with(py, length, |out| {
            py.detach(|| self.inner.open_into(record, aad, out))
                .map_err(|error| envelope_error(py, error))
        })
    }

    /// Open a worker's micro-batch and stack the rows that fit ``layout`` (see
    /// ``batch::open_batch``), GIL released.
    fn open_batch<'py>(
        &self,
        py: Python<'py>,
        records: Vec<PyBackedBytes>,
        aads: Vec<PyBackedBytes>,
        layout: PyRef<'_, batch::BatchLayout>,
        max_rows: u64,
    ) -> PyResult<batch::Opened<'py>> {
        batch::open_batch(py, &self.inner, records, aads, &layout.inner, max_rows)
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

/// A record's metadata (as JSON text) and its tensors as (name, datatype, shape, offset,
/// nbytes), every field checked; ``ProtocolError`` with the reason otherwise.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn parse_record(
    py: Python<'_>,
    data: &[u8],
) -> PyResult<(String, Vec<(String, &'static str, Vec<u64>, usize, usize)>)> {
    let parsed = record::parse(data)
        .map_err(|error| package_error(py, "ProtocolError", error.to_string()))?;
    let meta = serde_json::Value::Object(parsed.meta).to_string();
    let tensors = parsed
        .tensors
        .into_iter()
        .map(|t| (t.name, t.datatype, t.shape, t.offset, t.nbytes))
        .collect();
    Ok((meta, tensors))
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Keyring>()?;
    module.add_class::<front::Front>()?;
    module.add_class::<batch::BatchLayout>()?;
    module.add_class::<request::ModelInputs>()?;
    module.add_function(wrap_pyfunction!(parse_record, module)?)?;
    module.add_function(wrap_pyfunction!(batch::stack_batch, module)?)?;
    Ok(())
}
