//! HTTP/1.1 on the wire, for the proxy's direct path ([`super::h1`]): heads parsed in place,
//! rewritten for the next hop straight into bytes, and bodies delimited (`Content-Length`,
//! `chunked`) without being decoded, so that they are forwarded as they arrive.
//!
//! Only plain HTTP/1.1 requests are taken here; [`RequestHead::direct`] says which, and every
//! other request (HTTP/1.0, upgrades, `Expect`, absolute-form targets, anything ambiguous about
//! its length) goes to the full HTTP stack instead.

use std::net::IpAddr;
use std::ops::Range;

/// Longest head accepted (hyper's default limit is in the same range).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). `Transfer-Encoding`
/// is among them, but the direct path forwards chunked bodies as they are, so it re-adds it.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

/// How a message's body is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes (responses only).
    UntilClose,
}

/// A parsed head: where its parts are in the buffer it was parsed from.
#[derive(Debug, Default)]
struct Head {
    len: usize,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

impl Head {
    fn new(buf: &[u8], len: usize, headers: &[httparse::Header<'_>]) -> Self {
        Self {
            len,
            headers: headers
                .iter()
                .map(|h| (offset(buf, h.name.as_bytes()), offset(buf, h.value)))
                .collect(),
        }
    }

    /// What delimits a message: the `Connection` and `Transfer-Encoding` tokens, and every
    /// `Content-Length` value.
    fn framing_headers<'b>(&self, buf: &'b [u8]) -> (Vec<String>, Vec<String>, Vec<&'b [u8]>) {
        (
            self.tokens(buf, "connection"),
            self.tokens(buf, "transfer-encoding"),
            self.values(buf, "content-length").collect(),
        )
    }

    fn values<'b>(&self, buf: &'b [u8], name: &str) -> impl Iterator<Item = &'b [u8]> {
        self.headers
            .iter()
            .filter(move |(n, _)| buf[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(move |(_, v)| &buf[v.clone()])
    }

    fn first<'b>(&self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        self.values(buf, name).next()
    }

