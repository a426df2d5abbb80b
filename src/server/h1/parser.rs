//! The incremental request parser of one connection: a head, then its body, read
//! whole (buffered) or handed on in pieces as it arrives (streamed), as the caller
//! chooses once it has seen the head.

use super::chunked::{Chunked, MAX_SIZE_LINE};
use super::head::{self, Framing};
use super::{refuse, Incoming, Limits, Refusal};

/// The most body input buffered at once, beyond what a chunk line or a trailer
/// section needs (see [`Parser::room`]).
const BODY_WINDOW: usize = 64 * 1024;
/// The largest piece of a streamed body handed on at once.
pub(crate) const MAX_PIECE: usize = 64 * 1024;

/// What the parser produced.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A request's head. Its body is read only once the caller says how
    /// ([`Parser::read_body`]).
    Head(Incoming),
    /// The next bytes of a streamed body (never empty, at most [`MAX_PIECE`]).
    Data(Vec<u8>),
    /// The request is complete: its body, if buffered (empty if streamed).
    End(Vec<u8>),
}

/// How a request's body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyRead {
    /// Whole, up to the limits' `max_body` (else 413).
    Buffered,
    /// In pieces as they arrive, of any length.
    Streamed,
}

#[derive(Debug)]
enum Framed {
    Length(u64),
    Chunked(Chunked),
}

/// A request whose head is parsed and whose body is being read.
#[derive(Debug)]
struct Pending {
    framed: Framed,
    /// `None` until the caller says how the body is read.
    read: Option<BodyRead>,
    /// The body so far, when buffered.
    body: Vec<u8>,
    /// Body bytes decoded so far.
    received: u64,
    /// The most body bytes it may have.
    limit: u64,
    /// The client may wait for `100 Continue` before it sends the body.
    wants_continue: bool,
    /// The body is complete; a streamed one's `End` is still to be given.
    complete: bool,
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

