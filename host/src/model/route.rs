//! The routing attributes of a service (how traffic finds it), the claims only one service may
//! hold, and the validation shared by route files and registrations.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::names::{FieldError, HostName, PathPrefix, ServiceName, StrategyName, UpstreamAddr};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Tcp,
    /// TLS connections routed by the name their ClientHello asks for (SNI), never decrypted:
    /// several services share one listen address.
    #[serde(rename = "tls-passthrough")]
    TlsPassthrough,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
            Protocol::TlsPassthrough => "tls-passthrough",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Static,
    Ephemeral,
}

/// How traffic finds a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Http {
        hosts: Vec<HostName>,
        path: PathPrefix,
    },
    /// Matched by its listen address. `hosts` are the names its certificate is for when it
    /// terminates TLS; with `passthrough`, the SNI names its connections are routed by.
    Tcp {
        listen: SocketAddr,
        hosts: Vec<HostName>,
        passthrough: bool,
    },
}

/// Something only one service may hold at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Claim {
    HostPath(HostName, PathPrefix),
    Listen(SocketAddr),
    /// An SNI name on a listen address that TLS passthrough services share.
    Sni(SocketAddr, HostName),
}

impl Claim {
    /// The request field a conflicting claim is reported against.
    pub fn field(&self) -> &'static str {
        match self {
            Claim::HostPath(..) | Claim::Sni(..) => "host",
            Claim::Listen(_) => "listen",
        }
    }

    /// Whether `other`, held by another service, rules this one out though it is not the same
    /// claim: a plain listener and SNI-routed services cannot share an address.
    fn rivals(&self, other: &Claim) -> bool {
        match (self, other) {
            (Claim::Listen(a), Claim::Sni(b, _)) | (Claim::Sni(a, _), Claim::Listen(b)) => a == b,
            _ => false,
        }
    }
}

/// The claim among those `taken` (each with its holder) that rules out `claim` for service
/// `name`, with its holder: the same claim, or a rival one on the same listen address.
pub fn conflict<'a>(
    taken: &'a std::collections::HashMap<Claim, ServiceName>,
    name: &ServiceName,
    claim: &Claim,
) -> Option<(Claim, &'a ServiceName)> {
    if let Some(owner) = taken.get(claim).filter(|owner| *owner != name) {
        return Some((claim.clone(), owner));
    }
    if matches!(claim, Claim::HostPath(..)) {
        return None;
    }
    // Only listen addresses have rivals, and services that hold them are few: a scan.
    taken
        .iter()
        .find(|(held, owner)| *owner != name && claim.rivals(held))
        .map(|(held, owner)| (held.clone(), owner))
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::HostPath(h, p) => write!(f, "host {h} with path {p}"),
            Claim::Listen(a) => write!(f, "listen address {a}"),
            Claim::Sni(a, h) => write!(f, "SNI name {h} on {a}"),
        }
    }
}

/// The routing attributes of a service: everything but its upstreams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub matcher: Match,
    pub strategy: StrategyName,
    /// What the strategy is told for this route (see [`super::StrategySettings`]).
    pub strategy_settings: super::StrategySettings,
    /// How it is served over TLS, where a TLS listener is configured.
    pub tls: super::Tls,
    pub public: bool,
    pub options: super::RouteOptions,
}

impl Route {
    pub fn protocol(&self) -> Protocol {
        match self.matcher {
            Match::Http { .. } => Protocol::Http,
            Match::Tcp {
                passthrough: false, ..
            } => Protocol::Tcp,
            Match::Tcp {
                passthrough: true, ..
            } => Protocol::TlsPassthrough,
        }
    }

    pub fn claims(&self) -> Vec<Claim> {
        match &self.matcher {
            Match::Http { hosts, path } => hosts
                .iter()
                .map(|h| Claim::HostPath(h.clone(), path.clone()))
                .collect(),
            Match::Tcp {
                listen,
                hosts,
                passthrough: true,
            } => hosts
                .iter()
                .map(|h| Claim::Sni(*listen, h.clone()))
                .collect(),
            Match::Tcp { listen, .. } => vec![Claim::Listen(*listen)],
        }
    }

    /// Whether Harbor's proxy terminates TLS for it: an HTTP service on the TLS listener unless
    /// it turned TLS off, a tcp service only when its `tls` says how.
    pub fn terminates_tls(&self) -> bool {
        terminates_tls(self.protocol(), &self.tls)
    }

