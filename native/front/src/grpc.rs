//! gRPC on the front (`gateway.grpc_port`): KServe v2 `ModelInfer` answered on the native
//! path, and every other call passed on to the Python gRPC service.
//!
//! tonic frames the messages, negotiates compression and writes the status; prost decodes
//! the messages (declared below by hand for the one RPC served here: the field numbers are
//! the Open Inference Protocol's, checked against tritonclient's descriptors by the Python
//! tests). A `ModelInfer` is judged here in the Python service's order and words: the key,
//! then the message's tensors, then the model and version. Only calls before the routes are
//! installed, messages compressed other than with gzip or deflate, and every other RPC
//! (`ModelStreamInfer`'s streams included) go to the Python service over HTTP/2 on a
//! private Unix socket, with their trailers.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::header::HeaderMap;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ppml_core::record;
use ppml_core::request::Tensor;
use ppml_core::response::{self, ResponseError};
use ppml_core::v2::{self, py_repr, Datatype};
use prost::Message as _;
use tonic::codec::CompressionEncoding;
use tonic::server::{Grpc, StreamingService, UnaryService};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

use crate::body::{Breach, BreachCell, GuardedBody};
use crate::plane::{Event, Plane, Refusal, Refused, Target};
use crate::server::{hop_by_hop, Shared};

/// The RPC answered natively.
pub(crate) const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
/// tritonclient's `start_stream`: a bidirectional stream of ordinary requests.
const MODEL_STREAM_INFER: &str = "/inference.GRPCInferenceService/ModelStreamInfer";
/// Answers a stream holds before its caller reads them (then it waits to read more).
const STREAM_BACKLOG: usize = 4;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A response body on the gRPC port: tonic's, the Python service's (streamed, with its
/// trailers), or empty (a status alone).
pub(crate) type GrpcBody = UnsyncBoxBody<Bytes, BoxError>;

/// HTTP/2 flow-control windows towards the Python service (large messages pass in a few
/// round trips, not one per 64 KiB).
const UPSTREAM_WINDOW: u32 = 4 << 20;

/// `inference.InferParameter`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferParameter {
    #[prost(oneof = "Choice", tags = "1, 2, 3, 4, 5")]
    pub choice: Option<Choice>,
}

/// `inference.InferParameter.parameter_choice`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Choice {
    #[prost(bool, tag = "1")]
    Bool(bool),
    #[prost(int64, tag = "2")]
    Int64(i64),
    #[prost(string, tag = "3")]
    String(String),
    #[prost(double, tag = "4")]
    Double(f64),
    #[prost(uint64, tag = "5")]
    Uint64(u64),
}

/// `inference.InferTensorContents`: typed contents, one field per kind of datatype.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferTensorContents {
    #[prost(bool, repeated, tag = "1")]
    pub bool_contents: Vec<bool>,
    #[prost(int32, repeated, tag = "2")]
    pub int_contents: Vec<i32>,
    #[prost(int64, repeated, tag = "3")]
    pub int64_contents: Vec<i64>,
    #[prost(uint32, repeated, tag = "4")]
    pub uint_contents: Vec<u32>,
    #[prost(uint64, repeated, tag = "5")]
    pub uint64_contents: Vec<u64>,
    #[prost(float, repeated, tag = "6")]
    pub fp32_contents: Vec<f32>,
    #[prost(double, repeated, tag = "7")]
    pub fp64_contents: Vec<f64>,
    #[prost(bytes = "bytes", repeated, tag = "8")]
    pub bytes_contents: Vec<Bytes>,
}

/// `inference.ModelInferRequest.InferInputTensor` (and the response's output tensor: the
/// same fields).
#[derive(Clone, PartialEq, prost::Message)]
pub struct InferTensor {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub datatype: String,
    #[prost(int64, repeated, tag = "3")]
    pub shape: Vec<i64>,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, optional, tag = "5")]
    pub contents: Option<InferTensorContents>,
}

/// `inference.ModelInferRequest.InferRequestedOutputTensor`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestedOutput {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(map = "string, message", tag = "2")]
    pub parameters: HashMap<String, InferParameter>,
}

/// `inference.ModelInferRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferRequest {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, repeated, tag = "5")]
    pub inputs: Vec<InferTensor>,
    #[prost(message, repeated, tag = "6")]
    pub outputs: Vec<RequestedOutput>,
    #[prost(bytes = "bytes", repeated, tag = "7")]
    pub raw_input_contents: Vec<Bytes>,
}

/// `inference.ModelStreamInferResponse`: a streamed request's answer, or its error.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelStreamInferResponse {
    #[prost(string, tag = "1")]
    pub error_message: String,
    #[prost(message, optional, tag = "2")]
    pub infer_response: Option<ModelInferResponse>,
}

