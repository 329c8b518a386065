//! A worker's intake of one micro-batch: every request envelope opened and its tensors laid
//! row after row in one column per model input, ready to be the engine's batch without the
//! per-request copies and calls of opening records one by one.
//!
//! Only a model whose inputs have a fixed size beyond their first (batch) dimension can be
//! stacked ([`Layout::new`] says `None` otherwise). A record that opens but does not fit the
//! layout exactly (another input set, datatype or shape, no rows, more than `max_rows`) is
//! [`Intake::Unfit`]: the caller handles it on its own path, which words the error.

use crate::envelope::{EnvelopeError, Keyring};
use crate::record::{self, RecordError};
use crate::v2::Datatype;

/// One model input that rows can be stacked in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Column {
    name: String,
    datatype: &'static str,
    /// The declared first dimension, `None` for any.
    first: Option<u64>,
    /// Every dimension after the first, all fixed.
    tail: Vec<u64>,
}

/// The stackable inputs of a model, in its declared order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    columns: Vec<Column>,
}

impl Layout {
    /// The layout of a model declaring `inputs` as (name, v2 datatype, shape with -1 for any
    /// size); `None` when one cannot be stacked: no inputs, a scalar, a variable-size
    /// datatype, or a dimension after the first that is not fixed.
    pub fn new(inputs: &[(String, String, Vec<i64>)]) -> Option<Self> {
        if inputs.is_empty() {
            return None;
        }
        let mut columns: Vec<Column> = Vec::with_capacity(inputs.len());
        for (name, datatype, shape) in inputs {
            let datatype = Datatype::named(datatype).filter(|d| d.size > 0)?;
            let (first, tail) = shape.split_first()?;
            let first = match *first {
                -1 => None,
                size => Some(u64::try_from(size).ok()?),
            };
            let tail = tail
                .iter()
                .map(|d| {
                    u64::try_from(*d)
                        .ok()
                        .filter(|d| *d <= record::MAX_DIM_SIZE)
                })
                .collect::<Option<Vec<u64>>>()?;
            if columns.iter().any(|c| c.name == *name) {
                return None;
            }
            columns.push(Column {
                name: name.clone(),
                datatype: datatype.name,
                first,
                tail,
            });
        }
        Some(Self { columns })
    }

    /// How many inputs (columns) the layout has.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Whether the layout has no inputs (never, for a layout [`Layout::new`] made).
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The name of column `index`.
    pub fn name(&self, index: usize) -> &str {
        &self.columns[index].name
    }

    /// The datatype of column `index`.
    pub fn datatype(&self, index: usize) -> &'static str {
        self.columns[index].datatype
    }

    /// Every dimension of column `index` after the first.
    pub fn tail(&self, index: usize) -> &[u64] {
        &self.columns[index].tail
    }

    /// Where each column's bytes lie in `opened`, and how many rows the record holds; `None`
    /// unless the record holds exactly these inputs, each with this datatype and tail, all
    /// with the same number of rows, between 1 and `max_rows`.
    fn fit(&self, opened: &record::Record, max_rows: u64) -> Option<(u64, Vec<(usize, usize)>)> {
        if opened.tensors.len() != self.columns.len() {
            return None;
        }
        let mut rows: Option<u64> = None;
        let mut spans = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            let tensor = opened.tensors.iter().find(|t| t.name == column.name)?;
            let (first, tail) = tensor.shape.split_first()?;
            if tensor.datatype != column.datatype
                || tail != column.tail.as_slice()
                || column.first.is_some_and(|want| want != *first)
                || rows.is_some_and(|seen| seen != *first)
            {
                return None;
            }
            rows = Some(*first);
            spans.push((tensor.offset, tensor.nbytes));
        }
        let rows = rows.filter(|rows| (1..=max_rows).contains(rows))?;
        Some((rows, spans))
    }
}

/// Why a record of the batch is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// It is not an envelope of a key held here, or it was altered, or it is bound to another
    /// request: the one opaque error of [`EnvelopeError`].
    Integrity(EnvelopeError),
    /// It opened, but its framing is invalid.
    Record(RecordError),
}

/// What became of one record of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Its rows are rows `start..start + rows` of every column.
    Stacked { start: u64, rows: u64 },
    /// It is refused, for this reason.
    Refused(Refusal),
    /// It opened and is well framed, but does not fit the layout: [`Batch::plaintext`] holds
    /// it for the caller's own path.
    Unfit,
}

/// A batch of opened records: their fate, and the columns their rows make up.
pub struct Batch<T> {
    plaintexts: Vec<Option<T>>,
    items: Vec<Intake>,
    /// Per column: (record index, offset, length) of each stacked record's bytes, in order.
    pieces: Vec<Vec<(usize, usize, usize)>>,
    rows: u64,
}

impl<T: AsRef<[u8]>> Batch<T> {
    /// What became of each record, in the order they were given.
    pub fn items(&self) -> &[Intake] {
        &self.items
    }

