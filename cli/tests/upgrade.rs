//! Binary upgrades (USR2) as an operator runs them, on examples/upgrade.rs: under a
//! load generator, a new build replaces the binary on disk and takes over with no
//! failed request; a broken or hung new build leaves the old master serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::load::{Load, Report, Reuse};
use common::*;

/// Where a test deploys its app: a copy of the example, which it replaces later.
struct Deploy {
    scratch: Scratch,
    app: PathBuf,
    pid_file: PathBuf,
}

impl Deploy {
    fn new(test: &str) -> Deploy {
        let scratch = Scratch::new(&format!("upgrade-{test}"));
        let app = scratch.path("app");
        std::fs::copy(example("upgrade"), &app).unwrap();
        let pid_file = scratch.path("app.pid");
        Deploy {
            scratch,
            app,
            pid_file,
        }
    }

    /// Starts the deployed binary with 2 workers and the pid file.
    fn start(&self, extra: &[&str]) -> Server {
        let pid_file = self.pid_file.to_str().unwrap();
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--pid-file",
            pid_file,
        ];
        args.extend_from_slice(extra);
        start_program(&self.app, &args)
    }

    /// Puts `binary` where the app is, as a deploy does: written beside it, then
    /// renamed over it (the running binary's file is never written to).
    fn replace(&self, binary: &[u8]) {
        let new = self.scratch.path("app.new");
        std::fs::write(&new, binary).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&new, &self.app).unwrap();
    }

    /// A new build: the app with its version stamp rewritten to `v2`.
    fn new_build(&self) -> Vec<u8> {
        let old = std::fs::read(&self.app).unwrap();
        let (from, to) = (b"forkloop-version:v1", b"forkloop-version:v2");
        let at: Vec<usize> = old
            .windows(from.len())
            .enumerate()
            .filter(|(_, w)| w == from)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 1, "the version stamp is in the binary once");
        let mut new = old;
        new[at[0]..at[0] + to.len()].copy_from_slice(to);
        new
    }

    fn pid_file_names(&self, path: &Path) -> Option<libc::pid_t> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    fn oldbin(&self) -> PathBuf {
        self.scratch.path("app.pid.oldbin")
    }
}

fn version(addr: &str) -> String {
    let (status, body) = get(addr, "/version");
    assert_eq!(status, 200);
    body.trim().to_owned()
}

fn no_failures(report: &Report) {
    assert!(
        report.failed.is_empty(),
        "{} failed: {:?}",
        report.failed.len(),
        &report.failed[..report.failed.len().min(5)]
    );
}

/// USR2 with a new build on disk, under load: the figures, and every check.
fn upgrade_under_load(reuse: Reuse, extra: &[&str]) {
    let reuse_port = extra.contains(&"--reuse-port");
    let deploy = Deploy::new(&format!(
        "{reuse:?}{}",
        if reuse_port { "-lanes" } else { "" }
    ));
    let mut server = deploy.start(extra);
    if reuse_port {
        wait_lanes(server.pid, &server.addr, 2);
    }
    let old_master = server.pid;
    let old_workers = children(old_master);
    assert_eq!(old_workers.len(), 2, "{old_workers:?}");
    assert_eq!(version(&server.addr), "v1");
    let load = Load::start(&server.addr, "/", 4, reuse, false);
    load.wait_answered(100);

    deploy.replace(&deploy.new_build());
    let sent = Instant::now();
    server.signal(libc::SIGUSR2);
    eventually("the new version answering", || {
        version(&server.addr) == "v2"
    });
    let answering = sent.elapsed();
    let status = server.wait_exit();
    let gone = server.exited_at.expect("exited") - sent;
    assert!(status.success(), "the old master exited with {status}");
    eventually("no worker of the old master left", || {
        old_workers.iter().all(|&pid| !running(pid))
    });
    let new_master = deploy
        .pid_file_names(&deploy.pid_file)
        .expect("the new master's pid file");
    assert_ne!(new_master, old_master);
    assert!(running(new_master));
    assert_eq!(children(new_master).len(), 2);
    if reuse_port {
        // The very lanes, each now served by a worker of the new master.
        wait_lanes(new_master, &server.addr, 2);
    }
    assert!(!deploy.oldbin().exists(), "the .oldbin pid file is left");
    // It serves on under the load, alone.
    load.wait_answered(load.answered() + 100);
    let report = load.finish();
    println!(
        "figure: upgrade, {reuse:?} {extra:?}: {} answered, {} failed, {} retried; new version \
         answering {answering:?} after USR2, old master gone after {gone:?}",
        report.answered,
        report.failed.len(),
        report.retried
    );
    no_failures(&report);
    // SAFETY: kill has no memory-safety preconditions; the test started this master
    // (in the group the Server's drop kills too).
    unsafe { libc::kill(new_master, libc::SIGTERM) };
    eventually("the new master exiting", || !running(new_master));
}

#[test]
fn a_new_build_takes_over_with_keep_alive_and_no_failed_request() {
    upgrade_under_load(Reuse::KeepAlive, &[]);
}

#[test]
fn a_new_build_takes_over_with_connection_close_and_no_failed_request() {
    upgrade_under_load(Reuse::Close, &[]);
}

