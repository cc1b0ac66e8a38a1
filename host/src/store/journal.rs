//! The journal: every change to an ephemeral instance, appended in order to a log in the state
//! directory and made durable before it is acknowledged. One thread writes: it takes every
//! change queued since its last write, appends them all and syncs once (a group commit), so
//! concurrent requests share an fsync. When the log outgrows the snapshot, the thread writes a
//! new snapshot from the registry and starts a new log ([`Store::compact`]).
//!
//! A write that fails (a full disk) fails every change waiting on it; from then on the registry
//! refuses changes before making them (`503`), and the thread tries a new snapshot every
//! [`RETRY_EVERY`]. The first that succeeds holds everything the registry has, including the
//! changes that were refused an acknowledgement, and changes are taken again.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::events::{Event, EventBus, lock};
use crate::metrics::Metrics;
use crate::model::InstanceId;
use crate::registry::{Change, Journal, Registry, SetAside, StateCondition, Ticket};

use super::Store;
use super::record::StoredInstance;

/// How often a failed state directory is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// The log is folded into a new snapshot once it is larger than this and than the snapshot.
const COMPACT_AT: u64 = 1 << 20;

/// One line of the log.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    /// An instance as it now stands.
    Put(Box<StoredInstance>),
    /// An instance removed.
    Remove(InstanceId),
}

/// The registry's journal; see the module's documentation.
pub struct JournalWriter {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    condition: Mutex<StateCondition>,
    bus: Arc<EventBus>,
    metrics: StoreMetrics,
}

#[derive(Default)]
struct Queue {
    changes: Vec<Change>,
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    stopping: bool,
}

/// The journal's metrics.
struct StoreMetrics {
    writable: IntGauge,
    write_failures: IntCounter,
    fsyncs: IntCounter,
    compactions: IntCounter,
}

impl StoreMetrics {
    fn new(metrics: &Metrics) -> anyhow::Result<Self> {
        let m = Self {
            writable: IntGauge::new(
                "state_writable",
                "1 while registrations can be saved, 0 while they are refused for it",
            )?,
            write_failures: IntCounter::new(
                "state_write_failures_total",
                "Writes of the state directory that failed",
            )?,
            fsyncs: IntCounter::new(
                "state_fsyncs_total",
                "Syncs of the journal, each one acknowledging every change it holds",
            )?,
            compactions: IntCounter::new(
                "state_compactions_total",
                "Snapshots written to fold the journal in",
            )?,
        };
        for c in [
            Box::new(m.writable.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.write_failures.clone()),
            Box::new(m.fsyncs.clone()),
            Box::new(m.compactions.clone()),
        ] {
            metrics.register(c)?;
        }
        m.writable.set(1);
        Ok(m)
    }
}