/// `inference.ModelInferResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelInferResponse {
    #[prost(string, tag = "1")]
    pub model_name: String,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
    #[prost(map = "string, message", tag = "4")]
    pub parameters: HashMap<String, InferParameter>,
    #[prost(message, repeated, tag = "5")]
    pub outputs: Vec<InferTensor>,
    #[prost(bytes = "bytes", repeated, tag = "6")]
    pub raw_output_contents: Vec<Bytes>,
}

/// One input: its name, datatype, shape and items.
type Input<'a> = (&'a str, Datatype, Vec<u64>, Cow<'a, [u8]>);

/// A request decoded for the native path: its inputs (bytes borrowed from the message where
/// they are raw), the outputs asked for, and the classification extension's counts.
#[derive(Debug)]
pub(crate) struct Decoded<'a> {
    inputs: Vec<Input<'a>>,
    outputs: Option<Vec<(String, bool)>>,
    classification: Vec<(String, u64)>,
}

impl Decoded<'_> {
    fn tensors(&self) -> Vec<Tensor<'_>> {
        self.inputs
            .iter()
            .map(|(name, datatype, shape, data)| Tensor {
                name,
                datatype: *datatype,
                shape,
                data,
            })
            .collect()
    }
}

/// Typed contents as little-endian items of `datatype`, with how many values its field
/// holds (no field, as for FP16: none); `Err(found)` where a value does not fit it.
fn typed(contents: &InferTensorContents, datatype: Datatype) -> Result<(Vec<u8>, usize), usize> {
    fn narrow<T: Copy, const N: usize>(
        values: &[T],
        convert: impl Fn(T) -> Option<[u8; N]>,
    ) -> Result<(Vec<u8>, usize), usize> {
        let mut out = Vec::with_capacity(values.len() * N);
        for value in values {
            out.extend_from_slice(&convert(*value).ok_or(values.len())?);
        }
        Ok((out, values.len()))
    }
    match datatype.name {
        "BOOL" => narrow(&contents.bool_contents, |v| Some([u8::from(v)])),
        "INT8" => narrow(&contents.int_contents, |v| {
            i8::try_from(v).ok().map(i8::to_le_bytes)
        }),
        "INT16" => narrow(&contents.int_contents, |v| {
            i16::try_from(v).ok().map(i16::to_le_bytes)
        }),
        "INT32" => narrow(&contents.int_contents, |v| Some(v.to_le_bytes())),
        "INT64" => narrow(&contents.int64_contents, |v| Some(v.to_le_bytes())),
        "UINT8" => narrow(&contents.uint_contents, |v| {
            u8::try_from(v).ok().map(u8::to_le_bytes)
        }),
        "UINT16" => narrow(&contents.uint_contents, |v| {
            u16::try_from(v).ok().map(u16::to_le_bytes)
        }),
        "UINT32" => narrow(&contents.uint_contents, |v| Some(v.to_le_bytes())),
        "UINT64" => narrow(&contents.uint64_contents, |v| Some(v.to_le_bytes())),
        "FP32" => narrow(&contents.fp32_contents, |v| Some(v.to_le_bytes())),
        "FP64" => narrow(&contents.fp64_contents, |v| Some(v.to_le_bytes())),
        "BYTES" => {
            let items = &contents.bytes_contents;
            let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 4).sum());
            for item in items {
                let size = u32::try_from(item.len()).map_err(|_| items.len())?;
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(item);
            }
            Ok((out, items.len()))
        }
        _ => Ok((Vec::new(), 0)),
    }
}

