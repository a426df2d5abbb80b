//! Timers on the monotonic clock: a 4-ary heap of deadlines with lazy cancellation.
//!
//! Timers need no kernel object: the loop turns the nearest deadline into the backend's
//! wait timeout. Equal deadlines fire in the order they were armed.
//! Cancelled timers stay in the heap until they reach its top, or until dead entries
//! outnumber live ones, when the heap is rebuilt — so churn (arm, cancel, arm …, as a
//! connection timeout does) costs O(log n) per operation and bounded memory.
//!
//! A restart to a later deadline (a connection's idle timeout pushed back on every read,
//! the usual restart) leaves the timer's heap entry where it is and records the new
//! deadline in the timer; the entry moves there only when it reaches the top of the
//! heap, so a timeout restarted on every event costs no heap work until its first
//! deadline comes. Only a restart to an earlier deadline pushes a new entry.
//!
//! Deadlines are kept as nanoseconds since the timers were made (8 bytes where an
//! `Instant` is 16, compared as integers), so a heap entry is 24 bytes and a timer
//! with its slab place 72: what a million timers touch is what they cost.

use std::time::{Duration, Instant};

use crate::quad_heap::QuadHeap;
use crate::slab::Slab;
use crate::Loop;

type OnceCallback<D> = Box<dyn FnOnce(&mut Loop<D>, &mut D)>;
type EveryCallback<D> = Box<dyn FnMut(&mut Loop<D>, &mut D)>;

pub(crate) enum TimerCallback<D: 'static> {
    Once(OnceCallback<D>),
    Every(EveryCallback<D>, Duration),
}

/// Nanoseconds since [`Timers::epoch`] (negative before it: a deadline may be an
/// `Instant` from before the loop).
type Nanos = i64;

/// A heap entry, or an entry of a due batch: `(deadline, seq, key)`.
pub(crate) type Due = (Nanos, u64, u64);

/// A live timer: `seq` names its current arming (what orders equal deadlines, and what
/// a due batch checks), due at `deadline`. `queued` names the arming of its one live
/// heap entry (0: none, while it is in a due batch): that entry is due no later than
/// `deadline`, and earlier only if the timer was restarted to a later deadline since
/// it was queued (`queued != seq`), when it moves on reaching the top (`Timers::top`).
struct Timer<D: 'static> {
    seq: u64,
    queued: u64,
    deadline: Nanos,
    /// A repeating timer's callback is `None` while it runs.
    callback: Option<TimerCallback<D>>,
    /// Its current arming came due in a nested run while the callback ran: `rearm`
    /// fires it next (a restart since clears it).
    due_while_running: bool,
}

/// Timers in a slab (no hashing on arm, fire or cancel), ordered by a heap of
/// `(deadline, seq, key)`; `seq` grows with every arming, so equal deadlines fire FIFO.
pub(crate) struct Timers<D: 'static> {
    /// What deadlines count from.
    epoch: Instant,
    heap: QuadHeap<Due>,
    slab: Slab<Timer<D>>,
    next_seq: u64,
}

impl<D: 'static> Default for Timers<D> {
    fn default() -> Timers<D> {
        Timers {
            epoch: Instant::now(),
            heap: QuadHeap::default(),
            slab: Slab::default(),
            next_seq: 0,
        }
    }
}

