//! Hardening (issue 5), the loop's part: fd hygiene across many forks, many short-lived
//! children reaped with none missed, a signal storm across forks, fd exhaustion, and
//! post_fork generations deep. Each test runs in its own process and prints the figure
//! it tried.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::rc::Rc;
use std::time::Duration;

use common::*;
use forkloop::{Error, ForkOptions, Kind, Loop};
use rstest::rstest;
use rstest_reuse::apply;

/// `FORKLOOP_HARDENING_FULL=1` runs the full sizes; CI runs reduced, still meaningful ones.
fn size(reduced: usize, full: usize) -> usize {
    if std::env::var_os("FORKLOOP_HARDENING_FULL").is_some() {
        full
    } else {
        reduced
    }
}

/// The fds open now (the listing's own directory fd, closed by then, is left out).
fn open_fds() -> Vec<i32> {
    let listed: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // SAFETY: F_GETFD only reads flags; a closed fd answers -1.
    listed
        .into_iter()
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect()
}

fn cloexec(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC != 0
}

#[apply(backends)]
fn hardening_loop_fds_are_cloexec_not_kept_by_children_and_forks_leak_none(#[case] kind: Kind) {
    if !std::path::Path::new("/proc/self/fd").exists() {
        return; // needs procfs to count fds
    }
    isolated(|| {
        let before = open_fds();
        let mut lp = new_loop(kind);
        lp.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap();
        let created: Vec<i32> = open_fds()
            .into_iter()
            .filter(|fd| !before.contains(fd))
            .collect();
        assert!(!created.is_empty() || kind == Kind::Poll || kind == Kind::Select);
        for fd in &created {
            let what = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
            let what = what.display();
            assert!(
                cloexec(*fd),
                "fd {fd} ({what}) made by the loop is not close-on-exec"
            );
        }
        // A Loop::fork child does not keep the forking loop's fds: its backend fd and
        // signal self-pipe (the polling crate keeps its other fds private).
        let is_pipe = |fd: &i32| {
            let what = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
            what.to_string_lossy().starts_with("pipe:")
        };
        let ours: Vec<i32> = created
            .iter()
            .copied()
            .filter(|fd| Some(*fd) == lp.backend_fd() || is_pipe(fd))
            .collect();
        assert!(ours.len() == created.len() || kind == Kind::Polling);
        let child = lp
            .fork(ForkOptions::new(), move || {
                ours.iter().any(|&fd| cloexec(fd)) as i32
            })
            .unwrap();
        assert_eq!(exit_code(wait_child(child, Duration::from_secs(20))), 0);
        let cycles = size(200, 1000);
        let start = open_fds().len();
        let exited = Rc::new(Cell::new(0));
        for _ in 0..cycles {
            let pid = lp.fork(ForkOptions::new(), || 0).unwrap();
            let e = exited.clone();
            lp.watch_process(pid, move |_, (), _, _| e.set(e.get() + 1))
                .unwrap();
        }
        assert!(loop_until(&mut lp, Duration::from_secs(60), || exited
            .get()
            == cycles));
        println!(
            "figure: {kind}: {cycles} Loop::fork + exit cycles; open fds {start} before, {} after",
            open_fds().len()
        );
        assert_eq!(open_fds().len(), start, "fds leaked across {cycles} forks");
    });
}

