//! The kernel-facing contract every forkloop backend implements.
//!
//! A backend only registers file descriptors with an [`Interest`], waits for readiness
//! and rebuilds its kernel object after `fork()`. Everything else — watcher tables,
//! timers, signals, child processes, fork policy — lives once in the `forkloop` crate.
//! Readiness is level-triggered: an fd that stays ready is reported by every wait.
//! [`Interest::EXCLUSIVE`] is a hint a backend may ignore: exclusive wake-ups, where
//! the OS has them (epoll's `EPOLLEXCLUSIVE`).

mod registrations;
pub use registrations::{Registration, Registrations};

use std::io;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::RawFd;
use std::time::Duration;

/// Turns a libc return value of `-1` into the `errno` error, in one place, so no call
/// site handles errno by hand: wrap the libc call's result in `cvt(…)?`.
pub fn cvt<T: Copy + PartialEq + From<i8>>(res: T) -> io::Result<T> {
    if res == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(res)
    }
}

macro_rules! bit_set {
    ($(#[$meta:meta])* $name:ident { $($(#[$bmeta:meta])* $bit:ident = $value:expr,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(u8);

        impl $name {
            $($(#[$bmeta])* pub const $bit: $name = $name($value);)*
            /// The empty set.
            pub const NONE: $name = $name(0);

            /// Whether every bit of `other` is set in `self`.
            pub const fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// Whether `self` and `other` share a bit.
            pub const fn intersects(self, other: $name) -> bool {
                self.0 & other.0 != 0
            }

            /// Whether no bit is set.
            pub const fn is_empty(self) -> bool {
                self.0 == 0
            }
        }

        impl BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let names: Vec<&str> = [$((stringify!($bit), $name::$bit)),*]
                    .iter()
                    .filter(|(_, bit)| self.contains(*bit))
                    .map(|(name, _)| *name)
                    .collect();
                write!(f, "{}({})", stringify!($name), names.join("|"))
            }
        }
    };
}

bit_set! {
    /// What a registration asks the kernel to report.
    Interest {
        /// Data to read, end of file, or a pending error.
        READ = 1,
        /// Room to write.
        WRITE = 2,
        /// The peer hung up (reported even without READ where the backend can).
        HANGUP = 4,
        /// Not a readiness to report but how to be woken: when several processes (or
        /// loops) wait on one file, such as a listening socket their workers share,
        /// a new readiness wakes one of the waiters that ask for this, not all of them
        /// (the thundering herd). Linux epoll's `EPOLLEXCLUSIVE` (Linux 4.5); every
        /// other backend ignores the bit, and reports as without it. The kernel walks
        /// its queue of waiters from the front and stops at the first exclusive one it
        /// wakes that was blocked: a waiter ahead of that one whose wait is not
        /// blocked right now has the readiness reported at its next wait, and one
        /// behind it has not (unless its registration was left on its ready list,
        /// because the fd was still ready when it was last reported). So a woken
        /// waiter may find nothing left (a non-blocking `accept` says `EWOULDBLOCK`).
        ///
        /// It rides on the interest so that it travels wherever the interest does:
        /// through [`Backend::modify`] and [`Backend::post_fork`], and through backends
        /// written before it existed, which ignore a bit they do not test. It needs a
        /// readiness beside it (alone it is an empty interest) and cannot go with
        /// HANGUP: epoll refuses `EPOLLRDHUP` with it, and a read watch fires on a
        /// hangup anyway.
        EXCLUSIVE = 8,
    }
}

impl Interest {
    /// The readiness this interest asks to be told of: `self` without
    /// [`Interest::EXCLUSIVE`].
    pub const fn events(self) -> Interest {
        Interest(self.0 & !Interest::EXCLUSIVE.0)
    }
}

bit_set! {
    /// What the kernel reported for one fd.
    Readiness {
        /// Readable (POLLIN, EPOLLIN, EVFILT_READ).
        READABLE = 1,
        /// Writable (POLLOUT, EPOLLOUT, EVFILT_WRITE).
        WRITABLE = 2,
        /// The peer hung up (POLLHUP, EPOLLRDHUP, EV_EOF).
        HANGUP = 4,
        /// An error is pending on the fd (POLLERR, EPOLLERR, EV_ERROR).
        ERROR = 8,
    }
}

impl Readiness {
    /// Readiness from the four flags a kernel or crate reports.
    pub fn from_flags(readable: bool, writable: bool, hangup: bool, error: bool) -> Readiness {
        let bit = |on: bool, bit: Readiness| if on { bit } else { Readiness::NONE };
        bit(readable, Readiness::READABLE)
            | bit(writable, Readiness::WRITABLE)
            | bit(hangup, Readiness::HANGUP)
            | bit(error, Readiness::ERROR)
    }
}

/// One readiness report from [`Backend::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The registered fd.
    pub fd: RawFd,
    /// What it is ready for.
    pub readiness: Readiness,
}

