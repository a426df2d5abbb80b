//! `forkloop serve` under systemd's two protocols, as real processes: `sd_notify` to a
//! `NOTIFY_SOCKET` the test binds (every datagram's sender is checked to be the
//! master), and socket activation, by systemd's own `systemd-socket-activate` where
//! this machine has it, and by a shell that puts the sockets at fds 3 and 4 itself.
#![cfg(target_os = "linux")]

mod common;

use std::io::{self, IoSliceMut, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Instant;

use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixAddr, UnixCredentials,
};

use common::*;

/// The service manager's end of `sd_notify`: the datagram socket `NOTIFY_SOCKET` names.
struct Notifications {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Notifications {
    fn bind(scratch: &Scratch) -> Notifications {
        let path = scratch.path("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        // As systemd does: the kernel then tells the sender of each datagram.
        setsockopt(&socket, sockopt::PassCred, &true).unwrap();
        Notifications { socket, path }
    }

    /// Waits (bounded) for a datagram with a line that starts with `line`, and returns
    /// its lines. Every datagram must come from `server`'s master.
    fn wait_for(&self, server: &Server, line: &str) -> Vec<String> {
        let deadline = Instant::now() + LIMIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no datagram with {line:?} within {LIMIT:?}; got {seen:?}"
            );
            self.socket.set_read_timeout(Some(left)).unwrap();
            let (text, sender) = match self.receive() {
                Ok(datagram) => datagram,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("receiving a notification: {e}"),
            };
            assert_eq!(
                sender, server.pid,
                "{text:?} was sent by {sender}, not by the master"
            );
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.iter().any(|l| l.starts_with(line)) {
                return lines;
            }
            seen.push(text);
        }
    }

    /// One datagram and its sender's pid.
    fn receive(&self) -> nix::Result<(String, libc::pid_t)> {
        let mut buf = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(UnixCredentials);
        let (bytes, sender) = {
            let flags = MsgFlags::empty();
            let message =
                recvmsg::<UnixAddr>(self.socket.as_raw_fd(), &mut iov, Some(&mut space), flags)?;
            let sender = message.cmsgs()?.find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(credentials) => Some(credentials.pid()),
                _ => None,
            });
            (
                message.bytes,
                sender.expect("SO_PASSCRED names every sender"),
            )
        };
        Ok((String::from_utf8_lossy(&buf[..bytes]).into_owned(), sender))
    }
}

/// The value of the line `KEY=…` of a datagram.
fn field<'a>(lines: &'a [String], key: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {lines:?}"))
}

fn monotonic_usec() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000
}

/// `forkloop serve args`, told to notify `notifications`.
fn notifying(notifications: &Notifications, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.arg("serve")
        .args(args)
        .env("NOTIFY_SOCKET", &notifications.path);
    cmd
}

#[test]
fn ready_at_start_then_reloading_and_ready_at_hup_then_stopping_at_term() {
    let scratch = Scratch::new("lifecycle");
    let notes = Notifications::bind(&scratch);
    let args = ["--listen", "127.0.0.1:0", "--workers", "2"];
    let server = spawn_command(notifying(&notes, &args));
    let ready = notes.wait_for(&server, "READY=1");
    assert!(
        field(&ready, "STATUS=").starts_with("2 workers ready on "),
        "{ready:?}"
    );
    let mut server = wait_ready(server);
    assert_eq!(get(&server.addr, "/").0, 200, "answers once ready");

    let before = monotonic_usec();
    server.signal(libc::SIGHUP);
    let reloading = notes.wait_for(&server, "RELOADING=1");
    let after = monotonic_usec();
    let usec: u64 = field(&reloading, "MONOTONIC_USEC=").parse().unwrap();
    assert!(
        (before..=after).contains(&usec),
        "MONOTONIC_USEC={usec} is not between {before} and {after}, the test's own clock"
    );
    let reloaded = notes.wait_for(&server, "READY=1");
    assert!(
        field(&reloaded, "STATUS=").starts_with("reloaded: 2 workers ready on "),
        "{reloaded:?}"
    );
    server.wait_for_count("retired: exit status: 0", 2);
    assert_eq!(get(&server.addr, "/").0, 200);

    server.signal(libc::SIGTERM);
    let stopping = notes.wait_for(&server, "STOPPING=1");
    assert_eq!(
        field(&stopping, "STATUS="),
        "stopping (TERM): draining 2 workers"
    );
    assert!(server.wait_exit().success());
}

