//! The loop: watcher tables, IO dispatch, timers, idle callbacks and run control.
//! Signals, child processes and fork live in their own modules as further `impl Loop`.

use std::collections::BTreeMap;
use std::mem::{self, ManuallyDrop};
use std::os::fd::RawFd;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use forkloop_backend::{Backend, Event, FdMap, Readiness};

use crate::fork;
use crate::handle::{LoopId, Timer, Watch, WatchKind};
use crate::io::{watch_error, FdState, IoWatch, REFUSED_RETRY};
use crate::process::Children;
use crate::signal::Signals;
use crate::slab::Slab;
use crate::timer::{Due, TimerCallback, Timers};
use crate::waker::Wakers;
use crate::{Error, Kind, Result};

type IdleCallback<D> = Box<dyn FnOnce(&mut Loop<D>, &mut D)>;

/// An event loop on one backend, with callbacks that get `&mut D`: the user's state,
/// lent to [`Loop::run`] (calloop's model), so ordinary single-loop code needs no
/// `Rc<RefCell<…>>`. `D` is `'static` (callbacks are boxed closures over it): lend
/// owned state, not borrowed (calloop's `EventLoop<'l, Data>` lifts that, at the cost
/// of a lifetime on every type). Single-threaded by contract (`!Send`): callbacks get the loop
/// mutably and may add and cancel watches of every kind; other threads reach it through
/// a [`Waker`](crate::Waker).
///
/// IO readiness is level-triggered. In one iteration the loop waits (no longer than the
/// nearest timer, not at all if idle callbacks are pending), updates its cached time
/// ([`Loop::now`]), dispatches IO — signals, child exits and wakers arrive through
/// pipes as IO —, fires due timers, then runs the idle callbacks queued before the
/// iteration began.
///
/// ```
/// use std::time::Duration;
/// use forkloop::Loop;
///
/// struct Counter { ticks: u32 }
/// let mut lp: Loop<Counter> = Loop::new()?;
/// lp.every(Duration::from_millis(1), |lp, counter| {
///     counter.ticks += 1;
///     if counter.ticks == 3 {
///         lp.stop(0);
///     }
/// })?;
/// let mut counter = Counter { ticks: 0 };
/// lp.run(&mut counter)?;
/// assert_eq!(counter.ticks, 3);
/// # Ok::<(), forkloop::Error>(())
/// ```
pub struct Loop<D: 'static = ()> {
    /// Never dropped in a process other than the one that built it (see `Drop`).
    pub(crate) backend: ManuallyDrop<Box<dyn Backend>>,
    kind: Option<Kind>,
    pub(crate) id: LoopId,
    /// The fork generation the backend was built (or rebuilt) in.
    pub(crate) generation: u64,
    pub(crate) next_id: u64,
    pub(crate) fds: FdMap<FdState>,
    pub(crate) io: Slab<IoWatch<D>>,
    pub(crate) always_ready: Vec<RawFd>,
    /// Fds whose watches were paused, resumed or given a new interest since the last
    /// wait: the backend hears of them just before the next one (`apply_fd_changes`).
    pub(crate) fd_changes: Vec<RawFd>,
    /// Fds refused for the first time since their last accepted change, whose watches
    /// see [`Readiness::ERROR`](crate::Readiness::ERROR) in this iteration's dispatch.
    pub(crate) errored: Vec<RawFd>,
    pub(crate) events: Vec<Event>,
    /// This iteration's events merged per fd, in the order first reported.
    pub(crate) ready: Vec<(RawFd, Readiness)>,
    timers: Timers<D>,
    due: Vec<Due>,
    /// Keyed by id, so in arming order; an iteration runs only ids below its start mark.
    idle: BTreeMap<u64, IdleCallback<D>>,
    pub(crate) signals: Signals<D>,
    pub(crate) children: Children<D>,
    pub(crate) wakers: Wakers<D>,
    /// The time cached at the iteration's wake-up (libev's `ev_now`).
    now: Instant,
    /// The fork generation the current dispatch began in: a raw fork inside a callback
    /// makes it stale, and the child then runs none of the rest (the parent's).
    dispatch_generation: u64,
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

