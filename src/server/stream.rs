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
    /// Accepts a connection, non-blocking and close-on-exec from the start (one
    /// `accept4`, where the OS has it, instead of an `accept` and an `ioctl(FIONBIO)`),
    /// with Nagle off for TCP, and its peer.
    pub(crate) fn accept(listener: &Listener) -> io::Result<(Stream, Peer)> {
        match listener {
            Listener::Tcp(l) => {
                let (stream, peer) = sys::accept_tcp(l)?;
                if !NODELAY_INHERITED {
                    stream.set_nodelay(true)?;
                }
                Ok((Stream::Tcp(stream), Peer::Tcp(peer)))
            }
            Listener::Unix(l) => {
                let stream = sys::accept_unix(l)?;
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

/// Whether an accepted TCP connection has the listener's `TCP_NODELAY`: Linux copies
/// it from the listening socket, so a worker sets it once on its listeners
/// ([`nodelay_for_accepted`]) rather than once per connection.
const NODELAY_INHERITED: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// Makes the connections `listener` hands out start with Nagle off, where they inherit
/// it (see [`NODELAY_INHERITED`]); elsewhere each is set at its accept.
pub(crate) fn nodelay_for_accepted(listener: &Listener) -> io::Result<()> {
    match listener {
        Listener::Tcp(l) if NODELAY_INHERITED => socket2::SockRef::from(l).set_tcp_nodelay(true),
        _ => Ok(()),
    }
}

/// `accept4(2)`, which makes the new fd non-blocking and close-on-exec atomically.
#[cfg(has_accept4)]
mod sys {
    use std::io;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::net::{UnixListener, UnixStream};

    use forkloop_backend::cvt;

    /// Accepts from `listener`, writing the peer's address to `addr` (up to `*len`
    /// bytes) unless it is null.
    ///
    /// # Safety
    ///
    /// `addr` and `len` are both null, or point to a writable address buffer of `*len`
    /// bytes and to its length.
    unsafe fn accept4(
        listener: &impl AsRawFd,
        addr: *mut libc::sockaddr,
        len: *mut libc::socklen_t,
    ) -> io::Result<OwnedFd> {
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        loop {
            // SAFETY: the caller vouches for `addr` and `len`; the listener's fd is
            // borrowed for the call.
            match cvt(unsafe { libc::accept4(listener.as_raw_fd(), addr, len, flags) }) {
                // SAFETY: accept4 just returned this fd, and nothing else owns it.
                Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    pub(super) fn accept_tcp(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
        // SAFETY: try_init lends a zeroed address buffer and its length, which accept4
        // fills in (and try_init reads no further than the length it sets).
        let (fd, addr) = unsafe {
            socket2::SockAddr::try_init(|addr, len| accept4(listener, addr.cast(), len))
        }?;
        let peer = addr.as_socket().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a TCP peer without an IP address",
            )
        })?;
        Ok((TcpStream::from(fd), peer))
    }

    pub(super) fn accept_unix(listener: &UnixListener) -> io::Result<UnixStream> {
        // SAFETY: no address is asked for: both pointers are null.
        let fd = unsafe { accept4(listener, std::ptr::null_mut(), std::ptr::null_mut()) }?;
        Ok(UnixStream::from(fd))
    }
}

/// Without `accept4` (macOS): std's accept (close-on-exec), then non-blocking.
#[cfg(not(has_accept4))]
mod sys {
    use std::io;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::unix::net::{UnixListener, UnixStream};

    pub(super) fn accept_tcp(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = listener.accept()?;
        stream.set_nonblocking(true)?;
        Ok((stream, peer))
    }

    pub(super) fn accept_unix(listener: &UnixListener) -> io::Result<UnixStream> {
        let (stream, _) = listener.accept()?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixListener;

    fn fd_flags(fd: RawFd) -> (bool, bool) {
        // SAFETY: F_GETFL and F_GETFD only read the flags of the test's own open fd.
        let (status, descriptor) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        };
        assert!(status >= 0 && descriptor >= 0, "fd {fd} is open");
        (
            status & libc::O_NONBLOCK != 0,
            descriptor & libc::FD_CLOEXEC != 0,
        )
    }

    #[test]
    fn an_accepted_tcp_connection_is_non_blocking_close_on_exec_without_nagle_and_knows_its_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let listener = Listener::Tcp(listener);
        nodelay_for_accepted(&listener).unwrap();
        let Listener::Tcp(tcp) = &listener else {
            unreachable!()
        };
        let client = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let (stream, peer) = Stream::accept(&listener).unwrap();
        assert_eq!(fd_flags(stream.as_raw_fd()), (true, true));
        let Stream::Tcp(tcp) = &stream else {
            panic!("a TCP listener gives a TCP stream")
        };
        assert!(tcp.nodelay().unwrap(), "Nagle is off");
        assert!(
            matches!(peer, Peer::Tcp(addr) if addr == client.local_addr().unwrap()),
            "the peer is the client's address"
        );
    }

    #[test]
    fn an_accepted_unix_connection_is_non_blocking_and_close_on_exec() {
        let dir = std::env::temp_dir().join(format!("forkloop-accept-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = Listener::Unix(UnixListener::bind(&dir).unwrap());
        let _client = UnixStream::connect(&dir).unwrap();
        let (stream, peer) = Stream::accept(&listener).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(fd_flags(stream.as_raw_fd()), (true, true));
        assert!(matches!(peer, Peer::Unix));
    }
}
