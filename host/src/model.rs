//! The service model: validated newtypes (names, hosts, paths, addresses), the routing attributes
//! a service is matched by, and the one set of serde views shared by the API, the event stream
//! and Gangway.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// A problem with one field of a route file or an API request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Implements `Display`, `AsRef<str>`, string serde and `parse` for a validated string newtype.
macro_rules! string_newtype {
    ($name:ident, $field:literal, $check:path) => {
        impl $name {
            pub fn parse(raw: &str) -> Result<Self, FieldError> {
                $check(raw)
                    .map(Self)
                    .map_err(|reason| FieldError::new($field, reason))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::parse(&raw).map_err(|e| serde::de::Error::custom(e.reason))
            }
        }
    };
}

/// A service name: 1–63 characters of `a-z 0-9 - _ .`, starting and ending with a letter or
/// digit, so that it is safe as a file name, a URL segment, a DNS label run and a metric label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName(String);
string_newtype!(ServiceName, "name", check_service_name);

fn check_service_name(raw: &str) -> Result<String, String> {
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if raw.is_empty() || raw.len() > 63 {
        return Err(format!(
            "service name must be 1 to 63 characters, got {}",
            raw.len()
        ));
    }
    if let Some(bad) = raw.chars().find(|&c| !valid_char(c)) {
        return Err(format!(
            "service name {raw:?} contains {bad:?}; use lowercase letters, digits, '-', '_' and '.'"
        ));
    }
    if !edge(raw.chars().next()) || !edge(raw.chars().last()) {
        return Err(format!(
            "service name {raw:?} must start and end with a letter or digit"
        ));
    }
    Ok(raw.to_owned())
}

/// A host name a request is matched on: a DNS name (lower-cased), a `*.`-prefixed wildcard, or an
/// IP address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostName(String);
string_newtype!(HostName, "host", check_host_name);

fn check_host_name(raw: &str) -> Result<String, String> {
    let host = raw.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host);
    }
    let dns = host.strip_prefix("*.").unwrap_or(&host);
    check_dns_name(dns).map_err(|why| format!("host {raw:?} is not a valid host name: {why}"))?;
    Ok(host)
}

fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1 to 63 characters");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("labels may contain only letters, digits, '-' and '_'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels may not start or end with '-'");
        }
    }
    Ok(())
}

/// A request path prefix: starts with `/`, printable ASCII, no query or fragment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathPrefix(String);
string_newtype!(PathPrefix, "path", check_path);

impl Default for PathPrefix {
    fn default() -> Self {
        Self("/".to_owned())
    }
}

fn check_path(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err(format!("path {raw:?} must start with '/'"));
    }
    if raw.len() > 1024 {
        return Err("path must be at most 1024 characters".to_owned());
    }
    if let Some(bad) = raw
        .chars()
        .find(|&c| !c.is_ascii_graphic() || c == '?' || c == '#')
    {
        return Err(format!(
            "path {raw:?} contains {bad:?}; a prefix has no spaces, query or fragment"
        ));
    }
    Ok(raw.to_owned())
}

/// An upstream address, `host:port`, where host is a DNS name, an IPv4 address or a bracketed
/// IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UpstreamAddr(String);
string_newtype!(UpstreamAddr, "upstream", check_upstream);

fn check_upstream(raw: &str) -> Result<String, String> {
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("upstream {raw:?} needs a port from 1 to 65535"));
        }
        return Ok(addr.to_string());
    }
    let bad = || format!("upstream {raw:?} must be host:port, e.g. 127.0.0.1:8080");
    let (host, port) = raw.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("upstream {raw:?} has an invalid port {port:?}")),
    }
    if host.contains(':') || host.starts_with('[') {
        return Err(bad());
    }
    check_dns_name(host).map_err(|why| format!("upstream {raw:?} has an invalid host: {why}"))?;
    Ok(format!("{}:{port}", host.to_ascii_lowercase()))
}

/// The name of a load-balancing strategy. Only its form is checked here; whether such a
/// strategy is loaded is the plugin runtime's business.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StrategyName(String);
string_newtype!(StrategyName, "strategy", check_strategy);

impl Default for StrategyName {
    fn default() -> Self {
        Self("round-robin".to_owned())
    }
}

fn check_strategy(raw: &str) -> Result<String, String> {
    let ok = !raw.is_empty()
        && raw.len() <= 64
        && raw
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "strategy {raw:?} must be 1 to 64 characters of lowercase letters, digits, '-' and '_'"
        ))
    }
}

/// The id of one ephemeral instance; also the capability to renew or deregister it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceId(uuid::Uuid);

