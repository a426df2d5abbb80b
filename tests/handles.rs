//! The loop API of issue #11 on every backend: the user's state in callbacks, owned
//! sources handed back, handles that act in place (interest, pause, resume, timer
//! restart), the cached time, branding, and errors a caller can match on.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use forkloop::{Backend, Error, Interest, Io, Kind, Loop, Readiness, Timer};
use rstest::rstest;
use rstest_reuse::apply;

/// Counts the backend calls a change costs: `register`, `modify`, `deregister`; and
/// refuses registrations, or every change, (ENOMEM) while told to.
#[derive(Clone, Default)]
struct Calls {
    made: Arc<AtomicUsize>,
    refuse_adds: Arc<AtomicBool>,
    refuse_all: Arc<AtomicBool>,
}

impl Calls {
    fn take(&self) -> usize {
        self.made.swap(0, Ordering::SeqCst)
    }

    fn refuse_adds(&self, refuse: bool) {
        self.refuse_adds.store(refuse, Ordering::SeqCst);
    }

    fn refuse_all(&self, refuse: bool) {
        self.refuse_all.store(refuse, Ordering::SeqCst);
    }

    fn refusal(&self, add: bool) -> std::io::Result<()> {
        let refused = self.refuse_all.load(Ordering::SeqCst)
            || (add && self.refuse_adds.load(Ordering::SeqCst));
        match refused {
            true => Err(std::io::Error::from_raw_os_error(libc::ENOMEM)),
            false => Ok(()),
        }
    }
}

struct Counting {
    inner: Box<dyn Backend>,
    calls: Calls,
}

impl Counting {
    fn count(&self) {
        self.calls.made.fetch_add(1, Ordering::SeqCst);
    }
}

impl Backend for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn register(&mut self, fd: i32, interest: Interest) -> std::io::Result<()> {
        self.count();
        self.calls.refusal(true)?;
        self.inner.register(fd, interest)
    }
    fn modify(&mut self, fd: i32, interest: Interest) -> std::io::Result<()> {
        self.count();
        self.calls.refusal(false)?;
        self.inner.modify(fd, interest)
    }
    fn deregister(&mut self, fd: i32) -> std::io::Result<()> {
        self.count();
        self.calls.refusal(false)?;
        self.inner.deregister(fd)
    }
    fn wait(
        &mut self,
        events: &mut Vec<forkloop::Event>,
        timeout: Option<Duration>,
    ) -> std::io::Result<()> {
        self.inner.wait(events, timeout)
    }
    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (i32, Interest)>,
    ) -> std::io::Result<()> {
        self.inner.post_fork(registrations)
    }
    fn kernel_fd(&self) -> Option<i32> {
        self.inner.kernel_fd()
    }
}

fn counting_loop<D>(kind: Kind) -> (Loop<D>, Calls) {
    let calls = Calls::default();
    let inner = kind.create().unwrap_or_else(|e| panic!("{kind}: {e}"));
    let backend = Box::new(Counting {
        inner,
        calls: calls.clone(),
    });
    (Loop::from_backend(backend).unwrap(), calls)
}

/// What the watches of a test saw.
#[derive(Default)]
struct Seen {
    reads: u32,
    writes: u32,
}

#[apply(backends)]
fn api_callbacks_change_the_data_lent_to_run_with_no_shared_cells(#[case] kind: Kind) {
    let mut lp: Loop<Vec<&'static str>> = Loop::with_backend(kind).unwrap();
    let (a, mut b) = socketpair();
    lp.watch_io(a, Interest::READ, |lp, log, a, _| {
        drain(a);
        log.push("read");
        lp.later(|lp, log| {
            log.push("idle");
            lp.stop(0);
        });
    })
    .unwrap();
    b.write_all(b"x").unwrap();
    let mut log = Vec::new();
    lp.run(&mut log).unwrap();
    assert_eq!(log, ["read", "idle"]);
}

#[apply(backends)]
fn api_a_nested_run_gets_the_same_data(#[case] kind: Kind) {
    let mut lp: Loop<u32> = Loop::with_backend(kind).unwrap();
    lp.later(|lp, depth| {
        *depth += 1;
        lp.later(|lp, depth| {
            *depth += 10;
            lp.stop(1);
        });
        assert_eq!(lp.run(depth).unwrap(), 1, "the nested run's stop");
        lp.stop(2);
    });
    let mut depth = 0;
    assert_eq!(lp.run(&mut depth).unwrap(), 2);
    assert_eq!(depth, 11);
}

#[apply(backends)]
fn api_remove_hands_the_source_back_open_and_unwatched(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (a, mut b) = socketpair();
    let (calls, io) = watch_counting(&mut lp, a, Interest::READ);
    let a = lp.remove(io).expect("the source comes back");
    assert!(lp.remove(io).is_none(), "removed twice");
    assert!(!lp.cancel(io), "cancelled after removal");
    b.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(calls.get(), 0, "no callback after removal");
    assert_eq!(drain(&a), 1, "the socket still works");
}

