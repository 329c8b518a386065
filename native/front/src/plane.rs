//! The native inference path — the only one: `POST /v2/models/{m}[/versions/{v}]/infer`,
//! `…/infer-sealed`, jobs and their answers (and gRPC `ModelInfer`/`ModelStreamInfer`,
//! decoded in `grpc.rs`) answered by the front itself — API key, admission (decode, check,
//! seal: ppml-core), spool or XADD, the per-version reply reader, opening the answer and
//! writing the response — with no Python on the way.
//!
//! Python keeps the control: it installs what the path may serve (`set_routes`: per model,
//! the default version, the known versions and each open version's streams, keys and
//! declared tensors, rebuilt every ~100 ms from the checks it makes: live workers, backlog,
//! disk) and who may call (`set_callers`, from the key file it reloads). With the routes
//! the front refuses the rest itself, in the words the Python request path used: a key
//! that may not call the model, Redis not answering the route checks, a malformed or
//! unknown version, an unknown model, a version no worker has announced, a version closed
//! now, a body that does not decode; before the routes are installed or once the gateway
//! stops, 503. Where Redis shows a model or spec newer than the routes, it asks for them
//! rebuilt and waits for that before it judges. Every request answered here becomes an
//! `Event` that Python drains for its metrics, statistics, access log and (tracing on)
//! spans, so those stay one implementation.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::constant_time::verify_slices_are_equal;
use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body as _;
use percent_encoding::percent_decode_str;
use ppml_core::envelope::Keyring;
use ppml_core::request::{check, record_head, tensors, CheckError, Inputs, Tensor};
use ppml_core::response;
use ppml_core::v2::{self, py_repr};
use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ConnectionAddr, ConnectionInfo, FromRedisValue, RedisConnectionInfo, RedisResult, Value,
};
use tokio::sync::oneshot;

use crate::spool::Spool;
use crate::trace::{self, Trace};

/// A saturated gateway: a request that waited this share of its deadline before the
/// front could start on it gets 429 (it would likely miss the deadline anyway).
const ADMISSION_SHARE: f64 = 0.5;
/// Replies read at once from a reply stream, and how long one read blocks.
const REPLY_COUNT: usize = 512;
const REPLY_BLOCK_MS: u64 = 1000;
/// The plaintext benchmark mode's record mark (`PlaintextSealer` in Python).
const PLAIN_MARK: &[u8] = b"PX";
/// Events kept for Python to drain; beyond, the oldest are dropped (Python stopped).
const MAX_EVENTS: usize = 100_000;
/// `X-Request-ID` values a caller may set that are kept (echoed, logged).
const CALLER_ID_MAX: usize = 64;
/// What a request gets while the gateway has not installed its keys and routes yet, or no
/// longer serves (starting, stopping).
pub(crate) const STARTING: &str = "the gateway is starting or stopping: retry";
/// Longest a request waits for the routes to be rebuilt when Redis shows a model or spec
/// newer than them (two rebuilds: Python's checks are bounded to 1 s each).
const REBUILD_WAIT: Duration = Duration::from_millis(2500);

/// Where the queue is, and as whom (the password never reaches a log or Debug output).
pub struct RedisTarget {
    /// A Redis Cluster: this is one node of it; keys are routed to their nodes.
    pub cluster: bool,
    pub unix_path: Option<PathBuf>,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub ca_pem: Option<Vec<u8>>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
}

pub struct PlaneConfig {
    pub redis: RedisTarget,
    pub command_timeout: Duration,
    pub request_timeout: Duration,
    pub max_inflight_per_model: usize,
    pub max_rows: Option<u64>,
    pub spool: Option<PathBuf>,
    pub spool_min_bytes: usize,
    /// The body size limit, decompressed too (a compressed body larger once decompressed
    /// goes to the app, which says so).
    pub max_request_bytes: u64,
    /// A job's deadline to be answered, and how long its record and answer are kept.
    pub job_timeout: Duration,
    pub job_ttl: Duration,
    /// The hash of the specs workers announce (by queue name: a model's version 1 is its
    /// bare name) and the repository's hash of requested states (by model name): where a
    /// model or version newer than the routes shows first.
    pub announced_key: String,
    pub requested_key: String,
}

/// One version the path may serve now.
pub struct VersionRoute {
    /// The queue name (`model`, or `model@version`): the key of waiting and statistics.
    pub queue: String,
    pub request_stream: String,
    pub reply_stream: String,
    pub inputs: Inputs,
    /// Declared outputs (name, v2 datatype, shape): requested outputs are checked against
    /// them, and the classification extension's float scores.
    pub outputs: Vec<(String, String, Vec<i64>)>,
    /// The model's class names, for the classification extension.
    pub labels: Option<Vec<String>>,
    /// `None`: the plaintext benchmark mode (`security.encrypt_payloads: false`), whose
    /// records are the plain record behind a two-byte mark — never for real data.
    pub keyring: Option<Arc<Keyring>>,
    /// The associated data of a request and of its answer, around the request id.
    pub request_aad: (Vec<u8>, Vec<u8>),
    pub reply_aad: (Vec<u8>, Vec<u8>),
    /// A job's record key, less the job id.
    pub job_prefix: String,
    /// Set while the version takes no requests: what they get once their input is checked.
    pub closed: Option<Closed>,
}

/// Why a version takes no requests now, in the app's words.
pub struct Closed {
    /// The HTTP status (503 no live worker, 429 backlog over its bound).
    pub status: u16,
    pub message: String,
    /// For want of a live worker: the workers' heartbeat key and the age (seconds) within
    /// which a beat is live. A worker that came since the routes were built opens the
    /// version at once (counted here, per request, while it is closed).
    pub recheck: Option<(String, f64)>,
}

#[derive(Default)]
pub struct ModelRoute {
    /// What an unversioned request goes to (the newest ready version, else the newest).
    pub default_version: Option<String>,
    /// Every version the app knows of the model, newest first (an unknown one's 404
    /// lists them).
    pub known: Vec<String>,
    pub versions: HashMap<String, Arc<VersionRoute>>,
    /// Known versions whose spec no worker has announced (loading, or not loaded).
    pub pending: HashMap<String, Pending>,
}

/// A known version that takes no requests for want of its spec: 503 in the app's words,
/// unless its spec was announced since the routes were built (then they are rebuilt).
pub struct Pending {
    pub queue: String,
    pub message: String,
}

/// An API key's holder, as far as the inference path needs it.
pub struct Caller {
    pub name: String,
    /// The key's id: a job's owner, who alone may fetch its answer.
    pub key_id: String,
    /// `None`: every model.
    pub models: Option<HashSet<String>>,
    /// Whether the key holds the `infer` scope (others are refused 403 here).
    pub infer: bool,
}

/// A request refused for its key before anything else is looked at, as the app
/// authenticates first: 401 (no key, or not one of the key file's), 403 (a key without the
/// `infer` scope, or not for this model).
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) model: String,
    /// The version chosen (a pending one); for a call refused before one was: `-` when
    /// none was asked, `_other` when one was, as the app labels it.
    pub(crate) version: String,
    /// The version's queue, when one was chosen (its statistics count the refusal).
    pub(crate) queue: String,
    pub(crate) key_name: String,
    pub(crate) refusal: Refusal,
    /// What Redis may show newer than the routes (then they are rebuilt and the request
    /// judged again).
    recheck: Option<Recheck>,
}

impl Refused {
    /// Whether it is refused for its key (401, 403): before anything else is read.
    pub(crate) fn is_for_key(&self) -> bool {
        matches!(
            self.refusal.status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        )
    }

    /// A message refused before its version was chosen (400, in `words`).
    pub(crate) fn unread(model: &str, key_name: &str, words: String) -> Self {
        Self {
            model: model.to_owned(),
            version: "-".into(),
            queue: String::new(),
            key_name: key_name.to_owned(),
            refusal: Refusal::new(StatusCode::BAD_REQUEST, words),
            recheck: None,
        }
    }
}

#[derive(Debug)]
enum Recheck {
    /// An unknown model: announced by a worker, or asked to be loaded, since.
    Model,
    /// A pending version: its spec announced since (under its queue's name).
    Spec(String),
}

/// A request answered by the path, for Python's metrics, statistics and access log.
#[derive(Debug, Clone)]
pub struct Event {
    pub model: String,
    pub version: String,
    pub queue: String,
    pub path: String,
    pub status: u16,
    pub seconds: f64,
    pub key_name: String,
    pub request_id: String,
    pub caller_id: String,
    pub client: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The worker's batch size, queue wait and engine seconds, for a successful answer.
    pub answer: Option<(u64, f64, f64)>,
    /// Set for a 500: what went wrong, for the error log (never request data).
    pub failure: Option<String>,
    /// The gateway's spans, when tracing is on and the request is sampled.
    pub trace: Option<Trace>,
}

/// One request on its way through the path: when it arrived (monotonic, and wall-clock
/// seconds), its queue id, its size, and its trace (when sampled).
pub(crate) struct Call {
    pub(crate) received: (Instant, f64),
    pub(crate) request_id: String,
    pub(crate) size: u64,
    pub(crate) trace: Option<Trace>,
    /// The record's `mode` field (`e2e`: sealed by the client), if any.
    pub(crate) mode: Option<&'static str>,
}

struct Reply {
    ok: bool,
    body: Vec<u8>,
    batch_size: u64,
    queue_s: f64,
    engine_s: f64,
}

/// API keys by the SHA-256 of their token.
type Callers = Vec<([u8; 32], Arc<Caller>)>;

type Waiting = HashMap<String, (String, oneshot::Sender<Result<Reply, Refusal>>)>;

/// An answer that is an error: status, words, and whether to ask for a retry.
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) retry: bool,
    pub(crate) failure: Option<String>,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        let retry = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        );
        Self {
            status,
            message: message.into(),
            retry,
            failure: None,
        }
    }

    pub(crate) fn internal(message: impl Into<String>, failure: String) -> Self {
        Self {
            failure: Some(failure),
            ..Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
        }
    }
}

/// The queue: one Redis, or a Redis Cluster (each key to the node of its slot).
enum Queue {
    Single(Client),
    Cluster(ClusterClient),
}

/// A connection of either kind; clones share it (commands are pipelined on it).
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Queue {
    async fn connect(&self) -> RedisResult<Conn> {
        Ok(match self {
            Queue::Single(client) => Conn::Single(client.get_multiplexed_async_connection().await?),
            Queue::Cluster(client) => Conn::Cluster(client.get_async_connection().await?),
        })
    }
}

impl Conn {
    async fn query<T: FromRedisValue>(&mut self, command: &redis::Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(connection) => command.query_async(connection).await,
            Conn::Cluster(connection) => command.query_async(connection).await,
        }
    }

    async fn pipeline(&mut self, pipeline: &redis::Pipeline) -> RedisResult<()> {
        match self {
            Conn::Single(connection) => pipeline.query_async(connection).await,
            Conn::Cluster(connection) => pipeline.query_async(connection).await,
        }
    }
}

