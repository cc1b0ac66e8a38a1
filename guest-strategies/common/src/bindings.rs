//! The WIT contract (`../../wit/strategy`, world `plugin`) as Rust, generated once for every
//! built-in strategy. [`crate::guest`] implements its `Guest` traits for any
//! [`Algorithm`](crate::Algorithm); a strategy crate exports the result with
//! [`strategy!`](crate::strategy), which invokes the `export!` macro generated here.
//!
//! `pub_export_macro` makes `export!` usable from the strategy crates, where the component's
//! exported functions must be emitted; `default_bindings_module` lets it find these types from
//! there.

wit_bindgen::generate!({
    path: "../../wit/strategy",
    world: "plugin",
    pub_export_macro: true,
    default_bindings_module: "harbor_strategy_common::bindings",
});
