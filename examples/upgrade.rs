//! A binary upgrade with no failed request: this server answers `GET /version` with
//! the version stamped into its binary and `GET /pid` with its worker's pid. Replace
//! the binary on disk with a new build and send the master `USR2`: it execs the new
//! binary on the same sockets, and drains and exits once the new master's workers are
//! all ready (if the new one fails to get there, the old one serves on).
//!
//! ```text
//! cargo run --example upgrade --features server,epoll -- --listen 127.0.0.1:8080 --pid-file /tmp/app.pid
//! cp new-build target/debug/examples/upgrade.new && mv target/debug/examples/upgrade.new target/debug/examples/upgrade
//! kill -USR2 $(cat /tmp/app.pid)
//! ```
//!
//! The stamp is a fixed-size byte string (see `VERSION`), so that cli/tests/upgrade.rs
//! can make a "new build" by rewriting it in a copy of this binary.

use std::path::PathBuf;

use clap::Parser;
use forkloop::server::http::StatusCode;
use forkloop::server::{text, Config, Request, Responder, Server, Worker};
use forkloop::Loop;

/// This build's version: `forkloop-version:` and 8 bytes, NUL-padded.
static VERSION: [u8; 25] = *b"forkloop-version:v1\0\0\0\0\0\0";

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Seconds the new master of an upgrade has to get every worker ready.
    #[arg(long, default_value_t = 60.0)]
    upgrade_timeout: f64,
    #[arg(long)]
    reuse_port: bool,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let mut config = Config::default();
    config.supervisor.listen = vec![args.listen];
    config.supervisor.workers = args.workers;
    config.supervisor.pid_file = args.pid_file;
    config.supervisor.upgrade_timeout = std::time::Duration::from_secs_f64(args.upgrade_timeout);
    config.supervisor.reuse_port = args.reuse_port;
    if let Err(e) = Server::new(config, app).run() {
        log::error!("{e}");
        std::process::exit(1);
    }
}

fn version() -> String {
    // Read at run time, from the binary's data: what a rewritten copy holds.
    let stamp = std::hint::black_box(&VERSION);
    let end = stamp.iter().position(|&b| b == 0).unwrap_or(stamp.len());
    let stamp = String::from_utf8_lossy(&stamp[..end]);
    stamp.trim_start_matches("forkloop-version:").to_owned()
}

fn app(lp: &mut Loop<Worker>, request: Request, responder: Responder) {
    let body = match request.uri().path() {
        "/version" => format!("{}\n", version()),
        "/pid" => format!("{}\n", std::process::id()),
        _ => "hello\n".to_owned(),
    };
    responder.send(lp, text(StatusCode::OK, body));
}
