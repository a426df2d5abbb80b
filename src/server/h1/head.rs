//! A request head, strictly to RFC 9112: the request line parsed here, field lines by
//! `httparse`, and the framing fields (`Content-Length`, `Transfer-Encoding`) read
//! across every line of their name, so that no byte stream frames differently here
//! than in a strict parser.

use super::syntax::{has_bare_lf, is_tchar, is_token, is_valid_host, list_elements, trim_ows};
use super::{refuse, Incoming, Limits, Refusal, MAX_HEADERS};

/// How the body of a request is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
}

/// A parsed head: the request (without its body), how its body is framed, whether the
/// client waits for `100 Continue`, and how many bytes of input it took.
#[derive(Debug)]
pub(crate) struct Head {
    pub request: Incoming,
    pub framing: Framing,
    pub expect_continue: bool,
    pub len: usize,
}

/// Parses the head at the start of `buf` (empty lines before it already dropped);
/// `Ok(None)` if it is not complete yet.
pub(crate) fn parse(buf: &[u8], limits: &Limits) -> Result<Option<Head>, Refusal> {
    let Some(line) = request_line(buf, limits.max_head)? else {
        return Ok(None);
    };
    let fields_at = line.len;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (fields_len, fields) = match httparse::parse_headers(&buf[fields_at..], &mut headers) {
        Ok(httparse::Status::Complete(parsed)) => parsed,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => {
            return Err(refuse(431, "request head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many headers")),
        Err(_) => return Err(refuse(400, "malformed header field")),
    };
    let len = fields_at + fields_len;
    if len > limits.max_head {
        return Err(refuse(431, "request head too large"));
    }
    if has_bare_lf(&buf[fields_at..len]) {
        return Err(refuse(400, "a header line not ended by CRLF"));
    }
    let headers: Vec<(String, Vec<u8>)> = fields
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_owned()))
        .collect();
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    };
    check_host(values("host"), line.minor_version)?;
    let framing = framing(
        values("content-length"),
        values("transfer-encoding"),
        line.minor_version,
    )?;
    let expect_continue = expects_continue(values("expect"))?;
    let mut keep_alive = line.minor_version == 1;
    for token in list_elements(values("connection")) {
        if token.eq_ignore_ascii_case(b"close") {
            keep_alive = false;
            break;
        }
        if token.eq_ignore_ascii_case(b"keep-alive") {
            keep_alive = true;
        }
    }
    let mut headers = headers;
    if let Some(authority) = line.authority {
        // RFC 9112 §3.2.2: the target's authority replaces the Host field's value, so
        // that the app routes on the same host as whatever routed the absolute URI.
        match headers
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case("host"))
        {
            Some((_, value)) => *value = authority.into_bytes(),
            None => headers.push(("Host".into(), authority.into_bytes())),
        }
    }
    let request = Incoming {
        method: line.method,
        target: line.target,
        minor_version: line.minor_version,
        headers,
        keep_alive,
    };
    Ok(Some(Head {
        request,
        framing,
        expect_continue,
        len,
    }))
}

struct RequestLine {
    method: String,
    /// The origin-form target (path and query) the app sees.
    target: String,
    /// The authority of an absolute-form target.
    authority: Option<String>,
    minor_version: u8,
    /// Its length with the CRLF.
    len: usize,
}

/// `method SP request-target SP HTTP-version CRLF` (RFC 9112 §3), exactly: one space
/// each, no bare CR or LF. Refuses as soon as a byte is wrong, so garbage is not
/// waited on; a line that has not ended within `max_head` bytes is 414.
fn request_line(buf: &[u8], max_head: usize) -> Result<Option<RequestLine>, Refusal> {
    let bad = || refuse(400, "malformed request line");
    let incomplete = || {
        if buf.len() >= max_head {
            Err(refuse(414, "request line too long"))
        } else {
            Ok(None)
        }
    };
    let Some(method_end) = buf.iter().position(|&b| !is_tchar(b)) else {
        return incomplete();
    };
    if method_end == 0 || buf[method_end] != b' ' {
        return Err(bad());
    }
    let target_at = method_end + 1;
    let Some(target_len) = buf[target_at..]
        .iter()
        .position(|&b| !(0x21..=0x7e).contains(&b))
    else {
        return incomplete();
    };
    let target_end = target_at + target_len;
    if target_len == 0 || buf[target_end] != b' ' {
        return Err(bad());
    }
    let version_at = target_end + 1;
    let line_len = version_at + b"HTTP/1.1\r\n".len();
    let rest = &buf[version_at..buf.len().min(line_len)];
    let pattern = b"HTTP/d.d\r\n";
    let matches = rest.iter().zip(pattern).all(|(&b, &p)| match p {
        b'd' => b.is_ascii_digit(),
        p => b == p,
    });
    if !matches {
        return Err(bad());
    }
    if rest.len() < line_len - version_at {
        return incomplete();
    }
    if line_len > max_head {
        return Err(refuse(414, "request line too long"));
    }
    // RFC 9112 §2.3: a higher minor version is answered as the highest we have.
    let minor_version = match (rest[5], rest[7]) {
        (b'1', b'0') => 0,
        (b'1', _) => 1,
        _ => return Err(refuse(505, "HTTP version not supported")),
    };
    // Every byte of the line was checked to be ASCII.
    let text = |range: std::ops::Range<usize>| String::from_utf8_lossy(&buf[range]).into_owned();
    let method = text(0..method_end);
    let (target, authority) = origin_form(&method, &buf[target_at..target_end])?;
    Ok(Some(RequestLine {
        method,
        target,
        authority,
        minor_version,
        len: line_len,
    }))
}

