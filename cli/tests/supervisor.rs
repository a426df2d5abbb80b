//! forkloop's supervisor with a worker that is not HTTP and not an event loop: the
//! `supervised_blocking` example, blocking code that answers each connection with
//! `<pid> <slot>`. Each test runs the example as a real process tree.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;

fn start(args: &[&str]) -> Server {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    start_program(&example("supervised_blocking"), &all)
}

/// One connection's answer: the pid and slot of the worker that took it.
fn ask(addr: &str) -> std::io::Result<(libc::pid_t, usize)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(LIMIT))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let parsed = answer
        .split_once(' ')
        .and_then(|(pid, slot)| Some((pid.parse().ok()?, slot.trim().parse().ok()?)));
    parsed.ok_or_else(|| std::io::Error::other(format!("answered {answer:?}")))
}

fn live_workers(server: &Server) -> HashSet<libc::pid_t> {
    children(server.pid)
        .into_iter()
        .filter(|p| running(*p))
        .collect()
}

/// Connections made one after another until stopped; the count of answers, or the
/// first failure.
struct Load {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<usize, String>>,
}

impl Load {
    fn start(addr: &str) -> Load {
        let (addr, stop) = (addr.to_owned(), Arc::new(AtomicBool::new(false)));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut answered = 0;
            while !stopped.load(Ordering::SeqCst) {
                ask(&addr).map_err(|e| format!("after {answered} answers: {e}"))?;
                answered += 1;
            }
            Ok(answered)
        });
        Load { stop, thread }
    }

    fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let answered = self.thread.join().expect("the load thread panicked");
        answered.unwrap_or_else(|e| panic!("a connection failed: {e}"))
    }
}

#[test]
fn blocking_workers_become_ready_and_serve_every_connection() {
    let server = start(&["--workers", "2"]);
    let workers = live_workers(&server);
    assert_eq!(workers.len(), 2, "two workers");
    for _ in 0..20 {
        let (pid, slot) = ask(&server.addr).unwrap();
        assert!(workers.contains(&pid), "answered by {pid}, not a worker");
        assert!((1..=2).contains(&slot));
    }
}

#[test]
fn a_killed_worker_is_replaced() {
    let mut server = start(&["--workers", "1"]);
    let (old, _) = ask(&server.addr).unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(old, libc::SIGKILL) };
    server.wait_for("exited unexpectedly");
    let (new, slot) = ask(&server.addr).unwrap();
    assert_ne!(new, old);
    assert_eq!(slot, 2, "a new slot");
}

#[test]
fn a_worker_that_never_says_ready_is_killed_and_the_master_gives_up() {
    let mut server = spawn_command({
        let mut cmd = std::process::Command::new(example("supervised_blocking"));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--mode",
            "never-ready",
            "--heartbeat-timeout-ms",
            "300",
        ]);
        cmd
    });
    server.wait_for("was not ready within 300ms; killing it");
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(1), "{status}");
    server.wait_for("5 workers in a row exited before becoming ready");
}

#[test]
fn a_worker_that_stops_beating_is_killed_and_replaced() {
    let mut server = start(&[
        "--workers",
        "1",
        "--mode",
        "hang-after-first",
        "--heartbeat-timeout-ms",
        "300",
    ]);
    let (hung, _) = ask(&server.addr).unwrap();
    server.wait_for("sent no heartbeat for 300ms; killing it");
    server.wait_for("worker 2 serving");
    let (next, slot) = ask(&server.addr).unwrap();
    assert_ne!(next, hung);
    assert_eq!(slot, 2);
    eventually("the hung worker is reaped", || !running(hung));
}

#[test]
fn a_worker_that_asks_to_be_recycled_is_replaced_through_the_overlap() {
    let mut server = start(&["--workers", "1", "--max-requests", "3"]);
    let load = Load::start(&server.addr);
    server.wait_for("worker 1 drained after");
    server.wait_for("retired: exit status: 0");
    let answered = load.finish();
    assert!(answered >= 3, "{answered} answers");
    let (_, slot) = ask(&server.addr).unwrap();
    assert!(slot >= 2, "slot {slot} answers after the recycling");
}