/// The request as the native path takes it, or what the Python service said of one it
/// would not read (its words, in its order: the classification counts, then each input).
pub(crate) fn decode(request: &ModelInferRequest) -> Result<Decoded<'_>, String> {
    let mut classification: Vec<(String, u64)> = Vec::new();
    let mut outputs: Vec<(String, bool)> = Vec::new();
    for output in &request.outputs {
        if let Some(parameter) = output.parameters.get("classification") {
            let count = match parameter.choice {
                Some(Choice::Int64(count)) if count >= 1 => count.unsigned_abs(),
                _ => {
                    return Err(format!(
                        "output {}: parameters.classification must be a positive integer \
                         (the number of classes)",
                        py_repr(&output.name)
                    ))
                }
            };
            classification.retain(|(name, _)| *name != output.name);
            classification.push((output.name.clone(), count));
        }
        if !outputs.iter().any(|(name, _)| *name == output.name) {
            outputs.push((output.name.clone(), true));
        }
    }
    let raw = &request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err("raw_input_contents must hold one entry per input".into());
    }
    let mut inputs: Vec<Input<'_>> = Vec::with_capacity(request.inputs.len());
    for (position, tensor) in request.inputs.iter().enumerate() {
        let name = tensor.name.as_str();
        let where_ = format!("input {}", py_repr(name));
        if name.is_empty() || inputs.iter().any(|(seen, ..)| *seen == name) {
            return Err(format!(
                "inputs[{position}]: a unique, non-empty name is required"
            ));
        }
        let datatype = v2::datatype_named(&tensor.datatype, &where_).map_err(|e| e.0)?;
        let shape = v2::check_dims(&tensor.shape, &where_).map_err(|e| e.0)?;
        let count = shape
            .iter()
            .try_fold(1u128, |n, d| n.checked_mul(u128::from(*d)));
        if datatype.is_bytes() {
            v2::check_bytes_count(count, &where_).map_err(|e| e.0)?;
        }
        let data: Cow<'_, [u8]> = if let Some(bytes) = raw.get(position) {
            if datatype.is_bytes() {
                v2::check_bytes(bytes, count, &shape, &where_).map_err(|e| e.0)?;
            } else {
                let size = u128::try_from(datatype.size).unwrap_or(u128::MAX);
                let needed = count.and_then(|n| n.checked_mul(size));
                if needed != u128::try_from(bytes.len()).ok() {
                    let mut factors = shape.clone();
                    factors.push(datatype.size as u64);
                    return Err(format!(
                        "{where_}: raw contents hold {} bytes, shape {} needs {}",
                        bytes.len(),
                        v2::list(&shape),
                        v2::exact_product(&factors)
                    ));
                }
            }
            Cow::Borrowed(bytes.as_ref())
        } else {
            let empty = InferTensorContents::default();
            let contents = tensor.contents.as_ref().unwrap_or(&empty);
            let (found, converted) = match typed(contents, datatype) {
                Ok((items, found)) => (found, Some(items)),
                Err(found) => (found, None),
            };
            if count != Some(found as u128) {
                return Err(format!(
                    "{where_}: contents hold {found} values, shape {} needs {}",
                    v2::list(&shape),
                    v2::exact_product(&shape)
                ));
            }
            let Some(items) = converted else {
                return Err(format!(
                    "{where_}: contents cannot be read as {}",
                    datatype.name
                ));
            };
            Cow::Owned(items)
        };
        inputs.push((name, datatype, shape, data));
    }
    if inputs.is_empty() {
        return Err("inputs must be a non-empty list".into());
    }
    Ok(Decoded {
        inputs,
        outputs: (!outputs.is_empty()).then_some(outputs),
        classification,
    })
}

/// The response to `request` from the worker's answer record `plaintext`.
fn encode(
    plaintext: Vec<u8>,
    target: &Target,
    request: &ModelInferRequest,
    decoded: &Decoded<'_>,
    labels: Option<&[String]>,
) -> Result<ModelInferResponse, Refusal> {
    let protocol = |e: &dyn std::fmt::Display| {
        Refusal::internal("internal error", format!("ProtocolError: {e}"))
    };
    let parsed = record::parse(&plaintext).map_err(|e| protocol(&e))?;
    let answer = Bytes::from(plaintext);
    let all: Vec<(String, bool)>;
    let selected = match &decoded.outputs {
        Some(outputs) => outputs.as_slice(),
        None => {
            all = parsed
                .tensors
                .iter()
                .map(|t| (t.name.clone(), true))
                .collect();
            &all
        }
    };
    let mut response = ModelInferResponse {
        model_name: request.model_name.clone(),
        model_version: target.version().to_owned(),
        id: request.id.clone(),
        ..Default::default()
    };
    for (name, _) in selected {
        let entry = parsed
            .tensors
            .iter()
            .find(|t| t.name == *name)
            .ok_or_else(|| protocol(&ResponseError::Missing(v2::py_repr(name))))?;
        let data = answer.slice(entry.offset..entry.offset + entry.nbytes);
        let wanted = decoded.classification.iter().find(|(n, _)| n == name);
        let (datatype, shape, contents) = match wanted {
            Some((_, count)) => {
                let (shape, items) = response::classify(entry, &data, *count, labels)
                    .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))?;
                let mut serialized = Vec::new();
                for item in &items {
                    serialized.extend_from_slice(&(item.len() as u32).to_le_bytes());
                    serialized.extend_from_slice(item.as_bytes());
                }
                ("BYTES".to_owned(), shape, Bytes::from(serialized))
            }
            None => (entry.datatype.to_owned(), entry.shape.clone(), data),
        };
        response.outputs.push(InferTensor {
            name: name.clone(),
            datatype,
            shape: shape.iter().map(|d| *d as i64).collect(),
            ..Default::default()
        });
        response.raw_output_contents.push(contents);
    }
    Ok(response)
}

