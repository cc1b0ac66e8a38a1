//! HTTPS for Harbor's hosts through Caddy's own automatic HTTPS (pure, unit-tested natively).
//!
//! Caddy takes the names to get certificates for, and to redirect plain HTTP for, only from the
//! host matchers of a server's top-level routes, never from inside a `subroute`. So the HTTPS
//! services get a second container route, first in the HTTPS server (`--caddy-tls-listen`),
//! whose own matcher lists every one of their hosts; inside it are their routes, as in the plain
//! container, with the HSTS header where one is asked for. Caddy then redirects plain HTTP for
//! those hosts itself and obtains their certificates, from the issuers Harbor names:
//!
//! - `acme` hosts: a policy with Caddy's ACME issuer pointed at Harbor's ACME directory;
//! - `internal` hosts: a policy with Caddy's internal issuer and a CA of Harbor's in Caddy's
//!   `pki` app, whose root is Harbor's local CA, so that one root signs in every mode. Harbor's
//!   root may not have intermediates below it (path length 0), so it is given as the
//!   intermediate too and signs the leaves itself;
//! - certificate files: `tls.certificates.load_files`, tagged `harbor`. Caddy manages no
//!   certificate for a name that has a loaded one.
//!
//! A host that asks for no redirect (`redirect_http = false`) is lifted the same way in the plain
//! HTTP server, into a route of its own before the plain container: Caddy adds its redirects
//! only for names no top-level route of that server matches.
//!
//! Everything Harbor puts in the `tls` and `pki` apps is marked (an `@id`, a tag, a CA id), so
//! that it can be found, replaced and removed without touching the user's.

use serde_json::{Map, Value, json};

use crate::routes::{self, Fallbacks, Features, Service, Settings};
use harbor_adapter_common::{Source, Tls};

/// The CA id of Harbor's local CA in Caddy's `pki` app.
pub const CA_ID: &str = "harbor";
/// The tag of Harbor's certificate files in `tls.certificates.load_files`.
pub const FILES_TAG: &str = "harbor";
const ACME_POLICY: &str = "harbor-acme";
const INTERNAL_POLICY: &str = "harbor-internal";

/// Where Caddy gets certificates, from the desired state's `tls`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Issuers {
    pub acme_directory: String,
    pub acme_email: Option<String>,
    pub acme_ca_root: Option<String>,
    /// Harbor's local CA: root certificate file, key file.
    pub local_ca: Option<(String, String)>,
}

/// Harbor's part of Caddy's HTTPS configuration for one state.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The container route for the HTTPS server; none when no service is served over HTTPS.
    pub container: Option<Value>,
    /// The route for the plain server that serves the hosts asking for no redirect over plain
    /// HTTP too; none when every host is redirected.
    pub unredirected: Option<Value>,
    pub policies: Vec<Value>,
    pub load_files: Vec<Value>,
    /// Harbor's CA for Caddy's `pki` app, when an `internal` host needs it.
    pub ca: Option<Value>,
}

/// The id of the container route in the HTTPS server.
pub fn container_id(settings: &Settings) -> String {
    format!("{}-tls", settings.route_id)
}

/// The id of the plain server's route for hosts that are not redirected.
pub fn unredirected_id(settings: &Settings) -> String {
    format!("{}-unredirected", settings.route_id)
}

/// The services of `services` served over HTTPS.
pub fn https_services<'a>(services: &[Service<'a>]) -> Vec<Service<'a>> {
    services
        .iter()
        .filter(|s| !s.https_hosts().is_empty())
        .cloned()
        .collect()
}

