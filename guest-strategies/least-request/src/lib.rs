//! The `least-request` strategy as a WebAssembly component: [`p2c`] holds the algorithm and its
//! tests; `strategy!` is the glue to the WIT contract.

mod p2c;

harbor_strategy_common::strategy!(p2c::LeastRequest);
