//! The gates around the full HTTP stack: hyper reads HTTP/1 bytes, a client's requests or an
//! upstream's responses, only once [`super::wire`] has read them under the same policy as the
//! direct path. A head is passed on whole once it is valid, and a body as far as its framing
//! checks out. On the proxy's port, connections that stop speaking HTTP/1 (HTTP/2 with prior
//! knowledge, a protocol switched to) pass through untouched; Harbor's own listeners refuse h2c
//! (see [`Clients::of_api`]).
//!
//! What the policy refuses from a client ends the client's side of the conversation: hyper sees
//! the connection end there, answers what it already took, and the refusal's answer goes out
//! last, as the connection shuts down. What it refuses from an upstream is a read error, which
//! hyper's client reports (a 502) and which closes that connection.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;

use super::chunked::Check;
use super::deadline::Deadline;
use super::metrics::{ErrorKind, ProxyMetrics};
use super::policy::Answer;
use super::wire::{Framing, H2_PREFACE, MAX_HEAD, Parse, RequestHead, ResponseHead};

const READ_CHUNK: usize = 16 * 1024;

/// How long a client connection closed early is read on (see [`Gate::poll_linger`]).
pub const LINGER: Duration = Duration::from_secs(2);

enum State {
    /// Waiting for a head.
    Head,
    /// Inside a body; `then` is where its end leads.
    Body { framing: Framing, then: After },
    /// No longer HTTP/1: bytes pass as they come.
    Through,
    /// The sender's side is over: hyper reads the end of the stream.
    Ended,
}

#[derive(Clone, Copy)]
pub enum After {
    Head,
    Through,
}

/// What a side makes of a head at the start of the bytes read.
pub enum Step {
    Partial,
    /// A valid head of `len` bytes, its body framed as `framing`.
    Pass {
        len: usize,
        framing: Framing,
        then: After,
    },
    Through,
    /// The stream ends here for hyper.
    End,
    Fail(io::Error),
}

/// What the gate waits for from the sender, each with its own patience.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// The next head, none of it come yet, after a message.
    Idle,
    /// A head: the first, or one begun.
    Head,
    /// More of a body.
    Body,
}

/// One side's reading of heads: clients' requests or upstreams' responses.
pub trait Side {
    /// How long the sender may keep the gate `waiting`; `None`: as long as it likes.
    fn patience(&self, _waiting: Waiting) -> Option<Duration> {
        None
    }
    /// The sender kept the gate `waiting` past its patience.
    fn out_of_patience(&mut self, _waiting: Waiting) -> Step {
        Step::End
    }
    /// Longest head read before [`Side::head`] must have decided.
    fn max_head(&self) -> usize;
    /// How long to read on, discarding, after the gate ended the stream early.
    fn linger(&self) -> Option<Duration> {
        None
    }
    /// Reads the head at the start of `buf`; `first`: nothing has passed yet.
    fn head(&mut self, buf: &[u8], first: bool) -> Step;
    /// A body broke its framing.
    fn body_refused(&mut self, why: &'static str) -> Step;
    /// A message (head and body) has passed whole.
    fn message_done(&mut self) {}
    /// Bytes hyper wrote to the other end.
    fn wrote(&mut self, _bytes: &[u8]) {}
    /// An answer to write before the connection shuts.
    fn owed(&mut self) -> Option<Vec<u8>> {
        None
    }
}

/// A connection as the full HTTP stack reads it; see the module notes.
pub struct Gate<I, S> {
    io: I,
    side: S,
    /// Bytes read from `io` and not yet given to hyper: the first `ready` have passed.
    buf: BytesMut,
    ready: usize,
    state: State,
    /// Whether nothing has been given to hyper yet.
    first: bool,
    /// An answer owed before shutdown, and how much of it is written.
    owed: Option<(Vec<u8>, usize)>,
    failed: Option<io::Error>,
    /// What the timer measures now, if anything; `None` also when it must be set afresh.
    timing: Option<Waiting>,
    /// Made when first needed: a side without patience never has one.
    timer: Option<Deadline>,
    /// The stream was ended before its sender was done: read on at shutdown.
    cut_short: bool,
    lingering: bool,
}

impl<I, S: Side> Gate<I, S> {
    /// `prefix`: bytes already read from `io`.
    pub fn new(io: I, prefix: Bytes, side: S) -> Self {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&prefix);
        Self {
            timing: None,
            timer: None,
            cut_short: false,
            lingering: false,
            io,
            side,
            buf,
            ready: 0,
            state: State::Head,
            first: true,
            owed: None,
            failed: None,
        }
    }