#[test]
fn term_lets_the_connection_in_flight_finish_then_exits_zero() {
    let mut server = start(&["--workers", "1", "--slow-ms", "500"]);
    let addr = server.addr.clone();
    let in_flight = std::thread::spawn(move || ask(&addr));
    server.wait_for("worker 1 holds a connection");
    server.signal(libc::SIGTERM);
    let answer = in_flight.join().unwrap();
    assert!(
        answer.is_ok(),
        "the connection in flight failed: {answer:?}"
    );
    assert!(server.wait_exit().success());
    server.wait_for("worker 1 drained after 1 connections");
}

#[test]
fn hup_replaces_every_worker_with_no_failed_connection() {
    let mut server = start(&["--workers", "2"]);
    let old = live_workers(&server);
    let load = Load::start(&server.addr);
    server.signal(libc::SIGHUP);
    eventually("every old worker retired", || {
        let now = live_workers(&server);
        now.len() == 2 && now.is_disjoint(&old)
    });
    assert!(load.finish() > 0);
    server.wait_for_count("retired: exit status: 0", 2);
}

#[test]
fn a_worker_sent_term_by_an_operator_drains_and_is_replaced() {
    let mut server = start(&["--workers", "1"]);
    let (old, _) = ask(&server.addr).unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(old, libc::SIGTERM) };
    server.wait_for("worker 1 drained after 1 connections");
    server.wait_for("worker 2 serving");
    assert_ne!(ask(&server.addr).unwrap().0, old);
}

/// Whether `pid` ignores `signal` (its SigIgn mask in /proc).
fn ignores(pid: libc::pid_t, signal: libc::c_int) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .expect("a SigIgn line");
    mask & (1 << (signal - 1)) != 0
}

/// The forwarding itself is shown by the HTTP workers, which reopen their access log
/// on it (cli/tests/serve.rs); here, that a worker that does not watch it survives.
#[test]
fn usr1_is_forwarded_and_kills_no_worker_that_does_not_watch_it() {
    let mut server = start(&["--workers", "2"]);
    let before = live_workers(&server);
    for &worker in &before {
        assert!(
            ignores(worker, libc::SIGUSR1),
            "worker {worker} would die of USR1"
        );
    }
    server.signal(libc::SIGUSR1);
    server.wait_for("USR1: forwarded to the workers");
    for _ in 0..10 {
        ask(&server.addr).unwrap();
    }
    assert_eq!(live_workers(&server), before);
    assert_eq!(server.count("exited unexpectedly"), 0);
}

#[test]
fn a_handed_in_listener_is_served_and_its_socket_file_left_alone() {
    let dir = std::env::temp_dir().join(format!("forkloop-supervisor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("handed-in.sock");
    let path_arg = path.to_str().unwrap();
    let mut server = start(&["--workers", "1", "--handed-in", path_arg]);
    let line = server.wait_for("ready: listening on");
    assert!(line.contains(&format!("unix:{path_arg}")), "{line}");
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.ends_with(" 1\n"), "{answer:?}");
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
    assert!(path.exists(), "the master removed a socket it did not bind");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_process_a_worker_forks_dies_of_term_and_does_not_drain_the_worker() {
    let mut server = start(&["--workers", "1", "--mode", "fork-helper"]);
    let line = server.wait_for("worker 1 forked helper ");
    let helper: libc::pid_t = line.rsplit(' ').next().unwrap().parse().unwrap();
    let (worker, _) = ask(&server.addr).unwrap();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(helper, libc::SIGTERM) };
    eventually("the helper dies of TERM", || !running(helper));
    for _ in 0..5 {
        assert_eq!(
            ask(&server.addr).unwrap().0,
            worker,
            "the same worker serves"
        );
    }
    assert_eq!(server.count("drained after"), 0, "the worker drained");
}

#[test]
fn hups_in_a_row_keep_the_worker_count() {
    let server = start(&["--workers", "2"]);
    let old = live_workers(&server);
    let load = Load::start(&server.addr);
    // The second comes while the first one's replacements start (or merges with it).
    server.signal(libc::SIGHUP);
    server.signal(libc::SIGHUP);
    eventually("two new workers, and only two", || {
        let now = live_workers(&server);
        now.len() == 2 && now.is_disjoint(&old)
    });
    assert!(load.finish() > 0);
}
