//! Wakers: how other threads reach a loop (libev's `ev_async`, mio's `Waker`), with a
//! value for the loop's callback.
//!
//! A waker is a queue and a pipe. `send` pushes, and writes one byte to the pipe if the
//! loop has not been woken since it last drained the queue; the loop watches the pipe's
//! read end as IO, reads it, then takes the whole queue. The write end belongs to the
//! queue (an `Arc` every `Waker` shares), so no sender can write into a closed fd.
//!
//! Fork: every send, and every drain, holds a process-wide gate for reading, and the
//! atfork handler holds it for writing across each fork: so no queue is locked, or half
//! pushed, in a child. A waker belongs to the fork generation its loop was built (or
//! rebuilt) in. In a child it refuses values ([`SendError::Inherited`]) until the loop's
//! `post_fork` gives it a pipe of the child's own and an empty queue (the values queued
//! before the fork are the parent's to take). In a `Loop::fork` child the loop is never
//! rebuilt, so its wakers belong to nobody and refuse every value.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::event_loop::{guarded, resume, take_back};
use crate::handle::{Watch, WatchKind};
use crate::id_map::IdMap;
use crate::{fork, sys, Error, Loop, Result};

/// Held for reading by every send and drain, for writing across every fork.
static GATE: RwLock<()> = RwLock::new(());

/// What the atfork handler holds across a fork.
pub(crate) type ForkGate = RwLockWriteGuard<'static, ()>;

/// Waits for every send and drain in progress to finish, and keeps new ones out.
pub(crate) fn lock_for_fork() -> ForkGate {
    GATE.write().unwrap_or_else(PoisonError::into_inner)
}

fn enter() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(PoisonError::into_inner)
}

struct State<T> {
    queue: Vec<T>,
    /// The pipe's write end, `None` once the loop let the waker go.
    wake: Option<OwnedFd>,
    /// The fork generation the pipe belongs to.
    generation: u64,
    /// A byte is in the pipe that the loop has not read yet.
    woken: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding it cannot leave the queue half-changed (Vec::push and
        // mem::take either happen or not), so a poisoned lock is still good.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sends values to a loop's callback from any thread: `Send + Sync` and cheap to clone.
/// Made by [`Loop::waker`].
///
/// ```
/// use forkloop::Loop;
///
/// let mut lp: Loop<Vec<u32>> = Loop::new()?;
/// let (waker, _watch) = lp.waker(|lp, got: &mut Vec<u32>, n| {
///     got.push(n);
///     if got.len() == 2 {
///         lp.stop(0);
///     }
/// })?;
/// let thread = std::thread::spawn(move || {
///     waker.send(1).unwrap();
///     waker.send(2).unwrap();
/// });
/// let mut got = Vec::new();
/// lp.run(&mut got)?;
/// thread.join().unwrap();
/// assert_eq!(got, [1, 2]);
/// # Ok::<(), forkloop::Error>(())
/// ```
pub struct Waker<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Waker<T> {
    fn clone(&self) -> Waker<T> {
        let shared = Arc::clone(&self.shared);
        Waker { shared }
    }
}

impl<T> fmt::Debug for Waker<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waker").finish_non_exhaustive()
    }
}

/// Why [`Waker::send`] gave a value back.
#[derive(PartialEq, Eq)]
pub enum SendError<T> {
    /// The watch was cancelled, or the loop dropped.
    Closed(T),
    /// The process forked since the loop was built and the loop has not been rebuilt
    /// here ([`Loop::post_fork`]); in a [`Loop::fork`] child it never is.
    Inherited(T),
}

impl<T> SendError<T> {
    /// The value that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            SendError::Closed(value) | SendError::Inherited(value) => value,
        }
    }
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Closed(_) => f.write_str("Closed(..)"),
            SendError::Inherited(_) => f.write_str("Inherited(..)"),
        }
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::Closed(_) => "the loop let this waker go (cancelled, or dropped)",
            SendError::Inherited(_) => {
                "the waker was inherited across fork and its loop was not rebuilt in this process"
            }
        })
    }
}

impl<T> std::error::Error for SendError<T> {}