#[apply(backends)]
fn hardening_many_short_lived_children_are_all_reaped_and_others_keep_their_status(
    #[case] kind: Kind,
) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let count = size(300, 1000);
        let mut bystander = std::process::Command::new("true").spawn().unwrap();
        let reported = Rc::new(Cell::new(0));
        for i in 0..count {
            let pid = lp.fork(ForkOptions::new(), move || (i % 7) as i32).unwrap();
            let r = reported.clone();
            lp.watch_process(pid, move |_, (), _, status| {
                assert_eq!(status.unwrap().code(), Some((i % 7) as i32));
                r.set(r.get() + 1);
            })
            .unwrap();
        }
        assert!(loop_until(&mut lp, Duration::from_secs(60), || reported
            .get()
            == count));
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert_eq!(reported.get(), count, "an exit was reported twice");
        let me = std::process::id();
        let left =
            std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
        let bystander_pid = bystander.id().to_string();
        let zombies: Vec<&str> = left
            .split_whitespace()
            .filter(|p| *p != bystander_pid)
            .collect();
        assert!(zombies.is_empty(), "children left behind: {zombies:?}");
        assert!(bystander
            .wait()
            .expect("the loop must not reap it")
            .success());
        println!("figure: {kind}: {count} children reaped, none missed, none left; the std Child kept its status");
    });
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain old data filled by getrusage.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[apply(backends)]
fn hardening_signal_pending_at_fork_is_delivered_once_and_never_spins_the_child(
    #[case] kind: Kind,
) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (calls, c) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&c))
            .unwrap();
        // raise() runs the handler before it returns: recorded, not yet dispatched.
        // SAFETY: raise has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGUSR1) };
        // The child keeps the inherited loop (post_fork runs on first use) and waits a
        // second: the parent's pending signal must neither reach it nor make it spin.
        let child = raw_fork(|| {
            let before = cpu_time();
            lp.loop_once(Some(Duration::from_secs(1)), &mut ()).unwrap();
            let spent = cpu_time() - before;
            println!("figure: {kind}: child CPU over a 1 s wait with a signal pending at fork: {spent:?}");
            (calls.get() != 0 || spent > Duration::from_millis(100)) as i32
        });
        assert_eq!(exit_code(wait_child(child, Duration::from_secs(20))), 0);
        assert!(loop_until(&mut lp, 50 * U, || calls.get() == 1));
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert_eq!(calls.get(), 1, "delivered more than once in the parent");
    });
}

#[apply(backends)]
fn hardening_post_fork_holds_in_a_grandchild_of_a_grandchild(#[case] kind: Kind) {
    isolated(|| {
        let (s1, s2) = socketpair();
        // Rc: every generation pokes the watched socket and drains it.
        let s1 = Rc::new(s1);
        let mut lp = new_loop(kind);
        let (reads, _) = watch_counting(&mut lp, s1.clone(), forkloop::Interest::READ);
        lp.loop_once(Some(Duration::ZERO), &mut ()).unwrap();
        // Each generation forks the next, then checks the inherited loop still works.
        fn generation(
            lp: &mut forkloop::Loop,
            s1: &UnixStream,
            s2: &UnixStream,
            reads: &Rc<Cell<u32>>,
            depth: u32,
        ) -> i32 {
            if depth > 0 {
                let child = raw_fork(|| generation(lp, s1, s2, reads, depth - 1));
                let code = exit_code(wait_child(child, Duration::from_secs(20)));
                if code != 0 {
                    return code;
                }
            }
            let before = reads.get();
            if poke_until(lp, s1, s2, || reads.get() > before) {
                0
            } else {
                10 + depth as i32
            }
        }
        let depth = 4;
        assert_eq!(generation(&mut lp, &s1, &s2, &reads, depth), 0);
        println!("figure: {kind}: post_fork held through {depth} generations of forks");
    });
}

/// The storm's shared state: how many children were forked, each pid's exit reports,
/// and statuses that were not the expected ones.
struct Storm {
    kind: Kind,
    total: usize,
    forked: Cell<usize>,
    reports: RefCell<HashMap<libc::pid_t, u32>>,
    wrong: RefCell<Vec<String>>,
    to_flooder: UnixStream,
}