/// A refusal's gRPC status, as `gateway/errors.py` maps each error.
fn status_of(refusal: &Refusal) -> Status {
    let code = match refusal.status {
        StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE => Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    Status::new(code, refusal.message.clone())
}

/// The native answer to `request`, recorded as an event; `None`: the Python service's.
async fn answer(
    plane: &Arc<Plane>,
    request: &ModelInferRequest,
    headers: &HeaderMap,
    received: (Instant, f64),
    client: String,
    rpc: &'static str,
) -> Result<ModelInferResponse, Status> {
    let version = Some(request.model_version.as_str()).filter(|v| !v.is_empty());
    let bytes_in = request.encoded_len() as u64;
    let found = plane
        .settled(|| plane.target(&request.model_name, version, headers))
        .await;
    // the service's order: the key, then the message's tensors, then the model and version
    let decoded = decode(request);
    let refused = match (found, decoded) {
        (Err(refused), _) if refused.is_for_key() => refused,
        (Ok(target), Err(words)) => Box::new(Refused::unread(
            &request.model_name,
            target.key_name(),
            words,
        )),
        (Err(refused), Err(words)) => Box::new(Refused::unread(
            &request.model_name,
            &refused.key_name,
            words,
        )),
        (Err(refused), Ok(_)) => refused,
        (Ok(target), Ok(decoded)) => {
            let call = (received, client, rpc);
            return infer(plane, request, headers, call, target, decoded).await;
        }
    };
    let mut call = plane.call(headers, || rpc.into(), received, bytes_in);
    plane.record_refused(&refused, &mut call, rpc, String::new(), client, 0);
    Err(status_of(&refused.refusal))
}

/// A decoded `request` for `target`, answered on the native path and recorded.
async fn infer(
    plane: &Arc<Plane>,
    request: &ModelInferRequest,
    headers: &HeaderMap,
    (received, client, rpc): ((Instant, f64), String, &'static str),
    target: Target,
    decoded: Decoded<'_>,
) -> Result<ModelInferResponse, Status> {
    let bytes_in = request.encoded_len() as u64;
    let mut call = plane.call(headers, || rpc.into(), received, bytes_in);
    let outcome = match plane.admit(received) {
        Err(refusal) => Err(refusal),
        Ok(()) => {
            let inputs = decoded.tensors();
            match plane
                .infer(
                    &target,
                    &inputs,
                    decoded.outputs.as_deref(),
                    &decoded.classification,
                    &mut call,
                )
                .await
            {
                Ok((plaintext, answer)) => {
                    encode(plaintext, &target, request, &decoded, target.labels())
                        .map(|response| (response, answer))
                }
                Err(refusal) => Err(refusal),
            }
        }
    };
    let (status, bytes_out, answer, failure, result) = match outcome {
        Ok((response, answer)) => (
            200,
            response.encoded_len(),
            Some(answer),
            None,
            Ok(response),
        ),
        Err(refusal) => (
            refusal.status.as_u16(),
            0,
            None,
            refusal.failure.clone(),
            Err(status_of(&refusal)),
        ),
    };
    plane.record(Event {
        model: target.model().to_owned(),
        version: target.version().to_owned(),
        queue: target.queue().to_owned(),
        path: rpc.into(),
        status,
        seconds: received.0.elapsed().as_secs_f64(),
        key_name: target.key_name().to_owned(),
        request_id: call.request_id.clone(),
        caller_id: String::new(),
        client,
        bytes_in,
        bytes_out: bytes_out as u64,
        answer,
        failure,
        trace: Plane::finish_trace(&mut call),
    });
    result
}

/// What happened to a `ModelInfer` handed to tonic.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// tonic could not decode the message (or never called): the Python service answers,
    /// in its words.
    Undecoded,
    Answered,
}

struct NativeInfer {
    plane: Arc<Plane>,
    headers: HeaderMap,
    received: (Instant, f64),
    client: String,
    outcome: Arc<Mutex<Outcome>>,
}

type Answering = Pin<
    Box<dyn Future<Output = Result<tonic::Response<ModelInferResponse>, Status>> + Send + 'static>,
>;

impl UnaryService<ModelInferRequest> for NativeInfer {
    type Response = ModelInferResponse;
    type Future = Answering;

    fn call(&mut self, request: tonic::Request<ModelInferRequest>) -> Self::Future {
        let plane = self.plane.clone();
        let headers = std::mem::take(&mut self.headers);
        let (received, client) = (self.received, std::mem::take(&mut self.client));
        let outcome = self.outcome.clone();
        Box::pin(async move {
            let message = request.into_inner();
            let answered = answer(
                &plane,
                &message,
                &headers,
                received,
                client,
                "gRPC ModelInfer",
            )
            .await;
            *outcome.lock().unwrap_or_else(|p| p.into_inner()) = Outcome::Answered;
            answered.map(tonic::Response::new)
        })
    }
}

/// `ModelStreamInfer` on the native path: each streamed request answered in order as a
/// `ModelInfer` is (its key checked each time: a revoked key stops at once), its refusal
/// sent as the response's `error_message` while the stream goes on, as the Python service
/// does.
struct NativeStream {
    plane: Arc<Plane>,
    headers: HeaderMap,
    client: String,
    inflight: Arc<tokio::sync::Semaphore>,
    max_inflight: usize,
    stats: Arc<crate::server::FrontStats>,
}

type Streamed = tokio_stream::wrappers::ReceiverStream<Result<ModelStreamInferResponse, Status>>;
type StreamStarting =
    Pin<Box<dyn Future<Output = Result<tonic::Response<Streamed>, Status>> + Send + 'static>>;

impl StreamingService<ModelInferRequest> for NativeStream {
    type Response = ModelStreamInferResponse;
    type ResponseStream = Streamed;
    type Future = StreamStarting;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<ModelInferRequest>>,
    ) -> Self::Future {
        let plane = self.plane.clone();
        let headers = std::mem::take(&mut self.headers);
        let client = std::mem::take(&mut self.client);
        let (inflight, max_inflight) = (self.inflight.clone(), self.max_inflight);
        let stats = self.stats.clone();
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BACKLOG);
        tokio::spawn(async move {
            let mut incoming = request.into_inner();
            loop {
                let message = match incoming.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(_) => {
                        // a message that is not one (or the stream cut): said once, then done
                        let words = "the request is not a valid ModelInferRequest message \
                                     (KServe v2 / Open Inference Protocol gRPC)";
                        let _ = sender.send(Ok(stream_error(words))).await;
                        break;
                    }
                };
                let received = (Instant::now(), now_s());
                let answered = match inflight.clone().try_acquire_owned() {
                    Ok(_held) => {
                        let rpc = "gRPC ModelStreamInfer";
                        let answered =
                            answer(&plane, &message, &headers, received, client.clone(), rpc).await;
                        stats.native_answers.fetch_add(1, Ordering::Relaxed);
                        match answered {
                            Ok(response) => ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(response),
                            },
                            Err(status) => stream_error(status.message()),
                        }
                    }
                    Err(_) => stream_error(&format!(
                        "this gateway holds {max_inflight} inference requests; retry later \
                         (gateway.max_inflight)"
                    )),
                };
                if sender.send(Ok(answered)).await.is_err() {
                    break; // the caller is gone
                }
            }
        });
        Box::pin(async move {
            Ok(tonic::Response::new(
                tokio_stream::wrappers::ReceiverStream::new(receiver),
            ))
        })
    }
}