impl JournalWriter {
    /// Starts the writer on `store`'s current log; `set_aside` is what loading found unusable,
    /// kept in the condition for the status and new subscribers.
    pub fn start(
        store: Store,
        registry: Weak<Registry>,
        bus: Arc<EventBus>,
        metrics: &Metrics,
        set_aside: Option<SetAside>,
    ) -> anyhow::Result<Arc<Self>> {
        let log = store.open_log()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            condition: Mutex::new(StateCondition {
                write_error: None,
                set_aside,
            }),
            bus,
            metrics: StoreMetrics::new(metrics)?,
        });
        let writer = Writer {
            store,
            log,
            registry,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("harbor-journal".into())
            .spawn(move || writer.run())?;
        Ok(Arc::new(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Writes what is queued, folds the log into a snapshot, and stops the writer.
    pub fn close(&self) {
        lock(&self.shared.queue).stopping = true;
        self.shared.wake.notify_one();
        if let Some(thread) = lock(&self.thread).take()
            && thread.join().is_err()
        {
            tracing::error!("the journal's thread panicked");
        }
    }
}

impl Drop for JournalWriter {
    fn drop(&mut self) {
        // A daemon that failed to start never reaches its shutdown: its writer still stops,
        // and lets go of the state directory.
        self.close();
    }
}

impl Journal for JournalWriter {
    fn refuses(&self) -> Option<String> {
        lock(&self.shared.condition).write_error.clone()
    }

    fn append(&self, change: Change) -> Ticket {
        let (tx, rx) = oneshot::channel();
        let mut queue = lock(&self.shared.queue);
        if queue.stopping {
            return Ticket::pending(rx);
        }
        queue.changes.push(change);
        queue.waiters.push(tx);
        drop(queue);
        self.shared.wake.notify_one();
        Ticket::pending(rx)
    }

    fn condition(&self) -> StateCondition {
        lock(&self.shared.condition).clone()
    }
}

/// The writer thread's state.
struct Writer {
    store: Store,
    log: Log,
    registry: Weak<Registry>,
    shared: Arc<Shared>,
}

/// The log being appended to.
pub struct Log {
    pub file: File,
    /// Bytes in it.
    pub len: u64,
}

impl Writer {
    fn run(mut self) {
        loop {
            let failing = lock(&self.shared.condition).write_error.is_some();
            let (changes, waiters, stopping) = {
                let mut queue = lock(&self.shared.queue);
                while queue.changes.is_empty() && !queue.stopping {
                    if failing {
                        let (q, _) = self
                            .shared
                            .wake
                            .wait_timeout(queue, RETRY_EVERY)
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        queue = q;
                        break;
                    }
                    queue = self
                        .shared
                        .wake
                        .wait(queue)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                (
                    std::mem::take(&mut queue.changes),
                    std::mem::take(&mut queue.waiters),
                    queue.stopping,
                )
            };
            if failing {
                // Changes made before the failure was known have no place in a log whose
                // end may be torn: a new snapshot holds them.
                let outcome = self.compact();
                answer(waiters, outcome.clone());
                if outcome.is_ok() {
                    self.recovered();
                }
            } else if !changes.is_empty() {
                let outcome = self.append(&changes);
                if let Err(reason) = &outcome {
                    self.failed(reason.clone());
                }
                answer(waiters, outcome);
                if self.log.len > COMPACT_AT.max(self.store.snapshot_len())
                    && let Err(reason) = self.compact()
                {
                    self.failed(reason);
                }
            }
            if stopping {
                if lock(&self.shared.condition).write_error.is_none()
                    && let Err(reason) = self.compact()
                {
                    tracing::error!(%reason, "cannot fold the journal into a snapshot at shutdown");
                }
                return;
            }
        }
    }

    /// Appends `changes` and syncs them.
    fn append(&mut self, changes: &[Change]) -> Result<(), String> {
        let mut buf = Vec::with_capacity(changes.len() * 320);
        for change in changes {
            let line = match change {
                Change::Put(instance) => {
                    Line::Put(Box::new(StoredInstance::from_restored(instance)))
                }
                Change::Remove(id) => Line::Remove(*id),
            };
            serde_json::to_writer(&mut buf, &line).map_err(|e| e.to_string())?;
            buf.push(b'\n');
        }
        self.log
            .file
            .write_all(&buf)
            .and_then(|()| self.log.file.sync_data())
            .map_err(|e| self.store.unwritable(&e))?;
        self.log.len += buf.len() as u64;
        self.shared.metrics.fsyncs.inc();
        Ok(())
    }

    /// Writes a snapshot of every live instance and starts a new, empty log.
    fn compact(&mut self) -> Result<(), String> {
        let Some(registry) = self.registry.upgrade() else {
            return Err("the registry is gone".into());
        };
        let instances = registry.ephemeral_instances();
        drop(registry);
        self.log = self.store.compact(&instances)?;
        self.shared.metrics.compactions.inc();
        Ok(())
    }

    fn failed(&self, reason: String) {
        self.shared.metrics.write_failures.inc();
        let mut condition = lock(&self.shared.condition);
        if condition.write_error.is_none() {
            tracing::error!(%reason, "registrations cannot be saved; changes are refused until they can");
            self.shared.metrics.writable.set(0);
            self.shared.bus.publish(Event::StateWriteFailed {
                reason: reason.clone(),
            });
        }
        condition.write_error = Some(reason);
    }

    fn recovered(&self) {
        lock(&self.shared.condition).write_error = None;
        self.shared.metrics.writable.set(1);
        tracing::info!("registrations are saved again");
        self.shared.bus.publish(Event::StateWriteRecovered);
    }
}

fn answer(waiters: Vec<oneshot::Sender<Result<(), String>>>, outcome: Result<(), String>) {
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}
