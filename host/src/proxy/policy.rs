//! The one HTTP policy of both proxy paths (the direct one in [`super::h1`] and hyper's in
//! [`super::http`]): which headers stay on their hop, which a `Connection` header may never
//! name, the proxy's own answers (status, reason and JSON body), and the forwarding headers the
//! upstream is told who asked with.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::body::{ClientBody, text};
use super::metrics::ErrorKind;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), besides those a
/// `Connection` header names and every `Proxy-*` header.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// Headers that frame or route a message. A `Connection` header that names one would have a
/// hop strip what another hop framed the message by, so such a message is refused.
pub const FRAMING: [&str; 3] = ["content-length", "transfer-encoding", "host"];

/// Headers the proxy writes itself and never copies from the message it forwards.
pub const REWRITTEN: [&str; 6] = [
    "content-length",
    "host",
    "via",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

fn named(name: &[u8], set: &[&str]) -> bool {
    set.iter().any(|s| name.eq_ignore_ascii_case(s.as_bytes()))
}

/// Whether header `name` stays on its hop, given the tokens its message's `Connection` lists.
pub fn is_hop_by_hop<T: AsRef<[u8]>>(name: &[u8], listed: &[T]) -> bool {
    named(name, &HOP_BY_HOP)
        || name.len() >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-")
        || listed.iter().any(|l| name.eq_ignore_ascii_case(l.as_ref()))
}

/// The first framing header a `Connection` token names, if any.
pub fn names_framing<T: AsRef<[u8]>>(listed: &[T]) -> Option<&'static str> {
    FRAMING
        .iter()
        .find(|f| {
            listed
                .iter()
                .any(|l| l.as_ref().eq_ignore_ascii_case(f.as_bytes()))
        })
        .copied()
}

/// An answer the proxy gives itself, the same on both paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    body: String,
    /// Where a redirect sends the client.
    location: Option<String>,
    content_type: &'static str,
    /// The client connection closes after it.
    pub close: bool,
}

impl Answer {
    fn new(status: StatusCode, body: serde_json::Value, close: bool) -> Self {
        Self {
            status,
            body: format!("{body}\n"),
            location: None,
            content_type: "application/json",
            close,
        }
    }

    /// The answer to an ACME HTTP-01 challenge: the key authorization, as it is.
    pub fn acme_challenge(key_authorization: String) -> Self {
        Self {
            status: StatusCode::OK,
            body: key_authorization,
            location: None,
            content_type: "application/octet-stream",
            close: false,
        }
    }

    /// A permanent redirect to `location` that keeps the method and body (308): plain HTTP to
    /// the HTTPS listener.
    pub fn redirect(location: String) -> Self {
        let body = serde_json::json!({"redirect": location});
        Self {
            location: Some(location),
            ..Self::new(StatusCode::PERMANENT_REDIRECT, body, false)
        }
    }

    pub fn no_route(host: &str, path: &str) -> Self {
        let body = serde_json::json!({"error": "no route", "host": host, "path": path});
        Self::new(StatusCode::NOT_FOUND, body, false)
    }

    /// A request this proxy will not read further: the connection closes after the answer.
    pub fn bad_request(why: &str) -> Self {
        let body = serde_json::json!({"error": "bad request", "detail": why});
        Self::new(StatusCode::BAD_REQUEST, body, true)
    }

