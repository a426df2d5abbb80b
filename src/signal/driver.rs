//! The process-wide signal driver: one handler per signal for the whole process, and
//! the loops subscribed to it.
//!
//! Dispositions are process-wide, so this state is in statics. The handler counts each
//! delivery (`COUNT`) and writes one byte to the wake pipe of every loop subscribed to
//! the signal; a loop dispatches a signal when its count moved past the one it last saw.
//! So any number of loops of one process (on any threads) can watch the same signal —
//! SIGCHLD above all — and each sees every delivery made while it watched.
//!
//! A loop's wake pipe is reached through a slot (`WAKE`). The handler marks the slot
//! busy around its load and write; a loop giving up its slot clears it, then waits until
//! no handler is busy on it before it closes the pipe. So a handler running on another
//! thread never finds the fd closed and its number reused.
//!
//! The handler and the fork paths use atomics only (async-signal-safe). Installing and
//! restoring dispositions is serialized by `DISPOSITIONS`, which forkloop's atfork
//! handler holds across every fork, so a child never inherits it locked.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use forkloop_backend::cvt;

use crate::{sys, SignalRefusal};

/// Above every platform's NSIG (Linux 65, macOS 32, FreeBSD 129).
pub(crate) const MAX_SIGNAL: usize = 129;
/// How many loops of one process may watch signals at once (one bit each in a mask).
pub(crate) const MAX_LOOPS: usize = 64;

/// Deliveries the handler recorded, per signal; only ever grows.
static COUNT: [AtomicU64; MAX_SIGNAL] = [const { AtomicU64::new(0) }; MAX_SIGNAL];
/// Deliveries up to this count belong to no loop of this process: they reached the
/// parent before a fork, or arrived before the handler was installed.
static BASE: [AtomicU64; MAX_SIGNAL] = [const { AtomicU64::new(0) }; MAX_SIGNAL];
/// How many loops in this process's memory watch each signal, current or inherited
/// across a fork and not yet rebuilt: the disposition is restored when the last goes.
/// (A loop a fork left behind and nobody drops, like the parent's process-global loop
/// in a raw-fork child, keeps its signals caught, as it did before the fork.)
static CLAIMS: [AtomicU32; MAX_SIGNAL] = [const { AtomicU32::new(0) }; MAX_SIGNAL];
/// The slots subscribed to each signal, one bit per slot.
static SUBSCRIBERS: [AtomicU64; MAX_SIGNAL] = [const { AtomicU64::new(0) }; MAX_SIGNAL];
/// The write end of each slot's wake pipe, or -1.
static WAKE: [AtomicI32; MAX_LOOPS] = [const { AtomicI32::new(-1) }; MAX_LOOPS];
/// Whether the slot's loop is in (or about to enter) its backend's wait: only then does
/// the handler write to its wake pipe (libev's `pipe_write_wanted`). A loop not waiting
/// finds the delivery by its count before it waits ([`set_waiting`]), so a signal that
/// arrives while the loop runs callbacks, or is raised by one, costs no write and no
/// read.
static WAITING: [AtomicBool; MAX_LOOPS] = [const { AtomicBool::new(false) }; MAX_LOOPS];
/// Handlers between loading a slot's fd and finishing their write to it.
static BUSY: [AtomicU32; MAX_LOOPS] = [const { AtomicU32::new(0) }; MAX_LOOPS];
/// The slots in use, one bit each.
static SLOTS: AtomicU64 = AtomicU64::new(0);
/// Whether our handler is installed, and over what (for the reset in a `Loop::fork` child).
static INSTALLED: [AtomicU8; MAX_SIGNAL] = [const { AtomicU8::new(NOT_OURS) }; MAX_SIGNAL];
const NOT_OURS: u8 = 0;
const OURS_OVER_DEFAULT: u8 = 1;
const OURS_OVER_IGNORE: u8 = 2;

/// The disposition each installed handler replaced, restored when the last subscriber
/// leaves. Every install, restore and subscriber change happens under this lock.
static DISPOSITIONS: Mutex<[Option<Disposition>; MAX_SIGNAL]> =
    Mutex::new([const { None }; MAX_SIGNAL]);

#[derive(Clone, Copy)]
pub(crate) struct Disposition(libc::sigaction);

// SAFETY: a sigaction is plain data (a handler address, flags and a mask); it refers to
// no memory that a thread could own.
unsafe impl Send for Disposition {}

