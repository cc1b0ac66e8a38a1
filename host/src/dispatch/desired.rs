//! The desired state: what the registry says the proxy should run, in the host's own terms
//! (comparable, unlike the generated types), and its conversion for the adapter contract.

use crate::backend::{
    DesiredState, HashKey as WitHashKey, HealthCheck as WitHealthCheck, HttpService,
    RefusedService, TcpService, Upstream,
};
use crate::model::{HashKey, HealthCheck, Protocol, ServiceView};

/// The desired state in the host's own terms (comparable, unlike the generated types).
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    http: Vec<DesiredService>,
    tcp: Vec<DesiredService>,
    /// Services the adapter contract cannot express, refused by the host on its behalf.
    unsupported: Vec<String>,
}

/// Why a service in [`Desired::unsupported`] is not given to the adapter.
const UNSUPPORTED: &str = "TLS on tcp services (termination and SNI passthrough) is served by Harbor's own tcp proxy, in embedded and caddy modes; the driven proxy's adapter cannot carry it";

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
}

impl Desired {
    pub fn of(services: &[ServiceView], with_tcp: bool) -> Self {
        let mut http = Vec::new();
        let mut tcp = Vec::new();
        let mut unsupported = Vec::new();
        for s in services {
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
            };
            match s.route.protocol {
                Protocol::Http => http.push(service),
                // The adapter contract has no TLS for tcp services: a proxy that carries tcp
                // would serve them as plain tcp, which their clients do not speak.
                Protocol::Tcp | Protocol::TlsPassthrough
                    if with_tcp
                        && (s.route.terminates_tls()
                            || s.route.protocol == Protocol::TlsPassthrough) =>
                {
                    unsupported.push(s.name.to_string());
                }
                Protocol::Tcp if with_tcp && s.route.listen.is_some() => tcp.push(service),
                Protocol::Tcp | Protocol::TlsPassthrough => {}
            }
        }
        http.sort_by(|a, b| a.name.cmp(&b.name));
        tcp.sort_by(|a, b| a.name.cmp(&b.name));
        unsupported.sort();
        Self {
            http,
            tcp,
            unsupported,
        }
    }

    /// The services refused on the adapter's behalf, as the adapter would refuse them.
    pub fn refusals(&self) -> impl Iterator<Item = RefusedService> + '_ {
        self.unsupported.iter().map(|name| RefusedService {
            name: name.clone(),
            reason: UNSUPPORTED.to_owned(),
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
                })
                .collect(),
            refresh_fallbacks,
        }
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
