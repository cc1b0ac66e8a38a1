//! The `first` strategy as a WebAssembly component: [`first`] holds the algorithm and its
//! tests; `strategy!` is the glue to the WIT contract.

mod first;

harbor_strategy_common::strategy!(first::First);
