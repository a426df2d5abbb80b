//! Child-process watches.
//!
//! One child ([`Loop::watch_process`]) is watched, on Linux 5.4 and later, through a
//! pidfd: an fd for the process itself, not for its number. The loop watches it as IO
//! (the kernel makes it readable when the child exits) and reaps with
//! `waitid(P_PIDFD)`. No SIGCHLD is needed for it, a `std::process::Child` beside the
//! loop keeps its status, and a pid that someone else reaped and the kernel gave to a
//! new process is never mistaken for the watched child: `waitid` on the pidfd says
//! ECHILD, and the watch ends with [`Error::ReapedElsewhere`].
//!
//! Where no pidfd can be had (`pidfd_open` missing or refused: Linux before 5.4, a
//! seccomp filter, macOS, the BSDs; or the fd limit reached), a SIGCHLD watch of the
//! loop's own drives `waitpid(pid)` per watched pid. SIGCHLDs coalesce, so each pass
//! tries every such pid, and a child that exited before its watch was added is found by
//! the pass the watch schedules for the next iteration. ECHILD also ends such a watch
//! with `ReapedElsewhere`, but only a pidfd pins the process: a pid reaped elsewhere and
//! reused by a new child before the loop's next pass is taken for the watched one.
//!
//! Any child ([`Loop::watch_any_child`]) is SIGCHLD and `waitpid(-1)`, which takes every
//! child. Children with a watch of their own still go to it: while pidfd watches exist
//! the reaper first looks at the next exited child without reaping it
//! (`waitid(P_ALL, WNOWAIT)`) and reaps a pidfd-watched one through its pidfd.

mod wait;

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitStatus;

use smallvec::SmallVec;

use crate::event_loop::{guarded, resume, take_back};
use crate::handle::{Watch, WatchKind};
use crate::id_map::IdMap;
use crate::{Error, Loop, Result};
use wait::{is_child, pidfd, waitpid, Open, Waited};

type OneChild<D> = Box<dyn FnOnce(&mut Loop<D>, &mut D, libc::pid_t, Result<ExitStatus>)>;
type AnyChild<D> = Box<dyn FnMut(&mut Loop<D>, &mut D, libc::pid_t, ExitStatus)>;

/// A pidfd and the loop's IO watch of it.
struct PidFd {
    fd: OwnedFd,
    io: Watch,
}

struct OneWatch<D: 'static> {
    pid: libc::pid_t,
    callback: OneChild<D>,
    /// `None`: the waitpid fallback.
    pidfd: Option<PidFd>,
    /// Whether this watch holds the loop's SIGCHLD watch.
    sigchld: bool,
}

enum ProcessWatch<D: 'static> {
    One(OneWatch<D>),
    /// `None` while its callback runs.
    Any(Option<AnyChild<D>>),
}

/// One loop's child-process watches.
pub(crate) struct Children<D: 'static> {
    watches: IdMap<u64, ProcessWatch<D>>,
    by_pid: IdMap<libc::pid_t, SmallVec<[u64; 1]>>,
    any: Vec<u64>,
    /// How many watches have a pidfd.
    pidfds: usize,
    /// The loop's SIGCHLD watch, held by any-child watches, waitpid watches, and pidfd
    /// watches made while SIGCHLD was ignored (the kernel would reap their children).
    sigchld: Option<Watch>,
    sigchld_users: usize,
    /// SIGCHLD was ignored when the loop took it: releasing it ignores it again.
    sigchld_over_ignore: bool,
    /// A reap pass is due at the next iteration (which then does not block).
    pub(crate) recheck: bool,
}

impl<D: 'static> Default for Children<D> {
    fn default() -> Children<D> {
        Children {
            watches: IdMap::default(),
            by_pid: IdMap::default(),
            any: Vec::new(),
            pidfds: 0,
            sigchld: None,
            sigchld_users: 0,
            sigchld_over_ignore: false,
            recheck: false,
        }
    }
}

impl<D: 'static> Children<D> {
    /// The user's watches, and the internal ones the loop made for them: IO watches of
    /// pidfds, and the SIGCHLD watch.
    pub(crate) fn watches(&self) -> (usize, usize, usize) {
        let sigchld = usize::from(self.sigchld.is_some());
        (self.watches.len(), self.pidfds, sigchld)
    }

    /// In a `Loop::fork` child, whose copy of the loop is never used or dropped again:
    /// closes its pidfds (they name the parent's children), leaving their IO watches in
    /// tables nobody reads. Async-signal-safe: only close(2), no allocation.
    pub(crate) fn close_pidfds_in_child(&mut self) {
        for watch in self.watches.values_mut() {
            if let ProcessWatch::One(one) = watch {
                one.pidfd = None;
            }
        }
    }
}

