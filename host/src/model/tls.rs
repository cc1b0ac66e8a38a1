//! How a service is served over TLS: where its certificate comes from (`tls`), whether plain
//! HTTP is redirected to HTTPS (`redirect_http`), and the HSTS header (`hsts`). Route files and
//! registrations spell these the same way; certificate files may be named only by a route file
//! or a full-access token, since they are read with Harbor's own permissions.

use std::path::PathBuf;

use serde::Serialize;

use super::names::{FieldError, HostName};

/// Where a service's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// A publicly trusted certificate, through ACME.
    Auto,
    /// From Harbor's local CA, for names no public CA will certify.
    Internal,
    /// Plain HTTP (or plain TCP) only.
    Off,
    /// A certificate and key read from files, and read again when they change.
    Files { cert: PathBuf, key: PathBuf },
}

/// A service's TLS settings as written; `mode: None` takes the default for its names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    pub mode: Option<TlsMode>,
    /// Whether plain HTTP is redirected to HTTPS (true unless `redirect_http = false`).
    pub redirect_http: Option<bool>,
    /// The `Strict-Transport-Security` value sent over HTTPS, if any.
    pub hsts: Option<String>,
}

/// The HSTS value `hsts = true` stands for: a year, as browsers' preload lists ask.
pub const HSTS_DEFAULT: &str = "max-age=31536000";

/// `tls` as written, before it is checked: a word, or a table (object) of two paths.
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
#[serde(untagged)]
pub enum TlsInput {
    Word(String),
    Files { cert: String, key: String },
}

/// `hsts` as written: `true`, `false`, or the header's value.
#[derive(Debug, Clone, serde::Deserialize, Serialize)]
#[serde(untagged)]
pub enum HstsInput {
    On(bool),
    Value(String),
}

impl Tls {
    /// Checks the three settings as a route file or registration gives them.
    pub fn parse(
        tls: Option<&TlsInput>,
        redirect_http: Option<bool>,
        hsts: Option<&HstsInput>,
    ) -> Result<Self, FieldError> {
        let mode = match tls {
            None => None,
            Some(TlsInput::Word(word)) => Some(match word.as_str() {
                "auto" => TlsMode::Auto,
                "internal" => TlsMode::Internal,
                "off" => TlsMode::Off,
                other => {
                    return Err(FieldError::new(
                        "tls",
                        format!(
                            "tls {other:?} is not a mode; use \"auto\", \"internal\", \"off\" or {{ cert = \"...\", key = \"...\" }}"
                        ),
                    ));
                }
            }),
            Some(TlsInput::Files { cert, key }) => Some(TlsMode::Files {
                cert: absolute("cert", cert)?,
                key: absolute("key", key)?,
            }),
        };
        let hsts = match hsts {
            None | Some(HstsInput::On(false)) => None,
            Some(HstsInput::On(true)) => Some(HSTS_DEFAULT.to_owned()),
            Some(HstsInput::Value(value)) => Some(check_hsts(value)?),
        };
        Ok(Self {
            mode,
            redirect_http,
            hsts,
        })
    }

