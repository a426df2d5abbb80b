//! The loop: watcher tables, IO dispatch, timers, idle callbacks and run control.
//! Signals, child processes and fork live in their own modules as further `impl Loop`.

use std::collections::BTreeMap;
use std::fmt;
use std::mem::{self, ManuallyDrop};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use forkloop_backend::{closed_while_registered, Backend, Event, FdMap, Interest, Readiness};
use smallvec::SmallVec;

use crate::fork;
use crate::process::Children;
use crate::signal::Signals;
use crate::slab::Slab;
use crate::timer::{TimerCallback, Timers};
use crate::{Error, Kind, Result};

type IoCallback = Box<dyn FnMut(&mut Loop, Readiness)>;
type IdleCallback = Box<dyn FnOnce(&mut Loop)>;

/// A handle to one watch of any kind; give it to [`Loop::cancel`] of the loop that
/// made it (it carries that loop's identity; another loop refuses it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Watch {
    kind: WatchKind,
    id: u64,
    /// The serial of the loop that made it.
    owner: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum WatchKind {
    Io,
    Timer,
    Idle,
    Signal,
    Process,
}

/// Which loop this is: unique among all loops of all processes alive at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoopId {
    /// The process the loop was built in (or last rebuilt in, by `post_fork`).
    pub pid: u32,
    /// The loop's number within the processes it descends from.
    pub serial: u64,
}

impl fmt::Display for LoopId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "loop {} of pid {}", self.serial, self.pid)
    }
}

static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

struct FdState {
    interest: Interest,
    /// Readiness gathered from this iteration's events, until the fd is dispatched.
    pending: Readiness,
    watches: SmallVec<[u64; 2]>,
    /// Regular files, which epoll refuses with EPERM: reported ready at every iteration,
    /// as poll(2) would report them.
    always_ready: bool,
}

struct IoWatch {
    /// When it was added, on the loop's id counter: a dispatch skips watches added
    /// after it began.
    serial: u64,
    fd: RawFd,
    interest: Interest,
    /// `None` while the callback runs, so a nested `run` cannot re-enter it.
    callback: Option<IoCallback>,
}

/// An event loop on one backend. Single-threaded by contract (`!Send`): callbacks get
/// the loop mutably and may add and cancel watches of every kind.
///
/// IO readiness is level-triggered. In one iteration the loop waits (no longer than the
/// nearest timer, not at all if idle callbacks are pending), dispatches IO — signals and
/// child exits arrive through a self-pipe as IO —, fires due timers, then runs the idle
/// callbacks queued before the iteration began.
pub struct Loop {
    /// Never dropped in a process other than the one that built it (see `Drop`).
    backend: ManuallyDrop<Box<dyn Backend>>,
    kind: Option<Kind>,
    pub(crate) id: LoopId,
    /// The fork generation the backend was built (or rebuilt) in.
    pub(crate) generation: u64,
    next_id: u64,
    fds: FdMap<FdState>,
    io: Slab<IoWatch>,
    always_ready: Vec<RawFd>,
    events: Vec<Event>,
    /// This iteration's events merged per fd, in the order first reported.
    ready: Vec<(RawFd, Readiness)>,
    timers: Timers,
    due: Vec<(Instant, u64)>,
    /// Keyed by id, so in arming order; an iteration runs only ids below its start mark.
    idle: BTreeMap<u64, IdleCallback>,
    pub(crate) signals: Signals,
    pub(crate) children: Children,
    run_depth: usize,
    dispatching: bool,
    stop: Option<i32>,
}

