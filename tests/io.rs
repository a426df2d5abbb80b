//! looptests.md, group io: readiness, hangup, partial unwatch and dispatch skipping.

mod common;

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use forkloop::{Error, Interest, Io, Kind, Loop, Readiness, Watch};
use rstest::rstest;
use rstest_reuse::apply;

#[apply(backends)]
fn io_watch_does_not_keep_its_callback_alive_after_cancel_or_drop(#[case] kind: Kind) {
    let (s1, _s2) = socketpair();
    let s1 = Rc::new(s1);
    let token = Rc::new(());
    let mut lp = new_loop(kind);
    let t = token.clone();
    let w = lp
        .watch_io(s1.clone(), Interest::READ, move |_, (), _, _| {
            let _ = &t;
        })
        .unwrap();
    assert_eq!(Rc::strong_count(&token), 2);
    assert!(lp.cancel(w));
    assert_eq!(Rc::strong_count(&token), 1, "cancel releases the callback");
    let t = token.clone();
    lp.watch_io(s1.clone(), Interest::READ, move |_, (), _, _| {
        let _ = &t;
    })
    .unwrap();
    drop(lp);
    assert_eq!(
        Rc::strong_count(&token),
        1,
        "dropping the loop releases the callback"
    );
}

#[apply(backends)]
fn io_read_waits_for_data_and_for_an_iteration(#[case] kind: Kind) {
    let (s1, mut s2) = socketpair();
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, s1, Interest::READ);
    assert_eq!(reads.get(), 0, "no callback before any iteration");
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 0, "no callback with nothing to read");
    s2.write_all(b"line\n").unwrap();
    assert_eq!(reads.get(), 0, "still none before an iteration");
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 1);
}

#[apply(backends)]
fn io_read_watch_works_again_after_unwatch_and_rewatch(#[case] kind: Kind) {
    let (s1, mut s2) = socketpair();
    // Rc: the same fd is watched again after the first watch is gone.
    let s1 = Rc::new(s1);
    let mut lp = new_loop(kind);
    let (_, w) = watch_counting(&mut lp, s1.clone(), Interest::READ);
    assert!(lp.cancel(w));
    assert!(!lp.cancel(w), "a second cancel is a harmless false");
    let (reads, _) = watch_counting(&mut lp, s1, Interest::READ);
    s2.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 1);
}

#[apply(backends)]
fn io_write_watch_fires_on_a_writable_socket(#[case] kind: Kind) {
    let (s1, _s2) = socketpair();
    let mut lp = new_loop(kind);
    let (writes, _) = watch_counting(&mut lp, s1, Interest::WRITE);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(writes.get(), 1);
}

#[apply(backends)]
fn io_unwatching_write_leaves_the_read_watch_without_spurious_wakeups(#[case] kind: Kind) {
    let (s1, mut s2) = socketpair();
    // Rc: both watches share the one fd number.
    let s1 = Rc::new(s1);
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, s1.clone(), Interest::READ);
    let (writes, w) = watch_counting(&mut lp, s1, Interest::WRITE);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!((reads.get(), writes.get()), (0, 1));
    lp.cancel(w);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(
        (reads.get(), writes.get()),
        (0, 1),
        "no read, no write after unwatch"
    );
    s2.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(
        (reads.get(), writes.get()),
        (1, 1),
        "the read watch survived"
    );
}

#[apply(backends)]
fn io_peer_hangup_is_readable(#[case] kind: Kind) {
    let (s1, s2) = socketpair();
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, s1, Interest::READ);
    drop(s2);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 1);
}

#[apply(backends)]
fn io_pipe_writer_closing_is_readable(#[case] kind: Kind) {
    let (r, w) = std::io::pipe().unwrap();
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, r, Interest::READ);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 0, "nothing before the writer closes");
    drop(w);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 1);
}

#[apply(backends)]
fn io_hangup_watch_reports_peer_close_or_is_refused_by_select(#[case] kind: Kind) {
    let (s1, s2) = socketpair();
    // Rc: two watches share the socket's fd number.
    let s1 = Rc::new(s1);
    let (r, w) = std::io::pipe().unwrap();
    let mut lp = new_loop(kind);
    let sock = lp.watch_io(s1.clone(), Interest::HANGUP, |_, (), _, _| {});
    if kind == Kind::Select {
        let err = sock.unwrap_err().error;
        assert!(matches!(err, Error::Watch { .. }), "{err}");
        assert!(err.to_string().contains("hangup"), "{err}");
        return;
    }
    sock.unwrap();
    let (hangups, h) = counter();
    lp.watch_io(s1, Interest::HANGUP, move |_, (), _, _| bump(&h))
        .unwrap();
    let (pipe_hangups, p) = counter();
    lp.watch_io(w, Interest::HANGUP, move |_, (), _, _| bump(&p))
        .unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!((hangups.get(), pipe_hangups.get()), (0, 0), "no hangup yet");
    drop(s2);
    drop(r);
    assert!(loop_until(&mut lp, 5 * U, || hangups.get() > 0
        && pipe_hangups.get() > 0));
}

