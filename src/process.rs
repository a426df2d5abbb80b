//! Child-process watches, driven by a SIGCHLD watch of the loop's own.
//!
//! Only watched pids are reaped (`waitpid(pid)`), so a `std::process::Child` spawned
//! beside the loop keeps its exit status — unless an any-child watch exists, which reaps
//! with `waitpid(-1)` and so takes every child. SIGCHLDs coalesce, so each reap pass
//! collects every exited child, and a child that exited before its watch was added is
//! found by the pass the watch schedules for the next iteration.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use smallvec::SmallVec;

use crate::event_loop::{Watch, WatchKind};
use crate::id_map::IdMap;
use crate::{Error, Loop, Result};

type OneChild = Box<dyn FnOnce(&mut Loop, libc::pid_t, ExitStatus)>;
type AnyChild = Box<dyn FnMut(&mut Loop, libc::pid_t, ExitStatus)>;

enum ProcessCallback {
    One(OneChild),
    Any(AnyChild),
}

/// One loop's child-process watches.
#[derive(Default)]
pub(crate) struct Children {
    /// `None` while an any-child callback runs.
    callbacks: IdMap<u64, Option<ProcessCallback>>,
    by_pid: IdMap<libc::pid_t, SmallVec<[u64; 1]>>,
    any: Vec<u64>,
    sigchld: Option<Watch>,
    /// A reap pass is due at the next iteration (which then does not block).
    pub(crate) recheck: bool,
}

fn reap(pid: libc::pid_t) -> Option<(libc::pid_t, ExitStatus)> {
    let mut status = 0;
    loop {
        // SAFETY: status is a live c_int; WNOHANG never blocks.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 => return None,
            -1 if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            -1 => return None, // ECHILD: not ours (any more)
            reaped => return Some((reaped, ExitStatus::from_raw(status))),
        }
    }
}

/// Whether `pid` is a child of this process, exited or not; reaps nothing.
fn is_child(pid: libc::pid_t) -> bool {
    // SAFETY: siginfo_t is plain old data; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: info is a live siginfo_t; WNOWAIT leaves the child's status in place.
    let res = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
    res == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD)
}

impl Loop {
    /// Runs `callback` once with the exit status of child `pid` when it exits (also if
    /// it exited before this call), and reaps it. A pid that is not a child of this
    /// process is an error.
    pub fn watch_process(
        &mut self,
        pid: libc::pid_t,
        callback: impl FnOnce(&mut Loop, libc::pid_t, ExitStatus) + 'static,
    ) -> Result<Watch> {
        if pid <= 0 || !is_child(pid) {
            return Err(Error::NotAChild(pid));
        }
        let id = self.add_process_watch(ProcessCallback::One(Box::new(callback)))?;
        self.children.by_pid.entry(pid).or_default().push(id);
        Ok(self.handle(WatchKind::Process, id))
    }

    /// Runs `callback` for every child of this process that exits and has no watch of
    /// its own. While such a watch exists the loop reaps *every* child, including those
    /// a `std::process::Child` owns.
    pub fn watch_any_child(
        &mut self,
        callback: impl FnMut(&mut Loop, libc::pid_t, ExitStatus) + 'static,
    ) -> Result<Watch> {
        let id = self.add_process_watch(ProcessCallback::Any(Box::new(callback)))?;
        self.children.any.push(id);
        Ok(self.handle(WatchKind::Process, id))
    }

    fn add_process_watch(&mut self, callback: ProcessCallback) -> Result<u64> {
        // In a fresh child, post_fork must drop the parent's watches before this one joins.
        self.ensure_current()?;
        if self.children.sigchld.is_none() {
            let watch = self.watch_signal(libc::SIGCHLD, |lp, _| lp.reap_children())?;
            self.children.sigchld = Some(watch);
        }
        let id = self.next_id();
        self.children.callbacks.insert(id, Some(callback));
        self.children.recheck = true;
        Ok(id)
    }

    pub(crate) fn cancel_process(&mut self, id: u64) -> bool {
        if self.children.callbacks.remove(&id).is_none() {
            return false;
        }
        self.children.any.retain(|w| *w != id);
        self.children.by_pid.retain(|_, ids| {
            ids.retain(|w| *w != id);
            !ids.is_empty()
        });
        self.release_sigchld_if_unused();
        true
    }

    /// The loop's SIGCHLD watch lives exactly as long as some process watch does.
    fn release_sigchld_if_unused(&mut self) {
        if self.children.callbacks.is_empty() {
            if let Some(watch) = self.children.sigchld.take() {
                self.cancel(watch);
            }
        }
    }

    pub(crate) fn reap_children(&mut self) {
        self.children.recheck = false;
        if !self.children.any.is_empty() {
            while let Some((pid, status)) = reap(-1) {
                self.child_exited(pid, status);
            }
            return;
        }
        let pids: SmallVec<[libc::pid_t; 8]> = self.children.by_pid.keys().copied().collect();
        for pid in pids {
            if let Some((pid, status)) = reap(pid) {
                self.child_exited(pid, status);
            }
        }
    }

    fn child_exited(&mut self, pid: libc::pid_t, status: ExitStatus) {
        if let Some(ids) = self.children.by_pid.remove(&pid) {
            for id in ids {
                if let Some(Some(ProcessCallback::One(callback))) =
                    self.children.callbacks.remove(&id)
                {
                    callback(self, pid, status);
                }
            }
        } else {
            for id in self.children.any.clone() {
                let slot = self.children.callbacks.get_mut(&id);
                let Some(Some(ProcessCallback::Any(mut callback))) = slot.map(Option::take) else {
                    continue;
                };
                callback(self, pid, status);
                if let Some(slot) = self.children.callbacks.get_mut(&id) {
                    *slot = Some(ProcessCallback::Any(callback));
                }
            }
        }
        self.release_sigchld_if_unused();
    }

    /// post_fork: the watched children are the parent's, not this process's.
    pub(crate) fn forget_children(&mut self) {
        let sigchld = self.children.sigchld.take();
        self.children = Default::default();
        if let Some(watch) = sigchld {
            self.cancel(watch);
        }
    }
}
