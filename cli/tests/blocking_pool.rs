//! examples/blocking_pool.rs: a handler hands blocking work to a thread pool and
//! answers from there through a `RemoteResponder`, so the worker's loop never blocks.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn while_the_pool_sleeps_the_worker_answers_at_once_and_keeps_beating() {
    // One worker, whose heartbeat timeout (500 ms) is shorter than each job (1 s): a
    // worker that blocked on the jobs would be killed.
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--threads",
        "8",
        "--heartbeat-timeout-ms",
        "500",
    ];
    let mut server = start_program(&example("blocking_pool"), &args);
    let worker = get(&server.addr, "/pid").1;
    let started = Instant::now();
    let jobs: Vec<_> = (0..8)
        .map(|_| {
            let addr = server.addr.clone();
            std::thread::spawn(move || get(&addr, "/sleep?ms=1000"))
        })
        .collect();
    server.wait_for_count("a job starts in the pool", 8);
    let asked = Instant::now();
    assert_eq!(get(&server.addr, "/"), (200, "Hello, World!".into()));
    let answered_in = asked.elapsed();
    eprintln!("GET / while 8 jobs sleep in the pool: {answered_in:?}");
    assert!(
        answered_in < Duration::from_millis(50),
        "GET / took {answered_in:?} while the pool slept"
    );
    for job in jobs {
        assert_eq!(
            job.join().unwrap(),
            (200, "slept 1000 ms in the pool".into())
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        get(&server.addr, "/pid").1,
        worker,
        "the same worker serves"
    );
    assert_eq!(server.count("sent no heartbeat"), 0);
}

#[test]
fn a_pool_job_in_flight_is_answered_through_a_drain() {
    let mut server = start_program(
        &example("blocking_pool"),
        &["--listen", "127.0.0.1:0", "--workers", "1"],
    );
    let addr = server.addr.clone();
    let job = std::thread::spawn(move || get(&addr, "/sleep?ms=300"));
    server.wait_for("a job starts in the pool");
    server.signal(libc::SIGTERM);
    assert_eq!(
        job.join().unwrap(),
        (200, "slept 300 ms in the pool".into())
    );
    assert!(server.wait_exit().success());
}
