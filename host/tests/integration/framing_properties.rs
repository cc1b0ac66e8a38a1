//! A property of both HTTP paths, on random inputs with fixed seeds: valid requests (with and
//! without bodies, lengths, chunks, extensions, trailers) mutated byte by byte, a second request
//! pipelined after each, sent through Harbor to an upstream that records what it reads. An
//! independent reader (`common::strict::client_request`) reads the same bytes as the oracle.
//!
//! Whatever Harbor answers, it must agree with the oracle: each request it forwards arrives
//! upstream as the same message the oracle read at that place in the stream (method, target,
//! body), and it never forwards or answers past a point where the oracle finds the stream
//! malformed. Harbor may refuse more than the oracle does (a refusal is always safe), and answer
//! a request without a route from its head alone, closing; it may never read a boundary where
//! the oracle reads none, or a different one.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::strict::{self, Read};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "props.localhost";
/// Cases per path: each is a round trip through a real Harbor, so a few hundred run in seconds.
const CASES: u32 = 300;

type Seen = Arc<Mutex<Vec<strict::Message>>>;

/// An upstream that records each whole request it reads and answers `200`.
async fn upstream() -> (std::net::SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    match strict::request(&buf) {
                        Read::Whole(m, n) => {
                            buf.drain(..n);
                            log.lock().expect("the upstream's record").push(m);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(ok).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        // What Harbor forwards must always read: the test fails on the record.
                        Read::Malformed(why) => {
                            log.lock()
                                .expect("the upstream's record")
                                .push(strict::Message {
                                    start: format!("MALFORMED {why}"),
                                    headers: Vec::new(),
                                    body: buf,
                                });
                            return;
                        }
                        Read::Partial => {}
                    }
                    match stream.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// A valid request to mutate.
#[derive(Debug, Clone)]
struct Request {
    method: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    None,
    Length(Vec<u8>),
    /// Chunks, each with optional extensions; then trailer fields.
    Chunked(Vec<(Vec<u8>, String)>, Vec<String>),
}

impl Request {
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{} /p/ HTTP/1.1\r\nHost: {HOST}\r\n", self.method).into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        match &self.body {
            Body::None => out.extend_from_slice(b"\r\n"),
            Body::Length(body) => {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                out.extend_from_slice(body);
            }
            Body::Chunked(chunks, trailers) => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for (data, ext) in chunks {
                    out.extend_from_slice(format!("{:x}{ext}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(data);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                for t in trailers {
                    out.extend_from_slice(format!("{t}\r\n").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop::sample::select(b"abcxyz0129\r\n :;".to_vec()), 1..24)
}

fn request() -> impl Strategy<Value = Request> {
    let headers = proptest::collection::vec(
        (
            prop::sample::select(vec![
                "X-A",
                "Accept",
                "Connection",
                "X-Forwarded-For",
                "Cookie",
            ]),
            "[a-z0-9 ,;=-]{0,10}",
        ),
        0..3,
    );
    let chunk = (
        data(),
        prop::sample::select(vec!["", ";a", ";a=b", " ; a = \"x y\"", ";a;b=c"]),
    )
        .prop_map(|(d, e)| (d, e.to_owned()));
    let body = prop_oneof![
        Just(Body::None),
        data().prop_map(Body::Length),
        (
            proptest::collection::vec(chunk, 0..4),
            proptest::collection::vec(prop::sample::select(vec!["X-T: 1", "X-U: a b"]), 0..2),
        )
            .prop_map(|(c, t)| Body::Chunked(c, t.into_iter().map(str::to_owned).collect())),
    ];
    (
        prop::sample::select(vec!["GET", "POST", "PUT"]),
        headers,
        body,
    )
        .prop_map(|(method, headers, body)| Request {
            method,
            headers: headers
                .into_iter()
                .map(|(n, v)| {
                    // `Connection` stays among the values a client sends.
                    let v = if n == "Connection" {
                        "keep-alive".to_owned()
                    } else {
                        v
                    };
                    (n, v.trim().to_owned())
                })
                .collect(),
            body,
        })
}

/// A byte-level mutation: where (a fraction of the length), and what.
#[derive(Debug, Clone)]
enum Mutation {
    Insert(prop::sample::Index, u8),
    Replace(prop::sample::Index, u8),
    Delete(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop::sample::select(b"\r\n \t\0\x01;,:0f9-+\"x".to_vec());
    prop_oneof![
        (any::<prop::sample::Index>(), byte.clone()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<prop::sample::Index>(), byte).prop_map(|(i, b)| Mutation::Replace(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Delete),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match m {
            Mutation::Insert(i, b) => {
                let at = i.index(bytes.len() + 1);
                bytes.insert(at, *b);
            }
            Mutation::Replace(i, b) if !bytes.is_empty() => {
                let at = i.index(bytes.len());
                bytes[at] = *b;
            }
            Mutation::Delete(i) if !bytes.is_empty() => {
                bytes.remove(i.index(bytes.len()));
            }
            _ => {}
        }
    }
    bytes
}

/// What the oracle reads from the stream: the messages, in order, up to its end or to a point
/// it finds malformed.
fn oracle(mut stream: &[u8]) -> (Vec<strict::Message>, bool) {
    let mut messages = Vec::new();
    loop {
        match strict::client_request(stream) {
            Read::Whole(m, n) => {
                messages.push(m);
                stream = &stream[n..];
            }
            Read::Malformed(_) => return (messages, true),
            Read::Partial => return (messages, false),
        }
    }
}

/// Sends `bytes` and ends the sending side; returns the statuses of the answers, read until
/// the proxy closes.
async fn statuses(proxy: std::net::SocketAddr, bytes: &[u8]) -> Result<Vec<u16>, String> {
    let mut stream = TcpStream::connect(proxy).await.map_err(|e| e.to_string())?;
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| "Harbor did not close within 10 s".to_owned())?
        .map_err(|e| e.to_string())
        .ok();
    let mut out = Vec::new();
    let mut rest = &buf[..];
    while !rest.is_empty() {
        match strict::response(rest, false, true) {
            Read::Whole(m, n) => {
                if m.status() >= 200 {
                    out.push(m.status());
                }
                rest = &rest[n..];
            }
            other => return Err(format!("Harbor answered outside the rules: {other:?}")),
        }
    }
    Ok(out)
}

fn essentials(m: &strict::Message) -> (String, String, Vec<u8>) {
    let method = m.start.split(' ').next().unwrap_or("").to_owned();
    (method, m.target().to_owned(), m.body.clone())
}

fn check(
    rt: &tokio::runtime::Runtime,
    proxy: std::net::SocketAddr,
    seen: &Seen,
    request: &Request,
    mutations: &[Mutation],
) -> Result<(), TestCaseError> {
    let mut bytes = mutate(request.bytes(), mutations);
    bytes.extend_from_slice(format!("GET /next HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes());
    let before = seen.lock().expect("the upstream's record").len();
    let answers = rt
        .block_on(statuses(proxy, &bytes))
        .map_err(TestCaseError::fail)?;
    let forwarded: Vec<strict::Message> =
        seen.lock().expect("the upstream's record")[before..].to_vec();
    let (read, malformed) = oracle(&bytes);
    let input = String::from_utf8_lossy(&bytes);
    let mut expected_upstream = Vec::new();
    for (i, &status) in answers.iter().enumerate() {
        let refusal = (400..500).contains(&status) && status != 404;
        if refusal {
            prop_assert!(
                i + 1 == answers.len(),
                "answers after a refusal {answers:?}: {input:?}"
            );
            continue;
        }
        // A request with no route is answered from its head; its body, unread, closes the
        // connection, and nothing went upstream.
        if status == 404 && i + 1 == answers.len() {
            continue;
        }
        prop_assert!(
            i < read.len(),
            "Harbor answered {answers:?} where the oracle read {} messages (malformed: {malformed}): {input:?}",
            read.len()
        );
        if status == 200 {
            expected_upstream.push(essentials(&read[i]));
        } else {
            prop_assert_eq!(status, 404, "{:?}", input);
        }
    }
    let got: Vec<_> = forwarded.iter().map(essentials).collect();
    prop_assert_eq!(got, expected_upstream, "input {:?}", input);
    Ok(())
}

fn run(direct: bool, seed: u8) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (h, seen) = rt.block_on(async {
        let (addr, seen) = upstream().await;
        let h = common::start_with(move |c| c.proxy.direct_http1 = direct).await;
        h.write_route(
            "props.route",
            &format!("host = \"{HOST}\"\nupstreams = [\"{addr}\"]\n"),
        );
        let proxy = h.harbor().proxy_addr().expect("proxy");
        let probe = format!("GET /ready HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
        common::eventually(Duration::from_secs(5), "the route", || async {
            (statuses(proxy, probe.as_bytes()).await.ok()? == [200]).then_some(())
        })
        .await;
        (h, seen)
    });
    let proxy = h.harbor().proxy_addr().expect("proxy");
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let strategy = (request(), proptest::collection::vec(mutation(), 0..3));
    let result = runner.run(&strategy, |(request, mutations)| {
        check(&rt, proxy, &seen, &request, &mutations)
    });
    rt.block_on(h.shutdown());
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn the_direct_path_reads_mutated_requests_as_a_strict_reader_does_or_refuses_them() {
    run(true, 7);
}

#[test]
fn the_full_stack_reads_mutated_requests_as_a_strict_reader_does_or_refuses_them() {
    run(false, 11);
}