/// Forks child `forked` of the storm and watches it; its exit forks the next one, so a
/// few children are alive at any time while the flooder signals them.
fn fork_storm_child(lp: &mut Loop, storm: &Rc<Storm>) {
    let i = storm.forked.get();
    storm.forked.set(i + 1);
    // Odd children keep the loop's handler and watch SIGUSR1 in a loop of their own;
    // even ones get the default disposition back and die of the flood.
    let keep = i % 2 == 1;
    let kind = storm.kind;
    let pid = lp
        .fork(ForkOptions::new().keep_signals(keep), move || {
            if keep {
                // Leaked, never dropped, so SIGUSR1 stays caught until _exit.
                let own = Box::leak(Box::new(new_loop(kind)));
                let (got, g) = counter();
                own.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&g))
                    .unwrap();
                let waited = loop_until(own, Duration::from_secs(10), || got.get() > 0);
                (!waited) as i32
            } else {
                std::thread::sleep(Duration::from_secs(10));
                3
            }
        })
        .unwrap();
    (&storm.to_flooder).write_all(&pid.to_ne_bytes()).unwrap();
    let storm = storm.clone();
    lp.watch_process(pid, move |lp, (), pid, status| {
        let status = status.unwrap();
        *storm.reports.borrow_mut().entry(pid).or_default() += 1;
        let expected = if keep {
            status.code() == Some(0)
        } else {
            status.signal() == Some(libc::SIGUSR1)
        };
        if !expected {
            let how = if keep { "keep" } else { "default" };
            storm
                .wrong
                .borrow_mut()
                .push(format!("{how} child {pid}: {status}"));
        }
        if storm.forked.get() < storm.total {
            fork_storm_child(lp, &storm);
        }
    })
    .unwrap();
}

/// The flooder: sends SIGUSR1 round-robin to every pid it is given (up to `per_child`
/// times each, and only while the pid is still in our process group), until its pipe
/// closes and every budget is spent. Prints how many signals it sent.
fn flood(pids: UnixStream, per_child: u32) -> i32 {
    pids.set_nonblocking(true).unwrap();
    // SAFETY: getpgrp has no preconditions.
    let group = unsafe { libc::getpgrp() };
    let (mut active, mut bytes, mut sent, mut closed) = (Vec::new(), Vec::new(), 0u64, false);
    loop {
        let mut buf = [0u8; 256];
        match (&pids).read(&mut buf) {
            Ok(0) => closed = true,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        }
        let whole = bytes.len() / 4 * 4;
        for chunk in bytes.drain(..whole).collect::<Vec<u8>>().chunks(4) {
            active.push((
                libc::pid_t::from_ne_bytes(chunk.try_into().unwrap()),
                per_child,
            ));
        }
        if active.is_empty() {
            if closed {
                println!("figure: flooder sent {sent} SIGUSR1s to freshly forked children");
                return 0;
            }
            std::thread::yield_now();
            continue;
        }
        for (pid, left) in &mut active {
            // SAFETY: getpgid and kill have no memory-safety preconditions; the group
            // check keeps a reaped pid reused by some other process out of the flood.
            if unsafe { libc::getpgid(*pid) } == group
                && unsafe { libc::kill(*pid, libc::SIGUSR1) } == 0
            {
                sent += 1;
                *left -= 1;
            } else {
                *left = 0;
            }
        }
        active.retain(|&(_, left)| left > 0);
    }
}

