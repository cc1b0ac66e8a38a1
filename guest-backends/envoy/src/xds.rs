//! The desired state as Envoy xDS resources: one HTTP listener whose connection manager takes
//! its routes from RDS, one EDS cluster per service, a virtual host per host name, and a
//! `tcp_proxy` listener per TCP service. What TLS adds (secrets, the HTTPS listener, SNI) is
//! in [`crate::tls`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The plain HTTP listener's route configuration, which it asks RDS for, and its file.
pub const ROUTE_CONFIG: &str = "harbor_routes";
pub const RDS_FILE: &str = "rds.json";
/// The HTTPS listener's route configuration and its file: Envoy takes one route configuration
/// per file ("Unexpected RDS resource length" otherwise).
pub const TLS_ROUTE_CONFIG: &str = "harbor_routes_tls";
pub const TLS_RDS_FILE: &str = "rds-tls.json";

/// The adapter's settings (the JSON given to `configure`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The directory's absolute path as Envoy sees it (the files name each other by path).
    pub dir: String,
    /// Where the HTTP listener listens, `ip:port`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Services whose endpoints get an EDS file of their own; the rest carry them inline in
    /// CDS. Envoy opens one inotify instance per watched file, and the system's limit on
    /// those (often 128 per user) is shared with every other watcher.
    #[serde(default = "default_eds_max")]
    pub eds_max: usize,
    /// Where the HTTPS listener listens, `ip:port`; empty for none, and then services with
    /// HTTPS are served over plain HTTP only, unredirected.
    #[serde(default)]
    pub tls_listen: String,
    /// Where Harbor answers ACME HTTP-01 challenges, `ip:port`: Envoy's plain listener sends
    /// them there for the hosts whose certificates Harbor orders. Empty for none.
    #[serde(default)]
    pub acme_answerer: String,
}

fn default_eds_max() -> usize {
    32
}

fn default_listen() -> String {
    "127.0.0.1:10000".into()
}

impl Settings {
    pub fn parse(json: &str) -> Result<Self, String> {
        let s: Settings =
            serde_json::from_str(json).map_err(|e| format!("envoy adapter settings: {e}"))?;
        if !s.dir.starts_with('/') {
            return Err(format!("dir {:?} must be an absolute path", s.dir));
        }
        split_addr(&s.listen).ok_or_else(|| format!("listen {:?} must be IP:PORT", s.listen))?;
        if !s.tls_listen.is_empty() {
            split_addr(&s.tls_listen)
                .ok_or_else(|| format!("tls_listen {:?} must be IP:PORT", s.tls_listen))?;
            if s.tls_listen == s.listen {
                return Err(format!(
                    "tls_listen {:?} is the plain HTTP listener's address too",
                    s.tls_listen
                ));
            }
        }
        if !s.acme_answerer.is_empty() {
            split_addr(&s.acme_answerer)
                .ok_or_else(|| format!("acme_answerer {:?} must be IP:PORT", s.acme_answerer))?;
        }
        Ok(s)
    }

    /// The HTTPS listener's address, if it has one.
    pub fn tls_listen(&self) -> Option<(String, u16)> {
        split_addr(&self.tls_listen)
    }

    pub fn path(&self, file: &str) -> String {
        format!("{}/{file}", self.dir.trim_end_matches('/'))
    }
}

