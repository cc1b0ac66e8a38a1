//! HTTPS for what Harbor routes: the certificate each host is served with, chosen by the
//! ClientHello's SNI (an exact name first, then a `*.` wildcard covering one label).
//!
//! - [`files`]: certificates read from files, checked, and read again when they change;
//! - [`local_ca`]: Harbor's own CA, for `tls = "internal"`;
//! - the store here, [`Certificates`], which follows the routing table: every HTTP service whose
//!   TLS mode is not `off` has a certificate for each of its hosts, or a problem saying why not.
//!   A service without a certificate keeps serving over plain HTTP (and is not redirected).

pub mod acme;
pub mod files;
pub mod local_ca;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::events::lock;
use crate::model::TlsMode;
use crate::routing::Snapshot;

use self::files::{Pair, Pem};
use self::local_ca::{Issued, LocalCa};

/// The one crypto provider: ring, as built.
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A certificate as served, and as text for a proxy that is handed it.
pub type Served = (Arc<CertifiedKey>, Arc<Pem>);

/// Certificates by host, as served.
#[derive(Default)]
struct Table {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Every host's certificate as text, by the host as routes name it.
    pem: BTreeMap<String, Arc<Pem>>,
}

impl Table {
    fn find(&self, host: &str) -> Option<&Arc<CertifiedKey>> {
        let host = crate::routing::normalized(host);
        let host = host.as_ref();
        if let Some(key) = self.exact.get(host) {
            return Some(key);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent)
    }

    fn insert(&mut self, host: &str, (key, pem): Served) {
        self.pem.insert(host.to_owned(), pem);
        match host.strip_prefix("*.") {
            Some(parent) => self.wildcard.insert(parent.to_owned(), key),
            None => self.exact.insert(host.to_owned(), key),
        };
    }
}

/// Why a service is not served over HTTPS, or not with a fresh certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub service: String,
    pub reason: String,
}

pub struct Certificates {
    table: ArcSwap<Table>,
    ca: Result<LocalCa, String>,
    /// The last good certificate of each file pair, kept while a replacement fails its check.
    files: Mutex<HashMap<files::Files, Pair>>,
    /// Local CA certificates by host, issued again as they near their end.
    internal: Mutex<HashMap<String, Issued>>,
    problems: Mutex<BTreeMap<String, String>>,
    /// Where `auto` certificates come from.
    acme: Option<Arc<acme::Acme>>,
    /// Moves on whenever a certificate served changes, for a proxy that is handed them.
    changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").finish_non_exhaustive()
    }
}

impl Certificates {
    /// A store whose local CA is kept in `ca_dir` (made there on first use), and whose `auto`
    /// certificates come from `acme`.
    pub fn new(ca_dir: Option<&Path>, acme: Option<Arc<acme::Acme>>) -> Self {
        let ca = LocalCa::open(ca_dir);
        if let Err(e) = &ca {
            tracing::error!(error = %e, "no local CA: services with tls = \"internal\" are served over plain HTTP");
        }
        Self {
            table: ArcSwap::default(),
            ca,
            files: Mutex::default(),
            internal: Mutex::default(),
            problems: Mutex::default(),
            acme,
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Told whenever a certificate served changes (issued, renewed, files replaced, dropped).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The certificates of `hosts` as text, for those that have one, in the order asked.
    pub fn pems<'a>(&self, hosts: impl IntoIterator<Item = &'a str>) -> Vec<(String, Arc<Pem>)> {
        let table = self.table.load();
        hosts
            .into_iter()
            .filter_map(|host| Some((host.to_owned(), table.pem.get(host)?.clone())))
            .collect()
    }

    /// The local CA's root certificate file and its key's, for a proxy that issues from it.
    pub fn ca_files(&self) -> Option<(PathBuf, PathBuf)> {
        self.ca.as_ref().ok()?.files().cloned()
    }

    /// The key authorization of an open ACME challenge, for the plain listener to answer.
    pub fn acme_challenge(&self, token: &str) -> Option<String> {
        self.acme.as_ref()?.challenge(token)
    }

    pub fn acme(&self) -> Option<&Arc<acme::Acme>> {
        self.acme.as_ref()
    }

    /// The local CA's root, PEM.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_ref().ok().map(LocalCa::root_pem)
    }

