//! forkloop: an event loop with pluggable backends that stays correct across `fork()`.
//!
//! ```
//! use std::time::Duration;
//! use forkloop::{ForkOptions, Loop};
//!
//! let mut lp = Loop::new()?; // FORKLOOP_BACKEND, or the best backend compiled in
//! let pid = lp.fork(ForkOptions::new(), || {
//!     // A fresh process-global loop, fresh signal and child state.
//!     forkloop::Loop::with_global(|child| {
//!         child.after(Duration::from_millis(10), |lp| lp.stop(7));
//!         child.run().unwrap_or(1)
//!     })
//!     .unwrap_or(1)
//! })?;
//! // `status` is an `Err` only if other code reaped the child first (ReapedElsewhere).
//! lp.watch_process(pid, |lp, _pid, status| {
//!     lp.stop(status.ok().and_then(|s| s.code()).unwrap_or(-1))
//! })?;
//! assert_eq!(lp.run()?, 7);
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
mod id_map;
mod kind;
mod process;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod server;
mod signal;
mod slab;
mod sys;
mod timer;

pub use error::{Error, Result};
pub use event_loop::{Loop, LoopId, Watch};
pub use fork::ForkOptions;
pub use forkloop_backend::{Backend, Event, Interest, Readiness};
pub use kind::{Kind, BACKEND_ENV};
