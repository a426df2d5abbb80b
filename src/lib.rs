//! forkloop: an event loop with pluggable backends that stays correct across `fork()`.
//!
//! ```
//! use std::time::Duration;
//! use forkloop::{ForkOptions, Loop};
//!
//! // Loop<D>: callbacks get `&mut D`, lent to `run`. Here D is ().
//! let mut lp: Loop = Loop::new()?; // FORKLOOP_BACKEND, or the best backend compiled in
//! let pid = lp.fork(ForkOptions::new(), || {
//!     // A fresh process-global loop, fresh signal and child state.
//!     forkloop::Loop::with_global(|child| {
//!         child.after(Duration::from_millis(10), |lp, ()| lp.stop(7));
//!         child.run(&mut ()).unwrap_or(1)
//!     })
//!     .unwrap_or(1)
//! })?;
//! // `status` is an `Err` only if other code reaped the child first (ReapedElsewhere).
//! lp.watch_process(pid, |lp, (), _pid, status| {
//!     lp.stop(status.ok().and_then(|s| s.code()).unwrap_or(-1))
//! })?;
//! assert_eq!(lp.run(&mut ())?, 7);
//! # Ok::<(), forkloop::Error>(())
//! ```
//!
//! See the README for the backend table, the fork contract and how to choose a backend.
#![deny(unsafe_op_in_unsafe_fn)]
// docs.rs (nightly) marks the items a feature gates.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(not(any(
    feature = "poll",
    feature = "select",
    feature = "epoll",
    feature = "kqueue",
    feature = "mio",
    feature = "polling"
)))]
compile_error!(
    "forkloop needs at least one backend feature: poll, select, epoll, kqueue, mio or polling"
);

mod error;
mod event_loop;
mod fork;
mod global;
mod handle;
mod id_map;
mod io;
mod kind;
mod process;
mod quad_heap;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;
mod signal;
mod slab;
#[cfg(feature = "supervisor")]
#[cfg_attr(docsrs, doc(cfg(feature = "supervisor")))]
pub mod supervisor;
mod sys;
mod timer;
mod waker;

pub use error::{Error, Result, SignalRefusal};
pub use event_loop::Loop;
pub use fork::ForkOptions;
pub use forkloop_backend::{Backend, Event, Interest, Readiness};
pub use handle::{Io, LoopId, Timer, Watch};
pub use io::WatchError;
pub use kind::{Kind, BACKEND_ENV};
pub use waker::{SendError, Waker};
