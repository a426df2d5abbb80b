//! Blocking work off the worker's loop: forkloop's HTTP server, whose handler hands
//! `/sleep?ms=N` (a stand-in for a blocking database call) to a thread pool, and answers
//! from the pool thread through a `RemoteResponder`, which wakes the worker's loop. The
//! loop never blocks: while every pool thread sleeps, `GET /` still answers at once,
//! and the worker's heartbeat goes on.
//!
//! ```text
//! cargo run --example blocking_pool --features server,epoll -- --listen 127.0.0.1:8080 --threads 8
//! curl 127.0.0.1:8080/sleep?ms=1000 & curl 127.0.0.1:8080/
//! ```

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use clap::Parser;
use forkloop::server::http::StatusCode;
use forkloop::server::{query, text, Config, RemoteResponder, Request, Responder, Server, Worker};
use forkloop::Loop;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Pool threads per worker.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    #[arg(long, default_value_t = 30_000)]
    heartbeat_timeout_ms: u64,
}

/// A blocking job and the responder it answers through.
type Job = (u64, RemoteResponder);

/// A fixed set of threads taking jobs from one queue.
struct Pool {
    jobs: Mutex<Sender<Job>>,
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..threads {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || loop {
                let next = queue.lock().map(|q| q.recv());
                let Ok(Ok((ms, responder))) = next else {
                    return;
                };
                log::debug!("a job starts in the pool: {ms} ms");
                std::thread::sleep(Duration::from_millis(ms));
                responder.send(text(StatusCode::OK, format!("slept {ms} ms in the pool")));
            });
        }
        Pool {
            jobs: Mutex::new(jobs),
        }
    }
}

fn main() {
    // INFO and up unless RUST_LOG says otherwise: the supervisor warns of crashes there.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let mut config = Config::default();
    config.supervisor.listen = vec![args.listen];
    config.supervisor.workers = args.workers;
    config.supervisor.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    let threads = args.threads;
    // Made in each worker at its first job: threads are never forked.
    let pool = OnceLock::new();
    let app = move |lp: &mut Loop<Worker>, request: Request, responder: Responder| {
        let ms = query(&request, "ms").and_then(|ms| ms.parse::<u64>().ok());
        match (request.uri().path(), ms) {
            ("/sleep", Some(ms)) if ms <= 60_000 => {
                let pool = pool.get_or_init(|| Pool::new(threads));
                let job = (ms, responder.into_remote());
                if let Err(mpsc::SendError((_, responder))) = pool.jobs.lock().unwrap().send(job) {
                    responder.send(text(StatusCode::SERVICE_UNAVAILABLE, "the pool is gone\n"));
                }
            }
            ("/sleep", _) => {
                responder.send(lp, text(StatusCode::BAD_REQUEST, "ms must be 0..=60000\n"))
            }
            ("/pid", _) => responder.send(lp, text(StatusCode::OK, std::process::id().to_string())),
            _ => responder.send(lp, text(StatusCode::OK, "Hello, World!")),
        }
    };
    if let Err(e) = Server::new(config, app).run() {
        log::error!("{e}");
        std::process::exit(1);
    }
}