fn stream_error(words: &str) -> ModelStreamInferResponse {
    ModelStreamInferResponse {
        error_message: words.to_owned(),
        infer_response: None,
    }
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The Python gRPC service: one HTTP/2 connection over its private Unix socket, shared by
/// every call (and made again when it closes).
pub(crate) struct GrpcUpstream {
    path: PathBuf,
    sender: tokio::sync::Mutex<Option<SendRequest<GrpcBody>>>,
}

impl GrpcUpstream {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            sender: tokio::sync::Mutex::new(None),
        }
    }

    async fn sender(&self) -> Option<SendRequest<GrpcBody>> {
        let mut held = self.sender.lock().await;
        if let Some(sender) = held.as_ref().filter(|s| !s.is_closed()) {
            return Some(sender.clone());
        }
        let stream = crate::upstream::connect(&self.path).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(UPSTREAM_WINDOW)
            .initial_connection_window_size(UPSTREAM_WINDOW)
            .handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(async move {
            // Ends when either side closes; the calls on it see their own errors.
            let _ = connection.await;
        });
        *held = Some(sender.clone());
        Some(sender)
    }

    /// Pass one call on; its answer streams back as it comes, trailers included.
    async fn call(&self, request: Request<GrpcBody>) -> Option<Response<Incoming>> {
        let mut sender = self.sender().await?;
        sender.ready().await.ok()?;
        sender.send_request(request).await.ok()
    }
}

/// A status alone (trailers-only), for what the front refuses itself.
fn status_response(status: Status) -> Response<GrpcBody> {
    status
        .into_http::<Empty<Bytes>>()
        .map(|body| body.map_err(|never| match never {}).boxed_unsync())
}

fn boxed<B>(body: B) -> GrpcBody
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Pass a call to the Python service with `body`.
async fn pass_on(
    shared: &Shared,
    upstream: &GrpcUpstream,
    parts: &http::request::Parts,
    body: GrpcBody,
) -> Response<GrpcBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() = Uri::try_from(format!("http://ppml-gateway{path}"))
        .unwrap_or_else(|_| Uri::from_static("http://ppml-gateway/"));
    let headers = request.headers_mut();
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) || name == http::header::TE {
            headers.append(name.clone(), value.clone());
        }
    }
    match upstream.call(request).await {
        Some(response) => response.map(boxed),
        None => {
            shared
                .stats
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            status_response(Status::unavailable(
                "the gateway is starting or stopping; retry",
            ))
        }
    }
}

