//! Keep-alive connections to upstreams, pooled per address: hyper's senders for the full HTTP
//! stack ([`Pool`]), plain sockets for the direct HTTP/1.1 path ([`Streams`]). A connection goes
//! back to the pool when its response body has been read to the end, and is taken out only once
//! it is ready for another request, so a checkout never waits behind someone else's response.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::UpstreamBody;
use super::dial::dial;
use super::gate::{Gate, Upstreams};

pub type Sender = SendRequest<UpstreamBody>;

/// Idle connections kept per upstream; more are closed when they come back.
const MAX_IDLE: usize = 256;
/// Shorter than the keep-alive timeout of common servers (nginx 75 s, Go 90 s), so that the
/// upstream rarely closes a connection just as it is reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a socket may have been idle and still be taken without a check (upstreams close
/// idle keep-alive connections after seconds, not milliseconds).
const FRESH: Duration = Duration::from_millis(250);

/// Idle connections by address, each with when it went idle, and how many in all against a
/// cap: the pools' share of descriptors ([`crate::descriptors`]). Past the cap, a connection
/// that comes back is closed.
struct Idles<T> {
    by_address: HashMap<Arc<str>, Vec<(T, Instant)>>,
    held: usize,
    cap: usize,
}

impl<T> Idles<T> {
    fn new(cap: usize) -> Self {
        Self {
            by_address: HashMap::new(),
            held: 0,
            cap,
        }
    }

    fn pop(&mut self, address: &str) -> Option<(T, Instant)> {
        let idle = self.by_address.get_mut(address)?.pop()?;
        self.held -= 1;
        Some(idle)
    }

    fn push(&mut self, address: Arc<str>, conn: T, since: Instant) {
        if self.held >= self.cap {
            return;
        }
        let list = self.by_address.entry(address).or_default();
        if list.len() < MAX_IDLE {
            list.push((conn, since));
            self.held += 1;
        }
    }

    /// Closes the idle connections of upstreams no route uses any more.
    fn retain(&mut self, live: impl Fn(&str) -> bool) {
        let mut dropped = 0;
        self.by_address.retain(|address, list| {
            let keep = live(address);
            if !keep {
                dropped += list.len();
            }
            keep
        });
        self.held -= dropped;
    }
}

pub struct Pool {
    idle: Mutex<Idles<Sender>>,
}

impl Pool {
    /// A pool that keeps at most `cap` idle connections in all.
    pub fn new(cap: usize) -> Self {
        Self {
            idle: Mutex::new(Idles::new(cap)),
        }
    }

    /// An idle connection to `address` that is ready for a request.
    pub fn checkout(&self, address: &str) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut busy = Vec::new();
        let mut found = None;
        while let Some((mut sender, since)) = idle.pop(address) {
            if sender.is_closed() || since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            // Ready once the previous response has been read; not yet ready right after a give
            // back, while the connection task catches up.
            match sender.ready().now_or_never() {
                Some(Ok(())) => {
                    found = Some(sender);
                    break;
                }
                Some(Err(_)) => {}
                None => busy.push((sender, since)),
            }
        }
        if !busy.is_empty() {
            let address: Arc<str> = address.into();
            for (sender, since) in busy {
                idle.push(address.clone(), sender, since);
            }
        }
        found
    }

    pub fn give_back(&self, address: Arc<str>, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(address, sender, Instant::now());
    }

    /// Closes the idle connections of upstreams no route uses any more.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(live);
    }
}

/// Idle upstream sockets of the direct HTTP/1.1 path, each between two exchanges: one pool per
/// lane (and one for other threads), since a socket answers on the runtime that registered it.
pub struct Streams {
    lanes: Box<[Mutex<Idles<TcpStream>>]>,
}

impl Streams {
    /// Pools for `lanes` lanes that keep about `cap` idle sockets in all, each lane its share.
    pub fn new(lanes: usize, cap: usize) -> Self {
        let share = cap / lanes.max(1);
        Self {
            lanes: (0..=lanes).map(|_| Mutex::new(Idles::new(share))).collect(),
        }
    }

    fn mine(&self) -> std::sync::MutexGuard<'_, Idles<TcpStream>> {
        let lane = super::lanes::current().min(self.lanes.len() - 1);
        self.lanes[lane].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle socket to `address`. One idle for a moment is taken as it is when `resendable`
    /// (the caller sends the request again on a new socket if this one turns out closed); any
    /// other is first checked for a close from the upstream, which costs a system call.
    pub fn checkout(&self, address: &str, resendable: bool) -> Option<TcpStream> {
        let mut idle = self.mine();
        while let Some((stream, since)) = idle.pop(address) {
            let idle_for = since.elapsed();
            if idle_for >= IDLE_TIMEOUT {
                continue;
            }
            // Between exchanges an upstream sends nothing: a readable socket has been closed
            // (or is out of step), and only an empty one can take a request.
            let quiet = (resendable && idle_for < FRESH)
                || matches!(
                    stream.try_read(&mut [0u8; 1]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                );
            if quiet {
                return Some(stream);
            }
        }
        None
    }

    pub fn give_back(&self, address: Arc<str>, stream: TcpStream) {
        self.mine().push(address, stream, Instant::now());
    }

    /// Closes the idle sockets of upstreams no route uses any more.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        for lane in &self.lanes {
            let mut idle = lane.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(&live);
        }
    }
}

/// Opens a new HTTP/1.1 connection to `address`, able to switch protocols for upgrades; hyper
/// reads its responses through the policy's gate.
pub async fn connect(address: &str) -> std::io::Result<Sender> {
    let stream = dial(address, false).await?;
    let gated = Gate::new(stream, Bytes::new(), Upstreams::new());
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(gated))
        .await
        .map_err(std::io::Error::other)?;
    let address = address.to_owned();
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(upstream = %address, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}