/// The target as the app sees it (RFC 9112 §3.2): origin-form as it is, absolute-form
/// reduced to its path and query, `*` for OPTIONS only. CONNECT (authority-form) is a
/// proxy's method: not implemented here. A userinfo part (`user@host`) is refused, as
/// RFC 9110 §4.2.4 advises.
fn origin_form(method: &str, target: &[u8]) -> Result<(String, Option<String>), Refusal> {
    if method == "CONNECT" {
        return Err(refuse(501, "CONNECT is not supported"));
    }
    let text = String::from_utf8_lossy(target).into_owned();
    match target {
        [b'/', ..] if !target.contains(&b'#') => Ok((text, None)),
        b"*" if method == "OPTIONS" => Ok((text, None)),
        _ => {
            let lower = text.to_ascii_lowercase();
            let Some(rest) = lower
                .strip_prefix("http://")
                .or_else(|| lower.strip_prefix("https://"))
            else {
                return Err(refuse(400, "invalid request target"));
            };
            let authority_at = text.len() - rest.len();
            let after = &text[authority_at..];
            let path_at = after.find(['/', '?']).unwrap_or(after.len());
            let (authority, path) = after.split_at(path_at);
            // RFC 9110 §4.2.1: an http(s) URI has a host, never an empty one.
            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            if host.is_empty() || !is_valid_host(authority.as_bytes()) || path.contains('#') {
                return Err(refuse(400, "invalid request target"));
            }
            // RFC 9112 §3.2.4: OPTIONS on a bare authority asks about the server: `*`.
            let path = match path {
                "" if method == "OPTIONS" => "*".to_owned(),
                p if p.starts_with('/') => p.to_owned(),
                p => format!("/{p}"),
            };
            Ok((path, Some(authority.to_owned())))
        }
    }
}

/// RFC 9112 §3.2: exactly one valid `Host` in HTTP/1.1 (even beside an absolute-form
/// target), at most one in HTTP/1.0.
fn check_host<'a>(
    mut hosts: impl Iterator<Item = &'a [u8]>,
    minor_version: u8,
) -> Result<(), Refusal> {
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(refuse(400, "more than one Host header")),
        (None, _) if minor_version == 1 => Err(refuse(400, "an HTTP/1.1 request without Host")),
        (Some(host), None) if !is_valid_host(host) => Err(refuse(400, "invalid Host header")),
        _ => Ok(()),
    }
}

/// The body's framing (RFC 9112 §6.1, §6.3). `Transfer-Encoding` is one list over all
/// its lines: chunked must be the final coding (else the length cannot be known: 400,
/// as §6.3 requires), applied once; another coding before it is not implemented (501). With `Content-Length` beside it, or in HTTP/1.0, the framing is
/// ambiguous: 400 and close. `Content-Length` values, over all lines and list
/// elements, must be one decimal number (RFC 9110 §8.6 lets identical duplicates pass).
fn framing<'a>(
    lengths: impl Iterator<Item = &'a [u8]>,
    mut encodings: impl Iterator<Item = &'a [u8]> + Clone,
    minor_version: u8,
) -> Result<Framing, Refusal> {
    let mut lengths = lengths.peekable();
    if encodings.clone().next().is_some() {
        if lengths.peek().is_some() {
            return Err(refuse(400, "both Content-Length and Transfer-Encoding"));
        }
        if minor_version == 0 {
            return Err(refuse(400, "Transfer-Encoding in an HTTP/1.0 request"));
        }
        let codings: Vec<&[u8]> = list_elements(&mut encodings).collect();
        if codings.iter().any(|c| !is_token(c)) {
            return Err(refuse(400, "malformed Transfer-Encoding"));
        }
        let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
        let last_is_chunked = codings.last().is_some_and(|c| chunked(c));
        return match codings.iter().filter(|c| chunked(c)).count() {
            _ if codings.is_empty() => Err(refuse(400, "empty Transfer-Encoding")),
            2.. => Err(refuse(400, "chunked applied more than once")),
            _ if !last_is_chunked => Err(refuse(400, "chunked is not the final transfer coding")),
            _ if codings.len() == 1 => Ok(Framing::Chunked),
            _ => Err(refuse(501, "unsupported transfer coding")),
        };
    }
    let mut length: Option<Option<u64>> = None;
    let mut elements = 0;
    for value in lengths {
        // An empty line or element is not a length: no element-dropping here.
        for element in value.split(|&b| b == b',').map(trim_ows) {
            elements += 1;
            if element.is_empty() || !element.iter().all(u8::is_ascii_digit) {
                return Err(refuse(400, "invalid Content-Length"));
            }
            // Digits only, so the only parse failure is overflow.
            let parsed = std::str::from_utf8(element)
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            match length {
                Some(seen) if seen != parsed => {
                    return Err(refuse(400, "conflicting Content-Length values"));
                }
                _ => length = Some(parsed),
            }
        }
    }
    match length {
        None if elements == 0 => Ok(Framing::Length(0)),
        Some(Some(len)) => Ok(Framing::Length(len)),
        // Digits past u64: larger than any limit.
        _ => Err(refuse(413, "body too large")),
    }
}

/// RFC 9110 §10.1.1: `100-continue` is the only expectation there is; any other gets 417.
fn expects_continue<'a>(values: impl Iterator<Item = &'a [u8]>) -> Result<bool, Refusal> {
    let mut wants = false;
    for expectation in list_elements(values) {
        if !expectation.eq_ignore_ascii_case(b"100-continue") {
            return Err(refuse(417, "unsupported expectation"));
        }
        wants = true;
    }
    Ok(wants)
}
