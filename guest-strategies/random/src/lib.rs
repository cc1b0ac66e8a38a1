//! The `random` strategy as a WebAssembly component: [`random`] holds the algorithm and its
//! tests; `strategy!` is the glue to the WIT contract.

mod random;

harbor_strategy_common::strategy!(random::WeightedRandom);
