//! The direct HTTP/1.1 path. Most proxied traffic is plain HTTP/1.1 requests on keep-alive
//! connections; for those, one task reads the client's head, rewrites it for the upstream
//! ([`super::wire`]), writes it on a pooled upstream socket, and relays the response back, with
//! no HTTP machinery between the two sockets: no second task per upstream connection, no
//! channel, no header map. A connection's first request that this path does not take (HTTP/2,
//! HTTP/1.0, upgrades, `Expect`, anything unusual about its framing) hands the connection, with
//! the bytes already read, to the full HTTP stack ([`super::http`]) for the rest of its life.
//!
//! Errors answer as the full stack does (404, 502, 503, 504 with a short JSON body); a client
//! whose request body was not read to the end is closed after the answer rather than left out
//! of step.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::plugins::Outcome;
use crate::rewind::Rewind;
use crate::routing::ServiceRoute;

use super::Shared;
use super::body::Flight;
use super::choose::{Failure, choose, client_key};
use super::metrics::ErrorKind;
use super::pool::dial;
use super::wire::{Framing, Parse, RequestHead, ResponseHead};

/// How long a client has to send a request's head once the connection is waiting for one (the
/// full stack's `header_read_timeout`).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 16 * 1024;

/// What the connection does after an exchange.
enum Next {
    Keep,
    Close,
}

/// Serves `client` until it closes; the first request this path does not take hands the
/// connection to `full`.
pub async fn serve<F, Fut>(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr, full: F)
where
    F: FnOnce(Rewind) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Waited on for the connection's whole life, not registered afresh for every request.
    let mut cut = Box::pin(shared.conns.cut.clone().cancelled_owned());
    let mut deadline = Deadline::new();
    let mut conn = Conn {
        finish: Box::pin(shared.conns.finish.clone().cancelled_owned()),
        shared,
        peer,
        inbound: BytesMut::with_capacity(READ_CHUNK),
        upstream_bytes: BytesMut::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(READ_CHUNK),
    };
    loop {
        let head = match conn.read_head(&mut client, &mut deadline).await {
            Some(Parse::Done(head)) if head.direct => head,
            Some(_) => {
                let prefix = conn.inbound.split().freeze();
                return full(Rewind::new(prefix, client)).await;
            }
            None => return,
        };
        let next = tokio::select! {
            biased;
            next = conn.exchange(&mut client, head, &mut deadline) => next,
            () = cut.as_mut() => Next::Close,
        };
        if matches!(next, Next::Close) || conn.shared.conns.finishing() {
            let _ = client.shutdown().await;
            return;
        }
    }
}

struct Conn {
    shared: Arc<Shared>,
    /// Resolves when shutdown asks connections to finish.
    finish: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    peer: SocketAddr,
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
}

/// Why an exchange with the upstream failed before the response head arrived.
enum Failed {
    /// The socket was closed before any answer (a pooled one the upstream had let go).
    Closed,
    Timeout,
    Io(String),
    Malformed,
    /// The client's request body was malformed or cut short: the client's fault, not the
    /// upstream's.
    Client(&'static str),
}

impl Conn {
    /// The next request head; `None` when the client closed, went quiet past the deadline or
    /// the proxy is shutting down between requests.
    async fn read_head(
        &mut self,
        client: &mut TcpStream,
        deadline: &mut Deadline,
    ) -> Option<Parse<RequestHead>> {
        deadline.set(HEAD_TIMEOUT);
        loop {
            if !self.inbound.is_empty() {
                match RequestHead::parse(&self.inbound) {
                    Parse::Partial => {}
                    done => return Some(done),
                }
            }
            self.inbound.reserve(READ_CHUNK);
            let idle = self.inbound.is_empty();
            let read = tokio::select! {
                biased;
                read = client.read_buf(&mut self.inbound) => read,
                () = deadline.expired() => return None,
                // Between requests a shutdown closes the connection, as the full stack does.
                () = self.finish.as_mut(), if idle => return None,
            };
            match read {
                Ok(n) if n > 0 => {}
                _ => return None,
            }
        }
    }

    async fn exchange(
        &mut self,
        client: &mut TcpStream,
        head: RequestHead,
        deadline: &mut Deadline,
    ) -> Next {
        let snapshot = self.shared.routing.snapshot();
        let route = snapshot
            .http
            .find(head.host(&self.inbound), head.path(&self.inbound))
            .cloned();
        drop(snapshot);
        let Some(route) = route else {
            self.shared.metrics.error("", ErrorKind::NoRoute);
            let body = json!({"error": "no route", "host": head.host(&self.inbound), "path": head.path(&self.inbound)});
            tracing::debug!(
                host = head.host(&self.inbound),
                path = head.path(&self.inbound),
                "no route"
            );
            let close = head.close || head.framing != Framing::Empty;
            return self
                .refuse(client, close, head.len(), 404, "Not Found", body)
                .await;
        };
        self.forward(client, head, &route, deadline).await
    }

