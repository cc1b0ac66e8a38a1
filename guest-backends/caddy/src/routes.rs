//! The desired state as Caddy JSON: one route per HTTP service, most specific path first, each
//! a `reverse_proxy` with the service's upstreams and the load-balancing policy nearest to its
//! strategy.
//!
//! Services whose instances all have IPv4 addresses take their upstreams from Harbor's DNS
//! responder (`dynamic_upstreams`), so instance churn and health changes need no reload; Harbor
//! runs their health checks itself and leaves failing instances out of its answers (Caddy runs
//! active checks only on static upstreams). Round-robin, least-connections and random services
//! ask for a rotating window of their instances (`aperture`) over UDP, because Caddy 2.6 works
//! through every upstream of an answer on every request. Services whose policy ties a client to
//! an instance (hashing, first) need every instance in view, so they ask over TCP, where one
//! answer holds them all. The others get static upstreams and Caddy's own active checks.
//!
//! Beside its dynamic source each such service keeps a static list of its instances, which
//! Caddy uses whenever the lookup fails: while Harbor is stopped or restarting, Caddy keeps
//! routing. The list is written when the service first appears and otherwise only when the host
//! asks for it (`refresh-fallbacks`), so that churn costs no reload.

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
    /// The HTTPS server, by its listen address, where Harbor's HTTPS hosts are served (Harbor
    /// creates it when no server listens there); empty: no HTTPS.
    pub tls_listen: String,
    /// Retries of a failed upstream connection.
    pub retries: u32,
    /// Harbor's DNS responder (`ip:port`); when set, services whose instances all have IPv4
    /// addresses get `dynamic_upstreams` from it, so instance churn needs no reload.
    pub upstream_dns: String,
    /// The zone the responder answers for.
    pub dns_zone: String,
    /// How long Caddy keeps an answer.
    pub dns_refresh: String,
    /// Most instances of a round-robin, least-connections or random service that one answer
    /// names; successive answers rotate through the rest. 0 names them all, over TCP. At most
    /// [`MAX_WINDOW`], so that a window fits one UDP answer.
    pub aperture: usize,
    /// The version of the Caddy being driven, as it reports it (`v2.11.7`); empty when unknown,
    /// and then only what Caddy 2.6 understands is written.
    pub version: String,
}

/// The largest window: what fits the 1,232 bytes of one UDP answer with room to spare.
pub const MAX_WINDOW: usize = 32;

impl Default for Settings {
    fn default() -> Self {
        Self {
            route_id: "harbor".into(),
            server: String::new(),
            listen: "127.0.0.1:8080".into(),
            tls_listen: String::new(),
            retries: 2,
            upstream_dns: String::new(),
            dns_zone: "svc.harbor.".into(),
            dns_refresh: "100ms".into(),
            aperture: 4,
            version: String::new(),
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
        let port_of = |a: &str| a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
        if !s.tls_listen.is_empty() && port_of(&s.tls_listen).is_none() {
            return Err(format!("tls_listen {:?} must be HOST:PORT", s.tls_listen));
        }
        if s.aperture > MAX_WINDOW {
            return Err(format!(
                "aperture {} is more than one DNS answer holds ({MAX_WINDOW})",
                s.aperture
            ));
        }
        if !s.version.is_empty() && Features::of_version(&s.version).is_none() {
            return Err(format!("version {:?} is not a Caddy version", s.version));
        }
        Ok(s)
    }
}

pub use harbor_adapter_common::{HashKey, Health, Service};

/// What the Caddy being driven understands, from the version it reports. Caddy 2.6 has none of
/// these; 2.7 brought them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// The `weighted_round_robin` selection policy.
    pub weighted: bool,
    /// `passes` / `fails` thresholds on active health checks.
    pub thresholds: bool,
}

impl Features {
    /// The features of Caddy `version` (`v2.11.7`, `2.6.2`, `v2.8.0-beta.1 h1:…`); `None` for
    /// text that is not a version.
    pub fn of_version(version: &str) -> Option<Self> {
        let number = version.split_whitespace().next()?.trim_start_matches('v');
        let mut parts = number.split(['.', '-', '+']);
        let major: u32 = parts.next()?.parse().ok()?;
        let minor: u32 = parts.next()?.parse().ok()?;
        let modern = (major, minor) >= (2, 7);
        Some(Self {
            weighted: modern,
            thresholds: modern,
        })
    }

