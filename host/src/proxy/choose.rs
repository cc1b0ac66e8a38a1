//! Choosing an upstream for one request or connection: the route's strategy picks, the proxy
//! connects, and a failed connect cools the upstream down and tries another (bounded, never one
//! already tried). When no upstream is healthy the answer is immediate, not a hung client.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::model::HashKey;
use crate::plugins::{Outcome, Picked};
use crate::routing::ServiceRoute;

use super::Shared;
use super::health;
use super::metrics::{ErrorKind, UpstreamMetrics};
use super::policy::Answer;

/// An upstream chosen and connected.
pub struct Chosen<C> {
    pub picked: Picked,
    pub conn: C,
    /// The upstream's address, shared with the connection pool's key.
    pub address: Arc<str>,
    pub metrics: Arc<UpstreamMetrics>,
    /// How long the connect took (near zero for a pooled connection).
    pub connect_time: std::time::Duration,
}

#[derive(Debug)]
pub enum Failure {
    /// Every upstream is held out by health checks or cooldowns (or the route has none).
    NoHealthy,
    /// Connecting failed on every upstream tried.
    Unreachable(String),
}

impl Failure {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Failure::NoHealthy => ErrorKind::NoHealthyUpstream,
            Failure::Unreachable(_) => ErrorKind::Connect,
        }
    }

    /// What the client is answered, the same on both HTTP paths.
    pub fn answer(&self, service: &str) -> Answer {
        match self {
            Failure::NoHealthy => Answer::no_healthy_upstream(service),
            Failure::Unreachable(why) => {
                tracing::warn!(service, error = %why, "no upstream reachable");
                Answer::bad_gateway(service, "upstream unreachable")
            }
        }
    }
}

/// The consistent-hash key of a client address.
pub fn client_key(ip: IpAddr) -> u64 {
    let octets = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    fnv(&octets)
}

/// FNV-1a: fixed, so that a client hashes the same way across restarts and versions.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A request's hash key as its route asks: a header's value (the first), a cookie's, or the
/// client's address when the request carries neither. `headers(name)` gives the values of the
/// request's `name` headers, `name` in lower case.
pub fn request_key<'v>(
    rule: &HashKey,
    client: IpAddr,
    headers: impl FnOnce(&str) -> Vec<&'v [u8]>,
) -> u64 {
    let value = match rule {
        HashKey::ClientIp => None,
        HashKey::Header(name) => headers(name).first().copied(),
        HashKey::Cookie(name) => headers("cookie")
            .into_iter()
            .find_map(|header| cookie(header, name.as_bytes())),
    };
    value.map_or_else(|| client_key(client), fnv)
}

/// The value of cookie `name` in a `Cookie` header's `a=1; b=2`.
fn cookie<'v>(header: &'v [u8], name: &[u8]) -> Option<&'v [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let at = pair.iter().position(|&b| b == b'=')?;
        (&pair[..at] == name).then(|| &pair[at + 1..])
    })
}

/// Picks and connects, retrying other upstreams on a failed connect.
pub async fn choose<C, F, Fut>(
    shared: &Arc<Shared>,
    route: &ServiceRoute,
    hash_key: Option<u64>,
    mut connect: F,
) -> Result<Chosen<C>, Failure>
where
    F: FnMut(Arc<str>) -> Fut,
    Fut: Future<Output = io::Result<C>>,
{
    let balancer = &route.balancer;
    let service = route.name.as_str();
    let mut exclude: Vec<u32> = Vec::new();
    let mut retries = 0;
    let mut last_error = String::new();
    loop {
        if !balancer.any_usable(&exclude) {
            return Err(if exclude.is_empty() {
                Failure::NoHealthy
            } else {
                Failure::Unreachable(last_error)
            });
        }
        let Some(picked) = balancer.pick(hash_key, &exclude) else {
            return Err(Failure::NoHealthy);
        };
        let index = picked.index as u32;
        if !picked.backend().healthy {
            // A strategy that ignores health (a custom one, or the fallback) does not get to
            // send work to an upstream that is held out.
            exclude.push(index);
            continue;
        }
        let address: Arc<str> = picked.backend().address.as_str().into();
        let metrics = shared.metrics.upstream(service, &address);
        metrics.picks.inc();
        let started = Instant::now();
        let attempt =
            tokio::time::timeout(shared.settings.connect_timeout, connect(address.clone()));
        let error = match attempt.await {
            Ok(Ok(conn)) => {
                if picked.load().is_some_and(|l| l.clear_cooldown()) {
                    health::changed(shared, route, &address, true);
                }
                return Ok(Chosen {
                    picked,
                    conn,
                    address,
                    metrics,
                    connect_time: started.elapsed(),
                });
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "no connection within {}",
                humantime::format_duration(shared.settings.connect_timeout)
            ),
        };
        shared.metrics.error(service, ErrorKind::Connect);
        tracing::warn!(service, upstream = %address, error = %error, "cannot connect to upstream");
        balancer.done(&picked, Outcome::ConnectError, started.elapsed());
        if picked
            .load()
            .is_some_and(|l| l.cool_down(shared.settings.cooldown))
        {
            health::cooling(shared, route, &address);
        }
        last_error = format!("{address}: {error}");
        exclude.push(index);
        if retries >= shared.settings.retries {
            return Err(Failure::Unreachable(last_error));
        }
        retries += 1;
        shared.metrics.retry(service);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_key_comes_from_the_header_or_cookie_the_route_names_else_the_client() {
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let by_ip = client_key(client);
        let header = HashKey::Header("x-user".into());
        let cookie = HashKey::Cookie("sid".into());
        let key = |rule: &HashKey, headers: &[(&str, &[u8])]| {
            request_key(rule, client, |name| {
                headers
                    .iter()
                    .filter(|(n, _)| *n == name)
                    .map(|(_, v)| *v)
                    .collect()
            })
        };
        assert_eq!(key(&HashKey::ClientIp, &[("x-user", b"a")]), by_ip);
        assert_eq!(key(&header, &[("x-user", b"a")]), fnv(b"a"));
        assert_eq!(
            key(&header, &[("x-user", b"a"), ("x-user", b"b")]),
            fnv(b"a")
        );
        assert_eq!(key(&header, &[]), by_ip);
        // The cookie by its exact name, in any `Cookie` header, spaces around pairs ignored.
        assert_eq!(
            key(&cookie, &[("cookie", b"a=1; sid=s-9; b=2")]),
            fnv(b"s-9")
        );
        assert_eq!(
            key(&cookie, &[("cookie", b"a=1"), ("cookie", b"sid=s-9")]),
            fnv(b"s-9")
        );
        assert_eq!(key(&cookie, &[("cookie", b"xsid=1; sidx=2")]), by_ip);
        assert_eq!(key(&cookie, &[]), by_ip);
    }
}
