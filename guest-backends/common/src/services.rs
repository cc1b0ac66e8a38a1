//! The desired state's services, borrowed from the generated records.

use crate::bindings::exports::harbor::backend::adapter::DesiredState;
use crate::bindings::harbor::backend::types::{
    CertificateSource, HashKey as WitHashKey, HealthCheck, TcpTls, Upstream,
};

/// A service as an adapter sees it, free of the generated binding types.
#[derive(Debug, Clone)]
pub struct Service<'a> {
    pub name: &'a str,
    /// Host names and path prefix (HTTP); empty for TCP.
    pub hosts: &'a [String],
    pub path_prefix: &'a str,
    /// The listen address (TCP); `None` for HTTP.
    pub listen: Option<&'a str>,
    /// (address, weight)
    pub upstreams: Vec<(&'a str, u32)>,
    pub strategy: &'a str,
    /// What the strategy hashes, if it hashes (HTTP only).
    pub hash_key: HashKey<'a>,
    pub health: Option<Health<'a>>,
    /// How it is served over TLS (HTTP: HTTPS; TCP: termination or passthrough).
    pub tls: Tls<'a>,
}

/// Where a host's certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    Acme,
    Internal,
    /// (chain, key) file paths.
    Files(&'a str, &'a str),
}

/// What a service does with TLS, free of the generated binding types.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Tls<'a> {
    /// Plain HTTP or TCP.
    #[default]
    None,
    /// HTTPS: each host with its certificate's source, in the order of `hosts`.
    Https {
        certificates: Vec<(&'a str, Source<'a>)>,
        redirect_http: bool,
        hsts: Option<&'a str>,
    },
    /// TCP whose TLS the proxy terminates with these names' certificates.
    Terminate(&'a [String]),
    /// TCP routed by SNI, unopened, for these names.
    Passthrough(&'a [String]),
}

/// What a request's hash key is made of; a request without the header or cookie is hashed by
/// its client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKey<'a> {
    ClientIp,
    /// A header, by its lower-cased name.
    Header(&'a str),
    Cookie(&'a str),
}

impl<'a> Service<'a> {
    /// An HTTP service without a health check.
    pub fn http(
        name: &'a str,
        hosts: &'a [String],
        path_prefix: &'a str,
        strategy: &'a str,
        upstreams: Vec<(&'a str, u32)>,
    ) -> Self {
        Self {
            name,
            hosts,
            path_prefix,
            listen: None,
            upstreams,
            strategy,
            hash_key: HashKey::ClientIp,
            health: None,
            tls: Tls::None,
        }
    }

    /// The hosts it serves over HTTPS, with their certificates' sources.
    pub fn https_hosts(&self) -> &[(&'a str, Source<'a>)] {
        match &self.tls {
            Tls::Https { certificates, .. } => certificates,
            _ => &[],
        }
    }
}

/// An active health check, free of the generated binding types.
#[derive(Debug, Clone)]
pub struct Health<'a> {
    /// `GET` this path; `None` for a TCP connect check (which Caddy cannot run).
    pub path: Option<&'a str>,
    /// The expected status; `None` accepts any 2xx or 3xx.
    pub status: Option<u16>,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
}

/// The state's HTTP services, in order.
pub fn http_services(state: &DesiredState) -> Vec<Service<'_>> {
    state
        .http
        .iter()
        .map(|s| Service {
            name: &s.name,
            hosts: &s.hosts,
            path_prefix: &s.path_prefix,
            listen: None,
            upstreams: upstreams(&s.upstreams),
            strategy: &s.strategy,
            hash_key: match &s.hash_key {
                WitHashKey::ClientIp => HashKey::ClientIp,
                WitHashKey::Header(name) => HashKey::Header(name),
                WitHashKey::Cookie(name) => HashKey::Cookie(name),
            },
            health: s.health.as_ref().map(health),
            tls: match &s.https {
                None => Tls::None,
                Some(https) => Tls::Https {
                    certificates: s
                        .hosts
                        .iter()
                        .zip(&https.certificates)
                        .map(|(host, source)| (host.as_str(), self::source(source)))
                        .collect(),
                    redirect_http: https.redirect_http,
                    hsts: https.hsts.as_deref(),
                },
            },
        })
        .collect()
}

fn source(s: &CertificateSource) -> Source<'_> {
    match s {
        CertificateSource::Acme => Source::Acme,
        CertificateSource::Internal => Source::Internal,
        CertificateSource::Files((cert, key)) => Source::Files(cert, key),
    }
}

/// A certificate the host obtained for a host name, for a proxy that does not obtain its own.
#[derive(Clone, PartialEq, Eq)]
pub struct Certificate<'a> {
    /// The host name it is served for; may start with `*.`.
    pub host: &'a str,
    /// The chain, leaf first, PEM.
    pub chain: &'a str,
    /// The private key, PEM.
    pub key: &'a str,
}

/// Never the key: a certificate ends up in logs and test failures through `{:?}`.
impl std::fmt::Debug for Certificate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("host", &self.host)
            .field("chain", &format_args!("<{} bytes>", self.chain.len()))
            .finish_non_exhaustive()
    }
}

/// The certificates the host gives in `state`, in its order (empty for a proxy that obtains
/// its own).
pub fn certificates(state: &DesiredState) -> Vec<Certificate<'_>> {
    state
        .certificates
        .iter()
        .map(|c| Certificate {
            host: &c.host,
            chain: &c.chain,
            key: &c.key,
        })
        .collect()
}

/// The state's TCP services, in order.
pub fn tcp_services(state: &DesiredState) -> Vec<Service<'_>> {
    state
        .tcp
        .iter()
        .map(|s| Service {
            name: &s.name,
            hosts: &[],
            path_prefix: "",
            listen: Some(&s.listen),
            upstreams: upstreams(&s.upstreams),
            strategy: &s.strategy,
            hash_key: HashKey::ClientIp,
            health: s.health.as_ref().map(health),
            tls: match &s.tls {
                TcpTls::None => Tls::None,
                TcpTls::Terminate(names) => Tls::Terminate(names),
                TcpTls::Passthrough(names) => Tls::Passthrough(names),
            },
        })
        .collect()
}

fn upstreams(list: &[Upstream]) -> Vec<(&str, u32)> {
    list.iter()
        .map(|u| (u.address.as_str(), u.weight))
        .collect()
}

fn health(h: &HealthCheck) -> Health<'_> {
    Health {
        path: h.http_path.as_deref(),
        status: h.expect_status,
        interval_ms: h.interval_ms,
        timeout_ms: h.timeout_ms,
        rise: h.rise,
        fall: h.fall,
    }
}
