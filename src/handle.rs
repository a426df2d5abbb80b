//! Handles to watches: small `Copy` values branded with the loop that made them.

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

/// A handle to one watch of any kind; give it to [`Loop::cancel`](crate::Loop::cancel)
/// of the loop that made it (it carries that loop's identity; another loop refuses it).
/// [`Io`] and [`Timer`] handles convert into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Watch {
    pub(crate) kind: WatchKind,
    pub(crate) id: u64,
    /// The serial of the loop that made it.
    pub(crate) owner: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum WatchKind {
    Io,
    Timer,
    Idle,
    Signal,
    Process,
    Waker,
}

/// A handle to an IO watch whose source is an `S`: it can change its interest, pause,
/// resume, and give the source back ([`Loop::remove`](crate::Loop::remove)).
pub struct Io<S> {
    pub(crate) watch: Watch,
    /// `fn(S) -> S`: the handle neither owns an `S` nor stops being `Send`/`Sync`, and it
    /// is invariant in `S`, so it never coerces to a type its watch's source is not.
    source: PhantomData<fn(S) -> S>,
}

impl<S> Io<S> {
    pub(crate) fn new(watch: Watch) -> Io<S> {
        let source = PhantomData;
        Io { watch, source }
    }
}

impl<S> Clone for Io<S> {
    fn clone(&self) -> Io<S> {
        *self
    }
}

impl<S> Copy for Io<S> {}

impl<S> PartialEq for Io<S> {
    fn eq(&self, other: &Io<S>) -> bool {
        self.watch == other.watch
    }
}

impl<S> Eq for Io<S> {}

impl<S> fmt::Debug for Io<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Io").field(&self.watch.id).finish()
    }
}

impl<S> From<Io<S>> for Watch {
    fn from(io: Io<S>) -> Watch {
        io.watch
    }
}

/// A handle to a timer: it can be restarted in place
/// ([`Loop::restart`](crate::Loop::restart), libev's `ev_timer_again`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timer(pub(crate) Watch);

impl From<Timer> for Watch {
    fn from(timer: Timer) -> Watch {
        timer.0
    }
}

/// Which loop this is: unique among all loops of all processes alive at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoopId {
    /// The process the loop was built in (or last rebuilt in, by `post_fork`).
    pub pid: u32,
    /// The loop's number within the processes it descends from.
    pub serial: u64,
}

impl LoopId {
    pub(crate) fn next() -> LoopId {
        static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);
        LoopId {
            pid: std::process::id(),
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl fmt::Display for LoopId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "loop {} of pid {}", self.serial, self.pid)
    }
}
