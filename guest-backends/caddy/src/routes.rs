//! The desired state as Caddy JSON: one route per HTTP service, most specific path first, each
//! a `reverse_proxy` with the service's upstreams and the load-balancing policy nearest to its
//! strategy.
//!
//! Services whose instances all have IPv4 addresses take their upstreams from Harbor's DNS
//! responder (`dynamic_upstreams`), so instance churn and health changes need no reload; Harbor
//! runs their health checks itself and leaves failing instances out of its answers (Caddy runs
//! active checks only on static upstreams). Round-robin, least-connections and random services
//! ask for a rotating window of their instances (`aperture`), because Caddy 2.6 works through
//! every upstream of an answer on every request. Services whose policy ties a client to an
//! instance (hashing, first) need every instance in view: when one DNS answer cannot hold them
//! they are split into partitions, listed as one `multi` source. The others get static upstreams
//! and Caddy's own active checks.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Value, json};

/// The adapter's settings (the JSON given to `configure`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The `@id` of Harbor's container route.
    pub route_id: String,
    /// The server to insert into; when empty, the server listening on `listen`.
    pub server: String,
    /// The address of the server Harbor creates when no server listens there.
    pub listen: String,
    /// Retries of a failed upstream connection.
    pub retries: u32,
    /// Harbor's DNS responder (`ip:port`); when set, services whose instances all have IPv4
    /// addresses get `dynamic_upstreams` from it, so instance churn needs no reload.
    pub upstream_dns: String,
    /// The zone the responder answers for.
    pub dns_zone: String,
    /// How long Caddy keeps an answer.
    pub dns_refresh: String,
    /// Most instances one DNS answer carries (it must fit one UDP packet); a service with more
    /// is split into partitions.
    pub dns_max: usize,
    /// Most instances of a round-robin, least-connections or random service that one answer
    /// names; successive answers rotate through the rest. 0 names them all, in partitions.
    pub aperture: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            route_id: "harbor".into(),
            server: String::new(),
            listen: "127.0.0.1:8080".into(),
            retries: 2,
            upstream_dns: String::new(),
            dns_zone: "svc.harbor.".into(),
            dns_refresh: "100ms".into(),
            dns_max: 40,
            aperture: 4,
        }
    }
}

impl Settings {
    pub fn parse(json: &str) -> Result<Self, String> {
        let json = if json.trim().is_empty() { "{}" } else { json };
        let s: Settings =
            serde_json::from_str(json).map_err(|e| format!("caddy adapter settings: {e}"))?;
        let id_ok = !s.route_id.is_empty()
            && s.route_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if !id_ok {
            return Err(format!(
                "route_id {:?} must be letters, digits, '-' or '_'",
                s.route_id
            ));
        }
        if s.listen
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!("listen {:?} must be HOST:PORT", s.listen));
        }
        Ok(s)
    }
}

pub use harbor_adapter_common::{Health, Service};

/// What the Caddy being driven understands, learned from its rejections (Caddy 2.6 has neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The `weighted_round_robin` selection policy (Caddy 2.7+).
    pub weighted: bool,
    /// `passes` / `fails` thresholds on active health checks (Caddy 2.7+).
    pub thresholds: bool,
}

impl Default for Features {
    fn default() -> Self {
        Self {
            weighted: true,
            thresholds: true,
        }
    }
}

/// How many DNS partitions each dynamic service has, by name: what is live, so that instance churn
/// keeps the count (and so the configuration) unchanged while it still fits.
pub type Partitions = HashMap<String, usize>;

/// The partition counts in `routes` as last written.
pub fn partitions_of(routes: &Value) -> Partitions {
    let mut partitions = Partitions::new();
    for route in routes.as_array().into_iter().flatten() {
        let Some(name) = route["group"]
            .as_str()
            .and_then(|g| g.strip_prefix("harbor-"))
        else {
            continue;
        };
        let source = &route["handle"][0]["dynamic_upstreams"];
        let count = match source["source"].as_str() {
            Some("multi") => source["sources"].as_array().map_or(0, Vec::len),
            Some(_) => 1,
            None => continue,
        };
        partitions.insert(name.to_owned(), count);
    }
    partitions
}

/// The partition count for `n` instances: the live one while every partition is non-empty and fits one
/// answer, else enough partitions to fill each to three quarters.
fn partition_count(n: usize, live: Option<usize>, max: usize) -> usize {
    let max = max.max(1);
    match live {
        Some(k) if k >= 1 && k <= n && n <= k * max => k,
        _ => n.div_ceil((max * 3 / 4).max(1)).max(1),
    }
}

