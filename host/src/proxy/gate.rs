//! The gate in front of the full HTTP stack: hyper reads a client's HTTP/1 bytes only once
//! [`super::wire`] has read them under the same policy as the direct path. A head is passed on
//! whole once it is valid, and a body as far as its framing checks out. What the policy
//! refuses ends the client's side of the conversation: hyper sees the connection end there,
//! answers what it already took, and the refusal's answer goes out last, as the connection
//! shuts down. Connections that stop speaking HTTP/1 (HTTP/2 with prior knowledge, a protocol
//! switched to) pass through untouched.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

use super::chunked::Check;
use super::metrics::{ErrorKind, ProxyMetrics};
use super::policy::Answer;
use super::wire::{Framing, H2_PREFACE, Parse, RequestHead};

const READ_CHUNK: usize = 16 * 1024;

enum State {
    /// Waiting for a request head.
    Head,
    /// Inside a request's body; `then` is where its end leads.
    Body { framing: Framing, then: After },
    /// No longer HTTP/1: bytes pass as they come.
    Through,
    /// The client's side is over: hyper reads the end of the stream.
    Ended,
}

#[derive(Clone, Copy)]
enum After {
    Head,
    Through,
}

/// A client connection as the full HTTP stack reads it; see the module notes.
pub struct Gate<I> {
    io: I,
    /// Bytes read from `io` and not yet given to hyper: the first `ready` have passed.
    buf: BytesMut,
    ready: usize,
    state: State,
    /// Whether nothing has been given to hyper yet (an HTTP/2 preface can only come first).
    first: bool,
    /// The answer to a refused head, and how much of it is written.
    owed: Option<(Vec<u8>, usize)>,
    metrics: Arc<ProxyMetrics>,
}

impl<I> Gate<I> {
    /// `prefix`: bytes already read from `io`.
    pub fn new(io: I, prefix: Bytes, metrics: Arc<ProxyMetrics>) -> Self {
        let mut buf = BytesMut::with_capacity(prefix.len().max(READ_CHUNK));
        buf.extend_from_slice(&prefix);
        Self {
            io,
            buf,
            ready: 0,
            state: State::Head,
            first: true,
            owed: None,
            metrics,
        }
    }

    /// Moves the gate on over the bytes in `buf`; `false` when more must be read first.
    fn inspect(&mut self) -> bool {
        match &mut self.state {
            State::Ended => true,
            State::Through => {
                self.ready = self.buf.len();
                self.ready > 0
            }
            State::Head if self.first && self.buf.starts_with(H2_PREFACE) => {
                self.state = State::Through;
                true
            }
            State::Head if self.first && H2_PREFACE.starts_with(&self.buf) => false,
            State::Head => match RequestHead::parse(&self.buf) {
                Parse::Partial => false,
                Parse::Done(head) => {
                    self.ready = head.len();
                    let then = if head.upgrade {
                        After::Through
                    } else {
                        After::Head
                    };
                    self.state = State::Body {
                        framing: head.framing,
                        then,
                    };
                    true
                }
                Parse::Refused(refusal) => {
                    tracing::debug!(why = refusal.why, "request refused");
                    self.metrics.error("", ErrorKind::BadRequest);
                    let answer = if refusal.too_large {
                        Answer::head_too_large()
                    } else {
                        Answer::bad_request(refusal.why)
                    };
                    let mut bytes = Vec::new();
                    answer.write(&mut bytes);
                    self.owed = Some((bytes, 0));
                    self.state = State::Ended;
                    true
                }
            },
            State::Body { framing, then } => {
                let then = *then;
                if !framing.complete() {
                    if self.buf.len() == self.ready {
                        return false;
                    }
                    match framing.relay(&self.buf[self.ready..], &mut Check) {
                        Ok(n) => self.ready += n,
                        Err(why) => {
                            // hyper's body ends early; the handler answers 400.
                            tracing::debug!(why, "request body refused");
                            self.state = State::Ended;
                            return true;
                        }
                    }
                }
                if framing.complete() {
                    self.state = match then {
                        After::Head => State::Head,
                        After::Through => State::Through,
                    };
                }
                true
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Gate<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready > 0 {
                let n = this.ready.min(dst.remaining());
                dst.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.ready -= n;
                this.first = false;
                return Poll::Ready(Ok(()));
            }
            if matches!(this.state, State::Ended) {
                return Poll::Ready(Ok(()));
            }
            if matches!(this.state, State::Through) && this.buf.is_empty() {
                return Pin::new(&mut this.io).poll_read(cx, dst);
            }
            if this.inspect() {
                continue;
            }
            this.buf.reserve(READ_CHUNK);
            let filled = ready!(poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf))?;
            if filled == 0 {
                // The client ended; what it sent of a head or body was never whole.
                this.buf.clear();
                this.state = State::Ended;
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Gate<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, bytes)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Writes the answer owed to a refused head, after everything hyper wrote, then shuts down.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some((bytes, written)) = &mut this.owed {
            while *written < bytes.len() {
                match ready!(Pin::new(&mut this.io).poll_write(cx, &bytes[*written..])) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => *written += n,
                }
            }
            this.owed = None;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
