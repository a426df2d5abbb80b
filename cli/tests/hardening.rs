//! Hardening (issue 5), the server's part: slowloris, the fd limit at accept, churn
//! with worker kills, kill -9 at each point of the lifecycle, and memory over many
//! keep-alive requests — each against a real `forkloop serve`, each printing the
//! figure it measured (`--show-output`). `FORKLOOP_HARDENING_FULL=1` runs full sizes.
#![cfg(target_os = "linux")]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

/// A GET that tolerates the connection failing (a worker killed under it): the status.
fn try_get(addr: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(LIMIT)).ok()?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    stream.read_to_end(&mut out).ok()?;
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `stream` is still open with nothing to read (it peeks, consuming nothing).
fn still_waiting(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let waiting =
        matches!(stream.peek(&mut [0u8; 64]), Err(e) if e.kind() == ErrorKind::WouldBlock);
    stream.set_nonblocking(false).unwrap();
    waiting
}

#[test]
fn slowloris_connections_starve_no_one_and_close_at_the_header_timeout() {
    let count = 500;
    let header_timeout = Duration::from_secs(2);
    let server = start(&["--workers", "2", "--header-timeout", "2"]);
    let slow: Vec<TcpStream> = (0..count)
        .map(|_| TcpStream::connect(&server.addr).expect("connect"))
        .collect();
    let opened = Instant::now();
    let request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    let (mut served, mut worst) = (0, Duration::ZERO);
    // One byte per second on every slow connection; ordinary requests in between.
    for second in 0..4 {
        for stream in &slow {
            let _ = (&*stream).write(&request[second..=second]);
        }
        if second == 1 {
            let open = slow.iter().filter(|s| still_waiting(s)).count();
            assert_eq!(
                open, count,
                "slow connections closed before the header timeout"
            );
        }
        let until = opened + Duration::from_secs(second as u64 + 1);
        while Instant::now() < until {
            let asked = Instant::now();
            assert_eq!(get(&server.addr, "/").0, 200);
            worst = worst.max(asked.elapsed());
            served += 1;
        }
    }
    // By now (4 s) every slow connection has had its 408 and been closed.
    let mut answered = 0;
    for mut stream in slow {
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        answered += usize::from(out.starts_with("HTTP/1.1 408 "));
    }
    assert_eq!(
        answered, count,
        "slow connections not answered 408 and closed"
    );
    println!(
        "figure: {count} slowloris connections: {served} ordinary requests served meanwhile \
         (slowest {worst:?}); all {count} got 408 and were closed at the {header_timeout:?} header timeout"
    );
}

/// Sets process `pid`'s soft fd limit.
fn set_fd_limit(pid: libc::pid_t, soft: u64) {
    // SAFETY: rlimit is plain old data; prlimit reads `new` and fills `old`.
    unsafe {
        let mut old: libc::rlimit = std::mem::zeroed();
        assert_eq!(
            libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old),
            0
        );
        let new = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: old.rlim_max,
        };
        assert_eq!(
            libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()),
            0
        );
    }
}

#[test]
fn at_the_fd_limit_a_worker_waits_without_spinning_and_recovers() {
    let mut server = start(&["--workers", "1", "--keepalive-timeout", "60"]);
    let worker = children(server.pid)[0];
    let mut idle: Vec<KeepAlive> = (0..3).map(|_| KeepAlive::connect(&server.addr)).collect();
    for conn in &mut idle {
        conn.send("/", 1);
        assert_eq!(conn.response().0, 200);
    }
    // No fd left for the worker: its limit is set at its lowest free fd number, so
    // new connections wait in the listen queue.
    let fds = open_fds(worker);
    let lowest_free = (0..).find(|fd| !fds.contains(fd)).unwrap();
    set_fd_limit(worker, lowest_free as u64);
    let waiting: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(&server.addr).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    server.wait_for("pausing accepts");
    let before = cpu_time(worker);
    std::thread::sleep(Duration::from_secs(1)); // the window the CPU use is measured over
    let spent = cpu_time(worker) - before;
    let queued = waiting.iter().filter(|s| still_waiting(s)).count();
    assert_eq!(queued, waiting.len(), "connections answered without an fd?");
    assert!(
        spent < Duration::from_millis(200),
        "the worker spun: {spent:?} of CPU in 1 s"
    );
    // Closing the idle connections frees fds; the queued requests are then served.
    drop(idle);
    for mut stream in waiting {
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        assert_eq!(parse(&out).0, 200);
    }
    println!(
        "figure: at the fd limit with {queued} connections queued, the worker used {spent:?} \
         of CPU in 1 s, then served them all once fds were free"
    );
}