type Pair = Rc<Cell<Option<(Watch, Watch)>>>;

/// A callback that counts its call and cancels both watches of `pair`.
fn cancel_both<S>(
    calls: &Rc<Cell<u32>>,
    pair: &Pair,
) -> impl FnMut(&mut Loop, &mut (), &S, Readiness) {
    let (calls, pair) = (calls.clone(), pair.clone());
    move |lp, (), _, _| {
        bump(&calls);
        let (a, b) = pair.get().unwrap();
        lp.cancel(a);
        lp.cancel(b);
    }
}

#[apply(backends)]
fn io_callback_cancelled_by_an_earlier_one_in_the_same_dispatch_is_skipped(#[case] kind: Kind) {
    let (s1, s2) = socketpair();
    // Rc: both watches share the one fd number.
    let s1 = Rc::new(s1);
    let mut lp = new_loop(kind);
    let watches: Pair = Rc::new(Cell::new(None));
    let (calls, _) = counter();
    let r = lp
        .watch_io(s1.clone(), Interest::READ, cancel_both(&calls, &watches))
        .unwrap();
    let w = lp
        .watch_io(s1, Interest::WRITE, cancel_both(&calls, &watches))
        .unwrap();
    watches.set(Some((r.into(), w.into())));
    drop(s2);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(calls.get(), 1, "exactly one of the two callbacks ran");
}

#[apply(backends)]
fn io_cancelling_another_fds_watch_in_one_dispatch_skips_it(#[case] kind: Kind) {
    let (a1, _a2) = socketpair();
    let (b1, _b2) = socketpair();
    let mut lp = new_loop(kind);
    let watches: Pair = Rc::new(Cell::new(None));
    let (calls, _) = counter();
    let a = lp.watch_io(a1, Interest::WRITE, cancel_both(&calls, &watches));
    let b = lp.watch_io(b1, Interest::WRITE, cancel_both(&calls, &watches));
    watches.set(Some((a.unwrap().into(), b.unwrap().into())));
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(calls.get(), 1);
}

#[apply(backends)]
fn io_stale_readiness_never_reaches_a_new_watch_on_a_reused_fd_number(#[case] kind: Kind) {
    // Isolated: the test relies on the kernel handing out the lowest free fd number.
    isolated(|| {
        let (a1, mut a2) = socketpair();
        let (b1, mut b2) = socketpair();
        let mut lp = new_loop(kind);
        let b_fd = b1.as_raw_fd();
        let b_watch: Rc<Cell<Option<Io<UnixStream>>>> = Rc::default();
        let bw = b_watch.clone();
        let (stale, st) = counter();
        let (replaced, r) = counter();
        let kept = Rc::new(RefCell::new(Vec::new()));
        let k = kept.clone();
        // a is watched (and written) first, so every backend reports it before b: its
        // callback cancels b's watch, which owns b and so closes it, while b's event is
        // still in this batch, and watches a new socket that takes b's number.
        lp.watch_io(a1, Interest::READ, move |lp, (), _, _| {
            let Some(b) = bw.take() else {
                return;
            };
            lp.cancel(b); // drops (closes) b1
            let (fresh, peer) = socketpair();
            assert_eq!(
                fresh.as_raw_fd(),
                b_fd,
                "precondition: the number is reused"
            );
            let st = st.clone();
            lp.watch_io(fresh, Interest::READ, move |_, (), _, _| bump(&st))
                .unwrap();
            bump(&r);
            k.borrow_mut().push(peer);
        })
        .unwrap();
        b_watch.set(Some(
            lp.watch_io(b1, Interest::READ, |_, (), _, _| {}).unwrap(),
        ));
        a2.write_all(b"a").unwrap();
        b2.write_all(b"b").unwrap();
        lp.loop_once(Some(U), &mut ()).unwrap();
        assert_eq!(replaced.get(), 1);
        assert_eq!(
            stale.get(),
            0,
            "the closed fd's readiness reached the new watch"
        );
    });
}

#[apply(backends)]
fn io_pending_socket_error_is_readable(#[case] kind: Kind) {
    let s1 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let s2 = UdpSocket::bind("127.0.0.1:0").unwrap();
    s1.connect(s2.local_addr().unwrap()).unwrap();
    s1.set_nonblocking(true).unwrap();
    drop(s2);
    // Rc: the test sends and receives on the watched socket.
    let s1 = Rc::new(s1);
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, s1.clone(), Interest::READ);
    s1.send(b"ping").unwrap();
    assert!(loop_until(&mut lp, 5 * U, || reads.get() > 0));
    let mut buf = [0u8; 8];
    let err = s1.recv(&mut buf).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[apply(backends)]
