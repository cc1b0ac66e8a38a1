//! Certificates from an ACME CA (Let's Encrypt by default) for `tls = "auto"`: an account and a
//! certificate per host, kept in the state directory (keys readable by Harbor alone), issued
//! through HTTP-01 answered on the plain HTTP listener, and renewed well ahead of expiry. A failed
//! order is retried with backoff; meanwhile the host keeps its previous certificate, or plain
//! HTTP if it never had one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::files::{self, Pair};
use super::local_ca::write_private;
use crate::backoff::Backoff;
use crate::events::lock;
use crate::model::TlsMode;
use crate::routing::RoutingTable;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// The longest wait between failed orders for a host.
const RETRY_AT_MOST: Duration = Duration::from_secs(24 * 3600);

/// Where ACME answers the challenge on the plain listener.
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub directory: String,
    pub email: Option<String>,
    /// A root to trust for the directory's own HTTPS (a private or test CA such as Pebble).
    pub ca_root: Option<PathBuf>,
    /// A certificate is renewed when it has less than this left.
    pub renew_before: Duration,
    /// The first wait after a failed order (doubling, up to a day).
    pub retry_after: Duration,
    /// How the CA is shown control of a name.
    pub challenge: Challenge,
}

/// The challenge an order answers.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
pub enum Challenge {
    /// A file on the plain HTTP listener (which the CA reaches on port 80).
    #[default]
    #[serde(rename = "http-01")]
    #[value(name = "http-01")]
    Http01,
    /// A certificate on the TLS listener (port 443), for hosts whose port 80 is closed.
    #[serde(rename = "tls-alpn-01")]
    #[value(name = "tls-alpn-01")]
    TlsAlpn01,
}

/// The ALPN protocol a TLS-ALPN-01 validation offers (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A host's failed orders: how many, the last reason, and when to try again.
struct Failure {
    count: u32,
    reason: String,
    retry_at: Instant,
}

pub struct Acme {
    settings: AcmeSettings,
    dir: PathBuf,
    /// Key authorizations by token, while their HTTP-01 challenges are open.
    challenges: Mutex<HashMap<String, String>>,
    /// Validation certificates by host, while their TLS-ALPN-01 challenges are open.
    alpn_challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// Certificates as read from the directory, by host.
    issued: Mutex<HashMap<String, Pair>>,
    failures: Mutex<HashMap<String, Failure>>,
    /// Told when a certificate was issued or an order failed.
    pub changed: Notify,
    /// Whether certificates are ordered at all: not while the driven proxy obtains its own
    /// (Caddy), which would make two clients order the same names.
    active: std::sync::atomic::AtomicBool,
}

