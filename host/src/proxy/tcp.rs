//! The L4 TCP proxy: one listener per `tcp` route, reconciled with every routing snapshot. A
//! route that goes away stops accepting while its open connections drain; each connection goes
//! to an upstream chosen by the route's strategy, with caps per route and overall.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::plugins::Outcome;

use super::choose::{choose, client_key};
use super::copy::{self, End, Tally};
use super::metrics::ErrorKind;
use super::splice;
use super::{Shared, accept_backoff};

/// How often a listener that could not bind tries again.
const REBIND_EVERY: Duration = Duration::from_secs(2);

/// Runs a listener for every tcp route until `stop`.
pub async fn supervise(shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.routing.subscribe();
    let mut listening: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    loop {
        changes.borrow_and_update();
        let snapshot = shared.routing.snapshot();
        listening.retain(|addr, token| {
            let keep = snapshot.tcp.contains_key(addr) && !token.is_cancelled();
            if !keep {
                token.cancel();
            }
            keep
        });
        let mut unbound = false;
        for (addr, route) in &snapshot.tcp {
            if listening.contains_key(addr) {
                continue;
            }
            match bind(*addr) {
                Ok(listener) => {
                    tracing::info!(service = %route.name, %addr, "TCP proxy listening");
                    let token = stop.child_token();
                    tokio::spawn(accept(shared.clone(), listener, *addr, token.clone()));
                    listening.insert(*addr, token);
                }
                Err(e) => {
                    unbound = true;
                    tracing::warn!(service = %route.name, %addr, error = %e, "cannot listen for a tcp route; retrying");
                }
            }
        }
        let retry = async {
            if unbound {
                tokio::time::sleep(REBIND_EVERY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            () = retry => {}
            () = stop.cancelled() => break,
        }
    }
    for token in listening.into_values() {
        token.cancel();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit these from the listener on Linux: no system calls per client.
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&keepalive())?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept(
    shared: Arc<Shared>,
    listener: TcpListener,
    addr: SocketAddr,
    stop: CancellationToken,
) {
    let open_here = Arc::new(AtomicUsize::new(0));
    let mut failures = 0u32;
    loop {
        let (client, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    failures = 0;
                    conn
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(%addr, error = %e, "TCP proxy cannot accept; retrying");
                    accept_backoff(failures, &stop).await;
                    continue;
                }
            },
            () = stop.cancelled() => {
                tracing::info!(%addr, "TCP proxy stopped listening");
                return;
            }
        };
        let Some(route) = shared.routing.snapshot().tcp.get(&addr).cloned() else {
            continue;
        };
        let service = route.name.as_str();
        let cap = route
            .options
            .max_connections
            .map_or(usize::MAX, |n| n as usize);
        let Some(slots) = Slots::take(
            (&shared.tcp_open, shared.settings.max_connections),
            (&open_here, cap),
        ) else {
            shared.metrics.error(service, ErrorKind::OverCapacity);
            tracing::warn!(service, %peer, "connection closed: too many in flight");
            drop(client);
            continue;
        };
        let open = shared.conns.open();
        let shared = shared.clone();
        tokio::spawn(async move {
            relay(&shared, &route, client, peer).await;
            drop(slots);
            drop(open);
        });
    }
}

/// A connection's place under the global and the per-route cap.
struct Slots(Arc<AtomicUsize>, Arc<AtomicUsize>);

impl Slots {
    /// Takes a place under both caps, or none when either is full.
    fn take(global: (&Arc<AtomicUsize>, usize), route: (&Arc<AtomicUsize>, usize)) -> Option<Self> {
        // Count first and check after, so that two listeners racing cannot both squeeze in.
        let slots = Self(global.0.clone(), route.0.clone());
        let g = global.0.fetch_add(1, Ordering::AcqRel);
        let r = route.0.fetch_add(1, Ordering::AcqRel);
        (g < global.1 && r < route.1).then_some(slots)
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Finds peers that vanished without a FIN (a crashed host, a dropped NAT entry).
fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
}

fn keep_alive(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive());
}

async fn relay(
    shared: &Arc<Shared>,
    route: &crate::routing::ServiceRoute,
    client: TcpStream,
    peer: SocketAddr,
) {
    let service = route.name.as_str();
    let chosen = choose(
        shared,
        route,
        Some(client_key(peer.ip())),
        |address| async move { TcpStream::connect(&*address).await },
    )
    .await;
    let chosen = match chosen {
        Ok(chosen) => chosen,
        Err(failure) => {
            shared.metrics.error(service, failure.kind());
            tracing::warn!(service, %peer, ?failure, "connection closed: no upstream");
            return;
        }
    };
    let _ = chosen.conn.set_nodelay(true);
    let metrics = chosen.metrics.clone();
    metrics.connections.inc();
    let flight = super::body::Flight::new(chosen.picked.start(), metrics.in_flight.clone());
    let upstream = chosen.picked.backend().address.clone();
    tracing::debug!(service, %peer, %upstream, "TCP connection");
    let started = Instant::now();
    let tally = Tally {
        inbound: &metrics.bytes_in,
        outbound: &metrics.bytes_out,
    };
    let (idle, cut) = (shared.settings.tcp_idle_timeout, &shared.conns.cut);
    let end = if shared.settings.splice {
        // Keepalive finds peers that vanished under a connection that lives long; keepalive's
        // first probe comes after a minute of silence anyway, so the upstream socket gets it
        // once the connection has lived that long: three system calls fewer for every short
        // connection. (The client's socket inherits it from the listener at no cost.)
        let upstream = &chosen.conn;
        splice::duplex(&client, upstream, idle, cut, tally, || keep_alive(upstream)).await
    } else {
        keep_alive(&chosen.conn);
        copy::duplex(client, chosen.conn, idle, cut, tally).await
    };
    let elapsed = started.elapsed();
    metrics.duration.observe(elapsed.as_secs_f64());
    let outcome = match &end {
        End::Idle => {
            shared.metrics.error(service, ErrorKind::IdleTimeout);
            Outcome::Timeout
        }
        End::Failed(why) => {
            tracing::debug!(service, %peer, %upstream, error = %why, "TCP connection failed");
            Outcome::Success
        }
        End::Closed | End::Cut => Outcome::Success,
    };
    // A connection's lifetime says nothing about the upstream's speed; its connect time does,
    // so that is what latency-aware strategies (peak-EWMA) learn from.
    route
        .balancer
        .done(&chosen.picked, outcome, chosen.connect_time);
    tracing::debug!(service, %peer, %upstream, ?end, "TCP connection closed");
    drop(flight);
}
