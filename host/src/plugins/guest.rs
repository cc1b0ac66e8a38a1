//! The strategy world's bindings (generated once, here, from `wit/strategy`), the state each
//! guest store carries, and the linker that gives a strategy its only capabilities: the `load`
//! import, random numbers, clocks, an empty environment and output to a bounded buffer (see
//! `stdio`). Every other import traps.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::StoreContextMut;
use wasmtime::component::{Component, ComponentType, Linker, Lower};
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};

use super::limits::Limits;
use super::load::LoadTable;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/strategy",
        world: "plugin",
    });
}

pub use bindings::exports::harbor::strategy::strategy::{Backend, Description, Outcome, PickPlan};
/// Guests build these; the host only reads them, except in tests that build plans directly.
#[cfg(test)]
pub use bindings::harbor::strategy::types::WeightedCandidate;
pub use bindings::harbor::strategy::types::{LoadMeasure, LoadRule, TableIndex};
pub use bindings::{Plugin, PluginPre};

/// The version of the strategy contract this host speaks.
pub const CONTRACT: &str = "harbor:strategy@0.5.0";
/// The `load` interface of that contract, as components import it.
const LOAD_INTERFACE: &str = "harbor:strategy/load@0.5.0";

/// How long past its deadline a call is watched before it may be stopped (epoch ticks), and
/// how much CPU it must burn in that time to be stopped.
const GRACE_TICKS: u64 = super::engine::ticks(std::time::Duration::from_millis(5));
const GRACE_CPU: std::time::Duration = std::time::Duration::from_millis(4);

/// CPU time the calling thread has used, if the system can tell.
fn thread_cpu_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

pub struct GuestState {
    limits: StoreLimits,
    /// The thread's CPU time when the current call first reached its deadline.
    overrun_from: Option<std::time::Duration>,
    /// The loads of the route being picked for; set before each call that may read them.
    pub loads: Option<Arc<LoadTable>>,
    /// The buffer `in-flight-all` answers from: this store's own, so a pick that reads every
    /// count allocates nothing once it has grown to the route's size.
    in_flight_all: Arc<Vec<u32>>,
    /// What the guest printed during the current call, up to [`super::stdio::PRINTED_LIMIT`].
    printed: Vec<u8>,
}

/// Strategy stores alive in this process: each holds an instance's memory and a hold on its
/// component's compiled code. Read by the `harbor_plugin_stores` gauge.
static LIVE_STORES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// How many guest stores (instances with their memory) are alive in this process.
pub fn live_stores() -> i64 {
    LIVE_STORES.load(std::sync::atomic::Ordering::Relaxed)
}

impl Drop for GuestState {
    fn drop(&mut self) {
        LIVE_STORES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl GuestState {
    pub fn new(limits: &Limits) -> Self {
        LIVE_STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            overrun_from: None,
            limits: StoreLimitsBuilder::new()
                .memory_size(usize::try_from(limits.memory).unwrap_or(usize::MAX))
                .instances(limits.instances as usize)
                .tables(16)
                .memories(4)
                .trap_on_grow_failure(true)
                .build(),
            loads: None,
            in_flight_all: Arc::default(),
            printed: Vec::new(),
        }
    }

    pub fn limits(&mut self) -> &mut StoreLimits {
        &mut self.limits
    }

    /// Starts the deadline of a new call.
    pub fn start_call(&mut self) {
        self.overrun_from = None;
        self.printed.clear();
    }

    /// Keeps what the guest printed, up to the bound; the rest is dropped.
    pub fn print(&mut self, bytes: &[u8]) {
        let room = super::stdio::PRINTED_LIMIT.saturating_sub(self.printed.len());
        self.printed
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// What the guest printed during the last call, as one line of text, if anything.
    pub fn printed(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.printed);
        let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
        (!line.is_empty()).then_some(line)
    }

    /// Decides, when a call reaches its (wall-clock) epoch deadline, whether the guest has
    /// really been running that long. A thread descheduled on a busy machine has not: it gets
    /// more time. A guest that keeps the CPU for a grace period past the deadline is stopped.
    pub fn on_deadline(&mut self) -> wasmtime::Result<wasmtime::UpdateDeadline> {
        // Without a CPU clock the deadline is a plain wall-clock one.
        let Some(cpu) = thread_cpu_time() else {
            return Ok(wasmtime::UpdateDeadline::Interrupt);
        };
        match self.overrun_from {
            None => {
                self.overrun_from = Some(cpu);
                Ok(wasmtime::UpdateDeadline::Continue(GRACE_TICKS))
            }
            Some(from) if cpu.saturating_sub(from) >= GRACE_CPU => {
                Ok(wasmtime::UpdateDeadline::Interrupt)
            }
            Some(_) => Ok(wasmtime::UpdateDeadline::Continue(GRACE_TICKS)),
        }
    }
}

impl GuestState {
    fn in_flight(&self, index: u32) -> u32 {
        self.loads
            .as_ref()
            .map_or(0, |l| l.in_flight(index as usize))
    }

    fn latency_ewma_ns(&self, index: u32) -> u64 {
        self.loads
            .as_ref()
            .map_or(0, |l| l.latency_ewma_ns(index as usize))
    }

