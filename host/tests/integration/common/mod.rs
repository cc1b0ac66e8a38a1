//! Shared test harness: a real daemon in-process on 127.0.0.1:0 with temporary directories, an
//! HTTP client, a Server-Sent Events reader, and waiting on conditions with deadlines.

#![allow(dead_code)]

pub mod certs;
pub mod examples;
pub mod guests;
pub mod proxies;
pub mod strict;
pub mod upstreams;

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use harbor::config::ListenAddr;
use harbor::{Config, Harbor};
use serde_json::Value;
use tempfile::TempDir;

pub struct TestHarbor {
    pub harbor: Option<Harbor>,
    pub base: String,
    pub routes: TempDir,
    pub state: TempDir,
    pub client: reqwest::Client,
    configure: Configure,
}

type Configure = std::sync::Arc<dyn Fn(&mut Config) + Send + Sync>;

/// The machine's cores, for tests whose timing depends on them: tests with deadlines that a
/// starved machine would miss (Caddy's) share it; tests that measure, or that keep both cores
/// busy for long (compiling a large component), hold it alone. Every test is one binary, so
/// without it a long compile would land on another module's deadlines.
pub static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub async fn start() -> TestHarbor {
    start_with(|_| {}).await
}

/// Starts a daemon whose config `configure` may adjust (it must not change the directories);
/// a restart applies it again.
pub async fn start_with(configure: impl Fn(&mut Config) + Send + Sync + 'static) -> TestHarbor {
    let routes = tempfile::tempdir().expect("routes dir");
    let state = tempfile::tempdir().expect("state dir");
    launch(routes, state, std::sync::Arc::new(configure)).await
}

