//! The WebAssembly plugin runtime. Strategies are components implementing `wit/strategy`;
//! each runs sandboxed (no ambient authority, a deadline per call, a memory cap), per thread
//! (no shared store to queue on), and behind a breaker; when one cannot answer, the host's own
//! round-robin picks.
//!
//! | module | owns |
//! |---|---|
//! | `engine` | the wasmtime engine, the epoch ticker, the precompiled-component cache |
//! | `guest` | the generated bindings, the guest store's state, the linker |
//! | `stdio` | what a guest prints (kept for its fault report) and the environment it sees |
//! | `limits` | what one strategy may use: defaults, ceilings, the sidecar file |
//! | `shape` | what a component exports, read without compiling it |
//! | `strategy` | one loaded component: the admission check, the fault breaker |
//! | `shadow` | a candidate strategy picking beside a route's live one, compared, never used |
//! | `shard` | per-thread instances and the guest side of a pick |
//! | `plan` | the pick plans a strategy hands the host: tables and load rules, run natively |
//! | `balancer` | a route's backends, live load, pick sequence and fallback |
//! | `load` | per-backend in-flight counts and latency EWMA |
//! | `catalog` | strategies by name, built-ins, install / remove / list |
//! | `report` | events and metrics |

mod balancer;
mod catalog;
mod dir;
mod engine;
mod guest;
mod limits;
pub mod load;
mod plan;
mod report;
mod shadow;
mod shape;
mod shard;
mod stdio;
mod strategy;

pub use balancer::{BackendSet, BackendSpec, Balancer, Picked, fallback};
pub use catalog::{DEFAULT_STRATEGY, PluginInfo, Slot, Strategies, check};
pub use dir::{
    ADAPTER_PREFIX, DirState, MAX_COMPONENT_BYTES, read as read_component, rescan as rescan_dir,
    scan as scan_dir,
};
pub use engine::{PluginEngine, content_hash, ticks};
pub use guest::{CONTRACT, Outcome, define_pure_wasi, live_stores};
pub use limits::{Limits, Requested as RequestedLimits, Setup, Size, read_sidecar};
pub use load::{BackendLoad, InFlight};
pub use report::{FaultKind, Reporter};
pub use shadow::{Shadow, ShadowMetrics, ShadowReport};
pub use shape::check as check_shape;
pub use shard::setup_threads;
pub use strategy::{Rejected, Source, classify};
