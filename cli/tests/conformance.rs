//! HTTP/1.1 conformance and request smuggling, written from RFC 9112 and RFC 9110, against
//! a real `forkloop serve`.
//!
//! `conformance_table` runs every case of [`cases`] on a connection of its own: the case's
//! bytes, then [`FOLLOW_UP`], read until the server closes (every read bounded). A request
//! the server refuses must be answered alone and with `Connection: close`, so the follow-up
//! and anything smuggled after it get no answer; a request it accepts leaves the
//! connection usable, so the follow-up is answered. Smuggled requests ask for `/smuggled`,
//! which the app answers 404: a smuggle shows up as an extra 404.
//!
//! `cargo test -p forkloop-cli --test conformance -- --show-output` prints
//! `conformance: P of N cases pass` and a line per failure;
//! `FORKLOOP_CONFORMANCE_CASE=text` runs only the cases whose name contains `text`, and
//! adds the raw bytes received to each failure line.
#![cfg(target_os = "linux")]

mod common;

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{start, Server};

/// Sent after every case's input on the same connection.
const FOLLOW_UP: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
/// What the app answers `GET /` with.
const HELLO: &[u8] = b"Hello, World!";
/// How long a case may take to be answered and closed; a case still open then hangs.
const CASE_LIMIT: Duration = Duration::from_secs(5);
/// The table's server: `--max-body-size`, and the default `max_header_size`.
const MAX_BODY: usize = 1024;
const MAX_HEAD: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------
// Responses: one parser, one connection type.

/// One response as received.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    /// Every value of the header `name` (case-insensitive), one per field line.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether a `Connection` header carries the `close` option.
    fn closes(&self) -> bool {
        self.all("connection")
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    /// An interim (1xx) response, skipped when counting answers; 101 ends HTTP/1.1 and
    /// counts as final.
    fn interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status)?;
        if self.closes() {
            write!(f, " close")?;
        }
        if !self.body.is_empty() {
            write!(f, " {}", snippet(&self.body, 40))?;
        }
        Ok(())
    }
}

enum Parsed {
    /// A complete response and the bytes it took.
    Reply(Reply, usize),
    Partial,
    Invalid(String),
}

/// Parses one response from the start of `buf`: status line, headers, a body of
/// `Content-Length` bytes (none for 1xx, 204 and 304; any other without it is invalid).
fn parse_reply(buf: &[u8]) -> Parsed {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > 64 * 1024 || !(buf.starts_with(b"HTTP/") || b"HTTP/".starts_with(buf))
        {
            Parsed::Invalid(format!("not a response: {}", snippet(buf, 80)))
        } else {
            Parsed::Partial
        };
    };
    let invalid = |why: &str| Parsed::Invalid(format!("{why}: {}", snippet(&buf[..head_end], 200)));
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .filter(|rest| rest.len() >= 4 && rest.as_bytes()[3] == b' ')
        .and_then(|rest| rest[..3].parse::<u16>().ok())
        .filter(|s| (100..600).contains(s));
    let Some(status) = status else {
        return invalid("a bad status line");
    };
    let mut headers = Vec::new();
    for line in lines {
        match line.split_once(':') {
            Some((name, value))
                if !name.is_empty()
                    && name.bytes().all(is_tchar)
                    && !value.bytes().any(|b| b == b'\r' || b == b'\n') =>
            {
                headers.push((name.to_owned(), value.trim().to_owned()));
            }
            _ => return invalid("a bad header line"),
        }
    }
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    let length = if status < 200 || status == 204 || status == 304 {
        0
    } else {
        let lengths = reply.all("content-length");
        let Some(first) = lengths.first() else {
            return invalid(&format!("a {status} without Content-Length"));
        };
        match first.parse::<usize>() {
            Ok(n) if lengths.iter().all(|l| l == first) => n,
            _ => return invalid("a bad Content-Length"),
        }
    };
    let body_start = head_end + 4;
    if buf.len() < body_start + length {
        return Parsed::Partial;
    }
    reply.body = buf[body_start..body_start + length].to_vec();
    Parsed::Reply(reply, body_start + length)
}

/// How a read ended.
#[derive(Debug)]
enum Stop {
    /// The condition asked for holds; the connection may still be open.
    Done,
    Eof,
    Reset,
    /// Still open, nothing more, when the time was up.
    Hang,
    /// Bytes that are not a response (or a read error).
    Garbage(String),
}

impl Stop {
    /// Whether the server ended the connection cleanly.
    fn closed(&self) -> bool {
        matches!(self, Stop::Eof | Stop::Reset)
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Done => write!(f, "open"),
            Stop::Eof => write!(f, "EOF"),
            Stop::Reset => write!(f, "reset"),
            Stop::Hang => write!(f, "hang (still open, nothing more)"),
            Stop::Garbage(why) => write!(f, "garbage: {why}"),
        }
    }
}

/// A client connection that keeps every byte it received and every response parsed.
struct Conn {
    stream: TcpStream,
    raw: Vec<u8>,
    unparsed: Vec<u8>,
    replies: Vec<Reply>,
}

