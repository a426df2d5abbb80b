//! The connections a worker accepts from its listeners.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

use super::h1::Peer;
use crate::supervisor::Listener;

/// An accepted connection.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Accepts a connection, non-blocking (with Nagle off, for TCP), and its peer.
    pub(crate) fn accept(listener: &Listener) -> io::Result<(Stream, Peer)> {
        match listener {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept()?;
                stream.set_nonblocking(true)?;
                stream.set_nodelay(true)?;
                Ok((Stream::Tcp(stream), Peer::Tcp(peer)))
            }
            Listener::Unix(l) => {
                let (stream, _) = l.accept()?;
                stream.set_nonblocking(true)?;
                Ok((Stream::Unix(stream), Peer::Unix))
            }
        }
    }

    /// Reads through a shared reference, as std's `Read for &TcpStream` does: the loop
    /// lends its sources only so.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }

    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    /// Whether the peer sent bytes this side has not read: closing now would make the
    /// kernel answer them with a reset.
    pub(crate) fn has_unread_input(&self) -> bool {
        let mut byte = 0u8;
        // SAFETY: receives into one live byte; MSG_PEEK leaves the data queued and
        // MSG_DONTWAIT never blocks.
        let peeked = unsafe {
            libc::recv(
                self.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        peeked > 0
    }

    /// Sends EOF to the peer; reading stays possible.
    pub(crate) fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}
