//! Signal watches: a handler that only records the signal and writes one byte to the
//! watching loop's self-pipe; the loop drains the pipe and runs callbacks in dispatch.
//!
//! Dispositions are process-wide, so the bookkeeping the handler reads is in statics
//! (atomics only: the handler and the fork child paths must be async-signal-safe). Each
//! signal is watched by at most one loop of the process at a time.

use std::collections::btree_map::{BTreeMap, Entry};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};

use forkloop_backend::{cvt, Interest};
use smallvec::SmallVec;

use crate::event_loop::{Watch, WatchKind};
use crate::id_map::IdMap;
use crate::{sys, Error, Loop, Result};

/// Above every platform's NSIG (Linux 65, macOS 32, FreeBSD 129).
const MAX_SIGNAL: usize = 129;

/// Set by the handler, cleared by the loop when it dispatches.
static PENDING: [AtomicBool; MAX_SIGNAL] = [const { AtomicBool::new(false) }; MAX_SIGNAL];
/// The write end of the watching loop's self-pipe, or -1.
static WAKE_FD: [AtomicI32; MAX_SIGNAL] = [const { AtomicI32::new(-1) }; MAX_SIGNAL];
/// Whether the loop installed the handler, and what it replaced.
static INSTALLED: [AtomicU8; MAX_SIGNAL] = [const { AtomicU8::new(NOT_OURS) }; MAX_SIGNAL];
const NOT_OURS: u8 = 0;
const OURS_OVER_DEFAULT: u8 = 1;
const OURS_OVER_IGNORE: u8 = 2;

