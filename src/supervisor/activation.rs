//! Socket activation: listening sockets handed to this process at `exec`, in the
//! `sd_listen_fds(3)` convention. They are fds 3, 4, … and three environment variables
//! describe them: `LISTEN_PID` (the process they are for), `LISTEN_FDS` (how many) and
//! `LISTEN_FDNAMES` (their names, `:`-separated; optional).
//!
//! systemd passes them (a `.socket` unit, or `systemd-socket-activate`). A binary
//! upgrade (USR2: the master re-execs a new binary, which must serve the sockets the
//! old one had) is to pass them the same way: [`take`] is the receiving side of both,
//! and the sending side has only to put the sockets at fds 3.. (without close-on-exec)
//! and set the three variables, naming each socket after its `--listen` value where the
//! value is a valid name.
//!
//! A socket is matched to a `listen` value by name (a name equal to the value), or in
//! order. systemd names every socket (after its `.socket` unit, unless
//! `FileDescriptorName=` says otherwise), and a name cannot hold a `:`, so it can never
//! equal a `host:port`: names decide only when some name is a `listen` value, and then
//! every socket's name must be one; otherwise the sockets are taken in order.

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};
use nix::sys::stat::{fstat, SFlag};

use super::{Listener, SupervisorError};

/// The first fd of the convention (`SD_LISTEN_FDS_START`).
pub(super) const FIRST_FD: RawFd = 3;

/// The convention's variables, as this process got them.
#[derive(Debug, Default)]
struct Vars {
    pid: Option<OsString>,
    fds: Option<OsString>,
    names: Option<OsString>,
}

/// What the variables say, for this process: `count` sockets at fds 3.., and their
/// names (one per socket) if `LISTEN_FDNAMES` was set.
#[derive(Debug, PartialEq)]
struct Passed {
    count: usize,
    names: Option<Vec<String>>,
}

/// The sockets handed to this process, one per `listen` value and in that order; `None`
/// if none were handed to it (then the caller binds `listen` itself).
///
/// Reads and removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, whichever process
/// they are for (as `sd_listen_fds(3)` does when asked to unset them), so that neither
/// the workers nor what they run see them. Call it once per process, before threads
/// that read the environment exist: see [`remove`].
///
/// Each socket must be a listening TCP or Unix stream socket; it is made close-on-exec
/// (the convention passes them without) and non-blocking, as the sockets the master
/// binds are. A Unix socket's file is left alone, as are the sockets themselves at
/// exit: they belong to whoever passed them (systemd keeps them for the next start).
/// A socket count or name that does not fit `listen`, or an fd that is not a listening
/// socket, is a [`SupervisorError::Config`] naming it.
pub(crate) fn take(listen: &[String]) -> Result<Option<Vec<Listener>>, SupervisorError> {
    let vars = Vars {
        pid: remove("LISTEN_PID"),
        fds: remove("LISTEN_FDS"),
        names: remove("LISTEN_FDNAMES"),
    };
    let error = |e: String| SupervisorError::Config(format!("socket activation: {e}"));
    let Some(passed) = parse(&vars, std::process::id()).map_err(error)? else {
        return Ok(None);
    };
    let order = assign(&passed, listen).map_err(error)?;
    let mut listeners = Vec::with_capacity(order.len());
    for (index, address) in order.into_iter().zip(listen) {
        // `parse` bounds the count, so this stays within RawFd.
        let fd = FIRST_FD + index as RawFd;
        let listener = adopt(fd).map_err(|e| error(format!("fd {fd} (--listen {address}) {e}")))?;
        log::info!(
            "inherited socket: --listen {address} is fd {fd}, {}",
            listener.address()
        );
        listeners.push(listener);
    }
    Ok(Some(listeners))
}

/// Takes `name` out of the environment.
///
/// `std::env::remove_var` is a safe function in this crate's edition (2021), and
/// `unsafe` from edition 2024 on, for a reason that holds in both: it races any other
/// thread's reading of the environment (C code's `getenv` included: name resolution,
/// time zones), which is undefined behaviour. The supervisor calls this at the very
/// start of [`Supervisor::run`](super::Supervisor::run), whose documentation asks for
/// it to be called before the program starts threads that read the environment.
fn remove(name: &str) -> Option<OsString> {
    let value = std::env::var_os(name)?;
    std::env::remove_var(name);
    Some(value)
}