fn io_regular_file_is_always_read_and_write_ready(#[case] kind: Kind) {
    // Rc: both watches share the one fd number.
    let file = Rc::new(tempfile());
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, file.clone(), Interest::READ);
    let (writes, w) = watch_counting(&mut lp, file, Interest::WRITE);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!((reads.get(), writes.get()), (1, 1));
    lp.cancel(w);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!((reads.get(), writes.get()), (2, 1));
}

fn tempfile() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("forkloop-io-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

#[apply(backends)]
fn io_separate_read_and_write_watches_on_one_fd_both_fire(#[case] kind: Kind) {
    let (s1, mut s2) = socketpair();
    // Rc: both watches share the one fd number.
    let s1 = Rc::new(s1);
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, s1.clone(), Interest::READ);
    let (writes, _) = watch_counting(&mut lp, s1, Interest::WRITE);
    s2.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!((reads.get(), writes.get()), (1, 1));
}

#[apply(backends)]
fn io_watches_survive_post_fork(#[case] kind: Kind) {
    let (s1, mut s2) = socketpair();
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, s1, Interest::READ);
    let before = lp.backend_fd();
    lp.post_fork().unwrap();
    lp.post_fork().unwrap();
    if before.is_some() {
        assert!(lp.backend_fd().is_some());
    }
    s2.write_all(b"x").unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 1);
}

#[apply(backends)]
fn io_level_triggered_until_drained(#[case] kind: Kind) {
    let (s1, mut s2) = socketpair();
    // Rc: the test drains the watched socket itself.
    let s1 = Rc::new(s1);
    let mut lp = new_loop(kind);
    let (reads, _) = watch_counting(&mut lp, s1.clone(), Interest::READ);
    s2.write_all(b"xyz").unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 2, "still readable: reported again");
    assert_eq!(drain(&s1), 3);
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 2, "drained: not reported");
}

/// kqueue fixes a filter's EV_CLEAR when the filter is added: a read watch joining a
/// hangup-only one (whose read filter is EV_CLEAR) must get a level-triggered filter, and
/// the hangup-only watch left when it goes must not be woken by unread data (issue #10).
#[apply(backends)]
fn io_read_watch_joining_and_leaving_a_hangup_watch_switches_the_trigger_mode(#[case] kind: Kind) {
    if kind == Kind::Select {
        return; // refuses hangup-only watches (io_hangup_watch_reports_peer_close_…)
    }
    let (s1, mut s2) = socketpair();
    // Rc: both watches share the one fd number (kqueue's filters are per fd).
    let s1 = Rc::new(s1);
    let mut lp = new_loop(kind);
    let (hangups, _) = watch_counting(&mut lp, s1.clone(), Interest::HANGUP);
    let (reads, read) = watch_counting(&mut lp, s1, Interest::READ);
    s2.write_all(b"xyz").unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(reads.get(), 2, "still readable: reported again");
    lp.cancel(read);
    // The data stays unread; the re-added filter may report it once.
    lp.loop_once(Some(U), &mut ()).unwrap();
    let start = Instant::now();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert!(
        start.elapsed() >= U / 2,
        "unread data woke a hangup-only watch's loop again ({:?})",
        start.elapsed()
    );
    assert_eq!(hangups.get(), 0, "no hangup yet");
}

#[apply(backends)]
fn io_closed_and_invalid_fds_are_refused(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    // No owned source can hold a negative or a closed fd: only raw fds can be these.
    // SAFETY: the loop refuses -1 before any registration, and fd 1,000,000 is not open
    // (a test process opens nowhere near that many), so the backend refuses it: no watch
    // is made, so nothing has to stay open. Were one made, the loop would only hand the
    // number to the kernel; it never dereferences memory through an fd.
    let err = unsafe { lp.watch_raw_fd(-1, Interest::READ, |_, (), _, _| {}) }.unwrap_err();
    assert!(matches!(err, Error::InvalidFd(-1)), "{err}");
    let closed = 1_000_000;
    // SAFETY: as above.
    let err = unsafe { lp.watch_raw_fd(closed, Interest::READ, |_, (), _, _| {}) }.unwrap_err();
    assert!(
        matches!(err, Error::Watch { fd, .. } if fd == closed),
        "{err}"
    );
    let (s1, _s2) = socketpair();
    let fd = s1.as_raw_fd();
    let err = lp
        .watch_io(s1, Interest::NONE, |_, (), _, _| {})
        .unwrap_err()
        .error;
    assert!(matches!(err, Error::EmptyInterest(f) if f == fd), "{err}");
    assert!(err.to_string().contains("needs an interest"), "{err}");
}

