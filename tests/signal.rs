//! looptests.md, group signal. Every test runs in a process of its own (`isolated`).

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use forkloop::{Error, Kind, Loop, SignalRefusal};
use rstest::rstest;
use rstest_reuse::apply;

fn kill_self(signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(libc::getpid(), signal) }, 0);
}

fn disposition(signal: libc::c_int) -> libc::sighandler_t {
    // SAFETY: a null new action only queries the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(signal, std::ptr::null(), &mut old), 0);
        old.sa_sigaction
    }
}

/// Iterates until `count` reaches `n`, then once more to show no extra call comes.
fn expect_calls(lp: &mut Loop, count: &Rc<Cell<u32>>, n: u32) {
    assert!(
        loop_until(lp, 50 * U, || count.get() >= n),
        "got {} of {n} calls",
        count.get()
    );
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(count.get(), n, "an extra call arrived");
}

#[apply(backends)]
fn signal_is_deferred_to_dispatch_and_delivered_once_per_kill(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (calls, c) = counter();
        lp.watch_signal(libc::SIGTERM, move |_, (), sig| {
            assert_eq!(sig, libc::SIGTERM);
            bump(&c);
        })
        .unwrap();
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert_eq!(calls.get(), 0, "no callback before the signal");
        kill_self(libc::SIGTERM);
        assert_eq!(calls.get(), 0, "not called before an iteration");
        expect_calls(&mut lp, &calls, 1);
        kill_self(libc::SIGTERM);
        assert_eq!(calls.get(), 1, "the second is deferred too");
        expect_calls(&mut lp, &calls, 2);
    });
}

#[apply(backends)]
fn signal_two_watches_both_run_and_one_survives_the_others_cancel(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (a, ca) = counter();
        let (b, cb) = counter();
        let wa = lp
            .watch_signal(libc::SIGUSR1, move |_, (), _| bump(&ca))
            .unwrap();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&cb))
            .unwrap();
        kill_self(libc::SIGUSR1);
        expect_calls(&mut lp, &a, 1);
        assert_eq!(b.get(), 1);
        assert!(lp.cancel(wa));
        kill_self(libc::SIGUSR1);
        expect_calls(&mut lp, &b, 2);
        assert_eq!(a.get(), 1);
    });
}

#[apply(backends)]
fn signal_unknown_or_uncatchable_is_an_error(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let faults = [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL];
    // Linux: 32 and 33 are glibc's own, 65 is past SIGRTMAX.
    let (reserved, past_max): (&[libc::c_int], &[libc::c_int]) = if cfg!(target_os = "linux") {
        (&[32, 33], &[65])
    } else {
        (&[], &[])
    };
    let unknown = [0, -1, 4096];
    let uncatchable = [libc::SIGKILL, libc::SIGSTOP];
    let expected = (unknown.iter().chain(past_max))
        .map(|&sig| (sig, SignalRefusal::Unknown))
        .chain(
            uncatchable
                .iter()
                .map(|&sig| (sig, SignalRefusal::Uncatchable)),
        )
        .chain(faults.iter().map(|&sig| (sig, SignalRefusal::Fault)))
        .chain(reserved.iter().map(|&sig| (sig, SignalRefusal::Reserved)));
    for (sig, why) in expected {
        let err = lp.watch_signal(sig, |_, (), _| {}).unwrap_err();
        assert!(
            matches!(
                err,
                Error::SignalRefused { signal, refusal } if signal == sig && refusal == why
            ),
            "signal {sig}: expected {why:?}, got {err:?}"
        );
        // The message names the signal and says why.
        let message = err.to_string();
        assert!(
            message.contains(&sig.to_string()) && message.contains(&why.to_string()),
            "{message}"
        );
    }
}

#[apply(backends)]
fn signal_after_post_fork_in_the_same_process_arrives_exactly_once(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (calls, c) = counter();
        lp.watch_signal(libc::SIGUSR2, move |_, (), _| bump(&c))
            .unwrap();
        lp.post_fork().unwrap();
        lp.post_fork().unwrap();
        kill_self(libc::SIGUSR2);
        expect_calls(&mut lp, &calls, 1);
    });
}

#[apply(backends)]
fn signal_previous_disposition_is_back_after_the_last_watch_goes(#[case] kind: Kind) {
    isolated(|| {
        // SAFETY: sets a disposition; no handler code of ours runs.
        unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
        let mut lp = new_loop(kind);
        let a = lp.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap();
        let b = lp.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap();
        assert_ne!(disposition(libc::SIGUSR1), libc::SIG_IGN);
        lp.cancel(a);
        assert_ne!(
            disposition(libc::SIGUSR1),
            libc::SIG_IGN,
            "one watch is left"
        );
        lp.cancel(b);
        assert_eq!(disposition(libc::SIGUSR1), libc::SIG_IGN);
        lp.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap();
        drop(lp);
        assert_eq!(
            disposition(libc::SIGUSR1),
            libc::SIG_IGN,
            "dropping the loop restores too"
        );
    });
}

