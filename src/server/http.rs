//! HTTP/1.1 messages and the incremental request parser (heads parsed by `httparse`).
//!
//! The parser is pure — bytes in, requests or an error status out — so it can be fed
//! input split at any point and fuzzed without sockets. Every buffer it keeps is bounded
//! by the limits it is given.

use std::fmt::Write as _;
use std::mem::MaybeUninit;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ….
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header names and values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    pub(crate) keep_alive: bool,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The value of query parameter `name`, undecoded.
    pub fn query(&self, name: &str) -> Option<&str> {
        let query = self.target.split_once('?')?.1;
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Extra headers; `Content-Length`, `Date` and `Connection` are added by the server.
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

    /// Appends the encoded response to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>, head_only: bool, keep_alive: bool, date: &str) {
        let mut head = String::with_capacity(128);
        let _ = write!(head, "HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (name, value) in &self.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        let _ = write!(
            head,
            "Content-Length: {}\r\nDate: {date}\r\n",
            self.body.len()
        );
        head.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        out.extend_from_slice(head.as_bytes());
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

/// The reason phrase of the statuses the server produces or commonly sees.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// The interim response sent before reading a body the client waits to send.
pub(crate) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The most headers a request may have (`Limits::max_headers` is capped at it).
pub(crate) const MAX_HEADERS: usize = 100;

/// Bounds on what one connection may make the server hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_head: usize,
    pub max_headers: usize,
    pub max_body: u64,
}

/// A request the parser refuses: the status to answer with before closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub why: &'static str,
}

fn refuse(status: u16, why: &'static str) -> Refusal {
    Refusal { status, why }
}

/// What the parser produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A complete request.
    Request(Request),
    /// The head asked for `100 Continue` and its body has not arrived yet.
    Continue,
}

#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(Chunk),
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Incremental request parser for one connection.
#[derive(Debug)]
pub(crate) struct Parser {
    limits: Limits,
    buf: Vec<u8>,
    /// A request whose head is parsed and whose body is being read.
    pending: Option<(Request, Body)>,
    continue_sent: bool,
}

impl Parser {
    pub(crate) fn new(limits: Limits) -> Parser {
        Parser {
            limits,
            buf: Vec::new(),
            pending: None,
            continue_sent: false,
        }
    }

    /// Bytes received and not yet consumed.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether a request has begun (bytes buffered or a head parsed) but is not complete.
    pub(crate) fn mid_request(&self) -> bool {
        self.pending.is_some() || !self.buf.is_empty()
    }

    /// How many more bytes this parser will accept now (the connection reads no more).
    /// Zero when a head's worth is buffered: [`Parser::next`] then either parses a head
    /// out of it or refuses it.
    pub(crate) fn room(&self) -> usize {
        match &self.pending {
            None => self.limits.max_head.saturating_sub(self.buf.len()),
            Some(_) => 64 * 1024,
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete request, `Ok(None)` if more input is needed.
    pub(crate) fn next(&mut self) -> Result<Option<Parsed>, Refusal> {
        if self.pending.is_none() && !self.parse_head()? {
            return Ok(None);
        }
        let (request, body) = self.pending.as_mut().expect("head parsed");
        if read_body(&mut self.buf, request, body, self.limits.max_body)? {
            self.continue_sent = false;
            let (request, _) = self.pending.take().expect("pending");
            return Ok(Some(Parsed::Request(request)));
        }
        let wants_continue = request
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
        if wants_continue && request.minor_version == 1 && !self.continue_sent {
            self.continue_sent = true;
            return Ok(Some(Parsed::Continue));
        }
        Ok(None)
    }

    /// Parses a head from the buffer; `Ok(false)` if it is not complete yet.
    fn parse_head(&mut self) -> Result<bool, Refusal> {
        // On the stack and left uninitialized: this runs for every request.
        let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let headers = &mut headers[..self.limits.max_headers.min(MAX_HEADERS)];
        let len = match parsed.parse_with_uninit_headers(&self.buf, headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if self.buf.len() >= self.limits.max_head => {
                return Err(refuse(431, "request head too large"));
            }
            Ok(httparse::Status::Partial) => return Ok(false),
            Err(httparse::Error::TooManyHeaders) => return Err(refuse(431, "too many headers")),
            Err(_) => return Err(refuse(400, "malformed request head")),
        };
        if len > self.limits.max_head {
            return Err(refuse(431, "request head too large"));
        }
        let minor_version = parsed.version.unwrap_or(1);
        let mut request = Request {
            method: parsed.method.unwrap_or("").to_owned(),
            target: parsed.path.unwrap_or("").to_owned(),
            minor_version,
            headers: parsed
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_owned()))
                .collect(),
            body: Vec::new(),
            keep_alive: minor_version == 1,
        };
        if let Some(conn) = request.header("connection") {
            let has = |token: &[u8]| {
                conn.split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
            };
            if has(b"close") {
                request.keep_alive = false;
            } else if has(b"keep-alive") {
                request.keep_alive = true;
            }
        }
        let body = body_kind(&request, self.limits.max_body)?;
        self.buf.drain(..len);
        self.pending = Some((request, body));
        Ok(true)
    }
}