    /// Rows stacked in every column.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes of column `index`.
    pub fn column_len(&self, index: usize) -> usize {
        self.pieces[index].iter().map(|(_, _, len)| len).sum()
    }

    /// Write column `index` into `out` ([`Self::column_len`] bytes).
    pub fn fill_column(&self, index: usize, out: &mut [u8]) -> Result<(), EnvelopeError> {
        if out.len() != self.column_len(index) {
            return Err(EnvelopeError::OutputLength);
        }
        let mut at = 0;
        for &(item, offset, len) in &self.pieces[index] {
            let plaintext = self.plaintexts[item]
                .as_ref()
                .map_or(&[][..], AsRef::as_ref);
            out[at..at + len].copy_from_slice(&plaintext[offset..offset + len]);
            at += len;
        }
        Ok(())
    }

    /// The opened record `index`, if it is [`Intake::Unfit`] (empty otherwise).
    pub fn plaintext(&self, index: usize) -> &[u8] {
        match (&self.items[index], &self.plaintexts[index]) {
            (Intake::Unfit, Some(plaintext)) => plaintext.as_ref(),
            _ => &[],
        }
    }
}

/// Stack the rows of the opened records that fit `layout`, in order. Each record comes
/// opened, or with the error opening it gave (see [`open_batch`]); one record's fault is that
/// record's [`Intake`], never the batch's.
pub fn stack_batch<T: AsRef<[u8]>>(
    opened: impl IntoIterator<Item = Result<T, EnvelopeError>>,
    layout: &Layout,
    max_rows: u64,
) -> Batch<T> {
    let mut batch = Batch {
        plaintexts: Vec::new(),
        items: Vec::new(),
        pieces: vec![Vec::new(); layout.len()],
        rows: 0,
    };
    for (index, plaintext) in opened.into_iter().enumerate() {
        let intake = match &plaintext {
            Err(error) => Intake::Refused(Refusal::Integrity(error.clone())),
            Ok(plaintext) => match record::parse(plaintext.as_ref()) {
                Err(error) => Intake::Refused(Refusal::Record(error)),
                Ok(parsed) => match layout.fit(&parsed, max_rows) {
                    None => Intake::Unfit,
                    Some((rows, spans)) => {
                        for (column, (offset, len)) in spans.into_iter().enumerate() {
                            batch.pieces[column].push((index, offset, len));
                        }
                        let start = batch.rows;
                        batch.rows += rows;
                        Intake::Stacked { start, rows }
                    }
                },
            },
        };
        // Stacked records are needed until their columns are filled, unfit ones by the
        // caller; a refused one is dropped here.
        batch.plaintexts.push(match intake {
            Intake::Refused(_) => None,
            _ => plaintext.ok(),
        });
        batch.items.push(intake);
    }
    batch
}

