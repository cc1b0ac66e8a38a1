//! Zero-copy relaying between two TCP sockets with `splice(2)`: bytes move socket → pipe →
//! socket inside the kernel, never through a user-space buffer. Same contract as
//! [`super::copy::duplex`]: half-close, idle timeout, cut at shutdown.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::copy::{Activity, End, Tally, drive};

/// Bytes moved per splice call and the pipe's capacity: Linux's default pipe holds 64 KiB;
/// a larger pipe means fewer wake-ups per megabyte.
const PIPE_BYTES: usize = 1 << 20;

/// Copies `client` ⇄ `upstream` until both directions end, one fails, they idle or `cut` fires.
pub async fn duplex(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    cut: &CancellationToken,
    tally: Tally<'_>,
) -> End {
    let activity = Activity::new();
    let inbound = pump(client, upstream, &activity, tally.inbound);
    let outbound = pump(upstream, client, &activity, tally.outbound);
    drive(inbound, outbound, &activity, idle, cut).await
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Empty pipes kept for the next connection: creating and sizing two pipes per connection was
/// an eighth of the proxy's CPU at high connection rates.
static SPARE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
const SPARE_MAX: usize = 256;

/// A pipe taken from the spares (or new); it goes back when dropped empty.
struct Lent {
    pipe: Option<Pipe>,
    /// Bytes spliced in and not yet out; a pipe with data left in it is never reused.
    filled: usize,
}

impl Lent {
    fn take() -> io::Result<Self> {
        let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let pipe = match spare {
            Some(pipe) => pipe,
            None => Pipe::new()?,
        };
        Ok(Self {
            pipe: Some(pipe),
            filled: 0,
        })
    }

    fn fds(&self) -> (RawFd, RawFd) {
        self.pipe
            .as_ref()
            .map_or((-1, -1), |p| (p.read.as_raw_fd(), p.write.as_raw_fd()))
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if self.filled == 0
            && let Some(pipe) = self.pipe.take()
        {
            let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < SPARE_MAX {
                spare.push(pipe);
            }
        }
    }
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe is an optimisation; the default size works too.
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe {
            libc::fcntl(
                pipe.write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets mean "use
    // and advance the file position", which is what sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
    tally: &IntCounter,
) -> io::Result<()> {
    let mut pipe = Lent::take()?;
    let (pipe_read, pipe_write) = pipe.fds();
    loop {
        // Socket → pipe. The pipe is empty here, so a would-block is the socket's.
        let moved = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe_write, PIPE_BYTES)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if moved == 0 {
            // Half-close: the peer learns that no more is coming, and may still answer.
            return socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
        }
        // Pipe → socket, until the pipe is empty again.
        pipe.filled = moved;
        while pipe.filled > 0 {
            to.writable().await?;
            let pending = pipe.filled;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_read, to.as_raw_fd(), pending)
            }) {
                Ok(n) => pipe.filled -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        activity.touch();
        tally.inc_by(moved as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_with_half_close() {
        let (mut client_peer, client) = pair().await;
        let (upstream, mut upstream_peer) = pair().await;
        let (i, o) = (
            IntCounter::new("i", "i").unwrap(),
            IntCounter::new("o", "o").unwrap(),
        );
        let relay = tokio::spawn(async move {
            let cut = CancellationToken::new();
            let tally = Tally {
                inbound: &i,
                outbound: &o,
            };
            let end = duplex(&client, &upstream, Duration::from_secs(5), &cut, tally).await;
            (end, i.get(), o.get())
        });
        let big: Vec<u8> = (0..3_000_000u32).map(|n| n as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            client_peer.write_all(&sent).await.unwrap();
            client_peer.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client_peer.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert!(got == big, "all bytes arrive in order");
        upstream_peer.write_all(b"done").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        assert_eq!(relay.await.unwrap(), (End::Closed, 3_000_000, 4));
    }
}
