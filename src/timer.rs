//! Timers on the monotonic clock: a binary heap of deadlines with lazy cancellation.
//!
//! Timers need no kernel object: the loop turns the nearest deadline into the backend's
//! wait timeout. Equal deadlines fire in the order they were armed (ids increase).
//! Cancelled timers stay in the heap until they reach its top, or until dead entries
//! outnumber live ones, when the heap is rebuilt — so churn (arm, cancel, arm …, as a
//! connection timeout does) costs O(log n) per operation and bounded memory.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use crate::id_map::IdMap;
use crate::Loop;

pub(crate) enum TimerCallback {
    Once(Box<dyn FnOnce(&mut Loop)>),
    Every(Box<dyn FnMut(&mut Loop)>, Duration),
}

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Live timers. A repeating timer's callback is `None` while it runs.
    live: IdMap<u64, Option<TimerCallback>>,
}

impl Timers {
    pub(crate) fn insert(&mut self, id: u64, deadline: Instant, callback: TimerCallback) {
        self.heap.push(Reverse((deadline, id)));
        self.live.insert(id, Some(callback));
    }

    pub(crate) fn cancel(&mut self, id: u64) -> bool {
        let found = self.live.remove(&id).is_some();
        if self.heap.len() > 2 * self.live.len() + 1024 {
            let live = &self.live;
            self.heap.retain(|Reverse((_, id))| live.contains_key(id));
        }
        found
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The nearest live deadline; drops cancelled entries found on top of the heap.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((deadline, id))) = self.heap.peek() {
            if self.live.contains_key(&id) {
                return Some(deadline);
            }
            self.heap.pop();
        }
        None
    }

    /// Moves the deadlines and ids of live timers due at `now` into `due`, earliest first. Timers armed
    /// by their callbacks are not in this batch, so a timer re-arming itself with a zero
    /// delay cannot keep one iteration busy forever.
    pub(crate) fn pop_due(&mut self, now: Instant, due: &mut Vec<(Instant, u64)>) {
        while let Some(&Reverse((deadline, id))) = self.heap.peek() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if self.live.contains_key(&id) {
                due.push((deadline, id));
            }
        }
    }

    /// Takes a due timer's callback: a one-shot timer is gone from then on, a repeating
    /// one stays live (and cancellable from its own callback) until [`Timers::rearm`].
    pub(crate) fn take(&mut self, id: u64) -> Option<TimerCallback> {
        match self.live.get_mut(&id)? {
            Some(TimerCallback::Every(..)) => self.live.get_mut(&id)?.take(),
            _ => self.live.remove(&id).flatten(),
        }
    }

    /// Puts a repeating timer back, unless its callback cancelled it. The next deadline
    /// is one interval after the one that fired, or one interval from now if the loop
    /// fell behind (missed ticks are skipped, not fired in a burst).
    pub(crate) fn rearm(&mut self, id: u64, fired: Instant, now: Instant, callback: TimerCallback) {
        let TimerCallback::Every(_, interval) = &callback else {
            return;
        };
        let Some(slot) = self.live.get_mut(&id) else {
            return;
        };
        let mut next = fired + *interval;
        if next <= now {
            next = now + *interval;
        }
        *slot = Some(callback);
        self.heap.push(Reverse((next, id)));
    }
}
