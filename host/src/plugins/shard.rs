//! Per-thread guest instances. Each thread that picks gets its own store and instance of each
//! strategy version, in which every route it picks for has a number, so picks on different
//! threads never wait on each other and no lock is held across a guest call. A pick is one
//! guest call with scalar arguments: no resource handle, no list unless a retry excludes some.
//! A strategy that hands the host a pick plan when it is given the backends (every built-in
//! but consistent hashing) costs no call at all on a first try: the plan answers it here.
//!
//! Only bounded picks run on a picking thread for a plugin. Making an instance (`instantiate`,
//! `configure`) and giving it a route's backends (`rebuild`) may take a guest its whole second
//! of setup time, so for plugins they run on a thread of their own ([`prepare`]): a thread
//! that needs an instance, or a route built afresh, asks for a new instance with every route it
//! serves built, picks with the host's round-robin until it is ready, and then takes it in
//! place of the old one. Built-in strategies, Harbor's own code, are set up where they pick.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Weak};

use wasmtime::Store;

use super::balancer::BackendSet;
use super::guest::{GuestState, Plugin};
use super::plan::Plan;
use super::report::FaultKind;
use super::strategy::{Loaded, SETUP_DEADLINE_TICKS, Source, arm, failure};

struct Shard {
    store: Store<GuestState>,
    plugin: Plugin,
    /// Harbor's own code, whose setup may run where it picks.
    built_in: bool,
    /// Which strategy version this instance belongs to; dead once that version is replaced.
    owner: Weak<Loaded>,
    /// The strategy's name, which the version replacing it shares.
    name: crate::model::StrategyName,
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
    /// The backend set the guest last saw, to build the route again in a new instance.
    set: Arc<BackendSet>,
    /// The route's settings as the guest last accepted them.
    settings: Arc<str>,
    /// Dead once the route's balancer is dropped.
    alive: Weak<()>,
}

/// A strategy version's place on one picking thread.
#[derive(Default)]
struct Slot {
    /// The strategy's name, which its successors share.
    name: Option<crate::model::StrategyName>,
    shard: Option<Shard>,
    /// An instance being made off this thread, once asked for.
    preparing: Option<Arc<Preparing>>,
}

/// An instance made on the setup thread, waiting for its picking thread to take it.
#[derive(Default)]
struct Preparing {
    done: std::sync::Mutex<Option<Result<Shard, Fault>>>,
}

/// What the strategy answered, or that it cannot yet: the host picks meanwhile.
pub enum Answer {
    Chose(Option<u32>),
    Preparing,
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
    static SHARDS: RefCell<IdMap<Slot>> = RefCell::new(IdMap::default());
    /// The value of [`RELEASES`] when this thread last looked for versions let go of.
    static RELEASES_SEEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts strategy versions let go of (removed, or replaced and no longer used anywhere). A
/// replaced version's instances go once its successor has one on the thread (see [`sweep`]),
/// but a removed one has no successor, and a thread that never picks for its successor never
/// sweeps: so each picking thread looks again at its next pick after any version is let go,
/// and drops the instances of versions that have neither force nor a successor here, with
/// their memory and their hold on the compiled code.
static RELEASES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Tells every picking thread that a strategy version is gone (its last holder dropped it).
pub fn released() {
    RELEASES.fetch_add(1, std::sync::atomic::Ordering::Release);
}

/// Lets go of this thread's instances of versions that are gone, for a pick that asks no
/// strategy (its route's plugin was removed): the one place such a thread may still pass.
pub fn tidy() {
    SHARDS.with(|cell| {
        if let Ok(mut shards) = cell.try_borrow_mut() {
            drop_released(&mut shards, None);
        }
    });
}

/// Drops this thread's instances of versions no longer in force and not standing in for a
/// successor (one of theirs here, or `picking`, the strategy this thread is about to ask), once
/// per release: the check on every pick is one load.
fn drop_released(shards: &mut IdMap<Slot>, picking: Option<&crate::model::StrategyName>) {
    let releases = RELEASES.load(std::sync::atomic::Ordering::Acquire);
    if RELEASES_SEEN.get() == releases {
        return;
    }
    RELEASES_SEEN.set(releases);
    let wanted: std::collections::HashSet<crate::model::StrategyName> = shards
        .values()
        .filter(|slot| slot.owner_in_force() != Some(false))
        .filter_map(|slot| slot.name.clone())
        .chain(picking.cloned())
        .collect();
    shards.retain(|_, slot| {
        slot.owner_in_force() != Some(false)
            || slot.name.as_ref().is_some_and(|n| wanted.contains(n))
    });
}

/// A failed guest call. The instance it happened in has been discarded.
#[derive(Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub message: String,
}

