//! The strategy runtime with real components: each built-in's distribution and behaviour as
//! backends join, leave or go unhealthy; misbehaving guests contained; admission refusals; hot
//! swap under load.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::guests::{component, variant};
use harbor::events::{EventBus, Since};
use harbor::metrics::Metrics;
use harbor::plugins::{BackendSpec, Balancer, PluginEngine, Reporter, Setup, Source, Strategies};

/// CPU time used by the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "no thread CPU clock");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Runtime {
    strategies: Arc<Strategies>,
    bus: Arc<EventBus>,
    metrics: Arc<Metrics>,
}

fn runtime() -> Runtime {
    let bus = Arc::new(EventBus::new(4096));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let reporter = Arc::new(Reporter::new(bus.clone(), metrics.clone()));
    let strategies = Strategies::new(PluginEngine::shared().expect("the engine"), None, reporter)
        .expect("the built-in strategies");
    Runtime {
        strategies,
        bus,
        metrics,
    }
}

/// A runtime with the misbehaving test strategy installed, and a route of three backends using
/// it, ready on this thread.
fn misbehaving() -> (Runtime, Balancer) {
    let rt = runtime();
    rt.strategies
        .install(
            &component("harbor-test-misbehaving", &[]),
            Source::Api,
            None,
            Setup::default(),
        )
        .expect("installed");
    let b = balancer(&rt, "misbehaving", backends(&[1, 1, 1]));
    (rt, b)
}

/// The plugin faults told since event `start`, as `kind: message`.
fn faults_since(rt: &Runtime, start: u64) -> Vec<String> {
    match rt.bus.since(start) {
        Since::Events(v) => v
            .iter()
            .filter_map(|e| match &e.event {
                harbor::events::Event::PluginFault { fault, message, .. } => {
                    Some(format!("{}: {message}", fault.as_str()))
                }
                _ => None,
            })
            .collect(),
        Since::Gap => panic!("the event ring overflowed"),
    }
}

fn backends(weights: &[u32]) -> Vec<BackendSpec> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| BackendSpec {
            address: format!("10.0.0.{}:80", i + 1),
            weight,
            healthy: true,
            labels: Vec::new(),
        })
        .collect()
}

fn balancer(rt: &Runtime, strategy: &str, set: Vec<BackendSpec>) -> Balancer {
    let b = Balancer::new(rt.strategies.slot(strategy).expect("a known strategy"), set);
    let built_in = rt
        .strategies
        .list()
        .iter()
        .any(|p| p.name.as_deref() == Some(strategy) && p.source == "builtin");
    if !built_in {
        ready(&b);
    }
    b
}

/// Waits until the strategy answers picks on this thread: a plugin's instance for a thread, and
/// each route's backends in it, are made off that thread, and its picks fall back until then.
fn ready(b: &Balancer) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.pick(Some(1), &[]).is_some_and(|p| p.fallback) {
        assert!(Instant::now() < deadline, "the strategy never became ready");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Picks `n` times and counts picks per backend address, checking none fell back.
fn spread(b: &Balancer, n: usize, key: impl Fn(usize) -> Option<u64>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for i in 0..n {
        let p = b.pick(key(i), &[]).expect("a pick");
        assert!(!p.fallback, "the strategy did not answer");
        *counts.entry(p.backend().address.clone()).or_insert(0) += 1;
    }
    counts
}

fn event_kinds(bus: &EventBus, since: u64) -> Vec<String> {
    match bus.since(since) {
        Since::Events(v) => v.iter().map(|e| e.event.kind().to_owned()).collect(),
        Since::Gap => panic!("gap"),
    }
}

#[test]
fn round_robin_cycles_exactly_and_skips_unhealthy() {
    let rt = runtime();
    let b = balancer(&rt, "round-robin", backends(&[1, 1, 1]));
    let order: Vec<usize> = (0..9).map(|_| b.pick(None, &[]).unwrap().index).collect();
    assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);

    let mut set = backends(&[1, 1, 1]);
    set[1].healthy = false;
    b.set_backends(set);
    let order: Vec<usize> = (0..6).map(|_| b.pick(None, &[]).unwrap().index).collect();
    assert!(!order.contains(&1), "{order:?}");
    assert_eq!(order.iter().filter(|&&i| i == 0).count(), 3);

    // A backend joins; a retry excludes what was tried.
    b.set_backends(backends(&[1, 1, 1, 1]));
    let seen: std::collections::HashSet<usize> =
        (0..8).map(|_| b.pick(None, &[]).unwrap().index).collect();
    assert_eq!(seen.len(), 4);
    for _ in 0..8 {
        let i = b.pick(None, &[0, 2]).unwrap().index;
        assert!(i == 1 || i == 3, "picked excluded {i}");
    }
}