    fn apply(&mut self, step: Step) -> bool {
        match step {
            Step::Partial => return false,
            Step::Pass { len, framing, then } => {
                self.ready = len;
                self.state = State::Body { framing, then };
            }
            Step::Through => self.state = State::Through,
            Step::End => {
                self.owed = self.side.owed().map(|bytes| (bytes, 0));
                self.cut_short = self.owed.is_some();
                self.state = State::Ended;
            }
            Step::Fail(e) => {
                self.failed = Some(e);
                self.cut_short = true;
                self.state = State::Ended;
            }
        }
        true
    }

    /// What the gate waits for from the sender now.
    fn waiting(&self) -> Option<Waiting> {
        match self.state {
            State::Head if self.buf.is_empty() && !self.first => Some(Waiting::Idle),
            State::Head => Some(Waiting::Head),
            State::Body { .. } => Some(Waiting::Body),
            State::Through | State::Ended => None,
        }
    }

    /// Pending while the sender is within its patience; once it is out, the side's step is
    /// taken and the gate is ready to go on.
    fn poll_patience(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(waiting) = self.waiting() else {
            return Poll::Pending;
        };
        let Some(patience) = self.side.patience(waiting) else {
            return Poll::Pending;
        };
        if self.timing != Some(waiting) {
            self.timing = Some(waiting);
            match &mut self.timer {
                Some(timer) => timer.set(patience),
                None => self.timer = Some(Deadline::new(patience)),
            }
        }
        let Some(timer) = &mut self.timer else {
            return Poll::Pending;
        };
        ready!(timer.poll_expired(cx));
        self.timing = None;
        let step = self.side.out_of_patience(waiting);
        self.apply(step);
        // Nothing owed is kept for the stream that is over.
        if matches!(self.state, State::Ended) {
            self.buf.truncate(self.ready);
        }
        Poll::Ready(())
    }

    /// Moves the gate on over the bytes in `buf`; `false` when more must be read first.
    fn inspect(&mut self) -> bool {
        match &mut self.state {
            State::Ended => true,
            State::Through => {
                self.ready = self.buf.len();
                self.ready > 0
            }
            State::Head => {
                let step = self.side.head(&self.buf, self.first);
                self.apply(step)
            }
            State::Body { framing, then } => {
                let then = *then;
                if !framing.complete() {
                    if self.buf.len() == self.ready {
                        return false;
                    }
                    match framing.relay(&self.buf[self.ready..], &mut Check) {
                        Ok(n) => self.ready += n,
                        Err(why) => {
                            let step = self.side.body_refused(why);
                            return self.apply(step);
                        }
                    }
                }
                if framing.complete() {
                    self.side.message_done();
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

impl<I: AsyncRead + Unpin, S: Side + Unpin> AsyncRead for Gate<I, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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
                return Poll::Ready(match this.failed.take() {
                    Some(e) => Err(e),
                    None => Ok(()),
                });
            }
            if matches!(this.state, State::Through) && this.buf.is_empty() {
                return Pin::new(&mut this.io).poll_read(cx, dst);
            }
            if this.inspect() {
                continue;
            }
            // A head is read no further than its limit, where the side refuses it.
            let room = match this.state {
                State::Head => this.side.max_head().saturating_sub(this.buf.len()),
                _ => READ_CHUNK,
            }
            .clamp(1, READ_CHUNK);
            this.buf.reserve(room);
            let read = poll_read_buf(Pin::new(&mut this.io), cx, &mut (&mut this.buf).limit(room));
            let filled = match read {
                Poll::Ready(filled) => filled?,
                Poll::Pending => {
                    ready!(this.poll_patience(cx));
                    continue;
                }
            };
            if matches!(this.state, State::Body { .. }) {
                // A body's patience is for its next bytes, not the whole of it.
                this.timing = None;
            }
            if filled == 0 {
                // The sender ended. A body that runs until the close is whole; anything else
                // that was begun never was.
                if let State::Body {
                    framing: Framing::UntilClose,
                    ..
                } = this.state
                {
                    this.ready = this.buf.len();
                }
                this.buf.truncate(this.ready);
                this.state = State::Ended;
            }
        }
    }
}

impl<I, S> Gate<I, S> {
    /// An answer on its way out: the time between messages counts from the end of it.
    fn wrote(&mut self) {
        if self.timing == Some(Waiting::Idle) {
            self.timing = None;
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin, S: Side + Unpin> AsyncWrite for Gate<I, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, bytes))?;
        this.side.wrote(&bytes[..n]);
        this.wrote();
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.side.wrote(&first[..n.min(first.len())]);
        }
        this.wrote();
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Writes the answer owed to a refused head, after everything hyper wrote, then shuts down.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
        ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
        if this.cut_short
            && let Some(linger) = this.side.linger()
        {
            ready!(this.poll_linger(cx, linger));
            this.cut_short = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncRead + Unpin, S> Gate<I, S> {
    /// Reads on, discarding, until the sender closes or `linger` has passed: closing on unread
    /// bytes makes the kernel answer them with a reset, which can destroy the answer before
    /// the client has read it (nginx's lingering close).
    fn poll_linger(&mut self, cx: &mut Context<'_>, linger: Duration) -> Poll<()> {
        let timer = self.timer.get_or_insert_with(|| Deadline::new(linger));
        if !self.lingering {
            self.lingering = true;
            timer.set(linger);
        }
        let mut scratch = [0u8; 8192];
        loop {
            if timer.poll_expired(cx).is_ready() {
                return Poll::Ready(());
            }
            let mut discard = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut discard)) {
                Ok(()) if !discard.filled().is_empty() => {}
                _ => return Poll::Ready(()),
            }
        }
    }
}

