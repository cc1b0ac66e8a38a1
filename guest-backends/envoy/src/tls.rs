//! TLS in Envoy's terms (pure, unit-tested natively): the certificates the host obtained become
//! SDS secrets, one file per host name, which listeners name by file; HTTPS is one listener that
//! picks a filter chain, and so a certificate, by the name a client asks for (SNI); tcp services
//! terminate TLS with their names' certificates, or share a listen address and are routed
//! unopened by SNI.
//!
//! A listener refers to a secret by name and file, never by content, so that a renewal rewrites
//! the secret's file alone and Envoy swaps the certificate without rebuilding the listener.
//!
//! Secret files hold private keys in the clear: the adapter's directory must be readable by
//! Harbor and Envoy only. Documents shown to people (`render`) carry a placeholder instead.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::{Value, json};

use crate::xds::{self, Certificate, LISTENER, Service, Settings, Tls};

pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const TLS_INSPECTOR: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";

/// What `render` shows in place of a private key.
pub const HIDDEN_KEY: &str = "<private key, not shown>";

/// The HTTPS listener's name.
pub const HTTPS_LISTENER: &str = "harbor_https";

/// What is served over TLS, from the settings and the certificates the host gave: a host
/// without a certificate yet is not served over TLS at all, since Envoy would have no chain to
/// present for it.
pub struct Served<'a> {
    /// The HTTPS listener's port, when the settings give it an address.
    https_port: Option<u16>,
    certs: BTreeMap<&'a str, Certificate<'a>>,
}

impl<'a> Served<'a> {
    pub fn new(settings: &Settings, certs: &[Certificate<'a>]) -> Self {
        Self {
            https_port: settings.tls_listen().map(|(_, port)| port),
            certs: certs.iter().map(|c| (c.host, c.clone())).collect(),
        }
    }

    /// The hosts `s` (an http service) is served for over HTTPS, in its order.
    pub fn https_hosts(&self, s: &Service<'a>) -> Vec<&'a str> {
        if self.https_port.is_none() {
            return Vec::new();
        }
        s.https_hosts()
            .iter()
            .map(|(host, _)| *host)
            .filter(|host| self.certs.contains_key(host))
            .collect()
    }

    /// Whether plain HTTP requests for `host` of `s` are redirected to HTTPS: only where HTTPS
    /// is served, so that a host waiting for its certificate keeps answering over HTTP.
    pub fn redirects(&self, s: &Service<'a>, host: &str) -> bool {
        matches!(
            s.tls,
            Tls::Https {
                redirect_http: true,
                ..
            }
        ) && self.https_hosts(s).contains(&host)
    }

    /// The port a redirect names; none for 443, which `https://` implies.
    pub fn redirect_port(&self) -> Option<u16> {
        self.https_port.filter(|port| *port != 443)
    }

    /// The names a terminating tcp service has certificates for, in its order: the first of
    /// them serves clients that ask for no name.
    pub fn terminated(&self, s: &Service<'a>) -> Vec<&'a str> {
        match s.tls {
            Tls::Terminate(names) => names
                .iter()
                .map(String::as_str)
                .filter(|name| self.certs.contains_key(name))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Every host name `s` is served for with a certificate.
    pub fn hosts(&self, s: &Service<'a>) -> Vec<&'a str> {
        let mut hosts = self.https_hosts(s);
        hosts.extend(self.terminated(s));
        hosts
    }

    pub fn certificate(&self, host: &str) -> Option<&Certificate<'a>> {
        self.certs.get(host)
    }

    /// Why `s` cannot be served yet, if it cannot: TLS termination with no certificate at all.
    pub fn waiting(&self, s: &Service<'a>) -> Option<String> {
        match s.tls {
            Tls::Terminate(names) if self.terminated(s).is_empty() => Some(if names.is_empty() {
                "terminates TLS for no host name".into()
            } else {
                format!("waiting for a certificate for {}", names.join(", "))
            }),
            _ => None,
        }
    }

    /// A digest of the certificates `s` is served with, so that a service Envoy refused is
    /// offered again when one of them changes, though the service itself did not.
    pub fn fingerprint(&self, s: &Service<'a>) -> u64 {
        let mut h = DefaultHasher::new();
        for host in self.hosts(s) {
            if let Some(c) = self.certs.get(host) {
                (c.host, c.chain, c.key).hash(&mut h);
            }
        }
        h.finish()
    }
}

/// The secret's name: what a listener asks SDS for.
pub fn secret_name(host: &str) -> String {
    format!("harbor_cert_{host}")
}

/// The secret's file: the host name with `*` spelled out, and anything else a file name
/// should not hold replaced.
pub fn secret_file(host: &str) -> String {
    let name: String = host
        .replace('*', "_wildcard")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("sds-{name}.json")
}

/// Whether `file` is a secret's file, as [`secret_file`] names them.
pub fn is_secret_file(file: &str) -> bool {
    file.starts_with("sds-") && file.ends_with(".json")
}

/// The SDS resource of a certificate, key inline.
pub fn secret(c: &Certificate<'_>) -> Value {
    json!({
        "@type": SECRET,
        "name": secret_name(c.host),
        "tls_certificate": {
            "certificate_chain": {"inline_string": c.chain},
            "private_key": {"inline_string": c.key},
        },
    })
}

/// Replaces every private key in `doc` (a discovery response) with [`HIDDEN_KEY`].
pub fn hide_keys(doc: &mut Value) {
    let Some(resources) = doc["resources"].as_array_mut() else {
        return;
    };
    for r in resources {
        if let Some(key) = r.pointer_mut("/tls_certificate/private_key") {
            *key = json!({"inline_string": HIDDEN_KEY});
        }
    }
}

/// Where Envoy gets the secret of `host`: its file, by absolute path.
fn sds_config(settings: &Settings, host: &str) -> Value {
    json!({
        "name": secret_name(host),
        "sds_config": {
            "path_config_source": {"path": settings.path(&secret_file(host))},
            "resource_api_version": "V3",
        },
    })
}

/// A transport socket terminating TLS with the certificates of `hosts`; Envoy presents the one
/// whose names match the client's SNI, else the first.
fn terminate(settings: &Settings, hosts: &[&str], alpn: &[&str]) -> Value {
    let mut common = json!({
        "tls_certificate_sds_secret_configs":
            hosts.iter().map(|h| sds_config(settings, h)).collect::<Vec<_>>(),
    });
    if !alpn.is_empty() {
        common["alpn_protocols"] = json!(alpn);
    }
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": DOWNSTREAM_TLS, "common_tls_context": common},
    })
}

/// Reads the ClientHello's SNI (and ALPN) before a filter chain is chosen.
fn tls_inspector() -> Value {
    json!({"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": TLS_INSPECTOR}})
}

/// The HTTPS listener on `tls_listen`: a filter chain per host name, chosen by SNI, each with
/// the host's certificate and the TLS routes. Envoy chooses an exact name before a wildcard.
pub fn https_listener(settings: &Settings, hosts: &[&str]) -> Value {
    let (address, port) = settings.tls_listen().unwrap_or(("127.0.0.1".into(), 443));
    let chains: Vec<Value> = hosts
        .iter()
        .map(|host| {
            json!({
                "filter_chain_match": {"server_names": [host]},
                "transport_socket": terminate(settings, &[host], &["h2", "http/1.1"]),
                "filters": [xds::connection_manager(
                    settings,
                    HTTPS_LISTENER,
                    xds::TLS_ROUTE_CONFIG,
                    xds::TLS_RDS_FILE,
                )],
            })
        })
        .collect();
    json!({
        "@type": LISTENER,
        "name": HTTPS_LISTENER,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "listener_filters": [tls_inspector()],
        "filter_chains": chains,
    })
}

/// The filter chain of a tcp listener: its TLS terminated with the certificates of `names` (in
/// the service's order) when it has any.
pub fn tcp_chain(settings: &Settings, s: &Service<'_>, names: &[&str]) -> Value {
    let mut chain = json!({"filters": [tcp_proxy(s)]});
    if !names.is_empty() {
        chain["transport_socket"] = terminate(settings, names, &[]);
    }
    chain
}

fn tcp_proxy(s: &Service<'_>) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": format!("harbor_tcp_{}", s.name),
            "cluster": xds::cluster_name(s.name),
        },
    })
}

