//! A strategy that behaves during Harbor's admission check and misbehaves on command at run
//! time, chosen by magic hash keys (and, for `rebuild`, a backend on a magic port), so tests can show each failure is contained. Built with the
//! `stuck` feature, its `describe` never returns; with `bad-table`, its pick table names a
//! backend that does not exist; with `bad-rule`, its load rule gives a backend weight 0: the
//! admission check must refuse all three.

use std::cell::RefCell;

wit_bindgen::generate!({ path: "../../../../wit/strategy", world: "plugin" });

use exports::harbor::strategy::strategy::{Backend, Description, Guest, Outcome, PickPlan, Route};
use harbor::strategy::types::{LoadMeasure, LoadRule, PickTable, TableIndex, WeightedCandidate};

/// Loop forever.
pub const LOOP: u64 = 0xDEAD_0001;
/// Grow memory without bound.
pub const HOG: u64 = 0xDEAD_0002;
/// Panic (a trap).
pub const PANIC: u64 = 0xDEAD_0003;
/// Answer an index out of range.
pub const BAD_INDEX: u64 = 0xDEAD_0004;
/// Answer no backend at all, while there are some.
pub const NONE: u64 = 0xDEAD_0005;
/// Answer well, after 5 ms of work: within the pick deadline, far over the pick budget.
pub const SLOW: u64 = 0xDEAD_0006;
/// A backend on this port makes `rebuild` loop forever.
pub const STUCK_REBUILD_PORT: &str = ":6666";
/// A backend labelled `misbehave=MODE` makes every pick of its route misbehave as the magic key
/// of that name would (`loop`, `hog`, `panic`, `bad-index`, `none`, `slow`), or its `rebuild`
/// loop (`rebuild`): how traffic through a proxy, whose hash keys no client chooses, asks.
const MODE_LABEL: &str = "misbehave";

thread_local! {
    /// Backend count per route.
    static COUNTS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// The magic key each route's labels ask every pick to behave as, if any.
    static MODES: RefCell<Vec<Option<u64>>> = const { RefCell::new(Vec::new()) };
}

fn mode(route: Route) -> Option<u64> {
    MODES.with_borrow(|m| m.get(route as usize).copied().flatten())
}

fn labelled_mode(backends: &[Backend]) -> Option<&str> {
    backends
        .iter()
        .flat_map(|b| b.labels.iter())
        .find(|(k, _)| k == MODE_LABEL)
        .map(|(_, v)| v.as_str())
}

fn count(route: Route) -> u32 {
    COUNTS.with_borrow(|c| c.get(route as usize).copied().unwrap_or(0))
}

struct Component;

impl Guest for Component {
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

    fn configure_route(_route: Route, _settings: String) -> Result<(), String> {
        Ok(())
    }

    fn rebuild(route: Route, backends: Vec<Backend>) -> Option<PickPlan> {
        let labelled = labelled_mode(&backends);
        if labelled == Some("rebuild")
            || backends
                .iter()
                .any(|b| b.address.ends_with(STUCK_REBUILD_PORT))
        {
            spin();
        }
        let key = match labelled {
            Some("loop") => Some(LOOP),
            Some("hog") => Some(HOG),
            Some("panic") => Some(PANIC),
            Some("bad-index") => Some(BAD_INDEX),
            Some("none") => Some(NONE),
            Some("slow") => Some(SLOW),
            _ => None,
        };
        let i = route as usize;
        COUNTS.with_borrow_mut(|c| {
            if c.len() <= i {
                c.resize(i + 1, 0);
            }
            c[i] = backends.len() as u32;
        });
        MODES.with_borrow_mut(|m| {
            if m.len() <= i {
                m.resize(i + 1, None);
            }
            m[i] = key;
        });
        if cfg!(feature = "bad-rule") {
            return Some(PickPlan::LeastLoaded(LoadRule {
                measure: LoadMeasure::InFlight,
                candidates: vec![WeightedCandidate {
                    index: 0,
                    weight: 0,
                }],
            }));
        }
        cfg!(feature = "bad-table").then(|| {
            PickPlan::Table(PickTable {
                index: TableIndex::Sequence,
                entries: vec![0, backends.len() as u32],
            })
        })
    }

    fn forget(route: Route) {
        COUNTS.with_borrow_mut(|c| {
            if let Some(n) = c.get_mut(route as usize) {
                *n = 0;
            }
        });
    }

    fn pick(route: Route, sequence: u64, _entropy: u64, hash_key: Option<u64>) -> Option<u32> {
        choose(route, sequence, hash_key, &[])
    }

    fn retry(
        route: Route,
        sequence: u64,
        _entropy: u64,
        hash_key: Option<u64>,
        exclude: Vec<u32>,
    ) -> Option<u32> {
        choose(route, sequence, hash_key, &exclude)
    }

    fn done(_route: Route, _index: u32, _outcome: Outcome, _latency_ns: u64) {}
}

fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn choose(route: Route, sequence: u64, hash_key: Option<u64>, exclude: &[u32]) -> Option<u32> {
    match mode(route).or(hash_key) {
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
        Some(BAD_INDEX) => Some(count(route) + 7),
        Some(NONE) => None,
        Some(SLOW) => {
            let began = std::time::Instant::now();
            while began.elapsed() < std::time::Duration::from_millis(5) {
                std::hint::black_box(());
            }
            let n = count(route);
            (n > 0).then(|| (sequence % u64::from(n)) as u32)
        }
        _ => {
            let n = u64::from(count(route));
            (0..n)
                .map(|k| ((sequence + k) % n) as u32)
                .find(|i| !exclude.contains(i))
        }
    }
}

export!(Component);