/// What `route` found: the request is the path's to answer.
pub struct Target {
    route: Arc<VersionRoute>,
    model: String,
    version: String,
    key_name: String,
    caller_id: String,
    kind: Kind,
    /// The caller's key id (a job's owner).
    key_id: String,
    /// The job asked for (`JobResult`).
    job_id: String,
}

/// What a routed request is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Infer,
    /// `…/infer-sealed`: the body is sealed by the client to the workers' key.
    Sealed,
    /// `POST …/jobs`: queued now, its answer fetched later.
    Job,
    /// `GET …/jobs/{id}`: a job's answer (or that it is pending).
    JobResult,
}

impl Target {
    pub(crate) fn model(&self) -> &str {
        &self.model
    }

    pub(crate) fn version(&self) -> &str {
        &self.version
    }

    pub(crate) fn queue(&self) -> &str {
        &self.route.queue
    }

    pub(crate) fn key_name(&self) -> &str {
        &self.key_name
    }

    pub(crate) fn labels(&self) -> Option<&[String]> {
        self.route.labels.as_deref()
    }
}

pub struct Plane {
    config: PlaneConfig,
    queue: Queue,
    sender: tokio::sync::Mutex<Option<Conn>>,
    routes: RwLock<Arc<HashMap<String, ModelRoute>>>,
    /// `None` until the key file is first installed: nothing is refused for its key before.
    callers: RwLock<Option<Arc<Callers>>>,
    /// Set while Redis does not answer the route checks: every request's 503 (after its key
    /// is checked), in the app's words.
    outage: RwLock<Option<String>>,
    /// Bumped each time the routes are installed (`rebuilt` wakes those waiting for it).
    generation: AtomicU64,
    rebuilt: tokio::sync::Notify,
    /// Asked for by a request that found Redis newer than the routes: the next rebuild
    /// reads the specs and the repository afresh.
    stale: AtomicBool,
    enabled: AtomicBool,
    waiting: Mutex<Waiting>,
    readers: Mutex<HashSet<String>>,
    inflight: Mutex<HashMap<String, usize>>,
    /// Oldest dropped first when Python stops draining (a stalled app must not make each
    /// answer here cost more).
    events: Mutex<VecDeque<Event>>,
    /// Tracing's sample ratio for new traces; `None`: tracing is off.
    tracing: RwLock<Option<f64>>,
    spool: Option<Spool>,
    random: SystemRandom,
}

/// Python's `{:g}` for the deadlines in messages (30 -> "30", 0.5 -> "0.5").
fn seconds_text(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

/// A model version as the app takes one (`VERSION_PATTERN`: a positive integer, 9 digits
/// at most).
fn is_version(text: &str) -> bool {
    (1..=9).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_digit())
        && !text.starts_with('0')
}

fn is_caller_id(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= CALLER_ID_MAX
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// `/v2/models/{model}/infer` or `/v2/models/{model}/versions/{version}/infer`.
fn infer_path(path: &str) -> Option<(&str, Option<&str>)> {
    let rest = path.strip_prefix("/v2/models/")?.strip_suffix("/infer")?;
    match rest.split('/').collect::<Vec<_>>().as_slice() {
        [model] if !model.is_empty() => Some((model, None)),
        [model, "versions", version] if !model.is_empty() && !version.is_empty() => {
            Some((model, Some(version)))
        }
        _ => None,
    }
}

/// `/v2/models/{m}{suffix}` (`/infer-sealed`, `/jobs`: the newest ready version).
fn model_path<'a>(path: &'a str, suffix: &str) -> Option<&'a str> {
    let model = path.strip_prefix("/v2/models/")?.strip_suffix(suffix)?;
    (!model.is_empty() && !model.contains('/')).then_some(model)
}

/// A request body's `Content-Encoding`, as the app reads them (tritonclient's request
/// compression); `None`: one it does not take.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Encoding {
    Identity,
    Gzip,
    Deflate,
}

/// The body's `Content-Encoding` as the app reads it (latin-1, stripped, lower case), or
/// the 415 it gets for one the gateway does not decode, in the app's words.
fn encoding(headers: &HeaderMap) -> Result<(Encoding, String), Refusal> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok((Encoding::Identity, String::new()));
    };
    let name: String = value.as_bytes().iter().map(|&b| char::from(b)).collect();
    let name = name.trim().to_lowercase();
    let encoding = match name.as_str() {
        "identity" => Encoding::Identity,
        "gzip" | "x-gzip" => Encoding::Gzip,
        "deflate" => Encoding::Deflate,
        _ => {
            let shown: String = name.chars().take(32).collect();
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Encoding {} is not supported (gzip, deflate or none)",
                    py_repr(&shown)
                ),
            ));
        }
    };
    Ok((encoding, name))
}

/// `body` decompressed, held to `limit` bytes decompressed as sent (read no further: no
/// decompression bomb), or what the app answers for it: 400 for data that is not
/// `name` data or ends inside it, 413 beyond the limit.
fn decompress(body: &[u8], encoding: Encoding, name: &str, limit: u64) -> Result<Bytes, Refusal> {
    use std::io::Read as _;
    let invalid = || {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the request body is not valid {name} data"),
        )
    };
    // a wrong header is invalid data however short the body (zlib's first check)
    if let [first, second, ..] = *body {
        let header_ok = match encoding {
            Encoding::Gzip => [first, second] == [0x1f, 0x8b],
            Encoding::Deflate => first & 0x0f == 8 && u16::from_be_bytes([first, second]) % 31 == 0,
            Encoding::Identity => true,
        };
        if !header_ok {
            return Err(invalid());
        }
    }
    let mut plain = Vec::new();
    let read = match encoding {
        Encoding::Gzip => flate2::read::GzDecoder::new(body)
            .take(limit.saturating_add(1))
            .read_to_end(&mut plain),
        Encoding::Deflate => flate2::read::ZlibDecoder::new(body)
            .take(limit.saturating_add(1))
            .read_to_end(&mut plain),
        Encoding::Identity => return Ok(Bytes::copy_from_slice(body)),
    };
    if plain.len() as u64 > limit {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds the {limit}-byte limit once decompressed"),
        ));
    }
    match read {
        Ok(_) => Ok(Bytes::from(plain)),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("the request body ends inside its {name} data"),
        )),
        Err(_) => Err(invalid()),
    }
}

/// `/v2/models/{m}/jobs/{id}`: the model and the job's id.
fn job_result_path(path: &str) -> Option<(&str, &str)> {
    let (model, job_id) = path.strip_prefix("/v2/models/")?.split_once("/jobs/")?;
    let plain = |s: &str| !s.is_empty() && !s.contains('/');
    (plain(model) && plain(job_id)).then_some((model, job_id))
}

fn field<'a>(fields: &'a HashMap<String, Value>, name: &str) -> Option<&'a [u8]> {
    match fields.get(name) {
        Some(Value::BulkString(bytes)) => Some(bytes.as_slice()),
        _ => None,
    }
}

fn number(fields: &HashMap<String, Value>, name: &str) -> f64 {
    field(fields, name)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|t| t.parse::<f64>().ok())
        .unwrap_or(0.0)
}

impl Plane {
    pub fn new(config: PlaneConfig) -> Result<Self, String> {
        let target = &config.redis;
        let redis = RedisConnectionInfo {
            db: target.db,
            username: target.username.clone(),
            password: target.password.clone(),
            ..Default::default()
        };
        let tls_addr = || ConnectionAddr::TcpTls {
            host: target.host.clone(),
            port: target.port,
            insecure: false,
            tls_params: None,
        };
        let certificates = || redis::TlsCertificates {
            client_tls: None,
            root_cert: target.ca_pem.clone(),
        };
        let queue = match (&target.unix_path, target.tls, target.cluster) {
            (_, tls, true) => {
                let addr = if tls {
                    tls_addr()
                } else {
                    ConnectionAddr::Tcp(target.host.clone(), target.port)
                };
                let mut builder = ClusterClientBuilder::new(vec![ConnectionInfo { addr, redis }]);
                if tls {
                    builder = builder.certs(certificates());
                }
                builder.build().map(Queue::Cluster)
            }
            (Some(path), _, false) => Client::open(ConnectionInfo {
                addr: ConnectionAddr::Unix(path.clone()),
                redis,
            })
            .map(Queue::Single),
            (None, true, false) => Client::build_with_tls(
                ConnectionInfo {
                    addr: tls_addr(),
                    redis,
                },
                certificates(),
            )
            .map(Queue::Single),
            (None, false, false) => Client::open(ConnectionInfo {
                addr: ConnectionAddr::Tcp(target.host.clone(), target.port),
                redis,
            })
            .map(Queue::Single),
        }
        // the library's words only: its error never holds the password
        .map_err(|e| {
            format!(
                "redis.url: the native path cannot use it ({})",
                e.category()
            )
        })?;
        let spool = config.spool.clone().map(Spool::new);
        Ok(Self {
            queue,
            sender: tokio::sync::Mutex::new(None),
            routes: RwLock::new(Arc::new(HashMap::new())),
            callers: RwLock::new(None),
            outage: RwLock::new(None),
            generation: AtomicU64::new(0),
            rebuilt: tokio::sync::Notify::new(),
            stale: AtomicBool::new(false),
            enabled: AtomicBool::new(false),
            waiting: Mutex::new(HashMap::new()),
            readers: Mutex::new(HashSet::new()),
            inflight: Mutex::new(HashMap::new()),
            events: Mutex::new(VecDeque::new()),
            tracing: RwLock::new(None),
            spool,
            random: SystemRandom::new(),
            config,
        })
    }

    /// Trace sampled requests from now on (new traces at `ratio`), or stop (`None`).
    pub fn set_tracing(&self, ratio: Option<f64>) {
        *self.tracing.write().unwrap_or_else(|p| p.into_inner()) = ratio;
    }

    /// A new call received at `received` (its trace begun, named `name`, when tracing is on
    /// and it is sampled).
    pub(crate) fn call(
        &self,
        headers: &HeaderMap,
        name: impl FnOnce() -> String,
        received: (Instant, f64),
        size: u64,
    ) -> Call {
        let ratio = *self.tracing.read().unwrap_or_else(|p| p.into_inner());
        let trace = ratio.and_then(|ratio| {
            let caller = headers.get("traceparent").and_then(|v| v.to_str().ok());
            let start_ns = (received.1 * 1e9) as u64;
            Trace::begin(caller, ratio, name(), start_ns, &self.random)
        });
        Call {
            received,
            request_id: self.request_id(),
            size,
            trace,
            mode: None,
        }
    }

    /// The call's trace with its server span ended now.
    pub(crate) fn finish_trace(call: &mut Call) -> Option<Trace> {
        let mut trace = call.trace.take();
        trace::close(&mut trace, Some(0));
        trace
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
    }

    /// What the path serves now, or (`outage`) the app's words while Redis does not
    /// answer the route checks; wakes the requests waiting for a rebuild.
    pub fn set_routes(&self, routes: HashMap<String, ModelRoute>, outage: Option<String>) {
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
        *self.outage.write().unwrap_or_else(|p| p.into_inner()) = outage;
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.rebuilt.notify_waiters();
    }

