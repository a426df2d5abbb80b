//! Listening sockets: those the master binds from `--listen` addresses, and those
//! handed in already bound.

use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

/// Connections a listener queues before the kernel refuses more.
const BACKLOG: i32 = 1024;

/// A listening socket every worker serves, as the std type it is, non-blocking.
#[derive(Debug)]
#[non_exhaustive]
pub enum Listener {
    /// A TCP listener (`host:port`).
    Tcp(TcpListener),
    /// A Unix stream listener (`unix:/path`).
    Unix(UnixListener),
}

impl Listener {
    /// Binds `host:port` or `unix:/path`, non-blocking. A Unix socket file left by a
    /// dead server is replaced; a live one, or a file at that path that is not a
    /// socket, is an error.
    pub fn bind(address: &str) -> io::Result<Listener> {
        let listener = match address.strip_prefix("unix:") {
            Some("") => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "unix: needs a path, as in unix:/run/app.sock",
                ))
            }
            Some(path) => Listener::Unix(bind_unix(PathBuf::from(path))?),
            None => Listener::Tcp(bind_tcp(address)?),
        };
        listener.set_nonblocking()?;
        Ok(listener)
    }

    pub(super) fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l) => l.set_nonblocking(true),
        }
    }

    /// The bound address as `--listen` takes it (the real port if 0 was asked for).
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(l) => {
                let path = l
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(Into::into));
                path.map_or_else(
                    || "unix:?".into(),
                    |p: PathBuf| format!("unix:{}", p.display()),
                )
            }
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Listener {
        Listener::Tcp(listener)
    }
}

impl From<UnixListener> for Listener {
    fn from(listener: UnixListener) -> Listener {
        Listener::Unix(listener)
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// A listener of the master's, and the socket file it removes at exit (one it bound
/// from `unix:/path`; never a handed-in one's).
#[derive(Debug)]
pub(crate) struct Bound {
    pub listener: Listener,
    pub unlink: Option<PathBuf>,
    /// The master bound it: the socket is its own, and dies with it. A handed-in one
    /// may outlive the master (systemd's, or the app's), so the master leaves its
    /// socket as it found it.
    own: bool,
}

impl Bound {
    /// Binds a `--listen` address.
    pub fn bind(address: &str) -> io::Result<Bound> {
        let listener = Listener::bind(address)?;
        let unlink = address.strip_prefix("unix:").map(PathBuf::from);
        Ok(Bound {
            listener,
            unlink,
            own: true,
        })
    }

    /// A socket an upgrade passed on (see `upgrade`): the old master's, and left as it
    /// is (never filtered or unlinked) until this master takes over and [`Bound::own`]s
    /// it, if the old master did.
    pub fn inherited(listener: Listener) -> Bound {
        Bound {
            listener,
            unlink: None,
            own: false,
        }
    }

    /// This master takes over a socket the masters before it bound from `address`: it
    /// is filtered at shutdown, and its file (`unix:` address) removed at exit.
    pub fn own(&mut self, address: &str) {
        self.own = true;
        self.unlink = address.strip_prefix("unix:").map(PathBuf::from);
    }

    /// Whether the master bound it (see `own`).
    pub fn is_own(&self) -> bool {
        self.own
    }

    /// A listener bound elsewhere, made non-blocking.
    pub fn handed_in(listener: Listener) -> io::Result<Bound> {
        listener.set_nonblocking()?;
        Ok(Bound {
            listener,
            unlink: None,
            own: false,
        })
    }

    /// At shutdown, before the workers drain, for a TCP socket the master bound: the
    /// kernel completes no new connection on it from then on, and keeps those it
    /// already queued, which the draining workers take in before they close their
    /// copies. So the last close resets no connection that was queued when the
    /// shutdown began; a client connecting later waits (its SYN is dropped) and is
    /// refused once the socket is closed. Linux only, through a socket filter that
    /// drops every packet reaching the listener (the queued connections' sockets have
    /// none). Left open: a handshake in flight at that moment (its last ACK is
    /// dropped too, so its client may send a request and be reset at the close), a
    /// Unix socket, and other systems, where a connection completed between the last
    /// worker's last `accept` and its `close` is reset. A handed-in socket is left
    /// alone: it may serve again after this master (a filter is the socket's, not the
    /// fd's).
    pub fn refuse_new_connections(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let (Listener::Tcp(listener), true) = (&self.listener, self.own) {
            // BPF_RET | BPF_K with k = 0: keep 0 bytes of each packet, i.e. drop it.
            const DROP: socket2::SockFilter = socket2::SockFilter::new(0x06, 0, 0, 0);
            if let Err(e) = socket2::SockRef::from(listener).attach_filter(&[DROP]) {
                log::warn!(
                    "{}: cannot stop new connections: {e}",
                    self.listener.address()
                );
            }
        }
    }

    /// Undoes [`Bound::refuse_new_connections`] (which a failed upgrade's new master
    /// may have done to a socket it shares with this one).
    pub fn accept_new_connections(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let (Listener::Tcp(listener), true) = (&self.listener, self.own) {
            // ENOENT when there is no filter: nothing to undo.
            let _ = socket2::SockRef::from(listener).detach_filter();
        }
    }

    /// Removes the socket file the master bound (at exit, never from a worker).
    pub fn unlink(&self) {
        if let Some(path) = &self.unlink {
            let _ = std::fs::remove_file(path);
        }
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
pub(super) fn bind_unix(path: PathBuf) -> io::Result<UnixListener> {
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
    Ok(UnixListener::from(OwnedFd::from(socket)))
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

    /// At shutdown the master's own TCP listener completes no new connection (its
    /// SYNs are dropped: the client times out, then is refused at the close), and a
    /// connection queued before stays; a handed-in one is left as it was.
    #[cfg(target_os = "linux")]
    #[test]
    fn only_the_masters_own_listener_stops_taking_connections_at_shutdown() {
        use std::net::TcpStream;
        use std::time::Duration;
        let own = Bound::bind("127.0.0.1:0").unwrap();
        let Listener::Tcp(tcp) = &own.listener else {
            unreachable!()
        };
        let addr = tcp.local_addr().unwrap();
        let queued = TcpStream::connect(addr).unwrap();
        own.refuse_new_connections();
        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert_eq!(late.map(drop).unwrap_err().kind(), io::ErrorKind::TimedOut);
        let (accepted, _) = tcp.accept().expect("the queued connection stays");
        assert_eq!(accepted.peer_addr().unwrap(), queued.local_addr().unwrap());

        let kept = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = kept.local_addr().unwrap();
        let handed = Bound::handed_in(Listener::Tcp(kept)).unwrap();
        handed.refuse_new_connections();
        TcpStream::connect_timeout(&addr, Duration::from_millis(300))
            .expect("a handed-in socket keeps taking connections");
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
