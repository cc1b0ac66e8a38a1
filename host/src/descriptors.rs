//! File descriptors, shared out so that no one listener can take them all. Every client
//! connection costs descriptors: the proxy's two (the client's socket and the upstream's), the
//! API's one. When the table fills, `accept` fails with EMFILE everywhere at once, and with it
//! health checks, upstream dials and the routes directory's reads; a flood on one port would
//! stop them all. So the table is divided before it can fill:
//!
//! - a **reserve** for Harbor's own work (files, health checks, the routes directory, plugin
//!   loads, its calls to Caddy or Envoy), never given to connections;
//! - room for **idle pooled** upstream sockets, which the pools keep within;
//! - the rest, the **budget**, for connections, taken through a [`Door`] per listener, of which
//!   no one proxy door may hold more than three quarters, and no one door of Harbor's own
//!   (the API's, Gangway's) more than an eighth: a flooded proxy listener leaves a quarter of
//!   the budget to the others, and the API and Gangway flooded together leave the proxy three
//!   quarters.
//!
//! A connection that finds its door or the budget full is accepted and closed at once, and
//! counted (`harbor_connections_refused_total`), rather than left in the kernel's backlog where
//! its client cannot tell a full proxy from a slow one. HAProxy derives its `maxconn` from the
//! descriptor limit in the same spirit.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use prometheus::{IntCounter, IntCounterVec, Opts};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Metrics;

/// The process's descriptor limit, as raised at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit before Harbor raised it.
    pub was: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: the soft limit (1,024 on most systems)
