//! The `weighted-round-robin` strategy as a WebAssembly component: [`smooth`] holds the
//! algorithm and its tests; `strategy!` is the glue to the WIT contract.

mod smooth;

harbor_strategy_common::strategy!(smooth::SmoothWeighted);
