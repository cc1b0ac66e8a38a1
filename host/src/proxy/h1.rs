//! The direct HTTP/1.1 path. Most proxied traffic is plain HTTP/1.1 requests on keep-alive
//! connections; for those, one task reads the client's head, rewrites it for the upstream
//! ([`super::wire`]), writes it on a pooled upstream socket, and relays the response back, with
//! no HTTP machinery between the two sockets: no second task per upstream connection, no
//! channel, no header map. A connection's first request that this path does not take (HTTP/2,
//! HTTP/1.0, upgrades, `Expect`, anything unusual about its framing) hands the connection, with
//! the bytes already read, to the full HTTP stack ([`super::http`]) for the rest of its life.
//!
//! Heads are read and framing decided by [`super::wire`]; what goes upstream is the head and
//! framing written anew, never the client's framing bytes. Errors answer as the full stack does
//! ([`super::policy::Answer`]); a request the policy refuses, or whose body was not read to the
//! end, is answered and its connection closed rather than left out of step.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::plugins::Outcome;
use crate::routing::ServiceRoute;

use super::Shared;
use super::body::Flight;
use super::choose::{choose, request_key};
use super::chunked::Check;
use super::client_io::ClientIo;
use super::deadline::Deadline;
use super::dial::dial;
use super::gate::LINGER;
use super::metrics::ErrorKind;
use super::policy::Answer;
use super::wire::{Framing, H2_PREFACE, Parse, RequestHead, ResponseHead};

/// The most read from a socket at once. Buffers are taken when bytes arrive and given back
/// while the connection waits between requests: an idle keep-alive connection holds none.
const READ_CHUNK: usize = 16 * 1024;

/// What the connection does after an exchange.
enum Next {
    Keep,
    Close,
}

/// What reading a request head came to.
enum Read {
    Head(RequestHead),
    /// A request (or a protocol) for the full HTTP stack.
    Full,
    Refused(Answer),
    /// The client closed, went quiet between requests or the proxy is shutting down.
    Gone,
}

/// Serves `client` until it closes; the first request this path does not take hands the
/// connection, with the bytes already read from it, to `full`.
pub async fn serve<C, F, Fut>(shared: Arc<Shared>, mut client: C, peer: SocketAddr, full: F)
where
    C: ClientIo,
    F: FnOnce(C, Bytes) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Waited on for the connection's whole life, not registered afresh for every request.
    let mut cut = Box::pin(shared.conns.cut.clone().cancelled_owned());
    let mut deadline = Deadline::new(shared.settings.header_timeout);
    let mut conn = Conn {
        finish: Box::pin(shared.conns.finish.clone().cancelled_owned()),
        shared,
        peer,
        secure: client.secure(),
        inbound: BytesMut::new(),
        upstream_bytes: BytesMut::new(),
        out: Vec::new(),
    };
    let mut first = true;
    loop {
        let head = match conn.read_head(&mut client, &mut deadline, first).await {
            Read::Head(head) => head,
            // Boxed, as the exchange below: an idle connection's task holds only what waiting
            // for a head needs (a few hundred bytes), not the largest state it may reach.
            Read::Full => return Box::pin(full(client, conn.inbound.split().freeze())).await,
            Read::Refused(answer) => {
                let kind = match answer.status {
                    http::StatusCode::REQUEST_TIMEOUT => ErrorKind::ClientTimeout,
                    _ => ErrorKind::BadRequest,
                };
                conn.shared.metrics.error("", kind);
                conn.answer(&mut client, answer, 0).await;
                Box::pin(close(client, &mut cut)).await;
                return;
            }
            Read::Gone => return,
        };
        first = false;
        let next = tokio::select! {
            biased;
            next = Box::pin(conn.exchange(&mut client, head, &mut deadline)) => next,
            () = cut.as_mut() => Next::Close,
        };
        if matches!(next, Next::Close) || conn.shared.conns.finishing() {
            Box::pin(close(client, &mut cut)).await;
            return;
        }
    }
}

