//! Binary upgrade (`USR2`): the master execs its binary again — which may now be a new
//! build — with the same arguments, and hands it the listening sockets through the
//! exec the way systemd's socket activation does (`LISTEN_FDS`, `LISTEN_PID`), so that
//! the new master serves the very sockets the old one does and no connection is
//! refused or reset. The new master says when all its workers are ready by writing one
//! byte to a socket it inherits too (named by `FORKLOOP_UPGRADE_FD`); until then the
//! old master serves on, and if the new one exits or is late, it is the old one that
//! stays.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::UnixStream;

use super::activation::{adopt, FIRST_FD};
use super::{Listener, SupervisorError};
use crate::{ForkOptions, Loop};

/// The environment variable naming the fd on which a new master reports readiness to
/// the master that exec'd it.
pub(crate) const UPGRADE_FD: &str = "FORKLOOP_UPGRADE_FD";
/// The environment variable saying, per socket passed (in order), whether it is the
/// masters' own (`y`: bound by the first master of the chain, so filtered and
/// unlinked at the last one's shutdown) or someone else's (`n`: systemd's).
pub(crate) const UPGRADE_OWN: &str = "FORKLOOP_UPGRADE_OWN";
/// The environment variable saying, per `listen` value (in order, `,`-separated), how
/// many more lanes of it (`--reuse-port`) are passed after the readiness socket.
pub(crate) const UPGRADE_LANES: &str = "FORKLOOP_UPGRADE_LANES";
/// The byte a new master writes there once every worker is ready.
pub(crate) const UPGRADED: u8 = b'R';
/// The variables of the hand-off: the old master's own values are not passed on.
/// `WATCHDOG_PID` names the old master: the new one, which pings once it takes over,
/// gets none (so it pings, as systemd then expects of the main process).
const HAND_OFF: [&str; 7] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    UPGRADE_FD,
    UPGRADE_OWN,
    UPGRADE_LANES,
    "WATCHDOG_PID",
];

/// The binary and the arguments a master was started with, taken at its start: by the
/// time of an upgrade the file at that path may hold another build (which is the point),
/// while `/proc/self/exe` still names the old one.
pub(crate) struct Exe {
    path: CString,
    args: Vec<CString>,
}

impl Exe {
    /// This process's binary and arguments: the binary by the path it was started
    /// with (`argv[0]`, made absolute from the directory it started in, or looked up
    /// in `PATH` as the shell did), not resolved: a deploy that switches a symlink
    /// (`current -> releases/v2`) is followed at the upgrade. `/proc/self/exe`, which
    /// names the file it runs, only when `argv[0]` leads nowhere.
    pub(crate) fn current() -> io::Result<Exe> {
        let args: Vec<OsString> = std::env::args_os().collect();
        let given = args.first().map(std::path::PathBuf::from);
        let path = given
            .and_then(|given| started_from(&given))
            .map_or_else(std::env::current_exe, Ok)?;
        // argv[0] stays as it was given; the path is what is exec'd.
        let args = args.into_iter().map(c_string).collect::<io::Result<_>>()?;
        Ok(Exe {
            path: c_string(path.into_os_string())?,
            args,
        })
    }

    /// The binary that will be exec'd.
    pub(crate) fn path(&self) -> &std::path::Path {
        std::path::Path::new(OsStr::from_bytes(self.path.as_bytes()))
    }
}

/// The file `argv[0]` named when this process started: a path (absolute, or from the
/// start directory), or a name the shell found in `PATH`.
fn started_from(given: &std::path::Path) -> Option<std::path::PathBuf> {
    let executable = |path: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if given.components().count() > 1 || given.is_absolute() {
        let path = std::env::current_dir().ok()?.join(given);
        return executable(&path).then_some(path);
    }
    let search = std::env::var_os("PATH")?;
    std::env::split_paths(&search)
        .map(|dir| dir.join(given))
        .find(|path| path.is_absolute() && executable(path))
}

fn c_string(value: OsString) -> io::Result<CString> {
    CString::new(value.into_vec()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in the binary's path, an argument or the environment",
        )
    })
}

/// A new master on its way: its pid, and the master's end of the socket on which it
/// reports readiness (readable with [`UPGRADED`], or at EOF if it failed).
pub(crate) struct Successor {
    pub pid: libc::pid_t,
    pub ready: UnixStream,
}

/// One `listen` value's sockets, as an upgrade passes them: its lanes (lane 0 first;
/// one socket without `--reuse-port`), and whether they are the masters' own.
pub(crate) struct Passed<'a> {
    pub lanes: Vec<BorrowedFd<'a>>,
    pub own: bool,
}