#[apply(backends)]
fn api_a_failed_watch_hands_the_source_back(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (a, _b) = socketpair();
    let fd = a.as_raw_fd();
    let failed = lp.watch_io(a, Interest::NONE, |_, (), _, _| {});
    let Err(failed) = failed else {
        panic!("an empty interest was accepted");
    };
    assert!(matches!(failed.error, Error::EmptyInterest(f) if f == fd));
    assert_eq!(failed.source.as_raw_fd(), fd, "the same socket, still open");
    // SAFETY: -1 is never open; the loop refuses it before registering anything.
    let negative = unsafe { lp.watch_raw_fd(-1, Interest::READ, |_, (), _, _| {}) };
    assert!(matches!(negative, Err(Error::InvalidFd(-1))));
}

#[apply(backends)]
fn api_set_interest_changes_what_fires_in_one_backend_call(#[case] kind: Kind) {
    let (mut lp, calls) = counting_loop::<Seen>(kind);
    let (a, mut b) = socketpair();
    let io = lp
        .watch_io(a, Interest::READ, |_, seen, a, ready| {
            if ready.contains(Readiness::READABLE) {
                seen.reads += 1;
                drain(a);
            }
            if ready.contains(Readiness::WRITABLE) {
                seen.writes += 1;
            }
        })
        .unwrap();
    calls.take();
    let mut seen = Seen::default();
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    assert_eq!(seen.writes, 0, "not watched for writing yet");
    lp.set_interest(io, Interest::READ | Interest::WRITE)
        .unwrap();
    assert_eq!(
        calls.take(),
        0,
        "the backend hears of it before the next wait"
    );
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!(calls.take(), 1, "one modify");
    assert_eq!(seen.writes, 1, "a socketpair is writable");
    lp.set_interest(io, Interest::READ | Interest::WRITE)
        .unwrap();
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    assert_eq!(calls.take(), 0, "the same interest again costs nothing");
    assert_eq!(seen.writes, 2);
    lp.set_interest(io, Interest::READ).unwrap();
    b.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!(calls.take(), 1);
    assert_eq!((seen.reads, seen.writes), (1, 2));
    assert!(matches!(
        lp.set_interest(io, Interest::NONE),
        Err(Error::EmptyInterest(_))
    ));
}

#[apply(backends)]
fn api_pause_and_resume_cost_one_backend_call_each_before_the_next_wait_and_keep_the_watch(
    #[case] kind: Kind,
) {
    let (mut lp, calls) = counting_loop::<u32>(kind);
    let (a, mut b) = socketpair();
    let io = lp
        .watch_io(a, Interest::READ, |_, reads, _, _| *reads += 1)
        .unwrap();
    calls.take();
    lp.pause(io).unwrap();
    lp.pause(io).unwrap();
    b.write_all(b"x").unwrap();
    let mut reads = 0;
    lp.loop_once(Some(Duration::from_millis(20)), &mut reads)
        .unwrap();
    assert_eq!(
        calls.take(),
        1,
        "pausing twice is one call, before the wait"
    );
    assert_eq!(
        reads, 0,
        "a paused watch does not fire though the fd is readable"
    );
    lp.resume(io).unwrap();
    lp.loop_once(Some(U), &mut reads).unwrap();
    assert_eq!(calls.take(), 1, "pause + resume: two calls in all");
    assert_eq!(reads, 1, "resumed, it fires for the byte waiting");
}

/// libev's stop + start: changes that undo each other before the loop waits again
/// never reach the backend (each used to be a syscall: on epoll, a delete and an add).
#[apply(backends)]
fn api_changes_undone_before_the_next_wait_cost_no_backend_call(#[case] kind: Kind) {
    let (mut lp, calls) = counting_loop::<u32>(kind);
    let (a, mut b) = socketpair();
    let fd = a.as_raw_fd();
    let io = lp
        .watch_io(a, Interest::READ, |_, reads, a, _| {
            *reads += drain(a) as u32
        })
        .unwrap();
    calls.take();
    for _ in 0..3 {
        lp.pause(io).unwrap();
        lp.resume(io).unwrap();
        lp.set_interest(io, Interest::READ | Interest::WRITE)
            .unwrap();
        lp.set_interest(io, Interest::READ).unwrap();
    }
    b.write_all(b"x").unwrap();
    let mut reads = 0;
    lp.loop_once(Some(U), &mut reads).unwrap();
    assert_eq!(calls.take(), 0, "nothing changed, so nothing was said");
    assert_eq!(reads, 1, "the watch fires as before");
    assert_epoll_holds(&lp, fd, Some(Interest::READ), "still registered");
    // A pause that stands is applied before the wait, and the loop then blocks.
    lp.pause(io).unwrap();
    b.write_all(b"y").unwrap();
    lp.loop_once(Some(Duration::from_millis(20)), &mut reads)
        .unwrap();
    assert_eq!((calls.take(), reads), (1, 1), "paused before the wait");
    assert_epoll_holds(&lp, fd, None, "paused");
}

