//! Signal watches: each loop subscribes to the process-wide driver (`driver`) for the
//! signals it watches, wakes on a self-pipe of its own, and runs its callbacks in
//! dispatch for every delivery its subscription has not seen yet.

mod driver;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};

use smallvec::SmallVec;

pub(crate) use driver::{
    forget_claims, forget_parent, lock_for_fork, reset_handlers_in_child, ForkLock,
};

use crate::event_loop::{guarded, resume, take_back};
use crate::handle::{Watch, WatchKind};
use crate::id_map::IdMap;
use crate::{fork, sys, Error, Loop, Result};

type SignalCallback<D> = Box<dyn FnMut(&mut Loop<D>, &mut D, libc::c_int)>;

struct SignalWatch<D: 'static> {
    signal: libc::c_int,
    /// The driver's delivery count this watch has been called for: a watch skipped
    /// (its callback ran further up the stack, or an earlier one panicked) catches up.
    seen: u64,
    /// `None` while it runs.
    callback: Option<SignalCallback<D>>,
}

struct Claimed {
    /// The driver's delivery count this loop has dispatched up to.
    seen: u64,
    /// The fork generation in which the loop's slot was subscribed to the signal.
    subscribed: u64,
    watches: SmallVec<[u64; 2]>,
}

/// A loop's self-pipe and its slot in the driver.
struct WakePipe {
    read: OwnedFd,
    write: OwnedFd,
    watch: Watch,
    slot: usize,
    /// The fork generation the slot belongs to: in a later one it is nobody's.
    generation: u64,
}

impl WakePipe {
    /// The driver's slot, if it is still this process's.
    fn current_slot(&self) -> Option<usize> {
        (self.generation == fork::generation()).then_some(self.slot)
    }
}

impl Drop for WakePipe {
    fn drop(&mut self) {
        // The fds close after this: no handler may still be writing to them. In a
        // forked child the slot was cleared by the atfork handler already.
        if let Some(slot) = self.current_slot() {
            driver::release_slot(slot);
        }
    }
}

/// One loop's signal watches.
pub(crate) struct Signals<D: 'static> {
    pipe: Option<WakePipe>,
    watches: IdMap<u64, SignalWatch<D>>,
    claimed: BTreeMap<libc::c_int, Claimed>,
    /// This iteration's pipe event was made up by `signals_after_wait`: nothing to read.
    unread: bool,
}

impl<D: 'static> Default for Signals<D> {
    fn default() -> Signals<D> {
        Signals {
            pipe: None,
            watches: IdMap::default(),
            claimed: BTreeMap::new(),
            unread: false,
        }
    }
}

impl<D: 'static> Signals<D> {
    /// The signal watches (the loop's own SIGCHLD one included), and the IO watch of
    /// the self-pipe, which is internal.
    pub(crate) fn watches(&self) -> (usize, usize) {
        (self.watches.len(), usize::from(self.pipe.is_some()))
    }

    /// Closes the self-pipe's fds and forgets its watch, which is left in the loop's
    /// tables: only for a loop that is never used again in a `Loop::fork` child, where
    /// the slot is already cleared (so this is only close(2): async-signal-safe).
    pub(crate) fn close_pipe(&mut self) {
        self.pipe = None;
    }
}

