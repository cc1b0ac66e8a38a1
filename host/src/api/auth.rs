//! Bearer tokens for mutating calls. The token file holds one token per line, optionally followed
//! by a service-name prefix the token is limited to. Tokens are compared as SHA-256 digests in
//! constant time, so neither their content nor their length leaks through timing.

use std::path::Path;

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::model::ServiceName;

pub struct Tokens {
    entries: Vec<Entry>,
}

struct Entry {
    digest: [u8; 32],
    prefix: Option<String>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Tokens {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the token file {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let token = words.next().unwrap_or_default();
            let prefix = words.next().map(str::to_owned);
            if words.next().is_some() {
                anyhow::bail!("line {}: expected `TOKEN [SERVICE-PREFIX]`", n + 1);
            }
            if token.len() < 16 {
                anyhow::bail!("line {}: a token must be at least 16 characters", n + 1);
            }
            entries.push(Entry {
                digest: digest(token),
                prefix,
            });
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
}

/// Who is making a mutating call: anyone when no token file is configured, otherwise the holder
/// of a valid token, possibly limited to a prefix of service names.
pub struct Caller {
    prefix: Option<String>,
}

impl Caller {
    /// Plugins affect every service, so only tokens without a prefix may change them.
    pub fn unrestricted(&self) -> Result<(), ApiError> {
        match &self.prefix {
            Some(prefix) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "this token is limited to services starting with {prefix:?}; plugins need an unrestricted token"
                ),
            )),
            None => Ok(()),
        }
    }

    pub fn may_change(&self, name: &ServiceName) -> Result<(), ApiError> {
        match &self.prefix {
            Some(prefix) if !name.as_str().starts_with(prefix.as_str()) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("this token may only change services whose names start with {prefix:?}"),
            )),
            _ => Ok(()),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(tokens) = &state.tokens else {
            return Ok(Caller { prefix: None });
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this call needs Authorization: Bearer <token>",
                )
            })?;
        let entry = tokens
            .find(presented)
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the token is not valid"))?;
        Ok(Caller {
            prefix: entry.prefix.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_and_prefixes() {
        let t =
            Tokens::parse("# ops\nAAAAAAAAAAAAAAAAAAAA\nBBBBBBBBBBBBBBBBBBBB preview-\n").unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.find("AAAAAAAAAAAAAAAAAAAA").unwrap().prefix.is_none());
        assert_eq!(
            t.find("BBBBBBBBBBBBBBBBBBBB").unwrap().prefix.as_deref(),
            Some("preview-")
        );
        assert!(t.find("AAAAAAAAAAAAAAAAAAA").is_none());
        assert!(t.find("").is_none());
    }

    #[test]
    fn refuses_bad_files() {
        assert!(Tokens::parse("# nothing\n").is_err());
        assert!(Tokens::parse("short\n").is_err());
        assert!(Tokens::parse("AAAAAAAAAAAAAAAAAAAA a b\n").is_err());
    }
}
