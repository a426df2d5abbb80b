//! Wakers (issue #11): other threads wake a loop and hand its callback values, and a
//! waker keeps working in a child after `post_fork` without stealing the parent's
//! wake-ups. Fork tests run each in a process of its own (`isolated`).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use forkloop::{ForkOptions, Kind, Loop, SendError, Waker};
use rstest::rstest;
use rstest_reuse::apply;

/// Values received, in order.
type Got = Vec<u32>;

fn loop_with_waker(kind: Kind) -> (Loop<Got>, Waker<u32>, forkloop::Watch) {
    let mut lp: Loop<Got> = Loop::with_backend(kind).unwrap();
    let (waker, watch) = lp.waker(|_, got: &mut Got, value| got.push(value)).unwrap();
    (lp, waker, watch)
}

/// Iterates until `got` holds `n` values, for at most `limit`.
fn receive(lp: &mut Loop<Got>, got: &mut Got, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{} of {n} values within {limit:?}",
            got.len()
        );
        lp.loop_once(Some(left), got).unwrap();
    }
}

#[test]
fn waker_is_send_sync_and_clone() {
    fn check<W: Send + Sync + Clone>() {}
    check::<Waker<u32>>();
    check::<Waker<()>>();
}

#[apply(backends)]
fn waker_another_thread_wakes_a_blocked_loop_with_values_in_order(#[case] kind: Kind) {
    let (mut lp, waker, _watch) = loop_with_waker(kind);
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20)); // the loop is blocked by now
        for value in 0..100 {
            waker.send(value).unwrap();
        }
    });
    let mut got = Vec::new();
    // No timeout: only the waker can end this wait.
    while got.len() < 100 {
        lp.loop_once(None, &mut got).unwrap();
    }
    sender.join().unwrap();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
}

#[apply(backends)]
fn waker_many_threads_lose_and_repeat_nothing(#[case] kind: Kind) {
    let (mut lp, waker, _watch) = loop_with_waker(kind);
    let senders: Vec<_> = (0..4)
        .map(|t| {
            let waker = waker.clone();
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    waker.send(t * 10_000 + i).unwrap();
                }
            })
        })
        .collect();
    let mut got = Vec::new();
    receive(&mut lp, &mut got, 8_000, 100 * U);
    for sender in senders {
        sender.join().unwrap();
    }
    lp.loop_once(Some(Duration::ZERO), &mut got).unwrap();
    assert_eq!(got.len(), 8_000, "nothing repeated");
    got.sort_unstable();
    let expected: Vec<u32> = (0..4)
        .flat_map(|t| (0..2_000).map(move |i| t * 10_000 + i))
        .collect();
    assert_eq!(got, expected, "nothing lost");
}

#[apply(backends)]
fn waker_cancelled_or_dropped_gives_the_value_back(#[case] kind: Kind) {
    let (mut lp, waker, watch) = loop_with_waker(kind);
    waker.send(1).unwrap();
    assert!(lp.cancel(watch));
    assert_eq!(waker.send(2), Err(SendError::Closed(2)));
    let (lp, waker, _watch) = loop_with_waker(kind);
    drop(lp);
    let err = waker.send(3).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the loop let this waker go (cancelled, or dropped)"
    );
    assert_eq!(err.into_inner(), 3);
}

#[apply(backends)]
fn waker_keeps_run_while_watched_going_until_cancelled(#[case] kind: Kind) {
    let mut lp: Loop<Option<forkloop::Watch>> = Loop::with_backend(kind).unwrap();
    let (waker, watch) = lp
        .waker(|lp, watch: &mut Option<forkloop::Watch>, ()| {
            lp.cancel(watch.take().unwrap());
        })
        .unwrap();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        waker.wake().unwrap();
    });
    assert_eq!(lp.run_while_watched(&mut Some(watch)).unwrap(), None);
    sender.join().unwrap();
}

/// A raw fork: in the child the waker refuses values until the loop is rebuilt, then
/// works on a pipe of its own; the parent's values and wake-ups stay the parent's.
#[apply(backends)]
fn waker_works_in_a_child_after_post_fork_and_leaves_the_parent_its_wakeups(#[case] kind: Kind) {
    isolated(|| {
        let (mut lp, waker, _watch) = loop_with_waker(kind);
        waker.send(1).unwrap(); // queued before the fork: the parent's
        let pid = raw_fork(|| {
            let mut got = Vec::new();
            if waker.send(2) != Err(SendError::Inherited(2)) {
                return 10;
            }
            lp.post_fork().unwrap();
            let sender = {
                let waker = waker.clone();
                std::thread::spawn(move || waker.send(3).unwrap())
            };
            receive(&mut lp, &mut got, 1, 50 * U);
            sender.join().unwrap();
            // Whatever the parent sends meanwhile never reaches this loop.
            lp.loop_once(Some(Duration::from_millis(50)), &mut got)
                .unwrap();
            if got != [3] {
                eprintln!("child got {got:?}");
                return 11;
            }
            0
        });
        // The parent keeps sending while the child runs: every value is the parent's.
        let mut got = Vec::new();
        for value in 100..110 {
            waker.send(value).unwrap();
            receive(&mut lp, &mut got, (value - 98) as usize, 50 * U);
        }
        assert_eq!(exit_code(wait_child(pid, 50 * U)), 0, "the child's checks");
        assert_eq!(got, [1, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109]);
    });
}

/// In a `Loop::fork` child the loop is never rebuilt: its wakers belong to nobody.
#[apply(backends)]
fn waker_of_a_loop_fork_parent_belongs_to_nobody_in_the_child(#[case] kind: Kind) {
    isolated(|| {
        let (mut lp, waker, _watch) = loop_with_waker(kind);
        let pid = lp
            .fork(ForkOptions::new(), || match waker.send(5) {
                Err(SendError::Inherited(5)) => 0,
                other => {
                    eprintln!("send in the child: {other:?}");
                    1
                }
            })
            .unwrap();
        assert_eq!(exit_code(wait_child(pid, 50 * U)), 0);
        let mut got = Vec::new();
        lp.loop_once(Some(Duration::ZERO), &mut got).unwrap();
        assert!(
            got.is_empty(),
            "the child's value never reached the parent: {got:?}"
        );
    });
}

/// Threads send without pause while the main thread forks again and again: no child
/// inherits a queue locked or half-changed (the atfork handler holds the wakers' gate),
/// so every child can use its waker after post_fork.
#[apply(backends)]
fn waker_forks_beside_busy_senders_never_deadlock_a_child(#[case] kind: Kind) {
    isolated(|| {
        let (mut lp, waker, _watch) = loop_with_waker(kind);
        let stop = Arc::new(AtomicBool::new(false));
        let senders: Vec<_> = (0..2)
            .map(|_| {
                let (waker, stop) = (waker.clone(), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = waker.send(0);
                    }
                })
            })
            .collect();
        let mut parent_got = Vec::new();
        for _ in 0..50 {
            let pid = raw_fork(|| {
                lp.post_fork().unwrap();
                waker.send(7).unwrap();
                let mut got = Vec::new();
                receive(&mut lp, &mut got, 1, 50 * U);
                i32::from(got != [7])
            });
            assert_eq!(exit_code(wait_child(pid, 50 * U)), 0);
            lp.loop_once(Some(Duration::ZERO), &mut parent_got).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for sender in senders {
            sender.join().unwrap();
        }
        assert!(
            parent_got.iter().all(|&v| v == 0),
            "only the parent's senders reached it"
        );
    });
}
