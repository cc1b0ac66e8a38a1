//! Harbor's own HTTP listeners (the API and Gangway) read their clients through the proxy's
//! gate: the same strict reading of heads, the same `--header-timeout` (answered with `408`),
//! `--keepalive-timeout` and `--body-idle-timeout`. An idle or slow client then costs a
//! descriptor for a bounded time, as it does on the proxy's port. They speak HTTP/1 only: an h2c
//! client would pass beyond the gate's timers, so it is refused.

use bytes::Bytes;

use super::gate::{ClientLimits, Clients, Gate};

/// A listener whose connections are read through the gate.
pub struct Guarded<L> {
    inner: L,
    limits: ClientLimits,
}

impl<L> Guarded<L> {
    pub fn new(inner: L, settings: &crate::config::ProxySettings) -> Self {
        Self {
            inner,
            limits: ClientLimits::from(settings),
        }
    }
}

impl<L> axum::serve::Listener for Guarded<L>
where
    L: axum::serve::Listener,
    L::Io: Unpin,
{
    type Io = Gate<L::Io, Clients>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (
            Gate::new(io, Bytes::new(), Clients::of_api(self.limits)),
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
