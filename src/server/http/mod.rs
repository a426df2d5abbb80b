//! HTTP/1.1 messages: requests parsed strictly to RFC 9112 (a byte stream never frames
//! differently here than in a strict parser), and responses checked before they reach
//! the wire.
//!
//! The parser is pure — bytes in, requests or an error status out — so it can be fed
//! input split at any point and fuzzed without sockets. Every buffer it keeps is bounded
//! by the limits it is given, and every size from the peer is checked arithmetic.

mod chunked;
mod head;
mod parser;
mod response;
mod syntax;

pub(crate) use parser::{Parsed, Parser};
pub use response::Response;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ….
    pub method: String,
    /// The request target in origin form, path and query (an absolute-form target,
    /// `http://host/path?q`, is reduced to them, and its authority replaces the
    /// `Host` header's value), or `*` for `OPTIONS *`.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1 (and for HTTP/1.2 and later minor versions).
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

/// The interim response sent before reading a body the client waits to send.
pub(crate) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The most header fields (and trailer fields) a request may have.
pub(crate) const MAX_HEADERS: usize = 100;

/// Bounds on what one connection may make the server hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_head: usize,
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