impl<T: Send> Waker<T> {
    /// Queues `value` for the loop's callback and wakes the loop. Never blocks on the
    /// loop (only, for a moment, on other senders, and on a fork in progress). Not
    /// async-signal-safe (it locks and allocates): from a signal handler, use
    /// [`Loop::watch_signal`] instead.
    ///
    /// A waker's watch keeps [`Loop::run_while_watched`] going until it is cancelled,
    /// even once every `Waker` is dropped.
    pub fn send(&self, value: T) -> std::result::Result<(), SendError<T>> {
        let _gate = enter();
        let mut state = self.shared.lock();
        let Some(wake) = &state.wake else {
            return Err(SendError::Closed(value));
        };
        if state.generation != fork::generation() {
            return Err(SendError::Inherited(value));
        }
        if !state.woken {
            // SAFETY: one byte from a static to the non-blocking pipe this state owns; a
            // full pipe already means the loop will wake.
            unsafe { libc::write(wake.as_raw_fd(), b"!".as_ptr().cast(), 1) };
        }
        state.woken = true;
        state.queue.push(value);
        Ok(())
    }
}

impl Waker<()> {
    /// Wakes the loop and runs its callback once (wake-ups before it runs coalesce only
    /// if you make them: each `wake` is one call).
    pub fn wake(&self) -> std::result::Result<(), SendError<()>> {
        self.send(())
    }
}

/// The loop's hold on a waker's queue, with `T` erased.
trait Control {
    /// A new pipe (post_fork in a child): the queue is emptied, the write end replaced.
    fn rebind(&self, wake: OwnedFd, generation: u64);
    /// The loop lets go: senders get `Closed` from now on; queued values drop here.
    fn close(&self);
}

impl<T> Control for Shared<T> {
    fn rebind(&self, wake: OwnedFd, generation: u64) {
        let parents = {
            let _gate = enter();
            let mut state = self.lock();
            state.wake = Some(wake);
            state.generation = generation;
            state.woken = false;
            std::mem::take(&mut state.queue)
        };
        // The parent's values: the parent delivers them, and their Drop (a flush, an
        // unlink) must not run here too.
        std::mem::forget(parents);
    }

    fn close(&self) {
        let (queued, inherited) = {
            let _gate = enter();
            let mut state = self.lock();
            state.wake = None;
            let inherited = state.generation != fork::generation();
            (std::mem::take(&mut state.queue), inherited)
        };
        if inherited {
            std::mem::forget(queued); // the parent's values: their Drop is the parent's
        } else {
            drop(queued); // user code (T's Drop) runs outside the locks
        }
    }
}

/// The loop's side of one waker: its callback, with `T` erased.
trait Inbox<D> {
    /// Runs the callback for every value queued.
    fn deliver(&mut self, lp: &mut Loop<D>, data: &mut D);
    /// Values taken from the queue are still to be delivered (a callback panicked).
    fn undelivered(&self) -> bool;
    /// In a child: the values taken from the queue before the fork are the parent's.
    fn forget_undelivered(&mut self);
}

struct Channel<T, F> {
    shared: Arc<Shared<T>>,
    callback: F,
    /// The values taken from the queue and not yet delivered: a callback that panics
    /// leaves the rest here for the next delivery.
    batch: VecDeque<T>,
}

impl<D, T, F> Inbox<D> for Channel<T, F>
where
    F: FnMut(&mut Loop<D>, &mut D, T),
{
    fn deliver(&mut self, lp: &mut Loop<D>, data: &mut D) {
        let generation = {
            let _gate = enter();
            let mut state = self.shared.lock();
            state.woken = false;
            self.batch.extend(state.queue.drain(..));
            state.generation
        };
        // Outside the gate: a callback may fork.
        while let Some(value) = self.batch.pop_front() {
            (self.callback)(lp, data, value);
            if fork::generation() != generation {
                // A raw fork in the callback: the rest is the parent's to deliver.
                std::mem::forget(std::mem::take(&mut self.batch));
                return;
            }
        }
    }

    fn undelivered(&self) -> bool {
        !self.batch.is_empty()
    }

    fn forget_undelivered(&mut self) {
        std::mem::forget(std::mem::take(&mut self.batch));
    }
}

struct Entry<D: 'static> {
    /// The pipe's read end, watched by `io`.
    read: OwnedFd,
    io: Watch,
    /// The fork generation the pipe was made in.
    generation: u64,
    control: Arc<dyn Control>,
    /// `None` while its callbacks run.
    inbox: Option<Box<dyn Inbox<D>>>,
    /// A nested run drained the pipe while the callbacks ran: deliver again after.
    again: bool,
}

/// One loop's wakers.
pub(crate) struct Wakers<D: 'static> {
    entries: IdMap<u64, Entry<D>>,
}

impl<D: 'static> Default for Wakers<D> {
    fn default() -> Wakers<D> {
        let entries = IdMap::default();
        Wakers { entries }
    }
}

