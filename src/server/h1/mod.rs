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

use std::net::SocketAddr;

pub(crate) use parser::{BodyRead, Parsed, Parser, MAX_PIECE};
pub(crate) use response::{encode, encode_head, Framing, Head};
pub use response::{text, Response};

/// A request, as the handler gets it: the `http` crate's, its body read whole (within
/// `max_body_size`) and de-chunked (a handler may take it streamed instead: see
/// [`Handler::body_mode`](super::Handler::body_mode)). Its extensions hold the
/// [`Peer`]. The URI is the
/// request target in origin form (an absolute-form target, `http://host/path?q`, is
/// reduced to its path and query, and its authority replaces the `Host` header), or `*`
/// for `OPTIONS *`; the version is HTTP/1.0 or HTTP/1.1 (later 1.x minors are 1.1).
pub type Request = http::Request<Vec<u8>>;

/// Who sent a request: in its extensions (`request.extensions().get::<Peer>()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Peer {
    /// A TCP client's address.
    Tcp(SocketAddr),
    /// A client on a Unix socket (its address is unnamed).
    Unix,
}

impl std::fmt::Display for Peer {
    /// The client's IP (for the access log), or `unix`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{}", addr.ip()),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// The value of the query parameter `name` in `request`'s URI, undecoded.
pub fn query<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request
        .uri()
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A request as the parser produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Incoming {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1 (and for HTTP/1.2 and later minor versions).
    pub minor_version: u8,
    /// Header names and values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub keep_alive: bool,
}

impl Incoming {
    /// The `http` crate's request head, from `peer`; why not, for a target or a
    /// header the parser let through but `http`'s types refuse (a 400).
    pub fn into_request(self, peer: Peer) -> Result<http::Request<()>, &'static str> {
        let version = match self.minor_version {
            0 => http::Version::HTTP_10,
            _ => http::Version::HTTP_11,
        };
        let mut request = http::Request::builder()
            .method(self.method.as_bytes())
            .uri(self.target)
            .version(version)
            .extension(peer)
            .body(())
            .map_err(|_| "a method or target http's types refuse")?;
        let headers = request.headers_mut();
        headers.reserve(self.headers.len());
        for (name, value) in self.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes());
            let value = http::HeaderValue::from_bytes(&value);
            let (Ok(name), Ok(value)) = (name, value) else {
                return Err("a header http's types refuse");
            };
            headers.append(name, value);
        }
        Ok(request)
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
