//! The proxy's Prometheus metrics, per route and upstream. Label lookups cost a hash and a lock
//! each, so the handles of a route's upstreams are resolved when its backend set changes and read
//! from an immutable map on the hot path; the series of upstreams that leave are removed, so
//! churning ephemeral instances do not grow `/metrics` without bound.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use crate::metrics::Metrics;
use crate::routing::Snapshot;

/// What went wrong, as the `kind` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NoRoute,
    NoHealthyUpstream,
    Connect,
    Timeout,
    Upstream,
    OverCapacity,
    IdleTimeout,
    BadRequest,
    /// A client too slow with its request's head or body (408).
    ClientTimeout,
    /// An upstream whose response body stopped arriving: cut.
    Stalled,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::NoHealthyUpstream => "no_healthy_upstream",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Upstream => "upstream",
            ErrorKind::OverCapacity => "over_capacity",
            ErrorKind::IdleTimeout => "idle_timeout",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::ClientTimeout => "client_timeout",
            ErrorKind::Stalled => "upstream_stalled",
        }
    }
}

pub struct ProxyMetrics {
    requests: IntCounterVec,
    connections: IntCounterVec,
    in_flight: IntGaugeVec,
    bytes: IntCounterVec,
    errors: IntCounterVec,
    retries: IntCounterVec,
    picks: IntCounterVec,
    healthy: IntGaugeVec,
    duration: HistogramVec,
    pub cut_at_shutdown: IntCounter,
    /// TLS handshakes on the HTTPS listener, by result (`ok`, `failed`, `timeout`).
    pub tls_handshakes: IntCounterVec,
    /// Live upstreams' handles, by service.
    handles: ArcSwap<HashMap<String, Arc<ServiceHandles>>>,
}

/// The handles of one route's upstreams, as of one backend set (held, so that its address
/// cannot be reused by another set while it is compared against).
struct ServiceHandles {
    set: Arc<crate::plugins::BackendSet>,
    upstreams: HashMap<String, Arc<UpstreamMetrics>>,
}

/// The metric handles of one upstream of one route.
pub struct UpstreamMetrics {
    pub requests_ok: IntCounter,
    pub requests_4xx: IntCounter,
    pub requests_5xx: IntCounter,
    pub connections: IntCounter,
    pub in_flight: IntGauge,
    pub bytes_in: IntCounter,
    pub bytes_out: IntCounter,
    pub picks: IntCounter,
    pub healthy: IntGauge,
    pub duration: Histogram,
}

impl UpstreamMetrics {
    pub fn count_status(&self, status: u16) {
        match status {
            500.. => self.requests_5xx.inc(),
            400..500 => self.requests_4xx.inc(),
            _ => self.requests_ok.inc(),
        }
    }
}