    pub fn head_too_large() -> Self {
        let body = serde_json::json!({"error": "request head too large"});
        Self::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, body, true)
    }

    pub fn request_timeout() -> Self {
        let body = serde_json::json!({"error": "request head not received in time"});
        Self::new(StatusCode::REQUEST_TIMEOUT, body, true)
    }

    pub fn body_timeout() -> Self {
        let body = serde_json::json!({"error": "request body stopped arriving"});
        Self::new(StatusCode::REQUEST_TIMEOUT, body, true)
    }

    pub fn no_healthy_upstream(service: &str) -> Self {
        let body = serde_json::json!({"error": "no healthy upstream", "service": service});
        Self::new(StatusCode::SERVICE_UNAVAILABLE, body, false)
    }

    /// `error` says what failed: the upstream was unreachable, failed, or answered outside the
    /// policy.
    pub fn bad_gateway(service: &str, error: &str) -> Self {
        let body = serde_json::json!({"error": error, "service": service});
        Self::new(StatusCode::BAD_GATEWAY, body, false)
    }

    /// The answer to an exchange with the upstream that failed as `kind` says.
    pub fn upstream_failed(service: &str, kind: ErrorKind) -> Self {
        if kind == ErrorKind::Timeout {
            let body = serde_json::json!({"error": "upstream timed out", "service": service});
            return Self::new(StatusCode::GATEWAY_TIMEOUT, body, false);
        }
        Self::bad_gateway(service, "upstream failed")
    }

    /// The same answer, closing the connection after it.
    pub fn closing(mut self, close: bool) -> Self {
        self.close |= close;
        self
    }

    /// The answer as HTTP/1.1 bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{}{}\r\n{}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.content_type,
            self.body.len(),
            self.location
                .as_ref()
                .map(|l| format!("location: {l}\r\n"))
                .unwrap_or_default(),
            if self.close {
                "connection: close\r\n"
            } else {
                ""
            },
            self.body,
        );
    }

    /// The answer for hyper to send.
    pub fn response(self) -> Response<ClientBody> {
        let mut response = Response::new(text(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        if self.close {
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(location) = self.location.and_then(|l| HeaderValue::try_from(l).ok()) {
            headers.insert(http::header::LOCATION, location);
        }
        response
    }
}

/// Where the proxy writes header fields: HTTP/1.1 bytes, or hyper's header map.
pub trait Fields {
    /// Adds field `name` whose value is `parts` joined.
    fn field(&mut self, name: &'static str, parts: &[&[u8]]);
}

impl Fields for Vec<u8> {
    fn field(&mut self, name: &'static str, parts: &[&[u8]]) {
        self.extend_from_slice(name.as_bytes());
        self.extend_from_slice(b": ");
        for part in parts {
            self.extend_from_slice(part);
        }
        self.extend_from_slice(b"\r\n");
    }
}

impl Fields for HeaderMap {
    fn field(&mut self, name: &'static str, parts: &[&[u8]]) {
        if let Ok(value) = HeaderValue::from_bytes(&parts.concat()) {
            self.insert(HeaderName::from_static(name), value);
        }
    }
}

/// What the upstream is told about a request's way here: `X-Forwarded-For` and `Via` extend the
/// chains the client sent, `X-Forwarded-Proto` and `X-Forwarded-Host` are set.
pub struct Forwarding<'a> {
    pub client: IpAddr,
    /// The host the client asked for.
    pub host: &'a [u8],
    /// `X-Forwarded-For` values the request came with, in order.
    pub prior_for: &'a [&'a [u8]],
    pub prior_via: &'a [&'a [u8]],
    /// The client's HTTP version as `Via` writes it (`1.1`).
    pub version: &'static str,
    /// Whether the client came over TLS (`X-Forwarded-Proto: https`).
    pub secure: bool,
}

impl Forwarding<'_> {
    pub fn write(&self, out: &mut impl Fields) {
        let client = self.client.to_string();
        out.field("x-forwarded-for", &chain(self.prior_for, client.as_bytes()));
        let proto: &[u8] = if self.secure { b"https" } else { b"http" };
        out.field("x-forwarded-proto", &[proto]);
        out.field("x-forwarded-host", &[self.host]);
        via(self.prior_via, self.version, out);
    }
}

/// `Via` with this hop (`1.1 harbor`) appended to the `prior` chain.
pub fn via(prior: &[&[u8]], version: &str, out: &mut impl Fields) {
    let hop = [version.as_bytes(), b" harbor"].concat();
    out.field("via", &chain(prior, &hop));
}

