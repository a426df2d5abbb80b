//! The HTTP connection state machine under arbitrary input: the checks behind the
//! `cargo fuzz` target (`fuzz/`) and its deterministic run in `tests/fuzz_corpus.rs`.
//! Not a stable API.
//!
//! One worker serves one connection over a socketpair. The input is sent whole and
//! again in pieces, and every run must hold: no panic and no hang; the bytes buffered
//! for the connection stay bounded; the output is a sequence of complete, well-formed
//! HTTP/1.1 responses, nothing after a `Connection: close`; and how the input was split
//! changes nothing but `100 Continue` interim responses and `Date` values.

use std::rc::Rc;

use super::request_body::RECEIVE_WINDOW;
use super::worker::{drive_connection, MAX_PIPELINED};
use super::{BodyMode, Config, Handler, Request, Responder, Response, StreamedRequest, Worker};
use crate::Loop;

/// Header limits small enough that a fuzzer reaches them.
const MAX_HEAD: usize = 1024;
const MAX_BODY: u64 = 2048;
/// What one connection may hold: its parser, at most a head or a 64 KiB window of body
/// input plus the body read so far (at most `MAX_BODY`); a streamed body's receiver,
/// its window and one window more; its queue, at most `MAX_PIPELINED` responses of at
/// most `MAX_BODY` bytes plus their heads.
const BUFFER_BOUND: usize = MAX_HEAD
    + 64 * 1024
    + MAX_BODY as usize
    + 2 * RECEIVE_WINDOW
    + MAX_PIPELINED * (MAX_BODY as usize + 512);
/// Between the input and the cut positions in an encoded fuzz case.
const CUTS_MARKER: &[u8] = b"\0#cuts\0";

/// Echoes the body; `/later` answers from the loop's next iteration instead of at once
/// (so pipelined answers complete out of order); a HEAD answer says so in `X-Head`, as
/// its `Content-Length` then describes a body that is not sent. Bodies under `/stream`
/// are streamed, and collected up to `MAX_BODY` (else 413).
struct App;

impl Handler for App {
    fn call(&self, lp: &mut Loop<Worker>, request: Request, responder: Responder) {
        let later = request.uri().path() == "/later";
        let head = request.method() == ::http::Method::HEAD;
        let response = echo(head, request.into_body());
        if later {
            lp.later(move |lp, _| responder.send(lp, response));
        } else {
            responder.send(lp, response);
        }
    }

    fn body_mode(&self, head: &::http::request::Parts) -> BodyMode {
        match head.uri.path().starts_with("/stream") {
            true => BodyMode::Streamed,
            false => BodyMode::Buffered,
        }
    }

    fn call_streamed(&self, lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        let head = request.method() == ::http::Method::HEAD;
        request
            .into_body()
            .collect(lp, MAX_BODY as usize, move |lp, _, body| {
                let response = match body {
                    Ok(body) => echo(head, body),
                    Err(why) => super::text(::http::StatusCode::PAYLOAD_TOO_LARGE, why.to_string()),
                };
                responder.send(lp, response);
            });
    }
}

fn echo(head: bool, body: Vec<u8>) -> Response {
    let mut response = Response::new(body);
    if head {
        let marked = ::http::HeaderValue::from_static("1");
        response.headers_mut().insert("x-head", marked);
    }
    response
}

/// Splits a fuzz case into its input and cut positions: `input`, or
/// `input ++ CUTS_MARKER ++ (u16 LE)*`.
pub fn decode(data: &[u8]) -> (&[u8], Vec<usize>) {
    let marker = data
        .windows(CUTS_MARKER.len())
        .rposition(|w| w == CUTS_MARKER);
    let Some(at) = marker else {
        return (data, Vec::new());
    };
    let cuts = data[at + CUTS_MARKER.len()..]
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    (&data[..at], cuts)
}

