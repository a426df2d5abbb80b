//! looptests.md, group process, and pid reuse (issue #10). Every test forks, so each
//! runs in its own process.

mod common;

use std::cell::{Cell, RefCell};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::*;
use forkloop::{Error, Kind, Loop, Watch};
use rstest::rstest;
use rstest_reuse::apply;

type Reports = Rc<RefCell<Vec<(libc::pid_t, forkloop::Result<ExitStatus>)>>>;

/// Report `i`'s exit status; a panic if the watch was told of an error instead.
fn status(reports: &Reports, i: usize) -> ExitStatus {
    match &reports.borrow()[i].1 {
        Ok(status) => *status,
        Err(e) => panic!("report {i}: {e}"),
    }
}

fn reaped_elsewhere(reports: &Reports, pid: libc::pid_t) -> bool {
    let reports = reports.borrow();
    reports.len() == 1
        && reports[0].0 == pid
        && matches!(reports[0].1, Err(Error::ReapedElsewhere(p)) if p == pid)
}

fn watch(lp: &mut Loop, pid: libc::pid_t) -> Reports {
    watch_with_handle(lp, pid).0
}

fn watch_with_handle(lp: &mut Loop, pid: libc::pid_t) -> (Reports, Watch) {
    let reports: Reports = Rc::default();
    let r = reports.clone();
    let watch = lp
        .watch_process(pid, move |_, (), pid, status| {
            r.borrow_mut().push((pid, status))
        })
        .unwrap();
    (reports, watch)
}

/// How the loop watches one child: the way it chooses here (a pidfd on Linux ≥ 5.4), or
/// its SIGCHLD + `waitpid(pid)` fallback, forced on Linux by a seccomp filter that
/// refuses `pidfd_open` with ENOSYS, as a kernel without it does.
#[derive(Clone, Copy, Debug)]
enum Reaping {
    Native,
    Waitpid,
}

impl Reaping {
    /// Call first in the isolated process: the filter binds this thread and its forks.
    fn set_up(self) {
        if let Reaping::Waitpid = self {
            refuse_pidfd_open();
        }
    }
}

#[cfg(target_os = "linux")]
fn pidfd_open(pid: libc::pid_t) -> std::io::Result<libc::c_int> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd as libc::c_int)
}

/// A seccomp filter on this thread (inherited by its forks) that makes `pidfd_open`
/// fail with ENOSYS and allows every other system call. No privilege needed: it comes
/// with no_new_privs.
#[cfg(target_os = "linux")]
fn refuse_pidfd_open() {
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let filter = [
        // The syscall number is the first field of seccomp_data. The architecture is not
        // checked: a same-numbered call of another ABI failing is harmless in a test.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_pidfd_open as u32,
        },
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments; no_new_privs only narrows what exec grants.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "no_new_privs: {}", std::io::Error::last_os_error());
    // SAFETY: program points at a live filter of `len` instructions, which the kernel
    // copies before prctl returns.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        )
    };
    assert_eq!(rc, 0, "seccomp: {}", std::io::Error::last_os_error());
    let err = pidfd_open(std::process::id() as libc::pid_t).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENOSYS),
        "the filter is in place"
    );
}

/// Off Linux there is no pidfd: the fallback is the only way.
#[cfg(not(target_os = "linux"))]
fn refuse_pidfd_open() {}

/// Runs `body` as pid 1 of a new pid namespace, where nothing but this test forks, so
/// the kernel hands out pids in order and [`set_next_pid`] decides the next one: pid
/// reuse on purpose, not by luck. `None` where that needs a privilege we lack
/// (CAP_SYS_ADMIN, which CI has as root); the test then says so and passes.
#[cfg(target_os = "linux")]
fn in_private_pid_namespace(body: impl FnOnce() -> i32) -> Option<i32> {
    const NO_PRIVILEGE: i32 = 77;
    // Forked first, so that the namespace change binds a single-threaded process that
    // only waits for the namespace's init.
    let outer = raw_fork(|| {
        // SAFETY: unshare with a flag; only this process's later children are affected.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            eprintln!("unshare(CLONE_NEWPID): {}", std::io::Error::last_os_error());
            return NO_PRIVILEGE;
        }
        let init = raw_fork(|| {
            // SAFETY: getpid has no preconditions.
            assert_eq!(unsafe { libc::getpid() }, 1, "init of the new namespace");
            if std::fs::write("/proc/sys/kernel/ns_last_pid", "1").is_err() {
                return NO_PRIVILEGE;
            }
            body()
        });
        exit_code(wait_child(init, Duration::from_secs(30)))
    });
    match exit_code(wait_child(outer, Duration::from_secs(40))) {
        NO_PRIVILEGE => {
            println!("figure: SKIPPED: no private pid namespace here (needs CAP_SYS_ADMIN)");
            None
        }
        code => Some(code),
    }
}

