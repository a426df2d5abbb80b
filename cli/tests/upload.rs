//! examples/upload.rs: request bodies streamed to the handler, of any length, through
//! a worker that holds only a window of each.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use common::*;

/// The 64-bit FNV-1a hash the example answers with.
fn fnv1a(hash: &mut u64, data: &[u8]) {
    for &byte in data {
        *hash = (*hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The peak resident set size of process `pid`, in KiB.
fn peak_rss_kib(pid: libc::pid_t) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// Reads one response with a `Content-Length` body: its status line and body.
fn response(reader: &mut BufReader<TcpStream>) -> (String, String) {
    let (mut status, mut length) = (String::new(), 0);
    reader.read_line(&mut status).expect("a status line");
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "EOF in a head");
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (
        status.trim_end().to_owned(),
        String::from_utf8(body).unwrap(),
    )
}

fn connect(server: &Server) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(&server.addr).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    stream.set_write_timeout(Some(LIMIT)).unwrap();
    let reader = BufReader::new(stream.try_clone().unwrap());
    (stream, reader)
}

/// A pseudo-random byte pattern, so that the hash checks order and content.
fn pattern(at: u64) -> u8 {
    (at.wrapping_mul(0x9e37_79b9) >> 13) as u8
}

#[test]
fn an_upload_far_past_max_body_size_streams_through_a_window_of_memory() {
    let server = start_program(
        &example("upload"),
        &["--listen", "127.0.0.1:0", "--workers", "1"],
    );
    let (mut stream, mut reader) = connect(&server);
    stream
        .write_all(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (_, pid) = response(&mut reader);
    let worker: libc::pid_t = pid.trim().parse().unwrap();
    let before = peak_rss_kib(worker);

    // 128 MiB (max_body_size is 1 MiB), written as fast as the server takes it.
    let total: u64 = size(128, 512) << 20;
    let head = format!("PUT /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {total}\r\n\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let (mut hash, mut sent, mut piece) = (FNV_START, 0u64, vec![0u8; 256 * 1024]);
    while sent < total {
        let n = piece.len().min((total - sent) as usize);
        for (i, byte) in piece[..n].iter_mut().enumerate() {
            *byte = pattern(sent + i as u64);
        }
        fnv1a(&mut hash, &piece[..n]);
        stream.write_all(&piece[..n]).unwrap();
        sent += n as u64;
    }
    let (status, body) = response(&mut reader);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, format!("bytes {total} fnv1a {hash:016x}\n"));
    let grew = peak_rss_kib(worker).saturating_sub(before);
    println!(
        "figure: a {} MiB upload grew the worker's peak RSS by {grew} KiB",
        total >> 20
    );
    assert!(grew < 16 * 1024, "the worker's peak RSS grew by {grew} KiB");

    // The same connection goes on, and a buffered body still has its limit.
    let over = vec![b'x'; 2 << 20];
    let head = format!(
        "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        over.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let (status, _) = response(&mut reader);
    assert_eq!(status, "HTTP/1.1 413 Payload Too Large");
}

#[test]
fn a_chunked_upload_streams_and_one_past_the_handlers_limit_is_refused_and_discarded() {
    let server = start_program(
        &example("upload"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--max-upload",
            "100000",
        ],
    );
    let (mut stream, mut reader) = connect(&server);
    let head = "PUT /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    let (mut hash, mut at) = (FNV_START, 0u64);
    for size in (1..60).map(|i| i * 53) {
        let data: Vec<u8> = (0..size).map(|i| pattern(at + i)).collect();
        fnv1a(&mut hash, &data);
        at += size;
        write!(stream, "{size:x}\r\n").unwrap();
        stream.write_all(&data).unwrap();
        stream.write_all(b"\r\n").unwrap();
    }
    stream.write_all(b"0\r\n\r\n").unwrap();
    let (status, body) = response(&mut reader);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, format!("bytes {at} fnv1a {hash:016x}\n"));

    // Past --max-upload: 413 as soon as it is seen; the rest of the body is read and
    // dropped, and the connection serves the next request.
    let big = vec![b'y'; 1 << 20];
    let head = format!(
        "PUT /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&big).unwrap();
    let (status, body) = response(&mut reader);
    assert_eq!(status, "HTTP/1.1 413 Payload Too Large", "{body}");
    stream
        .write_all(b"GET /pid HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (status, _) = response(&mut reader);
    assert_eq!(status, "HTTP/1.1 200 OK");
}
