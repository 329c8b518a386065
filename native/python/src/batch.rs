//! `Keyring.open_batch`: a worker's micro-batch opened and stacked in one call (ppml-core's
//! `batch`), the GIL released while it decrypts and copies.

use ppml_core::batch::{self, Batch, Intake, Layout, Refusal};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyTuple};

use crate::package_error;

/// The inputs of a model that a batch's rows can be stacked in.
#[pyclass(frozen, module = "ppml_serve._native")]
pub(crate) struct BatchLayout {
    pub(crate) inner: Layout,
}

#[pymethods]
impl BatchLayout {
    /// The layout of a model declaring ``inputs`` as (name, datatype, shape with -1 for any
    /// size), or ``None`` when its rows cannot be stacked (a dimension after the first that
    /// is not fixed, a scalar, a variable-size datatype).
    #[staticmethod]
    fn of(inputs: Vec<(String, String, Vec<i64>)>) -> Option<Self> {
        Layout::new(&inputs).map(|inner| Self { inner })
    }

    /// (name, datatype, dimensions after the first) of each input, in the declared order.
    fn columns(&self) -> Vec<(String, &'static str, Vec<u64>)> {
        (0..self.inner.len())
            .map(|i| {
                (
                    self.inner.name(i).to_owned(),
                    self.inner.datatype(i),
                    self.inner.tail(i).to_vec(),
                )
            })
            .collect()
    }
}

/// What `open_batch` and `stack_batch` return: the columns, the rows stacked, each record's
/// fate.
pub(crate) type Opened<'py> = (Vec<Bound<'py, PyBytes>>, u64, Vec<Bound<'py, PyTuple>>);

/// Open `records` (each bound to the `aads` entry beside it) with `keyring` and stack the
/// rows of those that fit `layout`: (one ``bytes`` per column, the rows stacked, and per
/// record ("stacked", start, rows), ("refused", error) or ("unfit", its plaintext)).
pub(crate) fn open_batch<'py>(
    py: Python<'py>,
    keyring: &ppml_core::envelope::Keyring,
    records: Vec<PyBackedBytes>,
    aads: Vec<PyBackedBytes>,
    layout: &Layout,
    max_rows: u64,
) -> PyResult<Opened<'py>> {
    if records.len() != aads.len() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "open_batch: one associated data per record",
        ));
    }
    let opened = py.detach(|| {
        let pairs = records.iter().zip(&aads).map(|(r, a)| (&r[..], &a[..]));
        batch::open_batch(keyring, pairs, layout, max_rows)
    });
    to_python(py, &opened, layout)
}

/// `open_batch` for records opened already (a sealer without encryption).
#[pyfunction]
pub(crate) fn stack_batch<'py>(
    py: Python<'py>,
    plaintexts: Vec<PyBackedBytes>,
    layout: PyRef<'_, BatchLayout>,
    max_rows: u64,
) -> PyResult<Opened<'py>> {
    let layout = &layout.inner;
    let opened = py.detach(|| batch::stack_batch(plaintexts.iter().map(Ok), layout, max_rows));
    to_python(py, &opened, layout)
}

fn to_python<'py, T: AsRef<[u8]> + Sync>(
    py: Python<'py>,
    opened: &Batch<T>,
    layout: &Layout,
) -> PyResult<Opened<'py>> {
    let mut columns = Vec::with_capacity(layout.len());
    for index in 0..layout.len() {
        let column = PyBytes::new_with(py, opened.column_len(index), |out| {
            py.detach(|| opened.fill_column(index, out))
                .map_err(|error| package_error(py, "ProtocolError", error.to_string()))
        })?;
        columns.push(column);
    }
    let items = opened
        .items()
        .iter()
        .enumerate()
        .map(|(index, intake)| match intake {
            Intake::Stacked { start, rows } => ("stacked", *start, *rows).into_pyobject(py),
            Intake::Refused(Refusal::Integrity(error)) => (
                "refused",
                package_error(py, "IntegrityError", error.to_string()),
            )
                .into_pyobject(py),
            Intake::Refused(Refusal::Record(error)) => (
                "refused",
                package_error(py, "ProtocolError", error.to_string()),
            )
                .into_pyobject(py),
            Intake::Unfit => ("unfit", PyBytes::new(py, opened.plaintext(index))).into_pyobject(py),
        })
        .collect::<PyResult<Vec<_>>>()?;
    Ok((columns, opened.rows(), items))
}