    /// Whether `host` has a certificate to be served with.
    pub fn covers(&self, host: &str) -> bool {
        self.table.load().find(host).is_some()
    }

    /// What keeps services from HTTPS now, by service.
    pub fn problems(&self) -> Vec<Problem> {
        lock(&self.problems)
            .iter()
            .map(|(service, reason)| Problem {
                service: service.clone(),
                reason: reason.clone(),
            })
            .collect()
    }

    /// Brings the certificates to the routes of `snapshot`: files read again where they
    /// changed, local certificates issued where missing or near their end. Reads files and
    /// makes keys: call it off the async runtime. Returns the problems that are new.
    pub fn sync(&self, snapshot: &Snapshot) -> Vec<Problem> {
        let mut table = Table::default();
        let mut problems = BTreeMap::new();
        let mut used_files = Vec::new();
        let mut used_hosts = Vec::new();
        let mut services: Vec<_> = snapshot.services.values().collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        for route in services {
            for host in route.certified_hosts() {
                let (key, problem) = match route.tls.mode_for(host) {
                    TlsMode::Off => continue,
                    TlsMode::Files { cert, key } => {
                        used_files.push((cert.clone(), key.clone()));
                        self.file_pair(&cert, &key)
                    }
                    TlsMode::Internal => {
                        used_hosts.push(host.to_string());
                        split(self.internal(host.as_str()))
                    }
                    TlsMode::Auto => match &self.acme {
                        Some(acme) if acme.is_active() => acme::served(acme, host.as_str()),
                        // The driven proxy orders it (Caddy): nothing to serve, nothing wrong.
                        Some(_) => continue,
                        None => (None, Some(format!("no ACME client for {host}"))),
                    },
                };
                if let Some(key) = key {
                    table.insert(host.as_str(), key);
                }
                if let Some(problem) = problem {
                    problems.insert(route.name.to_string(), problem);
                }
            }
        }
        lock(&self.files).retain(|pair, _| used_files.contains(pair));
        lock(&self.internal).retain(|host, _| used_hosts.contains(host));
        let moved = self.table.load().pem != table.pem;
        self.table.store(Arc::new(table));
        if moved {
            self.changed.send_modify(|n| *n += 1);
        }
        let mut known = lock(&self.problems);
        let new = problems
            .iter()
            .filter(|(service, reason)| known.get(*service) != Some(reason))
            .map(|(service, reason)| Problem {
                service: service.clone(),
                reason: reason.clone(),
            })
            .collect();
        *known = problems;
        new
    }

    /// The certificate of a file pair, and what is wrong with the files if anything: as last
    /// read if they are unchanged, read again if they changed. A pair that fails its check
    /// keeps serving its last good certificate while that is valid.
    fn file_pair(&self, cert: &Path, key: &Path) -> (Option<Served>, Option<String>) {
        let pair = (cert.to_owned(), key.to_owned());
        let mut known = lock(&self.files);
        if let Some(good) = known.get(&pair)
            && good.current(cert, key)
        {
            return (Some(good.served()), None);
        }
        match files::load(cert, key) {
            Ok(fresh) => {
                let served = fresh.served();
                known.insert(pair, fresh);
                (Some(served), None)
            }
            Err(reason) => match known.get(&pair) {
                Some(good) if good.not_after > SystemTime::now() => (
                    Some(good.served()),
                    Some(format!("{reason}; the last good certificate keeps serving")),
                ),
                _ => (None, Some(reason)),
            },
        }
    }

