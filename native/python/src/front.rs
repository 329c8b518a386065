//! `ppml_serve._native.Front`: the HTTPS front (ppml-front) run inside the gateway process,
//! on threads of its own; the Python application answers behind it on a private socket.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ppml_front::{
    Caller, Closed, Front as CoreFront, FrontConfig, FrontError, GrpcConfig, ModelRoute, Pending,
    Plane, PlaneConfig, RedisTarget, TlsFiles, VersionRoute,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::package_error;
use crate::request::ModelInputs;
use crate::Keyring;

/// One version as Python describes it to the native path: queue name, request stream,
/// reply stream and job key prefix, declared inputs, declared outputs (name, datatype, shape) and class
/// labels, the model's keyring (None: the plaintext benchmark mode), and the associated data of a request and of a reply split
/// around the request id.
type VersionSpec<'py> = (
    (String, String, String, String),
    PyRef<'py, ModelInputs>,
    (Vec<(String, String, Vec<i64>)>, Option<Vec<String>>),
    Option<PyRef<'py, Keyring>>,
    (Vec<u8>, Vec<u8>),
    (Vec<u8>, Vec<u8>),
    Option<ClosedSpec>,
);

/// A closed version: HTTP status, the app's words, and (for want of a live worker) the
/// workers' heartbeat key and the age within which a beat is live.
/// A model's routes: default version, known versions, open ones, pending ones.
type ModelRouteSpec<'py> = (
    Option<String>,
    Vec<String>,
    HashMap<String, VersionSpec<'py>>,
    HashMap<String, (String, String)>,
);
type ClosedSpec = (u16, String, Option<(String, f64)>);