fn fault(store: &Store<GuestState>, e: wasmtime::Error) -> Fault {
    let (kind, message) = failure(store, &e);
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
/// unaligned moves on every pick (see host/benches/README.md, Strategy pick cost).
pub fn pick(
    loaded: &Arc<Loaded>,
    id: u64,
    alive: &Arc<()>,
    set: &Arc<BackendSet>,
    ask: &Ask<'_>,
) -> Result<Answer, Box<Fault>> {
    SHARDS.with(|cell| {
        let Ok(mut shards) = cell.try_borrow_mut() else {
            return Err(Box::new(Fault {
                kind: FaultKind::Trap,
                message: "re-entered the strategy runtime".into(),
            }));
        };
        drop_released(&mut shards, Some(&loaded.name));
        let built_in = matches!(loaded.source, Source::Builtin);
        // The common case first, with one lookup: this thread's instance can answer.
        if let Some(slot) = shards.get_mut(&loaded.generation)
            && let Some(shard) = slot.shard.as_mut()
            && (built_in || shard.knows(id, set.version))
        {
            let result = shard.pick(loaded, id, alive, set, ask);
            if result.is_err() {
                // A trap leaves the instance unusable; this thread gets a new one.
                slot.shard = None;
            }
            return result.map(Answer::Chose);
        }
        if !shards.contains_key(&loaded.generation) {
            sweep(&mut shards);
        }
        let slot = shards.entry(loaded.generation).or_insert_with(|| Slot {
            name: Some(loaded.name.clone()),
            ..Slot::default()
        });
        if built_in {
            // Harbor's own code is set up where it picks.
            let shard = match &mut slot.shard {
                Some(shard) => shard,
                None => slot.shard.insert(Shard::new(loaded)?),
            };
            let result = shard.pick(loaded, id, alive, set, ask);
            if result.is_err() {
                slot.shard = None;
            }
            return result.map(Answer::Chose);
        }
        slot.prepare(loaded, id, alive, set)?;
        if !slot.ready(id, set.version) {
            // Meanwhile the version this one replaced answers, where this thread still has it
            // and it knows the route as it is.
            let Some(old) = previous(&mut shards, loaded, id, set.version) else {
                return Ok(Answer::Preparing);
            };
            let Some(shard) = old.shard.as_mut() else {
                return Ok(Answer::Preparing);
            };
            let result = shard.pick(loaded, id, alive, set, ask);
            if result.is_err() {
                old.shard = None;
            }
            return result.map(Answer::Chose);
        }
        // A prepared instance was just taken: the ones it replaces may go.
        sweep(&mut shards);
        let Some(shard) = shards
            .get_mut(&loaded.generation)
            .and_then(|slot| slot.shard.as_mut())
        else {
            return Ok(Answer::Preparing);
        };
        shard.pick(loaded, id, alive, set, ask).map(Answer::Chose)
    })
}

impl Slot {
    /// Whether the version this slot's instance belongs to is in force; `None` while its first
    /// instance is still being made.
    fn owner_in_force(&self) -> Option<bool> {
        if let Some(shard) = &self.shard {
            return Some(shard.owner.strong_count() > 0);
        }
        let preparing = self.preparing.as_ref()?;
        let done = crate::events::lock(&preparing.done);
        match done.as_ref()? {
            Ok(shard) => Some(shard.owner.strong_count() > 0),
            Err(_) => Some(false),
        }
    }

    /// Whether this thread's instance has built route `id` for backend set `version`.
    fn ready(&self, id: u64, version: u64) -> bool {
        self.shard.as_ref().is_some_and(|s| s.knows(id, version))
    }

    /// Takes a prepared instance if one is done; otherwise asks for one (if none is on its way)
    /// with every route this thread serves built, and route `id` with `set`. A preparation that
    /// failed is this pick's fault.
    fn prepare(
        &mut self,
        loaded: &Arc<Loaded>,
        id: u64,
        alive: &Arc<()>,
        set: &Arc<BackendSet>,
    ) -> Result<(), Box<Fault>> {
        if let Some(preparing) = &self.preparing {
            let done = crate::events::lock(&preparing.done).take();
            match done {
                None => return Ok(()),
                Some(Ok(shard)) => {
                    self.preparing = None;
                    self.shard = Some(shard);
                    if self.ready(id, set.version) {
                        return Ok(());
                    }
                }
                Some(Err(fault)) => {
                    self.preparing = None;
                    loaded.setup_fault(fault.kind, &fault.message);
                    return Ok(());
                }
            }
        }
        let mut wanted: Vec<(u64, Weak<()>, Arc<BackendSet>)> = self
            .shard
            .iter()
            .flat_map(|s| s.routes.iter())
            .filter(|(rid, r)| **rid != id && r.alive.strong_count() > 0)
            .map(|(&rid, r)| (rid, r.alive.clone(), r.set.clone()))
            .collect();
        wanted.push((id, Arc::downgrade(alive), set.clone()));
        let preparing = Arc::new(Preparing::default());
        self.preparing = Some(preparing.clone());
        let loaded = loaded.clone();
        prepare(Box::new(move || {
            let made = Shard::new(&loaded)
                .and_then(|mut shard| {
                    for (rid, alive, set) in &wanted {
                        if alive.strong_count() > 0 {
                            shard.rebuild(*rid, alive, set)?;
                        }
                    }
                    Ok(shard)
                })
                .map_err(|mut fault| {
                    // Where it ran, for people and for the tests that check no picking thread
                    // ever waits on setup.
                    let here = std::thread::current();
                    fault.message = format!(
                        "{} (while an instance was made on thread {})",
                        fault.message,
                        here.name().unwrap_or("unnamed")
                    );
                    fault
                });
            *crate::events::lock(&preparing.done) = Some(made);
        }));
        Ok(())
    }
}

/// Plugin setups (an instance made, a route built) by the kind of thread they ran on.
static SETUP_THREADS: std::sync::Mutex<std::collections::BTreeMap<String, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Counts a plugin setup on this thread, by its name without a trailing number: the record that
/// shows no picking thread (`harbor-lane-N`) ever made one. Setups are rare: a lock is cheap.
fn setup_here() {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let kind = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let kind = kind.strip_suffix('-').unwrap_or(kind);
    *crate::events::lock(&SETUP_THREADS)
        .entry(kind.to_owned())
        .or_default() += 1;
}

/// How many plugin setups (instantiate and configure, or a route's configure-route, forget and
/// rebuild) ran on each kind of thread in this process.
pub fn setup_threads() -> std::collections::BTreeMap<String, u64> {
    crate::events::lock(&SETUP_THREADS).clone()
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs `job` on the setup thread, started on first use. One thread: a guest that loops in
/// setup holds up other preparations for its second, never a pick.
fn prepare(job: Job) {
    static SETUP: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let sender = SETUP.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("harbor-strategy-setup".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the strategy setup thread; plugins pick with the host's round-robin");
        }
        std::sync::Mutex::new(tx)
    });
    let _ = crate::events::lock(sender).send(job);
}

