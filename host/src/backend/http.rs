//! The HTTP capability: a client bound to one base URL chosen by the operator (a proxy's admin
//! address, over TCP or a unix socket). A guest names only a path under it; anything that could
//! leave it (an absolute URL, `..`, a backslash, a fragment) is refused. One keep-alive
//! connection is reused, and every request has a deadline.
//!
//! The adapter's calls run on a plain thread (never on the async runtime), so the client drives
//! hyper on a small current-thread runtime of its own.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Largest response body an adapter may receive.
const MAX_RESPONSE: usize = 32 << 20;

/// Where the bound client connects, and the path every request goes under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub target: Target,
    /// The path prefix requests are joined to, without a trailing `/` (empty for the root).
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port` as written; also the `Host` header.
    Tcp(String),
    Unix(PathBuf),
}

impl BaseUrl {
    /// `http://addr` with no path prefix.
    pub fn tcp(addr: &str) -> Self {
        Self {
            target: Target::Tcp(addr.to_owned()),
            prefix: String::new(),
        }
    }
}

impl FromStr for BaseUrl {
    type Err = String;

    /// `http://host:port[/prefix]` or `unix:/path/to.sock`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix socket needs an absolute path, e.g. unix:/run/caddy/admin.sock"
                ));
            }
            return Ok(BaseUrl {
                target: Target::Unix(PathBuf::from(path)),
                prefix: String::new(),
            });
        }
        let rest = s.strip_prefix("http://").ok_or_else(|| {
            format!("{s:?}: expected http://HOST:PORT or unix:/path (https is not supported for admin addresses)")
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let port_ok = authority
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok || authority.contains('@') {
            return Err(format!("{s:?}: expected http://HOST:PORT with a port"));
        }
        check_path(if prefix.is_empty() { "/" } else { prefix })
            .map_err(|why| format!("{s:?}: {why}"))?;
        Ok(BaseUrl {
            target: Target::Tcp(authority.to_owned()),
            prefix: prefix.to_owned(),
        })
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            Target::Tcp(a) => write!(f, "http://{a}{}", self.prefix),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("no answer within the deadline")]
    Timeout,
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A path a guest may ask for: absolute, without `..` or `.` segments, without a scheme,
/// authority, backslash, fragment or control characters. A query string is allowed.
fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.starts_with("//") {
        return Err(format!(
            "{path:?} must be a path starting with a single '/'"
        ));
    }
    if path
        .chars()
        .any(|c| c.is_control() || c == ' ' || c == '\\' || c == '#')
    {
        return Err(format!("{path:?} holds a character a path may not"));
    }
    let path_only = path.split('?').next().unwrap_or(path);
    let decoded = path_only.to_ascii_lowercase();
    // Encoded dots and slashes could smuggle `..` past the check below.
    if decoded.contains("%2e") || decoded.contains("%2f") || decoded.contains("%5c") {
        return Err(format!("{path:?} holds an encoded '.', '/' or '\\'"));
    }
    if path_only.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(format!("{path:?} leaves the base path"));
    }
    Ok(())
}

/// Headers the host sets itself; a guest may not.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
];

