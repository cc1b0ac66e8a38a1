//! Per-thread guest instances. Each thread that picks gets its own store and instance of each
//! strategy version, in which every route it picks for has a number, so picks on different
//! threads never wait on each other and no lock is held across a guest call. A pick is one
//! guest call with scalar arguments: no resource handle, no list unless a retry excludes some.
//! A strategy that hands the host a pick plan when it is given the backends (every built-in
//! but consistent hashing) costs no call at all on a first try: the plan answers it here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Weak};

use wasmtime::Store;

use super::balancer::BackendSet;
use super::guest::{GuestState, Plugin};
use super::plan::Plan;
use super::report::FaultKind;
use super::strategy::{CALL_DEADLINE_TICKS, Loaded, SETUP_DEADLINE_TICKS, arm, classify};

struct Shard {
    store: Store<GuestState>,
    plugin: Plugin,
    /// Which strategy version this instance belongs to; dead once that version is replaced.
    owner: Weak<Loaded>,
    /// Route balancer id → the route as this instance knows it.
    routes: IdMap<Route>,
    /// Route numbers given back by `forget`, reused before new ones.
    free: Vec<u32>,
    /// The next route number never used in this instance.
    next: u32,
}

struct Route {
    /// The number the guest knows the route by.
    number: u32,
    /// How the guest said to answer first tries for this backend set, if it did.
    plan: Option<Plan>,
    /// The backend-set version the guest last saw.
    version: u64,
    /// Dead once the route's balancer is dropped.
    alive: Weak<()>,
}

/// Maps keyed by ids Harbor hands out itself (generations, balancer ids): unique, never chosen
/// by a client, so a multiply is hash enough, and SipHash would cost the pick path three times.
pub(super) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

thread_local! {
    static SHARDS: RefCell<IdMap<Shard>> = RefCell::new(IdMap::default());
}

/// A failed guest call. The instance it happened in has been discarded.
#[derive(Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub message: String,
}

fn fault(e: wasmtime::Error) -> Fault {
    let (kind, message) = classify(&e);
    Fault { kind, message }
}

/// What the host knows about one pick.
pub struct Ask<'a> {
    pub sequence: u64,
    pub entropy: u64,
    pub hash_key: Option<u64>,
    /// Indexes a retry already tried; empty on a first try.
    pub exclude: &'a [u32],
}

/// Asks the strategy for a backend of `set` on behalf of route balancer `id`. A fault comes
/// boxed: unboxed, the result's odd layout was copied through the stack with overlapping
/// unaligned moves on every pick, which cost a table pick a fifth of its time.
pub fn pick(
    loaded: &Arc<Loaded>,
    id: u64,
    alive: &Arc<()>,
    set: &BackendSet,
    ask: &Ask<'_>,
) -> Result<Option<u32>, Box<Fault>> {
    SHARDS.with(|cell| {
        let Ok(mut shards) = cell.try_borrow_mut() else {
            return Err(Box::new(Fault {
                kind: FaultKind::Trap,
                message: "re-entered the strategy runtime".into(),
            }));
        };
        let shard = match shards.get_mut(&loaded.generation) {
            Some(shard) => shard,
            None => {
                sweep(&mut shards);
                shards
                    .entry(loaded.generation)
                    .or_insert(Shard::new(loaded)?)
            }
        };
        let result = shard.pick(loaded, id, alive, set, ask);
        if result.is_err() {
            // A trap leaves the instance unusable; the next pick on this thread starts afresh.
            shards.remove(&loaded.generation);
        }
        result
    })
}

/// Drops this thread's instances of strategy versions that have been replaced.
fn sweep(shards: &mut IdMap<Shard>) {
    shards.retain(|_, s| s.owner.strong_count() > 0);
}

impl Shard {
    fn new(loaded: &Arc<Loaded>) -> Result<Self, Fault> {
        let mut store = super::strategy::new_store(&loaded.engine);
        arm(&mut store, SETUP_DEADLINE_TICKS);
        let plugin = loaded.pre.instantiate(&mut store).map_err(fault)?;
        arm(&mut store, SETUP_DEADLINE_TICKS);
        plugin
            .harbor_strategy_strategy()
            .call_configure(&mut store, &loaded.config)
            .map_err(fault)?
            .map_err(|reason| Fault {
                kind: FaultKind::Trap,
                message: format!("configure refused: {reason}"),
            })?;
        Ok(Self {
            store,
            plugin,
            owner: Arc::downgrade(loaded),
            routes: IdMap::default(),
            free: Vec::new(),
            next: 0,
        })
    }

