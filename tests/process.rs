//! looptests.md, group process. Every test forks, so each runs in its own process.

mod common;

use std::cell::{Cell, RefCell};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use forkloop::{Error, Kind, Loop};
use rstest::rstest;
use rstest_reuse::apply;

type Reports = Rc<RefCell<Vec<(libc::pid_t, ExitStatus)>>>;

fn watch(lp: &mut Loop, pid: libc::pid_t) -> Reports {
    let reports: Reports = Rc::default();
    let r = reports.clone();
    lp.watch_process(pid, move |_, pid, status| {
        r.borrow_mut().push((pid, status))
    })
    .unwrap();
    reports
}

/// A child that waits until killed.
fn sleeper() -> libc::pid_t {
    raw_fork(|| loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    })
}

/// Waits, bounded, until `pid` has exited, without reaping it.
fn wait_exited_unreaped(pid: libc::pid_t) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: siginfo_t is plain old data; WNOWAIT leaves the child unreaped.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: info is a live siginfo_t.
        let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) };
        assert_eq!(rc, 0, "waitid: {}", std::io::Error::last_os_error());
        // SAFETY: waitid filled info; si_pid is 0 while the child runs.
        if unsafe { info.si_pid() } == pid {
            return;
        }
        assert!(Instant::now() < deadline, "child {pid} did not exit");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[apply(backends)]
fn process_exit_status_is_reported_also_when_it_exited_before_the_watch(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let early = raw_fork(|| 3);
        wait_exited_unreaped(early);
        let early_reports = watch(&mut lp, early);
        let late = raw_fork(|| 4);
        let late_reports = watch(&mut lp, late);
        assert!(
            early_reports.borrow().is_empty(),
            "no report before an iteration"
        );
        assert!(loop_until(&mut lp, 50 * U, || {
            !early_reports.borrow().is_empty() && !late_reports.borrow().is_empty()
        }));
        assert_eq!(early_reports.borrow()[0].0, early);
        assert_eq!(early_reports.borrow()[0].1.code(), Some(3));
        assert_eq!(late_reports.borrow()[0].1.code(), Some(4));
    });
}

#[apply(backends)]
fn process_killed_child_reports_its_signal(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let pid = sleeper();
        let reports = watch(&mut lp, pid);
        lp.loop_once(Some(U)).unwrap();
        assert!(reports.borrow().is_empty(), "still running");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        assert!(loop_until(&mut lp, 50 * U, || !reports.borrow().is_empty()));
        assert_eq!(reports.borrow()[0].1.signal(), Some(libc::SIGTERM));
    });
}

#[apply(backends)]
fn process_any_child_watch_sees_every_child_and_reaps_only_in_dispatch(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let reports: Reports = Rc::default();
        let r = reports.clone();
        lp.watch_any_child(move |_, pid, status| r.borrow_mut().push((pid, status)))
            .unwrap();
        let mut pids: Vec<_> = (0..3).map(|_| raw_fork(|| 0)).collect();
        for &pid in &pids {
            wait_exited_unreaped(pid); // still a zombie: nothing reaped outside dispatch
        }
        assert!(loop_until(&mut lp, 50 * U, || reports.borrow().len() == 3));
        let mut seen: Vec<_> = reports.borrow().iter().map(|(p, _)| *p).collect();
        seen.sort();
        pids.sort();
        assert_eq!(seen, pids);
        assert!(reports.borrow().iter().all(|(_, s)| s.code() == Some(0)));
    });
}

#[apply(backends)]
fn process_watch_leaves_other_children_to_their_owners(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let mut bystander = std::process::Command::new("true").spawn().unwrap();
        let pid = raw_fork(|| 0);
        let reports = watch(&mut lp, pid);
        assert!(loop_until(&mut lp, 50 * U, || !reports.borrow().is_empty()));
        let status = bystander
            .wait()
            .expect("the loop must not reap another owner's child");
        assert!(status.success());
    });
}

#[apply(backends)]
fn process_watch_of_a_stranger_is_an_error(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    for pid in [0, -1, 1] {
        let err = lp.watch_process(pid, |_, _, _| {}).unwrap_err();
        assert!(matches!(err, Error::NotAChild(p) if p == pid), "{err}");
    }
}

#[apply(backends)]
fn process_watch_in_a_forked_child_does_not_report_the_parents_children(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let sibling = sleeper();
        let parent_reports = watch(&mut lp, sibling);
        let inner = raw_fork(|| {
            // Keeps the inherited loop: post_fork runs on first use and drops the
            // parent's child watches.
            let calls = Rc::new(Cell::new(0));
            let c = calls.clone();
            let own = raw_fork(|| 0);
            lp.watch_process(own, move |_, _, _| c.set(c.get() + 1))
                .unwrap();
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(sibling, libc::SIGTERM) };
            let ok = loop_until(&mut lp, 50 * U, || calls.get() == 1);
            lp.loop_once(Some(U)).unwrap();
            let stranger = matches!(
                lp.watch_process(sibling, |_, _, _| {}),
                Err(Error::NotAChild(_))
            );
            (!(ok && calls.get() == 1 && stranger && parent_reports.borrow().is_empty())) as i32
        });
        assert_eq!(exit_code(wait_child(inner, Duration::from_secs(20))), 0);
        // The parent's watch is intact and reports its own child's exit.
        assert!(loop_until(&mut lp, 50 * U, || !parent_reports
            .borrow()
            .is_empty()));
        assert_eq!(parent_reports.borrow()[0].1.signal(), Some(libc::SIGTERM));
    });
}
