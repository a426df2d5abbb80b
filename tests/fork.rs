//! The fork group of looptests.md (real forks, every backend), and the process-global
//! loop. Every test runs in a process of its own.

mod common;

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use forkloop::{ForkOptions, Interest, Kind, Loop, LoopId, Readiness, BACKEND_ENV};
use rstest::rstest;
use rstest_reuse::apply;

const CHILD_LIMIT: Duration = Duration::from_secs(20);

fn global_identity() -> (LoopId, Option<i32>) {
    Loop::with_global(|g| (g.id(), g.backend_fd())).unwrap()
}

/// 0 if this process's global loop is a new one, different from `parent`'s.
fn fresh_global(parent: (LoopId, Option<i32>)) -> i32 {
    let mine = global_identity();
    let stable = global_identity() == mine;
    let new_kernel_object = parent.1.is_none() || mine.1 != parent.1;
    let ok = mine.0 != parent.0 && mine.0.pid == std::process::id() && stable && new_kernel_object;
    (!ok) as i32
}

fn exits_with(pid: libc::pid_t, code: i32) {
    assert_eq!(exit_code(wait_child(pid, CHILD_LIMIT)), code);
}

#[apply(backends)]
fn fork_global_loop_is_fresh_in_every_kind_of_child(#[case] kind: Kind) {
    isolated(|| {
        std::env::set_var(BACKEND_ENV, kind.name());
        let parent = global_identity();
        assert_eq!(
            Loop::with_global(|g| g.backend_name()).unwrap(),
            kind.name()
        );
        let mut lp = new_loop(kind);
        // Through Loop::fork.
        let pid = lp
            .fork(ForkOptions::new(), move || fresh_global(parent))
            .unwrap();
        exits_with(pid, 0);
        // Through a raw fork from inside with_global, which the child inherits lent out.
        Loop::with_global(|_| exits_with(raw_fork(move || fresh_global(parent)), 0)).unwrap();
        // Through a daemonizing double fork.
        let outer = raw_fork(move || {
            let child = global_identity();
            let grandchild = raw_fork(move || fresh_global(child));
            exit_code(wait_child(grandchild, CHILD_LIMIT)) | fresh_global(parent)
        });
        exits_with(outer, 0);
        assert_eq!(
            global_identity(),
            parent,
            "the parent keeps its own global loop"
        );
    });
}

#[apply(backends)]
fn fork_child_cancelling_and_dropping_everything_leaves_the_parent_its_events(#[case] kind: Kind) {
    isolated(|| {
        let (s1, mut s2) = socketpair();
        // Shared: the loop watches s1 while the parent reads it.
        let s1 = Rc::new(s1);
        let mut slot = Some(new_loop(kind));
        let (reads, r) = counter();
        let lp = slot.as_mut().unwrap();
        let w = lp
            .watch_io(s1.clone(), Interest::READ, move |_, (), _, _| bump(&r))
            .unwrap();
        lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
        // One child cancels before its loop noticed the fork, one after an iteration;
        // both then drop the loop.
        for iterate_first in [false, true] {
            let child = raw_fork(|| {
                let mut lp = slot.take().unwrap();
                if iterate_first {
                    lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
                }
                (!lp.cancel(w)) as i32
            });
            exits_with(child, 0);
            let lp = slot.as_mut().unwrap();
            let before = reads.get();
            s2.write_all(b"x").unwrap();
            assert!(
                loop_until(lp, 50 * U, || reads.get() > before),
                "parent lost its event"
            );
            let mut buf = [0u8; 8];
            (&*s1).read_exact(&mut buf[..1]).unwrap();
        }
    });
}

#[apply(backends)]
fn fork_child_registrations_never_reach_the_parent(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
        let (mut report_r, mut report_w) = std::io::pipe().unwrap();
        let (mut done_r, mut done_w) = std::io::pipe().unwrap();
        let child = raw_fork(|| {
            let (c1, mut c2) = socketpair(); // first fds allocated after the fork
            let c1_fd = c1.as_raw_fd();
            let (got, g) = counter();
            // The loop owns c1 (open until the child exits) and the child never reads it.
            lp.watch_io(c1, Interest::READ, move |_, (), _, _| bump(&g))
                .unwrap();
            c2.write_all(b"child's own data").unwrap();
            if !loop_until(&mut lp, 50 * U, || got.get() > 0) {
                return 2;
            }
            report_w.write_all(&c1_fd.to_ne_bytes()).unwrap();
            let mut buf = [0u8; 1];
            let _ = done_r.read(&mut buf); // keep c1 readable until the parent looked
            0
        });
        let (d1, _d2) = socketpair(); // the same numbers, in the parent
        drop((report_w, done_r));
        let mut number = [0u8; 4];
        report_r.read_exact(&mut number).unwrap();
        assert_eq!(
            i32::from_ne_bytes(number),
            d1.as_raw_fd(),
            "precondition: same fd number"
        );
        let (spurious, s) = counter();
        lp.watch_io(d1, Interest::READ, move |_, (), _, _| bump(&s))
            .unwrap();
        for _ in 0..3 {
            lp.loop_once(Some(U), &mut ()).unwrap();
        }
        done_w.write_all(b"!").unwrap();
        exits_with(child, 0);
        assert_eq!(
            spurious.get(),
            0,
            "the child's readiness reached the parent's loop"
        );
    });
}

