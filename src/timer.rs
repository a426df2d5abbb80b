//! Timers on the monotonic clock: a binary heap of deadlines with lazy cancellation.
//!
//! Timers need no kernel object: the loop turns the nearest deadline into the backend's
//! wait timeout. Equal deadlines fire in the order they were armed.
//! Cancelled timers stay in the heap until they reach its top, or until dead entries
//! outnumber live ones, when the heap is rebuilt — so churn (arm, cancel, arm …, as a
//! connection timeout does) costs O(log n) per operation and bounded memory.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::slab::Slab;
use crate::Loop;

pub(crate) enum TimerCallback {
    Once(Box<dyn FnOnce(&mut Loop)>),
    Every(Box<dyn FnMut(&mut Loop)>, Duration),
}

/// A live timer: `seq` names the arming its heap entry belongs to.
struct Timer {
    seq: u64,
    /// A repeating timer's callback is `None` while it runs.
    callback: Option<TimerCallback>,
}

/// Timers in a slab (no hashing on arm, fire or cancel), ordered by a heap of
/// `(deadline, seq, key)`; `seq` grows with every arming, so equal deadlines fire FIFO.
#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64, u64)>>,
    slab: Slab<Timer>,
    next_seq: u64,
}

impl Timers {
    /// Arms a timer; returns its key (what a `Watch` carries).
    pub(crate) fn insert(&mut self, deadline: Instant, callback: TimerCallback) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        let key = self.slab.insert(Timer {
            seq,
            callback: Some(callback),
        });
        self.heap.push(Reverse((deadline, seq, key)));
        key
    }

    /// Whether a heap entry is the live arming of its timer (not cancelled, fired or
    /// re-armed since).
    fn is_current(&self, seq: u64, key: u64) -> bool {
        self.slab.get(key).is_some_and(|t| t.seq == seq)
    }

    pub(crate) fn cancel(&mut self, key: u64) -> bool {
        if self.slab.remove(key).is_none() {
            return false;
        }
        if self.heap.len() > 2 * self.slab.len() + 1024 {
            let slab = &self.slab;
            self.heap
                .retain(|Reverse((_, seq, key))| slab.get(*key).is_some_and(|t| t.seq == *seq));
        }
        true
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.slab.len() == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }

    /// The nearest live deadline; drops cancelled entries found on top of the heap.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((deadline, seq, key))) = self.heap.peek() {
            if self.is_current(seq, key) {
                return Some(deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Moves the deadlines and keys of live timers due at `now` into `due`, earliest
    /// first. Timers armed by their callbacks are not in this batch, so a timer
    /// re-arming itself with a zero delay cannot keep one iteration busy forever.
    pub(crate) fn pop_due(&mut self, now: Instant, due: &mut Vec<(Instant, u64)>) {
        while let Some(&Reverse((deadline, seq, key))) = self.heap.peek() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if self.is_current(seq, key) {
                due.push((deadline, key));
            }
        }
    }

    /// Takes a due timer's callback: a one-shot timer is gone from then on, a repeating
    /// one stays live (and cancellable from its own callback) until [`Timers::rearm`].
    pub(crate) fn take(&mut self, key: u64) -> Option<TimerCallback> {
        let timer = self.slab.get_mut(key)?;
        match timer.callback {
            Some(TimerCallback::Every(..)) => timer.callback.take(),
            _ => self.slab.remove(key)?.callback,
        }
    }

    /// Puts a repeating timer back, unless its callback cancelled it. The next deadline
    /// is one interval after the one that fired, or one interval from now if the loop
    /// fell behind (missed ticks are skipped, not fired in a burst).
    pub(crate) fn rearm(
        &mut self,
        key: u64,
        fired: Instant,
        now: Instant,
        callback: TimerCallback,
    ) {
        let TimerCallback::Every(_, interval) = &callback else {
            return;
        };
        let mut next = saturating_add(fired, *interval);
        if next <= now {
            next = saturating_add(now, *interval);
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        let Some(timer) = self.slab.get_mut(key) else {
            return;
        };
        timer.seq = seq;
        timer.callback = Some(callback);
        self.heap.push(Reverse((next, seq, key)));
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

    fn once() -> TimerCallback {
        TimerCallback::Once(Box::new(|_| {}))
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
        assert_eq!(due, vec![(now, b)], "the cancelled timer is not due");
        assert!(timers.take(b).is_some());
        assert!(timers.take(b).is_none() && !timers.cancel(b) && timers.is_empty());
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
}
