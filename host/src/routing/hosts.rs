//! Finding the HTTP route for a request: exact host first, then a `*.` wildcard that covers one
//! label, and within a host the longest path prefix that ends on a segment boundary.

use std::collections::HashMap;
use std::sync::Arc;

/// Routes by host, each host's routes sorted longest prefix first.
#[derive(Debug)]
pub struct HostIndex<T> {
    exact: HashMap<String, Vec<(String, Arc<T>)>>,
    /// Keyed by the suffix after `*.`, e.g. `example.com` for `*.example.com`.
    wildcard: HashMap<String, Vec<(String, Arc<T>)>>,
}

impl<T> Default for HostIndex<T> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<T> HostIndex<T> {
    pub fn insert(&mut self, host: &str, path: &str, route: Arc<T>) {
        let (map, key) = match host.strip_prefix("*.") {
            Some(suffix) => (&mut self.wildcard, suffix),
            None => (&mut self.exact, host),
        };
        let routes = map.entry(key.to_owned()).or_default();
        routes.push((path.to_owned(), route));
        routes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
    }

    /// The route for `host` (any case, with or without a port) and `path`.
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<T>> {
        let host = normalized(strip_port(host));
        let host = host.as_ref();
        if let Some(found) = self.exact.get(host).and_then(|r| longest(r, path)) {
            return Some(found);
        }
        let (_, parent) = host.split_once('.')?;
        self.wildcard.get(parent).and_then(|r| longest(r, path))
    }
}

/// Whether a route's host `pattern` (a name, or `*.` and a name for one more label) covers
/// the client's `name`, as [`HostIndex::find`] matches them.
pub fn host_covers(pattern: &str, name: &str) -> bool {
    let name = normalized(strip_port(name));
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(_, parent)| parent == suffix),
        None => pattern == name.as_ref(),
    }
}

fn longest<'a, T>(routes: &'a [(String, Arc<T>)], path: &str) -> Option<&'a Arc<T>> {
    routes
        .iter()
        .find(|(prefix, _)| prefix_matches(prefix, path))
        .map(|(_, r)| r)
}

/// `/api` matches `/api` and `/api/x` but not `/apix`: a prefix ends on a segment boundary.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// A host name as routes and certificates are keyed: lower case, without a trailing dot. Names
/// come lower-cased nearly always, and are not copied then.
pub fn normalized(host: &str) -> std::borrow::Cow<'_, str> {
    let host = host.trim_end_matches('.');
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// `host` without its port: `a.example:8080` → `a.example`, `[::1]:80` → `::1`.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port → v6
        return rest.split_once(']').map_or(host, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> HostIndex<&'static str> {
        let mut index = HostIndex::default();
        index.insert("app.localhost", "/", Arc::new("root"));
        index.insert("app.localhost", "/api", Arc::new("api"));
        index.insert("app.localhost", "/api/v2/", Arc::new("v2"));
        index.insert("*.example.com", "/", Arc::new("wild"));
        index.insert("www.example.com", "/shop", Arc::new("shop"));
        index.insert("::1", "/", Arc::new("v6"));
        index
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let index = index();
        let find = |h, p| index.find(h, p).map(|r| **r);
        assert_eq!(find("app.localhost", "/"), Some("root"));
        assert_eq!(find("app.localhost", "/api"), Some("api"));
        assert_eq!(find("app.localhost", "/api/users"), Some("api"));
        assert_eq!(find("app.localhost", "/apix"), Some("root"));
        assert_eq!(find("app.localhost", "/api/v2/x"), Some("v2"));
        assert_eq!(find("APP.localhost:8080", "/api"), Some("api"));
        assert_eq!(find("app.localhost.", "/"), Some("root"));
        assert_eq!(find("nope.localhost", "/"), None);
    }

    #[test]
    fn wildcards_cover_one_label_and_yield_to_exact_hosts() {
        let index = index();
        let find = |h, p| index.find(h, p).map(|r| **r);
        assert_eq!(find("a.example.com", "/x"), Some("wild"));
        assert_eq!(find("www.example.com", "/shop/cart"), Some("shop"));
        // An exact host with no matching path falls back to the wildcard.
        assert_eq!(find("www.example.com", "/blog"), Some("wild"));
        assert_eq!(find("a.b.example.com", "/"), None);
        assert_eq!(find("example.com", "/"), None);
        assert_eq!(find("[::1]:8080", "/"), Some("v6"));
    }
}