/// An upgrade (USR2) under `NotifyAccess=main`: only the main process may notify, so
/// the old master, still main, tells systemd to follow the new one (`MAINPID=`) once
/// it is ready; the new master sends nothing before that, and the old one no
/// `STOPPING=1` after it (the service goes on).
#[test]
fn an_upgrade_hands_systemd_the_new_main_pid_from_the_old_master() {
    let scratch = Scratch::new("upgrade");
    let notes = Notifications::bind(&scratch);
    let pid_file = scratch.path("forkloop.pid");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--pid-file",
        pid_file.to_str().unwrap(),
    ];
    let server = spawn_command(notifying(&notes, &args));
    notes.wait_for(&server, "READY=1");
    let mut server = wait_ready(server);
    server.signal(libc::SIGUSR2);
    let reloading = notes.wait_for(&server, "RELOADING=1");
    assert!(
        field(&reloading, "STATUS=").starts_with("upgrading"),
        "{reloading:?}"
    );
    let handed = notes.wait_for(&server, "MAINPID=");
    assert!(handed.iter().any(|l| l == "READY=1"), "{handed:?}");
    let new_master: libc::pid_t = field(&handed, "MAINPID=").parse().unwrap();
    let written = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(written.trim().parse::<libc::pid_t>().unwrap(), new_master);
    assert!(server.wait_exit().success());
    // Nothing from the old master after MAINPID (no STOPPING=1): the socket is empty.
    notes
        .socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    assert!(notes.receive().is_err(), "a datagram after the hand-over");
    assert_eq!(get(&server.addr, "/").0, 200, "the new master serves");
    // The control socket is the new master's too (the old one's went with it).
    let status = Command::new(binary())
        .args(["status", "--json", "--pid-file", pid_file.to_str().unwrap()])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["master"], new_master);
    assert!(!scratch.path("forkloop.pid.ctl.oldbin").exists());
    // SAFETY: kill has no memory-safety preconditions; the test started this master.
    unsafe { libc::kill(new_master, libc::SIGTERM) };
    eventually("the new master exiting", || !running(new_master));
}

#[test]
fn a_reload_whose_workers_cannot_start_still_ends_with_ready_saying_it_failed() {
    let scratch = Scratch::new("failed-reload");
    let notes = Notifications::bind(&scratch);
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--app",
        "crash-after-the-first",
    ];
    let server = wait_ready(spawn_command(notifying(&notes, &args)));
    notes.wait_for(&server, "READY=1");
    server.signal(libc::SIGHUP);
    notes.wait_for(&server, "RELOADING=1");
    let ready = notes.wait_for(&server, "READY=1");
    let status = field(&ready, "STATUS=");
    assert!(
        status.starts_with("reload failed: 2 of 2 new workers did not start"),
        "{status}"
    );
    assert_eq!(get(&server.addr, "/").0, 200, "the old workers serve on");
}

#[test]
fn a_master_that_gives_up_at_start_sends_stopping_with_the_reason() {
    let scratch = Scratch::new("give-up");
    let notes = Notifications::bind(&scratch);
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--app",
        "crash-at-start",
    ];
    let mut server = spawn_command(notifying(&notes, &args));
    let stopping = notes.wait_for(&server, "STOPPING=1");
    let status = field(&stopping, "STATUS=");
    assert!(
        status.contains("workers in a row exited before becoming ready")
            && status.ends_with("giving up"),
        "{status}"
    );
    assert_eq!(server.wait_exit().code(), Some(1));
}

#[test]
fn watchdog_pings_keep_coming_when_watchdog_usec_is_set() {
    let scratch = Scratch::new("watchdog");
    let notes = Notifications::bind(&scratch);
    let args = ["--listen", "127.0.0.1:0", "--workers", "1"];
    let mut cmd = notifying(&notes, &args);
    cmd.env("WATCHDOG_USEC", "200000");
    let server = spawn_command(cmd);
    for _ in 0..5 {
        notes.wait_for(&server, "WATCHDOG=1");
    }
}

#[test]
fn ttin_and_ttou_change_the_status_line() {
    let scratch = Scratch::new("status");
    let notes = Notifications::bind(&scratch);
    let args = ["--listen", "127.0.0.1:0", "--workers", "1"];
    let server = spawn_command(notifying(&notes, &args));
    let ready = notes.wait_for(&server, "READY=1");
    assert!(field(&ready, "STATUS=").starts_with("1 worker ready on "));
    server.signal(libc::SIGTTIN);
    notes.wait_for(&server, "STATUS=1 of 2 workers ready on ");
    notes.wait_for(&server, "STATUS=2 workers ready on ");
    server.signal(libc::SIGTTOU);
    notes.wait_for(&server, "STATUS=1 worker ready on ");
}