    fn pick(
        &mut self,
        loaded: &Loaded,
        id: u64,
        alive: &Arc<()>,
        set: &BackendSet,
        ask: &Ask<'_>,
    ) -> Result<Option<u32>, Box<Fault>> {
        // Point the load import at this route's counters (an Arc swap only when the route or
        // its backend set changed since the last pick on this thread).
        let data = self.store.data_mut();
        if !data
            .loads
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(l, &set.loads))
        {
            data.loads = Some(set.loads.clone());
        }
        let route = match self.routes.get(&id) {
            Some(r) if r.version == set.version => r,
            _ => {
                self.rebuild(id, alive, set)?;
                self.routes.get(&id).ok_or_else(|| Fault {
                    kind: FaultKind::Trap,
                    message: "a rebuilt route went missing".into(),
                })?
            }
        };
        if ask.exclude.is_empty()
            && let Some(answer) = route.plan.as_ref().and_then(|p| p.answer(ask))
        {
            return Ok(answer);
        }
        let route = route.number;
        let api = self.plugin.harbor_strategy_strategy();
        arm(&mut self.store, CALL_DEADLINE_TICKS);
        // Only picks that call the guest are timed: a plan's answer costs no clock read.
        let began = std::time::Instant::now();
        let answer = if ask.exclude.is_empty() {
            api.call_pick(
                &mut self.store,
                route,
                ask.sequence,
                ask.entropy,
                ask.hash_key,
            )
        } else {
            api.call_retry(
                &mut self.store,
                route,
                ask.sequence,
                ask.entropy,
                ask.hash_key,
                ask.exclude,
            )
        }
        .map_err(|e| Box::new(fault(e)));
        if answer.is_ok() {
            loaded.timed_pick(began.elapsed());
        }
        answer
    }

    /// Gives the guest the route's current backends, numbering the route first if this
    /// instance has not seen it (and forgetting routes whose balancers are gone).
    fn rebuild(&mut self, id: u64, alive: &Arc<()>, set: &BackendSet) -> Result<u32, Fault> {
        let api = self.plugin.harbor_strategy_strategy();
        let number = match self.routes.get(&id) {
            Some(r) => r.number,
            None => {
                let dead: Vec<u64> = self
                    .routes
                    .iter()
                    .filter(|(_, r)| r.alive.strong_count() == 0)
                    .map(|(&id, _)| id)
                    .collect();
                for dead_id in dead {
                    if let Some(r) = self.routes.remove(&dead_id) {
                        arm(&mut self.store, SETUP_DEADLINE_TICKS);
                        api.call_forget(&mut self.store, r.number).map_err(fault)?;
                        self.free.push(r.number);
                    }
                }
                match self.free.pop() {
                    Some(number) => number,
                    None => {
                        let number = self.next;
                        self.next += 1;
                        number
                    }
                }
            }
        };
        arm(&mut self.store, SETUP_DEADLINE_TICKS);
        let plan = api
            .call_rebuild(&mut self.store, number, set.guest_backends())
            .map_err(fault)?
            .map(|p| Plan::check(p, &set.loads))
            .transpose()?;
        self.routes.insert(
            id,
            Route {
                number,
                plan,
                version: set.version,
                alive: Arc::downgrade(alive),
            },
        );
        Ok(number)
    }
}

/// Reports an outcome to the strategy on this thread, if it has built the route.
pub fn done(
    loaded: &Arc<Loaded>,
    id: u64,
    index: u32,
    outcome: super::guest::Outcome,
    latency_ns: u64,
) {
    SHARDS.with(|cell| {
        let Ok(mut shards) = cell.try_borrow_mut() else {
            return;
        };
        let Some(shard) = shards.get_mut(&loaded.generation) else {
            return;
        };
        let Some(route) = shard.routes.get(&id).map(|r| r.number) else {
            return;
        };
        let api = shard.plugin.harbor_strategy_strategy();
        arm(&mut shard.store, CALL_DEADLINE_TICKS);
        if let Err(e) = api.call_done(&mut shard.store, route, index, outcome, latency_ns) {
            let (kind, message) = classify(&e);
            loaded.fault(kind, &message);
            shards.remove(&loaded.generation);
        }
    });
}
