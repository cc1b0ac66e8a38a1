//! HTTP/1.x heads on the wire, read strictly (RFC 9112) and written anew for the next hop.
//!
//! A head is parsed in place; its lines must end in CRLF, and a message's framing is decided
//! once (RFC 9112 §6.3): no body, a verified `Content-Length`, or `chunked` as the only transfer
//! coding ([`super::chunked`]). The head written for the next hop carries exactly that decision,
//! never the sender's own framing headers. Whatever the rules do not allow (two lengths, a
//! length beside chunks, a `Connection` header naming a framing header, a second `Host`, a
//! fragment in the target...) is refused: a request with a 4xx, a response with a 502.
//!
//! The direct path ([`super::h1`]) forwards what this module reads; the full HTTP stack's gate
//! ([`super::gate`]) reads with it too, so both paths hold one policy.

use std::io::Write as _;
use std::net::IpAddr;
use std::ops::Range;

use super::chunked::{Chunked, Sink};
use super::policy::{Answer, Forwarding, REWRITTEN, is_hop_by_hop, names_framing};

/// Longest response head accepted (a request head's limit is `--max-header-bytes`).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

/// How an HTTP/2 connection with prior knowledge starts.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a message's body is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    Empty,
    /// A verified `Content-Length` (0 included: a request that says so keeps saying so).
    Length(u64),
    Chunked(Chunked),
    /// Until the sender closes (responses only).
    UntilClose,
}

impl Framing {
    /// Reads the body's next bytes from `input`, putting what goes on to the next hop into
    /// `out`; returns how many bytes of `input` belong to the body.
    pub fn relay<S: Sink>(&mut self, input: &[u8], out: &mut S) -> Result<usize, &'static str> {
        let take = match self {
            Framing::Empty => 0,
            Framing::Length(left) => {
                let take = (*left).min(input.len() as u64);
                *left -= take;
                take as usize
            }
            Framing::Chunked(state) => return state.advance(input, out),
            Framing::UntilClose => input.len(),
        };
        out.put(&input[..take]);
        Ok(take)
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

    /// Whether the body's bytes are re-framed on their way (rather than copied as they are).
    pub fn rewritten(&self) -> bool {
        matches!(self, Framing::Chunked(_))
    }

    /// The framing header that announces this framing to the next hop.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Framing::Length(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            Framing::Chunked(_) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Framing::Empty | Framing::UntilClose => {}
        }
    }
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub why: &'static str,
    /// The head is longer than its limit or has too many fields.
    pub too_large: bool,
}

impl Refusal {
    /// What a client whose request head was refused is answered.
    pub fn answer(&self) -> Answer {
        if self.too_large {
            Answer::head_too_large()
        } else {
            Answer::bad_request(self.why)
        }
    }

    fn bad(why: &'static str) -> Self {
        Self {
            why,
            too_large: false,
        }
    }
}

/// The outcome of parsing a head from the bytes read so far.
#[derive(Debug)]
pub enum Parse<T> {
    /// More bytes are needed.
    Partial,
    Done(T),
    Refused(Refusal),
}

/// A parsed head: where its parts are in the buffer it was parsed from.
#[derive(Debug, Default)]
struct Head {
    len: usize,
    headers: Vec<(Range<usize>, Range<usize>)>,
    /// The `Connection` header's tokens, lower-cased.
    listed: Vec<String>,
}