    /// The settings as they would be written, to be read back with [`Tls::parse`].
    pub fn written(&self) -> (Option<TlsInput>, Option<bool>, Option<HstsInput>) {
        let tls = self.mode.as_ref().map(|mode| match mode {
            TlsMode::Auto => TlsInput::Word("auto".into()),
            TlsMode::Internal => TlsInput::Word("internal".into()),
            TlsMode::Off => TlsInput::Word("off".into()),
            TlsMode::Files { cert, key } => TlsInput::Files {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            },
        });
        let hsts = self.hsts.clone().map(HstsInput::Value);
        (tls, self.redirect_http, hsts)
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether certificate files are named, which only a route file or a full-access token may.
    pub fn names_files(&self) -> bool {
        matches!(self.mode, Some(TlsMode::Files { .. }))
    }

    /// The mode in force for `host` where a TLS listener is configured: the one written, or
    /// else Caddy's rule: `auto` for a name a public CA could certify, `internal` otherwise.
    pub fn mode_for(&self, host: &HostName) -> TlsMode {
        match &self.mode {
            Some(mode) => mode.clone(),
            None if is_public(host.as_str()) => TlsMode::Auto,
            None => TlsMode::Internal,
        }
    }

    /// Whether the service is served over TLS at all (its default never turns it off).
    pub fn serves(&self) -> bool {
        self.mode != Some(TlsMode::Off)
    }

    pub fn redirects(&self) -> bool {
        self.redirect_http.unwrap_or(true)
    }
}

/// Whether a public CA could certify `host`: a DNS name with a dot, not an address, and not
/// under a name reserved for local use.
pub fn is_public(host: &str) -> bool {
    const LOCAL: [&str; 9] = [
        "localhost",
        "local",
        "internal",
        "lan",
        "home.arpa",
        "test",
        "example",
        "invalid",
        "home",
    ];
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.parse::<std::net::IpAddr>().is_ok() || !host.contains('.') {
        return false;
    }
    !LOCAL
        .iter()
        .any(|suffix| host == *suffix || host.ends_with(&format!(".{suffix}")))
}

fn absolute(field: &str, raw: &str) -> Result<PathBuf, FieldError> {
    let path = PathBuf::from(raw);
    if !path.is_absolute() {
        return Err(FieldError::new(
            "tls",
            format!("tls {field} {raw:?} must be an absolute path"),
        ));
    }
    Ok(path)
}

/// An HSTS value is sent as a header: printable ASCII, and it must say how long.
fn check_hsts(value: &str) -> Result<String, FieldError> {
    let printable = value.bytes().all(|b| (b' '..=b'~').contains(&b));
    if !printable || !value.to_ascii_lowercase().contains("max-age=") || value.len() > 256 {
        return Err(FieldError::new(
            "hsts",
            format!(
                "hsts {value:?} must be true, false or a header value such as \"{HSTS_DEFAULT}; includeSubDomains\""
            ),
        ));
    }
    Ok(value.to_owned())
}

impl Serialize for Tls {
    fn serialize<S: serde::Serializer>(&self, to: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = to.serialize_map(None)?;
        match &self.mode {
            None => {}
            Some(TlsMode::Auto) => map.serialize_entry("mode", "auto")?,
            Some(TlsMode::Internal) => map.serialize_entry("mode", "internal")?,
            Some(TlsMode::Off) => map.serialize_entry("mode", "off")?,
            Some(TlsMode::Files { cert, key }) => {
                map.serialize_entry("mode", "files")?;
                map.serialize_entry("cert", cert)?;
                map.serialize_entry("key", key)?;
            }
        }
        if let Some(redirect) = self.redirect_http {
            map.serialize_entry("redirect_http", &redirect)?;
        }
        if let Some(hsts) = &self.hsts {
            map.serialize_entry("hsts", hsts)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> HostName {
        HostName::parse(name).expect("a host")
    }

    #[test]
    fn the_default_mode_follows_the_name() {
        let tls = Tls::default();
        for public in ["example.com", "www.example.org", "*.example.net"] {
            assert_eq!(tls.mode_for(&host(public)), TlsMode::Auto, "{public}");
        }
        for local in [
            "localhost",
            "web.localhost",
            "nas.lan",
            "printer.home.arpa",
            "db.internal",
            "box",
            "127.0.0.1",
            "x.test",
        ] {
            assert_eq!(tls.mode_for(&host(local)), TlsMode::Internal, "{local}");
        }
        let off = Tls::parse(Some(&TlsInput::Word("off".into())), None, None).expect("off");
        assert_eq!(off.mode_for(&host("example.com")), TlsMode::Off);
    }

    #[test]
    fn bad_values_are_named() {
        let err = Tls::parse(Some(&TlsInput::Word("on".into())), None, None).expect_err("on");
        assert_eq!(err.field, "tls");
        assert!(
            err.reason.contains("\"on\" is not a mode"),
            "{}",
            err.reason
        );
        let relative = TlsInput::Files {
            cert: "cert.pem".into(),
            key: "/k.pem".into(),
        };
        let err = Tls::parse(Some(&relative), None, None).expect_err("relative");
        assert!(err.reason.contains("absolute"), "{}", err.reason);
        let err = Tls::parse(None, None, Some(&HstsInput::Value("1 year".into())))
            .expect_err("no max-age");
        assert_eq!(err.field, "hsts");
        let on = Tls::parse(None, Some(false), Some(&HstsInput::On(true))).expect("valid");
        assert_eq!(on.hsts.as_deref(), Some(HSTS_DEFAULT));
        assert!(!on.redirects());
    }
}
