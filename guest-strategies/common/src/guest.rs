//! The glue between the WIT contract and an [`Algorithm`], written once for every built-in
//! strategy: `describe` from the algorithm's constants, `configure` and `configure-route`
//! through its [`settings`](Algorithm::settings), a table of routes each holding its settings
//! and one algorithm, the host's records turned into [`Backends`] and
//! [`PickRequest`], and the `load` import read through [`Load`].
//!
//! A strategy crate exports it with [`strategy!`](crate::strategy); nothing here needs to be
//! named directly.

use std::cell::{Cell, OnceCell};

use crate::bindings::exports::harbor::strategy::strategy::{
    Backend, Description, Guest, Outcome, PickPlan as WitPlan, Route,
};
use crate::bindings::harbor::strategy::load;
use crate::bindings::harbor::strategy::types::{
    LoadMeasure as WitMeasure, LoadRule as WitRule, PickTable as WitTable, TableIndex as WitIndex,
    WeightedCandidate,
};
use crate::config::Settings;
use crate::{Algorithm, Backends, Load, LoadMeasure, LoadRule, PickPlan, PickRequest};

/// A strategy crate's component, as [`strategy!`](crate::strategy) declares it: the algorithm it
/// exports, the crate's version, which `describe` reports, and the table of its routes.
pub trait Component: 'static {
    type Algorithm: Algorithm;
    const VERSION: &'static str;

    /// Runs `f` on the component's routes. [`strategy!`](crate::strategy) keeps them in a
    /// thread-local: an instance runs one call at a time, so it is never found borrowed.
    fn with_routes<R>(f: impl FnOnce(&mut Routes<Self::Algorithm>) -> R) -> R;
}

/// One algorithm per route, indexed by the host's route numbers (small, reused after `forget`),
/// with the settings each route was given and the plugin-wide ones they lay over.
pub struct Routes<A: Algorithm> {
    /// The plugin-wide settings, from `configure`.
    base: Settings,
    table: Vec<Option<RouteState<A>>>,
}

/// One route: its settings, and its algorithm once it has backends.
struct RouteState<A: Algorithm> {
    settings: A::Settings,
    algorithm: Option<A>,
}

impl<A: Algorithm> Default for Routes<A> {
    fn default() -> Self {
        Self {
            base: Settings::default(),
            table: Vec::new(),
        }
    }
}

impl<A: Algorithm> Routes<A> {
    /// Takes the plugin-wide settings, which routes configured afterwards lay theirs over.
    pub fn configure(&mut self, text: &str) -> Result<(), String> {
        let base = Settings::parse(text)?;
        A::settings(base.clone())?;
        self.base = base;
        Ok(())
    }

    /// Gives `route` its own settings, over the plugin-wide ones; its algorithm is built afresh
    /// under them by the `rebuild` that follows. Refused settings leave the route as it was.
    pub fn configure_route(&mut self, route: Route, text: &str) -> Result<(), String> {
        let settings = A::settings(self.base.overlaid(Settings::parse(text)?))?;
        *self.slot(route) = Some(RouteState {
            settings,
            algorithm: None,
        });
        Ok(())
    }

    /// Builds the route's algorithm on its first backend list, rebuilds it on later ones;
    /// returns the algorithm's pick plan, if it has one.
    pub fn rebuild(&mut self, route: Route, backends: Backends) -> Option<PickPlan> {
        // A route the host gave no settings runs on the plugin-wide ones.
        let unset = self.table.get(route as usize).is_none_or(Option::is_none);
        let settings = if unset {
            A::settings(self.base.clone()).unwrap_or_default()
        } else {
            A::Settings::default()
        };
        let state = self.slot(route).get_or_insert_with(|| RouteState {
            settings,
            algorithm: None,
        });
        let algorithm = match &mut state.algorithm {
            Some(algorithm) => {
                algorithm.rebuild(backends, &state.settings);
                algorithm
            }
            empty => empty.insert(A::new(backends, &state.settings)),
        };
        algorithm.plan()
    }

    pub fn forget(&mut self, route: Route) {
        if let Some(slot) = self.table.get_mut(route as usize) {
            *slot = None;
        }
        while self.table.last().is_some_and(Option::is_none) {
            self.table.pop();
        }
    }

    /// The route's algorithm; none for a route the host never built (or forgot).
    pub fn get(&mut self, route: Route) -> Option<&mut A> {
        self.table
            .get_mut(route as usize)?
            .as_mut()?
            .algorithm
            .as_mut()
    }

