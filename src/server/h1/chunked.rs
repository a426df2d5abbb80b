//! The chunked transfer coding (RFC 9112 §7.1), decoded strictly: `1*HEXDIG` sizes,
//! extensions to the §7.1.1 grammar, CRLF and nothing else ending every line, and
//! trailer fields parsed as header fields are. Every size from the peer is checked
//! before it is used, and every line is bounded.

use super::syntax::{has_bare_lf, is_ows, is_tchar, quoted_string_len};
use super::{refuse, Refusal, MAX_HEADERS};

/// The longest chunk-size line, extensions included.
pub(crate) const MAX_SIZE_LINE: usize = 4096;

/// Where the decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl Chunked {
    /// Moves what it can from `input` onto the end of `body`, `max_out` bytes at most
    /// in this call. Returns the bytes of `input` it consumed and whether the body is
    /// complete. In all, the body takes `room` bytes at most (a chunk size past what is
    /// left of it is refused), and a trailer
    /// section past `max_trailers` bytes is refused. A refusal behind body bytes this
    /// call took is held back: the bytes come first, and the refusal on the next call
    /// (the state stays at the input refused), so that what a streamed body delivers
    /// does not depend on how its input was split.
    pub(crate) fn decode(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
        room: u64,
        max_out: usize,
        max_trailers: usize,
    ) -> Result<(usize, bool), Refusal> {
        let start = body.len();
        let mut used = 0;
        match self.decode_some(input, body, (room, max_out), max_trailers, &mut used) {
            Err(_) if body.len() > start => Ok((used, false)),
            decoded => decoded,
        }
    }

    fn decode_some(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
        (room, max_out): (u64, usize),
        max_trailers: usize,
        used: &mut usize,
    ) -> Result<(usize, bool), Refusal> {
        let start = body.len();
        loop {
            let rest = &input[*used..];
            match *self {
                Chunked::Size => {
                    // Every chunk taken was within the room, so this cannot wrap.
                    let room = room - (body.len() - start) as u64;
                    let Some((len, size)) = size_line(rest, room)? else {
                        return Ok((*used, false));
                    };
                    *used += len;
                    *self = match size {
                        0 => Chunked::Trailers,
                        size => Chunked::Data(size),
                    };
                }
                Chunked::Data(left) => {
                    if rest.is_empty() {
                        return Ok((*used, false));
                    }
                    let out = max_out - (body.len() - start);
                    if out == 0 {
                        return Ok((*used, false));
                    }
                    // Bounded by `left` (u64), `rest.len()` and `out` (usize).
                    let take = rest
                        .len()
                        .min(out)
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    body.extend_from_slice(&rest[..take]);
                    *used += take;
                    *self = match left - take as u64 {
                        0 => Chunked::DataEnd,
                        left => Chunked::Data(left),
                    };
                }
                Chunked::DataEnd => match rest {
                    [] | [b'\r'] => return Ok((*used, false)),
                    [b'\r', b'\n', ..] => {
                        *used += 2;
                        *self = Chunked::Size;
                    }
                    _ => return Err(refuse(400, "chunk data not followed by CRLF")),
                },
                Chunked::Trailers => {
                    // Never more than the limit and a byte is looked at, so that the
                    // verdict does not depend on how much input has arrived.
                    let rest = &rest[..rest.len().min(max_trailers.saturating_add(1))];
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    return match httparse::parse_headers(rest, &mut fields) {
                        Ok(httparse::Status::Complete((len, _))) if len > max_trailers => {
                            Err(refuse(431, "trailer section too large"))
                        }
                        Ok(httparse::Status::Complete((len, _))) => {
                            if has_bare_lf(&rest[..len]) {
                                return Err(refuse(400, "a trailer line not ended by CRLF"));
                            }
                            Ok((*used + len, true))
                        }
                        Ok(httparse::Status::Partial) if rest.len() > max_trailers => {
                            Err(refuse(431, "trailer section too large"))
                        }
                        Ok(httparse::Status::Partial) => Ok((*used, false)),
                        Err(httparse::Error::TooManyHeaders) => {
                            Err(refuse(431, "too many trailer fields"))
                        }
                        Err(_) => Err(refuse(400, "malformed trailer field")),
                    };
                }
            }
        }
    }
}

/// Parses `chunk-size [ chunk-ext ] CRLF` at the start of `line`: its length and the
/// size, `Ok(None)` if it has not ended yet. A size over `room` (what the body may
/// still take) is refused as soon as its digits say so; a line is refused once it is
/// longer than `MAX_SIZE_LINE`, ended or not.
fn size_line(line: &[u8], room: u64) -> Result<Option<(usize, u64)>, Refusal> {
    // Only as much as the longest line and its CRLF is looked at, so that the verdict
    // does not depend on how much input has arrived.
    let window = &line[..line.len().min(MAX_SIZE_LINE + 2)];
    match parse_size_line(window, room)? {
        None if window.len() == MAX_SIZE_LINE + 2 => Err(refuse(400, "chunk size line too long")),
        parsed => Ok(parsed),
    }
}