/// Forks and execs `exe` with the environment of this process, lane 0 of each of the
/// `listeners` placed at fds 3, 4, … with `LISTEN_FDS` and `LISTEN_PID` naming the new
/// process (no names: the new master takes them in the order of its `listen` values,
/// which are this one's), whether each is the masters' `own` in
/// `FORKLOOP_UPGRADE_OWN`, its end of the readiness socket right after them, named by
/// `FORKLOOP_UPGRADE_FD`, and then the other lanes, counted per value in
/// `FORKLOOP_UPGRADE_LANES`. Everything is prepared before the fork: the child only
/// moves fds, writes its pid into the prepared environment and execs
/// (async-signal-safe calls only).
pub(crate) fn spawn<D>(
    lp: &mut Loop<D>,
    exe: &Exe,
    listeners: &[Passed<'_>],
) -> io::Result<Successor> {
    let (ready, theirs) = UnixStream::pair()?;
    let count = listeners.len();
    let report_fd = FIRST_FD + count as RawFd;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(name, _)| !HAND_OFF.iter().any(|h| name == h))
        .map(|(name, value)| {
            let mut pair = name.into_vec();
            pair.push(b'=');
            pair.extend(value.into_vec());
            c_string(OsString::from_vec(pair))
        })
        .collect::<io::Result<_>>()?;
    env.push(c_string(format!("LISTEN_FDS={count}").into())?);
    let own: String = listeners
        .iter()
        .map(|passed| if passed.own { 'y' } else { 'n' })
        .collect();
    env.push(c_string(format!("{UPGRADE_OWN}={own}").into())?);
    env.push(c_string(format!("{UPGRADE_FD}={report_fd}").into())?);
    let lanes: Vec<String> = listeners
        .iter()
        .map(|passed| (passed.lanes.len().saturating_sub(1)).to_string())
        .collect();
    env.push(c_string(
        format!("{UPGRADE_LANES}={}", lanes.join(",")).into(),
    )?);
    // The child writes its pid's digits here (a pid has at most 10).
    let mut listen_pid = *b"LISTEN_PID=\0\0\0\0\0\0\0\0\0\0\0\0";
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|v| v.as_ptr()).collect();
    let pid_at = envp.len();
    envp.push(std::ptr::null());
    envp.push(std::ptr::null());
    let argv: Vec<*const libc::c_char> = exe
        .args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // Where the fds go: lane 0 of each listener, the readiness socket, the other lanes.
    let mut from: Vec<RawFd> = listeners.iter().map(|p| p.lanes[0].as_raw_fd()).collect();
    from.push(theirs.as_raw_fd());
    from.extend(
        listeners
            .iter()
            .flat_map(|p| &p.lanes[1..])
            .map(AsRawFd::as_raw_fd),
    );
    let mut moved = vec![-1; from.len()];
    let pid = lp
        .fork(ForkOptions::new(), || {
            // SAFETY (the whole block): only async-signal-safe calls (fcntl, dup2, getpid,
            // sigprocmask, signal, execve, nanosleep, write) and writes into memory prepared
            // before the fork, as the child of a process that may have other threads must.
            unsafe {
                // First above every target, so that placing one never overwrites another
                // that is still to be moved.
                let above = FIRST_FD + from.len() as RawFd;
                for (fd, slot) in from.iter().zip(moved.iter_mut()) {
                    *slot = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above);
                    if *slot < 0 {
                        return failed(b"forkloop upgrade: fcntl(F_DUPFD) failed\n");
                    }
                }
                // dup2 clears FD_CLOEXEC on the copy: exactly these survive the exec.
                for (target, fd) in (FIRST_FD..).zip(&moved) {
                    if libc::dup2(*fd, target) < 0 {
                        return failed(b"forkloop upgrade: dup2 failed\n");
                    }
                }
                write_decimal(&mut listen_pid[11..], libc::getpid());
                envp[pid_at] = listen_pid.as_ptr().cast();
                // The new process starts as a fresh one would: no signal blocked, SIGPIPE
                // at its default (Rust's runtime ignores it, and an exec keeps that).
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                // A binary still open for writing somewhere (a deploy finishing its
                // copy, a fork in a process that just wrote it) is ETXTBSY for a moment.
                for _ in 0..50 {
                    libc::execve(exe.path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                    if nix::errno::Errno::last_raw() != libc::ETXTBSY {
                        break;
                    }
                    let pause = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 10_000_000,
                    };
                    libc::nanosleep(&pause, std::ptr::null_mut());
                }
                // The errno, as digits: no formatting machinery here.
                let mut errno = [0u8; 11];
                write_decimal(&mut errno, nix::errno::Errno::last_raw());
                let len = errno.iter().position(|&b| b == 0).unwrap_or(errno.len());
                failed(b"forkloop upgrade: execve failed, errno ");
                failed(&errno[..len]);
                failed(b"\n")
            }
        })
        .map_err(io::Error::other)?;
    drop(theirs);
    ready.set_nonblocking(true)?;
    Ok(Successor { pid, ready })
}

/// Says what failed on stderr (one `write`), and gives the child's exit status.
fn failed(message: &[u8]) -> i32 {
    // SAFETY: write(2) on fd 2 from a slice that lives across the call.
    unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
    127
}

