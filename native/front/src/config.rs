//! What a front is told by the gateway's settings (`gateway.*`).

use std::path::PathBuf;
use std::time::Duration;

/// The server certificate chain and key (PEM), and the CA of client certificates when
/// mutual TLS is required.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

/// The gRPC port, served by the front too: `ModelInfer` natively, every other RPC by the
/// Python gRPC service on its private Unix socket.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    pub port: u16,
    pub upstream: PathBuf,
}

/// A front's listening address, upstream and limits.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    pub host: String,
    pub port: u16,
    /// Bind with SO_REUSEPORT: several gateway processes share the port.
    pub reuse_port: bool,
    /// None: plain HTTP (benchmarking the cost of TLS only).
    pub tls: Option<TlsFiles>,
    /// The Python application's private Unix socket.
    pub upstream: PathBuf,
    /// The gRPC port, if the gateway serves gRPC.
    pub grpc: Option<GrpcConfig>,
    /// Request line and headers, exactly; a larger head gets 431.
    pub max_header_bytes: usize,
    /// A request head must arrive this soon after the connection waits for it.
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this long.
    pub keep_alive: Duration,
    /// A request body must arrive in full this soon after its head; else 408.
    pub body_timeout: Duration,
    /// Larger bodies get 413 before they are read.
    pub max_request_bytes: u64,
    /// Concurrent client connections; beyond it new ones get 503.
    pub max_connections: usize,
    /// Inference requests (`POST …/infer`) passed to the application at once; more get 429
    /// at once, so that none waits unboundedly in front of the application.
    pub max_inflight: usize,
    /// How long the application may take to answer before 504 (its own deadline plus a
    /// margin: the application answers 504 itself first).
    pub upstream_timeout: Duration,
    /// Threads serving connections.
    pub threads: usize,
}

impl FrontConfig {
    /// The head deadline hyper applies: it runs while a connection waits for a head, idle
    /// or not, so it is the shorter of the head deadline and the keep-alive idle time.
    pub(crate) fn head_deadline(&self) -> Duration {
        self.header_timeout.min(self.keep_alive)
    }
}