async fn launch(routes: TempDir, state: TempDir, configure: Configure) -> TestHarbor {
    init_logging();
    let mut config = Config::new(routes.path(), state.path());
    config.api = vec![ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr"))];
    config.proxy_listen = "127.0.0.1:0".parse().expect("addr");
    (*configure)(&mut config);
    let harbor = harbor::start(config).await.expect("harbor starts");
    let base = format!("http://{}", harbor.api_addr().expect("a TCP API listener"));
    TestHarbor {
        harbor: Some(harbor),
        base,
        routes,
        state,
        client: reqwest::Client::new(),
        configure,
    }
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

impl TestHarbor {
    /// `http://ADDR` of the embedded HTTP proxy.
    pub fn proxy_base(&self) -> String {
        format!(
            "http://{}",
            self.harbor().proxy_addr().expect("the HTTP proxy runs")
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn write_route(&self, file: &str, text: &str) {
        write_atomically(&self.routes.path().join(file), text);
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.expect("GET");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `GET path`, its body as text.
    pub async fn get_text(&self, path: &str) -> String {
        let resp = self.client.get(self.url(path)).send().await.expect("GET");
        resp.text().await.expect("a body")
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str) -> (u16, Value) {
        let resp = self.client.put(self.url(path)).send().await.expect("PUT");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> u16 {
        let resp = self
            .client
            .delete(self.url(path))
            .send()
            .await
            .expect("DELETE");
        resp.status().as_u16()
    }

    /// The Prometheus exposition text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let resp = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("metrics text")
    }

    /// Registers an instance and returns the 201 body.
    pub async fn register(&self, body: Value) -> Value {
        let (status, grant) = self.post("/api/v1/services", body).await;
        assert_eq!(status, 201, "registration refused: {grant}");
        grant
    }

    /// The service named `name`, or `None` if it does not exist.
    pub async fn service(&self, name: &str) -> Option<Value> {
        let (status, body) = self.get(&format!("/api/v1/services/{name}")).await;
        match status {
            200 => Some(body),
            404 => None,
            other => panic!("GET service {name}: {other} {body}"),
        }
    }

    pub async fn events(&self, last_event_id: Option<&str>) -> SseReader {
        self.sse("/api/v1/events", last_event_id).await
    }

    /// An event stream at `path` (the operator's or the public one).
    pub async fn sse(&self, path: &str, last_event_id: Option<&str>) -> SseReader {
        let mut req = self.client.get(self.url(path));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req.send().await.expect("GET events");
        assert_eq!(resp.status(), 200);
        let content_type = resp.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        SseReader {
            body: Box::pin(resp.bytes_stream()),
            buf: String::new(),
            comments: 0,
        }
    }

    /// Stops the daemon and starts a new one on the same directories (on a new port).
    pub async fn restart(mut self) -> TestHarbor {
        if let Some(h) = self.harbor.take() {
            h.shutdown().await;
        }
        launch(self.routes, self.state, self.configure).await
    }

    /// Stops Harbor, leaves it stopped for `away`, and starts it again on the same directories.
    pub async fn restart_after(mut self, away: Duration) -> TestHarbor {
        if let Some(h) = self.harbor.take() {
            h.shutdown().await;
        }
        tokio::time::sleep(away).await;
        launch(self.routes, self.state, self.configure).await
    }

    pub async fn shutdown(mut self) {
        if let Some(h) = self.harbor.take() {
            h.shutdown().await;
        }
    }

    pub fn harbor(&self) -> &Harbor {
        self.harbor.as_ref().expect("running")
    }
}

/// Writes a file the way editors do: a temp file in the same directory, then rename.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Writes bytes the same way: a temp file in the same directory, then rename.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, bytes).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

pub struct SseReader {
    body: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>,
    >,
    buf: String,
    /// Comment lines (keep-alives) seen so far.
    pub comments: usize,
}

impl SseReader {
    /// The next event, or `None` if none comes within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<SseEvent> {
        tokio::time::timeout(within, self.next_event())
            .await
            .ok()
            .flatten()
    }

    /// The next event within five seconds; panics otherwise.
    pub async fn next(&mut self) -> SseEvent {
        self.next_within(Duration::from_secs(5))
            .await
            .expect("an event within 5 s")
    }

    /// Skips events until one of type `kind` arrives (within five seconds).
    pub async fn next_of(&mut self, kind: &str) -> SseEvent {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left).await {
                Some(e) if e.event == kind => return e,
                Some(_) => continue,
                None => panic!("no {kind} event within 5 s"),
            }
        }
    }

    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).expect("event data is JSON");
                return Some(SseEvent { id, event, data });
            }
            let chunk = self.body.next().await?.ok()?;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

/// How long to wait for Harbor to take up a component it has not seen before. Cranelift
/// compiles it first: a few hundred milliseconds alone, but seconds on two cores while other
/// tests build their guests. Loading from the plugin directory has no latency goal of its own.
pub const COMPILE_WITHIN: Duration = Duration::from_secs(10);

/// Polls `check` until it returns `Some`, panicking with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Parses an RFC 3339 timestamp from the API into a `SystemTime`.
pub fn parse_time(v: &Value) -> std::time::SystemTime {
    humantime::parse_rfc3339(v.as_str().expect("timestamp string")).expect("RFC 3339")
}

/// The registry listing without live countdowns, for comparing state before and after.
pub fn without_countdowns(mut v: Value) -> Value {
    match &mut v {
        Value::Object(map) => {
            map.remove("remaining_ms");
            for child in map.values_mut() {
                *child = without_countdowns(child.take());
            }
        }
        Value::Array(items) => {
            for child in items.iter_mut() {
                *child = without_countdowns(child.take());
            }
        }
        _ => {}
    }
    v
}

/// Waits for `GET /api/v1/backend` to report an error containing `needle`, and checks that it
/// lasts: no probe turns it into a success a second later.
#[allow(dead_code)]
pub async fn a_lasting_backend_error(h: &TestHarbor, needle: &str) {
    let backend = || async {
        let (status, body) = h.get("/api/v1/backend").await;
        assert_eq!(status, 200, "{body}");
        body
    };
    let status = eventually(Duration::from_secs(5), "the error", || async {
        let status = backend().await;
        status["last_error"].as_str().is_some().then_some(status)
    })
    .await;
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.contains(needle), "{status}");
    assert_eq!(status["in_sync"], false, "{status}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = backend().await;
    assert_eq!(status["in_sync"], false, "{status}");
    assert!(status["last_error"].as_str().is_some(), "{status}");
}

/// Waits, picking on this thread, until `b`'s strategy answers picks here: a plugin's instance
/// for a thread is made off that thread, and its picks fall back until then.
#[allow(dead_code)]
pub fn strategy_ready(b: &harbor::plugins::Balancer) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.pick(Some(1), &[]).is_some_and(|p| p.fallback) {
        assert!(
            std::time::Instant::now() < deadline,
            "the strategy never became ready"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A daemon process (the real binary), killed if a test leaves it running, however it ends.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Daemon {
    /// Starts the binary at `bin` and returns it with the API address it logged, and the HTTP
    /// proxy's.
    pub fn spawn(bin: &str, args: &[&str]) -> (Daemon, String, String) {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("harbor starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                for what in ["API listening", "HTTP proxy listening"] {
                    if let Some(addr) = line
                        .contains(what)
                        .then(|| line.split("addr=").nth(1))
                        .flatten()
                    {
                        let addr = addr.split_whitespace().next().unwrap_or("").to_owned();
                        let _ = tx.send((what, addr));
                    }
                }
            }
        });
        let (mut api, mut proxy) = (None, None);
        while api.is_none() || proxy.is_none() {
            let (what, addr) = rx
                .recv_timeout(std::time::Duration::from_secs(20))
                .expect("harbor logs its API and proxy addresses");
            match what {
                "API listening" => api = Some(addr),
                _ => proxy = Some(addr),
            }
        }
        let url = |a: Option<String>| format!("http://{}", a.unwrap_or_default());
        (Daemon(child), url(api), url(proxy))
    }
}

