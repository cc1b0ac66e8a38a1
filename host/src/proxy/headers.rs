//! The full HTTP stack's side of the one policy ([`super::policy`]), on hyper's header maps:
//! hop-by-hop headers stay on their hop (RFC 9110 §7.6.1), and the upstream learns who asked
//! through `X-Forwarded-*` and `Via`.

use std::net::IpAddr;

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::policy::{self, Forwarding};

/// The protocol a client asks to switch to, when its request is an upgrade (WebSocket, h2c...).
pub fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    if connection_tokens(headers).any(|token| token.eq_ignore_ascii_case(b"upgrade")) {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers: the policy's set, every `Proxy-*` header, and those the
/// `Connection` header names. An upgrade keeps `Connection: upgrade` and its `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    let listed: Vec<Vec<u8>> = connection_tokens(headers).map(<[u8]>::to_vec).collect();
    let gone: Vec<HeaderName> = headers
        .keys()
        .filter(|name| policy::is_hop_by_hop(name.as_str().as_bytes(), &listed))
        .cloned()
        .collect();
    for name in gone {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
}

/// Writes the forwarding headers (see [`Forwarding`]) for a request from `client` for `host`.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    host: &str,
    version: Version,
    secure: bool,
) {
    let prior_for = values(headers, "x-forwarded-for");
    let prior_via = values(headers, "via");
    let prior_for: Vec<&[u8]> = prior_for.iter().map(Vec::as_slice).collect();
    let prior_via: Vec<&[u8]> = prior_via.iter().map(Vec::as_slice).collect();
    Forwarding {
        client,
        host: host.as_bytes(),
        prior_for: &prior_for,
        prior_via: &prior_via,
        version: via_version(version),
        secure,
    }
    .write(headers);
}

/// Adds this hop to a response's `Via`.
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let prior = values(headers, "via");
    let prior: Vec<&[u8]> = prior.iter().map(Vec::as_slice).collect();
    policy::via(&prior, via_version(version), headers);
}

fn values(headers: &HeaderMap, name: &str) -> Vec<Vec<u8>> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect()
}

fn via_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2.0",
        _ => "1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
        ]);
        assert_eq!(upgrade_of(&h), None);
        strip_hop_by_hop(&mut h, None);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn an_upgrade_keeps_its_two_headers() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "abc"),
        ]);
        let upgrade = upgrade_of(&h);
        assert_eq!(upgrade.as_ref().unwrap(), "websocket");
        strip_hop_by_hop(&mut h, upgrade.as_ref());
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "abc");
    }

    #[test]
    fn forwarded_headers_append_to_a_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "198.51.100.1"),
            ("via", "1.1 edge"),
        ]);
        add_forwarded(
            &mut h,
            "127.0.0.1".parse().unwrap(),
            "app.localhost",
            Version::HTTP_11,
            false,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.51.100.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.localhost");
        assert_eq!(h["via"], "1.1 edge, 1.1 harbor");
    }
}
