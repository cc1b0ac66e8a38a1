//! The desired state: what the registry says the proxy should run, in the host's own terms
//! (comparable, unlike the generated types), and its conversion for the adapter contract.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::{
    Certificate, CertificateSource, DesiredState, HashKey as WitHashKey,
    HealthCheck as WitHealthCheck, HttpService, Https, RefusedService, TcpService, TcpTls,
    TlsSettings, Upstream,
};
use crate::model::{HashKey, HealthCheck, Protocol, ServiceView, TlsMode};
use crate::tls::Certificates;
use crate::tls::files::Pem;

/// The desired state in the host's own terms (comparable, unlike the generated types).
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    http: Vec<DesiredService>,
    tcp: Vec<DesiredService>,
    /// Services the adapter contract cannot express, refused by the host on its behalf.
    unsupported: Vec<(String, String)>,
    tls: Issuers,
    /// The certificates of the hosts served over TLS, for a proxy that is handed them.
    certificates: Vec<(String, Arc<Pem>)>,
}

/// Where a proxy that obtains its own certificates gets them, from Harbor's settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Issuers {
    pub acme_directory: String,
    pub acme_email: Option<String>,
    pub acme_ca_root: Option<PathBuf>,
    /// Harbor's local CA: its root certificate's file and its key's.
    pub local_ca: Option<(PathBuf, PathBuf)>,
}

/// What the adapter in force can take, and where certificates come from.
#[derive(Clone, Copy)]
pub struct Shape<'a> {
    pub with_tcp: bool,
    /// Whether the proxy obtains its own certificates; if not, the host hands them over.
    pub obtains_certificates: bool,
    pub issuers: &'a Issuers,
    pub certificates: Option<&'a Arc<Certificates>>,
}

/// One service: `hosts` and `path` for HTTP, `listen` for TCP.
#[derive(Debug, Clone, PartialEq)]
struct DesiredService {
    name: String,
    hosts: Vec<String>,
    path: String,
    listen: String,
    upstreams: Vec<(String, u32)>,
    strategy: String,
    hash_key: HashKey,
    health: Option<HealthCheck>,
    tls: ServiceTls,
}

/// What a service does with TLS, as the contract has it.
#[derive(Debug, Clone, PartialEq)]
enum ServiceTls {
    None,
    Https {
        /// One per host, in the order of `hosts`.
        sources: Vec<TlsMode>,
        redirect: bool,
        hsts: Option<String>,
    },
    Terminate(Vec<String>),
    Passthrough(Vec<String>),
}

impl Desired {
    pub fn of(services: &[ServiceView], shape: Shape<'_>) -> Self {
        let with_tcp = shape.with_tcp;
        let mut http = Vec::new();
        let mut tcp = Vec::new();
        let mut unsupported = Vec::new();
        let mut certified: Vec<&str> = Vec::new();
        for s in services {
            let hosts = || s.route.hosts.iter().map(ToString::to_string).collect();
            let tls = match s.route.protocol {
                Protocol::Http if s.route.tls.serves() => ServiceTls::Https {
                    sources: s
                        .route
                        .hosts
                        .iter()
                        .map(|h| s.route.tls.mode_for(h))
                        .collect(),
                    redirect: s.route.tls.redirects(),
                    hsts: s.route.tls.hsts.clone(),
                },
                Protocol::Tcp if s.route.terminates_tls() => ServiceTls::Terminate(hosts()),
                Protocol::TlsPassthrough => ServiceTls::Passthrough(hosts()),
                _ => ServiceTls::None,
            };
            if matches!(tls, ServiceTls::Https { .. } | ServiceTls::Terminate(_)) {
                certified.extend(s.route.hosts.iter().map(|h| h.as_str()));
            }
            let service = DesiredService {
                name: s.name.to_string(),
                hosts: s.route.hosts.iter().map(ToString::to_string).collect(),
                path: s
                    .route
                    .path
                    .as_ref()
                    .map_or("/".to_owned(), ToString::to_string),
                listen: s.route.listen.map(|l| l.to_string()).unwrap_or_default(),
                upstreams: s.upstream_addresses(),
                strategy: s.route.strategy.to_string(),
                hash_key: s.proxy.hash_key.clone(),
                health: s.proxy.health.clone(),
                tls,
            };
            match s.route.protocol {
                Protocol::Http => http.push(service),
                // A proxy that terminates TLS for tcp needs the certificates handed to it.
                Protocol::Tcp
                    if with_tcp
                        && shape.obtains_certificates
                        && matches!(service.tls, ServiceTls::Terminate(_)) =>
                {
                    unsupported.push((s.name.to_string(), NO_TCP_CERTIFICATES.to_owned()));
                }
                Protocol::Tcp | Protocol::TlsPassthrough
                    if with_tcp && s.route.listen.is_some() =>
                {
                    tcp.push(service);
                }
                Protocol::Tcp | Protocol::TlsPassthrough => {}
            }
        }
        http.sort_by(|a, b| a.name.cmp(&b.name));
        tcp.sort_by(|a, b| a.name.cmp(&b.name));
        unsupported.sort();
        certified.sort_unstable();
        certified.dedup();
        let certificates = match shape.certificates {
            Some(store) if !shape.obtains_certificates => store.pems(certified),
            _ => Vec::new(),
        };
        Self {
            http,
            tcp,
            unsupported,
            tls: shape.issuers.clone(),
            certificates,
        }
    }

