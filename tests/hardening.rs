//! Hardening (issue 5), the loop's part so far: fd hygiene across many forks, and many
//! short-lived children reaped with none missed. Each test runs in its own process and
//! prints the figure it tried.

mod common;

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::time::Duration;

use common::*;
use forkloop::{ForkOptions, Kind};
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
fn hardening_loop_fds_are_cloexec_and_forks_leak_none(#[case] kind: Kind) {
    if !std::path::Path::new("/proc/self/fd").exists() {
        return; // needs procfs to count fds
    }
    isolated(|| {
        let before = open_fds();
        let mut lp = new_loop(kind);
        lp.watch_signal(libc::SIGUSR1, |_, _| {}).unwrap();
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
        let cycles = size(200, 1000);
        let start = open_fds().len();
        let exited = Rc::new(Cell::new(0));
        for _ in 0..cycles {
            let pid = lp.fork(ForkOptions::new(), || 0).unwrap();
            let e = exited.clone();
            lp.watch_process(pid, move |_, _, _| e.set(e.get() + 1))
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
            lp.watch_process(pid, move |_, _, status| {
                assert_eq!(status.code(), Some((i % 7) as i32));
                r.set(r.get() + 1);
            })
            .unwrap();
        }
        assert!(loop_until(&mut lp, Duration::from_secs(60), || reported
            .get()
            == count));
        lp.loop_once(Some(U)).unwrap();
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
        lp.watch_signal(libc::SIGUSR1, move |_, _| bump(&c))
            .unwrap();
        // raise() runs the handler before it returns: recorded, not yet dispatched.
        // SAFETY: raise has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGUSR1) };
        // The child keeps the inherited loop (post_fork runs on first use) and waits a
        // second: the parent's pending signal must neither reach it nor make it spin.
        let child = raw_fork(|| {
            let before = cpu_time();
            lp.loop_once(Some(Duration::from_secs(1))).unwrap();
            let spent = cpu_time() - before;
            println!("figure: {kind}: child CPU over a 1 s wait with a signal pending at fork: {spent:?}");
            (calls.get() != 0 || spent > Duration::from_millis(100)) as i32
        });
        assert_eq!(exit_code(wait_child(child, Duration::from_secs(20))), 0);
        assert!(loop_until(&mut lp, 50 * U, || calls.get() == 1));
        lp.loop_once(Some(U)).unwrap();
        assert_eq!(calls.get(), 1, "delivered more than once in the parent");
    });
}

#[apply(backends)]
fn hardening_post_fork_holds_in_a_grandchild_of_a_grandchild(#[case] kind: Kind) {
    isolated(|| {
        let (s1, s2) = socketpair();
        let mut lp = new_loop(kind);
        let (reads, _) = watch_counting(&mut lp, s1.as_raw_fd(), forkloop::Interest::READ);
        lp.loop_once(Some(Duration::ZERO)).unwrap();
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
