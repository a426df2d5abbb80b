//! A 4-ary min-heap (libev's `EV_USE_4HEAP`): half the depth of a binary heap, and a
//! node's four children side by side, so a pop through a heap of a million timers
//! misses the cache at about half as many levels.

pub(crate) struct QuadHeap<T> {
    items: Vec<T>,
}

impl<T> Default for QuadHeap<T> {
    fn default() -> QuadHeap<T> {
        QuadHeap { items: Vec::new() }
    }
}

impl<T: Copy + Ord> QuadHeap<T> {
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// The least item.
    pub(crate) fn peek(&self) -> Option<T> {
        self.items.first().copied()
    }

    pub(crate) fn push(&mut self, item: T) {
        self.items.push(item);
        self.sift_up(self.items.len() - 1);
    }

    /// Takes the least item out.
    pub(crate) fn pop(&mut self) -> Option<T> {
        let last = self.items.pop()?;
        let Some(top) = self.items.first_mut() else {
            return Some(last);
        };
        let least = std::mem::replace(top, last);
        self.sift_down(0);
        Some(least)
    }

    /// Replaces the least item with `item` (one sift, where a pop and a push are two).
    /// Does nothing on an empty heap.
    pub(crate) fn replace_top(&mut self, item: T) {
        if let Some(top) = self.items.first_mut() {
            *top = item;
            self.sift_down(0);
        }
    }

    /// Keeps the items `keep` says to, and makes a heap of them again.
    pub(crate) fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        self.items.retain(keep);
        for i in (0..self.items.len() / 4 + 1).rev() {
            self.sift_down(i);
        }
    }

    /// Moves the item at `i` up to its place (a hole moves, the item is written once).
    fn sift_up(&mut self, mut i: usize) {
        let item = self.items[i];
        while i > 0 {
            let parent = (i - 1) / 4;
            if item >= self.items[parent] {
                break;
            }
            self.items[i] = self.items[parent];
            i = parent;
        }
        self.items[i] = item;
    }

    /// Moves the item at `i` down to its place.
    fn sift_down(&mut self, mut i: usize) {
        let len = self.items.len();
        let Some(&item) = self.items.get(i) else {
            return;
        };
        loop {
            let first = 4 * i + 1;
            if first >= len {
                break;
            }
            let mut least = first;
            for child in first + 1..len.min(first + 4) {
                if self.items[child] < self.items[least] {
                    least = child;
                }
            }
            if self.items[least] >= item {
                break;
            }
            self.items[i] = self.items[least];
            i = least;
        }
        self.items[i] = item;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random numbers with repeats, from a fixed seed.
    fn numbers(n: u64) -> Vec<u64> {
        (0..n)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % (n / 2 + 1))
            .collect()
    }

    fn drain(heap: &mut QuadHeap<u64>) -> Vec<u64> {
        std::iter::from_fn(|| heap.pop()).collect()
    }

    #[test]
    fn pops_in_order_at_every_size() {
        for n in 0..200 {
            let mut heap = QuadHeap::default();
            let mut want = numbers(n);
            want.iter().for_each(|&x| heap.push(x));
            want.sort_unstable();
            assert_eq!(drain(&mut heap), want, "{n} items");
        }
    }

    #[test]
    fn replace_top_and_retain_keep_it_a_heap() {
        let mut heap = QuadHeap::default();
        let mut want = numbers(1000);
        want.iter().for_each(|&x| heap.push(x));
        want.sort_unstable();
        want[0] = 400; // what replaces the least
        heap.replace_top(400);
        heap.retain(|&x| x % 3 != 0);
        want.retain(|&x| x % 3 != 0);
        want.sort_unstable();
        assert_eq!(drain(&mut heap), want);
    }
}