    /// The services refused on the adapter's behalf, as the adapter would refuse them.
    pub fn refusals(&self) -> impl Iterator<Item = RefusedService> + '_ {
        self.unsupported
            .iter()
            .map(|(name, reason)| RefusedService {
                name: name.clone(),
                reason: reason.clone(),
            })
    }

    pub fn services(&self) -> usize {
        self.http.len() + self.tcp.len()
    }

    /// The state as the adapter contract has it; `refresh_fallbacks` as the contract says.
    pub fn to_wit(&self, revision: u64, refresh_fallbacks: bool) -> DesiredState {
        let ups = |u: &[(String, u32)]| {
            u.iter()
                .map(|(address, weight)| Upstream {
                    address: address.clone(),
                    weight: *weight,
                })
                .collect()
        };
        DesiredState {
            revision,
            http: self
                .http
                .iter()
                .map(|s| HttpService {
                    name: s.name.clone(),
                    hosts: s.hosts.clone(),
                    path_prefix: s.path.clone(),
                    upstreams: ups(&s.upstreams),
                    strategy: s.strategy.clone(),
                    hash_key: match &s.hash_key {
                        HashKey::ClientIp => WitHashKey::ClientIp,
                        HashKey::Header(name) => WitHashKey::Header(name.clone()),
                        HashKey::Cookie(name) => WitHashKey::Cookie(name.clone()),
                    },
                    health: s.health.as_ref().map(health_to_wit),
                    https: match &s.tls {
                        ServiceTls::Https {
                            sources,
                            redirect,
                            hsts,
                        } => Some(Https {
                            certificates: sources.iter().map(source_to_wit).collect(),
                            redirect_http: *redirect,
                            hsts: hsts.clone(),
                        }),
                        _ => None,
                    },
                })
                .collect(),
            tcp: self
                .tcp
                .iter()
                .map(|s| TcpService {
                    name: s.name.clone(),
                    listen: s.listen.clone(),
                    upstreams: ups(&s.upstreams),
                    strategy: s.strategy.clone(),
                    health: s.health.as_ref().map(health_to_wit),
                    tls: match &s.tls {
                        ServiceTls::Terminate(names) => TcpTls::Terminate(names.clone()),
                        ServiceTls::Passthrough(names) => TcpTls::Passthrough(names.clone()),
                        _ => TcpTls::None,
                    },
                })
                .collect(),
            refresh_fallbacks,
            tls: TlsSettings {
                acme_directory: self.tls.acme_directory.clone(),
                acme_email: self.tls.acme_email.clone(),
                acme_ca_root: self.tls.acme_ca_root.as_ref().map(|p| path_text(p)),
                local_ca: self
                    .tls
                    .local_ca
                    .as_ref()
                    .map(|(cert, key)| (path_text(cert), path_text(key))),
            },
            certificates: self
                .certificates
                .iter()
                .map(|(host, pem)| Certificate {
                    host: host.clone(),
                    chain: pem.chain.clone(),
                    key: pem.key.clone(),
                })
                .collect(),
        }
    }
}

/// Why a tcp service that terminates TLS is not given to a proxy that obtains its own
/// certificates (no such proxy carries tcp today).
const NO_TCP_CERTIFICATES: &str = "the driven proxy obtains its own certificates and cannot terminate TLS for tcp services; Harbor's own tcp proxy serves them in embedded and caddy modes";

fn path_text(path: &std::path::Path) -> String {
    path.to_string_lossy().into_owned()
}

fn source_to_wit(mode: &TlsMode) -> CertificateSource {
    match mode {
        TlsMode::Auto => CertificateSource::Acme,
        TlsMode::Internal => CertificateSource::Internal,
        TlsMode::Files { cert, key } => CertificateSource::Files((path_text(cert), path_text(key))),
        // Not served over TLS: never among a service's sources.
        TlsMode::Off => CertificateSource::Internal,
    }
}