#[test]
fn weighted_round_robin_honours_weights_within_one_percent() {
    let rt = runtime();
    let b = balancer(&rt, "weighted-round-robin", backends(&[1, 2, 7]));
    let counts = spread(&b, 10_000, |_| None);
    for (addr, weight) in [
        ("10.0.0.1:80", 1.0),
        ("10.0.0.2:80", 2.0),
        ("10.0.0.3:80", 7.0),
    ] {
        let share = counts[addr] as f64 / 10_000.0;
        assert!((share - weight / 10.0).abs() <= 0.01, "{addr}: {share}");
    }
    // Smooth: the heavy backend never takes more than its share in a row.
    let order: Vec<usize> = (0..10).map(|_| b.pick(None, &[]).unwrap().index).collect();
    assert!(
        order.windows(4).all(|w| w.iter().any(|&i| i != 2)),
        "{order:?}"
    );
}

#[test]
fn random_spreads_evenly() {
    let rt = runtime();
    let b = balancer(&rt, "random", backends(&[1, 1, 1, 1]));
    let counts = spread(&b, 40_000, |_| None);
    for (addr, n) in &counts {
        let share = *n as f64 / 40_000.0;
        assert!((share - 0.25).abs() < 0.02, "{addr}: {share}");
    }
    assert_eq!(counts.len(), 4);
}

#[test]
fn least_connections_sends_new_work_to_the_least_loaded() {
    let rt = runtime();
    let b = balancer(&rt, "least-connections", backends(&[1, 1, 1]));
    let set = b.backends();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(set.loads.get(0).unwrap().start());
    }
    for _ in 0..3 {
        held.push(set.loads.get(1).unwrap().start());
    }
    // Backend 2 is idle, so the next three go there; then 1 and 2 share until they reach 0's.
    for _ in 0..3 {
        let p = b.pick(None, &[]).unwrap();
        assert_eq!(p.index, 2);
        held.push(p.start().unwrap());
    }
    for _ in 0..4 {
        let p = b.pick(None, &[]).unwrap();
        assert_ne!(p.index, 0, "picked the most loaded backend");
        held.push(p.start().unwrap());
    }
    let loads: Vec<u32> = (0..3).map(|i| set.loads.in_flight(i)).collect();
    assert_eq!(loads, [5, 5, 5]);
    drop(held);
    assert_eq!(set.loads.in_flight(0), 0);
}

#[test]
fn least_request_prefers_the_less_loaded_of_two_choices() {
    let rt = runtime();
    let b = balancer(&rt, "least-request", backends(&[1, 1, 1, 1]));
    let set = b.backends();
    let _busy: Vec<_> = (0..20).map(|_| set.loads.get(0).unwrap().start()).collect();
    let counts = spread(&b, 4_000, |_| None);
    // Two distinct draws always include an idle backend, so the busy one is never chosen.
    assert!(!counts.contains_key("10.0.0.1:80"), "{counts:?}");
    assert_eq!(counts.len(), 3);
}

