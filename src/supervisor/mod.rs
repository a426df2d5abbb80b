//! A prefork supervisor for any app: forkloop's own HTTP server, a tokio or axum app,
//! or blocking code.
//!
//! The master binds the listeners (or takes them already bound, from the app or from
//! systemd's socket activation), forks the workers
//! through [`Loop::fork`](crate::Loop::fork), and supervises them from a forkloop loop
//! of its own. It never builds an async runtime, so each worker can build its own after
//! the fork, as tokio requires. A worker is any `FnOnce(WorkerContext) -> i32`; it runs
//! in the forked child, and what it returns is the child's exit status.
//!
//! ```no_run
//! use std::io::Write;
//! use std::time::{Duration, Instant};
//! use forkloop::supervisor::{Config, Listener, Supervisor, WorkerContext};
//!
//! // Blocking code: answers each connection with this worker's pid, and drains on TERM.
//! fn worker(ctx: WorkerContext) -> i32 {
//!     let WorkerContext { listeners, link, drain, .. } = ctx;
//!     let Some(Listener::Tcp(listener)) = listeners.into_iter().next() else {
//!         return 1;
//!     };
//!     link.ready().unwrap();
//!     let mut beat = Instant::now();
//!     while !drain.is_draining() {
//!         match listener.accept() {
//!             Ok((mut client, _)) => {
//!                 let _ = writeln!(client, "{}", std::process::id());
//!             }
//!             Err(_) => std::thread::sleep(Duration::from_millis(5)), // none queued
//!         }
//!         if beat.elapsed() >= link.heartbeat_interval() {
//!             let _ = link.heartbeat();
//!             beat = Instant::now();
//!         }
//!     }
//!     0
//! }
//!
//! let mut config = Config::default();
//! config.listen = vec!["127.0.0.1:7000".into()];
//! Supervisor::new(config, worker).run().unwrap();
//! ```
//!
//! # What the supervisor does
//!
//! - It forks `workers` workers and keeps that many serving: one that exits or is
//!   killed is replaced at once, and a crash loop backs off (50 ms doubling to 5 s).
//!   Workers that exit before they become ready, `startup_budget` times in a row, make
//!   the master give up with [`SupervisorError::Startup`], unless some worker has been
//!   ready before: then what failed is a reload, and the ready workers keep serving.
//! - A worker silent for `heartbeat_timeout` (or not ready within it) is killed and
//!   replaced.
//! - In each child, before the worker's function runs: on Linux the kernel is asked to
//!   kill the worker if the master dies; `SIGINT` is ignored (Ctrl-C reaches the whole
//!   process group, and is the master's); `SIGUSR1` is ignored unless the worker
//!   watches it; `SIGTERM` makes [`WorkerContext::drain`] readable. Readiness is
//!   bookkeeping, not routing: a worker that has not said ready still gets connections
//!   from the shared listeners if it accepts them.
//! - Signals to the master: `TERM`/`INT`/`QUIT` drain every worker and exit once all
//!   are gone (a second one kills them at once); `HUP` forks a replacement for every
//!   worker, and drains each old one only once its replacement is ready; `USR2`
//!   upgrades the binary (below); `WINCH` retires every worker and keeps the master
//!   until a `HUP` (ignored on a terminal, where a resize sends it); `TTIN`/`TTOU` add
//!   or retire a worker (never below one); `USR1` is forwarded to every worker.
//! - Binary upgrade (`USR2`): the master execs the binary at the path it was started
//!   from (a new build, if it was replaced) with the same arguments, handing it the
//!   sockets of its `listen` values (not those of [`Supervisor::listener`], which are
//!   the app's to pass on) through the exec as socket activation does; the pid file is
//!   `PATH.oldbin` meanwhile. Once every worker of the new master is ready, the old
//!   master tells systemd (`MAINPID=`) and drains; if the new one exits first, or is
//!   not ready within [`Config::upgrade_timeout`], the old one serves on. A `HUP`
//!   during an upgrade, and a `USR2` during a `HUP`'s restart, are refused (logged).
//! - A worker that asks to be recycled ([`MasterLink::recycle`]) is replaced the way
//!   `HUP` replaces it.
//! - A draining worker still running after `graceful_timeout` is killed.
//!
//! # Under systemd
//!
//! - **Socket activation.** When `LISTEN_PID` is the master's pid, the master serves
//!   the `LISTEN_FDS` sockets it was given (fds 3, 4, …, the `sd_listen_fds(3)`
//!   convention) instead of binding [`Config::listen`]: one socket per `listen` value.
//!   A socket whose name (`LISTEN_FDNAMES`, systemd's `FileDescriptorName=`) equals a
//!   `listen` value serves that value; names cannot hold a `:`, so such a value is a
//!   bare name (`--listen web`), which only activation can give a meaning. When no
//!   name is a `listen` value (systemd names each socket after its unit by default),
//!   the sockets go to the values in order. Each must be a listening TCP or Unix stream
//!   socket; it is made close-on-exec and non-blocking. A count or a name that does not
//!   fit, or an fd that is not a listening socket, is a [`SupervisorError::Config`]
//!   naming it. An activated socket is systemd's: the master never removes its file,
//!   and leaves it taking connections at shutdown (they wait for the next start).
//!   The three variables are removed from the environment at the start of
//!   [`Supervisor::run`], so the workers and what they run do not see them.
//! - **`sd_notify`**, when `NOTIFY_SOCKET` is set (`Type=notify`): the master sends
//!   `READY=1` once every worker is first ready; at `HUP`, `RELOADING=1` with
//!   `MONOTONIC_USEC`, then `READY=1` once every replacement is ready, or has failed
//!   (the old workers then serve on, and the `STATUS=` line says the reload failed);
//!   `STOPPING=1` when a shutdown begins (`TERM`/`INT`/`QUIT`, or giving up); a `STATUS=` line
//!   as the count of ready workers changes (`TTIN`/`TTOU`, crashes and their backoff);
//!   and `WATCHDOG=1` every half `WATCHDOG_USEC` from its loop, if `WATCHDOG_PID` is
//!   unset or is the master. Only the master sends, so `NotifyAccess=main` is enough.
//!   `NOTIFY_SOCKET` stays in the environment (the workers inherit it, and send
//!   nothing). A failed send is logged at debug level and changes nothing. It works on
//!   any Unix with a path socket; an abstract one (`@name`) is Linux's.
//!
//! The README has a sample `forkloop.service` and `forkloop.socket`.
//!
//! # What a worker must do
//!
//! 1. Serve the [`WorkerContext::listeners`] (they are non-blocking, shared by every
//!    worker), then call [`MasterLink::ready`]. Nothing counts it as serving before.
//! 2. Call [`MasterLink::heartbeat`] at least every
//!    [`MasterLink::heartbeat_interval`], from the code that serves (a forkloop loop
//!    does it with [`MasterLink::beat_on`]; a tokio app from a task on its runtime), so
//!    that a stuck worker is found.
//! 3. When [`WorkerContext::drain`] becomes readable: stop accepting, finish what is in
//!    flight, and return (0) within the graceful timeout.
//! 4. Optionally, count its work and call [`MasterLink::recycle`] at
//!    [`WorkerContext::max_requests`], and [`MasterLink::report_served`] with the
//!    count now and then, for the status view ([`Status`]).
//!
//! # The protocol, for a worker in any runtime
//!
//! The link is a Unix stream socket (one per worker). The worker writes one byte per
//! message: `R` (ready), `H` (heartbeat), `M` (recycle), but for `S` (the requests
//! served in all), which ten bytes follow with the high bit set, each 7 bits of the
//! count, least significant first; the master reads them all and counts any byte as a
//! sign of life, and drops a count that another message cuts short. The master writes nothing; its end closes when it
//! dies, which makes the link readable at EOF. The master drains a worker with
//! `SIGTERM`, and kills it with `SIGKILL` (heartbeat missed, graceful timeout over, or
//! a second `TERM` to the master).
//!
//! # Fork safety
//!
//! The worker runs inside a [`Loop::fork`](crate::Loop::fork) child, which gives it the
//! fork contract of the README: the master's loop is never touched there, and locks
//! held by the master's other threads at the fork (stdout, stderr, the loop's own) are
//! released. What runs in the child before the worker's function: `prctl`, `getppid`,
//! `signal`, `pipe2` and one `sigaction` (the drain's handler), and the context's own
//! allocations. Do not build an async runtime in the master: call [`Supervisor::run`]
//! from a plain `fn main`, not from `#[tokio::main]` (a runtime copied into a child is
//! unusable there, and building another inside it panics); each worker builds its own.
//! `SIGINT` and `SIGUSR1` stay ignored in processes a worker `exec`s, as ignored
//! dispositions do across `exec`: restore them (`SIG_DFL`) in the child first if that
//! matters.

