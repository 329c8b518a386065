//! A model's declared inputs as Python hands them to the native front (which checks every
//! request against them: ppml-core's ``request::check``).

use ppml_core::request::{Declared, Inputs};
use ppml_core::v2::Datatype;
use pyo3::prelude::*;

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