#[apply(backends)]
fn fork_signals_stay_in_the_process_they_were_sent_to(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (parent_calls, p) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&p))
            .unwrap();
        let (mut ready_r, mut ready_w) = std::io::pipe().unwrap();
        let (go_r, mut go_w) = std::io::pipe().unwrap();
        let child = lp
            .fork(ForkOptions::new(), move || {
                let mut lp: Loop = Loop::with_backend(kind).unwrap();
                let (calls, c) = counter();
                lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
                    .unwrap();
                let (go, g) = counter();
                lp.watch_io(go_r, Interest::READ, move |_, (), _, _| bump(&g))
                    .unwrap();
                ready_w.write_all(b"r").unwrap();
                if !loop_until(&mut lp, 50 * U, || go.get() > 0) {
                    return 2;
                }
                lp.loop_once(Some(U), &mut ()).unwrap();
                if calls.get() != 0 {
                    return 3; // the parent's signal reached the child
                }
                // SAFETY: raise has no memory-safety preconditions.
                unsafe { libc::raise(libc::SIGUSR1) };
                (!loop_until(&mut lp, 50 * U, || calls.get() == 1)) as i32
            })
            .unwrap();
        let mut buf = [0u8; 1];
        ready_r.read_exact(&mut buf).unwrap();
        // SAFETY: raise has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGUSR1) };
        assert!(loop_until(&mut lp, 50 * U, || parent_calls.get() == 1));
        go_w.write_all(b"g").unwrap();
        let status = Rc::new(Cell::new(None));
        let s = status.clone();
        lp.watch_process(child, move |_, (), _, st| s.set(Some(st.unwrap().code())))
            .unwrap();
        assert!(loop_until(&mut lp, 50 * U, || status.get().is_some()));
        assert_eq!(status.get(), Some(Some(0)));
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert_eq!(
            parent_calls.get(),
            1,
            "the child's signal reached the parent"
        );
    });
}

#[apply(backends)]
fn fork_child_exit_status_is_the_closures_value_and_a_panic_is_255(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let ok = lp.fork(ForkOptions::new(), || 7).unwrap();
        let panicked = lp
            .fork(ForkOptions::new(), || panic!("child panics on purpose"))
            .unwrap();
        exits_with(ok, 7);
        exits_with(panicked, 255);
        // Not truncated to 8 bits: 256 would exit 0, a success.
        for out_of_range in [256, -1, i32::MAX] {
            exits_with(
                lp.fork(ForkOptions::new(), move || out_of_range).unwrap(),
                255,
            );
        }
    });
}

#[apply(backends)]
fn fork_child_gets_default_handlers_unless_kept_and_ignored_stays_ignored(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        // SAFETY: sets a disposition; no code of ours runs in it.
        unsafe { libc::signal(libc::SIGUSR2, libc::SIG_IGN) };
        lp.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap();
        lp.watch_signal(libc::SIGUSR2, |_, (), _| {}).unwrap();
        let handler = |sig| {
            // SAFETY: a null new action only queries the current one.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, std::ptr::null(), &mut old);
                old.sa_sigaction
            }
        };
        let reset = lp
            .fork(ForkOptions::new(), move || {
                let ok = handler(libc::SIGUSR1) == libc::SIG_DFL
                    && handler(libc::SIGUSR2) == libc::SIG_IGN;
                (!ok) as i32
            })
            .unwrap();
        exits_with(reset, 0);
        let kept = lp
            .fork(ForkOptions::new().keep_signals(true), move || {
                (handler(libc::SIGUSR1) == libc::SIG_DFL) as i32
            })
            .unwrap();
        exits_with(kept, 0);
    });
}

static PARENT_TIMER_FIRED: AtomicBool = AtomicBool::new(false);

