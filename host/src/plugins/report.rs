//! What the plugin runtime tells the rest of Harbor: events on the bus and metrics.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::events::{Event, EventBus};
use crate::metrics::Metrics;
use crate::model::StrategyName;

/// How a guest call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The guest trapped (a panic, an unreachable, a bad memory access).
    Trap,
    /// The guest ran past its deadline and was interrupted.
    Timeout,
    /// The guest tried to grow its memory past the cap.
    Memory,
    /// The guest answered something it may not (an index out of range or excluded, or no
    /// backend while healthy ones were left).
    BadAnswer,
    /// The guest's picks were over its pick budget.
    Slow,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Trap => "trap",
            FaultKind::Timeout => "timeout",
            FaultKind::Memory => "memory",
            FaultKind::BadAnswer => "bad_answer",
            FaultKind::Slow => "slow",
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub struct Reporter {
    bus: Arc<EventBus>,
    metrics: Arc<Metrics>,
}

impl Reporter {
    pub fn new(bus: Arc<EventBus>, metrics: Arc<Metrics>) -> Self {
        Self { bus, metrics }
    }

    pub fn fault(&self, name: &StrategyName, kind: FaultKind, message: &str) {
        tracing::warn!(plugin = %name, kind = %kind, message, "strategy plugin fault; the pick fell back to round-robin");
        self.metrics
            .plugin_faults
            .with_label_values(&[name.as_str(), kind.as_str()])
            .inc();
        self.bus.publish(Event::PluginFault {
            name: name.to_string(),
            fault: kind,
            message: message.to_owned(),
        });
    }

    pub fn disabled(&self, name: &StrategyName, backoff: Duration) {
        tracing::error!(plugin = %name, backoff = ?backoff, "strategy plugin keeps failing; out of service for a while");
        self.bus.publish(Event::PluginDisabled {
            name: name.to_string(),
            seconds: backoff.as_secs_f64(),
        });
    }

    /// The histogram a plugin's guest picks are timed into.
    pub fn pick_times(&self, name: &StrategyName) -> prometheus::Histogram {
        self.metrics
            .plugin_pick_seconds
            .with_label_values(&[name.as_str()])
    }

    pub fn fell_back(&self, name: &StrategyName) {
        self.fell_back_name(name.as_str());
    }

    pub fn fell_back_name(&self, name: &str) {
        self.metrics
            .plugin_fallback_picks
            .with_label_values(&[name])
            .inc();
    }

    pub fn loaded(&self, name: &str, version: &str, hash: &str, source: &str) {
        tracing::info!(plugin = name, version, source, "strategy plugin loaded");
        self.metrics
            .plugin_loads
            .with_label_values(&["loaded"])
            .inc();
        self.bus.publish(Event::PluginLoaded {
            name: name.to_owned(),
            version: version.to_owned(),
            hash: hash.to_owned(),
            source: source.to_owned(),
        });
    }

    pub fn compiling(&self, key: &str, hash: &str, source: &str) {
        tracing::info!(plugin = key, source, "strategy plugin compiling");
        self.bus.publish(Event::PluginCompiling {
            name: key.to_owned(),
            hash: hash.to_owned(),
            source: source.to_owned(),
        });
    }

    pub fn rejected(&self, source: &str, reason: &str) {
        tracing::warn!(
            source,
            reason,
            "strategy plugin rejected; the previous version (if any) keeps serving"
        );
        self.metrics
            .plugin_loads
            .with_label_values(&["rejected"])
            .inc();
        self.bus.publish(Event::PluginRejected {
            source: source.to_owned(),
            reason: reason.to_owned(),
        });
    }

    pub fn removed(&self, name: &str) {
        tracing::info!(plugin = name, "strategy plugin removed");
        self.bus.publish(Event::PluginRemoved {
            name: name.to_owned(),
        });
    }
}
