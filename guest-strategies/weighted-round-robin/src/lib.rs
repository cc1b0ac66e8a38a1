//! The `weighted-round-robin` strategy as a WebAssembly component. This file is only the glue
//! between the WIT contract and [`smooth`], which holds the algorithm and its tests.

mod smooth;

use std::cell::RefCell;

use exports::harbor::strategy::strategy::{
    Backend, Description, Guest, GuestBalancer, Outcome, Request,
};
use harbor_strategy_common::{Backends, PickRequest, config};

wit_bindgen::generate!({ path: "../../wit/strategy", world: "plugin" });

const NAME: &str = "weighted-round-robin";

struct Strategy;

export!(Strategy);

impl Guest for Strategy {
    type Balancer = Balancer;

    fn describe() -> Description {
        Description {
            name: NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            wants_outcomes: false,
            uses_hash_key: false,
        }
    }

    fn configure(config: String) -> Result<(), String> {
        config::expect_none(NAME, &config)
    }
}

struct Balancer(RefCell<smooth::SmoothWeighted>);

impl GuestBalancer for Balancer {
    fn new(backends: Vec<Backend>) -> Self {
        Self(RefCell::new(smooth::SmoothWeighted::new(view(backends))))
    }

    fn rebuild(&self, backends: Vec<Backend>) {
        self.0.borrow_mut().rebuild(view(backends));
    }

    fn pick(&self, request: Request) -> Option<u32> {
        self.0.borrow_mut().pick(&PickRequest {
            sequence: request.sequence,
            entropy: request.entropy,
            hash_key: request.hash_key,
            exclude: &request.exclude,
        })
    }

    /// Never called: `describe` asks for no outcomes.
    fn done(&self, _index: u32, _outcome: Outcome, _latency_ns: u64) {}
}

fn view(backends: Vec<Backend>) -> Backends {
    backends
        .into_iter()
        .map(|b| harbor_strategy_common::Backend {
            address: b.address,
            weight: b.weight,
            healthy: b.healthy,
        })
        .collect()
}
