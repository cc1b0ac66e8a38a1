//! Prometheus metrics: one registry per daemon (so daemons started side by side in tests keep
//! their own counts), rendered in the text exposition format.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, TextEncoder,
};

use crate::registry::Counts;

pub struct Metrics {
    registry: prometheus::Registry,
    pub services: IntGaugeVec,
    pub instances: IntGauge,
    pub route_file_errors_active: IntGauge,
    pub leases_granted: IntCounter,
    pub leases_renewed: IntCounter,
    pub leases_expired: IntCounter,
    pub instances_deregistered: IntCounter,
    pub lease_expiry_lateness: Histogram,
    pub route_file_errors: IntCounter,
    pub api_requests: IntCounterVec,
    pub plugin_faults: IntCounterVec,
    pub plugin_fallback_picks: IntCounterVec,
    pub plugin_loads: IntCounterVec,
    /// ACME orders, by result (`issued`, `failed`).
    pub acme_orders: IntCounterVec,
    pub plugin_pick_seconds: HistogramVec,
    /// Guest stores alive: every instance, on every thread, with its memory.
    plugin_stores: IntGauge,
    pub shadow: crate::plugins::ShadowMetrics,
    pub backend: BackendMetrics,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let registry = prometheus::Registry::new_custom(Some("harbor".to_owned()), None)?;
        let services = IntGaugeVec::new(
            Opts::new("services", "Services in the registry, by kind"),
            &["kind"],
        )?;
        let instances = IntGauge::new("instances", "Live ephemeral instances")?;
        let route_file_errors_active = IntGauge::new(
            "route_file_errors_active",
            "Route files currently rejected (their last good version is in force)",
        )?;
        let leases_granted =
            IntCounter::new("leases_granted_total", "Leases granted to new instances")?;
        let leases_renewed = IntCounter::new(
            "leases_renewed_total",
            "Lease renewals, including idempotent re-registrations",
        )?;
        let leases_expired = IntCounter::new(
            "leases_expired_total",
            "Instances removed because their lease ran out",
        )?;
        let instances_deregistered = IntCounter::new(
            "instances_deregistered_total",
            "Instances removed on request",
        )?;
        let lease_expiry_lateness = Histogram::with_opts(
            HistogramOpts::new(
                "lease_expiry_lateness_seconds",
                "Time from a lease's deadline to the instance's removal",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?;
        let route_file_errors =
            IntCounter::new("route_file_errors_total", "Route file versions rejected")?;
        let api_requests = IntCounterVec::new(
            Opts::new("api_requests_total", "API requests by method and status"),
            &["method", "status"],
        )?;
        let plugin_faults = IntCounterVec::new(
            Opts::new(
                "plugin_faults_total",
                "Strategy plugin calls that trapped, timed out, ran out of memory or answered wrongly",
            ),
            &["plugin", "kind"],
        )?;
        let plugin_fallback_picks = IntCounterVec::new(
            Opts::new(
                "plugin_fallback_picks_total",
                "Picks made by the host's round-robin because the strategy could not answer",
            ),
            &["plugin"],
        )?;
        let plugin_loads = IntCounterVec::new(
            Opts::new("plugin_loads_total", "Plugin components checked, by result"),
            &["result"],
        )?;
        let plugin_pick_seconds = HistogramVec::new(
            HistogramOpts::new(
                "plugin_pick_seconds",
                "Time of each pick that called into a strategy (a plan's answers call nothing)",
            )
            .buckets(vec![
                1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                0.01, 0.02,
            ]),
            &["plugin"],
        )?;
        let plugin_stores = IntGauge::new(
            "plugin_stores",
            "Strategy instances alive in this process (every thread's, the checks' and those being made), each with its memory",
        )?;
        registry.register(Box::new(plugin_stores.clone()))?;
        let shadow = crate::plugins::ShadowMetrics {
            picks: IntCounterVec::new(
                Opts::new(
                    "strategy_shadow_picks_total",
                    "First tries a shadow strategy was asked about beside the live one: agree, disagree or no_answer",
                ),
                &["service", "shadow", "outcome"],
            )?,
            upstream_picks: IntCounterVec::new(
                Opts::new(
                    "strategy_shadow_upstream_picks_total",
                    "First tries of a service with a shadow, by upstream, as the live strategy picked (side=live) and as the shadow would have (side=shadow)",
                ),
                &["service", "side", "upstream"],
            )?,
        };
        registry.register(Box::new(shadow.picks.clone()))?;
        registry.register(Box::new(shadow.upstream_picks.clone()))?;
        let backend = BackendMetrics::new(&registry)?;
        registry.register(Box::new(plugin_pick_seconds.clone()))?;
        registry.register(Box::new(plugin_faults.clone()))?;
        registry.register(Box::new(plugin_fallback_picks.clone()))?;
        registry.register(Box::new(plugin_loads.clone()))?;
        let acme_orders = IntCounterVec::new(
            Opts::new(
                "acme_orders_total",
                "ACME certificate orders (issuance and renewal), by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(acme_orders.clone()))?;
        registry.register(Box::new(services.clone()))?;
        registry.register(Box::new(instances.clone()))?;
        registry.register(Box::new(route_file_errors_active.clone()))?;
        registry.register(Box::new(leases_granted.clone()))?;
        registry.register(Box::new(leases_renewed.clone()))?;
        registry.register(Box::new(leases_expired.clone()))?;
        registry.register(Box::new(instances_deregistered.clone()))?;
        registry.register(Box::new(lease_expiry_lateness.clone()))?;
        registry.register(Box::new(route_file_errors.clone()))?;
        registry.register(Box::new(api_requests.clone()))?;
        Ok(Self {
            registry,
            services,
            instances,
            route_file_errors_active,
            leases_granted,
            leases_renewed,
            leases_expired,
            instances_deregistered,
            lease_expiry_lateness,
            route_file_errors,
            api_requests,
            plugin_faults,
            plugin_fallback_picks,
            plugin_loads,
            acme_orders,
            plugin_pick_seconds,
            plugin_stores,
            shadow,
            backend,
        })
    }

    /// Adds a collector owned elsewhere (the proxy's, for instance) to this daemon's registry.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// Renders every metric, with the gauges read from the registry's current counts.
    pub fn render(&self, counts: Counts) -> String {
        self.services
            .with_label_values(&["static"])
            .set(counts.static_services as i64);
        self.services
            .with_label_values(&["ephemeral"])
            .set(counts.ephemeral_services as i64);
        self.instances.set(counts.instances as i64);
        self.plugin_stores.set(crate::plugins::live_stores());
        self.route_file_errors_active
            .set(counts.route_errors as i64);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "metrics could not be rendered");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The dispatcher's metrics: applies, drift, swaps, and whether the proxy is in step.
pub struct BackendMetrics {
    pub applies: IntCounterVec,
    pub apply_seconds: Histogram,
    pub drifts: IntCounterVec,
    pub swaps: IntCounterVec,
    pub in_sync: IntGauge,
    pub refused_services: IntGauge,
    pub writes: IntCounterVec,
}

impl BackendMetrics {
    fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let applies = IntCounterVec::new(
            Opts::new(
                "backend_applies_total",
                "Desired states given to the backend adapter, by result (ok: the proxy was written; unchanged: it already ran the state; retryable, rejected, fault)",
            ),
            &["adapter", "result"],
        )?;
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "backend_apply_seconds",
                "Time a successful apply took, including the proxy's own reload",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let drifts = IntCounterVec::new(
            Opts::new(
                "backend_drift_total",
                "Times the proxy was found not running what Harbor applied",
            ),
            &["adapter"],
        )?;
        let swaps = IntCounterVec::new(
            Opts::new("backend_swaps_total", "Backend adapter swaps, by result"),
            &["result"],
        )?;
        let in_sync = IntGauge::new(
            "backend_in_sync",
            "1 when the proxy runs the registry's last applied state",
        )?;
        registry.register(Box::new(applies.clone()))?;
        registry.register(Box::new(apply_seconds.clone()))?;
        registry.register(Box::new(drifts.clone()))?;
        registry.register(Box::new(swaps.clone()))?;
        let refused_services = IntGauge::new(
            "backend_refused_services",
            "Services the proxy refused and Harbor left out of its configuration",
        )?;
        registry.register(Box::new(in_sync.clone()))?;
        let writes = IntCounterVec::new(
            Opts::new(
                "backend_writes_total",
                "Configuration writes the proxy received (Caddy reloads, Envoy files), as opposed to applies that found it already in step",
            ),
            &["adapter"],
        )?;
        registry.register(Box::new(refused_services.clone()))?;
        registry.register(Box::new(writes.clone()))?;
        Ok(Self {
            applies,
            apply_seconds,
            drifts,
            swaps,
            in_sync,
            refused_services,
            writes,
        })
    }
}
