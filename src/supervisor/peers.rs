//! How many workers serve beside one: a count the master keeps in a page of memory it
//! maps shared before its first fork, so that every worker reads the count as it is
//! now (`TTIN`/`TTOU`, crashes, a reload's overlap), not as it was at its fork.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};

/// The master's workers that are starting or serving (draining ones aside).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Peers {
    /// The master's count, which it changes as it goes.
    Shared(&'static AtomicUsize),
    /// A count that never changes: a worker no master runs (tests).
    Fixed(usize),
}

impl Peers {
    /// A count shared with every process this one forks from now on. Its page is
    /// never unmapped: the master keeps it for its life, and each worker's copy of the
    /// mapping lives as long as that worker.
    pub fn shared() -> nix::Result<Peers> {
        let size = NonZeroUsize::new(size_of::<AtomicUsize>()).expect("not zero-sized");
        let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
        // SAFETY: a new anonymous mapping at an address the kernel picks: no memory of
        // the program's is touched or aliased.
        let page = unsafe { mmap_anonymous(None, size, prot, MapFlags::MAP_SHARED) }?;
        // SAFETY: the mapping is page-aligned (so aligned for an AtomicUsize), readable
        // and writable, and zero-filled, and zero is a valid AtomicUsize; it is never
        // unmapped, so the reference stays valid for the process's life. Other
        // processes write it only through atomics too (the master's `set`).
        Ok(Peers::Shared(unsafe {
            page.cast::<AtomicUsize>().as_ref()
        }))
    }

    /// The master's workers starting or serving now.
    pub fn count(self) -> usize {
        match self {
            Peers::Shared(count) => count.load(Ordering::Relaxed),
            Peers::Fixed(count) => count,
        }
    }

    /// In the master: the count is `workers` from now on.
    pub fn set(self, workers: usize) {
        if let Peers::Shared(count) = self {
            count.store(workers, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (That a forked worker reads the master's later writes is `MAP_SHARED`'s
    /// promise; the real-process tests run the master and its workers.)
    #[test]
    fn the_count_is_what_the_master_set_last() {
        let peers = Peers::shared().unwrap();
        assert_eq!(peers.count(), 0, "a new page is zero-filled");
        peers.set(3);
        assert_eq!(peers.count(), 3);
        Peers::Fixed(2).set(5);
        assert_eq!(Peers::Fixed(2).count(), 2);
    }
}