    /// Checks that its `tls` setting fits its protocol.
    pub fn check_tls(&self) -> Result<(), FieldError> {
        let Match::Tcp {
            hosts, passthrough, ..
        } = &self.matcher
        else {
            return Ok(());
        };
        if self.tls.is_default() {
            return Ok(());
        }
        if *passthrough {
            return Err(FieldError::new(
                "tls",
                "a tls-passthrough service hands TLS to its upstreams untouched: it takes no tls setting",
            ));
        }
        if self.tls.redirect_http.is_some() || self.tls.hsts.is_some() {
            return Err(FieldError::new(
                "tls",
                "redirect_http and hsts are for HTTP services",
            ));
        }
        if self.terminates_tls() && hosts.is_empty() {
            return Err(FieldError::new(
                "tls",
                "a tcp service with tls needs host or hosts: the names its certificate is for",
            ));
        }
        Ok(())
    }
}

/// See [`Route::terminates_tls`].
pub fn terminates_tls(protocol: Protocol, tls: &super::Tls) -> bool {
    match protocol {
        Protocol::Http => tls.serves(),
        Protocol::Tcp => tls.mode.as_ref().is_some_and(|m| *m != super::TlsMode::Off),
        Protocol::TlsPassthrough => false,
    }
}

/// The unvalidated routing fields as a route file or a registration spells them.
#[derive(Debug, Clone, Copy)]
pub struct RouteInput<'a> {
    pub name: &'a ServiceName,
    pub host: Option<&'a str>,
    pub hosts: Option<&'a [String]>,
    pub path: Option<&'a str>,
    pub protocol: Option<Protocol>,
    pub listen: Option<&'a str>,
    pub strategy: Option<&'a str>,
    pub public: Option<bool>,
}

impl<'a> RouteInput<'a> {
    /// Every field unset: the defaults of an HTTP route named `name`.
    pub fn new(name: &'a ServiceName) -> Self {
        Self {
            name,
            host: None,
            hosts: None,
            path: None,
            protocol: None,
            listen: None,
            strategy: None,
            public: None,
        }
    }

    /// Validates the fields into a [`Route`]. An HTTP service with no host gets
    /// `<name>.localhost`, which browsers and curl resolve to loopback.
    pub fn validate(&self) -> Result<Route, FieldError> {
        let strategy = match self.strategy {
            Some(s) => StrategyName::parse(s)?,
            None => StrategyName::default(),
        };
        let matcher = match self.protocol.unwrap_or_default() {
            protocol @ (Protocol::Tcp | Protocol::TlsPassthrough) => {
                if self.path.is_some() {
                    return Err(FieldError::new(
                        "path",
                        "a tcp service has no path; it is matched by its listen address",
                    ));
                }
                let raw = self.listen.ok_or_else(|| {
                    FieldError::new(
                        "listen",
                        "a tcp service needs a listen address, e.g. 127.0.0.1:15432",
                    )
                })?;
                let passthrough = protocol == Protocol::TlsPassthrough;
                let hosts = self.hosts()?;
                if passthrough && hosts.is_empty() {
                    return Err(FieldError::new(
                        "hosts",
                        "a tls-passthrough service needs host or hosts: the SNI names its connections are routed by",
                    ));
                }
                Match::Tcp {
                    listen: parse_listen(raw)?,
                    hosts,
                    passthrough,
                }
            }
            Protocol::Http => {
                if self.listen.is_some() {
                    return Err(FieldError::new(
                        "listen",
                        "listen is for tcp services; set protocol = \"tcp\" or remove it",
                    ));
                }
                let hosts = match self.hosts()? {
                    hosts if hosts.is_empty() => {
                        vec![HostName::parse(&format!("{}.localhost", self.name))?]
                    }
                    hosts => hosts,
                };
                let path = match self.path {
                    Some(p) => PathPrefix::parse(p)?,
                    None => PathPrefix::default(),
                };
                Match::Http { hosts, path }
            }
        };
        Ok(Route {
            matcher,
            strategy,
            strategy_settings: super::StrategySettings::default(),
            tls: super::Tls::default(),
            public: self.public.unwrap_or(false),
            options: super::RouteOptions::default(),
        })
    }
}

