//! What one strategy may use: its memory, its core instances, how long one pick may run and
//! what its picks may take at the 99th percentile. Each has a default and a ceiling; a plugin
//! sets its own through the upload's query string or a `NAME.toml` beside its file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::strategy::Source;
use crate::model::{SETTINGS_FIELD, StrategySettings};

/// The limits one strategy runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory, in bytes, over all its memories.
    pub memory: u64,
    /// Core module instances the component may make: Rust strategies make 2 to 4; components
    /// made by componentize-py make 14, by componentize-js fewer.
    pub instances: u32,
    /// How long one pick (or outcome report) may run before it is interrupted.
    pub pick_deadline: Duration,
    /// What its picks may take at the 99th percentile, judged over the breaker's window from
    /// 100 picks on: every request of its routes waits on its picks.
    pub pick_budget: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: 32 << 20,
            instances: 32,
            pick_deadline: Duration::from_millis(20),
            pick_budget: Duration::from_millis(1),
        }
    }
}

/// What a plugin is given besides its code: the limits it runs under and its plugin-wide
/// settings, which its `configure` is given and every route's own settings lay over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Setup {
    pub limits: Limits,
    pub settings: StrategySettings,
}

/// The most a plugin may ask for. The deadline is bounded by the setup deadline, which no pick
/// may outlast, and floored by the epoch tick that measures it.
const MAX_MEMORY: u64 = 1 << 30;
const MAX_INSTANCES: u32 = 256;
const MIN_DEADLINE: Duration = super::engine::EPOCH_TICK;
const MAX_DEADLINE: Duration = Duration::from_secs(1);
const MIN_BUDGET: Duration = Duration::from_micros(10);

/// The limits as written by whoever sets them: every field optional, sizes and durations in
/// words ("64 MiB", "50ms"). The same keys serve the sidecar file and the query string.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requested {
    pub memory: Option<Size>,
    pub instances: Option<u32>,
    pub pick_deadline: Option<String>,
    pub pick_budget: Option<String>,
    /// The plugin-wide settings: a `[settings]` table in the sidecar, JSON in the query.
    pub settings: Option<serde_json::Value>,
}

/// A size: a number of bytes, or a number with a binary unit.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Words(String),
}

impl Requested {
    /// The limits these ask for over the defaults, each checked against its ceiling, and the
    /// settings, checked for their shape (the plugin's `configure` judges the rest).
    pub fn resolve(&self) -> Result<Setup, String> {
        let settings = match &self.settings {
            Some(value) => StrategySettings::from_json(value)
                .map_err(|e| e.reason.replace(SETTINGS_FIELD, "settings"))?,
            None => StrategySettings::default(),
        };
        Ok(Setup {
            limits: self.limits()?,
            settings,
        })
    }

    fn limits(&self) -> Result<Limits, String> {
        let mut limits = Limits::default();
        if let Some(memory) = &self.memory {
            let bytes = match memory {
                Size::Bytes(n) => *n,
                Size::Words(text) => parse_size(text)?,
            };
            if !(1 << 20..=MAX_MEMORY).contains(&bytes) {
                return Err(format!(
                    "memory: {} is outside 1 MiB to {}",
                    show_size(bytes),
                    show_size(MAX_MEMORY)
                ));
            }
            limits.memory = bytes;
        }
        if let Some(instances) = self.instances {
            if !(1..=MAX_INSTANCES).contains(&instances) {
                return Err(format!(
                    "instances: {instances} is outside 1 to {MAX_INSTANCES}"
                ));
            }
            limits.instances = instances;
        }
        if let Some(text) = &self.pick_deadline {
            let deadline = parse_duration("pick_deadline", text)?;
            if !(MIN_DEADLINE..=MAX_DEADLINE).contains(&deadline) {
                return Err(format!(
                    "pick_deadline: {deadline:?} is outside {MIN_DEADLINE:?} to {MAX_DEADLINE:?}"
                ));
            }
            limits.pick_deadline = deadline;
        }
        if let Some(text) = &self.pick_budget {
            limits.pick_budget = parse_duration("pick_budget", text)?;
        }
        if !(MIN_BUDGET..=limits.pick_deadline).contains(&limits.pick_budget) {
            return Err(format!(
                "pick_budget: {:?} is outside {MIN_BUDGET:?} to the pick deadline, {:?}",
                limits.pick_budget, limits.pick_deadline
            ));
        }
        Ok(limits)
    }
}

