//! Fork, decided in one place.
//!
//! Every fork of the process — [`Loop::fork`], a raw `libc::fork`, a daemonizing double
//! fork — runs forkloop's `pthread_atfork` handlers: before it, the forking thread takes
//! Rust's stdout and stderr locks, which both sides release after it; in the child, a
//! generation counter is bumped, the parent's pending signals are forgotten and the
//! process-global loop is cleared. A loop compares its
//! generation with the counter (one atomic load, no syscall) before it touches its
//! backend, and rebuilds it with [`Loop::post_fork`] if they differ.
//!
//! Forks that bypass the C library's `fork()` (a raw `clone`/`SYS_fork` syscall) run no
//! atfork handlers; call [`Loop::post_fork`] by hand after those.

use std::cell::RefCell;
use std::ffi::OsString;
use std::io::{StderrLock, StdoutLock, Write};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};

use crate::signal::{self, ForkLock};
use crate::waker::{self, ForkGate};
use crate::{global, Error, Loop, Result, BACKEND_ENV};

static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Whether the atfork handlers are registered; `REGISTERING` serializes the first time.
static REGISTERED: AtomicBool = AtomicBool::new(false);
static REGISTERING: Mutex<()> = Mutex::new(());

/// What the forking thread holds across fork(2): Rust's stdout and stderr locks, the
/// signal driver's lock, the wakers' gate, and the snapshot of `FORKLOOP_BACKEND`.
type Held = (
    StdoutLock<'static>,
    StderrLock<'static>,
    ForkLock,
    ForkGate,
    MutexGuard<'static, Option<OsString>>,
);

/// `FORKLOOP_BACKEND` as forkloop last read it, for [`backend_env`] in a child.
static BACKEND_SEEN: Mutex<Option<OsString>> = Mutex::new(None);

fn backend_seen() -> MutexGuard<'static, Option<OsString>> {
    BACKEND_SEEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The value of `FORKLOOP_BACKEND` the default backend choice follows: the environment
/// in a process that has not forked since forkloop's first use, and in a forked child
/// the value forkloop last read before the fork (every `Loop::new`, and the process's
/// first loop, read it). A child never reads the environment: `std::env` takes a lock
/// that another thread of the parent may have held at the fork (a `set_var`), and the
/// atfork handler must not take it either (`Command::spawn` forks while holding it).
pub(crate) fn backend_env() -> Option<OsString> {
    if generation() != 0 {
        return backend_seen().clone();
    }
    let value = std::env::var_os(BACKEND_ENV);
    *backend_seen() = value.clone();
    value
}

thread_local! {
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Before every fork, as glibc does with its own FILE locks: the forking thread takes
/// Rust's stdout and stderr locks, the signal driver's lock and the wakers' gate (waiting while another
/// thread holds one), so that none is held by a thread the child will not have; both
/// sides release them after. The driver's lock is the innermost: code holding it never
/// prints, while a thread holding stdout may well watch a signal. stdout is flushed, so
/// the child does not inherit the parent's buffered output and write it a second time.
///
/// So a fork from a signal handler that interrupted the driver (a crash reporter, say)
/// would wait for itself: fork from a handler only what execs or `_exit`s at once, and
/// through a raw syscall, which runs no atfork handlers.
extern "C" fn before_fork() {
    let mut out = std::io::stdout().lock();
    let _ = out.flush();
    let err = std::io::stderr().lock();
    let driver = signal::lock_for_fork();
    let wakers = waker::lock_for_fork();
    let snapshot = backend_seen();
    // `try_with`: a thread forking while it exits has no thread-locals left; it then
    // forks without the locks, as it would have without forkloop.
    let _ = HELD.try_with(|held| *held.borrow_mut() = Some((out, err, driver, wakers, snapshot)));
}

/// Releases what `before_fork` took: in the child, the only thread is the one that took
/// the locks, so it can; unlocking is an atomic store and at most a futex wake.
fn release_locks() {
    let _ = HELD.try_with(|held| drop(held.borrow_mut().take()));
}

extern "C" fn in_parent_after_fork() {
    release_locks();
}

extern "C" fn in_child_after_fork() {
    // Atomics only, and then the unlocks.
    GENERATION.fetch_add(1, Ordering::SeqCst);
    signal::forget_parent();
    global::forget_owner();
    release_locks();
}

/// Registers the atfork handlers once per process; every loop constructor calls it
/// first. A failure (ENOMEM) is an error, and the next call tries again.
pub(crate) fn init() -> Result<()> {
    if REGISTERED.load(Ordering::Acquire) {
        return Ok(());
    }
    let _first = REGISTERING.lock().unwrap_or_else(PoisonError::into_inner);
    if REGISTERED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: the handlers are plain functions. `before_fork` runs before the fork in
    // the ordinary way; the parent and child handlers release the locks it took (in
    // the child, from the only thread, which holds them) and touch atomics.
    let rc = unsafe {
        libc::pthread_atfork(
            Some(before_fork),
            Some(in_parent_after_fork),
            Some(in_child_after_fork),
        )
    };
    if rc != 0 {
        return Err(Error::AtFork(std::io::Error::from_raw_os_error(rc)));
    }
    REGISTERED.store(true, Ordering::Release);
    backend_env(); // so that a child of this process knows it without the environment
    Ok(())
}

/// How many forks separate this process from the one that first used forkloop.
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::SeqCst)
}

