//! A client's request body on its way to the application, held to the gateway's limits: it
//! must arrive before its deadline and stay within the size limit, whatever its framing
//! (Content-Length, chunked, HTTP/2 frames). It is streamed, never collected, so a client
//! the application answers without reading its body (no key) makes the front hold nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

/// Why a body was cut off (read by the front to answer the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Breach {
    None = 0,
    Slow = 1,
    TooLarge = 2,
    Client = 3,
}

/// Shared between the body (which records a breach) and the request (which reports it).
#[derive(Debug, Default, Clone)]
pub(crate) struct BreachCell(Arc<AtomicU8>);

impl BreachCell {
    fn set(&self, breach: Breach) {
        self.0.store(breach as u8, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Breach {
        match self.0.load(Ordering::Relaxed) {
            1 => Breach::Slow,
            2 => Breach::TooLarge,
            3 => Breach::Client,
            _ => Breach::None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was cut off")]
pub(crate) struct BodyCut;

pub(crate) struct GuardedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    remaining: u64,
    breach: BreachCell,
}

impl GuardedBody {
    pub(crate) fn new(
        inner: Incoming,
        timeout: Duration,
        max_bytes: u64,
        breach: BreachCell,
    ) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            remaining: max_bytes,
            breach,
        }
    }

    fn cut(&mut self, breach: Breach) -> Poll<Option<Result<Frame<Bytes>, BodyCut>>> {
        self.breach.set(breach);
        Poll::Ready(Some(Err(BodyCut)))
    }
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BodyCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyCut>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let length = data.len() as u64;
                    if length > this.remaining {
                        return this.cut(Breach::TooLarge);
                    }
                    this.remaining -= length;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => this.cut(Breach::Client),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    return this.cut(Breach::Slow);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
