//! Blocking code under forkloop's supervisor: a TCP (or Unix) server that answers each
//! connection with one line, `<pid> <slot>`, and closes it. No event loop and no HTTP:
//! each worker waits in `poll(2)` on its listeners and its drain fd, and handles one
//! connection at a time.
//!
//! ```text
//! cargo run --example supervised_blocking --features supervisor -- --listen 127.0.0.1:7000 --workers 2
//! nc 127.0.0.1 7000        # 12345 1
//! ```
//!
//! The other flags make it misbehave on purpose, for the supervisor's tests
//! (cli/tests/supervisor.rs).

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use forkloop::supervisor::{Config, Listener, MasterLink, Supervisor, WorkerContext};
use nix::poll::{PollFd, PollFlags, PollTimeout};

#[derive(Parser)]
struct Args {
    /// `host:port` or `unix:/path`, bound by the master.
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: Vec<String>,
    /// A Unix socket this program binds itself and hands to the supervisor.
    #[arg(long)]
    handed_in: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, default_value_t = 30_000)]
    heartbeat_timeout_ms: u64,
    #[arg(long, default_value_t = 30_000)]
    graceful_timeout_ms: u64,
    /// Each worker asks to be recycled after this many connections.
    #[arg(long)]
    max_requests: Option<u64>,
    /// How long each connection is held before its answer.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    #[arg(long, value_enum, default_value_t = Mode::Serve)]
    mode: Mode,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Mode {
    /// Serve as a worker should.
    Serve,
    /// Beat, but never say ready.
    NeverReady,
    /// Answer the first connection, then hang: no more heartbeats.
    HangAfterFirst,
    /// Serve, with a helper process forked at start (without exec) that only waits.
    ForkHelper,
}

fn main() {
    // INFO and up unless RUST_LOG says otherwise: the supervisor warns of crashes there.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let mut config = Config::default();
    config.listen = args.listen.clone();
    config.workers = args.workers;
    config.heartbeat_timeout = Duration::from_millis(args.heartbeat_timeout_ms);
    config.graceful_timeout = Duration::from_millis(args.graceful_timeout_ms);
    config.max_requests = args.max_requests;
    let (slow, mode) = (Duration::from_millis(args.slow_ms), args.mode);
    let mut supervisor = Supervisor::new(config, move |ctx| worker(ctx, slow, mode));
    if let Some(path) = &args.handed_in {
        let _ = std::fs::remove_file(path);
        supervisor = supervisor.listener(UnixListener::bind(path).expect("binding --handed-in"));
    }
    if let Err(e) = supervisor.run() {
        log::error!("{e}");
        std::process::exit(1);
    }
}

fn worker(ctx: WorkerContext, slow: Duration, mode: Mode) -> i32 {
    let WorkerContext {
        slot,
        listeners,
        link,
        drain,
        max_requests,
        ..
    } = ctx;
    if mode != Mode::NeverReady {
        link.ready().expect("the master is there");
    }
    say(format!("worker {slot} serving: pid {}", std::process::id()));
    if mode == Mode::ForkHelper {
        // SAFETY: the child only waits for signals (pause is async-signal-safe) and
        // never returns into this program's frames.
        match unsafe { libc::fork() } {
            0 => loop {
                // SAFETY: as above.
                unsafe { libc::pause() };
            },
            helper => say(format!("worker {slot} forked helper {helper}")),
        }
    }
    let mut served = 0;
    let mut beat = Instant::now();
    loop {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(drain.as_fd(), PollFlags::POLLIN));
        let wait = PollTimeout::try_from(link.heartbeat_interval()).unwrap_or(PollTimeout::MAX);
        let _ = nix::poll::poll(&mut fds, wait);
        if beat.elapsed() >= link.heartbeat_interval() {
            let _ = link.heartbeat();
            beat = Instant::now();
        }
        let draining = drain.is_draining();
        // Draining, take in what the kernel already queued: the last worker's listener
        // copies closing would reset those connections.
        for listener in &listeners {
            while serve_one(listener, slot, slow) {
                served += 1;
                if mode == Mode::HangAfterFirst {
                    loop {
                        std::thread::sleep(Duration::from_secs(60));
                    }
                }
                recycle_at(&link, served, max_requests);
            }
        }
        if draining {
            say(format!("worker {slot} drained after {served} connections"));
            return 0;
        }
    }
}

/// Answers one queued connection, if there is one.
fn serve_one(listener: &Listener, slot: usize, slow: Duration) -> bool {
    // Blocking: accepted sockets inherit O_NONBLOCK from the listener on the BSDs.
    let accepted: std::io::Result<Box<dyn Write>> = match listener {
        Listener::Tcp(l) => l.accept().and_then(|(client, _)| {
            client.set_nonblocking(false)?;
            Ok(Box::new(client) as Box<dyn Write>)
        }),
        Listener::Unix(l) => l.accept().and_then(|(client, _)| {
            client.set_nonblocking(false)?;
            Ok(Box::new(client) as Box<dyn Write>)
        }),
        _ => return false,
    };
    let Ok(mut client) = accepted else {
        return false;
    };
    if !slow.is_zero() {
        say(format!("worker {slot} holds a connection for {slow:?}"));
        std::thread::sleep(slow);
    }
    let _ = writeln!(client, "{} {slot}", std::process::id());
    true
}

/// One line on stderr in one write, so that the lines of the master's and the
/// workers' (which share the pipe) never interleave mid-line.
fn say(line: String) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

fn recycle_at(link: &MasterLink, served: u64, max_requests: Option<u64>) {
    if max_requests == Some(served) {
        let _ = link.recycle();
    }
}
