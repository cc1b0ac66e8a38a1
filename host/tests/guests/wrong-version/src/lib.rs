//! A well-behaved round-robin built against `harbor:strategy@0.1.0`, a contract version Harbor
//! does not speak: the admission check must refuse it by its exports, whatever it does.

wit_bindgen::generate!({ path: "wit", world: "plugin" });

use exports::harbor::strategy::strategy::{
    Backend, Description, Guest, GuestBalancer, Outcome, Request,
};

struct Component;

impl Guest for Component {
    type Balancer = Rr;

    fn describe() -> Description {
        Description {
            name: "future".into(),
            version: "1".into(),
            wants_outcomes: false,
            uses_hash_key: false,
        }
    }

    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }
}

pub struct Rr(std::cell::Cell<u32>);

impl GuestBalancer for Rr {
    fn new(backends: Vec<Backend>) -> Self {
        Rr(std::cell::Cell::new(backends.len() as u32))
    }

    fn rebuild(&self, backends: Vec<Backend>) {
        self.0.set(backends.len() as u32);
    }

    fn pick(&self, request: Request) -> Option<u32> {
        let n = u64::from(self.0.get());
        (n > 0).then(|| (request.sequence % n) as u32)
    }

    fn done(&self, _index: u32, _outcome: Outcome, _latency_ns: u64) {}
}

export!(Component);
