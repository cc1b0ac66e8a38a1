//! The adapters compiled into the binary, built from `guest-backends/` by the build script.

/// (package, component)
const BUILTINS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/backends.rs"));

const PREFIX: &str = "backend-";

/// The component of the built-in adapter `name` (`caddy`, `envoy`).
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    BUILTINS
        .iter()
        .find(|(package, _)| package.strip_prefix(PREFIX) == Some(name))
        .map(|(_, bytes)| *bytes)
}

/// The names of the built-in adapters.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS
        .iter()
        .filter_map(|(package, _)| package.strip_prefix(PREFIX))
        .collect()
}