/// A counting loop with a read watch (which drains its end and records each readiness)
/// paused and the pause applied, and the other end of the pair.
fn paused_reader(kind: Kind) -> (Loop<Vec<Readiness>>, Calls, Io<UnixStream>, UnixStream) {
    let (mut lp, calls) = counting_loop::<Vec<Readiness>>(kind);
    let (a, b) = socketpair();
    let io = lp
        .watch_io(a, Interest::READ, |_, seen, a, ready| {
            drain(a);
            seen.push(ready);
        })
        .unwrap();
    lp.pause(io).unwrap();
    lp.loop_once(Some(Duration::ZERO), &mut Vec::new()).unwrap();
    (lp, calls, io, b)
}

/// A change the backend refuses when the loop applies it (before its wait) is that
/// fd's error, not the loop's: the watch sees `Readiness::ERROR` once, the loop goes on
/// (its wait cut to 100 ms), and the change is tried again before each wait until the
/// backend takes it. (It used to end the `run` of a whole server worker.)
#[apply(backends)]
fn api_a_refused_resume_is_the_watchs_error_and_is_tried_again(#[case] kind: Kind) {
    let (mut lp, calls, io, mut b) = paused_reader(kind);
    let mut seen = Vec::new();
    calls.refuse_adds(true);
    lp.resume(io).unwrap();
    lp.loop_once(Some(U), &mut seen)
        .expect("a refused change does not end the iteration");
    assert!(
        matches!(seen[..], [r] if r.contains(Readiness::ERROR)),
        "the watch is told once: {seen:?}"
    );
    let start = Instant::now();
    lp.loop_once(None, &mut seen).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "an endless wait returns to try the change again"
    );
    assert_eq!(seen.len(), 1, "told once, not at every attempt: {seen:?}");
    b.write_all(b"x").unwrap();
    calls.refuse_adds(false);
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert!(
        matches!(seen[1..], [r] if r.contains(Readiness::READABLE)),
        "taken at last, the byte waiting is read: {seen:?}"
    );
}

/// A refused update made outside the flush (here a cancel of one watch of a shared
/// source) leaves what the fd's other watches want queued: the resumed read watch
/// fires once the backend takes changes again. (It used to lose that queued resume,
/// and the kernel kept reporting the cancelled WRITE: a spin with a deaf watch.)
#[apply(backends)]
fn api_a_refused_cancel_keeps_the_other_watchs_queued_change(#[case] kind: Kind) {
    let (mut lp, calls) = counting_loop::<Vec<Readiness>>(kind);
    let (a, mut b) = socketpair();
    let a = Rc::new(a);
    let read = lp
        .watch_io(a.clone(), Interest::READ, |_, seen, a, ready| {
            drain(a);
            seen.push(ready);
        })
        .unwrap();
    let write = lp
        .watch_io(a.clone(), Interest::WRITE, |_, _, _, _| {})
        .unwrap();
    let mut seen = Vec::new();
    lp.pause(read).unwrap();
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    lp.resume(read).unwrap();
    calls.refuse_all(true);
    assert!(lp.cancel(write));
    calls.refuse_all(false);
    b.write_all(b"x").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut iterations = 0;
    while !seen.iter().any(|r| r.contains(Readiness::READABLE)) {
        assert!(Instant::now() < deadline, "the resumed watch never fired");
        lp.loop_once(Some(U), &mut seen).unwrap();
        iterations += 1;
    }
    assert!(iterations <= 2, "{iterations} iterations: a spin");
}

/// A `reregister` whose first step (the queued change) is refused leaves it queued,
/// tried again before the next wait.
#[apply(backends)]
fn api_a_refused_reregister_leaves_the_change_queued(#[case] kind: Kind) {
    let (mut lp, calls, io, mut b) = paused_reader(kind);
    let mut seen = Vec::new();
    lp.resume(io).unwrap();
    calls.refuse_all(true);
    assert!(lp.reregister(io).is_err(), "the refusal is the caller's");
    calls.refuse_all(false);
    b.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert!(
        matches!(seen[..], [r] if r.contains(Readiness::READABLE)),
        "{seen:?}"
    );
}

/// A raw fd closed behind the loop's back is an error at the change, on every backend.
#[apply(backends)]
fn api_a_change_of_a_closed_raw_fd_is_an_error_at_the_call(#[case] kind: Kind) {
    let mut lp: Loop<()> = Loop::with_backend(kind).unwrap();
    let (a, _b) = socketpair();
    let fd = a.as_raw_fd();
    // SAFETY: the watch is removed before the test ends; `a` is closed below, which is
    // what the test is about (the loop never touches memory through the number).
    let io = unsafe { lp.watch_raw_fd(fd, Interest::READ, |_, _, _, _| {}) }.unwrap();
    lp.pause(io).unwrap();
    drop(a);
    assert!(
        matches!(lp.resume(io), Err(Error::ClosedWhileWatched { fd: f, .. }) if f == fd),
        "resumed a closed fd"
    );
    assert!(lp.remove(io).is_some());
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
}

