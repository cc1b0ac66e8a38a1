//! The `peak-ewma` strategy as a WebAssembly component: [`peak_ewma`] holds the algorithm and
//! its tests; `strategy!` is the glue to the WIT contract.

mod peak_ewma;

harbor_strategy_common::strategy!(peak_ewma::PeakEwma);
