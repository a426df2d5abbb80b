//! `forkloop serve`: the prefork HTTP/1.1 server with its built-in app.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use forkloop::server::http::header::{self, HeaderValue};
use forkloop::server::http::{Method, StatusCode};
use forkloop::server::{query, text, Config, Request, Responder, Response, Server, Worker};
use forkloop::{Kind, Loop};

const SIGNALS: &str = "\
Signals to the master:
  TERM, INT, QUIT
              graceful: stop accepting, finish in-flight requests, close idle
              keep-alives, exit when every worker is gone (SIGKILL after
              --graceful-timeout). A second one stops at once.
  HUP         rolling restart: every replacement is ready before its old
              worker retires; capacity never drops. After a WINCH: the workers
              come back instead.
  USR2        binary upgrade: exec the binary at the same path (a new build, if
              it was replaced) as a new master on the same sockets; once all its
              workers are ready, this master drains and exits. If the new one
              exits or is not ready within --upgrade-timeout, this one serves on.
              The pid file is PID_FILE.oldbin meanwhile.
  WINCH       retire every worker, keep the master (HUP brings them back).
              Ignored in the foreground of a terminal (a resize sends it).
  TTIN, TTOU  one worker more / one fewer (never below 1). With --reuse-port,
              a lane more / the last worker's lane closed once drained.
  USR1        workers reopen the access log.
Workers ignore INT and QUIT: Ctrl-C and Ctrl-\\ on the process group reach only
the master.

Under systemd (see the README's sample units): with NOTIFY_SOCKET set (Type=notify),
the master sends READY=1, RELOADING=1 at HUP and READY=1 once it is done,
STOPPING=1, STATUS= lines, and WATCHDOG=1 (WatchdogSec=). With LISTEN_FDS (socket
activation) it serves the sockets it was given instead of binding: each --listen
names one, by its FileDescriptorName= or in order.";

#[derive(Parser)]
#[command(
    name = "forkloop",
    version,
    about = "A prefork HTTP/1.1 server on the forkloop event loop"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP/1.1 with a master and forked workers.
    #[command(after_help = SIGNALS)]
    Serve(Box<Serve>),
    /// Show a running master's workers: pid, slot, state, age, requests served,
    /// resident memory and last heartbeat.
    Status(StatusArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("master").required(true).args(["pid_file", "control_socket"])))]