/// Whether this kernel gives pidfds (else the tests of what they bring say SKIPPED).
#[cfg(target_os = "linux")]
fn pidfds_here() -> bool {
    // SAFETY: getpid has no preconditions.
    match pidfd_open(unsafe { libc::getpid() }) {
        Ok(fd) => {
            // SAFETY: the fd pidfd_open just gave us, closed once.
            unsafe { libc::close(fd) };
            true
        }
        Err(e) => {
            println!("figure: SKIPPED: no pidfd here ({e})");
            false
        }
    }
}

/// The pidfds this process holds.
#[cfg(target_os = "linux")]
fn open_pidfds() -> Vec<libc::c_int> {
    let dir = std::fs::read_dir("/proc/self/fd").expect("procfs");
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let target = std::fs::read_link(entry.path()).ok()?;
        let fd = entry.file_name().to_str()?.parse().ok()?;
        (target.to_str()? == "anon_inode:[pidfd]").then_some(fd)
    })
    .collect()
}

/// In [`in_private_pid_namespace`]: the next fork gets `pid` (if it is free).
#[cfg(target_os = "linux")]
fn set_next_pid(pid: libc::pid_t) {
    std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
        .expect("writing ns_last_pid");
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
fn process_exit_status_is_reported_also_when_it_exited_before_the_watch(
    #[case] kind: Kind,
    #[values(Reaping::Native, Reaping::Waitpid)] reaping: Reaping,
) {
    isolated(|| {
        reaping.set_up();
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
        assert_eq!(status(&early_reports, 0).code(), Some(3));
        assert_eq!(status(&late_reports, 0).code(), Some(4));
    });
}

#[apply(backends)]
fn process_killed_child_reports_its_signal(
    #[case] kind: Kind,
    #[values(Reaping::Native, Reaping::Waitpid)] reaping: Reaping,
) {
    isolated(|| {
        reaping.set_up();
        let mut lp = new_loop(kind);
        let pid = sleeper();
        let reports = watch(&mut lp, pid);
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert!(reports.borrow().is_empty(), "still running");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        assert!(loop_until(&mut lp, 50 * U, || !reports.borrow().is_empty()));
        assert_eq!(status(&reports, 0).signal(), Some(libc::SIGTERM));
    });
}

#[apply(backends)]
fn process_any_child_watch_sees_every_child_and_reaps_only_in_dispatch(
    #[case] kind: Kind,
    #[values(Reaping::Native, Reaping::Waitpid)] reaping: Reaping,
) {
    isolated(|| {
        reaping.set_up();
        let mut lp = new_loop(kind);
        let reports: Reports = Rc::default();
        let r = reports.clone();
        lp.watch_any_child(move |_, (), pid, status| r.borrow_mut().push((pid, Ok(status))))
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
        assert!((0..3).all(|i| status(&reports, i).code() == Some(0)));
    });
}

#[apply(backends)]
fn process_watch_leaves_other_children_to_their_owners(
    #[case] kind: Kind,
    #[values(Reaping::Native, Reaping::Waitpid)] reaping: Reaping,
) {
    isolated(|| {
        reaping.set_up();
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
        let err = lp.watch_process(pid, |_, (), _, _| {}).unwrap_err();
        assert!(matches!(err, Error::NotAChild(p) if p == pid), "{err}");
    }
}

#[apply(backends)]
fn process_watch_in_a_forked_child_does_not_report_the_parents_children(
    #[case] kind: Kind,
    #[values(Reaping::Native, Reaping::Waitpid)] reaping: Reaping,
) {
    isolated(|| {
        reaping.set_up();
        let mut lp = new_loop(kind);
        let sibling = sleeper();
        let parent_reports = watch(&mut lp, sibling);
        let inner = raw_fork(|| {
            // Keeps the inherited loop: post_fork runs on first use and drops the
            // parent's child watches.
            let calls = Rc::new(Cell::new(0));
            let c = calls.clone();
            let own = raw_fork(|| 0);
            lp.watch_process(own, move |_, (), _, _| c.set(c.get() + 1))
                .unwrap();
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(sibling, libc::SIGTERM) };
            let ok = loop_until(&mut lp, 50 * U, || calls.get() == 1);
            lp.loop_once(Some(U), &mut ()).unwrap();
            let stranger = matches!(
                lp.watch_process(sibling, |_, (), _, _| {}),
                Err(Error::NotAChild(_))
            );
            (!(ok && calls.get() == 1 && stranger && parent_reports.borrow().is_empty())) as i32
        });
        assert_eq!(exit_code(wait_child(inner, Duration::from_secs(20))), 0);
        // The parent's watch is intact and reports its own child's exit.
        assert!(loop_until(&mut lp, 50 * U, || !parent_reports
            .borrow()
            .is_empty()));
        assert_eq!(status(&parent_reports, 0).signal(), Some(libc::SIGTERM));
    });
}

#[apply(backends)]
fn process_watch_of_a_child_reaped_elsewhere_ends_and_says_so(
    #[case] kind: Kind,
    #[values(Reaping::Native, Reaping::Waitpid)] reaping: Reaping,
) {
    isolated(|| {
        reaping.set_up();
        let mut lp = new_loop(kind);
        // Reaped by someone else (a plain waitpid here, as `Child::wait` would) before
        // the loop's first look, and while the loop is already watching.
        let early = raw_fork(|| 0);
        let (early_reports, early_watch) = watch_with_handle(&mut lp, early);
        assert_eq!(exit_code(wait_child(early, Duration::from_secs(20))), 0);
        let late = sleeper();
        let (late_reports, late_watch) = watch_with_handle(&mut lp, late);
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert!(late_reports.borrow().is_empty(), "still running");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(late, libc::SIGTERM) };
        let status = wait_child(late, Duration::from_secs(20));
        assert!(libc::WIFSIGNALED(status));
        let told = loop_until(&mut lp, 50 * U, || {
            !early_reports.borrow().is_empty() && !late_reports.borrow().is_empty()
        });
        assert!(told, "a watch of a child reaped elsewhere stayed watched");
        for (pid, reports) in [(early, &early_reports), (late, &late_reports)] {
            assert!(reaped_elsewhere(reports, pid), "{:?}", reports.borrow());
        }
        assert!(!lp.cancel(early_watch), "the watch ended");
        assert!(!lp.cancel(late_watch), "the watch ended");
    });
}

