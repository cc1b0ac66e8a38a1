//! Zero-copy relaying between two TCP sockets with `splice(2)`: bytes move socket → pipe →
//! socket inside the kernel, never through a user-space buffer. Same contract as
//! [`super::copy::duplex`]: half-close, idle timeout, cut at shutdown.
//!
//! Each direction starts with plain receives and sends through a small buffer, and switches to
//! splice once a receive fills it. Most connections carry a few small messages, and for those a
//! receive that comes back short proves the socket drained, so the next call waits for data; a
//! splice that comes back short proves nothing (it stops at the pipe's slots, not at the
//! socket's end) and is followed by one that fails with EAGAIN. That, and the second FIN left to
//! the close, saves system calls on every short connection (see host/benches/README.md, Proxy
//! throughput). HAProxy's `mode tcp` splices only with `option splice-auto`, by a similar rule.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::copy::{Activity, End, Tally, drive};

/// The buffer each direction starts with; a receive that fills it switches the direction to
/// splice.
const SMALL: usize = 16 * 1024;

/// Receive buffers kept per thread for the next connections: 16 KiB is too big for glibc's
/// per-thread cache, so two fresh buffers per connection went through `malloc`'s slow paths and
/// the consolidation that freeing chunks that size sets off, which showed in profiles at high
/// connection rates (see host/benches/README.md, Proxy throughput).
const SPARE_BUFFERS: usize = 64;

thread_local! {
    static BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A receive buffer taken from this thread's spares (or new); it goes back to the spares of
/// whichever thread drops it.
struct Buffer(Vec<u8>);

impl Buffer {
    fn take() -> Self {
        let spare = BUFFERS.try_with(|b| b.borrow_mut().pop()).ok().flatten();
        Self(spare.unwrap_or_else(|| Vec::with_capacity(SMALL)))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let mut buffer = std::mem::take(&mut self.0);
        buffer.clear();
        let _ = BUFFERS.try_with(|b| {
            let mut spare = b.borrow_mut();
            if spare.len() < SPARE_BUFFERS {
                spare.push(buffer);
            }
        });
    }
}

/// Bytes moved per splice call and the pipe's capacity: Linux's default pipe holds 64 KiB;
/// a larger pipe means fewer wake-ups per megabyte.
const PIPE_BYTES: usize = 1 << 20;

/// Copies `client` ⇄ `upstream` until both directions end, one fails, they idle or `cut` fires;
/// `on_long_lived` as in [`drive`]. `on_silent_client` is called if the client has sent nothing
/// when its first receive is tried, before waiting for it: the receive finds that out anyway,
/// where asking beforehand would take a system call of its own.
pub async fn duplex(
    client: &TcpStream,
    upstream: &TcpStream,
    idle: Duration,
    cut: &CancellationToken,
    tally: Tally<'_>,
    on_long_lived: impl FnOnce(),
    on_silent_client: impl FnOnce(),
) -> End {
    let activity = Activity::new();
    let ended = AtomicBool::new(false);
    // Pinned here, so that `drive` holds two pointers rather than a copy of both directions:
    // every byte of a future is copied each time it moves.
    let inbound = std::pin::pin!(pump(
        client,
        upstream,
        &activity,
        &ended,
        tally.inbound,
        Some(on_silent_client),
    ));
    let outbound = std::pin::pin!(pump(
        upstream,
        client,
        &activity,
        &ended,
        tally.outbound,
        None::<fn()>,
    ));
    drive(inbound, outbound, &activity, idle, cut, on_long_lived).await
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Empty pipes kept for the next connection: creating and sizing two pipes per connection cost CPU
/// at high connection rates (see host/benches/README.md, Proxy throughput). Few, since each holds
/// two descriptors outside the connections' budget ([`crate::descriptors`]).
static SPARE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
const SPARE_MAX: usize = 32;

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
    ended: &AtomicBool,
    tally: &IntCounter,
    on_silence: Option<impl FnOnce()>,
) -> io::Result<()> {
    // Small messages first, through buffers.
    let relay = Relay {
        from,
        to,
        activity,
        ended,
        tally,
    };
    if relay.through_buffers(on_silence, true).await? {
        return Ok(());
    }
    // Bulk: splice from here on, if a pipe can be had (a full descriptor table has none).
    let mut pipe = match Lent::take() {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::debug!(error = %e, "no pipe to splice through; relaying through buffers");
            relay.through_buffers(None::<fn()>, false).await?;
            return Ok(());
        }
    };
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
            return finish(to, ended);
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

/// One direction's ends and books.
struct Relay<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    activity: &'a Activity,
    ended: &'a AtomicBool,
    tally: &'a IntCounter,
}

