//! The glue between the WIT contract and an [`Algorithm`], written once for every built-in
//! strategy: `describe` and `configure` from the algorithm's constants and settings, a
//! `balancer` resource holding the algorithm, the host's records turned into [`Backends`] and
//! [`PickRequest`], and the `load` import read through [`Load`].
//!
//! A strategy crate exports it with [`strategy!`](crate::strategy); nothing here needs to be
//! named directly.

use std::cell::RefCell;

use crate::bindings::exports::harbor::strategy::strategy::{
    Backend, Description, Guest, GuestBalancer, Outcome, Request,
};
use crate::bindings::harbor::strategy::load;
use crate::{Algorithm, Backends, Load, PickRequest};

/// A strategy crate's component, as [`strategy!`](crate::strategy) declares it: the algorithm it
/// exports and the crate's version, which `describe` reports.
pub trait Component: 'static {
    type Algorithm: Algorithm;
    const VERSION: &'static str;
}

impl<C: Component> Guest for C {
    type Balancer = Balancer<C::Algorithm>;

    fn describe() -> Description {
        Description {
            name: C::Algorithm::NAME.into(),
            version: C::VERSION.into(),
            wants_outcomes: false,
            uses_hash_key: C::Algorithm::USES_HASH_KEY,
        }
    }

    fn configure(config: String) -> Result<(), String> {
        C::Algorithm::configure(&config)
    }
}

/// The `balancer` resource: one route's algorithm. wit-bindgen hands resources `&self`; the
/// instance runs one call at a time, so the `RefCell` never finds it borrowed.
pub struct Balancer<A>(RefCell<A>);

impl<A: Algorithm> GuestBalancer for Balancer<A> {
    fn new(backends: Vec<Backend>) -> Self {
        Self(RefCell::new(A::new(view(backends))))
    }

    fn rebuild(&self, backends: Vec<Backend>) {
        self.0.borrow_mut().rebuild(view(backends));
    }

    fn pick(&self, request: Request) -> Option<u32> {
        self.0.borrow_mut().pick(
            &PickRequest {
                sequence: request.sequence,
                entropy: request.entropy,
                hash_key: request.hash_key,
                exclude: &request.exclude,
            },
            &HostLoad,
        )
    }

    /// Never called: `describe` asks for no outcomes.
    fn done(&self, _index: u32, _outcome: Outcome, _latency_ns: u64) {}
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
struct HostLoad;

impl Load for HostLoad {
    fn in_flight(&self, index: u32) -> u32 {
        load::in_flight(index)
    }

    fn latency_ewma_ns(&self, index: u32) -> u64 {
        load::latency_ewma_ns(index)
    }
}

/// Exports an [`Algorithm`] as the crate's strategy component: `describe` reports the
/// algorithm's [`NAME`](Algorithm::NAME) and [`USES_HASH_KEY`](Algorithm::USES_HASH_KEY) and
/// the crate's version, `configure` calls [`Algorithm::configure`], and each `balancer` holds
/// one instance of the algorithm. Use it once, in the crate's `lib.rs`, with the crate built as
/// a `cdylib`:
///
/// ```
/// use harbor_strategy_common::{Algorithm, Backends, Load, PickRequest};
///
/// /// Always the first candidate.
/// pub struct First(Backends);
///
/// impl Algorithm for First {
///     const NAME: &'static str = "first";
///
///     fn new(backends: Backends) -> Self {
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

    /// Records what the glue hands it; reads no load, so it runs natively.
    struct Recorder {
        backends: Backends,
        rebuilds: u32,
        picks: Vec<(u64, u64, Option<u64>, Vec<u32>)>,
    }

    impl Algorithm for Recorder {
        const NAME: &'static str = "recorder";
        const USES_HASH_KEY: bool = true;

        fn configure(settings: &str) -> Result<(), String> {
            match settings {
                "ok" => Ok(()),
                other => Err(format!("refused {other}")),
            }
        }

        fn new(backends: Backends) -> Self {
            Self {
                backends,
                rebuilds: 0,
                picks: Vec::new(),
            }
        }

        fn rebuild(&mut self, backends: Backends) {
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

    impl Component for Test {
        type Algorithm = Recorder;
        const VERSION: &'static str = "9.8.7";
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
        assert_eq!(<Test as Guest>::configure("ok".into()), Ok(()));
        assert_eq!(
            <Test as Guest>::configure("{}".into()),
            Err("refused {}".into())
        );
    }

    #[test]
    fn the_balancer_passes_backends_and_requests_through() {
        let balancer = <Balancer<Recorder> as GuestBalancer>::new(vec![
            backend("a:80", 3, false),
            backend("b:80", 1, true),
        ]);
        let request = Request {
            sequence: 7,
            entropy: 11,
            hash_key: Some(13),
            exclude: vec![5],
        };
        assert_eq!(balancer.pick(request), Some(1));
        balancer.rebuild(vec![backend("c:80", 2, true)]);
        let request = Request {
            sequence: 8,
            entropy: 12,
            hash_key: None,
            exclude: vec![],
        };
        assert_eq!(balancer.pick(request), Some(0));

        let recorder = balancer.0.borrow();
        assert_eq!(recorder.rebuilds, 1);
        assert_eq!(
            recorder.backends.as_slice(),
            [crate::Backend::new("c:80", 2, true)]
        );
        assert_eq!(
            recorder.picks,
            [(7, 11, Some(13), vec![5]), (8, 12, None, vec![])]
        );
    }

    #[test]
    fn the_default_rebuild_starts_afresh() {
        struct Fresh(Backends, u32);

        impl Algorithm for Fresh {
            const NAME: &'static str = "fresh";

            fn new(backends: Backends) -> Self {
                Self(backends, 0)
            }

            fn pick(&mut self, request: &PickRequest, _load: &impl Load) -> Option<u32> {
                self.1 += 1;
                self.0.candidates(request.exclude).nth(0)
            }
        }

        let mut fresh = Fresh::new(Backends::default());
        assert_eq!(
            fresh.pick(&PickRequest::default(), &FixedLoad::default()),
            None
        );
        fresh.rebuild([crate::Backend::new("a:80", 1, true)].into_iter().collect());
        assert_eq!(fresh.1, 0, "state from before the rebuild is gone");
        assert_eq!(
            fresh.pick(&PickRequest::default(), &FixedLoad::default()),
            Some(0)
        );
        assert_eq!(Fresh::configure(" {} "), Ok(()));
        assert!(Fresh::configure(r#"{"x": 1}"#).is_err());
    }
}