    /// Whether a request asked for the routes rebuilt from fresh reads (and no longer).
    pub fn take_stale(&self) -> bool {
        self.stale.swap(false, Ordering::AcqRel)
    }

    /// Wait (within `REBUILD_WAIT`) until the routes were rebuilt from reads begun after
    /// now: the rebuild under way may have read Redis before it changed, the next has not.
    async fn rebuilt_afresh(&self) {
        self.stale.store(true, Ordering::Release);
        let seen = self.generation.load(Ordering::Acquire);
        let deadline = tokio::time::Instant::now() + REBUILD_WAIT;
        loop {
            let notified = self.rebuilt.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.generation.load(Ordering::Acquire) >= seen + 2 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    pub fn set_callers(&self, callers: Vec<([u8; 32], Caller)>) {
        let callers = callers.into_iter().map(|(d, c)| (d, Arc::new(c))).collect();
        *self.callers.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(callers));
    }

    /// Fail the requests waiting on `queue` (its last worker died, say) with a 503.
    pub fn fail_waiting(&self, queue: &str, message: &str) -> usize {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<String> = waiting
            .iter()
            .filter(|(_, (q, _))| q == queue)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            if let Some((_, sender)) = waiting.remove(id) {
                let _ = sender.send(Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, message)));
            }
        }
        ids.len()
    }

    /// Queues with requests waiting for an answer here.
    pub fn waiting_queues(&self) -> Vec<String> {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let queues: HashSet<&String> = waiting.values().map(|(q, _)| q).collect();
        queues.into_iter().cloned().collect()
    }

    /// Requests in flight on the path, by queue.
    pub fn inflight(&self) -> HashMap<String, usize> {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn drain_events(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner())).into()
    }

    /// The key these headers carry, among `callers`; `None`: no key, or not one of them.
    fn caller(headers: &HeaderMap, callers: &Callers) -> Option<Arc<Caller>> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
        let (scheme, token) = value.split_once(' ')?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return None;
        }
        let hashed = digest(&SHA256, token.as_bytes());
        let mut found = None;
        for (stored, caller) in callers.iter() {
            // every entry compared: the time taken does not tell which matched
            if verify_slices_are_equal(stored, hashed.as_ref()).is_ok() {
                found = Some(caller.clone());
            }
        }
        found
    }

    /// Whether this request is on an inference route (`Ok(None)`: another route, Python's to
    /// answer), and for which target, or refused (its key, its model or version, Redis not
    /// answering, the gateway starting).
    pub(crate) fn route(
        &self,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Option<Target>, Box<Refused>> {
        // the app routes on the path decoded: an escaped name is the name it spells
        let decoded = percent_decode_str(path).decode_utf8_lossy();
        let path = decoded.as_ref();
        if let Some((model, job_id)) = job_result_path(path) {
            let mut target = self.target(model, None, headers)?;
            target.kind = Kind::JobResult;
            target.job_id = job_id.to_owned();
            return Ok(Some(target));
        }
        for (suffix, kind) in [("/infer-sealed", Kind::Sealed), ("/jobs", Kind::Job)] {
            if let Some(model) = model_path(path, suffix) {
                let mut target = self.target(model, None, headers)?;
                target.kind = kind;
                return Ok(Some(target));
            }
        }
        match infer_path(path) {
            Some((model, version)) => self.target(model, version, headers).map(Some),
            None => Ok(None),
        }
    }

    /// `find` (a `route` or `target`), judged again on routes rebuilt from fresh reads
    /// where Redis shows a model or spec newer than the routes it refused on.
    pub(crate) async fn settled<T>(
        &self,
        find: impl Fn() -> Result<T, Box<Refused>>,
    ) -> Result<T, Box<Refused>> {
        match find() {
            Err(refused) if !self.stands(&refused).await => {
                self.rebuilt_afresh().await;
                find().map_err(|mut refused| {
                    refused.recheck = None; // judged on the newest routes: it stands
                    refused
                })
            }
            found => found,
        }
    }

    /// Whether a request for `model` (`version`, or the default one) with these headers
    /// (its key) is the path's to answer, whichever protocol it came by, or refused, in the
    /// order the app judges: the key, Redis, the version's form, the model, the version.
    pub(crate) fn target(
        &self,
        model: &str,
        version: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Target, Box<Refused>> {
        let refused = |key_name: &str, status: StatusCode, message: &str| {
            Box::new(Refused {
                model: model.to_owned(),
                version: if version.is_some() { "_other" } else { "-" }.to_owned(),
                queue: String::new(),
                key_name: key_name.to_owned(),
                refusal: Refusal::new(status, message),
                recheck: None,
            })
        };
        // nothing is judged before Python installed the keys and routes (its first refresh,
        // ~100 ms after start) or after it stopped (shutting down)
        let callers = self
            .callers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(callers) = callers.filter(|_| self.enabled.load(Ordering::Acquire)) else {
            return Err(refused("-", StatusCode::SERVICE_UNAVAILABLE, STARTING));
        };
        let Some(caller) = Self::caller(headers, &callers) else {
            return Err(refused(
                "-",
                StatusCode::UNAUTHORIZED,
                "missing or invalid API key",
            ));
        };
        if !caller.infer {
            return Err(refused(
                &caller.name,
                StatusCode::FORBIDDEN,
                "this API key may not call the inference API",
            ));
        }
        if caller.models.as_ref().is_some_and(|m| !m.contains(model)) {
            return Err(refused(
                &caller.name,
                StatusCode::FORBIDDEN,
                "this API key may not use this model",
            ));
        }
        let outage = self
            .outage
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(message) = outage {
            return Err(refused(
                &caller.name,
                StatusCode::SERVICE_UNAVAILABLE,
                &message,
            ));
        }
        if let Some(asked) = version.filter(|v| !is_version(v)) {
            let shown: String = asked.chars().take(12).collect();
            let message = format!(
                "model {} has no version {} (versions are positive integers)",
                py_repr(model),
                py_repr(&shown)
            );
            return Err(refused(&caller.name, StatusCode::NOT_FOUND, &message));
        }
        let routes = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let served = routes.get(model);
        let Some((served, version)) = served.and_then(|served| {
            let version = version.or(served.default_version.as_deref())?;
            Some((served, version))
        }) else {
            let message = format!("model {} is not served here", py_repr(model));
            let mut refused = refused(&caller.name, StatusCode::NOT_FOUND, &message);
            refused.recheck = Some(Recheck::Model);
            return Err(refused);
        };
        if let Some(route) = served.versions.get(version).cloned() {
            return Ok(Target {
                route,
                model: model.to_owned(),
                version: version.to_owned(),
                key_name: caller.name.clone(),
                caller_id: caller_id(headers),
                kind: Kind::Infer,
                key_id: caller.key_id.clone(),
                job_id: String::new(),
            });
        }
        if let Some(pending) = served.pending.get(version) {
            return Err(Box::new(Refused {
                model: model.to_owned(),
                version: version.to_owned(),
                queue: pending.queue.clone(),
                key_name: caller.name.clone(),
                refusal: Refusal::new(StatusCode::SERVICE_UNAVAILABLE, pending.message.clone()),
                recheck: Some(Recheck::Spec(pending.queue.clone())),
            }));
        }
        let listed: Vec<&str> = served.known.iter().rev().map(String::as_str).collect();
        let message = format!(
            "model {} has no version {} (versions: {})",
            py_repr(model),
            py_repr(version),
            listed.join(", ")
        );
        Err(refused(&caller.name, StatusCode::NOT_FOUND, &message))
    }

    /// Whether `refused` still stands: an unknown model's name not announced nor asked for
    /// since, a pending version's spec not announced since (a Redis that does not answer
    /// leaves it to routes rebuilt, which say so).
    pub(crate) async fn stands(&self, refused: &Refused) -> bool {
        let config = &self.config;
        let checks: Vec<(&str, &str)> = match &refused.recheck {
            None => return true,
            Some(Recheck::Model) => vec![
                (&config.announced_key, &refused.model),
                (&config.requested_key, &refused.model),
            ],
            Some(Recheck::Spec(queue)) => vec![(&config.announced_key, queue)],
        };
        let Ok(mut connection) = self.connection().await else {
            return false;
        };
        // one key at a time: on a Redis Cluster the two hashes may live on two nodes
        for (key, field) in checks {
            let mut check = redis::cmd("HEXISTS");
            check.arg(key).arg(field);
            let found =
                tokio::time::timeout(config.command_timeout, connection.query(&check)).await;
            if !matches!(found, Ok(Ok(false))) {
                return false;
            }
        }
        true
    }

    /// Answer a request `refused` before its body is read, and record it (statistics only
    /// for a version chosen), as the app's `authenticated` routes do.
    pub(crate) fn refuse(
        &self,
        refused: &Refused,
        path: &str,
        headers: &HeaderMap,
        received: (Instant, f64),
        client: String,
        bytes_in: u64,
    ) -> Response<Full<Bytes>> {
        let mut call = self.call(headers, || route_name(path), received, bytes_in);
        let mut response = refused_response(&refused.refusal);
        let caller = caller_id(headers);
        let shown = if caller.is_empty() {
            &call.request_id
        } else {
            &caller
        };
        if let Ok(value) = HeaderValue::from_str(shown) {
            response.headers_mut().insert("x-request-id", value);
        }
        let bytes_out = response.body().size_hint().exact().unwrap_or(0);
        self.record_refused(refused, &mut call, path, caller, client, bytes_out);
        response
    }

    /// Record `refused` (no version was chosen: none is counted), for either protocol: a
    /// gRPC call's `path` is `gRPC <method>`, logged with version `-` as the service does.
    pub(crate) fn record_refused(
        &self,
        refused: &Refused,
        call: &mut Call,
        path: &str,
        caller_id: String,
        client: String,
        bytes_out: u64,
    ) {
        // the gRPC service logs a call refused before its version was chosen with `-`
        let version = if path.starts_with("gRPC ") && refused.queue.is_empty() {
            "-"
        } else {
            &refused.version
        };
        self.record(Event {
            model: refused.model.clone(),
            version: version.to_owned(),
            queue: refused.queue.clone(),
            path: path.to_owned(),
            status: refused.refusal.status.as_u16(),
            seconds: call.received.0.elapsed().as_secs_f64(),
            key_name: refused.key_name.clone(),
            request_id: call.request_id.clone(),
            caller_id,
            client,
            bytes_in: call.size,
            bytes_out,
            answer: None,
            failure: None,
            trace: Self::finish_trace(call),
        });
    }

    pub(crate) fn request_id(&self) -> String {
        let mut raw = [0u8; 16];
        let _ = self.random.fill(&mut raw);
        raw[6] = (raw[6] & 0x0f) | 0x40; // a uuid4, as the Python side makes them
        raw[8] = (raw[8] & 0x3f) | 0x80;
        raw.iter().fold(String::with_capacity(32), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    /// Answer `target` with its `body` (read by the front within its limits), counting
    /// the request's deadline from `received`.
    pub async fn answer(
        self: &Arc<Self>,
        target: &Target,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
        received: (Instant, f64),
        client: String,
    ) -> Response<Full<Bytes>> {
        // timed from the head, as the app times its own: body included
        let started = received.0;
        // a compressed body is read here (a job's answer has none to read)
        let decoded = match (target.kind, encoding(headers)) {
            (Kind::JobResult, _) | (_, Ok((Encoding::Identity, _))) => Ok(None),
            (_, Ok((compressed, name))) => {
                decompress(body, compressed, &name, self.config.max_request_bytes).map(Some)
            }
            (_, Err(refusal)) => Err(refusal),
        };
        let body = match &decoded {
            Ok(Some(plain)) => plain,
            _ => body,
        };
        let bytes_in = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut call = self.call(headers, || route_name(path), received, body.len() as u64);
        let outcome = match (&decoded, target.kind) {
            (Err(refusal), _) => Err(refusal.clone()),
            (Ok(_), Kind::Sealed) => self.exchange_sealed(target, body, &mut call).await,
            (Ok(_), Kind::Job) => self.submit_job(target, headers, body, &mut call).await,
            (Ok(_), Kind::JobResult) => self.job_result(target, &mut call).await,
            (Ok(_), Kind::Infer) => self.exchange(target, headers, body, &mut call).await,
        };
        let request_id = call.request_id.clone();
        let (response, answer, failure) = match outcome {
            Ok((response, answer)) => (response, Some(answer), None),
            Err(refusal) => {
                let failure = refusal.failure.clone();
                (refused_response(&refusal), None, failure)
            }
        };
        let mut response = response;
        let shown = if target.caller_id.is_empty() {
            &request_id
        } else {
            &target.caller_id
        };
        if let Ok(value) = HeaderValue::from_str(shown) {
            response.headers_mut().insert("x-request-id", value);
        }
        let bytes_out = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| response.body().size_hint().exact().unwrap_or(0));
        let trace = Self::finish_trace(&mut call);
        self.record(Event {
            model: target.model.clone(),
            version: target.version.clone(),
            queue: target.route.queue.clone(),
            path: path.to_owned(),
            status: response.status().as_u16(),
            seconds: started.elapsed().as_secs_f64(),
            key_name: target.key_name.clone(),
            request_id,
            caller_id: target.caller_id.clone(),
            client,
            bytes_in,
            bytes_out,
            answer,
            failure,
            trace,
        });
        response
    }

    pub(crate) fn record(&self, event: Event) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() >= MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    async fn exchange(
        self: &Arc<Self>,
        target: &Target,
        headers: &HeaderMap,
        body: &Bytes,
        call: &mut Call,
    ) -> Result<(Response<Full<Bytes>>, (u64, f64, f64)), Refusal> {
        self.admit(call.received)?;
        let request = parse_rest(headers, body)?;
        let inputs = tensors(&request, body);
        let (plaintext, answer) = self
            .infer(
                target,
                &inputs,
                request.outputs.as_deref(),
                &request.classification,
                call,
            )
            .await?;
        let route = &target.route;
        let wanted = response::Wanted {
            model: &target.model,
            version: Some(&target.version),
            id: request.id.as_deref(),
            parameters: None,
            outputs: request.outputs.as_deref(),
            binary_default: request.binary_default,
            classification: &request.classification,
            labels: route.labels.as_deref(),
        };
        Ok((v2_response(&plaintext, &wanted)?, answer))
    }

    /// A job: checked and sealed as a request is, its record (owner, outputs asked for)
    /// kept for `job_ttl`, queued without a reply stream (its answer stays in Redis, so
    /// that any gateway can hand it out), and 202 with its id at once.
    async fn submit_job(
        self: &Arc<Self>,
        target: &Target,
        headers: &HeaderMap,
        body: &Bytes,
        call: &mut Call,
    ) -> Result<(Response<Full<Bytes>>, (u64, f64, f64)), Refusal> {
        let request = parse_rest(headers, body)?;
        let inputs = tensors(&request, body);
        let admit = trace::open(&mut call.trace, "admit", 0, Some(call.size), &self.random);
        let sealed = self.admit_inputs(
            target,
            &inputs,
            request.outputs.as_deref(),
            &request.classification,
            call,
            admit,
        );
        trace::close(&mut call.trace, admit);
        let sealed = sealed?;
        self.closed(&target.route).await?;
        if !request.classification.is_empty() {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "the classification extension is not supported for jobs; ask for it on the \
                 model's /infer route",
            ));
        }
        let route = &target.route;
        let job_id = call.request_id.clone();
        let ttl = self.config.job_ttl.as_secs().max(1);
        let mut record = redis::pipe();
        record
            .cmd("HSET")
            .arg(format!("{}{job_id}", route.job_prefix))
            .arg("state")
            .arg("pending")
            .arg("model")
            .arg(&route.queue)
            .arg("owner")
            .arg(&target.key_id)
            .arg("outputs")
            .arg(job_outputs(request.outputs.as_deref()))
            .arg("binary")
            .arg(if request.binary_default { "1" } else { "0" })
            .ignore()
            .cmd("EXPIRE")
            .arg(format!("{}{job_id}", route.job_prefix))
            .arg(ttl)
            .ignore();
        self.run(&record, "store the job").await?;
        let deadline_ms =
            ((call.received.1 + self.config.job_timeout.as_secs_f64()) * 1000.0) as u64;
        let mut command = redis::cmd("XADD");
        command
            .arg(&route.request_stream)
            .arg("*")
            .arg("id")
            .arg(&job_id)
            .arg("deadline")
            .arg(deadline_ms)
            .arg("reply")
            .arg("")
            // jobs stay in Redis: they must outlive this gateway and its host's spool
            .arg("body")
            .arg(sealed.as_slice())
            .arg("job")
            .arg(ttl);
        let enqueue = trace::open(&mut call.trace, "enqueue", 0, None, &self.random);
        if let (Some(trace), Some(index)) = (&call.trace, enqueue) {
            command.arg("tp").arg(trace.traceparent(index));
        }
        let queued = self.enqueue(&command).await;
        trace::close(&mut call.trace, enqueue);
        queued?;
        let document = serde_json::json!({"job_id": job_id, "model": target.model}).to_string();
        let mut response = Response::new(Full::new(Bytes::from(document)));
        *response.status_mut() = StatusCode::ACCEPTED;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(location) =
            HeaderValue::from_str(&format!("/v2/models/{}/jobs/{job_id}", target.model))
        {
            response.headers_mut().insert(header::LOCATION, location);
        }
        Ok((response, (0, 0.0, 0.0)))
    }

    /// A job's answer, read from its record: 202 while pending, 504 if it failed, 404 for a
    /// job that is unknown, expired or another key's. `None`: the version that answered it
    /// is not open here now (the app answers).
    async fn job_result(
        self: &Arc<Self>,
        target: &Target,
        call: &mut Call,
    ) -> Result<(Response<Full<Bytes>>, (u64, f64, f64)), Refusal> {
        let job_id = &target.job_id;
        let mut command = redis::cmd("HGETALL");
        command.arg(format!("{}{job_id}", target.route.job_prefix));
        let mut connection = self.connection().await?;
        let read = tokio::time::timeout(
            self.config.command_timeout,
            connection.query::<HashMap<String, Vec<u8>>>(&command),
        )
        .await;
        let fields = match read {
            Ok(Ok(fields)) => fields,
            other => {
                self.judge(other.map(|r| r.map(|_| ())), "look up the job")
                    .await?;
                HashMap::new()
            }
        };
        let text = |name: &str| fields.get(name).and_then(|v| std::str::from_utf8(v).ok());
        let unknown = || {
            Refusal::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no job {} for model {} (unknown or expired)",
                    py_repr(job_id),
                    py_repr(&target.model)
                ),
            )
        };
        let (Some(queue), Some(owner), Some(state), Some(outputs)) =
            (text("model"), text("owner"), text("state"), text("outputs"))
        else {
            return Err(unknown());
        };
        // `model@version`; version 1 keeps the bare name
        let (model, version) = queue.split_once('@').unwrap_or((queue, "1"));
        let owned = verify_slices_are_equal(owner.as_bytes(), target.key_id.as_bytes()).is_ok();
        let outputs = job_outputs_of(outputs).ok_or_else(unknown)?;
        if model != target.model || !owned || !matches!(state, "pending" | "done" | "failed") {
            return Err(unknown());
        }
        match state {
            "pending" => {
                let document =
                    serde_json::json!({"job_id": job_id, "state": "pending"}).to_string();
                let mut response = Response::new(Full::new(Bytes::from(document)));
                *response.status_mut() = StatusCode::ACCEPTED;
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return Ok((response, (0, 0.0, 0.0)));
            }
            "failed" => {
                let error = text("error")
                    .filter(|e| !e.is_empty())
                    .unwrap_or("the job failed");
                return Err(Refusal::new(StatusCode::GATEWAY_TIMEOUT, error));
            }
            _ => {}
        }
        // the version that answered it: its keys open the answer
        let routes = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(route) = routes
            .get(model)
            .and_then(|served| served.versions.get(version))
            .filter(|route| route.queue == queue)
        else {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "job {} was answered by model {} version {version}, which is not served \
                     now: its answer can be fetched once that version is loaded again",
                    py_repr(job_id),
                    py_repr(model)
                ),
            ));
        };
        let reply = Reply {
            ok: text("ok") == Some("1"),
            body: fields.get("body").cloned().unwrap_or_default(),
            batch_size: 1,
            queue_s: 0.0,
            engine_s: 0.0,
        };
        let open = trace::open(&mut call.trace, "open", 0, None, &self.random);
        let plaintext = open_reply(route, job_id, &reply);
        trace::close(&mut call.trace, open);
        let plaintext = plaintext?;
        if !reply.ok {
            return Err(worker_error(&plaintext));
        }
        let binary = text("binary") == Some("1");
        let wanted = response::Wanted {
            model: &target.model,
            version: Some(version),
            id: Some(job_id),
            parameters: None,
            outputs: outputs.as_deref(),
            binary_default: binary,
            classification: &[],
            labels: None,
        };
        Ok((v2_response(&plaintext, &wanted)?, (0, 0.0, 0.0)))
    }

    /// An end-to-end sealed request: the client's sealed body wrapped as the queue record
    /// (`seal`), queued with mode `e2e`, and the worker's answer — as opaque to this gateway
    /// — handed back.
    async fn exchange_sealed(
        self: &Arc<Self>,
        target: &Target,
        body: &Bytes,
        call: &mut Call,
    ) -> Result<(Response<Full<Bytes>>, (u64, f64, f64)), Refusal> {
        self.admit(call.received)?;
        let route = &target.route;
        self.closed(route).await?;
        let request_id = call.request_id.clone();
        let seal = trace::open(&mut call.trace, "seal", 0, Some(call.size), &self.random);
        let sealed = seal_record(route, &[body.as_ref()], body.len(), &request_id);
        trace::close(&mut call.trace, seal);
        let sealed = sealed?;
        let _held = self.hold(&route.queue)?;
        let deadline = self.config.request_timeout.as_secs_f64();
        let remaining = (deadline - call.received.0.elapsed().as_secs_f64()).max(0.001);
        call.mode = Some("e2e");
        let deadline_at = call.received.1 + deadline;
        let reply = self
            .send(route, call, sealed, deadline_at, remaining)
            .await?;
        // The Python gateway reads a reply it cannot open as the client's doing too (400),
        // and logs it.
        let plaintext = open_reply(route, &request_id, &reply).map_err(|refusal| Refusal {
            failure: refusal.failure,
            ..Refusal::new(StatusCode::BAD_REQUEST, SEALED_UNOPENED)
        })?;
        if !reply.ok {
            return Err(sealed_worker_error(&plaintext));
        }
        let mut response = Response::new(Full::new(Bytes::from(plaintext)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        Ok((response, (reply.batch_size, reply.queue_s, reply.engine_s)))
    }

    /// A request that waited this long before the front could start on it is refused
    /// (429): it would likely miss its deadline anyway.
    pub(crate) fn admit(&self, received: (Instant, f64)) -> Result<(), Refusal> {
        let waited = received.0.elapsed().as_secs_f64();
        if waited > self.config.request_timeout.as_secs_f64() * ADMISSION_SHARE {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "this gateway is saturated: the request waited {waited:.1} s before it \
                     could be started; retry later"
                ),
            ));
        }
        Ok(())
    }

    /// The shared part of either protocol's request: `inputs` checked against the model,
    /// the outputs asked for known, sealed, queued, answered; the answer's record opened,
    /// and the worker's batch size, queue wait and engine time.
    pub(crate) async fn infer(
        self: &Arc<Self>,
        target: &Target,
        inputs: &[Tensor<'_>],
        outputs: Option<&[(String, bool)]>,
        classification: &[(String, u64)],
        call: &mut Call,
    ) -> Result<(Vec<u8>, (u64, f64, f64)), Refusal> {
        let route = &target.route;
        let deadline = self.config.request_timeout.as_secs_f64();
        let received = call.received;
        let request_id = call.request_id.clone();
        let request_id = request_id.as_str();
        let waited = received.0.elapsed().as_secs_f64();
        let admit = trace::open(&mut call.trace, "admit", 0, Some(call.size), &self.random);
        let admitted = self.admit_inputs(target, inputs, outputs, classification, call, admit);
        trace::close(&mut call.trace, admit);
        let sealed = admitted?;
        self.closed(route).await?;

        let _held = self.hold(&route.queue)?;
        let remaining = (deadline - waited).max(0.001);
        let reply = self
            .send(route, call, sealed, received.1 + deadline, remaining)
            .await?;
        let plaintext = open_reply(route, request_id, &reply)?;
        if !reply.ok {
            return Err(worker_error(&plaintext));
        }
        Ok((plaintext, (reply.batch_size, reply.queue_s, reply.engine_s)))
    }

    /// `inputs` checked against the model and the outputs asked for, and sealed as the
    /// queue record of `call` (the `admit` span's work; `seal` under it).
    fn admit_inputs(
        &self,
        target: &Target,
        inputs: &[Tensor<'_>],
        outputs: Option<&[(String, bool)]>,
        classification: &[(String, u64)],
        call: &mut Call,
        admit: Option<usize>,
    ) -> Result<Vec<u8>, Refusal> {
        let route = &target.route;
        let request_id = call.request_id.as_str();
        check(inputs, &route.inputs, self.config.max_rows).map_err(|e| match e {
            CheckError::Invalid(m) => Refusal::new(StatusCode::BAD_REQUEST, m),
            CheckError::TooManyRows(m) => Refusal::new(StatusCode::PAYLOAD_TOO_LARGE, m),
        })?;
        if let Some(asked) = outputs {
            for (name, _) in asked {
                if !route.outputs.iter().any(|(known, _, _)| known == name) {
                    let mut known: Vec<String> =
                        route.outputs.iter().map(|(n, _, _)| n.clone()).collect();
                    known.sort();
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "output {} is not an output of model {} (available: {})",
                            py_repr(name),
                            py_repr(&route.inputs.model),
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
        for (name, _) in classification {
            // refused before it is queued, as the Python check does (the declared output)
            let Some((_, datatype, shape)) = route.outputs.iter().find(|(n, _, _)| n == name)
            else {
                continue;
            };
            if !matches!(datatype.as_str(), "FP16" | "FP32" | "FP64")
                || !(1..=2).contains(&shape.len())
            {
                let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "output {}: classification needs float scores shaped [batch, classes], \
                         not {datatype} [{}]",
                        py_repr(name),
                        dims.join(", ")
                    ),
                ));
            }
        }
        let head = record_head(inputs)
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(inputs.len() + 1);
        parts.push(&head);
        parts.extend(inputs.iter().map(|input| input.data));
        let total: usize = parts.iter().map(|part| part.len()).sum();
        let request_id = request_id.to_owned();
        let request_id = request_id.as_str();
        let seal = trace::open(
            &mut call.trace,
            "seal",
            admit.unwrap_or(0),
            Some(call.size),
            &self.random,
        );
        let sealed = seal_record(route, &parts, total, request_id);
        drop(parts);
        trace::close(&mut call.trace, seal);
        sealed
    }

    /// The refusal a closed version's requests get, unless it has a live worker again.
    async fn closed(&self, route: &VersionRoute) -> Result<(), Refusal> {
        let Some(closed) = &route.closed else {
            return Ok(());
        };
        if let Some((key, max_age)) = &closed.recheck {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let mut count = redis::cmd("ZCOUNT");
            count.arg(key).arg(now - max_age).arg("+inf");
            if let Ok(mut connection) = self.connection().await {
                let counted = tokio::time::timeout(
                    self.config.command_timeout,
                    connection.query::<u64>(&count),
                )
                .await;
                if let Ok(Ok(live)) = counted {
                    if live > 0 {
                        return Ok(());
                    }
                }
            }
        }
        let status = StatusCode::from_u16(closed.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        Err(Refusal::new(status, closed.message.clone()))
    }

    /// One more request in flight on `queue`, within `worker`'s per-model bound.
    fn hold(&self, queue: &str) -> Result<Held<'_>, Refusal> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let count = inflight.entry(queue.to_owned()).or_insert(0);
        if *count >= self.config.max_inflight_per_model {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "model {} has {} requests in flight here; retry later",
                    py_repr(queue),
                    count
                ),
            ));
        }
        *count += 1;
        Ok(Held {
            plane: self,
            queue: queue.to_owned(),
        })
    }

    async fn connection(&self) -> Result<Conn, Refusal> {
        let mut sender = self.sender.lock().await;
        if let Some(connection) = sender.as_ref() {
            return Ok(connection.clone());
        }
        let connected =
            tokio::time::timeout(self.config.command_timeout, self.queue.connect()).await;
        match connected {
            Ok(Ok(connection)) => {
                *sender = Some(connection.clone());
                Ok(connection)
            }
            Ok(Err(e)) => Err(unreachable_queue(&e)),
            Err(_) => Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue did not answer in time to take the request",
            )),
        }
    }

    async fn send(
        self: &Arc<Self>,
        route: &Arc<VersionRoute>,
        call: &mut Call,
        sealed: Vec<u8>,
        deadline_at: f64,
        remaining: f64,
    ) -> Result<Reply, Refusal> {
        let request_id = call.request_id.clone();
        let request_id = request_id.as_str();
        self.ensure_reader(route);
        let (tell, answer) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request_id.to_owned(), (route.queue.clone(), tell));
        let waiting = Unwait {
            plane: self,
            request_id,
        };
        let mut command = redis::cmd("XADD");
        command
            .arg(&route.request_stream)
            .arg("*")
            .arg("id")
            .arg(request_id)
            .arg("deadline")
            .arg(((deadline_at) * 1000.0) as u64)
            .arg("reply")
            .arg(&route.reply_stream);
        if let Some(mode) = call.mode {
            command.arg("mode").arg(mode);
        }
        let enqueue = trace::open(&mut call.trace, "enqueue", 0, None, &self.random);
        if let (Some(trace), Some(index)) = (&call.trace, enqueue) {
            // the worker's spans continue from here: in the record's clear header
            command.arg("tp").arg(trace.traceparent(index));
        }
        let spooled = match &self.spool {
            Some(spool) if sealed.len() >= self.config.spool_min_bytes => {
                let name = self.request_id();
                match spool.put(&name, &sealed) {
                    Ok(()) => Some(name),
                    Err(_) => None, // e.g. its disk is full: Redis takes the payload
                }
            }
            _ => None,
        };
        match &spooled {
            Some(name) => command.arg("file").arg(name),
            None => command.arg("body").arg(sealed.as_slice()),
        };
        let queued = self.enqueue(&command).await;
        trace::close(&mut call.trace, enqueue);
        if let Err(refusal) = queued {
            if let (Some(spool), Some(name)) = (&self.spool, &spooled) {
                spool.release(name);
            }
            return Err(refusal);
        }
        let wait = trace::open(&mut call.trace, "wait", 0, None, &self.random);
        let outcome = tokio::time::timeout(Duration::from_secs_f64(remaining), answer).await;
        trace::close(&mut call.trace, wait);
        drop(waiting);
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway is shutting down",
            )),
            Err(_) => Err(Refusal::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no answer from model {} within {} s",
                    py_repr(&route.queue),
                    seconds_text(self.config.request_timeout.as_secs_f64())
                ),
            )),
        }
    }

    /// Run `pipeline` (`what` it does, for the refusal's words), with `enqueue`'s handling
    /// of a Redis that is gone, frozen or refusing.
    async fn run(&self, pipeline: &redis::Pipeline, what: &str) -> Result<(), Refusal> {
        let mut connection = self.connection().await?;
        let sent =
            tokio::time::timeout(self.config.command_timeout, connection.pipeline(pipeline)).await;
        self.judge(sent, what).await
    }

    async fn judge(
        &self,
        sent: Result<RedisResult<()>, tokio::time::error::Elapsed>,
        what: &str,
    ) -> Result<(), Refusal> {
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    *self.sender.lock().await = None;
                }
                Err(match e.code() {
                    Some(code) => Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("queue refused to {what}: {code}"),
                    ),
                    None => unreachable_queue(&e),
                })
            }
            Err(_) => {
                *self.sender.lock().await = None;
                Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("queue did not answer in time to {what}"),
                ))
            }
        }
    }

    async fn enqueue(&self, command: &redis::Cmd) -> Result<(), Refusal> {
        let mut connection = self.connection().await?;
        let sent = tokio::time::timeout(
            self.config.command_timeout,
            connection.query::<Value>(command),
        )
        .await
        .map(|result| result.map(|_| ()));
        // e.g. Redis at maxmemory refusing writes: overloaded, nothing dropped (503)
        self.judge(sent, "take the request").await
    }

    fn ensure_reader(self: &Arc<Self>, route: &Arc<VersionRoute>) {
        let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if readers.insert(route.reply_stream.clone()) {
            let plane = Arc::clone(self);
            let (queue, stream) = (route.queue.clone(), route.reply_stream.clone());
            tokio::spawn(async move { plane.read_replies(queue, stream).await });
        }
    }

    /// One reader per version's reply stream: each answer goes to its waiting request.
    async fn read_replies(self: Arc<Self>, queue: String, stream: String) {
        let mut last = "0-0".to_owned();
        let mut delay = Duration::from_millis(50);
        // its own connection: a blocking read holds the connection it is sent on
        let mut connection: Option<Conn> = None;
        loop {
            if connection.is_none() {
                match tokio::time::timeout(self.config.command_timeout, self.queue.connect()).await
                {
                    Ok(Ok(c)) => connection = Some(c),
                    Ok(Err(_)) => {
                        // gone (refused, no socket): what was in transit may never come
                        self.lost(&queue);
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                        continue;
                    }
                    // frozen: its answers come once it recovers; the waiting keep waiting
                    Err(_) => continue,
                }
            }
            let Some(conn) = connection.as_mut() else {
                continue;
            };
            let mut command = redis::cmd("XREAD");
            command
                .arg("COUNT")
                .arg(REPLY_COUNT)
                .arg("BLOCK")
                .arg(REPLY_BLOCK_MS)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&last);
            let patience = self.config.command_timeout + Duration::from_millis(REPLY_BLOCK_MS);
            let read = tokio::time::timeout(
                patience,
                conn.query::<Option<redis::streams::StreamReadReply>>(&command),
            )
            .await;
            match read {
                Ok(Ok(reply)) => {
                    delay = Duration::from_millis(50);
                    for key in reply.map(|r| r.keys).unwrap_or_default() {
                        for entry in key.ids {
                            last = entry.id.clone();
                            self.deliver(&entry.map);
                        }
                    }
                }
                // Frozen, not gone: what it holds is answered once it recovers, so the
                // waiting requests keep waiting (up to their deadlines).
                Err(_) => connection = None,
                Ok(Err(_)) => {
                    // Answers in transit on a lost connection may never arrive: 503 now
                    // rather than at the deadline.
                    connection = None;
                    self.lost(&queue);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn lost(&self, queue: &str) {
        self.fail_waiting(
            queue,
            "the connection to the queue was lost while waiting for the answer; retry",
        );
    }

    fn deliver(&self, fields: &HashMap<String, Value>) {
        let Some(id) = field(fields, "id").and_then(|b| std::str::from_utf8(b).ok()) else {
            return;
        };
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some((_, tell)) = waiter {
            let reply = Reply {
                ok: field(fields, "ok") == Some(b"1"),
                body: field(fields, "body").unwrap_or_default().to_vec(),
                batch_size: (number(fields, "bs") as u64).max(1),
                queue_s: number(fields, "qw") / 1000.0,
                engine_s: number(fields, "et") / 1000.0,
            };
            let _ = tell.send(Ok(reply));
        }
    }
}

/// A request's place in `inflight`, given back however the request ends.
struct Held<'a> {
    plane: &'a Plane,
    queue: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut inflight = self
            .plane
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = inflight.get_mut(&self.queue) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                inflight.remove(&self.queue);
            }
        }
    }
}

