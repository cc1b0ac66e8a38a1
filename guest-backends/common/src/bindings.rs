//! The WIT contract (`../../wit/backend`, world `adapter-plugin`) as Rust, generated once for
//! every built-in adapter. An adapter crate implements the exported `Guest` trait and emits the
//! component's exports with the `export!` macro generated here.
//!
//! `pub_export_macro` makes `export!` usable from the adapter crates; `default_bindings_module`
//! lets it find these types from there.

wit_bindgen::generate!({
    path: "../../wit/backend",
    world: "adapter-plugin",
    pub_export_macro: true,
    default_bindings_module: "harbor_adapter_common::bindings",
});
