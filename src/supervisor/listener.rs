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
        Listener::bind_shared(address, false)
    }

    /// [`Listener::bind`], a TCP address with `SO_REUSEPORT` if `reuse_port`.
    fn bind_shared(address: &str, reuse_port: bool) -> io::Result<Listener> {
        let listener = match address.strip_prefix("unix:") {
            Some("") => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "unix: needs a path, as in unix:/run/app.sock",
                ))
            }
            Some(path) => Listener::Unix(bind_unix(PathBuf::from(path))?),
            None => {
                let mut addr = resolve(address)?;
                if reuse_port {
                    addr = refuse_if_in_use(addr)?;
                }
                Listener::Tcp(bind_tcp_at(addr, reuse_port)?)
            }
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
///
/// With `reuse_port`, one `--listen` TCP address is a group of `SO_REUSEPORT` sockets,
/// its *lanes*: one per worker, which the kernel spreads new connections over. The
/// master keeps every lane open, so that a lane's queue outlives the worker that
/// serves it (replaced, reloaded, upgraded); a lane closes only when the master has one
/// worker fewer for good (`TTOU`), and then only after new connections are kept off it
/// (see [`Bound::remove_lane`]). Any other listener is one socket that every worker
/// shares: [`Bound::lane`] gives it whatever the lane.
#[derive(Debug)]
pub(crate) struct Bound {
    /// Lane 0 first; never empty.
    lanes: Vec<Listener>,
    /// Lanes can be added: a TCP socket of the master's own with `SO_REUSEPORT`.
    laned: bool,
    pub unlink: Option<PathBuf>,
    /// The master bound it: the socket is its own, and dies with it. A handed-in one
    /// may outlive the master (systemd's, or the app's), so the master leaves its
    /// socket as it found it.
    own: bool,
}

impl Bound {
    /// Binds a `--listen` address; with `reuse_port`, a TCP one as lane 0 of a group
    /// of `SO_REUSEPORT` sockets.
    pub fn bind(address: &str, reuse_port: bool) -> io::Result<Bound> {
        let listener = Listener::bind_shared(address, reuse_port)?;
        let unlink = address.strip_prefix("unix:").map(PathBuf::from);
        Ok(Bound {
            laned: reuse_port && matches!(listener, Listener::Tcp(_)),
            lanes: vec![listener],
            unlink,
            own: true,
        })
    }