mod activation;
mod listener;
mod master;
mod notify;
mod peers;
mod status;
mod upgrade;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

pub use listener::Listener;
pub use master::SupervisorError;
pub(crate) use peers::Peers;
pub use status::{Status, WorkerState, WorkerStatus};
pub use worker::{Drain, MasterLink, WorkerContext};

use crate::Kind;

/// How the supervisor runs. `Config::default()`: no listeners of its own, one worker
/// per CPU, the best backend compiled in.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// `host:port` or `unix:/path` addresses the master binds (a Unix socket's file is
    /// removed at exit), served by every worker after those handed in with
    /// [`Supervisor::listener`]. Under socket activation, each names a socket the
    /// master was given instead, by its name or in order (see [the module's
    /// documentation](self#under-systemd)).
    pub listen: Vec<String>,
    /// Number of workers.
    pub workers: usize,
    /// The master's loop backend; `None` for `FORKLOOP_BACKEND` or the best compiled in.
    pub backend: Option<Kind>,
    /// How long a draining worker may take before the master kills it (30 s).
    pub graceful_timeout: Duration,
    /// A worker silent for this long, or not ready within it, is killed and replaced
    /// (30 s; at least 200 ms).
    pub heartbeat_timeout: Duration,
    /// Each worker's [`WorkerContext::max_requests`]: recycle after this many requests
    /// (plus up to `max_requests_jitter`).
    pub max_requests: Option<u64>,
    /// Random extra requests per worker, so workers do not recycle all at once.
    pub max_requests_jitter: u64,
    /// Written atomically at start, refused if it names a live process, removed at exit.
    pub pid_file: Option<PathBuf>,
    /// Workers exiting before they become ready, in a row, before the master gives up
    /// (5; at least 1). While some worker serves, a failed start is a failed reload:
    /// the count starts again instead, and the serving workers go on.
    pub startup_budget: u32,
    /// How long the new master of a binary upgrade (`USR2`) has to get every worker
    /// ready; later, it is stopped and the old master serves on (60 s).
    pub upgrade_timeout: Duration,
    /// A worker whose resident memory stays above this many bytes (two heartbeat
    /// checks in a row) is recycled, through the overlap of `HUP`: uWSGI's
    /// `reload-on-rss`. Linux only (`/proc`): elsewhere a configuration error.
    pub max_worker_memory: Option<u64>,
    /// A Unix socket where the master answers with its [`Status`] (`forkloop status`);
    /// `None`: `PID_FILE.ctl` if there is a `pid_file` ([`Status::beside`]), else none.
    /// A stale socket file is replaced; the file is removed at exit.
    pub control_socket: Option<PathBuf>,
    /// One `SO_REUSEPORT` socket per worker for each TCP address the master binds, its
    /// *lane*, instead of one socket every worker shares: the kernel spreads new
    /// connections over the lanes by a hash of their addresses, so no worker takes a
    /// burst another would have taken, and no worker waits on a lock or wake-up for
    /// them (off). The master keeps each lane open, so that a replaced, reloaded or
    /// upgraded worker's successor takes over its queue; `TTOU` closes a lane only
    /// after its worker has taken in what it queued. Unix sockets and sockets handed
    /// in (by the app, or by systemd's socket activation) stay shared. Linux and
    /// FreeBSD (`SO_REUSEPORT_LB`); elsewhere a configuration error. See
    /// [`WorkerContext::lane`] for what it asks of a worker.
    pub reuse_port: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: Vec::new(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backend: None,
            graceful_timeout: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(30),
            max_requests: None,
            max_requests_jitter: 0,
            pid_file: None,
            startup_budget: 5,
            upgrade_timeout: Duration::from_secs(60),
            max_worker_memory: None,
            control_socket: None,
            reuse_port: false,
        }
    }
}