fn parse_duration(key: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("{key}: {text:?} is not a duration such as \"50ms\" ({e})"))
}

/// "64 MiB", "64MiB", "512 KiB", "1 GiB" or a plain number of bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shift = match unit.trim() {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        other => {
            return Err(format!(
                "memory: {text:?} has the unit {other:?}; use KiB, MiB or GiB, or a number of bytes"
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("memory: {text:?} is not a size such as \"64 MiB\""))
}

/// A size in the largest binary unit that divides it.
pub fn show_size(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// The limits as the API lists them.
#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    pub memory_bytes: u64,
    pub instances: u32,
    pub pick_deadline_ms: f64,
    pub pick_budget_ms: f64,
}

impl From<Limits> for Shown {
    fn from(l: Limits) -> Self {
        Self {
            memory_bytes: l.memory,
            instances: l.instances,
            pick_deadline_ms: l.pick_deadline.as_secs_f64() * 1e3,
            pick_budget_ms: l.pick_budget.as_secs_f64() * 1e3,
        }
    }
}

/// The sidecar file that sets the limits of the plugin in `wasm`: `NAME.toml` beside
/// `NAME.wasm`.
pub fn sidecar(wasm: &Path) -> PathBuf {
    wasm.with_extension("toml")
}

/// A plugin file's sidecar, as read: its text, or none if there is no sidecar.
pub struct SidecarText {
    path: PathBuf,
    text: Result<Option<String>, String>,
}

impl SidecarText {
    /// Reads the sidecar of the plugin in `wasm`.
    pub fn read(wasm: &Path) -> Self {
        let path = sidecar(wasm);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        };
        Self { path, text }
    }

    /// The bytes that tell one version of the sidecar from another.
    pub fn fingerprint(&self) -> &[u8] {
        match &self.text {
            Ok(Some(text)) => text.as_bytes(),
            Ok(None) => b"",
            Err(e) => e.as_bytes(),
        }
    }

    /// The limits and settings it sets; the defaults where there is no sidecar.
    pub fn setup(&self) -> Result<Setup, String> {
        let path = self.path.display();
        match &self.text {
            Ok(None) => Ok(Setup::default()),
            Ok(Some(text)) => toml::from_str::<Requested>(text)
                .map_err(|e| format!("{path}: {}", e.message()))
                .and_then(|r| r.resolve().map_err(|e| format!("{path}: {e}"))),
            Err(e) => Err(e.clone()),
        }
    }
}

/// Reads the limits and settings a plugin file's sidecar sets; the defaults where there is none.
pub fn read_sidecar(wasm: &Path) -> Result<Setup, String> {
    SidecarText::read(wasm).setup()
}

/// A limit a failure can hit.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Memory,
    Instances,
    PickBudget,
}

impl Limits {
    /// The limit a failure hit and how to raise it (to twice its value) where the plugin came
    /// from: "its memory limit is 32 MiB; raise it with …".
    pub fn advice(&self, limit: Limit, source: &Source) -> String {
        let (key, now, twice) = match limit {
            Limit::Memory => (
                "memory",
                show_size(self.memory),
                format!("\"{}\"", show_size(self.memory * 2)),
            ),
            Limit::Instances => (
                "instances",
                self.instances.to_string(),
                (self.instances * 2).to_string(),
            ),
            Limit::PickBudget => (
                "pick_budget",
                format!("{:?}", self.pick_budget),
                format!("\"{:?}\"", self.pick_budget * 2),
            ),
        };
        format!(
            "its {} limit is {now}; {}",
            key.replace('_', " "),
            how_to_raise(source, key, &twice)
        )
    }
}

