//! The embedded HTTP reverse proxy: HTTP/1.1 and HTTP/2 (cleartext) from clients, HTTP/1.1 over
//! pooled keep-alive connections to upstreams, upgrades (WebSocket and others) tunnelled. Each
//! connection starts on the direct HTTP/1.1 path ([`super::h1`]) and comes to the full stack
//! here (hyper) at its first request that path does not take. hyper reads HTTP/1 through
//! [`Gate`], so that both paths hold the one policy ([`super::policy`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::plugins::Outcome;
use crate::routing::ServiceRoute;

use super::body::{BoxError, ClientBody, Flight, Loan, ResponseBody, Stall, UpstreamBody, text};
use super::choose::{choose, request_key};
use super::copy::{self, Tally};
use super::gate::{ClientLimits, Clients, Gate};
use super::headers::{add_forwarded, append_via, strip_hop_by_hop, upgrade_of};
use super::lanes::{Job, Lanes};
use super::metrics::ErrorKind;
use super::policy::Answer;
use super::pool;
use super::wire::H2_PREFACE;
use super::{Shared, accept_backoff};

/// The full stack's settings, shared by the plain and TLS listeners.
pub(super) fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(hyper_util::rt::TokioTimer::new());
    // The gate holds the client to its time limits, answering as the direct path does; hyper's
    // own head timer would close the connection without a word.
    builder.http1().header_read_timeout(None::<Duration>);
    // The gate ends the client's side where the policy refuses; the response in progress is
    // still written, then the refusal's answer.
    builder.http1().half_close(true);
    builder
}

/// Accepts until `stop`, serving each connection on its own task in one of the lanes.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    lanes: Option<Arc<Lanes>>,
    stop: CancellationToken,
) {
    // Shared: each connection holds its settings for as long as it lives.
    let builder = Arc::new(builder());
    let serve = move |shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr| {
        let builder = builder.clone();
        async move {
            if shared.settings.direct_http1 {
                let full =
                    |stream, read| serve_full(shared.clone(), stream, read, peer, builder, false);
                super::h1::serve(shared.clone(), stream, peer, full).await;
            } else {
                Box::pin(serve_full(
                    shared,
                    stream,
                    Bytes::new(),
                    peer,
                    builder,
                    false,
                ))
                .await;
            }
        }
    };
    accept(shared, listener, lanes, stop, "HTTP", serve).await;
}

/// Accepts clients on `listener` until `stop`: each one admitted by the HTTP door (past
/// `--max-http-connections` or the descriptors set aside for connections, closed at once, and
/// counted by the door) and served by `serve` on its own task in one of the lanes. `what` names
/// the listener in logs.
pub(super) async fn accept<F, Fut>(
    shared: Arc<Shared>,
    listener: TcpListener,
    lanes: Option<Arc<Lanes>>,
    stop: CancellationToken,
    what: &'static str,
    serve: F,
) where
    F: Fn(Arc<Shared>, TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                failures = 0;
                conn
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "{what} proxy cannot accept; retrying");
                accept_backoff(failures, &stop).await;
                continue;
            }
        };
        let Ok(admission) = shared.http_door.admit() else {
            tracing::debug!(%peer, "{what} connection refused: too many open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open = shared.conns.open();
        let (shared, serve) = (shared.clone(), serve.clone());
        let job: Job = Box::new(move |stream: TcpStream| {
            Box::pin(async move {
                serve(shared, stream, peer).await;
                drop(open);
                drop(admission);
            })
        });
        match &lanes {
            Some(lanes) => lanes.hand(stream, peer, job),
            None => {
                tokio::spawn(job(stream));
            }
        }
    }
}

