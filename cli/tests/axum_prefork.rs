//! The axum app of `examples/axum_prefork.rs` under forkloop's supervisor, as real
//! processes under load: a worker killed with SIGKILL is replaced, and HUP and TERM
//! lose no request, on keep-alive connections and with `Connection: close`. Each test
//! prints its figures (`cargo test … -- --nocapture` shows them).

mod common;

use std::collections::HashSet;
use std::time::Instant;

use common::load::{Load, Report, Reuse};
use common::*;

/// Load clients per test.
const CLIENTS: usize = 4;

fn start() -> Server {
    let args = ["--listen", "127.0.0.1:0", "--workers", "2"];
    start_program(&example("axum_prefork"), &args)
}

fn live_workers(server: &Server) -> HashSet<libc::pid_t> {
    children(server.pid)
        .into_iter()
        .filter(|p| running(*p))
        .collect()
}

fn assert_nothing_lost(what: &str, report: &Report) {
    eprintln!(
        "{what}: {} answered, {} retried (closed idle before any answer), {} refused, {} failed",
        report.answered,
        report.retried,
        report.refused,
        report.failed.len()
    );
    assert!(report.answered > 0, "{what}: no request answered");
    assert!(
        report.failed.is_empty(),
        "{what}: {} requests failed, the first: {:?}",
        report.failed.len(),
        &report.failed[..report.failed.len().min(5)]
    );
}

#[test]
fn axum_workers_answer_the_four_routes() {
    let server = start();
    let workers = live_workers(&server);
    assert_eq!(get(&server.addr, "/"), (200, "Hello, World!".into()));
    let (status, pid) = get(&server.addr, "/pid");
    assert_eq!(status, 200);
    assert!(
        workers.contains(&pid.parse().unwrap()),
        "{pid} is no worker"
    );
    let echo = exchange(
        &server.addr,
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(parse(&echo), (200, "hello".into()));
    assert_eq!(
        get(&server.addr, "/sleep?ms=20"),
        (200, "slept 20 ms".into())
    );
    assert_eq!(get(&server.addr, "/sleep?ms=x").0, 400);
}

#[test]
fn an_axum_worker_killed_with_sigkill_is_replaced() {
    let mut server = start();
    let load = Load::start(&server.addr, "/", CLIENTS, Reuse::Close, false);
    load.wait_answered(200);
    let before = live_workers(&server);
    let victim = *before.iter().next().unwrap();
    let killed = Instant::now();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    server.wait_for(&format!("worker {victim} exited unexpectedly"));
    let line = server.wait_for("(slot 3) ready");
    let replaced = killed.elapsed();
    let report = load.finish();
    eprintln!("replacement: {replaced:?} from SIGKILL to the new worker's ready ({line})");
    // The killed worker's connections in flight are lost: that is what SIGKILL does.
    eprintln!(
        "during the kill: {} answered, {} failed",
        report.answered,
        report.failed.len()
    );
    let after = live_workers(&server);
    assert_eq!(after.len(), 2);
    assert!(!after.contains(&victim));
    assert_eq!(get(&server.addr, "/").0, 200);
}

fn hup_under_load(reuse: Reuse) {
    let mut server = start();
    let old = live_workers(&server);
    let load = Load::start(&server.addr, "/", CLIENTS, reuse, false);
    // Answers before the HUP, so that keep-alive connections are open to the old
    // workers when it comes.
    load.wait_answered(200);
    server.signal(libc::SIGHUP);
    server.wait_for_count("retired: exit status: 0", 2);
    let now = live_workers(&server);
    assert!(
        now.len() == 2 && now.is_disjoint(&old),
        "{old:?} -> {now:?}"
    );
    assert_nothing_lost(&format!("HUP, {reuse:?}"), &load.finish());
}

#[test]
fn hup_under_keep_alive_load_loses_no_request() {
    hup_under_load(Reuse::KeepAlive);
}

#[test]
fn hup_under_connection_close_load_loses_no_request() {
    hup_under_load(Reuse::Close);
}

fn term_under_load(reuse: Reuse) {
    let mut server = start();
    // Once the master has the TERM, connections are refused: that is shutting down.
    let load = Load::start(&server.addr, "/", CLIENTS, reuse, true);
    load.wait_answered(200);
    server.signal(libc::SIGTERM);
    let status = server.wait_exit();
    let report = load.finish();
    assert!(status.success(), "{status}");
    assert_nothing_lost(&format!("TERM, {reuse:?}"), &report);
}

#[test]
fn term_under_keep_alive_load_loses_no_request() {
    term_under_load(Reuse::KeepAlive);
}

#[test]
fn term_under_connection_close_load_loses_no_request() {
    term_under_load(Reuse::Close);
}
