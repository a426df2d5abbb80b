//! The incremental request parser of one connection: a head, then its body.

use super::chunked::{Chunked, MAX_SIZE_LINE};
use super::head::{self, Framing};
use super::{Incoming, Limits, Refusal};

/// The most body input buffered at once, beyond what a chunk line or a trailer
/// section needs (see [`Parser::room`]).
const BODY_WINDOW: usize = 64 * 1024;

/// What the parser produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A complete request.
    Request(Incoming),
    /// The head asked for `100 Continue` and its body has not arrived yet.
    Continue,
}

#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(Chunked),
}

/// A request whose head is parsed and whose body is being read.
#[derive(Debug)]
struct Pending {
    request: Incoming,
    body: Body,
    /// The client waits for `100 Continue` before it sends the body.
    wants_continue: bool,
}

/// Incremental request parser for one connection.
#[derive(Debug)]
pub(crate) struct Parser {
    limits: Limits,
    buf: Vec<u8>,
    pending: Option<Pending>,
    /// Moves whenever a head is parsed or body bytes are taken (see [`Parser::progress`]).
    progress: u64,
}

impl Parser {
    pub(crate) fn new(limits: Limits) -> Parser {
        Parser {
            limits,
            buf: Vec::new(),
            pending: None,
            progress: 0,
        }
    }

    /// Bytes received and not yet consumed.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Every byte this parser holds: unconsumed input and the body read so far.
    pub(crate) fn held(&self) -> usize {
        self.buf.len() + self.pending.as_ref().map_or(0, |p| p.request.body.len())
    }

    /// Whether a request has begun (bytes buffered or a head parsed) but is not complete.
    pub(crate) fn mid_request(&self) -> bool {
        self.pending.is_some() || !self.buf.is_empty()
    }

    /// A counter that moves whenever a head is parsed or body bytes are decoded: a body
    /// timeout counts from its last move, so bytes that are not body (a chunk line
    /// trickled a byte at a time) do not keep a stalled body alive.
    pub(crate) fn progress(&self) -> u64 {
        self.progress
    }

    /// Whether a head is parsed and its body is being read.
    pub(crate) fn reading_body(&self) -> bool {
        self.pending.is_some()
    }

    /// How many more bytes this parser will accept now (the connection reads no more).
    /// Zero only when [`Parser::next`] will take some of what is buffered or refuse it:
    /// a head's worth, or a body window that is larger than any chunk line or trailer
    /// section it accepts.
    pub(crate) fn room(&self) -> usize {
        let limit = match &self.pending {
            None => self.limits.max_head,
            Some(_) => BODY_WINDOW
                .max(self.limits.max_head.saturating_add(1))
                .max(MAX_SIZE_LINE + 1),
        };
        limit.saturating_sub(self.buf.len())
    }

    pub(crate) fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete request, `Ok(None)` if more input is needed.
    pub(crate) fn next(&mut self) -> Result<Option<Parsed>, Refusal> {
        let pending = match &mut self.pending {
            Some(pending) => pending,
            None => {
                // RFC 9112 §2.2: empty lines before a request line are ignored (dropped
                // as they come, so that they hold nothing and leave the connection idle).
                let empty = self
                    .buf
                    .chunks_exact(2)
                    .take_while(|l| l == b"\r\n")
                    .count();
                self.buf.drain(..2 * empty);
                if self.buf == b"\r" {
                    return Ok(None);
                }
                let Some(head) = head::parse(&self.buf, &self.limits)? else {
                    return Ok(None);
                };
                self.buf.drain(..head.len);
                self.progress += 1;
                let mut request = head.request;
                let body = match head.framing {
                    Framing::Length(len) => {
                        // Not all of it on the client's word alone: the body may never come.
                        let first =
                            usize::try_from(len).map_or(BODY_WINDOW, |l| l.min(BODY_WINDOW));
                        request.body.reserve_exact(first);
                        Body::Length(len)
                    }
                    Framing::Chunked => Body::Chunked(Chunked::Size),
                };
                self.pending.insert(Pending {
                    request,
                    body,
                    wants_continue: head.expect_continue,
                })
            }
        };
        let body = &mut pending.request.body;
        let before = body.len();
        let (used, done) = match &mut pending.body {
            Body::Length(left) => {
                let take = self
                    .buf
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                body.extend_from_slice(&self.buf[..take]);
                *left -= take as u64;
                (take, *left == 0)
            }
            Body::Chunked(state) => {
                state.decode(&self.buf, body, self.limits.max_body, self.limits.max_head)?
            }
        };
        self.buf.drain(..used);
        if body.len() != before {
            self.progress += 1;
        }
        if done {
            let pending = self.pending.take().expect("pending");
            return Ok(Some(Parsed::Request(pending.request)));
        }
        // Once: interim responses are for a client that has not started its body.
        if std::mem::take(&mut pending.wants_continue) && pending.request.minor_version == 1 {
            return Ok(Some(Parsed::Continue));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::MAX_HEADERS;
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 8192,
        max_body: 1024,
    };

    fn parse_all(input: &[u8]) -> Result<Vec<Incoming>, Refusal> {
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
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.0\r\n\r\n";
        let reqs = parse_all(input).unwrap();
        let targets: Vec<_> = reqs.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, ["/a", "/b", "/c"]);
        assert_eq!(reqs[1].body, b"abc");
        assert!(reqs[0].keep_alive && !reqs[2].keep_alive);
    }