/// USR2 with `bad` in place of the binary: the old master serves on, and its pid file
/// names it again.
fn rolls_back(test: &str, bad: &[u8], extra: &[&str], why: &str) {
    let deploy = Deploy::new(test);
    let mut server = deploy.start(extra);
    let load = Load::start(&server.addr, "/", 4, Reuse::KeepAlive, false);
    load.wait_answered(50);
    let good = std::fs::read(&deploy.app).unwrap();
    deploy.replace(bad);
    server.signal(libc::SIGUSR2);
    server.wait_for(why);
    server.wait_for("rolling back: this master serves on");
    assert_eq!(deploy.pid_file_names(&deploy.pid_file), Some(server.pid));
    assert!(!deploy.oldbin().exists());
    assert!(running(server.pid));
    let answered = load.answered();
    load.wait_answered(answered + 50);
    no_failures(&load.finish());
    assert_eq!(version(&server.addr), "v1");
    if extra.contains(&"--reuse-port") {
        wait_lanes(server.pid, &server.addr, 2);
    }
    // The good build back in place: the next upgrade goes through.
    deploy.replace(&good);
    server.signal(libc::SIGUSR2);
    assert!(server.wait_exit().success());
}

#[test]
fn a_new_build_that_exits_at_start_leaves_the_old_master_serving() {
    let broken = b"#!/bin/sh\necho 'a broken build' >&2\nexit 3\n";
    rolls_back(
        "exits",
        broken,
        &[],
        "exited before it was ready (exit status: 3)",
    );
}

#[test]
fn a_new_build_that_never_gets_ready_is_stopped_and_the_old_master_serves_on() {
    // 5 s, not less: the good build of the test's last upgrade runs with the same
    // arguments, and must get its workers ready within it on a loaded machine.
    let hung = b"#!/bin/sh\nexec sleep 600\n";
    rolls_back(
        "hangs",
        hung,
        &["--upgrade-timeout", "5"],
        "was not ready within 5s",
    );
}

#[test]
fn a_new_build_takes_over_every_reuse_port_lane_with_no_failed_request() {
    upgrade_under_load(Reuse::Close, &["--reuse-port"]);
}

#[test]
fn a_failed_upgrade_leaves_every_reuse_port_lane_served() {
    let broken = b"#!/bin/sh\nexit 3\n";
    rolls_back(
        "lanes",
        broken,
        &["--reuse-port"],
        "exited before it was ready (exit status: 3)",
    );
}

#[test]
fn hup_ttin_and_ttou_during_an_upgrade_are_refused_and_the_rollback_still_happens() {
    let deploy = Deploy::new("hup-during");
    let mut server = deploy.start(&["--upgrade-timeout", "2"]);
    let mut workers = children(server.pid);
    workers.sort_unstable();
    deploy.replace(b"#!/bin/sh\nexec sleep 600\n");
    server.signal(libc::SIGUSR2);
    server.wait_for("USR2: upgrading");
    server.signal(libc::SIGHUP);
    server.wait_for("HUP: an upgrade is under way");
    server.signal(libc::SIGTTOU);
    server.wait_for("TTOU: an upgrade is under way");
    server.signal(libc::SIGTTIN);
    server.wait_for("TTIN: an upgrade is under way");
    server.wait_for("rolling back: this master serves on");
    let mut now: Vec<_> = children(server.pid);
    now.sort_unstable();
    // The new master (a child too) is gone by the rollback's log line.
    assert_eq!(now, workers, "the workers were not reloaded");
    assert_eq!(version(&server.addr), "v1");
}

/// A deploy that switches a `current` symlink to a new release directory: the master
/// was started through the link, and the upgrade follows it to the new release.
#[test]
fn an_upgrade_follows_a_switched_release_symlink() {
    let deploy = Deploy::new("symlink");
    let releases = deploy.scratch.path("releases");
    for version in ["v1", "v2"] {
        std::fs::create_dir_all(releases.join(version)).unwrap();
    }
    std::fs::copy(&deploy.app, releases.join("v1/app")).unwrap();
    std::fs::write(releases.join("v2/app"), deploy.new_build()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let executable = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(releases.join("v2/app"), executable).unwrap();
    let current = deploy.scratch.path("current");
    std::os::unix::fs::symlink(releases.join("v1"), &current).unwrap();
    let mut server = start_program(
        &current.join("app"),
        &["--listen", "127.0.0.1:0", "--workers", "1"],
    );
    assert_eq!(version(&server.addr), "v1");
    // Switched as deploy tools do: a new link renamed over the old one.
    let next = deploy.scratch.path("current.next");
    std::os::unix::fs::symlink(releases.join("v2"), &next).unwrap();
    std::fs::rename(&next, &current).unwrap();
    server.signal(libc::SIGUSR2);
    eventually("the new release answering", || {
        version(&server.addr) == "v2"
    });
    assert!(server.wait_exit().success());
}

#[test]
fn winch_retires_the_workers_and_keeps_the_master_until_hup() {
    let deploy = Deploy::new("winch");
    let mut server = deploy.start(&[]);
    let workers = children(server.pid);
    server.signal(libc::SIGWINCH);
    server.wait_for("WINCH: retiring every worker");
    eventually("every worker gone", || children(server.pid).is_empty());
    assert!(workers.iter().all(|&pid| !running(pid)));
    assert!(running(server.pid));
    // A request made meanwhile waits in the queue (the kernel completes the
    // connection), and is answered after HUP.
    let mut waiting = TcpStream::connect(&server.addr).unwrap();
    waiting.set_read_timeout(Some(LIMIT)).unwrap();
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    server.signal(libc::SIGHUP);
    server.wait_for("HUP: workers again: 2");
    let mut reply = String::new();
    waiting.read_to_string(&mut reply).unwrap();
    assert_eq!(parse(&reply).0, 200, "{reply:?}");
    eventually("two workers again", || children(server.pid).len() == 2);
}

#[test]
fn quit_is_a_graceful_shutdown() {
    let deploy = Deploy::new("quit");
    let mut server = deploy.start(&[]);
    assert_eq!(get(&server.addr, "/").0, 200);
    server.signal(libc::SIGQUIT);
    server.wait_for("QUIT: graceful shutdown");
    assert!(server.wait_exit().success());
    assert!(!deploy.pid_file.exists());
}