impl Head {
    fn new(buf: &[u8], len: usize, headers: &[httparse::Header<'_>]) -> Result<Self, Refusal> {
        if !crlf_only(&buf[..len]) {
            return Err(Refusal::bad("a line of the head does not end with CRLF"));
        }
        let mut head = Self {
            len,
            headers: headers
                .iter()
                .map(|h| (offset(buf, h.name.as_bytes()), offset(buf, h.value)))
                .collect(),
            listed: Vec::new(),
        };
        head.listed = head.tokens(buf, "connection");
        if names_framing(&head.listed).is_some() {
            return Err(Refusal::bad("Connection names a framing header"));
        }
        Ok(head)
    }

    fn values<'b>(&self, buf: &'b [u8], name: &str) -> impl Iterator<Item = &'b [u8]> {
        self.headers
            .iter()
            .filter(move |(n, _)| buf[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(move |(_, v)| &buf[v.clone()])
    }

    fn all<'b>(&self, buf: &'b [u8], name: &str) -> Vec<&'b [u8]> {
        self.values(buf, name).collect()
    }

    fn has(&self, buf: &[u8], name: &str) -> bool {
        self.values(buf, name).next().is_some()
    }

    /// The comma-separated tokens of every `name` header, lower-cased.
    fn tokens(&self, buf: &[u8], name: &str) -> Vec<String> {
        self.values(buf, name)
            .flat_map(|v| v.split(|&b| b == b','))
            .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    fn listed(&self, token: &str) -> bool {
        self.listed.iter().any(|t| t == token)
    }

    /// The message's `Content-Length`, if it has one that is valid.
    fn content_length(&self, buf: &[u8]) -> Result<Option<u64>, Refusal> {
        let mut values = self.values(buf, "content-length");
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(Refusal::bad("more than one Content-Length"));
        }
        // Digits only: no sign, no spaces inside, no list (RFC 9110 §8.6).
        if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
            return Err(Refusal::bad("Content-Length is not a number"));
        }
        let n = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        Ok(Some(n))
    }

    /// Checks a message's transfer codings: `chunked`, once, is the only one taken.
    fn chunked(&self, buf: &[u8]) -> Result<bool, Refusal> {
        if !self.has(buf, "transfer-encoding") {
            return Ok(false);
        }
        match self.tokens(buf, "transfer-encoding").as_slice() {
            [one] if one == "chunked" => Ok(true),
            _ => Err(Refusal::bad("a transfer coding other than one chunked")),
        }
    }

    /// How the body is framed (RFC 9112 §6.3): chunks, or a length, never both; `otherwise`
    /// when the head says nothing.
    fn framing(&self, buf: &[u8], minor: u8, otherwise: Framing) -> Result<Framing, Refusal> {
        Ok(match (self.chunked(buf)?, self.content_length(buf)?) {
            (true, Some(_)) => {
                return Err(Refusal::bad("both Content-Length and Transfer-Encoding"));
            }
            (true, None) if minor == 0 => {
                return Err(Refusal::bad("Transfer-Encoding in an HTTP/1.0 message"));
            }
            (true, None) => Framing::Chunked(Chunked::default()),
            (false, Some(n)) => Framing::Length(n),
            (false, None) => otherwise,
        })
    }

    /// Copies the end-to-end headers, leaving out hop-by-hop ones and those the proxy writes.
    fn copy_end_to_end(&self, buf: &[u8], out: &mut Vec<u8>) {
        for (n, v) in &self.headers {
            let name = &buf[n.clone()];
            if is_hop_by_hop(name, &self.listed)
                || REWRITTEN
                    .iter()
                    .any(|s| name.eq_ignore_ascii_case(s.as_bytes()))
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

/// Whether every line of `head` ends in CRLF: no bare LF, no bare CR.
fn crlf_only(head: &[u8]) -> bool {
    let mut after_cr = false;
    for &b in head {
        match b {
            b'\n' if !after_cr => return false,
            _ if after_cr && b != b'\n' => return false,
            _ => {}
        }
        after_cr = b == b'\r';
    }
    !after_cr
}

fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// What httparse's error means for a head.
fn refusal(e: httparse::Error) -> Refusal {
    match e {
        httparse::Error::TooManyHeaders => Refusal {
            why: "too many header fields",
            too_large: true,
        },
        httparse::Error::Version => Refusal::bad("not HTTP/1.0 or HTTP/1.1"),
        httparse::Error::HeaderName => Refusal::bad("a header field's name is malformed"),
        httparse::Error::HeaderValue => Refusal::bad("a header field's value is malformed"),
        httparse::Error::NewLine | httparse::Error::Token => Refusal::bad("the head is malformed"),
        _ => Refusal::bad("the start line is malformed"),
    }
}

fn too_long() -> Refusal {
    Refusal {
        why: "the head is too long",
        too_large: true,
    }
}

/// A request target, by form (RFC 9112 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `/path?query`
    Origin,
    /// `http://authority/path?query`: where the authority and the path start.
    Absolute { authority: Range<usize> },
    /// `*`, for `OPTIONS`.
    Asterisk,
    /// `host:port`, for `CONNECT`.
    Authority,
}

/// A client's request head.
#[derive(Debug)]
pub struct RequestHead {
    head: Head,
    method: Range<usize>,
    /// What the upstream is sent as the target: the client's, in origin form.
    target: Range<usize>,
    /// The host the request is for: the absolute target's authority, else `Host`.
    host: Range<usize>,
    form: Target,
    pub framing: Framing,
    /// The client asked to close after this exchange.
    pub close: bool,
    /// The request asks to switch protocols.
    pub upgrade: bool,
    /// Whether the direct path takes the request: plain HTTP/1.1, not an upgrade, `CONNECT` or
    /// `Expect`; everything else goes to the full HTTP stack.
    pub direct: bool,
}

impl RequestHead {
    /// Parses the request head at the start of `buf`, refusing one longer than `max` bytes.
    pub fn parse(buf: &[u8], max: usize) -> Parse<Self> {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut slots);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < max => return Parse::Partial,
            Ok(httparse::Status::Partial) => return Parse::Refused(too_long()),
            Err(e) => return Parse::Refused(refusal(e)),
        };
        if len > max {
            return Parse::Refused(too_long());
        }
        let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
            return Parse::Refused(Refusal::bad("the start line is malformed"));
        };
        match Self::check(buf, len, method, target, minor, req.headers) {
            Ok(head) => Parse::Done(head),
            Err(refusal) => Parse::Refused(refusal),
        }
    }

    fn check(
        buf: &[u8],
        len: usize,
        method: &str,
        target: &str,
        minor: u8,
        headers: &[httparse::Header<'_>],
    ) -> Result<Self, Refusal> {
        let head = Head::new(buf, len, headers)?;
        let (form, path) = target_form(method, target)?;
        let target_range = offset(buf, target.as_bytes());
        let path = target_range.start + path.start..target_range.start + path.end;

        let host_header = match head.all(buf, "host")[..] {
            [] if minor == 1 => return Err(Refusal::bad("an HTTP/1.1 request needs a Host")),
            [] => None,
            [one] => Some(one),
            _ => return Err(Refusal::bad("more than one Host")),
        };
        if let Some(host) = host_header
            && !valid_host(host)
            && !(host.is_empty() && minor == 0)
        {
            return Err(Refusal::bad("Host is not a valid host"));
        }
        // An absolute target names the host; `Host` is then ignored (RFC 9112 §3.2.2).
        let host = match &form {
            Target::Absolute { authority } => {
                let authority =
                    target_range.start + authority.start..target_range.start + authority.end;
                if !valid_host(&buf[authority.clone()]) {
                    return Err(Refusal::bad("the target's authority is not a valid host"));
                }
                authority
            }
            _ => match host_header {
                Some(host) if !host.is_empty() => offset(buf, host),
                _ => return Err(Refusal::bad("the request names no host")),
            },
        };

        let framing = head.framing(buf, minor, Framing::Empty)?;
        let upgrade = head.has(buf, "upgrade") || head.listed("upgrade");
        let direct = minor == 1
            && !upgrade
            && method != "CONNECT"
            && !head.has(buf, "expect")
            && form != Target::Authority;
        let close = head.listed("close") || minor == 0 && !head.listed("keep-alive");
        Ok(Self {
            method: offset(buf, method.as_bytes()),
            target: path,
            host,
            form,
            framing,
            close,
            upgrade,
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

    /// The values of every `name` header (name in lower case), in order.
    pub fn header_values<'b>(&self, buf: &'b [u8], name: &str) -> Vec<&'b [u8]> {
        self.head.all(buf, name)
    }

    /// The host the request is for.
    pub fn host<'b>(&self, buf: &'b [u8]) -> &'b str {
        std::str::from_utf8(&buf[self.host.clone()]).unwrap_or("")
    }

    /// The target in origin form: path and query (`/` when an absolute target has no path).
    pub fn origin_target<'b>(&self, buf: &'b [u8]) -> &'b str {
        match std::str::from_utf8(&buf[self.target.clone()]) {
            Ok(target) if target.starts_with('/') => target,
            _ => "/",
        }
    }

    /// The target's path, without the query.
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        let target = std::str::from_utf8(&buf[self.target.clone()]).unwrap_or("/");
        match target.split('?').next() {
            Some(path) if !path.is_empty() => path,
            _ => "/",
        }
    }

    /// The head for the upstream: the target in origin form, `Host` as `host`, end-to-end
    /// headers as they came, the forwarding headers, and the framing decided here.
    pub fn write_upstream(
        &self,
        buf: &[u8],
        host: &str,
        (client, secure): (IpAddr, bool),
        out: &mut Vec<u8>,
    ) {
        out.extend_from_slice(&buf[self.method.clone()]);
        out.push(b' ');
        let target = &buf[self.target.clone()];
        // An absolute target's path may be empty (`http://a?q`): origin form starts with `/`.
        if matches!(self.form, Target::Absolute { .. }) && !target.starts_with(b"/") {
            out.push(b'/');
        }
        out.extend_from_slice(target);
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        self.head.copy_end_to_end(buf, out);
        Forwarding {
            client,
            host: &buf[self.host.clone()],
            prior_for: &self.head.all(buf, "x-forwarded-for"),
            prior_via: &self.head.all(buf, "via"),
            version: "1.1",
            secure,
        }
        .write(out);
        self.framing.write(out);
        out.extend_from_slice(b"\r\n");
    }
}