fn body_kind(request: &Request, max_body: u64) -> Result<Body, Refusal> {
    let lengths: Vec<&[u8]> = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_slice())
        .collect();
    let encoding = request.header("transfer-encoding");
    match (encoding, lengths.as_slice()) {
        (Some(_), [_, ..]) => Err(refuse(400, "both Content-Length and Transfer-Encoding")),
        (Some(te), []) if te.trim_ascii().eq_ignore_ascii_case(b"chunked") => {
            if request.minor_version == 0 {
                return Err(refuse(400, "chunked body in an HTTP/1.0 request"));
            }
            Ok(Body::Chunked(Chunk::Size))
        }
        (Some(_), []) => Err(refuse(501, "unsupported Transfer-Encoding")),
        (None, []) => Ok(Body::Length(0)),
        (None, [first, rest @ ..]) => {
            if rest.iter().any(|v| v != first) {
                return Err(refuse(400, "conflicting Content-Length headers"));
            }
            let text = std::str::from_utf8(first).map_err(|_| refuse(400, "bad Content-Length"))?;
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(refuse(400, "bad Content-Length"));
            }
            let len: u64 = text.parse().map_err(|_| refuse(413, "body too large"))?;
            if len > max_body {
                return Err(refuse(413, "body too large"));
            }
            Ok(Body::Length(len))
        }
    }
}

