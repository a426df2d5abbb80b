//! A prefork HTTP/1.1 server on forkloop: the app of the [`supervisor`]
//! that `forkloop serve` runs.
//!
//! The supervisor's master binds the listeners, forks the workers and supervises them.
//! Each worker serves connections accepted from the shared listeners on a fresh loop of
//! its own, a `Loop<Worker>`: handlers get it, and may arm timers and watches on it
//! (whose callbacks get the opaque [`Worker`] state as their data).
//!
//! Requests and responses are the [`http`] crate's types (re-exported as
//! `forkloop::server::http`), with the body as bytes; the peer's address is in the
//! request's extensions ([`Peer`]).
//!
//! ```no_run
//! use forkloop::server::http::StatusCode;
//! use forkloop::server::{text, Config, Peer, Request, Responder, Server, Worker};
//! use forkloop::Loop;
//!
//! fn app(lp: &mut Loop<Worker>, request: Request, responder: Responder) {
//!     let peer = request.extensions().get::<Peer>().copied();
//!     let body = format!("{peer:?} asked for {}", request.uri());
//!     responder.send(lp, text(StatusCode::OK, body));
//! }
//!
//! let mut config = Config::default();
//! config.supervisor.listen = vec!["127.0.0.1:8080".into()];
//! Server::new(config, app).run().unwrap();
//! ```

#[doc(hidden)]
pub mod fuzz;
mod h1;
mod request_body;
mod response_body;
mod stream;
mod worker;

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

/// The `http` crate, whose types the handler gets and gives.
pub use ::http;
pub use h1::{query, text, Peer, Request, Response};
pub use request_body::{BodyError, BodyReceiver, Received};
pub use response_body::{BodySender, StreamEnded};
pub use worker::{RemoteResponder, Responder, Worker};

use crate::supervisor::{self, Supervisor, SupervisorError};
use crate::Loop;

/// A request whose body its handler streams ([`BodyMode::Streamed`]): the head, and
/// the body to read as it arrives.
pub type StreamedRequest = http::Request<BodyReceiver>;

/// How a request's body reaches its handler; chosen from the head by
/// [`Handler::body_mode`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyMode {
    /// Read whole, within `max_body_size` (a longer one gets 413 without reaching the
    /// handler), then [`Handler::call`] gets the request.
    #[default]
    Buffered,
    /// [`Handler::call_streamed`] gets the request as soon as its head is in, and
    /// reads the body through its [`BodyReceiver`] as it arrives — of any length, with
    /// backpressure: uploads, proxies, a body the handler may refuse unread.
    Streamed,
}