/// The slot of this thread's instance of an earlier version of `loaded`'s strategy that has
/// built route `id` for backend set `version`.
fn previous<'a>(
    shards: &'a mut IdMap<Slot>,
    loaded: &Loaded,
    id: u64,
    version: u64,
) -> Option<&'a mut Slot> {
    shards
        .iter_mut()
        .filter(|(generation, _)| **generation != loaded.generation)
        .map(|(_, slot)| slot)
        .find(|slot| {
            slot.shard.as_ref().is_some_and(|shard| {
                shard.name == loaded.name
                    && shard.routes.get(&id).is_some_and(|r| r.version == version)
            })
        })
}

/// Drops this thread's instances of strategy versions that have been replaced, once the
/// version that replaced them has an instance here (until then they answer for it).
fn sweep(shards: &mut IdMap<Slot>) {
    // Whether each version is in force is read once: another thread may let go of one while
    // this sweeps, and its instance must not be dropped for a version that has none here.
    let in_force: IdMap<bool> = shards
        .iter()
        .map(|(&generation, s)| {
            let alive = s
                .shard
                .as_ref()
                .is_some_and(|sh| sh.owner.strong_count() > 0);
            (generation, alive)
        })
        .collect();
    let live: std::collections::HashSet<crate::model::StrategyName> = shards
        .iter()
        .filter(|(generation, _)| in_force.get(*generation).copied().unwrap_or(false))
        .filter_map(|(_, s)| s.shard.as_ref().map(|sh| sh.name.clone()))
        .collect();
    shards.retain(|generation, s| match &s.shard {
        Some(_) if in_force.get(generation).copied().unwrap_or(false) => true,
        Some(shard) => !live.contains(&shard.name),
        None => s.preparing.is_some(),
    });
}