impl ProxyMetrics {
    pub fn new(registry: &Metrics) -> prometheus::Result<Self> {
        let up = &["service", "upstream"];
        let requests = IntCounterVec::new(
            Opts::new(
                "proxy_requests_total",
                "HTTP requests answered by an upstream, by status class",
            ),
            &["service", "upstream", "class"],
        )?;
        let connections = IntCounterVec::new(
            Opts::new(
                "proxy_connections_total",
                "TCP connections (and upgraded HTTP connections) made to an upstream",
            ),
            up,
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "proxy_in_flight",
                "Requests and connections in flight to an upstream",
            ),
            up,
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "proxy_bytes_total",
                "Bytes carried: in is from clients to the upstream, out is back",
            ),
            &["service", "upstream", "direction"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new("proxy_errors_total", "Proxy errors by route and kind"),
            &["service", "kind"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "proxy_retries_total",
                "Attempts on another upstream after a failed connect",
            ),
            &["service"],
        )?;
        let picks = IntCounterVec::new(
            Opts::new(
                "proxy_picks_total",
                "Upstreams chosen by the route's strategy",
            ),
            up,
        )?;
        let healthy = IntGaugeVec::new(
            Opts::new(
                "proxy_upstream_healthy",
                "1 when the upstream may get new work, 0 when a health check or cooldown holds it out",
            ),
            up,
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "proxy_request_duration_seconds",
                "Time from choosing an upstream to its response headers (HTTP) or to the connection's end (TCP)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
            up,
        )?;
        let cut_at_shutdown = IntCounter::new(
            "proxy_connections_cut_total",
            "Connections still open when the shutdown grace period ended",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(picks.clone()))?;
        registry.register(Box::new(healthy.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(cut_at_shutdown.clone()))?;
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "proxy_tls_handshakes_total",
                "TLS handshakes on the HTTPS listener, by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        Ok(Self {
            requests,
            connections,
            in_flight,
            bytes,
            errors,
            retries,
            picks,
            healthy,
            duration,
            cut_at_shutdown,
            tls_handshakes,
            handles: ArcSwap::default(),
        })
    }

    pub fn error(&self, service: &str, kind: ErrorKind) {
        self.errors
            .with_label_values(&[service, kind.as_str()])
            .inc();
    }

    pub fn retry(&self, service: &str) {
        self.retries.with_label_values(&[service]).inc();
    }

    /// The handles of one upstream: from the current map, or resolved now for an upstream that
    /// arrived after the last refresh.
    pub fn upstream(&self, service: &str, upstream: &str) -> Arc<UpstreamMetrics> {
        if let Some(found) = self
            .handles
            .load()
            .get(service)
            .and_then(|m| m.upstreams.get(upstream))
        {
            return found.clone();
        }
        Arc::new(self.resolve(service, upstream))
    }

    fn resolve(&self, service: &str, upstream: &str) -> UpstreamMetrics {
        let labels = [service, upstream];
        let class = |c: &str| self.requests.with_label_values(&[service, upstream, c]);
        let bytes = |d: &str| self.bytes.with_label_values(&[service, upstream, d]);
        UpstreamMetrics {
            requests_ok: class("2xx_3xx"),
            requests_4xx: class("4xx"),
            requests_5xx: class("5xx"),
            connections: self.connections.with_label_values(&labels),
            in_flight: self.in_flight.with_label_values(&labels),
            bytes_in: bytes("in"),
            bytes_out: bytes("out"),
            picks: self.picks.with_label_values(&labels),
            healthy: self.healthy.with_label_values(&labels),
            duration: self.duration.with_label_values(&labels),
        }
    }

    /// Resolves the handles of every upstream in `snapshot`, publishes their health, and drops
    /// the series of upstreams that are gone. A route whose backend set is the one of the last
    /// refresh keeps its handles untouched: under churn only the routes that changed cost
    /// anything.
    pub fn refresh(&self, snapshot: &Snapshot) {
        let old = self.handles.load_full();
        let mut next: HashMap<String, Arc<ServiceHandles>> = HashMap::new();
        for (name, route) in &snapshot.services {
            let set = route.balancer.backends();
            let before = old.get(name.as_str());
            if let Some(same) = before.filter(|h| Arc::ptr_eq(&h.set, &set)) {
                next.insert(name.to_string(), same.clone());
                continue;
            }
            let upstreams = set
                .backends
                .iter()
                .map(|backend| {
                    let handle = before
                        .and_then(|h| h.upstreams.get(&backend.address))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(self.resolve(name.as_str(), &backend.address)));
                    handle.healthy.set(i64::from(backend.healthy));
                    (backend.address.clone(), handle)
                })
                .collect();
            next.insert(
                name.to_string(),
                Arc::new(ServiceHandles { set, upstreams }),
            );
        }
        for (service, before) in old.iter() {
            let now = next.get(service);
            if now.is_some_and(|now| Arc::ptr_eq(now, before)) {
                continue;
            }
            for upstream in before.upstreams.keys() {
                if !now.is_some_and(|now| now.upstreams.contains_key(upstream)) {
                    self.forget(service, upstream);
                }
            }
        }
        self.handles.store(Arc::new(next));
    }

    fn forget(&self, service: &str, upstream: &str) {
        let labels = [service, upstream];
        for class in ["2xx_3xx", "4xx", "5xx"] {
            let _ = self
                .requests
                .remove_label_values(&[service, upstream, class]);
        }
        for direction in ["in", "out"] {
            let _ = self
                .bytes
                .remove_label_values(&[service, upstream, direction]);
        }
        let _ = self.connections.remove_label_values(&labels);
        let _ = self.in_flight.remove_label_values(&labels);
        let _ = self.picks.remove_label_values(&labels);
        let _ = self.healthy.remove_label_values(&labels);
        let _ = self.duration.remove_label_values(&labels);
    }
}