/// The pid of a child reaped elsewhere is given, on purpose, to a new child: the old
/// child's watch must not report (nor reap) the new one. Only a pidfd can tell them
/// apart, so this is a test of the native way; the fallback documents the gap.
#[cfg(target_os = "linux")]
#[apply(backends)]
fn process_watch_is_never_told_of_a_process_that_reused_its_pid(#[case] kind: Kind) {
    isolated(|| {
        if !pidfds_here() {
            return;
        }
        let code = in_private_pid_namespace(|| {
            let mut lp = new_loop(kind);
            let first = raw_fork(|| 0);
            let reports = watch(&mut lp, first);
            assert_eq!(exit_code(wait_child(first, Duration::from_secs(20))), 0);
            set_next_pid(first);
            let second = raw_fork(|| 42);
            assert_eq!(second, first, "pid reuse was not forced");
            assert!(loop_until(&mut lp, 50 * U, || !reports.borrow().is_empty()));
            assert!(
                reaped_elsewhere(&reports, first),
                "the watch of the first child was told of the second: {:?}",
                reports.borrow()
            );
            let second_status = wait_child(second, Duration::from_secs(20));
            assert_eq!(exit_code(second_status), 42, "the second is its owner's");
            0
        });
        if let Some(code) = code {
            assert_eq!(
                code, 0,
                "the test in the namespace failed (its stderr is above)"
            );
        }
    });
}