#[apply(backends)]
fn signal_watched_by_two_loops_reaches_both_and_outlives_either(#[case] kind: Kind) {
    isolated(|| {
        // SAFETY: sets a disposition; no handler code of ours runs.
        unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
        let mut first = new_loop(kind);
        let mut second = new_loop(kind);
        let (a, ca) = counter();
        let (b, cb) = counter();
        let w = first
            .watch_signal(libc::SIGUSR1, move |_, (), _| bump(&ca))
            .unwrap();
        second
            .watch_signal(libc::SIGUSR1, move |_, (), _| bump(&cb))
            .unwrap();
        kill_self(libc::SIGUSR1);
        expect_calls(&mut first, &a, 1);
        expect_calls(&mut second, &b, 1);
        first.cancel(w);
        assert_ne!(
            disposition(libc::SIGUSR1),
            libc::SIG_IGN,
            "second still watches"
        );
        kill_self(libc::SIGUSR1);
        expect_calls(&mut second, &b, 2);
        assert_eq!(a.get(), 1, "a cancelled watch is not called");
        drop(second);
        assert_eq!(
            disposition(libc::SIGUSR1),
            libc::SIG_IGN,
            "the disposition before the first watch is back after the last"
        );
    });
}

/// SIGCHLD above all is wanted by several parts of one program (any-child watches, and
/// child watches where no pidfd is available): two loops both get it.
#[apply(backends)]
fn signal_sigchld_reaches_every_loop_that_watches_it(#[case] kind: Kind) {
    isolated(|| {
        let mut first = new_loop(kind);
        let mut second = new_loop(kind);
        let (a, ca) = counter();
        let (b, cb) = counter();
        first
            .watch_signal(libc::SIGCHLD, move |_, (), _| bump(&ca))
            .unwrap();
        second
            .watch_signal(libc::SIGCHLD, move |_, (), _| bump(&cb))
            .unwrap();
        let pid = raw_fork(|| 3);
        assert!(loop_until(&mut first, 50 * U, || a.get() > 0));
        assert!(loop_until(&mut second, 50 * U, || b.get() > 0));
        assert_eq!(exit_code(wait_child(pid, 50 * U)), 3);
    });
}

#[apply(backends)]
fn signal_sigchld_is_installed_with_sa_nocldstop(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        lp.watch_signal(libc::SIGCHLD, |_, (), _| {}).unwrap();
        // SAFETY: a null new action only queries the current one into `old`.
        let flags = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(
                libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old),
                0
            );
            old.sa_flags
        };
        assert_ne!(
            flags & libc::SA_NOCLDSTOP,
            0,
            "a stopped or continued child would wake the loop for nothing"
        );
    });
}

#[apply(backends)]
fn signal_after_a_raw_fork_the_inherited_loop_and_a_new_one_both_receive_it(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (_, c) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
            .unwrap();
        let pid = raw_fork(move || {
            let mut fresh: Loop = Loop::with_backend(kind).unwrap();
            let (new_calls, cn) = counter();
            fresh
                .watch_signal(libc::SIGUSR1, move |_, (), _| bump(&cn))
                .unwrap();
            let (old_calls, co) = counter();
            lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&co))
                .unwrap(); // the inherited loop's post_fork runs here
            kill_self(libc::SIGUSR1);
            let old = loop_until(&mut lp, 50 * U, || old_calls.get() > 0);
            let new = loop_until(&mut fresh, 50 * U, || new_calls.get() > 0);
            match (old, new) {
                (true, true) => 0,
                (false, _) => 1,
                (true, false) => 2,
            }
        });
        let code = exit_code(wait_child(pid, 100 * U));
        assert_eq!(
            code, 0,
            "1: the inherited loop missed it, 2: the new loop did"
        );
    });
}

#[apply(backends)]
fn signal_raised_before_a_fork_is_delivered_once_in_the_parent_only(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (calls, c) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
            .unwrap();
        // raise() runs the handler on this thread before it returns: the signal is
        // recorded, not yet dispatched, when the process forks.
        // SAFETY: raise has no memory-safety preconditions.
        assert_eq!(unsafe { libc::raise(libc::SIGUSR1) }, 0);
        let pid = lp
            .fork(Default::default(), || {
                let mut child: Loop = Loop::new().unwrap();
                let (calls, c) = counter();
                child
                    .watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
                    .unwrap();
                let start = std::time::Instant::now();
                child.loop_once(Some(U), &mut ()).unwrap();
                // Neither delivered here nor spinning: the wait took its full timeout.
                (calls.get() != 0 || start.elapsed() < U / 2) as i32
            })
            .unwrap();
        let status = Rc::new(Cell::new(None));
        let s = status.clone();
        lp.watch_process(pid, move |_, (), _, st| s.set(Some(st.unwrap().code())))
            .unwrap();
        assert!(loop_until(&mut lp, 50 * U, || status.get().is_some()));
        expect_calls(&mut lp, &calls, 1);
        assert_eq!(
            status.get(),
            Some(Some(0)),
            "the child saw the parent's signal, or spun"
        );
    });
}

