//! A candidate strategy run beside a route's live one: on every first try it picks from the same
//! backends with the same sequence number, random bits and hash key, and its answer is compared
//! with the live one and counted, never used. A candidate that faults is taken out of service by
//! its own breaker, and its requests are the live strategy's all along.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec};
use serde::Serialize;

use super::balancer::BackendSet;
use super::catalog::Slot;

/// The counters shadows report into: compared picks by outcome, and picks per upstream by side.
#[derive(Clone)]
pub struct ShadowMetrics {
    /// `service`, `shadow`, `outcome` (`agree`, `disagree`, `no_answer`).
    pub picks: IntCounterVec,
    /// `service`, `side` (`live`, `shadow`), `upstream`.
    pub upstream_picks: IntCounterVec,
}

pub struct Shadow {
    pub slot: Arc<Slot>,
    service: String,
    metrics: ShadowMetrics,
    agreed: IntCounter,
    disagreed: IntCounter,
    unanswered: IntCounter,
    /// Per-upstream counters, in the order of the backend set they were made for.
    per_set: ArcSwap<PerSet>,
    /// Picks compared since this shadow was set, and how many agreed (the metrics' counters
    /// outlive a shadow that is removed and set again).
    compared: AtomicU64,
    agreements: AtomicU64,
}

struct PerSet {
    version: u64,
    live: Vec<IntCounter>,
    shadow: Vec<IntCounter>,
    addresses: Vec<String>,
    /// This shadow's own counts, per upstream: (live, shadow).
    counts: Vec<(AtomicU64, AtomicU64)>,
}

/// What a shadow has seen, as the service's API view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowReport {
    pub strategy: String,
    /// First tries both strategies answered.
    pub picks: u64,
    /// Of those, how many chose the same upstream.
    pub agreed: u64,
    /// `agreed / picks`, if there were any.
    pub agreement: Option<f64>,
    /// Each upstream of the current backend set, with the share of picks each side sent it.
    pub upstreams: Vec<ShadowShare>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShadowShare {
    pub address: String,
    pub live: u64,
    pub shadow: u64,
}

impl Shadow {
    pub fn new(slot: Arc<Slot>, service: &str, metrics: ShadowMetrics) -> Self {
        let outcome = |o: &str| {
            metrics
                .picks
                .with_label_values(&[service, slot.name.as_str(), o])
        };
        Self {
            agreed: outcome("agree"),
            disagreed: outcome("disagree"),
            unanswered: outcome("no_answer"),
            per_set: ArcSwap::from_pointee(PerSet {
                version: u64::MAX,
                live: Vec::new(),
                shadow: Vec::new(),
                addresses: Vec::new(),
                counts: Vec::new(),
            }),
            service: service.to_owned(),
            metrics,
            slot,
            compared: AtomicU64::new(0),
            agreements: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// Counts one first try: the live strategy's choice and the shadow's (`None` when it could
    /// not answer).
    pub(super) fn record(&self, set: &BackendSet, live: usize, shadow: Option<usize>) {
        let per_set = self.per_set_for(set);
        let count = |side: &[IntCounter], i: usize| {
            if let Some(c) = side.get(i) {
                c.inc();
            }
        };
        count(&per_set.live, live);
        if let Some((l, _)) = per_set.counts.get(live) {
            l.fetch_add(1, Ordering::Relaxed);
        }
        let Some(shadow) = shadow else {
            self.unanswered.inc();
            return;
        };
        count(&per_set.shadow, shadow);
        if let Some((_, s)) = per_set.counts.get(shadow) {
            s.fetch_add(1, Ordering::Relaxed);
        }
        self.compared.fetch_add(1, Ordering::Relaxed);
        if shadow == live {
            self.agreed.inc();
            self.agreements.fetch_add(1, Ordering::Relaxed);
        } else {
            self.disagreed.inc();
        }
    }

    /// The per-upstream counters for `set`, made afresh (and the counts carried over by
    /// address) when the set changed.
    fn per_set_for(&self, set: &BackendSet) -> Arc<PerSet> {
        let current = self.per_set.load_full();
        if current.version == set.version {
            return current;
        }
        let counter = |side: &str, address: &str| {
            self.metrics
                .upstream_picks
                .with_label_values(&[self.service.as_str(), side, address])
        };
        let addresses: Vec<String> = set.backends.iter().map(|b| b.address.clone()).collect();
        let carried = |address: &String| {
            current
                .addresses
                .iter()
                .position(|a| a == address)
                .and_then(|i| current.counts.get(i))
                .map_or((0, 0), |(l, s)| {
                    (l.load(Ordering::Relaxed), s.load(Ordering::Relaxed))
                })
        };
        let next = Arc::new(PerSet {
            version: set.version,
            live: addresses.iter().map(|a| counter("live", a)).collect(),
            shadow: addresses.iter().map(|a| counter("shadow", a)).collect(),
            counts: addresses
                .iter()
                .map(|a| {
                    let (l, s) = carried(a);
                    (AtomicU64::new(l), AtomicU64::new(s))
                })
                .collect(),
            addresses,
        });
        // Two threads may both make one for a new set; either serves, and the counts a losing
        // one took are few and only this shadow's own view.
        self.per_set.store(next.clone());
        next
    }

    pub fn report(&self) -> ShadowReport {
        let picks = self.compared.load(Ordering::Relaxed);
        let agreed = self.agreements.load(Ordering::Relaxed);
        let per_set = self.per_set.load();
        ShadowReport {
            strategy: self.slot.name.clone(),
            picks,
            agreed,
            agreement: (picks > 0).then(|| agreed as f64 / picks as f64),
            upstreams: per_set
                .addresses
                .iter()
                .zip(&per_set.counts)
                .map(|(address, (l, s))| ShadowShare {
                    address: address.clone(),
                    live: l.load(Ordering::Relaxed),
                    shadow: s.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }
}