#[rstest]
#[cfg_attr(
    not(feature = "select"),
    ignore = "select backend not compiled in (feature `select`)"
)]
fn select_refuses_fds_beyond_fd_setsize() {
    // Isolated: it raises the fd limit and places an fd by number.
    isolated(|| {
        raise_fd_limit(libc::FD_SETSIZE as u64 + 64);
        let (s1, _s2) = socketpair();
        // SAFETY: dup2 onto a free high number (dup2 has no memory-safety preconditions).
        let high = unsafe { libc::dup2(s1.as_raw_fd(), libc::FD_SETSIZE as i32 + 10) };
        if high < 0 {
            panic!(
                "dup2 above FD_SETSIZE: {} (raise RLIMIT_NOFILE)",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: dup2 just made `high`, an open fd nothing else owns.
        let high_fd = unsafe { OwnedFd::from_raw_fd(high) };
        let mut lp = new_loop(Kind::Select);
        let refused = lp
            .watch_io(high_fd, Interest::READ, |_, (), _, _| {})
            .unwrap_err();
        assert_eq!(
            refused.source.as_fd().as_raw_fd(),
            high,
            "the refused source is handed back"
        );
        drop(refused.source); // closes the duplicate
        let err = refused.error;
        assert!(
            matches!(
                err,
                Error::FdAboveLimit { backend: "select", fd, limit }
                    if fd == high && limit == libc::FD_SETSIZE
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&libc::FD_SETSIZE.to_string()) && text.contains("use the poll or epoll"),
            "{text}"
        );
    });
}

#[rstest]
#[cfg_attr(
    not(feature = "poll"),
    ignore = "poll backend not compiled in (feature `poll`)"
)]
fn fd_closed_while_watched_is_an_error_naming_it() {
    // Isolated: another test thread could reuse the closed fd number.
    isolated(|| {
        let (s1, _s2) = socketpair();
        let fd = s1.as_raw_fd();
        let mut lp = new_loop(Kind::Poll);
        // SAFETY: this test breaks the contract on purpose: it closes `fd` below while
        // the watch lives, to check the documented misbehaviour (poll fails the wait
        // with ClosedWhileWatched). That is no UB: the loop never dereferences memory
        // through an fd, it only passes the number to poll(2); and the process is the
        // test's own, so no other thread can be handed the number meanwhile.
        unsafe { lp.watch_raw_fd(fd, Interest::READ, |_, (), _, _| {}) }.unwrap();
        drop(s1);
        let err = lp.loop_once(Some(U), &mut ()).unwrap_err();
        assert!(
            matches!(err, Error::ClosedWhileWatched { backend: "poll", fd: f } if f == fd),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("fd {fd} was closed while still watched")),
            "{text}"
        );
    });
}

#[test]
fn io_a_negative_fd_is_an_error_whatever_the_backend_accepts() {
    // Inert accepts any registration, as a careless custom backend may.
    let mut lp: Loop = Loop::from_backend(Box::new(Inert { kernel_fd: None })).unwrap();
    // SAFETY: -1 names no file; the loop refuses it before any registration, so no
    // watch is made and nothing has to stay open.
    let err = unsafe { lp.watch_raw_fd(-1, Interest::READ, |_, (), _, _| {}) }.unwrap_err();
    assert!(matches!(err, Error::InvalidFd(-1)), "{err}");
    assert!(err.to_string().contains("-1"), "{err}");
}

/// Wraps a real backend and reports readable and writable as two events for one fd,
/// as kqueue does (one event per filter).
struct PerFilter(Box<dyn forkloop::Backend>);

impl forkloop::Backend for PerFilter {
    fn name(&self) -> &'static str {
        "per-filter"
    }
    fn register(&mut self, fd: i32, interest: Interest) -> std::io::Result<()> {
        self.0.register(fd, interest)
    }
    fn modify(&mut self, fd: i32, interest: Interest) -> std::io::Result<()> {
        self.0.modify(fd, interest)
    }
    fn deregister(&mut self, fd: i32) -> std::io::Result<()> {
        self.0.deregister(fd)
    }
    fn wait(
        &mut self,
        events: &mut Vec<forkloop::Event>,
        timeout: Option<std::time::Duration>,
    ) -> std::io::Result<()> {
        let mut merged = Vec::new();
        self.0.wait(&mut merged, timeout)?;
        for event in merged {
            for part in [Readiness::READABLE, Readiness::WRITABLE] {
                if event.readiness.contains(part) {
                    events.push(forkloop::Event {
                        fd: event.fd,
                        readiness: part,
                    });
                }
            }
        }
        Ok(())
    }
    fn post_fork(
        &mut self,
        registrations: &mut dyn Iterator<Item = (i32, Interest)>,
    ) -> std::io::Result<()> {
        self.0.post_fork(registrations)
    }
}