/// `reregister` is a delete and an add, now (a pause and a resume cancel out before
/// the wait): what moves a loop to the back of an exclusive listener's waiters.
#[apply(backends)]
fn api_reregister_registers_again_at_once(#[case] kind: Kind) {
    let (mut lp, calls) = counting_loop::<u32>(kind);
    let (a, mut b) = socketpair();
    let fd = a.as_raw_fd();
    let exclusive = Interest::READ | Interest::EXCLUSIVE;
    let io = lp
        .watch_io(a, exclusive, |_, reads, a, _| *reads += drain(a) as u32)
        .unwrap();
    calls.take();
    lp.reregister(io).unwrap();
    assert_eq!(calls.take(), 2, "a delete and an add, at the call");
    assert_epoll_holds(&lp, fd, Some(exclusive), "registered again, as it was");
    b.write_all(b"x").unwrap();
    let mut reads = 0;
    lp.loop_once(Some(U), &mut reads).unwrap();
    assert_eq!((reads, calls.take()), (1, 0), "it fires as before");
    lp.pause(io).unwrap();
    calls.take();
    lp.reregister(io).unwrap();
    assert_eq!(
        calls.take(),
        1,
        "paused: the pause is applied, nothing re-added"
    );
    assert_epoll_holds(&lp, fd, None, "paused");
}

#[apply(backends)]
fn api_pausing_one_of_two_watches_of_an_fd_keeps_the_other(#[case] kind: Kind) {
    let (mut lp, calls) = counting_loop::<(u32, u32)>(kind);
    let (a, mut b) = socketpair();
    let a = Rc::new(a);
    let first = lp
        .watch_io(Rc::clone(&a), Interest::READ, |_, seen, _, _| seen.0 += 1)
        .unwrap();
    lp.watch_io(Rc::clone(&a), Interest::READ, |_, seen, _, _| seen.1 += 1)
        .unwrap();
    calls.take();
    lp.pause(first).unwrap();
    assert_eq!(calls.take(), 0, "the fd's interest is unchanged");
    b.write_all(b"x").unwrap();
    let mut seen = (0, 0);
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!(seen, (0, 1));
}

#[apply(backends)]
fn api_handles_of_another_loop_are_refused(#[case] kind: Kind) {
    let mut a = new_loop(kind);
    let mut b = new_loop(kind);
    let (s1, _s2) = socketpair();
    let (_, io) = watch_counting(&mut a, s1, Interest::READ);
    assert!(matches!(
        b.set_interest(io, Interest::WRITE),
        Err(Error::ForeignWatch)
    ));
    assert!(matches!(b.pause(io), Err(Error::ForeignWatch)));
    assert!(b.remove(io).is_none());
    let timer = a.after(U, |_, ()| {});
    assert!(!b.restart(timer, U), "another loop's timer");
    assert!(a.restart(timer, U), "its own loop restarts it");
    assert!(a.remove(io).is_some(), "the watch is still a's");
    assert!(matches!(a.pause(io), Err(Error::WatchGone)));
}

#[apply(backends)]
fn api_restart_moves_a_pending_timer_and_keeps_its_callback(#[case] kind: Kind) {
    let mut lp: Loop<Option<Instant>> = Loop::with_backend(kind).unwrap();
    let token = Box::new(7); // moved into the callback, so it is the same closure that fires
    let timer = lp.after(Duration::from_millis(10), move |lp, fired| {
        assert_eq!(*token, 7);
        *fired = Some(lp.now());
        lp.stop(0);
    });
    let restarted = Instant::now();
    assert!(lp.restart(timer, 10 * Duration::from_millis(10)));
    let mut fired = None;
    lp.run(&mut fired).unwrap();
    let after = fired.unwrap().duration_since(restarted);
    assert!(
        after >= Duration::from_millis(100),
        "fired {after:?} after the restart, before its new deadline"
    );
    assert!(!lp.restart(timer, U), "a fired one-shot is gone");
}

/// An idle timeout pushed back on every event, as a connection's is on every read.
#[derive(Default)]
struct Idle {
    timeout: Option<Timer>,
    pushed_back: usize,
    last_push: Option<Instant>,
    fired: Vec<Instant>,
}

#[apply(backends)]
fn api_a_timeout_pushed_back_on_every_event_fires_once_after_the_last(#[case] kind: Kind) {
    let mut lp: Loop<Idle> = Loop::with_backend(kind).unwrap();
    let idle = Duration::from_millis(30);
    let timeout = lp.after(idle, |lp, idle| {
        idle.fired.push(lp.now());
        lp.stop(0);
    });
    // Twenty events 1 ms apart, each pushing the timeout 30 ms past itself: it must not
    // fire between them, and fires once, 30 ms after the last.
    lp.every(Duration::from_millis(1), move |lp, idle| {
        if idle.pushed_back < 20 {
            assert!(lp.restart(idle.timeout.unwrap(), Duration::from_millis(30)));
            idle.pushed_back += 1;
            idle.last_push = Some(lp.now());
        }
    })
    .unwrap();
    let mut state = Idle {
        timeout: Some(timeout),
        ..Idle::default()
    };
    lp.run(&mut state).unwrap();
    assert_eq!(state.pushed_back, 20);
    let [fired] = state.fired[..] else {
        panic!("fired {} times", state.fired.len());
    };
    let after = fired.duration_since(state.last_push.unwrap());
    assert!(after >= idle, "fired {after:?} after the last push");
    // Pushed back, then brought forward: the earlier deadline holds.
    let brought_forward = Instant::now();
    assert!(!lp.restart(timeout, U), "a fired timeout is gone");
    let timer = lp.after(Duration::from_secs(60), |lp, idle| {
        idle.fired.push(lp.now());
        lp.stop(0);
    });
    assert!(lp.restart(timer, Duration::from_secs(120)));
    assert!(lp.restart(timer, Duration::from_millis(5)));
    lp.run(&mut state).unwrap();
    assert_eq!(state.fired.len(), 2);
    assert!(state.fired[1].duration_since(brought_forward) < Duration::from_secs(30));
}

