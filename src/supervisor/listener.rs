//! Listening sockets (TCP and Unix) and the streams they accept.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

/// Connections a listener queues before the kernel refuses more.
const BACKLOG: i32 = 1024;

/// A bound, non-blocking listening socket shared by all workers.
#[derive(Debug)]
pub enum Listener {
    /// `host:port`.
    Tcp(TcpListener),
    /// `unix:/path`.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `host:port` or `unix:/path`. A Unix socket file left by a dead server is
    /// replaced; a live one, or a file at that path that is not a socket, is an error.
    pub fn bind(address: &str) -> io::Result<Listener> {
        let listener = match address.strip_prefix("unix:") {
            Some("") => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "unix: needs a path, as in unix:/run/app.sock",
                ))
            }
            Some(path) => bind_unix(PathBuf::from(path))?,
            None => Listener::Tcp(bind_tcp(address)?),
        };
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l, _) => l.set_nonblocking(true)?,
        }
        Ok(listener)
    }

    /// The bound address as `--listen` takes it (the real port if 0 was asked for).
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    pub(crate) fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept()?;
                stream.set_nonblocking(true)?;
                stream.set_nodelay(true)?;
                Ok((Stream::Tcp(stream), peer.ip().to_string()))
            }
            Listener::Unix(l, _) => {
                let (stream, _) = l.accept()?;
                stream.set_nonblocking(true)?;
                Ok((Stream::Unix(stream), "unix".into()))
            }
        }
    }

    /// Removes a Unix socket's file (the master does so at exit, never a worker).
    pub(crate) fn unlink(&self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

fn bind_tcp(address: &str) -> io::Result<TcpListener> {
    let addr: SocketAddr = address.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address} resolves to nothing"),
        )
    })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds a Unix socket at `path`. A socket file no server answers on (left by a dead
/// one) is replaced; anything else at `path` — a live socket, a regular file, a
/// directory, a symlink — is an error naming it, and is never removed.
fn bind_unix(path: PathBuf) -> io::Result<Listener> {
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ));
        }
        Ok(_) => match probe_unix(&path) {
            // Only a refusal proves that no server listens there.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(&path)?,
            Ok(()) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a live server", path.display()),
                ))
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{}: cannot tell whether a server listens there: {e}",
                        path.display()
                    ),
                ))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(&path)?)?;
    socket.listen(BACKLOG)?;
    Ok(Listener::Unix(
        UnixListener::from(std::os::fd::OwnedFd::from(socket)),
        path,
    ))
}

/// Connects to the Unix socket at `path` without blocking: `Ok` if a server accepted
/// or has its backlog full (`EAGAIN`, on Linux), the error otherwise. On the BSDs and
/// macOS a full backlog is `ECONNREFUSED` too, so there a live but overloaded server's
/// socket cannot be told from a stale one.
fn probe_unix(path: &std::path::Path) -> io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&socket2::SockAddr::unix(path)?) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        other => other,
    }
}

/// An accepted connection.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("forkloop-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_replaced() {
        let path = scratch("regular");
        std::fs::write(&path, "precious").unwrap();
        let err = Listener::bind(&format!("unix:{}", path.display())).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let path = scratch("sock");
        let address = format!("unix:{}", path.display());
        drop(UnixListener::bind(&path).unwrap());
        let live = Listener::bind(&address).expect("a socket nobody answers on is replaced");
        let err = Listener::bind(&address).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(live);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_live_socket_with_a_full_backlog_is_neither_waited_on_nor_removed() {
        let path = scratch("full");
        let socket =
            socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&socket2::SockAddr::unix(&path).unwrap())
            .unwrap();
        socket.listen(0).unwrap();
        let unix = || {
            let client =
                socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
            client.set_nonblocking(true).unwrap();
            client
        };
        let mut queued = Vec::new();
        loop {
            let client = unix();
            match client.connect(&socket2::SockAddr::unix(&path).unwrap()) {
                Ok(()) => queued.push(client),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(queued.len() < 1000, "the backlog never filled");
        }
        let address = format!("unix:{}", path.display());
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(Listener::bind(&address).map(|_| ())));
        let result = result
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("bind waited on a full backlog");
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::AddrInUse);
        assert!(path.exists(), "a live server's socket was removed");
        drop(socket);
        std::fs::remove_file(&path).unwrap();
    }
}