/// Closes `client`, reading on (and discarding) until it closes too, for up to
/// [`LINGER`]: closing on bytes it sent and nobody read makes the kernel answer them with a
/// reset, which can destroy the last answer before the client has read it (nginx's lingering
/// close).
async fn close<C: ClientIo>(
    mut client: C,
    cut: &mut Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
) {
    if client.shutdown().await.is_err() {
        return;
    }
    let discard = async {
        let mut scratch = vec![0u8; 8192];
        while let Ok(n) = client.read(&mut scratch).await
            && n > 0
        {}
    };
    tokio::select! {
        () = discard => {}
        () = tokio::time::sleep(LINGER) => {}
        () = cut.as_mut() => {}
    }
}

struct Conn {
    shared: Arc<Shared>,
    /// Resolves when shutdown asks connections to finish.
    finish: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    peer: SocketAddr,
    /// The client came over TLS.
    secure: bool,
    /// Client bytes read and not yet forwarded (the head being parsed, or a pipelined request).
    inbound: BytesMut,
    /// Upstream bytes read and not yet forwarded.
    upstream_bytes: BytesMut,
    /// The bytes of the next write.
    out: Vec<u8>,
}

/// What answering a request needs from forwarding it.
struct Exchange<'a> {
    route: &'a ServiceRoute,
    picked: &'a crate::plugins::Picked,
    address: &'a Arc<str>,
    metrics: &'a super::metrics::UpstreamMetrics,
    started: Instant,
    /// The client asked to close after this exchange.
    close: bool,
    /// The request was a `HEAD`: a body the upstream sends anyway must not meet the next
    /// request on a pooled socket.
    head_request: bool,
}