#[apply(backends)]
fn fork_parent_timers_never_fire_in_a_loop_fork_child_but_do_in_a_post_fork_child(
    #[case] kind: Kind,
) {
    isolated(|| {
        std::env::set_var(BACKEND_ENV, kind.name());
        Loop::with_global(|g| {
            g.after(U, |_, ()| PARENT_TIMER_FIRED.store(true, Ordering::SeqCst));
            let child = g
                .fork(ForkOptions::new(), || {
                    Loop::with_global(|fresh| {
                        let start = Instant::now();
                        fresh.loop_once(Some(3 * U), &mut ()).unwrap();
                        let waited_fully = start.elapsed() >= 3 * U;
                        (!waited_fully || PARENT_TIMER_FIRED.load(Ordering::SeqCst)) as i32
                    })
                    .unwrap()
                })
                .unwrap();
            exits_with(child, 0);
            // A child that keeps the inherited loop keeps its timers.
            let keeper = raw_fork(|| {
                let fired = || PARENT_TIMER_FIRED.load(Ordering::SeqCst);
                (!loop_until(g, 50 * U, fired)) as i32
            });
            exits_with(keeper, 0);
        })
        .unwrap();
    });
}

#[apply(backends)]
fn fork_post_fork_works_again_in_a_grandchild(#[case] kind: Kind) {
    isolated(|| {
        let (s1, s2) = socketpair();
        // Shared: the loop watches s1 while poke_until drains it.
        let s1 = Rc::new(s1);
        let mut lp = new_loop(kind);
        let (reads, _) = watch_counting(&mut lp, s1.clone(), Interest::READ);
        let (ticks, t) = counter();
        lp.every(U / 10, move |_, ()| bump(&t)).unwrap();
        lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
        let mut use_inherited = |depth: u32| {
            let before = (reads.get(), ticks.get());
            let ok = poke_until(&mut lp, &s1, &s2, || {
                reads.get() > before.0 && ticks.get() > before.1
            });
            if ok {
                0
            } else {
                10 + depth as i32
            }
        };
        let child = raw_fork(|| {
            if use_inherited(1) != 0 {
                return 11;
            }
            let grandchild = raw_fork(|| use_inherited(2));
            let code = exit_code(wait_child(grandchild, CHILD_LIMIT));
            if code != 0 {
                return code;
            }
            use_inherited(1)
        });
        exits_with(child, 0);
        assert_eq!(use_inherited(0), 0, "the parent's loop still works");
    });
}

#[apply(backends)]
fn fork_a_cancel_in_a_child_before_its_post_fork_holds(#[case] kind: Kind) {
    isolated(|| {
        let (s1, mut s2) = socketpair();
        // Shared: the child watches the same fd number again after the cancel.
        let s1: Rc<UnixStream> = Rc::new(s1);
        s2.write_all(b"x").unwrap(); // s1 stays readable: a stale watch would spin
        let mut lp = new_loop(kind);
        let (reads, r) = counter();
        let watch = lp
            .watch_io(s1.clone(), Interest::READ, move |_, (), _, _| bump(&r))
            .unwrap();
        lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
        let lp = &mut lp;
        let pid = raw_fork(move || {
            // Cancelled before the loop noticed the fork (no post_fork yet).
            assert!(lp.cancel(watch));
            let reads_at_fork = reads.get();
            let (fired, f) = counter();
            let saw_readable = Rc::new(Cell::new(false));
            let seen = saw_readable.clone();
            let again = lp.watch_io(s1, Interest::WRITE, move |_, (), _, ready| {
                // Only WRITE is asked for: READABLE would mean the read interest is
                // still registered with the backend (now merged in, not refused).
                seen.set(seen.get() || ready.contains(Readiness::READABLE));
                bump(&f)
            });
            if again.is_err() {
                return 1; // "already registered": the cancel was lost
            }
            let mut iterations = 0;
            let started = Instant::now();
            while fired.get() == 0 && started.elapsed() < Duration::from_secs(2) {
                lp.loop_once(Some(Duration::from_millis(100)), &mut ())
                    .unwrap();
                iterations += 1;
            }
            // A write watch fires at once; the cancelled read watch must not be polled.
            let stale = reads.get() != reads_at_fork || saw_readable.get();
            i32::from(fired.get() == 0) * 2 + i32::from(iterations > 5) * 4 + i32::from(stale) * 8
        });
        exits_with(pid, 0);
    });
}

#[apply(backends)]
fn fork_a_child_cancelling_an_inherited_signal_watch_keeps_its_loop_working(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let watch = lp.watch_signal(libc::SIGUSR2, |_, (), _| {}).unwrap();
        lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
        let lp = &mut lp;
        // libuv's fork_close_signal_in_child: the watch's self-pipe goes with the cancel.
        let pid = raw_fork(move || {
            assert!(lp.cancel(watch));
            match lp.loop_once(Some(Duration::ZERO), &mut ()) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("{e}");
                    1
                }
            }
        });
        exits_with(pid, 0);
    });
}