/// `ip:port` (or `[v6]:port`) split for a `socket_address`.
pub fn split_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    Some((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

pub fn socket_address(addr: &str) -> Value {
    let (host, port) = split_addr(addr).unwrap_or_else(|| (addr.to_owned(), 0));
    json!({"socket_address": {"address": host, "port_value": port}})
}

pub use harbor_adapter_common::{Certificate, HashKey, Health, Service, Source, Tls};

use crate::tls::{self, Served};

/// Envoy's health checker for `h`. Envoy checks idle clusters only every
/// `no_traffic_interval` (60 s by default), so that is set to the interval too: a check that
/// waited for traffic would hold a dead upstream in for a minute.
pub fn health_check(h: &Health<'_>) -> Value {
    let interval = format!("{}s", f64::from(h.interval_ms) / 1000.0);
    let mut check = json!({
        "timeout": format!("{}s", f64::from(h.timeout_ms) / 1000.0),
        "interval": interval,
        "no_traffic_interval": interval,
        "healthy_threshold": h.rise.max(1),
        "unhealthy_threshold": h.fall.max(1),
    });
    match h.path {
        Some(path) => {
            let (start, end) = match h.status {
                Some(s) => (u32::from(s), u32::from(s) + 1),
                None => (200, 400),
            };
            check["http_health_check"] = json!({
                "path": path,
                "expected_statuses": [{"start": start, "end": end}],
            });
        }
        None => check["tcp_health_check"] = json!({}),
    }
    check
}

pub fn cluster_name(service: &str) -> String {
    format!("harbor_{service}")
}

pub fn eds_file(service: &str) -> String {
    format!("eds-{service}.json")
}

/// Envoy's policy for a Harbor strategy.
pub fn lb_policy(strategy: &str) -> &'static str {
    match strategy {
        "least-connections" | "least-request" | "peak-ewma" => "LEAST_REQUEST",
        "random" => "RANDOM",
        "consistent-hash" => "RING_HASH",
        "maglev" => "MAGLEV",
        _ => "ROUND_ROBIN",
    }
}

pub fn discovery(version: u64, resources: Vec<Value>) -> Value {
    json!({"version_info": version.to_string(), "resources": resources})
}

/// Whether any upstream of `s` is a host name. Envoy refuses names as EDS or static endpoint
/// addresses; a `STRICT_DNS` cluster resolves them instead (and re-resolves them as DNS does).
pub fn names_upstreams(s: &Service<'_>) -> bool {
    s.upstreams
        .iter()
        .any(|(addr, _)| addr.parse::<std::net::SocketAddr>().is_err())
}

/// A service's cluster: its endpoints from its own EDS file when `eds`, else inline; resolved
/// through DNS when it names its upstreams by host name.
pub fn cluster(s: &Service<'_>, settings: &Settings, eds: bool) -> Value {
    let mut c = json!({
        "@type": CLUSTER,
        "name": cluster_name(s.name),
        "connect_timeout": "1s",
        "lb_policy": lb_policy(s.strategy),
    });
    if let Some(h) = &s.health {
        c["health_checks"] = json!([health_check(h)]);
    }
    if eds && !names_upstreams(s) {
        c["type"] = json!("EDS");
        c["eds_cluster_config"] = json!({
            "eds_config": {
                "path_config_source": {"path": settings.path(&eds_file(s.name))},
                "resource_api_version": "V3",
            },
        });
    } else {
        let mut assignment = endpoints(s);
        if let Some(map) = assignment.as_object_mut() {
            map.remove("@type");
        }
        if names_upstreams(s) {
            c["type"] = json!("STRICT_DNS");
            // Names like `localhost` resolve to IPv6 first, where a service on 127.0.0.1
            // does not listen; Caddy and Harbor's own proxy dial IPv4 first too.
            c["dns_lookup_family"] = json!("V4_PREFERRED");
        } else {
            c["type"] = json!("STATIC");
        }
        c["load_assignment"] = assignment;
    }
    c
}

/// The endpoints of a service. `first` puts each upstream at its own priority, in order, so
/// Envoy sends everything to the first healthy one.
pub fn endpoints(s: &Service<'_>) -> Value {
    let endpoint = |addr: &str, weight: u32| json!({"endpoint": {"address": socket_address(addr)}, "load_balancing_weight": weight.max(1)});
    let groups: Vec<Value> = if s.strategy == "first" {
        s.upstreams
            .iter()
            .enumerate()
            .map(|(i, (a, w))| json!({"priority": i, "lb_endpoints": [endpoint(a, *w)]}))
            .collect()
    } else if s.upstreams.is_empty() {
        Vec::new()
    } else {
        vec![
            json!({"lb_endpoints": s.upstreams.iter().map(|(a, w)| endpoint(a, *w)).collect::<Vec<_>>()}),
        ]
    };
    json!({"@type": ENDPOINTS, "cluster_name": cluster_name(s.name), "endpoints": groups})
}

/// What a route hashes: the header or cookie, if the request has it (`terminal`: the client's
/// address is then left out), else the client's address. Without a `ttl` Envoy never sets the
/// cookie itself.
fn hash_policy(key: HashKey<'_>) -> Value {
    let client = json!({"connection_properties": {"source_ip": true}});
    match key {
        HashKey::ClientIp => json!([client]),
        HashKey::Header(name) => {
            json!([{"header": {"header_name": name}, "terminal": true}, client])
        }
        HashKey::Cookie(name) => json!([{"cookie": {"name": name}, "terminal": true}, client]),
    }
}

/// The plain HTTP listener's routes. A service's route for a host served over HTTPS answers
/// with a redirect there instead, when the service asks for one.
pub fn route_config(http: &[Service<'_>], served: &Served<'_>) -> Value {
    let hosts = http
        .iter()
        .map(|s| (s, s.hosts.iter().map(String::as_str).collect()))
        .collect();
    let mut redirect = json!({"https_redirect": true, "response_code": "PERMANENT_REDIRECT"});
    if let Some(port) = served.redirect_port() {
        redirect["port_redirect"] = json!(port);
    }
    by_host(ROUTE_CONFIG, hosts, |s, host, matcher| {
        if served.redirects(s, host) {
            json!({"match": matcher, "redirect": redirect})
        } else {
            forward(s, matcher)
        }
    })
}

/// The HTTPS listener's routes: each service's, for its hosts served over HTTPS, with its
/// `Strict-Transport-Security` header if it sends one.
pub fn tls_route_config(http: &[Service<'_>], served: &Served<'_>) -> Value {
    let hosts = http.iter().map(|s| (s, served.https_hosts(s))).collect();
    by_host(TLS_ROUTE_CONFIG, hosts, |s, _, matcher| {
        let mut route = forward(s, matcher);
        if let Tls::Https {
            hsts: Some(hsts), ..
        } = s.tls
        {
            route["response_headers_to_add"] = json!([{
                "header": {"key": "Strict-Transport-Security", "value": hsts},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }]);
        }
        route
    })
}

/// The cluster of Harbor's ACME challenge answers.
pub const ACME_CLUSTER: &str = "harbor_acme";
const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Whether Envoy sends ACME challenges to Harbor: with an answerer to send them to, and a host
/// whose certificate Harbor orders.
pub fn answers_acme(settings: &Settings, http: &[Service<'_>]) -> bool {
    !settings.acme_answerer.is_empty() && !acme_hosts(http).is_empty()
}

fn acme_hosts<'a>(http: &[Service<'a>]) -> Vec<&'a str> {
    http.iter()
        .flat_map(|s| s.https_hosts().iter())
        .filter(|(_, source)| *source == Source::Acme)
        .map(|(host, _)| *host)
        .collect()
}

/// The static cluster of Harbor's challenge answers.
pub fn acme_cluster(settings: &Settings) -> Value {
    json!({
        "@type": CLUSTER,
        "name": ACME_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ACME_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(&settings.acme_answerer)}}]}],
        },
    })
}