/// The small kernel-facing part of an event loop.
///
/// The loop keeps the authoritative table of registrations; a backend may keep its own
/// copy when its syscall needs one (poll, select), and gets the loop's table back in
/// [`Backend::post_fork`].
pub trait Backend {
    /// The backend's short name: `"epoll"`, `"poll"`, ….
    fn name(&self) -> &'static str;

    /// Starts watching `fd`. `interest` may be empty only for a hangup-only watch. A
    /// backend that has no exclusive wake-ups ignores [`Interest::EXCLUSIVE`].
    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()>;

    /// Changes the interest of an fd already registered, [`Interest::EXCLUSIVE`]
    /// included (epoll can set that only when it adds an fd, so it deletes the fd and
    /// adds it again).
    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()>;

    /// Stops watching `fd`.
    fn deregister(&mut self, fd: RawFd) -> io::Result<()>;

    /// Waits up to `timeout` (forever if `None`) and appends readiness to `events`.
    ///
    /// A wait interrupted by a signal returns `Ok` with no events. Timeouts are rounded
    /// up to the syscall's granularity, so a wait never returns before its deadline just
    /// because the kernel's unit is coarser.
    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()>;

    /// Rebuilds the kernel state in a forked child (or again in the same process) from
    /// the loop's registrations, without touching the kernel object inherited from the
    /// parent in any way that would change the parent's view of it: an inherited object
    /// is let go of with [`Backend::abandon_inherited`]; one this process created (when
    /// `post_fork` runs again in the same process, see [`same_process`]) is closed.
    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (RawFd, Interest)>,
    ) -> io::Result<()>;

    /// The fd of the backend's kernel object, if it has one (epoll, kqueue), and `None`
    /// once [`Backend::abandon_inherited`] let it go.
    fn kernel_fd(&self) -> Option<RawFd> {
        None
    }

    /// In a forked child: let go of the kernel object inherited from the parent without
    /// changing the parent's view of it and without closing a number that may now name
    /// another file. Must be async-signal-safe (close(2) at most), because a `Loop::fork`
    /// child calls it between fork and the user's closure.
    ///
    /// Afterwards the backend has no kernel object: [`Backend::kernel_fd`] is `None`, the
    /// other methods fail (see [`abandoned`]) until [`Backend::post_fork`] builds a new
    /// one, and nothing closes the old fd again. Calling it twice is harmless. Each
    /// backend's `post_fork` lets go of an inherited object through this method, so there
    /// is one rule per backend. The default does nothing, for backends without a kernel
    /// object (poll, select).
    fn abandon_inherited(&mut self) {}

    /// Stops watching `fd`, which the caller closes right after, in this process (the
    /// loop's source is dropped). A backend whose kernel drops a registration when its
    /// file closes may then skip the syscall and only forget the fd, if it copes with
    /// the registration living on while another fd keeps the file open (a dup, a forked
    /// child's copy): its events, then stale, must never reach the number's next fd
    /// (epoll, through [`Registrations`]' tags), and registering the same file under the
    /// same number again must still work. The default deregisters.
    fn deregister_closing(&mut self, fd: RawFd) -> io::Result<()> {
        self.deregister(fd)
    }
}

