//! Validated newtypes: service, host, path, upstream and strategy names, instance ids, and the
//! field errors their checks produce.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

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
        // Shown as the quoted text it is: messages say `"api"`, not `ServiceName("api")`.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
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
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
    // No top-level domain is all digits (RFC 3696): `999.1.1.1` is a bad address, not a name.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return Err("the last label is all digits: not a DNS name, and not a valid IP address");
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
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
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
}
