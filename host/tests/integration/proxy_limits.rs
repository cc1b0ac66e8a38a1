//! The proxy's limits and timeouts under abuse, on real sockets, one rule per test and each on
//! both HTTP paths: a head past `--max-header-bytes` gets 431, connections past
//! `--max-http-connections` are refused and counted, a slow upload outlives
//! `--upstream-timeout`, a stalled response body is cut, a slowloris client gets 408, a body
//! that stops gets 408, and an idle keep-alive connection is closed. The descriptor table's
//! division is tested on the real binary under a lowered hard limit.
//!
//! Timeouts are set to a second or so and waited on with deadlines of many seconds: a loaded
//! machine makes them late, never early.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Daemon, TestHarbor, eventually};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Long enough for any of the second-long timeouts here to have fired on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(20);

async fn start(
    direct: bool,
    configure: impl Fn(&mut harbor::config::ProxySettings) + Send + Sync + 'static,
) -> TestHarbor {
    common::start_with(move |c| {
        c.proxy.direct_http1 = direct;
        configure(&mut c.proxy);
    })
    .await
}

/// Routes `app.localhost` to `upstream` and waits until a request gets through.
async fn route_to(h: &TestHarbor, upstream: SocketAddr) {
    h.write_route(
        "app.route",
        &format!("host = \"app.localhost\"\nupstreams = [\"{upstream}\"]\n"),
    );
    let proxy = proxy_addr(h);
    eventually(Duration::from_secs(5), "the route to be served", || {
        served(proxy)
    })
    .await;
}

/// A connection to the proxy that has sent `bytes`.
async fn sent(h: &TestHarbor, bytes: &[u8]) -> TcpStream {
    let mut conn = connect(h).await;
    conn.write_all(bytes).await.expect("write to the proxy");
    conn
}

