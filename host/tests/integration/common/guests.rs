//! Builds guest components from source for the tests (cargo, wasm32-wasip2, release), once per
//! package and feature set per test process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

static BUILT: Mutex<Option<HashMap<String, Vec<u8>>>> = Mutex::new(None);

/// The component of workspace package `package` built with `features`.
pub fn component(package: &str, features: &[&str]) -> Vec<u8> {
    let key = format!("{package}+{}", features.join(","));
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(bytes) = built.get(&key) {
        return bytes.clone();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    // One target directory per feature set, so variants do not overwrite each other.
    let target_dir = root
        .join("target")
        .join("test-guests")
        .join(if features.is_empty() {
            "default".to_owned()
        } else {
            features.join("-")
        });
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "wasm32-wasip2",
            "-p",
            package,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    let status = cmd.status().expect("run cargo");
    assert!(status.success(), "building {package} {features:?} failed");
    let file = target_dir
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", package.replace('-', "_")));
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    built.insert(key, bytes.clone());
    bytes
}

/// `bytes` with a custom section appended: the same component, a different content hash.
pub fn variant(bytes: &[u8], n: u32) -> Vec<u8> {
    let name = format!("harbor-test-{n}");
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name.as_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // a custom section
    out.push(section.len() as u8);
    out.extend_from_slice(&section);
    out
}