/// Runs each named `async fn(direct: bool)` as two tests: on the direct HTTP/1.1 path
/// (`direct::`) and on the full HTTP stack alone (`full_stack::`, `--no-direct-http1`).
#[allow(unused_macros)]
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        mod direct {
            $(#[tokio::test]
            async fn $name() {
                super::$name(true).await
            })*
        }
        mod full_stack {
            $(#[tokio::test]
            async fn $name() {
                super::$name(false).await
            })*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_paths;

/// Through the proxy at `proxy`, driven by `h`: consistent hashing by a header and by a cookie
/// (`hash_key` in a route file) keeps each session on one upstream, spreads sessions over the
/// upstreams, and never sets a cookie.
pub async fn hash_keys_keep_sessions_on_one_upstream(h: &TestHarbor, proxy: std::net::SocketAddr) {
    let upstreams = [
        proxies::Upstream::start("a").await,
        proxies::Upstream::start("b").await,
        proxies::Upstream::start("c").await,
    ];
    let list: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect();
    let rules = [
        ("by-header.localhost", "header:X-Session"),
        ("by-cookie.localhost", "cookie:sid"),
    ];
    for (host, rule) in rules {
        let file = host.replace(".localhost", ".route");
        h.write_route(
            &file,
            &format!(
                "host = \"{host}\"\nstrategy = \"consistent-hash\"\nhash_key = \"{rule}\"\nupstreams = [{}]\n",
                list.join(", ")
            ),
        );
    }
    // No cookie store: a client that keeps a proxy's cookie would stick for another reason.
    let client = reqwest::Client::new();
    let ask = |host: &'static str, session: u32| {
        let (name, value) = if host.starts_with("by-cookie") {
            ("cookie", format!("theme=dark; sid=user-{session}"))
        } else {
            ("x-session", format!("user-{session}"))
        };
        let request = client
            .get(format!("http://{proxy}/"))
            .header(reqwest::header::HOST, host)
            .header(name, value)
            .timeout(Duration::from_secs(2));
        async move {
            let resp = request.send().await.ok()?;
            let status = resp.status().as_u16();
            let cookie = resp.headers().get(reqwest::header::SET_COOKIE).cloned();
            let body = resp.text().await.ok()?;
            Some((status, body, cookie))
        }
    };
    for (host, _) in rules {
        eventually(Duration::from_secs(10), host, || async {
            // An empty 200 is Caddy's answer before the route is in.
            ask(host, 0).await.filter(|(status, body, _)| {
                *status == 200 && ["a", "b", "c"].contains(&body.as_str())
            })
        })
        .await;
        let mut seen = std::collections::BTreeMap::new();
        for session in 0..16 {
            let mut served = std::collections::BTreeSet::new();
            for _ in 0..4 {
                let (status, body, cookie) = ask(host, session).await.expect("an answer");
                assert_eq!(status, 200, "{host}: {body}");
                assert_eq!(cookie, None, "{host}: the proxy set a cookie");
                served.insert(body);
            }
            assert_eq!(
                served.len(),
                1,
                "{host}: session {session} moved: {served:?}"
            );
            seen.insert(session, served.into_iter().next().unwrap_or_default());
        }
        let spread: std::collections::BTreeSet<_> = seen.values().collect();
        assert!(
            spread.len() >= 2,
            "{host}: every session on one upstream: {seen:?}"
        );
    }
}

/// Runs each named `async fn(Release)` once per supported Caddy release, as a test of its own
/// in the modules `on_caddy_2_6` and `on_current_caddy`; the caller has `Release` in scope.
// Only the binary that drives Caddy uses it.
#[allow(unused_macros)]
macro_rules! on_each_caddy {
    ($($test:ident),* $(,)?) => {
        mod on_caddy_2_6 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Release::Debian).await;
                }
            )*
        }
        mod on_current_caddy {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Release::Current).await;
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_each_caddy;