/// What systemd does, by hand: a shell exports `LISTEN_PID` (its own pid, which `exec`
/// keeps), `LISTEN_FDS` and, if given, `LISTEN_FDNAMES`, then becomes
/// `forkloop serve args` with `sockets` at fds 3, 4, …
fn activated(sockets: &[&dyn AsFd], names: Option<&str>, args: &[&str]) -> Command {
    // Copies from fd 100 up, above the fds 3.. they are put at, close-on-exec so that
    // no other child of this process gets them.
    let copies: Vec<OwnedFd> = sockets
        .iter()
        .map(|socket| {
            // SAFETY: F_DUPFD_CLOEXEC makes a new fd, which nothing else owns.
            let fd = unsafe { libc::fcntl(socket.as_fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
            assert!(fd >= 100, "dup: {}", io::Error::last_os_error());
            // SAFETY: `fd` was just made, and is owned by this OwnedFd only.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    let mut script = format!("export LISTEN_PID=$$ LISTEN_FDS={}", sockets.len());
    if let Some(names) = names {
        script.push_str(&format!(" LISTEN_FDNAMES={names}"));
    }
    script.push_str("; exec \"$0\" \"$@\"");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(binary())
        .arg("serve")
        .args(args);
    // SAFETY: the closure runs in the forked child before exec, and calls only dup2,
    // which is async-signal-safe, on fds it owns; it allocates nothing. (If std's own
    // close-on-exec error pipe is at one of fds 3.., it is replaced: only a failed
    // exec of `sh` would then go unreported.)
    unsafe {
        cmd.pre_exec(move || {
            for (target, copy) in (3..).zip(&copies) {
                if libc::dup2(copy.as_raw_fd(), target) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Where fd `fd` of process `pid` leads (`socket:[inode]` for a socket).
fn fd_target(pid: impl std::fmt::Display, fd: impl std::fmt::Display) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
    link.display().to_string()
}

/// The open flags of fd `fd` of process `pid`.
fn fd_flags(pid: libc::pid_t, fd: i32) -> i32 {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
    i32::from_str_radix(flags.trim(), 8).unwrap()
}

#[test]
fn activated_sockets_are_served_by_name_as_they_were_handed_over() {
    let scratch = Scratch::new("by-name");
    let notes = Notifications::bind(&scratch);
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let unix_path = scratch.path("admin.sock");
    let unix = UnixListener::bind(&unix_path).unwrap();
    let args = [
        "--listen",
        "admin",
        "--listen",
        "web",
        "--workers",
        "2",
        "--app",
        "environment",
    ];
    let mut cmd = activated(&[&tcp, &unix], Some("web:admin"), &args);
    cmd.env("NOTIFY_SOCKET", &notes.path);
    let mut server = wait_ready(spawn_command(cmd));
    let line = server.wait_for("ready: listening on");
    let order = format!("listening on unix:{}, {tcp_addr} with", unix_path.display());
    assert!(line.contains(&order), "{line}");
    notes.wait_for(&server, "READY=1");
    let addr = tcp_addr.to_string();
    assert_eq!(get(&addr, "/"), (200, "Hello, World!".into()));
    assert_eq!(get_unix(&unix_path, "/"), (200, "Hello, World!".into()));

    // The master holds the very sockets handed to it, close-on-exec and non-blocking.
    for (fd, socket) in [(3, tcp.as_raw_fd()), (4, unix.as_raw_fd())] {
        assert_eq!(fd_target(server.pid, fd), fd_target("self", socket));
        let flags = fd_flags(server.pid, fd);
        assert_eq!(
            flags & libc::O_CLOEXEC,
            libc::O_CLOEXEC,
            "fd {fd}: {flags:o}"
        );
        assert_eq!(
            flags & libc::O_NONBLOCK,
            libc::O_NONBLOCK,
            "fd {fd}: {flags:o}"
        );
    }
    // The workers (and what they run) see NOTIFY_SOCKET, and no LISTEN_ variable.
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert_eq!(get(&addr, &format!("/env?name={name}")).0, 404, "{name}");
    }
    let notify_socket = notes.path.display().to_string();
    assert_eq!(get(&addr, "/env?name=NOTIFY_SOCKET"), (200, notify_socket));

    server.signal(libc::SIGTERM);
    notes.wait_for(&server, "STOPPING=1");
    assert!(server.wait_exit().success());
    // Still the handing side's, as it left them: the file stays, and both still take
    // connections (the master filters only the sockets it bound).
    assert!(
        unix_path.exists(),
        "the master removed systemd's socket file"
    );
    TcpStream::connect_timeout(&tcp_addr, LIMIT).expect("the TCP socket takes connections");
    UnixStream::connect(&unix_path).expect("the Unix socket takes connections");
}

#[test]
fn activated_sockets_whose_names_match_no_listen_value_go_in_order() {
    let scratch = Scratch::new("in-order");
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap().to_string();
    let unix_path = scratch.path("app.sock");
    let unix = UnixListener::bind(&unix_path).unwrap();
    // Binding these instead would fail: this process holds both, listening.
    let unix_listen = format!("unix:{}", unix_path.display());
    let args = ["--listen", &tcp_addr, "--listen", &unix_listen];
    // systemd's default names: the socket unit's.
    let names = Some("app.socket:app.socket");
    let mut server = wait_ready(spawn_command(activated(&[&tcp, &unix], names, &args)));
    let line = server.wait_for("ready: listening on");
    assert!(
        line.contains(&format!("listening on {tcp_addr}, {unix_listen} with")),
        "{line}"
    );
    assert_eq!(get(&tcp_addr, "/").0, 200);
    assert_eq!(get_unix(&unix_path, "/").0, 200);
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
    assert!(
        unix_path.exists(),
        "an activated socket's file is never removed"
    );
}

/// An activated `forkloop serve` that must refuse to start: it exits 1, within the
/// bound, saying `why`, and nothing panics.
/// An upgrade passes on activated sockets as systemd's still: the new master, at its
/// own shutdown, leaves them taking connections and their files in place, and the
/// upgrade's variables are gone from its workers' environment.
#[test]
fn an_upgrade_of_an_activated_master_keeps_the_sockets_systemds() {
    let scratch = Scratch::new("activated-upgrade");
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let unix_path = scratch.path("web.sock");
    let unix = UnixListener::bind(&unix_path).unwrap();
    let args = [
        "--listen",
        "web",
        "--listen",
        "admin",
        "--workers",
        "1",
        "--app",
        "environment",
    ];
    let mut server = wait_ready(spawn_command(activated(
        &[&tcp, &unix],
        Some("web:admin"),
        &args,
    )));
    server.signal(libc::SIGUSR2);
    let new_master = new_master(&mut server);
    server.wait_for("USR2: the new master");
    assert!(server.wait_exit().success());
    let addr = tcp_addr.to_string();
    for name in ["LISTEN_PID", "FORKLOOP_UPGRADE_FD", "FORKLOOP_UPGRADE_OWN"] {
        assert_eq!(get(&addr, &format!("/env?name={name}")).0, 404, "{name}");
    }
    assert_eq!(
        get_unix(&unix_path, "/").0,
        200,
        "the new master serves both"
    );
    // SAFETY: kill has no memory-safety preconditions; the test started this master.
    unsafe { libc::kill(new_master, libc::SIGTERM) };
    eventually("the new master exiting", || !running(new_master));
    assert!(
        unix_path.exists(),
        "the new master removed systemd's socket file"
    );
    TcpStream::connect_timeout(&tcp_addr, LIMIT).expect("the TCP socket takes connections");
    UnixStream::connect(&unix_path).expect("the Unix socket takes connections");
}

#[test]
fn an_activated_master_with_reuse_port_upgrades_and_keeps_its_worker_count() {
    // systemd's socket is not the master's to multiply: it stays shared, before the
    // upgrade and after (the new master must not take it for one lane of a group).
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap().to_string();
    let args = ["--listen", "web", "--workers", "2", "--reuse-port"];
    let mut server = wait_ready(spawn_command(activated(&[&tcp], Some("web"), &args)));
    server.signal(libc::SIGUSR2);
    let new_master = new_master(&mut server);
    server.wait_for("is ready; this one drains");
    assert!(server.wait_exit().success());
    eventually("the new master's 2 workers", || {
        children(new_master).len() == 2
    });
    assert_eq!(
        listening_sockets(port_of(&addr)).len(),
        1,
        "one shared socket"
    );
    assert_eq!(get(&addr, "/").0, 200);
    // SAFETY: kill has no memory-safety preconditions; the test started this master.
    unsafe { libc::kill(new_master, libc::SIGTERM) };
    eventually("the new master exiting", || !running(new_master));
}

/// Waits for the master to start an upgrade, and gives the new master's pid.
fn new_master(server: &mut Server) -> libc::pid_t {
    let line = server.wait_for("USR2: upgrading: new master ");
    line.split("new master ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// A copy of `forkloop` in `scratch`, to start a master from and replace later.
fn deployed(scratch: &Scratch) -> PathBuf {
    let app = scratch.path("forkloop");
    std::fs::copy(binary(), &app).unwrap();
    app
}

/// Puts `script` (a shell script) where `app` is, as a deploy does.
fn replace_with_script(app: &std::path::Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let new = app.with_extension("new");
    std::fs::write(&new, script).unwrap();
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&new, app).unwrap();
}

/// A new build that is a real forkloop master which gives up at start (its workers
/// crash): its shutdown must leave the shared sockets as the old master has them (no
/// drop filter, no unlinked file), and it must say nothing to systemd, not being the
/// main process; the old master serves on, new connections too.
#[test]
fn a_new_master_that_gives_up_leaves_the_sockets_and_systemd_to_the_old_one() {
    let scratch = Scratch::new("upgrade-gives-up");
    let notes = Notifications::bind(&scratch);
    let app = deployed(&scratch);
    let unix = scratch.path("web.sock");
    let unix_listen = format!("unix:{}", unix.display());
    let mut cmd = Command::new(&app);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--listen", &unix_listen])
        .args(["--workers", "1"])
        .env("NOTIFY_SOCKET", &notes.path);
    let server = spawn_command(cmd);
    notes.wait_for(&server, "READY=1");
    let mut server = wait_ready(server);
    let real = binary().into_string().unwrap();
    replace_with_script(
        &app,
        &format!("#!/bin/sh\nexec '{real}' \"$@\" --app crash-at-start\n"),
    );
    server.signal(libc::SIGUSR2);
    // Every datagram until the rollback's READY=1 comes from the old master.
    let failed = notes.wait_for(&server, "READY=1");
    assert!(
        field(&failed, "STATUS=").starts_with("upgrade failed"),
        "{failed:?}"
    );
    server.wait_for("rolling back: this master serves on");
    // New connections, on both sockets.
    let tcp = TcpStream::connect_timeout(&server.addr.parse().unwrap(), LIMIT);
    drop(tcp.expect("the TCP socket takes new connections"));
    assert_eq!(get(&server.addr, "/").0, 200);
    assert!(
        unix.exists(),
        "the new master removed the Unix socket's file"
    );
    assert_eq!(get_unix(&unix, "/").0, 200);
}

/// After an upgrade, the new master pings the watchdog (systemd's `WATCHDOG_PID`
/// named the old one).
#[test]
fn after_an_upgrade_the_new_master_pings_the_watchdog() {
    let scratch = Scratch::new("upgrade-watchdog");
    let notes = Notifications::bind(&scratch);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" serve --listen 127.0.0.1:0 --workers 1")
        .arg(binary())
        .env("NOTIFY_SOCKET", &notes.path)
        .env("WATCHDOG_USEC", "200000");
    let server = spawn_command(cmd);
    notes.wait_for(&server, "WATCHDOG=1");
    let mut server = wait_ready(server);
    server.signal(libc::SIGUSR2);
    let handed = notes.wait_for(&server, "MAINPID=");
    let new_master: libc::pid_t = field(&handed, "MAINPID=").parse().unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "no WATCHDOG=1 from the new master"
        );
        notes.socket.set_read_timeout(Some(LIMIT)).unwrap();
        match notes.receive() {
            Ok((text, sender)) if sender == new_master && text.contains("WATCHDOG=1") => break,
            Ok(_) | Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(server.wait_exit().success());
    // SAFETY: kill has no memory-safety preconditions; the test started this master.
    unsafe { libc::kill(new_master, libc::SIGTERM) };
    eventually("the new master exiting", || !running(new_master));
}

fn refuses(cmd: Command, why: &str) {
    let mut server = spawn_command(cmd);
    let status = server.wait_exit();
    let log = server.log.join("\n");
    assert_eq!(status.code(), Some(1), "{status}; log:\n{log}");
    assert!(log.contains(why), "the log does not say {why:?}:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn more_activated_sockets_than_listen_values_is_a_clear_error() {
    let (a, b) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    refuses(
        activated(&[&a, &b], None, &["--listen", "127.0.0.1:0"]),
        "socket activation: LISTEN_FDS=2 passed 2 sockets, but there is 1 --listen value \
         (127.0.0.1:0)",
    );
}

#[test]
fn an_activated_socket_name_that_matches_no_listen_value_is_a_clear_error() {
    let (a, b) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let args = ["--listen", "web", "--listen", "admin"];
    refuses(
        activated(&[&a, &b], Some("web:nope"), &args),
        "socket activation: fd 4 is named \"nope\", which is no --listen value, and \
         --listen admin names no socket",
    );
}

#[test]
fn an_activated_fd_that_is_not_a_socket_is_a_clear_error() {
    let scratch = Scratch::new("not-a-socket");
    let file = std::fs::File::create(scratch.path("regular")).unwrap();
    refuses(
        activated(&[&file], None, &["--listen", "127.0.0.1:0"]),
        "socket activation: fd 3 (--listen 127.0.0.1:0) is not a socket",
    );
}

/// systemd's own tool, if this machine has it (Debian's systemd package).
fn systemd_socket_activate() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/lib/systemd")])
        .map(|dir| dir.join("systemd-socket-activate"))
        .find(|tool| tool.is_file())
}

fn skipped(why: &str) {
    // To the process's stderr itself: the test harness captures eprintln!, not this.
    let _ = writeln!(io::stderr(), "\n*** SKIPPED: {why} ***\n");
}

/// A TCP port free on 127.0.0.1 for systemd-socket-activate to bind, from 10000-29999:
/// below Linux's default ephemeral range (32768-60999), so that no other test's
/// `bind(:0)` or connection takes it between this check and that bind. Each call
/// starts from another candidate.
fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % 10_000) as u16;
    (0..1000)
        .map(|_| 10_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 20_000)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port")
}

#[test]
fn systemd_socket_activate_hands_over_named_sockets_that_are_served() {
    let Some(tool) = systemd_socket_activate() else {
        return skipped("systemd-socket-activate is not installed (apt-get install systemd)");
    };
    let scratch = Scratch::new("ssa-named");
    let tcp_addr = format!("127.0.0.1:{}", free_port());
    let unix_path = scratch.path("admin.sock");
    let mut cmd = Command::new(tool);
    cmd.args(["-l", &tcp_addr, "-l"])
        .arg(&unix_path)
        .arg("--fdname=web:admin")
        .arg(binary())
        .args([
            "serve",
            "--listen",
            "admin",
            "--listen",
            "web",
            "--workers",
            "2",
        ]);
    let mut server = spawn_command(cmd);
    server.wait_for(&format!("Listening on {} as 4.", unix_path.display()));
    // It execs forkloop at the first connection, which waits in the socket's queue
    // meanwhile: only the inherited socket can answer it.
    assert_eq!(get(&tcp_addr, "/"), (200, "Hello, World!".into()));
    let mut server = wait_ready(server);
    let line = server.wait_for("ready: listening on");
    let order = format!("listening on unix:{}, {tcp_addr} with", unix_path.display());
    assert!(line.contains(&order), "{line}");
    assert_eq!(get_unix(&unix_path, "/").0, 200);
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
    assert!(
        unix_path.exists(),
        "the master removed systemd's socket file"
    );
}

/// The inode of the one socket listening on 127.0.0.1:`port`.
fn listening_inode(port: u16) -> String {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!("0100007F:{port:04X}");
    let listening: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        // local_address, rem_address, st (0A: LISTEN), …, inode
        .filter(|f| f[1] == local && f[3] == "0A")
        .map(|f| f[9])
        .collect();
    assert_eq!(listening.len(), 1, "listening on {port}: {listening:?}");
    listening[0].to_owned()
}

#[test]
fn systemd_socket_activate_socket_is_the_one_served_in_order() {
    let Some(tool) = systemd_socket_activate() else {
        return skipped("systemd-socket-activate is not installed (apt-get install systemd)");
    };
    let port = free_port();
    let tcp_addr = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(tool);
    cmd.args(["-l", &tcp_addr]).arg(binary()).args([
        "serve",
        "--listen",
        &tcp_addr,
        "--workers",
        "1",
    ]);
    let mut server = spawn_command(cmd);
    server.wait_for(&format!("Listening on {tcp_addr} as 3."));
    assert_eq!(get(&tcp_addr, "/").0, 200);
    let mut server = wait_ready(server);
    assert_eq!(server.addr, tcp_addr);
    let inode = listening_inode(port);
    assert_eq!(fd_target(server.pid, 3), format!("socket:[{inode}]"));
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
}
