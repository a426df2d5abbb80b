//! An adapter over [`mio`]: epoll on Linux, kqueue on the BSDs and macOS.
//!
//! mio is edge-triggered only. The loop's contract is level-triggered, so every fd that
//! was reported is re-armed (`reregister`) right after the wait: the kernel re-checks it
//! then, and reports it again at the next wait only if it is still ready.
//!
//! After fork a new `Poll` is built and everything re-registered. The inherited `Poll` is
//! dropped only where that is harmless — dropping closes the fd, which on Linux merely
//! releases this process's reference to the shared epoll — and forgotten where the
//! kqueue number it holds may already name something else in the child.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use forkloop_backend::{
    already_registered, not_registered, re_add, same_process, Backend, Event, FdMap, Interest,
    Readiness,
};
use mio::unix::SourceFd;
use mio::{Events, Poll, Token};

const EVENTS: usize = 256;

/// A `mio::Poll` driven level-triggered.
pub struct Mio {
    poll: Poll,
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
            poll: Poll::new()?,
            pid: std::process::id(),
            events: Events::with_capacity(EVENTS),
            interests: FdMap::new(),
        })
    }

    /// Re-arms a reported fd, emulating level triggering. A hangup-only watch stays
    /// edge-triggered: re-arming it would report unread data it does not care about
    /// forever, and make the loop spin.
    fn rearm(&self, fd: RawFd) -> io::Result<()> {
        match self.interests.get(fd) {
            Some(&interest) if interest.intersects(Interest::READ | Interest::WRITE) => self
                .poll
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
        self.poll
            .registry()
            .register(&mut SourceFd(&fd), Token(fd as usize), to_mio(interest))?;
        self.interests.insert(fd, interest);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let slot = self
            .interests
            .get_mut(fd)
            .ok_or_else(|| not_registered("mio", fd))?;
        self.poll.registry().reregister(
            &mut SourceFd(&fd),
            Token(fd as usize),
            to_mio(interest),
        )?;
        *slot = interest;
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.interests
            .remove(fd)
            .ok_or_else(|| not_registered("mio", fd))?;
        self.poll.registry().deregister(&mut SourceFd(&fd))
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        match self.poll.poll(&mut self.events, timeout) {
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
        let inherited = std::mem::replace(&mut self.poll, fresh);
        if cfg!(any(target_os = "linux", target_os = "android")) || same_process(self.pid) {
            drop(inherited);
        } else {
            std::mem::forget(inherited);
        }
        self.pid = std::process::id();
        self.interests = interests;
        Ok(())
    }

    fn kernel_fd(&self) -> Option<RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.poll.as_raw_fd())
    }
}
