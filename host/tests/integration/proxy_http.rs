//! The embedded HTTP reverse proxy, end to end on real sockets: routing by host and path,
//! spreading by strategy, HTTP hygiene, upgrades, retries and cooldowns, health checks, error
//! answers, and routing changes taking effect within 100 ms.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::upstreams::{Backend, HttpBackend, Refusing, websocket_echo};
use common::{TestHarbor, eventually};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A daemon whose proxy takes the direct HTTP/1.1 path or not (`--no-direct-http1`).
async fn start(direct: bool) -> TestHarbor {
    start_with(direct, |_| {}).await
}

async fn start_with(
    direct: bool,
    configure: impl Fn(&mut harbor::Config) + Send + Sync + 'static,
) -> TestHarbor {
    common::start_with(move |c| {
        c.proxy.direct_http1 = direct;
        configure(c);
    })
    .await
}

/// Sends `GET path` for `host` through the proxy; returns the status and body.
async fn get(h: &TestHarbor, host: &str, path: &str) -> (u16, String) {
    let resp = h
        .client
        .get(format!("{}{path}", h.proxy_base()))
        .header("host", host)
        .send()
        .await
        .expect("request through the proxy");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

fn served_by(body: &str) -> String {
    body.lines()
        .next()
        .and_then(|l| l.strip_prefix("served by "))
        .unwrap_or_else(|| panic!("not an echo answer: {body}"))
        .to_owned()
}

fn route(upstreams: &[&Backend], extra: &str) -> String {
    let list: Vec<String> = upstreams
        .iter()
        .map(|b| format!("\"{}\"", b.addr))
        .collect();
    format!(
        "host = \"app.localhost\"\nupstreams = [{}]\n{extra}\n",
        list.join(", ")
    )
}

async fn routable(h: &TestHarbor, host: &str) {
    eventually(Duration::from_secs(5), "the route to be served", || async {
        (get(h, host, "/").await.0 == 200).then_some(())
    })
    .await;
}

async fn round_robin_cycles_and_weights_hold(direct: bool) {
    let backends = [
        Backend::echo().await,
        Backend::echo().await,
        Backend::echo().await,
    ];
    let h = start(direct).await;
    h.write_route(
        "app.route",
        &route(
            &backends.iter().collect::<Vec<_>>(),
            "strategy = \"round-robin\"",
        ),
    );
    routable(&h, "app.localhost").await;

    let mut order = Vec::new();
    for _ in 0..9 {
        let (status, body) = get(&h, "app.localhost", "/").await;
        assert_eq!(status, 200);
        order.push(served_by(&body));
    }
    // Exact cycling: every window of three covers all three backends, in the same order.
    for window in order.windows(4) {
        assert_eq!(window[0], window[3], "{order:?}");
    }
    let distinct: std::collections::HashSet<_> = order.iter().collect();
    assert_eq!(distinct.len(), 3, "{order:?}");

    let weighted = format!(
        "host = \"w.localhost\"\nstrategy = \"weighted-round-robin\"\nupstreams = [\"{}\", {{ addr = \"{}\", weight = 3 }}]\n",
        backends[0].addr, backends[1].addr
    );
    h.write_route("w.route", &weighted);
    routable(&h, "w.localhost").await;
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..400 {
        let (_, body) = get(&h, "w.localhost", "/").await;
        *counts.entry(served_by(&body)).or_default() += 1;
    }
    // Settle any pick made while the route appeared, then the ratio is exact per cycle of 4.
    let heavy = counts[&backends[1].addr.to_string()];
    assert!((298..=302).contains(&heavy), "{counts:?}");
}

async fn hosts_paths_and_wildcards_route_and_unknown_hosts_get_404(direct: bool) {
    let (a, b, c) = (
        Backend::echo().await,
        Backend::echo().await,
        Backend::echo().await,
    );
    let h = start(direct).await;
    h.write_route(
        "root.route",
        &format!("host = \"site.localhost\"\nupstreams = [\"{}\"]\n", a.addr),
    );
    h.write_route(
        "api.route",
        &format!(
            "host = \"site.localhost\"\npath = \"/api\"\nupstreams = [\"{}\"]\n",
            b.addr
        ),
    );
    h.write_route(
        "wild.route",
        &format!(
            "host = \"*.apps.localhost\"\nupstreams = [\"{}\"]\n",
            c.addr
        ),
    );
    routable(&h, "site.localhost").await;
    eventually(Duration::from_secs(5), "all three routes", || async {
        (get(&h, "x.apps.localhost", "/").await.0 == 200
            && get(&h, "site.localhost", "/api").await.0 == 200)
            .then_some(())
    })
    .await;

    assert_eq!(
        served_by(&get(&h, "site.localhost", "/").await.1),
        a.addr.to_string()
    );
    assert_eq!(
        served_by(&get(&h, "site.localhost", "/api/users?x=1").await.1),
        b.addr.to_string()
    );
    assert_eq!(
        served_by(&get(&h, "site.localhost", "/apix").await.1),
        a.addr.to_string()
    );
    assert_eq!(
        served_by(&get(&h, "SITE.localhost:80", "/api").await.1),
        b.addr.to_string()
    );
    assert_eq!(
        served_by(&get(&h, "any.apps.localhost", "/x").await.1),
        c.addr.to_string()
    );

    let (status, body) = get(&h, "nowhere.localhost", "/").await;
    assert_eq!(status, 404);
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON 404");
    assert_eq!(body["error"], "no route");
    assert_eq!(body["host"], "nowhere.localhost");
}

async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_set(direct: bool) {
    let backend = Backend::echo().await;
    let h = start(direct).await;
    h.write_route("app.route", &route(&[&backend], ""));
    routable(&h, "app.localhost").await;

    // Raw bytes, so that nothing between the test and the proxy rewrites the headers.
    let addr = h.harbor().proxy_addr().expect("proxy");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            b"GET /headers HTTP/1.1\r\nHost: app.localhost\r\nConnection: keep-alive, X-Hop\r\n\
              X-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eDp5\r\n\
              TE: trailers\r\nX-Forwarded-For: 203.0.113.7\r\nX-Kept: yes\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("via: 1.1 harbor"),
        "{head}"
    );
    let sent: HashMap<String, String> = body
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for gone in ["x-hop", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            !sent.contains_key(gone),
            "{gone} reached the upstream: {sent:?}"
        );
    }
    assert_ne!(
        sent.get("connection").map(String::as_str),
        Some("keep-alive, X-Hop")
    );
    assert_eq!(sent["x-kept"], "yes");
    assert_eq!(sent["host"], "app.localhost", "the client's Host is kept");
    assert_eq!(sent["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(sent["x-forwarded-proto"], "http");
    assert_eq!(sent["x-forwarded-host"], "app.localhost");
    assert_eq!(sent["via"], "1.1 harbor");

    // A route may send another Host upstream.
    h.write_route("other.route", &format!("host = \"other.localhost\"\nupstream_host = \"internal.example\"\nupstreams = [\"{}\"]\n", backend.addr));
    routable(&h, "other.localhost").await;
    let (_, body) = get(&h, "other.localhost", "/").await;
    assert!(body.contains("\nhost: internal.example\n"), "{body}");
    assert!(
        body.contains("\nx-forwarded-host: other.localhost\n"),
        "{body}"
    );
}

async fn http2_clients_are_served_and_bodies_stream_both_ways(direct: bool) {
    let backend = Backend::echo().await;
    let h = start(direct).await;
    h.write_route("app.route", &route(&[&backend], ""));
    routable(&h, "app.localhost").await;

    // HTTP/2 names the host in :authority, so the client must resolve the name to the proxy.
    let addr = h.harbor().proxy_addr().expect("proxy");
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .resolve("app.localhost", addr)
        .build()
        .expect("client");
    let resp = h2
        .get(format!("http://app.localhost:{}/h2", addr.port()))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.expect("body");
    assert!(body.contains("via: 2.0 harbor"), "{body}");

    // 8 MiB up and back, sent in chunks: the echo backend streams it back.
    let chunk = vec![b'x'; 64 * 1024];
    let chunks =
        futures_util::stream::iter((0..128).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let resp = h
        .client
        .post(format!("{}/upload", h.proxy_base()))
        .header("host", "app.localhost")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.bytes().await.expect("echoed body").len(),
        8 * 1024 * 1024
    );
}

async fn websocket_upgrades_work_end_to_end(direct: bool) {
    let upstream = websocket_echo().await;
    let h = start(direct).await;
    h.write_route(
        "ws.route",
        &format!("host = \"ws.localhost\"\nupstreams = [\"{upstream}\"]\n"),
    );
    eventually(Duration::from_secs(5), "the ws route", || async {
        (get(&h, "ws.localhost", "/").await.0 != 404).then_some(())
    })
    .await;

    let addr = h.harbor().proxy_addr().expect("proxy");
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = http::Request::get("ws://ws.localhost/chat")
        .header("host", "ws.localhost")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .body(())
        .expect("request");
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    for text in ["hello", "through", "harbor"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("send");
        let echoed = ws.next().await.expect("a message").expect("ok");
        assert_eq!(echoed.into_text().expect("text").as_str(), text);
    }
    ws.close(None).await.expect("close");
}

async fn a_killed_upstream_is_retried_around_and_cooled_down(direct: bool) {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let h = start_with(direct, |c| c.proxy.cooldown = Duration::from_millis(400)).await;
    h.write_route("app.route", &route(&[&a, &b], "strategy = \"round-robin\""));
    routable(&h, "app.localhost").await;
    let mut events = h.events(None).await;

    let dead = a.addr;
    a.kill();
    // Every request succeeds: a refused connect is retried on the other upstream.
    for _ in 0..20 {
        let (status, body) = get(&h, "app.localhost", "/").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(served_by(&body), b.addr.to_string());
    }
    let event = events.next_of("upstream_health").await.data;
    assert_eq!(event["upstream"], dead.to_string());
    assert_eq!(event["healthy"], false);
    let metrics = h.metrics().await;
    let retries = metric(&metrics, "harbor_proxy_retries_total{service=\"app\"}");
    // Cooled down after the first refusal: the other 19 requests did not try it again.
    assert_eq!(retries, 1.0, "{metrics}");

    // Back on the same port: after the cooldown, it gets work again.
    let _revived = Backend::echo_on(dead).await;
    eventually(
        Duration::from_secs(5),
        "the revived upstream to serve again",
        || async {
            let (_, body) = get(&h, "app.localhost", "/").await;
            (served_by(&body) == dead.to_string()).then_some(())
        },
    )
    .await;
}

async fn health_checks_take_an_upstream_out_and_bring_it_back(direct: bool) {
    let (a, b) = (
        HttpBackend::start(Duration::ZERO).await,
        HttpBackend::start(Duration::ZERO).await,
    );
    let h = start(direct).await;
    h.write_route(
        "app.route",
        &format!(
            "host = \"app.localhost\"\nupstreams = [\"{}\", \"{}\"]\n[health]\npath = \"/healthz\"\ninterval = \"50ms\"\ntimeout = \"50ms\"\nrise = 2\nfall = 2\n",
            a.addr, b.addr
        ),
    );
    routable(&h, "app.localhost").await;
    let served = |body: String| body.trim_start_matches("served by ").to_owned();

    a.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(
        Duration::from_secs(5),
        "the sick upstream to be taken out",
        || async {
            let states = h
                .harbor()
                .routing()
                .upstream_states(&harbor::model::ServiceName::parse("app").expect("name"));
            states
                .iter()
                .any(|s| s.address == a.addr.to_string() && !s.healthy)
                .then_some(())
        },
    )
    .await;
    for _ in 0..10 {
        let (status, body) = get(&h, "app.localhost", "/").await;
        assert_eq!(status, 200);
        assert_eq!(served(body), b.addr.to_string());
    }
    let metrics = h.metrics().await;
    assert!(
        metrics.contains(&format!(
            "harbor_proxy_upstream_healthy{{service=\"app\",upstream=\"{}\"}} 0",
            a.addr
        )),
        "{metrics}"
    );

    // Both sick: fail fast with 503 rather than hang.
    b.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(
        Duration::from_secs(5),
        "a 503 with every upstream out",
        || async {
            let (status, body) = get(&h, "app.localhost", "/").await;
            (status == 503).then_some(body)
        },
    )
    .await;

    a.healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually(
        Duration::from_secs(5),
        "the recovered upstream to serve",
        || async {
            let (status, body) = get(&h, "app.localhost", "/").await;
            (status == 200 && served(body) == a.addr.to_string()).then_some(())
        },
    )
    .await;
}

async fn unreachable_and_slow_upstreams_get_502_and_504(direct: bool) {
    let slow = HttpBackend::start(Duration::from_secs(30)).await;
    let refusing = Refusing::bind();
    let closed = refusing.addr;
    let h = start_with(direct, |c| {
        c.proxy.upstream_timeout = Duration::from_millis(300)
    })
    .await;
    h.write_route(
        "down.route",
        &format!("host = \"down.localhost\"\nupstreams = [\"{closed}\"]\n"),
    );
    h.write_route(
        "slow.route",
        &format!(
            "host = \"slow.localhost\"\nupstreams = [\"{}\"]\n",
            slow.addr
        ),
    );
    eventually(Duration::from_secs(5), "both routes", || async {
        (get(&h, "down.localhost", "/").await.0 != 404
            && get(&h, "slow.localhost", "/").await.0 != 404)
            .then_some(())
    })
    .await;

    // The first request finds it refusing (502); then it is cooling down: 503 at once.
    let statuses: Vec<u16> =
        futures_util::future::join_all((0..1).map(|_| get(&h, "down.localhost", "/")))
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
    assert!(
        statuses.iter().all(|s| *s == 502 || *s == 503),
        "{statuses:?}"
    );
    let (status, body) = get(&h, "down.localhost", "/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no healthy upstream"), "{body}");

    let started = Instant::now();
    let (status, body) = get(&h, "slow.localhost", "/hang").await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

async fn registrations_route_and_expiries_stop_routing_within_100ms(direct: bool) {
    let backend = Backend::echo().await;
    let h = start(direct).await;
    let grant = h
        .register(json!({"name": "eph", "upstream": backend.addr.to_string(), "ttl_secs": 1}))
        .await;
    let registered = Instant::now();
    let routed = eventually(
        Duration::from_millis(100),
        "the registration to route",
        || async { (get(&h, "eph.localhost", "/").await.0 == 200).then(|| registered.elapsed()) },
    )
    .await;
    assert!(routed <= Duration::from_millis(100), "{routed:?}");

    let expires = common::parse_time(&grant["lease"]["expires_at"]);
    let until = expires
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(until).await;
    let expired = Instant::now();
    eventually(
        Duration::from_millis(100),
        "the expired instance to stop routing",
        || async { (get(&h, "eph.localhost", "/").await.0 == 404).then_some(()) },
    )
    .await;
    assert!(expired.elapsed() <= Duration::from_millis(100));
}

async fn shutdown_lets_requests_in_flight_finish(direct: bool) {
    let backend = HttpBackend::start(Duration::from_millis(400)).await;
    let mut h = start(direct).await;
    h.write_route(
        "app.route",
        &format!(
            "host = \"app.localhost\"\nupstreams = [\"{}\"]\n",
            backend.addr
        ),
    );
    routable(&h, "app.localhost").await;

    let (client, url) = (h.client.clone(), format!("{}/slow", h.proxy_base()));
    let request = tokio::spawn(async move {
        let resp = client
            .get(url)
            .header("host", "app.localhost")
            .send()
            .await
            .expect("sent");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    });
    // At the upstream, not merely connected: HTTP/1.1 lets a server close a connection whose
    // request it has not read yet. (Harbor's in-flight count would not do: the request before
    // may still be counted for a moment after its answer reached the client.)
    eventually(
        Duration::from_secs(5),
        "the request to reach the upstream",
        || async { (backend.slow_arrived.load(Ordering::SeqCst) > 0).then_some(()) },
    )
    .await;
    let cut = h.harbor.take().expect("running").shutdown().await;
    assert_eq!(cut, 0, "nothing was cut");
    let (status, body) = request.await.expect("request task");
    assert_eq!(status, 200);
    assert!(body.starts_with("slow from"), "{body}");
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// An HTTP/1.1 upstream written against the socket, so that its framing is exactly what a test
/// needs: `/plain` (5 bytes, `Content-Length`), `/nocontent` (204), `/early` (a 103 first),
/// `/garbage` (not HTTP), `/eof` (HTTP/1.0, no length: the body ends when it closes). It answers one request per connection and closes the
/// connection on the second without answering, like a server whose keep-alive timeout fires
/// just as a request arrives.
async fn scripted_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&seen).to_string();
                let answer: &[u8] = if head.starts_with("HEAD /plain") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
                } else if head.starts_with("GET /plain") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain"
                } else if head.starts_with("GET /nocontent") {
                    b"HTTP/1.1 204 No Content\r\n\r\n"
                } else if head.starts_with("GET /early") {
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else if head.starts_with("GET /garbage") {
                    b"NOT HTTP AT ALL\r\n\r\n"
                } else if head.starts_with("GET /eof") {
                    b"HTTP/1.0 200 OK\r\n\r\nuntil close"
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = stream.write_all(answer).await;
                if head.starts_with("GET /eof") {
                    return;
                }
                // The second request on this connection: closed unanswered.
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    addr
}

/// Sends `bytes` on one connection to the proxy and reads until the proxy closes it.
async fn raw_exchange(h: &TestHarbor, bytes: &[u8]) -> String {
    let addr = h.harbor().proxy_addr().expect("proxy");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

/// The direct path's own: it sends a request with no body again when a pooled socket turns out
/// closed unanswered. hyper's client resends only a request it never wrote, so the full stack
/// answers 502 there.
#[tokio::test]
async fn pipelined_requests_framing_and_stale_upstream_sockets() {
    let direct = true;
    let upstream = scripted_upstream().await;
    let h = start(direct).await;
    h.write_route(
        "raw.route",
        &format!("host = \"raw.localhost\"\nupstreams = [\"{upstream}\"]\n"),
    );
    eventually(Duration::from_secs(5), "the raw route", || async {
        (get(&h, "raw.localhost", "/plain").await == (200, "plain".to_owned())).then_some(())
    })
    .await;

    // Four requests in one write. Each reuse of an upstream socket meets a close, so each of
    // the last three is sent again on a new socket; a HEAD answer carries no body although it
    // names a length; the HTTP/1.0 request at the end goes to the full HTTP stack, on the same
    // connection, which then closes.
    let all = raw_exchange(
        &h,
        b"GET /plain HTTP/1.1\r\nHost: raw.localhost\r\n\r\n\
          GET /nocontent HTTP/1.1\r\nHost: raw.localhost\r\n\r\n\
          HEAD /plain HTTP/1.1\r\nHost: raw.localhost\r\n\r\n\
          GET /plain HTTP/1.0\r\nHost: raw.localhost\r\n\r\n",
    )
    .await;
    let answers: Vec<&str> = all.split("HTTP/1.").skip(1).collect();
    assert_eq!(answers.len(), 4, "{all}");
    assert!(
        answers[0].starts_with("1 200") && answers[0].ends_with("\r\n\r\nplain"),
        "{all}"
    );
    assert!(
        answers[1].starts_with("1 204") && answers[1].ends_with("\r\n\r\n"),
        "{all}"
    );
    assert!(
        answers[2].starts_with("1 200") && answers[2].ends_with("\r\n\r\n"),
        "{all}"
    );
    assert!(
        answers[2]
            .to_ascii_lowercase()
            .contains("content-length: 5"),
        "{all}"
    );
    assert!(
        answers[3].contains(" 200 ") && answers[3].ends_with("plain"),
        "{all}"
    );
    // The full stack names the client's HTTP version in `Via`.
    for (answer, via) in answers.iter().zip(["1.1", "1.1", "1.1", "1.0"]) {
        assert!(
            answer
                .to_ascii_lowercase()
                .contains(&format!("via: {via} harbor")),
            "{all}"
        );
    }

    // A body that ends when the upstream closes: the client gets all of it, told the
    // connection closes after.
    let all = raw_exchange(&h, b"GET /eof HTTP/1.1\r\nHost: raw.localhost\r\n\r\n").await;
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    assert!(
        all.to_ascii_lowercase().contains("connection: close\r\n"),
        "{all}"
    );
    assert!(all.ends_with("\r\n\r\nuntil close"), "{all}");

    // An interim answer is passed on before the final one; an answer that is not HTTP is a 502.
    let all = raw_exchange(
        &h,
        b"GET /early HTTP/1.1\r\nHost: raw.localhost\r\n\r\nGET /garbage HTTP/1.1\r\nHost: raw.localhost\r\n\r\n",
    )
    .await;
    assert!(all.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{all}");
    assert!(all.contains("\r\n\r\nHTTP/1.1 200 OK\r\n"), "{all}");
    assert!(
        all.contains("\r\n\r\nokHTTP/1.1 502 Bad Gateway\r\n"),
        "{all}"
    );

    // An unknown host on a keep-alive connection gets its 404 and the connection goes on.
    let all = raw_exchange(
        &h,
        b"GET / HTTP/1.1\r\nHost: nowhere.localhost\r\n\r\nGET /plain HTTP/1.1\r\nHost: raw.localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(all.starts_with("HTTP/1.1 404 Not Found\r\n"), "{all}");
    assert!(all.contains("\"error\":\"no route\""), "{all}");
    assert!(all.ends_with("\r\n\r\nplain"), "{all}");
}

async fn request_bodies_reach_the_upstream_and_a_broken_one_gets_400(direct: bool) {
    let backend = Backend::echo().await;
    let h = start(direct).await;
    h.write_route("app.route", &route(&[&backend], ""));
    routable(&h, "app.localhost").await;

    // A body with a length, then one in chunks, on one keep-alive connection.
    let all = raw_exchange(
        &h,
        b"POST /a HTTP/1.1\r\nHost: app.localhost\r\nContent-Length: 11\r\n\r\nhello world\
          POST /b HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nchunk\r\n3\r\ned!\r\n0\r\n\r\n",
    )
    .await;
    let answers: Vec<&str> = all.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 2, "{all}");
    assert!(
        answers[0].starts_with("200") && answers[0].contains("hello world"),
        "{all}"
    );
    // The echo answers in chunks too, passed on as they are.
    assert!(
        answers[1].starts_with("200")
            && answers[1].ends_with("5\r\nchunk\r\n3\r\ned!\r\n0\r\n\r\n"),
        "{all}"
    );

    // A chunk size that is not hex: 400, and the connection closes.
    let all = raw_exchange(
        &h,
        b"POST / HTTP/1.1\r\nHost: app.localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    )
    .await;
    assert!(all.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{all}");
    assert!(all.contains("\"error\":\"bad request\""), "{all}");
}

/// `hash_key = "header:NAME"` and `"cookie:NAME"` give consistent hashing the session's value:
/// each session stays on one upstream, sessions spread over the upstreams, and a request with
/// neither is keyed by the client's address.
async fn a_header_or_cookie_hash_key_keeps_a_session_on_one_upstream(direct: bool) {
    let backends = [
        Backend::echo().await,
        Backend::echo().await,
        Backend::echo().await,
    ];
    let h = start(direct).await;
    let upstreams = backends.iter().collect::<Vec<_>>();
    for (file, rule) in [
        ("by-header", "header:X-Session"),
        ("by-cookie", "cookie:sid"),
    ] {
        let text = route(
            &upstreams,
            &format!("strategy = \"consistent-hash\"\nhash_key = \"{rule}\""),
        )
        .replace("app.localhost", &format!("{file}.localhost"));
        h.write_route(&format!("{file}.route"), &text);
        routable(&h, &format!("{file}.localhost")).await;
    }
    let send = |host: &'static str, header: Option<(&'static str, String)>| {
        let mut req = h
            .client
            .get(format!("{}/", h.proxy_base()))
            .header("host", host);
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        async move {
            let resp = req.send().await.expect("a request through the proxy");
            assert_eq!(resp.status(), 200);
            served_by(&resp.text().await.expect("a body"))
        }
    };
    // A session's header: its own, or a cookie among others.
    let header = |cookie: bool, s: u32| {
        if cookie {
            ("cookie", format!("theme=dark; sid=user-{s}; x=1"))
        } else {
            ("x-session", format!("user-{s}"))
        }
    };
    for (host, by_cookie) in [
        ("by-header.localhost", false),
        ("by-cookie.localhost", true),
    ] {
        let header = |s: u32| header(by_cookie, s);
        let mut seen = HashMap::new();
        for session in 0..24u32 {
            let first = send(host, Some(header(session))).await;
            for _ in 0..4 {
                assert_eq!(send(host, Some(header(session))).await, first, "{host}");
            }
            seen.insert(session, first);
        }
        let spread: std::collections::HashSet<_> = seen.values().collect();
        assert!(
            spread.len() >= 2,
            "{host}: every session on one upstream: {seen:?}"
        );
        // Without the header or cookie: the client's address, the same every time.
        let bare = send(host, None).await;
        for _ in 0..4 {
            assert_eq!(send(host, None).await, bare, "{host}");
        }
    }
}

// Every test runs on both HTTP paths: the direct one first, and hyper's alone.
common::on_both_paths!(
    round_robin_cycles_and_weights_hold,
    hosts_paths_and_wildcards_route_and_unknown_hosts_get_404,
    hop_by_hop_headers_are_stripped_and_forwarding_headers_set,
    http2_clients_are_served_and_bodies_stream_both_ways,
    websocket_upgrades_work_end_to_end,
    a_killed_upstream_is_retried_around_and_cooled_down,
    health_checks_take_an_upstream_out_and_bring_it_back,
    unreachable_and_slow_upstreams_get_502_and_504,
    registrations_route_and_expiries_stop_routing_within_100ms,
    shutdown_lets_requests_in_flight_finish,
    request_bodies_reach_the_upstream_and_a_broken_one_gets_400,
    a_header_or_cookie_hash_key_keeps_a_session_on_one_upstream,
);
