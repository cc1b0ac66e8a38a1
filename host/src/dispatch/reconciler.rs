//! The reconciler: the loop that keeps the active adapter's proxy in step with the registry.
//! It follows registry events, coalesces bursts into one apply per short window, retries with
//! backoff while the proxy is down, probes for drift and re-applies in full, and swaps adapters:
//! the new one gets the full desired state before the old one retires.
//!
//! What the proxy keeps for when Harbor is away (Caddy's static upstream lists) may lag
//! instance churn, so that churn costs no reload: when an apply says it lags, the reconciler
//! asks for a refresh at most once every [`FALLBACK_EVERY`], and once more at shutdown.
//!
//! It drives anything [`Driven`] and loads swaps through a [`Loader`], so that its timing and
//! its decisions are tested with paused time and no proxy at all.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::{
    Adapter, AdapterSpec, Applied, CallError, Description, DesiredState, Document, ProbeReport,
};
use crate::backoff::Backoff;
use crate::events::{Event, EventBus, Follower, Since};
use crate::proxy::TcpCarriage;
use crate::registry::Registry;

use super::desired::{Desired, Issuers, Shape};
use super::status::{BackendStatus, Book};
use super::{Dispatcher, Pending, Rendered, RenderedDocument, Request, SwapError};
use crate::model::ServiceView;

/// A change waits this long for more before it is applied (a burst of registrations arrives
/// closer together than this; a longer wait was most of a new service's time to routable, see
/// host/benches/README.md, Backends: registration to routable)...
pub(super) const QUIET: Duration = Duration::from_millis(5);
/// ...but never longer than this after the first change of a burst.
pub(super) const MAX_DELAY: Duration = Duration::from_millis(150);
/// How often the proxy is checked for drift.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(400);
/// The proxy's fallbacks are refreshed at most this often while they lag the registry.
pub(super) const FALLBACK_EVERY: Duration = Duration::from_secs(60);
/// Longest the last apply at shutdown may take.
pub(super) const SETTLE_WITHIN: Duration = Duration::from_secs(5);
/// Longest a swap waits for its new proxy to show the desired state live.
pub(super) const PROVE_WITHIN: Duration = Duration::from_secs(3);
/// Longest Harbor's tcp listeners may take to close, or to bind again, when a swap moves the
/// tcp routes between Harbor and a proxy that carries them itself.
pub(super) const TCP_HANDOVER_WITHIN: Duration = Duration::from_secs(1);
/// Retries of an apply the proxy failed: 100 ms doubling to 5 s.
pub(super) const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// What the reconciler drives: a backend adapter (or, in tests, a stand-in).
pub trait Driven: Send + Sync + 'static {
    fn description(&self) -> &Description;
    /// Where it was loaded from.
    fn source(&self) -> &str;
    /// Its component's content hash.
    fn hash(&self) -> &str;
    /// Brings the proxy to `state`, but for the services it refuses.
    fn apply(&self, state: DesiredState)
    -> impl Future<Output = Result<Applied, CallError>> + Send;
    /// What `apply` would write for `state`, writing nothing.
    fn render(
        &self,
        state: DesiredState,
    ) -> impl Future<Output = Result<Vec<Document>, CallError>> + Send;
    /// Whether the proxy still runs what was applied.
    fn probe(&self) -> impl Future<Output = Result<ProbeReport, CallError>> + Send;
    /// Removes what it put in the proxy.
    fn release(&self) -> impl Future<Output = Result<(), CallError>> + Send;
}

impl Driven for Adapter {
    fn description(&self) -> &Description {
        &self.description
    }

    fn source(&self) -> &str {
        &self.source
    }

    fn hash(&self) -> &str {
        &self.hash
    }

    fn apply(
        &self,
        state: DesiredState,
    ) -> impl Future<Output = Result<Applied, CallError>> + Send {
        Adapter::apply(self, state)
    }

    fn render(
        &self,
        state: DesiredState,
    ) -> impl Future<Output = Result<Vec<Document>, CallError>> + Send {
        Adapter::render(self, state)
    }

    fn probe(&self) -> impl Future<Output = Result<ProbeReport, CallError>> + Send {
        Adapter::probe(self)
    }

    fn release(&self) -> impl Future<Output = Result<(), CallError>> + Send {
        Adapter::release(self)
    }
}

/// Where the reconciler gets the adapter a swap asks for.
pub trait Loader<A>: Send + Sync + 'static {
    fn load(&self, spec: AdapterSpec) -> impl Future<Output = Result<A, SwapError>> + Send;
}

/// The reconciler's state.
struct Reconciler<A, L> {
    book: Arc<Book>,
    loader: Arc<L>,
    registry: Arc<Registry>,
    adapter: Option<A>,
    /// Whether Harbor's own TCP proxy carries the tcp routes.
    tcp: TcpCarriage,
    /// The registry's events, followed.
    events: Follower<EventBus>,
    /// Set when the registry changed (or the proxy drifted) since the last apply.
    dirty_since: Option<Instant>,
    last_change: Instant,
    /// What the proxy was last brought to, successfully.
    applied: Option<Desired>,
    /// The registry's revision `applied` is of.
    applied_revision: u64,
    /// A state the proxy refused: not retried until the registry changes.
    refused: Option<Desired>,
    retry_at: Option<Instant>,
    /// Applies failed in a row.
    failures: u32,
    next_probe: Instant,
    /// When the proxy's fallbacks, which lag the registry, are to be refreshed.
    fallbacks_due: Option<Instant>,
    /// When they were last refreshed (or the reconciler started).
    last_refresh: Instant,
    tls: TlsSource,
}

