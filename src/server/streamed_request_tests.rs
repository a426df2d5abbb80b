//! Streamed request bodies on one connection: what a `call_streamed` handler reads,
//! the backpressure it puts on the client, and every way a body can stop short.

use super::tests::{read_now, reply, GET};
use super::*;
use crate::server::request_body::RECEIVE_WINDOW;
use crate::server::{text, BodyReceiver, Received};
use std::cell::RefCell;
use std::io::Read;
use std::time::Instant;

/// Buffers `/` (answering `buffered <n>`), and streams every path under `/stream` to
/// the test's function.
struct Streams(fn(&mut Loop<Worker>, StreamedRequest, Responder));

impl Handler for Streams {
    fn call(&self, lp: &mut Loop<Worker>, request: Request, responder: Responder) {
        let body = format!("buffered {}\n", request.body().len());
        responder.send(lp, text(StatusCode::OK, body));
    }

    fn body_mode(&self, head: &::http::request::Parts) -> BodyMode {
        match head.uri.path().starts_with("/stream") {
            true => BodyMode::Streamed,
            false => BodyMode::Buffered,
        }
    }

    fn call_streamed(&self, lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        (self.0)(lp, request, responder)
    }
}

thread_local! {
    /// How the test handlers' bodies ended.
    static ENDED: RefCell<Vec<Result<u64, BodyError>>> = const { RefCell::new(Vec::new()) };
    /// A receiver (and a responder) a test handler keeps unread.
    static KEPT: RefCell<Vec<(BodyReceiver, Responder)>> = const { RefCell::new(Vec::new()) };
    /// A receiver a test handler keeps unread after answering.
    static HELD: RefCell<Vec<BodyReceiver>> = const { RefCell::new(Vec::new()) };
}

fn ended() -> Vec<Result<u64, BodyError>> {
    ENDED.with(|e| e.take())
}

/// Reads the whole body as it comes, then answers with its length (or the error).
fn count(lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
    read_on(lp, request.into_body(), responder, 0);
}

fn read_on(lp: &mut Loop<Worker>, body: BodyReceiver, responder: Responder, mut total: u64) {
    loop {
        match body.read(lp) {
            Ok(Received::Data(data)) => {
                assert!(!data.is_empty());
                total += data.len() as u64;
                assert_eq!(total, body.received().min(total), "received() lags");
            }
            Ok(Received::Wait) => {
                return body.when_readable(lp, move |lp, _, body| {
                    read_on(lp, body, responder, total);
                });
            }
            Ok(Received::End) => {
                ENDED.with(|e| e.borrow_mut().push(Ok(total)));
                return responder.send(lp, text(StatusCode::OK, format!("streamed {total}\n")));
            }
            Err(why) => {
                ENDED.with(|e| e.borrow_mut().push(Err(why)));
                let answer = text(StatusCode::BAD_REQUEST, format!("handler: {why}\n"));
                return responder.send(lp, answer);
            }
        }
    }
}

fn keep(_: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
    KEPT.with(|k| k.borrow_mut().push((request.into_body(), responder)));
}

fn kept() -> (BodyReceiver, Responder) {
    KEPT.with(|k| k.borrow_mut().pop())
        .expect("the handler ran")
}

fn serve(
    config: &Config,
    handler: fn(&mut Loop<Worker>, StreamedRequest, Responder),
) -> (Loop<Worker>, Worker, UnixStream) {
    one_connection(config, Rc::new(Streams(handler))).unwrap()
}

/// Writes `input` as the socket takes it while the worker runs, and reads what it
/// answers until the output holds `until` and all of `input` went in (bounded: 2,000
/// iterations).
fn exchange(
    lp: &mut Loop<Worker>,
    worker: &mut Worker,
    client: &mut UnixStream,
    input: &[u8],
    until: &str,
) -> String {
    let (sent, reply) = exchange_partly(lp, worker, client, input, until, true);
    assert_eq!(sent, input.len());
    reply
}