/// Open each (record, associated data) pair with `keyring` and stack the rows of those that
/// fit `layout` ([`stack_batch`]).
pub fn open_batch<'a>(
    keyring: &Keyring,
    records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    layout: &Layout,
    max_rows: u64,
) -> Batch<Vec<u8>> {
    stack_batch(
        records
            .into_iter()
            .map(|(sealed, aad)| keyring.open(sealed, aad)),
        layout,
        max_rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{pack, TensorIn};
    use proptest::prelude::*;
    use serde_json::Map;

    fn keyring() -> Keyring {
        Keyring::new([("k1", [7u8; 32].as_slice())], "k1").unwrap()
    }

    fn image_layout() -> Layout {
        Layout::new(&[("image".into(), "UINT8".into(), vec![-1, 2, 3])]).unwrap()
    }

    fn image_record(rows: u64, fill: u8) -> Vec<u8> {
        let data = vec![fill; (rows * 6) as usize];
        pack(
            &Map::new(),
            &[TensorIn {
                name: "image",
                datatype: "UINT8",
                shape: &[rows, 2, 3],
                data: &data,
            }],
        )
        .unwrap()
    }

    #[test]
    fn layouts_that_cannot_stack_are_none() {
        let one = |datatype: &str, shape: Vec<i64>| vec![("x".to_owned(), datatype.into(), shape)];
        assert!(Layout::new(&[]).is_none());
        assert!(Layout::new(&one("FP32", vec![])).is_none());
        assert!(Layout::new(&one("FP32", vec![-1, -1])).is_none());
        assert!(Layout::new(&one("BYTES", vec![-1, 4])).is_none());
        assert!(Layout::new(&one("NOPE", vec![-1, 4])).is_none());
        let twice = [
            one("FP32", vec![-1])[0].clone(),
            one("FP32", vec![-1])[0].clone(),
        ];
        assert!(Layout::new(&twice).is_none());
        assert!(Layout::new(&one("FP32", vec![-1, 4])).is_some());
        assert!(Layout::new(&one("FP32", vec![1, 4])).is_some());
    }

    #[test]
    fn rows_are_stacked_in_order_and_faults_stay_with_their_record() {
        let ring = keyring();
        let sealed: Vec<Vec<u8>> = [
            image_record(1, 1),
            image_record(2, 2),
            b"not a record".to_vec(),
            image_record(1, 3),
        ]
        .iter()
        .enumerate()
        .map(|(i, plaintext)| ring.seal(plaintext, format!("r{i}").as_bytes()).unwrap())
        .collect();
        let mut aads: Vec<Vec<u8>> = (0..4).map(|i| format!("r{i}").into_bytes()).collect();
        aads.push(b"r4".to_vec());
        let mut records: Vec<(&[u8], &[u8])> = sealed
            .iter()
            .zip(&aads)
            .map(|(s, a)| (s.as_slice(), a.as_slice()))
            .collect();
        records.push((sealed[0].as_slice(), aads[4].as_slice())); // bound to another request
        let batch = open_batch(&ring, records, &image_layout(), 64);
        assert_eq!(
            batch.items(),
            &[
                Intake::Stacked { start: 0, rows: 1 },
                Intake::Stacked { start: 1, rows: 2 },
                Intake::Refused(Refusal::Record(RecordError::UnknownVersion)),
                Intake::Stacked { start: 3, rows: 1 },
                Intake::Refused(Refusal::Integrity(EnvelopeError::Authentication)),
            ]
        );
        assert_eq!(batch.rows(), 4);
        let mut column = vec![0u8; batch.column_len(0)];
        batch.fill_column(0, &mut column).unwrap();
        let mut expected = vec![1u8; 6];
        expected.extend([2u8; 12]);
        expected.extend([3u8; 6]);
        assert_eq!(column, expected);
        assert!(batch.fill_column(0, &mut [0u8; 3]).is_err());
    }

    #[test]
    fn records_that_do_not_fit_are_handed_back_whole() {
        let ring = keyring();
        let wrong_tail = pack(
            &Map::new(),
            &[TensorIn {
                name: "image",
                datatype: "UINT8",
                shape: &[1, 3, 2],
                data: &[0; 6],
            }],
        )
        .unwrap();
        let cases = [wrong_tail, image_record(0, 0), image_record(65, 0)];
        for plaintext in cases {
            let sealed = ring.seal(&plaintext, b"a").unwrap();
            let batch = open_batch(
                &ring,
                [(sealed.as_slice(), b"a".as_slice())],
                &image_layout(),
                64,
            );
            assert_eq!(batch.items(), &[Intake::Unfit]);
            assert_eq!(batch.plaintext(0), plaintext.as_slice());
            assert_eq!(batch.column_len(0), 0);
        }
    }

    #[test]
    fn inputs_are_matched_by_name_in_the_layouts_order() {
        let layout = Layout::new(&[
            ("a".into(), "FP32".into(), vec![-1, 1]),
            ("b".into(), "INT64".into(), vec![-1]),
        ])
        .unwrap();
        let plaintext = pack(
            &Map::new(),
            &[
                TensorIn {
                    name: "b",
                    datatype: "INT64",
                    shape: &[2],
                    data: &[1; 16],
                },
                TensorIn {
                    name: "a",
                    datatype: "FP32",
                    shape: &[2, 1],
                    data: &[2; 8],
                },
            ],
        )
        .unwrap();
        let ring = keyring();
        let sealed = ring.seal(&plaintext, b"").unwrap();
        let batch = open_batch(&ring, [(sealed.as_slice(), &b""[..])], &layout, 8);
        assert_eq!(batch.items(), &[Intake::Stacked { start: 0, rows: 2 }]);
        let (mut a, mut b) = (
            vec![0u8; batch.column_len(0)],
            vec![0u8; batch.column_len(1)],
        );
        batch.fill_column(0, &mut a).unwrap();
        batch.fill_column(1, &mut b).unwrap();
        assert_eq!((a, b), (vec![2u8; 8], vec![1u8; 16]));
    }

    proptest! {
        /// Whatever bytes arrive as records, every record gets a fate, stacked rows add up,
        /// and each column holds exactly its rows.
        #[test]
        fn any_records_get_a_fate(records in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..200), 0..8), seal in any::<bool>()) {
            let ring = keyring();
            let sealed: Vec<Vec<u8>> = records
                .iter()
                .map(|r| if seal { ring.seal(r, b"").unwrap() } else { r.clone() })
                .collect();
            let batch = open_batch(&ring, sealed.iter().map(|s| (s.as_slice(), &b""[..])),
                                   &image_layout(), 64);
            prop_assert_eq!(batch.items().len(), records.len());
            let stacked: u64 = batch.items().iter().map(|item| match item {
                Intake::Stacked { rows, .. } => *rows,
                _ => 0,
            }).sum();
            prop_assert_eq!(stacked, batch.rows());
            prop_assert_eq!(batch.column_len(0) as u64, batch.rows() * 6);
        }
    }
}
