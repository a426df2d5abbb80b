//! examples/sse.rs: server-sent events on a streamed, chunked response, held open
//! across 1,000 events, and ended cleanly by a drain.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use common::*;

/// Reads one chunk of a chunked body: its data, empty for the last chunk.
fn chunk(reader: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut size = String::new();
    reader.read_line(&mut size).expect("a chunk's size line");
    let size = usize::from_str_radix(size.trim_end(), 16)
        .unwrap_or_else(|_| panic!("not a chunk size: {size:?}"));
    let mut data = vec![0; size + 2];
    reader.read_exact(&mut data).expect("a chunk's data");
    assert!(data.ends_with(b"\r\n"), "a chunk not ended by CRLF");
    data.truncate(size);
    data
}

/// Adds a chunk's data to `events`, and checks the whole events in it: in order, none
/// missing, `next` the number of the next one.
fn take(data: Vec<u8>, events: &mut String, next: &mut u64) {
    events.push_str(std::str::from_utf8(&data).unwrap());
    while let Some(end) = events.find("\n\n") {
        let event: String = events.drain(..end + 2).collect();
        assert_eq!(event, format!("id: {next}\ndata: {next}\n\n"));
        *next += 1;
    }
}

#[test]
fn an_event_stream_holds_across_1000_events_and_a_drain_ends_it_cleanly() {
    let mut server = start_program(
        &example("sse"),
        &["--listen", "127.0.0.1:0", "--workers", "1"],
    );
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(reader.read_line(&mut head).unwrap() > 0, "{head}");
    }
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/event-stream\r\n"),
        "{head}"
    );
    let mut events = String::new();
    let mut next = 0u64;
    while next < 1000 {
        let data = chunk(&mut reader);
        assert!(!data.is_empty(), "the stream ended after {next} events");
        take(data, &mut events, &mut next);
    }
    server.signal(libc::SIGTERM);
    loop {
        let data = chunk(&mut reader);
        if data.is_empty() {
            break; // the last chunk: the body ended cleanly
        }
        take(data, &mut events, &mut next);
    }
    assert!(events.is_empty(), "half an event at the end: {events:?}");
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after the last chunk: {rest:?}");
    assert!(server.wait_exit().success());
    eprintln!("{next} events, then the drain ended the stream");
}
