//! Lanes for proxied connections: one thread per core, each running its own single-threaded
//! runtime. HTTP connections are handed to them in turn; each `tcp` route runs an accept loop in
//! every lane (see [`super::tcp`]).
//!
//! On one multi-threaded runtime a connection's task may move between workers at every wake-up,
//! and the workers park and wake each other around the one I/O driver. A lane serves its
//! connections start to finish on one thread, as HAProxy's and nginx's threads do, for more
//! requests/s at less CPU per request. Handing connections out in turn keeps the lanes evenly
//! loaded, where the kernel's `SO_REUSEPORT` hashing did not (see host/benches/README.md, Proxy
//! throughput). What lanes give up is work stealing: the connections of a lane that waits for a
//! core wait with it, so each lane has a core of its own (see [`Affinity`]).

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// A connection's work, started on the lane that takes it.
pub type Job =
    Box<dyn FnOnce(tokio::net::TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Work that runs on a lane's runtime until it ends; the lane ends only after it.
pub type Task = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

enum Handoff {
    Connection {
        stream: std::net::TcpStream,
        peer: SocketAddr,
        job: Job,
    },
    Task(Task),
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

/// Whether lanes are bound to cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affinity {
    /// Lane `n` runs only on the `n`-th core this process may use. Two busy lanes left to the
    /// scheduler can end up sharing one core while the load generator and the upstream share
    /// the other: the load looks balanced, so nothing moves them, and they take turns at the
    /// scheduler's tick (4 ms here), each stalling its connections meanwhile: that was the
    /// proxy benchmark's HTTP tail until lanes were bound (see host/benches/README.md, Proxy
    /// throughput). Spinning before sleeping, tried first, only hid part of it and costs
    /// requests/s with bound lanes. nginx (`worker_cpu_affinity`) and HAProxy (`cpu-map`) bind
    /// the same way.
    Cores,
    /// The scheduler places lanes, for machines where other pinned work owns some cores.
    Free,
}

impl Lanes {
    /// Starts `count` lanes (at least one).
    pub fn start(count: usize, affinity: Affinity) -> anyhow::Result<Arc<Self>> {
        let count = count.max(1);
        // Binding is for keeping lanes apart: one lane is left free, and so are lanes that
        // outnumber the cores (a CPU quota, a small cpuset), which binding would stack.
        let cores = match affinity {
            Affinity::Cores if count > 1 => Some(allowed_cores()).filter(|c| c.len() >= count),
            _ => None,
        };
        let mut senders = Vec::new();
        for number in 1..=count {
            let core = cores.as_ref().map(|cores| cores[number - 1]);
            let (tx, rx) = mpsc::unbounded_channel();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("harbor-lane-{number}"))
                .spawn(move || {
                    LANE.with(|l| l.set(number));
                    if let Some(core) = core {
                        bind_to(core);
                    }
                    runtime.block_on(run(rx));
                })?;
            senders.push(tx);
        }
        Ok(Arc::new(Self {
            senders,
            next: AtomicUsize::new(0),
        }))
    }

    pub fn count(&self) -> usize {
        self.senders.len()
    }

    /// Runs `task` on lane `lane` (0-based, below [`Self::count`]); gives it back if that lane
    /// is gone.
    pub fn run_on(&self, lane: usize, task: Task) -> Result<(), Task> {
        let Some(sender) = self.senders.get(lane) else {
            return Err(task);
        };
        sender.send(Handoff::Task(task)).map_err(|e| match e.0 {
            Handoff::Task(task) => task,
            Handoff::Connection { .. } => unreachable!("a task was sent"),
        })
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
        if let Err((stream, job)) = self.hand_to(lane, stream, peer, job) {
            // The lane is gone (it panicked): serve the connection here.
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => {
                    tokio::spawn(job(stream));
                }
                Err(e) => tracing::warn!(%peer, error = %e, "cannot serve a connection"),
            }
        }
    }

    /// Hands `stream`, registered with no runtime yet, to lane `lane` (0-based), which runs `job`
    /// on it; gives both back if that lane is gone.
    pub fn hand_to(
        &self,
        lane: usize,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        job: Job,
    ) -> Result<(), (std::net::TcpStream, Job)> {
        let Some(sender) = self.senders.get(lane) else {
            return Err((stream, job));
        };
        sender
            .send(Handoff::Connection { stream, peer, job })
            .map_err(|e| match e.0 {
                Handoff::Connection { stream, job, .. } => (stream, job),
                Handoff::Task(_) => unreachable!("a connection was sent"),
            })
    }
}

