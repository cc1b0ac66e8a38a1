//! Persistence of ephemeral registrations across restarts: one JSON file in the state directory,
//! replaced atomically (temp file, fsync, rename, fsync of the directory), written by one task that
//! coalesces bursts of changes. Deadlines are stored as wall-clock times, never as durations.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::events::Event;
use crate::model::{
    HostName, InstanceId, Meta, Protocol, RouteInput, RouteView, ServiceName, Upstream,
    UpstreamAddr, check_weight,
};
use crate::registry::{Registration, Registry, RestoredInstance};

const FILE_NAME: &str = "ephemeral.json";
const FORMAT_VERSION: u32 = 1;

pub struct Store {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    instances: Vec<StoredInstance>,
}

#[derive(Serialize, Deserialize)]
struct StoredInstance {
    id: InstanceId,
    name: String,
    upstream: String,
    weight: u32,
    protocol: Protocol,
    #[serde(default)]
    hosts: Vec<String>,
    path: Option<String>,
    listen: Option<String>,
    strategy: String,
    public: bool,
    #[serde(default)]
    meta: Meta,
    ttl_ms: u64,
    registered_at_ms: u64,
    expires_at_ms: u64,
}

/// The state file could not be used; it has been moved aside so the next start is clean.
#[derive(Debug)]
pub struct Corrupt {
    pub file: String,
    pub moved_to: Option<String>,
    pub reason: String,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

impl StoredInstance {
    fn from_restored(inst: &RestoredInstance) -> Self {
        let reg = &inst.registration;
        let route = RouteView::from(&reg.route);
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
            public: reg.route.public,
            meta: reg.meta.clone(),
            ttl_ms: reg.ttl.map_or(0, |t| t.as_millis() as u64),
            registered_at_ms: unix_ms(inst.registered_at),
            expires_at_ms: unix_ms(inst.expires_at),
        }
    }

    /// Validates a record as strictly as an API registration: the file may have been edited.
    fn into_restored(self) -> anyhow::Result<RestoredInstance> {
        let name = ServiceName::parse(&self.name)?;
        let route = RouteInput {
            hosts: (self.protocol == Protocol::Http).then_some(self.hosts.as_slice()),
            path: self.path.as_deref(),
            protocol: Some(self.protocol),
            listen: self.listen.as_deref(),
            strategy: Some(&self.strategy),
            public: Some(self.public),
            ..RouteInput::new(&name)
        }
        .validate()?;
        Ok(RestoredInstance {
            id: self.id,
            registration: Registration {
                upstream: Upstream {
                    addr: UpstreamAddr::parse(&self.upstream)?,
                    weight: check_weight(self.weight)?,
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

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Reads the saved instances. A file that cannot be parsed is moved aside and reported.
    pub fn load(&self) -> Result<Vec<RestoredInstance>, Corrupt> {
        let path = self.path();
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.set_aside(format!("cannot read: {e}"))),
        };
        let file: StateFile = match serde_json::from_slice(&text) {
            Ok(file) => file,
            Err(e) => return Err(self.set_aside(format!("not a valid state file: {e}"))),
        };
        if file.version != FORMAT_VERSION {
            return Err(self.set_aside(format!(
                "state file version {} is not {FORMAT_VERSION}",
                file.version
            )));
        }
        let mut out = Vec::with_capacity(file.instances.len());
        for record in file.instances {
            let id = record.id;
            match record.into_restored() {
                Ok(inst) => out.push(inst),
                Err(e) => {
                    tracing::warn!(id = %id, error = %e, "skipping an invalid saved instance")
                }
            }
        }
        Ok(out)
    }

    fn set_aside(&self, reason: String) -> Corrupt {
        let path = self.path();
        let aside = self.dir.join(format!(
            "{FILE_NAME}.corrupt-{}",
            unix_ms(SystemTime::now())
        ));
        let moved_to = match fs::rename(&path, &aside) {
            Ok(()) => Some(aside.display().to_string()),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot move the bad state file aside");
                None
            }
        };
        Corrupt {
            file: path.display().to_string(),
            moved_to,
            reason,
        }
    }

    pub fn save(&self, instances: &[RestoredInstance]) -> anyhow::Result<()> {
        let file = StateFile {
            version: FORMAT_VERSION,
            instances: instances
                .iter()
                .map(StoredInstance::from_restored)
                .collect(),
        };
        let json = serde_json::to_vec(&file)?;
        let path = self.path();
        let tmp = self.dir.join(format!(".{FILE_NAME}.tmp"));
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&json)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

/// Loads saved instances into the registry, reporting a corrupt file as an event.
pub fn restore(store: &Store, registry: &Registry) -> usize {
    match store.load() {
        Ok(instances) => registry.restore(instances),
        Err(corrupt) => {
            tracing::error!(
                file = %corrupt.file,
                moved_to = corrupt.moved_to.as_deref().unwrap_or("-"),
                reason = %corrupt.reason,
                "state file set aside; starting without saved registrations"
            );
            registry.bus().publish(Event::StateFileError {
                file: corrupt.file,
                reason: corrupt.reason,
            });
            0
        }
    }
}

/// Writes the state file after changes, at most once per `every`, and once more when cancelled.
pub async fn persist(
    registry: Arc<Registry>,
    store: Arc<Store>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        let stop = tokio::select! {
            () = registry.ephemeral_changed() => {
                // Coalesce a burst of changes into one write.
                tokio::select! {
                    () = tokio::time::sleep(every) => false,
                    () = cancel.cancelled() => true,
                }
            }
            () = cancel.cancelled() => true,
        };
        let instances = registry.ephemeral_instances();
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.save(&instances)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "cannot save registrations"),
            Err(e) => tracing::error!(error = %e, "state save task failed"),
        }
        if stop {
            return;
        }
    }
}