/// `routes` (the plain listener's) with each ACME host's challenges sent to Harbor first,
/// ahead of its redirect to HTTPS: the CA asks over plain HTTP, for a renewal too.
pub fn with_challenges(mut routes: Value, settings: &Settings, http: &[Service<'_>]) -> Value {
    if !answers_acme(settings, http) {
        return routes;
    }
    let hosts = acme_hosts(http);
    let challenge = json!({
        "match": {"prefix": CHALLENGE_PREFIX},
        "route": {"cluster": ACME_CLUSTER, "timeout": "5s"},
    });
    for vhost in routes["virtual_hosts"].as_array_mut().into_iter().flatten() {
        let ours = vhost["domains"][0]
            .as_str()
            .is_some_and(|d| hosts.contains(&d));
        if let (true, Some(list)) = (ours, vhost["routes"].as_array_mut()) {
            list.insert(0, challenge.clone());
        }
    }
    routes
}

/// A route to the service's cluster.
fn forward(s: &Service<'_>, matcher: Value) -> Value {
    let mut route = json!({"cluster": cluster_name(s.name), "timeout": "0s"});
    if lb_policy(s.strategy) == "RING_HASH" {
        route["hash_policy"] = hash_policy(s.hash_key);
    }
    json!({"match": matcher, "route": route})
}

/// One route configuration: a virtual host per host name, longer path prefixes first, each
/// service's route made by `route` from the service, the host and the path matcher.
fn by_host<'s, 'a>(
    name: &str,
    hosts: Vec<(&'s Service<'a>, Vec<&'a str>)>,
    route: impl Fn(&Service<'a>, &str, Value) -> Value,
) -> Value {
    let mut by_host: BTreeMap<&str, Vec<&Service<'_>>> = BTreeMap::new();
    for (s, names) in hosts {
        for h in names {
            by_host.entry(h).or_default().push(s);
        }
    }
    let vhosts: Vec<Value> = by_host
        .into_iter()
        .map(|(host, mut services)| {
            services.sort_by(|a, b| {
                b.path_prefix
                    .len()
                    .cmp(&a.path_prefix.len())
                    .then(a.name.cmp(b.name))
            });
            let routes: Vec<Value> = services
                .iter()
                .map(|s| {
                    let prefix = s.path_prefix.trim_end_matches('/');
                    let matcher = if prefix.is_empty() {
                        json!({"prefix": "/"})
                    } else {
                        json!({"path_separated_prefix": prefix})
                    };
                    route(s, host, matcher)
                })
                .collect();
            json!({"name": format!("host_{host}"), "domains": [host], "routes": routes})
        })
        .collect();
    json!({"@type": ROUTES, "name": name, "virtual_hosts": vhosts})
}

/// An HTTP connection manager taking the route configuration `routes` from `file`.
pub fn connection_manager(
    settings: &Settings,
    stat_prefix: &str,
    routes: &str,
    file: &str,
) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "strip_any_host_port": true,
            "rds": {
                "route_config_name": routes,
                "config_source": {
                    "path_config_source": {"path": settings.path(file)},
                    "resource_api_version": "V3",
                },
            },
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }],
        },
    })
}