/// The graceful timeout's SIGKILL must reach only the worker it was armed for: here the
/// retired worker exits in time and its pid goes, on purpose, to a later worker, which
/// must outlive the timer. Hooks drive the master: worker 1 asks for a HUP (worker 2
/// replaces it), worker 1's exit asks for another (worker 3, given worker 1's pid,
/// replaces worker 2), and a TERM comes once worker 1's timer is due — handled in the
/// iteration that fires the timer or a later one, while worker 3 is still in the table.
#[cfg(all(target_os = "linux", feature = "server"))]
#[test]
fn server_graceful_timeout_never_kills_a_worker_that_reused_a_retired_workers_pid() {
    use forkloop::server::{Config, Request, Responder, Server, Worker};

    const GRACEFUL: Duration = Duration::from_secs(1);
    isolated(|| {
        let code = in_private_pid_namespace(|| {
            type Exits = Rc<RefCell<Vec<(usize, libc::pid_t, ExitStatus)>>>;
            let exits: Exits = Rc::default();
            let first_pid = Rc::new(Cell::new(0));
            let mut config = Config::default();
            config.supervisor.listen = vec!["127.0.0.1:0".into()];
            config.supervisor.workers = 1;
            config.supervisor.graceful_timeout = GRACEFUL;
            let (e, f) = (exits.clone(), first_pid.clone());
            let f2 = first_pid.clone();
            let server = Server::new(config, |_: &mut Loop<Worker>, _: Request, _: Responder| {})
                .after_fork(|slot| {
                    if slot == 1 {
                        // SAFETY: kill has no memory-safety preconditions; pid 1 is
                        // the master, which watches HUP.
                        unsafe { libc::kill(1, libc::SIGHUP) };
                    }
                })
                .before_fork(move |slot| {
                    if slot == 3 {
                        set_next_pid(f2.get());
                    }
                })
                .on_worker_exit(move |slot, pid, status| {
                    e.borrow_mut().push((slot, pid, status));
                    if slot != 1 {
                        return;
                    }
                    f.set(pid);
                    // Worker 1's timer was armed before it exited: due by then.
                    let due = Instant::now() + GRACEFUL + Duration::from_millis(100);
                    std::thread::spawn(move || {
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                        // SAFETY: as above.
                        unsafe { libc::kill(1, libc::SIGTERM) };
                    });
                    // SAFETY: as above.
                    unsafe { libc::kill(1, libc::SIGHUP) };
                });
            if let Err(e) = server.run() {
                eprintln!("server: {e}");
                return 1;
            }
            let exits = exits.borrow();
            eprintln!("exits: {exits:?}");
            let third = exits.iter().find(|(slot, _, _)| *slot == 3);
            let Some(&(_, pid, status)) = third else {
                eprintln!("no worker 3");
                return 2;
            };
            if pid != first_pid.get() {
                eprintln!("pid reuse was not forced: worker 3 is {pid}");
                return 3;
            }
            if status.signal() == Some(libc::SIGKILL) {
                eprintln!("worker 1's graceful timeout killed worker 3, which had its pid");
                return 4;
            }
            0
        });
        if let Some(code) = code {
            assert_eq!(
                code, 0,
                "the test in the namespace failed (its stderr is above)"
            );
        }
    });
}

/// A pidfd watch needs no SIGCHLD: the disposition stays the process's own, and a second
/// loop of the process can watch children of its own (a signal has one loop at a time).
/// Where SIGCHLD is ignored the kernel would reap the child at once, so the loop then
/// takes SIGCHLD after all, and the status is still reported.
#[cfg(target_os = "linux")]
#[apply(backends)]
fn process_pidfd_watch_needs_no_sigchld_unless_it_is_ignored(#[case] kind: Kind) {
    fn disposition() -> libc::sighandler_t {
        // SAFETY: sigaction is plain old data; a null new action only reads the current.
        let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut current) },
            0
        );
        current.sa_sigaction
    }
    isolated(|| {
        if !pidfds_here() {
            return;
        }
        let mut lp = new_loop(kind);
        let mut other = new_loop(kind);
        let (a, b) = (sleeper(), raw_fork(|| 5));
        let a_reports = watch(&mut lp, a);
        let b_reports = watch(&mut other, b);
        assert_eq!(disposition(), libc::SIG_DFL, "SIGCHLD was taken");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(a, libc::SIGTERM) };
        assert!(loop_until(&mut lp, 50 * U, || !a_reports
            .borrow()
            .is_empty()));
        assert!(loop_until(&mut other, 50 * U, || !b_reports
            .borrow()
            .is_empty()));
        assert_eq!(status(&a_reports, 0).signal(), Some(libc::SIGTERM));
        assert_eq!(status(&b_reports, 0).code(), Some(5));

        // SAFETY: SIG_IGN for SIGCHLD: no handler runs.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
        let c = sleeper();
        let c_reports = watch(&mut lp, c);
        assert_ne!(disposition(), libc::SIG_IGN, "the loop took SIGCHLD");
        // SAFETY: as above.
        unsafe { libc::kill(c, libc::SIGTERM) };
        assert!(loop_until(&mut lp, 50 * U, || !c_reports
            .borrow()
            .is_empty()));
        assert_eq!(status(&c_reports, 0).signal(), Some(libc::SIGTERM));
        assert_eq!(
            disposition(),
            libc::SIG_IGN,
            "given back when the watch ended"
        );
    });
}