impl Acme {
    pub fn new(settings: AcmeSettings, dir: PathBuf) -> Self {
        // Several rustls users share the process; ring is the one provider built.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            settings,
            dir,
            challenges: Mutex::default(),
            alpn_challenges: Mutex::default(),
            issued: Mutex::default(),
            failures: Mutex::default(),
            changed: Notify::new(),
            active: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Orders certificates, or stops ordering them (see [`Acme::active`]).
    pub fn set_active(&self, active: bool) {
        let was = self
            .active
            .swap(active, std::sync::atomic::Ordering::Relaxed);
        if was != active {
            // The store looks again: its `auto` hosts are Harbor's to serve, or no longer.
            self.changed.notify_waiters();
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key authorization for an open challenge's `token`.
    pub fn challenge(&self, token: &str) -> Option<String> {
        lock(&self.challenges).get(token).cloned()
    }

    /// The validation certificate of an open TLS-ALPN-01 challenge for `host`.
    pub fn alpn_challenge(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        lock(&self.alpn_challenges).get(host).cloned()
    }

    /// The host's certificate as issued, if it has one that is still valid.
    pub fn current(&self, host: &str) -> Option<Pair> {
        let (cert, key) = self.paths(host);
        let mut issued = lock(&self.issued);
        if let Some(pair) = issued.get(host)
            && pair.current(&cert, &key)
        {
            return Some(pair.clone());
        }
        let pair = files::load(&cert, &key).ok()?;
        issued.insert(host.to_owned(), pair.clone());
        Some(pair)
    }

    /// Why the host's last order failed, while it waits to try again.
    pub fn failure(&self, host: &str) -> Option<String> {
        lock(&self.failures).get(host).map(|f| f.reason.clone())
    }

    fn paths(&self, host: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{host}.pem")),
            self.dir.join(format!("{host}.key")),
        )
    }

    /// Whether `host` needs an order now: it has no certificate, or one near its end, and is
    /// not waiting out a failure.
    fn due(&self, host: &str) -> bool {
        if lock(&self.failures)
            .get(host)
            .is_some_and(|f| f.retry_at > Instant::now())
        {
            return false;
        }
        match self.current(host) {
            None => true,
            Some(pair) => pair
                .not_after
                .duration_since(SystemTime::now())
                .map_or(true, |left| left < self.settings.renew_before),
        }
    }

    /// Issues and renews certificates for the routes that ask for `auto` until `cancel`.
    pub async fn run(
        self: Arc<Self>,
        routing: Arc<RoutingTable>,
        metrics: Arc<crate::metrics::Metrics>,
        cancel: CancellationToken,
    ) {
        let mut changes = routing.subscribe();
        let mut account = None;
        loop {
            let hosts = if self.is_active() {
                wanted(&routing)
            } else {
                Vec::new()
            };
            for host in hosts {
                if cancel.is_cancelled() {
                    return;
                }
                if !self.due(&host) {
                    continue;
                }
                let outcome = match &account {
                    Some(account) => self.order(account, &host).await,
                    None => match self.account().await {
                        Ok(made) => {
                            let outcome = self.order(&made, &host).await;
                            account = Some(made);
                            outcome
                        }
                        Err(reason) => Err(format!("no ACME account: {reason}")),
                    },
                };
                match outcome {
                    Ok(not_after) => {
                        metrics.acme_orders.with_label_values(&["issued"]).inc();
                        lock(&self.failures).remove(&host);
                        tracing::info!(%host, until = %crate::model::timestamp(not_after), "ACME certificate issued");
                    }
                    Err(reason) => {
                        metrics.acme_orders.with_label_values(&["failed"]).inc();
                        let mut failures = lock(&self.failures);
                        let count = failures.get(&host).map_or(1, |f| f.count + 1);
                        let wait =
                            Backoff::new(self.settings.retry_after, RETRY_AT_MOST).after(count);
                        tracing::warn!(%host, %reason, retry_in = ?wait, "ACME order failed");
                        failures.insert(
                            host.clone(),
                            Failure {
                                count,
                                reason: format!("ACME order for {host} failed: {reason}"),
                                retry_at: Instant::now() + wait,
                            },
                        );
                    }
                }
                self.changed.notify_waiters();
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    /// The account kept in the directory for this ACME server, made there on first use.
    async fn account(&self) -> Result<Account, String> {
        let path = self.dir.join(format!(
            "account-{}.json",
            &crate::plugins::content_hash(self.settings.directory.as_bytes())[..16]
        ));
        let builder = || match &self.settings.ca_root {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        if let Ok(text) = std::fs::read_to_string(&path) {
            let credentials: AccountCredentials =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            return builder()
                .map_err(|e| e.to_string())?
                .from_credentials(credentials)
                .await
                .map_err(|e| e.to_string());
        }
        let contact = self.settings.email.as_ref().map(|e| format!("mailto:{e}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()
            .map_err(|e| e.to_string())?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                None,
            )
            .await
            .map_err(|e| format!("{} refused a new account: {e}", self.settings.directory))?;
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let text = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
        write_private(&path, &text)?;
        Ok(account)
    }

    /// One order for `host`, answered through HTTP-01; the certificate and its key are written
    /// to the directory. Returns the end of the certificate's validity.
    async fn order(&self, account: &Account, host: &str) -> Result<SystemTime, String> {
        let identifiers = [Identifier::Dns(host.to_owned())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(|e| format!("the order was refused: {e}"))?;
        let mut tokens = Vec::new();
        let answered = async {
            let mut authorizations = order.authorizations();
            while let Some(authorization) = authorizations.next().await {
                let mut authorization = authorization.map_err(|e| e.to_string())?;
                match authorization.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => return Err(format!("the authorization is {other:?}")),
                }
                let kind = match self.settings.challenge {
                    Challenge::Http01 => ChallengeType::Http01,
                    Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
                };
                let mut challenge = authorization
                    .challenge(kind.clone())
                    .ok_or_else(|| format!("the CA offers no {kind:?} challenge"))?;
                let key_authorization = challenge.key_authorization();
                match self.settings.challenge {
                    Challenge::Http01 => {
                        lock(&self.challenges).insert(
                            challenge.token.clone(),
                            key_authorization.as_str().to_owned(),
                        );
                        tokens.push(challenge.token.clone());
                    }
                    Challenge::TlsAlpn01 => {
                        let proof =
                            validation_certificate(host, key_authorization.digest().as_ref())?;
                        lock(&self.alpn_challenges).insert(host.to_owned(), proof);
                    }
                }
                challenge.set_ready().await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }
        .await;
        let ready = match answered {
            Ok(()) => order
                .poll_ready(&RetryPolicy::new().timeout(Duration::from_secs(60)))
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        for token in &tokens {
            lock(&self.challenges).remove(token);
        }
        lock(&self.alpn_challenges).remove(host);
        match ready? {
            OrderStatus::Ready => {}
            status => {
                return Err(format!(
                    "the order is {status:?}: {}",
                    why(&mut order).await
                ));
            }
        }
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let csr = rcgen::CertificateParams::new(vec![host.to_owned()])
            .and_then(|params| params.serialize_request(&key))
            .map_err(|e| format!("cannot make the request: {e}"))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| format!("finalizing was refused: {e}"))?;
        let chain = order
            .poll_certificate(&RetryPolicy::new().timeout(Duration::from_secs(60)))
            .await
            .map_err(|e| format!("no certificate came: {e}"))?;
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let (cert_path, key_path) = self.paths(host);
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_public(&cert_path, chain.as_bytes())?;
        let pair = files::load(&cert_path, &key_path)?;
        let not_after = pair.not_after;
        lock(&self.issued).insert(host.to_owned(), pair);
        Ok(not_after)
    }
}

/// The self-signed certificate a TLS-ALPN-01 validation is shown: the host's name, and the
/// key authorization's digest in the acmeIdentifier extension (RFC 8737).
fn validation_certificate(host: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let err = |e: rcgen::Error| format!("cannot make the validation certificate: {e}");
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).map_err(err)?;
    params
        .custom_extensions
        .push(rcgen::CustomExtension::new_acme_identifier(digest));
    let cert = params.self_signed(&key).map_err(err)?;
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
    );
    // Not `from_der`: its key check parses the certificate, and webpki refuses the critical
    // acmeIdentifier extension that only the validating CA reads.
    let signing = super::provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| format!("the validation key is unusable: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// What the CA said about a failed order: the first challenge error it reports.
async fn why(order: &mut instant_acme::Order) -> String {
    let mut authorizations = order.authorizations();
    while let Some(Ok(authorization)) = authorizations.next().await {
        for challenge in &authorization.challenges {
            if let Some(error) = &challenge.error {
                return error.to_string();
            }
        }
    }
    "the CA gave no reason".to_owned()
}

/// The hosts routes ask an ACME certificate for: `auto` (written, or by default for public
/// names), wildcards left out (they need DNS-01).
fn wanted(routing: &RoutingTable) -> Vec<String> {
    let snapshot = routing.snapshot();
    let mut hosts: Vec<String> = snapshot
        .services
        .values()
        .flat_map(|route| {
            route
                .certified_hosts()
                .iter()
                .filter(|h| route.tls.mode_for(h) == TlsMode::Auto)
                .filter(|h| !h.as_str().starts_with("*."))
                .map(ToString::to_string)
        })
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// The served certificate of an ACME host, for the store.
pub fn served(acme: &Acme, host: &str) -> (Option<super::Served>, Option<String>) {
    if host.starts_with("*.") {
        return (
            None,
            Some(format!(
                "{host} is a wildcard: ACME issues those only through DNS-01, which Harbor does not do; give the route tls files"
            )),
        );
    }
    let current = acme.current(host);
    let problem = acme.failure(host).or_else(|| {
        current
            .is_none()
            .then(|| format!("waiting for an ACME certificate for {host}"))
    });
    (current.map(|pair| (pair.key, pair.pem)), problem)
}
