//! The responder's listeners: UDP and TCP on one port, kept across restarts (Caddy's
//! configuration names it), and the drain at shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::Zone;
use super::wire::{Over, answer};

/// Where the responder listened last, in the state directory.
const LAST_ADDRESS: &str = "dns-listen";

/// How long service lookups fail at shutdown before the listeners close: several of Caddy's
/// refresh intervals (100 ms), so that every cached answer runs out while its names resolve.
const DRAIN: Duration = Duration::from_millis(500);

/// Longest the drain waits for the backend driver to write Caddy's static lists.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// Longest a TCP client may take to send a query.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// The responder's sockets.
#[derive(Debug)]
pub struct Bound {
    udp: UdpSocket,
    tcp: TcpListener,
    pub addr: SocketAddr,
}

/// Binds the responder on `wanted` (`--dns-listen`; an address that cannot be bound is an
/// error), else where it listened last (kept in `state_dir`), else on a free loopback port. A
/// remembered address that is taken now is given up for a free port, with a warning: Caddy's
/// configuration is then rewritten once.
pub async fn bind(wanted: Option<SocketAddr>, state_dir: &Path) -> anyhow::Result<Bound> {
    let remembered = state_dir.join(LAST_ADDRESS);
    let bound = match wanted {
        Some(addr) => bind_pair(addr)
            .await
            .with_context(|| format!("cannot listen for DNS on {addr} (--dns-listen)"))?,
        None => {
            let last = std::fs::read_to_string(&remembered)
                .ok()
                .and_then(|text| text.trim().parse::<SocketAddr>().ok());
            match last {
                Some(addr) => match bind_pair(addr).await {
                    Ok(bound) => bound,
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "the DNS responder's last address is taken; Caddy's configuration will name a new one");
                        bind_free().await?
                    }
                },
                None => bind_free().await?,
            }
        }
    };
    remember(&remembered, bound.addr)
        .with_context(|| format!("cannot keep the DNS address in {}", remembered.display()))?;
    Ok(bound)
}

/// UDP and TCP on `addr`.
async fn bind_pair(addr: SocketAddr) -> std::io::Result<Bound> {
    let udp = UdpSocket::bind(addr).await?;
    let addr = udp.local_addr()?;
    let tcp = TcpListener::bind(addr).await?;
    Ok(Bound { udp, tcp, addr })
}

