//! Builds the built-in strategy and backend adapter components (guest-strategies/,
//! guest-backends/, wasm32-wasip2) so that the
//! `harbor` binary carries them and `cargo run` / `cargo test` need no other step. The guests are
//! built by a nested cargo with its own target directory, so it never waits on the outer build's
//! lock; the wasm target is added through rustup when missing.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// (package, file stem of its component)
const BUILTINS: &[(&str, &str)] = &[
    ("strategy-round-robin", "strategy_round_robin"),
    (
        "strategy-weighted-round-robin",
        "strategy_weighted_round_robin",
    ),
    ("strategy-random", "strategy_random"),
    ("strategy-least-connections", "strategy_least_connections"),
    ("strategy-least-request", "strategy_least_request"),
    ("strategy-consistent-hash", "strategy_consistent_hash"),
    ("strategy-first", "strategy_first"),
    ("strategy-peak-ewma", "strategy_peak_ewma"),
];

/// (package, file stem of its component) of the built-in backend adapters.
const BACKENDS: &[(&str, &str)] = &[
    ("backend-caddy", "backend_caddy"),
    ("backend-envoy", "backend_envoy"),
];

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("host/ sits in the workspace root");
    println!(
        "cargo:rerun-if-changed={}",
        root.join("guest-strategies").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("guest-backends").display()
    );
    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!("cargo:rerun-if-env-changed=HARBOR_GUEST_TARGET_DIR");

    ensure_target();
    // Outside target/<profile>/ so debug, release and clippy builds share one guest build.
    let target_dir = std::env::var_os("HARBOR_GUEST_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target").join("guests"));
    build_guests(root, &target_dir);

    let out = PathBuf::from(env("OUT_DIR"));
    let built = target_dir.join(TARGET).join("release");
    embed(&built, &out, BUILTINS, "builtins.rs");
    embed(&built, &out, BACKENDS, "backends.rs");
}

/// Copies components into OUT_DIR and writes the `include_bytes!` table `table` of them.
fn embed(built: &Path, out: &Path, components: &[(&str, &str)], table_file: &str) {
    let mut table = String::from("&[\n");
    for (package, stem) in components {
        let from = built.join(format!("{stem}.wasm"));
        let to = out.join(format!("{stem}.wasm"));
        std::fs::copy(&from, &to)
            .unwrap_or_else(|e| panic!("{package} built no component at {}: {e}", from.display()));
        table.push_str(&format!(
            "    ({package:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.wasm\"))),\n"
        ));
    }
    table.push_str("]\n");
    std::fs::write(out.join(table_file), table).expect("write the component table");
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set by cargo"))
}

/// Adds the wasm32-wasip2 target if this toolchain lacks it.
fn ensure_target() {
    let sysroot = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = sysroot.is_some_and(|s| s.join("lib/rustlib").join(TARGET).exists());
    if installed {
        return;
    }
    println!("cargo:warning=adding the {TARGET} target with rustup");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => panic!(
            "the {TARGET} target is missing and `rustup target add {TARGET}` failed ({other:?}); \
             install it, then build again"
        ),
    }
}

fn build_guests(root: &Path, target_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(target_dir);
    for (package, _) in BUILTINS.iter().chain(BACKENDS) {
        cmd.args(["-p", package]);
    }
    // The outer build's settings are for the host, not for wasm guests.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    // The components are embedded in the binary: no debug info, symbols stripped.
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true");
    let status = cmd
        .status()
        .expect("run cargo to build the guest components");
    assert!(
        status.success(),
        "building the built-in components for {TARGET} failed (see the output above)"
    );
}
