//! Small OS helpers shared by the loop's modules.

use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::unistd;

/// A non-blocking, close-on-exec pipe: `(read, write)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    #[cfg(not(any(target_os = "macos", target_os = "ios")))]
    return Ok(unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?);
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    {
        // macOS has no pipe2: close-on-exec is set right after, not atomically.
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let (read, write) = unistd::pipe()?;
        for fd in [&read, &write] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
            fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        Ok((read, write))
    }
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
    while let Ok(n) = unistd::read(fd, &mut buf) {
        if n < buf.len() {
            break;
        }
    }
}