impl<D: 'static> Timers<D> {
    /// `at` as nanoseconds since the epoch, within about 292 years of it either way
    /// (past any deadline `saturating_add` makes, or any `Instant` since boot).
    fn nanos(&self, at: Instant) -> Nanos {
        let saturate = |d: Duration| Nanos::try_from(d.as_nanos()).unwrap_or(Nanos::MAX);
        match at.checked_duration_since(self.epoch) {
            Some(since) => saturate(since),
            None => -saturate(self.epoch.duration_since(at)),
        }
    }

    fn instant(&self, nanos: Nanos) -> Instant {
        let offset = Duration::from_nanos(nanos.unsigned_abs());
        if nanos >= 0 {
            saturating_add(self.epoch, offset)
        } else {
            self.epoch.checked_sub(offset).unwrap_or(self.epoch)
        }
    }

    /// Arms a timer; returns its key (what a `Watch` carries).
    pub(crate) fn insert(&mut self, deadline: Instant, callback: TimerCallback<D>) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        let deadline = self.nanos(deadline);
        let key = self.slab.insert(Timer {
            seq,
            queued: seq,
            deadline,
            callback: Some(callback),
            due_while_running: false,
        });
        self.heap.push((deadline, seq, key));
        key
    }

    /// Moves a live timer to `deadline`, a new arming (the callback stays where it is).
    /// Later than its current deadline, its heap entry stays and moves when it reaches
    /// the top; earlier (or with no entry queued, in a due batch), a new entry is pushed
    /// and the old one is dead from now on. Whether the timer was live.
    pub(crate) fn restart(&mut self, key: u64, deadline: Instant) -> bool {
        self.next_seq += 1;
        let seq = self.next_seq;
        let deadline = self.nanos(deadline);
        let Some(timer) = self.slab.get_mut(key) else {
            return false;
        };
        timer.seq = seq;
        timer.due_while_running = false;
        let postpone = timer.queued != 0 && deadline >= timer.deadline;
        timer.deadline = deadline;
        if !postpone {
            timer.queued = seq;
            self.heap.push((deadline, seq, key));
            self.compact();
        }
        true
    }

    /// Drops dead heap entries once they outnumber the live ones (and some slack).
    fn compact(&mut self) {
        if self.heap.len() > 2 * self.slab.len() + 1024 {
            let slab = &self.slab;
            self.heap
                .retain(|&(_, seq, key)| slab.get(key).is_some_and(|t| t.queued == seq));
        }
    }

    /// The earliest live heap entry, left on top: dead entries found there (cancelled,
    /// fired, or restarted earlier since) are dropped, and a postponed one moves to its
    /// timer's deadline, until the top is an entry due when its timer is.
    fn top(&mut self) -> Option<Due> {
        while let Some((deadline, seq, key)) = self.heap.peek() {
            match self.slab.get_mut(key) {
                Some(timer) if timer.queued == seq => {
                    if timer.seq == seq {
                        return Some((deadline, seq, key));
                    }
                    // Replacing the top sifts it down once, cheaper than a pop and a push.
                    timer.queued = timer.seq;
                    self.heap.replace_top((timer.deadline, timer.seq, key));
                }
                _ => {
                    self.heap.pop();
                }
            }
        }
        None
    }

    pub(crate) fn cancel(&mut self, key: u64) -> bool {
        if self.slab.remove(key).is_none() {
            return false;
        }
        self.compact();
        true
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slab.len() == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }

    /// The nearest live deadline.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        self.top().map(|(deadline, _, _)| self.instant(deadline))
    }

    /// Moves the deadlines, arming numbers and keys of live timers due at `now` into
    /// `due`, earliest first. Timers armed by their callbacks are not in this batch, so a timer
    /// re-arming itself with a zero delay cannot keep one iteration busy forever.
    pub(crate) fn pop_due(&mut self, now: Instant, due: &mut Vec<Due>) {
        let now = self.nanos(now);
        while let Some((deadline, seq, key)) = self.top() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if let Some(timer) = self.slab.get_mut(key) {
                timer.queued = 0; // a restart from the batch pushes a new entry
            }
            due.push((deadline, seq, key));
        }
    }

    /// Takes a due timer's callback, unless an earlier callback of the batch restarted
    /// or cancelled it (`seq` is the arming that came due): a one-shot timer is gone
    /// from then on, a repeating one stays live (and cancellable or restartable from
    /// its own callback) until [`Timers::rearm`].
    pub(crate) fn take(&mut self, key: u64, seq: u64) -> Option<TimerCallback<D>> {
        let timer = self.slab.get_mut(key).filter(|t| t.seq == seq)?;
        match timer.callback {
            Some(TimerCallback::Every(..)) => timer.callback.take(),
            // Only a repeating timer's callback is ever out: it runs further up the
            // stack, and this arming came due in a nested run.
            None => {
                timer.due_while_running = true;
                None
            }
            Some(TimerCallback::Once(_)) => self.slab.remove(key)?.callback,
        }
    }

    /// Puts an entry of a due batch back on the heap (the batch was cut short), unless
    /// its timer was cancelled or restarted since.
    pub(crate) fn requeue(&mut self, (deadline, seq, key): Due) {
        if let Some(timer) = self.slab.get_mut(key).filter(|t| t.seq == seq) {
            timer.queued = seq;
            self.heap.push((deadline, seq, key));
        }
    }

    /// Puts a repeating timer back, unless its callback cancelled it. The next deadline
    /// is one interval after the one that fired, or one interval from now if the loop
    /// fell behind (missed ticks are skipped, not fired in a burst), unless the callback
    /// restarted it (arming `seq` is no longer its own), which chose the deadline.
    pub(crate) fn rearm(
        &mut self,
        (fired, seq, key): Due,
        now: Instant,
        callback: TimerCallback<D>,
    ) {
        let TimerCallback::Every(_, interval) = &callback else {
            return;
        };
        let interval = Nanos::try_from(interval.as_nanos()).unwrap_or(Nanos::MAX);
        let now = self.nanos(now);
        let mut next = fired.saturating_add(interval);
        if next <= now {
            next = now.saturating_add(interval);
        }
        let Some(timer) = self.slab.get_mut(key) else {
            return;
        };
        timer.callback = Some(callback);
        if std::mem::take(&mut timer.due_while_running) {
            next = now;
        } else if timer.seq != seq {
            return; // restarted by its callback, which chose the deadline
        }
        self.next_seq += 1;
        timer.seq = self.next_seq;
        timer.queued = timer.seq;
        timer.deadline = next;
        self.heap.push((next, timer.seq, key));
    }
}

