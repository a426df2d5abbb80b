//! An adapter over [`polling`] (smol-rs): epoll on Linux, kqueue on the BSDs and macOS,
//! registered in level-triggered mode.
//!
//! After fork a new `Poller` is built and everything re-added. The inherited `Poller`
//! must never run its `Drop`: on Linux it deletes its notifier from the epoll instance
//! the parent still uses (smol-rs/polling#37), and on kqueue it closes a number the
//! child may have reused. It is forgotten; on Linux its epoll fd is then closed by hand,
//! which only releases this process's reference. Its notifier fd stays open in the child
//! (one fd per post_fork in a new process).

use std::io;
use std::mem::ManuallyDrop;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use forkloop_backend::{
    already_registered, not_registered, re_add, same_process, Backend, Event, FdMap, Interest,
    Readiness,
};
use polling::{Events, PollMode, Poller};

const EVENTS: usize = 256;

/// A `polling::Poller` in level-triggered mode.
pub struct Polling {
    /// `ManuallyDrop`: an inherited poller must never run its `Drop` (see the crate docs).
    poller: ManuallyDrop<Poller>,
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
            poller: ManuallyDrop::new(Poller::new()?),
            pid: std::process::id(),
            events: Events::with_capacity(NonZeroUsize::new(EVENTS).expect("EVENTS > 0")),
            interests: FdMap::new(),
        })
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
        add(&self.poller, fd, interest)?;
        self.interests.insert(fd, interest);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let slot = self
            .interests
            .get_mut(fd)
            .ok_or_else(|| not_registered("polling", fd))?;
        self.poller
            .modify_with_mode(borrowed(fd), to_event(fd, interest), PollMode::Level)?;
        *slot = interest;
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.interests
            .remove(fd)
            .ok_or_else(|| not_registered("polling", fd))?;
        self.poller.delete(borrowed(fd))
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.events.clear();
        match self.poller.wait(&mut self.events, timeout) {
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
        let mut inherited = std::mem::replace(&mut self.poller, ManuallyDrop::new(fresh));
        if same_process(self.pid) {
            // SAFETY: the poller was created by this process and is never used again.
            unsafe { ManuallyDrop::drop(&mut inherited) };
        } else if cfg!(any(target_os = "linux", target_os = "android")) {
            // The epoll fd is this process's own reference to the shared instance;
            // closing it (without epoll_ctl) leaves the parent's registrations alone.
            // SAFETY: the forgotten poller never uses or closes this fd again.
            unsafe { libc::close(inherited.as_raw_fd()) };
        }
        self.pid = std::process::id();
        self.interests = interests;
        Ok(())
    }

    fn kernel_fd(&self) -> Option<RawFd> {
        Some(self.poller.as_raw_fd())
    }
}

impl Drop for Polling {
    fn drop(&mut self) {
        if same_process(self.pid) {
            // SAFETY: created by this process, dropped once, never used again.
            unsafe { ManuallyDrop::drop(&mut self.poller) };
        }
    }
}