/// One listener per listen address that passthrough services share, with a filter chain per
/// service chosen by SNI; the connection goes to the service's cluster unopened. Named by port,
/// and by address too where two such addresses share a port.
pub fn sni_listeners(tcp: &[&Service<'_>]) -> Vec<Value> {
    let mut by_listen: BTreeMap<&str, Vec<&Service<'_>>> = BTreeMap::new();
    for s in tcp {
        if let (Tls::Passthrough(_), Some(listen)) = (&s.tls, s.listen) {
            by_listen.entry(listen).or_default().push(s);
        }
    }
    let port = |listen: &str| xds::split_addr(listen).map_or(0, |(_, port)| port);
    let mut ports: BTreeMap<u16, usize> = BTreeMap::new();
    for listen in by_listen.keys() {
        *ports.entry(port(listen)).or_default() += 1;
    }
    by_listen
        .into_iter()
        .map(|(listen, services)| {
            let name = if ports.get(&port(listen)) == Some(&1) {
                format!("harbor_sni_{}", port(listen))
            } else {
                let ip = xds::split_addr(listen)
                    .map(|(ip, _)| ip)
                    .unwrap_or_default();
                format!("harbor_sni_{ip}_{}", port(listen))
            };
            let chains: Vec<Value> = services
                .iter()
                .map(|s| {
                    let names = match s.tls {
                        Tls::Passthrough(names) => names,
                        _ => &[],
                    };
                    json!({
                        "filter_chain_match": {"server_names": names},
                        "filters": [tcp_proxy(s)],
                    })
                })
                .collect();
            json!({
                "@type": LISTENER,
                "name": name,
                "address": xds::socket_address(listen),
                // Alone on its port, as a tcp service's listener is.
                "enable_reuse_port": false,
                "listener_filters": [tls_inspector()],
                "filter_chains": chains,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(tls_listen: &str) -> Settings {
        Settings::parse(&format!(
            r#"{{"dir": "/run/h", "tls_listen": "{tls_listen}"}}"#
        ))
        .unwrap()
    }

    fn cert(host: &str) -> Certificate<'_> {
        Certificate {
            host,
            chain: "CHAIN",
            key: "KEY",
        }
    }

    #[test]
    fn wildcard_hosts_get_a_file_name_without_a_star() {
        assert_eq!(
            secret_file("*.example.com"),
            "sds-_wildcard.example.com.json"
        );
        assert_eq!(secret_file("a.example.com"), "sds-a.example.com.json");
        assert_eq!(secret_file("::1/x"), "sds-__1_x.json");
        assert!(is_secret_file(&secret_file("*.example.com")));
        assert_eq!(secret_name("*.example.com"), "harbor_cert_*.example.com");
    }

    #[test]
    fn https_needs_a_listener_and_a_certificate() {
        let hosts = vec!["a.test".to_owned(), "b.test".to_owned()];
        let mut s = Service::http("web", &hosts, "/", "round-robin", vec![]);
        s.tls = Tls::Https {
            certificates: vec![
                ("a.test", xds::Source::Acme),
                ("b.test", xds::Source::Internal),
            ],
            redirect_http: true,
            hsts: None,
        };
        let certs = [cert("b.test")];
        let served = Served::new(&settings("127.0.0.1:8443"), &certs);
        assert_eq!(served.https_hosts(&s), ["b.test"]);
        assert!(served.redirects(&s, "b.test"));
        assert!(!served.redirects(&s, "a.test"));
        assert_eq!(served.redirect_port(), Some(8443));
        assert_eq!(
            Served::new(&settings("0.0.0.0:443"), &certs).redirect_port(),
            None
        );
        let off = Served::new(&settings(""), &certs);
        assert!(off.https_hosts(&s).is_empty());
        assert!(!off.redirects(&s, "b.test"));
    }

    #[test]
    fn termination_waits_for_a_certificate_for_some_name() {
        let names = vec!["db.test".to_owned(), "db2.test".to_owned()];
        let mut s = Service::http("db", &[], "", "round-robin", vec![]);
        s.listen = Some("127.0.0.1:5433");
        s.tls = Tls::Terminate(&names);
        let none = Served::new(&settings(""), &[]);
        assert_eq!(
            none.waiting(&s).as_deref(),
            Some("waiting for a certificate for db.test, db2.test")
        );
        let certs = [cert("db2.test")];
        let some = Served::new(&settings(""), &certs);
        assert_eq!(some.waiting(&s), None);
        assert_eq!(some.terminated(&s), ["db2.test"]);
        assert_ne!(none.fingerprint(&s), some.fingerprint(&s));
    }

    #[test]
    fn the_https_listener_has_a_chain_per_name_with_its_secret() {
        let st = settings("127.0.0.1:8443");
        let l = https_listener(&st, &["a.test", "*.w.test"]);
        assert_eq!(l["name"], HTTPS_LISTENER);
        assert_eq!(l["address"]["socket_address"]["port_value"], 8443);
        assert_eq!(
            l["listener_filters"][0]["name"],
            "envoy.filters.listener.tls_inspector"
        );
        let chains = l["filter_chains"].as_array().unwrap();
        assert_eq!(chains.len(), 2);
        assert_eq!(
            chains[1]["filter_chain_match"]["server_names"],
            json!(["*.w.test"])
        );
        let common = &chains[1]["transport_socket"]["typed_config"]["common_tls_context"];
        assert_eq!(common["alpn_protocols"], json!(["h2", "http/1.1"]));
        assert_eq!(
            common["tls_certificate_sds_secret_configs"],
            json!([{"name": "harbor_cert_*.w.test", "sds_config": {
                "path_config_source": {"path": "/run/h/sds-_wildcard.w.test.json"},
                "resource_api_version": "V3"}}])
        );
        let hcm = &chains[0]["filters"][0]["typed_config"];
        assert_eq!(hcm["rds"]["route_config_name"], xds::TLS_ROUTE_CONFIG);
        assert_eq!(
            hcm["rds"]["config_source"]["path_config_source"]["path"],
            "/run/h/rds-tls.json"
        );
        assert_eq!(hcm["stat_prefix"], "harbor_https");
    }

    #[test]
    fn rendered_secrets_hide_their_keys() {
        let mut doc = xds::discovery(3, vec![secret(&cert("a.test"))]);
        assert_eq!(
            doc["resources"][0]["tls_certificate"]["private_key"]["inline_string"],
            "KEY"
        );
        hide_keys(&mut doc);
        let text = doc.to_string();
        assert!(!text.contains("KEY"), "{text}");
        assert!(text.contains(HIDDEN_KEY));
        assert!(text.contains("CHAIN"));
    }
}
