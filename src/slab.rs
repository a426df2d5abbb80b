//! A slab with generational keys: the store for timers and IO watches.
//!
//! Inserting, finding and removing are an index into a `Vec` — no hashing — and freed
//! places are reused. A key carries its place's generation, which every removal bumps,
//! so a stale key (a cancelled watch's, a fired timer's) misses instead of reaching
//! whatever took the place since.

pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
    /// Removals since the free list was last put in place order (see `remove`).
    removed: usize,
}

struct Entry<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Default for Slab<T> {
    fn default() -> Slab<T> {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            removed: 0,
        }
    }
}

/// Splits a key into its place and generation.
fn split(key: u64) -> (usize, u32) {
    (key as u32 as usize, (key >> 32) as u32)
}

impl<T> Slab<T> {
    /// Stores `value`; returns its key.
    pub(crate) fn insert(&mut self, value: T) -> u64 {
        let index = self.free.pop().unwrap_or_else(|| {
            self.entries.push(Entry {
                generation: 0,
                value: None,
            });
            (self.entries.len() - 1) as u32
        });
        let entry = &mut self.entries[index as usize];
        entry.value = Some(value);
        self.len += 1;
        (u64::from(entry.generation) << 32) | u64::from(index)
    }

    pub(crate) fn get(&self, key: u64) -> Option<&T> {
        let (index, generation) = split(key);
        let entry = self.entries.get(index)?;
        (entry.generation == generation)
            .then_some(entry.value.as_ref())
            .flatten()
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let (index, generation) = split(key);
        let entry = self.entries.get_mut(index)?;
        (entry.generation == generation)
            .then_some(entry.value.as_mut())
            .flatten()
    }

    /// Takes the value out; its key (and every copy of it) misses from then on.
    pub(crate) fn remove(&mut self, key: u64) -> Option<T> {
        let (index, generation) = split(key);
        let entry = self.entries.get_mut(index)?;
        if entry.generation != generation {
            return None;
        }
        let value = entry.value.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        self.len -= 1;
        self.removed += 1;
        if self.len == 0 && self.removed >= self.entries.len() / 2 {
            // Emptied: the next fill takes the places in order, so its writes run through
            // memory one after another instead of in the random order they were freed
            // in (a batch of timers frees its places in deadline order). At most once per
            // half the places' removals, so that a slab emptied at every removal (one
            // timer at a time, after a burst) does not pay for all its places each time.
            self.removed = 0;
            self.free.clear();
            self.free.extend((0..self.entries.len() as u32).rev());
        } else {
            self.free.push(index as u32);
        }
        Some(value)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// How many places exist, used or free.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_miss_after_remove_and_reuse() {
        let mut slab = Slab::default();
        let a = slab.insert("a");
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.remove(a), None, "removed twice");
        let b = slab.insert("b");
        assert_ne!(a, b, "the place is reused under a new generation");
        assert_eq!(slab.get(a), None);
        assert_eq!(
            slab.remove(a),
            None,
            "the old key does not remove the new value"
        );
        assert_eq!(slab.get(b), Some(&"b"));
        assert_eq!((slab.len(), slab.capacity()), (1, 1));
        assert_eq!(slab.get(u64::MAX), None);
    }

    #[test]
    fn an_emptied_slab_is_refilled_in_place_order_and_stale_keys_still_miss() {
        let mut slab = Slab::default();
        let keys: Vec<u64> = (0..4).map(|i| slab.insert(i)).collect();
        for &k in &[keys[2], keys[0], keys[3], keys[1]] {
            slab.remove(k);
        }
        let again: Vec<u64> = (0..4).map(|i| slab.insert(i)).collect();
        let places: Vec<u64> = again.iter().map(|k| k & 0xffff_ffff).collect();
        assert_eq!(places, [0, 1, 2, 3]);
        assert!(
            keys.iter().all(|&k| slab.get(k).is_none()),
            "a new generation"
        );
    }

    #[test]
    fn a_slab_emptied_at_every_removal_is_not_reordered_at_every_removal() {
        let mut slab = Slab::default();
        let keys: Vec<u64> = (0..1000).map(|i| slab.insert(i)).collect();
        for k in keys {
            slab.remove(k);
        }
        assert_eq!(slab.removed, 0, "reordered once, emptied by a batch");
        for _ in 0..10 {
            let k = slab.insert(0);
            slab.remove(k);
        }
        assert_eq!(slab.removed, 10, "emptied 10 times, reordered none");
    }
}
