//! The registrations of a backend whose kernel keys them by file rather than by number
//! (epoll, and mio or polling on it), each tagged so that a stale one is recognized.
//!
//! An fd closed without being deregistered, while a dup (or a forked child's copy)
//! keeps its file open, stays registered in epoll and reports under its old number, which
//! may by then name a new fd. No `EPOLL_CTL_DEL` can reach it (no fd names it). So each
//! registration gets a new tag, carried in the key its events come back with (libev's
//! `egen`); an event whose key is not its fd's current one is stale, and the backend
//! rebuilds its kernel object from this table, which drops the stale registration.

use std::os::fd::RawFd;

use crate::{FdMap, Interest};

/// Tags fit in the high half of a 64-bit key; with 32-bit keys there is no room, and
/// stale registrations go unrecognized.
const TAGGED: bool = usize::BITS >= 64;

/// One registered fd.
#[derive(Clone, Copy, Debug)]
pub struct Registration {
    /// What it is registered for.
    pub interest: Interest,
    /// The key its kernel events carry: the fd, and this registration's tag.
    pub key: usize,
}

/// Registrations by fd, each with the key its events carry.
#[derive(Clone, Debug, Default)]
pub struct Registrations {
    map: FdMap<Registration>,
    len: usize,
    next_tag: u32,
}

impl Registrations {
    /// An empty table.
    pub fn new() -> Registrations {
        Registrations::default()
    }

    /// Records a new registration of `fd` (replacing one it had) and returns its key.
    pub fn add(&mut self, fd: RawFd, interest: Interest) -> usize {
        self.next_tag = self.next_tag.wrapping_add(1);
        let tag = if TAGGED { self.next_tag as usize } else { 0 };
        let key = (tag << (usize::BITS / 2)) | (fd as u32 as usize);
        if self
            .map
            .insert(fd, Registration { interest, key })
            .is_none()
        {
            self.len += 1;
        }
        key
    }

    /// The registration of `fd`, if any.
    pub fn get(&self, fd: RawFd) -> Option<Registration> {
        self.map.get(fd).copied()
    }

    /// Changes the interest of a registered `fd` (its key stays).
    pub fn set_interest(&mut self, fd: RawFd, interest: Interest) {
        if let Some(reg) = self.map.get_mut(fd) {
            reg.interest = interest;
        }
    }

    /// Forgets `fd`.
    pub fn remove(&mut self, fd: RawFd) -> Option<Registration> {
        let reg = self.map.remove(fd)?;
        self.len -= 1;
        Some(reg)
    }

    /// The fd an event's key belongs to, if it is that fd's current registration
    /// (`None`: a stale registration, or a key of no registration at all).
    pub fn current(&self, key: usize) -> Option<RawFd> {
        let fd = key as u32 as RawFd;
        self.map.get(fd).filter(|reg| reg.key == key).map(|_| fd)
    }

    /// Whether [`Registrations::current`] tells a stale registration (one that outlived
    /// its fd's close, or the fd's next registration) from the current one: keys have
    /// room for a tag (64-bit).
    pub const fn recognizes_stale() -> bool {
        TAGGED
    }

    /// How many fds are registered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every registration, in fd order.
    pub fn iter(&self) -> impl Iterator<Item = (RawFd, Registration)> + '_ {
        self.map.iter().map(|(fd, reg)| (fd, *reg))
    }

    /// Puts every registration into a new kernel object with `add`. With `skip_closed`
    /// (rebuilding to drop a stale registration) an fd that is no longer open (EBADF) is
    /// forgotten, as the old kernel object forgot it when it was closed; otherwise (after
    /// fork) that is an error.
    pub fn add_all(
        &mut self,
        skip_closed: bool,
        mut add: impl FnMut(RawFd, Registration) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut closed = Vec::new();
        for (fd, reg) in self.iter() {
            match add(fd, reg) {
                Ok(()) => {}
                Err(e) if skip_closed && e.raw_os_error() == Some(libc::EBADF) => closed.push(fd),
                Err(e) => return Err(e),
            }
        }
        for fd in closed {
            self.remove(fd);
        }
        Ok(())
    }
}

/// A table of registrations, each with a fresh key (the common half of a `post_fork`).
impl FromIterator<(RawFd, Interest)> for Registrations {
    fn from_iter<I: IntoIterator<Item = (RawFd, Interest)>>(registrations: I) -> Registrations {
        let mut table = Registrations::new();
        for (fd, interest) in registrations {
            table.add(fd, interest);
        }
        table
    }
}
