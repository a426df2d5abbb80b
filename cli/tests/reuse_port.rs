//! `--reuse-port` in real processes: one SO_REUSEPORT socket (lane) per worker, held by
//! the master and by that worker alone, kept so across HUP, TTOU/TTIN and a crash, with
//! no failed request under load. (The upgrade across lanes is in upgrade.rs.)
#![cfg(target_os = "linux")]

mod common;

use std::collections::HashMap;
use std::time::Instant;

use common::load::{Load, Reuse};
use common::*;

/// Which worker answered each of `count` connections.
fn answered_by(addr: &str, count: usize) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for _ in 0..count {
        let (status, pid) = get(addr, "/pid");
        assert_eq!(status, 200);
        *by.entry(pid).or_default() += 1;
    }
    by
}

#[test]
fn every_worker_serves_a_lane_of_its_own_and_the_kernel_spreads_connections_over_them() {
    let server = start(&["--workers", "4", "--reuse-port"]);
    wait_lanes(server.pid, &server.addr, 4);
    let by = answered_by(&server.addr, 200);
    assert_eq!(by.len(), 4, "every lane's worker answers: {by:?}");
}

#[test]
fn without_reuse_port_every_worker_shares_one_socket() {
    let server = start(&["--workers", "3"]);
    let sockets = listening_sockets(port_of(&server.addr));
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    eventually("every worker serving the one socket", || {
        let workers = children(server.pid);
        workers.len() == 3 && (workers.iter()).all(|&w| socket_inodes(w).contains(&sockets[0]))
    });
}

#[test]
fn hup_ttou_ttin_and_a_crash_keep_a_worker_on_every_lane_with_no_failed_request() {
    let mut server = start(&["--workers", "3", "--reuse-port"]);
    wait_lanes(server.pid, &server.addr, 3);
    // One connection per request: every lane gets some of them all along.
    let load = Load::start(&server.addr, "/", 4, Reuse::Close, false);
    load.wait_answered(100);

    server.signal(libc::SIGHUP);
    server.wait_for("HUP: every worker is replaced");
    wait_lanes(server.pid, &server.addr, 3);
    load.wait_answered(load.answered() + 100);

    server.signal(libc::SIGTTOU);
    server.wait_for("lanes: 2");
    wait_lanes(server.pid, &server.addr, 2);
    load.wait_answered(load.answered() + 100);

    server.signal(libc::SIGTTIN);
    wait_lanes(server.pid, &server.addr, 3);
    load.wait_answered(load.answered() + 100);
    let report = load.finish();
    assert!(
        report.failed.is_empty(),
        "{} of {} failed: {:?}",
        report.failed.len(),
        report.answered,
        &report.failed[..report.failed.len().min(5)]
    );

    // A crashed worker's lane is kept for its replacement, whose queue it is.
    let workers = children(server.pid);
    // SAFETY: kill has no memory-safety preconditions; the pid is a worker of this
    // test's server, not yet reaped (the master reaps it).
    unsafe { libc::kill(workers[0], libc::SIGKILL) };
    eventually("the crashed worker replaced", || {
        let now = children(server.pid);
        now.len() == 3 && !now.contains(&workers[0])
    });
    wait_lanes(server.pid, &server.addr, 3);
    assert_eq!(answered_by(&server.addr, 150).len(), 3);
}

#[test]
fn a_lane_without_a_worker_is_taken_in_before_it_closes() {
    // WINCH retires every worker and keeps the lanes: connections queue on them. A
    // TTIN then asks for one worker: two lanes close, and what they queued is still
    // answered (a worker is forked to take it in), not reset.
    let mut server = start(&["--workers", "3", "--reuse-port"]);
    wait_lanes(server.pid, &server.addr, 3);
    server.signal(libc::SIGWINCH);
    eventually("every worker retired", || children(server.pid).is_empty());
    let addr = server.addr.clone();
    let waiting: Vec<_> = (0..30)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                exchange(
                    &addr,
                    b"GET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                )
            })
        })
        .collect();
    eventually("the clients queued on every lane", || {
        // Each connects before it waits for its answer: counted by the kernel as
        // queued connections, which /proc/net/tcp shows as the listeners' rx_queue.
        listening_sockets(port_of(&addr)).len() == 3 && queued(port_of(&addr)) == 30
    });
    server.signal(libc::SIGTTIN);
    for client in waiting {
        let reply = client.join().expect("a client panicked");
        if !reply.starts_with("HTTP/1.1 200") {
            std::thread::sleep(std::time::Duration::from_millis(200));
            panic!("{reply:?}; log:\n{}", server.drain_log().join("\n"));
        }
    }
    wait_lanes(server.pid, &server.addr, 1);
}

/// Connections queued on the listeners of `port`, unaccepted (the `rx_queue` field of
/// a listening socket in `/proc/net/tcp`).
fn queued(port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let listening = fields.get(3) == Some(&"0A");
            let ours = u16::from_str_radix(local_port, 16).ok() == Some(port);
            let rx = fields.get(4)?.split_once(':')?.1;
            (listening && ours).then(|| u64::from_str_radix(rx, 16).ok())?
        })
        .sum()
}

#[test]
fn a_lane_whose_workers_both_die_during_a_reload_gets_a_worker_at_once() {
    // HUP forks a replacement per lane (slow to start here) beside each old worker;
    // both workers of one lane die. The other lane's pair still makes the count, but
    // a lane without a worker would keep its connections queued for no one.
    let server = start(&[
        "--workers",
        "2",
        "--reuse-port",
        "--app",
        "slow-after-the-first",
    ]);
    wait_lanes(server.pid, &server.addr, 2);
    server.signal(libc::SIGHUP);
    // Two workers (settled: each holding one lane socket, as a child does once it
    // closed the lanes it copied at its fork) on one lane.
    let pair = || {
        let lanes = listening_sockets(port_of(&server.addr));
        let mut holders: HashMap<u64, Vec<libc::pid_t>> = HashMap::new();
        for worker in children(server.pid) {
            let held: Vec<u64> = (socket_inodes(worker).into_iter())
                .filter(|socket| lanes.contains(socket))
                .collect();
            // Draining workers and zombies hold none; a child in its fork, all.
            if let [lane] = held[..] {
                holders.entry(lane).or_default().push(worker);
            }
        }
        holders.into_values().find(|pids| pids.len() == 2)
    };
    let deadline = Instant::now() + LIMIT;
    let pair = loop {
        if let Some(pair) = pair() {
            break pair;
        }
        assert!(
            Instant::now() < deadline,
            "no lane with its old worker and its replacement"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    for pid in pair {
        // SAFETY: kill has no memory-safety preconditions; both are workers of this
        // test's server, not yet reaped (the master reaps them).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    wait_lanes(server.pid, &server.addr, 2);
}

#[test]
fn a_second_server_with_reuse_port_on_the_same_address_is_refused_not_merged() {
    let first = start(&["--workers", "1", "--reuse-port"]);
    let mut second = spawn(&["--listen", &first.addr, "--workers", "1", "--reuse-port"]);
    second.wait_for("is in use by another listener");
    assert!(!second.wait_exit().success());
    assert_eq!(listening_sockets(port_of(&first.addr)).len(), 1);
}
