//! What a component says it is, read from its sections without compiling it: whether it is a
//! component at all, and which strategy contract it exports. An upload that fails here is
//! answered at once; only one that passes waits for the compiler.

use wasmparser::{Encoding, Parser, Payload};

use super::guest::CONTRACT;

/// The interface a strategy exports, without its version.
const STRATEGY_EXPORT: &str = "harbor:strategy/strategy";

/// Checks that `bytes` is a component exporting this host's strategy contract.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let exports = top_level_exports(bytes)?;
    let wanted = format!("{STRATEGY_EXPORT}@{}", version_of(CONTRACT));
    if exports.contains(&wanted) {
        return Ok(());
    }
    if let Some(other) = exports
        .iter()
        .find_map(|e| e.strip_prefix(&format!("{STRATEGY_EXPORT}@")))
    {
        return Err(format!(
            "the component implements harbor:strategy@{other}; this Harbor speaks {CONTRACT}: build it against this Harbor's wit/strategy"
        ));
    }
    if exports.iter().any(|e| e.starts_with("harbor:backend/")) {
        return Err(format!(
            "the component is a backend adapter, not a strategy (it does not export {wanted})"
        ));
    }
    let listed = if exports.is_empty() {
        "nothing".to_owned()
    } else {
        exports.join(", ")
    };
    Err(format!(
        "the component does not export {wanted}, the interface of {CONTRACT} (it exports {listed})"
    ))
}

fn version_of(contract: &str) -> &str {
    contract.rsplit('@').next().unwrap_or(contract)
}

/// The names the outermost component exports.
fn top_level_exports(bytes: &[u8]) -> Result<Vec<String>, String> {
    let mut exports = Vec::new();
    // Nested modules and components have sections of their own, ending with their own `End`.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| {
            if depth == 0 && exports.is_empty() && !bytes.starts_with(b"\0asm") {
                "not a WebAssembly component Harbor can load: not WebAssembly at all".to_owned()
            } else {
                format!(
                    "not a WebAssembly component Harbor can load: {}",
                    e.message()
                )
            }
        })?;
        match payload {
            Payload::Version {
                encoding: Encoding::Module,
                ..
            } if depth == 0 => {
                return Err("not a WebAssembly component Harbor can load: it is a core module; build it as a component (the wasm32-wasip2 target makes one)".to_owned());
            }
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export.map_err(|e| {
                        format!(
                            "not a WebAssembly component Harbor can load: {}",
                            e.message()
                        )
                    })?;
                    exports.push(export.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    Ok(exports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_not_a_strategy_component_is_named_without_compiling() {
        let err = check(b"definitely not wasm").unwrap_err();
        assert!(err.contains("not WebAssembly at all"), "{err}");
        let err = check(b"\0asm\x01\0\0\0").unwrap_err();
        assert!(err.contains("core module"), "{err}");
        // A component header and nothing else: it exports nothing.
        let err = check(b"\0asm\x0d\0\x01\0").unwrap_err();
        assert!(err.contains("it exports nothing"), "{err}");
        let err = check(b"\0asm\x0d\0\x01\0\x07").unwrap_err();
        assert!(err.contains("not a WebAssembly component"), "{err}");
    }

    #[test]
    fn the_built_in_strategies_pass() {
        for (package, bytes) in super::super::catalog::BUILTINS {
            assert_eq!(check(bytes), Ok(()), "{package}");
        }
    }
}
