//! Bearer tokens. The token file holds one token per line: alone, it has full access; followed
//! by a service-name prefix, it is scoped to services whose names start with it, and to what
//! those services may claim:
//!
//! ```text
//! TOKEN                                     # full access
//! TOKEN  preview-  hosts=*.preview.example.com,preview-*.localhost  listen=127.0.0.1:20000-20999
//! ```
//!
//! A scoped token registers HTTP services only on hosts its `hosts=` patterns match (without
//! any, only on the default `<name>.localhost`), and opens tcp listeners only inside its
//! `listen=` ranges (without any, none). In a pattern, `*` stands for any run of characters within
//! one label. Wildcard hosts, plugins and swaps need full access. Tokens are compared as SHA-256
//! digests in constant time, so neither their content nor their length leaks through timing.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::model::{Match, Route, ServiceName};

pub struct Tokens {
    entries: Vec<Entry>,
}

struct Entry {
    digest: [u8; 32],
    /// None: full access.
    scope: Option<Scope>,
}

/// What a scoped token may change and claim.
#[derive(Debug, Clone, PartialEq)]
struct Scope {
    prefix: String,
    hosts: Vec<String>,
    listen: Vec<ListenRange>,
}

/// Tcp listen addresses a scoped token may open: one IP, a range of ports.
#[derive(Debug, Clone, PartialEq)]
struct ListenRange {
    ip: IpAddr,
    ports: std::ops::RangeInclusive<u16>,
}

impl ListenRange {
    fn parse(raw: &str) -> Result<Self, String> {
        let bad = || format!("listen={raw}: expected IP:PORT or IP:PORT-PORT");
        let (ip, ports) = raw.rsplit_once(':').ok_or_else(bad)?;
        let ip: IpAddr = ip
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad())?;
        let (lo, hi) = ports.split_once('-').unwrap_or((ports, ports));
        let (lo, hi): (u16, u16) = (
            lo.parse().map_err(|_| bad())?,
            hi.parse().map_err(|_| bad())?,
        );
        if lo == 0 || lo > hi {
            return Err(bad());
        }
        Ok(Self { ip, ports: lo..=hi })
    }

    fn holds(&self, addr: SocketAddr) -> bool {
        addr.ip() == self.ip && self.ports.contains(&addr.port())
    }
}

/// Whether `host` matches `pattern` label by label, `*` standing for any run of characters
/// within a label.
fn host_matches(pattern: &str, host: &str) -> bool {
    let (p, h): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), host.split('.').collect());
    p.len() == h.len() && p.iter().zip(&h).all(|(p, h)| label_matches(p, h))
}

fn label_matches(pattern: &str, label: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == label,
        Some((before, rest)) => {
            let Some(tail) = label.strip_prefix(before) else {
                return false;
            };
            // Each place the rest could start, shortest run first.
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| label_matches(rest, &tail[i..]))
        }
    }
}

fn check_pattern(raw: &str) -> Result<String, String> {
    let pattern = raw.to_ascii_lowercase();
    let ok = !pattern.is_empty()
        && pattern.split('.').all(|l| !l.is_empty())
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'));
    if ok {
        Ok(pattern)
    } else {
        Err(format!(
            "hosts={raw}: a pattern is a host name in which '*' may stand for part of a label"
        ))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        let tokens =
            Self::parse(&text).with_context(|| format!("in the token file {}", path.display()))?;
        for scope in tokens.entries.iter().filter_map(|e| e.scope.as_ref()) {
            if scope.hosts.is_empty() || scope.listen.is_empty() {
                tracing::warn!(
                    prefix = %scope.prefix,
                    "a token scoped to {:?} has {}{}: it may register HTTP services only on <name>.localhost and open no tcp listener unless the token file grants more",
                    scope.prefix,
                    if scope.hosts.is_empty() { "no hosts= " } else { "" },
                    if scope.listen.is_empty() { "no listen=" } else { "" },
                );
            }
        }
        Ok(tokens)
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let entry = parse_line(line).map_err(|why| anyhow::anyhow!("line {}: {why}", n + 1))?;
            entries.push(entry);
        }
        if entries.is_empty() {
            anyhow::bail!("no tokens: every mutating call would be refused");
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks at every entry whatever matches, so the time taken says nothing about which did.
    fn find(&self, presented: &str) -> Option<&Entry> {
        let presented = digest(presented);
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&presented)) && found.is_none() {
                found = Some(entry);
            }
        }
        found
    }

    /// Whether the request carries a valid token, of any scope.
    pub fn admits(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        self.find(presented(headers)?)
            .map(|_| ())
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the token is not valid"))
    }
}