/// is kept low for programs that use `select(2)`, which Harbor does not.
pub fn raise_limit() -> io::Result<Limit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let was = limit.rlim_cur;
    // An unlimited hard limit still stops at the kernel's `nr_open`.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse::<libc::rlim_t>().ok())
        .map_or(limit.rlim_max, |n| n.min(limit.rlim_max));
    if limit.rlim_cur < ceiling {
        let raised = libc::rlimit {
            rlim_cur: ceiling,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; the soft limit asked for is the hard one.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(Limit {
        was,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Descriptors open in this process now; `None` where the system does not say.
pub fn open_now() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count)
}

/// The descriptor table as divided; see the module notes.
pub struct Descriptors {
    /// Descriptors connections may hold in all.
    budget: usize,
    held: AtomicUsize,
    /// Idle upstream sockets the connection pools may keep in all.
    pooled: usize,
    refused: IntCounterVec,
}

/// Why a connection was refused, as the `reason` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its listener's cap (a flag such as `--max-http-connections`, or its share of the
    /// descriptors) is reached.
    Cap,
    /// The descriptors set aside for connections are taken.
    Descriptors,
}

impl Descriptors {
    /// Divides a table of `limit` descriptors of which `open` are in use already.
    pub fn new(limit: u64, open: usize) -> Self {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let reserve = (limit / 8).clamp(64, 1024);
        let left = limit.saturating_sub(open).saturating_sub(reserve);
        let pooled = left / 8;
        Self {
            budget: left - pooled,
            held: AtomicUsize::new(0),
            pooled,
            // Registered with a daemon's metrics by `register`; a bare one counts unseen.
            refused: IntCounterVec::new(
                Opts::new(
                    "connections_refused_total",
                    "Client connections closed at once: their listener's cap or the descriptors \
                     set aside for connections were full",
                ),
                &["listener", "reason"],
            )
            .unwrap_or_else(|e| unreachable!("a valid metric definition: {e}")),
        }
    }

    /// This process's table, its soft limit raised first (and logged).
    pub fn for_this_process() -> Self {
        let limit = match raise_limit() {
            Ok(limit) => {
                tracing::info!(
                    soft = limit.soft,
                    hard = limit.hard,
                    was = limit.was,
                    "file descriptor limit"
                );
                limit.soft
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the file descriptor limit; assuming 1024");
                1024
            }
        };
        let descriptors = Self::new(limit, open_now().unwrap_or(64));
        tracing::info!(
            connections = descriptors.budget,
            pooled = descriptors.pooled,
            "file descriptors set aside"
        );
        descriptors
    }

    pub fn register(&self, metrics: &Metrics) -> prometheus::Result<()> {
        metrics.register(Box::new(self.refused.clone()))
    }

    /// Descriptors connections may hold in all.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Idle upstream sockets the pools may keep in all.
    pub fn pooled(&self) -> usize {
        self.pooled
    }

    /// A door for proxy listener `name`, whose connections cost `cost` descriptors each, and of
    /// which at most `cap` may be open at once, within three quarters of the budget.
    pub fn door(self: &Arc<Self>, name: &'static str, cost: usize, cap: usize) -> Arc<Door> {
        self.door_within(name, cost, cap, self.budget / 4 * 3)
    }

    /// A door for one of Harbor's own listeners (the API, Gangway): one descriptor a
    /// connection, at most `cap` at once, within an eighth of the budget. A person needs a few
    /// connections; a flood of them must leave the proxy its share.
    pub fn control_door(self: &Arc<Self>, name: &'static str, cap: usize) -> Arc<Door> {
        self.door_within(name, 1, cap, self.budget / 8)
    }

    fn door_within(
        self: &Arc<Self>,
        name: &'static str,
        cost: usize,
        cap: usize,
        descriptors: usize,
    ) -> Arc<Door> {
        let cost = cost.max(1);
        let share = descriptors / cost;
        // A door held to its share of descriptors says so when it refuses.
        let full = if share < cap { "descriptors" } else { "cap" };
        Arc::new(Door {
            descriptors: self.clone(),
            cost,
            cap: cap.min(share).max(1),
            open: AtomicUsize::new(0),
            refused_cap: self.refused.with_label_values(&[name, full]),
            refused_descriptors: self.refused.with_label_values(&[name, "descriptors"]),
        })
    }
}

/// One listener's way in; see the module notes.
pub struct Door {
    descriptors: Arc<Descriptors>,
    cost: usize,
    /// Connections this door lets in at once.
    cap: usize,
    open: AtomicUsize,
    refused_cap: IntCounter,
    refused_descriptors: IntCounter,
}

impl Door {
    /// A place for one connection, or why there is none (counted).
    pub fn admit(self: &Arc<Self>) -> Result<Admission, Refusal> {
        // Count first and check after, so that two lanes racing cannot both squeeze in.
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.cap {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused_cap.inc();
            return Err(Refusal::Cap);
        }
        let descriptors = &self.descriptors;
        if descriptors.held.fetch_add(self.cost, Ordering::AcqRel) + self.cost > descriptors.budget
        {
            descriptors.held.fetch_sub(self.cost, Ordering::AcqRel);
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused_descriptors.inc();
            return Err(Refusal::Descriptors);
        }
        Ok(Admission(self.clone()))
    }

    /// Connections this door lets in at once.
    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// One connection's place; dropping it gives the place back.
pub struct Admission(Arc<Door>);

impl Drop for Admission {
    fn drop(&mut self) {
        let door = &self.0;
        door.descriptors.held.fetch_sub(door.cost, Ordering::AcqRel);
        door.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A listener for axum whose connections come through a [`Door`]: the API's and Gangway's.
pub struct Admitting<L> {
    inner: L,
    door: Arc<Door>,
}

impl<L> Admitting<L> {
    pub fn new(inner: L, door: Arc<Door>) -> Self {
        Self { inner, door }
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for Admitting<L> {
    type Io = Admitted<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = self.inner.accept().await;
            if let Ok(admission) = self.door.admit() {
                return (
                    Admitted {
                        io,
                        _admission: admission,
                    },
                    addr,
                );
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection holding its place until it closes.
pub struct Admitted<I> {
    io: I,
    _admission: Admission,
}

impl<I: AsyncRead + Unpin> AsyncRead for Admitted<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Admitted<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_a_reserve_and_room_for_pools() {
        let d = Descriptors::new(2048, 48);
        // 2048 - 48 open - 256 reserve = 1744, of which an eighth for the pools.
        assert_eq!(d.pooled(), 218);
        assert_eq!(d.budget(), 1744 - 218);
        let tiny = Descriptors::new(100, 90);
        assert_eq!(tiny.budget(), 0, "nothing left past the reserve");
    }

    #[test]
    fn a_door_stops_at_its_cap_and_at_three_quarters_of_the_budget() {
        let d = Arc::new(Descriptors::new(2048, 48));
        let http = d.door("http", 2, 10);
        let held: Vec<_> = (0..10).map(|_| http.admit().expect("room")).collect();
        assert_eq!(http.admit().err(), Some(Refusal::Cap));
        drop(held);
        assert_eq!(http.open(), 0, "places are given back");

        let flooded = d.door("http", 2, usize::MAX);
        assert_eq!(flooded.cap(), 1526 / 4 * 3 / 2);
        let held: Vec<_> = std::iter::from_fn(|| flooded.admit().ok()).collect();
        assert_eq!(held.len(), flooded.cap());
        assert_eq!(
            d.refused.with_label_values(&["http", "descriptors"]).get(),
            1,
            "held to its share, the door counts its refusal as the descriptors'"
        );
        let tcp = d.door("tcp", 2, usize::MAX);
        let others: Vec<_> = std::iter::from_fn(|| tcp.admit().ok()).collect();
        assert_eq!(
            others.len(),
            (1526 - held.len() * 2) / 2,
            "the rest of the budget is the other doors'"
        );
        assert_eq!(tcp.admit().err(), Some(Refusal::Descriptors));
        assert_eq!(
            d.refused.with_label_values(&["tcp", "descriptors"]).get(),
            2,
            "each refusal counted"
        );
        assert_eq!(d.refused.with_label_values(&["http", "cap"]).get(), 1);
        drop(held);
        drop(others);

        // Harbor's own listeners, flooded together, leave the proxy three quarters.
        let api = d.control_door("api", 1024);
        let gangway = d.control_door("gangway", 1024);
        assert_eq!(api.cap(), 1526 / 8);
        let api_held: Vec<_> = std::iter::from_fn(|| api.admit().ok()).collect();
        let gangway_held: Vec<_> = std::iter::from_fn(|| gangway.admit().ok()).collect();
        assert_eq!(api_held.len() + gangway_held.len(), 1526 / 8 * 2);
        let proxy = d.door("http", 2, usize::MAX);
        let proxied: Vec<_> = std::iter::from_fn(|| proxy.admit().ok()).collect();
        assert_eq!(
            proxied.len(),
            1526 / 4 * 3 / 2,
            "the proxy's whole share is left"
        );
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_limit().expect("the limit is readable");
        assert!(limit.was <= limit.soft && limit.soft <= limit.hard);
        let again = raise_limit().expect("the limit is readable");
        assert_eq!(again.was, again.soft, "raised once, it stays raised");
    }
}