/// Reads the variables: `None` when they hand nothing to process `own_pid`.
fn parse(vars: &Vars, own_pid: u32) -> Result<Option<Passed>, String> {
    let Some(pid) = text("LISTEN_PID", &vars.pid)? else {
        if vars.fds.is_some() {
            log::debug!("LISTEN_FDS without LISTEN_PID: not for this process");
        }
        return Ok(None);
    };
    let pid: u32 = pid
        .parse()
        .ok()
        .filter(|&pid| pid > 0)
        .ok_or_else(|| format!("LISTEN_PID={pid:?} is not a process id"))?;
    if pid != own_pid {
        log::debug!("LISTEN_PID={pid} is another process (this is {own_pid}): binding");
        return Ok(None);
    }
    let count = match text("LISTEN_FDS", &vars.fds)? {
        None => 0,
        Some(count) => count
            .parse::<usize>()
            .map_err(|_| format!("LISTEN_FDS={count:?} is not a number of sockets"))?,
    };
    if count == 0 {
        return Ok(None);
    }
    if count > (RawFd::MAX - FIRST_FD) as usize {
        return Err(format!("LISTEN_FDS={count} is more fds than a process has"));
    }
    let names = text("LISTEN_FDNAMES", &vars.names)?
        .map(|names| names.split(':').map(str::to_owned).collect::<Vec<_>>());
    if let Some(names) = &names {
        if names.len() != count {
            return Err(format!(
                "LISTEN_FDNAMES={:?} names {} sockets, but LISTEN_FDS={count}",
                names.join(":"),
                names.len()
            ));
        }
    }
    Ok(Some(Passed { count, names }))
}

fn text<'a>(name: &str, value: &'a Option<OsString>) -> Result<Option<&'a str>, String> {
    value
        .as_deref()
        .map(|v| {
            v.to_str()
                .ok_or_else(|| format!("{name}={v:?} is not UTF-8"))
        })
        .transpose()
}

/// For each `listen` value, in order, the index (from fd 3 on) of the socket that
/// serves it.
fn assign(passed: &Passed, listen: &[String]) -> Result<Vec<usize>, String> {
    if passed.count != listen.len() {
        return Err(format!(
            "LISTEN_FDS={} passed {} socket{}, but there {} {} --listen value{} ({}): give \
             one --listen per socket, equal to its name (FileDescriptorName=) or in order",
            passed.count,
            passed.count,
            plural(passed.count),
            if listen.len() == 1 { "is" } else { "are" },
            listen.len(),
            plural(listen.len()),
            listen.join(", ")
        ));
    }
    let names = match &passed.names {
        Some(names) if names.iter().any(|name| listen.contains(name)) => names,
        _ => return Ok((0..passed.count).collect()),
    };
    let mut taken = vec![false; names.len()];
    let mut order = Vec::with_capacity(listen.len());
    let mut unmatched = None;
    for address in listen {
        match (0..names.len()).find(|&i| !taken[i] && names[i] == *address) {
            Some(i) => {
                taken[i] = true;
                order.push(i);
            }
            None => {
                unmatched.get_or_insert(address);
            }
        }
    }
    if let Some(address) = unmatched {
        // As many sockets as values: one went unmatched too.
        let fd = taken.iter().position(|&t| !t).expect("counts are equal");
        return Err(format!(
            "fd {} is named {:?}, which is no --listen value, and --listen {address} names \
             no socket (LISTEN_FDNAMES={:?}; --listen: {})",
            FIRST_FD + fd as RawFd,
            names[fd],
            names.join(":"),
            listen.join(", ")
        ));
    }
    Ok(order)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Takes fd `fd` as a listener, once it is shown to be a listening TCP or Unix stream
/// socket; it is made close-on-exec and non-blocking. An fd that is not one is left
/// open and untouched, as it may be something else of this process's.
pub(super) fn adopt(fd: RawFd) -> Result<Listener, String> {
    // A raw call, as nix's need an fd that is known to be open: this finds out.
    // SAFETY: F_GETFD only reads the flags of fd number `fd`; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return Err("is not open".into());
    }
    // SAFETY: the fd is open (F_GETFD just said so) and stays open while this borrow
    // lives: nothing else in this process closes the fds of the convention (only this
    // function takes them, and only once: see `take`).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let tcp = listening_stream(borrowed)?;
    nix::fcntl::fcntl(
        borrowed,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("cannot be made close-on-exec: {e}"))?;
    // SAFETY: LISTEN_PID names this process, so by the convention fd `fd` was handed to
    // it to own (an upgrade's further lanes by `FORKLOOP_UPGRADE_LANES`, under the same
    // LISTEN_PID), and it is the listening socket the convention promised. No other
    // code owns it: code finds these fds through the variables, which `take` (and
    // `upgrade::take_inherited`) removed before calling this, so nothing takes one twice.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = if tcp {
        Listener::Tcp(TcpListener::from(owned))
    } else {
        Listener::Unix(UnixListener::from(owned))
    };
    listener
        .set_nonblocking()
        .map_err(|e| format!("cannot be made non-blocking: {e}"))?;
    Ok(listener)
}