#[test]
fn peak_ewma_prefers_the_faster_backend() {
    let rt = runtime();
    let b = balancer(&rt, "peak-ewma", backends(&[1, 1]));
    let set = b.backends();
    set.loads.get(0).unwrap().observe(Duration::from_millis(80));
    set.loads.get(1).unwrap().observe(Duration::from_millis(2));
    let counts = spread(&b, 2_000, |_| None);
    let fast = counts.get("10.0.0.2:80").copied().unwrap_or(0);
    assert!(fast > 1_900, "the faster backend got {fast} of 2000");
}

/// The load strategies hand the host a plan for first tries; the guest's own `pick` still
/// answers retries. Both must choose alike, or a strategy would behave one way on first tries
/// and another on retries: with the pick's random bits fixed (`fastrand::seed`), a first try
/// (the host's plan) and a retry excluding nothing real (the guest) must agree, over many
/// random loads.
#[test]
fn load_plans_choose_what_the_guest_would() {
    let rt = runtime();
    let mut rng = fastrand::Rng::with_seed(7);
    // The counts below make every backend's load per unit of weight distinct, so the least
    // loaded backend is unique and the scan's starting point (the pick's sequence number, one
    // apart between the two picks) does not matter.
    for (strategy, weights) in [
        ("least-connections", vec![1; 7]),
        ("least-connections", vec![1, 3, 2, 1, 5, 1, 2]),
        ("least-request", vec![1, 3, 2, 1, 5, 1, 2]),
        ("peak-ewma", vec![1, 3, 2, 1, 5, 1, 2]),
    ] {
        let equal = weights.iter().all(|&w| w == weights[0]);
        let mut set = backends(&weights);
        set[3].healthy = false;
        let b = balancer(&rt, strategy, set);
        let loads = b.backends().loads.clone();
        for round in 0..300 {
            let mut order: Vec<usize> = (0..weights.len()).collect();
            rng.shuffle(&mut order);
            // Equal weights: the counts 0..n, idle backends included. Unequal: `w × k + 1`,
            // whose loads per weight, `k + 1/w`, differ whenever the `k` do.
            let counts: Vec<usize> = order
                .iter()
                .zip(&weights)
                .map(|(&k, &w)| if equal { k } else { w as usize * k + 1 })
                .collect();
            let _held: Vec<_> = counts
                .iter()
                .enumerate()
                .flat_map(|(i, &n)| (0..n).map(move |_| i))
                .map(|i| loads.get(i).unwrap().start())
                .collect();
            for i in 0..weights.len() {
                loads
                    .get(i)
                    .unwrap()
                    .observe(Duration::from_micros(rng.u64(100..50_000)));
            }
            let seed = rng.u64(..);
            fastrand::seed(seed);
            let planned = b.pick(None, &[]).unwrap();
            fastrand::seed(seed);
            let guest = b.pick(None, &[u32::MAX]).unwrap();
            assert!(!planned.fallback && !guest.fallback);
            assert_eq!(
                planned.index, guest.index,
                "{strategy}, round {round}: in flight {counts:?}"
            );
            assert_ne!(planned.index, 3, "{strategy} picked the unhealthy backend");
        }
    }
}

