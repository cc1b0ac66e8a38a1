//! The lease deadline queue and the one reaper task that expires leases from it: no timer per
//! lease, so ten thousand leases cost ten thousand set entries and one sleeping task.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Registry;
use crate::model::InstanceId;

/// Deadlines ordered by time; the id breaks ties so equal deadlines coexist.
#[derive(Default)]
pub(super) struct DeadlineQueue {
    entries: BTreeSet<(Instant, InstanceId)>,
}

impl DeadlineQueue {
    /// Returns true if this deadline is now the earliest, so the reaper must wake sooner.
    pub fn insert(&mut self, deadline: Instant, id: InstanceId) -> bool {
        self.entries.insert((deadline, id));
        self.entries.first() == Some(&(deadline, id))
    }

    pub fn remove(&mut self, deadline: Instant, id: InstanceId) {
        self.entries.remove(&(deadline, id));
    }

    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, InstanceId)> {
        match self.entries.first() {
            Some(&(deadline, _)) if deadline <= now => self.entries.pop_first(),
            _ => None,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.first().map(|&(d, _)| d)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The bounds a requested TTL must lie within.
#[derive(Debug, Clone, Copy)]
pub struct LeaseLimits {
    pub min: Duration,
    pub max: Duration,
    pub default: Duration,
}

impl Default for LeaseLimits {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(1),
            max: Duration::from_secs(24 * 3600),
            default: Duration::from_secs(30),
        }
    }
}

/// Expires leases as their deadlines pass, until cancelled.
pub async fn reaper(registry: Arc<Registry>, cancel: CancellationToken) {
    loop {
        let next = registry.expire_due(Instant::now());
        let sleep = async {
            match next {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = registry.reaper_wake.notified() => {}
            () = cancel.cancelled() => return,
        }
    }
}