/// How long to wait for a timer: rounded up to whole milliseconds on every backend (as
/// epoll's timeout is), so that a wake-up fires every timer due within that
/// millisecond rather than one, and never before its deadline (libev's backend_mintime).
fn timer_wait(until: Duration) -> Duration {
    let ms = until.as_nanos().div_ceil(TIMER_GRANULARITY.as_nanos());
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// The unit timer waits are rounded up to, and the shortest repeating interval.
const TIMER_GRANULARITY: Duration = Duration::from_millis(1);

fn fires(interest: Interest, ready: Readiness) -> bool {
    let problem = Readiness::HANGUP | Readiness::ERROR;
    (interest.contains(Interest::READ) && ready.intersects(Readiness::READABLE | problem))
        || (interest.contains(Interest::WRITE) && ready.intersects(Readiness::WRITABLE | problem))
        || (interest.contains(Interest::HANGUP) && ready.intersects(problem))
}

impl Loop {
    /// A loop on the backend `FORKLOOP_BACKEND` names (a comma list, first usable wins),
    /// or on the best one compiled in (epoll > kqueue > poll > select).
    pub fn new() -> Result<Loop> {
        Loop::with_backend(Kind::from_env()?)
    }

    /// A loop on the backend `kind`; an error names it and says why if it is not
    /// compiled in or cannot run on this OS.
    pub fn with_backend(kind: Kind) -> Result<Loop> {
        let mut lp = Loop::from_backend(kind.create()?)?;
        lp.kind = Some(kind);
        Ok(lp)
    }

    /// A loop on a backend built by the caller (compile-time choice, or one of your own).
    /// Fails only if forkloop's fork handlers cannot be registered (out of memory).
    pub fn from_backend(backend: Box<dyn Backend>) -> Result<Loop> {
        fork::init()?;
        Ok(Loop {
            backend: ManuallyDrop::new(backend),
            kind: None,
            id: LoopId {
                pid: std::process::id(),
                serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
            },
            generation: fork::generation(),
            next_id: 1,
            fds: FdMap::new(),
            io: Slab::default(),
            always_ready: Vec::new(),
            events: Vec::new(),
            ready: Vec::new(),
            timers: Timers::default(),
            due: Vec::new(),
            idle: BTreeMap::new(),
            signals: Signals::default(),
            children: Children::default(),
            run_depth: 0,
            dispatching: false,
            stop: None,
        })
    }

    /// The backend's kind, if it was chosen by [`Kind`] (not [`Loop::from_backend`]).
    pub fn kind(&self) -> Option<Kind> {
        self.kind
    }

    /// The backend's name: `"epoll"`, `"poll"`, ….
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// This loop's identity.
    pub fn id(&self) -> LoopId {
        self.id
    }

    /// The fd of the backend's kernel object (epoll, kqueue), if it has one.
    pub fn backend_fd(&self) -> Option<RawFd> {
        self.backend.kernel_fd()
    }

    /// The current time on the loop's (monotonic) clock.
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// A handle to watch `id` of `kind`, branded with this loop.
    pub(crate) fn handle(&self, kind: WatchKind, id: u64) -> Watch {
        let owner = self.id.serial;
        Watch { kind, id, owner }
    }

    pub(crate) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The backend lets go of a kernel object inherited from the parent.
    pub(crate) fn abandon_backend(&mut self) {
        self.backend.abandon_inherited();
    }

    /// The backend's post_fork, fed from the loop's own registration table.
    pub(crate) fn rebuild_backend(&mut self) -> std::io::Result<()> {
        let mut registrations = self
            .fds
            .iter()
            .filter(|(_, st)| !st.always_ready)
            .map(|(fd, st)| (fd, st.interest));
        self.backend.post_fork(&mut registrations)
    }

    /// Watches `fd` for `interest`; `callback` runs at every iteration in which the fd
    /// is ready for it (level-triggered). A read watch also fires on hangup and on a
    /// pending error (reading then tells which); a write watch likewise. Several watches
    /// may share an fd. Cancel the watch before closing the fd.
    pub fn watch_io(
        &mut self,
        fd: RawFd,
        interest: Interest,
        callback: impl FnMut(&mut Loop, Readiness) + 'static,
    ) -> Result<Watch> {
        let backend = self.backend_name();
        if fd < 0 {
            // Checked here, whatever the backend would accept: the fd tables index by it.
            let source = std::io::Error::from_raw_os_error(libc::EBADF);
            return Err(Error::Watch {
                backend,
                fd,
                source,
            });
        }
        if interest.is_empty() {
            let source = std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty interest");
            return Err(Error::Watch {
                backend,
                fd,
                source,
            });
        }
        self.ensure_current()?;
        match self.fds.get_mut(fd) {
            Some(st) => {
                let wanted = st.interest | interest;
                // Even with the interest unchanged: a kernel that keys registrations by
                // file (epoll) refuses the change with ENOENT if the number now names
                // another file, i.e. the fd was closed behind the loop's back.
                if !st.always_ready {
                    self.backend.modify(fd, wanted).map_err(|e| {
                        let source = match e.raw_os_error() {
                            Some(libc::ENOENT) => closed_while_registered(backend, fd),
                            _ => e,
                        };
                        Error::Watch {
                            backend,
                            fd,
                            source,
                        }
                    })?;
                }
                st.interest = wanted;
            }
            None => {
                let always_ready = match self.backend.register(fd, interest) {
                    Ok(()) => false,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => true,
                    Err(source) => {
                        return Err(Error::Watch {
                            backend,
                            fd,
                            source,
                        })
                    }
                };
                if always_ready {
                    self.always_ready.push(fd);
                }
                let watches = SmallVec::new();
                let state = FdState {
                    interest,
                    pending: Readiness::NONE,
                    watches,
                    always_ready,
                };
                self.fds.insert(fd, state);
            }
        }
        let serial = self.next_id();
        let callback = Some(Box::new(callback) as IoCallback);
        let id = self.io.insert(IoWatch {
            serial,
            fd,
            interest,
            callback,
        });
        self.fds
            .get_mut(fd)
            .expect("inserted above")
            .watches
            .push(id);
        Ok(self.handle(WatchKind::Io, id))
    }

    fn cancel_io(&mut self, id: u64) -> bool {
        let Some(watch) = self.io.remove(id) else {
            return false;
        };
        let fd = watch.fd;
        let st = self
            .fds
            .get_mut(fd)
            .expect("every io watch has its fd's state");
        st.watches.retain(|w| *w != id);
        let io = &self.io;
        let remaining = st.watches.iter().fold(Interest::NONE, |acc, &w| {
            acc | io.get(w).expect("watches of an fd are live").interest
        });
        let (changed, always_ready) = (remaining != st.interest, st.always_ready);
        st.interest = remaining;
        if remaining.is_empty() {
            self.fds.remove(fd);
            self.always_ready.retain(|&f| f != fd);
        }
        if !changed || always_ready || !self.backend_is_current() {
            return true;
        }
        let result = if remaining.is_empty() {
            self.backend.deregister(fd)
        } else {
            self.backend.modify(fd, remaining)
        };
        if let Err(e) = result {
            // Closing an fd removes it from epoll/kqueue already; nothing is lost.
            log::debug!(
                "{}: updating fd {fd} after a cancel: {e}",
                self.backend_name()
            );
        }
        true
    }

    /// Cancels a watch of any kind. Returns whether it was still active; cancelling twice,
    /// or a one-shot watch that already fired, is a harmless `false`, and so is a watch
    /// made by another loop (which stays active there). A callback already scheduled in
    /// the current dispatch does not run once its watch is cancelled.
    pub fn cancel(&mut self, watch: Watch) -> bool {
        if watch.owner != self.id.serial {
            return false;
        }
        match watch.kind {
            WatchKind::Io => self.cancel_io(watch.id),
            WatchKind::Timer => self.timers.cancel(watch.id),
            WatchKind::Idle => self.idle.remove(&watch.id).is_some(),
            WatchKind::Signal => self.cancel_signal(watch.id),
            WatchKind::Process => self.cancel_process(watch.id),
        }
    }

    /// Runs `callback` once, `delay` from now (a delay past what `Instant` can hold
    /// means never).
    pub fn after(&mut self, delay: Duration, callback: impl FnOnce(&mut Loop) + 'static) -> Watch {
        self.at(
            crate::timer::saturating_add(Instant::now(), delay),
            callback,
        )
    }

    /// Runs `callback` once at `deadline` (an overdue deadline fires at the next iteration).
    pub fn at(&mut self, deadline: Instant, callback: impl FnOnce(&mut Loop) + 'static) -> Watch {
        self.add_timer(deadline, TimerCallback::Once(Box::new(callback)))
    }

    /// Runs `callback` every `interval`, first one interval from now. Ticks the loop
    /// missed while busy are skipped, not fired in a burst. A zero interval is an error
    /// (it would keep the loop busy forever); one under a millisecond, the loop's timer
    /// granularity, counts as a millisecond (a nanosecond would be as busy as zero).
    pub fn every(
        &mut self,
        interval: Duration,
        callback: impl FnMut(&mut Loop) + 'static,
    ) -> Result<Watch> {
        if interval.is_zero() {
            return Err(Error::ZeroInterval);
        }
        let interval = interval.max(TIMER_GRANULARITY);
        let first = crate::timer::saturating_add(Instant::now(), interval);
        Ok(self.add_timer(first, TimerCallback::Every(Box::new(callback), interval)))
    }

    fn add_timer(&mut self, deadline: Instant, callback: TimerCallback) -> Watch {
        let id = self.timers.insert(deadline, callback);
        self.handle(WatchKind::Timer, id)
    }

    /// Runs `callback` at the end of the next iteration, which then does not block. An
    /// idle callback queued by an idle callback waits for the iteration after.
    pub fn later(&mut self, callback: impl FnOnce(&mut Loop) + 'static) -> Watch {
        let id = self.next_id();
        self.idle.insert(id, Box::new(callback));
        self.handle(WatchKind::Idle, id)
    }

    /// Runs iterations until a callback calls [`Loop::stop`]; returns the value it gave.
    /// `run` may be nested inside a callback: `stop` ends the innermost `run` only. A
    /// `stop` made outside any `run` (from a `loop_once` callback, say) is forgotten when
    /// `run` starts, as libev's `ev_run` does. With nothing watched, `run` waits forever.
    pub fn run(&mut self) -> Result<i32> {
        self.stop = None;
        self.run_depth += 1;
        let result = loop {
            if let Err(e) = self.loop_once(None) {
                break Err(e);
            }
            if let Some(value) = self.stop.take() {
                break Ok(value);
            }
        };
        self.run_depth -= 1;
        result
    }

    /// Runs iterations while any watch of the user's is active — IO, timer, idle, signal
    /// or child (libev's `ev_run` and libuv's `uv_run` default mode) — and returns
    /// `None` when the last is gone, or `Some(value)` when a callback calls
    /// [`Loop::stop`] first. The loop's own watches (its signal self-pipe, pidfds, its
    /// SIGCHLD watch) do not count. A program of timers alone needs no guard timer to end.
    pub fn run_while_watched(&mut self) -> Result<Option<i32>> {
        self.stop = None;
        self.run_depth += 1;
        let result = loop {
            if !self.has_user_watches() {
                break Ok(None);
            }
            if let Err(e) = self.loop_once(None) {
                break Err(e);
            }
            if let Some(value) = self.stop.take() {
                break Ok(Some(value));
            }
        };
        self.run_depth -= 1;
        result
    }

    /// Whether any watch the user made is active (what keeps `run_while_watched` going).
    fn has_user_watches(&self) -> bool {
        let (children, pidfds, sigchld) = self.children.watches();
        let (signals, self_pipe) = self.signals.watches();
        let io = self.io.len().saturating_sub(pidfds + self_pipe);
        let signals = signals.saturating_sub(sigchld);
        io + signals + children + self.timers.len() + self.idle.len() > 0
    }

    /// Makes the innermost [`Loop::run`] return `value` after the current iteration.
    pub fn stop(&mut self, value: i32) {
        self.stop = Some(value);
    }

    /// Whether the loop is inside [`Loop::run`] or dispatching callbacks.
    pub fn is_running(&self) -> bool {
        self.run_depth > 0 || self.dispatching
    }

    /// One iteration: wait up to `timeout` (`None`: until something happens), then
    /// dispatch. Timers and pending idle callbacks shorten the wait.
    pub fn loop_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.ensure_current()?;
        let timeout = self.wait_timeout(timeout);
        self.events.clear();
        if let Err(source) = self.backend.wait(&mut self.events, timeout) {
            let backend = self.backend_name();
            return Err(Error::Wait { backend, source });
        }
        let outer = mem::replace(&mut self.dispatching, true);
        self.dispatch_io();
        if self.children.recheck {
            self.reap_children();
        }
        self.fire_timers();
        self.run_idle();
        self.dispatching = outer;
        Ok(())
    }

    fn wait_timeout(&mut self, requested: Option<Duration>) -> Option<Duration> {
        let busy = !self.idle.is_empty()
            || !self.always_ready.is_empty()
            || self.children.recheck
            || self.stop.is_some();
        if busy {
            return Some(Duration::ZERO);
        }
        match self.timers.next_deadline() {
            None => requested,
            Some(deadline) => {
                let until = timer_wait(deadline.saturating_duration_since(Instant::now()));
                Some(requested.map_or(until, |r| r.min(until)))
            }
        }
    }

    fn dispatch_io(&mut self) {
        // Watches added from here on did not exist when the kernel reported these events:
        // a callback that closes its fd and watches a new one given the same number must
        // not see the old fd's readiness (libev guards the same way).
        let mark = self.next_id;
        // One dispatch per fd with all its readiness: kqueue (and mio or polling on it)
        // reports each filter as an event of its own. The per-fd marks are all cleared
        // before the first callback, so a nested iteration or a caught panic finds none.
        let mut ready = mem::take(&mut self.ready);
        for event in &self.events {
            if let Some(st) = self.fds.get_mut(event.fd) {
                if st.pending.is_empty() {
                    ready.push((event.fd, Readiness::NONE));
                }
                st.pending |= event.readiness;
            }
        }
        for (fd, readiness) in &mut ready {
            let st = self
                .fds
                .get_mut(*fd)
                .expect("marked above, no callback since");
            *readiness = mem::take(&mut st.pending);
        }
        for &(fd, readiness) in &ready {
            self.dispatch_fd(fd, readiness, mark);
        }
        ready.clear();
        self.ready = ready;
        if !self.always_ready.is_empty() {
            for fd in self.always_ready.clone() {
                self.dispatch_fd(fd, Readiness::READABLE | Readiness::WRITABLE, mark);
            }
        }
    }

    fn dispatch_fd(&mut self, fd: RawFd, ready: Readiness, mark: u64) {
        let Some(st) = self.fds.get(fd) else {
            return;
        };
        let ids: SmallVec<[u64; 4]> = st.watches.iter().copied().collect();
        for id in ids {
            let Some(watch) = self.io.get_mut(id).filter(|w| w.serial < mark) else {
                continue; // cancelled by an earlier callback of this dispatch
            };
            if !fires(watch.interest, ready) {
                continue;
            }
            let Some(mut callback) = watch.callback.take() else {
                continue; // running further up the stack (nested run)
            };
            callback(self, ready);
            if let Some(watch) = self.io.get_mut(id) {
                watch.callback = Some(callback);
            }
        }
    }

    fn fire_timers(&mut self) {
        if self.timers.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut due = mem::take(&mut self.due);
        self.timers.pop_due(now, &mut due);
        for &(deadline, id) in &due {
            match self.timers.take(id) {
                Some(TimerCallback::Once(callback)) => callback(self),
                Some(TimerCallback::Every(mut callback, interval)) => {
                    callback(self);
                    let callback = TimerCallback::Every(callback, interval);
                    self.timers.rearm(id, deadline, now, callback);
                }
                None => {}
            }
        }
        due.clear();
        self.due = due;
    }

    fn run_idle(&mut self) {
        let mark = self.next_id;
        while let Some(entry) = self.idle.first_entry() {
            if *entry.key() >= mark {
                break;
            }
            let callback = entry.remove();
            callback(self);
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if !self.backend_is_current() {
            // Inherited from the parent and never rebuilt: its kernel objects are the
            // parent's (or numbers reused by this process). Abandon them; its claims on
            // signals end, as this process no longer watches them through it.
            self.release_signals();
            return;
        }
        self.release_signals();
        // SAFETY: the backend is dropped exactly once, here, in the process that owns it.
        unsafe { ManuallyDrop::drop(&mut self.backend) };
    }
}