fn parse_line(line: &str) -> Result<Entry, String> {
    let mut words = line.split_whitespace();
    let token = words.next().unwrap_or_default();
    if token.len() < 16 {
        return Err("a token must be at least 16 characters".into());
    }
    let Some(prefix) = words.next() else {
        return Ok(Entry {
            digest: digest(token),
            scope: None,
        });
    };
    if prefix.contains('=') {
        return Err(format!(
            "{prefix:?}: hosts= and listen= scope a token to a service prefix, which comes first"
        ));
    }
    let mut scope = Scope {
        prefix: prefix.to_owned(),
        hosts: Vec::new(),
        listen: Vec::new(),
    };
    for word in words {
        match word.split_once('=') {
            Some(("hosts", list)) => {
                for raw in list.split(',').filter(|p| !p.is_empty()) {
                    scope.hosts.push(check_pattern(raw)?);
                }
            }
            Some(("listen", list)) => {
                for raw in list.split(',').filter(|p| !p.is_empty()) {
                    scope.listen.push(ListenRange::parse(raw)?);
                }
            }
            _ => {
                return Err(format!(
                    "{word:?}: expected `TOKEN [SERVICE-PREFIX [hosts=PATTERN,...] [listen=IP:PORT[-PORT],...]]`"
                ));
            }
        }
    }
    Ok(Entry {
        digest: digest(token),
        scope: Some(scope),
    })
}

/// The token a request presents. The scheme is case-insensitive (RFC 9110, 11.1).
fn presented(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then_some(token.trim())
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this call needs Authorization: Bearer <token>",
            )
        })
}

/// Who is making a mutating call: anyone when no token file is configured, otherwise the holder
/// of a valid token, possibly scoped.
pub struct Caller {
    scope: Option<Scope>,
}