/// The cores the calling thread may run on, in order; empty if the system does not say.
fn allowed_cores() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot read the CPU affinity; lanes stay unbound");
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `core` is below CPU_SETSIZE, the size of `set`.
        .filter(|&core| unsafe { libc::CPU_ISSET(core, &set) })
        .collect()
}

/// Binds the calling thread to `core`; a lane that cannot be bound runs unbound.
fn bind_to(core: usize) {
    // SAFETY: cpu_set_t is plain data, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` comes from `allowed_cores`, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        tracing::warn!(core, error = %std::io::Error::last_os_error(), "cannot bind a proxy lane to its core");
    }
}

/// A lane's loop: runs every connection and task it is given until the lanes are dropped and
/// they have ended.
async fn run(mut handoffs: mpsc::UnboundedReceiver<Handoff>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            handoff = handoffs.recv() => match handoff {
                None => break,
                Some(Handoff::Connection { stream, peer, job }) => {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => {
                            connections.spawn(job(stream));
                        }
                        Err(e) => tracing::warn!(%peer, error = %e, "a lane cannot take a connection"),
                    }
                }
                Some(Handoff::Task(task)) => {
                    connections.spawn(task());
                }
            },
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
    async fn tasks_run_on_the_lane_asked_for_and_outlive_the_lanes() {
        let lanes = Lanes::start(2, Affinity::Free).expect("lanes");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let mut release = Some(release);
        let mut held = Some(held);
        for lane in [1, 0] {
            let (tx, held) = (tx.clone(), held.take());
            let task: Task = Box::new(move || {
                Box::pin(async move {
                    let _ = tx.send(current());
                    if let Some(held) = held {
                        let _ = held.await;
                        let _ = tx.send(current() + 10);
                    }
                })
            });
            assert!(lanes.run_on(lane, task).is_ok());
        }
        assert!(lanes.run_on(2, Box::new(|| Box::pin(async {}))).is_err());
        let mut ran: Vec<usize> = vec![
            rx.recv().await.expect("a task"),
            rx.recv().await.expect("a task"),
        ];
        ran.sort_unstable();
        assert_eq!(
            ran,
            [1, 2],
            "each task ran on its own lane (lanes count from 1)"
        );
        // The lanes handle goes away; the lane with a task still under way keeps running it.
        drop(lanes);
        if let Some(release) = release.take() {
            let _ = release.send(());
        }
        assert_eq!(rx.recv().await, Some(12));
    }

    #[tokio::test]
    async fn connections_are_served_by_the_lanes_in_turn_and_outlive_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let lanes = Lanes::start(2, Affinity::Free).expect("lanes");
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

    #[tokio::test]
    async fn a_connection_handed_to_a_lane_is_served_there() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let lanes = Lanes::start(2, Affinity::Free).expect("lanes");
        for (lane, expected) in [(1, 2u8), (0, 1)] {
            let (server, peer, mut client) = pair(&listener).await;
            let server = server.into_std().expect("std");
            assert!(lanes.hand_to(lane, server, peer, say_lane()).is_ok());
            client.write_all(b"?").await.expect("write");
            let mut served_by = [0u8; 1];
            client.read_exact(&mut served_by).await.expect("answer");
            assert_eq!(served_by[0], expected);
        }
        let (server, peer, _client) = pair(&listener).await;
        let server = server.into_std().expect("std");
        assert!(
            lanes.hand_to(2, server, peer, say_lane()).is_err(),
            "no such lane: the connection comes back"
        );
    }

    /// Answers with the cores the serving lane may run on, one byte each.
    fn say_cores() -> Job {
        Box::new(|mut stream| {
            Box::pin(async move {
                let cores: Vec<u8> = allowed_cores().iter().map(|&c| c as u8).collect();
                let _ = stream.write_all(&cores).await;
            })
        })
    }

    #[tokio::test]
    async fn bound_lanes_run_on_distinct_cores_of_their_own() {
        let cores = allowed_cores();
        assert!(!cores.is_empty(), "the affinity mask is readable");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let lanes = Lanes::start(2, Affinity::Cores).expect("lanes");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (server, peer, mut client) = pair(&listener).await;
            lanes.hand(server, peer, say_cores());
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.expect("read");
            seen.push(answer);
        }
        // On a one-core machine the lanes stay free, which allows them that core alone too.
        let expected: Vec<Vec<u8>> = (0..2)
            .map(|i| vec![cores[i.min(cores.len() - 1)] as u8])
            .collect();
        assert_eq!(
            seen, expected,
            "lane n is bound to the n-th allowed core alone"
        );
        assert_eq!(
            allowed_cores(),
            cores,
            "binding a lane leaves other threads alone"
        );
    }
}