/// An HTTP application: answers each request through its [`Responder`], at once or
/// later from the worker's loop (a timer, another fd) — one slow request never blocks
/// the worker's other connections. A panic becomes a 500 for that request.
///
/// A closure `Fn(&mut Loop<Worker>, Request, Responder)` is a handler whose bodies are
/// buffered. To stream some (an upload route), implement [`body_mode`] and
/// [`call_streamed`]:
///
/// ```no_run
/// use forkloop::server::http::{request::Parts, Method, StatusCode};
/// use forkloop::server::{
///     text, BodyError, BodyMode, Handler, Request, Responder, StreamedRequest, Worker,
/// };
/// use forkloop::Loop;
///
/// struct App;
///
/// impl Handler for App {
///     fn body_mode(&self, head: &Parts) -> BodyMode {
///         match (&head.method, head.uri.path()) {
///             (&Method::PUT, "/upload") => BodyMode::Streamed,
///             _ => BodyMode::Buffered,
///         }
///     }
///
///     fn call(&self, lp: &mut Loop<Worker>, request: Request, responder: Responder) {
///         let body = format!("{} bytes\n", request.body().len());
///         responder.send(lp, text(StatusCode::OK, body));
///     }
///
///     fn call_streamed(&self, lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
///         // Up to 16 MiB, buffered (a longer upload: read() it piece by piece, and store each).
///         request.into_body().collect(lp, 16 << 20, move |lp, _, body| {
///             let answer = match body {
///                 Ok(body) => text(StatusCode::OK, format!("stored {} bytes\n", body.len())),
///                 Err(BodyError::TooLarge) => text(StatusCode::PAYLOAD_TOO_LARGE, "16 MiB at most\n"),
///                 // Malformed or stalled: the server has answered 400 or 408 already.
///                 Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
///             };
///             responder.send(lp, answer);
///         });
///     }
/// }
/// ```
///
/// [`body_mode`]: Handler::body_mode
/// [`call_streamed`]: Handler::call_streamed
pub trait Handler: 'static {
    /// Handles one request, its body read whole, on the worker's loop.
    fn call(&self, lp: &mut Loop<Worker>, request: Request, responder: Responder);

    /// How the body of the request with this head is read: buffered for
    /// [`call`](Handler::call) (the default), or streamed to
    /// [`call_streamed`](Handler::call_streamed). Asked for every request, bodiless
    /// ones too, so that a route is always served by the same method.
    fn body_mode(&self, head: &http::request::Parts) -> BodyMode {
        let _ = head;
        BodyMode::Buffered
    }

    /// Handles a request whose body streams, as soon as its head is in. The default
    /// answers 500: a handler whose `body_mode` can choose `Streamed` implements it.
    fn call_streamed(&self, lp: &mut Loop<Worker>, request: StreamedRequest, responder: Responder) {
        log::error!(
            "{} {}: body_mode chose Streamed, but the handler has no call_streamed; \
             answering 500",
            request.method(),
            request.uri()
        );
        let _ = lp;
        drop(responder);
    }
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
    /// The supervisor's part: listeners, workers, timeouts, recycling, the pid file.
    /// Its `backend` is every loop's, the workers' too; its `max_requests` counts
    /// requests.
    pub supervisor: supervisor::Config,
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
    /// Largest request body accepted, buffered (else 413). A streamed body
    /// ([`BodyMode::Streamed`]) has no limit but its handler's; this is also how much
    /// of a streamed body whose handler stopped reading is still read and discarded
    /// for keep-alive (past it, the connection closes after the answer).
    pub max_body_size: u64,
    /// Largest request head accepted (else 431; a request line alone longer than this
    /// gets 414). Also bounds a chunked body's trailer section.
    pub max_header_size: usize,
    /// Requests are logged here, one line each; reopened on SIGUSR1.
    pub access_log: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            supervisor: supervisor::Config {
                listen: vec!["127.0.0.1:8080".into()],
                ..supervisor::Config::default()
            },
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            max_body_size: 1024 * 1024,
            max_header_size: 16 * 1024,
            access_log: None,
        }
    }
}

type ExitHook = Box<dyn Fn(usize, libc::pid_t, std::process::ExitStatus)>;

/// The server: configure it, then [`Server::run`] the master until it shuts down.
pub struct Server {
    config: Config,
    handler: Box<dyn Handler>,
    listeners: Vec<supervisor::Listener>,
    before_fork: Option<Box<dyn Fn(usize)>>,
    after_fork: Option<Box<dyn Fn(usize)>>,
    on_worker_exit: Option<ExitHook>,
}

impl Server {
    /// A server for `handler` with `config`.
    pub fn new(config: Config, handler: impl Handler) -> Server {
        Server {
            config,
            handler: Box::new(handler),
            listeners: Vec::new(),
            before_fork: None,
            after_fork: None,
            on_worker_exit: None,
        }
    }

    /// A listener bound elsewhere, served before the `listen` addresses; see
    /// [`Supervisor::listener`].
    pub fn listener(mut self, listener: impl Into<supervisor::Listener>) -> Server {
        self.listeners.push(listener.into());
        self
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
    pub fn run(self) -> Result<(), SupervisorError> {
        let config = self.config;
        if config.supervisor.listen.is_empty() && self.listeners.is_empty() {
            return Err(SupervisorError::Config(
                "no listener: listen (--listen) is empty".into(),
            ));
        }
        let timeouts = [
            ("header_timeout (--header-timeout)", config.header_timeout),
            ("body_timeout (--body-timeout)", config.body_timeout),
        ];
        if let Some((flag, _)) = timeouts.iter().find(|(_, t)| t.is_zero()) {
            return Err(SupervisorError::Config(format!(
                "{flag} must be more than 0 s"
            )));
        }
        let handler: Rc<dyn Handler> = Rc::from(self.handler);
        let after_fork = self.after_fork;
        let settings = config.clone();
        let mut supervisor = Supervisor::new(config.supervisor, move |context| {
            if let Some(hook) = &after_fork {
                hook(context.slot);
            }
            worker::run(context, &settings, handler)
        });
        for listener in self.listeners {
            supervisor = supervisor.listener(listener);
        }
        if let Some(hook) = self.before_fork {
            supervisor = supervisor.before_fork(hook);
        }
        if let Some(hook) = self.on_worker_exit {
            supervisor = supervisor.on_worker_exit(hook);
        }
        supervisor.run()
    }
}