/// A timeout in whole milliseconds for poll(2)/epoll_wait(2), rounded up so the wait
/// never ends before the deadline (which would make the loop spin), clamped to `c_int`.
/// `None` becomes `-1` (wait forever).
pub fn timeout_ms(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(t) => {
            let ms = t.as_nanos().div_ceil(1_000_000);
            ms.min(libc::c_int::MAX as u128) as libc::c_int
        }
    }
}

/// An error for a negative fd: what poll and select check when they register one (a
/// negative fd in an `fd_set` is memory corruption). Whether the fd is open they leave
/// to the kernel, which says so at the wait (poll's `POLLNVAL`, select's `EBADF`: see
/// [`closed_while_registered`]), rather than pay an `fcntl` per registration for what
/// an owned fd (`AsFd`) guarantees already.
pub fn check_fd_number(fd: RawFd) -> io::Result<()> {
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} is negative"),
        ));
    }
    Ok(())
}

/// An error for an fd that is negative or not open (one `fcntl`): for an fd nothing
/// guarantees open, such as a raw fd handed to the loop, and to find which registered
/// fd select's `EBADF` is about.
pub fn check_fd_open(fd: RawFd) -> io::Result<()> {
    check_fd_number(fd)?;
    // SAFETY: F_GETFD only reads the flags of whatever `fd` names.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("fd {fd} is not open: {e}")))
}

/// Why a backend refused an fd, in a form the loop can match on: it travels inside the
/// `io::Error` the backend returns (see [`refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// A registered fd was closed behind the loop's back (poll's `POLLNVAL`, epoll's
    /// `ENOENT` on a number that now names another file).
    ClosedWhileRegistered,
    /// The fd is above what the backend can hold (select's `FD_SETSIZE`).
    AboveLimit {
        /// The first fd the backend cannot hold.
        limit: usize,
    },
}

#[derive(Debug)]
struct Refused {
    backend: String,
    fd: RawFd,
    refusal: Refusal,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Refused { backend, fd, .. } = self;
        match self.refusal {
            Refusal::ClosedWhileRegistered => write!(
                f,
                "{backend}: fd {fd} was closed while still watched; cancel its watches before closing it"
            ),
            Refusal::AboveLimit { limit } => write!(
                f,
                "{backend}: fd {fd} is at or above the backend's limit of {limit} fds; use the poll or epoll backend"
            ),
        }
    }
}

impl std::error::Error for Refused {}

/// An `io::Error` that carries `refusal` for the loop to find with [`refusal`].
pub fn refused(backend: &str, fd: RawFd, refusal: Refusal) -> io::Error {
    let kind = match refusal {
        Refusal::ClosedWhileRegistered => io::ErrorKind::Other,
        Refusal::AboveLimit { .. } => io::ErrorKind::InvalidInput,
    };
    let backend = backend.to_owned();
    io::Error::new(
        kind,
        Refused {
            backend,
            fd,
            refusal,
        },
    )
}

/// The fd and refusal an error from [`refused`] carries, if it is one.
pub fn refusal(error: &io::Error) -> Option<(RawFd, Refusal)> {
    let refused = error.get_ref()?.downcast_ref::<Refused>()?;
    Some((refused.fd, refused.refusal))
}

/// The error for a registered fd that was closed behind the loop's back.
pub fn closed_while_registered(backend: &str, fd: RawFd) -> io::Error {
    refused(backend, fd, Refusal::ClosedWhileRegistered)
}