/// As `exchange`, but when not `whole`, it stops at `until` whether or not all of
/// `input` went in (the server may stop taking it); what was sent, and the output.
fn exchange_partly(
    lp: &mut Loop<Worker>,
    worker: &mut Worker,
    client: &mut UnixStream,
    input: &[u8],
    until: &str,
    whole: bool,
) -> (usize, String) {
    let (mut sent, mut got) = (0, Vec::new());
    for _ in 0..2000 {
        if sent < input.len() {
            match client.write(&input[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("writing: {e}"),
            }
        }
        lp.loop_once(Some(Duration::from_millis(1)), worker)
            .unwrap();
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n @ 1..) = client.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        if (sent == input.len() || !whole) && text.contains(until) {
            return (sent, text.into_owned());
        }
    }
    panic!(
        "no {until:?} after 2000 iterations ({sent} of {} bytes sent): {:?}",
        input.len(),
        String::from_utf8_lossy(&got)
    );
}

fn put(path: &str, length: usize) -> Vec<u8> {
    format!("PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n").into_bytes()
}

fn small_bodies() -> Config {
    Config {
        max_body_size: 1024,
        ..Config::default()
    }
}

#[test]
fn a_streamed_body_of_any_length_arrives_whole_and_keeps_the_connection() {
    let (mut lp, mut worker, mut client) = serve(&small_bodies(), count);
    let big = 300_000;
    let body: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
    let input = [&put("/stream", big)[..], &body, GET].concat();
    let reply = exchange(&mut lp, &mut worker, &mut client, &input, "buffered 0\n");
    assert!(reply.contains(&format!("streamed {big}\n")), "{reply:?}");
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply:?}");
    assert_eq!(ended(), [Ok(big as u64)]);
    // The same length buffered is refused before any of it is read.
    let reply = exchange(
        &mut lp,
        &mut worker,
        &mut client,
        &put("/", big),
        "\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply:?}");
}

#[test]
fn chunked_bodies_stream_too_and_a_bodiless_request_is_streamed_empty() {
    let (mut lp, mut worker, mut client) = serve(&small_bodies(), count);
    let chunked = b"POST /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: t\r\n\r\n";
    let get = b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n";
    let reply = exchange(
        &mut lp,
        &mut worker,
        &mut client,
        &[&chunked[..], get].concat(),
        "streamed 0\n",
    );
    assert!(reply.contains("streamed 12\n"), "{reply:?}");
    assert_eq!(ended(), [Ok(12), Ok(0)]);
}

#[test]
fn a_handler_that_does_not_read_stops_the_client_and_reads_on_when_it_does() {
    let (mut lp, mut worker, mut client) = serve(&Config::default(), keep);
    let total = 4 << 20;
    client.write_all(&put("/stream", total)).unwrap();
    let body = vec![b'x'; total];
    let mut sent = 0;
    let mut blocked = 0;
    // Writes until the socket has taken what the worker and the kernel will hold.
    while blocked < 50 {
        match client.write(&body[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocked += 1,
            Err(e) => panic!("{e}"),
        }
        lp.loop_once(Some(Duration::from_millis(1)), &mut worker)
            .unwrap();
    }
    let conn = worker.conns.values().next().unwrap();
    let held = conn.parser.held() + conn.inbound().map_or(0, |i| i.held());
    // The receiver's window, a push past it, and the parser's window.
    assert!(held <= 3 * RECEIVE_WINDOW, "the worker holds {held} bytes");
    assert!(
        sent < total,
        "the whole body went in ({sent} bytes): no backpressure"
    );
    // No body timeout while the handler is the one waiting.
    assert!(conn.timer_kind != Some(TimerKind::Body));
    let (receiver, responder) = kept();
    read_on(&mut lp, receiver, responder, 0);
    let reply = exchange(&mut lp, &mut worker, &mut client, &body[sent..], "streamed");
    assert!(reply.contains(&format!("streamed {total}\n")), "{reply:?}");
}

#[test]
fn continue_is_sent_when_the_handler_first_reads() {
    let expect =
        b"PUT /stream HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
    let (mut lp, mut worker, mut client) = serve(&Config::default(), keep);
    client.write_all(expect).unwrap();
    for _ in 0..5 {
        lp.loop_once(Some(Duration::from_millis(5)), &mut worker)
            .unwrap();
    }
    assert_eq!(
        read_now(&mut client),
        "",
        "100 Continue before the handler read"
    );
    let (receiver, responder) = kept();
    read_on(&mut lp, receiver, responder, 0);
    let reply = reply(&mut lp, &mut worker, &mut client, "\r\n\r\n");
    assert_eq!(reply, "HTTP/1.1 100 Continue\r\n\r\n");
    let reply = exchange(&mut lp, &mut worker, &mut client, b"hello", "streamed 5\n");
    assert!(reply.starts_with("HTTP/1.1 200 "), "{reply:?}");
}

#[test]
fn a_malformed_chunk_stops_the_body_and_the_server_answers_400_for_the_handler() {
    let (mut lp, mut worker, mut client) = serve(&Config::default(), keep);
    let input = b"PUT /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\nZZ\r\n";
    client.write_all(input).unwrap();
    let reply = reply(&mut lp, &mut worker, &mut client, "\n");
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply:?}");
    assert!(reply.contains("Connection: close\r\n"), "{reply:?}");
    // The handler learns why; its own answer comes too late, and is dropped.
    let (receiver, responder) = kept();
    assert_eq!(
        receiver.read(&mut lp),
        Ok(Received::Data(b"hello".to_vec()))
    );
    assert_eq!(receiver.read(&mut lp), Err(BodyError::Invalid));
    read_on(&mut lp, receiver, responder, 0);
    for _ in 0..10 {
        lp.loop_once(Some(Duration::from_millis(5)), &mut worker)
            .unwrap();
    }
    assert_eq!(read_now(&mut client), "");
}