    /// The comma-separated tokens of every `name` header, lower-cased.
    fn tokens(&self, buf: &[u8], name: &str) -> Vec<String> {
        self.values(buf, name)
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Whether header `name` stays on its hop, given the names `Connection` lists.
    fn hop_by_hop(name: &[u8], listed: &[String]) -> bool {
        HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
            || name.len() >= 6 && name[..6].eq_ignore_ascii_case(b"proxy-")
            || listed
                .iter()
                .any(|l| name.eq_ignore_ascii_case(l.as_bytes()))
    }

    /// Copies the end-to-end headers, leaving out hop-by-hop ones and `skip`.
    fn copy_end_to_end(&self, buf: &[u8], listed: &[String], skip: &[&str], out: &mut Vec<u8>) {
        for (n, v) in &self.headers {
            let name = &buf[n.clone()];
            if Self::hop_by_hop(name, listed)
                || skip.iter().any(|s| name.eq_ignore_ascii_case(s.as_bytes()))
            {
                continue;
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&buf[v.clone()]);
            out.extend_from_slice(b"\r\n");
        }
    }
}

fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// The outcome of parsing a head from the bytes read so far.
#[derive(Debug)]
pub enum Parse<T> {
    /// More bytes are needed.
    Partial,
    Done(T),
    /// Not a head this path takes (malformed, or too long): the caller hands over.
    Invalid,
}

/// A client's request head.
#[derive(Debug)]
pub struct RequestHead {
    head: Head,
    method: Range<usize>,
    target: Range<usize>,
    pub framing: Framing,
    /// The client asked to close after this exchange.
    pub close: bool,
    listed: Vec<String>,
    /// Whether this path takes the request (see the module notes).
    pub direct: bool,
}

impl RequestHead {
    pub fn parse(buf: &[u8]) -> Parse<Self> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut slots);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parse::Partial,
            _ => return Parse::Invalid,
        };
        let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
            return Parse::Invalid;
        };
        let head = Head::new(buf, len, req.headers);
        let (listed, codings, lengths) = head.framing_headers(buf);
        let length = match lengths.as_slice() {
            [] => Some(0),
            [one] => std::str::from_utf8(one)
                .ok()
                .and_then(|v| v.parse::<u64>().ok()),
            _ => None,
        };
        let framing = match (codings.as_slice(), &lengths[..], length) {
            ([], _, Some(0)) => Some(Framing::Empty),
            ([], _, Some(n)) => Some(Framing::Length(n)),
            ([chunked], [], _) if chunked == "chunked" => {
                Some(Framing::Chunked(Chunked::default()))
            }
            _ => None,
        };
        let direct = minor == 1
            && framing.is_some()
            && target.starts_with('/')
            && method != "CONNECT"
            && head.first(buf, "host").is_some()
            && head.first(buf, "upgrade").is_none()
            && head.first(buf, "expect").is_none()
            && !listed.iter().any(|t| t == "upgrade");
        Parse::Done(Self {
            method: offset(buf, method.as_bytes()),
            target: offset(buf, target.as_bytes()),
            framing: framing.unwrap_or(Framing::Empty),
            close: listed.iter().any(|t| t == "close"),
            listed,
            direct,
            head,
        })
    }

    pub fn len(&self) -> usize {
        self.head.len
    }

    pub fn is_head_method(&self, buf: &[u8]) -> bool {
        &buf[self.method.clone()] == b"HEAD"
    }

    /// The `Host` header's value.
    pub fn host<'b>(&self, buf: &'b [u8]) -> &'b str {
        self.head
            .first(buf, "host")
            .and_then(|h| std::str::from_utf8(h).ok())
            .unwrap_or("")
    }

    /// The target's path, without the query.
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        let target = std::str::from_utf8(&buf[self.target.clone()]).unwrap_or("/");
        target.split('?').next().unwrap_or("/")
    }

    /// The head for the upstream: end-to-end headers as they came, `Host` as `host`, this hop
    /// appended to `X-Forwarded-For` and `Via`, `X-Forwarded-Proto` and `-Host` set.
    pub fn write_upstream(&self, buf: &[u8], host: &str, client: IpAddr, out: &mut Vec<u8>) {
        use std::io::Write as _;
        out.extend_from_slice(&buf[self.method.clone()]);
        out.push(b' ');
        out.extend_from_slice(&buf[self.target.clone()]);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        let skip = [
            "host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "via",
        ];
        self.head.copy_end_to_end(buf, &self.listed, &skip, out);
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(before) = self.head.first(buf, "x-forwarded-for")
            && !before.trim_ascii().is_empty()
        {
            out.extend_from_slice(before);
            out.extend_from_slice(b", ");
        }
        let _ = write!(
            out,
            "{client}\r\nx-forwarded-proto: http\r\nx-forwarded-host: "
        );
        out.extend_from_slice(self.host(buf).as_bytes());
        out.extend_from_slice(b"\r\n");
        write_via(self.head.first(buf, "via"), out);
        if matches!(self.framing, Framing::Chunked(_)) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

fn write_via(before: Option<&[u8]>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"via: ");
    if let Some(before) = before {
        out.extend_from_slice(before);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(b"1.1 harbor\r\n");
}

/// An upstream's response head.
#[derive(Debug)]
pub struct ResponseHead {
    head: Head,
    pub status: u16,
    reason: Range<usize>,
    listed: Vec<String>,
    pub framing: Framing,
    /// The upstream closes the connection after this response.
    pub close: bool,
}

impl ResponseHead {
    /// Parses a response to a request that was (`head_request`) or was not a `HEAD`.
    pub fn parse(buf: &[u8], head_request: bool) -> Parse<Self> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut slots);
        let len = match res.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parse::Partial,
            _ => return Parse::Invalid,
        };
        let (Some(status), Some(minor)) = (res.code, res.version) else {
            return Parse::Invalid;
        };
        let reason = offset(buf, res.reason.unwrap_or("").as_bytes());
        let head = Head::new(buf, len, res.headers);
        let (listed, codings, lengths) = head.framing_headers(buf);
        let framing = if head_request || status < 200 || status == 204 || status == 304 {
            Framing::Empty
        } else if codings.last().is_some_and(|c| c == "chunked") {
            Framing::Chunked(Chunked::default())
        } else if !codings.is_empty() {
            Framing::UntilClose
        } else {
            match lengths.as_slice() {
                [] => Framing::UntilClose,
                [one] => match std::str::from_utf8(one).ok().and_then(|v| v.parse().ok()) {
                    Some(0) => Framing::Empty,
                    Some(n) => Framing::Length(n),
                    None => return Parse::Invalid,
                },
                _ => return Parse::Invalid,
            }
        };
        let close = listed.iter().any(|t| t == "close")
            || minor == 0 && !listed.iter().any(|t| t == "keep-alive")
            || framing == Framing::UntilClose;
        Parse::Done(Self {
            head,
            status,
            reason,
            listed,
            framing,
            close,
        })
    }

    pub fn len(&self) -> usize {
        self.head.len
    }

    /// The head for the client, `Via` appended; `close` adds `Connection: close`.
    pub fn write_client(&self, buf: &[u8], close: bool, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let _ = write!(out, "HTTP/1.1 {} ", self.status);
        out.extend_from_slice(&buf[self.reason.clone()]);
        out.extend_from_slice(b"\r\n");
        // A chunked body's length is its chunks': a `Content-Length` beside them (which RFC 9112
        // forbids a sender, and a smuggling attempt might send) is not passed on.
        let skip: &[&str] = if matches!(self.framing, Framing::Chunked(_)) {
            &["via", "content-length"]
        } else {
            &["via"]
        };
        self.head.copy_end_to_end(buf, &self.listed, skip, out);
        write_via(self.head.first(buf, "via"), out);
        if matches!(self.framing, Framing::Chunked(_)) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// Where a chunked body's parser stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Chunked {
    /// Reading a chunk-size line (`size` so far, `ext`: past the digits).
    #[default]
    Start,
    Size {
        size: u64,
        ext: bool,
    },
    /// Chunk data still to come, then its CRLF.
    Data(u64),
    DataEnd,
    /// Trailer lines after the last chunk; `empty`: the current line has no bytes yet.
    Trailer {
        empty: bool,
    },
    Done,
}