/// Serves one client connection through the full HTTP stack (hyper): HTTP/1.x and h2 (over
/// TLS by ALPN, in cleartext by its preface), upgrades, until the connection or the proxy ends.
/// `read`: bytes already read from it; `secure`: it came over TLS.
///
/// The gate holds HTTP/1 to its time limits, and an HTTP/2 preface to the head timeout; past the
/// preface, hyper's HTTP/2 server would hold a connection with nothing to do for ever, so one
/// with no stream open for `--keepalive-timeout` is sent a GOAWAY, and closed if it is still
/// idle that long again (see [`Streams`]).
pub(super) async fn serve_full<S>(
    shared: Arc<Shared>,
    stream: S,
    read: Bytes,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    secure: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = ClientLimits::from(&shared.settings);
    let streams = Streams::new();
    let gate = Gate::new(stream, read, Clients::new(shared.metrics.clone(), limits));
    let io = Sniff::new(gate, streams.clone());
    let service = hyper::service::service_fn(|req| {
        let shared = shared.clone();
        // Taken before the first await: from here on the stream counts as open.
        let open = (req.version() == Version::HTTP_2).then(|| streams.open());
        async move {
            let response = handle(&shared, peer, secure, req).await;
            Ok::<_, Infallible>(response.map(|body| Counted { body, _open: open }))
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = limits.keepalive_timeout;
    tokio::select! {
        _ = conn.as_mut() => return,
        () = shared.conns.finish.cancelled() => {}
        () = streams.idle(idle) => tracing::debug!(%peer, "idle HTTP/2 connection closed"),
    }
    // Finish the requests in progress, answer no more on this connection.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shared.conns.cut.cancelled() => {}
        // h2 closes an idle connection only once the client has answered the PING sent with
        // the GOAWAY: one that never does would hold it as long as it liked.
        () = streams.idle(idle) => {}
    }
}

/// A connection's HTTP/2 streams in progress, for its idle timeout: a stream is open from its
/// request's arrival until its response body is done with, sent or dropped.
struct Streams {
    state: watch::Sender<Use>,
}

#[derive(Clone, Copy, Default)]
struct Use {
    /// The client sent HTTP/2's preface: HTTP/1's limits, the gate's, no longer apply.
    http2: bool,
    open: usize,
}

impl Streams {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: watch::Sender::new(Use::default()),
        })
    }

    fn http2(&self) {
        self.state.send_modify(|u| u.http2 = true);
    }

    fn open(self: &Arc<Self>) -> StreamOpen {
        self.state.send_modify(|u| u.open += 1);
        StreamOpen(self.clone())
    }

    /// Resolves once the connection has been HTTP/2 with no stream open for `idle`; never for
    /// HTTP/1, whose idle time the gate bounds.
    async fn idle(&self, idle: Duration) {
        let mut state = self.state.subscribe();
        loop {
            // Never closed: `self` holds the sender. Were it, this would wait for ever rather
            // than spin.
            let quiet = state.wait_for(|u| u.http2 && u.open == 0).await.is_ok();
            if !quiet {
                return std::future::pending().await;
            }
            tokio::select! {
                () = tokio::time::sleep(idle) => return,
                changed = state.changed() => if changed.is_err() {
                    return std::future::pending().await;
                },
            }
        }
    }
}

/// One stream counted open in [`Streams`] while this lives.
struct StreamOpen(Arc<Streams>);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0
            .state
            .send_modify(|u| u.open = u.open.saturating_sub(1));
    }
}