/// How whoever loaded a plugin from `source` raises one of its limits: `key = example`.
fn how_to_raise(source: &Source, key: &str, example: &str) -> String {
    match source {
        Source::File(path) => format!(
            "raise it with `{key} = {example}` in {}",
            sidecar(Path::new(path)).display()
        ),
        Source::Api => format!(
            "raise it with `?{key}={}` on the upload",
            example.trim_matches('"').replace(' ', "")
        ),
        Source::Builtin => "built-in strategies have fixed limits".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(text: &str) -> Result<Setup, String> {
        toml::from_str::<Requested>(text)
            .map_err(|e| e.message().to_owned())
            .and_then(|r| r.resolve())
    }

    fn from_toml(text: &str) -> Result<Limits, String> {
        setup(text).map(|s| s.limits)
    }

    #[test]
    fn a_sidecar_gives_plugin_wide_settings_as_a_table() {
        assert!(setup("").unwrap().settings.is_empty());
        let s = setup("memory = \"64 MiB\"\n[settings]\ncanary_percent = 10\n").unwrap();
        assert_eq!(s.settings.text(), r#"{"canary_percent":10}"#);
        assert_eq!(s.limits.memory, 64 << 20);
        let err = setup("settings = 10").unwrap_err();
        assert!(err.contains("settings must be an object"), "{err}");
    }

    #[test]
    fn limits_are_read_in_words_and_checked_against_their_ceilings() {
        assert_eq!(from_toml("").unwrap(), Limits::default());
        let l = from_toml(
            "memory = \"64 MiB\"\ninstances = 40\npick_deadline = \"50ms\"\npick_budget = \"2ms\"",
        )
        .unwrap();
        assert_eq!(l.memory, 64 << 20);
        assert_eq!(l.instances, 40);
        assert_eq!(l.pick_deadline, Duration::from_millis(50));
        assert_eq!(l.pick_budget, Duration::from_millis(2));
        assert_eq!(from_toml("memory = 2097152").unwrap().memory, 2 << 20);

        for (text, named) in [
            ("memory = \"64 MB\"", "use KiB, MiB or GiB"),
            ("memory = \"2 GiB\"", "outside 1 MiB to 1 GiB"),
            ("instances = 0", "instances: 0 is outside 1 to 256"),
            ("pick_deadline = \"2s\"", "outside 5ms to 1s"),
            ("pick_deadline = \"soon\"", "not a duration"),
            ("pick_budget = \"30ms\"", "to the pick deadline, 20ms"),
            ("memroy = \"64 MiB\"", "unknown field `memroy`"),
        ] {
            let err = from_toml(text).unwrap_err();
            assert!(err.contains(named), "{text}: {err}");
        }
    }

    #[test]
    fn the_way_to_raise_a_limit_fits_where_the_plugin_came_from() {
        let file = Source::File("/plugins/canary.wasm".into());
        let limits = Limits::default();
        assert_eq!(
            limits.advice(Limit::Instances, &file),
            "its instances limit is 32; raise it with `instances = 64` in /plugins/canary.toml"
        );
        assert_eq!(
            limits.advice(Limit::Memory, &Source::Api),
            "its memory limit is 32 MiB; raise it with `?memory=64MiB` on the upload"
        );
        assert_eq!(
            limits.advice(Limit::PickBudget, &Source::Api),
            "its pick budget limit is 1ms; raise it with `?pick_budget=2ms` on the upload"
        );
        assert_eq!(show_size(32 << 20), "32 MiB");
        assert_eq!(show_size(1000), "1000 bytes");
    }
}
