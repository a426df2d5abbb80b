//! Small OS helpers shared by the loop's modules.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use forkloop_backend::cvt;

/// A non-blocking, close-on-exec pipe: `(read, write)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    #[cfg(not(any(target_os = "macos", target_os = "ios")))]
    // SAFETY: fds is a live array of two c_ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    {
        // macOS has no pipe2: close-on-exec is set right after, not atomically.
        // SAFETY: fds is a live array of two c_ints for pipe to fill.
        cvt(unsafe { libc::pipe(fds.as_mut_ptr()) })?;
        for fd in fds {
            // SAFETY: fcntl on fds pipe() just returned.
            cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) })?;
            // SAFETY: as above.
            cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) })?;
        }
    }
    // SAFETY: pipe2/pipe just returned these two fds and nothing else owns them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Where this thread's `errno` lives, so a signal handler can save and restore it.
pub(crate) fn errno_location() -> *mut libc::c_int {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: always safe to call; returns this thread's errno slot.
    return unsafe { libc::__errno_location() };
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    // SAFETY: always safe to call; returns this thread's errno slot.
    return unsafe { libc::__error() };
}

/// Reads a non-blocking pipe until it is empty (or failing, which leaves it readable
/// for the next iteration to try again).
pub(crate) fn drain(fd: &OwnedFd) {
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: reads into a live stack buffer of the given length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < buf.len() as isize {
            break;
        }
    }
}