    /// Sockets an upgrade passed on (see `upgrade`): the old master's lanes of one
    /// address (one socket without `reuse_port`, or for a socket the masters did not
    /// bind: `laned` only for their own), left as they are (never filtered or
    /// unlinked) until this master takes over and [`Bound::own`]s them, if the old
    /// master did.
    pub fn inherited(lanes: Vec<Listener>, laned: bool) -> Bound {
        assert!(!lanes.is_empty(), "an upgrade passes a socket per address");
        Bound {
            laned: laned && matches!(lanes[0], Listener::Tcp(_)),
            lanes,
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

    /// A listener bound elsewhere, made non-blocking; shared by every worker.
    pub fn handed_in(listener: Listener) -> io::Result<Bound> {
        listener.set_nonblocking()?;
        Ok(Bound {
            lanes: vec![listener],
            laned: false,
            unlink: None,
            own: false,
        })
    }

    /// The socket as a whole: lane 0, whose address every lane has.
    pub fn listener(&self) -> &Listener {
        &self.lanes[0]
    }

    /// Every socket of it: its lanes, or the one socket.
    pub fn sockets(&self) -> &[Listener] {
        &self.lanes
    }

    /// Whether its TCP socket was bound with [`reuse_port`] (what lanes need).
    pub fn reuses_port(&self) -> io::Result<bool> {
        let Listener::Tcp(listener) = &self.lanes[0] else {
            return Ok(false);
        };
        let socket = socket2::SockRef::from(listener);
        #[cfg(target_os = "freebsd")]
        return socket.reuse_port_lb();
        #[cfg(not(target_os = "freebsd"))]
        socket.reuse_port()
    }

    /// Whether it is a group of lanes (see [`Bound`]).
    pub fn is_laned(&self) -> bool {
        self.laned
    }

    /// The socket the worker of `lane` serves (the shared one, if not laned).
    pub fn into_lane(mut self, lane: usize) -> Listener {
        if self.laned && lane < self.lanes.len() {
            self.lanes.swap_remove(lane)
        } else {
            self.lanes.swap_remove(0)
        }
    }

    /// Binds one more lane, at lane 0's address (its real port, if 0 was asked for).
    pub fn add_lane(&mut self) -> io::Result<()> {
        let Listener::Tcp(first) = &self.lanes[0] else {
            return Ok(());
        };
        if !self.laned {
            return Ok(());
        }
        let lane = bind_tcp_at(first.local_addr()?, true)?;
        lane.set_nonblocking(true)?;
        self.lanes.push(Listener::Tcp(lane));
        Ok(())
    }

    /// Lane `lane`, which is to close, completes no new connection from now on (as
    /// [`Bound::refuse_new_connections`] does for a whole listener); the ones it
    /// queued stay for its worker, which takes them in as it drains (the socket's last
    /// close, the worker's, would reset them otherwise). A client whose SYN is dropped
    /// meanwhile sends it again (1, 3, 7 s later), and lands on another lane once
    /// this one's last copy is closed.
    pub fn refuse_on_lane(&self, lane: usize) {
        if self.laned && self.lanes.len() > 1 {
            if let Some(socket) = self.lanes.get(lane) {
                drop_new_connections(socket, &self.lanes[0]);
            }
        }
    }

    /// Closes the master's copy of lane `lane`; the last lane takes its number.
    pub fn remove_lane(&mut self, lane: usize) {
        if self.laned && self.lanes.len() > 1 && lane < self.lanes.len() {
            self.lanes.swap_remove(lane);
        }
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
        if self.own {
            for lane in &self.lanes {
                drop_new_connections(lane, &self.lanes[0]);
            }
        }
    }

    /// Undoes [`Bound::refuse_new_connections`] (which a failed upgrade's new master
    /// may have done to a socket it shares with this one).
    pub fn accept_new_connections(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if self.own {
            for lane in &self.lanes {
                if let Listener::Tcp(listener) = lane {
                    // ENOENT when there is no filter: nothing to undo.
                    let _ = socket2::SockRef::from(listener).detach_filter();
                }
            }
        }
    }

    /// Removes the socket file the master bound (at exit, never from a worker).
    pub fn unlink(&self) {
        if let Some(path) = &self.unlink {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A TCP `listener` completes no new connection from now on (see
/// [`Bound::refuse_new_connections`]); `named` is how the log names it.
fn drop_new_connections(listener: &Listener, named: &Listener) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Listener::Tcp(listener) = listener {
        // BPF_RET | BPF_K with k = 0: keep 0 bytes of each packet, i.e. drop it.
        const DROP: socket2::SockFilter = socket2::SockFilter::new(0x06, 0, 0, 0);
        if let Err(e) = socket2::SockRef::from(listener).attach_filter(&[DROP]) {
            log::warn!("{}: cannot stop new connections: {e}", named.address());
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (listener, named);
}

fn resolve(address: &str) -> io::Result<SocketAddr> {
    address.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address} resolves to nothing"),
        )
    })
}

/// Binds and listens on `addr`; with `reuse_port`, as one of a group of sockets on
/// that address over which the kernel spreads new connections (see [`reuse_port`]).
fn bind_tcp_at(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        self::reuse_port(&socket)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// With `SO_REUSEPORT` a bind succeeds beside another listener of the same user that
/// has it too, and the two share the connections: a second server started by mistake
/// would take a share of the first one's, and port 0, once free ports run short, may
/// be given a port such a group holds (Linux's second, relaxed search). So the address is first bound without it, which any
/// listener there refuses (`EADDRINUSE`) as a plain bind would, and which turns port 0
/// into a port no one holds; the address to bind the lanes at is returned.
fn refuse_if_in_use(addr: SocketAddr) -> io::Result<SocketAddr> {
    let probe = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => io::Error::new(
            e.kind(),
            format!(
                "{addr} is in use by another listener (reuse_port would share it with \
                 that one's connections): {e}"
            ),
        ),
        _ => e,
    })?;
    probe.local_addr()?.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "a TCP socket without an IP address",
        )
    })
}