/// The ticks of a repeating timer, and its handle.
#[derive(Default)]
struct Ticks {
    at: Vec<Instant>,
    timer: Option<Timer>,
}

#[apply(backends)]
fn api_a_repeating_timer_restarted_from_its_callback_waits_the_new_delay(#[case] kind: Kind) {
    let mut lp: Loop<Ticks> = Loop::with_backend(kind).unwrap();
    // The first tick restarts its own timer 50 ms out; the interval goes on after that.
    let timer = lp
        .every(Duration::from_millis(1), |lp, ticks| {
            ticks.at.push(lp.now());
            match ticks.at.len() {
                1 => assert!(lp.restart(ticks.timer.unwrap(), Duration::from_millis(50))),
                3 => lp.stop(0),
                _ => {}
            }
        })
        .unwrap();
    let mut ticks = Ticks {
        timer: Some(timer),
        ..Ticks::default()
    };
    lp.run(&mut ticks).unwrap();
    let restarted = ticks.at[1].duration_since(ticks.at[0]);
    assert!(
        restarted >= Duration::from_millis(50),
        "second tick after {restarted:?}"
    );
    let gap = ticks.at[2].duration_since(ticks.at[1]);
    assert!(
        gap < Duration::from_millis(45),
        "the interval goes on: {gap:?}"
    );
}

#[apply(backends)]
fn api_now_is_read_once_per_iteration(#[case] kind: Kind) {
    let mut lp: Loop<Vec<Instant>> = Loop::with_backend(kind).unwrap();
    for _ in 0..2 {
        lp.later(|lp, seen| {
            seen.push(lp.now());
            std::thread::sleep(Duration::from_millis(2));
        });
    }
    let mut seen = Vec::new();
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0], seen[1],
        "callbacks of one iteration share the time"
    );
    let cached = lp.now();
    assert!(lp.update_now() >= cached + Duration::from_millis(4));
}

#[apply(backends)]
fn api_a_timer_armed_in_a_callback_counts_from_the_cached_time(#[case] kind: Kind) {
    let mut lp: Loop<Option<(Instant, Instant)>> = Loop::with_backend(kind).unwrap();
    lp.later(|lp, _| {
        let base = lp.now();
        lp.after(Duration::from_millis(30), move |lp, out| {
            *out = Some((base, lp.now()));
            lp.stop(0);
        });
    });
    let mut out = None;
    lp.run(&mut out).unwrap();
    let (base, fired) = out.unwrap();
    assert!(fired >= base + Duration::from_millis(30));
}

/// select cannot hold fds at or above FD_SETSIZE: the error says so, as a variant, and
/// the source comes back.
#[cfg(feature = "select")]
#[test]
fn api_select_refuses_an_fd_above_its_limit_by_variant() {
    raise_fd_limit(libc::FD_SETSIZE as u64 + 16);
    let (a, _b) = UnixStream::pair().unwrap();
    let high = libc::FD_SETSIZE as i32 + 5;
    // SAFETY: dup2 onto a number this test owns from here on (it is closed below).
    assert_eq!(unsafe { libc::dup2(a.as_raw_fd(), high) }, high);
    // SAFETY: dup2 just made `high`, and nothing else owns it.
    let high = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(high) };
    let mut lp = new_loop(Kind::Select);
    let Err(failed) = lp.watch_io(high, Interest::READ, |_, (), _, _| {}) else {
        panic!("select accepted an fd above FD_SETSIZE");
    };
    assert!(
        matches!(failed.error, Error::FdAboveLimit { backend: "select", limit, .. } if limit == libc::FD_SETSIZE),
        "{:?}",
        failed.error
    );
    assert!(failed
        .error
        .to_string()
        .contains("use the poll or epoll backend"));
    let mut back = failed.source;
    back.set_nonblocking(true).unwrap();
    assert!(
        back.read(&mut [0; 1]).is_err(),
        "the dup is still open and ours"
    );
}

