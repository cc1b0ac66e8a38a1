//! Typed events and the bus that carries them: a bounded ring of recent events ([`Ring`]) that
//! a subscriber reads from its own cursor ([`Follower`]), so that a live stream and a resumed
//! one (`Last-Event-ID`) are the same code, and a subscriber that falls too far behind is told
//! to start again from a snapshot.

mod follower;
mod ring;

pub use follower::{Follower, Publishes};
pub use ring::{Feed, Ring, Since};

use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::model::{InstanceId, InstanceView, LeaseView, ServiceName, ServiceView, UpstreamAddr};

/// A change in Harbor's state. Services events carry the whole service as it now is, so a
/// consumer can upsert by name; instance events say what happened to one instance.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    ServiceAdded {
        service: ServiceView,
    },
    ServiceUpdated {
        service: ServiceView,
    },
    ServiceRemoved {
        name: ServiceName,
    },
    InstanceRegistered {
        name: ServiceName,
        instance: InstanceView,
    },
    InstanceRenewed {
        name: ServiceName,
        id: InstanceId,
        lease: LeaseView,
    },
    InstanceExpired {
        name: ServiceName,
        id: InstanceId,
        upstream: UpstreamAddr,
    },
    InstanceDeregistered {
        name: ServiceName,
        id: InstanceId,
        upstream: UpstreamAddr,
        reason: DeregisterReason,
    },
    RouteFileError {
        #[serde(flatten)]
        error: RouteFileError,
    },
    RouteFileRecovered {
        file: String,
    },
    StateFileError {
        file: String,
        reason: String,
    },
    /// Changes cannot be saved: mutations are refused (`503`) until they can again.
    StateWriteFailed {
        reason: String,
    },
    /// Changes are saved again.
    StateWriteRecovered,
    /// A version is being compiled and checked; `plugin_loaded` or `plugin_rejected` follows.
    /// `name` is the name it was uploaded under, or its file where none is known yet.
    PluginCompiling {
        name: String,
        hash: String,
        source: String,
    },
    PluginLoaded {
        name: String,
        version: String,
        hash: String,
        source: String,
    },
    PluginRejected {
        source: String,
        reason: String,
    },
    PluginFault {
        name: String,
        fault: crate::plugins::FaultKind,
        message: String,
    },
    PluginDisabled {
        name: String,
        seconds: f64,
    },
    PluginRemoved {
        name: String,
    },
    StrategyChanged {
        name: ServiceName,
        strategy: String,
    },
    /// An upstream of a service went down or came back (health check or connect cooldown).
    UpstreamHealth {
        name: ServiceName,
        upstream: String,
        healthy: bool,
    },
    /// The proxy was brought to a registry revision.
    BackendApplied {
        adapter: String,
        revision: u64,
        services: usize,
        millis: f64,
    },
    /// Bringing the proxy to a revision failed; `retryable` says whether Harbor keeps trying.
    BackendFailed {
        adapter: String,
        revision: u64,
        reason: String,
        retryable: bool,
        /// The one service the proxy refused, when the failure is that (the rest applied).
        #[serde(skip_serializing_if = "Option::is_none")]
        service: Option<String>,
    },
    /// The proxy no longer runs what Harbor applied (restarted, reloaded, edited by hand).
    BackendDrift {
        adapter: String,
        detail: String,
    },
    /// Another adapter took over; `released` when the old one removed its configuration.
    BackendSwapped {
        from: String,
        to: String,
        version: String,
        released: bool,
    },
    /// A new adapter was refused; the current one keeps serving.
    BackendSwapFailed {
        source: String,
        reason: String,
    },
    /// A service is not served over HTTPS as asked, or not with a fresh certificate (files
    /// that fail their check, a CA that cannot issue); it keeps serving as it can.
    TlsProblem {
        service: String,
        reason: String,
    },
    /// How many services lack the certificate they ask for, when that changes.
    TlsStatus {
        problems: usize,
    },
}

impl Event {
    /// Whether the event changes which backends a service routes to, or how.
    pub fn changes_routing(&self) -> bool {
        matches!(
            self,
            Event::ServiceAdded { .. }
                | Event::ServiceUpdated { .. }
                | Event::ServiceRemoved { .. }
                | Event::InstanceRegistered { .. }
                | Event::InstanceExpired { .. }
                | Event::InstanceDeregistered { .. }
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Event::ServiceAdded { .. } => "service_added",
            Event::ServiceUpdated { .. } => "service_updated",
            Event::ServiceRemoved { .. } => "service_removed",
            Event::InstanceRegistered { .. } => "instance_registered",
            Event::InstanceRenewed { .. } => "instance_renewed",
            Event::InstanceExpired { .. } => "instance_expired",
            Event::InstanceDeregistered { .. } => "instance_deregistered",
            Event::RouteFileError { .. } => "route_file_error",
            Event::RouteFileRecovered { .. } => "route_file_recovered",
            Event::StateFileError { .. } => "state_file_error",
            Event::StateWriteFailed { .. } => "state_write_failed",
            Event::StateWriteRecovered => "state_write_recovered",
            Event::PluginCompiling { .. } => "plugin_compiling",
            Event::PluginLoaded { .. } => "plugin_loaded",
            Event::PluginRejected { .. } => "plugin_rejected",
            Event::PluginFault { .. } => "plugin_fault",
            Event::PluginDisabled { .. } => "plugin_disabled",
            Event::PluginRemoved { .. } => "plugin_removed",
            Event::StrategyChanged { .. } => "strategy_changed",
            Event::UpstreamHealth { .. } => "upstream_health",
            Event::BackendApplied { .. } => "backend_applied",
            Event::BackendFailed { .. } => "backend_failed",
            Event::BackendDrift { .. } => "backend_drift",
            Event::BackendSwapped { .. } => "backend_swapped",
            Event::BackendSwapFailed { .. } => "backend_swap_failed",
            Event::TlsProblem { .. } => "tls_problem",
            Event::TlsStatus { .. } => "tls_status",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeregisterReason {
    /// The client asked for it.
    Request,
    /// A static route file now declares the same service name.
    ReplacedByStatic,
}

/// Why a route file is not in force, with the place in the file where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteFileError {
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for RouteFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.reason)
    }
}