/// A request's entry in `waiting`, removed however the request ends (a client gone too).
struct Unwait<'a> {
    plane: &'a Plane,
    request_id: &'a str,
}

impl Drop for Unwait<'_> {
    fn drop(&mut self) {
        self.plane
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.request_id);
    }
}

/// `parts` (`total` bytes in all) sealed as the queue record `request_id` of `route`'s
/// model (behind the plain mark in the plaintext benchmark mode).
fn seal_record(
    route: &VersionRoute,
    parts: &[&[u8]],
    total: usize,
    request_id: &str,
) -> Result<Vec<u8>, Refusal> {
    let mut aad = route.request_aad.0.clone();
    aad.extend_from_slice(request_id.as_bytes());
    aad.extend_from_slice(&route.request_aad.1);
    match &route.keyring {
        Some(keyring) => {
            let mut sealed = vec![0u8; keyring.sealed_len(total)];
            keyring
                .seal_parts_into(parts, &aad, &mut sealed)
                .map_err(|e| Refusal::internal("internal error", format!("sealing failed: {e}")))?;
            Ok(sealed)
        }
        None => {
            let mut plain = Vec::with_capacity(PLAIN_MARK.len() + total);
            plain.extend_from_slice(PLAIN_MARK);
            parts.iter().for_each(|part| plain.extend_from_slice(part));
            Ok(plain)
        }
    }
}