/// What a watch of `source` saw, one entry per call.
fn recording(
    lp: &mut Loop,
    source: impl AsFd + 'static,
    interest: Interest,
) -> Rc<RefCell<Vec<Readiness>>> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let s = seen.clone();
    lp.watch_io(source, interest, move |_, (), _, ready| {
        s.borrow_mut().push(ready)
    })
    .unwrap();
    seen
}

#[test]
fn io_readiness_is_merged_per_fd_when_a_backend_reports_one_event_per_filter() {
    let mut lp: Loop =
        Loop::from_backend(Box::new(PerFilter(Kind::best().unwrap().create().unwrap()))).unwrap();
    let (s1, mut s2) = socketpair();
    // Rc: both watches share the one fd number, whose readiness is merged.
    let s1 = Rc::new(s1);
    s2.write_all(b"x").unwrap();
    let both = recording(&mut lp, s1.clone(), Interest::READ | Interest::WRITE);
    let read = recording(&mut lp, s1, Interest::READ);
    lp.loop_once(Some(U), &mut ()).unwrap();
    let ready = Readiness::READABLE | Readiness::WRITABLE;
    assert_eq!(
        *both.borrow(),
        [ready],
        "one call with both, not one per filter"
    );
    assert_eq!(
        *read.borrow(),
        [ready],
        "a second watch of the fd also runs once"
    );
}

#[apply(backends)]
fn io_a_read_write_watch_runs_once_per_iteration_with_both(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let (s1, mut s2) = socketpair();
    s2.write_all(b"x").unwrap();
    let both = recording(&mut lp, s1, Interest::READ | Interest::WRITE);
    lp.loop_once(Some(U), &mut ()).unwrap();
    let seen = both.borrow();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].contains(Readiness::READABLE | Readiness::WRITABLE),
        "{seen:?}"
    );
}

#[apply(backends)]
fn io_a_watch_from_another_loop_is_refused(#[case] kind: Kind) {
    let (s1, _s2) = socketpair();
    // Rc: both loops watch the one fd number, so only the loop's brand tells them apart.
    let s1 = Rc::new(s1);
    let mut a = new_loop(kind);
    let mut b = new_loop(kind);
    let (_, wa) = watch_counting(&mut a, s1.clone(), Interest::READ);
    let (_, wb) = watch_counting(&mut b, s1, Interest::READ);
    assert!(!b.cancel(wa), "a's watch is not b's to cancel");
    assert!(b.cancel(wb), "b's own watch was left alone");
    assert!(a.cancel(wa));
    let ta = a.after(U, |_, ()| {});
    let tb = b.after(U, |_, ()| {});
    assert!(!a.cancel(tb) && !b.cancel(ta), "timers are branded too");
    assert!(a.cancel(ta) && b.cancel(tb));
}

/// An fd closed without cancelling its watch while a dup keeps its file open: epoll keeps
/// that file's registration under the old number. A new fd given the number must still
/// be watched for itself, and the old file's readiness must never reach its watch.
#[apply(backends)]
fn io_an_fd_closed_behind_the_loops_back_while_a_dup_lives_never_confuses_its_successor(
    #[case] kind: Kind,
) {
    // In a process of its own: the test needs the kernel to hand out the closed number
    // again, and other test threads open fds too.
    isolated(|| {
        let mut lp = new_loop(kind);
        let (old, mut old_peer) = socketpair();
        let dup = old.try_clone().unwrap(); // keeps the old file open
        let number = old.as_raw_fd();
        // SAFETY: this test breaks the contract on purpose: it closes `old` below while
        // the watch lives, to check the documented misbehaviour (the number's next file
        // is reported, or the wait or a watch of the number fails with
        // ClosedWhileWatched) and that no stale readiness reaches the new fd's watch.
        // That is no UB: the loop never dereferences memory through an fd, it only hands
        // the number to the kernel; and the process is the test's own.
        let old_watch =
            unsafe { lp.watch_raw_fd(number, Interest::READ, |_, (), _, _| {}) }.unwrap();
        drop(old); // closed behind the loop's back
        let (new, mut new_peer) = socketpair();
        assert_eq!(new.as_raw_fd(), number, "the number is reused");
        let (new_calls, c) = counter();
        let watch_new = |lp: &mut Loop, new: UnixStream| {
            let c = c.clone();
            lp.watch_io(new, Interest::READ, move |_, (), _, _| bump(&c))
        };
        match watch_new(&mut lp, new) {
            Ok(_) => {} // poll and select watch numbers: the old watch now sees the new fd
            Err(refused) => {
                let e = &refused.error;
                assert!(
                    matches!(e, Error::ClosedWhileWatched { fd, .. } if *fd == number),
                    "{e}"
                );
                assert!(lp.cancel(old_watch));
                watch_new(&mut lp, refused.source)
                    .expect("watching the new fd once the old watch is gone");
            }
        }
        lp.cancel(old_watch);
        old_peer.write_all(b"old").unwrap(); // the old file, still open through `dup`
        let start = std::time::Instant::now();
        let mut iterations = 0;
        while start.elapsed() < 3 * U {
            lp.loop_once(Some(U), &mut ()).unwrap();
            iterations += 1;
        }
        assert_eq!(
            new_calls.get(),
            0,
            "the old file's readiness reached the new fd's watch"
        );
        assert!(
            iterations < 100,
            "{iterations} iterations in 3 U: the loop spins"
        );
        new_peer.write_all(b"new").unwrap();
        assert!(
            loop_until(&mut lp, 50 * U, || new_calls.get() > 0),
            "the new fd is not watched"
        );
        drop(dup);
    });
}

