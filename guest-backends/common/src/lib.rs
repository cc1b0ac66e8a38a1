//! What Harbor's backend adapters share: the adapter contract's bindings, generated once
//! ([`bindings`]), and the desired state's services and host-obtained certificates as plain Rust
//! ([`Service`], [`Health`], [`Certificate`]), so that each adapter's translation (Caddy routes,
//! xDS files) is a pure function that its tests run natively, free of the generated types.

pub mod bindings;
mod services;

pub use services::{
    Certificate, HashKey, Health, Service, Source, Tls, certificates, http_services, tcp_services,
};

/// The adapter crate's version, marked `+rebuilt` when it is built with its `rebuilt` feature
/// (a build that differs only in its version, for hot-swap tests).
#[macro_export]
macro_rules! version {
    () => {
        if cfg!(feature = "rebuilt") {
            concat!(env!("CARGO_PKG_VERSION"), "+rebuilt")
        } else {
            env!("CARGO_PKG_VERSION")
        }
    };
}
