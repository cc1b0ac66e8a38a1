//! The `least-connections` strategy as a WebAssembly component: [`least_connections`] holds the
//! algorithm and its tests; `strategy!` is the glue to the WIT contract.

mod least_connections;

harbor_strategy_common::strategy!(least_connections::LeastConnections);
