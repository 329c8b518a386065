//! Accepting and serving client connections, and passing their requests upstream.

use std::convert::Infallible;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::{Breach, BreachCell, GuardedBody};
use crate::config::FrontConfig;
use crate::grpc::{serve_call, GrpcBody, GrpcUpstream};
use crate::plane::Plane;
use crate::upstream::{Upstream, UpstreamError};

/// hyper's smallest read and write buffer; a connection holds at most this much of each
/// (so a client that pipelines requests and never reads the answers holds little).
const CONNECTION_BUFFER: usize = 64 * 1024;
/// Bytes read from a TLS connection's socket at once (see `connection`).
const TLS_READ_AHEAD: usize = 32 * 1024;
/// Streams one HTTP/2 connection may have open at once.
const MAX_STREAMS: u32 = 64;
/// Connections refused at the cap are still answered (503), up to this many at once.
const MAX_REFUSING: usize = 256;

/// Why a front could not start; its words name the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("{0}")]
    Config(String),
    #[error("{setting}: cannot listen on {address} ({reason})")]
    Listen {
        setting: &'static str,
        address: String,
        reason: String,
    },
}

/// Counts since the front started, for the gateway's metrics.
#[derive(Debug, Default)]
pub struct FrontStats {
    pub connections: AtomicU64,
    pub refused_connections: AtomicU64,
    pub requests: AtomicU64,
    pub slow_bodies: AtomicU64,
    pub oversized_bodies: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub overloaded: AtomicU64,
    pub native_answers: AtomicU64,
}

pub(crate) struct Shared {
    pub(crate) config: FrontConfig,
    tls: Option<TlsAcceptor>,
    upstream: Upstream<GuardedBody>,
    /// The gRPC port's TLS (h2 alone) and the Python gRPC service behind it.
    grpc: Option<(Option<TlsAcceptor>, GrpcUpstream)>,
    connections: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    pub(crate) inflight: Arc<Semaphore>,
    pub(crate) stats: Arc<FrontStats>,
    /// The native inference path, once the application installed it.
    pub(crate) plane: OnceLock<Arc<Plane>>,
}

/// Which port a connection came on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Port {
    Http,
    Grpc,
}

/// Either port's answer: the HTTP port's (whole) or the gRPC port's (streamed).
type Answer = Response<GrpcBody>;

/// A bound front: `start` serves, `stop` drains and ends it.
pub struct Front {
    shared: Arc<Shared>,
    runtime: Option<Runtime>,
    listener: Mutex<Option<std::net::TcpListener>>,
    grpc_listener: Mutex<Option<std::net::TcpListener>>,
    shutdown: watch::Sender<Option<Duration>>,
    serving: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    local_addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
}

fn bind(
    config: &FrontConfig,
    port: u16,
    setting: &'static str,
) -> Result<std::net::TcpListener, FrontError> {
    let address = format!("{}:{}", config.host, port);
    let failed = |reason: String| FrontError::Listen {
        setting,
        address: address.clone(),
        reason,
    };
    let target: SocketAddr = (config.host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| failed(e.to_string()))?
        .next()
        .ok_or_else(|| failed("the host name has no address".into()))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| failed(e.to_string()))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| failed(e.to_string()))?;
    if config.reuse_port {
        socket
            .set_reuse_port(true)
            .map_err(|e| failed(e.to_string()))?;
    }
    socket
        .bind(&target.into())
        .map_err(|e| failed(e.kind().to_string()))?;
    socket.listen(2048).map_err(|e| failed(e.to_string()))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| failed(e.to_string()))?;
    Ok(socket.into())
}