impl Conn {
    fn open(addr: &str) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_write_timeout(Some(CASE_LIMIT)).unwrap();
        Conn {
            stream,
            raw: Vec::new(),
            unparsed: Vec::new(),
            replies: Vec::new(),
        }
    }

    /// Writes `bytes`; `false` if the server no longer takes them (it may have closed:
    /// what it answered is still read after this).
    fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Reads and parses until `done` holds for the responses so far, the server closes,
    /// garbage arrives or `within` has passed.
    fn read_until(&mut self, within: Duration, done: impl Fn(&[Reply]) -> bool) -> Stop {
        let deadline = Instant::now() + within;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            loop {
                match parse_reply(&self.unparsed) {
                    Parsed::Reply(reply, used) => {
                        self.unparsed.drain(..used);
                        self.replies.push(reply);
                    }
                    Parsed::Partial => break,
                    Parsed::Invalid(why) => return Stop::Garbage(why),
                }
            }
            if done(&self.replies) {
                return Stop::Done;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Stop::Hang;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let truncated = |unparsed: &[u8]| {
                Stop::Garbage(format!("closed mid-response: {}", snippet(unparsed, 80)))
            };
            match self.stream.read(&mut chunk) {
                Ok(0) if self.unparsed.is_empty() => return Stop::Eof,
                Ok(0) => return truncated(&self.unparsed),
                Ok(n) => {
                    self.raw.extend_from_slice(&chunk[..n]);
                    self.unparsed.extend_from_slice(&chunk[..n]);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Stop::Hang
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset && self.unparsed.is_empty() => {
                    return Stop::Reset
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return truncated(&self.unparsed)
                }
                Err(e) => return Stop::Garbage(format!("read error: {e}")),
            }
        }
    }

    /// Reads until the server closes (or `within` passes).
    fn read_to_close(&mut self, within: Duration) -> Stop {
        self.read_until(within, |_| false)
    }

    /// Reads until the first final response.
    fn read_answer(&mut self, within: Duration) -> Stop {
        self.read_until(within, |replies| replies.iter().any(|r| !r.interim()))
    }

    /// Sends `bytes` one at a time, `every` apart (pacing a slow client), while nothing
    /// comes back; `false` if the server answered or closed before the last byte.
    fn trickle(&mut self, bytes: &[u8], every: Duration) -> bool {
        for (i, byte) in bytes.iter().enumerate() {
            if i > 0 && !matches!(self.read_until(every, |r| !r.is_empty()), Stop::Hang) {
                return false;
            }
            if !self.send(std::slice::from_ref(byte)) {
                return false;
            }
        }
        true
    }

    /// The final (non-interim) responses.
    fn finals(&self) -> Vec<&Reply> {
        self.replies.iter().filter(|r| !r.interim()).collect()
    }

    fn statuses(&self) -> Vec<u16> {
        self.finals().iter().map(|r| r.status).collect()
    }

    /// What came: every final response, then how the read ended.
    fn transcript(&self, stop: &Stop) -> String {
        let replies: Vec<String> = self.finals().iter().map(|r| r.to_string()).collect();
        format!("[{}] then {stop}", replies.join(", "))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `bytes` quoted, escaped and cut to `max` characters.
fn snippet(bytes: &[u8], max: usize) -> String {
    let text = format!("{:?}", String::from_utf8_lossy(bytes));
    if text.chars().count() > max {
        format!("{}…", text.chars().take(max).collect::<String>())
    } else {
        text
    }
}

/// RFC 9110 §5.6.2 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

// ---------------------------------------------------------------------------------------
// The table.

/// What a case must get, exactly.
#[derive(Debug)]
enum Expect {
    /// Refused: this one response, saying `Connection: close`, then EOF — the follow-up
    /// and anything smuggled get no answer.
    Rejected(u16),
    /// These responses, the last saying `Connection: close`, then EOF (the follow-up is
    /// not answered).
    Closes(&'static [u16]),
    /// These responses, none saying close, then the follow-up's 200 `Hello, World!`.
    Accepted(&'static [u16]),
    /// One 200 whose body is this (what `POST /echo` sent, de-chunked), then the
    /// follow-up's 200 `Hello, World!`.
    Echoes(Vec<u8>),
}

use Expect::*;

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |l: &[u16]| l.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        match self {
            Rejected(s) => write!(f, "[{s} close] then EOF"),
            Closes(l) => write!(f, "[{} close] then EOF", list(l)),
            Accepted(l) => write!(f, "[{}, 200 \"Hello, World!\"] then EOF", list(l)),
            Echoes(b) => write!(
                f,
                "[200 {}, 200 \"Hello, World!\"] then EOF",
                snippet(b, 40)
            ),
        }
    }
}

impl Expect {
    /// `Err(why)` unless what `conn` received ending with `stop` is exactly this.
    fn check(&self, conn: &Conn, stop: &Stop) -> Result<(), String> {
        let finals = conn.finals();
        let (want, closing): (Vec<u16>, bool) = match self {
            Rejected(s) => (vec![*s], true),
            Closes(l) => (l.to_vec(), true),
            Accepted(l) => ([*l, &[200][..]].concat(), false),
            Echoes(_) => (vec![200, 200], false),
        };
        if conn.statuses() != want {
            return Err("other statuses".into());
        }
        if !stop.closed() {
            return Err("the connection did not end with the server closing it".into());
        }
        let (last, before) = finals.split_last().expect("statuses matched");
        if closing {
            if !last.closes() {
                return Err(format!(
                    "the {} does not say Connection: close",
                    last.status
                ));
            }
            return Ok(());
        }
        if last.body != HELLO {
            return Err("the follow-up's body is not Hello, World!".into());
        }
        if let Some(r) = before.iter().find(|r| r.closes()) {
            return Err(format!("the {} says Connection: close", r.status));
        }
        match self {
            Echoes(body) if finals[0].body != *body => Err("the echo differs".into()),
            _ => Ok(()),
        }
    }
}

struct Case {
    name: String,
    rfc: &'static str,
    input: Vec<u8>,
    expect: Expect,
}

fn case(
    name: impl Into<String>,
    rfc: &'static str,
    input: impl AsRef<[u8]>,
    expect: Expect,
) -> Case {
    Case {
        name: name.into(),
        rfc,
        input: input.as_ref().to_vec(),
        expect,
    }
}

/// `request_line` with a valid Host.
fn line(request_line: &[u8]) -> Vec<u8> {
    [request_line, b"\r\nHost: x\r\n\r\n"].concat()
}

/// `GET /` with these header lines (each ending in CRLF) and no Host of its own.
fn get(headers: &str) -> Vec<u8> {
    format!("GET / HTTP/1.1\r\n{headers}\r\n").into_bytes()
}

/// `GET /` with Host and `body`, framed by Content-Length.
fn get_with_body(body: &[u8]) -> Vec<u8> {
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

/// `POST /echo` with Host, these header lines (each ending in CRLF), then `body`.
fn echo(headers: &str, body: &[u8]) -> Vec<u8> {
    [
        format!("POST /echo HTTP/1.1\r\nHost: x\r\n{headers}\r\n").as_bytes(),
        body,
    ]
    .concat()
}

/// `POST /echo` with `Transfer-Encoding: chunked` and this chunked body.
fn chunked(body: &[u8]) -> Vec<u8> {
    echo("Transfer-Encoding: chunked\r\n", body)
}

/// `hello` in one chunk.
const HELLO_CHUNKED: &[u8] = b"5\r\nhello\r\n0\r\n\r\n";

const LINE: &str = "RFC 9112 §3";
const TARGET: &str = "RFC 9112 §3.2";
const VERSION: &str = "RFC 9112 §2.3";
const HOST: &str = "RFC 9112 §3.2, RFC 9110 §7.2";
const FIELDS: &str = "RFC 9112 §5, RFC 9110 §5.5";
const LENGTH: &str = "RFC 9112 §6.3, RFC 9110 §8.6";
const CODING: &str = "RFC 9112 §6.1, §6.3, RFC 9110 §5.3";
const CHUNKS: &str = "RFC 9112 §7.1";
const EXTENSIONS: &str = "RFC 9112 §7.1.1";
const TRAILERS: &str = "RFC 9112 §7.1.2";
const CONNECTION: &str = "RFC 9112 §9.3, §9.6, RFC 9110 §7.6.1";
const EXPECT: &str = "RFC 9110 §10.1.1";

fn cases() -> Vec<Case> {
    let mut c = vec![
        // Request line.
        case("request line: valid", LINE, line(b"GET / HTTP/1.1"), Accepted(&[200])),
        case(
            "request line: leading empty lines ignored",
            "RFC 9112 §2.2",
            [b"\r\n\r\n", &line(b"GET / HTTP/1.1")[..]].concat(),
            Accepted(&[200]),
        ),
        case("request line: two spaces", LINE, line(b"GET  / HTTP/1.1"), Rejected(400)),
        case("request line: tab for a space", LINE, line(b"GET\t/ HTTP/1.1"), Rejected(400)),
        case("request line: NUL", LINE, line(b"GET / HTTP/1.1\0"), Rejected(400)),
        case("request line: bare CR", "RFC 9112 §2.2", line(b"GET /\rx HTTP/1.1"), Rejected(400)),
        case(
            "request line: bare LF ends it",
            "RFC 9112 §2.2",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            Rejected(400),
        ),
        case("request line: empty method", LINE, line(b" / HTTP/1.1"), Rejected(400)),
        case(
            "request line: method not a token",
            "RFC 9112 §3.1, RFC 9110 §9.1",
            line(b"G(T / HTTP/1.1"),
            Rejected(400),
        ),
        case("target: space", TARGET, line(b"GET /a b HTTP/1.1"), Rejected(400)),
        case("target: control byte", TARGET, line(b"GET /a\x01b HTTP/1.1"), Rejected(400)),
        case("target: DEL", TARGET, line(b"GET /a\x7fb HTTP/1.1"), Rejected(400)),
        case(
            "target: absolute-form with an empty host",
            "RFC 9110 §4.2.1",
            line(b"GET http://:80/ HTTP/1.1"),
            Rejected(400),
        ),
        case("target: fragment", TARGET, line(b"GET /a#b HTTP/1.1"), Rejected(400)),
        case("target: non-ASCII", TARGET, line(b"GET /caf\xc3\xa9 HTTP/1.1"), Rejected(400)),
        case("target: not starting with /", TARGET, line(b"GET index.html HTTP/1.1"), Rejected(400)),
        case(
            "target: 8000-octet request line accepted",
            LINE,
            line(format!("GET /{} HTTP/1.1", "a".repeat(7985)).as_bytes()),
            Accepted(&[404]),
        ),
        case(
            "target: request line over the head limit",
            "RFC 9112 §3, RFC 9110 §15.5.15",
            line(format!("GET /{} HTTP/1.1", "a".repeat(20_000)).as_bytes()),
            Rejected(414),
        ),
        case(
            "target: absolute-form",
            "RFC 9112 §3.2.2",
            b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
            Accepted(&[200]),
        ),
        case(
            "target: absolute-form, empty path",
            "RFC 9112 §3.2.2, RFC 9110 §4.2.3",
            b"GET http://example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
            Accepted(&[200]),
        ),
        case(
            "target: absolute-form routes by its path",
            "RFC 9112 §3.2.2",
            b"GET http://example.com/smuggled HTTP/1.1\r\nHost: example.com\r\n\r\n",
            Accepted(&[404]),
        ),
        case("target: absolute-form, not http", "RFC 9112 §3.2.2", line(b"GET ftp://x/ HTTP/1.1"), Rejected(400)),
        case("target: OPTIONS *", "RFC 9112 §3.2.4", line(b"OPTIONS * HTTP/1.1"), Accepted(&[204])),
        case("target: GET *", "RFC 9112 §3.2.4", line(b"GET * HTTP/1.1"), Rejected(400)),
        case(
            "target: authority-form for GET",
            "RFC 9112 §3.2.3",
            line(b"GET example.com:443 HTTP/1.1"),
            Rejected(400),
        ),
        case(
            "target: CONNECT",
            "RFC 9112 §3.2.3, RFC 9110 §9.3.6",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            Rejected(501),
        ),
        case("version: lowercase", VERSION, line(b"GET / http/1.1"), Rejected(400)),
        case("version: HTTP/1", VERSION, line(b"GET / HTTP/1"), Rejected(400)),
        case("version: HTTP/1.1x", VERSION, line(b"GET / HTTP/1.1x"), Rejected(400)),
        case("version: missing", VERSION, line(b"GET /"), Rejected(400)),
        case("version: HTTP/1.2 served as 1.1", VERSION, line(b"GET / HTTP/1.2"), Accepted(&[200])),
        // Host.
        case("Host: missing in HTTP/1.1", HOST, get(""), Rejected(400)),
        case("Host: two lines", HOST, get("Host: x\r\nHost: x\r\n"), Rejected(400)),
        case(
            "Host: two lines in HTTP/1.0",
            HOST,
            b"GET / HTTP/1.0\r\nHost: x\r\nHost: x\r\n\r\n",
            Rejected(400),
        ),
        case("Host: missing in HTTP/1.0", HOST, b"GET / HTTP/1.0\r\n\r\n", Closes(&[200])),
        // Header fields.
        case("field: space before colon", "RFC 9112 §5.1", get("Host : x\r\n"), Rejected(400)),
        case(
            "field: space before colon in Content-Length",
            "RFC 9112 §5.1",
            echo("Content-Length : 5\r\n", b"hello"),
            Rejected(400),
        ),
        case("field: obs-fold with SP", "RFC 9112 §5.2", get("Host: x\r\nX-A: a\r\n b\r\n"), Rejected(400)),
        case("field: obs-fold with HTAB", "RFC 9112 §5.2", get("Host: x\r\nX-A: a\r\n\tb\r\n"), Rejected(400)),
        case(
            "field: whitespace before the first field",
            "RFC 9112 §2.2",
            get(" Host: x\r\n"),
            Rejected(400),
        ),
        case("field: NUL in a value", FIELDS, get("Host: x\r\nX-A: a\0b\r\n"), Rejected(400)),
        case("field: bare CR in a value", "RFC 9112 §2.2", get("Host: x\r\nX-A: a\rb\r\n"), Rejected(400)),
        case("field: bare LF ends a line", "RFC 9112 §2.2", get("Host: x\nX-A: b\r\n"), Rejected(400)),
        case("field: name not a token", "RFC 9110 §5.1", get("Host: x\r\nHo(st: x\r\n"), Rejected(400)),
        case("field: empty name", "RFC 9110 §5.1", get("Host: x\r\n: x\r\n"), Rejected(400)),
        case("field: missing colon", "RFC 9112 §5", get("Host: x\r\nNoColon\r\n"), Rejected(400)),
        case(
            "field: 100 lines accepted",
            "RFC 9112 §5",
            get(&many_fields(99)),
            Accepted(&[200]),
        ),
        case(
            "field: more than 100 lines",
            "RFC 9112 §5, RFC 6585 §5",
            get(&many_fields(100)),
            Rejected(431),
        ),
        case(
            "field: one value over the head limit",
            "RFC 6585 §5",
            get(&format!("Host: x\r\nX-Big: {}\r\n", "a".repeat(MAX_HEAD + 1000))),
            Rejected(431),
        ),
        case(
            "field: 50 fields over the head limit",
            "RFC 6585 §5",
            get(&(0..50).map(|i| format!("X-{i}: {}\r\n", "a".repeat(400))).collect::<String>()),
            Rejected(431),
        ),
        // Content-Length.
        case("Content-Length: valid", LENGTH, echo("Content-Length: 5\r\n", b"hello"), Echoes(b"hello".to_vec())),
        case(
            "Content-Length: two identical lines",
            LENGTH,
            echo("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "Content-Length: identical list",
            LENGTH,
            echo("Content-Length: 5, 5\r\n", b"hello"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "Content-Length: leading zeros",
            LENGTH,
            echo("Content-Length: 0005\r\n", b"hello"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "Content-Length: different list",
            LENGTH,
            echo("Content-Length: 5, 6\r\n", b"hello!"),
            Rejected(400),
        ),
        case(
            "Content-Length: two different lines",
            LENGTH,
            echo("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
            Rejected(400),
        ),
        case(
            "Content-Length: 30 digits",
            LENGTH,
            echo("Content-Length: 123456789012345678901234567890\r\n", b""),
            Rejected(413),
        ),
        case(
            "Content-Length: the body limit",
            LENGTH,
            echo(&format!("Content-Length: {MAX_BODY}\r\n"), "a".repeat(MAX_BODY).as_bytes()),
            Echoes("a".repeat(MAX_BODY).into_bytes()),
        ),
        case(
            "Content-Length: over the body limit",
            "RFC 9110 §15.5.14",
            echo(&format!("Content-Length: {}\r\n", MAX_BODY + 1), b""),
            Rejected(413),
        ),
        case(
            "Content-Length: a GET's body is framed",
            LENGTH,
            get_with_body(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"),
            Accepted(&[200]),
        ),
        // Transfer-Encoding.
        case("TE: chunked", CODING, chunked(HELLO_CHUNKED), Echoes(b"hello".to_vec())),
        case(
            "TE: chunked with Content-Length",
            "RFC 9112 §6.1, §6.3",
            te_and_cl(true),
            Rejected(400),
        ),
        case(
            "TE: Content-Length with chunked",
            "RFC 9112 §6.1, §6.3",
            te_and_cl(false),
            Rejected(400),
        ),
        case(
            "TE: in HTTP/1.0",
            "RFC 9112 §6.1",
            [&b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"[..], HELLO_CHUNKED].concat(),
            Rejected(400),
        ),
        case(
            "TE: chunked then identity lines",
            CODING,
            echo("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", HELLO_CHUNKED),
            Rejected(400),
        ),
        case(
            "TE: identity then chunked lines",
            CODING,
            echo("Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n", HELLO_CHUNKED),
            Rejected(501),
        ),
        case(
            "TE: two chunked lines",
            CODING,
            echo("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", HELLO_CHUNKED),
            Rejected(400),
        ),
        // Chunked framing.
        case("chunks: valid", CHUNKS, chunked(HELLO_CHUNKED), Echoes(b"hello".to_vec())),
        case(
            "chunks: upper-case hex",
            CHUNKS,
            chunked(b"A\r\n0123456789\r\n0\r\n\r\n"),
            Echoes(b"0123456789".to_vec()),
        ),
        case(
            "chunks: lower-case hex",
            CHUNKS,
            chunked(b"a\r\n0123456789\r\n0\r\n\r\n"),
            Echoes(b"0123456789".to_vec()),
        ),
        case(
            "chunks: several",
            CHUNKS,
            chunked(b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"),
            Echoes(b"hello".to_vec()),
        ),
        case("chunks: leading zeros", CHUNKS, chunked(b"0005\r\nhello\r\n0\r\n\r\n"), Echoes(b"hello".to_vec())),
        case(
            "chunks: extension with value",
            EXTENSIONS,
            chunked(b"5;ext=val\r\nhello\r\n0\r\n\r\n"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "chunks: extension without value",
            EXTENSIONS,
            chunked(b"5;ext\r\nhello\r\n0\r\n\r\n"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "chunks: BWS and a quoted extension",
            EXTENSIONS,
            chunked(b"5 ;ext=\"quoted\"\r\nhello\r\n0\r\n\r\n"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "chunks: several extensions, BWS around =",
            EXTENSIONS,
            chunked(b"5; a = 1 ;b=\"x;\\\"y\"\r\nhello\r\n0\r\n\r\n"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "chunks: a trailer",
            TRAILERS,
            chunked(b"5\r\nhello\r\n0\r\nX-T: v\r\n\r\n"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "chunks: empty size line",
            CHUNKS,
            chunked(b"\r\n5\r\nhello\r\n0\r\n\r\n"),
            Rejected(400),
        ),
        case("chunks: extension without a size", CHUNKS, chunked(b";ext\r\nhello\r\n0\r\n\r\n"), Rejected(400)),
        case("chunks: 0x prefix", CHUNKS, chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), Rejected(400)),
        case("chunks: negative size", CHUNKS, chunked(b"-5\r\nhello\r\n0\r\n\r\n"), Rejected(400)),
        case("chunks: space before the size", CHUNKS, chunked(b" 5\r\nhello\r\n0\r\n\r\n"), Rejected(400)),
        case("chunks: bare LF after the size", CHUNKS, chunked(b"5\nhello\r\n0\r\n\r\n"), Rejected(400)),
        case(
            "chunks: bare LF in an extension",
            EXTENSIONS,
            chunked(b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
            Rejected(400),
        ),
        case(
            "chunks: bare CR in an extension",
            EXTENSIONS,
            chunked(b"5;a\rb\r\nhello\r\n0\r\n\r\n"),
            Rejected(400),
        ),
        case(
            "chunks: extension name not a token",
            EXTENSIONS,
            chunked(b"5;=v\r\nhello\r\n0\r\n\r\n"),
            Rejected(400),
        ),
        case(
            "chunks: data not followed by CRLF",
            CHUNKS,
            chunked(b"5\r\nhelloXX\r\n0\r\n\r\n"),
            Rejected(400),
        ),
        case(
            "chunks: a request line as a trailer",
            TRAILERS,
            chunked(b"5\r\nhello\r\n0\r\nGET /smuggled HTTP/1.1\r\n\r\n"),
            Rejected(400),
        ),
        case(
            "chunks: bare LF in a trailer",
            TRAILERS,
            chunked(b"5\r\nhello\r\n0\r\nX-T: v\n\r\n"),
            Rejected(400),
        ),
        case(
            "chunks: size line over 4096 bytes",
            EXTENSIONS,
            chunked(format!("1;{}\r\na\r\n0\r\n\r\n", "a".repeat(5000)).as_bytes()),
            Rejected(400),
        ),
        case(
            "chunks: trailers over the head limit",
            TRAILERS,
            chunked(format!("5\r\nhello\r\n0\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_HEAD + 1000)).as_bytes()),
            Rejected(431),
        ),
        case(
            "chunks: size ffffffffffffffff",
            CHUNKS,
            chunked(b"ffffffffffffffff\r\n"),
            Rejected(413),
        ),
        case(
            "chunks: size of 17 hex digits",
            CHUNKS,
            chunked(b"10000000000000000\r\n"),
            Rejected(413),
        ),
        case(
            "chunks: second size ffffffffffffffff",
            CHUNKS,
            chunked(b"1\r\na\r\nffffffffffffffff\r\n"),
            Rejected(413),
        ),
        case(
            "chunks: the body limit in two chunks",
            CHUNKS,
            chunked(format!("200\r\n{0}\r\n200\r\n{0}\r\n0\r\n\r\n", "a".repeat(512)).as_bytes()),
            Echoes("a".repeat(MAX_BODY).into_bytes()),
        ),
        case(
            "chunks: over the body limit in two chunks",
            "RFC 9110 §15.5.14",
            chunked(format!("200\r\n{}\r\n201\r\n{}\r\n0\r\n\r\n", "a".repeat(512), "a".repeat(513)).as_bytes()),
            Rejected(413),
        ),
        // Connection.
        case(
            "Connection: keep-alive then close lines",
            CONNECTION,
            get("Host: x\r\nConnection: keep-alive\r\nConnection: close\r\n"),
            Closes(&[200]),
        ),
        case(
            "Connection: keep-alive, close",
            CONNECTION,
            get("Host: x\r\nConnection: keep-alive, close\r\n"),
            Closes(&[200]),
        ),
        case("Connection: Close", CONNECTION, get("Host: x\r\nConnection: Close\r\n"), Closes(&[200])),
        case(
            "Connection: keep-alive in HTTP/1.0",
            CONNECTION,
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            Accepted(&[200]),
        ),
        // Expect.
        case(
            "Expect: 100-continue",
            EXPECT,
            echo("Expect: 100-continue\r\nContent-Length: 5\r\n", b"hello"),
            Echoes(b"hello".to_vec()),
        ),
        case(
            "Expect: 100-Continue (case)",
            EXPECT,
            echo("Expect: 100-Continue\r\nContent-Length: 5\r\n", b"hello"),
            Echoes(b"hello".to_vec()),
        ),
        case("Expect: something else", EXPECT, get("Host: x\r\nExpect: something-else\r\n"), Rejected(417)),
        // Pipelining.
        case(
            "pipelining: a malformed request between two",
            "RFC 9112 §9.3.2",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost : x\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            Closes(&[200, 400]),
        ),
    ];
    for version in ["HTTP/2.0", "HTTP/3.0", "HTTP/0.9"] {
        c.push(case(
            format!("version: {version}"),
            "RFC 9112 §2.3, RFC 9110 §15.6.6",
            line(format!("GET / {version}").as_bytes()),
            Rejected(505),
        ));
    }
    for host in ["a b", "a/b", "a@b", "[::1", "x:port", "x:80:80"] {
        c.push(case(
            format!("Host: invalid {host:?}"),
            HOST,
            get(&format!("Host: {host}\r\n")),
            Rejected(400),
        ));
    }
    for host in ["x", "x:8080", "127.0.0.1:1", "[::1]:8080", ""] {
        c.push(case(
            format!("Host: valid {host:?}"),
            HOST,
            get(&format!("Host: {host}\r\n")),
            Accepted(&[200]),
        ));
    }
    for value in ["+5", "-5", " 5 5", "0x5", "5.0", "5a", ""] {
        c.push(case(
            format!("Content-Length: invalid {value:?}"),
            LENGTH,
            echo(&format!("Content-Length: {value}\r\n"), b"hello"),
            Rejected(400),
        ));
    }
    for value in [
        "Chunked",
        "CHUNKED",
        "  chunked  ",
        "\tchunked",
        "chunked,",
        ", chunked",
    ] {
        c.push(case(
            format!("TE: {value:?} accepted"),
            CODING,
            echo(&format!("Transfer-Encoding:{value}\r\n"), HELLO_CHUNKED),
            Echoes(b"hello".to_vec()),
        ));
    }
    let refused = [
        ("chunked, chunked", 400),
        ("chunked, identity", 400),
        ("chun ked", 400),
        ("\"chunked\"", 400),
        ("\x0bchunked", 400),
        ("gzip, chunked", 501),
        // RFC 9112 §6.3 item 4: chunked not final, so the length is unknown: 400.
        ("identity", 400),
        ("xchunked", 400),
        ("chunked-false", 400),
    ];
    for (value, status) in refused {
        c.push(case(
            format!("TE: {value:?} refused"),
            CODING,
            echo(&format!("Transfer-Encoding: {value}\r\n"), HELLO_CHUNKED),
            Rejected(status),
        ));
    }
    c
}

/// Host and `count` more field lines.
fn many_fields(count: usize) -> String {
    let mut fields = String::from("Host: x\r\n");
    for i in 0..count {
        fields.push_str(&format!("X-{i}: v\r\n"));
    }
    fields
}

/// Transfer-Encoding and Content-Length in one request (in that order if `te_first`),
/// framed so that either reading alone would answer something: by Content-Length an
/// echo, by chunked a 200 and then a smuggled request.
fn te_and_cl(te_first: bool) -> Vec<u8> {
    let body = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let te = "Transfer-Encoding: chunked\r\n";
    let cl = format!("Content-Length: {}\r\n", body.len());
    let headers = if te_first {
        format!("{te}{cl}")
    } else {
        format!("{cl}{te}")
    };
    echo(&headers, body)
}

/// Runs one case on a connection of its own: `Err` is the failure line.
fn run_case(addr: &str, case: &Case, verbose: bool) -> Result<(), String> {
    let mut conn = Conn::open(addr);
    // A write error is no failure by itself: the server may refuse and close early.
    conn.send(&[&case.input[..], FOLLOW_UP].concat());
    let stop = conn.read_to_close(CASE_LIMIT);
    case.expect.check(&conn, &stop).map_err(|why| {
        let mut line = format!(
            "FAIL {} ({}): expected {}, got {}: {why}",
            case.name,
            case.rfc,
            case.expect,
            conn.transcript(&stop)
        );
        if verbose {
            line.push_str(&format!("\n    raw: {}", snippet(&conn.raw, 4000)));
        }
        line
    })
}

#[test]
fn conformance_table() {
    let all = cases();
    let mut names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
        panic!("two cases are named {:?}", twice[0]);
    }
    let only = std::env::var("FORKLOOP_CONFORMANCE_CASE").ok();
    let selected: Vec<&Case> = all
        .iter()
        .filter(|c| only.as_ref().map_or(true, |o| c.name.contains(o.as_str())))
        .collect();
    assert!(!selected.is_empty(), "no case's name contains {only:?}");
    let mut server = start(&[
        "--workers",
        "1",
        "--max-body-size",
        &MAX_BODY.to_string(),
        "--header-timeout",
        "2",
        "--keepalive-timeout",
        "2",
    ]);
    // One case at a time: a case that crashes the worker must not fail its neighbours.
    let mut failures = Vec::new();
    for case in &selected {
        let seen = server.drain_log().len();
        if let Err(mut failure) = run_case(&server.addr, case, only.is_some()) {
            // What the server said meanwhile about a crash or an error, if anything.
            for line in &server.drain_log()[seen..] {
                if ["panicked", " WARN", " ERROR"]
                    .iter()
                    .any(|w| line.contains(w))
                {
                    failure.push_str(&format!("\n    server log: {line}"));
                }
            }
            failures.push(failure);
        }
    }
    println!(
        "conformance: {} of {} cases pass",
        selected.len() - failures.len(),
        selected.len()
    );
    for failure in &failures {
        println!("{failure}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} conformance cases fail (listed above)",
        failures.len(),
        selected.len()
    );
}

// ---------------------------------------------------------------------------------------
// Timing: each test has a server of its own.

/// `--header-timeout 2 --body-timeout 1`.
fn body_timeout_server() -> Server {
    start(&[
        "--workers",
        "1",
        "--header-timeout",
        "2",
        "--body-timeout",
        "1",
    ])
}

/// Asserts that `conn` got exactly one response, `status`, and then EOF.
fn assert_only(conn: &Conn, stop: &Stop, status: u16, close: bool) {
    let transcript = conn.transcript(stop);
    assert_eq!(conn.statuses(), [status], "got {transcript}");
    assert!(stop.closed(), "the server did not close; got {transcript}");
    if close {
        assert!(
            conn.finals()[0].closes(),
            "no Connection: close; got {transcript}"
        );
    }
}

/// Sends `input` (a request whose body stalls) and asserts a 408 with `Connection:
/// close` after about the body timeout.
fn assert_stalled_body_gets_408(input: &[u8]) {
    let server = body_timeout_server();
    let mut conn = Conn::open(&server.addr);
    assert!(conn.send(input));
    let sent = Instant::now();
    let stop = conn.read_answer(Duration::from_secs(6));
    let took = sent.elapsed();
    let stop = match stop {
        Stop::Done => conn.read_to_close(CASE_LIMIT),
        other => other,
    };
    assert_only(&conn, &stop, 408, true);
    assert!(
        (Duration::from_millis(800)..Duration::from_secs(4)).contains(&took),
        "the 408 came after {took:?}, not about --body-timeout 1 s"
    );
}

#[test]
fn body_timeout_a_body_trickled_past_the_header_timeout_is_served() {
    let server = body_timeout_server();
    let mut conn = Conn::open(&server.addr);
    assert!(conn.send(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
    ));
    // 10 bytes 300 ms apart: 3 s in all, over the header timeout, never 1 s without one.
    let all_sent = conn.trickle(b"0123456789", Duration::from_millis(300));
    let stop = conn.read_to_close(CASE_LIMIT);
    assert!(
        all_sent,
        "answered before the body was complete: {}",
        conn.transcript(&stop)
    );
    assert_only(&conn, &stop, 200, false);
    assert_eq!(conn.finals()[0].body, b"0123456789");
}

#[test]
fn body_timeout_a_stalled_body_gets_408() {
    assert_stalled_body_gets_408(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
    );
}

#[test]
fn body_timeout_a_chunked_body_stalled_mid_chunk_gets_408() {
    assert_stalled_body_gets_408(&chunked(b"5\r\nhel"));
}

#[test]
fn body_timeout_counts_body_bytes_not_a_trickled_chunk_line() {
    let server = body_timeout_server();
    let mut conn = Conn::open(&server.addr);
    let started = Instant::now();
    assert!(conn.send(&chunked(b"1;")));
    // A chunk extension a byte every 300 ms: input, but never a byte of body.
    let all_sent = conn.trickle(&[b'a'; 20], Duration::from_millis(300));
    let took = started.elapsed();
    let stop = conn.read_to_close(CASE_LIMIT);
    assert!(!all_sent, "6 s of chunk line kept the body alive");
    assert_only(&conn, &stop, 408, true);
    assert!(took < Duration::from_secs(4), "the 408 came after {took:?}");
}

#[test]
fn header_timeout_cuts_off_a_trickled_head() {
    let server = start(&["--workers", "1", "--header-timeout", "1"]);
    let mut conn = Conn::open(&server.addr);
    let started = Instant::now();
    assert!(conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: "));
    // A byte every 200 ms for 4 s: a timer reset by each byte would never fire.
    let all_sent = conn.trickle(&[b'a'; 20], Duration::from_millis(200));
    let took = started.elapsed();
    if all_sent {
        conn.send(b"\r\n\r\n");
    }
    let stop = conn.read_to_close(CASE_LIMIT);
    assert_only(&conn, &stop, 408, true);
    assert!(
        (Duration::from_millis(800)..Duration::from_secs(3)).contains(&took),
        "the 408 came after {took:?}, not about --header-timeout 1 s"
    );
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let server = start(&["--workers", "1"]);
    let mut conn = Conn::open(&server.addr);
    assert!(conn.send(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
    ));
    let stop = conn.read_until(CASE_LIMIT, |replies| !replies.is_empty());
    assert!(
        matches!(stop, Stop::Done) && conn.replies[0].status == 100,
        "no 100 before the body: {:?} then {stop}",
        conn.replies.first().map(|r| r.status)
    );
    assert!(conn.send(b"hello"));
    let stop = conn.read_to_close(CASE_LIMIT);
    assert_only(&conn, &stop, 200, false);
    assert_eq!(conn.finals()[0].body, b"hello");
}

// ---------------------------------------------------------------------------------------
// What a handler writes.

#[test]
fn hostile_responses_cannot_break_the_framing() {
    let server = start(&[
        "--workers",
        "1",
        "--app",
        "hostile-responses",
        "--keepalive-timeout",
        "2",
    ]);
    let addr = server.addr.as_str();
    let mut failures = Vec::new();
    // Asks on a new connection; `to_close` reads until EOF, else until the first answer.
    let ask = |request: &[u8], to_close: bool| {
        let mut conn = Conn::open(addr);
        conn.send(request);
        let sent = Instant::now();
        let stop = if to_close {
            conn.read_to_close(CASE_LIMIT)
        } else {
            conn.read_answer(CASE_LIMIT)
        };
        (conn, stop, sent.elapsed())
    };
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
    let mut check = |path: &str, conn: &Conn, stop: &Stop, problems: Vec<String>| {
        if !problems.is_empty() {
            failures.push(format!(
                "{path}: {}; got {}; raw {}",
                problems.join("; "),
                conn.transcript(stop),
                snippet(&conn.raw, 600)
            ));
        }
    };
    let status_is = |conn: &Conn, want: u16| {
        let got = conn.statuses();
        (got.first() != Some(&want)).then(|| format!("expected {want}, got {got:?}"))
    };

    // A header with CR, LF or NUL, a name with a space, a status below 100 or above
    // 999: the handler cannot build them (the http crate's types refuse them), and the
    // unit tests of src/server/h1/response.rs show it.
    for path in [
        "/status-101",
        "/status-600",
        "/cl-wrong",
        "/te",
        "/no-content-body",
    ] {
        let (conn, stop, _) = ask(&get(path), false);
        let problems: Vec<String> = status_is(&conn, 500).into_iter().collect();
        check(path, &conn, &stop, problems);
    }

    let (conn, stop, _) = ask(&get("/cl-right"), false);
    let mut problems: Vec<String> = status_is(&conn, 200).into_iter().collect();
    if let Some(reply) = conn.finals().first() {
        if reply.all("content-length").len() != 1 {
            problems.push("not exactly one Content-Length line".into());
        }
        if reply.body != b"hi" {
            problems.push("the body is not hi".into());
        }
    }
    check("/cl-right", &conn, &stop, problems);

    let second = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    for (path, request) in [
        (
            "/connection-close",
            [&get("/connection-close")[..], second].concat(),
        ),
        (
            "/connection-keep-alive",
            [
                &b"GET /connection-keep-alive HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"[..],
                second,
            ]
            .concat(),
        ),
    ] {
        let (conn, stop, _) = ask(&request, true);
        let mut problems = Vec::new();
        if conn.statuses() != [200] {
            problems.push("expected only [200] (the pipelined second request unanswered)".into());
        }
        if let Some(reply) = conn.finals().first() {
            let values = reply.all("connection");
            if values.len() != 1 || !values[0].eq_ignore_ascii_case("close") {
                problems.push(format!(
                    "Connection headers {values:?}, not one saying close"
                ));
            }
        }
        if !stop.closed() {
            problems.push("the server did not close".into());
        }
        check(path, &conn, &stop, problems);
    }

    let (conn, stop, took) = ask(&get("/drop"), false);
    let mut problems: Vec<String> = status_is(&conn, 500).into_iter().collect();
    if took > Duration::from_secs(1) {
        problems.push(format!("answered after {took:?}, not within 1 s"));
    }
    check("/drop", &conn, &stop, problems);

    let (conn, stop, _) = ask(&get("/no-content"), false);
    let mut problems: Vec<String> = status_is(&conn, 204).into_iter().collect();
    if conn
        .finals()
        .first()
        .is_some_and(|r| !r.all("content-length").is_empty())
    {
        problems.push("a 204 with Content-Length".into());
    }
    if !conn.unparsed.is_empty() {
        problems.push("bytes after the 204's head".into());
    }
    check("/no-content", &conn, &stop, problems);

    for failure in &failures {
        println!("{failure}");
    }
    assert!(
        failures.is_empty(),
        "{} hostile responses mishandled (listed above)",
        failures.len()
    );
}
