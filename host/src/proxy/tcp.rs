//! The L4 TCP proxy: listeners for each `tcp` route, reconciled with every routing snapshot. A
//! route that goes away stops accepting while its open connections drain; each connection goes
//! to an upstream chosen by the route's strategy, with caps per route and overall.
//!
//! A route listens once per lane (`SO_REUSEPORT`: the kernel spreads new connections over the
//! lanes' sockets by their addresses), and each lane accepts, relays and closes its connections
//! on its own thread, as HAProxy's threads do; a lane that serves clearly more than another
//! hands it the connections it accepts ([`super::spread`]). On one multi-threaded runtime the
//! same work cost more CPU per connection than HAProxy's; on the lanes it does not (see
//! host/benches/README.md, Proxy throughput).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::{SockRef, TcpKeepalive};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::descriptors::Admission;
use crate::plugins::Outcome;
use crate::routing::{ServiceRoute, SniTable};

use super::choose::{choose, client_key};
use super::copy::{self, End, Tally};
use super::dial::{self, dial};
use super::lanes::{Job, Lanes, Task};
use super::metrics::ErrorKind;
use super::splice;
use super::spread::{self, Loads};
use super::{Shared, TcpCarriage, accept_backoff};
use crate::backoff::Backoff;

/// Waits between tries of a listener that could not bind: short at first, since a port a swap
/// hands back is freed within moments of the other proxy letting go.
const REBIND: Backoff = Backoff::new(Duration::from_millis(25), Duration::from_secs(2));

/// How long closing listeners may take to let go of their sockets.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// A route's listeners: their stop, and the sockets still open.
struct Listening {
    stop: CancellationToken,
    sockets: TaskTracker,
}

