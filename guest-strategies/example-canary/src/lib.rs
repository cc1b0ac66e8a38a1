//! An example Harbor load-balancing strategy, written to be copied: a canary split.
//!
//! Backends labelled `track=canary` get a configurable percentage of the picks; the other
//! backends share the rest in turn. The percentage is 5 unless the plugin's settings say
//! otherwise (`{"canary_percent": 10}` in its sidecar file), and each route may set its own
//! (`[strategy_settings]` in a route file, `strategy_settings` in a registration).
//!
//! Everything a strategy needs is in this one file and `wit/strategy/strategy.wit`: copy both,
//! rename `NAME`, change `pick`, build with `cargo build --release --target wasm32-wasip2`.
//! See `guest-strategies/README.md` for the whole walk-through.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

// Generates, from the WIT contract: the record types (`Backend`, `Description`, ...), the `Guest`
// trait this file implements, and the `load` functions the host provides. The path is relative
// to this crate's Cargo.toml.
wit_bindgen::generate!({ path: "../../wit/strategy", world: "plugin" });

use exports::harbor::strategy::strategy::{Backend, Description, Guest, Outcome, PickPlan, Route};

/// The name routes use to select this strategy (`strategy = "example-canary"`).
const NAME: &str = "example-canary";

/// Share of picks for canary backends when `configure` did not set one.
const DEFAULT_CANARY_PERCENT: u64 = 5;

/// The plugin-wide percentage, set by `configure`, for routes whose settings do not give one.
/// (A wasm instance runs one call at a time; the atomic is just the simplest safe global in
/// Rust.)
static CANARY_PERCENT: AtomicU64 = AtomicU64::new(DEFAULT_CANARY_PERCENT);

thread_local! {
    /// One balancer per route, indexed by the host's route numbers (small numbers from 0, reused
    /// after `forget`). An instance runs one call at a time, so the `RefCell` is all the locking
    /// needed; on wasm a thread-local is a plain global.
    static ROUTES: RefCell<Vec<Option<Balancer>>> = const { RefCell::new(Vec::new()) };
}

/// The type the component exports; `export!` wires the WIT exports to its trait impl.
struct Canary;

export!(Canary);

impl Guest for Canary {
    fn describe() -> Description {
        Description {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            // Outcomes would cost the host one more call per request; this strategy ignores them.
            wants_outcomes: false,
            uses_hash_key: false,
        }
    }

    fn configure(config: String) -> Result<(), String> {
        // Refuse bad settings with a reason and keep the old ones: the host shows the reason to
        // whoever tried to apply them.
        let percent = parse_canary_percent(&config)?.unwrap_or(DEFAULT_CANARY_PERCENT);
        CANARY_PERCENT.store(percent, Ordering::Relaxed);
        Ok(())
    }

    /// A route's own settings: called before its first `rebuild` and whenever they change. `{}`
    /// means the plugin-wide percentage.
    fn configure_route(route: Route, settings: String) -> Result<(), String> {
        let percent = parse_canary_percent(&settings)?
            .unwrap_or_else(|| CANARY_PERCENT.load(Ordering::Relaxed));
        ROUTES.with_borrow_mut(|routes| match slot(routes, route) {
            Some(balancer) => balancer.canary_percent = percent,
            empty => *empty = Some(Balancer::with_percent(Vec::new(), percent)),
        });
        Ok(())
    }

    /// Called before a route's first pick and whenever its backends change: the balancer keeps
    /// its percentage and takes the new list. No pick plan: the host calls `pick` every time (a
    /// strategy whose picks are a table or a load rule over its backends may hand the host a
    /// plan instead; see `rebuild` in the WIT).
    fn rebuild(route: Route, backends: Vec<Backend>) -> Option<PickPlan> {
        ROUTES.with_borrow_mut(|routes| match slot(routes, route) {
            Some(balancer) => balancer.rebuild(backends),
            empty => {
                *empty = Some(Balancer::with_percent(
                    backends,
                    CANARY_PERCENT.load(Ordering::Relaxed),
                ))
            }
        });
        None
    }

    fn forget(route: Route) {
        ROUTES.with_borrow_mut(|routes| {
            if let Some(balancer) = routes.get_mut(route as usize) {
                *balancer = None;
            }
        });
    }

    /// A request's first try: nothing is excluded.
    fn pick(route: Route, sequence: u64, entropy: u64, _hash_key: Option<u64>) -> Option<u32> {
        let request = Request {
            sequence,
            entropy,
            exclude: &[],
        };
        ROUTES.with_borrow(|routes| routes.get(route as usize)?.as_ref()?.pick(&request))
    }