/// Options for [`Loop::fork`].
///
/// ```
/// use forkloop::{Error, ForkOptions, Loop};
///
/// let mut lp: Loop = Loop::new()?;
/// // Refused while another thread lives: the child could then do anything it likes.
/// let strict = ForkOptions::new().single_threaded(true).keep_signals(false);
/// let helper = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(100)));
/// assert!(matches!(lp.fork(strict, || 0), Err(Error::NotSingleThreaded { .. })));
/// helper.join().unwrap();
/// # Ok::<(), forkloop::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct ForkOptions {
    keep_signals: bool,
    single_threaded: bool,
}

impl ForkOptions {
    /// The defaults: the child starts with the signal dispositions the loop replaced.
    pub fn new() -> ForkOptions {
        ForkOptions::default()
    }

    /// Keep the handlers the loop installed in the child instead of resetting them.
    /// Signals reaching the child are then only recorded, until a loop of the child
    /// watches them.
    pub fn keep_signals(mut self, keep: bool) -> ForkOptions {
        self.keep_signals = keep;
        self
    }

    /// Refuse to fork (with [`Error::NotSingleThreaded`]) unless this thread is the
    /// process's only one, checked just before the fork: the strict mode for programs
    /// that want the child to be able to do anything, not only what the fork contract
    /// makes safe. The count is read from `/proc/self/task` on Linux (again for up to
    /// 10 ms while it is above one, as a thread just joined lingers there a moment);
    /// where it cannot be read, the fork is refused too.
    pub fn single_threaded(mut self, required: bool) -> ForkOptions {
        self.single_threaded = required;
        self
    }
}

/// How many threads this process has, where the OS says (Linux: /proc/self/task).
fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task")
        .ok()
        .map(|tasks| tasks.count())
}