/// Runs every check on `input` sent whole and cut before each position in `cuts` (taken
/// modulo the input's length). Returns how many final responses came back, or what broke.
pub fn check(input: &[u8], cuts: &[usize]) -> Result<usize, String> {
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    ends.push(input.len());
    ends.sort_unstable();
    ends.dedup();
    let mut pieces = Vec::with_capacity(ends.len());
    let mut start = 0;
    for end in ends {
        pieces.push(&input[start..end]);
        start = end;
    }
    let whole = run(&[input])?;
    let split = run(&pieces)?;
    let responses = well_formed(&split)?;
    if normalized(&whole)? != normalized(&split)? {
        return Err(format!(
            "splitting the input at {cuts:?} changed the output:\nwhole: {:?}\nsplit: {:?}",
            String::from_utf8_lossy(&whole),
            String::from_utf8_lossy(&split)
        ));
    }
    Ok(responses)
}

fn run(pieces: &[&[u8]]) -> Result<Vec<u8>, String> {
    let config = Config {
        max_header_size: MAX_HEAD,
        max_body_size: MAX_BODY,
        ..Config::default()
    };
    let (output, peak) =
        drive_connection(&config, Rc::new(App), pieces).map_err(|e| e.to_string())?;
    if peak > BUFFER_BOUND {
        return Err(format!(
            "{peak} bytes buffered for one connection (bound {BUFFER_BOUND})"
        ));
    }
    Ok(output)
}

/// One parsed response: where its head ends, its status, and the headers checked here.
struct Head {
    len: usize,
    status: u16,
    content_length: Option<usize>,
    head_only: bool,
    close: bool,
}

fn parse_head(out: &[u8]) -> Result<Head, String> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(out) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err("a truncated response head".into()),
        Err(e) => return Err(format!("a malformed response head: {e}")),
    };
    if response.version != Some(1) {
        return Err("a response that is not HTTP/1.1".into());
    }
    let status = response.code.unwrap_or(0);
    let value = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    if status >= 200 && value("Date").is_none() {
        return Err(format!("a {status} response without Date"));
    }
    let content_length = match value("Content-Length") {
        Some(v) => Some(v.parse().map_err(|_| format!("Content-Length {v:?}"))?),
        None => None,
    };
    Ok(Head {
        len,
        status,
        content_length,
        head_only: value("X-Head").is_some(),
        close: value("Connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
    })
}

/// Checks `out` is a sequence of complete responses; returns how many are final.
fn well_formed(mut out: &[u8]) -> Result<usize, String> {
    let mut count = 0;
    while !out.is_empty() {
        let head = parse_head(out)?;
        if head.status < 200 {
            if head.status != 100 {
                return Err(format!("an interim {} response", head.status));
            }
            out = &out[head.len..];
            continue;
        }
        let length = head
            .content_length
            .ok_or_else(|| format!("a {} response without Content-Length", head.status))?;
        let body = if head.head_only { 0 } else { length };
        if out.len() < head.len + body {
            return Err(format!("a {} response with a truncated body", head.status));
        }
        out = &out[head.len + body..];
        count += 1;
        if head.close && !out.is_empty() {
            return Err("bytes after a Connection: close response".into());
        }
    }
    Ok(count)
}

/// The output without `100 Continue` responses and with every `Date` value blanked.
fn normalized(mut out: &[u8]) -> Result<Vec<u8>, String> {
    let mut kept = Vec::with_capacity(out.len());
    while !out.is_empty() {
        let head = parse_head(out)?;
        let body = match (head.head_only, head.content_length) {
            (false, Some(length)) => length,
            _ => 0,
        };
        let end = (head.len + body).min(out.len());
        if head.status != 100 {
            for line in out[..head.len].split_inclusive(|&b| b == b'\n') {
                if line.starts_with(b"Date: ") {
                    kept.extend_from_slice(b"Date: -\r\n");
                } else {
                    kept.extend_from_slice(line);
                }
            }
            kept.extend_from_slice(&out[head.len..end]);
        }
        out = &out[end..];
    }
    Ok(kept)
}