/// A raw-fork child: which loop gets a delivery never depends on which subscribes
/// first. A delivery before the inherited loop's post_fork is still that loop's (it
/// watched since before the fork); one before a new loop's watch is not the new one's.
#[apply(backends)]
fn signal_in_a_raw_fork_child_deliveries_go_by_when_each_loop_watched(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (_, c) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
            .unwrap();
        let pid = raw_fork(move || {
            kill_self(libc::SIGUSR1); // before any loop of the child subscribes
            let mut fresh: Loop = Loop::with_backend(kind).unwrap();
            let (new_calls, cn) = counter();
            fresh
                .watch_signal(libc::SIGUSR1, move |_, (), _| bump(&cn))
                .unwrap();
            fresh.loop_once(Some(U), &mut ()).unwrap();
            if new_calls.get() != 0 {
                return 1; // the new loop got a delivery from before its watch
            }
            let (old_calls, co) = counter();
            lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&co))
                .unwrap(); // the inherited loop's post_fork runs here
            if !loop_until(&mut lp, 50 * U, || old_calls.get() > 0) {
                return 2; // the inherited loop lost it to the new one
            }
            0
        });
        let code = exit_code(wait_child(pid, 100 * U));
        assert_eq!(
            code, 0,
            "1: the new loop was called, 2: the inherited one was not"
        );
    });
}

#[apply(backends)]
fn signal_in_a_raw_fork_child_one_inherited_loops_cancel_leaves_anothers_watch(#[case] kind: Kind) {
    isolated(|| {
        let mut a = new_loop(kind);
        let mut b = new_loop(kind);
        let wa = a.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap();
        let (_, c) = counter();
        b.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
            .unwrap();
        let pid = raw_fork(move || {
            a.cancel(wa); // before any post_fork
            kill_self(libc::SIGUSR1); // the default action would kill the child
            let (calls, c) = counter();
            // B's post_fork runs here: what came since the fork is B's.
            b.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
                .unwrap();
            (!loop_until(&mut b, 50 * U, || calls.get() > 0)) as i32
        });
        let status = wait_child(pid, 100 * U);
        assert!(
            libc::WIFEXITED(status),
            "the child died of the signal B still watches: {status:#x}"
        );
        assert_eq!(libc::WEXITSTATUS(status), 0, "B was not called");
    });
}

#[apply(backends)]
fn signal_dropping_an_inherited_loop_in_a_raw_fork_child_restores_the_disposition(
    #[case] kind: Kind,
) {
    isolated(|| {
        let mut lp = new_loop(kind);
        lp.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap();
        let pid = raw_fork(move || {
            drop(lp);
            (disposition(libc::SIGUSR1) != libc::SIG_DFL) as i32
        });
        assert_eq!(
            exit_code(wait_child(pid, 100 * U)),
            0,
            "the child's only watch is gone, yet the handler stays"
        );
    });
}

/// post_fork can fail half-way (here: every signal slot of the child is taken); the
/// loop then stays not current, and the next use finishes the job.
#[apply(backends)]
fn signal_a_post_fork_that_failed_is_finished_by_the_next_use(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (_, c) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
            .unwrap();
        let pid = raw_fork(move || {
            let mut others: Vec<Loop> = Vec::new();
            loop {
                let mut other: Loop = Loop::with_backend(kind).unwrap();
                match other.watch_signal(libc::SIGUSR2, |_, (), _| {}) {
                    Ok(_) => others.push(other),
                    Err(Error::TooManySignalLoops(n)) if n == others.len() => break,
                    Err(e) => {
                        eprintln!("loop {}: {e:?}", others.len() + 1);
                        return 3; // not the refusal of a full driver
                    }
                }
            }
            match lp.loop_once(Some(std::time::Duration::ZERO), &mut ()) {
                Err(Error::TooManySignalLoops(_)) => {}
                Ok(()) => return 1, // no slot was left, yet post_fork claimed to succeed
                Err(e) => {
                    eprintln!("{e:?}");
                    return 3;
                }
            }
            others.pop(); // a slot is free again
            let (calls, c) = counter();
            lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
                .unwrap();
            kill_self(libc::SIGUSR1);
            (!loop_until(&mut lp, 50 * U, || calls.get() > 0)) as i32 * 2
        });
        let code = exit_code(wait_child(pid, 100 * U));
        assert_eq!(
            code, 0,
            "1: the failure went unseen, 2: the signal never arrived, 3: another error (stderr)"
        );
    });
}

