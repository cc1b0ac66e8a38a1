//! One ephemeral instance as the state files keep it: plain fields, deadlines as wall-clock
//! times (so a restart neither extends nor shortens a lease), and read back as strictly as an
//! API registration, since a file may have been edited.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::model::{
    HostName, HstsInput, InstanceId, Meta, Protocol, RouteInput, RouteView, ServiceName,
    StrategySettings, Tls, TlsInput, Upstream, UpstreamAddr, check_weight,
};
use crate::registry::{Registration, RestoredInstance};

#[derive(Serialize, Deserialize)]
pub struct StoredInstance {
    pub id: InstanceId,
    name: String,
    upstream: String,
    weight: u32,
    protocol: Protocol,
    #[serde(default)]
    hosts: Vec<String>,
    path: Option<String>,
    listen: Option<String>,
    strategy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    strategy_settings: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Option<TlsInput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    redirect_http: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hsts: Option<HstsInput>,
    public: bool,
    #[serde(default)]
    meta: Meta,
    ttl_ms: u64,
    registered_at_ms: u64,
    expires_at_ms: u64,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl StoredInstance {
    pub fn from_restored(inst: &RestoredInstance) -> Self {
        let reg = &inst.registration;
        let route = RouteView::from(&reg.route);
        let (tls, redirect_http, hsts) = reg.route.tls.written();
        Self {
            id: inst.id,
            name: reg.name.to_string(),
            upstream: reg.upstream.addr.to_string(),
            weight: reg.upstream.weight,
            protocol: route.protocol,
            hosts: route.hosts.iter().map(HostName::to_string).collect(),
            path: route.path.map(|p| p.to_string()),
            listen: route.listen.map(|l| l.to_string()),
            strategy: route.strategy.to_string(),
            strategy_settings: (!route.strategy_settings.is_empty())
                .then(|| serde_json::to_value(&route.strategy_settings).ok())
                .flatten(),
            tls,
            redirect_http,
            hsts,
            public: reg.route.public,
            meta: reg.meta.clone(),
            ttl_ms: reg.ttl.map_or(0, |t| t.as_millis() as u64),
            registered_at_ms: unix_ms(inst.registered_at),
            expires_at_ms: unix_ms(inst.expires_at),
        }
    }

    /// Validates a record as strictly as an API registration: the file may have been edited.
    pub fn into_restored(self) -> anyhow::Result<RestoredInstance> {
        let name = ServiceName::parse(&self.name)?;
        let mut route = RouteInput {
            // An HTTP service without hosts of its own was given its default one.
            hosts: (!self.hosts.is_empty()).then_some(self.hosts.as_slice()),
            path: self.path.as_deref(),
            protocol: Some(self.protocol),
            listen: self.listen.as_deref(),
            strategy: Some(&self.strategy),
            public: Some(self.public),
            ..RouteInput::new(&name)
        }
        .validate()?;
        if let Some(settings) = &self.strategy_settings {
            route.strategy_settings = StrategySettings::from_json(settings)?;
        }
        route.tls = Tls::parse(self.tls.as_ref(), self.redirect_http, self.hsts.as_ref())?;
        Ok(RestoredInstance {
            id: self.id,
            registration: Registration {
                upstream: Upstream {
                    addr: UpstreamAddr::parse(&self.upstream)?,
                    weight: check_weight(self.weight)?,
                    // An instance's labels are its meta.
                    labels: Default::default(),
                },
                route,
                ttl: (self.ttl_ms > 0).then(|| Duration::from_millis(self.ttl_ms)),
                meta: self.meta,
                name,
            },
            registered_at: from_unix_ms(self.registered_at_ms),
            expires_at: from_unix_ms(self.expires_at_ms),
        })
    }
}