#[test]
fn a_receiver_dropped_early_discards_the_rest_and_the_connection_goes_on() {
    fn ignore(lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        drop(request);
        responder.send(lp, text(StatusCode::OK, "ignored\n"));
    }
    let (mut lp, mut worker, mut client) = serve(&Config::default(), ignore);
    let body = vec![b'y'; 500_000];
    let input = [&put("/stream", body.len())[..], &body, GET].concat();
    let reply = exchange(&mut lp, &mut worker, &mut client, &input, "buffered 0\n");
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply:?}");
    assert!(reply.contains("ignored\n"), "{reply:?}");
}

#[test]
fn a_stalled_body_times_out_with_408_and_the_handler_learns_it() {
    let config = Config {
        body_timeout: Duration::from_millis(50),
        ..Config::default()
    };
    let (mut lp, mut worker, mut client) = serve(&config, count);
    client.write_all(&put("/stream", 10)).unwrap();
    client.write_all(b"part").unwrap();
    let reply = reply(&mut lp, &mut worker, &mut client, "timed out\n");
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply:?}");
    for _ in 0..3 {
        lp.loop_once(Some(Duration::ZERO), &mut worker).unwrap();
    }
    assert_eq!(ended(), [Err(BodyError::TimedOut)]);
}

#[test]
fn a_client_that_closes_mid_body_stops_it_and_still_gets_the_answer() {
    let (mut lp, mut worker, mut client) = serve(&Config::default(), count);
    client.write_all(&put("/stream", 10)).unwrap();
    client.write_all(b"part").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let reply = reply(&mut lp, &mut worker, &mut client, "\n");
    assert!(
        reply.contains("handler: the connection closed"),
        "{reply:?}"
    );
    assert_eq!(ended(), [Err(BodyError::Closed)]);
}

