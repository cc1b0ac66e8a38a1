//! A strategy that behaves during Harbor's admission check and misbehaves on command at run
//! time, chosen by magic hash keys, so tests can show each failure is contained. Built with the
//! `stuck` feature, its `describe` never returns, so the admission check must refuse it.

use std::cell::Cell;

wit_bindgen::generate!({ path: "../../../../wit/strategy", world: "plugin" });

use exports::harbor::strategy::strategy::{
    Backend, Description, Guest, GuestBalancer, Outcome, Request,
};

/// Loop forever.
pub const LOOP: u64 = 0xDEAD_0001;
/// Grow memory without bound.
pub const HOG: u64 = 0xDEAD_0002;
/// Panic (a trap).
pub const PANIC: u64 = 0xDEAD_0003;
/// Answer an index out of range.
pub const BAD_INDEX: u64 = 0xDEAD_0004;

struct Component;

impl Guest for Component {
    type Balancer = Misbehaving;

    fn describe() -> Description {
        if cfg!(feature = "stuck") {
            spin();
        }
        Description {
            name: "misbehaving".into(),
            version: "1".into(),
            wants_outcomes: false,
            uses_hash_key: true,
        }
    }

    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }
}

pub struct Misbehaving {
    count: Cell<u32>,
}

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

impl GuestBalancer for Misbehaving {
    fn new(backends: Vec<Backend>) -> Self {
        Self {
            count: Cell::new(backends.len() as u32),
        }
    }

    fn rebuild(&self, backends: Vec<Backend>) {
        self.count.set(backends.len() as u32);
    }

    fn pick(&self, request: Request) -> Option<u32> {
        match request.hash_key {
            Some(LOOP) => spin(),
            Some(HOG) => {
                // Reserve without touching, so the memory cap, not the clock, stops it.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut chunk = Vec::with_capacity(1 << 20);
                    chunk.push(1u8);
                    hoard.push(chunk);
                    std::hint::black_box(&hoard);
                }
            }
            Some(PANIC) => panic!("asked to panic"),
            Some(BAD_INDEX) => Some(self.count.get() + 7),
            _ => {
                let n = u64::from(self.count.get());
                (0..n)
                    .map(|k| ((request.sequence + k) % n) as u32)
                    .find(|i| !request.exclude.contains(i))
            }
        }
    }

    fn done(&self, _index: u32, _outcome: Outcome, _latency_ns: u64) {}
}

export!(Component);
