//! Connecting to an upstream, for both proxies; for the L4 proxy with one TCP segment fewer per
//! connection.
//!
//! A connect sends its handshake's last ACK on its own, and the client's first bytes follow a
//! moment later. With `TCP_QUICKACK` off before the connect, Linux holds that ACK back and sends
//! it with the first bytes forwarded. This is HAProxy's `tcp-smart-connect`, which it can only
//! use when it already holds the client's first bytes. Here the relay that follows finds out
//! whether the client has spoken with its first receive, and calls [`send_ack_now`] if not, so
//! that a server that speaks first (SMTP, MySQL, SSH) is not kept waiting for the held-back ACK
//! (up to 200 ms). Linux leaves the socket in its usual quick-ACK state after the handshake
//! either way.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Connects to `address` (`ip:port`, or a name the system resolves) with `TCP_NODELAY` on, and
/// with the handshake's last ACK held back when `hold_ack`.
pub async fn dial(address: &str, hold_ack: bool) -> io::Result<TcpStream> {
    let Ok(addr) = address.parse::<SocketAddr>() else {
        // Names are rare for L4 upstreams; they take the plain path.
        let conn = TcpStream::connect(address).await?;
        conn.set_nodelay(true)?;
        return Ok(conn);
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_tcp_nodelay(true)?;
    if hold_ack {
        socket.set_tcp_quickack(false)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let conn = TcpStream::from_std(socket.into())?;
    // The readiness that ends the wait says how the connect went: a refused or reset one reports
    // the write side closed. Only then is the socket asked for its error, where tokio's own
    // connect asks every time.
    let ready = conn.ready(Interest::WRITABLE).await?;
    if ready.is_write_closed() {
        return Err(conn
            .take_error()?
            .unwrap_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused)));
    }
    Ok(conn)
}

/// Sends the held-back handshake ACK on `upstream` now: nothing from the client is about to
/// carry it.
pub fn send_ack_now(upstream: &TcpStream) {
    let _ = SockRef::from(upstream).set_tcp_quickack(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn a_refused_connect_is_an_error_naming_the_refusal() {
        // A port that was free a moment ago: nothing listens there.
        let free = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = free.local_addr().expect("addr");
        drop(free);
        let err = dial(&addr.to_string(), true)
            .await
            .expect_err("nothing listens");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[tokio::test]
    async fn a_dialled_connection_carries_bytes_both_ways_with_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (conn, accepted) = tokio::join!(dial(&addr, true), listener.accept());
        let mut conn = conn.expect("dial");
        let (mut server, _) = accepted.expect("accept");
        assert!(conn.nodelay().expect("nodelay"));
        conn.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.expect("write");
        conn.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"pong");
    }
}
