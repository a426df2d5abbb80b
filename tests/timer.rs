//! looptests.md, group timer; plus idle and control, which need no process of their own.

mod common;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use forkloop::{Error, Kind, Loop, Timer, Watch};
use rstest::rstest;
use rstest_reuse::apply;

/// Asserts `elapsed` is within [low, 3 × high]: the lower bound is hard (a timer never
/// fires early), the upper is loose because CI machines are shared and noisy.
fn assert_between(elapsed: Duration, low: Duration, high: Duration) {
    assert!(
        elapsed >= low && elapsed <= 3 * high,
        "took {elapsed:?}, expected between {low:?} and {high:?} (x3)"
    );
}

fn time_until_fired(lp: &mut Loop, fired: &Rc<Cell<u32>>) -> Duration {
    let start = Instant::now();
    assert!(
        loop_until(lp, 20 * U, || fired.get() > 0),
        "timer never fired"
    );
    start.elapsed()
}

#[apply(backends)]
fn timer_loop_clock_agrees_with_the_system_clock(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (mono, wall) = (lp.update_now(), SystemTime::now());
    std::thread::sleep(U);
    // The loop's time is read when an iteration's wait ends.
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
    let mono = lp.now() - mono;
    let wall = wall.elapsed().unwrap();
    let diff = mono.abs_diff(wall);
    assert!(diff < U, "monotonic {mono:?} vs wall {wall:?}");
}

#[apply(backends)]
fn timer_after_fires_after_its_delay_never_before(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (fired, f) = counter();
    lp.after(2 * U, move |_, ()| bump(&f));
    let elapsed = time_until_fired(&mut lp, &fired);
    assert_between(elapsed, 2 * U, 5 * U / 2);
}

#[apply(backends)]
fn timer_a_huge_delay_never_fires_and_never_panics(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (fired, f) = counter();
    let once = lp.after(Duration::MAX, {
        let f = f.clone();
        move |_, ()| bump(&f)
    });
    let every = lp.every(Duration::MAX, move |_, ()| bump(&f)).unwrap();
    lp.after(U, |lp, ()| lp.stop(0));
    assert_eq!(lp.run(&mut ()).unwrap(), 0);
    assert_eq!(fired.get(), 0);
    assert!(lp.cancel(once) && lp.cancel(every));
}

#[apply(backends)]
fn timer_at_an_absolute_deadline_fires_then(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (fired, f) = counter();
    let deadline = Instant::now() + 2 * U;
    lp.at(deadline, move |_, ()| bump(&f));
    time_until_fired(&mut lp, &fired);
    assert!(Instant::now() >= deadline);
}

#[apply(backends)]
fn timer_cancelled_right_after_arming_never_fires(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (fired, f) = counter();
    let w = lp.after(U / 2, move |_, ()| bump(&f));
    assert!(lp.cancel(w));
    let (other, o) = counter();
    lp.after(U, move |_, ()| bump(&o));
    assert!(loop_until(&mut lp, 10 * U, || other.get() > 0));
    assert_eq!(fired.get(), 0);
}

#[apply(backends)]
fn timer_overdue_makes_a_blocking_once_return_at_once(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (fired, f) = counter();
    lp.at(Instant::now() - U, move |_, ()| bump(&f));
    let start = Instant::now();
    lp.loop_once(Some(Duration::from_secs(10)), &mut ())
        .unwrap();
    assert!(start.elapsed() < U, "took {:?}", start.elapsed());
    assert_eq!(fired.get(), 1);
}

#[apply(backends)]
fn timer_cancelling_itself_in_its_callback_is_harmless(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let me: Rc<Cell<Option<Timer>>> = Rc::new(Cell::new(None));
    let m = me.clone();
    let (own, o) = counter();
    let w = lp.after(U, move |lp, ()| {
        bump(&o);
        assert!(
            !lp.cancel(m.get().unwrap()),
            "a fired one-shot timer is gone"
        );
    });
    me.set(Some(w));
    let (other, t) = counter();
    lp.after(2 * U, move |_, ()| bump(&t));
    assert!(loop_until(&mut lp, 20 * U, || other.get() > 0));
    assert_eq!((own.get(), other.get()), (1, 1));
}

#[apply(backends)]
fn timer_repeating_can_cancel_itself_from_its_callback(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let me: Rc<Cell<Option<Timer>>> = Rc::new(Cell::new(None));
    let (ticks, t) = counter();
    let m = me.clone();
    let w = lp
        .every(U / 10, move |lp, ()| {
            bump(&t);
            if t.get() == 3 {
                assert!(lp.cancel(m.get().unwrap()));
            }
        })
        .unwrap();
    me.set(Some(w));
    let (done, d) = counter();
    lp.after(8 * U, move |_, ()| bump(&d));
    assert!(loop_until(&mut lp, 30 * U, || done.get() > 0));
    assert_eq!(ticks.get(), 3);
}