/// A response body that holds its HTTP/2 stream open in [`Streams`] until it is done with.
struct Counted {
    body: ClientBody,
    _open: Option<StreamOpen>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client's side of the connection as hyper reads it, telling [`Streams`] when its first
/// bytes are HTTP/2's preface. The gate passes them only once the whole preface is there.
struct Sniff<I> {
    io: I,
    /// How much of the preface the bytes so far match; `None` once that is decided.
    matched: Option<usize>,
    streams: Arc<Streams>,
}

impl<I> Sniff<I> {
    fn new(io: I, streams: Arc<Streams>) -> Self {
        Self {
            io,
            matched: Some(0),
            streams,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Sniff<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = dst.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, dst))?;
        if let Some(matched) = this.matched {
            let new = &dst.filled()[before..];
            let want = &H2_PREFACE[matched..];
            let n = new.len().min(want.len());
            this.matched = if new[..n] != want[..n] {
                None
            } else if n == want.len() {
                this.streams.http2();
                None
            } else {
                Some(matched + n)
            };
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Sniff<I> {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The host a request is for: the URI's authority (HTTP/2, absolute-form) or the Host header.
fn host_of(req: &Request<Incoming>) -> Option<String> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str().to_owned());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
}

async fn handle(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    secure: bool,
    req: Request<Incoming>,
) -> Response<ClientBody> {
    let Some(host) = host_of(&req) else {
        shared.metrics.error("", ErrorKind::BadRequest);
        return Answer::bad_request("the request names no host").response();
    };
    if !secure && let Some(answer) = super::secure::challenge(shared, req.uri().path()) {
        return answer.response();
    }
    let snapshot = shared.routing.snapshot();
    let Some(route) = snapshot.http.find(&host, req.uri().path()).cloned() else {
        shared.metrics.error("", ErrorKind::NoRoute);
        tracing::debug!(%host, path = req.uri().path(), "no route");
        return Answer::no_route(&host, req.uri().path()).response();
    };
    drop(snapshot);
    if !secure {
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        if let Some(redirect) = super::secure::redirect(shared, &route, &host, target) {
            return redirect.response();
        }
    }
    let hsts = secure.then(|| route.tls.hsts.clone()).flatten();
    let mut response = forward(shared, &route, peer, secure, host, req).await;
    // The upstream's own policy, if it states one, stands: it knows its subdomains.
    if let Some(value) = hsts.and_then(|v| HeaderValue::try_from(v).ok()) {
        response
            .headers_mut()
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert(value);
    }
    response
}

async fn forward(
    shared: &Arc<Shared>,
    route: &Arc<ServiceRoute>,
    peer: SocketAddr,
    secure: bool,
    host: String,
    mut req: Request<Incoming>,
) -> Response<ClientBody> {
    let service = route.name.as_str();
    let pool = shared.pool.clone();
    let key = request_key(&route.options.hash_key, peer.ip(), |name| {
        req.headers()
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes())
            .collect()
    });
    let chosen = choose(shared, route, Some(key), |address| {
        let pooled = pool.checkout(&address);
        async move {
            match pooled {
                Some(sender) => Ok((sender, true)),
                None => pool::connect(&address).await.map(|s| (s, false)),
            }
        }
    })
    .await;
    let chosen = match chosen {
        Ok(chosen) => chosen,
        Err(failure) => {
            shared.metrics.error(service, failure.kind());
            return failure.answer(service).response();
        }
    };
    let address = chosen.address.clone();
    let metrics = chosen.metrics.clone();
    let flight = Flight::new(chosen.picked.start(), metrics.in_flight.clone());
    let (mut sender, mut pooled) = chosen.conn;

    let client_upgrade =
        upgrade_of(req.headers()).map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let version = req.version();
    let (mut parts, body) = req.into_parts();
    let upgrade = client_upgrade.as_ref().map(|(p, _)| p);
    rewrite_for_upstream(&mut parts, route, (peer, secure), &host, upgrade);
    let (body, body_ended) = UpstreamBody::new(body, metrics.bytes_in.clone());
    let upstream_req = Request::from_parts(parts, body);

    let started = Instant::now();
    let upstream = Upstream {
        address: &address,
        service,
        timeout: shared.settings.upstream_timeout,
    };
    let sent = upstream
        .send(&mut sender, &mut pooled, upstream_req, body_ended)
        .await;
    let elapsed = started.elapsed();
    let mut response = match sent {
        Ok(response) => response,
        Err(kind) => {
            shared.metrics.error(service, kind);
            let (outcome, answer) = match kind {
                // The client's fault, not the upstream's.
                ErrorKind::BadRequest => (
                    Outcome::Success,
                    Answer::bad_request("the request body is malformed or ended early"),
                ),
                ErrorKind::ClientTimeout => (Outcome::Success, Answer::body_timeout()),
                ErrorKind::Timeout => (Outcome::Timeout, Answer::upstream_failed(service, kind)),
                _ => (Outcome::ServerError, Answer::upstream_failed(service, kind)),
            };
            route.balancer.done(&chosen.picked, outcome, elapsed);
            return answer.response();
        }
    };
    let status = response.status();
    tracing::debug!(service, %peer, upstream = %address, status = status.as_u16(), ms = elapsed.as_secs_f64() * 1e3, "request");
    metrics.count_status(status.as_u16());
    metrics.duration.observe(elapsed.as_secs_f64());
    let outcome = if status.is_server_error() {
        Outcome::ServerError
    } else {
        Outcome::Success
    };
    route.balancer.done(&chosen.picked, outcome, elapsed);

    if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some((protocol, client_side)) = client_upgrade else {
            return Answer::bad_gateway(service, "upstream switched protocols unasked").response();
        };
        let upstream_side = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers, Some(&protocol));
        append_via(&mut parts.headers, version);
        tunnel(shared, route, client_side, upstream_side, flight, metrics);
        return Response::from_parts(parts, text(""));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, None);
    append_via(&mut parts.headers, version);
    if client_upgrade.is_some() {
        // The gate passes everything after an upgrade's head as the new protocol's; an upgrade
        // declined ends the connection rather than go on as HTTP/1 unchecked.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let loan = Loan {
        pool: shared.pool.clone(),
        address,
        sender,
    };
    let stall = Stall {
        after: shared.settings.upstream_idle_timeout,
        metrics: shared.metrics.clone(),
        route: route.clone(),
    };
    let body = ResponseBody::new(body, metrics.bytes_out.clone(), loan, flight, stall);
    Response::from_parts(parts, body.boxed_unsync())
}