/// A panic the caller of `run` catches leaves every watch whole: the repeating timer
/// and the waker whose callbacks panicked go on, and the waker's later values arrive.
#[apply(backends)]
fn api_a_caught_panic_leaves_timers_and_wakers_whole(#[case] kind: Kind) {
    let mut lp: Loop<Vec<u32>> = Loop::with_backend(kind).unwrap();
    lp.every(Duration::from_millis(1), |_, seen| {
        seen.push(0);
        if seen.len() == 1 {
            panic!("the first tick panics");
        }
    })
    .unwrap();
    let (waker, _watch) = lp
        .waker(|_, seen: &mut Vec<u32>, value| {
            if value == 1 {
                panic!("value 1 panics");
            }
            seen.push(value);
        })
        .unwrap();
    let mut seen = Vec::new();
    let run = |lp: &mut Loop<Vec<u32>>, seen: &mut Vec<u32>| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lp.loop_once(Some(U), seen).unwrap()
        }))
    };
    assert!(run(&mut lp, &mut seen).is_err(), "the timer's first tick");
    for value in 1..=3 {
        waker.send(value).unwrap();
    }
    assert!(run(&mut lp, &mut seen).is_err(), "value 1");
    let deadline = Instant::now() + 50 * U;
    while !(seen.contains(&3) && seen.iter().filter(|&&v| v == 0).count() >= 3) {
        assert!(Instant::now() < deadline, "after the panics: {seen:?}");
        run(&mut lp, &mut seen).unwrap();
    }
    assert!(
        seen.contains(&2),
        "the value queued behind the panic: {seen:?}"
    );
}

#[apply(backends)]
fn api_source_reaches_the_source_outside_its_callback_only(#[case] kind: Kind) {
    let mut lp: Loop<Option<forkloop::Io<UnixStream>>> = Loop::with_backend(kind).unwrap();
    let (a, mut b) = socketpair();
    let io = lp
        .watch_io(a, Interest::READ, |lp, me, _, _| {
            assert!(lp.source(me.unwrap()).is_none(), "the callback has it");
            lp.stop(0);
        })
        .unwrap();
    lp.source(io).unwrap().write_all(b"answer").unwrap();
    let mut got = [0; 6];
    b.set_nonblocking(false).unwrap();
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"answer");
    b.write_all(b"x").unwrap();
    lp.run(&mut Some(io)).unwrap();
    assert!(new_loop(kind).source(io).is_none(), "another loop's");
    lp.cancel(io);
    assert!(lp.source(io).is_none(), "gone");
}

/// A panic in a one-shot timer does not lose the rest of its batch, and leaves the loop
/// not running.
#[apply(backends)]
fn api_a_caught_panic_in_a_timer_keeps_the_rest_of_its_batch(#[case] kind: Kind) {
    let mut lp: Loop<u32> = Loop::with_backend(kind).unwrap();
    let at = Instant::now();
    lp.at(at, |_, _| panic!("the first one-shot panics"));
    lp.at(at, |lp, fired| {
        *fired += 1;
        lp.stop(0);
    });
    let mut fired = 0;
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lp.run(&mut fired)));
    assert!(caught.is_err());
    assert!(!lp.is_running(), "run's depth is restored by the unwind");
    assert_eq!(
        lp.run(&mut fired).unwrap(),
        0,
        "the second timer still fires"
    );
    assert_eq!(fired, 1);
}

/// A paused regular-file watch (always ready on epoll) does not keep the loop awake.
#[apply(backends)]
fn api_a_paused_regular_file_lets_the_loop_block(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let file = std::fs::File::open("/proc/self/stat").unwrap();
    let (calls, io) = watch_counting(&mut lp, file, Interest::READ);
    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
    assert!(calls.get() >= 1, "a regular file is always readable");
    lp.pause(io).unwrap();
    let start = Instant::now();
    lp.loop_once(Some(Duration::from_millis(50)), &mut ())
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(45),
        "did not block"
    );
    lp.resume(io).unwrap();
    let before = calls.get();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert!(calls.get() > before, "resumed");
}

/// A repeating timer that restarts itself and then runs a nested iteration in which
/// that arming comes due is not lost: it fires again after its callback returns.
#[apply(backends)]
fn api_a_repeating_timer_due_during_its_own_nested_run_goes_on(#[case] kind: Kind) {
    let mut lp: Loop<Ticks> = Loop::with_backend(kind).unwrap();
    let timer = lp
        .every(Duration::from_millis(1), |lp, ticks| {
            ticks.at.push(lp.now());
            if ticks.at.len() == 1 {
                lp.restart(ticks.timer.unwrap(), Duration::ZERO);
                lp.loop_once(Some(Duration::from_millis(5)), ticks).unwrap();
            } else if ticks.at.len() == 3 {
                lp.stop(0);
            }
        })
        .unwrap();
    let mut ticks = Ticks {
        timer: Some(timer),
        ..Ticks::default()
    };
    let deadline = Instant::now() + 50 * U;
    while ticks.at.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "the timer stopped after {} ticks",
            ticks.at.len()
        );
        lp.loop_once(Some(U), &mut ticks).unwrap();
    }
}

