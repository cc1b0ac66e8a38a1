//! Full-duplex copying between two streams: each direction in its own large buffer, a direction
//! that ends shuts down the write side of the other stream (half-close) while the opposite
//! direction carries on, and the connection closes after `idle` without traffic either way.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Bytes per direction: tokio's default 8 KiB costs loopback throughput, and more than 64 KiB
/// gains nothing measurable (see host/benches/README.md, Proxy throughput).
pub const BUFFER: usize = 64 * 1024;

/// How long a connection lives before it counts as long-lived (see [`drive`]).
pub const LONG_LIVED: Duration = Duration::from_secs(60);

/// Why copying stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Both directions reached end of stream.
    Closed,
    /// A read or write failed (usually a reset by one side).
    Failed(String),
    /// Nothing moved for the idle timeout.
    Idle,
    /// Shutdown's grace period ran out.
    Cut,
}

/// Counters of the bytes moved each way.
pub struct Tally<'a> {
    pub inbound: &'a IntCounter,
    pub outbound: &'a IntCounter,
}

/// Copies `client` ⇄ `upstream` until both directions end, one fails, they idle or `cut` fires.
pub async fn duplex<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    cut: &CancellationToken,
    tally: Tally<'_>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let clock = Activity::new();
    let inbound = pump(&mut client_read, &mut upstream_write, &clock, tally.inbound);
    let outbound = pump(
        &mut upstream_read,
        &mut client_write,
        &clock,
        tally.outbound,
    );
    drive(inbound, outbound, &clock, idle, cut, || {}).await
}

/// When traffic last moved, as nanoseconds on tokio's clock (so that tests can pause it).
pub struct Activity {
    base: tokio::time::Instant,
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            base: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64
    }

    pub fn touch(&self) {
        self.last.store(self.now(), Ordering::Relaxed);
    }

    fn quiet(&self) -> u64 {
        self.now().saturating_sub(self.last.load(Ordering::Relaxed))
    }
}

/// Runs both directions until both end, one fails, nothing moves for `idle`, or `cut` fires.
/// A connection still open after [`LONG_LIVED`] gets `on_long_lived` called once: the work that
/// only long connections need (TCP keepalive) is then skipped by every short one.
pub async fn drive(
    inbound: impl Future<Output = std::io::Result<()>>,
    outbound: impl Future<Output = std::io::Result<()>>,
    activity: &Activity,
    idle: Duration,
    cut: &CancellationToken,
    on_long_lived: impl FnOnce(),
) -> End {
    let (mut in_done, mut out_done) = (false, false);
    let idle_ns = idle.as_nanos().min(u128::from(u64::MAX)) as u64;
    let started = tokio::time::Instant::now();
    let mut on_long_lived = Some(on_long_lived);
    // One timer serves both: it first fires at the earlier of the two deadlines. It and the
    // wait for a cut are made once per connection; made inside the loop, each would be
    // registered anew every time a direction ends.
    let mut check = started + idle.min(LONG_LIVED);
    let timer = tokio::time::sleep_until(check);
    let cancelled = cut.cancelled();
    tokio::pin!(inbound, outbound, timer, cancelled);
    loop {
        tokio::select! {
            r = &mut inbound, if !in_done => {
                if let Err(e) = r { return End::Failed(e.to_string()) }
                in_done = true;
            }
            r = &mut outbound, if !out_done => {
                if let Err(e) = r { return End::Failed(e.to_string()) }
                out_done = true;
            }
            () = &mut timer => {
                if started.elapsed() >= LONG_LIVED
                    && let Some(on_long_lived) = on_long_lived.take()
                {
                    on_long_lived();
                }
                // Traffic resets no timer; the deadline is recomputed from the last activity
                // only when it fires, so a busy connection pays nothing per read.
                let quiet = activity.quiet();
                if quiet >= idle_ns {
                    return End::Idle;
                }
                check += Duration::from_nanos(idle_ns - quiet);
                timer.as_mut().reset(check);
            }
            () = &mut cancelled => return End::Cut,
        }
        if in_done && out_done {
            return End::Closed;
        }
    }
}

async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    activity: &Activity,
    tally: &IntCounter,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the other side learns that no more is coming, and may still answer.
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        activity.touch();
        tally.inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex as pipe;

    #[tokio::test]
    async fn half_close_lets_the_reply_through() {
        let (client, mut client_peer) = pipe(1024);
        let (upstream, mut upstream_peer) = pipe(1024);
        let (i, o) = (
            IntCounter::new("i", "i").unwrap(),
            IntCounter::new("o", "o").unwrap(),
        );
        let cut = CancellationToken::new();
        let copy = tokio::spawn(async move {
            let tally = Tally {
                inbound: &i,
                outbound: &o,
            };
            let end = duplex(client, upstream, Duration::from_secs(5), &cut, tally).await;
            (end, i.get(), o.get())
        });
        client_peer.write_all(b"question").await.unwrap();
        client_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"question");
        upstream_peer.write_all(b"answer").await.unwrap();
        upstream_peer.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client_peer.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"answer");
        assert_eq!(copy.await.unwrap(), (End::Closed, 8, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_and_traffic_keeps_them_open() {
        let (client, mut client_peer) = pipe(1024);
        let (upstream, _upstream_peer) = pipe(1024);
        let (i, o) = (
            IntCounter::new("i", "i").unwrap(),
            IntCounter::new("o", "o").unwrap(),
        );
        let cut = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let copy = tokio::spawn(async move {
            let tally = Tally {
                inbound: &i,
                outbound: &o,
            };
            duplex(client, upstream, Duration::from_secs(10), &cut, tally).await
        });
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client_peer.write_all(b"x").await.unwrap();
        }
        assert!(
            !copy.is_finished(),
            "traffic every 6 s keeps a 10 s idle timeout away"
        );
        assert_eq!(copy.await.unwrap(), End::Idle);
        assert!(started.elapsed() >= Duration::from_secs(28));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_lives_a_minute_gets_the_long_lived_work_once() {
        let calls = std::sync::atomic::AtomicU32::new(0);
        let calls_now = || calls.load(Ordering::Relaxed);
        let activity = Activity::new();
        let cut = CancellationToken::new();
        let never = || std::future::pending::<std::io::Result<()>>();
        let relay = drive(
            never(),
            never(),
            &activity,
            Duration::from_secs(600),
            &cut,
            || {
                calls.fetch_add(1, Ordering::Relaxed);
            },
        );
        tokio::pin!(relay);
        let run_for = |secs| tokio::time::sleep(Duration::from_secs(secs));
        tokio::select! {
            _ = &mut relay => panic!("the connection ended early"),
            () = run_for(59) => {}
        }
        assert_eq!(
            calls_now(),
            0,
            "a connection younger than a minute is short"
        );
        tokio::select! {
            _ = &mut relay => panic!("the connection ended early"),
            () = run_for(2) => {}
        }
        assert_eq!(calls_now(), 1);
        assert_eq!(relay.await, End::Idle, "the idle timeout still ends it");
        assert_eq!(calls_now(), 1, "once");
    }
}