/// The client's request head as the upstream gets it: hop-by-hop fields gone (but for an
/// upgrade's), forwarding fields written, the route's host, the target in origin form.
fn rewrite_for_upstream(
    parts: &mut http::request::Parts,
    route: &ServiceRoute,
    (peer, secure): (SocketAddr, bool),
    host: &str,
    upgrade: Option<&HeaderValue>,
) {
    // The gate let through only `chunked` as a transfer coding. hyper's client, told nothing,
    // would send a GET's body of unknown length as no body at all: the framing read is the
    // framing sent.
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if chunked {
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    add_forwarded(&mut parts.headers, peer.ip(), host, parts.version, secure);
    let upstream_host = route
        .options
        .upstream_host
        .as_ref()
        .map_or(host, |h| h.as_str());
    if let Ok(value) = HeaderValue::from_str(upstream_host) {
        parts.headers.insert(header::HOST, value);
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    parts.version = Version::HTTP_11;
}

/// The upstream a request goes to.
struct Upstream<'a> {
    address: &'a Arc<str>,
    service: &'a str,
    /// `--upstream-timeout`.
    timeout: Duration,
}

impl Upstream<'_> {
    /// Sends `request` on `sender` and waits for the response's head. The upstream's time runs
    /// from the end of the request (`body_ended`): an upload takes as long as it takes, each
    /// piece of it within the gate's `--body-idle-timeout`. A `pooled` connection found closed
    /// is replaced by a new one, and the request, which never left, goes again.
    async fn send(
        &self,
        sender: &mut pool::Sender,
        pooled: &mut bool,
        mut request: Request<UpstreamBody>,
        body_ended: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<Response<Incoming>, ErrorKind> {
        let (service, address) = (self.service, self.address);
        let timeout = self.timeout;
        let clock = async {
            let _ = body_ended.await;
            tokio::time::sleep(timeout).await;
        };
        tokio::pin!(clock);
        loop {
            let attempt = tokio::select! {
                attempt = sender.try_send_request(request) => attempt,
                () = &mut clock => return Err(ErrorKind::Timeout),
            };
            let mut e = match attempt {
                Ok(response) => return Ok(response),
                Err(e) => e,
            };
            match e.take_message() {
                // A fresh connection failing is the upstream's answer, not a stale socket.
                Some(unsent) if *pooled => match pool::connect(address).await {
                    Ok(fresh) => {
                        *sender = fresh;
                        *pooled = false;
                        request = unsent;
                    }
                    Err(connect) => {
                        tracing::warn!(service, upstream = %address, error = %connect, "cannot reconnect to upstream");
                        return Err(ErrorKind::Connect);
                    }
                },
                // The client's body stopped arriving, broke its framing or ended early.
                _ if e.error().is_user() && caused_by_timeout(e.error()) => {
                    return Err(ErrorKind::ClientTimeout);
                }
                _ if e.error().is_user() => return Err(ErrorKind::BadRequest),
                _ => {
                    tracing::warn!(service, upstream = %address, error = %e.error(), "upstream failed");
                    return Err(ErrorKind::Upstream);
                }
            }
        }
    }
}

/// Whether `error` comes of a client that kept the gate waiting too long.
fn caused_by_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Carries an upgraded connection both ways once client and upstream have both switched.
fn tunnel(
    shared: &Arc<Shared>,
    route: &ServiceRoute,
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    flight: Flight,
    metrics: Arc<super::metrics::UpstreamMetrics>,
) {
    let open = shared.conns.open();
    let shared = shared.clone();
    let service = route.name.clone();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(%service, error = %e, "upgrade did not complete");
                return;
            }
        };
        metrics.connections.inc();
        let tally = Tally {
            inbound: &metrics.bytes_in,
            outbound: &metrics.bytes_out,
        };
        let end = copy::duplex(
            TokioIo::new(client),
            TokioIo::new(upstream),
            shared.settings.tcp_idle_timeout,
            &shared.conns.cut,
            tally,
        )
        .await;
        tracing::debug!(%service, ?end, "upgraded connection closed");
        drop(flight);
        drop(open);
    });
}