/// Whether a `GET /` for `app.localhost` sent to `addr` is answered 200.
async fn served(addr: SocketAddr) -> Option<()> {
    answered_200(
        addr,
        b"GET / HTTP/1.1\r\nHost: app.localhost\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// Whether `request`, sent to `addr` on a new connection, is answered 200.
async fn answered_200(addr: SocketAddr, request: &[u8]) -> Option<()> {
    let mut conn = TcpStream::connect(addr).await.ok()?;
    conn.write_all(request).await.ok()?;
    read_to_end(&mut conn)
        .await
        .starts_with("HTTP/1.1 200")
        .then_some(())
}

fn proxy_addr(h: &TestHarbor) -> SocketAddr {
    h.harbor().proxy_addr().expect("the proxy listens")
}

async fn connect(h: &TestHarbor) -> TcpStream {
    TcpStream::connect(proxy_addr(h))
        .await
        .expect("connect to the proxy")
}

/// Everything until the proxy closes, as text; a reset ends it too.
async fn read_to_end(conn: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(PATIENCE, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) => panic!(
                "the proxy neither answered nor closed within {PATIENCE:?}: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// What a raw upstream does with a request.
enum Reply {
    Answer(Vec<u8>),
    /// Answers, then holds the connection open, reading and sending nothing more.
    AnswerAndHold(Vec<u8>),
}

/// Reads from `conn` into `got` until it holds a whole head; where the head ends, or `None`
/// once the connection closes first.
async fn head_end(conn: &mut TcpStream, got: &mut Vec<u8>) -> Option<usize> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end);
        }
        match conn.read(&mut buf).await {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// An upstream that reads each request whole (bodies framed by `Content-Length`) and answers as
/// `reply` says, given the request's head and its body's length.
async fn raw_upstream(reply: fn(&str, usize) -> Reply) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = head_end(&mut conn, &mut got).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&got[..end]).into_owned();
                    let length: usize = head
                        .to_ascii_lowercase()
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(str::to_owned))
                        .map_or(0, |v| v.trim().parse().expect("a length"));
                    while got.len() < end + 4 + length {
                        match conn.read(&mut buf).await {
                            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    got.drain(..end + 4 + length);
                    let (answer, hold) = match reply(&head, length) {
                        Reply::Answer(answer) => (answer, false),
                        Reply::AnswerAndHold(answer) => (answer, true),
                    };
                    if conn.write_all(&answer).await.is_err() {
                        return;
                    }
                    if hold {
                        // Until the proxy gives up on it.
                        while let Ok(n) = conn.read(&mut buf).await
                            && n > 0
                        {}
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An upstream that answers each request with how many body bytes it got.
async fn counting_upstream() -> SocketAddr {
    raw_upstream(|_, length| {
        let body = format!("got {length}");
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        Reply::Answer(answer.into_bytes())
    })
    .await
}

/// An upstream that answers `GET /stall` by promising 100 bytes of body, sending 10, and then
/// nothing, holding the connection open; any other request gets `ok`.
async fn stalling_upstream() -> SocketAddr {
    raw_upstream(|head, _| {
        if head.starts_with("GET /stall") {
            let promise = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789";
            Reply::AnswerAndHold(promise.to_vec())
        } else {
            Reply::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
        }
    })
    .await
}

async fn a_head_past_the_limit_gets_431(direct: bool) {
    let h = start(direct, |_| {}).await;
    route_to(&h, counting_upstream().await).await;
    let mut conn = connect(&h).await;
    let head = format!(
        "GET / HTTP/1.1\r\nHost: app.localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    // Written alongside the reading: the proxy answers before it has all of it.
    let (mut read, mut write) = conn.split();
    let writing = async {
        let _ = write.write_all(head.as_bytes()).await;
    };
    let (answer, ()) = tokio::join!(
        async {
            let mut got = Vec::new();
            let _ = tokio::time::timeout(PATIENCE, read.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got).into_owned()
        },
        writing
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
}

async fn connections_past_the_cap_are_refused_and_counted(direct: bool) {
    let h = start(direct, |p| p.max_http_connections = 2).await;
    route_to(&h, counting_upstream().await).await;
    // Two connections in, each served once and kept open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = eventually(
            Duration::from_secs(5),
            "the earlier connections to close",
            || async {
                let mut conn = connect(&h).await;
                conn.write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
                    .await
                    .ok()?;
                let mut buf = [0u8; 256];
                let n = conn.read(&mut buf).await.ok()?;
                buf[..n].starts_with(b"HTTP/1.1 200").then_some(conn)
            },
        )
        .await;
        conn.flush().await.expect("flush");
        held.push(conn);
    }
    // Counted from here: a probe of the route may have been refused while a place it held
    // was still being given back.
    let refused_before = refused(&h).await;
    let mut third = connect(&h).await;
    let _ = third
        .write_all(b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n")
        .await;
    assert_eq!(
        read_to_end(&mut third).await,
        "",
        "the third connection is closed without an answer"
    );
    assert_eq!(
        refused(&h).await,
        refused_before + 1,
        "the refusal is counted"
    );
    // A place given back is taken again.
    held.pop();
    let proxy = proxy_addr(&h);
    eventually(Duration::from_secs(5), "a freed place to be taken", || {
        served(proxy)
    })
    .await;
}

/// HTTP connections refused at the cap so far.
async fn refused(h: &TestHarbor) -> u64 {
    let metrics = h.metrics().await;
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("harbor_connections_refused_total{listener=\"http\",reason=\"cap\"} ")
        })
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

async fn a_slow_upload_outlives_the_upstream_timeout(direct: bool) {
    let h = start(direct, |p| p.upstream_timeout = Duration::from_secs(1)).await;
    route_to(&h, counting_upstream().await).await;
    let mut conn = sent(
        &h,
        b"POST /upload HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 30\r\n\r\n",
    )
    .await;
    // 30 bytes over three seconds: three times the upstream timeout.
    let started = Instant::now();
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn.write_all(b"x").await.expect("a piece of the body");
    }
    assert!(started.elapsed() > Duration::from_secs(1));
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
        .await
        .expect("an answer")
        .expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("got 30"), "{answer}");
}

async fn a_request_body_that_stops_gets_408(direct: bool) {
    let h = start(direct, |p| p.body_idle_timeout = Duration::from_secs(1)).await;
    route_to(&h, counting_upstream().await).await;
    let mut conn = sent(
        &h,
        b"POST / HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 10\r\n\r\nabc",
    )
    .await;
    let answer = read_to_end(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("kind=\"client_timeout\""),
        "counted: {metrics}"
    );
}

async fn a_stalled_response_body_is_cut(direct: bool) {
    let h = start(direct, |p| {
        p.upstream_idle_timeout = Duration::from_secs(1);
    })
    .await;
    route_to(&h, stalling_upstream().await).await;
    let mut conn = sent(&h, b"GET /stall HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await;
    let answer = read_to_end(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        answer.ends_with("\r\n\r\n0123456789"),
        "the body's first bytes came, and then the close: {answer:?}"
    );
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("harbor_proxy_errors_total{kind=\"upstream_stalled\",service=\"app\"} 1"),
        "{metrics}"
    );
}

async fn a_slowloris_client_gets_408(direct: bool) {
    let h = start(direct, |p| p.header_timeout = Duration::from_secs(1)).await;
    route_to(&h, counting_upstream().await).await;
    let mut conn = sent(&h, b"GET / HTTP/1.1\r\nHost: app.loc").await;
    let answer = read_to_end(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    // The same holds for a request after the first on a kept-alive connection.
    let mut conn = sent(
        &h,
        b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\nGET / HTTP/1.1\r\nHos",
    )
    .await;
    let answer = read_to_end(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("HTTP/1.1 408"), "{answer:?}");
}

async fn an_idle_keepalive_connection_is_closed(direct: bool) {
    let h = start(direct, |p| p.keepalive_timeout = Duration::from_secs(1)).await;
    route_to(&h, counting_upstream().await).await;
    let mut conn = sent(&h, b"GET / HTTP/1.1\r\nHost: app.localhost\r\n\r\n").await;
    let answered = Instant::now();
    let answer = read_to_end(&mut conn).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        !answer.contains("408"),
        "an idle connection closes quietly: {answer:?}"
    );
    assert!(
        answered.elapsed() >= Duration::from_millis(900),
        "kept open for the keep-alive timeout first"
    );
}

common::on_both_paths!(
    a_head_past_the_limit_gets_431,
    connections_past_the_cap_are_refused_and_counted,
    a_slow_upload_outlives_the_upstream_timeout,
    a_request_body_that_stops_gets_408,
    a_stalled_response_body_is_cut,
    a_slowloris_client_gets_408,
    an_idle_keepalive_connection_is_closed,
);

/// A free address on 127.0.0.1 (bound and let go), for the binary's listeners.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// A routes directory with `app.localhost` on a counting upstream and the route files given,
/// and a state directory.
struct AppDirs {
    routes: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl AppDirs {
    async fn new(more: &[(&str, String)]) -> Self {
        let routes = tempfile::tempdir().expect("routes dir");
        let app = format!(
            "host = \"app.localhost\"\nupstreams = [\"{}\"]\n",
            counting_upstream().await
        );
        for (file, text) in more.iter().chain([&("app.route", app)]) {
            std::fs::write(routes.path().join(file), text).expect("a route file");
        }
        let state = tempfile::tempdir().expect("state dir");
        Self { routes, state }
    }
}

/// The binary with `args` on `dirs`, its descriptor table cut to 256 entries.
fn spawn_with_256_descriptors(args: &[&str], dirs: &AppDirs) -> Daemon {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_harbor"));
    command
        .args(args)
        .arg("--routes")
        .arg(dirs.routes.path())
        .arg("--state-dir")
        .arg(dirs.state.path())
        .stdout(std::process::Stdio::null());
    // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 256,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Daemon(command.spawn().expect("harbor starts"))
}

/// The reverse: the API's and Gangway's ports flooded together, past the whole descriptor
/// table, while requests through the proxy are served and the flood is turned away.
#[tokio::test]
async fn a_flood_on_the_api_and_gangway_leaves_the_proxy_working() {
    harbor::descriptors::raise_limit().expect("the limit is readable");
    let (api, gangway, proxy) = (free_addr(), free_addr(), free_addr());
    let dirs = AppDirs::new(&[]).await;
    let daemon = spawn_with_256_descriptors(
        &[
            "--api",
            &api.to_string(),
            "--gangway-listen",
            &gangway.to_string(),
            "--proxy-listen",
            &proxy.to_string(),
        ],
        &dirs,
    );
    eventually(Duration::from_secs(30), "the proxy to serve", || {
        served(proxy)
    })
    .await;
    let mut flood = Vec::new();
    for target in [api, gangway] {
        for _ in 0..300 {
            if let Ok(Ok(conn)) =
                tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(target)).await
            {
                flood.push(conn);
            }
        }
    }
    assert!(flood.len() > 256, "the flood got in: {}", flood.len());
    for _ in 0..20 {
        assert!(
            served(proxy).await.is_some(),
            "the proxy serves while the API and Gangway are flooded"
        );
    }
    drop(flood);
    drop(daemon);
}

/// The real binary, its hard descriptor limit lowered to 256 before it starts (the in-process
/// daemon would share this test process's limits). A flood of connections on the proxy's port
/// takes the HTTP door's share; the API's `/healthz` and a tcp route still answer, the refusals
/// are counted, and once the flood goes the proxy serves again.
#[tokio::test]
async fn a_flood_on_the_proxy_port_leaves_the_api_and_tcp_routes_working() {
    // This process opens the flood's sockets: its own soft limit is raised to its hard one.
    harbor::descriptors::raise_limit().expect("the limit is readable");
    let (api, proxy, tcp) = (free_addr(), free_addr(), free_addr());
    let echo = common::upstreams::Backend::echo().await;
    let dirs = AppDirs::new(&[(
        "echo.route",
        format!(
            "protocol = \"tcp\"\nlisten = \"{tcp}\"\nupstreams = [\"{}\"]\n",
            echo.addr
        ),
    )])
    .await;
    let daemon = spawn_with_256_descriptors(
        &[
            "--api",
            &api.to_string(),
            "--proxy-listen",
            &proxy.to_string(),
        ],
        &dirs,
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let healthz = || async {
        let resp = client
            .get(format!("http://{api}/healthz"))
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    };
    eventually(
        Duration::from_secs(30),
        "harbor to answer /healthz",
        healthz,
    )
    .await;
    let tcp_echoes = || async {
        let mut conn = TcpStream::connect(tcp).await.ok()?;
        conn.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
            .await
            .ok()?
            .ok()?;
        (&buf == b"ping").then_some(())
    };
    eventually(Duration::from_secs(10), "the tcp route to echo", tcp_echoes).await;

    // More connections than the whole table holds, all kept open.
    let mut flood = Vec::new();
    for _ in 0..400 {
        if let Ok(Ok(conn)) =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(proxy)).await
        {
            flood.push(conn);
        }
    }
    assert!(flood.len() > 256, "the flood got in: {}", flood.len());
    let metrics = || async {
        client
            .get(format!("http://{api}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    let refused = eventually(
        Duration::from_secs(10),
        "refusals to be counted",
        || async {
            let text = metrics().await?;
            let line = text.lines().find(|l| {
                l.starts_with(
                    "harbor_connections_refused_total{listener=\"http\",reason=\"descriptors\"}",
                )
            })?;
            let n: u64 = line.rsplit(' ').next()?.parse().ok()?;
            (n > 0).then_some(n)
        },
    )
    .await;
    assert!(refused > 0);
    for _ in 0..3 {
        assert!(
            healthz().await.is_some(),
            "the API answers during the flood"
        );
        assert!(
            tcp_echoes().await.is_some(),
            "the tcp route answers during the flood"
        );
    }

    drop(flood);
    eventually(Duration::from_secs(10), "the proxy to serve again", || {
        served(proxy)
    })
    .await;
    drop(daemon);
}

/// A daemon whose header and keep-alive timeouts are a second, with Gangway on a listener of
/// its own, and the two listeners' addresses.
async fn api_and_gangway_with_short_timeouts() -> (common::TestHarbor, [std::net::SocketAddr; 2]) {
    let h = common::start_with(|c| {
        c.proxy.header_timeout = Duration::from_secs(1);
        c.proxy.keepalive_timeout = Duration::from_secs(1);
        c.gangway_listen = Some("127.0.0.1:0".parse().expect("addr"));
    })
    .await;
    let api = h.harbor().api_addr().expect("api");
    let gangway = h.harbor().gangway_addr().expect("gangway");
    (h, [api, gangway])
}

/// Harbor's own listeners hold the proxy's client limits: a slow head gets `408`, an idle
/// connection is closed after the keep-alive timeout, on the API and on Gangway alike.
#[tokio::test]
async fn the_api_and_gangway_close_slow_and_idle_clients() {
    let (h, [api, gangway]) = api_and_gangway_with_short_timeouts().await;
    for addr in [api, gangway] {
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /api/v1/catalog HTTP/1.1\r\nHo")
            .await
            .expect("write");
        let answer = read_to_end(&mut slow).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{addr}: {answer:?}");

        let mut idle = TcpStream::connect(addr).await.expect("connect");
        idle.write_all(b"GET /api/v1/catalog HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let answered = Instant::now();
        let answer = read_to_end(&mut idle).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{addr}: {answer:?}");
        assert!(
            answered.elapsed() >= Duration::from_millis(900),
            "{addr}: kept open for the keep-alive timeout first"
        );
        // And a connection that never says a word: its first head is late.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let answer = read_to_end(&mut silent).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{addr}: {answer:?}");
    }
    h.shutdown().await;
}

/// How an HTTP/2 connection with prior knowledge (h2c) starts.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Everything read from `conn` until it is closed (EOF, reset or a TLS error), or `None` if it
/// is still open at `deadline`.
async fn said_until_closed(
    conn: &mut (impl AsyncRead + Unpin),
    deadline: Duration,
) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    tokio::time::timeout(deadline, async {
        while let Ok(n @ 1..) = conn.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .ok()?;
    Some(got)
}

/// The API and Gangway speak HTTP/1 only: an h2c client that sends its preface and then idles
/// is closed, where hyper's HTTP/2 server would hold it untimed; HTTP/1 calls are served as
/// before.
#[tokio::test]
async fn the_api_and_gangway_close_an_idle_h2c_client() {
    let (h, [api, gangway]) = api_and_gangway_with_short_timeouts().await;
    for addr in [api, gangway] {
        let mut h2c = TcpStream::connect(addr).await.expect("connect");
        h2c.write_all(H2_PREFACE).await.expect("write");
        let said = said_until_closed(&mut h2c, Duration::from_secs(10)).await;
        let said = said.unwrap_or_else(|| panic!("{addr}: an idle h2c client is held open"));
        // A GOAWAY frame (type 7) on stream 0, its error HTTP_1_1_REQUIRED (0xd).
        assert!(
            said.windows(17)
                .any(|frame| frame[..9] == [0, 0, 8, 7, 0, 0, 0, 0, 0]
                    && frame[13..] == [0, 0, 0, 0xd]),
            "{addr}: told to use HTTP/1.1: {said:?}"
        );
        assert!(
            answered_200(
                addr,
                b"GET /api/v1/catalog HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .await
            .is_some(),
            "{addr}: HTTP/1 is served"
        );
    }
    h.shutdown().await;
}

/// A request asking to switch protocols is answered as any other (the API and Gangway switch
/// to none), and its connection's idle time is still bounded.
#[tokio::test]
async fn the_api_and_gangway_close_an_idle_client_that_asked_to_upgrade() {
    let (h, [api, gangway]) = api_and_gangway_with_short_timeouts().await;
    for addr in [api, gangway] {
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(
            b"GET /api/v1/catalog HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
        )
        .await
        .expect("write");
        let said = said_until_closed(&mut conn, Duration::from_secs(10)).await;
        let said = said.unwrap_or_else(|| panic!("{addr}: an idle client is held open"));
        let said = String::from_utf8_lossy(&said);
        assert!(said.starts_with("HTTP/1.1 200"), "{addr}: {said:?}");
    }
    h.shutdown().await;
}

/// The API takes `--api-max-connections` at once; more are closed as they arrive, and the proxy
/// serves all the while.
#[tokio::test]
async fn api_connections_past_the_cap_are_closed_and_the_proxy_serves_on() {
    let h = common::start_with(|c| c.api_max_connections = 8).await;
    route_to(&h, counting_upstream().await).await;
    let api = h.harbor().api_addr().expect("api");
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut conn = TcpStream::connect(api).await.expect("connect");
        conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 12];
        conn.read_exact(&mut buf).await.expect("an answer");
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(conn);
    }
    // A flood past the cap: each connection is closed unanswered.
    let mut flood = Vec::new();
    for _ in 0..50 {
        let mut conn = TcpStream::connect(api).await.expect("connect");
        let _ = conn
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        flood.push(conn);
    }
    for conn in flood.iter_mut().take(5) {
        assert_eq!(read_to_end(conn).await, "", "closed unanswered");
    }
    assert!(
        served(proxy_addr(&h)).await.is_some(),
        "the proxy serves while the API is flooded"
    );
    drop(held.pop());
    eventually(Duration::from_secs(5), "room on the API again", || {
        answered_200(
            api,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
    })
    .await;
    drop(held);
    drop(flood);
    h.shutdown().await;
}

/// HTTP/2 on the proxy's port, in cleartext (prior knowledge) and over TLS (ALPN): a client
/// that holds a connection with no stream open is sent a GOAWAY after the keep-alive timeout and
/// closed, where hyper's HTTP/2 server would hold it for ever; one inside its preface gets the
/// head timeout; a stream in progress keeps its connection however long it takes.
mod http2_idle {
    use super::*;

    use std::sync::Arc;
    use tokio::sync::Notify;

    /// A client's empty SETTINGS frame, which follows its preface.
    const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

    /// Whether `said` holds a GOAWAY frame with the error NO_ERROR: closed on purpose, not
    /// refused.
    fn graceful_goaway(mut said: &[u8]) -> bool {
        while said.len() >= 9 {
            let length =
                usize::from(said[0]) << 16 | usize::from(said[1]) << 8 | usize::from(said[2]);
            let kind = said[3];
            let Some(payload) = said.get(9..9 + length) else {
                return false;
            };
            if kind == 7 && payload.get(4..8) == Some(&[0, 0, 0, 0][..]) {
                return true;
            }
            said = &said[9 + length..];
        }
        false
    }

    /// A raw h2c connection that has sent its preface and SETTINGS, and says no more.
    async fn idle_h2c(h: &TestHarbor) -> TcpStream {
        let mut conn = connect(h).await;
        conn.write_all(&[H2_PREFACE, &EMPTY_SETTINGS[..]].concat())
            .await
            .expect("write the preface");
        conn
    }

    async fn an_idle_http2_client_gets_a_goaway_and_is_closed(direct: bool) {
        let h = start(direct, |p| {
            p.header_timeout = Duration::from_secs(1);
            p.keepalive_timeout = Duration::from_secs(1);
        })
        .await;
        route_to(&h, counting_upstream().await).await;
        let mut idle = idle_h2c(&h).await;
        let mut partial = sent(&h, &H2_PREFACE[..10]).await;
        let said = said_until_closed(&mut idle, Duration::from_secs(10))
            .await
            .expect("an idle h2c client is held open");
        assert!(graceful_goaway(&said), "sent a GOAWAY first: {said:?}");
        assert!(
            said_until_closed(&mut partial, Duration::from_secs(10))
                .await
                .is_some(),
            "a client stopped inside its preface is held open"
        );
        h.shutdown().await;
    }

    /// An upstream that answers `GET /held` with its head and `he` of a five-byte body, and
    /// the rest once `release` is notified; anything else gets `ok` at once.
    async fn held_upstream() -> (SocketAddr, Arc<Notify>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let release = Arc::new(Notify::new());
        let released = release.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let released = released.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        let Some(end) = super::head_end(&mut conn, &mut got).await else {
                            return;
                        };
                        let held = got.starts_with(b"GET /held ");
                        got.drain(..end + 4);
                        let first: &[u8] = if held {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe"
                        } else {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        };
                        if conn.write_all(first).await.is_err() {
                            return;
                        }
                        if held {
                            released.notified().await;
                            if conn.write_all(b"llo").await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, release)
    }

    async fn a_stream_in_progress_keeps_its_connection(direct: bool) {
        let h = start(direct, |p| p.keepalive_timeout = Duration::from_secs(1)).await;
        let (upstream, release) = held_upstream().await;
        route_to(&h, upstream).await;
        let proxy = proxy_addr(&h);
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .resolve("app.localhost", proxy)
            .build()
            .expect("client");
        let mut idle = idle_h2c(&h).await;
        let mut response = client
            .get(format!("http://app.localhost:{}/held", proxy.port()))
            .send()
            .await
            .expect("an answer's head");
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        let mut body = response
            .chunk()
            .await
            .expect("the body's first bytes")
            .expect("some")
            .to_vec();
        // Two idle connections closed one after the other, each after at least two keep-alive
        // timeouts (the GOAWAY, then the PING it never answers): the stream has been open
        // longer than an idle connection lives.
        for _ in 0..2 {
            said_until_closed(&mut idle, PATIENCE)
                .await
                .expect("an idle h2c client is held open");
            idle = idle_h2c(&h).await;
        }
        release.notify_one();
        while let Some(chunk) = tokio::time::timeout(PATIENCE, response.chunk())
            .await
            .expect("the rest of the body")
            .expect("the stream is whole")
        {
            body.extend_from_slice(&chunk);
        }
        assert_eq!(body, b"hello");
        // And the connection, idle again, serves on until its own timeout.
        let again = client
            .get(format!("http://app.localhost:{}/", proxy.port()))
            .send()
            .await
            .expect("a second request");
        assert_eq!(again.text().await.expect("body"), "ok");
        drop(idle);
        h.shutdown().await;
    }

    common::on_both_paths!(
        an_idle_http2_client_gets_a_goaway_and_is_closed,
        a_stream_in_progress_keeps_its_connection,
    );

    /// Over TLS, with h2 chosen by ALPN, an idle client is closed as in cleartext.
    #[tokio::test]
    async fn an_idle_http2_client_over_tls_gets_a_goaway_and_is_closed() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use rustls::pki_types::ServerName;

        let h = common::start_with(|c| {
            c.tls_listen = Some("127.0.0.1:0".parse().expect("addr"));
            c.rescan_interval = Some(Duration::from_millis(200));
            c.proxy.keepalive_timeout = Duration::from_secs(1);
        })
        .await;
        let certs = tempfile::tempdir().expect("a directory");
        let ca_key = KeyPair::generate().expect("a key");
        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = ca_params.self_signed(&ca_key).expect("a root");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("a key");
        let cert = CertificateParams::new(vec!["h2.test".to_owned()])
            .expect("names")
            .signed_by(&key, &issuer)
            .expect("signed");
        let (cert_path, key_path) = (certs.path().join("h2.pem"), certs.path().join("h2.key"));
        common::write_atomically(&cert_path, &cert.pem());
        common::write_atomically(&key_path, &key.serialize_pem());
        h.write_route(
            "h2.route",
            &format!(
                "host = \"h2.test\"\nupstreams = [\"{}\"]\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
                counting_upstream().await,
                cert_path.display(),
                key_path.display()
            ),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.der().clone()).expect("a root");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = h.harbor().tls_addr().expect("the HTTPS listener");
        let mut tls = eventually(Duration::from_secs(10), "the certificate", || async {
            let tcp = TcpStream::connect(addr).await.ok()?;
            let name = ServerName::try_from("h2.test").ok()?;
            connector.connect(name, tcp).await.ok()
        })
        .await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls.write_all(&[H2_PREFACE, &EMPTY_SETTINGS[..]].concat())
            .await
            .expect("write the preface");
        let said = said_until_closed(&mut tls, Duration::from_secs(10))
            .await
            .expect("an idle h2 client is held open");
        assert!(graceful_goaway(&said), "sent a GOAWAY first: {said:?}");
        h.shutdown().await;
    }
}