/// A request on the gRPC port.
pub(crate) async fn serve_call(
    shared: &Shared,
    upstream: &GrpcUpstream,
    request: Request<Incoming>,
    peer: SocketAddr,
    refused: bool,
) -> Response<GrpcBody> {
    let config = &shared.config;
    if refused {
        return status_response(Status::unavailable(
            "the gateway is at its connection limit (gateway.max_connections); retry",
        ));
    }
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    // gzip and deflate are tonic's to read (held to the size limit decompressed); any other
    // encoding is the Python service's to refuse
    let readable = parts
        .headers
        .get("grpc-encoding")
        .is_none_or(|v| matches!(v.as_bytes(), b"identity" | b"gzip" | b"deflate"));
    let plane = shared.plane.get().filter(|_| readable);
    let message_limit = usize::try_from(config.max_request_bytes).unwrap_or(usize::MAX);
    match (plane, parts.uri.path()) {
        (Some(plane), MODEL_STREAM_INFER) => {
            // no body deadline: a stream may rightly stay open and idle between requests
            let service = NativeStream {
                plane: plane.clone(),
                headers: parts.headers.clone(),
                client: peer.to_string(),
                inflight: shared.inflight.clone(),
                max_inflight: config.max_inflight,
                stats: shared.stats.clone(),
            };
            let mut grpc =
                Grpc::new(ProstCodec::<ModelStreamInferResponse, ModelInferRequest>::default())
                    .accept_compressed(CompressionEncoding::Gzip)
                    .accept_compressed(CompressionEncoding::Deflate)
                    .max_decoding_message_size(message_limit)
                    .max_encoding_message_size(message_limit);
            let request = Request::from_parts(parts, body);
            return grpc.streaming(service, request).await.map(boxed);
        }
        (Some(_), MODEL_INFER) => {}
        _ => return pass_on(shared, upstream, &parts, boxed(body)).await,
    }
    let Some(plane) = plane else {
        return pass_on(shared, upstream, &parts, boxed(body)).await;
    };
    // Held until answered: bounds the calls waiting in this gateway, as for HTTP.
    let Ok(_admitted) = shared.inflight.clone().try_acquire_owned() else {
        shared.stats.overloaded.fetch_add(1, Ordering::Relaxed);
        return status_response(Status::resource_exhausted(format!(
            "this gateway holds {} inference requests; retry later (gateway.max_inflight)",
            config.max_inflight
        )));
    };
    let received_at = Instant::now();
    let received_s = now_s();
    let breach = BreachCell::default();
    // The message and its 5-byte frame header, within the size limit.
    let limit = config.max_request_bytes.saturating_add(5);
    let guarded = GuardedBody::new(body, config.body_timeout, limit, breach.clone());
    let Ok(collected) = guarded.collect().await else {
        return match breach.get() {
            Breach::TooLarge => {
                shared
                    .stats
                    .oversized_bodies
                    .fetch_add(1, Ordering::Relaxed);
                status_response(Status::resource_exhausted(format!(
                    "request message is larger than {} bytes (gateway.max_request_bytes)",
                    config.max_request_bytes
                )))
            }
            Breach::Slow => {
                shared.stats.slow_bodies.fetch_add(1, Ordering::Relaxed);
                status_response(Status::deadline_exceeded(
                    "the request message did not arrive in time (gateway.body_timeout_s)",
                ))
            }
            _ => status_response(Status::cancelled("the request message could not be read")),
        };
    };
    let bytes = collected.to_bytes();
    let outcome = Arc::new(Mutex::new(Outcome::Undecoded));
    let service = NativeInfer {
        plane: plane.clone(),
        headers: parts.headers.clone(),
        received: (received_at, received_s),
        client: peer.to_string(),
        outcome: outcome.clone(),
    };
    let mut grpc = Grpc::new(ProstCodec::<ModelInferResponse, ModelInferRequest>::default())
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .max_decoding_message_size(message_limit)
        .max_encoding_message_size(message_limit);
    let mut native = Request::new(Full::new(bytes.clone()));
    *native.headers_mut() = parts.headers.clone();
    let response = grpc.unary(service, native).await;
    let seen = *outcome.lock().unwrap_or_else(|p| p.into_inner());
    if seen == Outcome::Answered {
        shared.stats.native_answers.fetch_add(1, Ordering::Relaxed);
        return response.map(boxed);
    }
    pass_on(shared, upstream, &parts, boxed(Full::new(bytes))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(name: &str, datatype: &str, shape: &[i64]) -> InferTensor {
        InferTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    fn request(inputs: Vec<InferTensor>, raw: Vec<&[u8]>) -> ModelInferRequest {
        ModelInferRequest {
            model_name: "demo".into(),
            inputs,
            raw_input_contents: raw.into_iter().map(Bytes::copy_from_slice).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_contents_are_borrowed_as_they_are() {
        let message = request(vec![input("x", "UINT8", &[1, 2, 2])], vec![&[1, 2, 3, 4]]);
        let decoded = decode(&message).expect("decoded");
        let tensors = decoded.tensors();
        assert_eq!(tensors[0].data, &[1, 2, 3, 4]);
        assert_eq!(tensors[0].shape, &[1, 2, 2]);
        assert!(matches!(decoded.inputs[0].3, Cow::Borrowed(_)));
        assert_eq!(decoded.outputs, None);
    }

    #[test]
    fn typed_contents_become_little_endian_items() {
        let mut tensor = input("x", "INT16", &[3]);
        tensor.contents = Some(InferTensorContents {
            int_contents: vec![1, -2, 300],
            ..Default::default()
        });
        let message = request(vec![tensor.clone()], vec![]);
        let decoded = decode(&message).expect("decoded");
        assert_eq!(
            decoded.tensors()[0].data,
            &[1, 0, 0xfe, 0xff, 0x2c, 0x01][..]
        );
        let mut words = input("t", "BYTES", &[2]);
        words.contents = Some(InferTensorContents {
            bytes_contents: vec![Bytes::from_static(b"ab"), Bytes::new()],
            ..Default::default()
        });
        let message = request(vec![words], vec![]);
        let decoded = decode(&message).expect("decoded");
        assert_eq!(
            decoded.tensors()[0].data,
            &[2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0]
        );
    }

    #[test]
    fn what_the_python_service_would_not_read_is_refused_in_its_words() {
        let typed = |datatype: &str, contents: InferTensorContents| {
            let mut t = input("x", datatype, &[1]);
            t.contents = Some(contents);
            request(vec![t], vec![])
        };
        let supported = "(supported: BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, \
                         INT64, FP16, FP32, FP64, BYTES)";
        let big = "204586911469217587865369575465914518722527737634426672170098570280813333227\
                   648829687316535444808887888847985957889174851567855545841803403726862417921";
        let dims = vec!["2147483647"; 16].join(", ");
        // (the Python service's words for each, read from its decoder)
        let cases = [
            (
                request(vec![], vec![]),
                "inputs must be a non-empty list".to_owned(),
            ),
            (
                request(vec![input("x", "FP8", &[1])], vec![&[0]]),
                format!("input 'x': unsupported datatype 'FP8' {supported}"),
            ),
            (
                request(vec![input("it's", "FP8", &[1])], vec![&[0]]),
                format!("input \"it's\": unsupported datatype 'FP8' {supported}"),
            ),
            (
                request(vec![input("x", "UINT8", &[-1])], vec![&[0]]),
                "input 'x': shape dimensions must be between 0 and 2147483647".into(),
            ),
            (
                request(vec![input("x", "UINT8", &[1; 17])], vec![&[0]]),
                "input 'x': shape has 17 dimensions (at most 16)".into(),
            ),
            (
                request(vec![input("x", "FP32", &[2])], vec![&[0; 7]]),
                "input 'x': raw contents hold 7 bytes, shape [2] needs 8".into(),
            ),
            (
                request(vec![input("x", "UINT8", &[2147483647; 16])], vec![&[0]]),
                format!("input 'x': raw contents hold 1 bytes, shape [{dims}] needs {big}"),
            ),
            (
                request(vec![input("x", "BYTES", &[1])], vec![&[9, 0]]),
                "input 'x': BYTES data must be elements each prefixed by its length \
                 (4 bytes, little-endian)"
                    .into(),
            ),
            (
                request(vec![input("x", "BYTES", &[2])], vec![&[1, 0, 0, 0, b'a']]),
                "input 'x': BYTES data has 1 elements but shape [2] needs 2".into(),
            ),
            (
                request(vec![input("x", "BYTES", &[2147483647; 2])], vec![&[0]]),
                "input 'x': at most 1048576 BYTES elements per tensor (split the request)".into(),
            ),
            (
                request(
                    vec![input("x", "UINT8", &[1]), input("x", "UINT8", &[1])],
                    vec![&[0], &[0]],
                ),
                "inputs[1]: a unique, non-empty name is required".into(),
            ),
            (
                request(vec![input("", "UINT8", &[1])], vec![&[0]]),
                "inputs[0]: a unique, non-empty name is required".into(),
            ),
            (
                request(
                    vec![input("x", "UINT8", &[1]), input("y", "UINT8", &[1])],
                    vec![&[0]],
                ),
                "raw_input_contents must hold one entry per input".into(),
            ),
            (
                request(vec![input("x", "FP32", &[2])], vec![]),
                "input 'x': contents hold 0 values, shape [2] needs 2".into(),
            ),
            (
                request(vec![input("x", "FP16", &[2])], vec![]),
                "input 'x': contents hold 0 values, shape [2] needs 2".into(),
            ),
            (
                typed(
                    "INT8",
                    InferTensorContents {
                        int_contents: vec![128],
                        ..Default::default()
                    },
                ),
                "input 'x': contents cannot be read as INT8".into(),
            ),
            (
                typed(
                    "UINT8",
                    InferTensorContents {
                        uint_contents: vec![300],
                        ..Default::default()
                    },
                ),
                "input 'x': contents cannot be read as UINT8".into(),
            ),
        ];
        for (message, words) in cases {
            assert_eq!(decode(&message).unwrap_err(), words);
        }
        // an FP16 tensor of no items has nothing to read: taken
        assert!(decode(&request(vec![input("x", "FP16", &[0])], vec![])).is_ok());
        let mut asked = request(vec![input("x", "UINT8", &[1])], vec![&[0]]);
        asked.outputs.push(RequestedOutput {
            name: "y".into(),
            parameters: HashMap::from([(
                "classification".into(),
                InferParameter {
                    choice: Some(Choice::String("3".into())),
                },
            )]),
        });
        assert_eq!(
            decode(&asked).unwrap_err(),
            "output 'y': parameters.classification must be a positive integer \
             (the number of classes)"
        );
    }

    #[test]
    fn outputs_keep_their_first_position_and_classification_its_last_count() {
        let mut message = request(vec![input("x", "UINT8", &[1])], vec![&[0]]);
        let classify = |count| {
            HashMap::from([(
                "classification".to_owned(),
                InferParameter {
                    choice: Some(Choice::Int64(count)),
                },
            )])
        };
        for (name, parameters) in [
            ("b", classify(2)),
            ("a", HashMap::new()),
            ("b", classify(5)),
        ] {
            message.outputs.push(RequestedOutput {
                name: name.into(),
                parameters,
            });
        }
        let decoded = decode(&message).expect("decoded");
        assert_eq!(
            decoded.outputs,
            Some(vec![("b".into(), true), ("a".into(), true)])
        );
        assert_eq!(decoded.classification, vec![("b".into(), 5)]);
    }

    #[test]
    fn messages_round_trip_with_their_field_numbers() {
        let mut message = request(vec![input("x", "UINT8", &[1, 2])], vec![&[7, 8]]);
        message.model_version = "2".into();
        message.id = "abc".into();
        let encoded = message.encode_to_vec();
        // field 1 (model_name, length-delimited) leads: tag byte 0x0a
        assert_eq!(&encoded[..6], &[0x0a, 4, b'd', b'e', b'm', b'o']);
        assert_eq!(
            ModelInferRequest::decode(encoded.as_slice()).unwrap(),
            message
        );
    }

    fn tensor_strategy() -> impl Strategy<Value = InferTensor> {
        (
            prop::sample::select(vec!["UINT8", "INT8", "FP32", "BYTES", "FP16", "BOOL", "X"]),
            prop::collection::vec(-2i64..5, 0..4),
            prop::collection::vec(any::<i32>(), 0..8),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), 0..4),
            "[a-c]{0,2}",
        )
            .prop_map(|(datatype, shape, ints, bytes, name)| InferTensor {
                name: format!("{name}{datatype}"),
                datatype: datatype.into(),
                shape,
                contents: Some(InferTensorContents {
                    int_contents: ints,
                    uint_contents: vec![1, 2, 300],
                    bytes_contents: bytes.into_iter().map(Bytes::from).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            })
    }

    proptest! {
        /// Any bytes a caller sends: prost's decode and ours never panic.
        #[test]
        fn no_bytes_make_the_decoder_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(message) = ModelInferRequest::decode(data.as_slice()) {
                let _ = decode(&message);
            }
        }

        /// Any well-formed message: what is taken natively holds exactly the items its shape
        /// says (raw or typed), so the check against the model sees the request as sent.
        #[test]
        fn what_is_taken_fits_its_shape(
            inputs in prop::collection::vec(tensor_strategy(), 0..3),
            raw in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 0..3),
        ) {
            let message = ModelInferRequest {
                model_name: "m".into(),
                inputs,
                raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
                ..Default::default()
            };
            if let Ok(decoded) = decode(&message) {
                for tensor in decoded.tensors() {
                    let count: u64 = tensor.shape.iter().product();
                    if tensor.datatype.is_bytes() {
                        prop_assert_eq!(v2::bytes_count(tensor.data), Some(u128::from(count)));
                    } else {
                        prop_assert_eq!(tensor.data.len() as u64, count * tensor.datatype.size as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn refusals_map_to_the_python_services_codes() {
        let code = |status| status_of(&Refusal::new(status, "x")).code();
        assert_eq!(code(StatusCode::BAD_REQUEST), Code::InvalidArgument);
        assert_eq!(code(StatusCode::PAYLOAD_TOO_LARGE), Code::ResourceExhausted);
        assert_eq!(code(StatusCode::TOO_MANY_REQUESTS), Code::ResourceExhausted);
        assert_eq!(code(StatusCode::SERVICE_UNAVAILABLE), Code::Unavailable);
        assert_eq!(code(StatusCode::GATEWAY_TIMEOUT), Code::DeadlineExceeded);
        assert_eq!(code(StatusCode::INTERNAL_SERVER_ERROR), Code::Internal);
    }
}