/// Whether `fd` is a listening TCP socket (`true`) or Unix stream socket (`false`); an
/// error saying what it is otherwise.
fn listening_stream(fd: BorrowedFd<'_>) -> Result<bool, String> {
    let stat = fstat(fd).map_err(|e| format!("cannot be examined: {e}"))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err("is not a socket".into());
    }
    match getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(other) => return Err(format!("is a {other:?} socket, not a stream one")),
        Err(e) => return Err(format!("is a socket of a type unknown here: {e}")),
    }
    if !getsockopt(&fd, sockopt::AcceptConn).map_err(|e| format!("cannot be examined: {e}"))? {
        return Err("is a stream socket that is not listening (no listen(2))".into());
    }
    let address: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|e| format!("cannot be examined: {e}"))?;
    match address.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Ok(true),
        Some(AddressFamily::Unix) => Ok(false),
        other => Err(format!(
            "is a listening socket of family {other:?}, neither TCP nor Unix"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    fn vars(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> Vars {
        Vars {
            pid: pid.map(Into::into),
            fds: fds.map(Into::into),
            names: names.map(Into::into),
        }
    }

    fn listen(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn sockets_for_this_process_are_counted_and_named() {
        let passed = parse(&vars(Some("42"), Some("2"), Some("web:admin")), 42).unwrap();
        let names = Some(vec!["web".to_owned(), "admin".to_owned()]);
        assert_eq!(passed, Some(Passed { count: 2, names }));
        let unnamed = parse(&vars(Some("42"), Some("1"), None), 42).unwrap();
        assert_eq!(
            unnamed,
            Some(Passed {
                count: 1,
                names: None
            })
        );
    }

    #[test]
    fn variables_for_another_process_or_no_socket_hand_nothing() {
        for v in [
            vars(None, None, None),
            vars(None, Some("2"), None),
            vars(Some("41"), Some("2"), Some("a:b")),
            vars(Some("42"), None, None),
            vars(Some("42"), Some("0"), None),
        ] {
            assert_eq!(parse(&v, 42), Ok(None), "{v:?}");
        }
    }

    #[test]
    fn malformed_variables_are_errors_that_name_them() {
        let cases = [
            (vars(Some("x"), Some("1"), None), "LISTEN_PID=\"x\""),
            (vars(Some("0"), Some("1"), None), "LISTEN_PID=\"0\""),
            (vars(Some("-42"), Some("1"), None), "LISTEN_PID=\"-42\""),
            (vars(Some("42"), Some("two"), None), "LISTEN_FDS=\"two\""),
            (vars(Some("42"), Some("-1"), None), "LISTEN_FDS=\"-1\""),
            (vars(Some("42"), Some("99999999999"), None), "more fds"),
            (vars(Some("42"), Some("2"), Some("a")), "names 1 sockets"),
            (vars(Some("42"), Some("1"), Some("a:b")), "names 2 sockets"),
        ];
        for (v, needle) in cases {
            let e = parse(&v, 42).unwrap_err();
            assert!(e.contains(needle), "{v:?}: {e}");
        }
        use std::os::unix::ffi::OsStringExt;
        let binary = Vars {
            pid: Some(OsString::from_vec(vec![0xff])),
            ..Vars::default()
        };
        assert!(parse(&binary, 42).unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn names_equal_to_listen_values_match_them_in_any_order() {
        let passed = Passed {
            count: 3,
            names: Some(vec!["web".into(), "admin".into(), "web".into()]),
        };
        let order = assign(&passed, &listen(&["admin", "web", "web"])).unwrap();
        assert_eq!(order, [1, 0, 2]);
    }

    #[test]
    fn without_names_or_with_names_that_match_nothing_sockets_go_in_order() {
        let unnamed = Passed {
            count: 2,
            names: None,
        };
        let values = listen(&["127.0.0.1:80", "unix:/run/app.sock"]);
        assert_eq!(assign(&unnamed, &values).unwrap(), [0, 1]);
        // systemd's default: every socket named after its unit.
        let unit = Passed {
            count: 2,
            names: Some(vec!["app.socket".into(), "app.socket".into()]),
        };
        assert_eq!(assign(&unit, &values).unwrap(), [0, 1]);
    }

    #[test]
    fn a_count_that_is_not_the_listen_count_is_an_error() {
        let passed = Passed {
            count: 2,
            names: None,
        };
        let e = assign(&passed, &listen(&["127.0.0.1:80"])).unwrap_err();
        assert!(
            e.contains(
                "LISTEN_FDS=2 passed 2 sockets, but there is 1 --listen value (127.0.0.1:80)"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_name_that_matches_no_listen_value_is_an_error_naming_both() {
        let passed = Passed {
            count: 2,
            names: Some(vec!["a".into(), "zzz".into()]),
        };
        let e = assign(&passed, &listen(&["a", "b"])).unwrap_err();
        assert!(e.contains("fd 4 is named \"zzz\""), "{e}");
        assert!(e.contains("--listen b names no socket"), "{e}");
        // A name used twice serves one value once.
        let twice = Passed {
            count: 2,
            names: Some(vec!["a".into(), "a".into()]),
        };
        let e = assign(&twice, &listen(&["a", "b"])).unwrap_err();
        assert!(e.contains("fd 4 is named \"a\""), "{e}");
    }

    /// Hands `fd` over to `adopt`, which owns it once it succeeds.
    fn raw(fd: impl IntoRawFd) -> RawFd {
        fd.into_raw_fd()
    }

    fn is_open(fd: &impl AsRawFd) -> bool {
        // SAFETY: F_GETFD only reads the flags of an fd the caller owns.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) != -1 }
    }

    fn flags(fd: &impl AsRawFd) -> (bool, bool) {
        let fd = fd.as_raw_fd();
        // SAFETY: F_GETFD and F_GETFL only read the flags of an fd the caller owns.
        let (fd_flags, fl) = unsafe {
            (
                libc::fcntl(fd, libc::F_GETFD),
                libc::fcntl(fd, libc::F_GETFL),
            )
        };
        (fd_flags & libc::FD_CLOEXEC != 0, fl & libc::O_NONBLOCK != 0)
    }

    #[test]
    fn listening_tcp_and_unix_sockets_are_adopted_cloexec_and_nonblocking() {
        let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        tcp.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        tcp.listen(1).unwrap();
        tcp.set_cloexec(false).unwrap();
        let Listener::Tcp(tcp) = adopt(raw(OwnedFd::from(tcp))).unwrap() else {
            panic!("not TCP")
        };
        assert_eq!(flags(&tcp), (true, true));

        let dir = std::env::temp_dir().join(format!("forkloop-activation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("adopted.sock");
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path).unwrap();
        let Listener::Unix(unix) = adopt(raw(unix)).unwrap() else {
            panic!("not Unix")
        };
        assert_eq!(flags(&unix), (true, true));
        drop(unix);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_is_not_a_listening_stream_socket_is_refused_and_left_open() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let connected = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let cases: [(OwnedFd, &str); 3] = [
            (file.into(), "is not a socket"),
            (udp.into(), "is a Datagram socket, not a stream one"),
            (connected.into(), "is a stream socket that is not listening"),
        ];
        for (fd, needle) in cases {
            let e = adopt(fd.as_raw_fd()).map(drop).unwrap_err();
            assert!(e.contains(needle), "{e}");
            assert!(is_open(&fd), "{needle}: closed");
        }
        // Far above any fd this process has: never another test's.
        assert_eq!(adopt(1 << 30).map(drop).unwrap_err(), "is not open");
    }
}