    /// Answers `status` with a JSON body. On a connection that goes on, the request's `unread`
    /// bytes (its head) are dropped first; one whose body was not read through must `close`.
    async fn refuse(
        &mut self,
        client: &mut TcpStream,
        close: bool,
        unread: usize,
        status: u16,
        reason: &str,
        body: serde_json::Value,
    ) -> Next {
        if !close {
            self.inbound.advance(unread);
        }
        let body = format!("{body}\n");
        self.out.clear();
        self.out.extend_from_slice(
            format!(
                "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
                body.len(),
                if close { "connection: close\r\n" } else { "" }
            )
            .as_bytes(),
        );
        match client.write_all(&self.out).await {
            Ok(()) if !close => Next::Keep,
            _ => Next::Close,
        }
    }

    async fn forward(
        &mut self,
        client: &mut TcpStream,
        head: RequestHead,
        route: &ServiceRoute,
        deadline: &mut Deadline,
    ) -> Next {
        let shared = self.shared.clone();
        let service = route.name.as_str();
        let resendable = head.framing == Framing::Empty;
        let head_request = head.is_head_method(&self.inbound);
        let mut framing = head.framing.clone();
        // The head is still in `inbound` until the request's bytes are built, once.
        let mut built = false;
        let mut fresh_only = false;
        loop {
            let chosen = choose(
                &shared,
                route,
                Some(client_key(self.peer.ip())),
                |address| {
                    let pooled = if fresh_only {
                        None
                    } else {
                        shared.streams.checkout(&address, resendable)
                    };
                    async move {
                        match pooled {
                            Some(stream) => Ok((stream, true)),
                            None => dial(&address).await.map(|s| (s, false)),
                        }
                    }
                },
            )
            .await;
            let chosen = match chosen {
                Ok(chosen) => chosen,
                Err(failure) => {
                    shared.metrics.error(service, failure.kind());
                    let (status, reason, error) = match failure {
                        Failure::NoHealthy => (503, "Service Unavailable", "no healthy upstream"),
                        Failure::Unreachable(why) => {
                            tracing::warn!(service, error = %why, "no upstream reachable");
                            (502, "Bad Gateway", "upstream unreachable")
                        }
                    };
                    let body = json!({"error": error, "service": service});
                    let close = head.close || !resendable;
                    let unread = if built { 0 } else { head.len() };
                    return self
                        .refuse(client, close, unread, status, reason, body)
                        .await;
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
                head.write_upstream(&self.inbound, upstream_host, self.peer.ip(), &mut self.out);
                self.inbound.advance(head.len());
                let now = match framing.take(&self.inbound) {
                    Ok(now) => now,
                    Err(why) => return self.bad_request(client, service, why).await,
                };
                self.out.extend_from_slice(&self.inbound[..now]);
                self.inbound.advance(now);
                metrics.bytes_in.inc_by(now as u64);
                built = true;
            }

            let started = Instant::now();
            deadline.set(shared.settings.upstream_timeout);
            let attempt = async {
                upstream
                    .write_all(&self.out)
                    .await
                    .map_err(|_| Failed::Closed)?;
                self.relay_request_body(client, &mut upstream, &mut framing, &metrics)
                    .await?;
                self.read_response_head(&mut upstream, head_request, client)
                    .await
            };
            let result = tokio::select! {
                biased;
                result = attempt => result,
                () = deadline.expired() => Err(Failed::Timeout),
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
                    };
                    let next = self.respond(client, exchange, upstream, response).await;
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
                Err(Failed::Timeout) => ErrorKind::Timeout,
                Err(Failed::Closed) => {
                    tracing::warn!(service, upstream = %address, "upstream closed the connection");
                    ErrorKind::Upstream
                }
                Err(Failed::Io(e)) => {
                    tracing::warn!(service, upstream = %address, error = %e, "upstream failed");
                    ErrorKind::Upstream
                }
                Err(Failed::Malformed) => {
                    tracing::warn!(service, upstream = %address, "upstream sent a malformed response");
                    ErrorKind::Upstream
                }
            };
            shared.metrics.error(service, kind);
            let (status, reason, outcome, error) = match kind {
                ErrorKind::Timeout => (
                    504,
                    "Gateway Timeout",
                    Outcome::Timeout,
                    "upstream timed out",
                ),
                _ => (502, "Bad Gateway", Outcome::ServerError, "upstream failed"),
            };
            route
                .balancer
                .done(&chosen.picked, outcome, started.elapsed());
            // The request's body may be half sent: the connection cannot go on.
            let body = json!({"error": error, "service": service});
            return self.refuse(client, true, 0, status, reason, body).await;
        }
    }