/// The worker's answer record to `request_id`, opened (500 if it fails to).
fn open_reply(route: &VersionRoute, request_id: &str, reply: &Reply) -> Result<Vec<u8>, Refusal> {
    let mut aad = route.reply_aad.0.clone();
    aad.extend_from_slice(request_id.as_bytes());
    aad.extend_from_slice(&route.reply_aad.1);
    let refused = || {
        Refusal::internal(
            "internal error",
            format!("reply for request {request_id} refused: record failed authentication"),
        )
    };
    match &route.keyring {
        Some(keyring) => keyring.open(&reply.body, &aad).map_err(|_| refused()),
        None => Ok(reply
            .body
            .strip_prefix(PLAIN_MARK)
            .ok_or_else(refused)?
            .to_vec()),
    }
}

/// What the Python gateway answers when the workers could not open a client-sealed request.
const SEALED_UNOPENED: &str = "the sealed request could not be opened by the model's workers \
                               (not sealed to their attested key, or damaged)";
const SEALED_INVALID: &str = "the sealed request was opened by the model's workers, but what it \
                              holds is not a valid inference request record (check the client's \
                              encoding)";

/// A worker's error answer to a client-sealed request: what it could not open or read is
/// the caller's (400), in the Python gateway's words; anything else as for any request.
fn sealed_worker_error(plaintext: &[u8]) -> Refusal {
    let kind = serde_json::from_slice::<serde_json::Value>(plaintext)
        .ok()
        .and_then(|v| v.get("kind")?.as_str().map(str::to_owned));
    match kind.as_deref() {
        Some("integrity") => Refusal::new(StatusCode::BAD_REQUEST, SEALED_UNOPENED),
        Some("protocol") => Refusal::new(StatusCode::BAD_REQUEST, SEALED_INVALID),
        _ => worker_error(plaintext),
    }
}