    #[test]
    fn input_split_at_every_byte_parses_the_same() {
        let input = b"POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n";
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
        let status = |input: &[u8]| match parse_all(input) {
            Err(refusal) => refusal.status,
            Ok(got) => panic!("{:?} parsed as {got:?}", String::from_utf8_lossy(input)),
        };
        assert_eq!(status(b"\x01\x02 / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n"),
            413
        );
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
            "a".repeat(9000)
        );
        assert_eq!(status(big.as_bytes()), 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("H{i}: v\r\n")).collect();
        assert_eq!(
            status(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()),
            431
        );
    }

    #[test]
    fn an_absolute_target_s_authority_replaces_host() {
        let reqs = parse_all(
            b"GET http://evil.example/x?q HTTP/1.1\r\nHost: good.example\r\n\r\n\
              OPTIONS http://a:8001 HTTP/1.1\r\nHost: a:8001\r\n\r\n",
        )
        .unwrap();
        assert_eq!(reqs[0].target, "/x?q");
        let host = reqs[0]
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("host"));
        assert_eq!(host.map(|(_, v)| &v[..]), Some(&b"evil.example"[..]));
        assert_eq!(reqs[1].target, "*");
    }

    #[test]
    fn empty_lines_between_requests_are_dropped_as_they_come() {
        let mut p = Parser::new(LIMITS);
        p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\r\n");
        assert!(matches!(p.next(), Ok(Some(Parsed::Request(_)))));
        assert_eq!(p.next(), Ok(None));
        assert!(
            !p.mid_request(),
            "a stray CRLF left the connection mid-request"
        );
        for _ in 0..10_000 {
            p.feed(b"\r\n");
            assert_eq!(p.next(), Ok(None));
        }
        p.feed(b"\r");
        assert_eq!(p.next(), Ok(None));
        assert_eq!(p.buffered(), 1);
        p.feed(b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(matches!(p.next(), Ok(Some(Parsed::Request(_)))));
    }

    #[test]
    fn progress_moves_with_heads_and_body_bytes_only() {
        let mut p = Parser::new(LIMITS);
        p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(p.next(), Ok(None));
        let after_head = p.progress();
        assert!(after_head > 0);
        p.feed(b"1;aaaa");
        assert_eq!(p.next(), Ok(None));
        assert_eq!(
            p.progress(),
            after_head,
            "chunk-line bytes are not body progress"
        );
        p.feed(b"\r\nx");
        assert_eq!(p.next(), Ok(None));
        assert!(p.progress() > after_head);
    }

    #[test]
    fn expect_continue_is_announced_once_before_the_body() {
        let mut p = Parser::new(LIMITS);
        p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(p.next().unwrap(), Some(Parsed::Continue));
        assert_eq!(p.next().unwrap(), None);
        p.feed(b"hi");
        assert!(matches!(p.next().unwrap(), Some(Parsed::Request(r)) if r.body == b"hi"));
    }

    /// Everything a parser makes of `input` fed in pieces ending at `cuts`, feeding no
    /// more than `room()` at a time as a connection does; checks the buffer bound.
    fn outcomes(input: &[u8], cuts: &[usize]) -> (Vec<Incoming>, Option<u16>) {
        let limits = Limits {
            max_head: 256,
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
