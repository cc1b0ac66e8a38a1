//! Request smuggling and response splitting, end to end: raw bytes through both HTTP paths (the
//! direct one and hyper's, `--no-direct-http1`) to an upstream that records exactly what
//! arrives and reads it with a strict parser of the tests' own (`common::strict`).
//!
//! Every request case ends one of two ways: refused with a 4xx and the connection closed, with
//! no whole request upstream; or the upstream reads exactly the one request Harbor read (its
//! body as expected), and the request pipelined after it arrives on its own, carrying Harbor's
//! `X-Forwarded-For`. After every case another client's request must get its own answer, so a
//! desynchronised pooled socket shows. Response cases have the upstream misbehave instead.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::strict::{self, Read};
use common::{TestHarbor, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOST: &str = "framing.localhost";

/// What reached the upstream, on which of its connections.
#[derive(Debug, Clone)]
enum Seen {
    Request(strict::Message),
    /// The connection ended inside a message (these bytes of it).
    Incomplete(Vec<u8>),
    Malformed(String, Vec<u8>),
}

#[derive(Debug, Clone)]
struct Record {
    conn: usize,
    seen: Seen,
}

impl Record {
    /// Whether the record belongs to the case marked `mark` (a target segment like `/7/`).
    fn mentions(&self, mark: &str) -> bool {
        match &self.seen {
            Seen::Request(m) => m.target().contains(mark),
            Seen::Incomplete(raw) | Seen::Malformed(_, raw) => {
                String::from_utf8_lossy(raw).contains(mark)
            }
        }
    }
}

type Records = Arc<Mutex<Vec<Record>>>;

/// Answers for `/r/<name>/...`: the upstream misbehaving on purpose.
fn scripted(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "conn-cl" => b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 6\r\n\r\nabcdef",
        "plus-cl" => b"HTTP/1.1 200 OK\r\nContent-Length: +6\r\n\r\nabcdef",
        "two-cl" => b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Length: 7\r\n\r\nabcdef",
        "list-cl" => b"HTTP/1.1 200 OK\r\nContent-Length: 6, 6\r\n\r\nabcdef",
        "cl-te" => b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n",
        "te-gzip" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabcdef",
        "te-two" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n",
        "http10-te" => b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n",
        "bare-lf" => b"HTTP/1.1 200 OK\nContent-Length: 6\n\nabcdef",
        "obs-fold" => b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 6\r\n\r\nabcdef",
        "nul" => b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 6\r\n\r\nabcdef",
        "space-colon" => b"HTTP/1.1 200 OK\r\nContent-Length : 6\r\n\r\nabcdef",
        "chunk-bare-lf" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\nabcdef\r\n0\r\n\r\n",
        "chunk-huge" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabcdef\r\n0\r\n\r\n",
        "chunk-ext" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6;x=1;y=\"a b\"\r\nabcdef\r\n0\r\nX-T: 1\r\n\r\n",
        "cl-extra" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef",
        "head-body" => b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabcdef",
        _ => return None,
    })
}

/// An upstream that records every request it reads strictly, answering each with
/// `seen <target>` (or a scripted answer), and keeps the connection open for more.
async fn recording_upstream() -> (std::net::SocketAddr, Records) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let records: Records = Arc::default();
    let log = records.clone();
    tokio::spawn(async move {
        for conn in 0.. {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(record_connection(stream, conn, log.clone()));
        }
    });
    (addr, records)
}

async fn record_connection(mut stream: TcpStream, conn: usize, log: Records) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let record = |seen| {
        log.lock()
            .expect("the upstream's record")
            .push(Record { conn, seen })
    };
    loop {
        match strict::request(&buf) {
            Read::Whole(message, n) => {
                buf.drain(..n);
                let target = message.target().to_owned();
                let head_request = message.start.starts_with("HEAD ");
                record(Seen::Request(message));
                let name = target.strip_prefix("/r/").and_then(|r| r.split('/').next());
                let answer = match name.and_then(scripted) {
                    Some(raw) => raw.to_vec(),
                    None if head_request => format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                        target.len() + 5
                    )
                    .into_bytes(),
                    None => format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\nseen {target}",
                        target.len() + 5
                    )
                    .into_bytes(),
                };
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
                continue;
            }
            Read::Malformed(why) => {
                record(Seen::Malformed(why, buf));
                return;
            }
            Read::Partial => {}
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => {
                if !buf.is_empty() {
                    record(Seen::Incomplete(buf));
                }
                return;
            }
        }
    }
}

