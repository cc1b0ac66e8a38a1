//! A route's settings for its strategy: a JSON object the strategy reads (consistent-hash's
//! `table_size`, a canary's `canary_percent`). Harbor checks only its shape; whether the
//! strategy accepts it is the strategy's to say, through its `configure-route`.

use std::sync::Arc;

use serde::Serialize;

use super::names::FieldError;

/// The field that carries them, in route files and registrations alike.
pub const FIELD: &str = "strategy_settings";

/// Settings are a few keys; anything bigger is a mistake, not a configuration.
pub const MAX_BYTES: usize = 16 * 1024;

/// Nesting kept shallow: strategies read flat objects, and a deep one would only cost parsing.
const MAX_DEPTH: usize = 8;

/// A route's settings, kept as canonical JSON text (keys sorted, no spaces) so that two
/// spellings of the same settings are equal, and two instances that agree are seen to.
/// Empty settings are `{}` to the strategy: its plugin-wide ones apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct StrategySettings(Option<Arc<str>>);

impl StrategySettings {
    /// Settings from a JSON value, which must be an object of at most [`MAX_BYTES`].
    pub fn from_json(value: &serde_json::Value) -> Result<Self, FieldError> {
        let bad = |reason: String| FieldError::new(FIELD, reason);
        let serde_json::Value::Object(object) = value else {
            return Err(bad(format!(
                "{FIELD} must be an object such as {{\"table_size\": 5003}}, got {value}"
            )));
        };
        if depth(value) > MAX_DEPTH {
            return Err(bad(format!("{FIELD} nests deeper than {MAX_DEPTH} levels")));
        }
        if object.is_empty() {
            return Ok(Self::default());
        }
        // serde_json's maps are sorted by key, so this text is canonical.
        let text = value.to_string();
        if text.len() > MAX_BYTES {
            return Err(bad(format!(
                "{FIELD} are {} bytes as JSON; at most {MAX_BYTES}",
                text.len()
            )));
        }
        Ok(Self(Some(text.into())))
    }

    /// Settings from a route file's `[strategy_settings]` table.
    pub fn from_toml(table: &toml::Table) -> Result<Self, FieldError> {
        let value = toml_to_json(&toml::Value::Table(table.clone()))?;
        Self::from_json(&value)
    }

    /// Settings read back from their canonical text (a state file, which may have been edited).
    pub fn from_text(text: &str) -> Result<Self, FieldError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| FieldError::new(FIELD, format!("{FIELD} are not JSON: {e}")))?;
        Self::from_json(&value)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The text a strategy is given: `{}` when there are none.
    pub fn text(&self) -> &str {
        self.0.as_deref().unwrap_or("{}")
    }

    /// The text, shared, for the backend sets of every thread.
    pub fn shared(&self) -> Arc<str> {
        self.0.clone().unwrap_or_else(|| Arc::from("{}"))
    }
}

impl Serialize for StrategySettings {
    fn serialize<S: serde::Serializer>(&self, to: S) -> Result<S::Ok, S::Error> {
        // The text was made from a JSON value, so it reads back; an empty object otherwise.
        let value: serde_json::Value = serde_json::from_str(self.text())
            .unwrap_or_else(|_| serde_json::Value::Object(Default::default()));
        value.serialize(to)
    }
}

fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// TOML's values as JSON's; a date or time becomes its RFC 3339 text.
fn toml_to_json(value: &toml::Value) -> Result<serde_json::Value, FieldError> {
    use serde_json::Value as J;
    Ok(match value {
        toml::Value::String(s) => J::String(s.clone()),
        toml::Value::Integer(i) => J::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .ok_or_else(|| FieldError::new(FIELD, format!("{f} is not a number JSON can carry")))?,
        toml::Value::Boolean(b) => J::Bool(*b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(a.iter().map(toml_to_json).collect::<Result<_, _>>()?),
        toml::Value::Table(t) => J::Object(
            t.iter()
                .map(|(k, v)| Ok((k.clone(), toml_to_json(v)?)))
                .collect::<Result<_, FieldError>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spellings_of_the_same_settings_are_equal() {
        let a = StrategySettings::from_json(&json!({"b": 1, "a": {"y": true, "x": "s"}}));
        let b = StrategySettings::from_text(r#"{ "a": {"x": "s", "y": true}, "b": 1 }"#);
        assert_eq!(a, b);
        assert_eq!(
            a.expect("valid").text(),
            r#"{"a":{"x":"s","y":true},"b":1}"#
        );
    }

    #[test]
    fn empty_settings_are_none_and_read_as_an_empty_object() {
        let empty = StrategySettings::from_json(&json!({})).expect("valid");
        assert!(empty.is_empty());
        assert_eq!(empty, StrategySettings::default());
        assert_eq!(empty.text(), "{}");
        assert_eq!(serde_json::to_value(&empty).expect("json"), json!({}));
    }

    #[test]
    fn only_objects_of_bounded_size_and_depth() {
        for bad in [json!(5003), json!("x"), json!([1]), json!(null)] {
            let err = StrategySettings::from_json(&bad).expect_err("not an object");
            assert_eq!(err.field, FIELD);
            assert!(err.reason.contains("must be an object"), "{}", err.reason);
        }
        let big = json!({"k": "x".repeat(MAX_BYTES)});
        let err = StrategySettings::from_json(&big).expect_err("too big");
        assert!(err.reason.contains("at most"), "{}", err.reason);
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!({ "k": deep });
        }
        assert!(StrategySettings::from_json(&deep).is_err());
    }

    #[test]
    fn route_file_tables_become_json() {
        let table: toml::Table = toml::from_str(
            "table_size = 5003\nratio = 0.5\nname = \"a\"\nlist = [1, 2]\nat = 1979-05-27T07:32:00Z\n[inner]\nx = true\n",
        )
        .expect("toml");
        let settings = StrategySettings::from_toml(&table).expect("valid");
        assert_eq!(
            serde_json::to_value(&settings).expect("json"),
            json!({"table_size": 5003, "ratio": 0.5, "name": "a", "list": [1, 2],
                   "at": "1979-05-27T07:32:00Z", "inner": {"x": true}})
        );
    }
}
