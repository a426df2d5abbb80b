//! An axum app in prefork workers under forkloop's supervisor. It answers the four
//! routes of `forkloop serve`: `/`, `/pid`, `POST /echo` and `/sleep?ms=N`.
//!
//! ```text
//! cargo run --release --example axum_prefork --features supervisor -- --listen 127.0.0.1:8080 --workers 4
//! ```
//!
//! The master is forkloop's and builds no runtime. Each worker builds a current-thread
//! tokio runtime after the fork (tokio does not support a runtime used across a fork),
//! serves the inherited listener, beats from a task on that runtime (so a blocked
//! runtime stops beating, and is replaced), and shuts down gracefully when the drain fd
//! becomes readable: the connections the kernel already queued are served first, then
//! every connection finishes what it is doing.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Query;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use forkloop::supervisor::{Config, Drain, Listener, Supervisor, WorkerContext};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

#[derive(Parser)]
struct Args {
    /// `host:port` to serve.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

fn main() {
    // INFO and up unless RUST_LOG says otherwise: the supervisor warns of crashes there.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let mut config = Config::default();
    config.listen = vec![args.listen];
    config.workers = args.workers;
    if let Err(e) = Supervisor::new(config, worker).run() {
        log::error!("{e}");
        std::process::exit(1);
    }
}

/// A worker: its own runtime, built after the fork.
fn worker(ctx: WorkerContext) -> i32 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let served = runtime
        .map_err(Into::into)
        .and_then(|rt| rt.block_on(serve(ctx)));
    match served {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("axum worker: {e}");
            1
        }
    }
}

async fn serve(ctx: WorkerContext) -> Result<(), Box<dyn std::error::Error>> {
    let WorkerContext {
        listeners,
        link,
        drain,
        ..
    } = ctx;
    let Some(Listener::Tcp(listener)) = listeners.into_iter().next() else {
        return Err("axum_prefork serves one TCP listener".into());
    };
    let listener = Draining::new(TcpListener::from_std(listener)?, drain)?;
    let queue_served = listener.queue_served.clone();
    let beat = link.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(beat.heartbeat_interval());
        while beat.heartbeat().is_ok() {
            tick.tick().await;
        }
    });
    link.ready()?;
    axum::serve(listener, app())
        .with_graceful_shutdown(async move { queue_served.notified().await })
        .await?;
    Ok(())
}

fn app() -> Router {
    Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route("/pid", get(|| async { std::process::id().to_string() }))
        .route("/echo", post(|body: axum::body::Bytes| async { body }))
        .route("/sleep", get(sleep))
}

async fn sleep(Query(query): Query<HashMap<String, String>>) -> (StatusCode, String) {
    let ms = query.get("ms").and_then(|ms| ms.parse::<u64>().ok());
    match ms {
        Some(ms) if ms <= 60_000 => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (StatusCode::OK, format!("slept {ms} ms"))
        }
        _ => (StatusCode::BAD_REQUEST, "ms must be 0..=60000\n".into()),
    }
}

/// How long the connections taken in at the drain have to be read before the graceful
/// shutdown (forkloop's own worker gives idle connections the same 100 ms).
const READ_GRACE: Duration = Duration::from_millis(100);

/// The worker's listener, for `axum::serve`: accepts until the drain begins, then
/// takes in what the kernel already queued (a listener's last copy closing would reset
/// those connections), then tells the graceful shutdown to begin.
struct Draining {
    listener: TcpListener,
    drain: AsyncFd<Drain>,
    draining: bool,
    queue_served: Arc<Notify>,
}

impl Draining {
    fn new(listener: TcpListener, drain: Drain) -> io::Result<Draining> {
        // SAFETY: a `Drain` owns its fd, gives no way to close or replace it, and
        // always returns it from `as_raw_fd`: it is open and the same until the
        // `AsyncFd` drops the `Drain`.
        let drain = unsafe { AsyncFd::register_with_interest(drain, Interest::READABLE) };
        Ok(Draining {
            listener,
            drain: drain.map_err(io::Error::from)?,
            draining: false,
            queue_served: Arc::new(Notify::new()),
        })
    }

    /// One connection already queued, if any: a plain non-blocking `accept`, which
    /// does not wait for the runtime to have seen the listener readable.
    fn queued(&self) -> Option<(TcpStream, SocketAddr)> {
        let (socket, peer) = socket2::SockRef::from(&self.listener).accept().ok()?;
        let stream = std::net::TcpStream::from(socket);
        stream.set_nonblocking(true).ok()?;
        Some((TcpStream::from_std(stream).ok()?, peer.as_socket()?))
    }
}

impl axum::serve::Listener for Draining {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        while !self.draining {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(connection) => return connection,
                    // Out of fds, or a connection reset before it was taken: wait a
                    // moment rather than spin.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                _ = self.drain.readable() => self.draining = true,
            }
        }
        if let Some(connection) = self.queued() {
            return connection;
        }
        // hyper's graceful shutdown closes at once a connection it has not yet read a
        // request from, and one just taken from the queue may not have been read yet:
        // give those a moment to be, before the shutdown begins.
        tokio::time::sleep(READ_GRACE).await;
        self.queue_served.notify_one();
        std::future::pending().await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}