impl<D: 'static> Loop<D> {
    /// Runs `callback` in dispatch each time `signal` (`libc::SIGTERM`, …) arrives;
    /// deliveries between two iterations coalesce into one call, as the kernel's do.
    /// Several watches may share a signal, in one loop or in several loops of the
    /// process (each loop sees every delivery made while it watches). An unknown or
    /// uncatchable signal is an error. When the process's last watch of a signal is
    /// cancelled, the disposition from before the first one is restored. SIGCHLD is
    /// installed with `SA_NOCLDSTOP`: stopped and continued children do not wake a loop.
    ///
    /// ```
    /// use forkloop::Loop;
    ///
    /// let mut lp: Loop<u32> = Loop::new()?;
    /// lp.watch_signal(libc::SIGUSR1, |lp, seen, signal| {
    ///     assert_eq!(signal, libc::SIGUSR1);
    ///     *seen += 1;
    ///     lp.stop(0);
    /// })?;
    /// // SAFETY: sends SIGUSR1 to this process, which now catches it.
    /// unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    /// let mut seen = 0;
    /// lp.run(&mut seen)?;
    /// assert_eq!(seen, 1);
    /// # Ok::<(), forkloop::Error>(())
    /// ```
    pub fn watch_signal(
        &mut self,
        signal: libc::c_int,
        callback: impl FnMut(&mut Loop<D>, &mut D, libc::c_int) + 'static,
    ) -> Result<Watch> {
        if let Some(refusal) = driver::uncatchable(signal) {
            return Err(Error::SignalRefused { signal, refusal });
        }
        self.ensure_current()?;
        let slot = self.wake_pipe()?;
        if !self.signals.claimed.contains_key(&signal) {
            let start = match driver::claim(signal) {
                Ok(start) => start,
                Err(source) => {
                    self.release_pipe_if_unused();
                    return Err(Error::SignalAction { signal, source });
                }
            };
            let seen = driver::subscribe(signal, slot, start);
            let subscribed = fork::generation();
            let watches = SmallVec::new();
            let claimed = Claimed {
                seen,
                subscribed,
                watches,
            };
            self.signals.claimed.insert(signal, claimed);
        }
        let id = self.next_id();
        let claimed = self
            .signals
            .claimed
            .get_mut(&signal)
            .expect("claimed above");
        claimed.watches.push(id);
        let seen = claimed.seen;
        if seen != driver::count(signal) {
            self.wake_self(); // kept across a fork, and delivered since
        }
        let callback = Some(Box::new(callback) as _);
        let watch = SignalWatch {
            signal,
            seen,
            callback,
        };
        self.signals.watches.insert(id, watch);
        Ok(self.handle(WatchKind::Signal, id))
    }

    /// This loop's driver slot, with its self-pipe created (and watched) on first use.
    fn wake_pipe(&mut self) -> Result<usize> {
        if let Some(pipe) = &self.signals.pipe {
            return Ok(pipe.slot);
        }
        let (read, write) = sys::pipe().map_err(|source| Error::Create {
            what: "the signal self-pipe",
            source,
        })?;
        let Some(slot) = driver::take_slot(write.as_raw_fd()) else {
            return Err(Error::TooManySignalLoops(driver::MAX_LOOPS));
        };
        let generation = fork::generation();
        // SAFETY: the pipe's fds close only with the `WakePipe`, after its watch is
        // cancelled (`release_pipe_if_unused`, `signals_post_fork`), or in a `Loop::fork`
        // child whose copy of the loop is never used again (`close_pipe`).
        let watched = unsafe { self.watch_internal(read.as_raw_fd(), Loop::dispatch_signals) };
        let watch = match watched {
            Ok(watch) => watch,
            Err(e) => {
                driver::release_slot(slot);
                return Err(e);
            }
        };
        self.signals.pipe = Some(WakePipe {
            read,
            write,
            watch,
            slot,
            generation,
        });
        Ok(slot)
    }

    /// Before the backend's wait: from here on the handler writes to the wake pipe, and
    /// whether a delivery came while it did not (the wait must then not block).
    pub(crate) fn signals_before_wait(&mut self) -> bool {
        let Some(slot) = self.signals.pipe.as_ref().and_then(WakePipe::current_slot) else {
            return false;
        };
        driver::set_waiting(slot, true);
        self.signals_pending()
    }

    /// After the backend's wait: the handler stops writing, and a delivery the pipe
    /// did not report (it came while the loop was not waiting) is dispatched as if it
    /// had, without a read of the empty pipe.
    pub(crate) fn signals_after_wait(&mut self) {
        let Some(pipe) = self.signals.pipe.as_ref() else {
            return;
        };
        let Some(slot) = pipe.current_slot() else {
            return;
        };
        driver::set_waiting(slot, false);
        let fd = pipe.read.as_raw_fd();
        if self.signals_pending() && !self.events.iter().any(|e| e.fd == fd) {
            self.signals.unread = true;
            self.events.push(forkloop_backend::Event {
                fd,
                readiness: forkloop_backend::Readiness::READABLE,
            });
        }
    }

    /// Whether a signal this loop watches was delivered past what it dispatched.
    fn signals_pending(&self) -> bool {
        let generation = fork::generation();
        self.signals
            .claimed
            .iter()
            .any(|(&signal, c)| c.subscribed == generation && c.seen < driver::count(signal))
    }

    fn wake_self(&self) {
        if let Some(pipe) = &self.signals.pipe {
            // SAFETY: one byte from a static to the loop's own non-blocking pipe; a full
            // pipe already means a wake-up is pending.
            unsafe { libc::write(pipe.write.as_raw_fd(), b"!".as_ptr().cast(), 1) };
        }
    }

    /// The pipe and its slot live exactly as long as some signal is claimed.
    fn release_pipe_if_unused(&mut self) {
        if self.signals.claimed.is_empty() {
            if let Some(pipe) = self.signals.pipe.take() {
                self.cancel(pipe.watch);
            }
        }
    }

    pub(crate) fn cancel_signal(&mut self, id: u64) -> bool {
        let Some(watch) = self.signals.watches.remove(&id) else {
            return false;
        };
        let claimed = self
            .signals
            .claimed
            .get_mut(&watch.signal)
            .expect("watched signals are claimed");
        claimed.watches.retain(|w| *w != id);
        if claimed.watches.is_empty() {
            let claimed = self.signals.claimed.remove(&watch.signal).expect("present");
            self.unclaim(watch.signal, &claimed);
            self.release_pipe_if_unused();
        }
        true
    }

    /// The disposition first (the process's last claim restores it), then the wake-ups:
    /// a delivery in between still finds a handler that wakes someone, or the default.
    fn unclaim(&self, signal: libc::c_int, claimed: &Claimed) {
        if let Some(warning) = driver::unclaim(signal) {
            log::warn!("{warning}");
        }
        let slot = self.signals.pipe.as_ref().and_then(WakePipe::current_slot);
        if let Some(slot) = slot.filter(|_| claimed.subscribed == fork::generation()) {
            driver::unsubscribe(signal, slot);
        }
    }

    fn dispatch_signals(&mut self, data: &mut D) {
        // The pipe holds something only if the handler wrote while the loop waited.
        let unread = std::mem::take(&mut self.signals.unread);
        if let Some(pipe) = self.signals.pipe.as_ref().filter(|_| !unread) {
            sys::drain(&pipe.read);
        }
        let signals: SmallVec<[libc::c_int; 8]> = self.signals.claimed.keys().copied().collect();
        for signal in signals {
            let count = driver::count(signal);
            let Some(claimed) = self.signals.claimed.get_mut(&signal) else {
                continue;
            };
            // Counts only grow; a nested run may have dispatched past `count` already.
            claimed.seen = claimed.seen.max(count);
            for id in claimed.watches.clone() {
                let watch = self.signals.watches.get_mut(&id);
                let Some(watch) = watch.filter(|w| w.seen < count) else {
                    continue;
                };
                let Some(mut callback) = watch.callback.take() else {
                    continue; // running further up the stack; it catches up after
                };
                watch.seen = count;
                let serial = self.id.serial;
                let called = guarded(|| callback(self, data, signal));
                let callback = take_back(serial, self.id.serial, callback);
                let Some(watch) = self.signals.watches.get_mut(&id) else {
                    if called.is_err() {
                        self.wake_self(); // the watches after this one
                    }
                    resume(called);
                    continue;
                };
                watch.callback = Some(callback);
                if called.is_err() || watch.seen < driver::count(signal) {
                    // Watches not called yet (a panic), or a delivery a nested run
                    // drained the pipe of while this callback ran: the next iteration.
                    self.wake_self();
                }
                resume(called);
                if self.forked_in_dispatch() {
                    return; // a raw fork in the callback: the rest is the parent's
                }
            }
        }
    }

    /// post_fork: in a forked child the self-pipe is shared with the parent and the
    /// driver has forgotten the parent's subscriptions, so the loop gets a fresh pipe
    /// and subscribes again to every signal it watches, from the deliveries that reached
    /// this process since the fork. In the process that built it, nothing changes. After
    /// a failure, a second call finishes what the first left.
    pub(crate) fn signals_post_fork(&mut self) -> Result<()> {
        if let Some(old) = self.signals.pipe.take_if(|p| p.current_slot().is_none()) {
            self.cancel(old.watch);
        }
        let generation = fork::generation();
        let stale: SmallVec<[libc::c_int; 8]> = self
            .signals
            .claimed
            .iter()
            .filter(|(_, c)| c.subscribed != generation)
            .map(|(&signal, _)| signal)
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let slot = self.wake_pipe()?;
        let mut pending = false;
        for signal in stale {
            let claimed = self.signals.claimed.get_mut(&signal).expect("listed above");
            let seen = driver::subscribe(signal, slot, driver::Start::SinceFork);
            claimed.seen = seen;
            claimed.subscribed = generation;
            for id in &claimed.watches {
                if let Some(watch) = self.signals.watches.get_mut(id) {
                    watch.seen = seen;
                }
            }
            pending |= seen != driver::count(signal);
        }
        if pending {
            self.wake_self();
        }
        Ok(())
    }

    /// Drop: this loop's subscriptions end; the process's last one of a signal restores
    /// its disposition.
    pub(crate) fn release_signals(&mut self) {
        for (signal, claimed) in std::mem::take(&mut self.signals.claimed) {
            self.unclaim(signal, &claimed);
        }
        self.signals.pipe = None;
    }
}