/// `prior` values (the blank ones left out), then `last`, joined by `, `.
fn chain<'a>(prior: &[&'a [u8]], last: &'a [u8]) -> Vec<&'a [u8]> {
    let mut parts = Vec::with_capacity(prior.len() * 2 + 1);
    for value in prior
        .iter()
        .map(|v| v.trim_ascii())
        .filter(|v| !v.is_empty())
    {
        parts.push(value);
        parts.push(b", ");
    }
    parts.push(last);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_and_framing_tokens() {
        let listed = ["x-secret"];
        for name in ["Connection", "TE", "proxy-authorization", "X-Secret"] {
            assert!(is_hop_by_hop(name.as_bytes(), &listed), "{name}");
        }
        assert!(!is_hop_by_hop(b"accept", &listed));
        assert_eq!(
            names_framing(&["keep-alive", "Content-Length"]),
            Some("content-length")
        );
        assert_eq!(names_framing(&["close", "x-a"]), None);
    }

    #[test]
    fn a_redirect_and_a_challenge_answer_say_the_same_in_bytes_and_responses() {
        let redirect = || Answer::redirect("https://a.test:8443/x?y=1".to_owned());
        let mut raw = Vec::new();
        redirect().write(&mut raw);
        let raw = String::from_utf8(raw).unwrap();
        assert!(
            raw.starts_with("HTTP/1.1 308 Permanent Redirect\r\n"),
            "{raw}"
        );
        assert!(
            raw.contains("location: https://a.test:8443/x?y=1\r\n"),
            "{raw}"
        );
        let response = redirect().response();
        assert_eq!(response.headers()["location"], "https://a.test:8443/x?y=1");

        let mut raw = Vec::new();
        Answer::acme_challenge("token.thumbprint".to_owned()).write(&mut raw);
        let raw = String::from_utf8(raw).unwrap();
        assert!(
            raw.ends_with("\r\n\r\ntoken.thumbprint"),
            "the key authorization as it is: {raw}"
        );
        assert!(
            raw.contains("content-type: application/octet-stream\r\n"),
            "{raw}"
        );
    }

    #[test]
    fn answers_are_the_same_bytes_and_responses() {
        let answer = Answer::bad_request("a chunk size has a stray character");
        let mut raw = Vec::new();
        answer.write(&mut raw);
        let raw = String::from_utf8(raw).unwrap();
        assert!(raw.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{raw}");
        assert!(raw.contains("connection: close\r\n"), "{raw}");
        assert!(
            raw.ends_with(
                "\"detail\":\"a chunk size has a stray character\",\"error\":\"bad request\"}\n"
            ),
            "{raw}"
        );
        let response = answer.response();
        assert_eq!(response.status(), 400);
        assert_eq!(response.headers()["connection"], "close");
    }

    #[test]
    fn forwarding_extends_the_chains_the_same_way_in_bytes_and_maps() {
        let f = Forwarding {
            client: "127.0.0.1".parse().unwrap(),
            host: b"app.localhost",
            prior_for: &[b"203.0.113.9", b" ", b"198.51.100.1"],
            prior_via: &[b"1.1 edge"],
            version: "1.1",
            secure: false,
        };
        let mut raw = Vec::new();
        f.write(&mut raw);
        assert_eq!(
            String::from_utf8(raw).unwrap(),
            "x-forwarded-for: 203.0.113.9, 198.51.100.1, 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: app.localhost\r\nvia: 1.1 edge, 1.1 harbor\r\n"
        );
        let mut map = HeaderMap::new();
        f.write(&mut map);
        assert_eq!(
            map["x-forwarded-for"],
            "203.0.113.9, 198.51.100.1, 127.0.0.1"
        );
        assert_eq!(map["via"], "1.1 edge, 1.1 harbor");
    }
}