/// A map keyed by fd, stored as a `Vec` indexed by the fd number: fds are small dense
/// integers (the kernel hands out the lowest free one), so this is libev's `anfds` —
/// no hashing, no rehashing, one bounds check. Negative fds are never present.
#[derive(Debug, Clone)]
pub struct FdMap<T> {
    slots: Vec<Option<T>>,
}

impl<T> Default for FdMap<T> {
    fn default() -> FdMap<T> {
        FdMap { slots: Vec::new() }
    }
}

impl<T> FdMap<T> {
    /// An empty map.
    pub fn new() -> FdMap<T> {
        FdMap::default()
    }

    /// The value for `fd`, if any.
    pub fn get(&self, fd: RawFd) -> Option<&T> {
        self.slots.get(usize::try_from(fd).ok()?)?.as_ref()
    }

    /// The value for `fd`, if any, mutably.
    pub fn get_mut(&mut self, fd: RawFd) -> Option<&mut T> {
        self.slots.get_mut(usize::try_from(fd).ok()?)?.as_mut()
    }

    /// Whether `fd` has a value.
    pub fn contains(&self, fd: RawFd) -> bool {
        self.get(fd).is_some()
    }

    /// Sets the value for `fd` (which must not be negative: it names an fd the kernel
    /// accepted); returns the previous one.
    pub fn insert(&mut self, fd: RawFd, value: T) -> Option<T> {
        let index = usize::try_from(fd).expect("a registered fd is not negative");
        if index >= self.slots.len() {
            self.slots.resize_with(index + 1, || None);
        }
        self.slots[index].replace(value)
    }

    /// Takes the value for `fd` out.
    pub fn remove(&mut self, fd: RawFd) -> Option<T> {
        self.slots.get_mut(usize::try_from(fd).ok()?)?.take()
    }

    /// Every fd with a value, in fd order.
    pub fn iter(&self) -> impl Iterator<Item = (RawFd, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(fd, v)| Some((fd as RawFd, v.as_ref()?)))
    }
}

/// The error for using a backend whose kernel object [`Backend::abandon_inherited`] let
/// go of (until [`Backend::post_fork`] builds a new one).
pub fn abandoned(backend: &str) -> io::Error {
    io::Error::other(format!(
        "{backend}: the kernel object inherited across fork was let go of; post_fork builds a new one"
    ))
}

/// The error for modifying or deregistering an fd the backend does not know.
pub fn not_registered(backend: &str, fd: RawFd) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{backend}: fd {fd} is not registered"),
    )
}

/// The error for registering an fd twice.
pub fn already_registered(backend: &str, fd: RawFd) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{backend}: fd {fd} is already registered"),
    )
}

/// Whether the calling process is the one that `pid` (from `std::process::id()`) names:
/// backends whose kernel object is not inherited (kqueue) only close the old one when
/// `post_fork` runs in the process that created it.
pub fn same_process(pid: u32) -> bool {
    std::process::id() == pid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_rounds_up_so_the_wait_never_ends_early() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_ms(Some(Duration::from_nanos(1))), 1);
        assert_eq!(timeout_ms(Some(Duration::from_micros(1500))), 2);
        assert_eq!(
            timeout_ms(Some(Duration::from_secs(u64::MAX))),
            libc::c_int::MAX
        );
    }

    #[test]
    fn bit_sets_combine_and_print() {
        let i = Interest::READ | Interest::WRITE;
        assert!(i.contains(Interest::READ) && !i.contains(Interest::HANGUP));
        assert_eq!(format!("{i:?}"), "Interest(READ|WRITE)");
        let exclusive = Interest::READ | Interest::EXCLUSIVE;
        assert_eq!(exclusive.events(), Interest::READ);
        assert!(Interest::EXCLUSIVE.events().is_empty());
    }

    #[test]
    fn closed_and_negative_fds_are_refused() {
        assert!(check_fd_open(-1).is_err());
        assert!(check_fd_open(1_000_000).is_err());
    }
}