/// Caddy's selection policy for a Harbor strategy. Caddy 2.6 has no weighted round-robin, so
/// weights are honoured only where `weighted` is true (a newer Caddy).
pub fn selection_policy(strategy: &str, weights: &[u32], weighted: bool) -> Value {
    match strategy {
        "weighted-round-robin" if weighted => {
            json!({"policy": "weighted_round_robin", "weights": weights})
        }
        "round-robin" | "weighted-round-robin" => json!({"policy": "round_robin"}),
        "least-connections" | "least-request" | "peak-ewma" => json!({"policy": "least_conn"}),
        "random" => json!({"policy": "random"}),
        "first" => json!({"policy": "first"}),
        "consistent-hash" => json!({"policy": "ip_hash"}),
        // A custom strategy: the nearest Caddy has to Harbor's default.
        _ => json!({"policy": "round_robin"}),
    }
}

/// The routes for `services`, in the order Caddy should try them.
pub fn routes(
    services: &[Service<'_>],
    settings: &Settings,
    features: Features,
    live: &Partitions,
) -> Vec<Value> {
    let mut ordered: Vec<&Service<'_>> = services.iter().collect();
    // Longer path prefixes first, so `/api` wins over `/` on the same host.
    ordered.sort_by(|a, b| {
        b.path_prefix
            .len()
            .cmp(&a.path_prefix.len())
            .then_with(|| a.name.cmp(b.name))
    });
    ordered
        .iter()
        .map(|s| route(s, settings, features, live.get(s.name).copied()))
        .collect()
}

fn route(s: &Service<'_>, settings: &Settings, features: Features, live: Option<usize>) -> Value {
    let mut matcher = serde_json::Map::new();
    if !s.hosts.is_empty() {
        matcher.insert("host".into(), json!(s.hosts));
    }
    if s.path_prefix != "/" && !s.path_prefix.is_empty() {
        let base = s.path_prefix.trim_end_matches('/');
        matcher.insert("path".into(), json!([base, format!("{base}/*")]));
    }
    let dynamic = !settings.upstream_dns.is_empty()
        && !s.upstreams.is_empty()
        && s.upstreams
            .iter()
            .all(|(a, _)| a.parse::<std::net::SocketAddrV4>().is_ok());
    let passive = json!({"fail_duration": "5s", "max_fails": 3});
    let handler = if dynamic {
        let resolver = json!({"addresses": [format!("udp/{}", settings.upstream_dns)]});
        let srv = |name: String| {
            json!({
                "source": "srv",
                "name": name,
                "refresh": settings.dns_refresh,
                "resolver": resolver,
            })
        };
        let zone = format!("{}.{}", s.name, settings.dns_zone);
        let policy = selection_policy(s.strategy, &[], false);
        let round_robin = policy["policy"] == "round_robin";
        let affinity = !matches!(
            policy["policy"].as_str(),
            Some("round_robin" | "least_conn" | "random")
        );
        let window = settings.aperture.min(settings.dns_max);
        let k = partition_count(s.upstreams.len(), live, settings.dns_max);
        let source = if window > 0 && !affinity {
            // One source whatever the size, so a growing service never re-partitions (reloads).
            srv(format!("_a{window}.{zone}"))
        } else if k == 1 {
            srv(zone)
        } else {
            let partitions = (0..k).map(|i| srv(format!("_{i}-{k}.{zone}"))).collect();
            json!({"source": "multi", "sources": Value::Array(partitions)})
        };
        let mut handler = json!({
            "handler": "reverse_proxy",
            "dynamic_upstreams": source,
            // SRV targets are names in Harbor's zone: they resolve through it too.
            "transport": {"protocol": "http", "resolver": resolver},
            "load_balancing": {
                "selection_policy": policy,
                "retries": settings.retries,
            },
        });
        // Caddy 2.6 provisions every dynamic upstream on every request, and with passive checks
        // that includes a new named logger per upstream: with 25 instances of a service it cost
        // a tenth of its throughput. Round-robin does without them, because its retry moves on
        // to the next instance by itself. The other policies can retry onto the same dead
        // instance (least-conn finds a dead one least loaded every time), so they keep them.
        if !round_robin {
            handler["health_checks"] = json!({"passive": passive});
        }
        handler
    } else if s.upstreams.is_empty() {
        json!({
            "handler": "static_response",
            "status_code": 503,
            "body": format!("{}: no instances registered\n", s.name),
        })
    } else {
        let upstreams: Vec<Value> = s
            .upstreams
            .iter()
            .map(|(a, _)| json!({"dial": a}))
            .collect();
        let weights: Vec<u32> = s.upstreams.iter().map(|(_, w)| *w).collect();
        let mut checks = json!({"passive": passive});
        if let Some(active) = s.health.as_ref().and_then(|h| active_check(h, features)) {
            checks["active"] = active;
        }
        json!({
            "handler": "reverse_proxy",
            "upstreams": upstreams,
            "load_balancing": {
                "selection_policy": selection_policy(s.strategy, &weights, features.weighted),
                "retries": settings.retries,
            },
            "health_checks": checks,
        })
    };
    json!({
        "group": format!("harbor-{}", s.name),
        "match": [Value::Object(matcher)],
        "handle": [handler],
        "terminal": true,
    })
}

/// Caddy's active check for `h`; none for a TCP connect check, which Caddy cannot run (passive
/// checks still take a refusing upstream out).
fn active_check(h: &Health<'_>, features: Features) -> Option<Value> {
    let path = h.path?;
    let mut active = json!({
        "uri": path,
        "interval": format!("{}ms", h.interval_ms),
        "timeout": format!("{}ms", h.timeout_ms),
    });
    if let Some(status) = h.status {
        active["expect_status"] = json!(status);
    }
    if features.thresholds {
        active["passes"] = json!(h.rise);
        active["fails"] = json!(h.fall);
    }
    Some(active)
}

/// Harbor's container route: a subroute holding `inner`. It has no matcher and is not
/// terminal, so a request none of Harbor's routes match goes on to the user's routes.
pub fn container(id: &str, inner: Vec<Value>) -> Value {
    json!({"@id": id, "handle": [{"handler": "subroute", "routes": inner}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc<'a>(
        name: &'a str,
        hosts: &'a [String],
        path: &'a str,
        strategy: &'a str,
    ) -> Service<'a> {
        let upstreams = vec![("127.0.0.1:9001", 1), ("127.0.0.1:9002", 3)];
        Service::http(name, hosts, path, strategy, upstreams)
    }

    #[test]
    fn strategies_map_to_caddy_policies() {
        let p = |s: &str| {
            selection_policy(s, &[1, 3], false)["policy"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(p("round-robin"), "round_robin");
        assert_eq!(p("least-connections"), "least_conn");
        assert_eq!(p("least-request"), "least_conn");
        assert_eq!(p("random"), "random");
        assert_eq!(p("first"), "first");
        assert_eq!(p("consistent-hash"), "ip_hash");
        assert_eq!(p("my-canary"), "round_robin");
        assert_eq!(p("weighted-round-robin"), "round_robin");
        let w = selection_policy("weighted-round-robin", &[1, 3], true);
        assert_eq!(
            w,
            json!({"policy": "weighted_round_robin", "weights": [1, 3]})
        );
    }

    #[test]
    fn loopback_services_use_dynamic_upstreams_when_a_resolver_is_set() {
        let hosts = vec!["a.localhost".to_owned()];
        let settings = Settings {
            upstream_dns: "127.0.0.1:5353".into(),
            ..Settings::default()
        };
        let old = Features {
            weighted: false,
            thresholds: false,
        };
        let r = routes(
            &[svc("a", &hosts, "/", "random")],
            &settings,
            old,
            &Partitions::new(),
        );
        let h = &r[0]["handle"][0];
        assert_eq!(h["dynamic_upstreams"]["name"], "_a4.a.svc.harbor.");
        assert!(h.get("upstreams").is_none());
        // Random can retry onto the instance that just failed: passive checks take it out.
        assert!(h["health_checks"]["passive"].is_object());
        let r = routes(
            &[svc("a", &hosts, "/", "round-robin")],
            &settings,
            old,
            &Partitions::new(),
        );
        assert!(r[0]["handle"][0].get("health_checks").is_none());
        let mut remote = svc("b", &hosts, "/", "random");
        remote.upstreams.push(("backend.internal:80", 1));
        let r = routes(&[remote], &settings, old, &Partitions::new());
        assert!(r[0]["handle"][0]["upstreams"].is_array());
    }

    #[test]
    fn longer_prefixes_come_first_and_root_has_no_path_matcher() {
        let hosts = vec!["a.localhost".to_owned()];
        let services = [
            svc("a", &hosts, "/", "random"),
            svc("b", &hosts, "/api", "first"),
        ];
        let r = routes(
            &services,
            &Settings::default(),
            Features::default(),
            &Partitions::new(),
        );
        assert_eq!(r[0]["group"], "harbor-b");
        assert_eq!(r[0]["match"][0]["path"], json!(["/api", "/api/*"]));
        assert!(r[1]["match"][0].get("path").is_none());
        assert_eq!(r[1]["handle"][0]["upstreams"][1]["dial"], "127.0.0.1:9002");
    }

    fn many(n: u16) -> Vec<String> {
        (0..n).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect()
    }

    #[test]
    fn services_without_affinity_get_one_rotating_window_at_any_size() {
        let hosts = vec!["a.localhost".to_owned()];
        let settings = Settings {
            upstream_dns: "127.0.0.1:5353".into(),
            ..Settings::default()
        };
        for strategy in ["round-robin", "least-connections", "random", "my-canary"] {
            let mut s = svc("a", &hosts, "/", strategy);
            let addrs = many(100);
            s.upstreams = addrs.iter().map(|a| (a.as_str(), 1)).collect();
            let r = routes(&[s], &settings, Features::default(), &Partitions::new());
            let source = &r[0]["handle"][0]["dynamic_upstreams"];
            assert_eq!(source["source"], "srv", "{strategy}");
            assert_eq!(source["name"], "_a4.a.svc.harbor.", "{strategy}");
        }
        // With the window off, a round-robin service is partitioned like any other.
        let whole = Settings {
            aperture: 0,
            ..settings
        };
        let mut s = svc("a", &hosts, "/", "round-robin");
        let addrs = many(100);
        s.upstreams = addrs.iter().map(|a| (a.as_str(), 1)).collect();
        let r = routes(&[s], &whole, Features::default(), &Partitions::new());
        assert_eq!(r[0]["handle"][0]["dynamic_upstreams"]["source"], "multi");
    }

    #[test]
    fn big_services_are_partitioned_and_churn_keeps_the_partition_count() {
        let hosts = vec!["a.localhost".to_owned()];
        let settings = Settings {
            upstream_dns: "127.0.0.1:5353".into(),
            ..Settings::default()
        };
        let with = |addrs: &[String], live: &Partitions| {
            // Hashing needs every instance in view: no window.
            let mut s = svc("a", &hosts, "/", "consistent-hash");
            s.upstreams = addrs.iter().map(|a| (a.as_str(), 1)).collect();
            routes(&[s], &settings, Features::default(), live)
        };
        let addrs = many(100);
        let r = with(&addrs, &Partitions::new());
        let source = &r[0]["handle"][0]["dynamic_upstreams"];
        assert_eq!(source["source"], "multi");
        let names: Vec<&str> = source["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "_0-4.a.svc.harbor.",
                "_1-4.a.svc.harbor.",
                "_2-4.a.svc.harbor.",
                "_3-4.a.svc.harbor."
            ]
        );
        let live = partitions_of(&Value::Array(r.clone()));
        assert_eq!(live.get("a"), Some(&4));
        // Instances come and go: while four partitions hold them, nothing changes.
        for n in [4, 60, 160] {
            assert_eq!(with(&many(n), &live), r, "{n} instances");
        }
        // Past what four partitions hold, or below one instance per partition, the count changes.
        let grown = with(&many(161), &live);
        assert_eq!(partitions_of(&Value::Array(grown)).get("a"), Some(&6));
        let shrunk = with(&many(3), &live);
        assert_eq!(
            shrunk[0]["handle"][0]["dynamic_upstreams"]["name"],
            "a.svc.harbor."
        );
    }

    #[test]
    fn http_checks_become_caddy_active_checks_on_static_upstreams() {
        let hosts = vec!["a.localhost".to_owned()];
        let mut s = svc("a", &hosts, "/", "random");
        s.health = Some(Health {
            path: Some("/healthz"),
            status: Some(204),
            interval_ms: 500,
            timeout_ms: 200,
            rise: 2,
            fall: 3,
        });
        let r = routes(
            std::slice::from_ref(&s),
            &Settings::default(),
            Features::default(),
            &Partitions::new(),
        );
        assert_eq!(
            r[0]["handle"][0]["health_checks"]["active"],
            json!({"uri": "/healthz", "expect_status": 204, "interval": "500ms", "timeout": "200ms", "passes": 2, "fails": 3})
        );
        let old = Features {
            weighted: false,
            thresholds: false,
        };
        let r = routes(
            std::slice::from_ref(&s),
            &Settings::default(),
            old,
            &Partitions::new(),
        );
        assert!(
            r[0]["handle"][0]["health_checks"]["active"]
                .get("fails")
                .is_none()
        );
        // A TCP connect check has no Caddy equivalent: passive checks only.
        s.health.as_mut().unwrap().path = None;
        let r = routes(&[s], &Settings::default(), old, &Partitions::new());
        assert!(r[0]["handle"][0]["health_checks"].get("active").is_none());
        assert!(r[0]["handle"][0]["health_checks"]["passive"].is_object());
    }
}