#[test]
fn consistent_hash_keeps_keys_in_place_when_a_backend_leaves() {
    let rt = runtime();
    let ten = backends(&[1; 10]);
    let b = balancer(&rt, "consistent-hash", ten.clone());
    let keys: Vec<u64> = (0..20_000u64)
        .map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let before: Vec<String> = keys
        .iter()
        .map(|&k| b.pick(Some(k), &[]).unwrap().backend().address.clone())
        .collect();
    // The same key always lands on the same backend.
    assert_eq!(
        b.pick(Some(keys[7]), &[]).unwrap().backend().address,
        before[7]
    );

    let leaving = ten[3].address.clone();
    let nine: Vec<BackendSpec> = ten.into_iter().filter(|x| x.address != leaving).collect();
    b.set_backends(nine);
    let after: Vec<String> = keys
        .iter()
        .map(|&k| b.pick(Some(k), &[]).unwrap().backend().address.clone())
        .collect();
    let kept = before.iter().zip(&after).filter(|(x, y)| x == y).count();
    let on_stayers = before.iter().filter(|a| **a != leaving).count();
    let kept_share = kept as f64 / keys.len() as f64;
    let stayers_kept = kept as f64 / on_stayers as f64;
    eprintln!(
        "consistent-hash: {kept_share:.4} of all keys kept ({stayers_kept:.4} of those not on the leaving backend)"
    );
    // The leaving backend's own tenth must move; of the rest, next to nothing may.
    assert!(stayers_kept >= 0.99, "{stayers_kept}");
    assert!(kept_share >= 0.89, "{kept_share}");
}

#[test]
fn first_fills_the_first_healthy_backend() {
    let rt = runtime();
    let b = balancer(&rt, "first", backends(&[1, 1, 1]));
    assert!((0..10).all(|_| b.pick(None, &[]).unwrap().index == 0));
    let mut set = backends(&[1, 1, 1]);
    set[0].healthy = false;
    b.set_backends(set);
    assert!((0..10).all(|_| b.pick(None, &[]).unwrap().index == 1));
}

#[test]
fn every_builtin_avoids_unhealthy_backends_and_survives_an_empty_set() {
    let rt = runtime();
    for name in rt.strategies.names() {
        let mut set = backends(&[1, 1, 1]);
        set[0].healthy = false;
        let b = balancer(&rt, &name, set);
        for k in 0..200u64 {
            let p = b.pick(Some(k), &[]).unwrap();
            assert!(!p.fallback, "{name} did not answer");
            assert_ne!(p.index, 0, "{name} picked an unhealthy backend");
        }
        // All unhealthy: balance over all rather than fail.
        let mut sick = backends(&[1, 1]);
        sick.iter_mut().for_each(|b| b.healthy = false);
        b.set_backends(sick);
        assert!(b.pick(Some(1), &[]).is_some(), "{name}");
        b.set_backends(Vec::new());
        assert!(b.pick(Some(1), &[]).is_none(), "{name}");
    }
}

#[test]
fn routes_come_and_go_on_one_instance_and_retries_reach_the_guest() {
    let rt = runtime();
    for name in [
        "round-robin",
        "weighted-round-robin",
        "random",
        "least-connections",
        "least-request",
        "consistent-hash",
        "first",
        "peak-ewma",
    ] {
        // Routes made and dropped on this thread: each gets a number in this thread's instance,
        // a dropped one is forgotten and its number reused, and none sees another's backends.
        let keep = balancer(&rt, name, backends(&[1, 1]));
        for round in 0..12usize {
            let size = 3 + round % 4;
            let b = balancer(&rt, name, backends(&vec![1; size]));
            for key in 0..5u64 {
                let first = b.pick(Some(key), &[]).unwrap();
                assert!(!first.fallback && first.index < size, "{name}");
                // A retry carries what was tried, and the guest picks another.
                let tried = [first.index as u32];
                let retry = b.pick(Some(key), &tried).unwrap();
                assert!(!retry.fallback && retry.index < size, "{name}");
                assert_ne!(retry.index, first.index, "{name}");
            }
            let kept = keep.pick(None, &[]).unwrap();
            assert!(!kept.fallback && kept.index < 2, "{name}");
        }
        // Every backend excluded: the strategy answers none, and so does the balancer.
        assert!(keep.pick(None, &[0, 1]).is_none(), "{name}");
    }
}

