//! Open connections, counted so that shutdown can wait for them to drain and say how many it
//! had to cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct Connections {
    open: AtomicUsize,
    drained: Notify,
    /// Asks HTTP connections to finish their current request and close.
    pub finish: CancellationToken,
    /// `finish` as a flag: read once per request, where the token's lock would be shared by
    /// every connection.
    finishing: AtomicBool,
    /// Closes every connection at once: the grace period is over.
    pub cut: CancellationToken,
}

/// One open connection; dropping it closes the count.
pub struct Open(Arc<Connections>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.leave();
    }
}

impl Connections {
    pub fn open(self: &Arc<Self>) -> Open {
        self.enter();
        Open(self.clone())
    }

    /// Counts a connection in; [`Self::leave`] counts it out. For holders that keep `self`
    /// alive by other means than an [`Open`].
    pub fn enter(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts a connection out, and wakes the drain when it was the last.
    pub fn leave(&self) {
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.drained.notify_waiters();
        }
    }

    pub fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Whether connections are being asked to finish (shutdown has begun).
    pub fn finishing(&self) -> bool {
        self.finishing.load(Ordering::Acquire)
    }

    /// Lets connections finish for up to `grace`, then cuts the rest; returns how many were cut.
    pub async fn drain(&self, grace: Duration) -> usize {
        self.finishing.store(true, Ordering::Release);
        self.finish.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let drained = self.drained.notified();
            if self.count() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                break;
            }
        }
        let cut = self.count();
        self.cut.cancel();
        cut
    }
}