/// A nested run inside a waker's callback neither spins nor loses what is sent
/// meanwhile.
#[apply(backends)]
fn api_a_nested_run_in_a_waker_callback_does_not_spin(#[case] kind: Kind) {
    let mut lp: Loop<(Vec<u32>, u32)> = Loop::with_backend(kind).unwrap();
    let (waker, _watch) = lp
        .waker(|lp, (got, iterations): &mut (Vec<u32>, u32), value: u32| {
            got.push(value);
            if value == 0 {
                let mut inner = (Vec::new(), 0);
                let start = Instant::now();
                while start.elapsed() < Duration::from_millis(50) {
                    lp.loop_once(Some(Duration::from_millis(10)), &mut inner)
                        .unwrap();
                    *iterations += 1;
                }
                got.extend(inner.0);
            }
        })
        .unwrap();
    waker.send(0).unwrap();
    let sender = {
        let waker = waker.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            waker.send(1).unwrap();
        })
    };
    let mut state = (Vec::new(), 0);
    let deadline = Instant::now() + 50 * U;
    while !state.0.contains(&1) {
        assert!(
            Instant::now() < deadline,
            "value 1 never arrived: {:?}",
            state.0
        );
        lp.loop_once(Some(U), &mut state).unwrap();
    }
    sender.join().unwrap();
    assert!(
        state.1 < 20,
        "{} nested iterations in 50 ms: a spin",
        state.1
    );
}

/// A callback that swaps the loop it was called on (safe code can: it holds `&mut
/// Loop`) is a panic, never a source put into the other loop's tables, where it would
/// close a watched fd under its registration.
#[apply(backends)]
fn api_a_callback_that_swaps_its_loop_panics_and_closes_no_watched_fd(#[case] kind: Kind) {
    let mut lp: Loop<Option<Loop<()>>> = Loop::with_backend(kind).unwrap();
    let mut other: Loop<Option<Loop<()>>> = Loop::with_backend(kind).unwrap();
    let (b, _b_peer) = socketpair();
    let b_fd = b.as_raw_fd();
    other.watch_io(b, Interest::READ, |_, _, _, _| {}).unwrap();
    let (a, mut a_peer) = socketpair();
    let spare = std::cell::Cell::new(Some(other));
    lp.watch_io(a, Interest::READ, move |lp, _, _, _| {
        if let Some(other) = spare.take() {
            let _old = std::mem::replace(lp, other);
        }
    })
    .unwrap();
    a_peer.write_all(b"x").unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lp.loop_once(Some(U), &mut None)
    }));
    assert!(caught.is_err(), "the swap is refused with a panic");
    // SAFETY: F_GETFD only reads the flags of whatever `b_fd` names.
    assert!(
        unsafe { libc::fcntl(b_fd, libc::F_GETFD) } >= 0,
        "the other loop's fd is open"
    );
}

/// On epoll, asserts what the kernel holds for `fd` (`None`: nothing registered), read
/// from its own view (`/proc/self/fdinfo` of the epoll fd); elsewhere there is no such
/// view to check.
fn assert_epoll_holds<D>(lp: &Loop<D>, fd: i32, want: Option<Interest>, step: &str) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if lp.backend_name() == "epoll" {
        let epfd = lp.backend_fd().expect("epoll has an fd");
        let bits = [
            (Interest::READ, libc::EPOLLIN),
            (Interest::WRITE, libc::EPOLLOUT),
            (Interest::HANGUP, libc::EPOLLRDHUP),
            (Interest::EXCLUSIVE, libc::EPOLLEXCLUSIVE),
        ];
        let mask = |i: Interest| {
            bits.iter()
                .filter(|(b, _)| i.contains(*b))
                .fold(0, |m, (_, e)| m | *e as u32)
        };
        // The kernel adds EPOLLERR and EPOLLHUP; only the bits the loop asks for count.
        let asked = bits.iter().fold(0, |m, (_, e)| m | *e as u32);
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{epfd}")).unwrap();
        let held = info.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            let (Some("tfd:"), Some(tfd), Some("events:"), Some(events)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return None;
            };
            let events = u32::from_str_radix(events, 16).unwrap();
            (tfd.parse() == Ok(fd)).then_some(events & asked)
        });
        assert_eq!(held, want.map(mask), "{step}");
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (lp, fd, want, step);
}