#[test]
fn misbehaving_guests_are_contained_and_the_pick_falls_back() {
    let rt = runtime();
    let info = rt
        .strategies
        .install(
            &component("harbor-test-misbehaving", &[]),
            Source::Api,
            None,
            Setup::default(),
        )
        .expect("it behaves during the admission check");
    assert_eq!(info.name.as_deref(), Some("misbehaving"));
    let b = balancer(&rt, "misbehaving", backends(&[1, 1, 1]));
    let start = rt.bus.last_id();

    // LOOP, HOG, PANIC, BAD_INDEX: each pick still gets a backend, from the host's fallback.
    for (key, what) in [
        (0xDEAD_0001u64, "loop"),
        (0xDEAD_0002, "memory"),
        (0xDEAD_0003, "panic"),
        (0xDEAD_0004, "bad index"),
    ] {
        let (began, cpu_began) = (Instant::now(), thread_cpu());
        let p = b.pick(Some(key), &[]).expect("the fallback answers");
        let (took, cpu) = (began.elapsed(), thread_cpu() - cpu_began);
        assert!(p.fallback, "{what}: not a fallback pick");
        if what == "loop" {
            // The deadline counts the guest's own running time, so a loop descheduled on a busy
            // machine takes longer by the clock but never burns more than this.
            assert!(
                cpu < Duration::from_millis(50),
                "the loop ran {cpu:?} of CPU ({took:?} by the clock) before interruption"
            );
            eprintln!("loop interrupted after {cpu:?} of CPU, {took:?} by the clock");
        }
        // The instance is made anew, off this thread: ordinary picks are the guest's again.
        ready(&b);
    }
    let kinds = event_kinds(&rt.bus, start);
    assert_eq!(
        kinds.iter().filter(|k| *k == "plugin_fault").count(),
        4,
        "{kinds:?}"
    );
    let faults: Vec<String> = match rt.bus.since(start) {
        Since::Events(v) => v
            .iter()
            .filter_map(|e| match &e.event {
                harbor::events::Event::PluginFault { fault, .. } => Some(fault.as_str().to_owned()),
                _ => None,
            })
            .collect(),
        Since::Gap => panic!("gap"),
    };
    assert_eq!(faults, ["timeout", "memory", "trap", "bad_answer"]);
    // The panic's own words reach its fault, with where it happened.
    let messages = faults_since(&rt, start);
    assert!(
        messages[2].contains("it printed:")
            && messages[2].contains("asked to panic")
            && messages[2].contains("src/lib.rs"),
        "{messages:?}"
    );
    // The memory fault names the limit and how to raise it.
    assert!(messages[1].contains("32 MiB"), "{messages:?}");

    // A fifth fault within the window takes the plugin out of service for a while.
    b.pick(Some(0xDEAD_0003), &[]).unwrap();
    assert!(event_kinds(&rt.bus, start).contains(&"plugin_disabled".to_owned()));
    let listed = rt.strategies.list();
    let entry = listed
        .iter()
        .find(|p| p.name.as_deref() == Some("misbehaving"))
        .unwrap();
    assert_eq!(entry.state, "disabled");
    // While out of service it is not called at all: the host picks.
    assert!(b.pick(Some(0xDEAD_0001), &[]).unwrap().fallback);
}

/// A strategy that answers no backend while healthy ones are left would fail its requests: the
/// answer is a fault, and the request gets the host's pick.
#[test]
fn an_answer_of_no_backend_while_some_are_healthy_is_a_fault_and_the_host_picks() {
    let (rt, b) = misbehaving();
    let start = rt.bus.last_id();
    for _ in 0..3 {
        let p = b
            .pick(Some(0xDEAD_0005), &[])
            .expect("a backend, not a 503");
        assert!(p.fallback);
    }
    let faults = faults_since(&rt, start);
    assert_eq!(faults.len(), 3, "{faults:?}");
    assert!(
        faults[0].starts_with("bad_answer: answered no backend"),
        "{faults:?}"
    );
    // With every backend tried, no backend is the right answer, and no fault.
    assert!(b.pick(Some(1), &[0, 1, 2]).is_none());
    assert_eq!(event_kinds(&rt.bus, start).len(), 3);
}