#[test]
fn collect_buffers_up_to_its_limit() {
    fn collect(lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        let limit = if request.uri().path() == "/stream/small" {
            10
        } else {
            1 << 20
        };
        request.into_body().collect(lp, limit, move |lp, _, body| {
            let answer = match body {
                Ok(body) => text(StatusCode::OK, format!("collected {}\n", body.len())),
                Err(e) => text(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n")),
            };
            responder.send(lp, answer);
        });
    }
    let (mut lp, mut worker, mut client) = serve(&small_bodies(), collect);
    let body = vec![b'z'; 100_000];
    let input = [&put("/stream", body.len())[..], &body].concat();
    let reply = exchange(&mut lp, &mut worker, &mut client, &input, "collected");
    assert!(reply.contains("collected 100000\n"), "{reply:?}");
    let input = [&put("/stream/small", 100)[..], &body[..100], GET].concat();
    let reply = exchange(&mut lp, &mut worker, &mut client, &input, "buffered 0\n");
    assert!(reply.contains("HTTP/1.1 413 "), "{reply:?}");
}

#[test]
fn a_handler_without_call_streamed_answers_500() {
    struct Forgot;
    impl Handler for Forgot {
        fn call(&self, _: &mut Loop<Worker>, _: Request, _: Responder) {}
        fn body_mode(&self, _: &::http::request::Parts) -> BodyMode {
            BodyMode::Streamed
        }
    }
    let (mut lp, mut worker, mut client) =
        one_connection(&Config::default(), Rc::new(Forgot)).unwrap();
    let reply = exchange(&mut lp, &mut worker, &mut client, GET, "\n");
    assert!(reply.starts_with("HTTP/1.1 500 "), "{reply:?}");
}

/// Runs the worker for `ms` milliseconds (for what must not happen within it), writing
/// `input` as the socket takes it; what was sent, and what came back.
fn pump_for(
    lp: &mut Loop<Worker>,
    worker: &mut Worker,
    client: &mut UnixStream,
    input: &[u8],
    ms: u64,
) -> (usize, String) {
    let (mut sent, mut got) = (0, Vec::new());
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        if sent < input.len() {
            match client.write(&input[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
        lp.loop_once(Some(Duration::from_millis(1)), worker)
            .unwrap();
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n @ 1..) = client.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    (sent, String::from_utf8_lossy(&got).into_owned())
}

/// Reads the body to its end without answering (the answer went first).
fn read_only(lp: &mut Loop<Worker>, body: BodyReceiver, mut total: u64) {
    loop {
        match body.read(lp) {
            Ok(Received::Data(data)) => total += data.len() as u64,
            Ok(Received::Wait) => {
                return body.when_readable(lp, move |lp, _, body| read_only(lp, body, total));
            }
            Ok(Received::End) => return ENDED.with(|e| e.borrow_mut().push(Ok(total))),
            Err(why) => return ENDED.with(|e| e.borrow_mut().push(Err(why))),
        }
    }
}

#[test]
fn a_handler_that_answers_first_still_reads_the_body_when_the_answer_closes() {
    fn early(lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        responder.send(lp, text(StatusCode::ACCEPTED, "accepted\n"));
        read_only(lp, request.into_body(), 0);
    }
    let (mut lp, mut worker, mut client) = serve(&Config::default(), early);
    let body = vec![b'q'; 200_000];
    let head = format!(
        "PUT /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let input = [head.as_bytes(), &body].concat();
    let reply = exchange(&mut lp, &mut worker, &mut client, &input, "accepted\n");
    assert!(reply.contains("Connection: close\r\n"), "{reply:?}");
    for _ in 0..100 {
        if worker.conns.is_empty() {
            break;
        }
        lp.loop_once(Some(Duration::from_millis(5)), &mut worker)
            .unwrap();
    }
    assert_eq!(ended(), [Ok(200_000)]);
}

#[test]
fn a_client_waiting_for_continue_is_not_timed_out_before_the_handler_asks() {
    let config = Config {
        body_timeout: Duration::from_millis(50),
        ..Config::default()
    };
    let (mut lp, mut worker, mut client) = serve(&config, keep);
    let expect =
        b"PUT /stream HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
    let (_, early) = pump_for(&mut lp, &mut worker, &mut client, expect, 200);
    assert_eq!(early, "", "the client waited for a 100 never sent");
    // Asked now: the timeout counts from the 100.
    let (receiver, responder) = kept();
    read_on(&mut lp, receiver, responder, 0);
    let reply = reply(&mut lp, &mut worker, &mut client, "timed out\n");
    assert!(
        reply.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 408 "),
        "{reply:?}"
    );
}

#[test]
fn an_answered_request_whose_handler_reads_slowly_is_not_timed_out() {
    fn answer_keep(lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        responder.send(lp, text(StatusCode::OK, "early\n"));
        HELD.with(|h| h.borrow_mut().push(request.into_body()));
    }
    let config = Config {
        body_timeout: Duration::from_millis(50),
        ..Config::default()
    };
    let (mut lp, mut worker, mut client) = serve(&config, answer_keep);
    let body = vec![b'x'; 1 << 20];
    let input = [&put("/stream", body.len())[..], &body].concat();
    let (sent, reply) = pump_for(&mut lp, &mut worker, &mut client, &input, 300);
    assert!(reply.contains("early\n"), "{reply:?}");
    let receiver = HELD
        .with(|h| h.borrow_mut().pop())
        .expect("the handler ran");
    // Six body timeouts later, the body is still there for the handler, unfailed.
    assert!(sent < input.len(), "no backpressure");
    assert!(matches!(receiver.read(&mut lp), Ok(Received::Data(_))));
    assert_eq!(worker.conns.len(), 1, "the connection was closed");
}

#[test]
fn a_streamed_body_stays_in_its_window_whatever_the_head_limit() {
    let config = Config {
        max_header_size: 1 << 20,
        ..Config::default()
    };
    let (mut lp, mut worker, mut client) = serve(&config, keep);
    let total = 8 << 20;
    let input = [&put("/stream", total)[..], &vec![b'x'; total]].concat();
    pump_for(&mut lp, &mut worker, &mut client, &input, 200);
    let conn = worker.conns.values().next().unwrap();
    let held = conn.inbound().unwrap().held();
    assert!(held < 2 * RECEIVE_WINDOW, "the receiver holds {held} bytes");
}

#[test]
fn an_answer_before_an_unasked_continue_closes_the_connection() {
    fn refuse_unread(lp: &mut Loop<Worker>, _: StreamedRequest, responder: Responder) {
        responder.send(lp, text(StatusCode::UNAUTHORIZED, "no\n"));
    }
    let (mut lp, mut worker, mut client) = serve(&Config::default(), refuse_unread);
    let expect =
        b"PUT /stream HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
    let reply = exchange(&mut lp, &mut worker, &mut client, expect, "no\n");
    assert!(reply.contains("Connection: close\r\n"), "{reply:?}");
    // The client reuses the connection anyway: nothing of it is taken as a request.
    let (_, reply) = pump_for(&mut lp, &mut worker, &mut client, GET, 100);
    assert_eq!(reply, "");
}

/// Collects up to 10 bytes: `c` with 200, or 413 past that.
fn collect_ten(lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
    request.into_body().collect(lp, 10, move |lp, _, body| {
        let code = match body {
            Ok(_) => StatusCode::OK,
            Err(_) => StatusCode::PAYLOAD_TOO_LARGE,
        };
        responder.send(lp, text(code, "c\n"));
    });
}

#[test]
fn a_body_refused_by_collect_is_discarded_only_up_to_max_body_size() {
    let (mut lp, mut worker, mut client) = serve(&small_bodies(), collect_ten);
    let total = 64 << 20;
    let input = [&put("/stream", total)[..], &vec![b'x'; total]].concat();
    let (_, reply) = exchange_partly(&mut lp, &mut worker, &mut client, &input, "c\n", false);
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply:?}");
    // Past max_body_size (1 KiB here) of discarding, the connection winds down: it
    // lingers (2 s at most, as nginx's lingering close), and parses nothing more.
    for _ in 0..100 {
        if worker.conns.values().all(|c| c.lingering) {
            break;
        }
        lp.loop_once(Some(Duration::from_millis(5)), &mut worker)
            .unwrap();
    }
    let conn = worker.conns.values().next().expect("lingering");
    assert!(conn.lingering && conn.reading.is_none() && conn.no_more_requests);
}

#[test]
fn a_panic_in_a_body_callback_answers_500_and_the_worker_goes_on() {
    fn boom(lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        request.into_body().collect(lp, 1 << 20, move |_, _, _| {
            let _held = responder;
            panic!("a bug in collect's callback");
        });
    }
    let (mut lp, mut worker, mut client) = serve(&Config::default(), boom);
    let input = [&put("/stream", 3)[..], b"abc", GET].concat();
    let reply = exchange(&mut lp, &mut worker, &mut client, &input, "buffered 0\n");
    assert!(reply.starts_with("HTTP/1.1 500 "), "{reply:?}");
}

#[test]
fn an_answer_with_more_unwanted_body_than_is_discarded_says_it_closes() {
    let (mut lp, mut worker, mut client) = serve(&small_bodies(), collect_ten);
    let input = [&put("/stream", 3 << 20)[..], &[b'x'; 4096]].concat();
    let reply = exchange(&mut lp, &mut worker, &mut client, &input, "c\n");
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply:?}");
    assert!(reply.contains("Connection: close\r\n"), "{reply:?}");
}