/// `at + delay`, or a deadline some 136 years away (never, for a loop) where that is
/// past what `Instant` holds: a huge delay is not a panic.
pub(crate) fn saturating_add(at: Instant, delay: Duration) -> Instant {
    at.checked_add(delay)
        .or_else(|| at.checked_add(Duration::from_secs(u64::from(u32::MAX))))
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn once() -> TimerCallback<()> {
        TimerCallback::Once(Box::new(|_, _| {}))
    }

    #[test]
    fn fired_and_cancelled_keys_miss() {
        let mut timers = Timers::default();
        let now = Instant::now();
        let a = timers.insert(now, once());
        assert!(timers.cancel(a) && !timers.cancel(a), "cancelled twice");
        let b = timers.insert(now, once());
        let mut due = Vec::new();
        timers.pop_due(now, &mut due);
        let [(_, seq, key)] = due[..] else {
            panic!("{} timers due, not one", due.len());
        };
        assert_eq!(key, b, "the cancelled timer is not due");
        assert!(timers.take(b, seq).is_some());
        assert!(timers.take(b, seq).is_none() && !timers.cancel(b) && timers.is_empty());
    }

    #[test]
    fn churn_keeps_the_heap_bounded() {
        let mut timers = Timers::default();
        let later = Instant::now() + Duration::from_secs(60);
        for _ in 0..100_000 {
            let k = timers.insert(later, once());
            timers.cancel(k);
        }
        assert!(
            timers.heap.len() <= 1024 + 2,
            "{} dead entries kept",
            timers.heap.len()
        );
        assert_eq!(timers.slab.capacity(), 1, "one place, reused");
    }

    /// The keys of the timers due at `at`, in firing order.
    fn due_at(timers: &mut Timers<()>, at: Instant) -> Vec<u64> {
        let mut due = Vec::new();
        timers.pop_due(at, &mut due);
        due.iter().map(|&(_, _, key)| key).collect()
    }

    #[test]
    fn a_later_restart_moves_the_entry_only_when_it_reaches_the_top() {
        let mut timers = Timers::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let k = timers.insert(t0 + ms(10), once());
        for i in 1..=100_000 {
            assert!(timers.restart(k, t0 + ms(10) + Duration::from_nanos(i)));
        }
        assert_eq!(timers.heap.len(), 1, "pushed back 100,000 times, one entry");
        let last = t0 + ms(10) + Duration::from_nanos(100_000);
        assert_eq!(
            timers.next_deadline(),
            Some(last),
            "the wait is for the last"
        );
        assert!(due_at(&mut timers, last - Duration::from_nanos(1)).is_empty());
        assert_eq!(due_at(&mut timers, last), [k]);
    }

    #[test]
    fn an_earlier_restart_fires_then_and_once() {
        let mut timers = Timers::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let k = timers.insert(t0 + ms(20), once());
        timers.restart(k, t0 + ms(10)); // earlier: a new entry, the old one dead
        assert_eq!(timers.next_deadline(), Some(t0 + ms(10)));
        timers.restart(k, t0 + ms(30)); // later again: postponed
        assert_eq!(timers.next_deadline(), Some(t0 + ms(30)));
        assert!(due_at(&mut timers, t0 + ms(29)).is_empty());
        let mut due = Vec::new();
        timers.pop_due(t0 + ms(40), &mut due);
        let [(deadline, seq, key)] = due[..] else {
            panic!("{} entries due, not one", due.len());
        };
        assert_eq!((timers.instant(deadline), key), (t0 + ms(30), k));
        assert!(timers.take(k, seq).is_some() && timers.is_empty());
        assert_eq!(timers.next_deadline(), None, "no entry left alive");
    }

    #[test]
    fn equal_deadlines_fire_in_arming_order_a_restart_counting_as_one() {
        let mut timers = Timers::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let a = timers.insert(t0 + ms(10), once());
        let b = timers.insert(t0 + ms(20), once());
        timers.restart(a, t0 + ms(20)); // postponed, armed after b
        let c = timers.insert(t0 + ms(20), once());
        assert_eq!(due_at(&mut timers, t0 + ms(20)), [b, a, c]);
    }

    #[test]
    fn deadlines_from_before_the_timers_were_made_keep_their_order() {
        let mut timers = Timers::default();
        let ms = Duration::from_millis;
        let before = |d| timers.epoch.checked_sub(d).expect("booted > 2 ms ago");
        let (late, early) = (before(ms(1)), before(ms(2)));
        let a = timers.insert(late, once());
        let b = timers.insert(early, once());
        assert_eq!(timers.next_deadline(), Some(early));
        assert_eq!(due_at(&mut timers, late), [b, a], "earliest first");
    }

    #[test]
    fn a_restart_from_its_due_batch_is_a_new_entry() {
        let mut timers = Timers::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let k = timers.insert(t0, once());
        let mut due = Vec::new();
        timers.pop_due(t0, &mut due);
        assert_eq!(due.len(), 1);
        // An earlier callback of the batch pushes it back: it no longer fires in it.
        assert!(timers.restart(k, t0 + ms(10)));
        assert!(timers.take(k, due[0].1).is_none());
        assert_eq!(timers.next_deadline(), Some(t0 + ms(10)));
        // A batch cut short puts back only what is still due as it was.
        timers.requeue(due[0]);
        assert_eq!(timers.heap.len(), 1, "the restarted arming is not requeued");
        assert_eq!(due_at(&mut timers, t0 + ms(10)), [k]);
    }
}