/// The running children of the master (its workers), oldest first.
fn workers(master: libc::pid_t) -> Vec<libc::pid_t> {
    let mut pids: Vec<_> = children(master)
        .into_iter()
        .filter(|&p| running(p))
        .collect();
    pids.sort_by_key(|&p| {
        std::fs::metadata(format!("/proc/{p}"))
            .and_then(|m| m.modified())
            .ok()
    });
    pids
}

#[test]
fn churn_of_connections_and_worker_kills_leaves_the_master_as_it_started() {
    let (connections, kills) = size((5_000, 20), (50_000, 100));
    let server = start(&["--workers", "4"]);
    let master = server.pid;
    // Let the master settle (allocations of its first iterations) before the baseline.
    assert_eq!(get(&server.addr, "/").0, 200);
    let (fds_before, rss_before) = (fd_count(master), rss_kib(master));
    let mut failed = 0;
    let mut killed = 0;
    let mut last_kill = Instant::now();
    for i in 0..connections {
        failed += usize::from(try_get(&server.addr) != Some(200));
        // Kill the oldest worker at even steps; it has lived past the crash window by
        // then, so each kill is replaced at once (a crash streak would back off).
        let due = (i + 1) * kills / connections > killed;
        if due {
            let wait = Duration::from_millis(1050 / 4).saturating_sub(last_kill.elapsed());
            std::thread::sleep(wait); // pacing the kills, not synchronization
            let oldest = workers(master)[0];
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(oldest, libc::SIGKILL) };
            killed += 1;
            last_kill = Instant::now();
        }
    }
    eventually("four workers again, and no zombie", || {
        let all = children(master);
        all.len() == 4 && all.iter().all(|&p| running(p))
    });
    eventually("the master's fds back to their start", || {
        fd_count(master) == fds_before
    });
    let rss_after = rss_kib(master);
    println!(
        "figure: {connections} connections and {killed} worker kills ({failed} requests failed \
         with a killed worker): master fds {fds_before} -> {}, RSS {rss_before} KiB -> \
         {rss_after} KiB, no zombie",
        fd_count(master)
    );
    assert!(
        rss_after <= rss_before + 512,
        "the master grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(
        failed <= killed * 2,
        "{failed} failed requests for {killed} kills"
    );
}

/// Brings a server (with a pid file) to a point of its lifecycle with `stage`, SIGKILLs
/// the master there, then checks that every process of the server's group is gone
/// (workers die with their master) and that a new server takes the same address and
/// pid file at once.
fn kill_9_of_the_master_leaves_nothing(name: &str, stage: impl FnOnce(&mut Server)) {
    let path = std::env::temp_dir().join(format!("forkloop-{name}-{}.pid", std::process::id()));
    let pid_file = path.to_str().unwrap();
    let mut server = start(&["--workers", "2", "--pid-file", pid_file]);
    stage(&mut server);
    server.signal(libc::SIGKILL);
    let (group, addr) = (server.pid, server.addr.clone());
    server.wait_exit();
    eventually("no process of the server left", || {
        group_members(group).is_empty()
    });
    let mut again = start(&["--listen", &addr, "--pid-file", pid_file]);
    assert_eq!(get(&again.addr, "/").0, 200);
    again.signal(libc::SIGTERM);
    assert!(again.wait_exit().success());
}

