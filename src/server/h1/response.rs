//! Responses, and the checks that keep what a handler writes from breaking the framing.

use http::header::{self, HeaderValue};
use http::StatusCode;

use super::syntax::{is_field_char, list_elements, trim_ows};

/// A response to send: the `http` crate's, its body as bytes.
///
/// The server frames it. `Content-Length` is the body's length: a handler's own must
/// agree (or, for HEAD and 304 with no body, stands for the body a GET would have had).
/// A handler's `Connection: close` closes the connection after this response; its other
/// `Connection` values are dropped, and the server writes the one `Connection` header.
/// A handler's `Date` replaces the server's. `Transfer-Encoding`, a status outside
/// 200–599 and a body on 204, 205 or 304 are errors: the client gets a 500 instead, and
/// the worker logs why. (A header name or value that could break the framing, with CR,
/// LF or NUL, cannot be built: `http`'s types refuse it.) The response's `version` is
/// not used: the answer is HTTP/1.1.
pub type Response = http::Response<Vec<u8>>;

/// A `text/plain` response with `status` and `body`.
pub fn text(status: StatusCode, body: impl Into<Vec<u8>>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    let plain = HeaderValue::from_static("text/plain");
    response.headers_mut().insert(header::CONTENT_TYPE, plain);
    response
}

/// How a response's body goes out after its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body follows: HEAD, 204, 304, or a whole body already appended.
    None,
    /// Exactly this many more bytes (the handler's `Content-Length`).
    Length(u64),
    /// Chunked (HTTP/1.1, no `Content-Length`).
    Chunked,
    /// Until the connection closes (HTTP/1.0, no `Content-Length`).
    UntilClose,
}

/// Appends the encoded response to `out` and returns whether the connection stays
/// open after it; on an error nothing is appended.
pub(crate) fn encode(
    response: &Response,
    out: &mut Vec<u8>,
    head_only: bool,
    keep_alive: bool,
    date: &str,
) -> Result<bool, String> {
    let body = response.body();
    let target = Head {
        head_only,
        keep_alive,
        http10: false,
        date,
    };
    let (keep_alive, _) = encode_head(response, Some(body.len() as u64), target, out)?;
    if !head_only {
        out.extend_from_slice(body);
    }
    Ok(keep_alive)
}

/// What the head of an answer depends on besides the handler's response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head<'a> {
    /// The request was HEAD: no body is sent, but the head is a GET's.
    pub head_only: bool,
    /// The connection may stay open after this answer.
    pub keep_alive: bool,
    /// The request was HTTP/1.0, which has no chunked encoding.
    pub http10: bool,
    /// The `Date` value.
    pub date: &'a str,
}