/// What the client read back: the answers, in order, and whether the connection was closed.
struct Answers {
    messages: Vec<strict::Message>,
    closed: bool,
    rest: Vec<u8>,
}

/// Sends `bytes` on a new connection and reads answers until `want` of them have come (the
/// connection may stay open) or the proxy closes. `heads`: which answers are to `HEAD`s.
async fn exchange(h: &TestHarbor, bytes: &[u8], want: usize, heads: &[bool]) -> Answers {
    let addr = h.harbor().proxy_addr().expect("proxy");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // A refused request may be closed on before all of it is read: the answer still comes.
    let _ = stream.write_all(bytes).await;
    let mut buf = Vec::new();
    let mut messages = Vec::new();
    let mut closed = false;
    let mut chunk = [0u8; 8192];
    let read = async {
        loop {
            let head = heads.get(messages.len()).copied().unwrap_or(false);
            match strict::response(&buf, head, closed) {
                Read::Whole(message, n) => {
                    buf.drain(..n);
                    // Interim answers (100 Continue) are not counted.
                    if message.status() < 200 {
                        continue;
                    }
                    messages.push(message);
                    if messages.len() == want {
                        return;
                    }
                    continue;
                }
                Read::Malformed(why) => panic!("Harbor answered outside the rules: {why}: {buf:?}"),
                Read::Partial if closed => return,
                Read::Partial => {}
            }
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => closed = true,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answers within 10 s");
    Answers {
        messages,
        closed,
        rest: buf,
    }
}

enum Expect {
    /// Refused with a 4xx; the connection closes.
    Refused,
    /// Forwarded as one request with this body.
    Body(&'static [u8]),
}

struct Case {
    name: &'static str,
    /// The request, with `{T}` for its target path and `{H}` for the host.
    text: &'static [u8],
    expect: Expect,
}

const fn refused(name: &'static str, text: &'static [u8]) -> Case {
    Case {
        name,
        text,
        expect: Expect::Refused,
    }
}

const fn body(name: &'static str, text: &'static [u8], body: &'static [u8]) -> Case {
    Case {
        name,
        text,
        expect: Expect::Body(body),
    }
}

/// A request hidden in a body; `{SL}` in a case is its length, `{SX}` the same in hex.
const SMUGGLED: &str = "GET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n";

/// The corpus. `{N}` is the case's number in three digits; a smuggled request targets
/// `/smuggled/{N}/` and must never reach the upstream whole.
const CASES: &[Case] = &[
    // `Connection` naming a framing header.
    refused("connection names content-length", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nConnection: keep-alive, Content-Length\r\nContent-Length: {SL}\r\n\r\nGET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("connection names content-length, upper case", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nConnection: CONTENT-LENGTH\r\nContent-Length: {SL}\r\n\r\nGET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("connection names transfer-encoding", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    refused("connection names host", b"GET {T} HTTP/1.1\r\nHost: {H}\r\nConnection: host\r\n\r\n"),
    refused("second connection header names content-length", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nConnection: keep-alive\r\nConnection: content-length\r\nContent-Length: {SL}\r\n\r\nGET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    body("connection names another header", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    // CL.TE, TE.CL, TE.TE.
    refused("content-length then transfer-encoding", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("transfer-encoding then content-length", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nContent-Length: 46\r\n\r\n0\r\n\r\nGET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("chunked, identity", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"),
    refused("identity, chunked", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n"),
    refused("gzip, chunked", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    refused("xchunked", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    refused("chunked in quotes", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n"),
    refused("space before the colon of transfer-encoding", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    refused("tab before the colon of transfer-encoding", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding\t: chunked\r\n\r\n0\r\n\r\n"),
    refused("transfer-encoding twice", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    refused("transfer-encoding chunked then identity", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n"),
    refused("transfer-encoding folded", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
    refused("transfer-encoding behind a fold", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nX-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    refused("transfer-encoding in HTTP/1.0", b"POST {T} HTTP/1.0\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n0\r\n\r\n"),
    body("transfer-encoding after a tab", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
    body("transfer-encoding in capitals", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
    body("transfer_encoding is another header", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer_Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    // Content-Length.
    refused("a plus sign", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: +5\r\n\r\nhello"),
    refused("a minus sign", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: -1\r\n\r\nhello"),
    refused("two numbers", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5 5\r\n\r\nhello"),
    refused("a list", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5, 5\r\n\r\nhello"),
    refused("the same length twice", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    refused("two lengths", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 0\r\nContent-Length: {SL}\r\n\r\nGET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("hex", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 0x5\r\n\r\nhello"),
    refused("a decimal point", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5.0\r\n\r\nhello"),
    refused("an overflowing length", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 18446744073709551621\r\n\r\nhello"),
    refused("an empty length", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: \r\n\r\nhello"),
    refused("space before the colon of content-length", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length : 5\r\n\r\nhello"),
    refused("a NUL in the length", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\x00\r\n\r\nhello"),
    body("leading zeros", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 0005\r\n\r\nhello", b"hello"),
    body("a body on a GET", b"GET {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    body("a zero length", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 0\r\n\r\n", b""),
    // Chunk framing.
    refused("bare LF after a chunk size", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
    refused("bare LF after chunk data", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n"),
    refused("bare LF ending the body", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\n\n"),
    refused("CRs before the LF", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\r\nhello\r\n0\r\n\r\n"),
    refused("a control byte in an extension", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5;\x01\r\nhello\r\n0\r\n\r\n"),
    refused("an extension that is not a token", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5;a b\r\nhello\r\n0\r\n\r\n"),
    refused("an extension hiding a LF", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5;a\n0\r\n\r\nhello\r\n0\r\n\r\n"),
    refused("an unterminated quoted extension", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"b\r\nhello\r\n0\r\n\r\n"),
    refused("space after the size", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"),
    refused("sixteen fs", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
    refused("a size that wraps", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"),
    refused("a signed size", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"),
    refused("a 0x size", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n"),
    refused("more data than the size", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"),
    refused("less data than the size", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nhello\r\n0\r\n\r\n"),
    refused("a trailer ending in a bare LF", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\n\r\n"),
    refused("a folded trailer", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n 2\r\n\r\n"),
    refused("no end after the last chunk", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"),
    body("extensions by the grammar", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5;a=1;b=\"x;y\" ; c\r\nhello\r\n0;end\r\n\r\n", b"hello"),
    body("a trailer", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", b"hello"),
    body("upper-case hex and zeros", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n0000A\r\nhelloworld\r\n1\r\n!\r\n000\r\n\r\n", b"helloworld!"),
    body("a chunk holding a request", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n{SX}\r\nGET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n\r\n0\r\n\r\n", b"GET /smuggled/{N}/ HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    // Heads.
    refused("bare LF after the request line", b"GET {T} HTTP/1.1\nHost: {H}\r\n\r\n"),
    refused("bare LF after a field", b"GET {T} HTTP/1.1\r\nHost: {H}\nX-A: 1\r\n\r\n"),
    refused("bare LF ending the head", b"GET {T} HTTP/1.1\r\nHost: {H}\r\n\n"),
    refused("bare CR", b"GET {T} HTTP/1.1\r\nHost: {H}\rX-A: 1\r\n\r\n"),
    refused("a NUL in a value", b"GET {T} HTTP/1.1\r\nHost: {H}\r\nX-A: a\x00b\r\n\r\n"),
    refused("a control byte in a value", b"GET {T} HTTP/1.1\r\nHost: {H}\r\nX-A: a\x01b\r\n\r\n"),
    refused("DEL in a name", b"GET {T} HTTP/1.1\r\nHost: {H}\r\nX-\x7fA: 1\r\n\r\n"),
    refused("an obs-fold", b"GET {T} HTTP/1.1\r\nHost: {H}\r\nX-A: 1\r\n 2\r\n\r\n"),
    refused("a field without a colon", b"GET {T} HTTP/1.1\r\nHost: {H}\r\nX-A\r\n\r\n"),
    refused("an empty field name", b"GET {T} HTTP/1.1\r\nHost: {H}\r\n: 1\r\n\r\n"),
    refused("two hosts", b"GET {T} HTTP/1.1\r\nHost: {H}\r\nHost: other.localhost\r\n\r\n"),
    refused("no host", b"GET {T} HTTP/1.1\r\nX-A: 1\r\n\r\n"),
    refused("a host with a space", b"GET {T} HTTP/1.1\r\nHost: {H} x\r\n\r\n"),
    refused("a host with a slash", b"GET {T} HTTP/1.1\r\nHost: {H}/x\r\n\r\n"),
    refused("a fragment", b"GET {T}#frag HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("user information in an absolute target", b"GET http://user@{H}{T} HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("HTTP/0.9", b"GET {T}\r\n\r\n"),
    refused("HTTP/1.2", b"GET {T} HTTP/1.2\r\nHost: {H}\r\n\r\n"),
    refused("two spaces in the request line", b"GET  {T} HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("a space in the target", b"GET {T} x HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    refused("a target in no form", b"GET x{T} HTTP/1.1\r\nHost: {H}\r\n\r\n"),
    body("an absolute target names the host", b"POST http://{H}{T} HTTP/1.1\r\nHost: other.localhost\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    body("HTTP/1.0 with a length, kept alive", b"POST {T} HTTP/1.0\r\nHost: {H}\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    body("expect 100-continue", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    // Pipelining after a body.
    body("a length, then a request at once", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    body("chunks, then a request at once", b"POST {T} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n", b"hello"),
];

/// Fills a case's placeholders (the corpus is ASCII, so the text round trip keeps every byte).
fn fill(text: &[u8], n: usize) -> Vec<u8> {
    let smuggled = SMUGGLED
        .replace("{H}", HOST)
        .replace("{N}", &format!("{n:03}"));
    String::from_utf8_lossy(text)
        .replace("{SL}", &smuggled.len().to_string())
        .replace("{SX}", &format!("{:x}", smuggled.len()))
        .replace("{T}", &format!("/case/{n:03}/"))
        .replace("{H}", HOST)
        .replace("{N}", &format!("{n:03}"))
        .into_bytes()
}

async fn harbor(direct: bool, upstream: std::net::SocketAddr) -> TestHarbor {
    let h = common::start_with(move |c| c.proxy.direct_http1 = direct).await;
    h.write_route(
        "framing.route",
        &format!("host = \"{HOST}\"\nupstreams = [\"{upstream}\"]\n"),
    );
    eventually(Duration::from_secs(5), "the route", || async {
        let answers = exchange(
            &h,
            format!("GET /ready HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes(),
            1,
            &[],
        )
        .await;
        (answers.messages.first().map(strict::Message::status) == Some(200)).then_some(())
    })
    .await;
    h
}

fn records_of(records: &Records, mark: &str) -> Vec<Record> {
    records
        .lock()
        .expect("the upstream's record")
        .iter()
        .filter(|r| r.mentions(mark))
        .cloned()
        .collect()
}

/// Runs the corpus through one path; returns what failed.
async fn run_requests(direct: bool) -> Vec<String> {
    let (upstream, records) = recording_upstream().await;
    let h = harbor(direct, upstream).await;
    let mut failures = Vec::new();
    for (n, case) in CASES.iter().enumerate() {
        let mut bytes = fill(case.text, n);
        let second =
            format!("GET /second/{n:03}/ HTTP/1.1\r\nHost: {HOST}\r\nX-Probe: {n}\r\n\r\n");
        bytes.extend_from_slice(second.as_bytes());
        let answers = exchange(&h, &bytes, 2, &[]).await;
        let mut fail = |why: String| failures.push(format!("#{n} {}: {why}", case.name));
        let statuses: Vec<u16> = answers
            .messages
            .iter()
            .map(strict::Message::status)
            .collect();
        match case.expect {
            Expect::Refused => {
                if statuses.len() != 1 || !(400..500).contains(&statuses[0]) {
                    fail(format!("answered {statuses:?}, not one 4xx"));
                } else if !answers.closed || !answers.rest.is_empty() {
                    fail("the connection was not closed after the refusal".into());
                }
                for record in records_of(&records, &format!("/{n:03}/")) {
                    if let Seen::Request(m) = &record.seen {
                        fail(format!("the upstream read a whole request: {}", m.start));
                    }
                }
            }
            Expect::Body(expected) => {
                let expected = fill(expected, n);
                if statuses != [200, 200] {
                    fail(format!("answered {statuses:?}, not 200 twice"));
                }
                let seen = records_of(&records, &format!("/{n:03}/"));
                match &seen[..] {
                    [
                        Record {
                            seen: Seen::Request(first),
                            ..
                        },
                        Record {
                            seen: Seen::Request(second),
                            ..
                        },
                    ] => {
                        if !first.target().starts_with(&format!("/case/{n:03}/")) {
                            fail(format!("the first request upstream was {}", first.start));
                        }
                        if first.body != expected {
                            fail(format!(
                                "the body upstream was {:?}, not {:?}",
                                String::from_utf8_lossy(&first.body),
                                String::from_utf8_lossy(&expected)
                            ));
                        }
                        if first.header("host") != Some(HOST) {
                            fail(format!("Host upstream was {:?}", first.header("host")));
                        }
                        let xff = second.header("x-forwarded-for").unwrap_or("");
                        if second.header("x-probe") != Some(&n.to_string())
                            || !xff.ends_with("127.0.0.1")
                        {
                            fail(format!("the second request upstream was {second:?}"));
                        }
                    }
                    other => fail(format!("the upstream saw {other:?}")),
                }
            }
        }
        // Another client gets its own answer, whatever the case did to pooled sockets.
        let victim = format!("GET /victim/{n:03}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        let answers = exchange(&h, victim.as_bytes(), 1, &[]).await;
        let body = answers
            .messages
            .first()
            .map(|m| m.body.clone())
            .unwrap_or_default();
        if body != format!("seen /victim/{n:03}/").as_bytes() {
            failures.push(format!(
                "#{n} {}: the next client got {:?}",
                case.name,
                String::from_utf8_lossy(&body)
            ));
        }
    }
    for record in records.lock().expect("the upstream's record").iter() {
        match &record.seen {
            Seen::Request(m) if m.target().starts_with("/smuggled/") => {
                failures.push(format!("a smuggled request reached the upstream: {m:?}"));
            }
            Seen::Malformed(why, raw) => failures.push(format!(
                "the upstream could not read what Harbor sent ({why}): {:?}",
                String::from_utf8_lossy(raw)
            )),
            _ => {}
        }
    }
    h.shutdown().await;
    failures
}

#[tokio::test]
async fn the_request_corpus_is_refused_or_framed_exactly_on_the_direct_path() {
    assert!(CASES.len() >= 60, "{} cases", CASES.len());
    let failures = run_requests(true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn the_request_corpus_is_refused_or_framed_exactly_on_the_full_stack() {
    let failures = run_requests(false).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What a client gets for a misbehaving upstream's answer.
enum Outcome {
    /// 502, or the connection cut once the head had gone: never a whole wrong answer.
    Refused,
    /// This body, framed anew.
    Body(&'static str),
}

const RESPONSES: &[(&str, Outcome)] = &[
    ("conn-cl", Outcome::Refused),
    ("plus-cl", Outcome::Refused),
    ("two-cl", Outcome::Refused),
    ("list-cl", Outcome::Refused),
    ("cl-te", Outcome::Refused),
    ("te-gzip", Outcome::Refused),
    ("te-two", Outcome::Refused),
    ("http10-te", Outcome::Refused),
    ("bare-lf", Outcome::Refused),
    ("obs-fold", Outcome::Refused),
    ("nul", Outcome::Refused),
    ("space-colon", Outcome::Refused),
    ("chunk-bare-lf", Outcome::Refused),
    ("chunk-huge", Outcome::Refused),
    ("chunk-ext", Outcome::Body("abcdef")),
    ("cl-extra", Outcome::Body("abc")),
];

async fn run_responses(direct: bool) -> Vec<String> {
    let (upstream, records) = recording_upstream().await;
    let h = harbor(direct, upstream).await;
    let mut failures = Vec::new();
    let mut cases: Vec<(&str, &Outcome, bool)> = RESPONSES
        .iter()
        .map(|(name, o)| (*name, o, false))
        .collect();
    cases.push(("head-body", &Outcome::Body(""), true));
    for (n, (name, outcome, head)) in cases.into_iter().enumerate() {
        let method = if head { "HEAD" } else { "GET" };
        let request = format!("{method} /r/{name}/{n:03}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        let answers = exchange(&h, request.as_bytes(), 1, &[head]).await;
        let got = answers.messages.first();
        match (outcome, got) {
            (Outcome::Refused, Some(m)) if m.status() == 502 => {}
            (Outcome::Refused, None) => {}
            (Outcome::Body(body), Some(m)) if m.status() == 200 && m.body == body.as_bytes() => {}
            (_, got) => failures.push(format!("{name}: the client got {got:?}")),
        }
        // The socket that carried a bad or overlong answer is not used again.
        let next = format!("GET /after/{n:03}/ HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        let answers = exchange(&h, next.as_bytes(), 1, &[]).await;
        let body = answers
            .messages
            .first()
            .map(|m| m.body.clone())
            .unwrap_or_default();
        if body != format!("seen /after/{n:03}/").as_bytes() {
            failures.push(format!(
                "{name}: the next request got {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
        let conns: Vec<usize> = records_of(&records, &format!("/{n:03}/"))
            .iter()
            .map(|r| r.conn)
            .collect();
        let not_reusable = matches!(outcome, Outcome::Refused) || name == "cl-extra" || head;
        if not_reusable && (conns.len() != 2 || conns[0] == conns[1]) {
            failures.push(format!("{name}: the upstream connections were {conns:?}"));
        }
    }
    h.shutdown().await;
    failures
}

#[tokio::test]
async fn misbehaving_responses_get_502_and_their_sockets_closed_on_the_direct_path() {
    let failures = run_responses(true).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn misbehaving_responses_get_502_and_their_sockets_closed_on_the_full_stack() {
    let failures = run_responses(false).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