/// An API key as Python describes it: SHA-256 of its token, name, models (None: all), id,
/// whether it holds the `infer` scope.
type CallerSpec = ([u8; 32], String, Option<Vec<String>>, String, bool);

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| pyo3::exceptions::PyValueError::new_err(format!("{name}: not a duration")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A bound front: ``start()`` serves, ``stop(grace_s)`` drains and ends it.
#[pyclass(frozen, module = "ppml_serve._native")]
pub(crate) struct Front {
    inner: Mutex<Option<CoreFront>>,
    plane: OnceLock<Arc<Plane>>,
    port: u16,
    grpc_port: Option<u16>,
}

impl Front {
    fn plane(&self) -> Option<&Arc<Plane>> {
        self.plane.get()
    }
}

#[pymethods]
impl Front {
    #[new]
    #[pyo3(signature = (*, host, port, upstream, cert_file=None, key_file=None,
                        client_ca_file=None, reuse_port=false, max_header_bytes=16384,
                        header_timeout_s=10.0, keep_alive_s=5.0, body_timeout_s=60.0,
                        max_request_bytes=67108864, max_connections=1024,
                        upstream_timeout_s=60.0, max_inflight=512, threads=1, grpc_port=None,
                        grpc_upstream=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        host: String,
        port: u16,
        upstream: PathBuf,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
        client_ca_file: Option<PathBuf>,
        reuse_port: bool,
        max_header_bytes: usize,
        header_timeout_s: f64,
        keep_alive_s: f64,
        body_timeout_s: f64,
        max_request_bytes: u64,
        max_connections: usize,
        upstream_timeout_s: f64,
        max_inflight: usize,
        threads: usize,
        grpc_port: Option<u16>,
        grpc_upstream: Option<PathBuf>,
    ) -> PyResult<Self> {
        let tls = match (cert_file, key_file) {
            (Some(cert_file), Some(key_file)) => Some(TlsFiles {
                cert_file,
                key_file,
                client_ca_file,
            }),
            (None, None) => None,
            _ => {
                return Err(package_error(
                    py,
                    "ConfigError",
                    "gateway.cert_file and gateway.key_file go together".into(),
                ))
            }
        };
        let grpc = match (grpc_port, grpc_upstream) {
            (Some(port), Some(upstream)) => Some(GrpcConfig { port, upstream }),
            (None, None) => None,
            _ => {
                return Err(package_error(
                    py,
                    "ConfigError",
                    "grpc_port and grpc_upstream go together".into(),
                ))
            }
        };
        let config = FrontConfig {
            host,
            port,
            reuse_port,
            tls,
            upstream,
            grpc,
            max_header_bytes,
            header_timeout: seconds(header_timeout_s, "header_timeout_s")?,
            keep_alive: seconds(keep_alive_s, "keep_alive_s")?,
            body_timeout: seconds(body_timeout_s, "body_timeout_s")?,
            max_request_bytes,
            max_connections,
            upstream_timeout: seconds(upstream_timeout_s, "upstream_timeout_s")?,
            max_inflight,
            threads,
        };
        let front = py
            .detach(|| CoreFront::bind(config))
            .map_err(|error: FrontError| package_error(py, "ConfigError", error.to_string()))?;
        let port = front.local_addr().port();
        let grpc_port = front.grpc_addr().map(|address| address.port());
        Ok(Self {
            inner: Mutex::new(Some(front)),
            plane: OnceLock::new(),
            port,
            grpc_port,
        })
    }

    /// The bound port (the one asked for, or the one picked for port 0).
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// The bound gRPC port, when the front serves one.
    #[getter]
    fn grpc_port(&self) -> Option<u16> {
        self.grpc_port
    }

    /// Accept connections on the front's own threads.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(front) => front
                .start()
                .map_err(|error| package_error(py, "ConfigError", error.to_string())),
            None => Ok(()),
        }
    }

    /// Stop accepting; requests in flight get up to ``grace_s`` to finish (GIL released).
    fn stop(&self, py: Python<'_>, grace_s: f64) -> PyResult<()> {
        let grace = seconds(grace_s, "grace_s")?;
        let front = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut front) = front {
            py.detach(move || front.stop(grace));
        }
        Ok(())
    }

    /// Counters since start: connections, refused_connections, requests, slow_bodies,
    /// oversized_bodies, upstream_failures.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(front) = guard.as_ref() {
            let stats = front.stats();
            for (name, value) in [
                ("connections", &stats.connections),
                ("refused_connections", &stats.refused_connections),
                ("requests", &stats.requests),
                ("slow_bodies", &stats.slow_bodies),
                ("oversized_bodies", &stats.oversized_bodies),
                ("upstream_failures", &stats.upstream_failures),
                ("overloaded", &stats.overloaded),
                ("native_answers", &stats.native_answers),
            ] {
                out.set_item(name, value.load(Ordering::Relaxed))?;
            }
        }
        Ok(out)
    }

    /// Answer inference requests on the native path (see ppml-front's `plane`): the
    /// queue's address and user, the deadlines and bounds of `gateway.*`, the spool.
    /// Nothing is served on it before ``set_routes`` and ``set_enabled(True)``.
    #[pyo3(signature = (*, cluster, unix_path, host, port, tls, ca_file, username, password, db,
                        command_timeout_s, request_timeout_s, max_inflight_per_model,
                        max_rows, spool, spool_min_bytes, announced_key, requested_key,
                        job_timeout_s=300.0, job_ttl_s=3600, max_request_bytes=67108864))]
    #[allow(clippy::too_many_arguments)]
    fn install_plane(
        &self,
        py: Python<'_>,
        cluster: bool,
        unix_path: Option<PathBuf>,
        host: String,
        port: u16,
        tls: bool,
        ca_file: Option<PathBuf>,
        username: Option<String>,
        password: Option<String>,
        db: i64,
        command_timeout_s: f64,
        request_timeout_s: f64,
        max_inflight_per_model: usize,
        max_rows: Option<u64>,
        spool: Option<PathBuf>,
        spool_min_bytes: usize,
        announced_key: String,
        requested_key: String,
        job_timeout_s: f64,
        job_ttl_s: u64,
        max_request_bytes: u64,
    ) -> PyResult<()> {
        let ca_pem = match &ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                package_error(
                    py,
                    "ConfigError",
                    format!("redis CA file {}: {e}", path.display()),
                )
            })?),
            None => None,
        };
        let config = PlaneConfig {
            redis: RedisTarget {
                cluster,
                unix_path,
                host,
                port,
                tls,
                ca_pem,
                username,
                password,
                db,
            },
            command_timeout: seconds(command_timeout_s, "command_timeout_s")?,
            request_timeout: seconds(request_timeout_s, "request_timeout_s")?,
            max_inflight_per_model,
            max_rows,
            spool,
            spool_min_bytes,
            max_request_bytes,
            job_timeout: seconds(job_timeout_s, "job_timeout_s")?,
            job_ttl: Duration::from_secs(job_ttl_s),
            announced_key,
            requested_key,
        };
        let plane = Arc::new(
            Plane::new(config).map_err(|message| package_error(py, "ConfigError", message))?,
        );
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let installed = guard
            .as_ref()
            .is_some_and(|front| front.install_plane(plane.clone()));
        if installed {
            let _ = self.plane.set(plane);
        }
        Ok(())
    }

    /// Trace the native path's sampled requests (new traces at ``ratio``), or stop (None).
    fn set_tracing(&self, ratio: Option<f64>) {
        if let Some(plane) = self.plane() {
            plane.set_tracing(ratio.filter(|r| (0.0..=1.0).contains(r)));
        }
    }

    /// Serve inference on the native path (or pass every request to the application).
    fn set_plane_enabled(&self, enabled: bool) {
        if let Some(plane) = self.plane() {
            plane.set_enabled(enabled);
        }
    }

    /// What the native path may serve now: model -> (default version, known versions
    /// newest first, version -> spec, version -> (queue, words) for versions no worker has
    /// announced); ``outage``: the words every request gets while Redis does not answer
    /// the route checks. Wakes the requests waiting for routes rebuilt.
    fn set_routes(&self, routes: HashMap<String, ModelRouteSpec<'_>>, outage: Option<String>) {
        let Some(plane) = self.plane() else {
            return;
        };
        let table = routes
            .into_iter()
            .map(|(model, (default_version, known, versions, pending))| {
                let versions = versions
                    .into_iter()
                    .map(|(version, spec)| {
                        let (
                            (queue, request_stream, reply_stream, job_prefix),
                            inputs,
                            (outputs, labels),
                            keys,
                            a,
                            b,
                            closed,
                        ) = spec;
                        let route = VersionRoute {
                            queue,
                            request_stream,
                            reply_stream,
                            inputs: inputs.inner.clone(),
                            outputs,
                            labels,
                            keyring: keys.map(|k| k.inner.clone()),
                            request_aad: a,
                            reply_aad: b,
                            job_prefix,
                            closed: closed.map(|(status, message, recheck)| Closed {
                                status,
                                message,
                                recheck,
                            }),
                        };
                        (version, Arc::new(route))
                    })
                    .collect();
                let pending = pending
                    .into_iter()
                    .map(|(version, (queue, message))| (version, Pending { queue, message }))
                    .collect();
                let route = ModelRoute {
                    default_version,
                    known,
                    versions,
                    pending,
                };
                (model, route)
            })
            .collect();
        plane.set_routes(table, outage);
    }

    /// Whether a request found Redis newer than the routes since the last call: the next
    /// rebuild is to read the specs and the repository afresh.
    fn take_stale(&self) -> bool {
        self.plane().is_some_and(|plane| plane.take_stale())
    }

    /// Every API key: (sha256 digest, key name, models or None, key id, whether it may call
    /// inference).
    fn set_callers(&self, callers: Vec<CallerSpec>) {
        if let Some(plane) = self.plane() {
            plane.set_callers(
                callers
                    .into_iter()
                    .map(|(digest, name, models, key_id, infer)| {
                        let models = models.map(|m| m.into_iter().collect::<HashSet<_>>());
                        let caller = Caller {
                            name,
                            key_id,
                            models,
                            infer,
                        };
                        (digest, caller)
                    })
                    .collect(),
            );
        }
    }

    /// Fail the requests the native path holds for ``queue`` with a 503 and ``message``.
    fn fail_waiting(&self, queue: &str, message: &str) -> usize {
        self.plane()
            .map_or(0, |plane| plane.fail_waiting(queue, message))
    }

    /// Queues the native path holds requests for.
    fn waiting_queues(&self) -> Vec<String> {
        self.plane()
            .map_or_else(Vec::new, |plane| plane.waiting_queues())
    }

    /// Requests in flight on the native path, by queue.
    fn plane_inflight(&self) -> HashMap<String, usize> {
        self.plane()
            .map_or_else(HashMap::new, |plane| plane.inflight())
    }

    /// The requests the native path answered since the last call, as tuples:
    /// ((model, version, queue, path, status, seconds), (key name, request id, caller id,
    /// client, bytes in, bytes out), (batch size, queue s, engine s) or None, failure or
    /// None).
    fn drain_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let events = self
            .plane()
            .map_or_else(Vec::new, |plane| plane.drain_events());
        let out = PyList::empty(py);
        for e in events {
            out.append((
                (e.model, e.version, e.queue, e.path, e.status, e.seconds),
                (
                    e.key_name,
                    e.request_id,
                    e.caller_id,
                    e.client,
                    e.bytes_in,
                    e.bytes_out,
                ),
                e.answer,
                e.failure,
                e.trace.map(|trace| {
                    let spans: Vec<_> = trace
                        .spans
                        .into_iter()
                        .map(|span| {
                            (
                                span.name,
                                hex(&span.id),
                                span.parent.map(|p| hex(&p)),
                                span.start_ns,
                                span.end_ns,
                                span.bytes,
                            )
                        })
                        .collect();
                    (hex(&trace.trace_id), trace.caller.map(|c| hex(&c)), spans)
                }),
            ))?;
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!("Front(port={})", self.port)
    }
}
