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

use crate::Loop;

pub(crate) enum TimerCallback {
    Once(Box<dyn FnOnce(&mut Loop)>),
    Every(Box<dyn FnMut(&mut Loop)>, Duration),
}

/// A timer's place: `seq` names the arming the heap entry belongs to (0 when free);
/// `generation` makes stale keys (a fired or cancelled timer's) miss.
#[derive(Default)]
struct Slot {
    generation: u32,
    seq: u64,
    /// A repeating timer's callback is `None` while it runs.
    callback: Option<TimerCallback>,
}

/// Timers in a slab (no hashing on arm, fire or cancel), ordered by a heap of
/// `(deadline, seq, slot)`; `seq` grows with every arming, so equal deadlines fire FIFO.
#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u64, u32)>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    next_seq: u64,
}

fn key(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

impl Timers {
    /// Arms a timer; returns its key (what a `Watch` carries).
    pub(crate) fn insert(&mut self, deadline: Instant, callback: TimerCallback) -> u64 {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            (self.slots.len() - 1) as u32
        });
        self.next_seq += 1;
        let slot = &mut self.slots[index as usize];
        slot.seq = self.next_seq;
        slot.callback = Some(callback);
        self.live += 1;
        self.heap.push(Reverse((deadline, self.next_seq, index)));
        key(index, slot.generation)
    }

    /// The slot a key names, if that timer is still live.
    fn slot_of(&self, key: u64) -> Option<u32> {
        let index = key as u32;
        let slot = self.slots.get(index as usize)?;
        (slot.generation == (key >> 32) as u32 && slot.seq != 0).then_some(index)
    }

    fn release(&mut self, index: u32) -> Option<TimerCallback> {
        let slot = &mut self.slots[index as usize];
        slot.seq = 0;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        self.live -= 1;
        slot.callback.take()
    }

    fn is_current(&self, seq: u64, index: u32) -> bool {
        self.slots[index as usize].seq == seq
    }

    pub(crate) fn cancel(&mut self, key: u64) -> bool {
        let Some(index) = self.slot_of(key) else {
            return false;
        };
        self.release(index);
        if self.heap.len() > 2 * self.live + 1024 {
            let slots = &self.slots;
            self.heap
                .retain(|Reverse((_, seq, i))| slots[*i as usize].seq == *seq);
        }
        true
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The nearest live deadline; drops cancelled entries found on top of the heap.
    pub(crate) fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&Reverse((deadline, seq, index))) = self.heap.peek() {
            if self.is_current(seq, index) {
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
        while let Some(&Reverse((deadline, seq, index))) = self.heap.peek() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if self.is_current(seq, index) {
                due.push((deadline, key(index, self.slots[index as usize].generation)));
            }
        }
    }

    /// Takes a due timer's callback: a one-shot timer is gone from then on, a repeating
    /// one stays live (and cancellable from its own callback) until [`Timers::rearm`].
    pub(crate) fn take(&mut self, key: u64) -> Option<TimerCallback> {
        let index = self.slot_of(key)?;
        match self.slots[index as usize].callback {
            Some(TimerCallback::Every(..)) => self.slots[index as usize].callback.take(),
            _ => self.release(index),
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
        let Some(index) = self.slot_of(key) else {
            return;
        };
        let mut next = fired + *interval;
        if next <= now {
            next = now + *interval;
        }
        self.next_seq += 1;
        let slot = &mut self.slots[index as usize];
        slot.seq = self.next_seq;
        slot.callback = Some(callback);
        self.heap.push(Reverse((next, self.next_seq, index)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn once() -> TimerCallback {
        TimerCallback::Once(Box::new(|_| {}))
    }

    #[test]
    fn stale_keys_miss_after_fire_cancel_and_slot_reuse() {
        let mut timers = Timers::default();
        let now = Instant::now();
        let a = timers.insert(now, once());
        assert!(timers.cancel(a));
        assert!(!timers.cancel(a), "cancelled twice");
        let b = timers.insert(now, once());
        assert_ne!(a, b, "the slot is reused under a new generation");
        assert!(
            !timers.cancel(a),
            "the old key does not cancel the new timer"
        );
        let mut due = Vec::new();
        timers.pop_due(now, &mut due);
        assert_eq!(due, vec![(now, b)]);
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
        assert_eq!(timers.slots.len(), 1, "one slot, reused");
    }
}