extern "C" fn on_signal(signal: libc::c_int) {
    // Only atomics and write(2) here: async-signal-safe. errno is preserved for the
    // code this handler interrupted.
    let errno = sys::errno_location();
    // SAFETY: errno_location points at this thread's errno.
    let saved = unsafe { *errno };
    let index = signal as usize;
    PENDING[index].store(true, Ordering::SeqCst);
    let fd = WAKE_FD[index].load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = signal as u8;
        // SAFETY: one byte from a live stack slot. A full pipe (EAGAIN) already means a
        // wake-up is pending, so the result is deliberately ignored.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

fn sigaction(signal: libc::c_int, handler: libc::sighandler_t) -> std::io::Result<libc::sigaction> {
    // SAFETY: sigaction is plain old data; all-zero is valid (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: sa_mask is a valid sigset_t to fill: block everything while handling.
    unsafe { libc::sigfillset(&mut action.sa_mask) };
    restore(signal, &action)
}

fn restore(signal: libc::c_int, action: &libc::sigaction) -> std::io::Result<libc::sigaction> {
    // SAFETY: as in `sigaction`.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are live sigaction values; an invalid signal is EINVAL.
    cvt(unsafe { libc::sigaction(signal, action, &mut previous) })?;
    Ok(previous)
}

fn check_signal(signal: libc::c_int) -> Result<()> {
    let reason = match signal {
        libc::SIGKILL | libc::SIGSTOP => "it cannot be caught",
        s if s <= 0 || s as usize >= MAX_SIGNAL => "no such signal",
        _ => return Ok(()),
    };
    Err(Error::Signal {
        signal,
        reason: reason.into(),
    })
}

/// After fork, in the child (from the `pthread_atfork` handler): the parent's undispatched
/// signals are the parent's, and its self-pipes are shared with the parent, so the child
/// neither inherits the pending marks nor writes to those pipes until a loop of its own
/// claims the signal. Async-signal-safe.
pub(crate) fn forget_parent_signals() {
    for i in 0..MAX_SIGNAL {
        WAKE_FD[i].store(-1, Ordering::SeqCst);
        PENDING[i].store(false, Ordering::SeqCst);
    }
}

/// In a `Loop::fork` child: puts back the dispositions the loop replaced (a signal that
/// was ignored stays ignored). Async-signal-safe.
pub(crate) fn reset_handlers_in_child() {
    for (signal, installed) in INSTALLED.iter().enumerate() {
        let handler = match installed.swap(NOT_OURS, Ordering::SeqCst) {
            NOT_OURS => continue,
            OURS_OVER_IGNORE => libc::SIG_IGN,
            _ => libc::SIG_DFL,
        };
        let _ = sigaction(signal as libc::c_int, handler);
    }
}

type SignalCallback = Box<dyn FnMut(&mut Loop, libc::c_int)>;

struct SignalWatch {
    signal: libc::c_int,
    /// `None` while it runs.
    callback: Option<SignalCallback>,
}

struct Claimed {
    previous: libc::sigaction,
    watches: SmallVec<[u64; 2]>,
}

struct WakePipe {
    read: OwnedFd,
    write: OwnedFd,
    watch: Watch,
}

/// One loop's signal watches.
#[derive(Default)]
pub(crate) struct Signals {
    pipe: Option<WakePipe>,
    watches: IdMap<u64, SignalWatch>,
    claimed: BTreeMap<libc::c_int, Claimed>,
}

impl Signals {
    /// Closes the self-pipe's fds and forgets its watch, which is left in the loop's
    /// tables: only for a loop that is never used again (see `Loop::fork`).
    pub(crate) fn close_pipe(&mut self) {
        self.pipe = None;
    }
}

impl Loop {
    /// Runs `callback` in dispatch each time `signal` (`libc::SIGTERM`, …) arrives;
    /// deliveries between two iterations coalesce into one call, as the kernel's do.
    /// Several watches may share a signal. An unknown or uncatchable signal, or one
    /// another loop of this process watches, is an error. When its last watch is
    /// cancelled the signal's previous disposition is restored.
    pub fn watch_signal(
        &mut self,
        signal: libc::c_int,
        callback: impl FnMut(&mut Loop, libc::c_int) + 'static,
    ) -> Result<Watch> {
        check_signal(signal)?;
        self.ensure_current()?;
        let wake_fd = self.wake_pipe()?;
        let id = self.next_id();
        let claimed = match self.signals.claimed.entry(signal) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let previous = claim(signal, wake_fd)?;
                let watches = SmallVec::new();
                e.insert(Claimed { previous, watches })
            }
        };
        claimed.watches.push(id);
        let callback = Some(Box::new(callback) as _);
        self.signals
            .watches
            .insert(id, SignalWatch { signal, callback });
        Ok(Watch::new(WatchKind::Signal, id))
    }

    /// The write end of this loop's self-pipe, created (and watched) on first use.
    fn wake_pipe(&mut self) -> Result<libc::c_int> {
        if let Some(pipe) = &self.signals.pipe {
            return Ok(pipe.write.as_raw_fd());
        }
        let (read, write) = sys::pipe().map_err(|source| Error::Create {
            what: "the signal self-pipe",
            source,
        })?;
        let watch = self.watch_io(read.as_raw_fd(), Interest::READ, |lp, _| {
            lp.dispatch_signals()
        })?;
        let fd = write.as_raw_fd();
        self.signals.pipe = Some(WakePipe { read, write, watch });
        Ok(fd)
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
            release(watch.signal, &claimed.previous);
        }
        if self.signals.claimed.is_empty() {
            if let Some(pipe) = self.signals.pipe.take() {
                self.cancel(pipe.watch);
            }
        }
        true
    }

    /// Drain the pipe first, then act: a signal arriving after the drain leaves a byte
    /// that wakes the next iteration.
    fn dispatch_signals(&mut self) {
        if let Some(pipe) = &self.signals.pipe {
            let mut buf = [0u8; 64];
            // SAFETY: reads into a live stack buffer of the given length.
            while unsafe { libc::read(pipe.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
                > 0
            {}
        }
        let signals: SmallVec<[libc::c_int; 8]> = self.signals.claimed.keys().copied().collect();
        for signal in signals {
            if !PENDING[signal as usize].swap(false, Ordering::SeqCst) {
                continue;
            }
            let ids = match self.signals.claimed.get(&signal) {
                Some(claimed) => claimed.watches.clone(),
                None => continue,
            };
            for id in ids {
                let watch = self.signals.watches.get_mut(&id);
                let Some(mut callback) = watch.and_then(|w| w.callback.take()) else {
                    continue;
                };
                callback(self, signal);
                if let Some(watch) = self.signals.watches.get_mut(&id) {
                    watch.callback = Some(callback);
                }
            }
        }
    }

    /// post_fork: a fresh self-pipe (the old one is shared with the parent), claimed
    /// again for every watched signal; a signal that reached this process before the
    /// rebuild is dispatched at the next iteration.
    pub(crate) fn signals_post_fork(&mut self) -> Result<()> {
        let Some(old) = self.signals.pipe.take() else {
            return Ok(());
        };
        self.cancel(old.watch);
        drop(old);
        let wake_fd = self.wake_pipe()?;
        let mut pending = false;
        for &signal in self.signals.claimed.keys() {
            WAKE_FD[signal as usize].store(wake_fd, Ordering::SeqCst);
            pending |= PENDING[signal as usize].load(Ordering::SeqCst);
        }
        if pending {
            // SAFETY: one byte from a static to our own non-blocking pipe.
            unsafe { libc::write(wake_fd, b"!".as_ptr().cast(), 1) };
        }
        Ok(())
    }

    /// Drop: every signal this loop claimed gets its previous disposition back.
    pub(crate) fn release_signals(&mut self) {
        for (signal, claimed) in std::mem::take(&mut self.signals.claimed) {
            release(signal, &claimed.previous);
        }
    }
}

/// Installs the handler for `signal`, waking `wake_fd`; returns the disposition it replaced.
fn claim(signal: libc::c_int, wake_fd: libc::c_int) -> Result<libc::sigaction> {
    let index = signal as usize;
    if let Err(other) =
        WAKE_FD[index].compare_exchange(-1, wake_fd, Ordering::SeqCst, Ordering::SeqCst)
    {
        if other != wake_fd {
            let reason = "another loop of this process already watches it".into();
            return Err(Error::Signal { signal, reason });
        }
    }
    let ours = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    match sigaction(signal, ours) {
        Ok(mut previous) => {
            if previous.sa_sigaction == ours {
                previous = kept_from_parent(index, wake_fd);
            }
            let state = if previous.sa_sigaction == libc::SIG_IGN {
                OURS_OVER_IGNORE
            } else {
                OURS_OVER_DEFAULT
            };
            INSTALLED[index].store(state, Ordering::SeqCst);
            Ok(previous)
        }
        Err(e) => {
            WAKE_FD[index].store(-1, Ordering::SeqCst);
            let reason = format!("cannot be caught: {e}");
            Err(Error::Signal { signal, reason })
        }
    }
}

/// Our handler was already installed: kept across `Loop::fork` by `keep_signals`. The
/// disposition to restore later is the one the parent's loop replaced, and what the
/// handler recorded before this claim is delivered at the next iteration.
fn kept_from_parent(index: usize, wake_fd: libc::c_int) -> libc::sigaction {
    // SAFETY: sigaction is plain old data; all-zero is valid (empty mask, no flags).
    let mut original: libc::sigaction = unsafe { std::mem::zeroed() };
    original.sa_sigaction = match INSTALLED[index].load(Ordering::SeqCst) {
        OURS_OVER_IGNORE => libc::SIG_IGN,
        _ => libc::SIG_DFL,
    };
    if PENDING[index].load(Ordering::SeqCst) {
        // SAFETY: one byte from a static to the loop's own non-blocking pipe.
        unsafe { libc::write(wake_fd, b"!".as_ptr().cast(), 1) };
    }
    original
}

fn release(signal: libc::c_int, previous: &libc::sigaction) {
    let index = signal as usize;
    if let Err(e) = restore(signal, previous) {
        log::warn!("restoring the disposition of signal {signal}: {e}");
    }
    INSTALLED[index].store(NOT_OURS, Ordering::SeqCst);
    WAKE_FD[index].store(-1, Ordering::SeqCst);
    PENDING[index].store(false, Ordering::SeqCst);
}