    /// A local CA certificate for `host`, issued if there is none or it is a third from its end.
    fn internal(&self, host: &str) -> Result<Served, String> {
        let ca = self.ca.as_ref().map_err(Clone::clone)?;
        let mut known = lock(&self.internal);
        let renew_after = SystemTime::now() + local_ca::LEAF_LIFETIME / 3;
        if let Some(issued) = known.get(host)
            && issued.not_after > renew_after
        {
            return Ok((issued.key.clone(), issued.pem.clone()));
        }
        let issued = ca.issue(host)?;
        let served = (issued.key.clone(), issued.pem.clone());
        known.insert(host.to_owned(), issued);
        Ok(served)
    }
}

/// A certificate or why there is none.
fn split(got: Result<Served, String>) -> (Option<Served>, Option<String>) {
    match got {
        Ok(key) => (Some(key), None),
        Err(reason) => (None, Some(reason)),
    }
}

/// The certificate of one tcp service that terminates TLS: the one for the name the client
/// asks for, when the service has that name, else the one for its first name (clients of
/// tcp services often connect by address and ask for none).
#[derive(Debug)]
pub struct ServiceCertificate {
    pub certificates: Arc<Certificates>,
    pub hosts: Vec<crate::model::HostName>,
}

impl ResolvesServerCert for ServiceCertificate {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.certificates.table.load();
        let asked = hello.server_name().filter(|name| {
            self.hosts
                .iter()
                .any(|h| crate::routing::host_covers(h.as_str(), name))
        });
        match asked {
            Some(name) => table.find(name).cloned(),
            None => table.find(self.hosts.first()?.as_str()).cloned(),
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        // An ACME CA validating a TLS-ALPN-01 challenge offers only its own protocol.
        let validation = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == acme::ACME_TLS_ALPN));
        if validation {
            return self.acme.as_ref()?.alpn_challenge(name);
        }
        self.table.load().find(name).cloned()
    }
}

/// Keeps the certificates in step with the routing table until `cancel`: at every change, and
/// every `every` besides (files replaced, local certificates near their end). New problems are
/// logged and published.
pub async fn follow(
    certificates: Arc<Certificates>,
    routing: Arc<crate::routing::RoutingTable>,
    bus: Arc<crate::events::EventBus>,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut changes = routing.subscribe();
    let mut count = certificates.problems().len();
    loop {
        let snapshot = routing.snapshot();
        let store = certificates.clone();
        match tokio::task::spawn_blocking(move || store.sync(&snapshot)).await {
            Ok(problems) => {
                let now = certificates.problems().len();
                if now != count {
                    count = now;
                    bus.publish(crate::events::Event::TlsStatus { problems: now });
                }
                for problem in problems {
                    tracing::warn!(service = %problem.service, reason = %problem.reason, "TLS problem");
                    bus.publish(crate::events::Event::TlsProblem {
                        service: problem.service,
                        reason: problem.reason,
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "the certificate sync stopped"),
        }
        let issued = async {
            match certificates.acme() {
                Some(acme) => acme.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = issued => {}
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(host: &str) -> Served {
        let ca = LocalCa::open(None).expect("a CA");
        let issued = ca.issue(host).expect("a certificate");
        (issued.key, issued.pem)
    }

    #[test]
    fn an_exact_name_wins_over_a_wildcard_which_covers_one_label() {
        let mut table = Table::default();
        let (exact, wild) = (key("a.example.com"), key("*.example.com"));
        let exact_key = exact.0.clone();
        table.insert("a.example.com", exact.clone());
        table.insert("*.example.com", wild.clone());
        let found = |host: &str| table.find(host).map(|k| Arc::ptr_eq(k, &exact_key));
        assert_eq!(found("a.example.com"), Some(true));
        assert_eq!(
            found("A.Example.COM."),
            Some(true),
            "any case, a trailing dot"
        );
        assert_eq!(found("b.example.com"), Some(false), "the wildcard");
        assert_eq!(found("x.b.example.com"), None, "one label only");
        assert_eq!(found("example.com"), None);
    }
}