/// Where the TLS part of the desired state comes from.
#[derive(Clone, Default)]
pub struct TlsSource {
    pub issuers: Issuers,
    /// Harbor's certificates, for a proxy that is handed them; none without a TLS listener.
    pub certificates: Option<Arc<crate::tls::Certificates>>,
}

impl TlsSource {
    /// Tells Harbor's ACME client whether the proxy `description` describes needs it.
    fn serve(&self, description: &Description) {
        if let Some(acme) = self.certificates.as_ref().and_then(|c| c.acme()) {
            acme.set_active(!description.obtains_certificates);
        }
    }
}

/// Runs the dispatcher's reconciler until cancelled.
pub async fn run(
    dispatcher: Arc<Dispatcher>,
    pending: Pending,
    registry: Arc<Registry>,
    cancel: CancellationToken,
    settled: CancellationToken,
) {
    let Pending { requests } = pending;
    let book = dispatcher.book.clone();
    let first = match dispatcher.builtin_spec(dispatcher.kind(), None).await {
        Ok(spec) => Some(spec),
        Err(e) => {
            tracing::error!(error = %e, "no built-in adapter to start with");
            None
        }
    };
    let tcp = dispatcher.tcp.clone();
    let tls = dispatcher.tls.clone();
    let until = Until { cancel, settled };
    reconcile(
        book,
        dispatcher,
        first,
        requests,
        registry,
        (tcp, tls),
        until,
    )
    .await;
}

/// When the reconciler stops, and what it tells once the proxy is settled for Harbor's absence.
struct Until {
    cancel: CancellationToken,
    settled: CancellationToken,
}

/// Keeps what `loader` loads in step with `registry`, starting with `first`, until cancelled.
async fn reconcile<A: Driven, L: Loader<A>>(
    book: Arc<Book>,
    loader: Arc<L>,
    first: Option<AdapterSpec>,
    mut requests: mpsc::Receiver<Request>,
    registry: Arc<Registry>,
    (tcp, tls): (TcpCarriage, TlsSource),
    until: Until,
) {
    let Until { cancel, settled } = until;
    let mut certificates = tls.certificates.as_ref().map(|c| c.subscribe());
    let _settled = settled.drop_guard();
    let mut r = Reconciler {
        book: book.clone(),
        loader: loader.clone(),
        registry: registry.clone(),
        adapter: None,
        tcp,
        events: Follower::new(registry.bus().clone(), registry.bus().last_id()),
        dirty_since: Some(Instant::now()),
        last_change: Instant::now(),
        applied: None,
        applied_revision: 0,
        refused: None,
        retry_at: None,
        failures: 0,
        next_probe: Instant::now() + PROBE_EVERY,
        fallbacks_due: None,
        last_refresh: Instant::now(),
        tls,
    };
    if let Some(spec) = first {
        let source = spec.source.clone();
        match loader.load(spec).await {
            Ok(adapter) => {
                book.set_active(&adapter);
                r.tls.serve(adapter.description());
                let description = adapter.description();
                tracing::info!(adapter = %description.name, version = %description.version, %source, "backend adapter loaded");
                r.adapter = Some(adapter);
            }
            Err(e) => {
                tracing::error!(%source, error = %e, "the backend adapter cannot be loaded; the proxy is not driven until one is swapped in");
                book.edit(|s| s.last_error = Some(e.to_string()));
            }
        }
    }
    loop {
        r.follow();
        r.step().await;
        let wake = r.next_wake();
        tokio::select! {
            changed = r.events.changed() => if !changed { return },
            Some(()) = renewed(certificates.as_mut()) => r.mark_dirty(),
            Some(request) = requests.recv() => r.answer(request).await,
            () = tokio::time::sleep_until(wake) => {}
            () = cancel.cancelled() => {
                r.settle().await;
                return;
            }
        }
    }
}

/// Resolves when a certificate Harbor serves changed; never without certificates.
async fn renewed(changes: Option<&mut tokio::sync::watch::Receiver<u64>>) -> Option<()> {
    match changes {
        Some(changes) => changes.changed().await.ok(),
        None => std::future::pending().await,
    }
}