    /// Relays the upstream's response (its head already in `upstream_bytes`) to the client,
    /// and pools the upstream socket if it ended at a clean message boundary.
    async fn respond(
        &mut self,
        client: &mut TcpStream,
        exchange: Exchange<'_>,
        mut upstream: TcpStream,
        response: ResponseHead,
    ) -> Next {
        let Exchange {
            route,
            picked,
            address,
            metrics,
            started,
            close,
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
        response.write_client(&self.upstream_bytes, close, &mut self.out);
        self.upstream_bytes.advance(response.len());
        let mut framing = response.framing.clone();
        let Ok(now) = framing.take(&self.upstream_bytes) else {
            return Next::Close;
        };
        self.out.extend_from_slice(&self.upstream_bytes[..now]);
        self.upstream_bytes.advance(now);
        metrics.bytes_out.inc_by(now as u64);
        if client.write_all(&self.out).await.is_err() {
            return Next::Close;
        }
        while !framing.complete() {
            self.upstream_bytes.reserve(READ_CHUNK);
            match upstream.read_buf(&mut self.upstream_bytes).await {
                Ok(0) if framing == Framing::UntilClose => break,
                Ok(n) if n > 0 => {}
                _ => {
                    tracing::debug!(service, upstream = %address, "upstream closed mid-response");
                    return Next::Close;
                }
            }
            let Ok(n) = framing.take(&self.upstream_bytes) else {
                return Next::Close;
            };
            if client.write_all(&self.upstream_bytes[..n]).await.is_err() {
                return Next::Close;
            }
            self.upstream_bytes.advance(n);
            metrics.bytes_out.inc_by(n as u64);
        }
        // Only a socket at a clean message boundary can take another request.
        if !response.close && self.upstream_bytes.is_empty() {
            self.shared.streams.give_back(address.clone(), upstream);
        }
        self.upstream_bytes.clear();
        if close { Next::Close } else { Next::Keep }
    }

    /// Answers `400` for a request body that cannot be read, and closes: the connection is out
    /// of step.
    async fn bad_request(&mut self, client: &mut TcpStream, service: &str, why: &str) -> Next {
        self.shared.metrics.error(service, ErrorKind::BadRequest);
        tracing::debug!(service, peer = %self.peer, why, "bad request body");
        let body = format!("{}\n", json!({"error": "bad request body", "detail": why}));
        self.out.clear();
        self.out.extend_from_slice(
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let _ = client.write_all(&self.out).await;
        Next::Close
    }

    /// Relays the rest of the request body from the client as it arrives.
    async fn relay_request_body(
        &mut self,
        client: &mut TcpStream,
        upstream: &mut TcpStream,
        framing: &mut Framing,
        metrics: &super::metrics::UpstreamMetrics,
    ) -> Result<(), Failed> {
        while !framing.complete() {
            self.inbound.reserve(READ_CHUNK);
            match client.read_buf(&mut self.inbound).await {
                Ok(n) if n > 0 => {}
                _ => return Err(Failed::Client("the request body ended early")),
            }
            let n = framing.take(&self.inbound).map_err(Failed::Client)?;
            upstream
                .write_all(&self.inbound[..n])
                .await
                .map_err(|e| Failed::Io(e.to_string()))?;
            self.inbound.advance(n);
            metrics.bytes_in.inc_by(n as u64);
        }
        Ok(())
    }

    /// Reads the upstream's response head into `upstream_bytes`; interim (1xx) responses are
    /// passed on to the client as they come.
    async fn read_response_head(
        &mut self,
        upstream: &mut TcpStream,
        head_request: bool,
        client: &mut TcpStream,
    ) -> Result<ResponseHead, Failed> {
        let mut answered = false;
        loop {
            if !self.upstream_bytes.is_empty() {
                match ResponseHead::parse(&self.upstream_bytes, head_request) {
                    Parse::Partial => {}
                    Parse::Invalid => return Err(Failed::Malformed),
                    Parse::Done(r) if r.status == 101 => {
                        // Upgrades never take this path: switching unasked is a broken upstream.
                        return Err(Failed::Malformed);
                    }
                    Parse::Done(r) if r.status < 200 => {
                        let mut interim = Vec::new();
                        r.write_client(&self.upstream_bytes, false, &mut interim);
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

/// The connection's deadline (a head within [`HEAD_TIMEOUT`], a response within the upstream
/// timeout) on one timer for its whole life. Setting a deadline reads the clock and no more: the
/// timer stays armed for an earlier moment and, when it fires before the deadline, re-arms for
/// it, so a connection touches the timer wheel about once per deadline length rather than twice
/// per request.
struct Deadline {
    at: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new() -> Self {
        let at = tokio::time::Instant::now() + HEAD_TIMEOUT;
        Self {
            at,
            timer: Box::pin(tokio::time::sleep_until(at)),
        }
    }

    /// The deadline is `after` from now.
    fn set(&mut self, after: Duration) {
        self.at = tokio::time::Instant::now() + after;
        if self.at < self.timer.deadline() {
            self.timer.as_mut().reset(self.at);
        }
    }

    /// Resolves once the deadline has passed.
    async fn expired(&mut self) {
        loop {
            self.timer.as_mut().await;
            if tokio::time::Instant::now() >= self.at {
                return;
            }
            self.timer.as_mut().reset(self.at);
        }
    }
}