/// Appends the head of `response` (whose body is `body_len` bytes, or streamed if
/// `None`) to `out`; returns whether the connection stays open after the answer, and
/// how its body follows. On an error nothing is appended.
pub(crate) fn encode_head<B>(
    response: &http::Response<B>,
    body_len: Option<u64>,
    target: Head<'_>,
    out: &mut Vec<u8>,
) -> Result<(bool, Framing), String> {
    let status = response.status().as_u16();
    if !(200..=599).contains(&status) {
        return Err(format!("status {status} is not a final status (200-599)"));
    }
    // RFC 9110 §15.3.5, §15.3.6, §15.4.5: no content in 204, 205 and 304.
    let bodyless = matches!(status, 204 | 205 | 304);
    if bodyless && body_len.is_some_and(|n| n > 0) {
        return Err(format!("a {status} response with a body"));
    }
    let headers = response.headers();
    let mut length = None;
    for (name, value) in headers {
        // http's HeaderValue already refuses CR, LF, NUL and the other controls but
        // HTAB; checked again, as it has an unchecked (unsafe) constructor.
        if !value.as_bytes().iter().all(|&b| is_field_char(b)) {
            return Err(format!("an invalid value for header {name}: {value:?}"));
        }
        if name == header::CONTENT_LENGTH {
            let text = trim_ows(value.as_bytes());
            let parsed = std::str::from_utf8(text)
                .ok()
                .filter(|t| t.bytes().all(|b| b.is_ascii_digit()));
            match parsed.and_then(|t| t.parse::<u64>().ok()) {
                Some(n) if length.map_or(true, |l| l == n) => length = Some(n),
                _ => return Err(format!("an invalid Content-Length {value:?}")),
            }
        }
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return Err("Transfer-Encoding set by the handler (the server frames bodies)".into());
    }
    let closes = list_elements(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .map(|v| v.as_bytes()),
    )
    .any(|t| t.eq_ignore_ascii_case(b"close"));
    let mut keep_alive = target.keep_alive && !closes;
    let dates = headers.get_all(header::DATE).iter().count();
    if dates > 1 {
        return Err("more than one Date header".into());
    }
    let (length, chunked, framing) = match (status, length, body_len) {
        (204, None | Some(0), _) => (None, false, Framing::None),
        (204, Some(_), _) => return Err("a 204 response with a Content-Length".into()),
        (304, length, _) => (length, false, Framing::None),
        (205, _, None) => (Some(0), false, Framing::None),
        (_, Some(n), Some(body)) if n != body && !(target.head_only && body == 0) => {
            return Err(format!("Content-Length {n} for a body of {body} bytes"));
        }
        (_, length, Some(body)) => (Some(length.unwrap_or(body)), false, Framing::None),
        (_, Some(n), None) => (Some(n), false, Framing::Length(n)),
        (_, None, None) if target.http10 => {
            keep_alive = false;
            (None, false, Framing::UntilClose)
        }
        (_, None, None) => (None, true, Framing::Chunked),
    };
    let framing = if target.head_only {
        Framing::None
    } else {
        framing
    };
    // Every refusal is above: from here the head goes straight into `out`, without
    // the formatting machinery (this runs once per answer).
    let head = out;
    let reason = response.status().canonical_reason().unwrap_or("");
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(response.status().as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(reason.as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name != header::CONTENT_LENGTH && name != header::CONNECTION {
            push_title_case(head, name.as_str());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
    }
    if let Some(length) = length {
        head.extend_from_slice(b"Content-Length: ");
        push_decimal(head, length);
        head.extend_from_slice(b"\r\n");
    }
    if chunked {
        head.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    if dates == 0 {
        head.extend_from_slice(b"Date: ");
        head.extend_from_slice(target.date.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    Ok((keep_alive, framing))
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Writes a header name (which `http` keeps in lower case) as `Content-Type` is
/// written: names are case-insensitive, but some old clients compare them as written.
fn push_title_case(out: &mut Vec<u8>, name: &str) {
    let mut word_start = true;
    for &b in name.as_bytes() {
        out.push(if word_start {
            b.to_ascii_uppercase()
        } else {
            b
        });
        word_start = b == b'-';
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_as_format_writes_them() {
        for n in [0, 7, 10, 99, 100, 1_000_001, u64::MAX] {
            let mut out = b"x".to_vec();
            push_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }

    /// A response with `status`, `body` and `headers`.
    fn response(status: u16, body: &str, headers: &[(&str, &str)]) -> Response {
        let mut builder = http::Response::builder().status(status);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(body.as_bytes().to_vec()).unwrap()
    }

    fn encoded(response: Response, head_only: bool, keep_alive: bool) -> Result<String, String> {
        let mut out = Vec::new();
        encode(&response, &mut out, head_only, keep_alive, "D")?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn responses_carry_length_date_and_connection() {
        let text = encoded(super::text(StatusCode::OK, "Hello"), false, true).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Type: text/plain\r\n"), "{text}");
        assert!(text.contains("Content-Length: 5\r\n") && text.contains("Date: D\r\n"));
        assert!(text.ends_with("Connection: keep-alive\r\n\r\nHello"));
        let head = encoded(super::text(StatusCode::OK, "Hello"), true, false).unwrap();
        assert!(head.ends_with("Content-Length: 5\r\nDate: D\r\nConnection: close\r\n\r\n"));
    }

    #[test]
    fn what_cannot_be_built_cannot_reach_the_wire() {
        // A name or value that would break the framing is refused by http's types
        // (and the statuses below 100 or above 999 too).
        let builds = |name: &str, value: &str| {
            http::Response::builder()
                .header(name, value)
                .body(())
                .is_ok()
        };
        assert!(!builds("X", "a\r\nInjected: 1"));
        assert!(!builds("X", "a\0b"));
        assert!(!builds("X", "a\nb"));
        assert!(!builds("Bad Name", "v"));
        assert!(!builds("", "v"));
        assert!(http::Response::builder().status(99).body(()).is_err());
        assert!(http::Response::builder().status(1000).body(()).is_err());
    }

    #[test]
    fn what_would_break_the_framing_is_an_error() {
        let bad = [
            response(101, "", &[]),
            response(200, "hi", &[("Content-Length", "999")]),
            response(200, "hi", &[("Content-Length", "+2")]),
            response(
                200,
                "hi",
                &[("Content-Length", "2"), ("Content-Length", "3")],
            ),
            response(200, "hi", &[("Transfer-Encoding", "chunked")]),
            response(204, "x", &[]),
            response(304, "x", &[]),
            response(205, "x", &[]),
            response(200, "", &[("Date", "a"), ("Date", "b")]),
            response(204, "", &[("Content-Length", "5")]),
        ];
        for response in bad {
            let mut out = Vec::new();
            let result = encode(&response, &mut out, false, true, "D");
            assert!(result.is_err() && out.is_empty(), "{response:?}");
        }
    }

    /// `from_maybe_shared_unchecked` checks its bytes in debug builds (and panics), so a
    /// value with CR LF reaches `encode` only in a release build.
    #[cfg(not(debug_assertions))]
    #[test]
    fn a_value_made_unchecked_is_still_refused() {
        let mut response = response(200, "", &[]);
        // SAFETY: the one precondition is valid UTF-8, and the bytes are ASCII.
        let raw = unsafe { HeaderValue::from_maybe_shared_unchecked(&b"a\r\nb"[..]) };
        response.headers_mut().insert("x", raw);
        let mut out = Vec::new();
        assert!(encode(&response, &mut out, false, true, "D").is_err() && out.is_empty());
    }

    #[test]
    fn framing_headers_from_the_handler_appear_once() {
        let text = encoded(response(200, "hi", &[("Content-Length", "2")]), false, true).unwrap();
        assert_eq!(text.matches("Content-Length").count(), 1, "{text}");
        let mut out = Vec::new();
        let close = response(200, "", &[("Connection", "Close")]);
        assert_eq!(encode(&close, &mut out, false, true, "D"), Ok(false));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.to_ascii_lowercase().matches("connection").count(), 1);
        assert!(text.contains("Connection: close\r\n"));
        let keep = response(200, "", &[("Connection", "keep-alive")]);
        let text = encoded(keep, false, false).unwrap();
        assert!(text.contains("Connection: close\r\n"));
        assert_eq!(text.to_ascii_lowercase().matches("connection").count(), 1);
        let text = encoded(response(200, "", &[("Date", "mine")]), false, true).unwrap();
        assert!(text.contains("Date: mine\r\n") && !text.contains("Date: D"));
    }

    #[test]
    fn bodyless_statuses_and_head() {
        let text = encoded(response(204, "", &[]), false, true).unwrap();
        assert!(!text.contains("Content-Length"), "{text}");
        let text = encoded(response(304, "", &[("Content-Length", "42")]), false, true).unwrap();
        assert!(text.contains("Content-Length: 42\r\n"));
        let text = encoded(response(200, "", &[("Content-Length", "42")]), true, true).unwrap();
        assert!(text.contains("Content-Length: 42\r\n"));
        let text = encoded(response(200, "body", &[]), true, true).unwrap();
        assert!(text.contains("Content-Length: 4\r\n") && !text.ends_with("body"));
    }
}