/// A socketpair whose first end has a byte to read: `(readable, peer)`.
fn readable_pair() -> (
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixStream,
) {
    let (ours, mut peer) = socketpair();
    peer.write_all(b"x").unwrap();
    (ours, peer)
}

#[apply(backends)]
fn io_a_nested_iteration_dispatches_an_fd_the_outer_one_reported(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let ((a, _a_peer), (b, _b_peer)) = (readable_pair(), readable_pair());
    let (b_calls, c) = counter();
    lp.watch_io(b, Interest::READ, move |_, (), _, _| bump(&c))
        .unwrap();
    let nested_saw_b = Rc::new(Cell::new(None));
    let (saw, seen) = (nested_saw_b.clone(), b_calls.clone());
    lp.watch_io(a, Interest::READ, move |lp, (), a, _| {
        drain(a);
        if saw.get().is_none() {
            saw.set(Some(loop_until(lp, 50 * U, || seen.get() > 0)));
        }
    })
    .unwrap();
    lp.loop_once(Some(U), &mut ()).unwrap();
    assert_eq!(nested_saw_b.get(), Some(true), "B was never dispatched");
}

#[apply(backends)]
fn io_a_caught_panic_in_a_callback_leaves_the_other_fds_dispatched(#[case] kind: Kind) {
    let mut lp = new_loop(kind);
    let ((a, _a_peer), (b, _b_peer)) = (readable_pair(), readable_pair());
    // Owned by its watch: the unwind must put the source back, not drop it (closing its
    // fd under a watch that stays registered would fail every later wait on poll).
    let a_fd = a.as_raw_fd();
    let mut first = true;
    lp.watch_io(a, Interest::READ, move |_, (), _, _| {
        if std::mem::take(&mut first) {
            panic!("a callback panics, once")
        }
    })
    .unwrap();
    let (b_calls, c) = counter();
    lp.watch_io(b, Interest::READ, move |_, (), _, _| bump(&c))
        .unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..2 {
            lp.loop_once(Some(U), &mut ()).unwrap();
        }
    }));
    assert!(
        caught.is_err(),
        "A is readable, so its callback ran and panicked"
    );
    // SAFETY: F_GETFD only reads the flags of whatever `a_fd` names.
    let open = unsafe { libc::fcntl(a_fd, libc::F_GETFD) } >= 0;
    assert!(
        open,
        "the panicking watch's source was dropped by the unwind"
    );
    let before = b_calls.get();
    assert!(
        loop_until(&mut lp, 50 * U, || b_calls.get() > before),
        "B is deaf after the panic"
    );
}

/// The stale-registration rebuild needs a new kernel object: out of fds (EMFILE), the
/// wait fails, and the loop's other watches must still work once fds are free again.
#[apply(backends)]
fn io_a_rebuild_that_runs_out_of_fds_loses_no_watch(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (live, mut live_peer) = socketpair();
        let (live_calls, _) = watch_counting(&mut lp, live, Interest::READ);
        // A stale registration, as in the test above: closed behind the loop's back
        // (only then does epoll keep it), while a dup keeps its file open.
        let (old, mut old_peer) = socketpair();
        let dup = old.try_clone().unwrap();
        // SAFETY: this test breaks the contract on purpose: it closes `old` while the
        // watch lives, to leave a stale registration behind. That is no UB: the loop
        // never dereferences memory through an fd, it only hands the number to the
        // kernel; the watch is cancelled right after, and the process is the test's own.
        let old_watch =
            unsafe { lp.watch_raw_fd(old.as_raw_fd(), Interest::READ, |_, (), _, _| {}) }.unwrap();
        drop(old);
        lp.cancel(old_watch);
        old_peer.write_all(b"old").unwrap();
        // Every fd taken (under a low limit, so that takes few).
        let limit = libc::rlimit {
            rlim_cur: 256,
            rlim_max: 256,
        };
        // SAFETY: setrlimit reads a live rlimit; lowering a limit is always allowed.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let mut hog = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hog.push(f);
        }
        let _ = lp.loop_once(Some(U), &mut ()); // a backend that rebuilds here fails with EMFILE
        drop(hog);
        live_peer.write_all(b"live").unwrap();
        assert!(
            loop_until_ok(&mut lp, 50 * U, || live_calls.get() > 0),
            "the live fd is no longer watched"
        );
        drop(dup);
    });
}