/// Moves body bytes from `buf` into the request; `true` when the body is complete.
fn read_body(
    buf: &mut Vec<u8>,
    request: &mut Request,
    body: &mut Body,
    max_body: u64,
) -> Result<bool, Refusal> {
    match body {
        Body::Length(left) => {
            let take = (*left).min(buf.len() as u64) as usize;
            request.body.extend_from_slice(&buf[..take]);
            buf.drain(..take);
            *left -= take as u64;
            Ok(*left == 0)
        }
        Body::Chunked(state) => loop {
            match *state {
                Chunk::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.drain(..used);
                        if request.body.len() as u64 + size > max_body {
                            return Err(refuse(413, "body too large"));
                        }
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > 1024 => {
                        return Err(refuse(400, "chunk size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(false),
                    Err(_) => return Err(refuse(400, "bad chunk size")),
                },
                Chunk::Data(left) => {
                    let take = left.min(buf.len() as u64) as usize;
                    if take == 0 {
                        return Ok(false);
                    }
                    request.body.extend_from_slice(&buf[..take]);
                    buf.drain(..take);
                    *state = if left == take as u64 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - take as u64)
                    };
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(false);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(refuse(400, "chunk data not followed by CRLF"));
                    }
                    buf.drain(..2);
                    *state = Chunk::Size;
                }
                Chunk::Trailers => {
                    // Trailer fields are read and dropped; the body ends at an empty line.
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if buf.len() > 8 * 1024 {
                            return Err(refuse(431, "trailers too large"));
                        }
                        return Ok(false);
                    };
                    buf.drain(..end + 2);
                    if end == 0 {
                        return Ok(true);
                    }
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 8192,
        max_headers: 64,
        max_body: 1024,
    };

    fn parse_all(input: &[u8]) -> Result<Vec<Request>, Refusal> {
        let mut p = Parser::new(LIMITS);
        p.feed(input);
        let mut out = Vec::new();
        while let Some(parsed) = p.next()? {
            if let Parsed::Request(r) = parsed {
                out.push(r);
            }
        }
        Ok(out)
    }

    #[test]
    fn pipelined_requests_come_out_in_order_with_bodies() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.0\r\n\r\n";
        let reqs = parse_all(input).unwrap();
        let targets: Vec<_> = reqs.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["/a", "/b", "/c"]);
        assert_eq!(reqs[1].body, b"abc");
        assert!(reqs[0].keep_alive && !reqs[2].keep_alive);
    }

    #[test]
    fn input_split_at_every_byte_parses_the_same() {
        let input = b"POST /e HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n";
        for split in 0..input.len() {
            let mut p = Parser::new(LIMITS);
            p.feed(&input[..split]);
            let mut got = Vec::new();
            while let Some(Parsed::Request(r)) = p.next().unwrap() {
                got.push(r);
            }
            p.feed(&input[split..]);
            while let Some(Parsed::Request(r)) = p.next().unwrap() {
                got.push(r);
            }
            assert_eq!(got.len(), 1, "split at {split}");
            assert_eq!(got[0].body, b"abcde");
        }
    }

    #[test]
    fn bad_input_gets_the_right_status() {
        let status = |input: &[u8]| parse_all(input).unwrap_err().status;
        assert_eq!(status(b"\x01\x02 / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            501
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"),
            413
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(status(big.as_bytes()), 431);
        let many: String = (0..100).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
    }

    #[test]
    fn expect_continue_is_announced_once_before_the_body() {
        let mut p = Parser::new(LIMITS);
        p.feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(p.next().unwrap(), Some(Parsed::Continue));
        assert_eq!(p.next().unwrap(), None);
        p.feed(b"hi");
        assert!(matches!(p.next().unwrap(), Some(Parsed::Request(r)) if r.body == b"hi"));
    }

    #[test]
    fn responses_carry_length_date_and_connection() {
        let mut out = Vec::new();
        Response::text(200, "Hello").encode(&mut out, false, true, "D");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 5\r\n") && text.contains("Date: D\r\n"));
        assert!(text.ends_with("Connection: keep-alive\r\n\r\nHello"));
        let mut head = Vec::new();
        Response::text(200, "Hello").encode(&mut head, true, false, "D");
        assert!(String::from_utf8(head)
            .unwrap()
            .ends_with("Connection: close\r\n\r\n"));
    }

    /// Everything a parser makes of `input` fed in pieces ending at `cuts`, feeding no
    /// more than `room()` at a time as a connection does; checks the buffer bound.
    fn outcomes(input: &[u8], cuts: &[usize]) -> (Vec<Request>, Option<u16>) {
        let limits = Limits {
            max_head: 256,
            max_headers: 8,
            max_body: 512,
        };
        let mut p = Parser::new(limits);
        let (mut requests, mut pos) = (Vec::new(), 0);
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        ends.push(input.len());
        ends.sort_unstable();
        for end in ends {
            while pos < end {
                let take = (end - pos).min(p.room());
                p.feed(&input[pos..pos + take]);
                pos += take;
                assert!(
                    p.buffered() <= limits.max_head + 64 * 1024,
                    "unbounded buffer"
                );
                loop {
                    match p.next() {
                        Ok(Some(Parsed::Request(r))) => requests.push(r),
                        Ok(Some(Parsed::Continue)) => {}
                        Ok(None) => break,
                        Err(refusal) => return (requests, Some(refusal.status)),
                    }
                }
            }
        }
        (requests, None)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic_and_splits_do_not_matter(
            input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            cuts in proptest::collection::vec(0usize..1000, 0..8),
        ) {
            let whole = outcomes(&input, &[]);
            let split = outcomes(&input, &cuts);
            proptest::prop_assert_eq!(whole, split);
        }

        #[test]
        fn request_like_input_parses_the_same_however_split(
            method in "(GET|POST|HEAD)",
            path in "/[a-z]{0,12}",
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100),
            chunked in proptest::prelude::any::<bool>(),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let mut input = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n").into_bytes();
            if chunked {
                input.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                if !body.is_empty() {
                    input.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                    input.extend_from_slice(&body);
                    input.extend_from_slice(b"\r\n");
                }
                input.extend_from_slice(b"0\r\n\r\n");
            } else {
                input.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                input.extend_from_slice(&body);
            }
            let (requests, refused) = outcomes(&input, &cuts);
            proptest::prop_assert_eq!(refused, None);
            proptest::prop_assert_eq!(requests.len(), 1);
            proptest::prop_assert_eq!(&requests[0].body, &body);
        }
    }
}