/// The outputs a job asked for as its record keeps them (Python's `json.dumps` of the
/// name -> binary mapping, in request order; `null`: all).
fn job_outputs(outputs: Option<&[(String, bool)]>) -> String {
    match outputs {
        None => "null".into(),
        Some(outputs) => {
            let items: Vec<String> = outputs
                .iter()
                .map(|(name, binary)| {
                    format!("{}: {binary}", serde_json::Value::from(name.as_str()))
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
    }
}

/// A REST request body (JSON, or the binary extension's header and tensors) decoded; 400
/// in the app's words if it does not decode.
fn parse_rest(headers: &HeaderMap, body: &[u8]) -> Result<v2::InferRequest, Refusal> {
    let header_length = headers
        .get("inference-header-content-length")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    v2::parse_request(body, header_length.as_deref())
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.0))
}

/// The REST response to the answer record `plaintext`, as `wanted`.
fn v2_response(
    plaintext: &[u8],
    wanted: &response::Wanted<'_>,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let (document, json_size) = response::encode(plaintext, wanted).map_err(|e| match e {
        response::ResponseError::NotText(_) | response::ResponseError::Classification(_) => {
            Refusal::new(StatusCode::BAD_REQUEST, e.to_string())
        }
        _ => Refusal::internal("internal error", format!("ProtocolError: {e}")),
    })?;
    let mut response = Response::new(Full::new(Bytes::from(document)));
    let headers = response.headers_mut();
    match json_size {
        None => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        Some(size) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert("inference-header-content-length", HeaderValue::from(size));
        }
    }
    Ok(response)
}

/// A job record's `outputs` (a JSON object of name -> binary, in request order, or `null`);
/// `None` if it is neither.
fn job_outputs_of(text: &str) -> Option<Option<Vec<(String, bool)>>> {
    struct Ordered(Vec<(String, bool)>);
    impl<'de> serde::Deserialize<'de> for Ordered {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Pairs;
            impl<'de> serde::de::Visitor<'de> for Pairs {
                type Value = Ordered;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an object of output names and flags")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Ordered, A::Error> {
                    let mut pairs = Vec::new();
                    while let Some((name, binary)) = map.next_entry::<String, bool>()? {
                        pairs.push((name, binary));
                    }
                    Ok(Ordered(pairs))
                }
            }
            deserializer.deserialize_map(Pairs)
        }
    }
    serde_json::from_str::<Option<Ordered>>(text)
        .ok()
        .map(|found| found.map(|o| o.0))
}

fn unreachable_queue(error: &redis::RedisError) -> Refusal {
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("queue unreachable ({})", error.category()),
    )
}

/// A worker's error answer (`{"kind": …, "error": …}`): invalid input is the caller's
/// (400), anything else the service's (500).
fn worker_error(plaintext: &[u8]) -> Refusal {
    let problem: Option<(String, String)> = serde_json::from_slice::<serde_json::Value>(plaintext)
        .ok()
        .and_then(|v| {
            let kind = v.get("kind")?.as_str()?.to_owned();
            let error = match v.get("error")? {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some((kind, error))
        });
    match problem {
        Some((kind, message)) if kind == "invalid_input" => {
            Refusal::new(StatusCode::BAD_REQUEST, message)
        }
        Some((kind, message))
            if matches!(
                kind.as_str(),
                "integrity" | "protocol" | "engine" | "dead_letter"
            ) =>
        {
            let class = match kind.as_str() {
                "integrity" => "IntegrityError",
                "protocol" => "ProtocolError",
                _ => "EngineError",
            };
            let failure = format!("request failed: {class}: {message}");
            Refusal {
                failure: Some(failure),
                ..Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, message)
            }
        }
        _ => {
            let message = "the worker's error answer is malformed";
            Refusal::internal(message, format!("request failed: ProtocolError: {message}"))
        }
    }
}

/// A refusal as the app answers it (401 names the scheme a key is sent with).
pub(crate) fn refused_response(refusal: &Refusal) -> Response<Full<Bytes>> {
    let mut response = crate::server::error(refusal.status, &refusal.message, false, refusal.retry);
    if refusal.status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// The caller's own request id, kept (echoed, logged) when it is a short plain token.
fn caller_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_caller_id(v))
        .unwrap_or("")
        .to_owned()
}

