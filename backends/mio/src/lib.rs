//! An adapter over `mio`: epoll on Linux, kqueue on the BSDs and macOS.
//!
//! mio is edge-triggered only. The loop's contract is level-triggered, so every fd that
//! was reported is re-armed (`reregister`) right after the wait: the kernel re-checks it
//! then, and reports it again at the next wait only if it is still ready.
//!
//! mio cannot ask for exclusive wake-ups (`EPOLLEXCLUSIVE`): `Interest::EXCLUSIVE` is
//! ignored.
//!
//! After fork a new `Poll` is built and everything re-registered. The inherited `Poll` is
//! let go of by `Backend::abandon_inherited` and never dropped: on Linux its epoll fd is
//! closed by hand, which merely releases this process's reference to the shared epoll;
//! on the BSDs and macOS it is only forgotten, since the kqueue number it holds may
//! already name something else in the child. Only the process that created a `Poll`
//! drops it.
//!
//! Tokens carry a tag per registration (`Registrations`): on epoll, an event from a
//! registration whose fd was closed behind the loop's back makes the backend build a new
//! `Poll` from its own table, which drops the stale registration.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use forkloop_backend::{
    abandoned, already_registered, not_registered, same_process, Backend, Event, Interest,
    Readiness, Registration, Registrations,
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
    registered: Registrations,
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
            registered: Registrations::new(),
        })
    }

    /// A new `Poll` with `registered` in it (see [`Registrations::add_all`]), the old
    /// one let go of.
    fn rebuild(&mut self, mut registered: Registrations, skip_closed: bool) -> io::Result<()> {
        let fresh = Poll::new()?;
        registered.add_all(skip_closed, |fd, reg| register(&fresh, fd, reg))?;
        self.release();
        self.poll = Some(fresh);
        self.pid = std::process::id();
        self.registered = registered;
        Ok(())
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
        match self.registered.get(fd) {
            Some(reg) if reg.interest.intersects(Interest::READ | Interest::WRITE) => {
                let token = Token(reg.key);
                let interest = to_mio(reg.interest);
                let registry = self.poll()?.registry();
                registry.reregister(&mut SourceFd(&fd), token, interest)
            }
            _ => Ok(()),
        }
    }
}

fn register(poll: &Poll, fd: RawFd, reg: Registration) -> io::Result<()> {
    let (token, interest) = (Token(reg.key), to_mio(reg.interest));
    poll.registry()
        .register(&mut SourceFd(&fd), token, interest)
}

impl Backend for Mio {
    fn name(&self) -> &'static str {
        "mio"
    }

    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        if self.registered.get(fd).is_some() {
            return Err(already_registered("mio", fd));
        }
        let key = self.registered.add(fd, interest);
        let result = register(self.poll()?, fd, Registration { interest, key });
        if result.is_err() {
            self.registered.remove(fd);
        }
        result
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let reg = self
            .registered
            .get(fd)
            .ok_or_else(|| not_registered("mio", fd))?;
        let token = Token(reg.key);
        self.poll()?
            .registry()
            .reregister(&mut SourceFd(&fd), token, to_mio(interest))?;
        self.registered.set_interest(fd, interest);
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.registered
            .remove(fd)
            .ok_or_else(|| not_registered("mio", fd))?;
        self.poll()?.registry().deregister(&mut SourceFd(&fd))
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let poll = self.poll.as_mut().ok_or_else(|| abandoned("mio"))?;
        match poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let first = events.len();
        let mut stale = false;
        for ev in self.events.iter() {
            let Some(fd) = self.registered.current(ev.token().0) else {
                stale = true;
                continue;
            };
            let hangup = ev.is_read_closed() || ev.is_write_closed();
            let readiness =
                Readiness::from_flags(ev.is_readable(), ev.is_writable(), hangup, ev.is_error());
            events.push(Event { fd, readiness });
        }
        // A new Poll is rid of the stale registration, and registers every fd afresh,
        // which re-arms it. A copy of the table: if the rebuild fails (EMFILE), the table
        // and the old Poll stand, and the reported fds are re-armed there.
        let rebuilt = stale.then(|| self.rebuild(self.registered.clone(), true));
        if let Some(Ok(())) = rebuilt {
            return Ok(());
        }
        for event in &events[first..] {
            self.rearm(event.fd)?;
        }
        rebuilt.unwrap_or(Ok(()))
    }

    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (RawFd, Interest)>,
    ) -> io::Result<()> {
        let registered = registrations.collect();
        self.rebuild(registered, false)
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