/// Writes `value`'s decimal digits at the start of `out`, NUL-terminated (`out` has
/// room for any pid: 10 digits and the NUL); no allocation, for a forked child.
fn write_decimal(out: &mut [u8], value: libc::pid_t) {
    let mut digits = [0u8; 10];
    let (mut n, mut len) = (value.unsigned_abs(), 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for (i, d) in digits[..len].iter().rev().enumerate() {
        out[i] = *d;
    }
    out[len] = 0;
}

/// In a master exec'd by an upgrade: the socket on which to report readiness to the
/// old master and the lanes beyond the activated sockets, taken from the environment
/// (and removed from it, so that nothing this process starts inherits the names).
/// `None` when this master was not started by an upgrade: not `activated` (no sockets
/// were handed to this very process, so the variables are another's), or the fd named
/// is not a socket. A lane that is not a listening socket is an error: serving without
/// it would leave its connections queued for no one.
///
/// Must run before any thread reads the environment, like the socket activation it
/// belongs to: it is called at the start of [`Supervisor::run`](super::Supervisor::run).
pub(crate) fn take_inherited(
    activated: Option<usize>,
) -> Result<Option<Inherited>, SupervisorError> {
    let own = std::env::var_os(UPGRADE_OWN);
    let lanes = std::env::var_os(UPGRADE_LANES);
    let Some(value) = std::env::var_os(UPGRADE_FD) else {
        return Ok(None);
    };
    // Sound only while no other thread reads the environment (see above): the master
    // starts from a plain `main`, before threads of its own.
    std::env::remove_var(UPGRADE_FD);
    std::env::remove_var(UPGRADE_OWN);
    std::env::remove_var(UPGRADE_LANES);
    let Some(count) = activated else {
        return Ok(None);
    };
    // Right after the activated sockets, where `spawn` puts it.
    let Some(expected) = RawFd::try_from(count).ok().map(|n| FIRST_FD + n) else {
        return Ok(None);
    };
    let Some(fd) = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|&fd| fd == expected)
    else {
        return Ok(None);
    };
    // SAFETY: `stat` is plain old data (integers), for which all zeroes is a value.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only reads the fd's status into `stat`, which lives across the
    // call; an fd that is not open fails (EBADF).
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        log::warn!("{UPGRADE_FD}={fd} is not an open socket; ignored");
        return Ok(None);
    }
    // SAFETY: the fd is open, a socket, and was passed to this process for it alone
    // (LISTEN_PID named this process); nothing else in it owns that number.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let socket = UnixStream::from(socket);
    let _ = nix::fcntl::fcntl(
        &socket,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    // Anything but `y` is someone else's: never filter or unlink a socket on a guess.
    let own = own
        .map(|own| own.as_encoded_bytes().iter().map(|&b| b == b'y').collect())
        .unwrap_or_default();
    let lanes = take_lanes(lanes, count, fd + 1)
        .map_err(|e| SupervisorError::Config(format!("upgrade: {UPGRADE_LANES}: {e}")))?;
    Ok(Some(Inherited {
        report: socket,
        own,
        lanes,
    }))
}

/// The lanes beyond lane 0 of each of the `count` values, at fds `first`, … in order,
/// as `counts` (`FORKLOOP_UPGRADE_LANES`) says; none for a master that passes none.
fn take_lanes(
    counts: Option<OsString>,
    count: usize,
    first: RawFd,
) -> Result<Vec<Vec<Listener>>, String> {
    let Some(counts) = counts else {
        return Ok((0..count).map(|_| Vec::new()).collect());
    };
    let counts = counts.to_str().ok_or("not UTF-8")?;
    let counts: Vec<usize> = counts
        .split(',')
        .map(|n| {
            n.parse()
                .map_err(|_| format!("{counts:?} is not a list of numbers"))
        })
        .collect::<Result<_, _>>()?;
    if counts.len() != count {
        return Err(format!("{} counts for {count} sockets", counts.len()));
    }
    let mut fd = first;
    let mut lanes = Vec::with_capacity(count);
    for n in counts {
        let mut extra = Vec::new();
        for _ in 0..n {
            extra.push(adopt(fd).map_err(|e| format!("fd {fd} {e}"))?);
            fd = fd.checked_add(1).ok_or("more fds than a process has")?;
        }
        lanes.push(extra);
    }
    Ok(lanes)
}

/// What a master started by an upgrade got from the old one, beside the sockets.
pub(crate) struct Inherited {
    /// Where to say that every worker is ready.
    pub report: UnixStream,
    /// Per socket, in order: whether it is the masters' own.
    pub own: Vec<bool>,
    /// Per socket, in order: its lanes after lane 0 (`--reuse-port`).
    pub lanes: Vec<Vec<Listener>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_written_as_decimal_digits() {
        for (pid, text) in [
            (0, "0"),
            (7, "7"),
            (4_194_304, "4194304"),
            (i32::MAX, "2147483647"),
        ] {
            let mut out = [0xffu8; 11];
            write_decimal(&mut out, pid);
            let end = out.iter().position(|&b| b == 0).unwrap();
            assert_eq!(&out[..end], text.as_bytes());
        }
    }
}