#[apply(backends)]
fn hardening_signal_storm_across_forks_never_reaches_the_parent(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (parent_hits, p) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&p))
            .unwrap();
        let (to_flooder, from_parent) = UnixStream::pair().unwrap();
        let flooder = lp
            .fork(ForkOptions::new(), move || flood(from_parent, 200))
            .unwrap();
        let (flooder_done, f) = counter();
        lp.watch_process(flooder, move |_, (), _, status| {
            let status = status.unwrap();
            assert!(status.success(), "flooder: {status}");
            bump(&f);
        })
        .unwrap();
        let total = size(100, 500);
        let storm = Rc::new(Storm {
            kind,
            total,
            forked: Cell::new(0),
            reports: RefCell::default(),
            wrong: RefCell::default(),
            to_flooder,
        });
        for _ in 0..4 {
            fork_storm_child(&mut lp, &storm);
        }
        let all_reported = || storm.reports.borrow().len() == total;
        assert!(loop_until(&mut lp, Duration::from_secs(50), all_reported));
        storm
            .to_flooder
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        assert!(loop_until(&mut lp, Duration::from_secs(5), || flooder_done
            .get()
            == 1));
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert_eq!(storm.wrong.borrow().as_slice(), &[] as &[String]);
        let twice = storm.reports.borrow().values().filter(|&&n| n != 1).count();
        assert_eq!(twice, 0, "exits reported more than once");
        assert_eq!(
            parent_hits.get(),
            0,
            "a child's SIGUSR1 reached the parent's watcher"
        );
        println!("figure: {kind}: {total} children forked under a SIGUSR1 flood; parent's watcher fired 0 times; every exit reported exactly once");
    });
}

/// Lowers the soft fd limit to 16 above what is open, then opens fds until it is
/// reached; returns them (drop them to free the slots).
fn exhaust_fds() -> Vec<std::fs::File> {
    // SAFETY: rlimit is plain old data filled by getrlimit.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: lim is a live rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let highest = open_fds().into_iter().max().unwrap_or(2);
    lim.rlim_cur = (highest + 16) as libc::rlim_t;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut held = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => held.push(file),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => return held,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
}

#[apply(backends)]
fn hardening_fd_exhaustion_is_an_error_naming_the_cause_and_recovers(#[case] kind: Kind) {
    isolated(|| {
        let (s1, s2) = socketpair();
        // Rc: the test pokes the watched socket and drains it at the end.
        let s1 = Rc::new(s1);
        let mut lp = new_loop(kind);
        let (reads, _) = watch_counting(&mut lp, s1.clone(), forkloop::Interest::READ);
        let held = exhaust_fds();
        let emfile = |e: forkloop::Error| {
            // What could not be made (or rebuilt), with the OS's EMFILE as the cause.
            let cause = match &e {
                Error::Create { source, .. } | Error::PostFork { source, .. } => {
                    source.raw_os_error()
                }
                _ => None,
            };
            assert_eq!(cause, Some(libc::EMFILE), "{kind}: {e:?}");
            let text = e.to_string();
            assert!(text.contains("Too many open files"), "{kind}: {text}");
            text
        };
        let created: forkloop::Result<Loop> = Loop::with_backend(kind);
        let needs_fd = lp.backend_fd().is_some();
        match created {
            Ok(_) => assert!(!needs_fd, "{kind} built a loop with no fd left"),
            Err(e) => println!(
                "figure: {kind}: Loop::with_backend at the fd limit: {}",
                emfile(e)
            ),
        }
        let signal = lp.watch_signal(libc::SIGUSR1, |_, (), _| {}).unwrap_err();
        println!(
            "figure: {kind}: watch_signal at the fd limit: {}",
            emfile(signal)
        );
        // A child whose backend needs a new kernel object cannot rebuild it.
        let child = raw_fork(|| match lp.loop_once(Some(Duration::ZERO), &mut ()) {
            Ok(()) => needs_fd as i32,
            Err(e) => {
                println!("figure: {kind}: post_fork at the fd limit: {}", emfile(e));
                (!needs_fd) as i32
            }
        });
        assert_eq!(exit_code(wait_child(child, Duration::from_secs(20))), 0);
        // With fds free again, the same loop works and can watch signals.
        drop(held);
        let (got, g) = counter();
        lp.watch_signal(libc::SIGUSR1, move |_, (), _| bump(&g))
            .unwrap();
        // SAFETY: raise has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGUSR1) };
        assert!(loop_until(&mut lp, 50 * U, || got.get() == 1));
        assert!(poke_until(&mut lp, &s1, &s2, || reads.get() > 0));
    });
}
