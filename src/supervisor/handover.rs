//! The master's side of a binary upgrade (`USR2`; the exec itself and the hand-off's
//! protocol are in `upgrade`): the old master starts the new one and hands over or rolls
//! back, and the new one tells the old one when every worker is ready.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::upgrade::{self, UPGRADED};
use super::{kill, reconcile, serving_status, shutdown, Config, Master};
use crate::{Interest, Io, Loop, Timer};

/// A binary upgrade (USR2) under way: the new master this one exec'd, until it is
/// ready (then this one hands over and drains) or gone (then this one serves on).
pub(super) struct Upgrade {
    pub(super) pid: libc::pid_t,
    /// The watch of the socket on which it reports readiness.
    report: Io<UnixStream>,
    /// Fires if it is not ready within `upgrade_timeout`.
    deadline: Timer,
}

/// USR2: exec this binary again (a new build, if the file was replaced) as a new
/// master on the same sockets; it takes over once all its workers are ready, and
/// this one serves on until then, and for good if the new one fails.
pub(super) fn begin_upgrade(lp: &mut Loop<Master>, m: &mut Master) {
    if m.shutting_down() {
        return log::warn!("USR2: shutting down; no upgrade");
    }
    if let Some(upgrade) = &m.upgrade {
        return log::warn!("USR2: an upgrade is under way (new master {})", upgrade.pid);
    }
    if m.report_to.is_some() {
        return log::warn!("USR2: this master is not ready yet; upgrade it once it is");
    }
    if m.reload.is_some() {
        // One reload at a time, as systemd sees them (RELOADING=1 … READY=1).
        return log::warn!(
            "USR2: a HUP reload is under way; not upgrading: send USR2 again once it is done"
        );
    }
    if m.handed_in > 0 || m.listeners.is_empty() {
        // The new binary would bind the app's listeners again, and fail.
        return log::error!(
            "USR2: cannot upgrade: only the sockets of listen addresses are passed on, \
             and this master has {} handed in by the app (Supervisor::listener) and {} \
             of its own",
            m.handed_in,
            m.listeners.len() - m.handed_in
        );
    }
    let exe = match &m.exe {
        Ok(exe) => exe,
        Err(e) => return log::error!("USR2: cannot upgrade: this binary's path is unknown: {e}"),
    };
    // nginx's convention: the old master's pid file is `<pid file>.oldbin` while both
    // run, and the new master writes its own; so for the control socket.
    if let Err(e) = set_aside(&m.config, &mut m.control_path) {
        return log::error!("USR2: cannot upgrade: {e}");
    }
    let sockets: Vec<_> = m.listeners[m.handed_in..]
        .iter()
        .map(|bound| upgrade::Passed {
            lanes: bound.sockets().iter().map(AsFd::as_fd).collect(),
            own: bound.is_own(),
        })
        .collect();
    let path = exe.path().to_owned();
    let successor = match upgrade::spawn(lp, exe, &sockets) {
        Ok(successor) => successor,
        Err(e) => {
            log::error!("USR2: cannot start {}: {e}", path.display());
            return restore(m);
        }
    };
    let pid = successor.pid;
    log::info!(
        "USR2: upgrading: new master {pid} ({}) starts on the same sockets",
        path.display()
    );
    m.notify
        .reloading(&format!("upgrading: new master {pid} starting"));
    let watched = lp
        .watch_process(pid, successor_exited)
        .map_err(|e| e.to_string())
        .and_then(|_| {
            lp.watch_io(successor.ready, Interest::READ, successor_reported)
                .map_err(|e| e.error.to_string())
        });
    let report = match watched {
        Ok(report) => report,
        Err(e) => {
            // Without its watches it could take over unseen: it goes, and is reaped
            // here (at once, after SIGKILL), as no watch will.
            log::error!("USR2: watching the new master {pid}: {e}; stopping it");
            kill(pid, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
            return restore(m);
        }
    };
    let timeout = m.config.upgrade_timeout;
    let deadline = lp.after(timeout, move |lp, m| {
        let Some(upgrade) = &m.upgrade else {
            return;
        };
        log::error!(
            "USR2: the new master {pid} was not ready within {timeout:?}; stopping it, and \
             this master serves on"
        );
        // A readiness it reports from now on comes too late: it is not taken.
        let report = upgrade.report;
        lp.cancel(report);
        kill(pid, Signal::SIGTERM);
        // Its exit is the rollback: one that ignores TERM is killed.
        lp.after(m.config.graceful_timeout, move |_, m| {
            if m.upgrade.as_ref().is_some_and(|u| u.report == report) {
                log::error!("USR2: the new master {pid} is still there; killing it");
                kill(pid, Signal::SIGKILL);
            }
        });
    });
    m.upgrade = Some(Upgrade {
        pid,
        report,
        deadline,
    });
}

/// The new master wrote on its report socket (ready), or closed it (it failed, and
/// its exit follows).
fn successor_reported(
    lp: &mut Loop<Master>,
    m: &mut Master,
    mut socket: &UnixStream,
    _: crate::Readiness,
) {
    let mut byte = [0u8; 1];
    match socket.read(&mut byte) {
        Ok(1) if byte[0] == UPGRADED => hand_over(lp, m),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        _ => {
            if let Some(upgrade) = &m.upgrade {
                lp.cancel(upgrade.report);
            }
        }
    }
}

/// The new master is ready: systemd is told to follow it, and this one drains its
/// workers and exits, leaving the sockets to it.
fn hand_over(lp: &mut Loop<Master>, m: &mut Master) {
    if m.shutting_down() {
        return; // the new master got TERM too: the service stops
    }
    let Some(upgrade) = m.upgrade.take() else {
        return;
    };
    lp.cancel(upgrade.report);
    lp.cancel(upgrade.deadline);
    let pid = upgrade.pid;
    log::info!("USR2: the new master {pid} is ready; this one drains and exits");
    m.notify
        .main_pid(pid, &format!("upgraded: new master {pid} serving"));
    m.handed_over = true;
    shutdown(lp, m, "upgraded");
}

/// The new master exited: before it was ready, that is the rollback.
fn successor_exited(
    lp: &mut Loop<Master>,
    m: &mut Master,
    pid: libc::pid_t,
    status: crate::Result<ExitStatus>,
) {
    let Some(upgrade) = m.upgrade.take_if(|u| u.pid == pid) else {
        return; // it took over, and this master is on its way out
    };
    lp.cancel(upgrade.report);
    lp.cancel(upgrade.deadline);
    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
    if m.shutting_down() {
        return log::info!("the new master {pid} exited ({status})");
    }
    // Before the log line, which says it is done.
    restore(m);
    // Whatever the new master did to the shared sockets, they take connections.
    for bound in &m.listeners {
        bound.accept_new_connections();
    }
    if let Some(workers) = m.winched.take() {
        m.target = workers;
        reconcile(lp, m);
    }
    log::error!(
        "USR2: the new master {pid} exited before it was ready ({status}); \
         rolling back: this master serves on"
    );
    m.notify.ready(&format!(
        "upgrade failed (new master {pid}: {status}); {}",
        serving_status(m)
    ));
}

/// In a master an upgrade started, once every worker is ready: takes the inherited
/// sockets over as the old master had them (its own ones are filtered and unlinked at
/// this master's shutdown), speaks to the service manager from now on, and tells the
/// old master, which then hands over.
pub(super) fn tell_old_master(m: &mut Master, mut inherited: upgrade::Inherited) {
    let inherited_sockets = m.listeners[m.handed_in..].iter_mut();
    for ((bound, address), own) in inherited_sockets.zip(&m.config.listen).zip(&inherited.own) {
        if *own {
            bound.own(address);
            // Whatever the old master did to them since (a TTOU's filter): they are
            // this master's lanes, which take connections.
            bound.accept_new_connections();
        }
    }
    m.notify.release();
    match inherited.report.write_all(&[UPGRADED]) {
        Ok(()) => log::info!("upgrade: every worker is ready; the old master hands over"),
        // The old master is gone: this one serves, as it would have anyway.
        Err(e) => log::warn!("upgrade: telling the old master: {e}"),
    }
}

/// The pid file's name while an upgrade's new master runs beside the old one.
pub(super) fn oldbin(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".oldbin");
    PathBuf::from(name)
}