/// `loop_until`, but a failing iteration is retried rather than fatal.
fn loop_until_ok(lp: &mut Loop, limit: std::time::Duration, done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = lp.loop_once(Some(left), &mut ());
    }
    true
}

/// What a loop of [`io_exclusive_watches_of_a_shared_listener_tell_one_loop_on_epoll_every_loop_elsewhere`]
/// reports to the test.
enum Report {
    /// About to block in its wait: its thread id.
    Waiting(i32),
    /// Its listener's watch fired.
    Told,
}

/// One of several loops on threads of their own, each watching a copy of one listener
/// with `READ | EXCLUSIVE` until the test writes to `stop`: how often it was told.
fn loop_on_a_shared_listener(
    kind: Kind,
    listener: TcpListener,
    stop: UnixStream,
    reports: mpsc::Sender<Report>,
) -> u32 {
    struct Seen {
        watch: Option<Io<TcpListener>>,
        told: u32,
        reports: mpsc::Sender<Report>,
    }
    let mut lp: Loop<Seen> = Loop::with_backend(kind).unwrap();
    let exclusive = Interest::READ | Interest::EXCLUSIVE;
    let watch = lp
        .watch_io(listener, exclusive, |lp, seen, _, _| {
            seen.told += 1;
            seen.reports.send(Report::Told).unwrap();
            // Nobody accepts, so the connection stays queued and every loop the kernel
            // told reports it; paused, this one does not report it again.
            lp.pause(seen.watch.unwrap()).unwrap();
        })
        .unwrap();
    lp.watch_io(stop, Interest::READ, |lp, _, _, _| lp.stop(0))
        .unwrap();
    lp.after(50 * U, |lp, _| lp.stop(1));
    let mut seen = Seen {
        watch: Some(watch),
        told: 0,
        reports,
    };
    seen.reports.send(Report::Waiting(thread_id())).unwrap();
    assert_eq!(
        lp.run(&mut seen).unwrap(),
        0,
        "the test's stop, not the bound"
    );
    // Whatever the kernel had told this loop by the time the stop came.
    lp.loop_once(Some(Duration::ZERO), &mut seen).unwrap();
    seen.told
}

#[cfg(target_os = "linux")]
fn thread_id() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

#[cfg(not(target_os = "linux"))]
fn thread_id() -> i32 {
    0
}

/// Waits (bounded) until thread `tid` of this process sleeps in `epoll_wait`: the kernel
/// tells an exclusive waiter only while it is blocked, and otherwise queues the event
/// for its next wait (the test would then see two loops told on epoll too).
#[cfg(target_os = "linux")]
fn blocked_in_epoll_wait(tid: i32) -> bool {
    let waits = [
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_epoll_wait,
    ];
    let deadline = Instant::now() + 50 * U;
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"));
        let sleeping =
            stat.is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('S')));
        let syscall = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"));
        let number = syscall
            .ok()
            .and_then(|s| s.split(' ').next()?.parse::<libc::c_long>().ok());
        if sleeping && number.is_some_and(|n| waits.contains(&n)) {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// On epoll, `Interest::EXCLUSIVE` makes a new connection wake one of the loops blocked
/// on a shared listener, not both (`EPOLLEXCLUSIVE`); every other backend ignores the
/// hint and tells both.
#[apply(backends)]
fn io_exclusive_watches_of_a_shared_listener_tell_one_loop_on_epoll_every_loop_elsewhere(
    #[case] kind: Kind,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let (reports, from_loops) = mpsc::channel();
    let (mut stops, mut loops) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let (stop, theirs) = UnixStream::pair().unwrap();
        let (copy, reports) = (listener.try_clone().unwrap(), reports.clone());
        loops.push(std::thread::spawn(move || {
            loop_on_a_shared_listener(kind, copy, theirs, reports)
        }));
        stops.push(stop);
    }
    for _ in 0..2 {
        let Ok(Report::Waiting(tid)) = from_loops.recv_timeout(50 * U) else {
            panic!("a loop did not start");
        };
        #[cfg(target_os = "linux")]
        if kind == Kind::Epoll {
            assert!(blocked_in_epoll_wait(tid), "thread {tid} never blocked");
        }
        let _ = tid;
    }
    let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    assert!(
        matches!(from_loops.recv_timeout(50 * U), Ok(Report::Told)),
        "no loop was told of the connection"
    );
    for mut stop in &stops {
        stop.write_all(b"x").unwrap();
    }
    let told: u32 = loops.into_iter().map(|l| l.join().unwrap()).sum();
    let expected = if kind == Kind::Epoll { 1 } else { 2 };
    assert_eq!(told, expected, "{kind}: loops told of one connection");
    assert!(listener.accept().is_ok(), "the connection is still queued");
}

