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
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
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
    Tcp {
        listen: SocketAddr,
    },
}

/// Something only one service may hold at a time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Claim {
    HostPath(HostName, PathPrefix),
    Listen(SocketAddr),
}

impl Claim {
    /// The request field a conflicting claim is reported against.
    pub fn field(&self) -> &'static str {
        match self {
            Claim::HostPath(..) => "host",
            Claim::Listen(_) => "listen",
        }
    }
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::HostPath(h, p) => write!(f, "host {h} with path {p}"),
            Claim::Listen(a) => write!(f, "listen address {a}"),
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
            Match::Tcp { .. } => Protocol::Tcp,
        }
    }

    pub fn claims(&self) -> Vec<Claim> {
        match &self.matcher {
            Match::Http { hosts, path } => hosts
                .iter()
                .map(|h| Claim::HostPath(h.clone(), path.clone()))
                .collect(),
            Match::Tcp { listen } => vec![Claim::Listen(*listen)],
        }
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
            Protocol::Tcp => {
                for (field, given) in [
                    ("host", self.host.is_some()),
                    ("hosts", self.hosts.is_some()),
                    ("path", self.path.is_some()),
                ] {
                    if given {
                        return Err(FieldError::new(
                            field,
                            "a tcp service has no host or path; it is matched by its listen address",
                        ));
                    }
                }
                let raw = self.listen.ok_or_else(|| {
                    FieldError::new(
                        "listen",
                        "a tcp service needs a listen address, e.g. 127.0.0.1:15432",
                    )
                })?;
                Match::Tcp {
                    listen: parse_listen(raw)?,
                }
            }
            Protocol::Http => {
                if self.listen.is_some() {
                    return Err(FieldError::new(
                        "listen",
                        "listen is for tcp services; set protocol = \"tcp\" or remove it",
                    ));
                }
                let hosts = match (self.host, self.hosts) {
                    (Some(_), Some(_)) => {
                        return Err(FieldError::new(
                            "hosts",
                            "give either host or hosts, not both",
                        ));
                    }
                    (Some(h), None) => vec![HostName::parse(h)?],
                    (None, Some([])) => {
                        return Err(FieldError::new(
                            "hosts",
                            "hosts must name at least one host",
                        ));
                    }
                    (None, Some(list)) => list
                        .iter()
                        .map(|h| HostName::parse(h).map_err(|e| FieldError::new("hosts", e.reason)))
                        .collect::<Result<_, _>>()?,
                    (None, None) => vec![HostName::parse(&format!("{}.localhost", self.name))?],
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

        let tcp_with_host = RouteInput {
            protocol: Some(Protocol::Tcp),
            host: Some("a.com"),
            listen: Some("127.0.0.1:9000"),
            ..RouteInput::new(&name)
        };
        assert_eq!(tcp_with_host.validate().unwrap_err().field, "host");

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
