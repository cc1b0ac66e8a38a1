//! The `consistent-hash` strategy as a WebAssembly component: [`maglev`] holds the algorithm
//! and its tests, [`settings`] what a route may set (`{"table_size": N}`, N prime);
//! `strategy!` is the glue to the WIT contract.

mod maglev;
mod settings;

harbor_strategy_common::strategy!(maglev::Maglev);
