//! The epoll(7) backend (Linux), level-triggered.
//!
//! After fork the child shares the parent's epoll instance: an `EPOLL_CTL_DEL` in the
//! child deregisters the parent's fd, and both processes steal each other's events.
//! `Backend::post_fork` therefore builds a new instance, re-adds every registration,
//! and closes the inherited fd without ever calling `epoll_ctl` on it
//! (`Backend::abandon_inherited`, which a `Loop::fork` child also calls).
//!
//! epoll keys a registration by file, not by number, so an event can come from a
//! registration whose fd was closed behind the loop's back (`Registrations` tells);
//! the instance is then rebuilt from the backend's own table, which drops it.
//!
//! `Interest::EXCLUSIVE` is `EPOLLEXCLUSIVE`. The kernel takes it only at
//! `EPOLL_CTL_ADD` and refuses `EPOLL_CTL_MOD` of such a registration (`EINVAL`), so a
//! change to or from an exclusive interest deletes the fd and adds it again. That also
//! moves this instance to the back of the fd's queue of exclusive waiters, which the
//! kernel wakes front first (nginx's `ngx_reorder_accept_events` relies on the same).
#![cfg(any(target_os = "linux", target_os = "android"))]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::time::Duration;

use forkloop_backend::{
    abandoned, cvt, not_registered, timeout_ms, Backend, Event, Interest, Readiness, Registration,
    Registrations,
};

const INITIAL_EVENTS: usize = 256;

/// A level-triggered epoll instance.
pub struct Epoll {
    /// `None` once [`Backend::abandon_inherited`] closed it: nothing closes it again.
    epfd: Option<OwnedFd>,
    buffer: Vec<libc::epoll_event>,
    registered: Registrations,
}

fn create() -> io::Result<OwnedFd> {
    // SAFETY: no pointers; returns a new fd or -1.
    let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: epoll_create1 just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn interest_to_events(interest: Interest) -> u32 {
    let mut events = 0;
    if interest.contains(Interest::READ) {
        events |= libc::EPOLLIN;
    }
    if interest.contains(Interest::WRITE) {
        events |= libc::EPOLLOUT;
    }
    if interest.contains(Interest::HANGUP) {
        events |= libc::EPOLLRDHUP;
    }
    if interest.contains(Interest::EXCLUSIVE) {
        events |= libc::EPOLLEXCLUSIVE;
    }
    events as u32
}

fn events_to_readiness(events: u32) -> Readiness {
    let events = events as libc::c_int;
    let mut r = Readiness::NONE;
    if events & libc::EPOLLIN != 0 {
        r |= Readiness::READABLE;
    }
    if events & libc::EPOLLOUT != 0 {
        r |= Readiness::WRITABLE;
    }
    if events & (libc::EPOLLHUP | libc::EPOLLRDHUP) != 0 {
        r |= Readiness::HANGUP;
    }
    if events & libc::EPOLLERR != 0 {
        r |= Readiness::ERROR;
    }
    r
}

fn ctl(epfd: &OwnedFd, op: libc::c_int, fd: RawFd, reg: Registration) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: interest_to_events(reg.interest),
        u64: reg.key as u64,
    };
    // SAFETY: `event` is a live epoll_event; a bad fd is an error, not UB.
    cvt(unsafe { libc::epoll_ctl(epfd.as_raw_fd(), op, fd, &mut event) }).map(drop)
}

impl Epoll {
    /// A new epoll instance (close-on-exec).
    pub fn new() -> io::Result<Epoll> {
        Ok(Epoll {
            epfd: Some(create()?),
            buffer: Vec::with_capacity(INITIAL_EVENTS),
            registered: Registrations::new(),
        })
    }

    /// The epoll instance, unless it was abandoned after fork.
    fn epfd(&self) -> io::Result<&OwnedFd> {
        self.epfd.as_ref().ok_or_else(|| abandoned("epoll"))
    }

    /// A new instance with `registered` added (see [`Registrations::add_all`]), the old
    /// one closed without epoll_ctl.
    fn rebuild(&mut self, mut registered: Registrations, skip_closed: bool) -> io::Result<()> {
        let fresh = create()?;
        registered.add_all(skip_closed, |fd, reg| {
            ctl(&fresh, libc::EPOLL_CTL_ADD, fd, reg)
        })?;
        // One rule, inherited or not: the old fd is closed and never given to epoll_ctl.
        // In a child that is abandon_inherited (it releases only this process's reference
        // to the shared instance, so the parent's registrations stand); in the process
        // that created it, it is what dropping it would do.
        self.abandon_inherited();
        self.epfd = Some(fresh);
        self.registered = registered;
        Ok(())
    }
}

