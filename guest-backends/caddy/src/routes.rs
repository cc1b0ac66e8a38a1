//! The desired state as Caddy JSON: one route per HTTP service, most specific path first, each
//! a `reverse_proxy` with the service's upstreams and the load-balancing policy nearest to its
//! strategy.

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
    /// Most instances a dynamic service may have (an answer must fit one UDP packet).
    pub dns_max: usize,
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

/// A service as the adapter sees it, free of the generated binding types.
#[derive(Debug, Clone)]
pub struct Service<'a> {
    pub name: &'a str,
    pub hosts: &'a [String],
    pub path_prefix: &'a str,
    pub upstreams: Vec<(&'a str, u32)>,
    pub strategy: &'a str,
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
pub fn routes(services: &[Service<'_>], settings: &Settings, weighted: bool) -> Vec<Value> {
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
        .map(|s| route(s, settings, weighted))
        .collect()
}

fn route(s: &Service<'_>, settings: &Settings, weighted: bool) -> Value {
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
        && s.upstreams.len() <= settings.dns_max
        && s.upstreams
            .iter()
            .all(|(a, _)| a.parse::<std::net::SocketAddrV4>().is_ok());
    let handler = if dynamic {
        json!({
            "handler": "reverse_proxy",
            "dynamic_upstreams": {
                "source": "srv",
                "name": format!("{}.{}", s.name, settings.dns_zone),
                "refresh": settings.dns_refresh,
                "resolver": {"addresses": [format!("udp/{}", settings.upstream_dns)]},
            },
            // SRV targets are names in Harbor's zone: they resolve through it too.
            "transport": {
                "protocol": "http",
                "resolver": {"addresses": [format!("udp/{}", settings.upstream_dns)]},
            },
            "load_balancing": {
                "selection_policy": selection_policy(s.strategy, &[], false),
                "retries": settings.retries,
            },
            "health_checks": {
                "passive": {"fail_duration": "5s", "max_fails": 3},
            },
        })
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
        json!({
            "handler": "reverse_proxy",
            "upstreams": upstreams,
            "load_balancing": {
                "selection_policy": selection_policy(s.strategy, &weights, weighted),
                "retries": settings.retries,
            },
            "health_checks": {
                "passive": {"fail_duration": "5s", "max_fails": 3},
            },
        })
    };
    json!({
        "group": format!("harbor-{}", s.name),
        "match": [Value::Object(matcher)],
        "handle": [handler],
        "terminal": true,
    })
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
        Service {
            name,
            hosts,
            path_prefix: path,
            upstreams: vec![("127.0.0.1:9001", 1), ("127.0.0.1:9002", 3)],
            strategy,
        }
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
        let r = routes(&[svc("a", &hosts, "/", "random")], &settings, false);
        let h = &r[0]["handle"][0];
        assert_eq!(h["dynamic_upstreams"]["name"], "a.svc.harbor.");
        assert!(h.get("upstreams").is_none());
        let mut remote = svc("b", &hosts, "/", "random");
        remote.upstreams.push(("backend.internal:80", 1));
        let r = routes(&[remote], &settings, false);
        assert!(r[0]["handle"][0]["upstreams"].is_array());
    }

    #[test]
    fn longer_prefixes_come_first_and_root_has_no_path_matcher() {
        let hosts = vec!["a.localhost".to_owned()];
        let services = [
            svc("a", &hosts, "/", "random"),
            svc("b", &hosts, "/api", "first"),
        ];
        let r = routes(&services, &Settings::default(), false);
        assert_eq!(r[0]["group"], "harbor-b");
        assert_eq!(r[0]["match"][0]["path"], json!(["/api", "/api/*"]));
        assert!(r[1]["match"][0].get("path").is_none());
        assert_eq!(r[1]["handle"][0]["upstreams"][1]["dial"], "127.0.0.1:9002");
    }
}