/// Picks of 5 ms each are within the 20 ms deadline but far over the 1 ms budget: once a hundred
/// have been seen the plugin is out of service, and the host picks.
#[test]
fn a_strategy_whose_picks_are_over_budget_is_taken_out_of_service() {
    let (rt, b) = misbehaving();
    let start = rt.bus.last_id();
    let mut guest_picks = 0;
    while !event_kinds(&rt.bus, start).contains(&"plugin_disabled".to_owned()) {
        let p = b.pick(Some(0xDEAD_0006), &[]).expect("a backend");
        assert!(!p.fallback, "in service until judged");
        guest_picks += 1;
        assert!(
            guest_picks <= 100,
            "not judged after {guest_picks} slow picks"
        );
    }
    // The pick that found the instance ready was the first of the hundred.
    assert_eq!(guest_picks, 99, "judged as soon as there are enough picks");
    let faults = faults_since(&rt, start);
    assert_eq!(faults.len(), 1, "{faults:?}");
    assert!(faults[0].starts_with("slow: "), "{faults:?}");
    // Out of service: the host picks, and the guest is not called.
    let p = b.pick(Some(0xDEAD_0006), &[]).expect("a backend");
    assert!(p.fallback);
    let entry = rt
        .strategies
        .list()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("misbehaving"))
        .expect("listed");
    assert_eq!(entry.state, "disabled");
    let metrics = rt.metrics.render(Default::default());
    assert!(
        metrics.contains("harbor_plugin_pick_seconds_count{plugin=\"misbehaving\"} 100"),
        "{metrics}"
    );
}

/// Upload-and-delete cycles of ever new components leave no compiled code behind in memory,
/// and the precompiled files on disk within their bound.
#[test]
fn removed_plugins_leave_no_compiled_code_behind() {
    let cache = tempfile::tempdir().unwrap();
    let bus = Arc::new(EventBus::new(4096));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let reporter = Arc::new(Reporter::new(bus, metrics));
    let engine = PluginEngine::shared().expect("the engine");
    let strategies = Strategies::new(engine.clone(), Some(cache.path().to_owned()), reporter)
        .expect("the built-in strategies");
    let swapper = component("harbor-test-swapper", &[]);
    for n in 0..20 {
        let bytes = variant(&swapper, n);
        strategies
            .install(&bytes, Source::Api, Some("swapper"), Setup::default())
            .expect("a variant installs");
        assert!(engine.holds(&harbor::plugins::content_hash(&bytes)));
        assert!(strategies.remove("swapper"));
        assert!(
            !engine.holds(&harbor::plugins::content_hash(&bytes)),
            "variant {n}: its compiled code is still cached"
        );
    }
    let on_disk: u64 = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk <= 512 << 20, "{on_disk} bytes on disk");
}

#[test]
fn components_that_cannot_serve_are_refused_with_a_reason() {
    let rt = runtime();
    let refused = |bytes: &[u8]| {
        rt.strategies
            .install(bytes, Source::Api, None, Setup::default())
            .unwrap_err()
            .0
    };

    let garbage = refused(b"definitely not wasm");
    assert!(garbage.contains("not a WebAssembly component"), "{garbage}");

    let wrong = refused(&component("harbor-test-wrong-version", &[]));
    assert!(wrong.contains("harbor:strategy@0.5.0"), "{wrong}");

    let stuck_component = component("harbor-test-misbehaving", &["stuck"]);
    let stuck = refused(&stuck_component);
    assert!(
        stuck.contains("describe") && stuck.contains("deadline"),
        "{stuck}"
    );
    // Again now that it is compiled: what is left is the set-up deadline stopping it.
    let again = refused(&stuck_component);
    assert!(again.contains("deadline"), "{again}");

    // A pick table naming a backend that does not exist.
    let table = refused(&component("harbor-test-misbehaving", &["bad-table"]));
    assert!(table.contains("pick plan names backend 4 of 4"), "{table}");
    // A load rule with a weight the contract does not allow.
    let rule = refused(&component("harbor-test-misbehaving", &["bad-rule"]));
    assert!(rule.contains("gives backend 0 weight 0"), "{rule}");

    // A plain core module is not a component either.
    let core = refused(b"\0asm\x01\0\0\0");
    assert!(core.contains("component"), "{core}");

    // The name in the request must be the one the component describes.
    let canary = component("strategy-example-canary", &[]);
    let named = rt
        .strategies
        .install(&canary, Source::Api, Some("other"), Setup::default())
        .unwrap_err()
        .0;
    assert!(named.contains("example-canary"), "{named}");
    assert!(!rt.strategies.knows("other"));
}

