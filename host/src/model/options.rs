//! How the embedded proxy treats a route beyond matching and balancing: active health checks,
//! the `Host` sent upstream, a cap on TCP connections, and what a request's hash key is made
//! of. Only route files set these; an ephemeral instance's lease already says whether it is
//! alive.

use std::time::Duration;

use serde::Serialize;

use super::names::{FieldError, HostName};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteOptions {
    /// The `Host` header sent upstream instead of the one the client sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_host: Option<HostName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Connections in flight at most, for a TCP route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// What the strategy is given as a request's hash key.
    #[serde(skip_serializing_if = "HashKey::is_client_ip")]
    pub hash_key: HashKey,
}

/// What a request's hash key is made of: the client's address, or a header's or cookie's
/// value (so that consistent hashing keeps a session on one upstream). A request without the
/// header or cookie is keyed by its client's address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum HashKey {
    #[default]
    ClientIp,
    /// A header, by its lower-cased name.
    Header(String),
    Cookie(String),
}

impl HashKey {
    /// `client_ip`, `header:NAME` or `cookie:NAME`.
    pub fn parse(text: &str) -> Result<Self, FieldError> {
        let bad = |why: &str| {
            FieldError::new(
                "hash_key",
                format!("{text:?} {why}; use \"client_ip\", \"header:NAME\" or \"cookie:NAME\""),
            )
        };
        let token = |name: &str| {
            !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        match text.split_once(':') {
            None if text == "client_ip" => Ok(Self::ClientIp),
            Some(("header", name)) if token(name) => Ok(Self::Header(name.to_ascii_lowercase())),
            Some(("cookie", name)) if token(name) => Ok(Self::Cookie(name.to_owned())),
            Some(("header" | "cookie", _)) => Err(bad("names no valid header or cookie")),
            _ => Err(bad("is not a hash key")),
        }
    }

    pub fn is_client_ip(&self) -> bool {
        *self == Self::ClientIp
    }
}

impl From<HashKey> for String {
    fn from(key: HashKey) -> String {
        match key {
            HashKey::ClientIp => "client_ip".to_owned(),
            HashKey::Header(name) => format!("header:{name}"),
            HashKey::Cookie(name) => format!("cookie:{name}"),
        }
    }
}

impl RouteOptions {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// An active health check, run against every upstream of the route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    /// `GET` this path and expect `status`; without a path the check is a TCP connect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The expected status; without one any 2xx or 3xx passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(with = "humantime_serde_secs")]
    pub interval: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub timeout: Duration,
    /// Consecutive passes that bring a down upstream back.
    pub rise: u32,
    /// Consecutive failures that take an upstream out.
    pub fall: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        // HAProxy's defaults: a check every 2 s, out after 3 failures, back after 2 passes.
        Self {
            path: None,
            status: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        }
    }
}

/// The unvalidated `[health]` table of a route file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthInput {
    pub path: Option<String>,
    pub status: Option<u16>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

impl HealthInput {
    pub fn validate(&self) -> Result<HealthCheck, FieldError> {
        let defaults = HealthCheck::default();
        let duration = |raw: &Option<String>, default: Duration, what: &str| match raw {
            None => Ok(default),
            Some(text) => match humantime::parse_duration(text) {
                Ok(d) if d >= Duration::from_millis(10) && d <= Duration::from_secs(3600) => Ok(d),
                Ok(_) => Err(FieldError::new(
                    "health",
                    format!("health.{what} must be from 10ms to 1h, got {text:?}"),
                )),
                Err(e) => Err(FieldError::new(
                    "health",
                    format!("health.{what} {text:?} is not a duration such as \"2s\": {e}"),
                )),
            },
        };
        let count = |raw: Option<u32>, default: u32, what: &str| match raw.unwrap_or(default) {
            n @ 1..=100 => Ok(n),
            n => Err(FieldError::new(
                "health",
                format!("health.{what} must be from 1 to 100, got {n}"),
            )),
        };
        if let Some(path) = &self.path
            && (!path.starts_with('/') || path.chars().any(|c| !c.is_ascii_graphic()))
        {
            return Err(FieldError::new(
                "health",
                format!("health.path {path:?} must start with '/' and contain no spaces"),
            ));
        }
        if let Some(status) = self.status {
            if !(100..=599).contains(&status) {
                return Err(FieldError::new(
                    "health",
                    format!("health.status must be an HTTP status from 100 to 599, got {status}"),
                ));
            }
            if self.path.is_none() {
                return Err(FieldError::new(
                    "health",
                    "health.status needs health.path: a check without a path is a TCP connect",
                ));
            }
        }
        let check = HealthCheck {
            path: self.path.clone(),
            status: self.status,
            interval: duration(&self.interval, defaults.interval, "interval")?,
            timeout: duration(&self.timeout, defaults.timeout, "timeout")?,
            rise: count(self.rise, defaults.rise, "rise")?,
            fall: count(self.fall, defaults.fall, "fall")?,
        };
        if check.timeout > check.interval {
            return Err(FieldError::new(
                "health",
                "health.timeout must not be longer than health.interval",
            ));
        }
        Ok(check)
    }
}

/// Durations shown as humantime text (`"2s"`), as route files spell them.
mod humantime_serde_secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_keys_are_a_client_a_header_or_a_cookie() {
        assert_eq!(HashKey::parse("client_ip").unwrap(), HashKey::ClientIp);
        assert_eq!(
            HashKey::parse("header:X-User").unwrap(),
            HashKey::Header("x-user".into())
        );
        assert_eq!(
            HashKey::parse("cookie:sid").unwrap(),
            HashKey::Cookie("sid".into())
        );
        for bad in ["ip", "header:", "cookie:a b", "header:x;y", "query:x"] {
            let err = HashKey::parse(bad).unwrap_err();
            assert_eq!(err.field, "hash_key");
            assert!(err.reason.contains("header:NAME"), "{bad}: {}", err.reason);
        }
        assert_eq!(String::from(HashKey::Cookie("sid".into())), "cookie:sid");
    }

    #[test]
    fn health_defaults_and_limits() {
        let check = HealthInput::default().validate().unwrap();
        assert_eq!(check, HealthCheck::default());
        let check = HealthInput {
            path: Some("/healthz".into()),
            status: Some(204),
            interval: Some("500ms".into()),
            timeout: Some("200ms".into()),
            rise: Some(1),
            fall: Some(2),
        }
        .validate()
        .unwrap();
        assert_eq!(check.interval, Duration::from_millis(500));
        for bad in [
            HealthInput {
                status: Some(200),
                ..Default::default()
            },
            HealthInput {
                path: Some("healthz".into()),
                ..Default::default()
            },
            HealthInput {
                interval: Some("soon".into()),
                ..Default::default()
            },
            HealthInput {
                fall: Some(0),
                ..Default::default()
            },
            HealthInput {
                interval: Some("1s".into()),
                timeout: Some("2s".into()),
                ..Default::default()
            },
        ] {
            let err = bad.validate().unwrap_err();
            assert_eq!(err.field, "health");
            assert!(err.reason.contains("health."), "{}", err.reason);
        }
    }
}