/// Runs the listeners of every tcp route while `carriage` says Harbor carries them, until
/// `stop`, on the lanes when there are some.
pub async fn supervise(
    shared: Arc<Shared>,
    lanes: Option<Arc<Lanes>>,
    carriage: TcpCarriage,
    stop: CancellationToken,
) {
    let mut changes = shared.routing.subscribe();
    let mut wanted = carriage.wanted();
    let count = lanes.as_ref().map_or(1, |l| l.count());
    let loads = Arc::new(Loads::new(count));
    let mut listening: HashMap<SocketAddr, Listening> = HashMap::new();
    // Routes whose address could not be bound, reported once until they can be.
    let mut failing: HashMap<SocketAddr, crate::model::ServiceName> = HashMap::new();
    let mut failures = 0u32;
    loop {
        changes.borrow_and_update();
        let carrying = *wanted.borrow_and_update();
        let snapshot = shared.routing.snapshot();
        let routed =
            |addr: &SocketAddr| snapshot.tcp.contains_key(addr) || snapshot.sni.contains_key(addr);
        // A route gone, or handed to another proxy, has nothing left to report.
        failing.retain(|addr, name| {
            let keep = carrying && routed(addr);
            if !keep {
                (shared.listen_report)(name, None);
            }
            keep
        });
        let mut closing = Vec::new();
        listening.retain(|addr, l| {
            let keep = carrying && routed(addr) && !l.stop.is_cancelled();
            if !keep {
                tracing::info!(%addr, "TCP proxy stopped listening");
                l.stop.cancel();
                closing.push(l.sockets.clone());
            }
            keep
        });
        // Closed before anything is reported: the proxy that takes the ports over binds next.
        for sockets in closing {
            sockets.close();
            if tokio::time::timeout(CLOSE_WITHIN, sockets.wait())
                .await
                .is_err()
            {
                tracing::warn!("a TCP listener did not close in time");
            }
        }
        let mut unbound = false;
        for (addr, name, unservable) in listeners_wanted(&shared, &snapshot, carrying) {
            if listening.contains_key(&addr) {
                continue;
            }
            if let Some(why) = unservable {
                if failing.insert(addr, name.clone()).is_none() {
                    tracing::warn!(service = %name, %addr, reason = %why, "cannot serve a tcp route");
                    (shared.listen_report)(&name, Some(why));
                }
                continue;
            }
            let (addr, route) = (&addr, &name);
            match bind(*addr, count) {
                Ok(listeners) => {
                    tracing::info!(service = %route, %addr, listeners = listeners.len(), "TCP proxy listening");
                    if failing.remove(addr).is_some() {
                        (shared.listen_report)(route, None);
                    }
                    let l = Listening {
                        stop: stop.child_token(),
                        sockets: TaskTracker::new(),
                    };
                    // One count of open connections for the route, whichever lane holds them.
                    let open_here = Arc::new(AtomicUsize::new(0));
                    for (lane, listener) in listeners.into_iter().enumerate() {
                        let spread = Spread {
                            lanes: lanes.clone(),
                            loads: loads.clone(),
                        };
                        let (shared, open_here, token, addr) =
                            (shared.clone(), open_here.clone(), l.stop.clone(), *addr);
                        let socket = l.sockets.token();
                        let task: Task = Box::new(move || {
                            Box::pin(accept(
                                shared, listener, socket, addr, open_here, spread, token,
                            ))
                        });
                        let refused = match &lanes {
                            Some(lanes) => lanes.run_on(lane, task),
                            None => Err(task),
                        };
                        if let Err(task) = refused {
                            tokio::spawn(task());
                        }
                    }
                    listening.insert(*addr, l);
                }
                Err(e) => {
                    unbound = true;
                    if failing.insert(*addr, route.clone()).is_none() {
                        tracing::warn!(service = %route, %addr, error = %e, "cannot listen for a tcp route; retrying");
                        (shared.listen_report)(
                            route,
                            Some(format!("cannot listen on {addr}: {e}")),
                        );
                    }
                }
            }
        }
        failures = if unbound { failures + 1 } else { 0 };
        carriage.reached((!unbound).then_some(carrying));
        let retry = async {
            if unbound {
                tokio::time::sleep(REBIND.after(failures)).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            changed = wanted.changed() => {
                if changed.is_err() { break }
                failures = 0;
            }
            () = retry => {}
            () = stop.cancelled() => break,
        }
    }
    for (addr, l) in listening {
        tracing::info!(%addr, "TCP proxy stopped listening");
        l.stop.cancel();
    }
}

/// The addresses Harbor's tcp routes want listened on (none when another proxy carries them),
/// each with the service a failure is reported against, and why it cannot be served at all, if
/// it cannot.
fn listeners_wanted(
    shared: &Shared,
    snapshot: &crate::routing::Snapshot,
    carrying: bool,
) -> Vec<(SocketAddr, crate::model::ServiceName, Option<String>)> {
    if !carrying {
        return Vec::new();
    }
    let plain = snapshot.tcp.iter().map(|(addr, route)| {
        let unservable = (route.terminates_tls() && shared.tls.is_none()).then(|| {
            "TLS for a tcp service needs Harbor's certificates, which it keeps with --tls-listen (or, driving Caddy, --caddy-tls-listen)".to_owned()
        });
        (*addr, route.name.clone(), unservable)
    });
    // A failure on an address several services share is reported against the first by name.
    let passthrough = snapshot
        .sni
        .iter()
        .filter_map(|(addr, table)| Some((*addr, table.services.first()?.clone(), None)));
    plain.chain(passthrough).collect()
}

/// Whether Harbor could listen on `addr` now: the address is local, the port permitted and
/// not held by another listener. Checked before each bind and before a tcp registration is
/// accepted. Harbor's own sockets share their port (`SO_REUSEPORT`), and so may another
/// process's that asks the same (Envoy's, by default): a plain bind, which no listener on the
/// port lets through, tells first.
pub fn can_listen(addr: SocketAddr) -> std::io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("another process listens on {addr} ({e})"))
    })
}

/// `count` listening sockets on `addr`, sharing it through `SO_REUSEPORT` when there are
/// several (all or none).
fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    can_listen(addr)?;
    let first = listen(addr, count > 1)?;
    // A route on port 0 gets its port from the first socket, and the others share it.
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(listen(addr, true)?);
    }
    Ok(listeners)
}

fn listen(addr: SocketAddr, shared_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if shared_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit these from the listener on Linux: no system calls per client.
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&keepalive())?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The lanes, for an accept loop to hand connections to.
struct Spread {
    lanes: Option<Arc<Lanes>>,
    loads: Arc<Loads>,
}

