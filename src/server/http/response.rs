//! Responses, and the checks that keep what a handler writes from breaking the framing.

use std::fmt::Write as _;

use super::syntax::{is_field_char, is_token, list_elements, trim_ows};

/// A response to send.
///
/// The server frames it. `Content-Length` is the body's length: a handler's own must
/// agree (or, for HEAD and 304 with no body, stands for the body a GET would have had).
/// A handler's `Connection: close` closes the connection after this response; its other
/// `Connection` values are dropped, and the server writes the one `Connection` header.
/// A handler's `Date` replaces the server's. `Transfer-Encoding`, a status outside
/// 200–599, a body on 204, 205 or 304, and a header name or value with CR, LF, NUL or
/// another control character are errors: the client gets a 500 instead, and the worker
/// logs why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code, 200–599.
    pub status: u16,
    /// Headers; `Content-Length`, `Date` and `Connection` are added by the server.
    pub headers: Vec<(String, String)>,
    /// The body (not sent for HEAD requests, but counted in `Content-Length`).
    pub body: Vec<u8>,
}

impl Response {
    /// A response with `status` and `body` and no extra headers.
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response::new(status, body).header("Content-Type", "text/plain")
    }

    /// Appends the encoded response to `out` and returns whether the connection stays
    /// open after it; on an error nothing is appended.
    pub(crate) fn encode(
        &self,
        out: &mut Vec<u8>,
        head_only: bool,
        keep_alive: bool,
        date: &str,
    ) -> Result<bool, String> {
        let status = self.status;
        if !(200..=599).contains(&status) {
            return Err(format!("status {status} is not a final status (200-599)"));
        }
        // RFC 9110 §15.3.5, §15.3.6, §15.4.5: no content in 204, 205 and 304.
        let bodyless = matches!(status, 204 | 205 | 304);
        if bodyless && !self.body.is_empty() {
            return Err(format!("a {status} response with a body"));
        }
        let (mut keep_alive, mut length, mut has_date) = (keep_alive, None, false);
        for (name, value) in &self.headers {
            if !is_token(name.as_bytes()) {
                return Err(format!("an invalid header name {name:?}"));
            }
            if !value.bytes().all(is_field_char) {
                return Err(format!("an invalid value for header {name}: {value:?}"));
            }
            if name.eq_ignore_ascii_case("content-length") {
                let text = trim_ows(value.as_bytes());
                let parsed = std::str::from_utf8(text)
                    .ok()
                    .filter(|t| t.bytes().all(|b| b.is_ascii_digit()));
                match parsed.and_then(|t| t.parse::<u64>().ok()) {
                    Some(n) if length.map_or(true, |l| l == n) => length = Some(n),
                    _ => return Err(format!("an invalid Content-Length {value:?}")),
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(
                    "Transfer-Encoding set by the handler (the server frames bodies)".into(),
                );
            } else if name.eq_ignore_ascii_case("connection") {
                let mut tokens = list_elements(std::iter::once(value.as_bytes()));
                keep_alive &= !tokens.any(|t| t.eq_ignore_ascii_case(b"close"));
            } else if name.eq_ignore_ascii_case("date") {
                if has_date {
                    return Err("more than one Date header".into());
                }
                has_date = true;
            }
        }
        let body_len = self.body.len() as u64;
        let length = match (status, length) {
            (204, None | Some(0)) => None,
            (204, Some(_)) => return Err("a 204 response with a Content-Length".into()),
            (304, length) => length,
            (_, Some(n)) if n != body_len && !(head_only && self.body.is_empty()) => {
                return Err(format!("Content-Length {n} for a body of {body_len} bytes"));
            }
            (_, length) => Some(length.unwrap_or(body_len)),
        };
        let mut head = String::with_capacity(128);
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let _ = write!(head, "HTTP/1.1 {status} {reason}\r\n");
        for (name, value) in &self.headers {
            let framing = ["content-length", "connection"];
            if !framing.iter().any(|f| name.eq_ignore_ascii_case(f)) {
                let _ = write!(head, "{name}: {value}\r\n");
            }
        }
        if let Some(length) = length {
            let _ = write!(head, "Content-Length: {length}\r\n");
        }
        if !has_date {
            let _ = write!(head, "Date: {date}\r\n");
        }
        head.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        out.extend_from_slice(head.as_bytes());
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        Ok(keep_alive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(response: Response, head_only: bool, keep_alive: bool) -> Result<String, String> {
        let mut out = Vec::new();
        response.encode(&mut out, head_only, keep_alive, "D")?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn responses_carry_length_date_and_connection() {
        let text = encode(Response::text(200, "Hello"), false, true).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 5\r\n") && text.contains("Date: D\r\n"));
        assert!(text.ends_with("Connection: keep-alive\r\n\r\nHello"));
        let head = encode(Response::text(200, "Hello"), true, false).unwrap();
        assert!(head.ends_with("Content-Length: 5\r\nDate: D\r\nConnection: close\r\n\r\n"));
    }

    #[test]
    fn what_would_break_the_framing_is_an_error() {
        let bad = [
            Response::new(200, "").header("X", "a\r\nInjected: 1"),
            Response::new(200, "").header("X", "a\0b"),
            Response::new(200, "").header("X", "a\nb"),
            Response::new(200, "").header("Bad Name", "v"),
            Response::new(200, "").header("", "v"),
            Response::new(99, ""),
            Response::new(101, ""),
            Response::new(1000, ""),
            Response::new(200, "hi").header("Content-Length", "999"),
            Response::new(200, "hi").header("Content-Length", "+2"),
            Response::new(200, "hi")
                .header("Content-Length", "2")
                .header("Content-Length", "3"),
            Response::new(200, "hi").header("Transfer-Encoding", "chunked"),
            Response::new(204, "x"),
            Response::new(304, "x"),
            Response::new(205, "x"),
            Response::new(200, "")
                .header("Date", "a")
                .header("Date", "b"),
            Response::new(204, "").header("Content-Length", "5"),
        ];
        for response in bad {
            let mut out = Vec::new();
            let result = response.encode(&mut out, false, true, "D");
            assert!(result.is_err() && out.is_empty(), "{response:?}");
        }
    }

    #[test]
    fn framing_headers_from_the_handler_appear_once() {
        let text = encode(
            Response::new(200, "hi").header("Content-Length", "2"),
            false,
            true,
        )
        .unwrap();
        assert_eq!(text.matches("Content-Length").count(), 1, "{text}");
        let mut out = Vec::new();
        let close = Response::new(200, "").header("Connection", "Close");
        assert_eq!(close.encode(&mut out, false, true, "D"), Ok(false));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("Connection").count(), 1);
        assert!(text.contains("Connection: close\r\n"));
        let text = encode(
            Response::new(200, "").header("Connection", "keep-alive"),
            false,
            false,
        )
        .unwrap();
        assert!(text.contains("Connection: close\r\n") && text.matches("Connection").count() == 1);
        let text = encode(Response::new(200, "").header("Date", "mine"), false, true).unwrap();
        assert!(text.contains("Date: mine\r\n") && !text.contains("Date: D"));
    }

    #[test]
    fn bodyless_statuses_and_head() {
        let text = encode(Response::new(204, ""), false, true).unwrap();
        assert!(!text.contains("Content-Length"), "{text}");
        let text = encode(
            Response::new(304, "").header("Content-Length", "42"),
            false,
            true,
        )
        .unwrap();
        assert!(text.contains("Content-Length: 42\r\n"));
        let text = encode(
            Response::new(200, "").header("Content-Length", "42"),
            true,
            true,
        )
        .unwrap();
        assert!(text.contains("Content-Length: 42\r\n"));
        let text = encode(Response::new(200, "body"), true, true).unwrap();
        assert!(text.contains("Content-Length: 4\r\n") && !text.ends_with("body"));
    }
}