pub struct BoundHttp {
    base: BaseUrl,
    deadline: Duration,
    runtime: tokio::runtime::Runtime,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl BoundHttp {
    pub fn new(base: BaseUrl, deadline: Duration) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            base,
            deadline,
            runtime,
            conn: None,
        })
    }

    pub fn base(&self) -> &BaseUrl {
        &self.base
    }

    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<Response, HttpError> {
        check_path(path).map_err(HttpError::Forbidden)?;
        if let Some((name, _)) = headers
            .iter()
            .find(|(name, _)| RESERVED.contains(&name.to_ascii_lowercase().as_str()))
        {
            return Err(HttpError::Forbidden(format!(
                "the header {name:?} is set by the host"
            )));
        }
        let method = hyper::Method::from_bytes(method.as_bytes())
            .map_err(|_| HttpError::Forbidden(format!("{method:?} is not an HTTP method")))?;
        let host = match &self.base.target {
            Target::Tcp(a) => a.clone(),
            // A unix socket has no host name, so the Host header is empty (RFC 7230, 5.4);
            // Caddy's admin API on a socket accepts only that.
            Target::Unix(_) => String::new(),
        };
        let uri = format!("{}{path}", self.base.prefix);
        let build = || -> Result<hyper::Request<Full<Bytes>>, HttpError> {
            let mut req = hyper::Request::builder()
                .method(method.clone())
                .uri(uri.as_str())
                .header(hyper::header::HOST, host.as_str());
            for (name, value) in headers {
                req = req.header(name.as_str(), value.as_str());
            }
            req.body(Full::new(Bytes::from(body.clone())))
                .map_err(|e| HttpError::Forbidden(format!("bad request: {e}")))
        };
        let deadline = self.deadline;
        let base = self.base.clone();
        let mut conn = self.conn.take();
        let result = self.runtime.block_on(async move {
            tokio::time::timeout(deadline, async move {
                // A reused connection the server has just closed fails at once: one retry on a
                // fresh connection, which the admin APIs' idempotent full-state writes allow.
                let reused = conn.is_some();
                for attempt in 0..2 {
                    let mut sender = match conn.take() {
                        Some(s) if !s.is_closed() => s,
                        _ => connect(&base).await?,
                    };
                    if sender.ready().await.is_err() {
                        continue;
                    }
                    match sender.send_request(build()?).await {
                        Ok(resp) => return read(resp, sender).await,
                        Err(e) if reused && attempt == 0 => {
                            tracing::debug!(error = %e, "admin connection closed; reconnecting");
                            continue;
                        }
                        Err(e) => return Err(HttpError::Unreachable(e.to_string())),
                    }
                }
                Err(HttpError::Unreachable("the connection kept closing".into()))
            })
            .await
            .unwrap_or(Err(HttpError::Timeout))
        });
        match result {
            Ok((response, keep)) => {
                self.conn = keep;
                Ok(response)
            }
            Err(e) => Err(e),
        }
    }
}

async fn connect(base: &BaseUrl) -> Result<SendRequest<Full<Bytes>>, HttpError> {
    let unreachable = |e: std::io::Error| HttpError::Unreachable(format!("{base}: {e}"));
    let handshake_err = |e: hyper::Error| HttpError::Unreachable(format!("{base}: {e}"));
    match &base.target {
        Target::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map_err(unreachable)?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(handshake_err)?;
            tokio::spawn(conn);
            Ok(sender)
        }
        Target::Unix(path) => {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(unreachable)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(handshake_err)?;
            tokio::spawn(conn);
            Ok(sender)
        }
    }
}

/// Reads a whole response; trailers (Caddy sends its `ETag` as one) join the headers.
async fn read(
    resp: hyper::Response<hyper::body::Incoming>,
    sender: SendRequest<Full<Bytes>>,
) -> Result<(Response, Option<SendRequest<Full<Bytes>>>), HttpError> {
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let close = resp
        .headers()
        .get(hyper::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let collected = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| HttpError::Unreachable(format!("reading the response: {e}")))?;
    if let Some(trailers) = collected.trailers() {
        headers.extend(trailers.iter().map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        }));
    }
    let body = collected.to_bytes().to_vec();
    Ok((
        Response {
            status,
            headers,
            body,
        },
        (!close).then_some(sender),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_parse() {
        let b: BaseUrl = "http://127.0.0.1:2019".parse().unwrap();
        assert_eq!(b.target, Target::Tcp("127.0.0.1:2019".into()));
        assert_eq!(b.prefix, "");
        let b: BaseUrl = "http://localhost:9901/admin/".parse().unwrap();
        assert_eq!(b.prefix, "/admin");
        let b: BaseUrl = "unix:/run/caddy.sock".parse().unwrap();
        assert_eq!(b.target, Target::Unix("/run/caddy.sock".into()));
        for bad in [
            "127.0.0.1:2019",
            "https://x:1",
            "http://x",
            "unix:rel",
            "http://u@x:1",
        ] {
            assert!(bad.parse::<BaseUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn only_paths_under_the_base_are_allowed() {
        for ok in [
            "/",
            "/config/apps/http",
            "/id/harbor/handle/0",
            "/stats?filter=x",
        ] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://evil:1/",
            "//evil/x",
            "config",
            "/a/../b",
            "/..",
            "/a/./b",
            "/a/%2e%2e/b",
            "/a%2F..",
            "/a\\b",
            "/a b",
            "/a#x",
            "/a\r\nHost: x",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_host_sets_framing_headers() {
        let mut http = BoundHttp::new(
            "http://127.0.0.1:1".parse().unwrap(),
            Duration::from_millis(200),
        )
        .unwrap();
        let err = http
            .send("GET", "/", &[("Host".into(), "evil".into())], Vec::new())
            .unwrap_err();
        assert!(matches!(err, HttpError::Forbidden(_)), "{err}");
        let err = http.send("GET", "/", &[], Vec::new()).unwrap_err();
        assert!(matches!(err, HttpError::Unreachable(_)), "{err}");
    }
}
