//! The one error type of the `forkloop` crate.

use std::io;
use std::os::fd::RawFd;

use crate::Kind;

/// What went wrong, in words a user can act on; `source` is what the OS said.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend's Cargo feature is off.
    #[error("the {0} backend is not compiled in: enable the `{0}` feature of forkloop")]
    NotCompiledIn(Kind),
    /// The backend cannot exist on this OS (epoll off Linux, kqueue off the BSDs).
    #[error("the {kind} backend is not available on this system: {reason}")]
    Unsupported {
        /// The backend asked for.
        kind: Kind,
        /// Why it cannot run here.
        reason: &'static str,
    },
    /// A backend name that forkloop does not know.
    #[error("unknown backend {0:?}: expected one of poll, select, epoll, kqueue, mio, polling")]
    UnknownBackend(String),
    /// A backend list (`FORKLOOP_BACKEND`, or all of them for the default choice)
    /// names no backend that is compiled in and can run here.
    #[error("none of the backends {value:?} is usable here: {reasons}")]
    NoUsableBackend {
        /// The list.
        value: String,
        /// Why each named backend was refused.
        reasons: String,
    },
    /// The OS refused to create what the loop needs (an epoll fd, a pipe, …).
    #[error("cannot create {what}: {source}")]
    Create {
        /// What could not be created.
        what: &'static str,
        /// The OS error; `EMFILE` means the fd limit is reached.
        source: io::Error,
    },
    /// A negative fd given to [`Loop::watch_raw_fd`](crate::Loop::watch_raw_fd).
    #[error("fd {0} is negative")]
    InvalidFd(RawFd),
    /// An IO watch with no interest (use [`Loop::pause`](crate::Loop::pause) to watch
    /// for nothing for a while).
    #[error("fd {0}: a watch needs an interest (READ, WRITE or HANGUP)")]
    EmptyInterest(RawFd),
    /// An IO watch asking for [`Interest::EXCLUSIVE`](crate::Interest::EXCLUSIVE) and
    /// HANGUP together, on any backend (epoll refuses `EPOLLRDHUP` with
    /// `EPOLLEXCLUSIVE`).
    #[error(
        "fd {0}: an EXCLUSIVE watch cannot ask for HANGUP; a READ watch fires on a hangup too"
    )]
    ExclusiveHangup(RawFd),
    /// A watched fd was closed behind the loop's back (only fds watched through the
    /// `unsafe` [`Loop::watch_raw_fd`](crate::Loop::watch_raw_fd) can be).
    #[error(
        "{backend}: fd {fd} was closed while still watched; cancel its watches before closing it"
    )]
    ClosedWhileWatched {
        /// The backend's name.
        backend: &'static str,
        /// The fd.
        fd: RawFd,
    },
    /// The fd is above what the backend can hold: select's `FD_SETSIZE`.
    #[error(
        "{backend}: fd {fd} is at or above its limit of {limit} fds; use the poll or epoll backend"
    )]
    FdAboveLimit {
        /// The backend's name.
        backend: &'static str,
        /// The fd.
        fd: RawFd,
        /// The first fd the backend cannot hold.
        limit: usize,
    },
    /// The backend refused to watch an fd for another reason the OS gave.
    #[error("{backend}: cannot watch fd {fd}: {source}")]
    Watch {
        /// The backend's name.
        backend: &'static str,
        /// The fd.
        fd: RawFd,
        /// Why.
        source: io::Error,
    },
    /// A handle whose watch is gone: cancelled, removed, or a one-shot that fired.
    #[error("the watch is no longer active")]
    WatchGone,
    /// A handle made by another loop: each loop acts only on its own watches.
    #[error("the watch belongs to another loop")]
    ForeignWatch,
    /// Waiting for events failed, e.g. an fd was closed while still watched.
    #[error("{backend}: wait failed: {source}")]
    Wait {
        /// The backend's name.
        backend: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Rebuilding the backend after fork failed.
    #[error("{backend}: post_fork failed: {source}")]
    PostFork {
        /// The backend's name.
        backend: &'static str,
        /// Why.
        source: io::Error,
    },
    /// A signal that no loop can watch.
    #[error("signal {signal}: {refusal}")]
    SignalRefused {
        /// The signal number.
        signal: libc::c_int,
        /// Why.
        refusal: SignalRefusal,
    },
    /// The OS refused to install forkloop's handler for a signal (sigaction failed).
    #[error("signal {signal}: cannot install the handler: {source}")]
    SignalAction {
        /// The signal number.
        signal: libc::c_int,
        /// What sigaction said.
        source: io::Error,
    },
    /// Every wake-up slot of the signal driver is taken: this many loops of the process
    /// watch signals already.
    #[error("{0} loops of this process already watch signals, the most there can be")]
    TooManySignalLoops(usize),
    /// `watch_process` for a pid that is not a child of this process.
    #[error(
        "pid {0} is not a child of this process, or it exited and was reaped already (by \
         other code, or by the kernel while SIGCHLD is ignored) (waitid: ECHILD)"
    )]
    NotAChild(libc::pid_t),
    /// `every` with a zero interval, which would fire at every iteration forever.
    #[error("a repeating timer needs a non-zero interval")]
    ZeroInterval,
    /// A watched child was reaped by other code of this process (`std::process::Child::wait`,
    /// a `waitpid(-1)`) before the loop could: its exit status is lost and its watch has
    /// ended. The callback of [`Loop::watch_process`](crate::Loop::watch_process) gets it.
    #[error(
        "child {0} was reaped elsewhere in this process (wait: ECHILD); its exit status is lost"
    )]
    ReapedElsewhere(libc::pid_t),
    /// fork(2) failed.
    #[error("fork failed: {0}")]
    Fork(io::Error),
    /// `Loop::fork` with [`ForkOptions::single_threaded`](crate::ForkOptions::single_threaded)
    /// in a process with other threads (or whose thread count cannot be read).
    #[error("Loop::fork refused (single_threaded): {}", match threads {
        Some(n) => format!("the process has {n} threads"),
        None => "the process's thread count cannot be read here".to_owned(),
    })]
    NotSingleThreaded {
        /// The process's threads, if known.
        threads: Option<usize>,
    },
    /// `pthread_atfork` could not register forkloop's fork handlers (out of memory);
    /// without them no fork could be detected, so no loop is built.
    #[error("cannot register the fork handlers (pthread_atfork): {0}")]
    AtFork(io::Error),
    /// The process-global loop was asked for while it is already lent out (a nested
    /// `with_global`) or from a thread other than the one that owns it.
    #[error("the process-global loop {0}")]
    GlobalUnavailable(&'static str),
}

/// Why a signal cannot be watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignalRefusal {
    /// No such signal on this system.
    Unknown,
    /// SIGKILL and SIGSTOP cannot be caught.
    Uncatchable,
    /// SIGSEGV, SIGBUS, SIGFPE and SIGILL are delivered to the faulting thread, whose
    /// handler returns to the faulting instruction: a callback would never run.
    Fault,
    /// Reserved by the C library for its threads (glibc's 32 and 33).
    Reserved,
}

impl std::fmt::Display for SignalRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignalRefusal::Unknown => "no such signal",
            SignalRefusal::Uncatchable => "it cannot be caught",
            SignalRefusal::Fault => {
                "a fault is delivered to the faulting thread, and its handler returns to the \
                 faulting instruction: a callback in dispatch would never run"
            }
            SignalRefusal::Reserved => "reserved by the C library for its threads",
        })
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