impl<D: 'static> Wakers<D> {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The loop is dropped: every waker refuses values from now on.
    pub(crate) fn close_all(&mut self) {
        for entry in self.entries.values() {
            entry.control.close();
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    sys::pipe().map_err(|source| Error::Create {
        what: "a waker's pipe",
        source,
    })
}

impl<D: 'static> Loop<D> {
    /// A [`Waker`] for other threads, and the watch that runs `callback` in this loop
    /// with each value they send, in the order sent. Cancelling the watch (or dropping
    /// the loop) closes the waker: its `send` gives values back from then on.
    ///
    /// After a fork the child's copy of the waker refuses values until this loop is
    /// rebuilt there ([`Loop::post_fork`], or any use of the loop, which rebuilds it):
    /// then it works in the child, on a pipe of its own, and values queued before the
    /// fork stay the parent's. In a [`Loop::fork`] child, where the loop is never
    /// rebuilt, the waker belongs to nobody.
    pub fn waker<T: Send + 'static>(
        &mut self,
        callback: impl FnMut(&mut Loop<D>, &mut D, T) + 'static,
    ) -> Result<(Waker<T>, Watch)> {
        self.ensure_current()?;
        let (read, wake) = pipe()?;
        let id = self.next_id();
        let io = self.watch_waker_pipe(&read, id)?;
        let state = State {
            queue: Vec::new(),
            wake: Some(wake),
            generation: fork::generation(),
            woken: false,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
        });
        let inbox = Box::new(Channel {
            shared: Arc::clone(&shared),
            callback,
            batch: VecDeque::new(),
        });
        let inbox = Some(inbox as Box<dyn Inbox<D>>);
        let control = Arc::clone(&shared) as Arc<dyn Control>;
        let entry = Entry {
            read,
            io,
            generation: fork::generation(),
            control,
            inbox,
            again: false,
        };
        self.wakers.entries.insert(id, entry);
        Ok((Waker { shared }, self.handle(WatchKind::Waker, id)))
    }

    fn watch_waker_pipe(&mut self, read: &OwnedFd, id: u64) -> Result<Watch> {
        // SAFETY: the read end lives in the waker's `Entry`, which cancels this watch
        // before dropping it (`cancel_waker`, `wakers_post_fork`); in a `Loop::fork`
        // child the loop's copy is never used or dropped again.
        unsafe { self.watch_internal(read.as_raw_fd(), move |lp, data| lp.deliver(id, data)) }
    }

    fn deliver(&mut self, id: u64, data: &mut D) {
        let Some(entry) = self.wakers.entries.get_mut(&id) else {
            return;
        };
        sys::drain(&entry.read);
        let Some(mut inbox) = entry.inbox.take() else {
            entry.again = true; // running further up the stack (nested run)
            return;
        };
        let serial = self.id.serial;
        let called = guarded(|| inbox.deliver(self, data));
        let inbox = take_back(serial, self.id.serial, inbox);
        let undelivered = inbox.undelivered();
        if let Some(entry) = self.wakers.entries.get_mut(&id) {
            entry.inbox = Some(inbox);
            if std::mem::take(&mut entry.again) || undelivered {
                // The pipe is drained already: the values sent during the callbacks, or
                // behind a panic, go at the next iteration.
                self.later(move |lp, data| lp.deliver(id, data));
            }
        }
        resume(called);
    }

    pub(crate) fn cancel_waker(&mut self, id: u64) -> bool {
        let Some(entry) = self.wakers.entries.remove(&id) else {
            return false;
        };
        self.cancel(entry.io); // before the read end closes with `entry`
        entry.control.close();
        true
    }

    /// post_fork: each waker inherited across a fork gets a pipe of its own (the
    /// inherited one is shared with the parent, whose wake-ups it would steal). After a
    /// failure, a second call finishes what the first left.
    pub(crate) fn wakers_post_fork(&mut self) -> Result<()> {
        let generation = fork::generation();
        let ids: Vec<u64> = (self.wakers.entries.iter())
            .filter(|(_, entry)| entry.generation != generation)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let (read, wake) = pipe()?;
            let io = self.watch_waker_pipe(&read, id)?;
            let entry = self.wakers.entries.get_mut(&id).expect("listed above");
            let old = std::mem::replace(&mut entry.io, io);
            let old_read = std::mem::replace(&mut entry.read, read);
            entry.control.rebind(wake, generation);
            if let Some(inbox) = &mut entry.inbox {
                inbox.forget_undelivered();
            }
            entry.generation = generation;
            self.cancel(old);
            drop(old_read); // after its watch is gone
        }
        Ok(())
    }
}
