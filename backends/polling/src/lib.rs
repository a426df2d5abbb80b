//! An adapter over [`polling`] (smol-rs): epoll on Linux, kqueue on the BSDs and macOS,
//! registered in level-triggered mode.
//!
//! After fork a new `Poller` is built and everything re-added. The inherited `Poller`
//! must never run its `Drop`: on Linux it deletes its notifier from the epoll instance
//! the parent still uses (smol-rs/polling#37), and on kqueue it edits and closes a number
//! the child may have reused. [`Backend::abandon_inherited`] forgets it; on Linux (where
//! `polling` uses epoll) its epoll fd is first closed by hand, which only releases this
//! process's reference; its notifier (an eventfd, or a pipe) and timerfd stay open in the
//! child (two or three fds per post_fork in a new process). On the BSDs and macOS
//! `polling` uses kqueue, which the child does not inherit, and the number is only
//! forgotten (on FreeBSD and macOS its notifier is an EVFILT_USER event, not an fd).

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use forkloop_backend::{
    abandoned, already_registered, not_registered, re_add, same_process, Backend, Event, FdMap,
    Interest, Readiness,
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
    interests: FdMap<Interest>,
}

fn to_event(fd: RawFd, interest: Interest) -> polling::Event {
    let mut ev = polling::Event::new(
        fd as usize,
        interest.contains(Interest::READ),
        interest.contains(Interest::WRITE),
    );
    ev.set_interrupt(interest.contains(Interest::HANGUP));
    ev
}

fn add(poller: &Poller, fd: RawFd, interest: Interest) -> io::Result<()> {
    // SAFETY: the loop deletes every fd from the poller before it forgets the watch, and
    // documents that users must cancel watches before closing their fds.
    unsafe { poller.add_with_mode(fd, to_event(fd, interest), PollMode::Level) }
}

impl Polling {
    /// A new `polling::Poller`.
    pub fn new() -> io::Result<Polling> {
        Ok(Polling {
            poller: Some(Poller::new()?),
            pid: std::process::id(),
            events: Events::with_capacity(NonZeroUsize::new(EVENTS).expect("EVENTS > 0")),
            interests: FdMap::new(),
        })
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
        if self.interests.contains(fd) {
            return Err(already_registered("polling", fd));
        }
        add(self.poller()?, fd, interest)?;
        self.interests.insert(fd, interest);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let poller = self.poller.as_ref().ok_or_else(|| abandoned("polling"))?;
        let slot = self
            .interests
            .get_mut(fd)
            .ok_or_else(|| not_registered("polling", fd))?;
        poller.modify_with_mode(borrowed(fd), to_event(fd, interest), PollMode::Level)?;
        *slot = interest;
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let poller = self.poller.as_ref().ok_or_else(|| abandoned("polling"))?;
        self.interests
            .remove(fd)
            .ok_or_else(|| not_registered("polling", fd))?;
        poller.delete(borrowed(fd))
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let poller = self.poller.as_ref().ok_or_else(|| abandoned("polling"))?;
        self.events.clear();
        match poller.wait(&mut self.events, timeout) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for ev in self.events.iter() {
            let error = ev.is_err() == Some(true);
            let readiness =
                Readiness::from_flags(ev.readable, ev.writable, ev.is_interrupt(), error);
            events.push(Event {
                fd: ev.key as RawFd,
                readiness,
            });
        }
        Ok(())
    }

    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (RawFd, Interest)>,
    ) -> io::Result<()> {
        let fresh = Poller::new()?;
        let interests = re_add(registrations, |fd, interest| add(&fresh, fd, interest))?;
        self.release();
        self.poller = Some(fresh);
        self.pid = std::process::id();
        self.interests = interests;
        Ok(())
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