impl<A: Driven, L: Loader<A>> Reconciler<A, L> {
    /// What `adapter` takes, for [`Desired::of`].
    fn shape<'a>(&'a self, adapter: &A) -> Shape<'a> {
        let description = adapter.description();
        Shape {
            with_tcp: description.supports_tcp,
            obtains_certificates: description.obtains_certificates,
            issuers: &self.tls.issuers,
            certificates: self.tls.certificates.as_ref(),
        }
    }

    fn follow(&mut self) {
        let relevant = match self.events.read() {
            Since::Events(events) => events.iter().any(|e| e.event.changes_routing()),
            Since::Gap => true,
        };
        if relevant {
            self.mark_dirty();
        }
    }

    fn mark_dirty(&mut self) {
        let now = Instant::now();
        self.last_change = now;
        self.dirty_since.get_or_insert(now);
    }

    fn next_wake(&self) -> Instant {
        let mut wake = self.next_probe;
        // Pending changes are applied first, and the refresh goes with them when it is due.
        if let (Some(due), None) = (self.fallbacks_due, self.dirty_since) {
            wake = wake.min(due);
        }
        if let Some(since) = self.dirty_since {
            let due = (self.last_change + QUIET).min(since + MAX_DELAY);
            let due = self.retry_at.map_or(due, |r| r.max(due));
            wake = wake.min(due);
        }
        wake
    }

    async fn step(&mut self) {
        let now = Instant::now();
        if self.dirty_since.is_none() && self.fallbacks_due.is_some_and(|due| now >= due) {
            // Due now: no quiet window to wait out.
            self.dirty_since = Some(now - MAX_DELAY);
            self.last_change = now - QUIET;
        }
        if let Some(since) = self.dirty_since {
            let due = (self.last_change + QUIET).min(since + MAX_DELAY);
            if now >= due && self.retry_at.is_none_or(|r| now >= r) {
                self.apply().await;
            }
        }
        if Instant::now() >= self.next_probe {
            self.next_probe = Instant::now() + PROBE_EVERY;
            if self.retry_at.is_some() {
                self.probe_during_backoff().await;
            } else if self.dirty_since.is_none() && self.applied.is_some() {
                self.probe().await;
            }
        }
    }

    /// While an apply waits out its backoff, the probe keeps asking the proxy; once it answers,
    /// the apply is retried at once, so a proxy back from a long outage gets its routes within
    /// a probe's period instead of at the end of the backoff (up to 5 s).
    async fn probe_during_backoff(&mut self) {
        let Some(adapter) = &self.adapter else {
            return;
        };
        if adapter.probe().await.is_ok() {
            self.retry_at = Some(Instant::now());
        }
    }

    fn desired(&self, adapter: &A) -> (u64, Desired) {
        // The revision is read before the services, so it never claims more than they hold.
        let revision = self.registry.bus().last_id();
        (
            revision,
            Desired::of(&self.registry.services(), self.shape(adapter)),
        )
    }

    async fn apply(&mut self) {
        let Some(adapter) = &self.adapter else {
            self.dirty_since = None;
            return;
        };
        let (revision, desired) = self.desired(adapter);
        let started = Instant::now();
        let refresh = self.fallbacks_due.is_some_and(|due| started >= due);
        if self.refused.as_ref() == Some(&desired) && !refresh {
            self.dirty_since = None;
            return;
        }
        match adapter.apply(desired.to_wit(revision, refresh)).await {
            Ok(mut applied) => {
                applied.refused.extend(desired.refusals());
                self.book
                    .record_applied(&applied, desired.services(), started.elapsed());
                if refresh {
                    self.last_refresh = started;
                }
                self.fallbacks_due = applied
                    .fallbacks_stale
                    .then_some(self.last_refresh + FALLBACK_EVERY);
                self.applied = Some(desired);
                self.applied_revision = revision;
                self.refused = None;
                self.dirty_since = None;
                self.retry_at = None;
                self.failures = 0;
            }
            Err(e) => {
                self.book.record_failed(revision, &e);
                if e.retryable() {
                    self.failures += 1;
                    self.retry_at = Some(Instant::now() + RETRY.after(self.failures));
                } else {
                    self.refused = Some(desired);
                    self.dirty_since = None;
                    // Nothing of a refused state is in the proxy to refresh.
                    self.fallbacks_due = None;
                }
            }
        }
    }

    /// At shutdown: brings the proxy's fallbacks (and any change not yet applied) up to date,
    /// so that the proxy routes to what the registry holds while Harbor is away.
    async fn settle(&mut self) {
        if self.adapter.is_none() || (self.fallbacks_due.is_none() && self.dirty_since.is_none()) {
            return;
        }
        self.fallbacks_due = Some(Instant::now());
        if tokio::time::timeout(SETTLE_WITHIN, self.apply())
            .await
            .is_err()
        {
            tracing::warn!("the proxy's fallbacks could not be refreshed before shutdown");
        }
    }

    async fn probe(&mut self) {
        let Some(adapter) = &self.adapter else {
            return;
        };
        match adapter.probe().await {
            Ok(report) if report.in_sync => self.book.record_confirmed(),
            Ok(report) => {
                self.book.record_drift(&report.detail);
                // Applied at once: the quiet window is for bursts of registry changes.
                self.reapply_now();
            }
            Err(e) => {
                let revision = self.book.edit(|s| s.applied_revision.unwrap_or(0));
                self.book.record_failed(revision, &e);
                if !e.retryable() {
                    self.refused = self.applied.take();
                }
            }
        }
    }

    async fn answer(&mut self, request: Request) {
        match request {
            Request::Swap { spec, reply } => {
                let _ = reply.send(self.swap(spec).await);
            }
            Request::DrySwap { spec, reply } => {
                let _ = reply.send(self.dry_swap(spec).await);
            }
            Request::Render { services, reply } => {
                let _ = reply.send(self.render(services).await);
            }
        }
    }

    /// What the adapter in force writes for `services`, or with none, what it wrote for the
    /// state last applied.
    async fn render(&self, services: Option<Vec<ServiceView>>) -> Result<Rendered, SwapError> {
        let adapter = self.adapter.as_ref().ok_or(SwapError::NoAdapter)?;
        let (revision, desired) = match services {
            Some(services) => (
                self.registry.bus().last_id(),
                Desired::of(&services, self.shape(adapter)),
            ),
            None => match &self.applied {
                Some(applied) => (self.applied_revision, applied.clone()),
                None => return Ok(rendered(adapter, None, Vec::new())),
            },
        };
        let documents = adapter
            .render(desired.to_wit(revision, false))
            .await
            .map_err(|e| SwapError::Render(e.to_string()))?;
        Ok(rendered(adapter, Some(revision), documents))
    }

    /// What `spec`'s adapter would write for the registry as it stands; it is dropped after,
    /// and the adapter in force never knows.
    async fn dry_swap(&self, spec: AdapterSpec) -> Result<Rendered, SwapError> {
        let new = self.loader.load(spec).await?;
        let revision = self.registry.bus().last_id();
        let desired = Desired::of(&self.registry.services(), self.shape(&new));
        let documents = new
            .render(desired.to_wit(revision, false))
            .await
            .map_err(|e| SwapError::Render(e.to_string()))?;
        Ok(rendered(&new, Some(revision), documents))
    }

    async fn swap(&mut self, spec: AdapterSpec) -> Result<BackendStatus, SwapError> {
        let source = spec.source.clone();
        let result = self.try_swap(spec).await;
        let result_label = if result.is_ok() { "ok" } else { "failed" };
        self.book
            .metrics
            .backend
            .swaps
            .with_label_values(&[result_label])
            .inc();
        if let Err(e) = &result {
            tracing::warn!(%source, error = %e, "backend adapter swap refused; the current adapter keeps serving");
            self.book.bus.publish(Event::BackendSwapFailed {
                source,
                reason: e.to_string(),
            });
        }
        result
    }

    async fn try_swap(&mut self, spec: AdapterSpec) -> Result<BackendStatus, SwapError> {
        let new = self.loader.load(spec).await?;
        // A proxy that does not answer is not written to at all, and no listener moves.
        if let Err(e) = new.probe().await {
            return Err(SwapError::Apply(format!(
                "the new proxy does not answer: {e}"
            )));
        }
        let with_tcp = new.description().supports_tcp;
        // The new proxy carries the tcp routes: Harbor lets go of their ports first.
        let handed_over = with_tcp && self.tcp.carrying();
        if handed_over && let Err(e) = self.tcp.release(TCP_HANDOVER_WITHIN).await {
            self.take_tcp_back().await;
            return Err(SwapError::Apply(e));
        }
        let revision = self.registry.bus().last_id();
        let desired = Desired::of(&self.registry.services(), self.shape(&new));
        let started = Instant::now();
        let proven = match new.apply(desired.to_wit(revision, false)).await {
            Ok(applied) => prove(&new).await.map(|()| applied).map_err(|why| {
                format!("the new proxy did not show the state live within {PROVE_WITHIN:?}: {why}")
            }),
            Err(e) => Err(e.to_string()),
        };
        let mut applied = match proven {
            Ok(applied) => applied,
            Err(e) => {
                if new.description().name == self.adapter_name() {
                    // The same proxy as the adapter in force: whatever the refused one wrote
                    // there is mended by the old one applying its state again, at once.
                    self.reapply_now();
                } else if let Err(e) = new.release().await {
                    tracing::warn!(error = %e, "the refused adapter could not remove what it wrote");
                }
                if handed_over {
                    self.take_tcp_back().await;
                }
                return Err(SwapError::Apply(e));
            }
        };
        let old = self.adapter.replace(new);
        let (from, released) = match old {
            Some(old) if old.description().name != self.adapter_name() => {
                // A different proxy: the old adapter removes what it put there.
                let released = old.release().await;
                if let Err(e) = &released {
                    tracing::warn!(adapter = %old.description().name, error = %e, "the old adapter could not remove its configuration");
                }
                (old.description().name.clone(), released.is_ok())
            }
            Some(old) => (old.description().name.clone(), false),
            None => (String::new(), false),
        };
        // The old proxy carried the tcp routes and has let go of them: Harbor takes them back.
        if !with_tcp && !self.tcp.carrying() {
            self.take_tcp_back().await;
        }
        let Some(active) = &self.adapter else {
            return Err(SwapError::Stopped);
        };
        self.book.set_active(active);
        self.tls.serve(active.description());
        applied.refused.extend(desired.refusals());
        self.book
            .record_applied(&applied, desired.services(), started.elapsed());
        self.fallbacks_due = applied
            .fallbacks_stale
            .then_some(self.last_refresh + FALLBACK_EVERY);
        self.applied = Some(desired);
        self.applied_revision = revision;
        self.refused = None;
        self.dirty_since = None;
        self.retry_at = None;
        let description = active.description();
        tracing::info!(from = %from, to = %description.name, version = %description.version, "backend adapter swapped");
        self.book.bus.publish(Event::BackendSwapped {
            from,
            to: description.name.clone(),
            version: description.version.clone(),
            released,
        });
        Ok(self.book.status())
    }

    /// Harbor's own tcp proxy takes back the listeners it let go of for a swap that failed.
    async fn take_tcp_back(&self) {
        if let Err(why) = self.tcp.carry(TCP_HANDOVER_WITHIN).await {
            tracing::warn!(reason = %why, "Harbor takes its tcp listeners back more slowly than it should");
        }
    }

    /// The full state goes to the proxy again without waiting for a quiet moment.
    fn reapply_now(&mut self) {
        let now = Instant::now();
        self.applied = None;
        self.refused = None;
        self.retry_at = None;
        self.dirty_since = Some(now - MAX_DELAY);
        self.last_change = now - QUIET;
    }

    fn adapter_name(&self) -> String {
        self.adapter
            .as_ref()
            .map(|a| a.description().name.clone())
            .unwrap_or_default()
    }
}

