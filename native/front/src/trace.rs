//! W3C trace context on the native path: a caller's `traceparent` continued (or a new trace
//! begun, sampled as OpenTelemetry's parent-based trace-id-ratio sampler decides), the
//! gateway's spans timed here — the server span, `admit` with its `seal`, `enqueue`, `wait`,
//! as the Python path names them — and the `enqueue` span's context carried to the worker in
//! the record's clear `tp` field. Python records the spans (with these ids) when it drains
//! the request's event, so one exporter and one resource describe both paths.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// One gateway span, timed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanRecord {
    pub name: String,
    pub id: [u8; 8],
    /// `None`: the server span (its parent is the caller's span, or none).
    pub parent: Option<[u8; 8]>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The `bytes` attribute (`admit` and `seal`: the request body's size).
    pub bytes: Option<u64>,
}

/// A sampled request's trace: its id, the caller's span, and the spans made so far (the
/// server span first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: [u8; 16],
    pub caller: Option<[u8; 8]>,
    pub spans: Vec<SpanRecord>,
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// The caller's `traceparent` as OpenTelemetry's propagator reads it: trace id, span id and
/// whether it is sampled; `None` for anything it would ignore.
pub(crate) fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], bool)> {
    let value = value.trim();
    let mut parts = value.splitn(5, '-');
    let version = hex::<1>(parts.next()?)?[0];
    let trace_id = hex::<16>(parts.next()?)?;
    let span_id = hex::<8>(parts.next()?)?;
    let flags = hex::<1>(parts.next()?)?[0];
    let rest = parts.next();
    if version == 0xff || (version == 0 && rest.is_some()) {
        return None;
    }
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some((trace_id, span_id, flags & 1 == 1))
}

/// OpenTelemetry's `TraceIdRatioBased`: the lower 64 bits of the trace id under
/// `ratio * 2^64`.
pub(crate) fn ratio_samples(trace_id: &[u8; 16], ratio: f64) -> bool {
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let bound = (ratio * 18_446_744_073_709_551_616.0).round();
    u128::from(u64::from_be_bytes(low)) < bound as u128
}

impl Trace {
    /// The trace of a request with `traceparent` (the caller's, if any), when it is sampled
    /// (a caller's sampled flag is followed; a new trace is sampled at `ratio`); its server
    /// span, named `name`, starts at `start_ns`.
    pub(crate) fn begin(
        traceparent: Option<&str>,
        ratio: f64,
        name: String,
        start_ns: u64,
        random: &SystemRandom,
    ) -> Option<Self> {
        let (trace_id, caller) = match traceparent.and_then(parse_traceparent) {
            Some((_, _, false)) => return None,
            Some((trace_id, span_id, true)) => (trace_id, Some(span_id)),
            None => {
                let mut trace_id = [0u8; 16];
                random.fill(&mut trace_id).ok()?;
                if !ratio_samples(&trace_id, ratio) {
                    return None;
                }
                (trace_id, None)
            }
        };
        let mut trace = Self {
            trace_id,
            caller,
            spans: Vec::with_capacity(5),
        };
        trace.spans.push(SpanRecord {
            name,
            id: span_id(random),
            parent: None,
            start_ns,
            end_ns: start_ns,
            bytes: None,
        });
        Some(trace)
    }

    /// Start a span under the span at `parent` (0: the server span); its index.
    pub(crate) fn open(
        &mut self,
        name: &str,
        parent: usize,
        bytes: Option<u64>,
        random: &SystemRandom,
    ) -> usize {
        let parent = self.spans.get(parent).map(|s| s.id);
        let start_ns = now_ns();
        self.spans.push(SpanRecord {
            name: name.to_owned(),
            id: span_id(random),
            parent,
            start_ns,
            end_ns: start_ns,
            bytes,
        });
        self.spans.len() - 1
    }

    pub(crate) fn close(&mut self, index: usize) {
        if let Some(span) = self.spans.get_mut(index) {
            span.end_ns = now_ns().max(span.start_ns);
        }
    }

    /// The `traceparent` that names the span at `index` (sampled), for the worker.
    pub(crate) fn traceparent(&self, index: usize) -> String {
        let id = self.spans.get(index).map_or([0; 8], |s| s.id);
        format!("00-{}-{}-01", to_hex(&self.trace_id), to_hex(&id))
    }
}

fn span_id(random: &SystemRandom) -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0; 8] {
        if random.fill(&mut id).is_err() {
            // the system's generator failing is not the request's problem: a fixed odd id
            // keeps the span valid
            id = [0, 0, 0, 0, 0, 0, 0, 1];
        }
    }
    id
}

/// Open span `name` under `parent` in `trace`, if there is one.
pub(crate) fn open(
    trace: &mut Option<Trace>,
    name: &str,
    parent: usize,
    bytes: Option<u64>,
    random: &SystemRandom,
) -> Option<usize> {
    trace.as_mut().map(|t| t.open(name, parent, bytes, random))
}

pub(crate) fn close(trace: &mut Option<Trace>, index: Option<usize>) {
    if let (Some(trace), Some(index)) = (trace.as_mut(), index) {
        trace.close(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparents_read_as_the_w3c_propagator_reads_them() {
        let (trace, span, sampled) = parse_traceparent(PARENT).expect("valid");
        assert_eq!(to_hex(&trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&span), "00f067aa0ba902b7");
        assert!(sampled);
        assert!(!parse_traceparent(&PARENT.replace("-01", "-00")).unwrap().2);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // a later version may carry more fields
        assert!(parse_traceparent(&format!("01{}-more", &PARENT[2..])).is_some());
    }

    #[test]
    fn a_trace_follows_the_callers_choice_and_names_the_enqueue_span_for_the_worker() {
        let random = SystemRandom::new();
        assert!(Trace::begin(
            Some(&PARENT.replace("-01", "-00")),
            1.0,
            "s".into(),
            1,
            &random
        )
        .is_none());
        let mut trace = Trace::begin(Some(PARENT), 0.0, "server".into(), 5, &random)
            .expect("a sampled caller is followed whatever the ratio");
        let admit = trace.open("admit", 0, Some(64), &random);
        let seal = trace.open("seal", admit, Some(64), &random);
        trace.close(seal);
        trace.close(admit);
        assert_eq!(trace.spans[seal].parent, Some(trace.spans[admit].id));
        assert_eq!(trace.spans[admit].parent, Some(trace.spans[0].id));
        let carried = trace.traceparent(seal);
        let (id, span, sampled) = parse_traceparent(&carried).unwrap();
        assert_eq!(
            (id, span, sampled),
            (trace.trace_id, trace.spans[seal].id, true)
        );
        assert!(Trace::begin(None, 0.0, "s".into(), 1, &random).is_none());
        assert!(Trace::begin(None, 1.0, "s".into(), 1, &random).is_some());
    }

    #[test]
    fn the_ratio_is_opentelemetrys() {
        let with_low = |low: u64| {
            let mut id = [0xabu8; 16];
            id[8..].copy_from_slice(&low.to_be_bytes());
            id
        };
        assert!(ratio_samples(&with_low(0), 0.5));
        assert!(ratio_samples(&with_low((1 << 63) - 1), 0.5));
        assert!(!ratio_samples(&with_low(1 << 63), 0.5));
        assert!(ratio_samples(&with_low(u64::MAX), 1.0));
        assert!(!ratio_samples(&with_low(0), 0.0));
    }

    proptest! {
        #[test]
        fn no_header_makes_the_parser_panic(text in ".{0,80}") {
            let _ = parse_traceparent(&text);
        }
    }
}