/// The thread count, read again for up to 10 ms while it is above one: `join` returns
/// when the thread is done, a moment before the kernel drops it from /proc.
fn settled_thread_count() -> Option<usize> {
    let mut threads = thread_count();
    for _ in 0..20 {
        if !matches!(threads, Some(2..)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
        threads = thread_count();
    }
    threads
}

/// Says once, at debug level, that a `Loop::fork` parent has other threads (read from
/// /proc on Linux; not known elsewhere): the child runs only the forking one.
fn note_other_threads() {
    static NOTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !log::log_enabled!(log::Level::Debug) || NOTED.load(Ordering::Relaxed) {
        return;
    }
    if let Some(threads @ 2..) = thread_count() {
        NOTED.store(true, Ordering::Relaxed);
        log::debug!(
            "Loop::fork in a process of {threads} threads: the child runs only this one \
             (Rust's stdout and stderr are safe in it; see the fork contract)"
        );
    }
}

fn flush_std() {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

/// Sets this thread's signal mask; returns the one it replaces.
fn set_signal_mask(mask: &SigSet) -> SigSet {
    let mut old = SigSet::empty();
    // Cannot fail: the `how` is valid and both sets are live.
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(mask), Some(&mut old));
    old
}

impl<D: 'static> Loop<D> {
    /// Forks a child that runs `child` and exits with its return value (a panic, or a
    /// value outside 0..=255, exits 255; nothing unwinds into the parent's frames). Returns the child's pid in the
    /// parent, which can then [`watch_process`](Loop::watch_process) it — an exit before
    /// the watch is still reported.
    ///
    /// All signals are blocked across the fork, so none reaches the child while it still
    /// runs the parent's handlers. In the child the handlers the loop installed are reset
    /// (unless [`ForkOptions::keep_signals`]; an ignored signal stays ignored), the
    /// process-global loop is cleared, signal and child state start empty, this loop's
    /// own fds (its backend's, its signal self-pipe and the pidfds of its child watches)
    /// are closed, as the child cannot reach it, and Rust's stdout and stderr are
    /// flushed before `_exit`. Parent timers never fire in the child.
    ///
    /// In a multi-threaded process the child runs only this thread, and POSIX allows it
    /// only async-signal-safe calls until it execs: a lock another thread held at the
    /// fork stays locked in the child forever. forkloop and the C library make these
    /// safe on top: Rust's `stdout` and `stderr` (`println!`, `eprintln!`, and so
    /// loggers such as env_logger that write to them), whose locks forkloop's atfork
    /// handler holds across every fork of the process and releases on both sides, as
    /// glibc does for its `FILE`s; and `malloc`, which glibc makes fork-safe (so
    /// allocation is). Anything else another thread may lock is not: your own
    /// `Mutex`es, `std::env` (its lock), a logger writing to a file through a lock of
    /// its own, a runtime. The first fork from a multi-threaded process says so once at
    /// debug level.
    ///
    /// ```
    /// use forkloop::{ForkOptions, Loop};
    ///
    /// let mut lp: Loop = Loop::new()?;
    /// let pid = lp.fork(ForkOptions::new(), || 7)?;
    /// lp.watch_process(pid, |lp, (), _, status| {
    ///     lp.stop(status.ok().and_then(|s| s.code()).unwrap_or(-1))
    /// })?;
    /// assert_eq!(lp.run(&mut ())?, 7);
    /// # Ok::<(), forkloop::Error>(())
    /// ```
    pub fn fork(
        &mut self,
        options: ForkOptions,
        child: impl FnOnce() -> i32,
    ) -> Result<libc::pid_t> {
        init()?;
        if options.single_threaded {
            match settled_thread_count() {
                Some(1) => {}
                threads => return Err(Error::NotSingleThreaded { threads }),
            }
        }
        note_other_threads();
        let old_mask = set_signal_mask(&SigSet::all());
        // SAFETY: the child only resets signal dispositions, restores its mask, runs the
        // caller's closure and _exits: it never returns into the parent's frames.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            signal::forget_claims();
            if !options.keep_signals {
                signal::reset_handlers_in_child();
            }
            set_signal_mask(&old_mask);
            self.close_in_child();
            // An exit status is 8 bits: 256 would read as success, so anything outside
            // 0..=255 exits 255, as a panic does.
            let code = panic::catch_unwind(AssertUnwindSafe(child))
                .ok()
                .filter(|code| (0..=255).contains(code))
                .unwrap_or(255);
            flush_std();
            // SAFETY: ends the child without running the parent's atexit handlers or
            // destructors, which own the parent's resources.
            unsafe { libc::_exit(code) };
        }
        let fork_error = std::io::Error::last_os_error();
        set_signal_mask(&old_mask);
        if pid < 0 {
            return Err(Error::Fork(fork_error));
        }
        Ok(pid)
    }

    /// Makes an inherited loop this process's own: a new kernel object for the backend
    /// (see the backend table in the README), a fresh signal self-pipe and waker pipes, and
    /// — in a child — the parent's child watches dropped. IO watches, timers, idle
    /// callbacks, signal watches and wakers survive. Runs automatically before the loop next touches its backend in a
    /// process other than the one that last built it; idempotent.
    ///
    /// ```
    /// use std::time::Duration;
    /// use forkloop::Loop;
    ///
    /// let mut lp: Loop = Loop::new()?;
    /// lp.after(Duration::from_millis(1), |lp, ()| lp.stop(5));
    /// // A raw fork, as a daemonizing library does: the child uses the inherited loop.
    /// // SAFETY: the child only runs the loop and `_exit`s.
    /// match unsafe { libc::fork() } {
    ///     0 => {
    ///         lp.post_fork().expect("a kernel object of the child's own"); // or any use of lp
    ///         let code = lp.run(&mut ()).unwrap_or(1);
    ///         // SAFETY: ends the child without running the parent's destructors.
    ///         unsafe { libc::_exit(code) }
    ///     }
    ///     pid => {
    ///         lp.watch_process(pid, |lp, (), _, status| {
    ///             lp.stop(status.ok().and_then(|s| s.code()).unwrap_or(-1))
    ///         })?;
    ///         assert_eq!(lp.run(&mut ())?, 5);
    ///     }
    /// }
    /// # Ok::<(), forkloop::Error>(())
    /// ```
    pub fn post_fork(&mut self) -> Result<()> {
        init()?;
        if let Err(source) = self.rebuild_backend() {
            let backend = self.backend_name();
            return Err(Error::PostFork { backend, source });
        }
        let inherited_in = self.generation;
        self.generation = generation();
        if self.id.pid != std::process::id() {
            self.id.pid = std::process::id();
            self.forget_children();
        }
        if let Err(e) = self
            .signals_post_fork()
            .and_then(|()| self.wakers_post_fork())
        {
            // Not current yet: the next use tries again, and finishes the rest.
            self.generation = inherited_in;
            return Err(e);
        }
        Ok(())
    }

    /// In a `Loop::fork` child, this loop is out of reach (`fork` borrows it) and never
    /// dropped: it lets go of its kernel objects at once, by the backend's own rule
    /// (the one its `post_fork` follows: epoll closes its copy of the shared instance,
    /// kqueue only forgets a number that is not inherited and may name another file),
    /// and closes its copy of the signal self-pipe. Async-signal-safe: close(2) at most.
    fn close_in_child(&mut self) {
        self.abandon_backend();
        self.signals.close_pipe();
        self.children.close_pidfds_in_child();
    }

    /// Whether the backend was built in this process (no fork since).
    pub(crate) fn backend_is_current(&self) -> bool {
        self.generation == generation()
    }

    /// Rebuilds the backend first if the process forked since it was built.
    pub(crate) fn ensure_current(&mut self) -> Result<()> {
        if self.backend_is_current() {
            Ok(())
        } else {
            self.post_fork()
        }
    }
}
