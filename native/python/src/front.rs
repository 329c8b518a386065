//! `ppml_serve._native.Front`: the HTTPS front (ppml-front) run inside the gateway process,
//! on threads of its own; the Python application answers behind it on a private socket.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use ppml_front::{Front as CoreFront, FrontConfig, FrontError, TlsFiles};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::package_error;

fn seconds(value: f64, name: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| pyo3::exceptions::PyValueError::new_err(format!("{name}: not a duration")))
}

/// A bound front: ``start()`` serves, ``stop(grace_s)`` drains and ends it.
#[pyclass(frozen, module = "ppml_serve._native")]
pub(crate) struct Front {
    inner: Mutex<Option<CoreFront>>,
    port: u16,
}

#[pymethods]
impl Front {
    #[new]
    #[pyo3(signature = (*, host, port, upstream, cert_file=None, key_file=None,
                        client_ca_file=None, reuse_port=false, max_header_bytes=16384,
                        header_timeout_s=10.0, keep_alive_s=5.0, body_timeout_s=60.0,
                        max_request_bytes=67108864, max_connections=1024,
                        upstream_timeout_s=60.0, max_inflight=512, threads=1))]
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
        let config = FrontConfig {
            host,
            port,
            reuse_port,
            tls,
            upstream,
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
        Ok(Self {
            inner: Mutex::new(Some(front)),
            port,
        })
    }

    /// The bound port (the one asked for, or the one picked for port 0).
    #[getter]
    fn port(&self) -> u16 {
        self.port
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
            ] {
                out.set_item(name, value.load(Ordering::Relaxed))?;
            }
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!("Front(port={})", self.port)
    }
}