    /// A retry: `exclude` lists the backends this request already tried.
    fn retry(
        route: Route,
        sequence: u64,
        entropy: u64,
        _hash_key: Option<u64>,
        exclude: Vec<u32>,
    ) -> Option<u32> {
        let request = Request {
            sequence,
            entropy,
            exclude: &exclude,
        };
        ROUTES.with_borrow(|routes| routes.get(route as usize)?.as_ref()?.pick(&request))
    }

    fn done(_route: Route, _index: u32, _outcome: Outcome, _latency_ns: u64) {
        // Not called: `describe` said `wants_outcomes: false`.
    }
}

/// The place of `route`'s balancer, made if the route is new.
fn slot(routes: &mut Vec<Option<Balancer>>, route: Route) -> &mut Option<Balancer> {
    let i = route as usize;
    if routes.len() <= i {
        routes.resize_with(i + 1, || None);
    }
    &mut routes[i]
}

/// What one pick knows.
struct Request<'a> {
    /// The route's pick counter, shared by the host's threads.
    sequence: u64,
    /// 64 fresh random bits.
    entropy: u64,
    /// Backends a retry already tried; empty on a first try.
    exclude: &'a [u32],
}

/// Reads `{"canary_percent": N}` (N from 0 to 100); `{}` or nothing sets no percentage.
///
/// One number does not justify a JSON library; a strategy with richer settings would add
/// `serde_json` and derive its settings struct instead.
fn parse_canary_percent(config: &str) -> Result<Option<u64>, String> {
    let config = config.trim();
    if config.is_empty() {
        return Ok(None);
    }
    let inner = config
        .strip_prefix('{')
        .and_then(|rest| rest.strip_suffix('}'))
        .ok_or_else(|| {
            format!(
                "settings must be a JSON object such as {{\"canary_percent\": 10}}, got {config}"
            )
        })?
        .trim();
    if inner.is_empty() {
        return Ok(None);
    }
    if inner.contains(',') {
        return Err("the only setting is \"canary_percent\"".into());
    }
    let (key, value) = inner
        .split_once(':')
        .ok_or_else(|| format!("expected \"canary_percent\": N, got {inner}"))?;
    if key.trim() != "\"canary_percent\"" {
        return Err(format!(
            "unknown setting {}; the only setting is \"canary_percent\"",
            key.trim()
        ));
    }
    let value = value.trim();
    match value.parse::<u64>() {
        Ok(percent) if percent <= 100 => Ok(Some(percent)),
        _ => Err(format!(
            "\"canary_percent\" must be a whole number from 0 to 100, got {value}"
        )),
    }
}

/// What the balancer remembers about one backend. The host refers to backends by their position
/// in the list it last gave us, so this list is kept in the same order.
struct Target {
    canary: bool,
    healthy: bool,
}

/// One route's state.
struct Balancer {
    canary_percent: u64,
    targets: Vec<Target>,
}

/// Keeps only what picks need, so that a pick never looks at labels or addresses.
fn targets(backends: Vec<Backend>) -> Vec<Target> {
    backends
        .into_iter()
        .map(|backend| Target {
            canary: backend
                .labels
                .iter()
                .any(|(key, value)| key == "track" && value == "canary"),
            healthy: backend.healthy,
        })
        .collect()
}

impl Balancer {
    fn with_percent(backends: Vec<Backend>, canary_percent: u64) -> Self {
        Self {
            canary_percent,
            targets: targets(backends),
        }
    }

    fn rebuild(&mut self, backends: Vec<Backend>) {
        self.targets = targets(backends);
    }

    fn pick(&self, request: &Request) -> Option<u32> {
        // `entropy` is 64 fresh random bits per pick: the low part decides the group (the
        // modulo bias of `% 100` on 64 bits is far below anything measurable)...
        let to_canary = request.entropy % 100 < self.canary_percent;
        // ...and the wanted group goes first. Healthy backends are tried in both groups before
        // any unhealthy one, so a canary group that is down sends its share to the stable group
        // instead of failing it; only when nothing at all is healthy are unhealthy backends used.
        for healthy_only in [true, false] {
            for canary in [to_canary, !to_canary] {
                if let Some(index) = choose(&self.targets, canary, healthy_only, request) {
                    return Some(index);
                }
            }
        }
        // Empty list, or a retry has excluded every backend: the host handles "no backend".
        None
    }
}

