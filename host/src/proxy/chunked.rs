//! The chunked transfer coding (RFC 9112 §7.1), read strictly and written anew: a body is
//! walked byte by byte against the grammar, and what goes on to the next hop is built from the
//! sizes that were parsed (`{size:x}\r\n`, the data, `\r\n`, then `0\r\n\r\n`), never the
//! sender's framing bytes. Chunk extensions and trailer fields are checked and then dropped, as
//! a recipient may (RFC 9112 §7.1.1, RFC 9110 §6.5.1): neither can then carry a second reading of
//! the body to the next hop.

use std::io::Write as _;

/// A chunk larger than this is refused: no real sender needs a terabyte in one chunk, and a
/// bound far below `u64::MAX` keeps every size sum and count exact.
const MAX_CHUNK: u64 = 1 << 40;
/// Hex digits in a chunk size, leading zeros included.
const MAX_SIZE_DIGITS: u8 = 16;
/// Bytes of chunk extensions on one chunk-size line.
const MAX_EXTENSIONS: u16 = 4096;
/// Bytes of the trailer section.
const MAX_TRAILERS: u16 = 16 * 1024;

/// Where a body's re-framed bytes go: a buffer for the next hop, or nowhere when the body is
/// only being checked.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn size_line(&mut self, size: u64);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn size_line(&mut self, size: u64) {
        let _ = write!(self, "{size:x}\r\n");
    }
}

/// A sink that keeps nothing: the body is checked, and passed on by someone else.
pub struct Check;

impl Sink for Check {
    fn put(&mut self, _: &[u8]) {}
    fn size_line(&mut self, _: u64) {}
}

/// Where a chunked body's reader stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size (`digits` read so far).
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size, which only a `;` may follow.
    SizeSpace {
        size: u64,
    },
    /// After a `;`: whitespace, then an extension's name.
    ExtStart {
        size: u64,
    },
    ExtName {
        size: u64,
    },
    /// Whitespace after a name: `=` or `;` must follow.
    ExtNameSpace {
        size: u64,
    },
    /// After `=`: whitespace, then a token or a quoted string.
    ExtValueStart {
        size: u64,
    },
    ExtToken {
        size: u64,
    },
    ExtQuoted {
        size: u64,
    },
    ExtEscape {
        size: u64,
    },
    /// After a value: `;`, whitespace before one, or the line's end.
    ExtValueEnd {
        size: u64,
        spaced: bool,
    },
    /// The chunk-size line's CR was read; its LF must follow.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// The start of a trailer line, or the CR of the body's last line.
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body being read; see the module notes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: State,
    /// Bytes of extensions on the current size line, or of the trailer section.
    extra: u16,
}

impl Default for Chunked {
    fn default() -> Self {
        Self {
            state: State::Size { size: 0, digits: 0 },
            extra: 0,
        }
    }
}

