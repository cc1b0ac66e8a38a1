//! Upstreams for proxy tests, on real sockets at 127.0.0.1: Harbor's own echo backends, an HTTP
//! server whose health can be switched, a TCP server that answers only after the client's
//! end of stream, and a WebSocket echo server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::proxies::{Driven, bodies};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An address that refuses connections for as long as this lives: a socket bound to it that
/// never listens. A port that is merely closed can be taken by another test's listener, or be
/// picked as the source port of a connection to it, which then connects to itself (a 504 where
/// a refusal was expected, seen in CI).
pub struct Refusing {
    pub addr: SocketAddr,
    _held: socket2::Socket,
}

impl Refusing {
    pub fn bind() -> Refusing {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("a bound address");
        Refusing {
            addr,
            _held: socket,
        }
    }
}

/// A backend that can be killed (its port then refuses connections) and started again.
pub struct Backend {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Backend {
    /// Harbor's echo backend on a free port.
    pub async fn echo() -> Backend {
        Self::echo_on("127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn echo_on(addr: SocketAddr) -> Backend {
        let listener = harbor::echo::bind(&[addr])
            .await
            .expect("echo binds")
            .remove(0);
        let addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        tokio::spawn(harbor::echo::serve(listener, stop.clone()));
        Backend { addr, stop }
    }

    /// Stops listening and closes its connections.
    pub fn kill(&self) {
        self.stop.cancel();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An HTTP backend: `/healthz` answers 200 or 503 as switched; `/slow` answers after
/// `slow`; `/hang` never answers; anything else says who served it.
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub healthy: Arc<AtomicBool>,
    /// `/slow` requests that have arrived.
    pub slow_arrived: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl HttpBackend {
    pub async fn start(slow: Duration) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let healthy = Arc::new(AtomicBool::new(true));
        let slow_arrived = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (h, s, arrived) = (healthy.clone(), stop.clone(), slow_arrived.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => a.expect("accept"),
                    () = s.cancelled() => return,
                };
                let (h, arrived) = (h.clone(), arrived.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<_>| {
                        let (h, arrived) = (h.clone(), arrived.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            let (status, body) = match path.as_str() {
                                "/healthz" if h.load(Ordering::SeqCst) => (200, "ok".to_owned()),
                                "/healthz" => (503, "sick".to_owned()),
                                "/slow" => {
                                    arrived.fetch_add(1, Ordering::SeqCst);
                                    tokio::time::sleep(slow).await;
                                    (200, format!("slow from {addr}"))
                                }
                                "/hang" => {
                                    std::future::pending::<()>().await;
                                    unreachable!()
                                }
                                _ => (200, format!("served by {addr}")),
                            };
                            let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(status).expect("status");
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HttpBackend {
            addr,
            healthy,
            slow_arrived,
            stop,
        }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A TCP server that reads until the client's end of stream, then answers with what it got
/// reversed: it can only answer if the proxy passes the client's half-close on.
pub async fn reverser() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.expect("accept");
            tokio::spawn(async move {
                let mut got = Vec::new();
                if stream.read_to_end(&mut got).await.is_ok() {
                    got.reverse();
                    let _ = stream.write_all(&got).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

/// A WebSocket server that echoes every message.
pub async fn websocket_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Drives the health-check scenario through `proxy`: both upstreams serve, then `b` fails its
/// check and gets no more requests, then recovers and serves again.
pub async fn health_checks_hold_out_a_failing_upstream<P: Driven>(
    proxy: &P,
    host: &str,
    a: &HttpBackend,
    b: &HttpBackend,
) {
    let (served_a, served_b) = (
        format!("served by {}", a.addr),
        format!("served by {}", b.addr),
    );
    let addr = proxy.listen_addr();
    let within = Duration::from_secs(10);
    // Until the route is in place, requests may fail.
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let mut seen = std::collections::HashSet::new();
    while !(seen.contains(&served_a) && seen.contains(&served_b)) {
        assert!(
            started.elapsed() < within,
            "{host}: both upstreams never served through {}: {seen:?}",
            P::NAME
        );
        if let Some((200, body)) = super::proxies::through(&client, addr, host, "/").await {
            seen.insert(body);
        }
    }
    b.healthy.store(false, Ordering::SeqCst);
    let started = std::time::Instant::now();
    loop {
        // Twenty requests in a row to `a` alone: round-robin would alternate if `b` were in.
        let seen = bodies(addr, host, 20).await;
        if seen.iter().all(|s| *s == served_a) {
            break;
        }
        assert!(
            started.elapsed() < within,
            "{host}: {} kept sending to the failing upstream",
            P::NAME
        );
    }
    b.healthy.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    loop {
        if bodies(addr, host, 10).await.contains(&served_b) {
            break;
        }
        assert!(
            started.elapsed() < within,
            "{host}: the recovered upstream never came back through {}",
            P::NAME
        );
    }
}