/// One published event with its id. The JSON is rendered once, by whichever subscriber asks
/// first.
#[derive(Debug)]
pub struct Envelope {
    pub id: u64,
    pub event: Event,
    json: OnceLock<String>,
}

impl Envelope {
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| {
            serde_json::to_string(&self.event).unwrap_or_else(|e| {
                tracing::error!(error = %e, "event could not be rendered as JSON");
                String::from("{}")
            })
        })
    }
}

pub struct EventBus {
    feed: Feed<Envelope>,
}

impl EventBus {
    /// Ids start from the wall clock in microseconds, so they keep increasing across restarts and
    /// a client resuming with an id from an earlier run is recognised as being behind.
    pub fn new(capacity: usize) -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Self {
            feed: Feed::new(start, capacity),
        }
    }

    pub fn publish(&self, event: Event) -> u64 {
        tracing::debug!(event = event.kind(), "event");
        self.feed.push(|id| Envelope {
            id,
            event,
            json: OnceLock::new(),
        })
    }

    pub fn last_id(&self) -> u64 {
        self.feed.last_id()
    }

    /// A receiver that wakes when something is published.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.feed.watch()
    }

    pub fn since(&self, cursor: u64) -> Since<Envelope> {
        self.feed.since(cursor)
    }
}

impl Publishes for EventBus {
    type Entry = Envelope;

    fn feed(&self) -> &Feed<Envelope> {
        &self.feed
    }
}

/// Locks a mutex, carrying on with the data if a panicking thread poisoned it: every critical
/// section in Harbor leaves its data consistent at each step, so the data stays usable.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removed(name: &str) -> Event {
        Event::ServiceRemoved {
            name: ServiceName::parse(name).unwrap(),
        }
    }

    fn ids(since: Since<Envelope>) -> Vec<u64> {
        match since {
            Since::Events(v) => v.iter().map(|e| e.id).collect(),
            Since::Gap => panic!("unexpected gap"),
        }
    }

    #[test]
    fn resumes_from_any_cursor_in_the_ring() {
        let bus = EventBus::new(3);
        let start = bus.last_id();
        let a = bus.publish(removed("a"));
        let b = bus.publish(removed("b"));
        assert_eq!(ids(bus.since(start)), vec![a, b]);
        assert_eq!(ids(bus.since(a)), vec![b]);
        assert!(ids(bus.since(b)).is_empty());
        assert!(a > start && b == a + 1);
    }

    #[test]
    fn a_cursor_behind_the_ring_or_from_the_future_is_a_gap() {
        let bus = EventBus::new(2);
        let start = bus.last_id();
        for n in ["a", "b", "c"] {
            bus.publish(removed(n));
        }
        assert!(matches!(bus.since(start), Since::Gap));
        assert_eq!(ids(bus.since(start + 1)), vec![start + 2, start + 3]);
        assert!(matches!(bus.since(start + 10), Since::Gap));
    }

    #[test]
    fn a_new_bus_starts_after_ids_of_an_earlier_one() {
        let first = EventBus::new(8);
        let id = first.publish(removed("a"));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = EventBus::new(8);
        assert!(second.last_id() > id);
        assert!(matches!(second.since(id), Since::Gap));
    }

    #[test]
    fn renewals_and_plugin_events_do_not_change_routing() {
        let name = ServiceName::parse("a").unwrap();
        assert!(removed("a").changes_routing());
        let renewed = Event::InstanceRenewed {
            name,
            id: InstanceId::random(),
            lease: LeaseView::new(std::time::Duration::from_secs(1), SystemTime::now()),
        };
        assert!(!renewed.changes_routing());
        assert!(!Event::PluginRemoved { name: "x".into() }.changes_routing());
    }

    #[test]
    fn events_render_with_their_type() {
        let bus = EventBus::new(2);
        bus.publish(removed("a"));
        let Since::Events(v) = bus.since(bus.last_id() - 1) else {
            panic!("gap")
        };
        assert_eq!(v[0].json(), r#"{"type":"service_removed","name":"a"}"#);
    }
}