/// A client's side: requests, an HTTP/2 preface first, refusals answered, and the client's
/// time limits held as on the direct path.
pub struct Clients {
    /// None for Harbor's own listeners, whose refusals are not the proxy's.
    metrics: Option<Arc<ProxyMetrics>>,
    limits: ClientLimits,
    answer: Option<Answer>,
    /// Whether a connection may leave HTTP/1 (h2c, an upgrade); the gate's timers stop there,
    /// so only a server that bounds such connections itself may allow it.
    leaves_http1: bool,
    /// An h2c client was refused and is owed [`H2C_REFUSAL`].
    refused_h2c: bool,
}

/// The server's HTTP/2 preface (an empty SETTINGS frame) and a GOAWAY with the error
/// `HTTP_1_1_REQUIRED` (RFC 9113 §5.4.1, §7): an h2c client learns why it is closed, and clients
/// such as curl retry over HTTP/1.1.
const H2C_REFUSAL: [u8; 26] = [
    0, 0, 0, 4, 0, 0, 0, 0, 0, // SETTINGS, empty, stream 0
    0, 0, 8, 7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes, stream 0
    0, 0, 0, 0, 0, 0, 0, 0xd, // last stream 0, HTTP_1_1_REQUIRED
];

/// What a client is allowed (see the proxy's flags of the same names).
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub body_idle_timeout: Duration,
}

impl From<&crate::config::ProxySettings> for ClientLimits {
    fn from(s: &crate::config::ProxySettings) -> Self {
        Self {
            max_header_bytes: s.max_header_bytes,
            header_timeout: s.header_timeout,
            keepalive_timeout: s.keepalive_timeout,
            body_idle_timeout: s.body_idle_timeout,
        }
    }
}

impl Clients {
    pub fn new(metrics: Arc<ProxyMetrics>, limits: ClientLimits) -> Self {
        Self {
            metrics: Some(metrics),
            limits,
            answer: None,
            leaves_http1: true,
            refused_h2c: false,
        }
    }

    /// A client of Harbor's own API or Gangway: the same policy and patience, not counted
    /// among the proxy's errors, and held to HTTP/1. axum's server cannot be given HTTP/2
    /// timeouts, so an h2c client passed through could idle there forever; these are HTTP/1
    /// JSON and SSE APIs, and browsers never speak h2c. Nothing there switches protocols
    /// either, so a request asking to stays under the gate's timers.
    pub fn of_api(limits: ClientLimits) -> Self {
        Self {
            metrics: None,
            limits,
            answer: None,
            leaves_http1: false,
            refused_h2c: false,
        }
    }

    fn h2c(&mut self) -> Step {
        if self.leaves_http1 {
            return Step::Through;
        }
        tracing::debug!("h2c refused");
        self.refused_h2c = true;
        Step::End
    }

