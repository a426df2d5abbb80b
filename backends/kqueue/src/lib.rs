//! The kqueue(2) backend (FreeBSD, macOS, the other BSDs), level-triggered.
//!
//! A kqueue is not inherited by a forked child: the child holds a number that names
//! nothing, or — once the child opens files — something else. `Backend::post_fork`
//! therefore builds a new kqueue, re-adds every registration and forgets the old number
//! without closing it (closing would close whatever the child reused it for).
//!
//! On other systems this crate compiles to nothing.
#![cfg(any(
    target_os = "macos",
    target_os = "ios",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
))]

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use forkloop_backend::{
    already_registered, cvt, not_registered, re_add, same_process, Backend, Event, FdMap, Interest,
    Readiness,
};

const EVENTS: usize = 256;

/// A kqueue with one read and one write filter per fd, as interest asks.
pub struct Kqueue {
    /// Raw, not `OwnedFd`: it is closed only in the process that created it.
    kq: RawFd,
    pid: u32,
    interests: FdMap<Interest>,
    buffer: Vec<libc::kevent>,
}

fn create() -> io::Result<RawFd> {
    // SAFETY: no arguments; returns a new fd or -1.
    let kq = cvt(unsafe { libc::kqueue() })?;
    // Not atomic, but a kqueue is never inherited by fork, so no child can see it
    // before close-on-exec is set.
    // SAFETY: fcntl on the fd kqueue() just returned.
    if let Err(e) = cvt(unsafe { libc::fcntl(kq, libc::F_SETFD, libc::FD_CLOEXEC) }) {
        close(kq);
        return Err(e);
    }
    Ok(kq)
}

fn close(kq: RawFd) {
    // SAFETY: kq is a kqueue this process created and nothing else closes.
    unsafe { libc::close(kq) };
}

fn change(fd: RawFd, filter: i16, flags: u16) -> libc::kevent {
    // SAFETY: kevent is plain old data; all-zero is a valid value for every field.
    let mut ev: libc::kevent = unsafe { std::mem::zeroed() };
    ev.ident = fd as libc::uintptr_t;
    ev.filter = filter as _;
    ev.flags = flags as _;
    ev
}

/// The filter changes that turn `old` interest into `new`.
fn changes(fd: RawFd, old: Interest, new: Interest) -> Vec<libc::kevent> {
    let mut out = Vec::with_capacity(2);
    // A hangup-only watch needs the read filter for EV_EOF; edge-triggered so that
    // unread data it does not care about cannot make the loop spin.
    let read_flags = |i: Interest| {
        if i.contains(Interest::READ) {
            Some(libc::EV_ADD)
        } else if i.contains(Interest::HANGUP) {
            Some(libc::EV_ADD | libc::EV_CLEAR)
        } else {
            None
        }
    };
    match (read_flags(old), read_flags(new)) {
        (Some(_), None) => out.push(change(fd, libc::EVFILT_READ, libc::EV_DELETE)),
        (o, Some(n)) if o != Some(n) => out.push(change(fd, libc::EVFILT_READ, n)),
        _ => {}
    }
    match (old.contains(Interest::WRITE), new.contains(Interest::WRITE)) {
        (true, false) => out.push(change(fd, libc::EVFILT_WRITE, libc::EV_DELETE)),
        (false, true) => out.push(change(fd, libc::EVFILT_WRITE, libc::EV_ADD)),
        _ => {}
    }
    out
}

fn apply(kq: RawFd, changes: &[libc::kevent]) -> io::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    // SAFETY: the change list is a live slice; no event list is passed.
    cvt(unsafe {
        libc::kevent(
            kq,
            changes.as_ptr(),
            changes.len() as _,
            std::ptr::null_mut(),
            0,
            std::ptr::null(),
        )
    })
    .map(drop)
}

impl Kqueue {
    /// A new kqueue (close-on-exec).
    pub fn new() -> io::Result<Kqueue> {
        Ok(Kqueue {
            kq: create()?,
            pid: std::process::id(),
            interests: FdMap::new(),
            buffer: Vec::with_capacity(EVENTS),
        })
    }
}

impl Backend for Kqueue {
    fn name(&self) -> &'static str {
        "kqueue"
    }

    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        if self.interests.contains(fd) {
            return Err(already_registered("kqueue", fd));
        }
        apply(self.kq, &changes(fd, Interest::NONE, interest))?;
        self.interests.insert(fd, interest);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let old = *self
            .interests
            .get(fd)
            .ok_or_else(|| not_registered("kqueue", fd))?;
        apply(self.kq, &changes(fd, old, interest))?;
        self.interests.insert(fd, interest);
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let old = self
            .interests
            .remove(fd)
            .ok_or_else(|| not_registered("kqueue", fd))?;
        // Closing an fd removes its filters already; ENOENT/EBADF then mean "gone".
        match apply(self.kq, &changes(fd, old, Interest::NONE)) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBADF)) => Ok(()),
            other => other,
        }
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as _,
        });
        let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |ts| ts as *const _);
        self.buffer.clear();
        // SAFETY: the buffer pointer and capacity describe the backend's own Vec; the
        // timespec, if any, is a live local.
        let n = match cvt(unsafe {
            libc::kevent(
                self.kq,
                std::ptr::null(),
                0,
                self.buffer.as_mut_ptr(),
                self.buffer.capacity() as _,
                ts_ptr,
            )
        }) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        // SAFETY: kevent initialized the first n entries, n <= capacity.
        unsafe { self.buffer.set_len(n) };
        for ev in &self.buffer {
            let mut readiness = match ev.filter {
                libc::EVFILT_READ => Readiness::READABLE,
                libc::EVFILT_WRITE => Readiness::WRITABLE,
                _ => Readiness::NONE,
            };
            if ev.flags & libc::EV_EOF != 0 {
                readiness |= Readiness::HANGUP;
            }
            if ev.flags & libc::EV_ERROR != 0 {
                readiness |= Readiness::ERROR;
            }
            events.push(Event {
                fd: ev.ident as RawFd,
                readiness,
            });
        }
        Ok(())
    }

    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (RawFd, Interest)>,
    ) -> io::Result<()> {
        let fresh = create()?;
        let interests = re_add(registrations, |fd, interest| {
            apply(fresh, &changes(fd, Interest::NONE, interest))
        })
        .inspect_err(|_| close(fresh))?;
        // In a child the old number names nothing of ours, or something it was reused
        // for: forget it. Only the process that created it closes it.
        if same_process(self.pid) {
            close(self.kq);
        }
        self.kq = fresh;
        self.pid = std::process::id();
        self.interests = interests;
        Ok(())
    }

    fn kernel_fd(&self) -> Option<RawFd> {
        Some(self.kq)
    }
}

impl Drop for Kqueue {
    fn drop(&mut self) {
        // As in post_fork: never close a number this process did not open.
        if same_process(self.pid) {
            close(self.kq);
        }
    }
}