impl<D: 'static> Loop<D> {
    /// Runs `callback` once when child `pid` exits (also if it exited before this call),
    /// with its exit status, and reaps it. A pid that is not a child of this process is
    /// an error.
    ///
    /// If someone else in this process reaps the child first (`std::process::Child::wait`,
    /// a `waitpid(-1)` of other code), its status is lost: the watch ends and `callback`
    /// gets `Err(Error::ReapedElsewhere(pid))` — match on that variant; no other error
    /// reaches the callback today, but [`Error`] is non-exhaustive.
    ///
    /// On Linux 5.4 and later the watch holds a pidfd, which pins the process: a pid
    /// freed by another reaper and given to a new process is never reported here, and
    /// the watch needs no SIGCHLD (the loop takes SIGCHLD only if it is ignored, so that
    /// the kernel keeps the child's status). Where no pidfd can be had (`pidfd_open`
    /// missing or refused: older kernels, seccomp sandboxes, macOS, the BSDs) the loop
    /// catches SIGCHLD and calls `waitpid(pid)`: a child reaped elsewhere still ends the
    /// watch with `ReapedElsewhere` at the loop's next pass, but a new child of this
    /// process that got the pid before that pass is taken for the watched one.
    ///
    /// ```
    /// use forkloop::Loop;
    ///
    /// let child = std::process::Command::new("sh").args(["-c", "exit 3"]).spawn()?;
    /// let mut lp: Loop = Loop::new()?;
    /// lp.watch_process(child.id() as libc::pid_t, |lp, (), _pid, status| {
    ///     lp.stop(status.ok().and_then(|s| s.code()).unwrap_or(-1));
    /// })?;
    /// assert_eq!(lp.run(&mut ())?, 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn watch_process(
        &mut self,
        pid: libc::pid_t,
        callback: impl FnOnce(&mut Loop<D>, &mut D, libc::pid_t, Result<ExitStatus>) + 'static,
    ) -> Result<Watch> {
        if pid <= 0 {
            return Err(Error::NotAChild(pid));
        }
        // In a fresh child, post_fork must drop the parent's watches before this one joins.
        self.ensure_current()?;
        let fd = match pidfd::open(pid) {
            Open::Child(fd) => Some(fd),
            Open::NotAChild => return Err(Error::NotAChild(pid)),
            Open::Unavailable if is_child(pid) => None,
            Open::Unavailable => return Err(Error::NotAChild(pid)),
        };
        let id = self.next_id();
        let pidfd = fd.and_then(|fd| {
            let ready = move |lp: &mut Loop<D>, data: &mut D| lp.pidfd_ready(id, data);
            // SAFETY: the pidfd closes with its `PidFd`, after its watch is cancelled
            // (`take_watch`, `forget_children`), or in a `Loop::fork` child whose copy of
            // the loop is never used again (`close_pidfds_in_child`).
            match unsafe { self.watch_internal(fd.as_raw_fd(), ready) } {
                Ok(io) => Some(PidFd { fd, io }),
                Err(e) => {
                    log::debug!("watching the pidfd of {pid}: {e}; watching it with waitpid");
                    None
                }
            }
        });
        let sigchld = pidfd.is_none()
            || pidfd::sigchld_ignored()
            || (self.children.sigchld.is_some() && self.children.sigchld_over_ignore);
        if sigchld {
            if let Err(e) = self.take_sigchld() {
                if let Some(pidfd) = pidfd {
                    self.cancel(pidfd.io);
                }
                return Err(e);
            }
        }
        if pidfd.is_some() {
            self.children.pidfds += 1;
        } else {
            self.children.recheck = true;
        }
        let callback = Box::new(callback);
        let watch = OneWatch {
            pid,
            callback,
            pidfd,
            sigchld,
        };
        self.children.watches.insert(id, ProcessWatch::One(watch));
        self.children.by_pid.entry(pid).or_default().push(id);
        Ok(self.handle(WatchKind::Process, id))
    }

    /// Runs `callback` for every child of this process that exits and has no watch of
    /// its own. While such a watch exists the loop reaps *every* child (SIGCHLD and
    /// `waitpid(-1)`), including those a `std::process::Child` owns.
    pub fn watch_any_child(
        &mut self,
        callback: impl FnMut(&mut Loop<D>, &mut D, libc::pid_t, ExitStatus) + 'static,
    ) -> Result<Watch> {
        self.ensure_current()?;
        self.take_sigchld()?;
        let id = self.next_id();
        let watch = ProcessWatch::Any(Some(Box::new(callback)));
        self.children.watches.insert(id, watch);
        self.children.any.push(id);
        self.children.recheck = true;
        Ok(self.handle(WatchKind::Process, id))
    }

    /// The loop's SIGCHLD watch lives exactly as long as some watch needs it.
    fn take_sigchld(&mut self) -> Result<()> {
        if self.children.sigchld.is_none() {
            let over_ignore = pidfd::sigchld_ignored();
            let watch = self.watch_signal(libc::SIGCHLD, |lp, data, _| lp.reap_children(data))?;
            self.children.sigchld = Some(watch);
            self.children.sigchld_over_ignore = over_ignore;
        }
        self.children.sigchld_users += 1;
        Ok(())
    }

    fn release_sigchld(&mut self) {
        self.children.sigchld_users -= 1;
        if self.children.sigchld_users == 0 {
            if let Some(watch) = self.children.sigchld.take() {
                self.cancel(watch);
            }
        }
    }

    pub(crate) fn cancel_process(&mut self, id: u64) -> bool {
        self.take_watch(id).is_some()
    }

    /// Removes a watch from every table; closes its pidfd.
    fn take_watch(&mut self, id: u64) -> Option<ProcessWatch<D>> {
        let mut watch = self.children.watches.remove(&id)?;
        let sigchld = match &mut watch {
            ProcessWatch::One(one) => {
                if let Some(ids) = self.children.by_pid.get_mut(&one.pid) {
                    ids.retain(|w| *w != id);
                    if ids.is_empty() {
                        self.children.by_pid.remove(&one.pid);
                    }
                }
                if let Some(pidfd) = one.pidfd.take() {
                    self.children.pidfds -= 1;
                    self.cancel(pidfd.io); // before the fd closes with `pidfd`
                }
                one.sigchld
            }
            ProcessWatch::Any(_) => {
                self.children.any.retain(|w| *w != id);
                true
            }
        };
        if sigchld {
            self.release_sigchld();
        }
        Some(watch)
    }

    /// The pidfd of watch `id` is readable: its process has exited (or was reaped).
    fn pidfd_ready(&mut self, id: u64, data: &mut D) {
        if let Some(ProcessWatch::One(one)) = self.children.watches.get(&id) {
            let pid = one.pid;
            self.settle(pid, data);
        }
    }

    /// SIGCHLD, or a watch added: a pass over the waitpid watches (pidfd watches are told
    /// by their fds), or the any-child reaper.
    pub(crate) fn reap_children(&mut self, data: &mut D) {
        self.children.recheck = false;
        if !self.children.any.is_empty() {
            let reaped = guarded(|| self.reap_any(data));
            if reaped.is_err() {
                // A callback panicked: other exited children may wait unreaped, and
                // their SIGCHLD is counted already. Another pass next iteration.
                self.children.recheck = true;
            }
            resume(reaped);
            return;
        }
        let mut pids: SmallVec<[libc::pid_t; 8]> = self
            .children
            .watches
            .values()
            .filter_map(|w| match w {
                ProcessWatch::One(one) if one.pidfd.is_none() => Some(one.pid),
                _ => None,
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            self.settle(pid, data);
        }
    }

    fn reap_any(&mut self, data: &mut D) {
        loop {
            if self.children.pidfds == 0 {
                match waitpid(-1) {
                    Waited::Exited(pid, status) if self.children.by_pid.contains_key(&pid) => {
                        self.tell(pid, status, data);
                    }
                    Waited::Exited(pid, status) => self.tell_any(pid, status, data),
                    Waited::Running | Waited::NoChild => return,
                }
                continue;
            }
            // Look before reaping: a child with a pidfd watch is reaped through its
            // pidfd, which tells a reused pid from the watched process.
            let Some(pid) = pidfd::peek_any() else {
                return;
            };
            if self.settle(pid, data) {
                continue;
            }
            // Not a watched process (its watches, if any, were of one reaped elsewhere).
            if let Waited::Exited(pid, status) = waitpid(pid) {
                self.tell_any(pid, status, data);
            }
        }
    }

    /// Reaps `pid` if it has exited and tells every watch of it; ends the watches whose
    /// process was reaped by someone else. Returns whether it reaped a child.
    fn settle(&mut self, pid: libc::pid_t, data: &mut D) -> bool {
        let Some(ids) = self.children.by_pid.get(&pid) else {
            return false;
        };
        // Only one unreaped process can have `pid`: the pidfds that still name a child
        // of ours name that one, and the waitpid watches of `pid` mean it too.
        let mut told: SmallVec<[u64; 2]> = SmallVec::new();
        let mut gone: SmallVec<[u64; 2]> = SmallVec::new();
        let mut reaper = None; // the first of `told` with a pidfd of the exited child
        let mut plain = false;
        for &id in ids {
            let Some(ProcessWatch::One(one)) = self.children.watches.get(&id) else {
                continue;
            };
            let Some(pidfd) = &one.pidfd else {
                plain = true;
                told.push(id);
                continue;
            };
            match pidfd::wait(&pidfd.fd, false) {
                Ok(Some(_)) => {
                    reaper.get_or_insert(id);
                    told.push(id);
                }
                Ok(None) => {} // cannot run while `pid` names an exited child
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => gone.push(id),
                Err(e) => log::warn!("waitid on the pidfd of child {pid}: {e}"),
            }
        }
        let status = match reaper {
            Some(id) => {
                let Some(ProcessWatch::One(OneWatch {
                    pidfd: Some(pidfd), ..
                })) = self.children.watches.get(&id)
                else {
                    unreachable!("found above")
                };
                match pidfd::wait(&pidfd.fd, true) {
                    Ok(status) => status,
                    // Taken by another thread since the look above.
                    Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                        gone.append(&mut told);
                        None
                    }
                    Err(e) => {
                        log::warn!("reaping child {pid} through its pidfd: {e}");
                        None
                    }
                }
            }
            None if plain => match waitpid(pid) {
                Waited::Exited(_, status) => Some(status),
                Waited::Running => None,
                Waited::NoChild => {
                    gone.append(&mut told);
                    None
                }
            },
            None => None,
        };
        self.tell_watches(pid, status, &told, gone, data);
        status.is_some()
    }

    /// After a `waitpid(-1)` reaped `pid`: every watch of it gets `status`.
    fn tell(&mut self, pid: libc::pid_t, status: ExitStatus, data: &mut D) {
        let ids = self.children.by_pid.get(&pid).cloned().unwrap_or_default();
        self.tell_watches(pid, Some(status), &ids, SmallVec::new(), data);
    }

    /// Ends the watches `told` (with `status`) and `gone` (reaped elsewhere): all leave
    /// the tables first, so their callbacks may add and cancel watches freely.
    fn tell_watches(
        &mut self,
        pid: libc::pid_t,
        status: Option<ExitStatus>,
        told: &[u64],
        gone: SmallVec<[u64; 2]>,
        data: &mut D,
    ) {
        let mut ended: SmallVec<[(OneChild<D>, Result<ExitStatus>); 2]> = SmallVec::new();
        let results = (told.iter())
            .filter_map(|&id| Some((id, Ok(status?))))
            .chain(
                gone.into_iter()
                    .map(|id| (id, Err(Error::ReapedElsewhere(pid)))),
            );
        for (id, result) in results {
            if let Some(ProcessWatch::One(one)) = self.take_watch(id) {
                ended.push((one.callback, result));
            }
        }
        let mut ended = ended.into_iter();
        while let Some((callback, result)) = ended.next() {
            let called = guarded(|| callback(self, data, pid, result));
            if called.is_err() {
                // The child is reaped: the other watches of it hear next, not never.
                for (callback, result) in ended {
                    self.later(move |lp, data| callback(lp, data, pid, result));
                }
                resume(called);
                return;
            }
        }
    }

    fn tell_any(&mut self, pid: libc::pid_t, status: ExitStatus, data: &mut D) {
        for id in self.children.any.clone() {
            let Some(ProcessWatch::Any(slot)) = self.children.watches.get_mut(&id) else {
                continue;
            };
            let Some(mut callback) = slot.take() else {
                continue; // running further up the stack
            };
            let serial = self.id.serial;
            let called = guarded(|| callback(self, data, pid, status));
            let callback = take_back(serial, self.id.serial, callback);
            if let Some(ProcessWatch::Any(slot)) = self.children.watches.get_mut(&id) {
                *slot = Some(callback);
            }
            resume(called);
        }
    }

    /// post_fork: the watched children are the parent's, not this process's. Our copies
    /// of their pidfds are closed (they are this process's fds, and they name the
    /// parent's children) and their IO watches dropped.
    pub(crate) fn forget_children(&mut self) {
        let children = std::mem::take(&mut self.children);
        for watch in children.watches.into_values() {
            if let ProcessWatch::One(OneWatch {
                pidfd: Some(pidfd), ..
            }) = watch
            {
                self.cancel(pidfd.io); // before the fd closes with `pidfd`
            }
        }
        if let Some(watch) = children.sigchld {
            self.cancel(watch);
        }
    }
}