/// Accepts on one of a route's listeners until `stop`, then waits for the connections it
/// accepted: a lane runs as long as its tasks do.
async fn accept(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    socket: TaskTrackerToken,
    addr: SocketAddr,
    open_here: Arc<AtomicUsize>,
    spread: Spread,
    stop: CancellationToken,
) {
    // The lane this loop runs on (0-based); none when there are no lanes to hand over to.
    let this_lane = spread
        .lanes
        .as_ref()
        .and(super::lanes::current().checked_sub(1));
    // SAFETY: the listener owns its descriptor, which stays open until the listener drops.
    let registered = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) };
    let listener = match registered {
        Ok(listener) => listener,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "TCP proxy cannot take its listener");
            return;
        }
    };
    // A tracker rather than a `JoinSet`: a set wakes this loop once more for every connection
    // that ends, only to forget it; the tracker just counts them for the drain at the end.
    let relays = TaskTracker::new();
    let mut changes = shared.routing.subscribe();
    let mut here: Option<Arc<Lane>> = None;
    // The route's token is shared by every lane: waiting on it once, not once per connection,
    // keeps the lanes off its lock.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let mut failures = 0u32;
    loop {
        let (client, peer) = tokio::select! {
            accepted = spread::accept(&listener) => match accepted {
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
            () = &mut stopped => {
                drop(listener);
                drop(socket);
                relays.close();
                relays.wait().await;
                return;
            }
        };
        if here.is_none() || changes.has_changed().unwrap_or(false) {
            changes.borrow_and_update();
            here = Target::at(&shared, addr).map(|target| {
                Arc::new(Lane {
                    shared: shared.clone(),
                    target,
                    open_here: open_here.clone(),
                    loads: spread.loads.clone(),
                    cut: shared.conns.cut.child_token(),
                })
            });
        }
        let Some(lane) = &here else {
            continue;
        };
        let serving = this_lane.map_or(0, |here| spread.loads.choose(here));
        let Some(admitted) = Admitted::take(lane, serving) else {
            let service = lane.target.name();
            lane.shared.metrics.error(service, ErrorKind::OverCapacity);
            tracing::warn!(service, %peer, "connection closed: too many in flight");
            drop(client);
            continue;
        };
        // Boxed once here: the relay's state is several KiB, and the tracker and the task
        // would each move it again on the way to the heap.
        let serve = move |client: TcpStream| -> Pin<Box<dyn Future<Output = ()> + Send>> {
            Box::pin(async move {
                serve_connection(&admitted.lane, client, peer).await;
                drop(admitted);
            })
        };
        let client = match (&spread.lanes, this_lane) {
            (Some(lanes), Some(here)) if serving != here => {
                // Tracked by this loop all the same, so that its drain waits for it.
                let tracker = relays.clone();
                let job: Job =
                    Box::new(move |client| Box::pin(tracker.track_future(serve(client))));
                match lanes.hand_to(serving, client, peer, job) {
                    Ok(()) => continue,
                    // That lane is gone (it panicked): this one serves the connection.
                    Err((client, job)) => {
                        if let Some(client) = register(client, peer) {
                            tokio::spawn(job(client));
                        }
                        continue;
                    }
                }
            }
            _ => client,
        };
        if let Some(client) = register(client, peer) {
            relays.spawn(serve(client));
        }
    }
}

/// Registers an accepted connection with this thread's reactor; a connection that cannot be
/// registered is closed.
fn register(client: std::net::TcpStream, peer: SocketAddr) -> Option<TcpStream> {
    TcpStream::from_std(client)
        .inspect_err(|e| tracing::warn!(%peer, error = %e, "TCP proxy cannot take a connection"))
        .ok()
}

/// What a lane's connections to one route share, as of the route's last change. Each connection
/// holds it by one count that only this lane touches, where a count on each shared part would
/// move their cache lines between the cores at every connection.
struct Lane {
    shared: Arc<Shared>,
    target: Target,
    /// The route's connections in flight, across its lanes.
    open_here: Arc<AtomicUsize>,
    /// Every lane's connections in flight, across routes.
    loads: Arc<Loads>,
    /// The shutdown's cut, as a child of its own so that this lane's connections wait on it
    /// apart from other lanes'.
    cut: CancellationToken,
}

/// What a listen address serves.
enum Target {
    /// One service, its connections relayed as they come.
    Route(Arc<ServiceRoute>),
    /// One service whose TLS Harbor terminates, with the acceptor that holds its certificate.
    Terminated(Arc<ServiceRoute>, tokio_rustls::TlsAcceptor),
    /// TLS passthrough services, chosen by the name each connection's hello asks for.
    Sni(Arc<SniTable>),
}

