//! Settings given to `configure` and `configure-route`: a flat JSON object of numbers, booleans
//! and strings.
//!
//! A hand-written parser rather than serde_json because strategies are shipped as wasm and a JSON
//! stack would double their size for objects of one or two keys. It is strict on purpose: an
//! unknown key or a wrong type is refused with a reason, so a typo in a route's settings is
//! reported instead of silently running with defaults.

use std::fmt;

/// One setting's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A whole number from 0 to `u64::MAX`.
    Number(u64),
    Bool(bool),
    String(String),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Number(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::String(_) => "a string",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Number(n) => write!(f, "{n}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::String(s) => write!(f, "{s:?}"),
        }
    }
}

/// Parsed settings, consumed key by key so that whatever is left over is unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    entries: Vec<(String, Value)>,
}

impl Settings {
    /// Parses `text`; empty or blank text means no settings, like `{}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        Parser {
            text,
            bytes: text.as_bytes(),
            at: 0,
        }
        .object()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// These settings with `over`'s put on top, key by key: a route's settings over the
    /// plugin-wide ones.
    pub fn overlaid(&self, over: Settings) -> Settings {
        let mut merged = self.clone();
        for (key, value) in over.entries {
            match merged.entries.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => merged.entries.push((key, value)),
            }
        }
        merged
    }

    /// Removes and returns the whole number under `key`, refusing other types.
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(Some(n)),
            Some(other) => Err(format!(
                "`{key}` must be a whole number, got {} ({other})",
                other.kind()
            )),
        }
    }

    /// Removes and returns the boolean under `key`, refusing other types.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(other) => Err(format!(
                "`{key}` must be true or false, got {} ({other})",
                other.kind()
            )),
        }
    }

    /// Removes and returns the string under `key`, refusing other types.
    pub fn take_string(&mut self, key: &str) -> Result<Option<String>, String> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!(
                "`{key}` must be a string, got {} ({other})",
                other.kind()
            )),
        }
    }

    /// Refuses settings nobody took, naming the ones `strategy` does accept.
    pub fn finish(self, strategy: &str, accepted: &[&str]) -> Result<(), String> {
        let Some((key, _)) = self.entries.first() else {
            return Ok(());
        };
        if accepted.is_empty() {
            return Err(format!(
                "{strategy} has no settings; give `{{}}`, not `{key}`"
            ));
        }
        let accepted: Vec<String> = accepted.iter().map(|k| format!("`{k}`")).collect();
        Err(format!(
            "{strategy} has no setting `{key}`; it accepts {}",
            accepted.join(", ")
        ))
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        let position = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(position).1)
    }
}