impl InstanceId {
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for InstanceId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

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
    pub public: bool,
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
                    (None, None) => vec![HostName(format!("{}.localhost", self.name))],
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
            public: self.public.unwrap_or(false),
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

/// One upstream of a service, with its weight for weighted strategies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub addr: UpstreamAddr,
    pub weight: u32,
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

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseView {
    pub ttl_secs: u64,
    pub expires_at: String,
    pub remaining_ms: u64,
}

impl LeaseView {
    pub fn new(ttl: Duration, expires_at: SystemTime) -> Self {
        let remaining = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Self {
            ttl_secs: ttl.as_secs(),
            expires_at: timestamp(expires_at),
            remaining_ms: remaining.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub id: InstanceId,
    pub upstream: UpstreamAddr,
    pub weight: u32,
    pub registered_at: String,
    pub lease: LeaseView,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: Meta,
}

/// A service as the operator API and the event stream show it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub name: ServiceName,
    pub kind: Kind,
    pub protocol: Protocol,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathPrefix>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    pub strategy: StrategyName,
    pub public: bool,
    pub upstreams: Vec<Upstream>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceView>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: Meta,
    /// The route file a static service comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl ServiceView {
    pub fn route_fields(route: &Route) -> (Vec<HostName>, Option<PathPrefix>, Option<SocketAddr>) {
        match &route.matcher {
            Match::Http { hosts, path } => (hosts.clone(), Some(path.clone()), None),
            Match::Tcp { listen } => (Vec::new(), None, Some(*listen)),
        }
    }
}

/// A public service as anyone may see it: no instance ids (they are renewal capabilities), no
/// metadata, no file paths.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogEntry {
    pub name: ServiceName,
    pub kind: Kind,
    pub protocol: Protocol,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathPrefix>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    pub strategy: StrategyName,
    pub upstreams: Vec<CatalogUpstream>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CatalogUpstream {
    pub addr: UpstreamAddr,
    pub weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

impl From<&ServiceView> for CatalogEntry {
    fn from(s: &ServiceView) -> Self {
        let upstreams = if s.kind == Kind::Ephemeral {
            s.instances
                .iter()
                .map(|i| CatalogUpstream {
                    addr: i.upstream.clone(),
                    weight: i.weight,
                    expires_at: Some(i.lease.expires_at.clone()),
                })
                .collect()
        } else {
            s.upstreams
                .iter()
                .map(|u| CatalogUpstream {
                    addr: u.addr.clone(),
                    weight: u.weight,
                    expires_at: None,
                })
                .collect()
        };
        Self {
            name: s.name.clone(),
            kind: s.kind,
            protocol: s.protocol,
            hosts: s.hosts.clone(),
            path: s.path.clone(),
            listen: s.listen,
            strategy: s.strategy.clone(),
            upstreams,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for ok in ["a", "grafana", "api-v2", "my_svc.internal", "0db"] {
            assert!(ServiceName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Grafana",
            "a b",
            "a/b",
            "é",
            &"x".repeat(64),
        ] {
            let err = ServiceName::parse(bad).unwrap_err();
            assert_eq!(err.field, "name", "{bad}");
        }
    }

    #[test]
    fn hosts_are_normalised_and_checked() {
        assert_eq!(
            HostName::parse("Grafana.LOCALHOST.").unwrap().as_str(),
            "grafana.localhost"
        );
        assert_eq!(
            HostName::parse("*.example.com").unwrap().as_str(),
            "*.example.com"
        );
        assert_eq!(HostName::parse("::1").unwrap().as_str(), "::1");
        for bad in [
            "",
            "a..b",
            "-a.com",
            "a b.com",
            "*.",
            "a*.com",
            "http://a.com",
        ] {
            assert!(HostName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstreams() {
        assert_eq!(
            UpstreamAddr::parse("127.0.0.1:80").unwrap().as_str(),
            "127.0.0.1:80"
        );
        assert_eq!(
            UpstreamAddr::parse("[::1]:80").unwrap().as_str(),
            "[::1]:80"
        );
        assert_eq!(
            UpstreamAddr::parse("Db.Local:5432").unwrap().as_str(),
            "db.local:5432"
        );
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "host:99999",
            ":80",
            "::1:80",
            "a b:80",
            "h:x",
        ] {
            let err = UpstreamAddr::parse(bad).unwrap_err();
            assert_eq!(err.field, "upstream", "{bad}");
        }
    }

    #[test]
    fn paths() {
        assert!(PathPrefix::parse("/api/v1").is_ok());
        for bad in ["api", "/a b", "/a?b", "/a#b", ""] {
            assert!(PathPrefix::parse(bad).is_err(), "{bad}");
        }
    }

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
