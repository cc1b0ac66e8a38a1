//! The backend driver's record of how the proxy stands: what `GET /api/v1/backend` shows, the
//! backend metrics, and the events that tell of applies, failures and drift.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::backend::{AdapterError, Applied, CallError};
use crate::events::{Event, EventBus, lock};
use crate::metrics::Metrics;
use crate::model::timestamp;

use super::reconciler::Driven;

/// What `GET /api/v1/backend` shows.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BackendStatus {
    pub adapter: String,
    pub version: String,
    pub source: String,
    pub hash: String,
    pub supports_tcp: bool,
    /// The registry revision the proxy was last brought to.
    pub applied_revision: Option<u64>,
    pub applied_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub in_sync: bool,
    /// Applies that changed or confirmed the proxy since start.
    pub applies: u64,
    /// Services the proxy refused, left out of what it runs; the rest are applied.
    pub refused: Vec<Refusal>,
    /// The version the proxy reports, when Harbor could ask it (Caddy).
    pub proxy_version: Option<String>,
}

/// A service the proxy refused, and its reason.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Refusal {
    pub service: String,
    pub reason: String,
}

/// Where the status is kept and every change of it is counted and told.
pub struct Book {
    status: Mutex<BackendStatus>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) bus: Arc<EventBus>,
}

impl Book {
    pub fn new(metrics: Arc<Metrics>, bus: Arc<EventBus>) -> Self {
        Self {
            status: Mutex::new(BackendStatus::default()),
            metrics,
            bus,
        }
    }

    pub fn status(&self) -> BackendStatus {
        lock(&self.status).clone()
    }

    /// Edits the status in place.
    pub fn edit<T>(&self, f: impl FnOnce(&mut BackendStatus) -> T) -> T {
        f(&mut lock(&self.status))
    }

    pub fn set_active(&self, adapter: &impl Driven) {
        let mut s = lock(&self.status);
        let description = adapter.description();
        s.adapter = description.name.clone();
        s.version = description.version.clone();
        s.source = adapter.source().to_owned();
        s.hash = adapter.hash().to_owned();
        s.supports_tcp = description.supports_tcp;
        self.metrics.backend.in_sync.set(0);
        s.in_sync = false;
    }

    pub fn record_applied(&self, applied: &Applied, services: usize, took: Duration) {
        let revision = applied.revision;
        let refused: Vec<Refusal> = applied
            .refused
            .iter()
            .map(|r| Refusal {
                service: r.name.clone(),
                reason: r.reason.clone(),
            })
            .collect();
        let (adapter, new) = {
            let mut s = lock(&self.status);
            s.applied_revision = Some(revision);
            s.applied_at = Some(timestamp(SystemTime::now()));
            // In step means the whole desired state is live: a refused service is not.
            s.last_error = refusal_summary(&refused);
            s.in_sync = refused.is_empty();
            s.applies += 1;
            let new: Vec<Refusal> = refused
                .iter()
                .filter(|r| !s.refused.contains(r))
                .cloned()
                .collect();
            s.refused = refused.clone();
            (s.adapter.clone(), new)
        };
        self.metrics
            .backend
            .in_sync
            .set(i64::from(refused.is_empty()));
        self.metrics
            .backend
            .refused_services
            .set(i64::try_from(refused.len()).unwrap_or(i64::MAX));
        // Each refusal is told once, as a failure that retrying will not mend.
        for r in new {
            tracing::error!(adapter = %adapter, service = %r.service, reason = %r.reason, "the proxy refused this service; it runs every other one");
            self.bus.publish(Event::BackendFailed {
                adapter: adapter.clone(),
                revision,
                reason: format!("{}: {}", r.service, r.reason),
                retryable: false,
                service: Some(r.service),
            });
        }
        let result = if applied.writes > 0 {
            "ok"
        } else {
            "unchanged"
        };
        self.metrics
            .backend
            .applies
            .with_label_values(&[adapter.as_str(), result])
            .inc();
        self.metrics
            .backend
            .writes
            .with_label_values(&[adapter.as_str()])
            .inc_by(applied.writes.into());
        self.metrics
            .backend
            .apply_seconds
            .observe(took.as_secs_f64());
        self.bus.publish(Event::BackendApplied {
            adapter,
            revision,
            services,
            millis: took.as_secs_f64() * 1000.0,
        });
    }

    /// Records a failure; events and warnings only when the reason changes, so a proxy that
    /// stays down does not flood the log.
    pub fn record_failed(&self, revision: u64, error: &CallError) {
        let reason = error.to_string();
        let (adapter, new) = {
            let mut s = lock(&self.status);
            let new = s.last_error.as_deref() != Some(reason.as_str());
            s.last_error = Some(reason.clone());
            s.last_error_at = Some(timestamp(SystemTime::now()));
            s.in_sync = false;
            (s.adapter.clone(), new)
        };
        self.metrics.backend.in_sync.set(0);
        let result = match error {
            CallError::Adapter(AdapterError::Rejected(_)) => "rejected",
            CallError::Adapter(AdapterError::Retryable(_)) => "retryable",
            CallError::Fault { .. } | CallError::Gone => "fault",
        };
        self.metrics
            .backend
            .applies
            .with_label_values(&[adapter.as_str(), result])
            .inc();
        if new {
            if error.retryable() {
                tracing::warn!(adapter = %adapter, revision, error = %reason, "the proxy is not in step with the registry; retrying with backoff");
            } else {
                tracing::error!(adapter = %adapter, revision, error = %reason, "the proxy refused the configuration; it keeps its previous one");
            }
            self.bus.publish(Event::BackendFailed {
                adapter,
                revision,
                reason,
                retryable: error.retryable(),
                service: None,
            });
        }
    }

    /// A probe found the proxy running what was applied: in step, unless services were refused.
    pub fn record_confirmed(&self) {
        let in_sync = {
            let mut s = lock(&self.status);
            s.in_sync = s.refused.is_empty();
            s.last_error = refusal_summary(&s.refused);
            s.in_sync
        };
        self.metrics.backend.in_sync.set(i64::from(in_sync));
    }

    pub fn record_drift(&self, detail: &str) {
        let adapter = {
            let mut s = lock(&self.status);
            s.in_sync = false;
            s.adapter.clone()
        };
        tracing::warn!(adapter = %adapter, detail, "the proxy drifted from what Harbor applied; applying the full state again");
        self.metrics.backend.in_sync.set(0);
        self.metrics
            .backend
            .drifts
            .with_label_values(&[adapter.as_str()])
            .inc();
        self.bus.publish(Event::BackendDrift {
            adapter,
            detail: detail.to_owned(),
        });
    }
}

/// The error that refused services amount to, if any.
fn refusal_summary(refused: &[Refusal]) -> Option<String> {
    (!refused.is_empty()).then(|| {
        let each: Vec<String> = refused
            .iter()
            .map(|r| format!("{}: {}", r.service, r.reason))
            .collect();
        format!("the proxy refused {}", each.join("; "))
    })
}