pub fn http_listener(settings: &Settings) -> Value {
    let (host, port) = split_addr(&settings.listen).unwrap_or(("127.0.0.1".into(), 10000));
    json!({
        "@type": LISTENER,
        "name": "harbor_http",
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [{"filters": [
            connection_manager(settings, "harbor_http", ROUTE_CONFIG, RDS_FILE),
        ]}],
    })
}

/// A tcp service's own listener; its TLS terminated with the certificates of `names` when it
/// has any (passthrough services share [`tls::sni_listeners`] instead).
pub fn tcp_listener(settings: &Settings, s: &Service<'_>, names: &[&str]) -> Value {
    json!({
        "@type": LISTENER,
        "name": format!("harbor_tcp_{}", s.name),
        "address": socket_address(s.listen.unwrap_or_default()),
        // Alone on its port: were Harbor's own TCP proxy still listening there, Envoy refuses
        // the listener instead of sharing the port with it.
        "enable_reuse_port": false,
        "filter_chains": [tls::tcp_chain(settings, s, names)],
    })
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
    fn health_checks_map_to_envoy_checkers() {
        let mut h = Health {
            path: Some("/healthz"),
            status: None,
            interval_ms: 500,
            timeout_ms: 200,
            rise: 2,
            fall: 3,
        };
        assert_eq!(
            health_check(&h),
            json!({"timeout": "0.2s", "interval": "0.5s", "no_traffic_interval": "0.5s",
                "healthy_threshold": 2, "unhealthy_threshold": 3,
                "http_health_check": {"path": "/healthz", "expected_statuses": [{"start": 200, "end": 400}]}})
        );
        h.status = Some(204);
        assert_eq!(
            health_check(&h)["http_health_check"]["expected_statuses"],
            json!([{"start": 204, "end": 205}])
        );
        h.path = None;
        let tcp = health_check(&h);
        assert_eq!(tcp["tcp_health_check"], json!({}));
        assert!(tcp.get("http_health_check").is_none());
    }

    #[test]
    fn strategies_map_to_envoy_policies() {
        assert_eq!(lb_policy("round-robin"), "ROUND_ROBIN");
        assert_eq!(lb_policy("weighted-round-robin"), "ROUND_ROBIN");
        assert_eq!(lb_policy("least-connections"), "LEAST_REQUEST");
        assert_eq!(lb_policy("random"), "RANDOM");
        assert_eq!(lb_policy("consistent-hash"), "RING_HASH");
        assert_eq!(lb_policy("maglev"), "MAGLEV");
    }

    #[test]
    fn one_virtual_host_per_host_longest_prefix_first() {
        let h = vec!["a.localhost".to_owned()];
        let settings = Settings::parse(r#"{"dir": "/x"}"#).unwrap();
        let rc = route_config(
            &[
                svc("a", &h, "/", "random"),
                svc("b", &h, "/api", "consistent-hash"),
            ],
            &Served::new(&settings, &[]),
        );
        let vh = &rc["virtual_hosts"][0];
        assert_eq!(vh["domains"], json!(["a.localhost"]));
        assert_eq!(vh["routes"][0]["match"]["path_separated_prefix"], "/api");
        assert!(vh["routes"][0]["route"]["hash_policy"].is_array());
        assert_eq!(vh["routes"][1]["route"]["cluster"], "harbor_a");
    }

    #[test]
    fn first_puts_each_upstream_at_its_own_priority() {
        let h = vec![];
        let e = endpoints(&svc("a", &h, "/", "first"));
        assert_eq!(e["endpoints"][1]["priority"], 1);
        let e = endpoints(&svc("a", &h, "/", "round-robin"));
        assert_eq!(
            e["endpoints"][0]["lb_endpoints"][1]["load_balancing_weight"],
            3
        );
    }

    #[test]
    fn services_named_by_host_name_resolve_through_dns_instead_of_eds() {
        let h = vec!["a.localhost".to_owned()];
        let settings = Settings::parse(r#"{"dir": "/x"}"#).unwrap();
        let by_ip = cluster(&svc("a", &h, "/", "round-robin"), &settings, true);
        assert_eq!(by_ip["type"], "EDS");
        let mut named = svc("b", &h, "/", "round-robin");
        named.upstreams = vec![("localhost:3000", 1), ("127.0.0.1:9001", 1)];
        assert!(names_upstreams(&named));
        let c = cluster(&named, &settings, true);
        assert_eq!(c["type"], "STRICT_DNS");
        assert_eq!(
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
            json!({"socket_address": {"address": "localhost", "port_value": 3000}})
        );
    }

    fn https<'a>(s: &mut Service<'a>, redirect_http: bool, hsts: Option<&'a str>) {
        s.tls = Tls::Https {
            certificates: s.hosts.iter().map(|h| (h.as_str(), Source::Acme)).collect(),
            redirect_http,
            hsts,
        };
    }

    fn cert(host: &str) -> Certificate<'_> {
        Certificate {
            host,
            chain: "CHAIN",
            key: "KEY",
        }
    }

    #[test]
    fn plain_routes_redirect_where_https_is_served() {
        let hosts = vec!["a.test".to_owned(), "b.test".to_owned()];
        let plain_only = vec!["a.test".to_owned()];
        let mut web = svc("web", &hosts, "/", "round-robin");
        https(&mut web, true, None);
        let mut api = svc("api", &plain_only, "/api", "round-robin");
        https(&mut api, false, None);
        let http = [web, api];
        // b.test has no certificate yet: it keeps being served over plain HTTP.
        let certs = [cert("a.test")];
        let settings = Settings::parse(r#"{"dir": "/x", "tls_listen": "127.0.0.1:8443"}"#).unwrap();
        let rc = route_config(&http, &Served::new(&settings, &certs));
        let vh = &rc["virtual_hosts"];
        assert_eq!(vh[0]["domains"], json!(["a.test"]));
        // The service that does not redirect still forwards; the one that does, redirects.
        assert_eq!(vh[0]["routes"][0]["route"]["cluster"], "harbor_api");
        assert_eq!(
            vh[0]["routes"][1],
            json!({"match": {"prefix": "/"}, "redirect": {"https_redirect": true,
                "port_redirect": 8443, "response_code": "PERMANENT_REDIRECT"}})
        );
        assert_eq!(vh[1]["domains"], json!(["b.test"]));
        assert_eq!(vh[1]["routes"][0]["route"]["cluster"], "harbor_web");

        let on_443 = Settings::parse(r#"{"dir": "/x", "tls_listen": "0.0.0.0:443"}"#).unwrap();
        let rc = route_config(&http, &Served::new(&on_443, &certs));
        let redirect = &rc["virtual_hosts"][0]["routes"][1]["redirect"];
        assert_eq!(redirect["https_redirect"], true);
        assert!(redirect.get("port_redirect").is_none());

        // Without an HTTPS listener nothing redirects.
        let no_tls = Settings::parse(r#"{"dir": "/x"}"#).unwrap();
        let rc = route_config(&http, &Served::new(&no_tls, &certs));
        assert_eq!(
            rc["virtual_hosts"][0]["routes"][1]["route"]["cluster"],
            "harbor_web"
        );
    }

    #[test]
    fn acme_challenges_go_to_harbor_ahead_of_the_redirect() {
        let hosts = vec!["shop.example.com".to_owned()];
        let mut shop = svc("shop", &hosts, "/", "round-robin");
        https(&mut shop, true, None);
        let http = [shop];
        let certs = [cert("shop.example.com")];
        let settings = Settings::parse(
            r#"{"dir": "/x", "tls_listen": "127.0.0.1:8443", "acme_answerer": "127.0.0.1:7070"}"#,
        )
        .unwrap();
        assert!(answers_acme(&settings, &http));
        let rc = with_challenges(
            route_config(&http, &Served::new(&settings, &certs)),
            &settings,
            &http,
        );
        let routes = &rc["virtual_hosts"][0]["routes"];
        assert_eq!(routes[0]["match"]["prefix"], "/.well-known/acme-challenge/");
        assert_eq!(routes[0]["route"]["cluster"], ACME_CLUSTER);
        assert!(routes[1]["redirect"].is_object(), "then the redirect: {rc}");
        let cluster = acme_cluster(&settings);
        assert_eq!(
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
            json!({"socket_address": {"address": "127.0.0.1", "port_value": 7070}})
        );
        // No answerer, or no host Harbor orders for: no challenge route.
        let without = Settings::parse(r#"{"dir": "/x", "tls_listen": "127.0.0.1:8443"}"#).unwrap();
        assert!(!answers_acme(&without, &http));
        let mut internal = http[0].clone();
        if let Tls::Https { certificates, .. } = &mut internal.tls {
            certificates[0].1 = Source::Internal;
        }
        assert!(!answers_acme(&settings, &[internal]));
    }

    #[test]
    fn tls_routes_serve_https_hosts_with_their_hsts_header() {
        let hosts = vec!["a.test".to_owned(), "b.test".to_owned()];
        let plain = vec!["a.test".to_owned()];
        let mut web = svc("web", &hosts, "/", "consistent-hash");
        https(&mut web, true, Some("max-age=31536000"));
        let mut api = svc("api", &hosts, "/api", "round-robin");
        https(&mut api, false, None);
        let http = [web, api, svc("old", &plain, "/old", "round-robin")];
        let certs = [cert("a.test")];
        let settings = Settings::parse(r#"{"dir": "/x", "tls_listen": "127.0.0.1:8443"}"#).unwrap();
        let rc = tls_route_config(&http, &Served::new(&settings, &certs));
        assert_eq!(rc["name"], TLS_ROUTE_CONFIG);
        // Only a.test has a certificate; the plain-only service is not served over HTTPS.
        let vhosts = rc["virtual_hosts"].as_array().unwrap();
        assert_eq!(vhosts.len(), 1);
        let routes = vhosts[0]["routes"].as_array().unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0]["route"]["cluster"], "harbor_api");
        assert!(routes[0].get("response_headers_to_add").is_none());
        assert_eq!(routes[1]["route"]["cluster"], "harbor_web");
        assert!(routes[1]["route"]["hash_policy"].is_array());
        assert_eq!(
            routes[1]["response_headers_to_add"],
            json!([{"header": {"key": "Strict-Transport-Security", "value": "max-age=31536000"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}])
        );
    }

    #[test]
    fn tls_listen_is_checked() {
        assert!(Settings::parse(r#"{"dir": "/x", "tls_listen": "nope"}"#).is_err());
        let same = r#"{"dir": "/x", "listen": "127.0.0.1:80", "tls_listen": "127.0.0.1:80"}"#;
        assert!(Settings::parse(same).is_err());
        let s = Settings::parse(r#"{"dir": "/x", "tls_listen": "[::1]:443"}"#).unwrap();
        assert_eq!(s.tls_listen(), Some(("::1".into(), 443)));
        assert_eq!(
            Settings::parse(r#"{"dir": "/x"}"#).unwrap().tls_listen(),
            None
        );
    }
}