type WorkerFn = Box<dyn FnOnce(WorkerContext) -> i32>;
type ForkHook = Box<dyn Fn(usize)>;
type ExitHook = Box<dyn Fn(usize, libc::pid_t, std::process::ExitStatus)>;

/// The master: configure it, then [`Supervisor::run`] it until it shuts down.
pub struct Supervisor {
    config: Config,
    listeners: Vec<Listener>,
    worker: WorkerFn,
    before_fork: Option<ForkHook>,
    on_worker_exit: Option<ExitHook>,
}

impl Supervisor {
    /// A supervisor whose workers each run `worker` (in the forked child: the master
    /// never calls it).
    pub fn new(config: Config, worker: impl FnOnce(WorkerContext) -> i32 + 'static) -> Supervisor {
        Supervisor {
            config,
            listeners: Vec::new(),
            worker: Box::new(worker),
            before_fork: None,
            on_worker_exit: None,
        }
    }

    /// A listener bound elsewhere (by the app), served by every worker; made
    /// non-blocking. The master never removes its socket file. (Sockets systemd hands
    /// over need no call: see [`Config::listen`].)
    pub fn listener(mut self, listener: impl Into<Listener>) -> Supervisor {
        self.listeners.push(listener.into());
        self
    }

    /// Runs in the master before each worker is forked, with the worker's slot.
    pub fn before_fork(mut self, hook: impl Fn(usize) + 'static) -> Supervisor {
        self.before_fork = Some(Box::new(hook));
        self
    }

    /// Runs in the master when a worker exits, with its slot, pid and status. Not run
    /// for a worker whose status other code of the master took first (a `waitpid(-1)`
    /// of its own): that is logged as a warning, and the worker is replaced as usual.
    pub fn on_worker_exit(
        mut self,
        hook: impl Fn(usize, libc::pid_t, std::process::ExitStatus) + 'static,
    ) -> Supervisor {
        self.on_worker_exit = Some(Box::new(hook));
        self
    }

    /// Binds the listeners, forks the workers and supervises them until a `TERM` or
    /// `INT` (graceful) or a fatal error.
    ///
    /// It starts by taking socket activation's `LISTEN_PID`, `LISTEN_FDS` and
    /// `LISTEN_FDNAMES` out of the environment. Removing an environment variable races
    /// any other thread's reading of the environment (C code's `getenv` included), so
    /// call `run` before the program starts threads that may read it: from `main`,
    /// before a runtime or a logger thread. The master itself starts none.
    pub fn run(self) -> Result<(), SupervisorError> {
        master::run(self)
    }
}