impl RouteInput<'_> {
    /// The hosts given, by `host` or `hosts`; none when neither is.
    fn hosts(&self) -> Result<Vec<HostName>, FieldError> {
        match (self.host, self.hosts) {
            (Some(_), Some(_)) => Err(FieldError::new(
                "hosts",
                "give either host or hosts, not both",
            )),
            (Some(h), None) => Ok(vec![HostName::parse(h)?]),
            (None, Some([])) => Err(FieldError::new(
                "hosts",
                "hosts must name at least one host",
            )),
            (None, Some(list)) => list
                .iter()
                .map(|h| HostName::parse(h).map_err(|e| FieldError::new("hosts", e.reason)))
                .collect(),
            (None, None) => Ok(Vec::new()),
        }
    }
}

fn parse_listen(raw: &str) -> Result<SocketAddr, FieldError> {
    let addr: SocketAddr = raw.parse().map_err(|_| {
        FieldError::new(
            "listen",
            format!("listen {raw:?} must be ip:port, e.g. 127.0.0.1:15432"),
        )
    })?;
    if addr.port() == 0 {
        return Err(FieldError::new(
            "listen",
            format!("listen {raw:?} needs a fixed port"),
        ));
    }
    Ok(addr)
}

/// One upstream of a service, with its weight for weighted strategies and, for a route file's
/// upstreams, the labels strategies see (an instance's labels are its `meta`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub addr: UpstreamAddr,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub labels: Meta,
}

pub const MAX_WEIGHT: u32 = 10_000;

pub fn check_weight(weight: u32) -> Result<u32, FieldError> {
    if (1..=MAX_WEIGHT).contains(&weight) {
        Ok(weight)
    } else {
        Err(FieldError::new(
            "weight",
            format!("weight must be from 1 to {MAX_WEIGHT}, got {weight}"),
        ))
    }
}

pub type Meta = BTreeMap<String, String>;

pub fn check_meta(meta: &Meta) -> Result<(), FieldError> {
    if meta.len() > 64 {
        return Err(FieldError::new("meta", "meta may hold at most 64 entries"));
    }
    for (k, v) in meta {
        if k.is_empty() || k.len() > 128 || v.len() > 4096 {
            return Err(FieldError::new(
                "meta",
                format!("meta key {k:?}: keys are 1 to 128 characters, values at most 4096"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_defaults_and_conflicts() {
        let name = ServiceName::parse("web").unwrap();
        let route = RouteInput::new(&name).validate().unwrap();
        assert_eq!(
            route.matcher,
            Match::Http {
                hosts: vec![HostName::parse("web.localhost").unwrap()],
                path: PathPrefix::default()
            }
        );
        assert_eq!(route.strategy.as_str(), "round-robin");
        assert!(!route.public);

        let tcp_with_path = RouteInput {
            protocol: Some(Protocol::Tcp),
            path: Some("/a"),
            listen: Some("127.0.0.1:9000"),
            ..RouteInput::new(&name)
        };
        assert_eq!(tcp_with_path.validate().unwrap_err().field, "path");

        // Passthrough needs the SNI names it is routed by, and claims each on its address.
        let passthrough = |host: Option<&'static str>| RouteInput {
            protocol: Some(Protocol::TlsPassthrough),
            host,
            listen: Some("127.0.0.1:9443"),
            ..RouteInput::new(&name)
        };
        assert_eq!(passthrough(None).validate().unwrap_err().field, "hosts");
        let sni = passthrough(Some("a.example.com")).validate().unwrap();
        let addr: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        assert_eq!(
            sni.claims(),
            [Claim::Sni(addr, HostName::parse("a.example.com").unwrap())]
        );
        // A plain listener on the same address rivals it; another SNI name does not.
        let other = ServiceName::parse("other").unwrap();
        let taken = std::collections::HashMap::from([(sni.claims()[0].clone(), other.clone())]);
        let (held, owner) = conflict(&taken, &name, &Claim::Listen(addr)).expect("rivals");
        assert_eq!((held, owner), (sni.claims()[0].clone(), &other));
        let b = Claim::Sni(addr, HostName::parse("b.example.com").unwrap());
        assert!(conflict(&taken, &name, &b).is_none());

        let tcp_without_listen = RouteInput {
            protocol: Some(Protocol::Tcp),
            ..RouteInput::new(&name)
        };
        assert_eq!(tcp_without_listen.validate().unwrap_err().field, "listen");

        let both = RouteInput {
            host: Some("a.com"),
            hosts: Some(&["b.com".to_owned()]),
            ..RouteInput::new(&name)
        };
        assert_eq!(both.validate().unwrap_err().field, "hosts");
    }
}