impl Target {
    /// What `addr` serves as of the routing table's latest snapshot.
    fn at(shared: &Shared, addr: SocketAddr) -> Option<Self> {
        let snapshot = shared.routing.snapshot();
        if let Some(table) = snapshot.sni.get(&addr) {
            return Some(Target::Sni(table.clone()));
        }
        let route = snapshot.tcp.get(&addr)?.clone();
        if !route.terminates_tls() {
            return Some(Target::Route(route));
        }
        // Without Harbor's certificates the address is not listened on at all (see
        // `listeners_wanted`); this covers a listener that has yet to stop.
        let front = shared.tls.as_ref()?;
        let acceptor = super::secure::tcp_acceptor(front, &route)?;
        Some(Target::Terminated(route, acceptor))
    }

    /// The service named in metrics and logs before a connection is routed.
    fn name(&self) -> &str {
        match self {
            Target::Route(route) | Target::Terminated(route, _) => route.name.as_str(),
            Target::Sni(table) => table.services.first().map_or("", |n| n.as_str()),
        }
    }

    fn max_connections(&self) -> usize {
        match self {
            Target::Route(route) | Target::Terminated(route, _) => route
                .options
                .max_connections
                .map_or(usize::MAX, |n| n as usize),
            // Shared by several services: only the door's caps hold.
            Target::Sni(_) => usize::MAX,
        }
    }
}

/// Serves one admitted connection: handshaken first where Harbor terminates its TLS, routed by
/// its hello where services share the address, then relayed.
async fn serve_connection(lane: &Lane, mut client: TcpStream, peer: SocketAddr) {
    let shared = &lane.shared;
    let within = shared.settings.header_timeout;
    match &lane.target {
        Target::Route(route) => {
            relay(
                shared,
                route,
                Inbound::Plain(client, Vec::new()),
                peer,
                &lane.cut,
            )
            .await;
        }
        Target::Terminated(route, acceptor) => {
            let Some(tls) = super::secure::handshake(shared, acceptor, client, peer, within).await
            else {
                return;
            };
            relay(shared, route, Inbound::Tls(Box::new(tls)), peer, &lane.cut).await;
        }
        Target::Sni(table) => {
            let (hello, name) = match super::sni::read_hello(&mut client, within).await {
                Ok(read) => read,
                Err(why) => {
                    shared
                        .metrics
                        .error(lane.target.name(), ErrorKind::BadRequest);
                    tracing::debug!(%peer, ?why, "TLS passthrough: no usable ClientHello");
                    return;
                }
            };
            let Some(route) = name.as_deref().and_then(|n| table.names.find(n, "/")) else {
                shared.metrics.error(lane.target.name(), ErrorKind::NoRoute);
                tracing::debug!(%peer, name = name.as_deref().unwrap_or(""), "TLS passthrough: no service for the name asked for");
                return;
            };
            relay(
                shared,
                route,
                Inbound::Plain(client, hello),
                peer,
                &lane.cut,
            )
            .await;
        }
    }
}

