//! The Python application behind the front: HTTP/1.1 over a private Unix socket, with a
//! small pool of kept-alive connections.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// A pooled connection unused this long is dropped rather than reused: the application may
/// be closing it (its keep-alive is far longer, so this side always closes first).
const IDLE_REUSE: Duration = Duration::from_secs(20);
/// Idle connections kept; more are closed when their request is done.
const MAX_IDLE: usize = 64;
/// While the application is starting (its socket not yet there), how long to wait for it.
const CONNECT_PATIENCE: Duration = Duration::from_secs(2);

/// A connection to the Unix socket at `path`, waiting a little for a service that is still
/// starting (its socket not there yet).
pub(crate) async fn connect(path: &Path) -> Option<UnixStream> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(10);
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Some(stream),
            Err(_) if started.elapsed() < CONNECT_PATIENCE => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            Err(_) => return None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("the application is not reachable")]
    Unreachable,
    #[error("the application closed the connection")]
    Failed,
}

pub(crate) struct Upstream<B> {
    path: PathBuf,
    idle: Mutex<Vec<(Instant, SendRequest<B>)>>,
}

impl<B> Upstream<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn pooled(&self) -> Option<SendRequest<B>> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while let Some((since, sender)) = idle.pop() {
            if since.elapsed() < IDLE_REUSE && !sender.is_closed() && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((Instant::now(), sender));
        }
    }

    async fn connect(&self) -> Result<SendRequest<B>, UpstreamError> {
        let stream = connect(&self.path)
            .await
            .ok_or(UpstreamError::Unreachable)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| UpstreamError::Unreachable)?;
        tokio::spawn(async move {
            // Ends when either side closes; nothing to report (the request sees its error).
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Send one request and read its whole answer. A pooled connection found closed when
    /// the request is handed to it (the request never left: hyper gives it back) is
    /// replaced once; a request that did leave is never sent twice.
    pub(crate) async fn call(&self, request: Request<B>) -> Result<Response<Bytes>, UpstreamError> {
        let (mut sender, pooled) = match self.pooled() {
            Some(sender) => (sender, true),
            None => (self.connect().await?, false),
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut unsent) => match unsent.take_message() {
                Some(again) if pooled => {
                    sender = self.connect().await?;
                    sender
                        .send_request(again)
                        .await
                        .map_err(|_| UpstreamError::Failed)?
                }
                _ => return Err(UpstreamError::Failed),
            },
        };
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|_| UpstreamError::Failed)?
            .to_bytes();
        self.give_back(sender);
        Ok(Response::from_parts(parts, body))
    }
}