/// Why an exchange with the upstream failed before the response head arrived.
enum Failed {
    /// The socket was closed before any answer (a pooled one the upstream had let go).
    Closed,
    Timeout,
    Io(String),
    /// The response broke the policy ([`super::wire`]).
    Malformed(&'static str),
    /// The client's request body was malformed or cut short: the client's fault, not the
    /// upstream's.
    Client(&'static str),
    /// The client's request body stopped arriving for `--body-idle-timeout`.
    ClientTimeout,
}

impl Failed {
    /// What the upstream's failure counts as (logged); not for the client's own faults.
    fn upstreams_fault(self, service: &str, address: &str) -> ErrorKind {
        match self {
            Failed::Timeout => ErrorKind::Timeout,
            Failed::Closed => {
                tracing::warn!(service, upstream = %address, "upstream closed the connection");
                ErrorKind::Upstream
            }
            Failed::Io(e) => {
                tracing::warn!(service, upstream = %address, error = %e, "upstream failed");
                ErrorKind::Upstream
            }
            Failed::Malformed(why) => {
                tracing::warn!(service, upstream = %address, why, "upstream sent a response outside the rules");
                ErrorKind::Upstream
            }
            Failed::Client(_) | Failed::ClientTimeout => ErrorKind::BadRequest,
        }
    }
}

impl Conn {
    /// The next request head. `first`: nothing has been read on the connection before, so an
    /// HTTP/2 preface may come. A new connection and a head begun get `--header-timeout`; a
    /// connection between requests, `--keepalive-timeout`, and closes quietly when it runs out.
    async fn read_head<C: ClientIo>(
        &mut self,
        client: &mut C,
        deadline: &mut Deadline,
        first: bool,
    ) -> Read {
        let settings = &self.shared.settings;
        let (header_timeout, max) = (settings.header_timeout, settings.max_header_bytes);
        let mut begun = first || !self.inbound.is_empty();
        deadline.set(if begun {
            header_timeout
        } else {
            settings.keepalive_timeout
        });
        loop {
            if first && self.inbound.starts_with(H2_PREFACE) {
                return Read::Full;
            }
            let preface = first && H2_PREFACE.starts_with(&self.inbound);
            if !self.inbound.is_empty() && !preface {
                match RequestHead::parse(&self.inbound, max) {
                    Parse::Partial => {}
                    Parse::Done(head) if head.direct => return Read::Head(head),
                    Parse::Done(_) => return Read::Full,
                    Parse::Refused(refusal) => {
                        tracing::debug!(peer = %self.peer, why = refusal.why, "request refused");
                        return Read::Refused(refusal.answer());
                    }
                }
            }
            // Never more than the head's limit: a head that long is refused above.
            let room = max.saturating_sub(self.inbound.len()).clamp(1, READ_CHUNK);
            if self.inbound.capacity() > 0 {
                self.inbound.reserve(room);
                match client.try_read_buf(&mut (&mut self.inbound).limit(room)) {
                    Ok(0) => return Read::Gone,
                    Ok(_) => {
                        if !begun {
                            begun = true;
                            deadline.set(header_timeout);
                        }
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Read::Gone,
                }
            }
            let idle = self.inbound.is_empty();
            if idle {
                self.release_buffers();
            }
            tokio::select! {
                biased;
                readable = client.readable() => if readable.is_err() { return Read::Gone },
                // A head begun and not finished is answered; a quiet connection just closes.
                () = deadline.expired() => {
                    return if idle { Read::Gone } else { Read::Refused(Answer::request_timeout()) };
                }
                // Between requests a shutdown closes the connection, as the full stack does.
                () = self.finish.as_mut(), if idle => return Read::Gone,
            };
            self.inbound.reserve(room);
        }
    }

    /// Gives back what the connection's buffers hold while it waits for its client.
    fn release_buffers(&mut self) {
        self.inbound = BytesMut::new();
        self.upstream_bytes = BytesMut::new();
        self.out = Vec::new();
    }

    async fn exchange<C: ClientIo>(
        &mut self,
        client: &mut C,
        head: RequestHead,
        deadline: &mut Deadline,
    ) -> Next {
        // ACME's HTTP-01 challenges come over plain HTTP, and only plain HTTP is redirected.
        if !self.secure
            && let Some(answer) = super::secure::challenge(&self.shared, head.path(&self.inbound))
        {
            let answer = answer.closing(head.close || !head.framing.complete());
            return self.answer(client, answer, head.len()).await;
        }
        let snapshot = self.shared.routing.snapshot();
        let route = snapshot
            .http
            .find(head.host(&self.inbound), head.path(&self.inbound))
            .cloned();
        drop(snapshot);
        let Some(route) = route else {
            self.shared.metrics.error("", ErrorKind::NoRoute);
            let (host, path) = (head.host(&self.inbound), head.path(&self.inbound));
            tracing::debug!(host, path, "no route");
            // A body left unread would be taken for the next request.
            let answer =
                Answer::no_route(host, path).closing(head.close || !head.framing.complete());
            return self.answer(client, answer, head.len()).await;
        };
        let (host, target) = (head.host(&self.inbound), head.origin_target(&self.inbound));
        if !self.secure
            && let Some(redirect) = super::secure::redirect(&self.shared, &route, host, target)
        {
            let answer = redirect.closing(head.close || !head.framing.complete());
            return self.answer(client, answer, head.len()).await;
        }
        self.forward(client, head, &route, deadline).await
    }

    /// Sends the proxy's own `answer`. On a connection that goes on, the request's `unread`
    /// bytes (its head) are dropped first.
    async fn answer<C: ClientIo>(&mut self, client: &mut C, answer: Answer, unread: usize) -> Next {
        if !answer.close {
            self.inbound.advance(unread);
        }
        self.out.clear();
        answer.write(&mut self.out);
        match client.write_all(&self.out).await {
            Ok(()) if !answer.close => Next::Keep,
            _ => Next::Close,
        }
    }

    async fn forward<C: ClientIo>(
        &mut self,
        client: &mut C,
        head: RequestHead,
        route: &ServiceRoute,
        deadline: &mut Deadline,
    ) -> Next {
        let shared = self.shared.clone();
        let service = route.name.as_str();
        let resendable = head.framing.complete();
        let head_request = head.is_head_method(&self.inbound);
        let mut framing = head.framing.clone();
        // The head is still in `inbound` until the request's bytes are built, once.
        let mut built = false;
        let mut fresh_only = false;
        let key = request_key(&route.options.hash_key, self.peer.ip(), |name| {
            head.header_values(&self.inbound, name)
        });
        loop {
            let chosen = choose(&shared, route, Some(key), |address| {
                let pooled = if fresh_only {
                    None
                } else {
                    shared.streams.checkout(&address, resendable)
                };
                async move {
                    match pooled {
                        Some(stream) => Ok((stream, true)),
                        None => dial(&address, false).await.map(|s| (s, false)),
                    }
                }
            })
            .await;
            let chosen = match chosen {
                Ok(chosen) => chosen,
                Err(failure) => {
                    shared.metrics.error(service, failure.kind());
                    let answer = failure.answer(service).closing(head.close || !resendable);
                    let unread = if built { 0 } else { head.len() };
                    return self.answer(client, answer, unread).await;
                }
            };
            let metrics = chosen.metrics.clone();
            let flight = Flight::new(chosen.picked.start(), metrics.in_flight.clone());
            let (mut upstream, pooled) = (chosen.conn.0, chosen.conn.1);

            if !built {
                // The request head, and as much of the body as has arrived.
                let upstream_host = route
                    .options
                    .upstream_host
                    .as_ref()
                    .map_or_else(|| head.host(&self.inbound), |h| h.as_str());
                self.out.clear();
                head.write_upstream(
                    &self.inbound,
                    upstream_host,
                    (self.peer.ip(), self.secure),
                    &mut self.out,
                );
                self.inbound.advance(head.len());
                let now = match framing.relay(&self.inbound, &mut self.out) {
                    Ok(now) => now,
                    Err(why) => return self.bad_request(client, service, why).await,
                };
                self.inbound.advance(now);
                metrics.bytes_in.inc_by(now as u64);
                built = true;
            }

            let started = Instant::now();
            let result = self
                .send(client, &mut upstream, &mut framing, &metrics, deadline)
                .await;
            let result = match result {
                Ok(()) => {
                    // The upstream's time runs from the end of the request.
                    deadline.set(shared.settings.upstream_timeout);
                    let head = self.read_response_head(&mut upstream, head_request, client);
                    deadline.within(head).await.unwrap_or(Err(Failed::Timeout))
                }
                Err(failed) => Err(failed),
            };
            let address = chosen.address.as_ref();
            let kind = match result {
                Ok(response) => {
                    let exchange = Exchange {
                        route,
                        picked: &chosen.picked,
                        address: &chosen.address,
                        metrics: &chosen.metrics,
                        started,
                        close: head.close,
                        head_request,
                    };
                    let next = self
                        .respond(client, exchange, upstream, response, deadline)
                        .await;
                    drop(flight);
                    return next;
                }
                // A pooled socket the upstream had closed before answering: nothing of the
                // request (it has no body) was lost, so it goes again on a new connection, to
                // whichever upstream the strategy picks now.
                Err(Failed::Closed) if pooled && resendable && !fresh_only => {
                    tracing::debug!(service, upstream = %address, "pooled upstream connection was closed; sending again");
                    self.upstream_bytes.clear();
                    fresh_only = true;
                    continue;
                }
                Err(Failed::Client(why)) => {
                    route
                        .balancer
                        .done(&chosen.picked, Outcome::Success, started.elapsed());
                    return self.bad_request(client, service, why).await;
                }
                Err(Failed::ClientTimeout) => {
                    route
                        .balancer
                        .done(&chosen.picked, Outcome::Success, started.elapsed());
                    shared.metrics.error(service, ErrorKind::ClientTimeout);
                    tracing::debug!(service, peer = %self.peer, "request body stopped arriving");
                    return self.answer(client, Answer::body_timeout(), 0).await;
                }
                Err(failed) => failed.upstreams_fault(service, address),
            };
            shared.metrics.error(service, kind);
            let outcome = match kind {
                ErrorKind::Timeout => Outcome::Timeout,
                _ => Outcome::ServerError,
            };
            route
                .balancer
                .done(&chosen.picked, outcome, started.elapsed());
            // The request's body may be half sent: the connection cannot go on.
            let answer = Answer::upstream_failed(service, kind).closing(true);
            return self.answer(client, answer, 0).await;
        }
    }

    /// Relays the upstream's response (its head already in `upstream_bytes`) to the client,
    /// and pools the upstream socket if it ended at a clean message boundary.
    async fn respond<C: ClientIo>(
        &mut self,
        client: &mut C,
        exchange: Exchange<'_>,
        mut upstream: TcpStream,
        response: ResponseHead,
        deadline: &mut Deadline,
    ) -> Next {
        let Exchange {
            route,
            picked,
            address,
            metrics,
            started,
            close,
            head_request,
        } = exchange;
        let service = route.name.as_str();
        let elapsed = started.elapsed();
        let status = response.status;
        tracing::debug!(service, peer = %self.peer, upstream = %address, status, ms = elapsed.as_secs_f64() * 1e3, "request");
        metrics.count_status(status);
        metrics.duration.observe(elapsed.as_secs_f64());
        let outcome = if status >= 500 {
            Outcome::ServerError
        } else {
            Outcome::Success
        };
        route.balancer.done(picked, outcome, elapsed);

        // The response head, and as much of the body as has arrived.
        let close = close || response.close || self.shared.conns.finishing();
        self.out.clear();
        let hsts = self.secure.then_some(route.tls.hsts.as_deref()).flatten();
        response.write_client(&self.upstream_bytes, close, hsts, &mut self.out);
        self.upstream_bytes.advance(response.len());
        let mut framing = response.framing.clone();
        let Ok(now) = framing.relay(&self.upstream_bytes, &mut self.out) else {
            return Next::Close;
        };
        self.upstream_bytes.advance(now);
        metrics.bytes_out.inc_by(now as u64);
        // A client that stops reading is given as long as an upstream that stops sending.
        let idle = self.shared.settings.upstream_idle_timeout;
        deadline.set(idle);
        if !matches!(
            deadline.within(client.write_all(&self.out)).await,
            Some(Ok(()))
        ) {
            return Next::Close;
        }
        while !framing.complete() {
            self.upstream_bytes.reserve(READ_CHUNK);
            deadline.set(idle);
            match deadline
                .within(upstream.read_buf(&mut self.upstream_bytes))
                .await
            {
                Some(Ok(0)) if framing == Framing::UntilClose => break,
                Some(Ok(n)) if n > 0 => {}
                None => {
                    self.shared.metrics.error(service, ErrorKind::Stalled);
                    tracing::warn!(service, upstream = %address, "upstream's response stalled; cut");
                    return Next::Close;
                }
                _ => {
                    tracing::debug!(service, upstream = %address, "upstream closed mid-response");
                    return Next::Close;
                }
            }
            let passed = pass(
                &mut framing,
                &mut self.upstream_bytes,
                &mut self.out,
                client,
            );
            match deadline.within(passed).await {
                Some(Ok(n)) => metrics.bytes_out.inc_by(n as u64),
                Some(Err(Pass::Framing(why))) => {
                    tracing::warn!(service, upstream = %address, why, "upstream's response body broke its framing");
                    return Next::Close;
                }
                Some(Err(Pass::Io(_))) | None => return Next::Close,
            }
        }
        // Only a socket at a clean message boundary can take another request.
        if !response.close && !head_request && self.upstream_bytes.is_empty() {
            self.shared.streams.give_back(address.clone(), upstream);
        }
        self.upstream_bytes.clear();
        if close { Next::Close } else { Next::Keep }
    }

    /// Answers `400` for a request body that cannot be read, and closes: the connection is out
    /// of step.
    async fn bad_request<C: ClientIo>(&mut self, client: &mut C, service: &str, why: &str) -> Next {
        self.shared.metrics.error(service, ErrorKind::BadRequest);
        tracing::debug!(service, peer = %self.peer, why, "bad request body");
        self.answer(client, Answer::bad_request(why), 0).await
    }

    /// Sends the request built in `out` and relays the rest of its body from the client as it
    /// arrives: the head within `--upstream-timeout`, each piece of the body within
    /// `--body-idle-timeout`, however long the whole upload takes.
    async fn send<C: ClientIo>(
        &mut self,
        client: &mut C,
        upstream: &mut TcpStream,
        framing: &mut Framing,
        metrics: &super::metrics::UpstreamMetrics,
        deadline: &mut Deadline,
    ) -> Result<(), Failed> {
        deadline.set(self.shared.settings.upstream_timeout);
        match deadline.within(upstream.write_all(&self.out)).await {
            Some(Ok(())) => {}
            Some(Err(_)) => return Err(Failed::Closed),
            None => return Err(Failed::Timeout),
        }
        let idle = self.shared.settings.body_idle_timeout;
        while !framing.complete() {
            self.inbound.reserve(READ_CHUNK);
            deadline.set(idle);
            match deadline.within(client.read_buf(&mut self.inbound)).await {
                Some(Ok(n)) if n > 0 => {}
                Some(_) => return Err(Failed::Client("the request body ended early")),
                None => return Err(Failed::ClientTimeout),
            }
            let passed = pass(framing, &mut self.inbound, &mut self.out, upstream);
            match deadline.within(passed).await {
                Some(Ok(n)) => metrics.bytes_in.inc_by(n as u64),
                Some(Err(Pass::Framing(why))) => return Err(Failed::Client(why)),
                Some(Err(Pass::Io(e))) => return Err(Failed::Io(e.to_string())),
                // The upstream takes no more of the body.
                None => return Err(Failed::Timeout),
            }
        }
        Ok(())
    }

    /// Reads the upstream's response head into `upstream_bytes`; interim (1xx) responses are
    /// passed on to the client as they come.
    async fn read_response_head<C: ClientIo>(
        &mut self,
        upstream: &mut TcpStream,
        head_request: bool,
        client: &mut C,
    ) -> Result<ResponseHead, Failed> {
        let mut answered = false;
        loop {
            if !self.upstream_bytes.is_empty() {
                match ResponseHead::parse(&self.upstream_bytes, head_request) {
                    Parse::Partial => {}
                    Parse::Refused(refusal) => return Err(Failed::Malformed(refusal.why)),
                    Parse::Done(r) if r.status == 101 => {
                        // Upgrades never take this path: switching unasked is a broken upstream.
                        return Err(Failed::Malformed("a switch of protocols nobody asked for"));
                    }
                    Parse::Done(r) if r.status < 200 => {
                        let mut interim = Vec::new();
                        r.write_client(&self.upstream_bytes, false, None, &mut interim);
                        self.upstream_bytes.advance(r.len());
                        client
                            .write_all(&interim)
                            .await
                            .map_err(|e| Failed::Io(e.to_string()))?;
                        answered = true;
                        continue;
                    }
                    Parse::Done(r) => return Ok(r),
                }
            }
            self.upstream_bytes.reserve(READ_CHUNK);
            match upstream.read_buf(&mut self.upstream_bytes).await {
                Ok(n) if n > 0 => {}
                Ok(_) if self.upstream_bytes.is_empty() && !answered => return Err(Failed::Closed),
                Ok(_) => return Err(Failed::Io("the upstream closed mid-response".into())),
                Err(_) if self.upstream_bytes.is_empty() && !answered => {
                    return Err(Failed::Closed);
                }
                Err(e) => return Err(Failed::Io(e.to_string())),
            }
        }
    }
}

/// Why a body's bytes could not be passed on.
enum Pass {
    Framing(&'static str),
    Io(std::io::Error),
}

/// Passes the body's next bytes from `from` to `to` as the next hop must see them: re-framed
/// through `scratch` when the framing is rewritten, as they are otherwise. Returns how many
/// bytes of `from` were the body's.
async fn pass(
    framing: &mut Framing,
    from: &mut BytesMut,
    scratch: &mut Vec<u8>,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> Result<usize, Pass> {
    let (n, written) = if framing.rewritten() {
        scratch.clear();
        let n = framing.relay(from, scratch).map_err(Pass::Framing)?;
        (n, to.write_all(scratch).await)
    } else {
        let n = framing.relay(from, &mut Check).map_err(Pass::Framing)?;
        (n, to.write_all(&from[..n]).await)
    };
    written.map_err(Pass::Io)?;
    from.advance(n);
    Ok(n)
}