struct StatusArgs {
    /// The master's pid file (its control socket is PATH.ctl).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// The master's control socket (serve --control-socket).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct Serve {
    /// Address to listen on: HOST:PORT or unix:/PATH; repeat for several. Under socket
    /// activation, a socket systemd passed: its FileDescriptorName=, or any address
    /// (the sockets are taken in order when no name is a --listen value).
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: Vec<String>,
    /// Number of workers [default: one per CPU].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Event-loop backend [default: FORKLOOP_BACKEND, else the best compiled in].
    #[arg(long, value_name = "KIND", value_parser = parse_kind)]
    backend: Option<Kind>,
    /// Seconds a draining worker may take before it is killed.
    #[arg(long, value_name = "S", default_value = "30", value_parser = parse_seconds)]
    graceful_timeout: Duration,
    /// Seconds without a heartbeat after which a worker is killed and replaced.
    #[arg(long, value_name = "S", default_value = "30", value_parser = parse_seconds)]
    heartbeat_timeout: Duration,
    /// Seconds the new master of a binary upgrade (USR2) has to get every worker
    /// ready; later, it is stopped and the old master serves on.
    #[arg(long, value_name = "S", default_value = "60", value_parser = parse_seconds)]
    upgrade_timeout: Duration,
    /// Seconds for a request head to arrive: from the accept, then from each later
    /// request's first byte (else 408 and close).
    #[arg(long, value_name = "S", default_value = "10", value_parser = parse_seconds)]
    header_timeout: Duration,
    /// Seconds without progress while a request body is read (else 408 and close) or a
    /// response is written (else close).
    #[arg(long, value_name = "S", default_value = "10", value_parser = parse_seconds)]
    body_timeout: Duration,
    /// Seconds an idle keep-alive connection stays open (0: no keep-alive).
    #[arg(long, value_name = "S", default_value = "5", value_parser = parse_seconds)]
    keepalive_timeout: Duration,
    /// Largest request body accepted (else 413).
    #[arg(long, value_name = "BYTES", default_value = "1048576")]
    max_body_size: u64,
    /// Largest request head accepted (else 431; a longer request line alone, 414).
    #[arg(long, value_name = "BYTES", default_value = "16384", value_parser = clap::value_parser!(u64).range(64..=1 << 24))]
    max_header_size: u64,
    /// Recycle a worker after N requests (through the same overlap as HUP).
    #[arg(long, value_name = "N")]
    max_requests: Option<u64>,
    /// Up to J extra requests per worker, so they do not all recycle at once.
    #[arg(long, value_name = "J", default_value = "0")]
    max_requests_jitter: u64,
    /// Write the master's pid here (refused if it names a live process).
    #[arg(long, value_name = "PATH")]
    pid_file: Option<PathBuf>,
    /// Answer `forkloop status` on this Unix socket [default: PID_FILE.ctl, with
    /// --pid-file].
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Recycle a worker whose resident memory stays above this (through the same
    /// overlap as HUP; Linux).
    #[arg(long, value_name = "BYTES")]
    max_worker_memory: Option<u64>,
    /// One SO_REUSEPORT socket per worker for each TCP --listen address: the kernel
    /// spreads connections over them (Linux, FreeBSD).
    #[arg(long)]
    reuse_port: bool,
    /// Log every request here; reopened on SIGUSR1.
    #[arg(long, value_name = "PATH")]
    access_log: Option<PathBuf>,
    /// Test apps for the server's own tests.
    #[arg(long, hide = true, value_enum, default_value = "hello")]
    app: App,
}

#[derive(Clone, Copy, ValueEnum)]
enum App {
    /// The built-in app.
    Hello,
    /// Panics in every worker at start-up.
    CrashAtStart,
    /// The first `--workers` workers start; every later one (a reload's, a
    /// replacement's) panics at start-up.
    CrashAfterTheFirst,
    /// The first `--workers` workers start; every later one takes 3 s to (a slow
    /// reload: its replacements are not ready for a while).
    SlowAfterTheFirst,
    /// Answers one request, then exits the worker.
    ExitAfterRequest,
    /// The built-in app, plus `GET /panic`, whose handler panics, and `GET /block`,
    /// whose handler never returns (a stuck worker).
    Panicky,
    /// The built-in app, logging every hook call.
    Hooks,
    /// The built-in app, with a thread started by the first before_fork hook that logs
    /// in the master all the time: workers are forked while it holds the log's lock.
    LoggingThread,
    /// Responses a handler must not be able to put on the wire, for the conformance
    /// tests: each path answers with one kind of invalid (or framing) header or status.
    HostileResponses,
    /// The built-in app, plus `GET /env?name=NAME`: the worker's value of the
    /// environment variable NAME (404 when unset).
    Environment,
    /// The built-in app, plus `GET /grow?mb=N`: the worker allocates N MiB, touches
    /// it, and never frees it.
    Leaky,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    let kind: Kind = s.parse().map_err(|e: forkloop::Error| e.to_string())?;
    kind.check_available().map_err(|e| e.to_string())?;
    Ok(kind)
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
}

/// `forkloop status`: prints the master's view; the exit status.
fn status(args: &StatusArgs) -> i32 {
    let socket = args.control_socket.clone().or_else(|| {
        let pid_file = args.pid_file.as_deref()?;
        Some(forkloop::supervisor::Status::beside(pid_file))
    });
    let Some(socket) = socket else {
        eprintln!("forkloop status: give --pid-file or --control-socket");
        return 2;
    };
    let status = match forkloop::supervisor::Status::query(&socket) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("forkloop status: {e}");
            return 1;
        }
    };
    let out = if args.json {
        status_json(&status)
    } else {
        status_table(&status)
    };
    print!("{out}");
    0
}

fn status_table(status: &forkloop::supervisor::Status) -> String {
    let mut out = format!("master {}\n", status.master);
    out += "PID      SLOT  STATE     AGE        REQUESTS  RSS        LAST HEARD\n";
    let dash = || "-".to_owned();
    for w in &status.workers {
        let served = w.served.map_or_else(dash, |n| n.to_string());
        let rss = w
            .rss
            .map_or_else(dash, |b| format!("{:.1} MiB", b as f64 / 1048576.0));
        out += &format!(
            "{:<8} {:<5} {:<9} {:<10} {:<9} {:<10} {:.1} s ago\n",
            w.pid,
            w.slot,
            w.state.name(),
            format!("{:.1} s", w.age.as_secs_f64()),
            served,
            rss,
            w.last_heard.as_secs_f64()
        );
    }
    out
}

fn status_json(status: &forkloop::supervisor::Status) -> String {
    let workers: Vec<serde_json::Value> = status
        .workers
        .iter()
        .map(|w| {
            serde_json::json!({
                "pid": w.pid,
                "slot": w.slot,
                "state": w.state.name(),
                "age_seconds": w.age.as_secs_f64(),
                "requests": w.served,
                "rss_bytes": w.rss,
                "last_heard_seconds_ago": w.last_heard.as_secs_f64(),
            })
        })
        .collect();
    let view = serde_json::json!({ "master": status.master, "workers": workers });
    format!("{view:#}\n")
}

