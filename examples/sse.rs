//! Server-sent events from forkloop's HTTP server: `GET /events` streams one event per
//! millisecond (`id: N` and `data: N`), chunked, for as long as the client reads it.
//! The handler respects backpressure: while more than 64 KiB wait for a slow client,
//! it waits to be writable instead of queueing more. When the worker drains (TERM,
//! HUP, recycling), each stream ends cleanly: its last chunk, then `Connection: close`.
//!
//! ```text
//! cargo run --example sse --features server,epoll -- --listen 127.0.0.1:8080
//! curl -N 127.0.0.1:8080/events
//! ```

use std::time::Duration;

use clap::Parser;
use forkloop::server::http::{self, header, HeaderValue, StatusCode};
use forkloop::server::{text, BodySender, Config, Request, Responder, Server, Worker};
use forkloop::Loop;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

/// The time between two events.
const EVERY: Duration = Duration::from_millis(1);
/// Queued bytes past which the handler waits for the client.
const HIGH_WATER: usize = 64 * 1024;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let mut config = Config::default();
    config.supervisor.listen = vec![args.listen];
    config.supervisor.workers = args.workers;
    if let Err(e) = Server::new(config, app).run() {
        log::error!("{e}");
        std::process::exit(1);
    }
}

fn app(lp: &mut Loop<Worker>, request: Request, responder: Responder) {
    if request.uri().path() != "/events" {
        return responder.send(lp, text(StatusCode::NOT_FOUND, "GET /events\n"));
    }
    let mut head = http::Response::new(());
    let headers = head.headers_mut();
    let event_stream = HeaderValue::from_static("text/event-stream");
    headers.insert(header::CONTENT_TYPE, event_stream);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let events = responder.stream(lp, head);
    tick(lp, events, 0);
}

/// Sends event `n`, then the next one `EVERY` later (or once the client has taken
/// enough), until the stream ends.
fn tick(lp: &mut Loop<Worker>, events: BodySender, n: u64) {
    if events.is_draining() {
        log::info!("an event stream ends after {n} events: the worker drains");
        return events.finish(lp);
    }
    if events.buffered() > HIGH_WATER {
        return events.when_writable(lp, move |lp, _, events| tick(lp, events, n));
    }
    match events.send(lp, format!("id: {n}\ndata: {n}\n\n")) {
        Ok(()) => {
            lp.after(EVERY, move |lp, _| tick(lp, events, n + 1));
        }
        Err(why) => log::info!("an event stream ended after {n} events: {why}"),
    }
}
