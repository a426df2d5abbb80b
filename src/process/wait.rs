//! The OS calls that wait for children: pidfds on Linux (`pidfd_open`,
//! `waitid(P_PIDFD)`), and `waitpid` everywhere.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// What `pidfd_open` made of a pid.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(super) enum Open {
    /// A pidfd for a child of this process.
    Child(OwnedFd),
    /// No such process, or not a child of this one.
    NotAChild,
    /// No pidfd here: the waitpid fallback.
    Unavailable,
}

#[cfg(target_os = "linux")]
pub(super) mod pidfd {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::process::ExitStatus;

    use super::{exit_status, Open};

    /// `P_PIDFD` of <linux/wait.h> (Linux 5.4), which the libc crate does not define.
    const P_PIDFD: libc::idtype_t = 3;

    pub(in crate::process) fn open(pid: libc::pid_t) -> Open {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1; it
        // touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // No such process; or a thread, not a process.
                Some(libc::ESRCH | libc::EINVAL) => Open::NotAChild,
                // ENOSYS before 5.3, EPERM from a seccomp filter, EMFILE, ….
                _ => {
                    log::debug!("pidfd_open({pid}): {e}; watching it with waitpid");
                    Open::Unavailable
                }
            };
        }
        // SAFETY: pidfd_open just returned this fd (close-on-exec, as pidfd_open always
        // makes them) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        match wait(&fd, false) {
            Ok(_) => Open::Child(fd),
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Open::NotAChild,
            Err(e) => {
                // EINVAL: Linux 5.3, which has pidfd_open but not waitid(P_PIDFD).
                log::debug!("waitid(P_PIDFD) for {pid}: {e}; watching it with waitpid");
                Open::Unavailable
            }
        }
    }

    /// The exit status of the pidfd's process if it has exited (reaping it if `reap`),
    /// `None` while it runs. ECHILD: it is not, or no longer, a child of this process.
    pub(in crate::process) fn wait(fd: &OwnedFd, reap: bool) -> io::Result<Option<ExitStatus>> {
        let keep = if reap { 0 } else { libc::WNOWAIT };
        let id = fd.as_raw_fd() as libc::id_t;
        waitid(P_PIDFD, id, libc::WEXITED | libc::WNOHANG | keep)
    }

    /// The pid of an exited child not yet reaped, if any; reaps nothing.
    pub(in crate::process) fn peek_any() -> Option<libc::pid_t> {
        let mut info = siginfo();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        loop {
            // SAFETY: info is a live siginfo_t; WNOWAIT leaves the child unreaped.
            if unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) } == 0 {
                // SAFETY: waitid filled info; si_pid is 0 if no child has exited.
                let pid = unsafe { info.si_pid() };
                return (pid != 0).then_some(pid);
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return None; // ECHILD: no children
            }
        }
    }

    /// Whether the kernel reaps children itself (SIGCHLD ignored, or SA_NOCLDWAIT).
    pub(in crate::process) fn sigchld_ignored() -> bool {
        // SAFETY: sigaction is plain old data; all-zero is valid.
        let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only reads the current one into `current`.
        let rc = unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut current) };
        rc == 0
            && (current.sa_sigaction == libc::SIG_IGN || current.sa_flags & libc::SA_NOCLDWAIT != 0)
    }

    fn siginfo() -> libc::siginfo_t {
        // SAFETY: siginfo_t is plain old data; all-zero is valid.
        unsafe { std::mem::zeroed() }
    }

    fn waitid(
        idtype: libc::idtype_t,
        id: libc::id_t,
        flags: libc::c_int,
    ) -> io::Result<Option<ExitStatus>> {
        let mut info = siginfo();
        loop {
            // SAFETY: info is a live siginfo_t for waitid to fill.
            if unsafe { libc::waitid(idtype, id, &mut info, flags) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // SAFETY: waitid filled info; si_pid is 0 while the child runs (WNOHANG).
        if unsafe { info.si_pid() } == 0 {
            return Ok(None);
        }
        // SAFETY: as above; for a CLD_* code si_status is the exit code or the signal.
        let status = unsafe { info.si_status() };
        Ok(Some(exit_status(info.si_code, status)))
    }
}

/// No pidfds off Linux: every watch takes the waitpid way.
#[cfg(not(target_os = "linux"))]
pub(super) mod pidfd {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::process::ExitStatus;

    use super::Open;

    pub(in crate::process) fn open(_pid: libc::pid_t) -> Open {
        Open::Unavailable
    }

    pub(in crate::process) fn wait(_fd: &OwnedFd, _reap: bool) -> io::Result<Option<ExitStatus>> {
        unreachable!("no pidfd is ever opened off Linux")
    }

    pub(in crate::process) fn peek_any() -> Option<libc::pid_t> {
        None
    }

    pub(in crate::process) fn sigchld_ignored() -> bool {
        false
    }
}

/// The wait status `waitpid` would have given for what `waitid` said.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn exit_status(code: libc::c_int, status: libc::c_int) -> ExitStatus {
    ExitStatus::from_raw(match code {
        libc::CLD_KILLED => status & 0x7f,
        libc::CLD_DUMPED => (status & 0x7f) | 0x80,
        _ => (status & 0xff) << 8, // CLD_EXITED, the only other one WEXITED reports
    })
}

pub(super) enum Waited {
    Exited(libc::pid_t, ExitStatus),
    Running,
    /// ECHILD: no such child (any more).
    NoChild,
}

pub(super) fn waitpid(pid: libc::pid_t) -> Waited {
    let mut status = 0;
    loop {
        // SAFETY: status is a live c_int; WNOHANG never blocks.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => return Waited::Running,
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            -1 => return Waited::NoChild,
            reaped => return Waited::Exited(reaped, ExitStatus::from_raw(status)),
        }
    }
}

/// Whether `pid` is a child of this process, exited or not; reaps nothing.
pub(super) fn is_child(pid: libc::pid_t) -> bool {
    // SAFETY: siginfo_t is plain old data; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: info is a live siginfo_t; WNOWAIT leaves the child's status in place.
    let res = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
    res == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD)
}