/// A free loopback port for UDP and TCP both, below the range the system hands out for
/// outgoing connections and for port 0 (32768 and up on Linux), so that while Harbor is
/// stopped nothing is likely to take it before Harbor binds it again.
async fn bind_free() -> std::io::Result<Bound> {
    let mut last = None;
    for _ in 0..32 {
        let port = fastrand::u16(20_000..32_000);
        match bind_pair(SocketAddr::from(([127, 0, 0, 1], port))).await {
            Ok(bound) => return Ok(bound),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// Writes `addr` to `file` whole or not at all.
fn remember(file: &Path, addr: SocketAddr) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partial = file.with_extension("partial");
    std::fs::write(&partial, format!("{addr}\n"))?;
    std::fs::rename(&partial, file)
}

/// Answers queries until `cancel`; then, once `settled` (Caddy's static lists are written) or
/// after a while, fails service lookups for [`DRAIN`] before closing.
pub async fn serve(
    zone: Arc<Zone>,
    bound: Bound,
    cancel: CancellationToken,
    settled: CancellationToken,
) {
    let stop = CancellationToken::new();
    let udp = tokio::spawn(serve_udp(zone.clone(), bound.udp, stop.clone()));
    let tcp = tokio::spawn(serve_tcp(zone.clone(), bound.tcp, stop.clone()));
    cancel.cancelled().await;
    if tokio::time::timeout(SETTLE_WAIT, settled.cancelled())
        .await
        .is_err()
    {
        tracing::warn!("Caddy's static upstream lists were not confirmed before shutdown");
    }
    zone.drain();
    tokio::time::sleep(DRAIN).await;
    stop.cancel();
    let _ = tokio::join!(udp, tcp);
}

async fn serve_udp(zone: Arc<Zone>, socket: UdpSocket, stop: CancellationToken) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS receive failed");
                    continue;
                }
            },
            () = stop.cancelled() => {
                answer_pending(&zone, socket, &mut buf);
                return;
            }
        };
        if let Some(reply) = answer(&buf[..len], &zone, Over::Udp) {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// Answers every query already waiting on the socket, just before it closes. A datagram left in
/// a closed socket's buffer is dropped without a word, and its sender (Caddy, holding a lookup
/// lock while it waits) waits out its resolver's timeout, seconds; one that arrives after the
/// close is refused at once.
fn answer_pending(zone: &Zone, socket: UdpSocket, buf: &mut [u8]) {
    // Straight from the socket, which is non-blocking: the runtime's own readiness may not have
    // seen the latest datagrams yet.
    let Ok(socket) = socket.into_std() else {
        return;
    };
    while let Ok((len, from)) = socket.recv_from(buf) {
        if let Some(reply) = answer(&buf[..len], zone, Over::Udp) {
            let _ = socket.send_to(&reply, from);
        }
    }
}

async fn serve_tcp(zone: Arc<Zone>, listener: TcpListener, stop: CancellationToken) {
    let mut clients = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS accept failed");
                    // Out of descriptors, most likely: let some close.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        // Caddy holds one lookup at a time per service: a few clients at once is normal, a
        // pile of them is not, and each is cut after its idle time anyway.
        while clients.try_join_next().is_some() {}
        if clients.len() >= 256 {
            continue;
        }
        let (zone, stop) = (zone.clone(), stop.clone());
        clients.spawn(async move {
            tokio::select! {
                () = answer_stream(&zone, stream) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Answers length-prefixed queries on one connection until it closes or idles.
async fn answer_stream(zone: &Zone, mut stream: TcpStream) {
    let mut query = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        query.resize(usize::from(u16::from_be_bytes(len)), 0);
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let Some(reply) = answer(&query, zone, Over::Tcp) else {
            return;
        };
        // An answer is at most u16::MAX bytes (see `answer`).
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::tests::{ports, query, zone_with};

    #[tokio::test]
    async fn the_responder_keeps_its_address_across_restarts_unless_it_is_taken() {
        let state = tempfile::tempdir().expect("a state dir");
        let bound = bind(None, state.path()).await.expect("bound");
        let first = bound.addr;
        assert!(first.ip().is_loopback());
        drop(bound);
        let held = bind(None, state.path()).await.expect("bound again");
        assert_eq!(held.addr, first, "a restart binds where it listened last");

        // Something else holds the address now: another port, remembered in its place.
        let moved = bind(None, state.path()).await.expect("bound").addr;
        assert_ne!(moved, first);
        let kept = std::fs::read_to_string(state.path().join(LAST_ADDRESS)).expect("kept");
        assert_eq!(kept.trim(), moved.to_string());

        // An address asked for is bound exactly, or refused with its name.
        let free = UdpSocket::bind("127.0.0.1:0").await.expect("a port");
        let wanted = free.local_addr().expect("addr");
        let err = bind(Some(wanted), state.path()).await.unwrap_err();
        assert!(format!("{err:#}").contains(&wanted.to_string()), "{err:#}");
        drop(free);
        let got = bind(Some(wanted), state.path()).await.expect("bound");
        assert_eq!(got.addr, wanted);
        drop(held);
    }

    #[tokio::test]
    async fn queries_waiting_when_the_udp_socket_closes_are_answered_not_dropped() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bound");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bound");
        client
            .connect(server.local_addr().expect("addr"))
            .await
            .expect("connect");
        let zone = zone_with(vec![(9000, 1)]);
        // Loopback delivers at once: these sit in the server's buffer, unread, as queries do
        // that arrive while the responder stops.
        for _ in 0..20 {
            client
                .send(&query("web.svc.harbor.", 33))
                .await
                .expect("send");
        }
        answer_pending(&zone, server, &mut [0u8; 4096]);
        let mut reply = [0u8; 512];
        for i in 0..20 {
            let len = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut reply))
                .await
                .unwrap_or_else(|_| panic!("query {i} was never answered"))
                .expect("an answer");
            assert_eq!(ports(&reply[..len]), vec![9000]);
        }
    }

    #[tokio::test]
    async fn tcp_answers_hold_every_instance_and_shutdown_drains_then_closes() {
        let state = tempfile::tempdir().expect("a state dir");
        let bound = bind(None, state.path()).await.expect("bound");
        let addr = bound.addr;
        let zone = Arc::new(zone_with((0..300).map(|i| (9000 + i, 1)).collect()));
        let (cancel, settled) = (CancellationToken::new(), CancellationToken::new());
        let server = tokio::spawn(serve(zone, bound, cancel.clone(), settled.clone()));

        let ask = |name: &'static str| async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let q = query(name, 33);
            stream
                .write_all(&(q.len() as u16).to_be_bytes())
                .await
                .expect("write");
            stream.write_all(&q).await.expect("write");
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.expect("length");
            let mut reply = vec![0; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut reply).await.expect("reply");
            reply
        };
        let reply = ask("web.svc.harbor.").await;
        assert_eq!(ports(&reply), (9000..9300).collect::<Vec<_>>());

        // Stopping waits for the settle, then fails lookups, then closes.
        cancel.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            ask("web.svc.harbor.").await[3] & 0x0f,
            0,
            "still serving until settled"
        );
        settled.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while ask("web.svc.harbor.").await[3] & 0x0f != 2 {
            assert!(tokio::time::Instant::now() < deadline, "never drained");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::timeout(DRAIN * 4, server)
            .await
            .expect("closed")
            .expect("joined");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "closed after the drain"
        );
    }
}