#[test]
fn kill_9_of_a_worker_mid_request_loses_that_request_only() {
    let mut server = start(&["--workers", "1"]);
    let mut conn = KeepAlive::connect(&server.addr);
    conn.send("/pid", 1);
    let worker: libc::pid_t = conn.response().1.parse().unwrap();
    conn.send("/sleep?ms=5000", 1);
    std::thread::sleep(Duration::from_millis(100)); // let the request reach the worker
                                                    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    conn.read_to_close();
    server.wait_for("exited unexpectedly");
    eventually("the killed worker reaped, a new one running", || {
        let all = children(server.pid);
        !all.contains(&worker) && all.len() == 1 && all.iter().all(|&p| running(p))
    });
    assert_eq!(get(&server.addr, "/").0, 200);
    println!("figure: kill -9 of a worker mid-request: the request's connection closed, the worker reaped and replaced, the server serves");
}

#[test]
fn kill_9_of_the_master_mid_hup_orphans_nothing() {
    kill_9_of_the_master_leaves_nothing("mid-hup", |server| {
        server.signal(libc::SIGHUP);
        server.wait_for("HUP: replacing");
    });
    println!("figure: kill -9 of the master mid-HUP: old and new workers gone, no zombie; the port and pid file were taken again at once");
}

#[test]
fn kill_9_of_the_master_mid_drain_orphans_nothing() {
    kill_9_of_the_master_leaves_nothing("mid-drain", |server| {
        let mut conn = KeepAlive::connect(&server.addr);
        conn.send("/sleep?ms=5000", 1);
        std::thread::sleep(Duration::from_millis(100)); // let the request reach a worker
        server.signal(libc::SIGTERM);
        server.wait_for("graceful shutdown");
    });
    println!("figure: kill -9 of the master mid-drain: draining workers gone, no zombie; the port and pid file were taken again at once");
}

#[test]
fn a_million_keep_alive_requests_do_not_grow_a_worker() {
    let total: usize = size(200_000, 1_000_000);
    let server = start(&["--workers", "1"]);
    let worker = children(server.pid)[0];
    let (depth, connections) = (32, 10);
    let per_connection = total / connections;
    let mut rss_warm = 0;
    for c in 0..connections {
        let mut conn = KeepAlive::connect(&server.addr);
        for _ in 0..per_connection / depth {
            conn.send("/", depth);
            for _ in 0..depth {
                assert_eq!(conn.response().0, 200);
            }
        }
        if c == 0 {
            rss_warm = rss_kib(worker); // after the first connection's requests
        }
    }
    let rss_end = rss_kib(worker);
    println!(
        "figure: {total} keep-alive requests on one worker ({connections} connections, \
         pipelined {depth} deep): RSS {rss_warm} KiB after the first {per_connection}, \
         {rss_end} KiB at the end"
    );
    assert!(
        rss_end < rss_warm + 1024,
        "the worker grew by {} KiB",
        rss_end - rss_warm
    );
}

#[test]
fn a_chunk_size_past_the_body_limit_is_refused_before_the_worker_grows() {
    let flood: usize = size(20 << 20, 200 << 20);
    let server = start(&["--workers", "1", "--max-body-size", "1024"]);
    let worker = children(server.pid)[0];
    assert_eq!(try_get(&server.addr), Some(200));
    let rss_before = rss_kib(worker);
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    stream.set_read_timeout(Some(LIMIT)).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let replies = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = reader.read_to_end(&mut out);
        out
    });
    // Once the wrapping bug: 1 + 0xffffffffffffffff passed a 1024-byte limit.
    let attack = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
                   1\r\na\r\nffffffffffffffff\r\n";
    let flooder = std::thread::spawn(move || {
        let _ = stream.write_all(attack);
        let block = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < flood && stream.write_all(&block).is_ok() {
            sent += block.len();
        }
        sent
    });
    let deadline = Instant::now() + LIMIT;
    let mut rss_peak = rss_before;
    while !flooder.is_finished() {
        assert!(Instant::now() < deadline, "the flood did not end");
        rss_peak = rss_peak.max(rss_kib(worker));
        std::thread::sleep(Duration::from_millis(1));
    }
    let sent = flooder.join().unwrap();
    let reply = String::from_utf8_lossy(&replies.join().unwrap()).into_owned();
    println!(
        "figure: chunk size 0xffffffffffffffff after a 1-byte chunk, then {} MiB sent: \
         worker RSS {rss_before} KiB before, {rss_peak} KiB at most",
        sent >> 20
    );
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply:?}");
    assert!(
        rss_peak < rss_before + 2048,
        "the worker grew by {} KiB",
        rss_peak - rss_before
    );
}

