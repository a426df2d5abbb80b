//! `sd_notify(3)` from the master: readiness, reloads, stopping, a status line and the
//! watchdog, for a service manager that set `NOTIFY_SOCKET` (systemd's `Type=notify`).
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the socket `NOTIFY_SOCKET`
//! names: a path, or on Linux an abstract name written `@name`. It is done here rather
//! than with the `sd-notify` crate: its 0.5 needs a newer Rust than this crate's
//! `rust-version`, its 0.4 ignores `WATCHDOG_USEC` when `WATCHDOG_PID` is unset, and
//! neither reaches an abstract socket. It works on any Unix (only the abstract form is
//! Linux's).
//!
//! Only the master sends, so `NotifyAccess=main` is enough. `NOTIFY_SOCKET` stays in
//! the environment (a re-exec'd master needs it): the workers inherit it, and a copy of
//! the [`Notifier`] in a worker sends nothing.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The longest a send may wait for room in the service manager's queue: the master's
/// loop must not stall on it.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// The master's line to the service manager; every method does nothing without
/// `NOTIFY_SOCKET`. A failed send is logged at debug level, never an error: the
/// service manager may be gone, and serving goes on.
#[derive(Debug)]
pub(crate) struct Notifier {
    socket: Option<SocketAddr>,
    /// The process that may send: the master, and not the workers forked with a copy.
    master: u32,
    /// The last `STATUS=` sent, not sent again while it holds.
    status: String,
    /// Sends nothing (an upgrade's new master, until it takes over: it is not the main
    /// process yet, and under `NotifyAccess=all` its `STOPPING=1` would stop the
    /// service).
    held: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (leaving it set).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|value| {
            let address = socket_address(value.as_encoded_bytes());
            if let Err(e) = &address {
                log::debug!("NOTIFY_SOCKET={value:?}: {e}; not notifying");
            }
            address.ok()
        });
        Notifier {
            socket,
            master: std::process::id(),
            status: String::new(),
            held: false,
        }
    }

    /// Whether there is a service manager to tell.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// `READY=1`: every worker serves (at start, and at the end of a reload).
    pub fn ready(&mut self, status: &str) {
        self.status = status.to_owned();
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// `RELOADING=1`, with the time systemd (253 and later) needs to tell this reload
    /// from an earlier one; `READY=1` ends it.
    pub fn reloading(&mut self, status: &str) {
        let now = match monotonic_usec() {
            Ok(usec) => usec,
            Err(e) => {
                log::debug!("sd_notify: no CLOCK_MONOTONIC for MONOTONIC_USEC: {e}");
                return;
            }
        };
        self.status = status.to_owned();
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={now}\nSTATUS={status}"
        ));
    }

    /// `MAINPID=` and `READY=1`: an upgrade's new master took over, and the service
    /// manager is to follow it (sent by the old master, still the main process then, so
    /// that `NotifyAccess=main` lets it through).
    pub fn main_pid(&mut self, pid: libc::pid_t, status: &str) {
        self.status = status.to_owned();
        self.send(&format!("MAINPID={pid}\nREADY=1\nSTATUS={status}"));
    }

    /// Sends nothing until [`Notifier::release`].
    pub fn hold(&mut self) {
        self.held = true;
    }

    /// Sends again.
    pub fn release(&mut self) {
        self.held = false;
    }

    /// Records `status` as the line the service manager shows, without sending it: an
    /// upgrade's new master, whose first word the old master sends for it.
    pub fn shown(&mut self, status: &str) {
        self.status = status.to_owned();
    }

    /// `STOPPING=1`: the shutdown began.
    pub fn stopping(&mut self, status: &str) {
        self.status = status.to_owned();
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// A new `STATUS=` line, unless it is the one sent last.
    pub fn status(&mut self, status: &str) {
        if self.status != status {
            self.status = status.to_owned();
            self.send(&format!("STATUS={status}"));
        }
    }

    /// `WATCHDOG=1`: the master's loop is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, message: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        if std::process::id() != self.master || self.held {
            return;
        }
        let sent = UnixDatagram::unbound().and_then(|datagram| {
            datagram.set_write_timeout(Some(SEND_TIMEOUT))?;
            datagram.send_to_addr(message.as_bytes(), socket)
        });
        match sent {
            Ok(n) if n == message.len() => log::debug!("sd_notify: {message:?}"),
            Ok(n) => log::debug!("sd_notify: {message:?}: only {n} bytes sent"),
            Err(e) => log::debug!("sd_notify: {message:?}: {e}"),
        }
    }
}

/// The address `NOTIFY_SOCKET` names: an absolute path, or `@name` (abstract, Linux).
fn socket_address(value: &[u8]) -> io::Result<SocketAddr> {
    match value {
        [b'/', ..] => {
            use std::os::unix::ffi::OsStrExt;
            SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(value))
        }
        #[cfg(target_os = "linux")]
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path (nor, on Linux, @ and an abstract name)",
        )),
    }
}

/// `CLOCK_MONOTONIC` now, in microseconds, as `MONOTONIC_USEC` wants it.
fn monotonic_usec() -> nix::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000)
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, if it is set and
/// `WATCHDOG_PID` (if set) is this process. At most every millisecond.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    let usec: u64 = match usec?.parse() {
        Ok(usec) if usec > 0 => usec,
        _ => {
            log::debug!("WATCHDOG_USEC={usec:?} is not a positive number; no watchdog");
            return None;
        }
    };
    if let Some(pid) = pid {
        if pid.parse::<u32>().ok() != Some(own) {
            log::debug!("WATCHDOG_PID={pid} is not this process ({own}); no watchdog");
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_pings_at_half_its_timeout_for_this_process_only() {
        let half = Some(Duration::from_millis(100));
        assert_eq!(watchdog_interval_from(Some("200000"), None, 7), half);
        assert_eq!(watchdog_interval_from(Some("200000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval_from(Some("200000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("200000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        let floor = Some(Duration::from_millis(1));
        assert_eq!(watchdog_interval_from(Some("1"), None, 7), floor);
    }

    #[test]
    fn notify_socket_is_an_absolute_path_or_an_abstract_name() {
        let path = socket_address(b"/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        assert!(socket_address(b"relative/notify").is_err());
        assert!(socket_address(b"").is_err());
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let abstract_name = socket_address(b"@forkloop/notify").unwrap();
            assert_eq!(
                abstract_name.as_abstract_name(),
                Some(&b"forkloop/notify"[..])
            );
        }
    }

    #[test]
    fn a_notifier_without_notify_socket_sends_nothing_and_a_worker_copy_neither() {
        let dir = std::env::temp_dir().join(format!("forkloop-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        let mut notifier = Notifier {
            socket: Some(SocketAddr::from_pathname(&path).unwrap()),
            master: std::process::id(),
            status: String::new(),
            held: false,
        };
        notifier.ready("2 workers ready");
        notifier.status("2 workers ready"); // the same: not sent again
        notifier.status("1 of 2 workers ready");
        let mut buf = [0; 256];
        let mut next = || {
            let n = receiver.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert_eq!(next(), "READY=1\nSTATUS=2 workers ready");
        assert_eq!(next(), "STATUS=1 of 2 workers ready");
        notifier.master += 1; // as in a worker forked with a copy
        notifier.watchdog();
        let none = Notifier {
            socket: None,
            ..notifier
        };
        none.watchdog();
        let err = receiver.recv(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