/// A target's form, and which part of it is sent upstream (the path and query).
fn target_form(method: &str, target: &str) -> Result<(Target, Range<usize>), Refusal> {
    if target.contains('#') {
        return Err(Refusal::bad("the target has a fragment"));
    }
    let all = 0..target.len();
    if target.starts_with('/') {
        return Ok((Target::Origin, all));
    }
    if target == "*" && method == "OPTIONS" {
        return Ok((Target::Asterisk, all));
    }
    if method == "CONNECT" {
        return Ok((Target::Authority, all));
    }
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let scheme = if lower.starts_with("http://") {
        7
    } else if lower.starts_with("https://") {
        8
    } else {
        return Err(Refusal::bad("the target is not in a form this proxy takes"));
    };
    let rest = &target[scheme..];
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    if rest[..end].contains('@') {
        return Err(Refusal::bad("the target carries user information"));
    }
    let path = scheme + end..target.len();
    Ok((
        Target::Absolute {
            authority: scheme..scheme + end,
        },
        path,
    ))
}

/// Whether `host` is `uri-host [":" port]` (RFC 9110 §7.2): a name of unreserved, sub-delims
/// and percent-encoded characters, or a bracketed IP literal.
fn valid_host(host: &[u8]) -> bool {
    let (name, port) = if host.first() == Some(&b'[') {
        let Some(end) = host.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &host[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        {
            return false;
        }
        (&host[..=end], &host[end + 1..])
    } else {
        let end = host.iter().position(|&b| b == b':').unwrap_or(host.len());
        let name = &host[..end];
        let reg_name = name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(b));
        if name.is_empty() || !reg_name {
            return false;
        }
        (name, &host[end..])
    };
    !name.is_empty()
        && match port.split_first() {
            None => true,
            Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
}

/// An upstream's response head.
#[derive(Debug)]
pub struct ResponseHead {
    head: Head,
    pub status: u16,
    reason: Range<usize>,
    pub framing: Framing,
    /// A `Content-Length` that describes the body the request did not get (a `HEAD`'s, a
    /// `304`'s), passed on as it was verified.
    declared: Option<u64>,
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
            Ok(httparse::Status::Partial) => return Parse::Refused(too_long()),
            Err(e) => return Parse::Refused(refusal(e)),
        };
        let (Some(status), Some(minor)) = (res.code, res.version) else {
            return Parse::Refused(Refusal::bad("the status line is malformed"));
        };
        let reason = offset(buf, res.reason.unwrap_or("").as_bytes());
        match Self::check(buf, len, status, minor, head_request, res.headers) {
            Ok((head, framing, declared)) => {
                let close = head.listed("close")
                    || minor == 0 && !head.listed("keep-alive")
                    || framing == Framing::UntilClose;
                Parse::Done(Self {
                    head,
                    status,
                    reason,
                    framing,
                    declared,
                    close,
                })
            }
            Err(refusal) => Parse::Refused(refusal),
        }
    }

    fn check(
        buf: &[u8],
        len: usize,
        status: u16,
        minor: u8,
        head_request: bool,
        headers: &[httparse::Header<'_>],
    ) -> Result<(Head, Framing, Option<u64>), Refusal> {
        let head = Head::new(buf, len, headers)?;
        // Framing headers are checked even where the status says there is no body.
        head.chunked(buf)?;
        let length = head.content_length(buf)?;
        // Bodiless by status or by request (RFC 9112 §6.3, rule 1).
        if status < 200 || status == 204 {
            return Ok((head, Framing::Empty, None));
        }
        if head_request || status == 304 {
            return Ok((head, Framing::Empty, length));
        }
        let framing = head.framing(buf, minor, Framing::UntilClose)?;
        Ok((head, framing, None))
    }

    pub fn len(&self) -> usize {
        self.head.len
    }

    /// The head for the client: end-to-end headers, `Via` appended, the framing decided here;
    /// `close` adds `Connection: close`, `hsts` a `Strict-Transport-Security` of that value
    /// where the upstream sent none.
    pub fn write_client(&self, buf: &[u8], close: bool, hsts: Option<&str>, out: &mut Vec<u8>) {
        let _ = write!(out, "HTTP/1.1 {} ", self.status);
        out.extend_from_slice(&buf[self.reason.clone()]);
        out.extend_from_slice(b"\r\n");
        self.head.copy_end_to_end(buf, out);
        super::policy::via(&self.head.all(buf, "via"), "1.1", out);
        if let Some(value) = hsts
            && !self.head.has(buf, "strict-transport-security")
        {
            out.extend_from_slice(b"strict-transport-security: ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        match self.declared {
            Some(n) => {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            None => self.framing.write(out),
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> RequestHead {
        match RequestHead::parse(text.as_bytes(), MAX_HEAD) {
            Parse::Done(h) => h,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn refused(text: &str) -> &'static str {
        match RequestHead::parse(text.as_bytes(), MAX_HEAD) {
            Parse::Refused(r) => r.why,
            other => panic!("{text:?} was not refused: {other:?}"),
        }
    }

    fn upstream(h: &RequestHead, text: &str) -> String {
        let mut out = Vec::new();
        h.write_upstream(
            text.as_bytes(),
            "backend.internal",
            ("127.0.0.1".parse().unwrap(), false),
            &mut out,
        );
        String::from_utf8(out).unwrap()
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
        assert_eq!(
            upstream(&h, text),
            "GET /a?b=1 HTTP/1.1\r\nhost: backend.internal\r\nAccept: */*\r\nx-forwarded-for: 203.0.113.9, 127.0.0.1\r\nx-forwarded-proto: http\r\nx-forwarded-host: app.localhost\r\nvia: 1.1 edge, 1.1 harbor\r\n\r\n"
        );
    }

    #[test]
    fn framing_is_written_as_decided_never_copied() {
        let text = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0005\r\n\r\n";
        let h = request(text);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(upstream(&h, text).ends_with("via: 1.1 harbor\r\ncontent-length: 5\r\n\r\n"));
        let text = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n";
        assert!(upstream(&request(text), text).contains("content-length: 0\r\n"));
        let text = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n";
        let h = request(text);
        assert!(matches!(h.framing, Framing::Chunked(_)));
        assert!(upstream(&h, text).ends_with("transfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn an_absolute_target_names_the_host_and_goes_on_in_origin_form() {
        let text = "GET http://App.localhost:8080?x=1 HTTP/1.1\r\nHost: other\r\n\r\n";
        let h = request(text);
        assert!(h.direct);
        assert_eq!(h.host(text.as_bytes()), "App.localhost:8080");
        assert!(upstream(&h, text).starts_with("GET /?x=1 HTTP/1.1\r\n"));
        let text = "GET HTTP://a/b HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(upstream(&request(text), text).starts_with("GET /b HTTP/1.1\r\n"));
    }

    #[test]
    fn requests_the_full_stack_takes() {
        for text in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        ] {
            assert!(!request(text).direct, "{text:?}");
        }
        assert!(matches!(
            RequestHead::parse(b"GET / HT", MAX_HEAD),
            Parse::Partial
        ));
    }

    #[test]
    fn requests_outside_the_rules_are_refused() {
        for (text, why) in [
            ("GET / HTTP/1.1\r\n\r\n", "an HTTP/1.1 request needs a Host"),
            ("GET / HTTP/1.0\r\n\r\n", "the request names no host"),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "more than one Host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
                "Host is not a valid host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a:x\r\n\r\n",
                "Host is not a valid host",
            ),
            (
                "GET /#f HTTP/1.1\r\nHost: a\r\n\r\n",
                "the target has a fragment",
            ),
            (
                "GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
                "the target carries user information",
            ),
            (
                "GET a/b HTTP/1.1\r\nHost: a\r\n\r\n",
                "the target is not in a form this proxy takes",
            ),
            (
                "GET / HTTP/1.1\nHost: a\r\n\r\n",
                "a line of the head does not end with CRLF",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\n\r\n",
                "a line of the head does not end with CRLF",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 3\r\n\r\n",
                "Connection names a framing header",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: host\r\n\r\n",
                "Connection names a framing header",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                "both Content-Length and Transfer-Encoding",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                "more than one Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
                "Content-Length is not a number",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n",
                "Content-Length is not a number",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "Content-Length is not a number",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "a transfer coding other than one chunked",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                "a transfer coding other than one chunked",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
                "a transfer coding other than one chunked",
            ),
            (
                "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 message",
            ),
        ] {
            assert_eq!(refused(text), why, "{text:?}");
        }
        let long = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert!(matches!(
            RequestHead::parse(long.as_bytes(), MAX_HEAD),
            Parse::Refused(Refusal {
                too_large: true,
                ..
            })
        ));
    }

    fn response(text: &str, head_request: bool) -> ResponseHead {
        match ResponseHead::parse(text.as_bytes(), head_request) {
            Parse::Done(h) => h,
            other => panic!("{text:?}: {other:?}"),
        }
    }

    fn client(r: &ResponseHead, text: &str, close: bool) -> String {
        let mut out = Vec::new();
        r.write_client(text.as_bytes(), close, None, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn response_framing_and_rewriting() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 03\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n\r\nok\n";
        let r = response(text, false);
        assert_eq!(r.framing, Framing::Length(3));
        assert!(!r.close);
        assert_eq!(
            client(&r, text, false),
            "HTTP/1.1 200 OK\r\nvia: 1.1 harbor\r\ncontent-length: 3\r\n\r\n"
        );
        // A HEAD's answer keeps the length it declares, and has no body.
        let r = response(text, true);
        assert_eq!(r.framing, Framing::Empty);
        assert!(client(&r, text, false).contains("content-length: 3\r\n"));
        let text = "HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n";
        let r = response(text, false);
        assert_eq!(r.framing, Framing::Empty);
        assert!(!client(&r, text, false).contains("content-length"));
        let r = response("HTTP/1.0 200 OK\r\n\r\nrest", false);
        assert_eq!(r.framing, Framing::UntilClose);
        assert!(r.close);
        let text = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let r = response(text, false);
        assert!(matches!(r.framing, Framing::Chunked(_)));
        let out = client(&r, text, true);
        assert!(
            out.contains("transfer-encoding: chunked\r\n") && out.contains("connection: close\r\n")
        );
    }

    #[test]
    fn responses_outside_the_rules_are_refused() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\n",
        ] {
            assert!(
                matches!(
                    ResponseHead::parse(text.as_bytes(), false),
                    Parse::Refused(_)
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn hosts() {
        for good in ["a", "a.b:80", "[::1]:8080", "127.0.0.1", "x_y.local", "a:"] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "", ":80", "a b", "a/b", "[zz]", "a:80:80", "a@b", "[::1]x", "a:123456",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