    fn count(&self, kind: ErrorKind) {
        if let Some(metrics) = &self.metrics {
            metrics.error("", kind);
        }
    }
}

/// The error a request body that stopped arriving ends with; the handler answers 408 for it.
pub fn body_stopped() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the request body stopped arriving")
}

impl Side for Clients {
    fn patience(&self, waiting: Waiting) -> Option<Duration> {
        Some(match waiting {
            Waiting::Idle => self.limits.keepalive_timeout,
            Waiting::Head => self.limits.header_timeout,
            Waiting::Body => self.limits.body_idle_timeout,
        })
    }

    fn out_of_patience(&mut self, waiting: Waiting) -> Step {
        match waiting {
            // A quiet connection just closes, as on the direct path.
            Waiting::Idle => Step::End,
            Waiting::Head => {
                self.count(ErrorKind::ClientTimeout);
                self.answer = Some(Answer::request_timeout());
                Step::End
            }
            Waiting::Body => Step::Fail(body_stopped()),
        }
    }

    fn max_head(&self) -> usize {
        self.limits.max_header_bytes
    }

    fn linger(&self) -> Option<Duration> {
        Some(LINGER)
    }

    fn head(&mut self, buf: &[u8], first: bool) -> Step {
        if first && buf.starts_with(H2_PREFACE) {
            return self.h2c();
        }
        if first && H2_PREFACE.starts_with(buf) {
            return Step::Partial;
        }
        match RequestHead::parse(buf, self.limits.max_header_bytes) {
            Parse::Partial => Step::Partial,
            Parse::Done(head) => Step::Pass {
                len: head.len(),
                then: if head.upgrade && self.leaves_http1 {
                    After::Through
                } else {
                    After::Head
                },
                framing: head.framing,
            },
            Parse::Refused(refusal) => {
                tracing::debug!(why = refusal.why, "request refused");
                self.count(ErrorKind::BadRequest);
                self.answer = Some(refusal.answer());
                Step::End
            }
        }
    }

    /// hyper's request body ends early; the handler answers 400.
    fn body_refused(&mut self, why: &'static str) -> Step {
        tracing::debug!(why, "request body refused");
        Step::End
    }

    fn owed(&mut self) -> Option<Vec<u8>> {
        if std::mem::take(&mut self.refused_h2c) {
            return Some(H2C_REFUSAL.to_vec());
        }
        let answer = self.answer.take()?;
        let mut bytes = Vec::new();
        answer.write(&mut bytes);
        Some(bytes)
    }
}

/// An upstream's side: responses, each read knowing whether its request was a `HEAD`, which
/// the requests hyper writes tell.
#[derive(Default)]
pub struct Upstreams {
    /// For each request written and not yet answered: whether it was a `HEAD`.
    heads: VecDeque<bool>,
    /// The message passing is a final response (not an interim one).
    answering: bool,
    /// The next bytes written start a request.
    request_next: bool,
}

impl Upstreams {
    pub fn new() -> Self {
        Self {
            request_next: true,
            ..Self::default()
        }
    }
}

fn malformed(why: &'static str) -> Step {
    Step::Fail(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the upstream's response broke the rules: {why}"),
    ))
}

impl Side for Upstreams {
    fn max_head(&self) -> usize {
        MAX_HEAD
    }

    fn head(&mut self, buf: &[u8], _first: bool) -> Step {
        let head_request = self.heads.front().copied().unwrap_or(false);
        match ResponseHead::parse(buf, head_request) {
            Parse::Partial => Step::Partial,
            Parse::Refused(refusal) => malformed(refusal.why),
            Parse::Done(head) => {
                let then = if head.status == 101 {
                    After::Through
                } else {
                    After::Head
                };
                self.answering = head.status >= 200 || head.status == 101;
                Step::Pass {
                    len: head.len(),
                    framing: head.framing,
                    then,
                }
            }
        }
    }

    fn body_refused(&mut self, why: &'static str) -> Step {
        malformed(why)
    }

    fn message_done(&mut self) {
        if std::mem::take(&mut self.answering) {
            self.heads.pop_front();
            self.request_next = true;
        }
    }

    fn wrote(&mut self, bytes: &[u8]) {
        if self.request_next && !bytes.is_empty() {
            self.heads.push_back(bytes.starts_with(b"HEAD "));
            self.request_next = false;
        }
    }
}