#[apply(backends)]
fn timer_armed_before_post_fork_fires_after_it(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (fired, f) = counter();
    lp.after(U, move |_, ()| bump(&f));
    lp.post_fork().unwrap();
    time_until_fired(&mut lp, &fired);
}

#[apply(backends)]
fn timer_equal_deadlines_fire_in_arming_order(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let order = Rc::new(RefCell::new(Vec::new()));
    let deadline = Instant::now() + U;
    for i in 0..5 {
        let o = order.clone();
        lp.at(deadline, move |_, ()| o.borrow_mut().push(i));
    }
    assert!(loop_until(&mut lp, 20 * U, || order.borrow().len() == 5));
    assert_eq!(*order.borrow(), vec![0, 1, 2, 3, 4]);
}

#[apply(backends)]
fn idle_runs_later_never_synchronously(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (ran, r) = counter();
    let _handle: Watch = lp.later(move |_, ()| bump(&r));
    assert_eq!(ran.get(), 0);
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
    assert_eq!(ran.get(), 1);
}

#[apply(backends)]
fn idle_pending_makes_a_long_once_return_at_once(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (ran, r) = counter();
    lp.later(move |_, ()| bump(&r));
    let start = Instant::now();
    lp.loop_once(Some(Duration::from_secs(10)), &mut ())
        .unwrap();
    assert!(start.elapsed() < U, "took {:?}", start.elapsed());
    assert_eq!(ran.get(), 1);
}

#[apply(backends)]
fn idle_queued_by_idle_waits_for_the_next_iteration(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (inner, i) = counter();
    lp.later(move |lp, ()| {
        lp.later(move |_, ()| bump(&i));
    });
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
    assert_eq!(inner.get(), 0);
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
    assert_eq!(inner.get(), 1);
}

#[apply(backends)]
fn idle_cancelled_no_longer_forces_a_zero_wait(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (ran, r) = counter();
    let w = lp.later(move |_, ()| bump(&r));
    assert!(lp.cancel(w));
    let start = Instant::now();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_between(start.elapsed(), U / 2, 3 * U / 2);
    assert_eq!(ran.get(), 0);
}

#[apply(backends)]
fn idle_runs_with_a_timer_far_in_the_future(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    lp.after(Duration::from_secs(3600), |_, ()| {});
    let (ran, r) = counter();
    lp.later(move |_, ()| bump(&r));
    let start = Instant::now();
    lp.loop_once(None, &mut ()).unwrap();
    assert!(start.elapsed() < U);
    assert_eq!(ran.get(), 1);
}

#[apply(backends)]
fn control_once_zero_with_nothing_watched_returns_at_once(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let start = Instant::now();
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
    assert!(start.elapsed() < U);
}

#[apply(backends)]
fn control_once_with_nothing_watched_sleeps_its_timeout(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let start = Instant::now();
    lp.loop_once(Some(2 * U), &mut ()).unwrap();
    assert_between(start.elapsed(), 3 * U / 2, 5 * U / 2);
}

#[apply(backends)]
fn control_stop_makes_run_return_its_value(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    lp.after(U / 10, |lp, ()| lp.stop(42));
    assert_eq!(lp.run(&mut ()).unwrap(), 42);
}

#[apply(backends)]
fn control_nested_run_is_stopped_innermost_first(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let inner = Rc::new(Cell::new(None));
    let i = inner.clone();
    lp.after(U / 10, move |lp, data| {
        lp.after(U / 10, |lp, ()| lp.stop(1));
        i.set(Some(lp.run(data).unwrap()));
        lp.stop(2);
    });
    assert_eq!(lp.run(&mut ()).unwrap(), 2);
    assert_eq!(inner.get(), Some(1));
}

#[apply(backends)]
fn control_loop_reports_running_inside_callbacks(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    assert!(!lp.is_running());
    let seen = Rc::new(Cell::new((false, false)));
    let s = seen.clone();
    lp.later(move |lp, ()| s.set((lp.is_running(), s.get().1)));
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
    let s = seen.clone();
    lp.after(Duration::ZERO, move |lp, ()| {
        s.set((s.get().0, lp.is_running()));
        lp.stop(0);
    });
    lp.run(&mut ()).unwrap();
    assert_eq!(seen.get(), (true, true));
    assert!(!lp.is_running());
}