impl Chunked {
    /// Reads `input` (the body's next bytes), putting the re-framed body into `out`. Returns how
    /// many bytes belong to the body: all of them, unless it ends inside `input`. An error names
    /// what breaks the grammar; nothing after it may be trusted.
    pub fn advance<S: Sink>(&mut self, input: &[u8], out: &mut S) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < input.len() {
            if let State::Data { left } = self.state {
                let take = left.min((input.len() - i) as u64) as usize;
                out.put(&input[i..i + take]);
                i += take;
                let left = left - take as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { left }
                };
                continue;
            }
            if self.state == State::Done {
                break;
            }
            self.state = self.step(input[i], out)?;
            i += 1;
        }
        Ok(i)
    }

    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    fn step<S: Sink>(&mut self, b: u8, out: &mut S) -> Result<State, &'static str> {
        use State::*;
        let on_extension = matches!(
            self.state,
            SizeSpace { .. }
                | ExtStart { .. }
                | ExtName { .. }
                | ExtNameSpace { .. }
                | ExtValueStart { .. }
                | ExtToken { .. }
                | ExtQuoted { .. }
                | ExtEscape { .. }
                | ExtValueEnd { .. }
        );
        if on_extension {
            self.extra += 1;
            if self.extra > MAX_EXTENSIONS {
                return Err("a chunk's extensions are too long");
            }
        }
        let space = b == b' ' || b == b'\t';
        Ok(match self.state {
            Size { size, digits } => match hex(b) {
                Some(d) => {
                    let size = size * 16 + u64::from(d);
                    if digits + 1 > MAX_SIZE_DIGITS || size > MAX_CHUNK {
                        return Err("a chunk size is too large");
                    }
                    Size {
                        size,
                        digits: digits + 1,
                    }
                }
                None if digits == 0 => return Err("a chunk size must start with a hex digit"),
                None if b == b'\r' => SizeLf { size },
                None if b == b';' => ExtStart { size },
                None if space => SizeSpace { size },
                None if b == b'\n' => return Err("a chunk-size line must end with CRLF"),
                None => return Err("a chunk size has a stray character"),
            },
            SizeSpace { size } => match b {
                b';' => ExtStart { size },
                _ if space => SizeSpace { size },
                _ => return Err("only a chunk extension may follow space after a chunk size"),
            },
            ExtStart { size } => match b {
                _ if space => ExtStart { size },
                _ if is_tchar(b) => ExtName { size },
                _ => return Err("a chunk extension must start with a token"),
            },
            ExtName { size } => match b {
                _ if is_tchar(b) => ExtName { size },
                b'=' => ExtValueStart { size },
                b';' => ExtStart { size },
                b'\r' => SizeLf { size },
                _ if space => ExtNameSpace { size },
                _ => return Err("a chunk extension's name has a stray character"),
            },
            ExtNameSpace { size } => match b {
                b'=' => ExtValueStart { size },
                b';' => ExtStart { size },
                _ if space => ExtNameSpace { size },
                _ => return Err("a chunk extension has a stray character"),
            },
            ExtValueStart { size } => match b {
                _ if space => ExtValueStart { size },
                b'"' => ExtQuoted { size },
                _ if is_tchar(b) => ExtToken { size },
                _ => return Err("a chunk extension's value must be a token or a quoted string"),
            },
            ExtToken { size } => match b {
                _ if is_tchar(b) => ExtToken { size },
                b';' => ExtStart { size },
                b'\r' => SizeLf { size },
                _ if space => ExtValueEnd { size, spaced: true },
                _ => return Err("a chunk extension's value has a stray character"),
            },
            ExtQuoted { size } => match b {
                b'"' => ExtValueEnd {
                    size,
                    spaced: false,
                },
                b'\\' => ExtEscape { size },
                b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => ExtQuoted { size },
                _ => return Err("a chunk extension's quoted value has a control character"),
            },
            ExtEscape { size } => match b {
                b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff => ExtQuoted { size },
                _ => return Err("a chunk extension's quoted value has a control character"),
            },
            ExtValueEnd { size, spaced } => match b {
                b';' => ExtStart { size },
                b'\r' if !spaced => SizeLf { size },
                _ if space => ExtValueEnd { size, spaced: true },
                _ => return Err("a chunk extension has a stray character"),
            },
            SizeLf { size } => match b {
                b'\n' => {
                    self.extra = 0;
                    if size == 0 {
                        TrailerStart
                    } else {
                        out.size_line(size);
                        Data { left: size }
                    }
                }
                _ => return Err("a chunk-size line must end with CRLF"),
            },
            Data { .. } | Done => unreachable!("handled by advance"),
            DataCr => match b {
                b'\r' => DataLf,
                _ => return Err("chunk data must be followed by CRLF"),
            },
            DataLf => match b {
                b'\n' => {
                    out.put(b"\r\n");
                    Size { size: 0, digits: 0 }
                }
                _ => return Err("chunk data must be followed by CRLF"),
            },
            TrailerStart | TrailerName | TrailerValue | TrailerLf => {
                self.extra += 1;
                if self.extra > MAX_TRAILERS {
                    return Err("the trailer section is too long");
                }
                match (self.state, b) {
                    (TrailerStart, b'\r') => EndLf,
                    (TrailerStart | TrailerName, _) if is_tchar(b) => TrailerName,
                    (TrailerStart, _) => return Err("a trailer line must start with a field name"),
                    (TrailerName, b':') => TrailerValue,
                    (TrailerName, _) => return Err("a trailer field's name has a stray character"),
                    (TrailerValue, b'\r') => TrailerLf,
                    (TrailerValue, b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff) => TrailerValue,
                    (TrailerValue, _) => {
                        return Err("a trailer field's value has a control character");
                    }
                    (TrailerLf, b'\n') => TrailerStart,
                    _ => return Err("a trailer line must end with CRLF"),
                }
            }
            EndLf => match b {
                b'\n' => {
                    out.put(b"0\r\n\r\n");
                    Done
                }
                _ => return Err("a chunked body must end with CRLF"),
            },
        })
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A `tchar` of RFC 9110 §5.6.2: what a token is made of.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a whole body; returns the re-framed body and how many bytes it took.
    fn read(body: &[u8]) -> Result<(String, usize), &'static str> {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let n = c.advance(body, &mut out)?;
        assert!(
            c.done(),
            "{:?} is not a whole body",
            String::from_utf8_lossy(body)
        );
        Ok((String::from_utf8(out).unwrap(), n))
    }

    #[test]
    fn a_body_is_written_anew_from_its_sizes() {
        let body =
            b"4\r\nWiki\r\n005;a=1;b=\"q\\\"x\" ; c\r\npedia\r\n0;z\r\nX-Trailer: 1\r\n\r\nNEXT";
        let (out, n) = read(body).unwrap();
        assert_eq!(n, body.len() - 4);
        assert_eq!(out, "4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n");
        // Byte by byte, the same.
        let mut c = Chunked::default();
        let mut piecewise = Vec::new();
        let mut taken = 0;
        for b in body {
            taken += c.advance(std::slice::from_ref(b), &mut piecewise).unwrap();
            if c.done() {
                break;
            }
        }
        assert_eq!((taken, String::from_utf8(piecewise).unwrap()), (n, out));
    }

    #[test]
    fn what_the_grammar_does_not_allow_is_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5;\r\nhello\r\n0\r\n\r\n",
            b"5;a b\r\nhello\r\n0\r\n\r\n",
            b"5;a=\"x\r\nhello\r\n0\r\n\r\n",
            b"5;a=\x00\r\nhello\r\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffff\r\n",
            b"00000000000000005\r\n",
            b"-5\r\n",
            b"+5\r\n",
            b"0x5\r\n",
            b"2\r\nabc\r\n",
            b"0\r\n\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n folded\r\n\r\n",
            b"0\r\nX : 1\r\n\r\n",
            b"0\r\nX: a\x00b\r\n\r\n",
        ] {
            let mut c = Chunked::default();
            assert!(
                c.advance(bad, &mut Vec::new()).is_err(),
                "{:?} was taken",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn long_extensions_and_trailers_are_bounded() {
        let mut long = b"1;".to_vec();
        long.extend(std::iter::repeat_n(b'a', 5000));
        assert_eq!(
            Chunked::default().advance(&long, &mut Check),
            Err("a chunk's extensions are too long")
        );
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"X-A: 12345\r\n");
        }
        assert_eq!(
            Chunked::default().advance(&trailers, &mut Check),
            Err("the trailer section is too long")
        );
    }
}