    fn slot(&mut self, route: Route) -> &mut Option<RouteState<A>> {
        let i = route as usize;
        if self.table.len() <= i {
            self.table.resize_with(i + 1, || None);
        }
        &mut self.table[i]
    }
}

impl<C: Component> Guest for C {
    fn describe() -> Description {
        Description {
            name: C::Algorithm::NAME.into(),
            version: C::VERSION.into(),
            wants_outcomes: false,
            uses_hash_key: C::Algorithm::USES_HASH_KEY,
        }
    }

    fn configure(config: String) -> Result<(), String> {
        C::with_routes(|routes| routes.configure(&config))
    }

    fn configure_route(route: Route, settings: String) -> Result<(), String> {
        C::with_routes(|routes| routes.configure_route(route, &settings))
    }

    fn rebuild(route: Route, backends: Vec<Backend>) -> Option<WitPlan> {
        let plan = C::with_routes(|routes| routes.rebuild(route, view(backends)))?;
        Some(match plan {
            PickPlan::Table(table) => WitPlan::Table(WitTable {
                index: match table.index {
                    crate::TableIndex::Sequence => WitIndex::Sequence,
                    crate::TableIndex::Entropy => WitIndex::Entropy,
                },
                entries: table.entries,
            }),
            PickPlan::LeastLoaded(rule) => WitPlan::LeastLoaded(wit_rule(rule)),
            PickPlan::TwoChoices(rule) => WitPlan::TwoChoices(wit_rule(rule)),
        })
    }

    fn forget(route: Route) {
        C::with_routes(|routes| routes.forget(route));
    }

    fn pick(route: Route, sequence: u64, entropy: u64, hash_key: Option<u64>) -> Option<u32> {
        let request = PickRequest {
            sequence,
            entropy,
            hash_key,
            exclude: &[],
        };
        C::with_routes(|routes| routes.get(route)?.pick(&request, &HostLoad::default()))
    }

    fn retry(
        route: Route,
        sequence: u64,
        entropy: u64,
        hash_key: Option<u64>,
        exclude: Vec<u32>,
    ) -> Option<u32> {
        let request = PickRequest {
            sequence,
            entropy,
            hash_key,
            exclude: &exclude,
        };
        C::with_routes(|routes| routes.get(route)?.pick(&request, &HostLoad::default()))
    }

    /// Never called: `describe` asks for no outcomes.
    fn done(_route: Route, _index: u32, _outcome: Outcome, _latency_ns: u64) {}
}

fn wit_rule(rule: LoadRule) -> WitRule {
    WitRule {
        measure: match rule.measure {
            LoadMeasure::InFlight => WitMeasure::InFlight,
            LoadMeasure::PeakEwma { unmeasured_ns } => WitMeasure::PeakEwma(unmeasured_ns),
        },
        candidates: rule
            .candidates
            .into_iter()
            .map(|(index, weight)| WeightedCandidate { index, weight })
            .collect(),
    }
}

/// The parts of the host's backend records that algorithms use (labels are left out).
fn view(backends: Vec<Backend>) -> Backends {
    backends
        .into_iter()
        .map(|b| crate::Backend {
            address: b.address,
            weight: b.weight,
            healthy: b.healthy,
        })
        .collect()
}

/// The host's live load, read through the `load` import. Only wasm reads it: natively the
/// import is a stub, which is why algorithms take any [`Load`] and their tests pass numbers.
///
/// The first few in-flight reads of a pick are one `in-flight` call each, as cheap as it gets
/// for an algorithm that looks at two or three backends (power of two choices). Past
/// [`SINGLE_READS`], the pick is scanning: every backend's count is fetched with one
/// `in-flight-all` call, so a scan costs a handful of host calls whatever the route's size.
#[derive(Default)]
struct HostLoad {
    reads: Cell<u32>,
    in_flight: OnceCell<Vec<u32>>,
}

/// In-flight reads per pick made one by one; past them one `in-flight-all` costs less (see
/// host/benches/README.md, Strategy pick cost).
const SINGLE_READS: u32 = 4;

impl Load for HostLoad {
    fn in_flight(&self, index: u32) -> u32 {
        if self.in_flight.get().is_none() {
            let reads = self.reads.get();
            if reads < SINGLE_READS {
                self.reads.set(reads + 1);
                return load::in_flight(index);
            }
        }
        self.in_flight
            .get_or_init(load::in_flight_all)
            .get(index as usize)
            .copied()
            .unwrap_or(0)
    }

    fn latency_ewma_ns(&self, index: u32) -> u64 {
        load::latency_ewma_ns(index)
    }
}