/// A backend of the group `canary` that this request may use, or `None` if there is none.
fn choose(targets: &[Target], canary: bool, healthy_only: bool, request: &Request) -> Option<u32> {
    let usable = || {
        (0u32..)
            .zip(targets)
            .filter(move |(index, target)| {
                target.canary == canary
                    && (target.healthy || !healthy_only)
                    // A retry lists the backends it already tried.
                    && !request.exclude.contains(index)
            })
            .map(|(index, _)| index)
    };
    let count = usable().count() as u64;
    if count == 0 {
        return None;
    }
    // The stable group takes turns by the route's pick counter, which the host shares between
    // threads. Canary picks are a random subset of picks, so the counter would not spread them
    // evenly; the high bits of `entropy` do (the low bits already chose the group).
    let turn = if canary {
        (request.entropy >> 32) % count
    } else {
        request.sequence % count
    };
    usable().nth(usize::try_from(turn).ok()?)
}

// Native unit tests: `cargo test` runs them on your machine; nothing here calls the host.
#[cfg(test)]
mod tests {
    use super::*;

    fn backend(address: &str, canary: bool, healthy: bool) -> Backend {
        let track = if canary { "canary" } else { "stable" };
        Backend {
            address: address.into(),
            weight: 1,
            healthy,
            labels: vec![("track".into(), track.into())],
        }
    }

    /// Fresh-looking random bits for pick `n` (splitmix64), like the host's `entropy`.
    fn entropy(n: u64) -> u64 {
        let mut x = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn request(n: u64, exclude: &[u32]) -> Request<'_> {
        Request {
            sequence: n,
            entropy: entropy(n),
            exclude,
        }
    }

    fn counts(balancer: &Balancer, picks: u64, slots: usize) -> Vec<u64> {
        let mut counts = vec![0; slots];
        for n in 0..picks {
            let index = balancer.pick(&request(n, &[])).expect("a backend");
            counts[index as usize] += 1;
        }
        counts
    }

    #[test]
    fn settings() {
        assert_eq!(parse_canary_percent(""), Ok(None));
        assert_eq!(parse_canary_percent(" {} "), Ok(None));
        assert_eq!(
            parse_canary_percent(r#"{"canary_percent": 10}"#),
            Ok(Some(10))
        );
        assert_eq!(
            parse_canary_percent(r#"{ "canary_percent" : 0 }"#),
            Ok(Some(0))
        );
        assert_eq!(
            parse_canary_percent(r#"{"canary_percent":100}"#),
            Ok(Some(100))
        );
        for bad in [
            r#"{"canary_percent": 101}"#,
            r#"{"canary_percent": -1}"#,
            r#"{"canary_percent": 2.5}"#,
            r#"{"canary_percent": "10"}"#,
            r#"{"canary": 10}"#,
            r#"{"canary_percent": 10, "x": 1}"#,
            "10",
        ] {
            assert!(parse_canary_percent(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn sends_the_configured_share_to_canaries() {
        let backends = vec![
            backend("stable-a:80", false, true),
            backend("canary:80", true, true),
            backend("stable-b:80", false, true),
        ];
        let balancer = Balancer::with_percent(backends, 10);
        let got = counts(&balancer, 100_000, 3);
        assert!((9_500..=10_500).contains(&got[1]), "{got:?}");
        assert!(
            got[0].abs_diff(got[2]) <= 1_000,
            "stable backends share evenly: {got:?}"
        );
    }

    #[test]
    fn zero_and_hundred_percent() {
        let backends = || vec![backend("s:80", false, true), backend("c:80", true, true)];
        assert_eq!(
            counts(&Balancer::with_percent(backends(), 0), 1_000, 2),
            [1_000, 0]
        );
        assert_eq!(
            counts(&Balancer::with_percent(backends(), 100), 1_000, 2),
            [0, 1_000]
        );
    }

    #[test]
    fn a_group_with_nothing_healthy_spills_to_the_other() {
        let backends = vec![backend("s:80", false, true), backend("c:80", true, false)];
        let mut balancer = Balancer::with_percent(backends, 50);
        assert_eq!(counts(&balancer, 1_000, 2), [1_000, 0]);
        // Nothing healthy at all: unhealthy backends beat no backend.
        balancer.rebuild(vec![
            backend("s:80", false, false),
            backend("c:80", true, false),
        ]);
        assert_eq!(counts(&balancer, 1_000, 2).iter().sum::<u64>(), 1_000);
    }

    #[test]
    fn retries_skip_excluded_backends() {
        let balancer = Balancer::with_percent(
            vec![backend("s:80", false, true), backend("c:80", true, true)],
            5,
        );
        for n in 0..100 {
            assert_eq!(balancer.pick(&request(n, &[0])), Some(1));
        }
        assert_eq!(balancer.pick(&request(0, &[0, 1])), None);
    }

    #[test]
    fn no_backends_no_pick() {
        let balancer = Balancer::with_percent(Vec::new(), 5);
        assert_eq!(balancer.pick(&request(0, &[])), None);
    }
}