    /// Every backend's in-flight count, in this store's buffer. The lowering drops its clone
    /// right after copying the counts into the guest, so the buffer is unshared again by the
    /// next call; were it not, a fresh one is made.
    fn in_flight_all(&mut self) -> Arc<Vec<u32>> {
        let buffer = match Arc::get_mut(&mut self.in_flight_all) {
            Some(buffer) => buffer,
            None => {
                self.in_flight_all = Arc::default();
                Arc::make_mut(&mut self.in_flight_all)
            }
        };
        buffer.clear();
        if let Some(loads) = &self.loads {
            buffer.extend(loads.in_flight_all());
        }
        self.in_flight_all.clone()
    }
}

/// The imports every strategy may use: the `load` interface, defined by hand rather than by the
/// generated `add_to_linker` so that `in-flight-all` can answer from a reused buffer.
pub fn base_linker(engine: &Engine) -> anyhow::Result<Linker<GuestState>> {
    let err = |e: wasmtime::Error| anyhow::anyhow!("{e:#}");
    let mut linker = Linker::new(engine);
    let mut load = linker.instance(LOAD_INTERFACE).map_err(err)?;
    load.func_wrap(
        "in-flight",
        |cx: StoreContextMut<'_, GuestState>, (index,): (u32,)| Ok((cx.data().in_flight(index),)),
    )
    .map_err(err)?;
    load.func_wrap(
        "latency-ewma-ns",
        |cx: StoreContextMut<'_, GuestState>, (index,): (u32,)| {
            Ok((cx.data().latency_ewma_ns(index),))
        },
    )
    .map_err(err)?;
    load.func_wrap(
        "in-flight-all",
        |mut cx: StoreContextMut<'_, GuestState>, (): ()| Ok((cx.data_mut().in_flight_all(),)),
    )
    .map_err(err)?;
    Ok(linker)
}

/// `wasi:clocks/wall-clock.datetime`.
#[derive(ComponentType, Lower, Clone, Copy)]
#[component(record)]
struct Datetime {
    seconds: u64,
    nanoseconds: u32,
}

/// Prepares a component for instantiation. Of WASI it gets only what is pure and harmless
/// (random numbers, clocks, an empty environment, stdout and stderr into a bounded buffer),
/// defined under the exact versions it imports; everything else it imports (files, sockets,
/// stdin) is linked to a trap, so asking for it is allowed but using it fails.
pub fn prepare(
    base: &Linker<GuestState>,
    engine: &Engine,
    component: &Component,
) -> anyhow::Result<PluginPre<GuestState>> {
    let err = |e: wasmtime::Error| anyhow::anyhow!("{e:#}");
    let mut linker = base.clone();
    for (name, _) in component.component_type().imports(engine) {
        define_pure_wasi(&mut linker, name).map_err(err)?;
        super::stdio::define(&mut linker, name).map_err(err)?;
    }
    linker
        .define_unknown_imports_as_traps(component)
        .map_err(err)?;
    let pre = linker.instantiate_pre(component).map_err(err)?;
    PluginPre::new(pre).map_err(|e| {
        anyhow::anyhow!("the component does not export {CONTRACT}'s `strategy` interface: {e:#}")
    })
}

/// Defines the harmless WASI interface `import` names (random numbers, clocks), if it is one;
/// shared by every plugin world.
pub fn define_pure_wasi<T: 'static>(linker: &mut Linker<T>, import: &str) -> wasmtime::Result<()> {
    let Some(interface) = import.split('@').next() else {
        return Ok(());
    };
    match interface {
        "wasi:random/insecure-seed" => {
            let mut i = linker.instance(import)?;
            i.func_wrap("insecure-seed", |_, (): ()| {
                Ok(((fastrand::u64(..), fastrand::u64(..)),))
            })?;
        }
        "wasi:random/insecure" => {
            let mut i = linker.instance(import)?;
            i.func_wrap("get-insecure-random-u64", |_, (): ()| {
                Ok((fastrand::u64(..),))
            })?;
            i.func_wrap("get-insecure-random-bytes", |_, (len,): (u64,)| {
                Ok((random_bytes(len, fastrand::fill)?,))
            })?;
        }
        "wasi:random/random" => {
            let mut i = linker.instance(import)?;
            i.func_wrap("get-random-u64", |_, (): ()| {
                let mut buf = [0u8; 8];
                getrandom::getrandom(&mut buf).map_err(|e| wasmtime::format_err!("{e}"))?;
                Ok((u64::from_le_bytes(buf),))
            })?;
            i.func_wrap("get-random-bytes", |_, (len,): (u64,)| {
                Ok((random_bytes(len, |buf| {
                    if getrandom::getrandom(buf).is_err() {
                        fastrand::fill(buf);
                    }
                })?,))
            })?;
        }
        "wasi:clocks/monotonic-clock" => {
            let mut i = linker.instance(import)?;
            i.func_wrap("now", |_, (): ()| Ok((monotonic_ns(),)))?;
            i.func_wrap("resolution", |_, (): ()| Ok((1u64,)))?;
        }
        "wasi:clocks/wall-clock" => {
            let mut i = linker.instance(import)?;
            i.func_wrap("now", |_, (): ()| {
                let d = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                Ok((Datetime {
                    seconds: d.as_secs(),
                    nanoseconds: d.subsec_nanos(),
                },))
            })?;
            i.func_wrap("resolution", |_, (): ()| {
                Ok((Datetime {
                    seconds: 0,
                    nanoseconds: 1,
                },))
            })?;
        }
        _ => {}
    }
    Ok(())
}

/// Random bytes for a guest, refusing absurd requests instead of allocating them.
fn random_bytes(len: u64, fill: impl FnOnce(&mut [u8])) -> wasmtime::Result<Vec<u8>> {
    if len > 1 << 20 {
        wasmtime::bail!("asked for {len} random bytes; at most 1 MiB per call");
    }
    let mut buf = vec![0u8; len as usize];
    fill(&mut buf);
    Ok(buf)
}

fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
