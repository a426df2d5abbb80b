//! An adapter over `polling` (smol-rs): epoll on Linux, kqueue on the BSDs and macOS,
//! registered in level-triggered mode. `polling` cannot ask for exclusive wake-ups
//! (`EPOLLEXCLUSIVE`): `Interest::EXCLUSIVE` is ignored.
//!
//! After fork a new `Poller` is built and everything re-added. The inherited `Poller`
//! must never run its `Drop`: on Linux it deletes its notifier from the epoll instance
//! the parent still uses (smol-rs/polling#37), and on kqueue it edits and closes a number
//! the child may have reused. `Backend::abandon_inherited` forgets it; on Linux (where
//! `polling` uses epoll) its epoll fd is first closed by hand, which only releases this
//! process's reference; its notifier (an eventfd, or a pipe) and timerfd stay open in the
//! child (two or three fds per post_fork in a new process). On the BSDs and macOS
//! `polling` uses kqueue, which the child does not inherit, and the number is only
//! forgotten (on FreeBSD and macOS its notifier is an EVFILT_USER event, not an fd).
//!
//! Keys carry a tag per registration (`Registrations`): on epoll, an event from a
//! registration whose fd was closed behind the loop's back makes the backend build a new
//! `Poller` from its own table, which drops the stale registration.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use forkloop_backend::{
    abandoned, already_registered, not_registered, same_process, Backend, Event, Interest,
    Readiness, Registration, Registrations,
};
use polling::{Events, PollMode, Poller};

const EVENTS: usize = 256;

/// A `polling::Poller` in level-triggered mode.
pub struct Polling {
    /// `None` once [`Backend::abandon_inherited`] let it go: an inherited poller never
    /// runs its `Drop` (see the crate docs).
    poller: Option<Poller>,
    /// The process that created `poller`: the only one that may drop it.
    pid: u32,
    events: Events,
    registered: Registrations,
}

fn to_event(reg: Registration) -> polling::Event {
    let mut ev = polling::Event::new(
        reg.key,
        reg.interest.contains(Interest::READ),
        reg.interest.contains(Interest::WRITE),
    );
    ev.set_interrupt(reg.interest.contains(Interest::HANGUP));
    ev
}

fn add(poller: &Poller, fd: RawFd, reg: Registration) -> io::Result<()> {
    // SAFETY: polling asks that the fd be deleted before it is closed. forkloop's loop
    // owns the source of every watch (`Loop::watch_io` takes it by value) and drops it
    // only after its deregister (cancel and remove deregister first; the loop's Drop
    // drops this backend before the sources), so the compiler enforces that for safe
    // code. The other fds are the loop's own (self-pipes, pidfds), cancelled before they
    // close, and `Loop::watch_raw_fd`, whose `unsafe` contract makes the caller promise
    // the same. Even when that promise is broken, polling's epoll and kqueue keep no
    // memory tied to the fd: a stale event is told apart by its key's tag.
    unsafe { poller.add_with_mode(fd, to_event(reg), PollMode::Level) }
}

impl Polling {
    /// A new `polling::Poller`.
    pub fn new() -> io::Result<Polling> {
        Ok(Polling {
            poller: Some(Poller::new()?),
            pid: std::process::id(),
            events: Events::with_capacity(NonZeroUsize::new(EVENTS).expect("EVENTS > 0")),
            registered: Registrations::new(),
        })
    }

    /// A new `Poller` with `registered` in it (see [`Registrations::add_all`]), the old
    /// one let go of.
    fn rebuild(&mut self, mut registered: Registrations, skip_closed: bool) -> io::Result<()> {
        let fresh = Poller::new()?;
        registered.add_all(skip_closed, |fd, reg| add(&fresh, fd, reg))?;
        self.release();
        self.poller = Some(fresh);
        self.pid = std::process::id();
        self.registered = registered;
        Ok(())
    }

    /// The `Poller`, unless it was abandoned after fork.
    fn poller(&self) -> io::Result<&Poller> {
        self.poller.as_ref().ok_or_else(|| abandoned("polling"))
    }

    /// Lets go of the current `Poller` the one way that is right in this process: dropped
    /// in the process that created it, abandoned in any other.
    fn release(&mut self) {
        if same_process(self.pid) {
            drop(self.poller.take());
        } else {
            self.abandon_inherited();
        }
    }
}

/// The fd as `polling` wants it for modify/delete.
fn borrowed(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the borrow lives only for one modify/delete call on an fd the loop holds
    // registered; polling does not keep it.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

impl Backend for Polling {
    fn name(&self) -> &'static str {
        "polling"
    }

    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        if self.registered.get(fd).is_some() {
            return Err(already_registered("polling", fd));
        }
        let key = self.registered.add(fd, interest);
        let result = add(self.poller()?, fd, Registration { interest, key });
        if result.is_err() {
            self.registered.remove(fd);
        }
        result
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let reg = self
            .registered
            .get(fd)
            .ok_or_else(|| not_registered("polling", fd))?;
        let event = to_event(Registration { interest, ..reg });
        self.poller()?
            .modify_with_mode(borrowed(fd), event, PollMode::Level)?;
        self.registered.set_interest(fd, interest);
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.registered
            .remove(fd)
            .ok_or_else(|| not_registered("polling", fd))?;
        self.poller()?.delete(borrowed(fd))
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let poller = self.poller.as_ref().ok_or_else(|| abandoned("polling"))?;
        self.events.clear();
        match poller.wait(&mut self.events, timeout) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut stale = false;
        for ev in self.events.iter() {
            let Some(fd) = self.registered.current(ev.key) else {
                stale = true;
                continue;
            };
            let error = ev.is_err() == Some(true);
            let readiness =
                Readiness::from_flags(ev.readable, ev.writable, ev.is_interrupt(), error);
            events.push(Event { fd, readiness });
        }
        if stale {
            // Only a new Poller is rid of the stale registration.
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

    fn kernel_fd(&self) -> Option<RawFd> {
        self.poller.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Never runs the `Poller`'s `Drop` (see the crate docs): on Linux closes its epoll fd
    /// (this process's reference only) and forgets it; on the BSDs and macOS only forgets
    /// it.
    fn abandon_inherited(&mut self) {
        if let Some(poller) = self.poller.take() {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                // SAFETY: the Poller's own epoll fd; the Poller is forgotten right below,
                // so nothing uses or closes the fd again. No epoll_ctl: the parent's
                // registrations stand. close(2) is async-signal-safe.
                unsafe { libc::close(poller.as_raw_fd()) };
            }
            std::mem::forget(poller);
        }
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        self.release();
    }
}