/// The server span's name for an inference route: "METHOD route", as the app names its own.
fn route_name(path: &str) -> String {
    if job_result_path(path).is_some() {
        "GET /v2/models/{model}/jobs/{job}".into()
    } else if model_path(path, "/jobs").is_some() {
        "POST /v2/models/{model}/jobs".into()
    } else if model_path(path, "/infer-sealed").is_some() {
        "POST /v2/models/{model}/infer-sealed".into()
    } else if let Some((_, Some(_))) = infer_path(path) {
        "POST /v2/models/{model}/versions/{version}/infer".into()
    } else {
        "POST /v2/models/{model}/infer".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_paths_are_recognised_exactly() {
        assert_eq!(infer_path("/v2/models/demo/infer"), Some(("demo", None)));
        assert_eq!(
            infer_path("/v2/models/demo/versions/2/infer"),
            Some(("demo", Some("2")))
        );
        assert_eq!(infer_path("/v2/models//infer"), None);
        assert_eq!(infer_path("/v2/models/demo/infer-sealed"), None);
        assert_eq!(infer_path("/v2/models/demo/jobs"), None);
        assert_eq!(infer_path("/v2/models/a/b/infer"), None);
        let sealed = |path| model_path(path, "/infer-sealed");
        assert_eq!(sealed("/v2/models/demo/infer-sealed"), Some("demo"));
        assert_eq!(sealed("/v2/models//infer-sealed"), None);
        assert_eq!(sealed("/v2/models/demo/versions/1/infer-sealed"), None);
        assert_eq!(sealed("/v2/models/demo/infer"), None);
        assert_eq!(model_path("/v2/models/demo/jobs", "/jobs"), Some("demo"));
        assert_eq!(model_path("/v2/models/demo/jobs/abc", "/jobs"), None);
    }

    #[test]
    fn compressed_bodies_are_read_within_the_limit_or_refused_in_the_apps_words() {
        use std::io::Write as _;
        let body = b"{\"inputs\": []}".repeat(10);
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&body).unwrap();
        let gzip = gzip.finish().unwrap();
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zlib.write_all(&body).unwrap();
        let zlib = zlib.finish().unwrap();
        let limit = body.len() as u64;
        let read = |data: &[u8], encoding: Encoding, limit: u64| {
            let name = if encoding == Encoding::Gzip {
                "gzip"
            } else {
                "deflate"
            };
            decompress(data, encoding, name, limit)
                .map_err(|refusal| (refusal.status.as_u16(), refusal.message))
        };
        assert_eq!(read(&gzip, Encoding::Gzip, limit).unwrap(), &body[..]);
        assert_eq!(read(&zlib, Encoding::Deflate, limit).unwrap(), &body[..]);
        let too_large = format!(
            "request body exceeds the {}-byte limit once decompressed",
            limit - 1
        );
        assert_eq!(
            read(&gzip, Encoding::Gzip, limit - 1),
            Err((413, too_large))
        );
        for (data, encoding, words) in [
            (
                &gzip[..gzip.len() - 9],
                Encoding::Gzip,
                "the request body ends inside its gzip data",
            ),
            (
                &zlib[..zlib.len() - 2],
                Encoding::Deflate,
                "the request body ends inside its deflate data",
            ),
            (
                &b"\x1f\x8bnot gzip"[..],
                Encoding::Gzip,
                "the request body is not valid gzip data",
            ),
            (
                &b"hello"[..],
                Encoding::Gzip,
                "the request body is not valid gzip data",
            ),
            (
                &gzip[..],
                Encoding::Deflate,
                "the request body is not valid deflate data",
            ),
        ] {
            assert_eq!(
                read(data, encoding, limit),
                Err((400, words.to_owned())),
                "{words}"
            );
        }
        let named = |value: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_bytes(value).unwrap(),
            );
            encoding(&headers).map_err(|refusal| (refusal.status.as_u16(), refusal.message))
        };
        assert_eq!(encoding(&HeaderMap::new()).unwrap().0, Encoding::Identity);
        assert_eq!(named(b" GZip ").unwrap(), (Encoding::Gzip, "gzip".into()));
        assert_eq!(named(b"x-gzip").unwrap().0, Encoding::Gzip);
        assert_eq!(named(b"deflate").unwrap().0, Encoding::Deflate);
        assert_eq!(
            named(b"BR"),
            Err((
                415,
                "Content-Encoding 'br' is not supported (gzip, deflate or none)".into()
            ))
        );
        // header bytes are latin-1, as the app reads them; the name shown is cut at 32
        assert_eq!(
            named(b"\xe9t\xe9").unwrap_err().1,
            "Content-Encoding '\u{e9}t\u{e9}' is not supported (gzip, deflate or none)"
        );
        assert!(named(&[b'x'; 40])
            .unwrap_err()
            .1
            .contains(&format!("'{}'", "x".repeat(32))));
    }

    #[test]
    fn a_jobs_outputs_are_kept_as_python_reads_them() {
        assert_eq!(job_outputs(None), "null");
        let asked = [("b".to_owned(), true), ("a\"x".to_owned(), false)];
        assert_eq!(job_outputs(Some(&asked)), r#"{"b": true, "a\"x": false}"#);
        assert_eq!(
            job_outputs_of(&job_outputs(Some(&asked))),
            Some(Some(asked.to_vec()))
        );
        assert_eq!(job_outputs_of("null"), Some(None));
        assert_eq!(job_outputs_of("[1]"), None);
        assert_eq!(
            job_result_path("/v2/models/demo/jobs/abc"),
            Some(("demo", "abc"))
        );
        assert_eq!(job_result_path("/v2/models/demo/jobs/"), None);
        assert_eq!(job_result_path("/v2/models/demo/jobs/a/b"), None);
    }

    #[test]
    fn a_sealed_requests_worker_errors_are_the_callers_in_the_gateways_words() {
        let r = sealed_worker_error(br#"{"kind": "integrity", "error": "x"}"#);
        assert_eq!(
            (r.status, r.message.as_str()),
            (StatusCode::BAD_REQUEST, SEALED_UNOPENED)
        );
        let r = sealed_worker_error(br#"{"kind": "protocol", "error": "x"}"#);
        assert_eq!(
            (r.status, r.message.as_str()),
            (StatusCode::BAD_REQUEST, SEALED_INVALID)
        );
        let r = sealed_worker_error(br#"{"kind": "engine", "error": "boom"}"#);
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn caller_ids_are_short_plain_tokens() {
        assert!(is_caller_id("trace-1.2:3@x_Y"));
        assert!(!is_caller_id(""));
        assert!(!is_caller_id("has space"));
        assert!(!is_caller_id(&"a".repeat(65)));
    }

    #[test]
    fn worker_errors_keep_their_status_and_words() {
        let r = worker_error(br#"{"kind": "invalid_input", "error": "bad shape"}"#);
        assert_eq!(
            (r.status, r.message.as_str()),
            (StatusCode::BAD_REQUEST, "bad shape")
        );
        let r = worker_error(br#"{"kind": "engine", "error": "boom"}"#);
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            r.failure.as_deref(),
            Some("request failed: EngineError: boom")
        );
        let r = worker_error(b"not json");
        assert_eq!(r.message, "the worker's error answer is malformed");
    }

    fn route(closed: Option<Closed>) -> VersionRoute {
        let keyring = Keyring::new([("k1", [7u8; 32].as_slice())], "k1").unwrap();
        VersionRoute {
            queue: "demo".into(),
            request_stream: "ppml:{demo}:req".into(),
            reply_stream: "ppml:{demo}:reply:gw".into(),
            inputs: Inputs {
                model: "demo".into(),
                inputs: vec![],
            },
            outputs: vec![("scores".into(), "FP32".into(), vec![-1, 10])],
            labels: None,
            keyring: Some(Arc::new(keyring)),
            request_aad: (b"[".to_vec(), b"]".to_vec()),
            reply_aad: (b"[".to_vec(), b"]".to_vec()),
            job_prefix: "ppml:{demo}:job:".into(),
            closed,
        }
    }

    #[test]
    fn a_closed_version_keeps_its_refusal_unless_a_live_worker_is_counted() {
        let plane = plane();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        assert!(runtime.block_on(plane.closed(&route(None))).is_ok());
        let backlog = route(Some(Closed {
            status: 429,
            message: "model 'demo' has 3 queued requests; retry later".into(),
            recheck: None,
        }));
        let refused = runtime.block_on(plane.closed(&backlog)).unwrap_err();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(refused.retry);
        assert_eq!(
            refused.message,
            "model 'demo' has 3 queued requests; retry later"
        );
        // the count cannot be taken (Redis unreachable): the refusal stands
        let no_worker = route(Some(Closed {
            status: 503,
            message: "model 'demo' version 1 has no live worker".into(),
            recheck: Some(("ppml:{demo}:workers".into(), 3.0)),
        }));
        let refused = runtime.block_on(plane.closed(&no_worker)).unwrap_err();
        assert_eq!(
            (refused.status, refused.message.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "model 'demo' version 1 has no live worker"
            )
        );
    }

    fn plane_config() -> PlaneConfig {
        PlaneConfig {
            redis: RedisTarget {
                cluster: false,
                unix_path: Some(PathBuf::from("/nonexistent/redis.sock")),
                host: String::new(),
                port: 0,
                tls: false,
                ca_pem: None,
                username: Some("gateway".into()),
                password: Some("secret-password".into()),
                db: 0,
            },
            command_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(5),
            max_inflight_per_model: 2,
            max_rows: Some(64),
            spool: None,
            spool_min_bytes: 32 * 1024,
            max_request_bytes: 1 << 20,
            job_timeout: Duration::from_secs(300),
            job_ttl: Duration::from_secs(3600),
            announced_key: "ppml:models".into(),
            requested_key: "ppml:repository".into(),
        }
    }

    /// `demo`: version 1 served, version 2 known but announced by no worker; and `extra`
    /// models with version 1 served.
    fn routes(extra: &[&str]) -> HashMap<String, ModelRoute> {
        let served = |name: &str| ModelRoute {
            default_version: Some("1".into()),
            known: vec!["2".into(), "1".into()],
            versions: HashMap::from([("1".to_owned(), Arc::new(route(None)))]),
            pending: if name == "demo" {
                HashMap::from([(
                    "2".to_owned(),
                    Pending {
                        queue: "demo@2".into(),
                        message: "model 'demo' version 2 has no worker that holds its keys".into(),
                    },
                )])
            } else {
                HashMap::new()
            },
        };
        std::iter::once("demo")
            .chain(extra.iter().copied())
            .map(|name| (name.to_owned(), served(name)))
            .collect()
    }

    fn plane() -> Plane {
        let plane = Plane::new(plane_config()).unwrap();
        plane.set_routes(routes(&[]), None);
        let digest_of = |token: &str| {
            let mut out = [0u8; 32];
            out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
            out
        };
        plane.set_callers(vec![
            (
                digest_of("ppml_all"),
                Caller {
                    name: "all".into(),
                    key_id: "a1".into(),
                    models: None,
                    infer: true,
                },
            ),
            (
                digest_of("ppml_other"),
                Caller {
                    name: "other".into(),
                    key_id: "o1".into(),
                    models: Some(HashSet::from(["other".to_owned()])),
                    infer: true,
                },
            ),
            (
                digest_of("ppml_metrics"),
                Caller {
                    name: "metrics".into(),
                    key_id: "m1".into(),
                    models: None,
                    infer: false,
                },
            ),
        ]);
        plane.set_enabled(true);
        plane
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn requests_are_routed_or_refused_for_their_key_in_the_apps_order() {
        let plane = plane();
        let key = [("authorization", "Bearer ppml_all")];
        let target = plane
            .route("/v2/models/demo/infer", &headers(&key))
            .unwrap()
            .unwrap();
        assert_eq!(
            (target.version.as_str(), target.key_name.as_str()),
            ("1", "all")
        );
        // escapes are read as the app reads them: the name they spell
        for path in [
            "/v2/models/demo/versions/1/infer",
            "/v2/models/d%65mo/versions/%31/infer",
        ] {
            let target = plane.route(path, &headers(&key)).unwrap().unwrap();
            assert_eq!(target.model, "demo", "{path}");
        }
        // an encoding it does not take is refused once routed (415: after the key, as the
        // app reads the body only then)
        let brotli = [
            ("authorization", "Bearer ppml_all"),
            ("content-encoding", "br"),
        ];
        assert!(plane
            .route("/v2/models/demo/infer", &headers(&brotli))
            .unwrap()
            .is_some());
        // a key that may not call it is refused first, held model or not, in the app's words
        for (path, pairs, status, message, key_name, version) in [
            (
                "/v2/models/demo/infer",
                vec![],
                401,
                "missing or invalid API key",
                "-",
                "-",
            ),
            (
                "/v2/models/nope/versions/3/infer",
                vec![("authorization", "Bearer ppml_wrong")],
                401,
                "missing or invalid API key",
                "-",
                "_other",
            ),
            (
                "/v2/models/demo/jobs",
                vec![("authorization", "Basic ppml_all")],
                401,
                "missing or invalid API key",
                "-",
                "-",
            ),
            (
                "/v2/models/demo/infer-sealed",
                vec![("authorization", "Bearer ppml_other")],
                403,
                "this API key may not use this model",
                "other",
                "-",
            ),
            (
                "/v2/models/demo/jobs/abc",
                vec![("authorization", "bearer  ppml_metrics ")],
                403,
                "this API key may not call the inference API",
                "metrics",
                "-",
            ),
        ] {
            let Err(refused) = plane.route(path, &headers(&pairs)) else {
                panic!("{path} {pairs:?} was not refused");
            };
            assert_eq!(
                (
                    refused.refusal.status.as_u16(),
                    refused.refusal.message.as_str(),
                    refused.key_name.as_str(),
                    refused.version.as_str()
                ),
                (status, message, key_name, version),
                "{path} {pairs:?}"
            );
            let response = refused_response(&refused.refusal);
            assert_eq!(
                response.headers().get(header::WWW_AUTHENTICATE).is_some(),
                status == 401
            );
        }
        // other routes are Python's
        assert!(plane
            .route("/v2/models/demo/ready", &headers(&key))
            .unwrap()
            .is_none());
    }

    #[test]
    fn models_and_versions_not_served_are_refused_in_the_apps_words() {
        let plane = plane();
        let key = [("authorization", "Bearer ppml_all")];
        // (path, status, words, version label, queue, checked again in Redis first)
        for (path, status, words, version, queue, recheck) in [
            (
                "/v2/models/nope/infer",
                404,
                "model 'nope' is not served here",
                "-",
                "",
                true,
            ),
            (
                "/v2/models/it's/versions/12/infer",
                404,
                "model \"it's\" is not served here",
                "_other",
                "",
                true,
            ),
            (
                "/v2/models/demo/versions/0/infer",
                404,
                "model 'demo' has no version '0' (versions are positive integers)",
                "_other",
                "",
                false,
            ),
            (
                "/v2/models/nope/versions/12345678901234/infer",
                404,
                "model 'nope' has no version '123456789012' (versions are positive integers)",
                "_other",
                "",
                false,
            ),
            (
                "/v2/models/demo/versions/3/infer",
                404,
                "model 'demo' has no version '3' (versions: 1, 2)",
                "_other",
                "",
                false,
            ),
            (
                "/v2/models/demo/versions/2/infer",
                503,
                "model 'demo' version 2 has no worker that holds its keys",
                "2",
                "demo@2",
                true,
            ),
        ] {
            let Err(refused) = plane.route(path, &headers(&key)) else {
                panic!("{path} was not refused");
            };
            assert_eq!(
                (
                    refused.refusal.status.as_u16(),
                    refused.refusal.message.as_str(),
                    refused.version.as_str(),
                    refused.queue.as_str(),
                    refused.recheck.is_some()
                ),
                (status, words, version, queue, recheck),
                "{path}"
            );
        }
        // Redis not answering the route checks: every keyed call's 503, in the app's words
        plane.set_routes(
            routes(&[]),
            Some("redis not reachable: ConnectionError".into()),
        );
        let Err(refused) = plane.route("/v2/models/demo/infer", &headers(&key)) else {
            panic!("not refused");
        };
        assert_eq!(
            (refused.refusal.status, refused.refusal.message.as_str()),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "redis not reachable: ConnectionError"
            )
        );
        assert!(refused_response(&refused.refusal)
            .headers()
            .contains_key(header::RETRY_AFTER));
        let Err(refused) = plane.route("/v2/models/demo/infer", &headers(&[])) else {
            panic!("not refused");
        };
        assert_eq!(refused.refusal.status, StatusCode::UNAUTHORIZED);
        assert!(is_version("1") && is_version("999999999"));
        assert!(!is_version("0") && !is_version("01") && !is_version("") && !is_version("1a"));
    }

    #[test]
    fn a_refusal_redis_may_contradict_is_judged_again_on_rebuilt_routes() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let key = headers(&[("authorization", "Bearer ppml_all")]);
        let plane = Arc::new(plane());
        // the Redis here does not answer: the check cannot confirm the refusal
        let Err(refused) = plane.route("/v2/models/new/infer", &key) else {
            panic!("not refused");
        };
        assert!(!runtime.block_on(plane.stands(&refused)));
        // the routes rebuilt afresh (twice: one under way may predate the change) hold it
        let rebuilder = plane.clone();
        let found = runtime.block_on(async {
            tokio::spawn(async move {
                while !rebuilder.take_stale() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                rebuilder.set_routes(routes(&[]), None);
                tokio::time::sleep(Duration::from_millis(20)).await;
                rebuilder.set_routes(routes(&["new"]), None);
            });
            plane
                .settled(|| plane.route("/v2/models/new/infer", &key))
                .await
        });
        assert_eq!(found.unwrap().unwrap().model, "new");
        // rebuilt without it: refused on the newest routes, not checked again
        let rebuilder = plane.clone();
        let found = runtime.block_on(async {
            tokio::spawn(async move {
                while !rebuilder.take_stale() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                for _ in 0..2 {
                    rebuilder.set_routes(routes(&[]), None);
                }
            });
            plane
                .settled(|| plane.route("/v2/models/gone/infer", &key))
                .await
        });
        let Err(refused) = found else {
            panic!("not refused");
        };
        assert_eq!(refused.refusal.status, StatusCode::NOT_FOUND);
        assert!(refused.recheck.is_none());
    }

    #[test]
    fn before_the_keys_and_routes_are_installed_or_once_stopped_every_call_is_told_to_retry() {
        let fresh = Plane::new(plane_config()).unwrap();
        fresh.set_enabled(true);
        let stopped = plane();
        stopped.set_enabled(false);
        let key = headers(&[("authorization", "Bearer ppml_all")]);
        for plane in [&fresh, &stopped] {
            for pairs in [&key, &headers(&[])] {
                let Err(refused) = plane.route("/v2/models/demo/infer", pairs) else {
                    panic!("not refused");
                };
                assert_eq!(
                    (refused.refusal.status, refused.refusal.message.as_str()),
                    (StatusCode::SERVICE_UNAVAILABLE, STARTING)
                );
            }
        }
    }

    #[test]
    fn a_callers_request_id_is_kept_only_when_plain() {
        let plane = plane();
        let kept = headers(&[
            ("authorization", "bearer ppml_all"),
            ("x-request-id", "abc-1"),
        ]);
        assert_eq!(
            plane
                .route("/v2/models/demo/infer", &kept)
                .unwrap()
                .unwrap()
                .caller_id,
            "abc-1"
        );
        let odd = headers(&[
            ("authorization", "Bearer ppml_all"),
            ("x-request-id", "a b"),
        ]);
        assert_eq!(
            plane
                .route("/v2/models/demo/infer", &odd)
                .unwrap()
                .unwrap()
                .caller_id,
            ""
        );
        let id = plane.request_id();
        assert_eq!(id.len(), 32);
        assert_eq!(&id[12..13], "4");
    }

    #[test]
    fn the_per_model_bound_is_held_and_given_back() {
        let plane = plane();
        let first = plane.hold("demo").unwrap();
        let _second = plane.hold("demo").unwrap();
        let refused = plane.hold("demo").err().unwrap();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            refused.message,
            "model 'demo' has 2 requests in flight here; retry later"
        );
        drop(first);
        assert!(plane.hold("demo").is_ok());
        assert_eq!(plane.inflight().get("demo"), Some(&1));
    }

    #[test]
    fn requests_waiting_for_a_queue_are_failed_together() {
        let plane = plane();
        let (tell, mut answer) = oneshot::channel();
        plane
            .waiting
            .lock()
            .unwrap()
            .insert("r1".into(), ("demo".into(), tell));
        assert_eq!(plane.waiting_queues(), vec!["demo".to_owned()]);
        assert_eq!(plane.fail_waiting("other", "x"), 0);
        assert_eq!(
            plane.fail_waiting("demo", "model 'demo' has no live worker"),
            1
        );
        let refused = answer.try_recv().unwrap().err().unwrap();
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(refused.retry);
    }

    #[test]
    fn undrained_events_keep_the_newest_within_the_bound() {
        let plane = plane();
        let event = |status: u16| Event {
            model: "demo".into(),
            version: "1".into(),
            queue: "demo".into(),
            path: "/v2/models/demo/infer".into(),
            status,
            seconds: 0.001,
            key_name: "all".into(),
            request_id: String::new(),
            caller_id: String::new(),
            client: String::new(),
            bytes_in: 0,
            bytes_out: 0,
            answer: None,
            failure: None,
            trace: None,
        };
        plane.record(event(500));
        for _ in 0..MAX_EVENTS {
            plane.record(event(200));
        }
        let drained = plane.drain_events();
        assert_eq!(drained.len(), MAX_EVENTS);
        assert!(
            drained.iter().all(|e| e.status == 200),
            "the oldest went first"
        );
        assert!(plane.drain_events().is_empty());
    }

    #[test]
    fn deadlines_read_as_python_writes_them() {
        assert_eq!(seconds_text(30.0), "30");
        assert_eq!(seconds_text(0.5), "0.5");
    }
}