/// The whole `configure` of a strategy without settings: accepts `{}` and blank text only.
pub fn expect_none(strategy: &str, text: &str) -> Result<(), String> {
    Settings::parse(text)?.finish(strategy, &[])
}

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn object(mut self) -> Result<Settings, String> {
        let mut settings = Settings::default();
        self.expect_byte(b'{', "settings must be a JSON object such as `{}`")?;
        if self.eat(b'}') {
            return self.end(settings);
        }
        loop {
            self.skip_space();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a quoted setting name"));
            }
            let key = self.string()?;
            if settings.entries.iter().any(|(k, _)| *k == key) {
                return Err(format!("setting `{key}` is given twice"));
            }
            self.expect_byte(b':', "expected `:` after a setting name")?;
            let value = self.value(&key)?;
            settings.entries.push((key, value));
            if self.eat(b',') {
                continue;
            }
            self.expect_byte(b'}', "expected `,` or `}`")?;
            return self.end(settings);
        }
    }

    fn value(&mut self, key: &str) -> Result<Value, String> {
        self.skip_space();
        match self.peek() {
            Some(b'"') => self.string().map(Value::String),
            Some(b'0'..=b'9') => self.number(key).map(Value::Number),
            Some(b'-') => Err(format!("`{key}` must not be negative")),
            Some(b't') if self.keyword("true") => Ok(Value::Bool(true)),
            Some(b'f') if self.keyword("false") => Ok(Value::Bool(false)),
            Some(b'{' | b'[') => Err(format!(
                "`{key}`: nested objects and lists are not supported"
            )),
            Some(b'n') if self.keyword("null") => Err(format!(
                "`{key}` must have a value; leave it out to use the default"
            )),
            _ => Err(self.error("expected a number, string, true or false")),
        }
    }

    fn number(&mut self, key: &str) -> Result<u64, String> {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return Err(format!("`{key}` must be a whole number"));
        }
        let digits = &self.text[start..self.at];
        if digits.len() > 1 && digits.starts_with('0') {
            return Err(format!("`{key}`: numbers must not have leading zeros"));
        }
        digits
            .parse()
            .map_err(|_| format!("`{key}` is too large ({digits})"))
    }

    fn string(&mut self) -> Result<String, String> {
        // The caller saw the opening quote.
        self.at += 1;
        let mut out = String::new();
        loop {
            let rest = &self.text[self.at..];
            let Some(stop) = rest.find(['"', '\\']) else {
                return Err(self.error("unterminated string"));
            };
            let plain = &rest[..stop];
            if plain.chars().any(|c| c < ' ') {
                return Err(self.error("control character in a string"));
            }
            out.push_str(plain);
            self.at += stop + 1;
            if rest.as_bytes()[stop] == b'"' {
                return Ok(out);
            }
            let escaped = self
                .peek()
                .ok_or_else(|| self.error("unterminated string"))?;
            self.at += 1;
            out.push(match escaped {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => self.unicode_escape()?,
                _ => return Err(self.error("unknown escape in a string")),
            });
        }
    }

    /// The rest of a `\uXXXX` escape, joining a UTF-16 surrogate pair when one follows.
    fn unicode_escape(&mut self) -> Result<char, String> {
        let high = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&high) {
            if !(self.eat_raw(b'\\') && self.eat_raw(b'u')) {
                return Err(self.error("lone surrogate in a \\u escape"));
            }
            let low = self.hex4()?;
            if !(0xdc00..0xe000).contains(&low) {
                return Err(self.error("lone surrogate in a \\u escape"));
            }
            0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00)
        } else {
            high
        };
        char::from_u32(code).ok_or_else(|| self.error("invalid \\u escape"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .text
            .get(self.at..self.at + 4)
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.error("expected four hex digits after \\u"))?;
        self.at += 4;
        u32::from_str_radix(digits, 16).map_err(|_| self.error("invalid \\u escape"))
    }

    fn keyword(&mut self, word: &str) -> bool {
        if self.text[self.at..].starts_with(word) {
            self.at += word.len();
            true
        } else {
            false
        }
    }

    fn end(mut self, settings: Settings) -> Result<Settings, String> {
        self.skip_space();
        if self.at < self.bytes.len() {
            return Err(self.error("unexpected text after the settings object"));
        }
        Ok(settings)
    }

    fn expect_byte(&mut self, byte: u8, message: &str) -> Result<(), String> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(self.error(message))
        }
    }

    /// Skips whitespace, then consumes `byte` if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        self.skip_space();
        self.eat_raw(byte)
    }

    fn eat_raw(&mut self, byte: u8) -> bool {
        if self.peek() == Some(byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn error(&self, message: &str) -> String {
        format!("invalid settings: {message} at byte {}", self.at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_and_empty_objects_mean_no_settings() {
        for text in ["", "  \n", "{}", " { \t } \n"] {
            assert!(Settings::parse(text).expect(text).is_empty(), "{text:?}");
            assert_eq!(expect_none("round-robin", text), Ok(()));
        }
    }

    #[test]
    fn strategies_without_settings_name_what_they_got() {
        let err = expect_none("round-robin", r#"{"weights": 3}"#).unwrap_err();
        assert_eq!(err, "round-robin has no settings; give `{}`, not `weights`");
        let err = expect_none("first", "[]").unwrap_err();
        assert!(err.contains("must be a JSON object"), "{err}");
    }

    #[test]
    fn reads_numbers_booleans_and_strings() {
        let mut s =
            Settings::parse(r#" {"size": 65537, "on": true, "name": "a\"b\u00e9\ud83d\ude00\n"} "#)
                .expect("valid");
        assert_eq!(s.take_u64("size"), Ok(Some(65537)));
        assert_eq!(s.take_bool("on"), Ok(Some(true)));
        assert_eq!(s.take_string("name"), Ok(Some("a\"bé😀\n".to_owned())));
        assert_eq!(s.take_u64("missing"), Ok(None));
        assert_eq!(s.finish("x", &["size"]), Ok(()));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_a_reason() {
        let s = Settings::parse(r#"{"tabel_size": 7}"#).expect("valid");
        assert_eq!(
            s.finish("consistent-hash", &["table_size"]),
            Err("consistent-hash has no setting `tabel_size`; it accepts `table_size`".into())
        );
        let mut s = Settings::parse(r#"{"table_size": "7"}"#).expect("valid");
        assert_eq!(
            s.take_u64("table_size"),
            Err("`table_size` must be a whole number, got a string (\"7\")".into())
        );
    }

    #[test]
    fn malformed_json_is_refused() {
        for (text, needle) in [
            ("{", "expected a quoted setting name"),
            (r#"{"a" 1}"#, "expected `:`"),
            (r#"{"a": 1,}"#, "expected a quoted setting name"),
            (r#"{"a": 1} x"#, "unexpected text"),
            (r#"{"a": -1}"#, "must not be negative"),
            (r#"{"a": 1.5}"#, "whole number"),
            (r#"{"a": 1e3}"#, "whole number"),
            (r#"{"a": 01}"#, "leading zeros"),
            (r#"{"a": 99999999999999999999}"#, "too large"),
            (r#"{"a": {}}"#, "nested"),
            (r#"{"a": null}"#, "leave it out"),
            (r#"{"a": nope}"#, "expected a number"),
            (r#"{"a": 1, "a": 2}"#, "given twice"),
            (r#"{"a": "x"#, "unterminated"),
            (r#"{"a": "\q"}"#, "unknown escape"),
            (r#"{"a": "\ud800"}"#, "lone surrogate"),
            (r#"{"a": "\u12"}"#, "four hex digits"),
            ("{\"a\": \"\u{1}\"}", "control character"),
            ("\"{}\"", "JSON object"),
        ] {
            let err = Settings::parse(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
