//! An HTTP/1.1 reader for tests, written apart from Harbor's own (`host/src/proxy/wire.rs`).
//! CRLF everywhere, tokens for names, no control bytes in values, exactly one framing (a
//! `Content-Length` of digits, or `Transfer-Encoding: chunked`).
//!
//! [`request`] and [`response`] read what Harbor sends, and are stricter than the RFC asks of a
//! recipient: no chunk extensions, no trailers (Harbor never forwards them). [`client_request`]
//! reads what a client may send by the grammar, extensions and trailers included: the oracle
//! Harbor's own reading is compared with.

/// One message as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Message {
    /// The values of header `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    /// A request's target.
    pub fn target(&self) -> &str {
        self.start.split(' ').nth(1).unwrap_or("")
    }

    /// A response's status.
    pub fn status(&self) -> u16 {
        self.start
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// A whole message and how many bytes it took.
    Whole(Message, usize),
    /// More bytes are needed.
    Partial,
    Malformed(String),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads one line ending in CRLF from `buf` at `at`; `Ok(None)` when it has not all arrived.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = &buf[at..];
    for (i, &b) in rest.iter().enumerate() {
        match b {
            b'\r' if i + 1 == rest.len() => return Ok(None),
            b'\r' if rest[i + 1] == b'\n' => return Ok(Some((&rest[..i], at + i + 2))),
            b'\r' => return Err("a bare CR".into()),
            b'\n' => return Err("a bare LF".into()),
            _ => {}
        }
    }
    Ok(None)
}

/// A head read: the start line, the header fields, and where the head ends.
type Head = (String, Vec<(String, String)>, usize);

/// Reads a head.
fn head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some((start, mut at)) = line(buf, 0)? else {
        return Ok(None);
    };
    if start.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err("a control byte in the start line".into());
    }
    let start = String::from_utf8(start.to_vec()).map_err(|_| "start line is not UTF-8")?;
    let mut headers = Vec::new();
    loop {
        let Some((field, next)) = line(buf, at)? else {
            return Ok(None);
        };
        at = next;
        if field.is_empty() {
            return Ok(Some((start, headers, at)));
        }
        let colon = field
            .iter()
            .position(|&b| b == b':')
            .ok_or("a field without a colon")?;
        let (name, value) = (&field[..colon], &field[colon + 1..]);
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(format!(
                "a bad field name {:?}",
                String::from_utf8_lossy(name)
            ));
        }
        let value = value.trim_ascii();
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err("a control byte in a field value".into());
        }
        headers.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
}

/// How the body of a message with these headers is framed; `None` for no framing header.
fn framing(headers: &[(String, String)]) -> Result<Option<Framing>, String> {
    let named = |n: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(h, _)| h.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    match (
        &named("transfer-encoding")[..],
        &named("content-length")[..],
    ) {
        ([], []) => Ok(None),
        ([te], []) if te.eq_ignore_ascii_case("chunked") => Ok(Some(Framing::Chunked)),
        ([], [cl]) if !cl.is_empty() && cl.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(
            Framing::Length(cl.parse().map_err(|_| "a huge length")?),
        )),
        _ => Err("ambiguous or malformed framing headers".into()),
    }
}

enum Framing {
    Length(usize),
    Chunked,
}

/// Whether `ext` is chunk extensions by the grammar (RFC 9112 §7.1.1):
/// `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`.
fn extensions(mut ext: &[u8]) -> bool {
    let bws = |s: &mut &[u8]| {
        while let [b' ' | b'\t', rest @ ..] = *s {
            *s = rest;
        }
    };
    let token = |s: &mut &[u8]| {
        let n = s.iter().take_while(|&&b| is_tchar(b)).count();
        *s = &s[n..];
        n > 0
    };
    while !ext.is_empty() {
        bws(&mut ext);
        let [b';', rest @ ..] = ext else { return false };
        ext = rest;
        bws(&mut ext);
        if !token(&mut ext) {
            return false;
        }
        let mut look = ext;
        bws(&mut look);
        if let [b'=', rest @ ..] = look {
            ext = rest;
            bws(&mut ext);
            if let [b'"', rest @ ..] = ext {
                ext = rest;
                loop {
                    match ext {
                        [b'"', rest @ ..] => {
                            ext = rest;
                            break;
                        }
                        [b'\\', c, rest @ ..] if *c == b'\t' || *c >= 0x20 && *c != 0x7f => {
                            ext = rest
                        }
                        [c, rest @ ..]
                            if *c == b'\t' || *c >= 0x20 && *c != 0x7f && *c != b'\\' =>
                        {
                            ext = rest
                        }
                        _ => return false,
                    }
                }
            } else if !token(&mut ext) {
                return false;
            }
        }
    }
    true
}

