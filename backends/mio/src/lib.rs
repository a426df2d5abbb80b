//! An adapter over [`mio`]: epoll on Linux, kqueue on the BSDs and macOS.
//!
//! mio is edge-triggered only. The loop's contract is level-triggered, so every fd that
//! was reported is re-armed (`reregister`) right after the wait: the kernel re-checks it
//! then, and reports it again at the next wait only if it is still ready.
//!
//! After fork a new `Poll` is built and everything re-registered. The inherited `Poll` is
//! let go of by [`Backend::abandon_inherited`] and never dropped: on Linux its epoll fd is
//! closed by hand, which merely releases this process's reference to the shared epoll;
//! on the BSDs and macOS it is only forgotten, since the kqueue number it holds may
//! already name something else in the child. Only the process that created a `Poll`
//! drops it.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use forkloop_backend::{
    abandoned, already_registered, not_registered, re_add, same_process, Backend, Event, FdMap,
    Interest, Readiness,
};
use mio::unix::SourceFd;
use mio::{Events, Poll, Token};

const EVENTS: usize = 256;

/// A `mio::Poll` driven level-triggered.
pub struct Mio {
    /// `None` once [`Backend::abandon_inherited`] let it go.
    poll: Option<Poll>,
    /// The process that created `poll`: the only one that may drop it.
    pid: u32,
    events: Events,
    interests: FdMap<Interest>,
}

fn to_mio(interest: Interest) -> mio::Interest {
    let read = interest.intersects(Interest::READ | Interest::HANGUP);
    match (read, interest.contains(Interest::WRITE)) {
        (true, true) => mio::Interest::READABLE | mio::Interest::WRITABLE,
        (false, true) => mio::Interest::WRITABLE,
        // mio reports a hangup as read-closed, which needs read interest.
        _ => mio::Interest::READABLE,
    }
}

impl Mio {
    /// A new `mio::Poll`.
    pub fn new() -> io::Result<Mio> {
        Ok(Mio {
            poll: Some(Poll::new()?),
            pid: std::process::id(),
            events: Events::with_capacity(EVENTS),
            interests: FdMap::new(),
        })
    }

    /// The `Poll`, unless it was abandoned after fork.
    fn poll(&self) -> io::Result<&Poll> {
        self.poll.as_ref().ok_or_else(|| abandoned("mio"))
    }

    /// Lets go of the current `Poll` the one way that is right in this process: dropped in
    /// the process that created it, abandoned in any other.
    fn release(&mut self) {
        if same_process(self.pid) {
            drop(self.poll.take());
        } else {
            self.abandon_inherited();
        }
    }

    /// Re-arms a reported fd, emulating level triggering. A hangup-only watch stays
    /// edge-triggered: re-arming it would report unread data it does not care about
    /// forever, and make the loop spin.
    fn rearm(&self, fd: RawFd) -> io::Result<()> {
        match self.interests.get(fd) {
            Some(&interest) if interest.intersects(Interest::READ | Interest::WRITE) => self
                .poll()?
                .registry()
                .reregister(&mut SourceFd(&fd), Token(fd as usize), to_mio(interest)),
            _ => Ok(()),
        }
    }
}

impl Backend for Mio {
    fn name(&self) -> &'static str {
        "mio"
    }

    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        if self.interests.contains(fd) {
            return Err(already_registered("mio", fd));
        }
        self.poll()?.registry().register(
            &mut SourceFd(&fd),
            Token(fd as usize),
            to_mio(interest),
        )?;
        self.interests.insert(fd, interest);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let poll = self.poll.as_ref().ok_or_else(|| abandoned("mio"))?;
        let slot = self
            .interests
            .get_mut(fd)
            .ok_or_else(|| not_registered("mio", fd))?;
        poll.registry()
            .reregister(&mut SourceFd(&fd), Token(fd as usize), to_mio(interest))?;
        *slot = interest;
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let poll = self.poll.as_ref().ok_or_else(|| abandoned("mio"))?;
        self.interests
            .remove(fd)
            .ok_or_else(|| not_registered("mio", fd))?;
        poll.registry().deregister(&mut SourceFd(&fd))
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let poll = self.poll.as_mut().ok_or_else(|| abandoned("mio"))?;
        match poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let first = events.len();
        for ev in self.events.iter() {
            let hangup = ev.is_read_closed() || ev.is_write_closed();
            let readiness =
                Readiness::from_flags(ev.is_readable(), ev.is_writable(), hangup, ev.is_error());
            events.push(Event {
                fd: ev.token().0 as RawFd,
                readiness,
            });
        }
        for event in &events[first..] {
            self.rearm(event.fd)?;
        }
        Ok(())
    }

    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (RawFd, Interest)>,
    ) -> io::Result<()> {
        let fresh = Poll::new()?;
        let interests = re_add(registrations, |fd, interest| {
            let token = Token(fd as usize);
            fresh
                .registry()
                .register(&mut SourceFd(&fd), token, to_mio(interest))
        })?;
        self.release();
        self.poll = Some(fresh);
        self.pid = std::process::id();
        self.interests = interests;
        Ok(())
    }

    fn kernel_fd(&self) -> Option<RawFd> {
        self.poll.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Never runs the `Poll`'s destructor (on kqueue it closes a number the child may have
    /// reused, and it may free memory, which is not async-signal-safe): on Linux closes
    /// the epoll fd (this process's reference only) and forgets the `Poll`; on the BSDs
    /// and macOS only forgets it.
    fn abandon_inherited(&mut self) {
        if let Some(poll) = self.poll.take() {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                // SAFETY: the Poll's own epoll fd; the Poll is forgotten right below,
                // so nothing uses or closes the fd again. No epoll_ctl: the parent's
                // registrations stand. close(2) is async-signal-safe.
                unsafe { libc::close(poll.as_raw_fd()) };
            }
            std::mem::forget(poll);
        }
    }
}

impl Drop for Mio {
    fn drop(&mut self) {
        self.release();
    }
}