    /// The features named by `settings`: an unknown version gets what every supported Caddy
    /// understands.
    pub fn of(settings: &Settings) -> Self {
        Features::of_version(&settings.version).unwrap_or_default()
    }
}

/// Each dynamic service's static list of instances, by service name: what Caddy falls back on.
pub type Fallbacks = HashMap<String, Value>;

/// The service a route of Harbor's is for.
pub fn service_of(route: &Value) -> Option<&str> {
    route["group"].as_str()?.strip_prefix("harbor-")
}

/// `s`'s instances as Caddy's static upstreams.
fn static_list(s: &Service<'_>) -> Value {
    s.upstreams
        .iter()
        .map(|(a, _)| json!({"dial": a}))
        .collect()
}

/// Each dynamic service's static list in `routes`, by service name.
fn static_lists(routes: &[Value]) -> impl Iterator<Item = (&str, &Value)> {
    routes.iter().filter_map(|route| {
        let handler = &route["handle"][0];
        handler.get("dynamic_upstreams")?;
        Some((service_of(route)?, handler.get("upstreams")?))
    })
}

/// Whether a static fallback list in `routes` differs from its service's instances now.
pub fn fallbacks_lag(routes: &[Value], services: &[Service<'_>]) -> bool {
    static_lists(routes).any(|(name, list)| {
        services
            .iter()
            .find(|s| s.name == name)
            .is_some_and(|s| static_list(s) != *list)
    })
}

/// The static lists in `routes` as last written.
pub fn fallbacks_of(routes: &Value) -> Fallbacks {
    let routes = routes.as_array().map(Vec::as_slice).unwrap_or_default();
    static_lists(routes)
        .map(|(name, list)| (name.to_owned(), list.clone()))
        .collect()
}

/// The request header through which a route's hash key reaches Caddy's `header` policy.
const HASH_KEY_HEADER: &str = "X-Harbor-Hash-Key";

/// Caddy's selection policy for a Harbor strategy, in the words of the Caddy `features` tell.
/// Caddy 2.6 has no weighted round-robin, so weights (`None` where the upstreams are dynamic)
/// are honoured only by a newer Caddy. Consistent hashing by a header or cookie hashes
/// [`HASH_KEY_HEADER`], which [`hash_key_handler`] fills in.
pub fn selection_policy(
    strategy: &str,
    hash_key: HashKey<'_>,
    weights: Option<&[u32]>,
    features: Features,
) -> Value {
    match strategy {
        "consistent-hash" if hash_key != HashKey::ClientIp => {
            json!({"policy": "header", "field": HASH_KEY_HEADER})
        }
        "weighted-round-robin" if features.weighted && weights.is_some() => {
            json!({"policy": "weighted_round_robin", "weights": weights.unwrap_or_default()})
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

/// A handler that puts a request's hash key in [`HASH_KEY_HEADER`] (whatever the client sent
/// there): the header's or cookie's value where the request has it, else the client's address.
/// Caddy's own policies differ from Harbor's rule: its cookie policy sets a cookie of its own,
/// and its header policy picks at random when the header is missing (on 2.6).
fn hash_key_handler(key: HashKey<'_>) -> Option<Value> {
    let (present, value) = match key {
        HashKey::ClientIp => return None,
        HashKey::Header(name) => (
            json!({"header": {name: ["*"]}}),
            format!("{{http.request.header.{name}}}"),
        ),
        HashKey::Cookie(name) => (
            json!({"header_regexp": {"Cookie": {"pattern": format!("(?:^|[;,]\\s*){}=", regex_escape(name))}}}),
            format!("{{http.request.cookie.{name}}}"),
        ),
    };
    let set = |v: &str| json!({"handler": "headers", "request": {"set": {HASH_KEY_HEADER: [v]}}});
    Some(json!({
        "handler": "subroute",
        "routes": [
            {"handle": [set("{http.request.remote.host}")]},
            {"match": [present], "handle": [set(&value)]},
        ],
    }))
}

/// `text` with the characters a regular expression gives meaning to escaped (cookie names are
/// HTTP tokens, which may contain some).
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.+*?()|[]{}^$".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// The routes for `services`, in the order Caddy should try them.
pub fn routes(
    services: &[Service<'_>],
    settings: &Settings,
    features: Features,
    kept: &Fallbacks,
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
        .map(|s| route(s, settings, features, kept.get(s.name)))
        .collect()
}

fn route(s: &Service<'_>, settings: &Settings, features: Features, kept: Option<&Value>) -> Value {
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
    let statics = || static_list(s);
    let handler = if dynamic {
        let udp = json!({"addresses": [format!("udp/{}", settings.upstream_dns)]});
        let tcp = json!({"addresses": [format!("tcp/{}", settings.upstream_dns)]});
        let zone = format!("{}.{}", s.name, settings.dns_zone);
        let policy = selection_policy(s.strategy, s.hash_key, None, features);
        let round_robin = policy["policy"] == "round_robin";
        let affinity = !matches!(
            policy["policy"].as_str(),
            Some("round_robin" | "least_conn" | "random")
        );
        let (name, resolver) = if settings.aperture > 0 && !affinity {
            // One window whatever the size, so a growing service never changes its route.
            (format!("_a{}.{zone}", settings.aperture), &udp)
        } else {
            (zone, &tcp)
        };
        let mut handler = json!({
            "handler": "reverse_proxy",
            "dynamic_upstreams": {
                "source": "srv",
                "name": name,
                "refresh": settings.dns_refresh,
                "resolver": resolver,
            },
            // What Caddy uses when the lookup fails: while Harbor is away.
            "upstreams": kept.cloned().unwrap_or_else(statics),
            // SRV targets are names in Harbor's zone: they resolve through it too.
            "transport": {"protocol": "http", "resolver": udp},
            "load_balancing": {
                "selection_policy": policy,
                "retries": settings.retries,
            },
        });
        // Caddy 2.6 provisions every dynamic upstream on every request, and with passive checks
        // that includes a new named logger per upstream, a cost that grows with a service's
        // instances (see host/benches/README.md, Backends: registration to routable). Round-robin
        // does without them, because its retry moves on to the next instance by itself. The other
        // policies can retry onto the same dead instance (least-conn finds a dead one least loaded
        // every time), so they keep them.
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
        let upstreams = statics();
        let weights: Vec<u32> = s.upstreams.iter().map(|(_, w)| *w).collect();
        let mut checks = json!({"passive": passive});
        if let Some(active) = s.health.as_ref().and_then(|h| active_check(h, features)) {
            checks["active"] = active;
        }
        json!({
            "handler": "reverse_proxy",
            "upstreams": upstreams,
            "load_balancing": {
                "selection_policy": selection_policy(s.strategy, s.hash_key, Some(&weights), features),
                "retries": settings.retries,
            },
            "health_checks": checks,
        })
    };
    let handle = match hash_key_handler(s.hash_key).filter(|_| s.strategy == "consistent-hash") {
        Some(key) => json!([key, handler]),
        None => json!([handler]),
    };
    json!({
        "group": format!("harbor-{}", s.name),
        "match": [Value::Object(matcher)],
        "handle": handle,
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
            selection_policy(s, HashKey::ClientIp, Some(&[1, 3]), Features::default())["policy"]
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
        let w = selection_policy(
            "weighted-round-robin",
            HashKey::ClientIp,
            Some(&[1, 3]),
            MODERN,
        );
        assert_eq!(
            w,
            json!({"policy": "weighted_round_robin", "weights": [1, 3]})
        );
        // `ip_hash` on every release: 2.7's `client_ip_hash` differs only behind trusted proxies,
        // which Harbor's routes do not name, and a policy that depended on the version would
        // be rewritten (a reload) whenever the version could not be told at a start.
        let hash = selection_policy("consistent-hash", HashKey::ClientIp, None, MODERN);
        assert_eq!(hash["policy"], "ip_hash");
    }

    #[test]
    fn a_header_or_cookie_hash_key_is_hashed_through_a_header_of_harbors() {
        let by = |key| selection_policy("consistent-hash", key, None, Features::default());
        assert_eq!(by(HashKey::ClientIp)["policy"], "ip_hash");
        assert_eq!(
            by(HashKey::Cookie("sid")),
            json!({"policy": "header", "field": HASH_KEY_HEADER})
        );
        // Other strategies do not hash: the key changes nothing.
        assert_eq!(
            selection_policy("round-robin", HashKey::Header("x"), None, MODERN)["policy"],
            "round_robin"
        );
        let handler = hash_key_handler(HashKey::Cookie("s.id")).unwrap();
        let routes = handler["routes"].as_array().unwrap();
        // The client's address first, whatever the client sent; the cookie where it is.
        assert_eq!(
            routes[0]["handle"][0]["request"]["set"][HASH_KEY_HEADER][0],
            "{http.request.remote.host}"
        );
        assert_eq!(
            routes[1]["match"][0]["header_regexp"]["Cookie"]["pattern"],
            "(?:^|[;,]\\s*)s\\.id="
        );
        assert_eq!(
            routes[1]["handle"][0]["request"]["set"][HASH_KEY_HEADER][0],
            "{http.request.cookie.s.id}"
        );
        assert!(hash_key_handler(HashKey::ClientIp).is_none());
    }

    const MODERN: Features = Features {
        weighted: true,
        thresholds: true,
    };

    fn dns_settings() -> Settings {
        Settings {
            upstream_dns: "127.0.0.1:5353".into(),
            ..Settings::default()
        }
    }

    #[test]
    fn features_follow_the_version_caddy_reports() {
        assert_eq!(Features::of_version("2.6.2"), Some(Features::default()));
        assert_eq!(
            Features::of_version("v2.11.7 h1:yj0Y4fYZGPkSvibBJ1sTWE33xC0fxztVyXEW5iIdUT4="),
            Some(MODERN)
        );
        assert_eq!(Features::of_version("v2.7.0-beta.1"), Some(MODERN));
        assert_eq!(Features::of_version("v3.0.0"), Some(MODERN));
        assert_eq!(Features::of_version("banana"), None);
        let unknown = Settings::default();
        assert_eq!(Features::of(&unknown), Features::default(), "2.6 at worst");
        assert!(Settings::parse(r#"{"version": "nope"}"#).is_err());
        assert!(Settings::parse(r#"{"aperture": 33}"#).is_err());
    }

    #[test]
    fn loopback_services_use_dynamic_upstreams_with_a_static_fallback() {
        let hosts = vec!["a.localhost".to_owned()];
        let settings = dns_settings();
        let old = Features::default();
        let none = Fallbacks::new();
        let r = routes(&[svc("a", &hosts, "/", "random")], &settings, old, &none);
        let h = &r[0]["handle"][0];
        assert_eq!(h["dynamic_upstreams"]["name"], "_a4.a.svc.harbor.");
        assert_eq!(
            h["dynamic_upstreams"]["resolver"]["addresses"],
            json!(["udp/127.0.0.1:5353"])
        );
        assert_eq!(
            h["upstreams"],
            json!([{"dial": "127.0.0.1:9001"}, {"dial": "127.0.0.1:9002"}]),
            "what Caddy serves while Harbor is away"
        );
        // Random can retry onto the instance that just failed: passive checks take it out.
        assert!(h["health_checks"]["passive"].is_object());
        let r = routes(
            &[svc("a", &hosts, "/", "round-robin")],
            &settings,
            old,
            &none,
        );
        assert!(r[0]["handle"][0].get("health_checks").is_none());
        let mut remote = svc("b", &hosts, "/", "random");
        remote.upstreams.push(("backend.internal:80", 1));
        let r = routes(&[remote], &settings, old, &none);
        assert!(r[0]["handle"][0].get("dynamic_upstreams").is_none());
        assert_eq!(r[0]["handle"][0]["upstreams"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn the_static_fallback_is_kept_through_churn_until_refreshed() {
        let hosts = vec!["a.localhost".to_owned()];
        let settings = dns_settings();
        let first = routes(
            &[svc("a", &hosts, "/", "round-robin")],
            &settings,
            MODERN,
            &Fallbacks::new(),
        );
        let kept = fallbacks_of(&Value::Array(first.clone()));
        assert_eq!(kept.len(), 1);
        let mut churned = svc("a", &hosts, "/", "round-robin");
        churned.upstreams = vec![("127.0.0.1:9003", 1)];
        let again = routes(std::slice::from_ref(&churned), &settings, MODERN, &kept);
        assert_eq!(again, first, "instance churn changes nothing Caddy holds");
        assert!(
            fallbacks_lag(&again, std::slice::from_ref(&churned)),
            "but the list lags"
        );
        assert!(!fallbacks_lag(
            &first,
            &[svc("a", &hosts, "/", "round-robin")]
        ));
        let refreshed = routes(&[churned], &settings, MODERN, &Fallbacks::new());
        assert_eq!(
            refreshed[0]["handle"][0]["upstreams"],
            json!([{"dial": "127.0.0.1:9003"}])
        );
        // Static services have no fallback to keep: their upstreams are the route.
        let plain = routes(
            &[svc("a", &hosts, "/", "round-robin")],
            &Settings::default(),
            MODERN,
            &Fallbacks::new(),
        );
        assert!(fallbacks_of(&Value::Array(plain)).is_empty());
    }

    #[test]
    fn longer_prefixes_come_first_and_root_has_no_path_matcher() {
        let hosts = vec!["a.localhost".to_owned()];
        let services = [
            svc("a", &hosts, "/", "random"),
            svc("b", &hosts, "/api", "first"),
        ];
        let r = routes(&services, &Settings::default(), MODERN, &Fallbacks::new());
        assert_eq!(r[0]["group"], "harbor-b");
        assert_eq!(service_of(&r[0]), Some("b"));
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
        let settings = dns_settings();
        for strategy in ["round-robin", "least-connections", "random", "my-canary"] {
            let mut s = svc("a", &hosts, "/", strategy);
            let addrs = many(100);
            s.upstreams = addrs.iter().map(|a| (a.as_str(), 1)).collect();
            let r = routes(&[s], &settings, MODERN, &Fallbacks::new());
            let source = &r[0]["handle"][0]["dynamic_upstreams"];
            assert_eq!(source["source"], "srv", "{strategy}");
            assert_eq!(source["name"], "_a4.a.svc.harbor.", "{strategy}");
        }
    }

    #[test]
    fn services_with_affinity_see_every_instance_over_tcp_at_any_size() {
        let hosts = vec!["a.localhost".to_owned()];
        let settings = dns_settings();
        let with = |n: u16, strategy: &str, settings: &Settings| {
            let mut s = svc("a", &hosts, "/", strategy);
            let addrs = many(n);
            s.upstreams = addrs.iter().map(|a| (a.as_str(), 1)).collect();
            routes(&[s], settings, MODERN, &Fallbacks::new())[0]["handle"][0]["dynamic_upstreams"]
                .clone()
        };
        for n in [1, 40, 1000] {
            let source = with(n, "consistent-hash", &settings);
            assert_eq!(source["name"], "a.svc.harbor.", "{n}");
            assert_eq!(
                source["resolver"]["addresses"],
                json!(["tcp/127.0.0.1:5353"])
            );
            assert_eq!(
                source,
                with(3, "consistent-hash", &settings),
                "{n}: same route"
            );
        }
        // With the window off, a round-robin service asks for all of them the same way.
        let whole = Settings {
            aperture: 0,
            ..settings
        };
        assert_eq!(with(100, "round-robin", &whole)["name"], "a.svc.harbor.");
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
        let none = Fallbacks::new();
        let r = routes(
            std::slice::from_ref(&s),
            &Settings::default(),
            MODERN,
            &none,
        );
        assert_eq!(
            r[0]["handle"][0]["health_checks"]["active"],
            json!({"uri": "/healthz", "expect_status": 204, "interval": "500ms", "timeout": "200ms", "passes": 2, "fails": 3})
        );
        let old = Features::default();
        let r = routes(std::slice::from_ref(&s), &Settings::default(), old, &none);
        assert!(
            r[0]["handle"][0]["health_checks"]["active"]
                .get("fails")
                .is_none()
        );
        // A TCP connect check has no Caddy equivalent: passive checks only.
        s.health.as_mut().unwrap().path = None;
        let r = routes(&[s], &Settings::default(), old, &none);
        assert!(r[0]["handle"][0]["health_checks"].get("active").is_none());
        assert!(r[0]["handle"][0]["health_checks"]["passive"].is_object());
    }
}