extern "C" fn on_signal(signal: libc::c_int) {
    // Only atomics and write(2) here: async-signal-safe. errno is preserved for the
    // code this handler interrupted.
    let errno = sys::errno_location();
    // SAFETY: errno_location points at this thread's errno.
    let saved = unsafe { *errno };
    let index = signal as usize;
    COUNT[index].fetch_add(1, Ordering::SeqCst);
    let mut slots = SUBSCRIBERS[index].load(Ordering::SeqCst);
    while slots != 0 {
        let slot = slots.trailing_zeros() as usize;
        slots &= slots - 1;
        // Busy before the load: a loop that clears the slot after this load sees it.
        BUSY[slot].fetch_add(1, Ordering::SeqCst);
        let fd = WAKE[slot].load(Ordering::SeqCst);
        // After the count's increment (SeqCst both): see set_waiting.
        if fd >= 0 && WAITING[slot].load(Ordering::SeqCst) {
            let byte = signal as u8;
            // SAFETY: one byte from a live stack slot to a pipe that stays open while
            // this slot is busy. A full pipe (EAGAIN) already means a wake-up is
            // pending, so the result is deliberately ignored.
            unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
        }
        BUSY[slot].fetch_sub(1, Ordering::SeqCst);
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

fn set_action(signal: libc::c_int, action: &libc::sigaction) -> std::io::Result<libc::sigaction> {
    // SAFETY: sigaction is plain old data; all-zero is valid (empty mask, no flags).
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are live sigaction values; an invalid signal is EINVAL.
    cvt(unsafe { libc::sigaction(signal, action, &mut previous) })?;
    Ok(previous)
}

/// Sets `handler` with every signal blocked while it runs; SIGCHLD without stop and
/// continue notices (only exits concern a loop).
fn set_handler(
    signal: libc::c_int,
    handler: libc::sighandler_t,
) -> std::io::Result<libc::sigaction> {
    // SAFETY: sigaction is plain old data; all-zero is valid (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler;
    action.sa_flags = libc::SA_RESTART;
    if signal == libc::SIGCHLD {
        action.sa_flags |= libc::SA_NOCLDSTOP;
    }
    // SAFETY: sa_mask is a valid sigset_t to fill.
    unsafe { libc::sigfillset(&mut action.sa_mask) };
    set_action(signal, &action)
}

fn ours() -> libc::sighandler_t {
    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t
}

fn dispositions() -> MutexGuard<'static, [Option<Disposition>; MAX_SIGNAL]> {
    DISPOSITIONS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The driver's lock, which the atfork prepare handler holds across fork.
pub(crate) struct ForkLock {
    _guard: MutexGuard<'static, [Option<Disposition>; MAX_SIGNAL]>,
}

/// Takes the lock for a fork: no thread installs or subscribes until it is dropped.
pub(crate) fn lock_for_fork() -> ForkLock {
    ForkLock {
        _guard: dispositions(),
    }
}

/// Deliveries of `signal` so far.
pub(crate) fn count(signal: libc::c_int) -> u64 {
    COUNT[signal as usize].load(Ordering::SeqCst)
}

/// The count up to which deliveries of `signal` belong to no loop of this process (they
/// reached the parent before the last fork, or came before the handler was installed).
fn base(signal: libc::c_int) -> u64 {
    BASE[signal as usize].load(Ordering::SeqCst)
}

/// A slot for a loop's wake pipe; `None` when `MAX_LOOPS` loops already have one.
pub(crate) fn take_slot(wake_fd: libc::c_int) -> Option<usize> {
    let _guard = dispositions();
    let used = SLOTS.load(Ordering::SeqCst);
    let slot = (!used).trailing_zeros() as usize;
    if slot >= MAX_LOOPS {
        return None;
    }
    SLOTS.store(used | 1 << slot, Ordering::SeqCst);
    WAITING[slot].store(false, Ordering::SeqCst);
    WAKE[slot].store(wake_fd, Ordering::SeqCst);
    Some(slot)
}

/// Tells the handler whether `slot`'s loop waits. The loop says `true` and *then* looks
/// at the counts of its signals (and waits without blocking if one moved); the handler
/// adds to the count and *then* looks at this flag (and writes if set). All four are
/// SeqCst, so at least one side sees the other's store: a delivery either makes the
/// loop not block, or wakes it through the pipe. Never both missed.
pub(crate) fn set_waiting(slot: usize, waiting: bool) {
    WAITING[slot].store(waiting, Ordering::SeqCst);
}

/// Gives up a slot: once this returns, no handler writes to its fd any more, so the
/// caller may close it. Its subscriptions must be gone already.
pub(crate) fn release_slot(slot: usize) {
    let _guard = dispositions();
    WAKE[slot].store(-1, Ordering::SeqCst);
    // A handler that loaded the fd before the store is busy until its write is done; one
    // that loads it after sees -1. Handlers are short: a few instructions and a write.
    while BUSY[slot].load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    SLOTS.fetch_and(!(1 << slot), Ordering::SeqCst);
}

/// Where a subscriber's deliveries start.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// From now on: a new watch.
    Now,
    /// From the last fork on: a watch that was there before it (an inherited loop
    /// subscribing again), or a handler kept across `Loop::fork` that recorded for nobody.
    SinceFork,
}

/// A loop's first watch of `signal`: installs the handler unless it is ours already
/// (restored only when the process's last claim goes). Returns where the loop's
/// deliveries start.
pub(crate) fn claim(signal: libc::c_int) -> std::io::Result<Start> {
    let index = signal as usize;
    let mut table = dispositions();
    let claims = CLAIMS[index].load(Ordering::SeqCst);
    let start = if INSTALLED[index].load(Ordering::SeqCst) == NOT_OURS {
        // Counted before the install: a delivery during it is this claim's.
        let before = count(signal);
        let previous = set_handler(signal, ours())?;
        table[index] = Some(Disposition(previous));
        BASE[index].store(before, Ordering::SeqCst);
        let state = if previous.sa_sigaction == libc::SIG_IGN {
            OURS_OVER_IGNORE
        } else {
            OURS_OVER_DEFAULT
        };
        INSTALLED[index].store(state, Ordering::SeqCst);
        Start::Now
    } else if claims == 0 {
        Start::SinceFork // kept across Loop::fork: what it recorded is this claim's
    } else {
        Start::Now
    };
    CLAIMS[index].store(claims.saturating_add(1), Ordering::SeqCst);
    Ok(start)
}

/// A loop's last watch of `signal` went (or the loop was dropped, inherited or not):
/// the process's last claim restores the disposition the handler replaced. Returns a
/// warning to log, as logging under the lock could deadlock a fork.
pub(crate) fn unclaim(signal: libc::c_int) -> Option<String> {
    let index = signal as usize;
    let mut table = dispositions();
    let claims = CLAIMS[index].load(Ordering::SeqCst).saturating_sub(1);
    CLAIMS[index].store(claims, Ordering::SeqCst);
    if claims != 0 || INSTALLED[index].load(Ordering::SeqCst) == NOT_OURS {
        return None;
    }
    INSTALLED[index].store(NOT_OURS, Ordering::SeqCst);
    let previous = table[index].take()?;
    set_action(signal, &previous.0)
        .err()
        .map(|e| format!("restoring the disposition of signal {signal}: {e}"))
}

/// Makes `slot` wake for `signal`, from `start`; returns the count the subscriber has
/// seen up to. The caller compares it with [`count`] after this returns (a delivery
/// between the two found the bit set, or is noticed then).
pub(crate) fn subscribe(signal: libc::c_int, slot: usize, start: Start) -> u64 {
    let index = signal as usize;
    let _guard = dispositions();
    let seen = match start {
        Start::Now => count(signal),
        Start::SinceFork => base(signal),
    };
    SUBSCRIBERS[index].fetch_or(1 << slot, Ordering::SeqCst);
    seen
}

/// Stops waking `slot` for `signal`.
pub(crate) fn unsubscribe(signal: libc::c_int, slot: usize) {
    let _guard = dispositions();
    SUBSCRIBERS[signal as usize].fetch_and(!(1 << slot), Ordering::SeqCst);
}

/// In the child after every fork (atfork handler): no loop of this process is
/// subscribed yet, no slot is in use (the parent's pipes are the parent's; its busy
/// marks belonged to threads the child does not have), and what reached the parent is
/// the parent's. Async-signal-safe: atomics only.
pub(crate) fn forget_parent() {
    for i in 0..MAX_SIGNAL {
        SUBSCRIBERS[i].store(0, Ordering::SeqCst);
        BASE[i].store(COUNT[i].load(Ordering::SeqCst), Ordering::SeqCst);
    }
    for i in 0..MAX_LOOPS {
        WAKE[i].store(-1, Ordering::SeqCst);
        BUSY[i].store(0, Ordering::SeqCst);
    }
    SLOTS.store(0, Ordering::SeqCst);
}

/// In a `Loop::fork` child: the parent's loops are out of reach, so nothing claims a
/// signal any more. Async-signal-safe: atomics only.
pub(crate) fn forget_claims() {
    for claims in &CLAIMS {
        claims.store(0, Ordering::SeqCst);
    }
}

/// In a `Loop::fork` child: puts back the dispositions the loop replaced (a signal that
/// was ignored stays ignored). Async-signal-safe: atomics and sigaction(2).
pub(crate) fn reset_handlers_in_child() {
    for (signal, installed) in INSTALLED.iter().enumerate() {
        let handler = match installed.swap(NOT_OURS, Ordering::SeqCst) {
            NOT_OURS => continue,
            OURS_OVER_IGNORE => libc::SIG_IGN,
            _ => libc::SIG_DFL,
        };
        let _ = set_handler(signal as libc::c_int, handler);
    }
}

/// Checks that `signal` can be caught; the reason if not.
pub(crate) fn uncatchable(signal: libc::c_int) -> Option<SignalRefusal> {
    match signal {
        libc::SIGKILL | libc::SIGSTOP => Some(SignalRefusal::Uncatchable),
        libc::SIGSEGV | libc::SIGBUS | libc::SIGFPE | libc::SIGILL => Some(SignalRefusal::Fault),
        s if s <= 0 || s as usize >= MAX_SIGNAL => Some(SignalRefusal::Unknown),
        #[cfg(any(target_os = "linux", target_os = "android"))]
        s if s > libc::SIGRTMAX() => Some(SignalRefusal::Unknown),
        #[cfg(any(target_os = "linux", target_os = "android"))]
        s if s > libc::SIGSYS && s < libc::SIGRTMIN() => Some(SignalRefusal::Reserved),
        _ => None,
    }
}