/// Whether this system spreads connections over a group of listening sockets on one
/// address, which `--reuse-port` needs: Linux's `SO_REUSEPORT` and FreeBSD's
/// `SO_REUSEPORT_LB` do. Elsewhere (macOS, the other BSDs) `SO_REUSEPORT` lets
/// sockets share an address without spreading the load, which would leave lanes idle.
pub(crate) const REUSE_PORT_SPREADS: bool = cfg!(any(
    target_os = "linux",
    target_os = "android",
    target_os = "freebsd"
));

fn reuse_port(socket: &socket2::Socket) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    return socket.set_reuse_port(true);
    #[cfg(target_os = "freebsd")]
    return socket.set_reuse_port_lb(true);
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    {
        let _ = socket;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this system does not spread connections over SO_REUSEPORT sockets",
        ))
    }
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
        let own = Bound::bind("127.0.0.1:0", false).unwrap();
        let Listener::Tcp(tcp) = own.listener() else {
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

    /// Lanes share the address (the real port of `:0`), and a lane that closes
    /// keeps what it queued for its worker while the kernel sends new connections to
    /// the other lanes.
    #[cfg(target_os = "linux")]
    #[test]
    fn lanes_share_the_port_and_a_closing_lane_completes_no_new_connection() {
        use std::net::TcpStream;
        use std::time::Duration;
        let mut bound = Bound::bind("127.0.0.1:0", true).unwrap();
        assert!(bound.is_laned() && bound.reuses_port().unwrap());
        bound.add_lane().unwrap();
        bound.add_lane().unwrap();
        let addr = |l: &Listener| match l {
            Listener::Tcp(l) => l.local_addr().unwrap(),
            Listener::Unix(_) => unreachable!(),
        };
        let port = addr(bound.listener());
        assert!(bound.sockets().iter().all(|lane| addr(lane) == port));
        // Connections queued on the lanes: taken from lane 1 later, as its worker would.
        let clients: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(port).unwrap()).collect();
        let Listener::Tcp(lane1) = &bound.sockets()[1] else {
            unreachable!()
        };
        let worker_copy = lane1.try_clone().unwrap();
        bound.refuse_on_lane(1);
        bound.remove_lane(1);
        assert_eq!(bound.sockets().len(), 2);
        let mut taken = 0;
        while worker_copy.accept().is_ok() {
            taken += 1;
        }
        assert!(taken > 0, "30 connections and none on lane 1 of 3");
        // While its worker still holds it, the closing lane completes no connection
        // (those it would get wait for their SYN's resend); once closed, the kernel
        // spreads them over the lanes left.
        let during: Vec<_> = (0..30)
            .map(|_| TcpStream::connect_timeout(&port, Duration::from_millis(100)))
            .collect();
        assert!(
            worker_copy.accept().is_err(),
            "a new connection on a closing lane"
        );
        drop(worker_copy);
        let late: Vec<TcpStream> = (0..30)
            .map(|_| TcpStream::connect_timeout(&port, Duration::from_secs(5)).unwrap())
            .collect();
        drop((clients, during, late));
    }

    #[test]
    fn a_lane_is_given_only_where_lanes_are() {
        let unix = scratch("shared");
        let address = format!("unix:{}", unix.display());
        let mut shared = Bound::bind(&address, true).unwrap();
        assert!(!shared.is_laned());
        shared.add_lane().unwrap();
        assert_eq!(shared.sockets().len(), 1, "a Unix socket is shared");
        assert!(matches!(shared.into_lane(3), Listener::Unix(_)));
        std::fs::remove_file(&unix).unwrap();
        let tcp = Bound::bind("127.0.0.1:0", false).unwrap();
        assert!(!tcp.is_laned() && !tcp.reuses_port().unwrap());
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