#[apply(backends)]
fn api_an_exclusive_watch_keeps_working_and_exclusive_through_pause_resume_set_interest_and_post_fork(
    #[case] kind: Kind,
) {
    let (read, write, exclusive) = (Interest::READ, Interest::WRITE, Interest::EXCLUSIVE);
    let (mut lp, calls) = counting_loop::<Seen>(kind);
    let (a, mut b) = socketpair();
    let fd = a.as_raw_fd();
    let io = lp
        .watch_io(
            a,
            Interest::READ | Interest::EXCLUSIVE,
            |_, seen, a, ready| {
                if ready.contains(Readiness::READABLE) {
                    seen.reads += 1;
                    drain(a);
                }
                if ready.contains(Readiness::WRITABLE) {
                    seen.writes += 1;
                }
            },
        )
        .unwrap();
    assert_epoll_holds(&lp, fd, Some(read | exclusive), "watched");
    let mut seen = Seen::default();
    b.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!(seen.reads, 1, "an exclusive watch fires as any other");

    // Watch changes reach the backend before the next wait (hence the zero-timeout
    // iterations before looking at the kernel's view).
    calls.take();
    lp.pause(io).unwrap();
    b.write_all(b"x").unwrap();
    lp.loop_once(Some(Duration::from_millis(20)), &mut seen)
        .unwrap();
    assert_epoll_holds(&lp, fd, None, "paused");
    assert_eq!(seen.reads, 1, "paused: it does not fire");
    lp.resume(io).unwrap();
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!(calls.take(), 2, "pause + resume: two backend calls");
    assert_epoll_holds(&lp, fd, Some(read | exclusive), "resumed");
    assert_eq!(seen.reads, 2, "resumed, it fires for the byte waiting");

    lp.set_interest(io, Interest::READ | Interest::WRITE | Interest::EXCLUSIVE)
        .unwrap();
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!(
        calls.take(),
        1,
        "one backend call (epoll: a delete and an add)"
    );
    assert_epoll_holds(&lp, fd, Some(read | write | exclusive), "read and write");
    assert_eq!(seen.writes, 1, "a socketpair is writable");
    lp.set_interest(io, Interest::READ).unwrap();
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    assert_epoll_holds(&lp, fd, Some(read), "no longer exclusive");
    lp.set_interest(io, Interest::READ | Interest::EXCLUSIVE)
        .unwrap();
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    assert_epoll_holds(&lp, fd, Some(read | exclusive), "exclusive again");

    lp.post_fork().unwrap();
    assert_epoll_holds(&lp, fd, Some(read | exclusive), "rebuilt by post_fork");
    b.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!((seen.reads, seen.writes), (3, 1), "after post_fork");
}

/// An fd is registered exclusive only while every unpaused watch of it asks: one that
/// does not keeps every wake-up it would get alone.
#[apply(backends)]
fn api_an_fd_is_exclusive_only_while_all_its_unpaused_watches_ask(#[case] kind: Kind) {
    let (read, exclusive) = (Interest::READ, Interest::EXCLUSIVE);
    let mut lp: Loop<(u32, u32)> = Loop::with_backend(kind).unwrap();
    let (a, mut b) = socketpair();
    let (fd, a) = (a.as_raw_fd(), Rc::new(a));
    let asks = Interest::READ | Interest::EXCLUSIVE;
    lp.watch_io(Rc::clone(&a), asks, |_, seen, _, _| seen.0 += 1)
        .unwrap();
    let plain = lp
        .watch_io(Rc::clone(&a), Interest::READ, |_, seen, _, _| seen.1 += 1)
        .unwrap();
    assert_epoll_holds(&lp, fd, Some(read), "one watch does not ask");
    b.write_all(b"x").unwrap();
    let mut seen = (0, 0);
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!(seen, (1, 1), "both fire");
    // The byte stays unread: each iteration fires the unpaused watches again.
    lp.pause(plain).unwrap();
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    assert_epoll_holds(&lp, fd, Some(read | exclusive), "the other is paused");
    lp.resume(plain).unwrap();
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    assert_epoll_holds(&lp, fd, Some(read), "resumed");
    assert_eq!(seen, (3, 2), "paused, the plain watch missed one");
    lp.cancel(plain);
    assert_epoll_holds(&lp, fd, Some(read | exclusive), "the other is gone");
    lp.loop_once(Some(U), &mut seen).unwrap();
    assert_eq!(seen, (4, 2), "the exclusive watch still fires");
}

#[apply(backends)]
fn api_exclusive_alone_or_with_hangup_is_refused_on_every_backend(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (a, _b) = socketpair();
    let fd = a.as_raw_fd();
    let alone = lp.watch_io(a, Interest::EXCLUSIVE, |_, (), _, _| {});
    let Err(alone) = alone else {
        panic!("EXCLUSIVE alone was accepted");
    };
    assert!(matches!(alone.error, Error::EmptyInterest(f) if f == fd));
    let hangup = Interest::READ | Interest::HANGUP | Interest::EXCLUSIVE;
    let refused = lp.watch_io(alone.source, hangup, |_, (), _, _| {});
    let Err(refused) = refused else {
        panic!("EXCLUSIVE with HANGUP was accepted");
    };
    assert!(matches!(refused.error, Error::ExclusiveHangup(f) if f == fd));
    assert!(
        refused.error.to_string().contains("HANGUP"),
        "{}",
        refused.error
    );
    let io = lp
        .watch_io(
            refused.source,
            Interest::READ | Interest::EXCLUSIVE,
            |_, (), _, _| {},
        )
        .unwrap();
    assert!(matches!(
        lp.set_interest(io, Interest::EXCLUSIVE),
        Err(Error::EmptyInterest(_))
    ));
    assert!(matches!(
        lp.set_interest(io, Interest::HANGUP | Interest::EXCLUSIVE),
        Err(Error::ExclusiveHangup(_))
    ));
    assert_epoll_holds(
        &lp,
        fd,
        Some(Interest::READ | Interest::EXCLUSIVE),
        "unchanged",
    );
}