impl Relay<'_> {
    /// Relays through buffers, each held only while bytes are in it (an idle connection holds
    /// none), until the stream ends (`true`) or, when `until_full`, until a receive fills its
    /// buffer (`false`).
    async fn through_buffers(
        &self,
        mut on_silence: Option<impl FnOnce()>,
        until_full: bool,
    ) -> io::Result<bool> {
        loop {
            let (buffer, moved) = receive(self.from, &mut on_silence).await?;
            // Only silence before the first bytes (or the end) counts.
            on_silence = None;
            if moved == 0 {
                finish(self.to, self.ended)?;
                return Ok(true);
            }
            send_all(self.to, &buffer.0).await?;
            self.activity.touch();
            self.tally.inc_by(moved as u64);
            if until_full && moved == buffer.0.capacity() {
                return Ok(false);
            }
        }
    }
}

/// One receive into a buffer taken for it, 0 bytes at end of stream. One that comes back short
/// also clears the socket's readiness, as tokio's own reads do: the socket is drained, so the
/// next receive waits for new data rather than making a call that can only fail.
/// `on_silence` is called, once, before the first wait for data.
async fn receive(
    from: &TcpStream,
    on_silence: &mut Option<impl FnOnce()>,
) -> io::Result<(Buffer, usize)> {
    loop {
        // Silence has to be known before the first wait, not after it.
        if on_silence.is_none() {
            from.readable().await?;
        }
        let mut taken = Buffer::take();
        let buffer = &mut taken.0;
        let room = buffer.capacity();
        let mut short = 0;
        // Into the spare capacity: a buffer that is never zeroed costs nothing per connection.
        let result = from.try_io(Interest::READABLE, || {
            let n = SockRef::from(from).recv(buffer.spare_capacity_mut())?;
            if n > 0 && n < room {
                short = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match result {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => short,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(call) = on_silence.take() {
                    call();
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        // SAFETY: recv initialised the first `n` bytes of the spare capacity, and `n <= room`.
        unsafe { buffer.set_len(n) };
        return Ok((taken, n));
    }
}

async fn send_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A direction has ended. Half-close: the peer learns that no more is coming, and may still
/// answer. The direction that ends second leaves this out: both sockets are closed right
/// after, and the close sends the same FIN.
fn finish(to: &TcpStream, ended: &AtomicBool) -> io::Result<()> {
    if ended.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    SockRef::from(to).shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    #[test]
    fn receive_buffers_are_reused_per_thread_up_to_a_cap() {
        std::thread::spawn(|| {
            let first = Buffer::take();
            let address = first.0.as_ptr();
            drop(first);
            assert_eq!(
                Buffer::take().0.as_ptr(),
                address,
                "the spare was not reused"
            );
            let many: Vec<Buffer> = (0..SPARE_BUFFERS + 10).map(|_| Buffer::take()).collect();
            assert!(
                many.iter()
                    .all(|b| b.0.capacity() == SMALL && b.0.is_empty())
            );
            drop(many);
            assert_eq!(BUFFERS.with(|b| b.borrow().len()), SPARE_BUFFERS);
        })
        .join()
        .expect("buffer thread");
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// A relay between two fresh connections: the client's peer, the upstream's peer, and the
    /// relay's end with the bytes it counted inbound and outbound.
    async fn relayed() -> (TcpStream, TcpStream, JoinHandle<(End, u64, u64)>) {
        relayed_after(b"", Arc::default()).await
    }

    /// [`relayed`], with `said_first` sent by the client and arrived before the relay starts,
    /// and the relay's reports of a silent client counted in `silences`.
    async fn relayed_after(
        said_first: &[u8],
        silences: Arc<AtomicUsize>,
    ) -> (TcpStream, TcpStream, JoinHandle<(End, u64, u64)>) {
        let (mut client_peer, client) = pair().await;
        let (upstream, upstream_peer) = pair().await;
        if !said_first.is_empty() {
            client_peer.write_all(said_first).await.unwrap();
            loop {
                client.readable().await.unwrap();
                let mut byte = [std::mem::MaybeUninit::uninit()];
                let peeked = client.try_io(Interest::READABLE, || {
                    SockRef::from(&client).peek(&mut byte)
                });
                if peeked.is_ok_and(|n| n > 0) {
                    break;
                }
            }
        }
        let relay = tokio::spawn(async move {
            let (i, o) = (
                IntCounter::new("i", "i").unwrap(),
                IntCounter::new("o", "o").unwrap(),
            );
            let cut = CancellationToken::new();
            let tally = Tally {
                inbound: &i,
                outbound: &o,
            };
            let silent = move || {
                silences.fetch_add(1, Ordering::SeqCst);
            };
            let end = duplex(
                &client,
                &upstream,
                Duration::from_secs(30),
                &cut,
                tally,
                || {},
                silent,
            )
            .await;
            (end, i.get(), o.get())
        });
        (client_peer, upstream_peer, relay)
    }

    #[tokio::test]
    async fn a_client_that_waits_for_the_server_is_reported_silent_once() {
        let silences = Arc::new(AtomicUsize::new(0));
        let (mut client_peer, mut upstream_peer, relay) =
            relayed_after(b"", silences.clone()).await;
        let mut got = [0u8; 4];
        // The server speaks first; the relay had to find the client silent to wait for it.
        upstream_peer.write_all(b"220 ").await.unwrap();
        client_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(silences.load(Ordering::SeqCst), 1);
        // Later pauses of the client are not its first silence.
        for line in [b"HELO", b"QUIT"] {
            client_peer.write_all(line).await.unwrap();
            upstream_peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, line);
        }
        drop((client_peer, upstream_peer));
        relay.await.unwrap();
        assert_eq!(silences.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_client_that_spoke_first_is_never_reported_silent() {
        let silences = Arc::new(AtomicUsize::new(0));
        let (mut client_peer, mut upstream_peer, relay) =
            relayed_after(b"GET ", silences.clone()).await;
        let mut got = [0u8; 4];
        upstream_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET ");
        upstream_peer.write_all(b"200 ").await.unwrap();
        client_peer.read_exact(&mut got).await.unwrap();
        drop((client_peer, upstream_peer));
        relay.await.unwrap();
        assert_eq!(silences.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn moves_bytes_both_ways_with_half_close() {
        let (mut client_peer, mut upstream_peer, relay) = relayed().await;
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

    /// Small messages back and forth on one connection: each receive comes back short, and the
    /// next must still see the next message (a cleared readiness that missed new data would
    /// stall here until the timeout). Then a bulk transfer switches the direction to splice.
    #[tokio::test]
    async fn small_messages_then_bulk_keep_flowing() {
        let (mut client_peer, mut upstream_peer, relay) = relayed().await;
        let exchange = async {
            let mut byte = [0u8; 1];
            for round in 0..200u32 {
                let ping = [round as u8];
                client_peer.write_all(&ping).await.unwrap();
                upstream_peer.read_exact(&mut byte).await.unwrap();
                assert_eq!(byte, ping);
                upstream_peer.write_all(&[!ping[0]]).await.unwrap();
                client_peer.read_exact(&mut byte).await.unwrap();
                assert_eq!(byte, [!ping[0]]);
            }
            let big: Vec<u8> = (0..1_000_000u32).map(|n| (n % 251) as u8).collect();
            let sent = big.clone();
            let (_, got) = tokio::join!(
                async {
                    client_peer.write_all(&sent).await.unwrap();
                    client_peer.shutdown().await.unwrap();
                },
                async {
                    let mut got = Vec::new();
                    upstream_peer.read_to_end(&mut got).await.unwrap();
                    got
                }
            );
            assert!(
                got == big,
                "the bulk arrives whole and in order after the small messages"
            );
            upstream_peer.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client_peer.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("no direction stalls");
        let (end, inbound, outbound) = relay.await.unwrap();
        assert_eq!(
            (end, inbound, outbound),
            (End::Closed, 200 + 1_000_000, 200)
        );
    }
}
