//! Logic shared by Harbor's built-in load-balancing strategies, kept free of wit-bindgen so that
//! every strategy's algorithm can be unit-tested natively and the wasm glue stays thin.
//!
//! - [`backends`]: the compact backend list a balancer keeps, and the candidate set of one pick
//!   (health, retries' exclusions, the "panic" fallback when nothing is healthy).
//! - [`hash`]: stable hashing of addresses and turning the host's random bits into choices.
//! - [`load`]: the host's live load seen through a trait, and load-per-weight comparisons.
//! - [`config`]: the strict, flat JSON settings that `configure` accepts.

pub mod backends;
pub mod config;
pub mod hash;
pub mod load;

pub use backends::{Backend, Backends, Candidates};
pub use load::Load;

/// What one pick knows, borrowed from the host's `request` so that algorithms need not see the
/// generated binding types.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickRequest<'a> {
    /// The route's pick counter, shared by all worker threads.
    pub sequence: u64,
    /// Fresh random bits for this pick.
    pub entropy: u64,
    /// A stable hash of the route's hash key, when the host has one.
    pub hash_key: Option<u64>,
    /// Backends a retry must not pick again.
    pub exclude: &'a [u32],
}