impl Backend for Epoll {
    fn name(&self) -> &'static str {
        "epoll"
    }

    /// Regular files are refused by epoll with `EPERM`; the loop treats them as always
    /// ready, as poll(2) would report them.
    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let key = self.registered.add(fd, interest);
        let reg = Registration { interest, key };
        let epfd = self.epfd()?;
        let result = match ctl(epfd, libc::EPOLL_CTL_ADD, fd, reg) {
            // Left by `deregister_closing` while another fd kept the file open: this
            // file, this number, a registration the table no longer has. It is replaced
            // (deleted and added: it may be exclusive, which cannot be modified), so
            // its events carry the new key.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                ctl(epfd, libc::EPOLL_CTL_DEL, fd, reg)
                    .and_then(|()| ctl(epfd, libc::EPOLL_CTL_ADD, fd, reg))
            }
            result => result,
        };
        if result.is_err() {
            self.registered.remove(fd);
        }
        result
    }

    /// An exclusive registration, or one becoming exclusive, is deleted and added again
    /// (see the crate's docs); if the add fails, the old registration is put back. If
    /// that fails too the fd is in neither the kernel nor the table, and the caller's
    /// next modify (the loop tries a refused change again) adds it.
    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let Some(old) = self.registered.get(fd) else {
            return self.register(fd, interest);
        };
        let new = Registration {
            interest,
            key: old.key,
        };
        let epfd = self.epfd()?;
        if (old.interest | interest).contains(Interest::EXCLUSIVE) {
            ctl(epfd, libc::EPOLL_CTL_DEL, fd, old)?;
            if let Err(e) = ctl(epfd, libc::EPOLL_CTL_ADD, fd, new) {
                let restored = ctl(epfd, libc::EPOLL_CTL_ADD, fd, old).is_ok();
                if !restored {
                    // Not in the kernel any more: the table must not say it is.
                    self.registered.remove(fd);
                }
                return Err(e);
            }
        } else {
            ctl(epfd, libc::EPOLL_CTL_MOD, fd, new)?;
        }
        self.registered.set_interest(fd, interest);
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let reg = self.registered.remove(fd).unwrap_or(Registration {
            interest: Interest::NONE,
            key: 0,
        });
        ctl(self.epfd()?, libc::EPOLL_CTL_DEL, fd, reg)
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let epfd = self.epfd()?.as_raw_fd();
        // A full buffer last time means more may be waiting: grow towards the fd count.
        if self.buffer.len() == self.buffer.capacity()
            && self.buffer.capacity() < self.registered.len()
        {
            self.buffer.reserve(self.buffer.capacity());
        }
        self.buffer.clear();
        // SAFETY: the buffer pointer and capacity describe the backend's own Vec.
        let n = match cvt(unsafe {
            libc::epoll_wait(
                epfd,
                self.buffer.as_mut_ptr(),
                self.buffer.capacity().min(libc::c_int::MAX as usize) as libc::c_int,
                timeout_ms(timeout),
            )
        }) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        // SAFETY: epoll_wait initialized the first n entries, n <= capacity.
        unsafe { self.buffer.set_len(n) };
        let mut stale = false;
        for e in &self.buffer {
            match self.registered.current(e.u64 as usize) {
                Some(fd) => events.push(Event {
                    fd,
                    readiness: events_to_readiness(e.events),
                }),
                None => stale = true,
            }
        }
        if stale {
            // No fd names the stale registration's file any more, so no DEL can reach
            // it: only a new instance is rid of it.
            // A copy: if the rebuild fails (EMFILE), the table and the old object stand.
            self.rebuild(self.registered.clone(), true)?;
        }
        Ok(())
    }

    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (RawFd, Interest)>,
    ) -> io::Result<()> {
        let registered = registrations.collect();
        self.rebuild(registered, false)
    }

    /// No `EPOLL_CTL_DEL`: closing the last fd of a file removes it from every epoll
    /// instance. If another fd keeps the file open (a dup, a forked child's copy), its
    /// registration outlives the close: its events carry a key that is no fd's current
    /// one and make `wait` rebuild the instance without it, and the same file added
    /// again under the same number (`EEXIST`) takes over the leftover registration.
    /// Without tags to tell stale keys (32-bit), it deregisters.
    fn deregister_closing(&mut self, fd: RawFd) -> io::Result<()> {
        if !Registrations::recognizes_stale() {
            return self.deregister(fd);
        }
        match self.registered.remove(fd) {
            Some(_) => Ok(()),
            None => Err(not_registered("epoll", fd)),
        }
    }

    fn kernel_fd(&self) -> Option<RawFd> {
        self.epfd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Closes this process's reference to the instance it shares with the parent (no
    /// epoll_ctl, so the parent's registrations stand); nothing closes it again.
    fn abandon_inherited(&mut self) {
        if let Some(epfd) = self.epfd.take() {
            // SAFETY: into_raw_fd hands over the only owner of this fd, so it is closed
            // exactly once, here; close(2) is async-signal-safe.
            unsafe { libc::close(epfd.into_raw_fd()) };
        }
    }
}