impl<D: 'static> Loop<D> {
    /// A loop on the backend `FORKLOOP_BACKEND` names (a comma list, first usable wins),
    /// or on the best one compiled in (epoll > kqueue > poll > select).
    pub fn new() -> Result<Loop<D>> {
        Loop::with_backend(Kind::from_env()?)
    }

    /// A loop on the backend `kind`; an error names it and says why if it is not
    /// compiled in or cannot run on this OS.
    ///
    /// ```
    /// use forkloop::{Kind, Loop};
    ///
    /// let lp: Loop = Loop::with_backend(Kind::best()?)?;
    /// assert_eq!(lp.kind(), Some(Kind::best()?));
    /// # Ok::<(), forkloop::Error>(())
    /// ```
    pub fn with_backend(kind: Kind) -> Result<Loop<D>> {
        let mut lp = Loop::from_backend(kind.create()?)?;
        lp.kind = Some(kind);
        Ok(lp)
    }

    /// A loop on a backend built by the caller (compile-time choice, or one of your own).
    /// Fails only if forkloop's fork handlers cannot be registered (out of memory).
    ///
    /// ```
    /// use std::io;
    /// use std::os::fd::RawFd;
    /// use std::time::Duration;
    /// use forkloop::{Backend, Event, Interest, Kind, Loop};
    ///
    /// /// A backend of one's own: here one that counts the waits of another.
    /// struct Counted(Box<dyn Backend>, u32);
    ///
    /// impl Backend for Counted {
    ///     fn name(&self) -> &'static str { "counted" }
    ///     fn register(&mut self, fd: RawFd, i: Interest) -> io::Result<()> { self.0.register(fd, i) }
    ///     fn modify(&mut self, fd: RawFd, i: Interest) -> io::Result<()> { self.0.modify(fd, i) }
    ///     fn deregister(&mut self, fd: RawFd) -> io::Result<()> { self.0.deregister(fd) }
    ///     fn wait(&mut self, events: &mut Vec<Event>, t: Option<Duration>) -> io::Result<()> {
    ///         self.1 += 1;
    ///         self.0.wait(events, t)
    ///     }
    ///     fn post_fork(&mut self, r: &mut dyn Iterator<Item = (RawFd, Interest)>) -> io::Result<()> {
    ///         self.0.post_fork(r)
    ///     }
    /// }
    ///
    /// let mut lp: Loop = Loop::from_backend(Box::new(Counted(Kind::best()?.create()?, 0)))?;
    /// lp.after(Duration::from_millis(1), |lp, ()| lp.stop(0));
    /// lp.run(&mut ())?;
    /// assert_eq!(lp.backend_name(), "counted");
    /// # Ok::<(), forkloop::Error>(())
    /// ```
    pub fn from_backend(backend: Box<dyn Backend>) -> Result<Loop<D>> {
        fork::init()?;
        Ok(Loop {
            backend: ManuallyDrop::new(backend),
            kind: None,
            id: LoopId::next(),
            generation: fork::generation(),
            next_id: 1,
            fds: FdMap::new(),
            io: Slab::default(),
            always_ready: Vec::new(),
            fd_changes: Vec::new(),
            errored: Vec::new(),
            events: Vec::new(),
            ready: Vec::new(),
            timers: Timers::default(),
            due: Vec::new(),
            idle: BTreeMap::new(),
            signals: Signals::default(),
            children: Children::default(),
            wakers: Wakers::default(),
            now: Instant::now(),
            dispatch_generation: fork::generation(),
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

    /// The loop's time (monotonic): read once per iteration, when the wait ends, as
    /// libev's `ev_now` is, so callbacks of one iteration agree on it and pay no clock
    /// read. Relative timers armed in a callback count from it; after a long callback,
    /// [`Loop::update_now`] first, or the timer fires that much earlier.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Reads the clock into the loop's time (libev's `ev_now_update`).
    pub fn update_now(&mut self) -> Instant {
        self.now = Instant::now();
        self.now
    }

    /// The base of a relative timer: the cached time inside dispatch, the clock outside
    /// it (where the cached time may be as old as the last iteration).
    fn timer_base(&mut self) -> Instant {
        if self.dispatching {
            self.now
        } else {
            self.update_now()
        }
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
            .filter(|(_, st)| !st.always_ready && !st.interest.is_empty())
            .map(|(fd, st)| (fd, st.interest));
        self.backend.post_fork(&mut registrations)
    }

    /// Cancels a watch of any kind ([`Io`](crate::Io) and [`Timer`] handles convert).
    /// Returns whether it was still active; cancelling twice, or a one-shot watch that
    /// already fired, is a harmless `false`, and so is a watch made by another loop
    /// (which stays active there). A callback already scheduled in the current dispatch
    /// does not run once its watch is cancelled. An IO watch's source is dropped; to
    /// get it back, use [`Loop::remove`].
    pub fn cancel(&mut self, watch: impl Into<Watch>) -> bool {
        let watch = watch.into();
        if watch.owner != self.id.serial {
            return false;
        }
        match watch.kind {
            WatchKind::Io => {
                let found = self.io.get(watch.id).is_some();
                drop(self.cancel_io(watch.id));
                found
            }
            WatchKind::Timer => self.timers.cancel(watch.id),
            WatchKind::Idle => self.idle.remove(&watch.id).is_some(),
            WatchKind::Signal => self.cancel_signal(watch.id),
            WatchKind::Process => self.cancel_process(watch.id),
            WatchKind::Waker => self.cancel_waker(watch.id),
        }
    }

    /// Runs `callback` once, `delay` after [`Loop::now`] (a delay past what `Instant`
    /// can hold means never). Outside a callback the clock is read first, and becomes
    /// [`Loop::now`] ([`Loop::update_now`]), so that a timer armed between runs does not
    /// count from a time as old as the last iteration; inside one, the iteration's
    /// time is used, as libev's `ev_now` (arm from a long callback with [`Loop::at`]
    /// and a fresh `Instant` to count from the clock). [`Loop::every`] is the same.
    pub fn after(
        &mut self,
        delay: Duration,
        callback: impl FnOnce(&mut Loop<D>, &mut D) + 'static,
    ) -> Timer {
        let deadline = crate::timer::saturating_add(self.timer_base(), delay);
        self.at(deadline, callback)
    }

    /// Runs `callback` once at `deadline` (an overdue deadline fires at the next iteration).
    pub fn at(
        &mut self,
        deadline: Instant,
        callback: impl FnOnce(&mut Loop<D>, &mut D) + 'static,
    ) -> Timer {
        self.add_timer(deadline, TimerCallback::Once(Box::new(callback)))
    }

    /// Runs `callback` every `interval`, first one interval from now. Ticks the loop
    /// missed while busy are skipped, not fired in a burst. A zero interval is an error
    /// (it would keep the loop busy forever); one under a millisecond, the loop's timer
    /// granularity, counts as a millisecond (a nanosecond would be as busy as zero).
    pub fn every(
        &mut self,
        interval: Duration,
        callback: impl FnMut(&mut Loop<D>, &mut D) + 'static,
    ) -> Result<Timer> {
        if interval.is_zero() {
            return Err(Error::ZeroInterval);
        }
        let interval = interval.max(TIMER_GRANULARITY);
        let first = crate::timer::saturating_add(self.timer_base(), interval);
        Ok(self.add_timer(first, TimerCallback::Every(Box::new(callback), interval)))
    }

    fn add_timer(&mut self, deadline: Instant, callback: TimerCallback<D>) -> Timer {
        let id = self.timers.insert(deadline, callback);
        Timer(self.handle(WatchKind::Timer, id))
    }

    /// Moves a pending timer's next firing to `delay` after [`Loop::now`], keeping its
    /// callback (libev's `ev_timer_again`): what a per-connection idle timeout does on
    /// every read and every write that makes progress (restarting on reads alone would
    /// cut off a client slowly reading a large answer). A repeating timer goes on every interval from then. Returns whether the
    /// timer was still pending (a one-shot that fired, or a cancelled timer, is not;
    /// neither is another loop's).
    ///
    /// ```
    /// use std::time::Duration;
    /// use forkloop::{Loop, Timer};
    ///
    /// // An idle timeout pushed back on every "read": it fires once, 5 ms after the last.
    /// let mut lp: Loop<Option<Timer>> = Loop::new()?;
    /// let timeout = lp.after(Duration::from_millis(5), |lp, _| lp.stop(1));
    /// lp.every(Duration::from_millis(1), |lp, timeout| {
    ///     if let Some(timer) = *timeout {
    ///         lp.restart(timer, Duration::from_millis(5)); // no new closure, no allocation
    ///     }
    /// })?;
    /// let mut timeout = Some(timeout);
    /// lp.after(Duration::from_millis(20), |_, timeout: &mut Option<Timer>| *timeout = None);
    /// assert_eq!(lp.run(&mut timeout)?, 1);
    /// # Ok::<(), forkloop::Error>(())
    /// ```
    pub fn restart(&mut self, timer: Timer, delay: Duration) -> bool {
        if timer.0.owner != self.id.serial {
            return false;
        }
        let deadline = crate::timer::saturating_add(self.timer_base(), delay);
        self.timers.restart(timer.0.id, deadline)
    }

    /// Runs `callback` at the end of the next iteration, which then does not block. An
    /// idle callback queued by an idle callback waits for the iteration after.
    pub fn later(&mut self, callback: impl FnOnce(&mut Loop<D>, &mut D) + 'static) -> Watch {
        let id = self.next_id();
        self.idle.insert(id, Box::new(callback));
        self.handle(WatchKind::Idle, id)
    }

    /// Runs iterations until a callback calls [`Loop::stop`]; returns the value it gave.
    /// Callbacks get `data`. `run` may be nested inside a callback (pass it the `data`
    /// the callback got): `stop` ends the innermost `run` only. A `stop` made outside any
    /// `run` (from a `loop_once` callback, say) is forgotten when `run` starts, as
    /// libev's `ev_run` does. With nothing watched, `run` waits forever.
    pub fn run(&mut self, data: &mut D) -> Result<i32> {
        self.stop = None;
        self.run_depth += 1;
        let result = guarded(|| loop {
            self.loop_once(None, data)?;
            if let Some(value) = self.stop.take() {
                break Ok(value);
            }
        });
        self.run_depth -= 1;
        resume(result)
    }

    /// Runs iterations while any watch of the user's is active — IO, timer, idle, signal,
    /// child or waker (libev's `ev_run` and libuv's `uv_run` default mode) — and returns
    /// `None` when the last is gone, or `Some(value)` when a callback calls
    /// [`Loop::stop`] first. The loop's own watches (its signal self-pipe, pidfds, its
    /// SIGCHLD watch) do not count. A program of timers alone needs no guard timer to end.
    ///
    /// ```
    /// use std::time::Duration;
    /// use forkloop::Loop;
    ///
    /// let mut lp: Loop<u32> = Loop::new()?;
    /// lp.after(Duration::from_millis(1), |_, fired| *fired += 1);
    /// let mut fired = 0;
    /// assert_eq!(lp.run_while_watched(&mut fired)?, None);
    /// assert_eq!(fired, 1);
    /// # Ok::<(), forkloop::Error>(())
    /// ```
    pub fn run_while_watched(&mut self, data: &mut D) -> Result<Option<i32>> {
        self.stop = None;
        self.run_depth += 1;
        let result = guarded(|| loop {
            if !self.has_user_watches() {
                break Ok(None);
            }
            self.loop_once(None, data)?;
            if let Some(value) = self.stop.take() {
                break Ok(Some(value));
            }
        });
        self.run_depth -= 1;
        resume(result)
    }

    /// Whether any watch the user made is active (what keeps `run_while_watched` going).
    fn has_user_watches(&self) -> bool {
        let (children, pidfds, sigchld) = self.children.watches();
        let (signals, self_pipe) = self.signals.watches();
        let wakers = self.wakers.len();
        let internal_io = pidfds + self_pipe + wakers;
        let io = self.io.len().saturating_sub(internal_io);
        let signals = signals.saturating_sub(sigchld);
        io + signals + children + wakers + self.timers.len() + self.idle.len() > 0
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
    /// dispatch with `data`. Timers and pending idle callbacks shorten the wait.
    pub fn loop_once(&mut self, timeout: Option<Duration>, data: &mut D) -> Result<()> {
        self.ensure_current()?;
        self.apply_fd_changes();
        self.update_now();
        let mut timeout = self.wait_timeout(timeout);
        if self.signals_before_wait() {
            timeout = Some(Duration::ZERO); // a delivery came while no wake-up was asked
        }
        self.events.clear();
        let waited = self.backend.wait(&mut self.events, timeout);
        self.signals_after_wait();
        if let Err(source) = waited {
            let backend = self.backend_name();
            return Err(match watch_error(backend, -1, source) {
                Error::Watch { source, .. } => Error::Wait { backend, source },
                closed => closed,
            });
        }
        self.update_now();
        let outer = mem::replace(&mut self.dispatching, true);
        let outer_generation = mem::replace(&mut self.dispatch_generation, fork::generation());
        // The flags are put back even if a callback panics and the caller catches it.
        let dispatched = panic::catch_unwind(AssertUnwindSafe(|| {
            self.dispatch_io(data);
            if self.children.recheck && !self.forked_in_dispatch() {
                self.reap_children(data);
            }
            if !self.forked_in_dispatch() {
                self.fire_timers(data);
            }
            if !self.forked_in_dispatch() {
                self.run_idle(data);
            }
        }));
        self.dispatching = outer;
        self.dispatch_generation = outer_generation;
        if let Err(payload) = dispatched {
            panic::resume_unwind(payload);
        }
        Ok(())
    }

    /// Whether a callback of this dispatch forked (a raw `fork`; `Loop::fork` children
    /// never return): this process is then the child, and what is left to dispatch was
    /// the parent's, even after a `post_fork` in the callback.
    pub(crate) fn forked_in_dispatch(&self) -> bool {
        fork::generation() != self.dispatch_generation
    }

    fn wait_timeout(&mut self, requested: Option<Duration>) -> Option<Duration> {
        let busy = !self.idle.is_empty()
            || !self.always_ready.is_empty()
            || self.children.recheck
            || self.stop.is_some();
        if busy {
            return Some(Duration::ZERO);
        }
        // After `apply_fd_changes`, what is queued is what the backend refused.
        let requested = if self.fd_changes.is_empty() {
            requested
        } else {
            Some(requested.map_or(REFUSED_RETRY, |r| r.min(REFUSED_RETRY)))
        };
        match self.timers.next_deadline() {
            None => requested,
            Some(deadline) => {
                let until = timer_wait(deadline.saturating_duration_since(self.now));
                Some(requested.map_or(until, |r| r.min(until)))
            }
        }
    }

    fn fire_timers(&mut self, data: &mut D) {
        if self.timers.is_empty() {
            return;
        }
        let now = self.now;
        let mut due = mem::take(&mut self.due);
        self.timers.pop_due(now, &mut due);
        for (i, &entry) in due.iter().enumerate() {
            let (_, seq, id) = entry;
            let called = match self.timers.take(id, seq) {
                Some(TimerCallback::Once(callback)) => guarded(|| callback(self, data)),
                Some(TimerCallback::Every(mut callback, interval)) => {
                    let serial = self.id.serial;
                    let called = guarded(|| callback(self, data));
                    let callback = take_back(serial, self.id.serial, callback);
                    let callback = TimerCallback::Every(callback, interval);
                    self.timers.rearm(entry, now, callback);
                    called
                }
                None => Ok(()),
            };
            if called.is_err() || self.forked_in_dispatch() {
                // The rest of the batch is due still: back on the heap, not lost.
                for &entry in &due[i + 1..] {
                    self.timers.requeue(entry);
                }
                resume(called);
                break;
            }
        }
        due.clear();
        self.due = due;
    }

    fn run_idle(&mut self, data: &mut D) {
        let mark = self.next_id;
        while let Some(entry) = self.idle.first_entry() {
            if *entry.key() >= mark {
                break;
            }
            let callback = entry.remove();
            callback(self, data);
            if self.forked_in_dispatch() {
                break;
            }
        }
    }
}

/// Runs a callback its watch lent out, so that the caller can put it back even if it
/// panics: a panic the caller of `run` catches leaves every watch whole. Pass the
/// result to [`resume`] once the callback is back.
pub(crate) fn guarded<R>(call: impl FnOnce() -> R) -> std::thread::Result<R> {
    panic::catch_unwind(AssertUnwindSafe(call))
}

/// Takes back what a watch lent its callback, after the callback: from the same loop.
/// A callback that swapped the loop behind its `&mut Loop` (`mem::replace`) would put
/// it into another loop's tables, where a source could land on a watch of another fd
/// and close that one under its registration: that is a bug in the program, and a
/// panic, with what was lent leaked rather than dropped.
pub(crate) fn take_back<T>(serial: u64, lp_serial: u64, lent: T) -> T {
    if serial != lp_serial {
        std::mem::forget(lent);
        panic!("a forkloop callback replaced the loop it was called on (mem::replace or swap of its &mut Loop)");
    }
    lent
}

/// The callback's result, or its panic, going on.
pub(crate) fn resume<R>(result: std::thread::Result<R>) -> R {
    result.unwrap_or_else(|payload| panic::resume_unwind(payload))
}

impl<D: 'static> Drop for Loop<D> {
    fn drop(&mut self) {
        self.wakers.close_all();
        if !self.backend_is_current() {
            // Inherited from the parent and never rebuilt: its kernel objects are the
            // parent's (or numbers reused by this process). Let go of them by the
            // backend's own rule; its claims on signals end, as this process no longer
            // watches them through it.
            self.abandon_backend();
            self.release_signals();
            return;
        }
        // The backend first: the sources and pipes it has registered close after it.
        // SAFETY: the backend is dropped exactly once, here, in the process that owns it.
        unsafe { ManuallyDrop::drop(&mut self.backend) };
        self.release_signals();
    }
}
