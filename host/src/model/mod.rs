//! The service model: validated names and addresses ([`names`]), routing attributes
//! ([`route`]), and the one set of serde views shared by the API, the event stream and Gangway.

mod names;
mod options;
mod route;
mod settings;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub use names::{
    FieldError, HostName, InstanceId, PathPrefix, ServiceName, StrategyName, UpstreamAddr,
};
pub use options::{HashKey, HealthCheck, HealthInput, RouteOptions};
pub use route::{
    Claim, Kind, MAX_WEIGHT, Match, Meta, Protocol, Route, RouteInput, Upstream, check_meta,
    check_weight, conflict, terminates_tls,
};
pub use settings::{FIELD as SETTINGS_FIELD, StrategySettings};
pub use tls::{HstsInput, Tls, TlsInput, TlsMode, is_public};

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A lease as views show it. The times are formatted when the view is serialized, not when it
/// is built: the routing table, the DNS zone and the proxy read views of every instance on
/// each change and never show them, and formatting two timestamps per instance showed in the
/// daemon's CPU under churn (see host/benches/README.md, Backends: registration to routable).
/// `remaining_ms` is therefore as of serialization.
#[derive(Debug, Clone)]
pub struct LeaseView {
    pub ttl: Duration,
    pub expires_at: SystemTime,
}

impl LeaseView {
    pub fn new(ttl: Duration, expires_at: SystemTime) -> Self {
        Self { ttl, expires_at }
    }
}

impl Serialize for LeaseView {
    fn serialize<S: serde::Serializer>(&self, to: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let remaining = self
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let mut lease = to.serialize_struct("LeaseView", 3)?;
        lease.serialize_field("ttl_secs", &self.ttl.as_secs())?;
        lease.serialize_field("expires_at", &timestamp(self.expires_at))?;
        lease.serialize_field("remaining_ms", &(remaining.as_millis() as u64))?;
        lease.end()
    }
}

/// Serializes a time as [`timestamp`] does.
fn rfc3339<S: serde::Serializer>(t: &SystemTime, to: S) -> Result<S::Ok, S::Error> {
    to.serialize_str(&timestamp(*t))
}

fn rfc3339_some<S: serde::Serializer>(t: &Option<SystemTime>, to: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, to),
        None => to.serialize_none(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceView {
    pub id: InstanceId,
    pub upstream: UpstreamAddr,
    pub weight: u32,
    #[serde(serialize_with = "rfc3339")]
    pub registered_at: SystemTime,
    pub lease: LeaseView,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: Meta,
}

/// How a service is matched and balanced, as every view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    pub protocol: Protocol,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathPrefix>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    pub strategy: StrategyName,
    #[serde(skip_serializing_if = "StrategySettings::is_empty")]
    pub strategy_settings: StrategySettings,
    #[serde(skip_serializing_if = "Tls::is_default")]
    pub tls: Tls,
}

impl RouteView {
    /// See [`Route::terminates_tls`].
    pub fn terminates_tls(&self) -> bool {
        terminates_tls(self.protocol, &self.tls)
    }
}

impl From<&Route> for RouteView {
    fn from(route: &Route) -> Self {
        let (hosts, path, listen) = match &route.matcher {
            Match::Http { hosts, path } => (hosts.clone(), Some(path.clone()), None),
            Match::Tcp { listen, hosts, .. } => (hosts.clone(), None, Some(*listen)),
        };
        Self {
            protocol: route.protocol(),
            hosts,
            path,
            listen,
            strategy: route.strategy.clone(),
            strategy_settings: route.strategy_settings.clone(),
            tls: route.tls.clone(),
        }
    }
}

/// A service as the operator API and the event stream show it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub name: ServiceName,
    pub kind: Kind,
    #[serde(flatten)]
    pub route: RouteView,
    pub public: bool,
    pub upstreams: Vec<Upstream>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstanceView>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub meta: Meta,
    /// The route file a static service comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "RouteOptions::is_default")]
    pub proxy: RouteOptions,
}

impl ServiceView {
    /// Where the service sends work, `(host:port, weight)`: its live instances (ephemeral) or
    /// its route file's upstreams (static).
    pub fn upstream_addresses(&self) -> Vec<(String, u32)> {
        match self.kind {
            Kind::Ephemeral => self
                .instances
                .iter()
                .map(|i| (i.upstream.to_string(), i.weight))
                .collect(),
            Kind::Static => self
                .upstreams
                .iter()
                .map(|u| (u.addr.to_string(), u.weight))
                .collect(),
        }
    }
}

/// A public service as anyone may see it: no instance ids (they are renewal capabilities), no
/// metadata, no file paths.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogEntry {
    pub name: ServiceName,
    pub kind: Kind,
    #[serde(flatten)]
    pub route: RouteView,
    pub upstreams: Vec<CatalogUpstream>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CatalogUpstream {
    pub addr: UpstreamAddr,
    pub weight: u32,
    #[serde(
        serialize_with = "rfc3339_some",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<SystemTime>,
}

impl From<&ServiceView> for CatalogEntry {
    fn from(s: &ServiceView) -> Self {
        let upstreams = if s.kind == Kind::Ephemeral {
            s.instances
                .iter()
                .map(|i| CatalogUpstream {
                    addr: i.upstream.clone(),
                    weight: i.weight,
                    expires_at: Some(i.lease.expires_at),
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
            route: s.route.clone(),
            upstreams,
        }
    }
}