/// Exports an [`Algorithm`] as the crate's strategy component: `describe` reports the
/// algorithm's [`NAME`](Algorithm::NAME) and [`USES_HASH_KEY`](Algorithm::USES_HASH_KEY) and
/// the crate's version, `configure` and `configure-route` go through
/// [`Algorithm::settings`], and each route the host builds holds its settings and one instance
/// of the algorithm. Use it once, in the crate's `lib.rs`, with the
/// crate built as a `cdylib`:
///
/// ```
/// use harbor_strategy_common::{Algorithm, Backends, Load, PickRequest};
///
/// /// Always the first candidate.
/// pub struct First(Backends);
///
/// impl Algorithm for First {
///     const NAME: &'static str = "first";
///     type Settings = ();
///
///     fn new(backends: Backends, _settings: &()) -> Self {
///         Self(backends)
///     }
///
///     fn pick(&mut self, request: &PickRequest, _load: &impl Load) -> Option<u32> {
///         self.0.candidates(request.exclude).first()
///     }
/// }
///
/// harbor_strategy_common::strategy!(First);
/// ```
#[macro_export]
macro_rules! strategy {
    ($algorithm:ty) => {
        const _: () = {
            struct Strategy;

            impl $crate::guest::Component for Strategy {
                type Algorithm = $algorithm;
                const VERSION: &'static str = env!("CARGO_PKG_VERSION");

                fn with_routes<R>(
                    f: impl FnOnce(&mut $crate::guest::Routes<$algorithm>) -> R,
                ) -> R {
                    ::std::thread_local! {
                        static ROUTES: ::std::cell::RefCell<$crate::guest::Routes<$algorithm>> =
                            ::std::cell::RefCell::new(::std::default::Default::default());
                    }
                    ROUTES.with_borrow_mut(f)
                }
            }

            // Finds the binding types through `default_bindings_module`.
            $crate::bindings::export!(Strategy);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::FixedLoad;
    use std::cell::RefCell;

    /// Records what the glue hands it; reads no load, so it runs natively. Its one setting,
    /// `level`, is kept to show which settings a route was built under.
    struct Recorder {
        backends: Backends,
        level: Option<u64>,
        rebuilds: u32,
        picks: Vec<(u64, u64, Option<u64>, Vec<u32>)>,
    }

    impl Algorithm for Recorder {
        const NAME: &'static str = "recorder";
        const USES_HASH_KEY: bool = true;
        type Settings = Option<u64>;

        fn settings(mut settings: Settings) -> Result<Option<u64>, String> {
            let level = settings.take_u64("level")?;
            settings.finish(Self::NAME, &["level"])?;
            Ok(level)
        }

        fn new(backends: Backends, level: &Option<u64>) -> Self {
            Self {
                backends,
                level: *level,
                rebuilds: 0,
                picks: Vec::new(),
            }
        }

        fn rebuild(&mut self, backends: Backends, _level: &Option<u64>) {
            self.backends = backends;
            self.rebuilds += 1;
        }

        fn pick(&mut self, request: &PickRequest, _load: &impl Load) -> Option<u32> {
            self.picks.push((
                request.sequence,
                request.entropy,
                request.hash_key,
                request.exclude.to_vec(),
            ));
            self.backends.candidates(request.exclude).first()
        }
    }

    struct Test;

    thread_local! {
        static TEST_ROUTES: RefCell<Routes<Recorder>> = RefCell::new(Routes::default());
    }

    impl Component for Test {
        type Algorithm = Recorder;
        const VERSION: &'static str = "9.8.7";

        fn with_routes<R>(f: impl FnOnce(&mut Routes<Recorder>) -> R) -> R {
            TEST_ROUTES.with_borrow_mut(f)
        }
    }

    fn backend(address: &str, weight: u32, healthy: bool) -> Backend {
        Backend {
            address: address.into(),
            weight,
            healthy,
            labels: vec![("track".into(), "canary".into())],
        }
    }

    #[test]
    fn describes_and_configures_through_the_algorithm() {
        let description = <Test as Guest>::describe();
        assert_eq!(description.name, "recorder");
        assert_eq!(description.version, "9.8.7");
        assert!(description.uses_hash_key);
        assert!(!description.wants_outcomes);
        assert_eq!(<Test as Guest>::configure("{}".into()), Ok(()));
        let err = <Test as Guest>::configure(r#"{"x": 1}"#.into()).expect_err("unknown");
        assert!(err.contains("no setting `x`"), "{err}");
    }

    #[test]
    fn routes_lay_their_settings_over_the_plugin_wide_ones() {
        let level = |route| Test::with_routes(|routes| routes.get(route).and_then(|r| r.level));
        assert_eq!(<Test as Guest>::configure(r#"{"level": 1}"#.into()), Ok(()));
        <Test as Guest>::rebuild(5, vec![backend("a:80", 1, true)]);
        assert_eq!(level(5), Some(1), "no route settings: the plugin-wide ones");
        assert_eq!(
            <Test as Guest>::configure_route(6, r#"{"level": 2}"#.into()),
            Ok(())
        );
        <Test as Guest>::rebuild(6, vec![backend("a:80", 1, true)]);
        assert_eq!(level(6), Some(2));

        // New settings build the route afresh under them; refused ones leave it as it was.
        <Test as Guest>::rebuild(6, vec![backend("b:80", 1, true)]);
        assert_eq!(<Test as Guest>::configure_route(6, "{}".into()), Ok(()));
        <Test as Guest>::rebuild(6, vec![backend("b:80", 1, true)]);
        Test::with_routes(|routes| {
            let route = routes.get(6).expect("route 6");
            assert_eq!((route.level, route.rebuilds), (Some(1), 0));
        });
        let err = <Test as Guest>::configure_route(6, r#"{"level": "x"}"#.into())
            .expect_err("not a number");
        assert!(err.contains("`level` must be a whole number"), "{err}");
        assert_eq!(level(6), Some(1));
        <Test as Guest>::forget(5);
        <Test as Guest>::forget(6);
        assert_eq!(<Test as Guest>::configure("{}".into()), Ok(()));
    }

    #[test]
    fn routes_pass_backends_and_picks_through() {
        assert_eq!(<Test as Guest>::pick(1, 0, 0, None), None, "not built yet");
        <Test as Guest>::rebuild(1, vec![backend("a:80", 3, false), backend("b:80", 1, true)]);
        assert_eq!(<Test as Guest>::retry(1, 7, 11, Some(13), vec![5]), Some(1));
        <Test as Guest>::rebuild(1, vec![backend("c:80", 2, true)]);
        assert_eq!(<Test as Guest>::pick(1, 8, 12, None), Some(0));
        <Test as Guest>::rebuild(0, vec![backend("d:80", 1, true), backend("e:80", 1, true)]);
        assert_eq!(<Test as Guest>::retry(0, 9, 0, None, vec![0]), Some(1));

        Test::with_routes(|routes| {
            let recorder = routes.get(1).expect("route 1");
            assert_eq!(recorder.rebuilds, 1);
            assert_eq!(
                recorder.backends.as_slice(),
                [crate::Backend::new("c:80", 2, true)]
            );
            assert_eq!(
                recorder.picks,
                [(7, 11, Some(13), vec![5]), (8, 12, None, vec![])]
            );
            assert_eq!(routes.get(0).expect("route 0").rebuilds, 0);
        });

        <Test as Guest>::forget(1);
        assert_eq!(<Test as Guest>::pick(1, 10, 0, None), None, "forgotten");
        assert_eq!(
            <Test as Guest>::pick(0, 10, 0, None),
            Some(0),
            "others stay"
        );
        <Test as Guest>::rebuild(1, vec![backend("f:80", 1, true)]);
        Test::with_routes(|routes| {
            assert_eq!(routes.get(1).expect("rebuilt").rebuilds, 0, "built afresh");
        });
    }

    #[test]
    fn the_default_rebuild_starts_afresh() {
        struct Fresh(Backends, u32);

        impl Algorithm for Fresh {
            const NAME: &'static str = "fresh";
            type Settings = ();

            fn new(backends: Backends, _settings: &()) -> Self {
                Self(backends, 0)
            }

            fn pick(&mut self, request: &PickRequest, _load: &impl Load) -> Option<u32> {
                self.1 += 1;
                self.0.candidates(request.exclude).nth(0)
            }
        }

        let mut fresh = Fresh::new(Backends::default(), &());
        assert_eq!(
            fresh.pick(&PickRequest::default(), &FixedLoad::default()),
            None
        );
        fresh.rebuild(
            [crate::Backend::new("a:80", 1, true)].into_iter().collect(),
            &(),
        );
        assert_eq!(fresh.1, 0, "state from before the rebuild is gone");
        assert_eq!(
            fresh.pick(&PickRequest::default(), &FixedLoad::default()),
            Some(0)
        );
        assert_eq!(
            Fresh::settings(Settings::parse(" {} ").expect("blank")),
            Ok(())
        );
        assert!(Fresh::settings(Settings::parse(r#"{"x": 1}"#).expect("json")).is_err());
    }
}