impl Shard {
    /// Whether this instance has built route `id` for backend set `version`.
    fn knows(&self, id: u64, version: u64) -> bool {
        self.routes.get(&id).is_some_and(|r| r.version == version)
    }

    fn new(loaded: &Arc<Loaded>) -> Result<Self, Fault> {
        let built_in = matches!(loaded.source, Source::Builtin);
        if !built_in {
            setup_here();
        }
        let mut store = super::strategy::new_store(&loaded.engine, &loaded.limits);
        arm(&mut store, SETUP_DEADLINE_TICKS);
        let plugin = loaded
            .pre
            .instantiate(&mut store)
            .map_err(|e| fault(&store, e))?;
        arm(&mut store, SETUP_DEADLINE_TICKS);
        plugin
            .harbor_strategy_strategy()
            .call_configure(&mut store, loaded.settings.text())
            .map_err(|e| fault(&store, e))?
            .map_err(|reason| Fault {
                kind: FaultKind::Trap,
                message: format!("configure refused: {reason}"),
            })?;
        Ok(Self {
            store,
            plugin,
            built_in,
            owner: Arc::downgrade(loaded),
            name: loaded.name.clone(),
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
        set: &Arc<BackendSet>,
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
                self.rebuild(id, &Arc::downgrade(alive), set)?;
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
        self.call_pick(loaded, route, ask)
    }

    /// A pick the guest answers itself, timed for its pick budget. Kept out of [`Shard::pick`]
    /// so that the plan's answers, most picks, run through a small function.
    #[inline(never)]
    fn call_pick(
        &mut self,
        loaded: &Loaded,
        route: u32,
        ask: &Ask<'_>,
    ) -> Result<Option<u32>, Box<Fault>> {
        let api = self.plugin.harbor_strategy_strategy();
        arm(&mut self.store, loaded.pick_ticks);
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
        .map_err(|e| Box::new(fault(&self.store, e)));
        if answer.is_ok() {
            loaded.timed_pick(began.elapsed());
        }
        answer
    }

    /// Gives the guest the route's current backends, numbering the route first if this
    /// instance has not seen it (and forgetting routes whose balancers are gone).
    fn rebuild(&mut self, id: u64, alive: &Weak<()>, set: &Arc<BackendSet>) -> Result<u32, Fault> {
        if !self.built_in {
            setup_here();
        }
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
                        api.call_forget(&mut self.store, r.number)
                            .map_err(|e| fault(&self.store, e))?;
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
        let settled = self
            .routes
            .get(&id)
            .is_some_and(|r| r.settings == set.settings);
        if !settled {
            arm(&mut self.store, SETUP_DEADLINE_TICKS);
            api.call_configure_route(&mut self.store, number, &set.settings)
                .map_err(|e| fault(&self.store, e))?
                .map_err(|reason| Fault {
                    kind: FaultKind::BadAnswer,
                    message: format!("refused the route's settings {}: {reason}", set.settings),
                })?;
        }
        arm(&mut self.store, SETUP_DEADLINE_TICKS);
        let plan = api
            .call_rebuild(&mut self.store, number, set.guest_backends())
            .map_err(|e| fault(&self.store, e))?
            .map(|p| Plan::check(p, &set.loads))
            .transpose()?;
        self.routes.insert(
            id,
            Route {
                number,
                plan,
                version: set.version,
                set: set.clone(),
                settings: set.settings.clone(),
                alive: alive.clone(),
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
        let Some(shard) = shards
            .get_mut(&loaded.generation)
            .and_then(|slot| slot.shard.as_mut())
        else {
            return;
        };
        let Some(route) = shard.routes.get(&id).map(|r| r.number) else {
            return;
        };
        let api = shard.plugin.harbor_strategy_strategy();
        arm(&mut shard.store, loaded.pick_ticks);
        if let Err(e) = api.call_done(&mut shard.store, route, index, outcome, latency_ns) {
            let (kind, message) = failure(&shard.store, &e);
            loaded.fault(kind, &message);
            if let Some(slot) = shards.get_mut(&loaded.generation) {
                slot.shard = None;
            }
        }
    });
}