fn parse_size_line(line: &[u8], room: u64) -> Result<Option<(usize, u64)>, Refusal> {
    let bad = |why| Err(refuse(400, why));
    let mut size: u64 = 0;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    for &digit in &line[..digits] {
        let value = u64::from((digit as char).to_digit(16).expect("a hex digit"));
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(value))
            .filter(|&s| s <= room)
            .ok_or_else(|| refuse(413, "body too large"))?;
    }
    if digits == 0 && !line.is_empty() {
        return bad("a chunk size is not a hex number");
    }
    let mut i = digits;
    // chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ): whitespace only
    // before a ";" or around "=", never before the CRLF.
    loop {
        let ows = line[i..].iter().take_while(|&&b| is_ows(b)).count();
        i += ows;
        match line.get(i..) {
            Some([b'\r', ..]) if ows > 0 => return bad("whitespace before a chunk line's CRLF"),
            None | Some([]) | Some([b'\r']) => return Ok(None),
            Some([b'\r', b'\n', ..]) => return Ok(Some((i + 2, size))),
            Some([b';', ..]) => {
                i += 1;
                i += line[i..].iter().take_while(|&&b| is_ows(b)).count();
                let name = line[i..].iter().take_while(|&&b| is_tchar(b)).count();
                if i + name == line.len() {
                    return Ok(None);
                }
                if name == 0 {
                    return bad("a chunk extension without a name");
                }
                i += name;
                let ows = line[i..].iter().take_while(|&&b| is_ows(b)).count();
                if line.get(i + ows) == Some(&b'=') {
                    i += ows + 1;
                    i += line[i..].iter().take_while(|&&b| is_ows(b)).count();
                    let value = match line.get(i) {
                        None => return Ok(None),
                        Some(b'"') => match quoted_string_len(&line[i..]) {
                            Ok(Some(len)) => len,
                            Ok(None) => return Ok(None),
                            Err(()) => return bad("a malformed chunk extension value"),
                        },
                        Some(_) => line[i..].iter().take_while(|&&b| is_tchar(b)).count(),
                    };
                    if value == 0 {
                        return bad("a chunk extension without a value after =");
                    }
                    i += value;
                }
            }
            Some(_) => return bad("a malformed chunk size line"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` whole: the body, or the refusal's status (which may come a call
    /// after the bytes before it).
    fn decode(input: &[u8]) -> Result<Vec<u8>, u16> {
        let (mut state, mut body, mut at) = (Chunked::Size, Vec::new(), 0);
        loop {
            let before = body.len();
            match state.decode(
                &input[at..],
                &mut body,
                1024 - before as u64,
                usize::MAX,
                1024,
            ) {
                Ok((used, true)) if at + used == input.len() => return Ok(body),
                Ok((used, false)) if body.len() > before => at += used,
                Ok(other) => panic!("{input:?}: incomplete {other:?}"),
                Err(refusal) => return Err(refusal.status),
            }
        }
    }

    #[test]
    fn valid_bodies() {
        for input in [
            &b"5\r\nhello\r\n0\r\n\r\n"[..],
            b"5;a=b\r\nhello\r\n0\r\n\r\n",
            b"5 ; a = \"q\\\"x\" ;b\r\nhello\r\n0;z\r\n\r\n",
            b"5\t;a\r\nhello\r\n0\r\n\r\n",
            b"0005\r\nhello\r\n000\r\nX-T: v\r\n\r\n",
            b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        ] {
            assert_eq!(decode(input).as_deref(), Ok(&b"hello"[..]), "{input:?}");
        }
        assert_eq!(
            decode(b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n")
                .unwrap()
                .len(),
            20
        );
    }

    #[test]
    fn malformed_lines_are_400() {
        for input in [
            &b"\r\n"[..],
            b";ext\r\n",
            b"0x5\r\n",
            b"-5\r\n",
            b" 5\r\n",
            b"5\n",
            b"5;a\nb\r\n",
            b"5;a\rb\r\n",
            b"5;=v\r\n",
            b"5;a=\r\n",
            b"5;a=\"x\ny\"\r\n",
            b"5 \r\n",
            b"5;a \r\n",
            b"5;a=b\t\r\n",
            b"5\r\nhelloXX",
            b"0\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            b"0\r\nX: v\n\r\n",
        ] {
            assert_eq!(decode(input), Err(400), "{input:?}");
        }
        let long = [&b"1;"[..], &[b'a'; MAX_SIZE_LINE + 10], b"\r\n"].concat();
        assert_eq!(decode(&long), Err(400));
        let trailers = [&b"0\r\nX: "[..], &[b'a'; 1100], b"\r\n\r\n"].concat();
        assert_eq!(decode(&trailers), Err(431));
    }

    #[test]
    fn sizes_are_checked_before_use() {
        assert_eq!(decode(b"ffffffffffffffff\r\n"), Err(413));
        assert_eq!(decode(b"1\r\na\r\nffffffffffffffff\r\n"), Err(413));
        assert_eq!(decode(b"10000000000000000000\r\n"), Err(413));
        assert_eq!(decode(b"401\r\n"), Err(413));
        let exactly = [&b"400\r\n"[..], &[b'x'; 1024], b"\r\n0\r\n\r\n"].concat();
        assert_eq!(decode(&exactly).map(|b| b.len()), Ok(1024));
        let over = [&b"400\r\n"[..], &[b'x'; 1024], b"\r\n1\r\n"].concat();
        assert_eq!(decode(&over), Err(413));
    }

    #[test]
    fn a_body_split_anywhere_decodes_the_same() {
        let input = b"5;a=\"b\"\r\nhello\r\n1\r\n!\r\n0\r\nX: y\r\n\r\n";
        for cut in 0..input.len() {
            let (mut state, mut body) = (Chunked::Size, Vec::new());
            let (used, done) = state
                .decode(&input[..cut], &mut body, 1024, usize::MAX, 1024)
                .unwrap();
            assert!(!done);
            let mut rest = input[used..cut].to_vec();
            rest.extend_from_slice(&input[cut..]);
            let (used, done) = state
                .decode(&rest, &mut body, 1024, usize::MAX, 1024)
                .unwrap();
            assert!(done && used == rest.len(), "cut at {cut}");
            assert_eq!(body, b"hello!");
        }
    }
}
