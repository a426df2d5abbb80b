//! The process-global loop (the Rust `$ONE_TRUE_LOOP`).
//!
//! One per process, owned by the first thread that asks for it. Every fork clears it:
//! in the child the inherited instance is abandoned — never dropped, never touched, as
//! its kernel objects are the parent's — and the next request builds a fresh loop with a
//! new identity. Detecting the fork costs one atomic load, no syscall.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{fork, Error, Loop, Result};

struct Slot {
    /// The fork generation the loop below belongs to.
    generation: u64,
    /// Whether a `with_global` call is using the loop right now.
    lent: bool,
    /// A leaked `Box<Loop>`. A raw pointer, not a `Box`, so that replacing it in a child
    /// neither drops the inherited loop nor invalidates a `&mut` a parent frame holds.
    lp: *mut Loop,
}

thread_local! {
    static SLOT: UnsafeCell<Slot> = const {
        UnsafeCell::new(Slot { generation: 0, lent: false, lp: std::ptr::null_mut() })
    };
}

/// `pthread_self()` of the owning thread, or 0 before the first use and after a fork.
static OWNER: AtomicUsize = AtomicUsize::new(0);

/// In the child after fork: only the forking thread survives; it may take the loop over.
pub(crate) fn forget_owner() {
    OWNER.store(0, Ordering::SeqCst);
}

fn claim_for_this_thread() -> Result<()> {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    match OWNER.compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => Ok(()),
        Err(owner) if owner == me => Ok(()),
        Err(_) => Err(Error::GlobalUnavailable(
            "belongs to another thread of this process",
        )),
    }
}

/// Marks the slot free again when `with_global` ends, also by panic — unless the process
/// forked inside, in which case the slot now describes the child's own loop.
struct Lent {
    generation: u64,
}

impl Drop for Lent {
    fn drop(&mut self) {
        SLOT.with(|cell| {
            // SAFETY: single thread; no other reference into the slot is live here.
            let slot = unsafe { &mut *cell.get() };
            if slot.generation == self.generation {
                slot.lent = false;
            }
        });
    }
}

impl Loop<()> {
    /// Lends the process-global loop to `f`, building it first if this process has none
    /// yet (with [`Loop::new`], so `FORKLOOP_BACKEND` applies). After any fork the child
    /// gets a fresh loop, never the parent's. Callbacks receive the loop directly, so a
    /// nested `with_global` is not needed and is refused, as is a call from a thread
    /// other than the owner: the first thread that calls it owns it for the life of
    /// the process (even after that thread ends), and in a forked child the forking
    /// thread does. The global loop carries no user state (`Loop<()>`): give a
    /// `Loop<D>` of your own a `D`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use forkloop::Loop;
    ///
    /// let code = Loop::with_global(|lp| {
    ///     lp.after(Duration::from_millis(1), |lp, ()| lp.stop(4));
    ///     lp.run(&mut ())
    /// })??;
    /// assert_eq!(code, 4);
    /// # Ok::<(), forkloop::Error>(())
    /// ```
    pub fn with_global<R>(f: impl FnOnce(&mut Loop) -> R) -> Result<R> {
        fork::init()?;
        claim_for_this_thread()?;
        let generation = fork::generation();
        let lp = SLOT.with(|cell| -> Result<*mut Loop> {
            // SAFETY: single thread; the reference ends before `f` runs.
            let slot = unsafe { &mut *cell.get() };
            if slot.generation != generation {
                // Inherited across fork: abandoned (leaked), never dropped.
                *slot = Slot {
                    generation,
                    lent: false,
                    lp: std::ptr::null_mut(),
                };
            }
            if slot.lent {
                return Err(Error::GlobalUnavailable(
                    "is already lent out (nested with_global)",
                ));
            }
            if slot.lp.is_null() {
                slot.lp = Box::into_raw(Box::new(Loop::new()?));
            }
            slot.lent = true;
            Ok(slot.lp)
        })?;
        let _lent = Lent { generation };
        // SAFETY: lp came from Box::into_raw in this generation and is never freed; the
        // `lent` flag guarantees this is the only live reference to it.
        Ok(f(unsafe { &mut *lp }))
    }
}