/// On epoll, whether the kernel holds a registration of `fd` (its own view,
/// `/proc/self/fdinfo` of the epoll fd); `None` on the other backends.
fn epoll_holds(lp: &Loop, fd: i32) -> Option<bool> {
    if lp.backend_name() != "epoll" {
        return None;
    }
    let epfd = lp.backend_fd().expect("epoll has an fd");
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{epfd}")).unwrap();
    Some(info.lines().any(|line| {
        let mut words = line.split_whitespace();
        words.next() == Some("tfd:") && words.next().and_then(|n| n.parse().ok()) == Some(fd)
    }))
}

#[apply(backends)]
fn io_close_source_closes_the_fd_and_its_number_serves_a_new_watch(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (a, mut a_peer) = socketpair();
        let number = a.as_raw_fd();
        let (a_calls, io) = watch_counting(&mut lp, a, Interest::READ);
        assert!(lp.close_source(io));
        assert!(!lp.close_source(io), "the watch is gone");
        let mut buf = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut a_peer, &mut buf).unwrap(),
            0,
            "the source is closed"
        );
        if let Some(held) = epoll_holds(&lp, number) {
            assert!(!held, "closing the file's last fd takes it out of epoll");
        }
        let (b, mut b_peer) = socketpair();
        assert_eq!(b.as_raw_fd(), number, "the number is reused");
        let (b_calls, _) = watch_counting(&mut lp, b, Interest::READ);
        b_peer.write_all(b"x").unwrap();
        assert!(loop_until(&mut lp, 50 * U, || b_calls.get() > 0));
        assert_eq!(a_calls.get(), 0);
    });
}

/// close_source does not deregister (on epoll): while a dup keeps the file open, its
/// registration outlives the close. Its readiness must never run a callback, must not
/// make the loop spin, and the stale registration must go at the next wait.
#[apply(backends)]
fn io_close_source_while_a_dup_keeps_the_file_open_leaves_no_stale_readiness(#[case] kind: Kind) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (a, mut a_peer) = socketpair();
        let dup = a.try_clone().unwrap();
        let number = a.as_raw_fd();
        let (calls, io) = watch_counting(&mut lp, a, Interest::READ);
        let (other, mut other_peer) = socketpair();
        let (other_calls, _) = watch_counting(&mut lp, other, Interest::READ);
        assert!(lp.close_source(io));
        if let Some(held) = epoll_holds(&lp, number) {
            assert!(
                held,
                "no EPOLL_CTL_DEL: the dup keeps the registration alive"
            );
        }
        a_peer.write_all(b"x").unwrap(); // readable through `dup`, for ever
        for _ in 0..3 {
            lp.loop_once(Some(U), &mut ()).unwrap();
        }
        assert_eq!(calls.get(), 0, "a closed watch's callback ran");
        if let Some(held) = epoll_holds(&lp, number) {
            assert!(!held, "the stale registration is still in epoll");
        }
        other_peer.write_all(b"x").unwrap();
        assert!(
            loop_until(&mut lp, 50 * U, || other_calls.get() > 0),
            "the other watch survived the rebuild"
        );
        drop(dup);
    });
}

/// The same file under the same number again, before any wait dropped the registration
/// close_source left behind (epoll's EEXIST): the new watch works.
#[apply(backends)]
fn io_the_same_file_watched_again_under_its_number_after_close_source_is_watched(
    #[case] kind: Kind,
) {
    isolated(|| {
        let mut lp = new_loop(kind);
        let (a, mut a_peer) = socketpair();
        let dup = a.try_clone().unwrap();
        let number = a.as_raw_fd();
        let (_, io) = watch_counting(&mut lp, a, Interest::READ);
        assert!(lp.close_source(io));
        // SAFETY: dup2 onto `number`, which close_source just closed: nothing in this
        // process owns it; the new fd is owned below.
        let again = unsafe { libc::dup2(dup.as_raw_fd(), number) };
        assert_eq!(again, number);
        // SAFETY: dup2 just made `number` an fd of this test's, owned by nothing else.
        let again = unsafe { OwnedFd::from_raw_fd(again) };
        let (calls, _) = watch_counting(&mut lp, UnixStream::from(again), Interest::READ);
        a_peer.write_all(b"x").unwrap();
        assert!(
            loop_until(&mut lp, 50 * U, || calls.get() > 0),
            "the file watched again is not reported"
        );
        drop(dup);
    });
}