/// `pthread_atfork` can fail (ENOMEM). This test re-runs itself with a preloaded C shim
/// that makes glibc's registration fail (`__register_atfork`, which the static
/// `pthread_atfork` wrapper calls): building a loop must then be an error, not a panic.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn fork_a_failing_pthread_atfork_is_an_error_not_a_panic() {
    const CHILD: &str = "FORKLOOP_ATFORK_FAILS";
    if std::env::var_os(CHILD).is_some() {
        let err = Loop::<()>::new()
            .err()
            .expect("a loop without fork handlers was built");
        assert!(matches!(err, forkloop::Error::AtFork(_)), "{err}");
        let err = Loop::with_global(|_| ()).expect_err("the global loop too");
        assert!(matches!(err, forkloop::Error::AtFork(_)), "{err}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("forkloop-atfork-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("atfork_fails.c");
    let shim = dir.join("atfork_fails.so");
    std::fs::write(
        &source,
        "#include <errno.h>\n\
         int __register_atfork(void (*p)(void), void (*a)(void), void (*c)(void), void *d)\n\
         { (void)p; (void)a; (void)c; (void)d; return ENOMEM; }\n",
    )
    .unwrap();
    let built = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&shim)
        .arg(&source)
        .status()
        .expect("a C compiler (cc) builds the failing-atfork shim");
    assert!(built.success(), "cc failed building {}", source.display());
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "fork_a_failing_pthread_atfork_is_an_error_not_a_panic",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env("LD_PRELOAD", &shim)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

#[test]
fn fork_a_loop_fork_child_lets_go_of_the_backend_by_its_own_rule_not_by_closing_its_fd() {
    isolated(|| {
        // A backend whose kernel object is not inherited (kqueue): in the child its
        // number may name another file. Here it names a pipe the child still needs.
        let (keep, _peer) = UnixStream::pair().unwrap();
        let number = keep.as_raw_fd();
        let mut lp: Loop = Loop::from_backend(Box::new(Inert {
            kernel_fd: Some(number),
        }))
        .unwrap();
        let pid = lp
            .fork(ForkOptions::new(), move || {
                // SAFETY: F_GETFD only reads the flags of whatever the number names.
                let open = unsafe { libc::fcntl(number, libc::F_GETFD) } >= 0;
                (!open) as i32
            })
            .unwrap();
        assert_eq!(
            exit_code(wait_child(pid, CHILD_LIMIT)),
            0,
            "the child closed a number its backend does not own"
        );
        drop(keep);
    });
}

/// close_source skips epoll's EPOLL_CTL_DEL. Across fork that must stay harmless both
/// ways: a post_fork child closing its copy leaves the parent its watch, and a parent
/// closing while a child keeps its copy (and its own watch) leaves the child its
/// events and itself no stale readiness.
#[apply(backends)]
fn fork_close_source_in_either_process_leaves_the_other_its_watch(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (s1, mut s2) = socketpair();
        let (reads, w) = watch_counting(&mut lp, s1, Interest::READ);
        let child = raw_fork(|| {
            lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap(); // post_fork
            i32::from(!lp.close_source(w))
        });
        exits_with(child, 0);
        s2.write_all(b"x").unwrap();
        assert!(
            loop_until(&mut lp, 50 * U, || reads.get() > 0),
            "the child's close took the parent's watch"
        );
        assert!(lp.close_source(w));

        let (t1, mut t2) = socketpair();
        let (t_reads, tw) = watch_counting(&mut lp, t1, Interest::READ);
        let (go_read, mut go_write) = socketpair();
        let child = raw_fork(|| {
            lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap(); // post_fork
                                                                  // Waits for the parent's close and write, bounded.
            let mut buf = [0u8; 1];
            go_read
                .set_nonblocking(false)
                .and_then(|()| go_read.set_read_timeout(Some(50 * U)))
                .and_then(|()| (&go_read).read_exact(&mut buf))
                .unwrap();
            i32::from(!loop_until(&mut lp, 50 * U, || t_reads.get() > 0))
        });
        assert!(lp.close_source(tw));
        t2.write_all(b"x").unwrap();
        go_write.write_all(b"g").unwrap();
        for _ in 0..3 {
            lp.loop_once(Some(U), &mut ()).unwrap();
        }
        assert_eq!(
            t_reads.get(),
            0,
            "a closed watch's callback ran in the parent"
        );
        exits_with(child, 0);
    });
}
