//! Bodies streamed through the proxy frame by frame, never buffered whole: the request body on
//! its way upstream, and the response body on its way back, which returns the upstream
//! connection to the pool once read to the end and holds the request's in-flight count until
//! then.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::{IntCounter, IntGauge};

use crate::plugins::InFlight;

use super::pool::{Pool, Sender};

/// What the proxy answers clients with.
pub type ClientBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// A short body for the proxy's own answers.
pub fn text(body: impl Into<Bytes>) -> ClientBody {
    http_body_util::Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// The client's request body, counted on its way upstream.
pub struct UpstreamBody {
    inner: Incoming,
    bytes: IntCounter,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, bytes: IntCounter) -> Self {
        Self { inner, bytes }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One request or connection in flight to an upstream, in the balancer's load and the gauge.
pub struct Flight {
    _load: Option<InFlight>,
    gauge: IntGauge,
}

impl Flight {
    pub fn new(load: Option<InFlight>, gauge: IntGauge) -> Self {
        gauge.inc();
        Self { _load: load, gauge }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The connection a response came on, to go back to the pool once the body is read.
pub struct Lease {
    pub pool: Arc<Pool>,
    pub address: Arc<str>,
    pub sender: Sender,
}

/// An upstream's response body on its way to the client.
pub struct ResponseBody {
    inner: Incoming,
    bytes: IntCounter,
    lease: Option<Lease>,
    _flight: Flight,
}

impl ResponseBody {
    pub fn new(inner: Incoming, bytes: IntCounter, lease: Lease, flight: Flight) -> Self {
        Self {
            inner,
            bytes,
            lease: Some(lease),
            _flight: flight,
        }
    }

    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.pool.give_back(lease.address, lease.sender);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.inc_by(data.len() as u64);
                }
                if self.inner.is_end_stream() {
                    self.release();
                }
            }
            Poll::Ready(None) => self.release(),
            // A failed body leaves the connection in an unknown state: it is not reused.
            Poll::Ready(Some(Err(_))) => self.lease = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body the server never polls (HEAD, 204, 304) still ends cleanly.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