    /// Every byte this parser holds: unconsumed input and a buffered body so far.
    pub(crate) fn held(&self) -> usize {
        self.buf.len() + self.pending.as_ref().map_or(0, |p| p.body.len())
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

    /// How much of the body being read is still to come, if its length is known.
    pub(crate) fn body_left(&self) -> Option<u64> {
        match self.pending.as_ref()?.framed {
            Framed::Length(left) => Some(left),
            Framed::Chunked(_) => None,
        }
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

    /// Says how the body of the request whose head [`Parser::next`] just gave is read.
    /// A buffered body announced past `max_body` is refused (413) before any of it
    /// is read.
    pub(crate) fn read_body(&mut self, read: BodyRead) -> Result<(), Refusal> {
        let pending = self.pending.as_mut().expect("a head awaits its body");
        debug_assert!(pending.read.is_none(), "the body is already being read");
        pending.read = Some(read);
        pending.limit = match read {
            BodyRead::Buffered => self.limits.max_body,
            BodyRead::Streamed => u64::MAX,
        };
        if let Framed::Length(len) = pending.framed {
            if len > pending.limit {
                return Err(refuse(413, "body too large"));
            }
            if read == BodyRead::Buffered {
                // Not all of it on the client's word alone: the body may never come.
                let first = usize::try_from(len).map_or(BODY_WINDOW, |l| l.min(BODY_WINDOW));
                pending.body.reserve_exact(first);
            }
        }
        Ok(())
    }

    /// Once, after [`Parser::read_body`]: whether the client waits for `100 Continue`
    /// (an HTTP/1.1 head asked for it, a body is to come, and none of it has).
    pub(crate) fn take_continue(&mut self) -> bool {
        let Some(pending) = &mut self.pending else {
            return false;
        };
        let wants = std::mem::take(&mut pending.wants_continue);
        wants && self.buf.is_empty() && !matches!(pending.framed, Framed::Length(0))
    }

    /// The next head, body piece or end of a request; `Ok(None)` if more input is
    /// needed (or a head awaits [`Parser::read_body`]).
    pub(crate) fn next(&mut self) -> Result<Option<Parsed>, Refusal> {
        let Some(pending) = &mut self.pending else {
            return self.next_head();
        };
        let Some(read) = pending.read else {
            return Ok(None);
        };
        if pending.complete {
            let body = std::mem::take(&mut pending.body);
            self.pending = None;
            return Ok(Some(Parsed::End(body)));
        }
        let mut fresh = Vec::new();
        let (out, max_out) = match read {
            BodyRead::Buffered => (&mut pending.body, usize::MAX),
            BodyRead::Streamed => (&mut fresh, MAX_PIECE),
        };
        let before = out.len();
        let (used, done) = match &mut pending.framed {
            Framed::Length(left) => {
                let take = self
                    .buf
                    .len()
                    .min(max_out)
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                out.extend_from_slice(&self.buf[..take]);
                *left -= take as u64;
                (take, *left == 0)
            }
            Framed::Chunked(state) => {
                // The body taken so far is within the limit, so this cannot wrap.
                let room = pending.limit - pending.received;
                state.decode(&self.buf, out, room, max_out, self.limits.max_head)?
            }
        };
        let taken = out.len() - before;
        self.buf.drain(..used);
        if taken > 0 {
            self.progress += 1;
            pending.received += taken as u64;
        }
        pending.complete = done;
        if taken > 0 && read == BodyRead::Streamed {
            return Ok(Some(Parsed::Data(fresh)));
        }
        if done || taken > 0 {
            // Complete; or a refusal the decoder held back behind the bytes it took
            // comes now.
            return self.next();
        }
        Ok(None)
    }

    fn next_head(&mut self) -> Result<Option<Parsed>, Refusal> {
        // RFC 9112 §2.2: empty lines before a request line are ignored (dropped as
        // they come, so that they hold nothing and leave the connection idle).
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
        let framed = match head.framing {
            Framing::Length(len) => Framed::Length(len),
            Framing::Chunked => Framed::Chunked(Chunked::Size),
        };
        self.pending = Some(Pending {
            framed,
            read: None,
            body: Vec::new(),
            received: 0,
            limit: 0,
            // Interim responses are for HTTP/1.1 clients.
            wants_continue: head.expect_continue && head.request.minor_version == 1,
            complete: false,
        });
        Ok(Some(Parsed::Head(head.request)))
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

    /// A request and its body, as a connection reads them.
    type Read = (Incoming, Vec<u8>);

    /// Moves `p` on as far as its input goes: each head's body read the way `read`
    /// says, each request complete with its body (a streamed one's pieces joined) into
    /// `out`. Checks that a streamed body comes as non-empty pieces, then its end.
    fn pump(
        p: &mut Parser,
        read: BodyRead,
        head: &mut Option<Read>,
        out: &mut Vec<Read>,
    ) -> Result<(), Refusal> {
        while let Some(parsed) = p.next()? {
            match parsed {
                Parsed::Head(request) => {
                    assert!(head.is_none(), "a head before the last request's end");
                    p.read_body(read)?;
                    *head = Some((request, Vec::new()));
                }
                Parsed::Data(data) => {
                    assert_eq!(read, BodyRead::Streamed, "a buffered body came in pieces");
                    assert!(!data.is_empty(), "an empty piece");
                    head.as_mut().expect("a head").1.extend_from_slice(&data);
                }
                Parsed::End(body) => {
                    let (request, mut so_far) = head.take().expect("a head");
                    so_far.extend_from_slice(&body);
                    out.push((request, so_far));
                }
            }
        }
        Ok(())
    }

    fn parse_all(input: &[u8]) -> Result<Vec<Read>, Refusal> {
        let mut p = Parser::new(LIMITS);
        p.feed(input);
        let (mut head, mut out) = (None, Vec::new());
        pump(&mut p, BodyRead::Buffered, &mut head, &mut out)?;
        Ok(out)
    }

    #[test]
    fn pipelined_requests_come_out_in_order_with_bodies() {
        let input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.0\r\n\r\n";
        let reqs = parse_all(input).unwrap();
        let targets: Vec<_> = reqs.iter().map(|(r, _)| r.target.as_str()).collect();
        assert_eq!(targets, ["/a", "/b", "/c"]);
        assert_eq!(reqs[1].1, b"abc");
        assert!(reqs[0].0.keep_alive && !reqs[2].0.keep_alive);
    }

    #[test]
    fn input_split_at_every_byte_parses_the_same() {
        let input = b"POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n";
        for read in [BodyRead::Buffered, BodyRead::Streamed] {
            for split in 0..input.len() {
                let mut p = Parser::new(LIMITS);
                let (mut head, mut got) = (None, Vec::new());
                p.feed(&input[..split]);
                pump(&mut p, read, &mut head, &mut got).unwrap();
                p.feed(&input[split..]);
                pump(&mut p, read, &mut head, &mut got).unwrap();
                assert_eq!(got.len(), 1, "split at {split}");
                assert_eq!(got[0].1, b"abcde");
            }
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
        assert_eq!(reqs[0].0.target, "/x?q");
        let host = reqs[0]
            .0
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("host"));
        assert_eq!(host.map(|(_, v)| &v[..]), Some(&b"evil.example"[..]));
        assert_eq!(reqs[1].0.target, "*");
    }

    #[test]
    fn empty_lines_between_requests_are_dropped_as_they_come() {
        let mut p = Parser::new(LIMITS);
        p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi\r\n");
        assert!(matches!(p.next(), Ok(Some(Parsed::Head(_)))));
        p.read_body(BodyRead::Buffered).unwrap();
        assert_eq!(p.next(), Ok(Some(Parsed::End(b"hi".to_vec()))));
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
        assert!(matches!(p.next(), Ok(Some(Parsed::Head(_)))));
    }

    #[test]
    fn progress_moves_with_heads_and_body_bytes_only() {
        let mut p = Parser::new(LIMITS);
        p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(p.next(), Ok(Some(Parsed::Head(_)))));
        p.read_body(BodyRead::Buffered).unwrap();
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
    fn expect_continue_is_wanted_once_and_only_before_a_body() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n";
        let mut p = Parser::new(LIMITS);
        p.feed(&[&head[..], b"Content-Length: 2\r\n\r\n"].concat());
        assert!(matches!(p.next(), Ok(Some(Parsed::Head(_)))));
        p.read_body(BodyRead::Buffered).unwrap();
        assert!(p.take_continue());
        assert!(!p.take_continue(), "announced twice");
        assert_eq!(p.next(), Ok(None));
        p.feed(b"hi");
        assert_eq!(p.next(), Ok(Some(Parsed::End(b"hi".to_vec()))));
        // No body to wait for, or its first bytes already here: no interim response.
        for rest in [
            &b"Content-Length: 0\r\n\r\n"[..],
            b"Content-Length: 2\r\n\r\nh",
        ] {
            let mut p = Parser::new(LIMITS);
            p.feed(&[&head[..], rest].concat());
            assert!(matches!(p.next(), Ok(Some(Parsed::Head(_)))));
            p.read_body(BodyRead::Buffered).unwrap();
            assert!(!p.take_continue(), "{rest:?}");
        }
    }

    #[test]
    fn a_streamed_body_has_no_size_limit_and_a_buffered_one_is_refused_at_its_head() {
        let head =
            |len: u64| format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        let mut p = Parser::new(LIMITS);
        p.feed(head(LIMITS.max_body + 1).as_bytes());
        assert!(matches!(p.next(), Ok(Some(Parsed::Head(_)))));
        assert_eq!(
            p.read_body(BodyRead::Buffered).map_err(|r| r.status),
            Err(413)
        );

        let big = 200 * 1024;
        let mut p = Parser::new(LIMITS);
        p.feed(head(big).as_bytes());
        let (mut at, mut got) = (None, Vec::new());
        let body = vec![7u8; big as usize];
        for piece in body.chunks(10_000) {
            pump(&mut p, BodyRead::Streamed, &mut at, &mut got).unwrap();
            assert!(p.held() <= 64 * 1024, "a streamed body was held");
            p.feed(piece);
        }
        pump(&mut p, BodyRead::Streamed, &mut at, &mut got).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, body);
        // Chunked: past the buffered limit too.
        let mut p = Parser::new(LIMITS);
        p.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n");
        p.feed(format!("{:x}\r\n", 4096).as_bytes());
        p.feed(&[b'z'; 4096]);
        p.feed(b"\r\n0\r\n\r\n");
        let (mut at, mut got) = (None, Vec::new());
        pump(&mut p, BodyRead::Streamed, &mut at, &mut got).unwrap();
        assert_eq!(got[0].1.len(), 4096);
    }

    /// Everything a parser makes of `input` fed in pieces ending at `cuts`, feeding no
    /// more than `room()` at a time as a connection does; checks the buffer bound.
    fn outcomes(input: &[u8], cuts: &[usize], read: BodyRead) -> (Vec<Read>, Option<u16>) {
        let limits = Limits {
            max_head: 256,
            max_body: 512,
        };
        let mut p = Parser::new(limits);
        let (mut head, mut requests, mut pos) = (None, Vec::new(), 0);
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
                if let Err(refusal) = pump(&mut p, read, &mut head, &mut requests) {
                    return (requests, Some(refusal.status));
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
            for read in [BodyRead::Buffered, BodyRead::Streamed] {
                let whole = outcomes(&input, &[], read);
                let split = outcomes(&input, &cuts, read);
                proptest::prop_assert_eq!(whole, split);
            }
            // Streamed, a body is the same bytes, with no limit on its size.
            let buffered = outcomes(&input, &cuts, BodyRead::Buffered);
            if buffered.1 != Some(413) {
                proptest::prop_assert_eq!(buffered, outcomes(&input, &cuts, BodyRead::Streamed));
            }
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
            for read in [BodyRead::Buffered, BodyRead::Streamed] {
                let (requests, refused) = outcomes(&input, &cuts, read);
                proptest::prop_assert_eq!(refused, None);
                proptest::prop_assert_eq!(requests.len(), 1);
                proptest::prop_assert_eq!(&requests[0].1, &body);
            }
        }
    }
}