/// A response with `status`, `body` and one header.
fn with_header(
    status: StatusCode,
    body: &str,
    name: &'static str,
    value: &'static str,
) -> Response {
    let mut response = text(status, body);
    response
        .headers_mut()
        .append(name, HeaderValue::from_static(value));
    response
}

/// A 405, with the `Allow` header RFC 9110 §15.5.6 requires.
fn not_allowed(allow: &'static str) -> Response {
    with_header(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed\n",
        "allow",
        allow,
    )
}

/// The built-in app, whose workers forked after the first `--workers` (a reload's, a
/// replacement's) run `start` in the child before they serve.
fn after_the_first(config: Config, start: fn()) -> Server {
    static FORKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let first = config.supervisor.workers;
    Server::new(config, hello)
        .before_fork(|_| {
            FORKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .after_fork(move |_| {
            // The master's count, as copied into this child at the fork.
            if FORKS.load(std::sync::atomic::Ordering::Relaxed) > first {
                start()
            }
        })
}

/// The built-in app: `GET /`, `GET /pid`, `POST /echo`, `GET /sleep?ms=N`.
fn hello(lp: &mut Loop<Worker>, request: Request, responder: Responder) {
    let get = matches!(*request.method(), Method::GET | Method::HEAD);
    let response = match (request.method(), request.uri().path()) {
        (_, "/") if get => text(StatusCode::OK, "Hello, World!"),
        (_, "/pid") if get => text(StatusCode::OK, std::process::id().to_string()),
        (&Method::POST, "/echo") => {
            let mut echo = Response::new(request.into_body());
            let binary = HeaderValue::from_static("application/octet-stream");
            echo.headers_mut().insert(header::CONTENT_TYPE, binary);
            echo
        }
        (&Method::GET, "/sleep") => match query(&request, "ms").and_then(|ms| ms.parse().ok()) {
            Some(ms) => {
                // Answered later from the loop: the worker serves others meanwhile.
                lp.after(Duration::from_millis(ms), move |lp, _| {
                    responder.send(lp, text(StatusCode::OK, format!("slept {ms} ms")));
                });
                return;
            }
            None => text(StatusCode::BAD_REQUEST, "usage: /sleep?ms=N\n"),
        },
        // RFC 9110 §9.3.7: OPTIONS * asks about the server itself.
        (&Method::OPTIONS, "*") => with_header(
            StatusCode::NO_CONTENT,
            "",
            "allow",
            "GET, HEAD, POST, OPTIONS",
        ),
        (_, "/" | "/pid") => not_allowed("GET, HEAD"),
        (_, "/echo") => not_allowed("POST"),
        (_, "/sleep") => not_allowed("GET"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    responder.send(lp, response);
}

/// `--app hostile-responses`: what a buggy handler may write, by path. (A header name
/// or value with CR, LF or NUL, and a status below 100 or above 999, cannot be built:
/// the `http` crate's types refuse them.)
fn hostile(lp: &mut Loop<Worker>, request: Request, responder: Responder) {
    let ok = |name, value| with_header(StatusCode::OK, "hi", name, value);
    let response = match request.uri().path() {
        "/status-101" => text(StatusCode::SWITCHING_PROTOCOLS, "hi"),
        "/status-600" => {
            let mut beyond = text(StatusCode::OK, "hi");
            *beyond.status_mut() = StatusCode::from_u16(600).expect("http builds 100-999");
            beyond
        }
        "/cl-wrong" => ok("content-length", "999"),
        "/cl-right" => ok("content-length", "2"),
        "/te" => ok("transfer-encoding", "chunked"),
        "/connection-close" => ok("connection", "close"),
        "/connection-keep-alive" => ok("connection", "keep-alive"),
        "/no-content-body" => text(StatusCode::NO_CONTENT, "x"),
        "/no-content" => {
            let mut empty = Response::new(Vec::new());
            *empty.status_mut() = StatusCode::NO_CONTENT;
            empty
        }
        "/drop" => {
            // Dropped outside the handler call, from the loop's next iteration.
            lp.later(move |_, _| drop(responder));
            return;
        }
        _ => return hello(lp, request, responder),
    };
    responder.send(lp, response);
}

/// `--app leaky`: memory a worker never gives back.
fn leaky(lp: &mut Loop<Worker>, request: Request, responder: Responder) {
    if request.uri().path() != "/grow" {
        return hello(lp, request, responder);
    }
    let Some(mb) = query(&request, "mb").and_then(|mb| mb.parse::<usize>().ok()) else {
        return responder.send(lp, text(StatusCode::BAD_REQUEST, "usage: /grow?mb=N\n"));
    };
    // Touched, so that it is resident; leaked, so that it stays.
    Vec::leak(vec![1u8; mb << 20]);
    responder.send(lp, text(StatusCode::OK, format!("grew {mb} MiB\n")));
}

/// `--app environment`: what a worker's environment holds.
fn environment(lp: &mut Loop<Worker>, request: Request, responder: Responder) {
    if request.uri().path() != "/env" {
        return hello(lp, request, responder);
    }
    let value = query(&request, "name").and_then(std::env::var_os);
    let response = match value {
        Some(value) => text(StatusCode::OK, value.to_string_lossy().into_owned()),
        None => text(StatusCode::NOT_FOUND, "unset\n"),
    };
    responder.send(lp, response);
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            writeln!(
                buf,
                "forkloop[{}] {}: {}",
                std::process::id(),
                record.level(),
                record.args()
            )
        })
        .init();
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Status(args) => std::process::exit(status(&args)),
    };
    let mut config = Config::default();
    let supervisor = &mut config.supervisor;
    supervisor.listen = args.listen;
    if let Some(workers) = args.workers {
        supervisor.workers = workers;
    }
    supervisor.backend = args.backend;
    supervisor.graceful_timeout = args.graceful_timeout;
    supervisor.heartbeat_timeout = args.heartbeat_timeout;
    supervisor.upgrade_timeout = args.upgrade_timeout;
    supervisor.max_requests = args.max_requests;
    supervisor.max_requests_jitter = args.max_requests_jitter;
    supervisor.control_socket = args.control_socket;
    supervisor.pid_file = args.pid_file;
    supervisor.max_worker_memory = args.max_worker_memory;
    supervisor.reuse_port = args.reuse_port;
    config.header_timeout = args.header_timeout;
    config.body_timeout = args.body_timeout;
    config.keepalive_timeout = args.keepalive_timeout;
    config.max_body_size = args.max_body_size;
    config.max_header_size = args.max_header_size as usize;
    config.access_log = args.access_log;
    let server = match args.app {
        App::Hello => Server::new(config, hello),
        App::Hooks => Server::new(config, hello)
            .before_fork(|slot| log::info!("hook before_fork slot {slot}"))
            .after_fork(|slot| log::info!("hook after_fork slot {slot} pid {}", std::process::id()))
            .on_worker_exit(|slot, pid, status| {
                log::info!("hook worker_exit slot {slot} pid {pid} {status}")
            }),
        App::HostileResponses => Server::new(config, hostile),
        App::Environment => Server::new(config, environment),
        App::Leaky => Server::new(config, leaky),
        App::LoggingThread => {
            static STARTED: std::sync::Once = std::sync::Once::new();
            Server::new(config, hello)
                .before_fork(|_| {
                    STARTED.call_once(|| {
                        std::thread::spawn(|| loop {
                            // Half of the time in the log's (stderr's) lock, as a busy
                            // logger is, without flooding the log.
                            let held = std::io::stderr().lock();
                            log::info!("the master's logging thread");
                            let start = std::time::Instant::now();
                            while start.elapsed() < Duration::from_micros(200) {}
                            drop(held);
                            std::thread::sleep(Duration::from_micros(200));
                        });
                    })
                })
                .after_fork(|slot| log::info!("worker {slot} logs from the child"))
        }
        App::CrashAtStart => {
            Server::new(config, hello).after_fork(|_| panic!("the app failed to start"))
        }
        App::CrashAfterTheFirst => {
            after_the_first(config, || panic!("the new code fails to start"))
        }
        App::SlowAfterTheFirst => {
            after_the_first(config, || std::thread::sleep(Duration::from_secs(3)))
        }
        App::ExitAfterRequest => Server::new(
            config,
            |lp: &mut Loop<Worker>, request: Request, responder: Responder| {
                hello(lp, request, responder);
                lp.after(Duration::ZERO, |_, _| std::process::exit(3));
            },
        ),
        App::Panicky => Server::new(
            config,
            |lp: &mut Loop<Worker>, request: Request, responder: Responder| match request
                .uri()
                .path()
            {
                "/panic" => panic!("the handler panics on purpose"),
                "/block" => loop {
                    std::hint::spin_loop();
                },
                _ => hello(lp, request, responder),
            },
        ),
    };
    if let Err(e) = server.run() {
        log::error!("{e}");
        std::process::exit(1);
    }
}
