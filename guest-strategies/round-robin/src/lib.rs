//! The `round-robin` strategy as a WebAssembly component: [`round_robin`] holds the algorithm
//! and its tests; `strategy!` is the glue to the WIT contract.

mod round_robin;

harbor_strategy_common::strategy!(round_robin::RoundRobin);
