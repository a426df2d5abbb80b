//! The kqueue(2) backend (FreeBSD, macOS, the other BSDs), level-triggered.
//!
//! A kqueue is not inherited by a forked child: the child holds a number that names
//! nothing, or — once the child opens files — something else. `Backend::post_fork`
//! therefore builds a new kqueue, re-adds every registration and forgets the old number
//! without closing it (closing would close whatever the child reused it for): that is
//! `Backend::abandon_inherited`, which a `Loop::fork` child also calls.
//!
//! Filters are level-triggered, except the read filter of a hangup-only watch
//! (`EV_CLEAR`). kqueue fixes a filter's flags when it is added, so a change of mode
//! deletes the filter and adds it again; the backend keeps, per fd, the filters the
//! kernel holds and their modes.
//!
//! kqueue has no exclusive wake-ups (every kqueue watching a listening socket is told
//! of a new connection): `Interest::EXCLUSIVE` is ignored.
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
    abandoned, already_registered, cvt, not_registered, same_process, Backend, Event, FdMap,
    Interest, Readiness,
};

const EVENTS: usize = 256;

/// A kqueue with one read and one write filter per fd, as interest asks.
pub struct Kqueue {
    /// Raw, not `OwnedFd`: it is closed only in the process that created it. `None` once
    /// [`Backend::abandon_inherited`] forgot it.
    kq: Option<RawFd>,
    /// The process that created `kq`.
    pid: u32,
    /// The filters the kqueue holds for each registered fd, with their modes.
    filters: FdMap<Filters>,
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

/// How a filter is armed.
///
/// A knote's flags are fixed when the knote is created: an `EV_ADD` for a filter the fd
/// already has only updates its fflags, data and udata (kqueue_register in FreeBSD and
/// XNU), so it cannot turn `EV_CLEAR` on or off. Changing the mode takes an `EV_DELETE`
/// and then a fresh `EV_ADD`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Reported by every wait while the condition holds.
    Level,
    /// `EV_CLEAR`: reported once, then not again until the filter's state changes.
    Clear,
}

/// The filters the kqueue holds for one fd, with their modes: what the kernel has, not
/// what was asked last, so that a change that failed part way is diffed from the truth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Filters {
    read: Option<Mode>,
    write: Option<Mode>,
}

impl Filters {
    const NONE: Filters = Filters {
        read: None,
        write: None,
    };

    /// The filters `interest` needs. A hangup-only watch needs the read filter for
    /// `EV_EOF`; edge-triggered (`EV_CLEAR`) so that unread data it does not care about
    /// cannot make the loop spin.
    fn wanted(interest: Interest) -> Filters {
        let read = if interest.contains(Interest::READ) {
            Some(Mode::Level)
        } else if interest.contains(Interest::HANGUP) {
            Some(Mode::Clear)
        } else {
            None
        };
        let write = interest.contains(Interest::WRITE).then_some(Mode::Level);
        Filters { read, write }
    }

    fn slot(&mut self, filter: i16) -> &mut Option<Mode> {
        if filter == libc::EVFILT_READ {
            &mut self.read
        } else {
            &mut self.write
        }
    }
}

/// One change to one filter.
#[derive(Clone, Copy, Debug)]
enum Op {
    Delete,
    Add(Mode),
}

/// At most two changes per filter (delete, then add in the other mode), two filters.
const MAX_CHANGES: usize = 4;

fn zeroed_kevent() -> libc::kevent {
    // SAFETY: kevent is plain old data (integers and a pointer); all-zero is a valid
    // value for every field.
    unsafe { std::mem::zeroed() }
}

fn kevent_change(fd: RawFd, filter: i16, op: Op) -> libc::kevent {
    let flags = match op {
        Op::Delete => libc::EV_DELETE,
        Op::Add(Mode::Level) => libc::EV_ADD,
        Op::Add(Mode::Clear) => libc::EV_ADD | libc::EV_CLEAR,
    };
    let mut ev = zeroed_kevent();
    ev.ident = fd as libc::uintptr_t;
    ev.filter = filter as _;
    // EV_RECEIPT: every change reports its own result, and one that fails does not keep
    // the kernel from applying the ones after it.
    ev.flags = (flags | libc::EV_RECEIPT) as _;
    ev
}

