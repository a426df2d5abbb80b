//! Fork, decided in one place.
//!
//! Every fork of the process — [`Loop::fork`], a raw `libc::fork`, a daemonizing double
//! fork — bumps a generation counter in the child (a `pthread_atfork` handler), forgets
//! the parent's pending signals and clears the process-global loop. A loop compares its
//! generation with the counter (one atomic load, no syscall) before it touches its
//! backend, and rebuilds it with [`Loop::post_fork`] if they differ.
//!
//! Forks that bypass the C library's `fork()` (a raw `clone`/`SYS_fork` syscall) run no
//! atfork handlers; call [`Loop::post_fork`] by hand after those.

use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use crate::{global, signal, Error, Loop, Result};

static GENERATION: AtomicU64 = AtomicU64::new(0);
static ATFORK: Once = Once::new();

extern "C" fn in_child_after_fork() {
    // Async-signal-safe: atomics only.
    GENERATION.fetch_add(1, Ordering::SeqCst);
    signal::forget_parent_signals();
    global::forget_owner();
}

/// Registers the atfork handler; every loop constructor calls it first.
pub(crate) fn init() {
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only touches atomics (async-signal-safe).
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child_after_fork)) };
        assert_eq!(rc, 0, "pthread_atfork failed: the process is out of memory");
    });
}

/// How many forks separate this process from the one that first used forkloop.
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::SeqCst)
}

/// Options for [`Loop::fork`].
#[derive(Clone, Debug, Default)]
pub struct ForkOptions {
    keep_signals: bool,
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
}

fn flush_std() {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

fn set_signal_mask(mask: &libc::sigset_t) -> libc::sigset_t {
    // SAFETY: sigset_t is plain old data; pthread_sigmask fills `old`.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are live sigset_t values.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, mask, &mut old) };
    old
}

impl Loop {
    /// Forks a child that runs `child` and exits with its return value (a panic exits
    /// 255; nothing unwinds into the parent's frames). Returns the child's pid in the
    /// parent, which can then [`watch_process`](Loop::watch_process) it — an exit before
    /// the watch is still reported.
    ///
    /// All signals are blocked across the fork, so none reaches the child while it still
    /// runs the parent's handlers. In the child the handlers the loop installed are reset
    /// (unless [`ForkOptions::keep_signals`]; an ignored signal stays ignored), the
    /// process-global loop is cleared, signal and child state start empty, this loop's
    /// own fds (its backend's and its signal self-pipe) are closed, as the child cannot
    /// reach it, and Rust's stdout and stderr are flushed before `_exit`. Parent timers
    /// never fire in the child.
    ///
    /// As with any fork, in a multi-threaded process the child runs only this thread:
    /// `child` must not need locks other threads may have held.
    pub fn fork(
        &mut self,
        options: ForkOptions,
        child: impl FnOnce() -> i32,
    ) -> Result<libc::pid_t> {
        init();
        flush_std();
        // SAFETY: sigset_t is plain old data; sigfillset initializes it.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `all` is a live sigset_t.
        unsafe { libc::sigfillset(&mut all) };
        let old_mask = set_signal_mask(&all);
        // SAFETY: the child only resets signal dispositions, restores its mask, runs the
        // caller's closure and _exits: it never returns into the parent's frames.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            if !options.keep_signals {
                signal::reset_handlers_in_child();
            }
            set_signal_mask(&old_mask);
            self.close_in_child();
            let code = panic::catch_unwind(AssertUnwindSafe(child)).unwrap_or(255);
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
    /// (see the backend table in the README), a fresh signal self-pipe, and — in a child —
    /// the parent's child watches dropped. IO watches, timers, idle callbacks and signal
    /// watches survive. Runs automatically before the loop next touches its backend in a
    /// process other than the one that last built it; idempotent.
    pub fn post_fork(&mut self) -> Result<()> {
        init();
        if let Err(source) = self.rebuild_backend() {
            let backend = self.backend_name();
            return Err(Error::PostFork { backend, source });
        }
        let forked = self.id.pid != std::process::id();
        self.generation = generation();
        self.id.pid = std::process::id();
        self.signals_post_fork()?;
        if forked {
            self.forget_children();
        }
        Ok(())
    }

    /// In a `Loop::fork` child, this loop is out of reach (`fork` borrows it) and never
    /// dropped: its kernel fds are closed at once instead of staying open all the
    /// child's life. The kernel objects live on in the parent. Async-signal-safe: only
    /// close(2).
    fn close_in_child(&mut self) {
        if let Some(fd) = self.backend_fd() {
            // SAFETY: the parent's epoll/kqueue fd, which nothing in this process uses
            // again; closing it does not touch the instance the parent keeps.
            unsafe { libc::close(fd) };
        }
        self.signals.close_pipe();
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