fn health_to_wit(h: &HealthCheck) -> WitHealthCheck {
    let ms = |d: std::time::Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    WitHealthCheck {
        http_path: h.path.clone(),
        expect_status: h.status,
        interval_ms: ms(h.interval),
        timeout_ms: ms(h.timeout),
        rise: h.rise,
        fall: h.fall,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::events::EventBus;
    use crate::metrics::Metrics;
    use crate::model::{Route, RouteInput, ServiceName, Tls, TlsInput};
    use crate::registry::{LeaseLimits, Registry};

    fn registry() -> Registry {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        Registry::new(Arc::new(EventBus::new(64)), metrics, LeaseLimits::default())
    }

    fn route(
        name: &ServiceName,
        input: impl FnOnce(RouteInput<'_>) -> Result<Route, crate::model::FieldError>,
    ) -> Route {
        input(RouteInput::new(name)).expect("a route")
    }

    fn register(registry: &Registry, name: ServiceName, mut route: Route, tls: Tls) {
        route.tls = tls;
        let registration = crate::registry::tests::reg_route(name, route, "127.0.0.1:9", 3600);
        registry.register(registration).expect("registered");
    }

    fn word(mode: &str) -> Tls {
        Tls::parse(Some(&TlsInput::Word(mode.into())), None, None).expect("tls")
    }

    fn shape(issuers: &Issuers, with_tcp: bool, obtains_certificates: bool) -> Shape<'_> {
        Shape {
            with_tcp,
            obtains_certificates,
            issuers,
            certificates: None,
        }
    }

    #[test]
    fn each_host_gets_its_certificates_source_and_tcp_keeps_its_tls() {
        let registry = registry();
        let hosts = vec!["shop.example.com".to_owned(), "shop.localhost".to_owned()];
        let shop = ServiceName::parse("shop").expect("a name");
        let r = route(&shop, |r| {
            RouteInput {
                hosts: Some(&hosts),
                ..r
            }
            .validate()
        });
        register(&registry, shop, r, Tls::default());
        let plain = ServiceName::parse("plain").expect("a name");
        let r = route(&plain, |r| r.validate());
        register(&registry, plain, r, word("off"));
        let db = ServiceName::parse("db").expect("a name");
        let r = route(&db, |r| {
            RouteInput {
                protocol: Some(Protocol::TlsPassthrough),
                listen: Some("127.0.0.1:5433"),
                host: Some("db.example.com"),
                ..r
            }
            .validate()
        });
        register(&registry, db, r, Tls::default());
        let issuers = Issuers::default();
        let desired = Desired::of(&registry.services(), shape(&issuers, true, false));
        let state = desired.to_wit(1, false);
        let shop = state.http.iter().find(|s| s.name == "shop").expect("shop");
        let https = shop.https.as_ref().expect("served over HTTPS");
        assert!(matches!(
            https.certificates.as_slice(),
            [CertificateSource::Acme, CertificateSource::Internal]
        ));
        assert!(https.redirect_http);
        let plain = state
            .http
            .iter()
            .find(|s| s.name == "plain")
            .expect("plain");
        assert!(plain.https.is_none(), "tls = \"off\" is plain HTTP only");
        assert!(
            matches!(&state.tcp[0].tls, TcpTls::Passthrough(names) if names == &["db.example.com".to_owned()])
        );
        assert_eq!(desired.refusals().count(), 0);
        assert!(state.certificates.is_empty(), "no store, no certificates");
    }

    #[test]
    fn tcp_termination_is_refused_for_a_proxy_that_obtains_its_own_certificates() {
        let registry = registry();
        let mail = ServiceName::parse("mail").expect("a name");
        let r = route(&mail, |r| {
            RouteInput {
                protocol: Some(Protocol::Tcp),
                listen: Some("127.0.0.1:4465"),
                host: Some("mail.localhost"),
                ..r
            }
            .validate()
        });
        register(&registry, mail, r, word("internal"));
        let issuers = Issuers::default();
        let desired = Desired::of(&registry.services(), shape(&issuers, true, true));
        let refused: Vec<_> = desired.refusals().collect();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].name, "mail");
        assert!(desired.to_wit(1, false).tcp.is_empty());
        // A proxy that is handed certificates takes it.
        let desired = Desired::of(&registry.services(), shape(&issuers, true, false));
        assert_eq!(desired.refusals().count(), 0);
        assert!(matches!(
            &desired.to_wit(1, false).tcp[0].tls,
            TcpTls::Terminate(_)
        ));
    }
}