/// Takes `fd`'s filters from `from` to `to` in one kevent(2) call, and returns the
/// filters the kernel then holds with the first error, if any.
///
/// Every change carries `EV_RECEIPT`, and the call gets room for one receipt per change:
/// the kernel applies the changes in order, copies out one receipt per change (`EV_ERROR`
/// set, `data` the errno or 0) and, because it copied receipts out, does not collect
/// pending events (FreeBSD's kqueue_kevent, XNU's kevent_internal). A failed
/// `EV_DELETE` with `ENOENT` or `EBADF` counts as done: the filter is gone either way
/// (closing an fd removes its filters).
///
/// With `refresh`, a filter that stays is added again all the same: EV_ADD on a live
/// filter only updates it, and re-creates one that closing the fd removed, so a new fd
/// given a closed one's number gets its filters (kqueue keys them by number).
fn transition(
    kq: RawFd,
    fd: RawFd,
    from: Filters,
    to: Filters,
    refresh: bool,
) -> (Filters, io::Result<()>) {
    let mut ops = [(libc::EVFILT_READ, Op::Delete); MAX_CHANGES];
    let mut n = 0;
    for (filter, old, new) in [
        (libc::EVFILT_READ, from.read, to.read),
        (libc::EVFILT_WRITE, from.write, to.write),
    ] {
        if old == new {
            if let Some(mode) = new.filter(|_| refresh) {
                ops[n] = (filter, Op::Add(mode));
                n += 1;
            }
            continue;
        }
        if old.is_some() {
            ops[n] = (filter, Op::Delete);
            n += 1;
        }
        if let Some(mode) = new {
            ops[n] = (filter, Op::Add(mode));
            n += 1;
        }
    }
    let ops = &ops[..n];
    if ops.is_empty() {
        return (from, Ok(()));
    }
    let mut changes = [zeroed_kevent(); MAX_CHANGES];
    for (change, &(filter, op)) in changes.iter_mut().zip(ops) {
        *change = kevent_change(fd, filter, op);
    }
    let mut receipts = [zeroed_kevent(); MAX_CHANGES];
    // SAFETY: the change list holds `n` initialized entries and the receipt list has room
    // for `n` (both live locals, n <= MAX_CHANGES); a null timeout never blocks, and with
    // EV_RECEIPT on every change nothing else is copied out.
    let copied = match cvt(unsafe {
        libc::kevent(
            kq,
            changes.as_ptr(),
            n as _,
            receipts.as_mut_ptr(),
            n as _,
            std::ptr::null(),
        )
    }) {
        Ok(copied) => (copied as usize).min(n),
        // kqueue(2) on FreeBSD: "When kevent() call fails with EINTR error, all changes
        // in the changelist have been applied" (as mio also relies on).
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return (to, Ok(())),
        // The call itself failed (a bad kq, no memory): nothing was applied.
        Err(e) => return (from, Err(e)),
    };
    let mut reached = from;
    let mut first_error = None;
    for (i, &(filter, op)) in ops.iter().enumerate() {
        let receipt = receipts[..copied].get(i).filter(|r| {
            r.ident == fd as libc::uintptr_t
                && r.filter == filter as _
                && r.flags & libc::EV_ERROR != 0
        });
        let Some(receipt) = receipt else {
            // No receipt for this change: take it as not applied.
            first_error.get_or_insert_with(|| {
                io::Error::other(format!("kqueue: no receipt for a change to fd {fd}"))
            });
            continue;
        };
        let errno = receipt.data as i32;
        let slot = reached.slot(filter);
        match op {
            Op::Delete if matches!(errno, 0 | libc::ENOENT | libc::EBADF) => *slot = None,
            // After a delete that failed, the add only updated the knote still there,
            // which keeps its mode: the kernel still has `*slot`.
            Op::Add(mode) if errno == 0 => *slot = Some(slot.unwrap_or(mode)),
            _ => {
                first_error.get_or_insert_with(|| io::Error::from_raw_os_error(errno));
            }
        }
    }
    (reached, first_error.map_or(Ok(()), Err))
}

impl Kqueue {
    /// A new kqueue (close-on-exec).
    pub fn new() -> io::Result<Kqueue> {
        Ok(Kqueue {
            kq: Some(create()?),
            pid: std::process::id(),
            filters: FdMap::new(),
            buffer: Vec::with_capacity(EVENTS),
        })
    }

    /// The kqueue, unless it was abandoned after fork.
    fn kq(&self) -> io::Result<RawFd> {
        self.kq.ok_or_else(|| abandoned("kqueue"))
    }

    /// Lets go of the current kqueue the one way that is right in this process: closed in
    /// the process that created it, forgotten (abandoned) in any other.
    fn release(&mut self) {
        if !same_process(self.pid) {
            self.abandon_inherited();
        }
        if let Some(kq) = self.kq.take() {
            close(kq);
        }
    }
}

impl Backend for Kqueue {
    fn name(&self) -> &'static str {
        "kqueue"
    }

    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        if self.filters.contains(fd) {
            return Err(already_registered("kqueue", fd));
        }
        let kq = self.kq()?;
        let (reached, result) = transition(kq, fd, Filters::NONE, Filters::wanted(interest), false);
        if let Err(e) = result {
            // All or nothing: the loop does not know the fd after a failed register, so
            // a filter left behind would report an fd nobody watches.
            let _ = transition(kq, fd, reached, Filters::NONE, false);
            return Err(e);
        }
        self.filters.insert(fd, reached);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let kq = self.kq()?;
        let filters = self
            .filters
            .get_mut(fd)
            .ok_or_else(|| not_registered("kqueue", fd))?;
        let (reached, result) = transition(kq, fd, *filters, Filters::wanted(interest), true);
        *filters = reached;
        result
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let kq = self.kq()?;
        let old = self
            .filters
            .remove(fd)
            .ok_or_else(|| not_registered("kqueue", fd))?;
        // Closing an fd removes its filters already; transition counts ENOENT/EBADF on a
        // delete as done.
        transition(kq, fd, old, Filters::NONE, false).1
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let kq = self.kq()?;
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
                kq,
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
        let mut filters = FdMap::new();
        for (fd, interest) in registrations {
            let (reached, result) =
                transition(fresh, fd, Filters::NONE, Filters::wanted(interest), false);
            if let Err(e) = result {
                close(fresh);
                return Err(e);
            }
            filters.insert(fd, reached);
        }
        // In a child the old number names nothing of ours, or something it was reused
        // for: abandoned (forgotten). Only the process that created it closes it.
        self.release();
        self.kq = Some(fresh);
        self.pid = std::process::id();
        self.filters = filters;
        Ok(())
    }

    fn kernel_fd(&self) -> Option<RawFd> {
        self.kq
    }

    /// Only forgets the number: a kqueue is not inherited by fork, so the child has
    /// nothing to let go of, and the number may already name another file.
    fn abandon_inherited(&mut self) {
        self.kq = None;
    }
}

impl Drop for Kqueue {
    fn drop(&mut self) {
        // As in post_fork: never close a number this process did not open.
        self.release();
    }
}