#[test]
fn a_refused_version_leaves_the_old_one_serving() {
    let rt = runtime();
    let v1 = component("harbor-test-swapper", &[]);
    rt.strategies
        .install(&v1, Source::Api, Some("swapper"), Setup::default())
        .unwrap();
    let b = balancer(&rt, "swapper", backends(&[1, 1, 1]));
    assert_eq!(b.pick(None, &[]).unwrap().index, 0);
    assert!(
        rt.strategies
            .install(b"junk", Source::Api, Some("swapper"), Setup::default())
            .is_err()
    );
    assert_eq!(b.pick(None, &[]).unwrap().index, 0);
    let listed = rt.strategies.list();
    let entry = listed
        .iter()
        .find(|p| p.name.as_deref() == Some("swapper"))
        .unwrap();
    assert_eq!(entry.state, "active");
    assert!(
        entry
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("not a WebAssembly component")
    );
}

#[test]
fn hot_swap_under_load_loses_no_pick() {
    let rt = runtime();
    let v1 = component("harbor-test-swapper", &[]);
    let v2 = component("harbor-test-swapper", &["second"]);
    rt.strategies
        .install(&v1, Source::Api, Some("swapper"), Setup::default())
        .unwrap();
    let b = Arc::new(balancer(&rt, "swapper", backends(&[1, 1, 1])));
    let stop = Arc::new(AtomicBool::new(false));
    let latest = Arc::new(AtomicU32::new(0));
    let picks = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));

    let pickers: Vec<_> = (0..2)
        .map(|_| {
            let (b, stop, latest, picks, failures) = (
                b.clone(),
                stop.clone(),
                latest.clone(),
                picks.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                // A new thread's instance is made off it first; from then on, through every
                // swap, the version in force or the one it replaces answers.
                ready(&b);
                while !stop.load(Ordering::Relaxed) {
                    match b.pick(None, &[]) {
                        Some(p) if !p.fallback => latest.store(p.index as u32, Ordering::Relaxed),
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    picks.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut lags = Vec::new();
    for swap in 0..100 {
        let (bytes, want) = if swap % 2 == 0 { (&v2, 1) } else { (&v1, 0) };
        rt.strategies
            .install(bytes, Source::Api, Some("swapper"), Setup::default())
            .unwrap();
        let swapped = Instant::now();
        let before = picks.load(Ordering::Relaxed);
        // The first pick that starts after the swap uses the new version; wait for two more so
        // both threads have moved on.
        while latest.load(Ordering::Relaxed) != want || picks.load(Ordering::Relaxed) < before + 2 {
            assert!(
                swapped.elapsed() < Duration::from_secs(10),
                "swap {swap}: new version not picking within 10 s"
            );
            std::thread::yield_now();
        }
        lags.push(swapped.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for p in pickers {
        p.join().unwrap();
    }
    lags.sort();
    eprintln!(
        "100 swaps under load: {} picks, {} failed; new version picking after p50 {:?}, max {:?}",
        picks.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
        lags[50],
        lags[99]
    );
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert!(picks.load(Ordering::Relaxed) > 200);
}