impl Chunked {
    /// Walks `bytes`; returns how many of them belong to the body (all of them unless the body
    /// ends inside), or an error for a malformed body.
    pub fn advance(&mut self, bytes: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            *self = match std::mem::take(self) {
                Chunked::Start => match hex(b) {
                    Some(d) => Chunked::Size {
                        size: u64::from(d),
                        ext: false,
                    },
                    None => return Err("a chunk size must start with a hex digit"),
                },
                Chunked::Size { size, ext } => match (b, ext, hex(b)) {
                    (b'\n', _, _) if size == 0 => Chunked::Trailer { empty: true },
                    (b'\n', _, _) => Chunked::Data(size),
                    (b'\r' | b';' | b' ' | b'\t', _, _) => Chunked::Size { size, ext: true },
                    (_, false, Some(d)) => match size.checked_mul(16) {
                        Some(s) if s <= u64::MAX - 15 => Chunked::Size {
                            size: s + u64::from(d),
                            ext: false,
                        },
                        _ => return Err("a chunk size is too large"),
                    },
                    (_, true, _) => Chunked::Size { size, ext: true },
                    _ => return Err("a chunk size has a stray character"),
                },
                Chunked::Data(left) => {
                    let take = (left as usize).min(bytes.len() - i);
                    i += take;
                    let left = left - take as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                    continue;
                }
                Chunked::DataEnd => match b {
                    b'\r' => Chunked::DataEnd,
                    b'\n' => Chunked::Start,
                    _ => return Err("chunk data must end with CRLF"),
                },
                Chunked::Trailer { empty } => match b {
                    b'\n' if empty => {
                        *self = Chunked::Done;
                        return Ok(i + 1);
                    }
                    b'\n' => Chunked::Trailer { empty: true },
                    b'\r' => Chunked::Trailer { empty },
                    _ => Chunked::Trailer { empty: false },
                },
                Chunked::Done => return Ok(i),
            };
            i += 1;
        }
        Ok(i)
    }

    pub fn done(&self) -> bool {
        *self == Chunked::Done
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

impl Framing {
    /// How many of `bytes` (the next bytes of the message) belong to the body; advances the
    /// framing's state.
    pub fn take(&mut self, bytes: &[u8]) -> Result<usize, &'static str> {
        match self {
            Framing::Empty => Ok(0),
            Framing::Length(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                Ok(take as usize)
            }
            Framing::Chunked(state) => state.advance(bytes),
            Framing::UntilClose => Ok(bytes.len()),
        }
    }

    /// Whether the whole body has been seen.
    pub fn complete(&self) -> bool {
        match self {
            Framing::Empty => true,
            Framing::Length(left) => *left == 0,
            Framing::Chunked(state) => state.done(),
            Framing::UntilClose => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> RequestHead {
        match RequestHead::parse(text.as_bytes()) {
            Parse::Done(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_plain_get_is_rewritten_for_the_upstream() {
        let text = "GET /a?b=1 HTTP/1.1\r\nHost: app.localhost\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nProxy-Authorization: x\r\nX-Forwarded-For: 203.0.113.9\r\nVia: 1.1 edge\r\nAccept: */*\r\n\r\nNEXT";
        let h = request(text);
        assert!(h.direct);
        assert_eq!(h.len(), text.len() - 4);
        assert_eq!(h.host(text.as_bytes()), "app.localhost");
        assert_eq!(h.path(text.as_bytes()), "/a");
        assert_eq!(h.framing, Framing::Empty);
        let mut out = Vec::new();
        h.write_upstream(
            text.as_bytes(),
            "backend.internal",
            "127.0.0.1".parse().unwrap(),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nhost: backend.internal\r\nAccept: */*\r\nx-forwarded-for: 203.0.113.9, 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: app.localhost\r\nvia: 1.1 edge, 1.1 harbor\r\n\r\n"
        );
    }

    #[test]
    fn requests_this_path_does_not_take() {
        for text in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        ] {
            assert!(!request(text).direct, "{text:?}");
        }
        assert!(matches!(
            RequestHead::parse(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Parse::Invalid
        ));
        assert!(matches!(RequestHead::parse(b"GET / HT"), Parse::Partial));
    }

    #[test]
    fn request_bodies_are_delimited() {
        let h = request("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(h.framing, Framing::Length(5));
        let text = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n";
        let h = request(text);
        assert!(matches!(h.framing, Framing::Chunked(_)));
        let mut out = Vec::new();
        h.write_upstream(text.as_bytes(), "a", "127.0.0.1".parse().unwrap(), &mut out);
        assert!(String::from_utf8_lossy(&out).contains("transfer-encoding: chunked\r\n"));
    }

    #[test]
    fn chunked_bodies_end_where_they_end() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let mut whole = Chunked::default();
        assert_eq!(whole.advance(body), Ok(body.len() - 4));
        assert!(whole.done());
        // Byte by byte, the same.
        let mut piecewise = Chunked::default();
        let mut taken = 0;
        for b in body.iter() {
            taken += piecewise.advance(std::slice::from_ref(b)).unwrap();
            if piecewise.done() {
                break;
            }
        }
        assert_eq!(taken, body.len() - 4);
        let mut bad = Chunked::default();
        assert!(bad.advance(b"zz\r\n").is_err());
        let mut bad = Chunked::default();
        assert!(bad.advance(b"2\r\nabc").is_err());
    }

    fn response(text: &str, head_request: bool) -> ResponseHead {
        match ResponseHead::parse(text.as_bytes(), head_request) {
            Parse::Done(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn response_framing_and_rewriting() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n\r\nok\n";
        let r = response(text, false);
        assert_eq!(r.framing, Framing::Length(3));
        assert!(!r.close);
        let mut out = Vec::new();
        r.write_client(text.as_bytes(), false, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nvia: 1.1 harbor\r\n\r\n"
        );
        assert_eq!(response(text, true).framing, Framing::Empty);
        let r = response("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(r.framing, Framing::Empty);
        let r = response("HTTP/1.0 200 OK\r\n\r\nrest", false);
        assert_eq!(r.framing, Framing::UntilClose);
        assert!(r.close);
        let r = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(matches!(r.framing, Framing::Chunked(_)));
        let mut out = Vec::new();
        r.write_client(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            true,
            &mut out,
        );
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.contains("transfer-encoding: chunked\r\n") && out.contains("connection: close\r\n")
        );
        assert!(matches!(
            ResponseHead::parse(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false),
            Parse::Invalid
        ));
        // Chunks and a length: the chunks frame it, and the length is not passed on.
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let r = response(text, false);
        assert!(matches!(r.framing, Framing::Chunked(_)));
        let mut out = Vec::new();
        r.write_client(text.as_bytes(), false, &mut out);
        assert!(
            !String::from_utf8(out)
                .unwrap()
                .to_ascii_lowercase()
                .contains("content-length")
        );
    }
}