/// Reads a chunked body from `at`; returns it and where it ends. `client`: extensions and
/// trailers are allowed.
fn chunked(buf: &[u8], mut at: usize, client: bool) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut body = Vec::new();
    loop {
        let Some((line_bytes, next)) = line(buf, at)? else {
            return Ok(None);
        };
        let digits = line_bytes
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        let (size, ext) = line_bytes.split_at(digits);
        if !(ext.is_empty() || client && extensions(ext)) {
            return Err(format!(
                "a bad chunk line {:?}",
                String::from_utf8_lossy(line_bytes)
            ));
        }
        if size.is_empty() || size.len() > 12 || !size.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!(
                "a bad chunk size {:?}",
                String::from_utf8_lossy(size)
            ));
        }
        let size = usize::from_str_radix(std::str::from_utf8(size).unwrap_or("x"), 16)
            .map_err(|_| "a bad chunk size")?;
        at = next;
        if size == 0 {
            loop {
                match line(buf, at)? {
                    None => return Ok(None),
                    Some((b"", end)) => return Ok(Some((body, end))),
                    Some((field, next)) if client && trailer_field(field) => at = next,
                    Some(_) => return Err("a bad trailer after the last chunk".into()),
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        at += size + 2;
    }
}

fn trailer_field(field: &[u8]) -> bool {
    let Some(colon) = field.iter().position(|&b| b == b':') else {
        return false;
    };
    colon > 0
        && field[..colon].iter().all(|&b| is_tchar(b))
        && field[colon + 1..]
            .iter()
            .all(|&b| b == b'\t' || b >= 0x20 && b != 0x7f)
}

/// Reads a request Harbor forwarded from the start of `buf`.
pub fn request(buf: &[u8]) -> Read {
    read_request(buf, false)
}

/// Reads a request as a client may send it from the start of `buf`: leading empty lines
/// skipped (RFC 9112 §2.2), HTTP/1.0, chunk extensions and trailers.
pub fn client_request(buf: &[u8]) -> Read {
    let mut skip = 0;
    while buf[skip..].starts_with(b"\r\n") {
        skip += 2;
    }
    match read_request(&buf[skip..], true) {
        Read::Whole(m, n) => Read::Whole(m, n + skip),
        other => other,
    }
}

fn read_request(buf: &[u8], client: bool) -> Read {
    let parsed = head(buf).and_then(|h| {
        let Some((start, headers, at)) = h else {
            return Ok(None);
        };
        let parts: Vec<&str> = start.split(' ').collect();
        let (method, target) = match parts[..] {
            [method, target, "HTTP/1.1"] => (method, target),
            [method, target, "HTTP/1.0"] if client => (method, target),
            _ => return Err(format!("a bad request line {start:?}")),
        };
        if method.is_empty() || !method.bytes().all(is_tchar) || !target.starts_with('/') {
            return Err(format!("a bad request line {start:?}"));
        }
        if headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
            .count()
            != 1
        {
            return Err("not exactly one Host".into());
        }
        body(buf, start, headers, at, false, client)
    });
    done(parsed)
}

/// Reads a response from the start of `buf`; `until_close`: the sender has closed, so a body
/// without framing ends at the end of `buf`.
pub fn response(buf: &[u8], head_request: bool, until_close: bool) -> Read {
    let parsed = head(buf).and_then(|h| {
        let Some((start, headers, at)) = h else {
            return Ok(None);
        };
        if !start.starts_with("HTTP/1.1 ") && !start.starts_with("HTTP/1.0 ") {
            return Err(format!("a bad status line {start:?}"));
        }
        let status: u16 = start
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or("a bad status")?;
        if head_request || status < 200 || status == 204 || status == 304 {
            let message = Message {
                start,
                headers,
                body: Vec::new(),
            };
            return Ok(Some((message, at)));
        }
        body(buf, start, headers, at, until_close, false)
    });
    done(parsed)
}

fn body(
    buf: &[u8],
    start: String,
    headers: Vec<(String, String)>,
    at: usize,
    until_close: bool,
    client: bool,
) -> Result<Option<(Message, usize)>, String> {
    let (body, end) = match framing(&headers)? {
        None if start.starts_with("HTTP/") && !until_close => return Ok(None),
        None if start.starts_with("HTTP/") => (buf[at..].to_vec(), buf.len()),
        None => (Vec::new(), at),
        Some(Framing::Length(n)) if buf.len() >= at + n => (buf[at..at + n].to_vec(), at + n),
        Some(Framing::Length(_)) => return Ok(None),
        Some(Framing::Chunked) => match chunked(buf, at, client)? {
            Some(read) => read,
            None => return Ok(None),
        },
    };
    let message = Message {
        start,
        headers,
        body,
    };
    Ok(Some((message, end)))
}

fn done(parsed: Result<Option<(Message, usize)>, String>) -> Read {
    match parsed {
        Ok(Some((message, n))) => Read::Whole(message, n),
        Ok(None) => Read::Partial,
        Err(why) => Read::Malformed(why),
    }
}