impl Front {
    /// Check the TLS files and bind the port (errors surface here, before serving).
    pub fn bind(config: FrontConfig) -> Result<Self, FrontError> {
        let acceptor = |grpc| -> Result<Option<TlsAcceptor>, FrontError> {
            Ok(match &config.tls {
                Some(files) => Some(TlsAcceptor::from(crate::tls::server_config(files, grpc)?)),
                None => None,
            })
        };
        let tls = acceptor(false)?;
        let grpc = match &config.grpc {
            Some(grpc) => Some((acceptor(true)?, GrpcUpstream::new(grpc.upstream.clone()))),
            None => None,
        };
        let listener = bind(&config, config.port, "gateway.port")?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| FrontError::Config(e.to_string()))?;
        let grpc_listener = match &config.grpc {
            Some(grpc) => Some(bind(&config, grpc.port, "gateway.grpc_port")?),
            None => None,
        };
        let grpc_addr = match &grpc_listener {
            Some(listener) => Some(
                listener
                    .local_addr()
                    .map_err(|e| FrontError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads.max(1))
            .thread_name("ppml-front")
            .enable_all()
            .build()
            .map_err(|e| FrontError::Config(format!("cannot start the front's threads: {e}")))?;
        let (shutdown, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            upstream: Upstream::new(config.upstream.clone()),
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            inflight: Arc::new(Semaphore::new(config.max_inflight.max(1))),
            stats: Arc::new(FrontStats::default()),
            plane: OnceLock::new(),
            tls,
            grpc,
            config,
        });
        Ok(Self {
            shared,
            runtime: Some(runtime),
            listener: Mutex::new(Some(listener)),
            grpc_listener: Mutex::new(grpc_listener),
            shutdown,
            serving: Mutex::new(Vec::new()),
            local_addr,
            grpc_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The gRPC port's address, when it serves one.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    pub fn stats(&self) -> Arc<FrontStats> {
        self.shared.stats.clone()
    }

    /// Answer inference requests on the native path from now on (once; false if one was
    /// installed already).
    pub fn install_plane(&self, plane: Arc<Plane>) -> bool {
        self.shared.plane.set(plane).is_ok()
    }

    /// Accept connections in the background (once; later calls do nothing).
    pub fn start(&self) -> Result<(), FrontError> {
        let Some(runtime) = &self.runtime else {
            return Ok(());
        };
        let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        let grpc = self
            .grpc_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let _entered = runtime.enter();
        let mut serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        for (listener, port) in std::iter::once((listener, Port::Http))
            .chain(grpc.map(|listener| (listener, Port::Grpc)))
        {
            let listener = TcpListener::from_std(listener)
                .map_err(|e| FrontError::Config(format!("cannot serve the bound port: {e}")))?;
            serving.push(runtime.spawn(accept_loop(
                listener,
                port,
                self.shared.clone(),
                self.shutdown.subscribe(),
            )));
        }
        Ok(())
    }

    /// Stop accepting, let requests in flight finish for up to `grace`, then close the rest.
    pub fn stop(&mut self, grace: Duration) {
        self.shutdown.send_replace(Some(grace));
        let tasks = std::mem::take(&mut *self.serving.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(runtime) = &self.runtime {
            let _ = runtime.block_on(async {
                tokio::time::timeout(grace + Duration::from_secs(1), async {
                    for task in tasks {
                        let _ = task.await;
                    }
                })
                .await
            });
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_millis(200));
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if self.runtime.is_some() {
            self.stop(Duration::ZERO);
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    port: Port,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<Option<Duration>>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                    let permit = shared.connections.clone().try_acquire_owned().ok();
                    if permit.is_none() {
                        shared.stats.refused_connections.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::spawn(connection(stream, peer, port, permit, shared.clone(), graceful.watcher()));
                }
                // Out of file descriptors or a connection reset before accept: go on,
                // a little later (an immediate retry would spin on EMFILE).
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let grace = shutdown.borrow().unwrap_or(Duration::ZERO);
    let _ = tokio::time::timeout(grace, graceful.shutdown()).await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    port: Port,
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
    watcher: Watcher,
) {
    // Over the cap: answer 503 while few are being refused, else just close. The permit
    // (a connection's, or a refusal's) is held until the connection ends.
    let (refused, _held) = match permit {
        Some(permit) => (false, permit),
        None => match shared.refusing.clone().try_acquire_owned() {
            Ok(refusing) => (true, refusing),
            Err(_) => return,
        },
    };
    let head_deadline = shared.config.head_deadline();
    let acceptor = match (port, &shared.grpc) {
        (Port::Grpc, Some((tls, _))) => tls,
        _ => &shared.tls,
    };
    match acceptor {
        Some(acceptor) => {
            // rustls reads the socket 4 KiB at a time: a 600 KB body would take ~150 reads
            // (and wake-ups); reading ahead in larger pieces takes a few dozen.
            let stream = BufReader::with_capacity(TLS_READ_AHEAD, stream);
            let Ok(Ok(tls)) = tokio::time::timeout(head_deadline, acceptor.accept(stream)).await
            else {
                return; // no TLS within the head deadline, or a failed handshake
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            serve(
                TokioIo::new(tls),
                h2 || port == Port::Grpc,
                port,
                peer,
                refused,
                shared.clone(),
                watcher,
            )
            .await;
        }
        None => {
            serve(
                TokioIo::new(stream),
                port == Port::Grpc, // gRPC without TLS: HTTP/2 with prior knowledge
                port,
                peer,
                refused,
                shared.clone(),
                watcher,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve<I>(
    io: TokioIo<I>,
    h2: bool,
    port: Port,
    peer: SocketAddr,
    refused: bool,
    shared: Arc<Shared>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &shared.config;
    let service_shared = shared.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let shared = service_shared.clone();
        async move {
            let answered: Answer = match (port, &shared.grpc) {
                (Port::Grpc, Some((_, upstream))) => {
                    serve_call(&shared, upstream, request, peer, refused).await
                }
                _ => answer(&shared, request, peer, refused)
                    .await
                    .map(|body| body.map_err(|never| match never {}).boxed_unsync()),
            };
            Ok::<_, Infallible>(answered)
        }
    });
    if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(if refused { 1 } else { MAX_STREAMS })
            .max_send_buf_size(CONNECTION_BUFFER)
            .keep_alive_interval(Some(config.keep_alive))
            .keep_alive_timeout(config.head_deadline());
        let _ = watcher.watch(builder.serve_connection(io, service)).await;
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(config.head_deadline())
            .max_header_size(config.max_header_bytes)
            .max_buf_size(CONNECTION_BUFFER.max(config.max_header_bytes))
            .keep_alive(!refused);
        let _ = watcher.watch(builder.serve_connection(io, service)).await;
    }
}

/// A JSON error answer (`{"error": …}`), as the Python app writes them.
pub(crate) fn error(
    status: StatusCode,
    message: &str,
    close: bool,
    retry: bool,
) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if close {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if retry {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

fn too_large(shared: &Shared) -> Response<Full<Bytes>> {
    shared
        .stats
        .oversized_bodies
        .fetch_add(1, Ordering::Relaxed);
    let message = format!(
        "request body is larger than {} bytes (gateway.max_request_bytes)",
        shared.config.max_request_bytes
    );
    error(StatusCode::PAYLOAD_TOO_LARGE, &message, true, false)
}

/// The answer to a body cut off at a limit (or by its client).
fn breached(shared: &Shared, breach: Breach) -> Response<Full<Bytes>> {
    match breach {
        Breach::Slow => {
            shared.stats.slow_bodies.fetch_add(1, Ordering::Relaxed);
            error(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time (gateway.body_timeout_s)",
                true,
                false,
            )
        }
        Breach::TooLarge => too_large(shared),
        Breach::Client | Breach::None => error(
            StatusCode::BAD_REQUEST,
            "the request body could not be read",
            true,
            false,
        ),
    }
}

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1), and
/// `expect`, which the front answers itself.
pub(crate) fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "expect"
    )
}

/// `POST …/infer` and `…/infer-sealed` (any model and version): what waits for a worker.
fn is_inference<B>(request: &Request<B>) -> bool {
    let path = request.uri().path();
    request.method() == http::Method::POST
        && (path.ends_with("/infer") || path.ends_with("/infer-sealed"))
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

async fn answer(
    shared: &Shared,
    request: Request<Incoming>,
    peer: SocketAddr,
    refused: bool,
) -> Response<Full<Bytes>> {
    let config = &shared.config;
    if refused {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is at its connection limit (gateway.max_connections); retry",
            true,
            true,
        );
    }
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    if declared_length(request.headers()).is_some_and(|n| n > config.max_request_bytes) {
        return too_large(shared);
    }
    // Held until the application answers: bounds the requests queued in front of it.
    let admitted = if is_inference(&request) {
        match shared.inflight.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                shared.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                let message = format!(
                    "this gateway holds {} inference requests; retry later (gateway.max_inflight)",
                    config.max_inflight
                );
                return error(StatusCode::TOO_MANY_REQUESTS, &message, false, true);
            }
        }
    } else {
        None
    };
    let received_at = Instant::now();
    let received_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // a job's submission and its answer are not held against max_inflight (both are
    // answered at once), as the app does not
    let job = match *request.method() {
        http::Method::POST => request.uri().path().ends_with("/jobs"),
        http::Method::GET => request.uri().path().contains("/jobs/"),
        _ => false,
    };
    let target = match shared.plane.get() {
        Some(plane) if admitted.is_some() || job => {
            let found = plane
                .settled(|| plane.route(request.uri().path(), request.headers()))
                .await;
            match found {
                Ok(target) => target.map(|target| (plane, target)),
                Err(refused) => {
                    // answered before its body is read, as the app answers it
                    shared.stats.native_answers.fetch_add(1, Ordering::Relaxed);
                    let received = (received_at, received_ms as f64 / 1000.0);
                    return plane.refuse(
                        &refused,
                        request.uri().path(),
                        request.headers(),
                        received,
                        peer.to_string(),
                        declared_length(request.headers()).unwrap_or(0),
                    );
                }
            }
        }
        _ => None,
    };
    let (parts, body) = request.into_parts();
    let breach = BreachCell::default();
    let body = GuardedBody::new(
        body,
        config.body_timeout,
        config.max_request_bytes,
        breach.clone(),
    );
    if let Some((plane, target)) = target {
        let Ok(collected) = body.collect().await else {
            return breached(shared, breach.get());
        };
        let bytes = collected.to_bytes();
        let received = (received_at, received_ms as f64 / 1000.0);
        let path = parts.uri.path();
        let response = plane
            .answer(
                &target,
                path,
                &parts.headers,
                &bytes,
                received,
                peer.to_string(),
            )
            .await;
        shared.stats.native_answers.fetch_add(1, Ordering::Relaxed);
        return response;
    }
    let mut upstream = Request::new(body);
    *upstream.method_mut() = parts.method;
    *upstream.uri_mut() = parts
        .uri
        .path_and_query()
        .map(|p| Uri::from(p.clone()))
        .unwrap_or_else(|| Uri::from_static("/"));
    let headers = upstream.headers_mut();
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(header::HOST, authority);
        }
    }
    if let Ok(address) = HeaderValue::from_str(&peer.to_string()) {
        headers.insert(HeaderName::from_static("x-ppml-client"), address);
    }
    let answered =
        tokio::time::timeout(config.upstream_timeout, shared.upstream.call(upstream)).await;
    match (answered, breach.get()) {
        (_, cut @ (Breach::Slow | Breach::TooLarge)) => breached(shared, cut),
        (Ok(Ok(response)), _) => {
            let (mut parts, body) = response.into_parts();
            let keep: Vec<HeaderName> = parts
                .headers
                .keys()
                .filter(|n| hop_by_hop(n))
                .cloned()
                .collect();
            for name in keep {
                parts.headers.remove(name);
            }
            Response::from_parts(parts, Full::new(body))
        }
        (_, Breach::Client) => breached(shared, Breach::Client),
        (Ok(Err(failure)), _) => {
            shared
                .stats
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            let message = match failure {
                UpstreamError::Unreachable => "the gateway is starting or stopping; retry",
                UpstreamError::Failed => "the gateway could not answer this request; retry",
            };
            error(StatusCode::SERVICE_UNAVAILABLE, message, true, true)
        }
        (Err(_), _) => {
            shared
                .stats
                .upstream_failures
                .fetch_add(1, Ordering::Relaxed);
            error(
                StatusCode::GATEWAY_TIMEOUT,
                "no answer in time; retry later",
                true,
                false,
            )
        }
    }
}