fn rendered<A: Driven>(adapter: &A, revision: Option<u64>, documents: Vec<Document>) -> Rendered {
    Rendered {
        adapter: adapter.description().name.clone(),
        version: adapter.description().version.clone(),
        revision,
        documents: documents.into_iter().map(RenderedDocument::of).collect(),
    }
}

/// Waits until `adapter`'s proxy reports what was applied as live; why not, if it does not.
async fn prove<A: Driven>(adapter: &A) -> Result<(), String> {
    let deadline = Instant::now() + PROVE_WITHIN;
    loop {
        let why = match adapter.probe().await {
            Ok(report) if report.in_sync => return Ok(()),
            Ok(report) => report.detail,
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(why);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::backend::{AdapterError, Capabilities, RefusedService};
    use crate::events::lock;
    use crate::metrics::Metrics;
    use crate::model::{RouteInput, ServiceName};
    use crate::registry::LeaseLimits;

    /// What a stand-in proxy saw and what it is to answer.
    #[derive(Default)]
    struct Proxy {
        /// When each apply came, and how many services it carried.
        applies: Vec<(Instant, usize)>,
        /// Applies still to fail as a proxy that is down does.
        down_for: u32,
        /// Whether every apply is refused as a bad configuration.
        refuses: bool,
        /// Whether the proxy still runs what was applied (what a probe finds).
        drifted: bool,
        /// Whether probes fail as they do while the proxy is down.
        probe_down: bool,
        released: bool,
        /// A service the proxy refuses while taking the rest.
        refuses_service: Option<String>,
        /// How many services its fallbacks hold (they lag until refreshed), and the applies
        /// that refreshed them.
        fallbacks: usize,
        refreshes: Vec<Instant>,
    }

    struct Fake {
        description: Description,
        proxy: Arc<Mutex<Proxy>>,
    }

    impl Fake {
        fn new(name: &str) -> (Self, Arc<Mutex<Proxy>>) {
            let proxy = Arc::new(Mutex::new(Proxy::default()));
            let description = Description {
                name: name.to_owned(),
                version: "1".to_owned(),
                supports_tcp: false,
                obtains_certificates: false,
            };
            let fake = Self {
                description,
                proxy: proxy.clone(),
            };
            (fake, proxy)
        }
    }

    impl Driven for Fake {
        fn description(&self) -> &Description {
            &self.description
        }

        fn source(&self) -> &str {
            "test"
        }

        fn hash(&self) -> &str {
            "0"
        }

        async fn apply(&self, state: DesiredState) -> Result<Applied, CallError> {
            let mut proxy = lock(&self.proxy);
            let services = state.http.len() + state.tcp.len();
            proxy.applies.push((Instant::now(), services));
            if proxy.refuses {
                return Err(CallError::Adapter(AdapterError::Rejected("bad".into())));
            }
            if proxy.down_for > 0 {
                proxy.down_for -= 1;
                return Err(CallError::Adapter(AdapterError::Retryable("down".into())));
            }
            proxy.drifted = false;
            if state.refresh_fallbacks {
                proxy.fallbacks = services;
                proxy.refreshes.push(Instant::now());
            }
            let refused = state
                .http
                .iter()
                .filter(|s| proxy.refuses_service.as_ref() == Some(&s.name))
                .map(|s| RefusedService {
                    name: s.name.clone(),
                    reason: "unknown field".into(),
                })
                .collect();
            Ok(Applied {
                revision: state.revision,
                refused,
                fallbacks_stale: proxy.fallbacks != services,
                writes: 1,
            })
        }

        async fn render(&self, state: DesiredState) -> Result<Vec<Document>, CallError> {
            let names: Vec<&str> = state.http.iter().map(|s| s.name.as_str()).collect();
            Ok(vec![Document {
                target: "services".into(),
                content: serde_json::json!(names).to_string(),
            }])
        }

        async fn probe(&self) -> Result<ProbeReport, CallError> {
            let (drifted, down) = {
                let p = lock(&self.proxy);
                (p.drifted, p.probe_down || p.down_for > 0)
            };
            if down {
                return Err(CallError::Adapter(AdapterError::Retryable("down".into())));
            }
            Ok(ProbeReport {
                in_sync: !drifted,
                applied_revision: None,
                detail: if drifted {
                    "edited by hand"
                } else {
                    "as applied"
                }
                .to_owned(),
            })
        }

        async fn release(&self) -> Result<(), CallError> {
            lock(&self.proxy).released = true;
            Ok(())
        }
    }

    /// Hands out the stand-ins queued for it, by the order of the specs asked for.
    #[derive(Default)]
    struct Loads(Mutex<VecDeque<Fake>>);

    impl Loader<Fake> for Loads {
        async fn load(&self, _spec: AdapterSpec) -> Result<Fake, SwapError> {
            lock(&self.0)
                .pop_front()
                .ok_or_else(|| SwapError::Load("nothing to load".into()))
        }
    }

    fn spec() -> AdapterSpec {
        AdapterSpec {
            source: "test".into(),
            component: Arc::from(Vec::new()),
            config: "{}".into(),
            capabilities: Capabilities {
                http: None,
                files: None,
                http_deadline: Duration::from_secs(1),
                read_only: false,
            },
        }
    }

    struct Rig {
        registry: Arc<Registry>,
        book: Arc<Book>,
        loads: Arc<Loads>,
        swaps: mpsc::Sender<Request>,
        cancel: CancellationToken,
        settled: CancellationToken,
    }

    /// A reconciler driving `first` for a fresh registry, running on its own task.
    fn rig(first: Fake) -> Rig {
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let bus = Arc::new(EventBus::new(1024));
        let registry = Arc::new(Registry::new(
            bus.clone(),
            metrics.clone(),
            LeaseLimits::default(),
        ));
        let book = Arc::new(Book::new(metrics, bus));
        let loads = Arc::new(Loads::default());
        lock(&loads.0).push_back(first);
        let (swaps, rx) = mpsc::channel(1);
        let (cancel, settled) = (CancellationToken::new(), CancellationToken::new());
        tokio::spawn(reconcile(
            book.clone(),
            loads.clone(),
            Some(spec()),
            rx,
            registry.clone(),
            (TcpCarriage::new(true), TlsSource::default()),
            Until {
                cancel: cancel.clone(),
                settled: settled.clone(),
            },
        ));
        Rig {
            registry,
            book,
            loads,
            swaps,
            cancel,
            settled,
        }
    }

    fn register(registry: &Registry, service: &str) {
        let name = ServiceName::parse(service).expect("a name");
        let route = RouteInput::new(&name).validate().expect("a route");
        register_route(registry, name, route);
    }

    fn register_route(registry: &Registry, name: ServiceName, route: crate::model::Route) {
        let registration = crate::registry::tests::reg_route(name, route, "127.0.0.1:9", 3600);
        registry.register(registration).expect("registered");
    }

    fn applies(proxy: &Mutex<Proxy>) -> Vec<(Instant, usize)> {
        lock(proxy).applies.clone()
    }

    /// The events published after event `from`.
    fn told_since(rig: &Rig, from: u64) -> Vec<Arc<crate::events::Envelope>> {
        let Since::Events(told) = rig.registry.bus().since(from) else {
            panic!("events after {from} are gone from the ring")
        };
        told
    }

    /// Lets the reconciler run for `d` of (paused) time.
    async fn run_for(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_applied_once_and_a_trickle_at_most_every_max_delay() {
        let (fake, proxy) = Fake::new("fake");
        let rig = rig(fake);
        run_for(Duration::from_secs(1)).await;
        assert_eq!(applies(&proxy).len(), 1, "the first state, once");

        let burst = Instant::now();
        for n in 0..5 {
            register(&rig.registry, &format!("s{n}"));
        }
        run_for(Duration::from_secs(1)).await;
        let after_burst = applies(&proxy);
        assert_eq!(after_burst.len(), 2, "five changes, one apply");
        assert_eq!(after_burst[1].1, 5, "with all five services");
        assert!(after_burst[1].0 - burst >= QUIET, "after the quiet window");

        // A change every 2 ms never leaves the quiet window, so the delay cap applies them.
        let trickle = Instant::now();
        for n in 0..150 {
            register(&rig.registry, &format!("t{n}"));
            run_for(QUIET * 2 / 5).await;
        }
        run_for(Duration::from_secs(1)).await;
        let during: Vec<Instant> = applies(&proxy)[2..].iter().map(|a| a.0).collect();
        assert!(
            (2..=4).contains(&during.len()),
            "300 ms of changes, applied every 150 ms: {}",
            during.len()
        );
        assert!(during[0] - trickle <= MAX_DELAY);
        assert_eq!(applies(&proxy).last().map(|a| a.1), Some(155));
        rig.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_that_is_down_is_retried_with_backoff_until_it_takes_the_state() {
        let (fake, proxy) = Fake::new("fake");
        lock(&proxy).down_for = 4;
        let rig = rig(fake);
        run_for(Duration::from_secs(5)).await;
        let times: Vec<Instant> = applies(&proxy).iter().map(|a| a.0).collect();
        assert_eq!(times.len(), 5, "four failures, then the apply that took");
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        let expected: Vec<Duration> = (1..=3).map(|n| RETRY.after(n)).collect();
        assert_eq!(gaps[..3], expected, "100, 200 and 400 ms apart");
        // The proxy answers again after the fourth failure: the probe sees it, and the apply
        // comes within a probe's period instead of after the next 800 ms of backoff.
        assert!(
            gaps[3] <= PROBE_EVERY && gaps[3] < RETRY.after(4),
            "{gaps:?}"
        );
        let status = rig.book.status();
        assert!(status.in_sync && status.last_error.is_none(), "{status:?}");
        assert_eq!(status.applies, 1);
        rig.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxy_back_from_a_long_outage_gets_its_routes_within_a_probe_period() {
        let (fake, proxy) = Fake::new("fake");
        lock(&proxy).down_for = u32::MAX;
        let rig = rig(fake);
        // Twelve seconds down, with registrations meanwhile: the backoff reaches its 5 s cap.
        for n in 0..12 {
            register(&rig.registry, &format!("s{n}"));
            run_for(Duration::from_secs(1)).await;
        }
        let failed = applies(&proxy).len();
        assert!(failed < 12, "backed off: {failed} tries in 12 s");
        let back = Instant::now();
        {
            let mut p = lock(&proxy);
            p.down_for = 0;
            p.probe_down = false;
        }
        run_for(Duration::from_secs(2)).await;
        let first_ok = applies(&proxy)[failed..].first().map(|a| a.0);
        let took = first_ok.expect("applied once the proxy answered") - back;
        assert!(
            took <= PROBE_EVERY + QUIET,
            "routes back {took:?} after the proxy"
        );
        assert_eq!(applies(&proxy).last().map(|a| a.1), Some(12));
        assert!(rig.book.status().in_sync);
        rig.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_state_is_not_retried_until_the_registry_changes() {
        let (fake, proxy) = Fake::new("fake");
        lock(&proxy).refuses = true;
        let rig = rig(fake);
        run_for(Duration::from_secs(3)).await;
        assert_eq!(applies(&proxy).len(), 1, "refused once, not again");
        assert!(!rig.book.status().in_sync);
        lock(&proxy).refuses = false;
        register(&rig.registry, "a");
        run_for(Duration::from_secs(1)).await;
        assert_eq!(applies(&proxy).len(), 2, "a change brings a new state");
        assert!(rig.book.status().in_sync);
        rig.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn drift_is_found_by_the_probe_and_repaired_at_once() {
        let (fake, proxy) = Fake::new("fake");
        let rig = rig(fake);
        run_for(Duration::from_secs(1)).await;
        assert_eq!(applies(&proxy).len(), 1);
        let drifted = Instant::now();
        lock(&proxy).drifted = true;
        run_for(Duration::from_secs(1)).await;
        let times = applies(&proxy);
        assert_eq!(times.len(), 2, "applied again, once");
        assert!(
            times[1].0 - drifted <= PROBE_EVERY + QUIET,
            "within a probe's period: {:?}",
            times[1].0 - drifted
        );
        assert!(rig.book.status().in_sync);
        let told = told_since(&rig, rig.registry.bus().last_id() - 3);
        assert!(
            told.iter().any(|e| e.event.kind() == "backend_drift"),
            "the drift is told"
        );
        rig.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_swap_that_cannot_apply_leaves_the_old_adapter_serving_and_one_that_can_retires_it() {
        let (old, old_proxy) = Fake::new("old");
        let rig = rig(old);
        run_for(Duration::from_secs(1)).await;
        let swap = |rig: &Rig| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let swaps = rig.swaps.clone();
            async move {
                swaps
                    .send(Request::Swap {
                        spec: spec(),
                        reply,
                    })
                    .await
                    .expect("the reconciler runs");
                answer.await.expect("an answer")
            }
        };

        let (broken, broken_proxy) = Fake::new("broken");
        lock(&broken_proxy).refuses = true;
        lock(&rig.loads.0).push_back(broken);
        let refused = swap(&rig).await;
        assert!(matches!(refused, Err(SwapError::Apply(_))), "{refused:?}");
        assert_eq!(
            rig.book.status().adapter,
            "old",
            "the old one keeps serving"
        );
        assert!(!lock(&old_proxy).released);
        assert!(
            lock(&broken_proxy).released,
            "what the refused adapter may have written is removed"
        );
        register(&rig.registry, "a");
        run_for(Duration::from_secs(1)).await;
        assert_eq!(
            applies(&old_proxy).last().map(|a| a.1),
            Some(1),
            "and keeps being driven"
        );

        // A refused adapter for the same proxy removes nothing there, which would be the old
        // one's: the old one applies its state again at once instead.
        let (same, same_proxy) = Fake::new("old");
        lock(&same_proxy).refuses = true;
        lock(&rig.loads.0).push_back(same);
        let before = applies(&old_proxy).len();
        assert!(matches!(swap(&rig).await, Err(SwapError::Apply(_))));
        run_for(Duration::from_millis(50)).await;
        assert!(!lock(&same_proxy).released && !lock(&old_proxy).released);
        assert_eq!(applies(&old_proxy).len(), before + 1, "the old state again");

        let (new, new_proxy) = Fake::new("new");
        lock(&rig.loads.0).push_back(new);
        let swapped = swap(&rig).await.expect("swapped");
        assert_eq!(swapped.adapter, "new");
        assert_eq!(
            applies(&new_proxy).first().map(|a| a.1),
            Some(1),
            "the new adapter got the whole state first"
        );
        assert!(
            lock(&old_proxy).released,
            "the old one cleaned up after itself"
        );
        rig.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn lagging_fallbacks_are_refreshed_at_most_once_a_minute_and_at_shutdown() {
        let (fake, proxy) = Fake::new("fake");
        let rig = rig(fake);
        run_for(Duration::from_secs(1)).await;
        assert!(lock(&proxy).refreshes.is_empty(), "nothing lags yet");
        let started = Instant::now();
        // A new instance every second for two and a half minutes.
        for n in 0..150 {
            register(&rig.registry, &format!("s{n}"));
            run_for(Duration::from_secs(1)).await;
        }
        let refreshes = lock(&proxy).refreshes.clone();
        assert_eq!(refreshes.len(), 2, "at 60 and 120 s: {refreshes:?}");
        assert!(refreshes[0] - started <= FALLBACK_EVERY);
        assert!(refreshes[1] - refreshes[0] >= FALLBACK_EVERY);
        assert!(
            applies(&proxy).len() > 100,
            "every change was applied meanwhile"
        );
        assert!(!rig.settled.is_cancelled());

        rig.cancel.cancel();
        tokio::time::timeout(SETTLE_WITHIN, rig.settled.cancelled())
            .await
            .expect("settled");
        let proxy = lock(&proxy);
        assert_eq!(proxy.refreshes.len(), 3, "and once more at shutdown");
        assert_eq!(proxy.fallbacks, 150, "holding every service");
    }

    #[tokio::test(start_paused = true)]
    async fn fallbacks_that_do_not_lag_cost_nothing_at_shutdown() {
        let (fake, proxy) = Fake::new("fake");
        let rig = rig(fake);
        run_for(Duration::from_secs(1)).await;
        rig.cancel.cancel();
        rig.settled.cancelled().await;
        assert_eq!(applies(&proxy).len(), 1, "no apply at shutdown");
    }

    /// A proxy that carries tcp but obtains its own certificates cannot terminate TLS for a tcp
    /// service with Harbor's: that service is refused on its behalf, named, while the rest
    /// (passthrough included, which needs no certificate) is applied.
    #[tokio::test(start_paused = true)]
    async fn tcp_termination_is_refused_for_a_proxy_that_obtains_its_own_certificates() {
        let (mut fake, proxy) = Fake::new("fake");
        fake.description.supports_tcp = true;
        fake.description.obtains_certificates = true;
        let rig = rig(fake);
        register(&rig.registry, "web");
        let name = ServiceName::parse("sni").expect("a name");
        let route = RouteInput {
            protocol: Some(crate::model::Protocol::TlsPassthrough),
            listen: Some("127.0.0.1:9443"),
            host: Some("a.test"),
            ..RouteInput::new(&name)
        }
        .validate()
        .expect("a route");
        register_route(&rig.registry, name, route);
        let name = ServiceName::parse("db").expect("a name");
        let mut route = RouteInput {
            protocol: Some(crate::model::Protocol::Tcp),
            listen: Some("127.0.0.1:9444"),
            host: Some("db.test"),
            ..RouteInput::new(&name)
        }
        .validate()
        .expect("a route");
        route.tls = crate::model::Tls::parse(
            Some(&crate::model::TlsInput::Word("internal".into())),
            None,
            None,
        )
        .expect("tls");
        register_route(&rig.registry, name, route);
        run_for(Duration::from_secs(1)).await;
        assert_eq!(
            applies(&proxy).last().map(|a| a.1),
            Some(2),
            "web and the passthrough service"
        );
        let status = rig.book.status();
        assert_eq!(status.refused.len(), 1, "{status:?}");
        assert_eq!(status.refused[0].service, "db");
        assert!(status.refused[0].reason.contains("Harbor's own tcp proxy"));
        assert!(!status.in_sync);
        rig.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_service_is_reported_once_and_the_rest_stay_applied() {
        let (fake, proxy) = Fake::new("fake");
        lock(&proxy).refuses_service = Some("bad".into());
        let rig = rig(fake);
        let from = rig.registry.bus().last_id();
        register(&rig.registry, "good");
        register(&rig.registry, "bad");
        run_for(Duration::from_secs(1)).await;
        let status = rig.book.status();
        assert!(!status.in_sync, "not all of it is live: {status:?}");
        let error = status.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("bad: unknown field"), "{status:?}");
        assert_eq!(status.refused.len(), 1);
        assert_eq!(status.refused[0].service, "bad");
        assert_eq!(status.refused[0].reason, "unknown field");

        register(&rig.registry, "other");
        run_for(Duration::from_secs(1)).await;
        assert_eq!(applies(&proxy).last().map(|a| a.1), Some(3), "still driven");
        let told = told_since(&rig, from);
        let refusals: Vec<_> = told
            .iter()
            .filter_map(|e| match &e.event {
                Event::BackendFailed {
                    service: Some(service),
                    retryable: false,
                    ..
                } => Some(service.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(refusals, ["bad"], "told once, not at every apply");

        lock(&proxy).refuses_service = None;
        register(&rig.registry, "again");
        run_for(Duration::from_secs(1)).await;
        let status = rig.book.status();
        assert!(status.refused.is_empty(), "cleared once taken");
        assert!(status.in_sync && status.last_error.is_none(), "{status:?}");
        rig.cancel.cancel();
    }
}