/// A caught panic in one signal watch's callback does not cost the other watches of
/// the signal their call for that delivery.
#[apply(backends)]
fn signal_a_caught_panic_leaves_the_other_watches_their_delivery(#[case] kind: Kind) {
    isolated(|| {
        let mut lp: Loop<u32> = Loop::with_backend(kind).unwrap();
        let mut first = true;
        lp.watch_signal(libc::SIGUSR1, move |_, _, _| {
            if std::mem::take(&mut first) {
                panic!("the first watch panics once");
            }
        })
        .unwrap();
        lp.watch_signal(libc::SIGUSR1, |_, calls, _| *calls += 1)
            .unwrap();
        // SAFETY: raises a signal this process now catches.
        unsafe { libc::raise(libc::SIGUSR1) };
        let mut calls = 0;
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lp.loop_once(Some(U), &mut calls)
        }));
        assert!(caught.is_err(), "the first watch ran and panicked");
        let deadline = Instant::now() + 50 * U;
        while calls == 0 {
            assert!(Instant::now() < deadline, "the second watch never ran");
            lp.loop_once(Some(U), &mut calls).unwrap();
        }
        assert_eq!(calls, 1, "once for the one delivery");
    });
}

/// A backend that records the timeout of every wait of the one it wraps.
struct Timeouts(
    Box<dyn forkloop::Backend>,
    Rc<std::cell::RefCell<Vec<Option<Duration>>>>,
);

impl forkloop::Backend for Timeouts {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn register(&mut self, fd: i32, i: forkloop::Interest) -> std::io::Result<()> {
        self.0.register(fd, i)
    }
    fn modify(&mut self, fd: i32, i: forkloop::Interest) -> std::io::Result<()> {
        self.0.modify(fd, i)
    }
    fn deregister(&mut self, fd: i32) -> std::io::Result<()> {
        self.0.deregister(fd)
    }
    fn wait(
        &mut self,
        events: &mut Vec<forkloop::Event>,
        t: Option<Duration>,
    ) -> std::io::Result<()> {
        self.1.borrow_mut().push(t);
        self.0.wait(events, t)
    }
    fn post_fork(
        &mut self,
        r: &mut dyn Iterator<Item = (i32, forkloop::Interest)>,
    ) -> std::io::Result<()> {
        self.0.post_fork(r)
    }
    fn kernel_fd(&self) -> Option<i32> {
        self.0.kernel_fd()
    }
}

/// libev's trick: the handler writes to the wake pipe only while the loop waits. A
/// signal raised while it runs (here: before the iteration) is found by its count, so
/// the wait does not block and the callback runs in that iteration, with no byte in the
/// pipe to write or read.
#[apply(backends)]
fn signal_raised_while_the_loop_is_not_waiting_is_found_without_the_pipe(#[case] kind: Kind) {
    isolated(|| {
        let waits = Rc::new(std::cell::RefCell::new(Vec::new()));
        let backend = Timeouts(kind.create().unwrap(), Rc::clone(&waits));
        let mut lp: Loop = Loop::from_backend(Box::new(backend)).unwrap();
        let (calls, c) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
            .unwrap();
        // raise, not kill: delivered to this thread before it returns (kill may pick
        // another thread, whose handler could then run while the loop waits).
        // SAFETY: raises a signal this process now catches.
        unsafe { libc::raise(libc::SIGUSR1) };
        waits.borrow_mut().clear();
        lp.loop_once(Some(50 * U), &mut ()).unwrap();
        assert_eq!(calls.get(), 1, "dispatched in the first iteration");
        assert_eq!(
            waits.borrow()[..],
            [Some(Duration::ZERO)],
            "the wait did not block: the loop saw the delivery by its count"
        );
        // Nothing was left in the pipe: the next wait blocks for its whole timeout.
        let start = Instant::now();
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert!(start.elapsed() >= U / 2, "woken by a stale byte");
        assert_eq!(calls.get(), 1);
    });
}

/// While the loop blocks, the handler still writes: a signal from another thread
/// wakes the wait long before its timeout.
#[apply(backends)]
fn signal_sent_while_the_loop_blocks_wakes_it(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (calls, c) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
            .unwrap();
        let sender = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(100)); // most likely in the wait by then
            kill_self(libc::SIGUSR1);
        });
        let start = Instant::now();
        while calls.get() == 0 {
            lp.loop_once(Some(Duration::from_secs(60)), &mut ())
                .unwrap();
        }
        let took = start.elapsed();
        sender.join().unwrap();
        assert!(
            took < Duration::from_secs(30),
            "the wait ran out ({took:?}) instead of waking"
        );
        assert_eq!(calls.get(), 1);
    });
}