#[apply(backends)]
fn timer_every_zero_is_an_error_not_a_spin(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let err = lp.every(Duration::ZERO, |_, ()| {}).unwrap_err();
    assert!(matches!(err, Error::ZeroInterval), "{err}");
    assert!(err.to_string().contains("interval"), "{err}");
    // The shortest interval there is fires at most once per millisecond, never at every
    // iteration (the loop would spin).
    let (fired, f) = counter();
    lp.every(Duration::from_nanos(1), move |_, ()| bump(&f))
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < U {
        lp.loop_once(Some(U), &mut ()).unwrap();
    }
    let most = 2 * start.elapsed().as_millis() as u32;
    assert!(
        fired.get() <= most,
        "{} fires in {:?}",
        fired.get(),
        start.elapsed()
    );
}

#[apply(backends)]
fn control_a_stop_outside_run_is_forgotten_when_run_starts(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    lp.later(|lp, ()| lp.stop(3));
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
    lp.after(U, |lp, ()| lp.stop(4));
    assert_eq!(
        lp.run(&mut ()).unwrap(),
        4,
        "run returned a stop from before it began"
    );
}

/// 2,000 one-shot timers spread over 200 ms (one per 100 µs): every backend wakes about once per
/// millisecond (as epoll, whose timeout is in milliseconds, does), never once per
/// deadline, and no timer fires before its deadline.
#[apply(backends)]
fn timer_granularity_bounds_the_wake_ups_and_nothing_fires_early(#[case] kind: Kind) {
    const TIMERS: u32 = 2_000;
    const SPAN: Duration = Duration::from_millis(200);
    let mut lp = new_loop(kind);
    let fired = Rc::new(Cell::new(0u32));
    let early = Rc::new(Cell::new(0u32));
    let start = Instant::now();
    for i in 0..TIMERS {
        let deadline = start + SPAN * i / TIMERS;
        let (f, e) = (fired.clone(), early.clone());
        lp.at(deadline, move |lp, ()| {
            f.set(f.get() + 1);
            if lp.now() < deadline {
                e.set(e.get() + 1);
            }
        });
    }
    let mut iterations = 0u32;
    while fired.get() < TIMERS {
        assert!(start.elapsed() < 50 * U, "only {} fired", fired.get());
        lp.loop_once(None, &mut ()).unwrap();
        iterations += 1;
    }
    assert_eq!(early.get(), 0, "timers fired before their deadline");
    // About one wake-up per millisecond the run took (at least the span; longer on a
    // loaded machine), plus one that does not wait when firing a batch took long
    // enough for the next to fall due: at most 3 per millisecond. Waking per deadline
    // instead is up to 10 per millisecond (select before the rounding).
    let bound = 3 * start.elapsed().as_millis() as u32 + 20;
    assert!(
        iterations <= bound,
        "{iterations} iterations for {TIMERS} timers over {SPAN:?} (bound {bound})"
    );
    println!("figure: {kind}: {iterations} iterations for {TIMERS} timers over {SPAN:?}");
}

#[apply(backends)]
fn control_run_while_watched_ends_when_the_last_timer_has_fired(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    assert_eq!(
        lp.run_while_watched(&mut ()).unwrap(),
        None,
        "nothing watched: at once"
    );
    let (fired, f) = counter();
    let g = f.clone();
    lp.after(U / 2, move |_, ()| bump(&f));
    lp.after(U, move |_, ()| bump(&g));
    let start = Instant::now();
    assert_eq!(lp.run_while_watched(&mut ()).unwrap(), None);
    assert_eq!(fired.get(), 2);
    assert!(start.elapsed() >= U, "returned before the last timer");
    lp.after(U, |lp, ()| lp.stop(7));
    lp.every(U / 10, |_, ()| {}).unwrap();
    assert_eq!(
        lp.run_while_watched(&mut ()).unwrap(),
        Some(7),
        "a stop ends it first"
    );
}

#[apply(backends)]
fn control_run_while_watched_counts_signal_and_child_watches_not_the_loops_own(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let w = lp.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap();
        lp.after(U, move |lp, ()| {
            lp.cancel(w);
        });
        // The signal self-pipe's IO watch stays until the cancel; it is the loop's own.
        assert_eq!(lp.run_while_watched(&mut ()).unwrap(), None);
        let pid = lp.fork(forkloop::ForkOptions::new(), || 3).unwrap();
        let status = Rc::new(Cell::new(None));
        let s = status.clone();
        lp.watch_process(pid, move |_, (), _, st| {
            s.set(st.ok().and_then(|st| st.code()))
        })
        .unwrap();
        assert_eq!(lp.run_while_watched(&mut ()).unwrap(), None);
        assert_eq!(
            status.get(),
            Some(3),
            "returned before the child was reported"
        );
    });
}
