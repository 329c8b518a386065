//! ppml-serve's HTTPS front (issue 20, first slice of the native data plane).
//!
//! It owns the client connections: TLS with rustls on aws-lc-rs (TLS 1.3, and 1.2 with
//! ECDHE + AEAD suites only), HTTP/1.1 and HTTP/2 with hyper, and every limit the gateway
//! promises on a connection (exact head size, head and body deadlines, connection cap, body
//! size). Each complete request is passed to the Python application over a private Unix
//! socket, whose answer goes back to the client: a client that is slow, stalled or hostile
//! holds a small, bounded amount of Rust memory, never the Python event loop.

mod body;
mod config;
mod grpc;
mod plane;
mod server;
mod spool;
mod tls;
mod trace;
mod upstream;

pub use config::{FrontConfig, GrpcConfig, TlsFiles};
pub use plane::{
    Caller, Closed, Event, ModelRoute, Pending, Plane, PlaneConfig, RedisTarget, VersionRoute,
};
pub use server::{Front, FrontError, FrontStats};
pub use trace::{SpanRecord, Trace};