pub fn plan(
    services: &[Service<'_>],
    issuers: &Issuers,
    settings: &Settings,
    features: Features,
    kept: &Fallbacks,
) -> Plan {
    let https = https_services(services);
    let mut hosts: Vec<&str> = Vec::new();
    let (mut acme, mut internal, mut files) = (Vec::new(), Vec::new(), Vec::new());
    for s in &https {
        for &(host, source) in s.https_hosts() {
            hosts.push(host);
            match source {
                Source::Acme => acme.push(host),
                Source::Internal => internal.push(host),
                Source::Files(cert, key) => files.push((cert, key)),
            }
        }
    }
    for list in [&mut hosts, &mut acme, &mut internal] {
        list.sort_unstable();
        list.dedup();
    }
    files.sort_unstable();
    files.dedup();
    let container = (!hosts.is_empty()).then(|| {
        let inner: Vec<Value> = routes::routes(&https, settings, features, kept)
            .into_iter()
            .map(|route| with_hsts(route, &https))
            .collect();
        json!({
            "@id": container_id(settings),
            "match": [{"host": hosts}],
            "handle": [{"handler": "subroute", "routes": inner}],
        })
    });
    let plain: Vec<Service<'_>> = https
        .iter()
        .filter(|s| {
            matches!(
                s.tls,
                Tls::Https {
                    redirect_http: false,
                    ..
                }
            )
        })
        .cloned()
        .collect();
    let unredirected = (!plain.is_empty()).then(|| {
        let mut hosts: Vec<&str> = plain.iter().flat_map(|s| s.hosts.iter().map(String::as_str)).collect();
        hosts.sort_unstable();
        hosts.dedup();
        json!({
            "@id": unredirected_id(settings),
            "match": [{"host": hosts}],
            "handle": [{"handler": "subroute", "routes": routes::routes(&plain, settings, features, kept)}],
        })
    });
    let mut policies = Vec::new();
    if !acme.is_empty() {
        let mut issuer = json!({"module": "acme", "ca": issuers.acme_directory});
        if let Some(email) = &issuers.acme_email {
            issuer["email"] = json!(email);
        }
        if let Some(root) = &issuers.acme_ca_root {
            issuer["trusted_roots_pem_files"] = json!([root]);
        }
        policies.push(json!({"@id": ACME_POLICY, "subjects": acme, "issuers": [issuer]}));
    }
    let ca = match (&issuers.local_ca, internal.is_empty()) {
        (Some((cert, key)), false) => {
            policies.push(json!({
                "@id": INTERNAL_POLICY,
                "subjects": internal,
                "issuers": [{"module": "internal", "ca": CA_ID}],
            }));
            let pair = json!({"certificate": cert, "private_key": key, "format": "pem_file"});
            Some(json!({
                "name": "Harbor Local CA",
                "install_trust": false,
                "root": pair,
                "intermediate": pair,
            }))
        }
        // Without Harbor's CA, Caddy's own local CA issues them (its default for such names).
        (None, false) => {
            policies.push(json!({
                "@id": INTERNAL_POLICY,
                "subjects": internal,
                "issuers": [{"module": "internal"}],
            }));
            None
        }
        (_, true) => None,
    };
    let load_files = files
        .into_iter()
        .map(|(cert, key)| json!({"certificate": cert, "key": key, "tags": [FILES_TAG]}))
        .collect();
    Plan {
        container,
        unredirected,
        policies,
        load_files,
        ca,
    }
}

/// `route` with the `Strict-Transport-Security` header of its service, if it asks for one.
fn with_hsts(mut route: Value, services: &[Service<'_>]) -> Value {
    let hsts = routes::service_of(&route)
        .and_then(|name| services.iter().find(|s| s.name == name))
        .and_then(|s| match &s.tls {
            Tls::Https { hsts, .. } => *hsts,
            _ => None,
        });
    if let (Some(hsts), Some(handle)) = (hsts, route["handle"].as_array_mut()) {
        let header = json!({
            "handler": "headers",
            "response": {"set": {"Strict-Transport-Security": [hsts]}},
        });
        handle.insert(0, header);
    }
    route
}

/// Whether `policy` is one of Harbor's.
fn harbor_policy(policy: &Value) -> bool {
    matches!(policy["@id"].as_str(), Some(ACME_POLICY | INTERNAL_POLICY))
}

fn harbor_files(entry: &Value) -> bool {
    entry["tags"]
        .as_array()
        .is_some_and(|tags| tags.iter().any(|t| t == FILES_TAG))
}

/// The object under `key`, taken out of `map` (empty when there is none, or it is not one).
fn take_object(map: &mut Map<String, Value>, key: &str) -> Map<String, Value> {
    match map.remove(key) {
        Some(Value::Object(object)) => object,
        _ => Map::new(),
    }
}

/// Puts `value` under `key` unless it is an empty object or list: Caddy's configuration keeps
/// no empty parts of Harbor's making.
fn put_unless_empty(map: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Object(object) => object.is_empty(),
        Value::Array(list) => list.is_empty(),
        _ => false,
    };
    if !empty {
        map.insert(key.into(), value);
    }
}

/// Caddy's `apps` with Harbor's `tls` and `pki` parts made `plan`'s (or removed, for `None`),
/// and everything else as it was.
pub fn merged_apps(apps: &Value, plan: Option<&Plan>) -> Value {
    let mut apps = match apps {
        Value::Object(map) => map.clone(),
        _ => Map::new(),
    };
    let mut tls = take_object(&mut apps, "tls");
    // Automation policies: Harbor's first, so that they win over a catch-all of the user's.
    let mut automation = take_object(&mut tls, "automation");
    let theirs: Vec<Value> = automation
        .remove("policies")
        .and_then(|p| p.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !harbor_policy(p))
        .collect();
    let mut policies: Vec<Value> = plan.map(|p| p.policies.clone()).unwrap_or_default();
    policies.extend(theirs);
    put_unless_empty(&mut automation, "policies", Value::Array(policies));
    put_unless_empty(&mut tls, "automation", Value::Object(automation));
    let mut certificates = take_object(&mut tls, "certificates");
    let mut files: Vec<Value> = certificates
        .remove("load_files")
        .and_then(|f| f.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|f| !harbor_files(f))
        .collect();
    files.extend(plan.map(|p| p.load_files.clone()).unwrap_or_default());
    put_unless_empty(&mut certificates, "load_files", Value::Array(files));
    put_unless_empty(&mut tls, "certificates", Value::Object(certificates));
    put_unless_empty(&mut apps, "tls", Value::Object(tls));
    let mut pki = take_object(&mut apps, "pki");
    let mut authorities = take_object(&mut pki, "certificate_authorities");
    authorities.remove(CA_ID);
    if let Some(ca) = plan.and_then(|p| p.ca.clone()) {
        authorities.insert(CA_ID.into(), ca);
    }
    put_unless_empty(
        &mut pki,
        "certificate_authorities",
        Value::Object(authorities),
    );
    put_unless_empty(&mut apps, "pki", Value::Object(pki));
    Value::Object(apps)
}

/// Harbor's parts of `apps` as they stand, for telling whether they are in place.
pub fn harbor_parts(apps: &Value, settings: &Settings) -> Value {
    let route = |id: String| {
        apps["http"]["servers"]
            .as_object()
            .into_iter()
            .flat_map(|servers| servers.values())
            .flat_map(|server| server["routes"].as_array().into_iter().flatten())
            .find(|route| route["@id"] == id.as_str())
            .cloned()
            .unwrap_or(Value::Null)
    };
    let policies: Vec<Value> = apps["tls"]["automation"]["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| harbor_policy(p))
        .cloned()
        .collect();
    let files: Vec<Value> = apps["tls"]["certificates"]["load_files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| harbor_files(f))
        .cloned()
        .collect();
    json!({
        "container": route(container_id(settings)),
        "unredirected": route(unredirected_id(settings)),
        "policies": policies,
        "load_files": files,
        "ca": apps["pki"]["certificate_authorities"][CA_ID],
    })
}

/// [`harbor_parts`] as `plan` would leave them.
pub fn planned_parts(plan: Option<&Plan>) -> Value {
    json!({
        "container": plan.and_then(|p| p.container.clone()).unwrap_or(Value::Null),
        "unredirected": plan.and_then(|p| p.unredirected.clone()).unwrap_or(Value::Null),
        "policies": plan.map(|p| p.policies.clone()).unwrap_or_default(),
        "load_files": plan.map(|p| p.load_files.clone()).unwrap_or_default(),
        "ca": plan.and_then(|p| p.ca.clone()).unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn https<'a>(name: &'a str, hosts: &'a [String], sources: &[Source<'a>]) -> Service<'a> {
        let mut s = Service::http(name, hosts, "/", "round-robin", vec![("127.0.0.1:9001", 1)]);
        s.tls = Tls::Https {
            certificates: hosts
                .iter()
                .map(String::as_str)
                .zip(sources.iter().copied())
                .collect(),
            redirect_http: true,
            hsts: None,
        };
        s
    }

    fn issuers() -> Issuers {
        Issuers {
            acme_directory: "https://acme.test/dir".into(),
            acme_email: Some("ops@example.com".into()),
            acme_ca_root: Some("/etc/acme-root.pem".into()),
            local_ca: Some((
                "/var/lib/harbor/tls/ca.pem".into(),
                "/var/lib/harbor/tls/ca.key".into(),
            )),
        }
    }

    #[test]
    fn hosts_are_lifted_into_the_containers_own_matcher() {
        let (a, b) = (
            vec!["a.example.com".to_owned()],
            vec!["b.localhost".to_owned()],
        );
        let plain = vec!["plain.localhost".to_owned()];
        let services = vec![
            https("a", &a, &[Source::Acme]),
            https("b", &b, &[Source::Internal]),
            Service::http("p", &plain, "/", "round-robin", vec![]),
        ];
        let settings = Settings::default();
        let plan = plan(
            &services,
            &issuers(),
            &settings,
            Features::default(),
            &Fallbacks::new(),
        );
        let container = plan.container.expect("a container");
        assert_eq!(container["@id"], "harbor-tls");
        assert_eq!(
            container["match"],
            json!([{"host": ["a.example.com", "b.localhost"]}])
        );
        let inner = container["handle"][0]["routes"].as_array().expect("routes");
        assert_eq!(inner.len(), 2, "the plain service is not in it");
        assert_eq!(plan.policies[0]["subjects"], json!(["a.example.com"]));
        assert_eq!(
            plan.policies[0]["issuers"][0]["ca"],
            "https://acme.test/dir"
        );
        assert_eq!(plan.policies[0]["issuers"][0]["email"], "ops@example.com");
        assert_eq!(
            plan.policies[0]["issuers"][0]["trusted_roots_pem_files"],
            json!(["/etc/acme-root.pem"])
        );
        assert_eq!(plan.policies[1]["subjects"], json!(["b.localhost"]));
        assert_eq!(
            plan.policies[1]["issuers"][0],
            json!({"module": "internal", "ca": "harbor"})
        );
        let ca = plan.ca.expect("Harbor's CA");
        assert_eq!(
            ca["root"], ca["intermediate"],
            "the root signs the leaves itself"
        );
        assert_eq!(ca["install_trust"], false);
    }

    #[test]
    fn files_are_loaded_and_hsts_is_a_header_of_caddys() {
        let hosts = vec!["f.example.com".to_owned()];
        let mut s = https("f", &hosts, &[Source::Files("/c.pem", "/k.pem")]);
        if let Tls::Https { hsts, .. } = &mut s.tls {
            *hsts = Some("max-age=60");
        }
        let plan = plan(
            &[s],
            &issuers(),
            &Settings::default(),
            Features::default(),
            &Fallbacks::new(),
        );
        assert_eq!(
            plan.load_files,
            vec![json!({"certificate": "/c.pem", "key": "/k.pem", "tags": ["harbor"]})]
        );
        assert!(plan.policies.is_empty() && plan.ca.is_none());
        let route = &plan.container.expect("a container")["handle"][0]["routes"][0];
        assert_eq!(route["handle"][0]["handler"], "headers");
        assert_eq!(
            route["handle"][0]["response"]["set"]["Strict-Transport-Security"],
            json!(["max-age=60"])
        );
        assert_eq!(route["handle"][1]["handler"], "reverse_proxy");
    }

    #[test]
    fn merging_keeps_the_users_parts_and_replaces_harbors() {
        let apps = json!({
            "http": {"servers": {}},
            "tls": {
                "automation": {"policies": [
                    {"@id": "harbor-acme", "subjects": ["old.example.com"]},
                    {"issuers": [{"module": "internal"}]},
                ]},
                "certificates": {"load_files": [
                    {"certificate": "/user.pem", "key": "/user.key"},
                    {"certificate": "/old.pem", "key": "/old.key", "tags": ["harbor"]},
                ]},
            },
            "pki": {"certificate_authorities": {"local": {"install_trust": false}}},
        });
        let hosts = vec!["n.localhost".to_owned()];
        let services = vec![https("n", &hosts, &[Source::Internal])];
        let plan = plan(
            &services,
            &issuers(),
            &Settings::default(),
            Features::default(),
            &Fallbacks::new(),
        );
        let merged = merged_apps(&apps, Some(&plan));
        let policies = merged["tls"]["automation"]["policies"]
            .as_array()
            .expect("policies");
        assert_eq!(policies.len(), 2);
        assert_eq!(policies[0]["@id"], "harbor-internal");
        assert_eq!(policies[1], json!({"issuers": [{"module": "internal"}]}));
        assert_eq!(
            merged["tls"]["certificates"]["load_files"],
            json!([{"certificate": "/user.pem", "key": "/user.key"}])
        );
        assert!(merged["pki"]["certificate_authorities"]["local"].is_object());
        assert!(merged["pki"]["certificate_authorities"]["harbor"].is_object());
        assert_eq!(
            harbor_parts(&merged, &Settings::default())["policies"],
            json!(plan.policies)
        );

        let released = merged_apps(&merged, None);
        assert_eq!(
            released["tls"]["automation"]["policies"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        assert!(released["pki"]["certificate_authorities"]["harbor"].is_null());
        assert_eq!(released["http"], apps["http"]);
    }
}
