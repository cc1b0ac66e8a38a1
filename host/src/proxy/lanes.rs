//! Lanes for HTTP connections: one thread per core, each running its own single-threaded
//! runtime, given accepted connections in turn.
//!
//! On one multi-threaded runtime a connection's task may move between workers at every wake-up,
//! and the workers park and wake each other around the one I/O driver. A lane serves its
//! connections start to finish on one thread, as HAProxy's and nginx's threads do: 15 % more
//! requests/s in the proxy benchmark, at less CPU per request. Handing connections out in turn
//! keeps the lanes evenly loaded, where the kernel's `SO_REUSEPORT` hashing did not (12 % fewer
//! requests/s than one shared runtime). What lanes give up is work stealing: the connections of
//! a lane that waits for a core wait with it, so a lane spins briefly before it sleeps (see
//! [`spin_before_parking`]).

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// A connection's work, started on the lane that takes it.
pub type Job =
    Box<dyn FnOnce(tokio::net::TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    job: Job,
}

thread_local! {
    /// The lane this thread is (1-based), 0 on other threads.
    static LANE: Cell<usize> = const { Cell::new(0) };
}

/// The lane the calling thread runs, 0 if it is not a lane: indexes per-lane state.
pub fn current() -> usize {
    LANE.with(Cell::get)
}

/// The lane threads; dropping this ends each once its connections have ended.
pub struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Handoff>>,
    next: AtomicUsize,
}

impl Lanes {
    /// Starts `count` lanes (at least one).
    pub fn start(count: usize) -> anyhow::Result<Arc<Self>> {
        let mut senders = Vec::new();
        for number in 1..=count.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(spin_before_parking)
                .build()?;
            std::thread::Builder::new()
                .name(format!("harbor-lane-{number}"))
                .spawn(move || {
                    LANE.with(|l| l.set(number));
                    runtime.block_on(run(rx));
                })?;
            senders.push(tx);
        }
        Ok(Arc::new(Self {
            senders,
            next: AtomicUsize::new(0),
        }))
    }

    /// Hands `stream` to the next lane, which runs `job` on it.
    pub fn hand(&self, stream: tokio::net::TcpStream, peer: SocketAddr, job: Job) {
        let lane = self.next.fetch_add(1, Ordering::Relaxed) % self.senders.len();
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand a connection to a lane");
                return;
            }
        };
        if let Err(mpsc::error::SendError(Handoff { stream, job, .. })) =
            self.senders[lane].send(Handoff { stream, peer, job })
        {
            // The lane is gone (it panicked): serve the connection here.
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => {
                    tokio::spawn(job(stream));
                }
                Err(e) => tracing::warn!(%peer, error = %e, "cannot serve a connection"),
            }
        }
    }
}

/// How long a lane that has run out of work keeps its core before it sleeps.
const PARK_SPIN: Duration = Duration::from_micros(10);

/// Called when a lane is about to sleep until its next I/O event. Between two requests of a busy
/// proxy there is often less than this, and then the lane finds the event without sleeping:
/// sleeping and being woken costs a busy or virtualised machine far more (on two shared cores, a
/// woken lane waited up to 8 ms for a core, and the HTTP p99 was 4.4 ms; with 10 µs of spinning,
/// 1.4 ms at the same throughput). An idle lane pays the 10 µs once, when it goes idle.
fn spin_before_parking() {
    let until = Instant::now() + PARK_SPIN;
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// A lane's loop: runs every connection it is given until the lanes are dropped and its
/// connections have ended.
async fn run(mut handoffs: mpsc::UnboundedReceiver<Handoff>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            handoff = handoffs.recv() => {
                let Some(Handoff { stream, peer, job }) = handoff else { break };
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => {
                        connections.spawn(job(stream));
                    }
                    Err(e) => tracing::warn!(%peer, error = %e, "a lane cannot take a connection"),
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: the accepted side and the client.
    async fn pair(listener: &TcpListener) -> (TcpStream, SocketAddr, TcpStream) {
        let addr = listener.local_addr().expect("addr");
        let (accepted, client) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        let (server, peer) = accepted.expect("accept");
        (server, peer, client.expect("connect"))
    }

    /// Waits for one byte, then answers with the number of the lane serving the connection.
    fn say_lane() -> Job {
        Box::new(|mut stream| {
            Box::pin(async move {
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).await.is_ok() {
                    let _ = stream.write_all(&[current() as u8]).await;
                }
            })
        })
    }

    #[tokio::test]
    async fn connections_are_served_by_the_lanes_in_turn_and_outlive_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let lanes = Lanes::start(2).expect("lanes");
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (server, peer, client) = pair(&listener).await;
            lanes.hand(server, peer, say_lane());
            clients.push(client);
        }
        // Accepting stops while every connection still waits for its client.
        drop(lanes);
        let mut served_by = Vec::new();
        for client in &mut clients {
            client.write_all(b"?").await.expect("write");
            let mut lane = [0u8; 1];
            client
                .read_exact(&mut lane)
                .await
                .expect("the lane answers");
            served_by.push(lane[0]);
        }
        assert_eq!(served_by, [1, 2, 1, 2]);
        assert_eq!(current(), 0, "the test's own thread is no lane");
    }
}
