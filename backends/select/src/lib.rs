//! The select(2) backend: no kernel state, so nothing to rebuild after fork.
//!
//! select's `fd_set` is a fixed bitmap of `FD_SETSIZE` bits; in C an fd beyond it is a
//! buffer overflow. Here registering such an fd is an error that says what to use instead.
//! select cannot tell a hangup from readability, so hangup-only interest is refused.
//! It has no exclusive wake-ups: `Interest::EXCLUSIVE` is ignored.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::time::Duration;

use forkloop_backend::{
    already_registered, check_fd_number, check_fd_open, closed_while_registered, cvt,
    not_registered, refused, Backend, Event, FdMap, Interest, Readiness, Refusal,
};

/// select(2) over the backend's own list of registrations.
#[derive(Default)]
pub struct Select {
    registrations: Vec<(RawFd, Interest)>,
    index: FdMap<usize>,
}

impl Select {
    /// A backend with nothing registered. It needs no kernel object, so it cannot fail.
    pub fn new() -> Select {
        Select::default()
    }

    /// Adds an fd already checked (by `register`, or once before, for the loop's table).
    fn insert(&mut self, fd: RawFd, interest: Interest) {
        self.index.insert(fd, self.registrations.len());
        self.registrations.push((fd, interest));
    }
}

fn check_interest(fd: RawFd, interest: Interest) -> io::Result<()> {
    if interest.contains(Interest::HANGUP) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("select: cannot report a hangup on fd {fd} apart from readability; watch it for read, or use the poll or epoll backend"),
        ));
    }
    Ok(())
}

fn empty_set() -> libc::fd_set {
    let mut set = MaybeUninit::<libc::fd_set>::uninit();
    // SAFETY: FD_ZERO initializes every bit of the set it is given.
    unsafe {
        libc::FD_ZERO(set.as_mut_ptr());
        set.assume_init()
    }
}

/// A timeout as a timeval, rounded up to the microsecond.
fn timeval(timeout: Duration) -> libc::timeval {
    let micros = timeout.as_nanos().div_ceil(1_000);
    let secs = (micros / 1_000_000).min(libc::time_t::MAX as u128);
    libc::timeval {
        tv_sec: secs as libc::time_t,
        tv_usec: (micros % 1_000_000) as libc::suseconds_t,
    }
}

impl Backend for Select {
    fn name(&self) -> &'static str {
        "select"
    }

    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        // Not whether it is open: select(2) says so at the wait (EBADF, below).
        check_fd_number(fd)?;
        if fd >= libc::FD_SETSIZE as RawFd {
            let limit = libc::FD_SETSIZE;
            return Err(refused("select", fd, Refusal::AboveLimit { limit }));
        }
        check_interest(fd, interest)?;
        if self.index.contains(fd) {
            return Err(already_registered("select", fd));
        }
        self.insert(fd, interest);
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        check_interest(fd, interest)?;
        let i = *self
            .index
            .get(fd)
            .ok_or_else(|| not_registered("select", fd))?;
        self.registrations[i].1 = interest;
        Ok(())
    }

    fn deregister(&mut self, fd: RawFd) -> io::Result<()> {
        let i = self
            .index
            .remove(fd)
            .ok_or_else(|| not_registered("select", fd))?;
        self.registrations.swap_remove(i);
        if let Some(&(moved, _)) = self.registrations.get(i) {
            self.index.insert(moved, i);
        }
        Ok(())
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        let (mut read, mut write) = (empty_set(), empty_set());
        let mut nfds = 0;
        for &(fd, interest) in &self.registrations {
            // SAFETY: register() refused every fd outside 0..FD_SETSIZE.
            unsafe {
                if interest.contains(Interest::READ) {
                    libc::FD_SET(fd, &mut read);
                }
                if interest.contains(Interest::WRITE) {
                    libc::FD_SET(fd, &mut write);
                }
            }
            nfds = nfds.max(fd + 1);
        }
        let mut tv = timeout.map(timeval);
        let tv_ptr = tv.as_mut().map_or(std::ptr::null_mut(), |tv| tv as *mut _);
        // SAFETY: the sets and the timeval are live locals; nfds bounds the sets.
        match cvt(unsafe {
            libc::select(nfds, &mut read, &mut write, std::ptr::null_mut(), tv_ptr)
        }) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => {
                let closed = self
                    .registrations
                    .iter()
                    .find(|(fd, _)| check_fd_open(*fd).is_err());
                return Err(closed.map_or(e, |&(fd, _)| closed_while_registered("select", fd)));
            }
            Err(e) => return Err(e),
        }
        for &(fd, _) in &self.registrations {
            let mut readiness = Readiness::NONE;
            // SAFETY: fd is within 0..FD_SETSIZE (checked at registration).
            unsafe {
                if libc::FD_ISSET(fd, &read) {
                    readiness |= Readiness::READABLE;
                }
                if libc::FD_ISSET(fd, &write) {
                    readiness |= Readiness::WRITABLE;
                }
            }
            if !readiness.is_empty() {
                events.push(Event { fd, readiness });
            }
        }
        Ok(())
    }

    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (RawFd, Interest)>,
    ) -> io::Result<()> {
        // No kernel state is shared, but the loop's table is the truth: a cancel made in
        // the child before this ran changed it and not this list. Every fd in it passed
        // `register`'s checks once.
        *self = Select::new();
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

    /// An fd is not checked at registration (no fcntl per fd); select's EBADF at the
    /// wait is the check, and the error names the fd.
    #[test]
    fn an_fd_that_is_not_open_is_refused_at_the_wait_not_at_registration() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the live array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the pipe's own fds, closed once each. The only test of this binary:
        // no other thread can be given the numbers meanwhile.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        let mut select = Select::new();
        select
            .register(fds[0], Interest::READ)
            .expect("registering costs no syscall, so it cannot tell");
        let err = select
            .wait(&mut Vec::new(), Some(Duration::ZERO))
            .unwrap_err();
        assert_eq!(
            refusal(&err),
            Some((fds[0], Refusal::ClosedWhileRegistered)),
            "{err}"
        );
        assert!(
            select.register(-1, Interest::READ).is_err(),
            "negative fds are"
        );
    }
}