/// A client connection as the relay gets it.
enum Inbound {
    /// Its bytes as sent, with those already read (a passthrough hello) for the upstream first.
    Plain(TcpStream, Vec<u8>),
    /// Decrypted by Harbor.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A connection's place under the tcp routes' door (`--max-connections` and the descriptors)
/// and the route's own cap, in the open count that shutdown drains, and in the load of the
/// lane that serves it.
struct Admitted {
    lane: Arc<Lane>,
    serving: usize,
    _admission: Admission,
}

impl Admitted {
    /// Takes a place under every cap, or none when one is full.
    fn take(lane: &Arc<Lane>, serving: usize) -> Option<Self> {
        let shared = &lane.shared;
        let admission = shared.tcp_door.admit().ok()?;
        let cap = lane.target.max_connections();
        // Count first and check after, so that two listeners racing cannot both squeeze in.
        let r = lane.open_here.fetch_add(1, Ordering::AcqRel);
        shared.conns.enter();
        lane.loads.enter(serving);
        let admitted = Self {
            lane: lane.clone(),
            serving,
            _admission: admission,
        };
        (r < cap).then_some(admitted)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let lane = &self.lane;
        lane.open_here.fetch_sub(1, Ordering::AcqRel);
        lane.shared.conns.leave();
        lane.loads.leave(self.serving);
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
    route: &ServiceRoute,
    client: Inbound,
    peer: SocketAddr,
    cut: &CancellationToken,
) {
    let service = route.name.as_str();
    // Splicing moves bytes between sockets in the kernel: not for bytes Harbor decrypts.
    let splice = shared.settings.splice && matches!(client, Inbound::Plain(..));
    let chosen = choose(
        shared,
        route,
        Some(client_key(peer.ip())),
        // Only the splice relay tells when the client is silent, which the held-back ACK needs.
        |address| async move { dial(&address, splice).await },
    )
    .await;
    let mut chosen = match chosen {
        Ok(chosen) => chosen,
        Err(failure) => {
            shared.metrics.error(service, failure.kind());
            tracing::warn!(service, %peer, ?failure, "connection closed: no upstream");
            return;
        }
    };
    let metrics = &chosen.metrics;
    metrics.connections.inc();
    let flight = super::body::Flight::new(chosen.picked.start(), metrics.in_flight.clone());
    let upstream = &*chosen.address;
    tracing::debug!(service, %peer, upstream, "TCP connection");
    let started = Instant::now();
    let tally = Tally {
        inbound: &metrics.bytes_in,
        outbound: &metrics.bytes_out,
    };
    let idle = shared.settings.tcp_idle_timeout;
    let (client, first) = match client {
        Inbound::Plain(client, first) => (Ok(client), first),
        Inbound::Tls(tls) => (Err(tls), Vec::new()),
    };
    if !first.is_empty() {
        use tokio::io::AsyncWriteExt as _;
        if let Err(e) = chosen.conn.write_all(&first).await {
            tracing::debug!(service, %peer, upstream, error = %e, "TCP connection failed");
            route
                .balancer
                .done(&chosen.picked, Outcome::Success, chosen.connect_time);
            return;
        }
    }
    let end = match client {
        Ok(client) if splice => {
            // Keepalive finds peers that vanished under a connection that lives long; keepalive's
            // first probe comes after a minute of silence anyway, so the upstream socket gets it
            // once the connection has lived that long: three system calls fewer for every short
            // connection. (The client's socket inherits it from the listener at no cost.)
            let conn = &chosen.conn;
            let long_lived = || keep_alive(conn);
            // The upstream's handshake ACK was held back for the client's first bytes; a client that
            // has sent none may be waiting for the server to speak (SMTP, SSH), so it goes now.
            let silent = || dial::send_ack_now(conn);
            splice::duplex(&client, conn, idle, cut, tally, long_lived, silent).await
        }
        Ok(client) => {
            keep_alive(&chosen.conn);
            copy::duplex(client, chosen.conn, idle, cut, tally).await
        }
        Err(tls) => {
            keep_alive(&chosen.conn);
            copy::duplex(tls, chosen.conn, idle, cut, tally).await
        }
    };
    let elapsed = started.elapsed();
    metrics.duration.observe(elapsed.as_secs_f64());
    let outcome = match &end {
        End::Idle => {
            shared.metrics.error(service, ErrorKind::IdleTimeout);
            Outcome::Timeout
        }
        End::Failed(why) => {
            tracing::debug!(service, %peer, upstream, error = %why, "TCP connection failed");
            Outcome::Success
        }
        End::Closed | End::Cut => Outcome::Success,
    };
    // A connection's lifetime says nothing about the upstream's speed; its connect time does,
    // so that is what latency-aware strategies (peak-EWMA) learn from.
    route
        .balancer
        .done(&chosen.picked, outcome, chosen.connect_time);
    tracing::debug!(service, %peer, upstream, ?end, "TCP connection closed");
    drop(flight);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_route_listens_once_per_lane_on_one_port_and_each_socket_accepts() {
        let listeners = bind("127.0.0.1:0".parse().expect("addr"), 2).expect("bind");
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").port())
            .collect();
        assert_eq!(
            ports[0], ports[1],
            "the second socket shares the first one's port"
        );
        let addr = listeners[0].local_addr().expect("addr");
        // The port is the route's: a socket that does not share it cannot take it.
        assert!(listen(addr, false).is_err());
        let listeners: Vec<TcpListener> = listeners
            .into_iter()
            .map(|l| TcpListener::from_std(l).expect("listener"))
            .collect();
        // The kernel picks a socket per connection; enough connections reach both.
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut accepted = [0usize; 2];
        for (i, listener) in listeners.iter().enumerate() {
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
            {
                accepted[i] += 1;
            }
        }
        assert_eq!(accepted[0] + accepted[1], 64);
        assert!(accepted.iter().all(|&n| n > 0), "{accepted:?}");
    }
}