#[test]
fn a_partial_request_waiting_for_more_costs_no_cpu() {
    let server = start(&["--workers", "1", "--header-timeout", "5"]);
    let worker = children(server.pid)[0];
    let mut partial_head = TcpStream::connect(&server.addr).unwrap();
    partial_head.write_all(b"GET / HT").unwrap();
    let mut behind_a_long_poll = TcpStream::connect(&server.addr).unwrap();
    behind_a_long_poll
        .write_all(b"GET /sleep?ms=3000 HTTP/1.1\r\nHost: t\r\n\r\nG")
        .unwrap();
    assert_eq!(try_get(&server.addr), Some(200)); // both are read by now
    let before = cpu_time(worker);
    // Not a synchronization: the span over which a spinning worker would burn CPU.
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time(worker) - before;
    println!("figure: a worker holding a partial head and a partial pipelined request used {used:?} of CPU in 1 s");
    assert!(
        used < Duration::from_millis(200),
        "the worker spun: {used:?} in 1 s"
    );
}

#[test]
fn a_client_that_pipelines_and_never_reads_is_bounded_and_cut_off() {
    let server = start(&["--workers", "1", "--body-timeout", "1"]);
    let worker = children(server.pid)[0];
    assert_eq!(try_get(&server.addr), Some(200));
    let (fds_before, rss_before) = (fd_count(worker), rss_kib(worker));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let requests = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n".repeat(1000);
    let mut sent = 0;
    let started = Instant::now();
    // Writes until the server stops taking requests (a write times out) or cuts us off.
    while started.elapsed() < LIMIT && stream.write_all(&requests).is_ok() {
        sent += 1000;
    }
    let rss_peak = rss_kib(worker);
    eventually("the worker closes the connection", || {
        fd_count(worker) <= fds_before
    });
    println!(
        "figure: a client that never reads pipelined {sent} requests before the worker \
         stopped taking them; worker RSS {rss_before} → {rss_peak} KiB; closed after {:?}",
        started.elapsed()
    );
    assert!(
        rss_peak < rss_before + 2048,
        "the worker grew by {} KiB",
        rss_peak - rss_before
    );
}

#[test]
fn answers_queued_behind_a_slow_one_count_against_the_unsent_bound() {
    let server = start(&["--workers", "1"]);
    let worker = children(server.pid)[0];
    assert_eq!(try_get(&server.addr), Some(200));
    let rss_before = rss_kib(worker);
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let body = vec![b'x'; 1 << 20];
    let echo = [
        &b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n"[..],
        &body,
    ]
    .concat();
    let _ = stream.write_all(b"GET /sleep?ms=3000 HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut sent = 0;
    while sent < 31 && stream.write_all(&echo).is_ok() {
        sent += 1;
    }
    let rss_peak = rss_kib(worker);
    println!(
        "figure: 1 slow request then {sent} 1 MiB echoes that are never read: worker RSS \
         {rss_before} → {rss_peak} KiB"
    );
    assert!(
        rss_peak < rss_before + 8 * 1024,
        "the worker grew by {} KiB",
        rss_peak - rss_before
    );
}
