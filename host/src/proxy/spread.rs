//! Spreading a `tcp` route's new connections over the lanes. Each lane accepts from a listening
//! socket of its own, and the kernel shares connections out between those sockets by a hash of
//! their addresses, blind to how busy each lane is: one lane can have a queue while the other
//! sleeps. So a lane that accepts a connection while another lane serves fewer hands it over, as
//! HAProxy's threads do with the connections one of them accepts. (HAProxy with a socket per
//! thread, `shards by-thread`, lost rate and left the machine idle more than with one shared
//! socket: see host/benches/README.md, Proxy throughput.)

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::unix::AsyncFd;

/// How much busier than the least busy lane a lane must be to hand a connection over. Handing
/// over wakes the other lane, and a smaller margin handed over more connections for the same
/// rate (see host/benches/README.md, Proxy throughput).
const MARGIN: usize = 6;

/// How many connections each lane serves, for the lanes to compare.
pub struct Loads {
    open: Box<[Count]>,
}

/// A lane's count on a cache line of its own: each lane writes only its own at every connection.
#[repr(align(128))]
#[derive(Default)]
struct Count(AtomicUsize);

impl Loads {
    pub fn new(lanes: usize) -> Self {
        Self {
            open: (0..lanes.max(1)).map(|_| Count::default()).collect(),
        }
    }

    /// The lane to serve a connection that lane `here` accepted: the least busy one if it serves
    /// [`MARGIN`] fewer connections or more, else `here` itself.
    pub fn choose(&self, here: usize) -> usize {
        let count = |lane: usize| {
            self.open
                .get(lane)
                .map_or(usize::MAX, |c| c.0.load(Ordering::Relaxed))
        };
        let mine = count(here);
        match (0..self.open.len()).min_by_key(|&lane| count(lane)) {
            Some(lane) if count(lane).saturating_add(MARGIN) <= mine => lane,
            _ => here,
        }
    }

    /// Counts a connection on `lane` until [`Self::leave`].
    pub fn enter(&self, lane: usize) {
        if let Some(c) = self.open.get(lane) {
            c.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn leave(&self, lane: usize) {
        if let Some(c) = self.open.get(lane) {
            c.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Accepts a connection without registering it with this thread's reactor: the lane that serves
/// it registers it with its own.
pub async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        match ready.try_io(|listener| accept_now(listener.get_ref())) {
            Ok(accepted) => return accepted,
            Err(_would_block) => continue,
        }
    }
}

/// One `accept4`, nonblocking and close-on-exec from the start (no `fcntl` afterwards).
fn accept_now(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let fd = listener.as_raw_fd();
    // SAFETY: `accept4` writes at most `len` bytes of address into the storage it is given and
    // sets `len` to what it wrote, as `try_init` expects.
    let (raw, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let raw = libc::accept4(
                fd,
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if raw < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(raw)
            }
        })
    }?;
    // SAFETY: `accept4` returned a new descriptor that nothing else owns.
    let stream = std::net::TcpStream::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection that is not TCP/IP"))?;
    Ok((stream, peer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_lane_hands_over_only_to_one_that_serves_clearly_fewer() {
        let loads = Loads::new(3);
        let add = |lane: usize, n: usize| (0..n).for_each(|_| loads.enter(lane));
        assert_eq!(loads.choose(0), 0, "all idle: the accepting lane serves");
        add(0, MARGIN - 1);
        assert_eq!(
            loads.choose(0),
            0,
            "within the margin: no wake-up is worth it"
        );
        add(0, 1);
        add(1, 1);
        assert_eq!(loads.choose(0), 2, "the least busy lane takes it");
        assert_eq!(loads.choose(2), 2);
        loads.leave(0);
        assert_eq!(loads.choose(0), 0, "a connection that ended counts no more");
    }

    #[tokio::test]
    async fn accepted_sockets_are_nonblocking_and_carry_the_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        // SAFETY: the listener owns its descriptor for as long as the registration lives.
        let listener =
            unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
                .expect("register");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut accepted, peer) = accept(&listener).await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("client addr"));
        let mut byte = [0u8; 1];
        let silent = accepted.read(&mut byte).expect_err("nothing was sent");
        assert_eq!(silent.kind(), io::ErrorKind::WouldBlock);
    }
}
