//! Bodies streamed through the proxy frame by frame, never buffered whole: the request body on
//! its way upstream, which tells when it has ended (the upstream's time runs from there), and
//! the response body on its way back, which returns the upstream connection to the pool once
//! read to the end, holds the request's in-flight count until then, and is cut when the
//! upstream stops sending it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::{IntCounter, IntGauge};

use tokio::sync::oneshot;

use crate::plugins::InFlight;
use crate::routing::ServiceRoute;

use super::deadline::Deadline;
use super::metrics::{ErrorKind, ProxyMetrics};
use super::pool::{Pool, Sender};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the proxy answers clients with.
pub type ClientBody = UnsyncBoxBody<Bytes, BoxError>;

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
    /// Told (or dropped) once the body has ended, however it ended.
    ended: Option<oneshot::Sender<()>>,
}

impl UpstreamBody {
    /// `ended` hears when the body has ended: at once if it is empty.
    pub fn new(inner: Incoming, bytes: IntCounter) -> (Self, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let ended = (!inner.is_end_stream()).then_some(tx);
        (
            Self {
                inner,
                bytes,
                ended,
            },
            rx,
        )
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
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.inc_by(data.len() as u64);
                }
                if self.inner.is_end_stream() {
                    self.ended.take();
                }
            }
            Poll::Ready(_) => {
                self.ended.take();
            }
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

/// The pooled connection a response came on, on loan: it goes back to the pool once the body
/// is read.
pub struct Loan {
    pub pool: Arc<Pool>,
    pub address: Arc<str>,
    pub sender: Sender,
}

/// What is done about a response body that stops arriving.
pub struct Stall {
    /// How long the body may stop (`--upstream-idle-timeout`).
    pub after: Duration,
    /// Where a stall is counted, and for which route.
    pub metrics: Arc<ProxyMetrics>,
    pub route: Arc<ServiceRoute>,
}

/// An upstream's response body on its way to the client.
pub struct ResponseBody {
    inner: Incoming,
    bytes: IntCounter,
    loan: Option<Loan>,
    _flight: Flight,
    stall: Stall,
    /// Made at the first wait: a body that arrives whole never waits.
    timer: Option<Deadline>,
}

#[derive(Debug, thiserror::Error)]
#[error("the upstream's response stopped arriving")]
pub struct Stalled;

impl ResponseBody {
    pub fn new(
        inner: Incoming,
        bytes: IntCounter,
        loan: Loan,
        flight: Flight,
        stall: Stall,
    ) -> Self {
        Self {
            inner,
            bytes,
            loan: Some(loan),
            _flight: flight,
            stall,
            timer: None,
        }
    }

    fn release(&mut self) {
        if let Some(loan) = self.loan.take() {
            loan.pool.give_back(loan.address, loan.sender);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes.inc_by(data.len() as u64);
                }
                if this.inner.is_end_stream() {
                    this.release();
                }
                if let Some(timer) = &mut this.timer {
                    timer.set(this.stall.after);
                }
            }
            Poll::Ready(None) => this.release(),
            // A failed body leaves the connection in an unknown state: it is not reused.
            Poll::Ready(Some(Err(_))) => this.loan = None,
            Poll::Pending => {
                let after = this.stall.after;
                let timer = this.timer.get_or_insert_with(|| Deadline::new(after));
                if timer.poll_expired(cx).is_ready() {
                    // Cut: the client's connection closes, and so does the upstream's.
                    this.loan = None;
                    let service = this.stall.route.name.as_str();
                    this.stall.metrics.error(service, ErrorKind::Stalled);
                    tracing::warn!(service, "upstream's response stalled; cut");
                    return Poll::Ready(Some(Err(Stalled.into())));
                }
            }
        }
        polled.map_err(BoxError::from)
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
