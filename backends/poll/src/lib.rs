//! The poll(2) backend: no kernel state, so nothing to rebuild after fork.
//!
//! poll(2) has no exclusive wake-ups: `Interest::EXCLUSIVE` is ignored.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use forkloop_backend::{
    already_registered, check_fd_number, closed_while_registered, cvt, not_registered, timeout_ms,
    Backend, Event, FdMap, Interest, Readiness,
};

/// poll(2) over an array the backend keeps in step with the registrations.
#[derive(Default)]
pub struct Poll {
    fds: Vec<libc::pollfd>,
    index: FdMap<usize>,
}

impl Poll {
    /// A backend with nothing registered. It needs no kernel object, so it cannot fail.
    pub fn new() -> Poll {
        Poll::default()
    }

    /// Adds an fd already checked (by `register`, or once before, for the loop's table).
    fn insert(&mut self, fd: RawFd, interest: Interest) {
        self.index.insert(fd, self.fds.len());
        self.fds.push(libc::pollfd {
            fd,
            events: interest_to_events(interest),
            revents: 0,
        });
    }
}

fn interest_to_events(interest: Interest) -> libc::c_short {
    let mut events = 0;
    if interest.contains(Interest::READ) {
        events |= libc::POLLIN;
    }
    if interest.contains(Interest::WRITE) {
        events |= libc::POLLOUT;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if interest.contains(Interest::HANGUP) {
        events |= libc::POLLRDHUP;
    }
    events
}

fn revents_to_readiness(revents: libc::c_short) -> Readiness {
    let mut r = Readiness::NONE;
    if revents & libc::POLLIN != 0 {
        r |= Readiness::READABLE;
    }
    if revents & libc::POLLOUT != 0 {
        r |= Readiness::WRITABLE;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if revents & libc::POLLRDHUP != 0 {
        r |= Readiness::HANGUP;
    }
    if revents & libc::POLLHUP != 0 {
        r |= Readiness::HANGUP;
    }
    if revents & libc::POLLERR != 0 {
        r |= Readiness::ERROR;
    }
    r
}

impl Backend for Poll {
    fn name(&self) -> &'static str {
        "poll"
    }

    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        // Not whether it is open: poll(2) says so at the wait (POLLNVAL, below).
        check_fd_number(fd)?;
        if self.index.contains(fd) {
            return Err(already_registered("poll", fd));
        }
        self.insert(fd, interest);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        let i = *self
            .index
            .get(fd)
            .ok_or_else(|| not_registered("poll", fd))?;
        self.fds[i].events = interest_to_events(interest);
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let i = self
            .index
            .remove(fd)
            .ok_or_else(|| not_registered("poll", fd))?;
        self.fds.swap_remove(i);
        if let Some(moved) = self.fds.get(i) {
            self.index.insert(moved.fd, i);
        }
        Ok(())
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        // SAFETY: the pointer and length describe the backend's own pollfd array.
        let n = match cvt(unsafe {
            libc::poll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                timeout_ms(timeout),
            )
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut left = n;
        for pfd in &self.fds {
            if left == 0 {
                break;
            }
            if pfd.revents == 0 {
                continue;
            }
            left -= 1;
            if pfd.revents & libc::POLLNVAL != 0 {
                return Err(closed_while_registered("poll", pfd.fd));
            }
            events.push(Event {
                fd: pfd.fd,
                readiness: revents_to_readiness(pfd.revents),
            });
        }
        Ok(())
    }

    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (RawFd, Interest)>,
    ) -> io::Result<()> {
        // No kernel state is shared, but the loop's table is the truth: a cancel made in
        // the child before this ran changed it and not the pollfd array.
        *self = Poll::new();
        for (fd, interest) in registrations {
            self.insert(fd, interest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkloop_backend::{refusal, Refusal};

    /// An fd is not checked at registration (no fcntl per fd); the kernel's POLLNVAL at
    /// the wait is the check, and names the fd.
    #[test]
    fn an_fd_that_is_not_open_is_refused_at_the_wait_not_at_registration() {
        let never_open = 1_000_000; // far above any fd this test process opens
        let mut poll = Poll::new();
        poll.register(never_open, Interest::READ)
            .expect("registering costs no syscall, so it cannot tell");
        let err = poll
            .wait(&mut Vec::new(), Some(Duration::ZERO))
            .unwrap_err();
        assert_eq!(
            refusal(&err),
            Some((never_open, Refusal::ClosedWhileRegistered)),
            "{err}"
        );
        assert!(
            poll.register(-1, Interest::READ).is_err(),
            "negative fds are"
        );
    }
}