impl Caller {
    fn forbidden(why: String) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, why)
    }

    /// Plugins and swaps affect every service, so only full-access tokens may change them.
    pub fn unrestricted(&self) -> Result<(), ApiError> {
        match &self.scope {
            Some(scope) => Err(Self::forbidden(format!(
                "this token is limited to services starting with {:?}; this call needs a full-access token",
                scope.prefix
            ))),
            None => Ok(()),
        }
    }

    pub fn may_change(&self, name: &ServiceName) -> Result<(), ApiError> {
        match &self.scope {
            Some(scope) if !name.as_str().starts_with(scope.prefix.as_str()) => {
                Err(Self::forbidden(format!(
                    "this token may only change services whose names start with {:?}",
                    scope.prefix
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether the caller may register service `name` with `route`: its name, and every host
    /// and listen address it claims.
    pub fn may_register(&self, name: &ServiceName, route: &Route) -> Result<(), ApiError> {
        self.may_change(name)?;
        let Some(scope) = &self.scope else {
            return Ok(());
        };
        // A tcp service's names (its certificate's, or the SNI names it is routed by) are
        // claims like an HTTP service's hosts, held to the same patterns.
        let (Match::Http { hosts, .. } | Match::Tcp { hosts, .. }) = &route.matcher;
        for host in hosts {
            let host = host.as_str();
            if host.starts_with("*.") {
                return Err(Self::forbidden(format!(
                    "the wildcard host {host:?} needs a full-access token"
                )));
            }
            let allowed = if scope.hosts.is_empty() {
                host == format!("{name}.localhost")
            } else {
                scope.hosts.iter().any(|p| host_matches(p, host))
            };
            if !allowed {
                return Err(Self::forbidden(if scope.hosts.is_empty() {
                    format!(
                        "this token may register only the host {name}.localhost (its token file line grants no hosts=), not {host:?}"
                    )
                } else {
                    format!(
                        "this token may not register the host {host:?}: it matches none of {}",
                        scope.hosts.join(", ")
                    )
                }));
            }
        }
        match &route.matcher {
            Match::Http { .. } => {}
            Match::Tcp { listen, .. } => {
                if !scope.listen.iter().any(|r| r.holds(*listen)) {
                    return Err(Self::forbidden(format!(
                        "this token may not open a tcp listener on {listen}{}",
                        if scope.listen.is_empty() {
                            " (its token file line grants no listen=)"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }
        Ok(())
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(tokens) = &state.tokens else {
            return Ok(Caller { scope: None });
        };
        let entry = tokens
            .find(presented(&parts.headers)?)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the token is not valid"))?;
        Ok(Caller {
            scope: entry.scope.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = "AAAAAAAAAAAAAAAAAAAA";
    const PREVIEW: &str = "BBBBBBBBBBBBBBBBBBBB";

    #[test]
    fn parses_tokens_prefixes_and_scopes() {
        let t = Tokens::parse(&format!(
            "# ops\n{FULL}\n{PREVIEW} preview- hosts=*.preview.example.com,preview-*.localhost listen=127.0.0.1:20000-20999  # CI\n"
        ))
        .unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.find(FULL).unwrap().scope.is_none());
        let scope = t.find(PREVIEW).unwrap().scope.clone().unwrap();
        assert_eq!(scope.prefix, "preview-");
        assert_eq!(
            scope.hosts,
            ["*.preview.example.com", "preview-*.localhost"]
        );
        assert!(scope.listen[0].holds("127.0.0.1:20500".parse().unwrap()));
        assert!(!scope.listen[0].holds("127.0.0.1:21000".parse().unwrap()));
        assert!(!scope.listen[0].holds("0.0.0.0:20500".parse().unwrap()));
        assert!(t.find("AAAAAAAAAAAAAAAAAAA").is_none());
        assert!(t.find("").is_none());
    }

    #[test]
    fn refuses_bad_files() {
        assert!(Tokens::parse("# nothing\n").is_err());
        assert!(Tokens::parse("short\n").is_err());
        assert!(Tokens::parse(&format!("{FULL} a b\n")).is_err());
        assert!(Tokens::parse(&format!("{FULL} hosts=x.example\n")).is_err());
        assert!(Tokens::parse(&format!("{FULL} p- listen=127.0.0.1:0\n")).is_err());
        assert!(Tokens::parse(&format!("{FULL} p- listen=127.0.0.1:9-8\n")).is_err());
        assert!(Tokens::parse(&format!("{FULL} p- hosts=a..b\n")).is_err());
    }

    #[test]
    fn patterns_match_within_labels() {
        assert!(host_matches(
            "*.preview.example.com",
            "pr-1.preview.example.com"
        ));
        assert!(!host_matches(
            "*.preview.example.com",
            "a.b.preview.example.com"
        ));
        assert!(!host_matches(
            "*.preview.example.com",
            "preview.example.com"
        ));
        assert!(host_matches("preview-*.localhost", "preview-42.localhost"));
        assert!(!host_matches("preview-*.localhost", "prod.localhost"));
        assert!(host_matches("a*b*c.x", "aXbYc.x"));
        assert!(!host_matches("a*b*c.x", "aXbY.x"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER  abc"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(presented(&headers).unwrap(), "abc", "{value}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(presented(&headers).is_err());
    }
}
