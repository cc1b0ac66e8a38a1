//! What a built-in strategy implements: its algorithm, free of the WIT contract so that it is
//! unit-tested natively. [`crate::strategy!`] makes a component of it.

use crate::{Backends, Load, PickPlan, PickRequest, config};

/// One route's balancer: built when the route's backends are known, rebuilt when they change,
/// asked for a backend on every new connection or request.
///
/// The host creates one per route and worker thread, and calls it one call at a time, so the
/// balancer's state needs no locking and `pick` may change it (`weighted-round-robin` does).
pub trait Algorithm: Sized + 'static {
    /// The name routes use to select the strategy, e.g. `round-robin`.
    const NAME: &'static str;
    /// Whether picks read [`PickRequest::hash_key`], which the host then computes.
    const USES_HASH_KEY: bool = false;

    /// A route's settings, as [`settings`](Algorithm::settings) reads them; `()` for an
    /// algorithm without any.
    type Settings: Clone + Default + 'static;

    /// Reads a route's settings: the plugin-wide ones (from `configure`) overlaid with the
    /// route's own (from `configure-route`), key by key. Take each key the algorithm knows and
    /// [`finish`](config::Settings::finish) with the list of them, so that an unknown key or a
    /// wrong type is refused with a reason, which the host shows to whoever wrote it. By default
    /// there are no settings: anything but `{}` is refused.
    fn settings(settings: config::Settings) -> Result<Self::Settings, String> {
        settings.finish(Self::NAME, &[])?;
        Ok(Self::Settings::default())
    }

    /// A balancer over the route's backends, under the route's settings.
    fn new(backends: Backends, settings: &Self::Settings) -> Self;

    /// Takes the route's new backend list (backends added, removed, re-weighted or changing
    /// health), under the same settings (a change of settings builds the balancer afresh). By
    /// default the balancer is built afresh; an algorithm with state worth carrying over
    /// overrides this.
    fn rebuild(&mut self, backends: Backends, settings: &Self::Settings) {
        *self = Self::new(backends, settings);
    }

    /// The index of the backend for this pick, or `None` when there is no backend or every one
    /// is excluded. `load` is the host's live load (the `load` import in wasm, numbers in tests);
    /// algorithms that do not balance by load ignore it.
    fn pick(&mut self, request: &PickRequest, load: &impl Load) -> Option<u32>;

    /// The algorithm's first-try picks as a plan the host follows without calling the guest,
    /// until the next rebuild: a table for picks that are a function of the backends and one
    /// number of the request, a load rule for picks that compare live load the way the host's
    /// rules do. Called after every (re)build. The plan must pick what
    /// [`pick`](Algorithm::pick) would; the default, none, has the host call `pick` every time.
    fn plan(&mut self) -> Option<PickPlan> {
        None
    }
}
