//! A prefork HTTP/1.1 server on forkloop.
//!
//! The master binds the listeners, forks workers through [`Loop::fork`], and supervises
//! them from its own loop with `watch_process` and `watch_signal`. Each worker serves
//! connections accepted from the shared listeners on a fresh loop of its own, a
//! `Loop<Worker>`: handlers get it, and may arm timers and watches on it (whose
//! callbacks get the opaque [`Worker`] state as their data).
//!
//! ```no_run
//! use forkloop::server::{Config, Request, Responder, Response, Server, Worker};
//! use forkloop::Loop;
//!
//! fn app(lp: &mut Loop<Worker>, request: Request, responder: Responder) {
//!     responder.send(lp, Response::text(200, format!("you asked for {}", request.target)));
//! }
//!
//! let mut config = Config::default();
//! config.listen = vec!["127.0.0.1:8080".into()];
//! Server::new(config, app).run().unwrap();
//! ```

#[doc(hidden)]
pub mod fuzz;
mod http;
mod listener;
mod master;
mod worker;

use std::path::PathBuf;
use std::time::Duration;

pub use http::{Request, Response};
pub use listener::Listener;
pub use master::ServerError;
pub use worker::{Responder, Worker};

use crate::{Kind, Loop};

/// An HTTP application: answers each request through its [`Responder`], at once or
/// later from the worker's loop (a timer, another fd) — one slow request never blocks
/// the worker's other connections. A panic becomes a 500 for that request.
pub trait Handler: 'static {
    /// Handles one request, on the worker's loop.
    fn call(&self, lp: &mut Loop<Worker>, request: Request, responder: Responder);
}

impl<F: Fn(&mut Loop<Worker>, Request, Responder) + 'static> Handler for F {
    fn call(&self, lp: &mut Loop<Worker>, request: Request, responder: Responder) {
        self(lp, request, responder)
    }
}

/// How the server runs. `Config::default()` needs no setup: `127.0.0.1:8080`, one
/// worker per CPU, the best backend compiled in.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// `host:port` or `unix:/path`; several listeners are served by every worker.
    pub listen: Vec<String>,
    /// Number of workers.
    pub workers: usize,
    /// The backend of every loop; `None` for `FORKLOOP_BACKEND` or the best compiled in.
    pub backend: Option<Kind>,
    /// How long a draining worker may take before the master kills it.
    pub graceful_timeout: Duration,
    /// A worker silent for this long is killed and replaced.
    pub heartbeat_timeout: Duration,
    /// A request head must arrive within this, counted from the accept on a new
    /// connection and from the first byte of each later request; else 408 and close
    /// (a new connection that sent nothing is closed without an answer).
    pub header_timeout: Duration,
    /// The longest wait for progress while a request body is read (else 408 and close)
    /// or a response is written (else close). A body that keeps coming, however slowly,
    /// is read to its end (within `max_body_size`); bytes that are not body, such as a
    /// chunk line trickled a byte at a time, are not progress.
    pub body_timeout: Duration,
    /// An idle keep-alive connection is closed after this; zero turns keep-alive off.
    pub keepalive_timeout: Duration,
    /// Largest request body accepted (else 413).
    pub max_body_size: u64,
    /// Largest request head accepted (else 431; a request line alone longer than this
    /// gets 414). Also bounds a chunked body's trailer section.
    pub max_header_size: usize,
    /// Recycle a worker after this many requests (plus up to `max_requests_jitter`).
    pub max_requests: Option<u64>,
    /// Random extra requests per worker, so workers do not recycle all at once.
    pub max_requests_jitter: u64,
    /// Written atomically at start, refused if it names a live process, removed at exit.
    pub pid_file: Option<PathBuf>,
    /// Requests are logged here, one line each; reopened on SIGUSR1.
    pub access_log: Option<PathBuf>,
    /// Workers exiting before they become ready, in a row, before the master gives up.
    pub startup_budget: u32,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: vec!["127.0.0.1:8080".into()],
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            backend: None,
            graceful_timeout: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            max_body_size: 1024 * 1024,
            max_header_size: 16 * 1024,
            max_requests: None,
            max_requests_jitter: 0,
            pid_file: None,
            access_log: None,
            startup_budget: 5,
        }
    }
}

pub(crate) type MasterHook = Box<dyn Fn(usize)>;
pub(crate) type WorkerExitHook = Box<dyn Fn(usize, libc::pid_t, std::process::ExitStatus)>;

/// The server: configure it, then [`Server::run`] the master until it shuts down.
pub struct Server {
    config: Config,
    handler: Box<dyn Handler>,
    before_fork: Option<MasterHook>,
    after_fork: Option<MasterHook>,
    on_worker_exit: Option<WorkerExitHook>,
}

impl Server {
    /// A server for `handler` with `config`.
    pub fn new(config: Config, handler: impl Handler) -> Server {
        Server {
            config,
            handler: Box::new(handler),
            before_fork: None,
            after_fork: None,
            on_worker_exit: None,
        }
    }

    /// Runs in the master before each worker is forked, with the worker's slot number.
    pub fn before_fork(mut self, hook: impl Fn(usize) + 'static) -> Server {
        self.before_fork = Some(Box::new(hook));
        self
    }

    /// Runs in each new worker before it serves — where apps reconnect databases.
    pub fn after_fork(mut self, hook: impl Fn(usize) + 'static) -> Server {
        self.after_fork = Some(Box::new(hook));
        self
    }

    /// Runs in the master when a worker exits, with its slot, pid and status. Not run
    /// for a worker whose status other code of the master took first (a `waitpid(-1)`
    /// of its own): that is logged as a warning, and the worker is replaced as usual.
    pub fn on_worker_exit(
        mut self,
        hook: impl Fn(usize, libc::pid_t, std::process::ExitStatus) + 'static,
    ) -> Server {
        self.on_worker_exit = Some(Box::new(hook));
        self
    }

    /// Binds the listeners, forks the workers and supervises them until a TERM or INT
    /// (graceful) or a fatal error.
    pub fn run(self) -> Result<(), ServerError> {
        master::run(self)
    }
}
