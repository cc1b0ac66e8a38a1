//! Two versions of one strategy, told apart by their picks: the default build always picks
//! backend 0, the `second` build always picks backend 1. Tests swap them under load.

wit_bindgen::generate!({ path: "../../../../wit/strategy", world: "plugin" });

use exports::harbor::strategy::strategy::{Backend, Description, Guest, Outcome, PickPlan, Route};

const CHOICE: u32 = if cfg!(feature = "second") { 1 } else { 0 };

struct Component;

impl Guest for Component {
    fn describe() -> Description {
        Description {
            name: "swapper".into(),
            version: if cfg!(feature = "second") { "2" } else { "1" }.into(),
            wants_outcomes: false,
            uses_hash_key: false,
        }
    }

    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn configure_route(_route: Route, _settings: String) -> Result<(), String> {
        Ok(())
    }

    fn rebuild(_route: Route, _backends: Vec<Backend>) -> Option<PickPlan> {
        None
    }

    fn forget(_route: Route) {}

    fn pick(_route: Route, _sequence: u64, _entropy: u64, _hash_key: Option<u64>) -> Option<u32> {
        Some(CHOICE)
    }

    fn retry(
        _route: Route,
        _sequence: u64,
        _entropy: u64,
        _hash_key: Option<u64>,
        exclude: Vec<u32>,
    ) -> Option<u32> {
        // Excluded or not, the admission check needs a usable answer: take the next free one.
        (CHOICE..CHOICE + 8)
            .map(|i| i % 3)
            .find(|i| !exclude.contains(i))
    }

    fn done(_route: Route, _index: u32, _outcome: Outcome, _latency_ns: u64) {}
}

export!(Component);