/// An any-child watch reaps with waitpid(-1), yet a child with a watch of its own is
/// reported to that watch, and only the others to the any-child watch.
#[apply(backends)]
fn process_any_child_watch_leaves_watched_children_to_their_watches(
    #[case] kind: Kind,
    #[values(Reaping::Native, Reaping::Waitpid)] reaping: Reaping,
) {
    isolated(|| {
        reaping.set_up();
        let mut lp = new_loop(kind);
        let any: Reports = Rc::default();
        let r = any.clone();
        lp.watch_any_child(move |_, (), pid, status| r.borrow_mut().push((pid, Ok(status))))
            .unwrap();
        let watched = raw_fork(|| 6);
        let own = watch(&mut lp, watched);
        let unwatched = raw_fork(|| 7);
        wait_exited_unreaped(watched);
        wait_exited_unreaped(unwatched);
        assert!(loop_until(&mut lp, 50 * U, || {
            !own.borrow().is_empty() && !any.borrow().is_empty()
        }));
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert_eq!(own.borrow().len(), 1);
        assert_eq!(status(&own, 0).code(), Some(6));
        assert_eq!(any.borrow().len(), 1, "{:?}", any.borrow());
        assert_eq!(any.borrow()[0].0, unwatched);
        assert_eq!(status(&any, 0).code(), Some(7));
    });
}

/// A watch's pidfd is closed when the watch reports, when it is cancelled, and in a
/// forked child: by post_fork (the inherited loop) and at once in a `Loop::fork` child.
#[cfg(target_os = "linux")]
#[apply(backends)]
fn process_pidfds_close_when_watches_end_are_cancelled_or_forked_away(
    #[case] kind: Kind,
    #[values(Reaping::Native, Reaping::Waitpid)] reaping: Reaping,
) {
    isolated(|| {
        reaping.set_up();
        let per_watch = match reaping {
            Reaping::Native if pidfds_here() => 1,
            _ => 0,
        };
        let mut lp = new_loop(kind);
        assert!(open_pidfds().is_empty());
        let pids = [sleeper(), sleeper(), sleeper()];
        let mut watches: Vec<_> = pids
            .iter()
            .map(|&p| watch_with_handle(&mut lp, p))
            .collect();
        assert_eq!(open_pidfds().len(), 3 * per_watch);
        for fd in open_pidfds() {
            // SAFETY: F_GETFD only reads the flags of an fd we hold.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert!(
                flags & libc::FD_CLOEXEC != 0,
                "pidfd {fd} is not close-on-exec"
            );
        }
        let loop_fork_child = lp
            .fork(forkloop::ForkOptions::new(), || open_pidfds().len() as i32)
            .unwrap();
        assert_eq!(
            exit_code(wait_child(loop_fork_child, Duration::from_secs(20))),
            0,
            "a Loop::fork child kept the parent's pidfds"
        );
        let raw_child = raw_fork(|| {
            let inherited = open_pidfds().len();
            lp.post_fork().unwrap();
            (inherited != 3 * per_watch || !open_pidfds().is_empty()) as i32
        });
        assert_eq!(
            exit_code(wait_child(raw_child, Duration::from_secs(20))),
            0,
            "post_fork kept the parent's pidfds"
        );
        let (_, cancelled) = watches.remove(0);
        assert!(lp.cancel(cancelled));
        assert_eq!(open_pidfds().len(), 2 * per_watch);
        for &pid in &pids {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let reported = || watches.iter().all(|(r, _)| !r.borrow().is_empty());
        assert!(loop_until(&mut lp, 50 * U, reported));
        assert!(open_pidfds().is_empty());
        assert!(libc::WIFSIGNALED(wait_child(
            pids[0],
            Duration::from_secs(20)
        )));
    });
}