/// An upgrade begins: the pid file and the control socket take their `.oldbin` names,
/// and leave theirs to the new master. All or nothing.
fn set_aside(config: &Config, control_path: &mut Option<PathBuf>) -> Result<(), String> {
    if let Some(path) = &config.pid_file {
        match std::fs::rename(path, oldbin(path)) {
            // Someone removed it: the new master writes one all the same.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                log::warn!("USR2: the pid file {} is gone", path.display());
            }
            renamed => renamed.map_err(|e| format!("renaming {}: {e}", path.display()))?,
        }
    }
    if let Some(path) = control_path.take() {
        if let Err(e) = std::fs::rename(&path, oldbin(&path)) {
            if let Some(pid_file) = &config.pid_file {
                let _ = std::fs::rename(oldbin(pid_file), pid_file);
            }
            *control_path = Some(path.clone());
            return Err(format!("renaming {}: {e}", path.display()));
        }
        *control_path = Some(oldbin(&path));
    }
    Ok(())
}

/// The upgrade did not happen: the pid file and the control socket are this master's
/// again.
fn restore(m: &mut Master) {
    if let Some(path) = &m.config.pid_file {
        match std::fs::rename(oldbin(path), path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::error!("restoring the pid file {}: {e}", path.display()),
        }
    }
    if let (Some(now), Some(path)) = (&m.control_path, &m.config.control_socket) {
        match std::fs::rename(now, path) {
            Ok(()) => m.control_path = Some(path.clone()),
            Err(e) => log::error!("restoring the control socket {}: {e}", path.display()),
        }
    }
}
