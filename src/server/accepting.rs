//! How a worker takes connections from the listeners it shares with the other workers:
//! exclusive wake-ups, one connection per wake-up, and a rest after a burst, so that a
//! burst of connections is spread over the workers instead of going to whichever woke
//! first (BENCHMARKS.md, "Load across workers", has the measurements).

use std::io;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{add_conn, Worker};
use crate::server::stream::Stream;
use crate::supervisor::Listener;
use crate::supervisor::Peers;
use crate::{Interest, Loop, Readiness, Timer};

/// How many connections a worker takes, beyond what it held when it last found the
/// queue empty or rested, before it leaves a burst to the other workers (see `Pace`).
const BURST: usize = 2;
/// How long a worker that took its burst leaves the listeners to the others: long
/// enough for a worker the kernel woke to get a CPU, on a machine with fewer cores
/// than workers. The loop rounds waits up to whole milliseconds, so a rest lasts 3 to
/// 4 ms. Shorter rests spread the shares of 4 workers of wrk's 64 connections wider:
/// 12 to 20 connections with 1 or 2 ms, 14 to 18 with 3 (BENCHMARKS.md, "Load across
/// workers").
const ACCEPT_REST: Duration = Duration::from_millis(3);
/// Rests in a row that end with connections still queued, after which a worker takes
/// them without resting until it finds the queue empty: every worker is busy then (a
/// surge), and more rests would only leave the backlog to overflow. 16 rests are 48
/// to 64 ms, in which each worker takes 32 connections (4 workers: 128).
const SURGE_RESTS: u32 = 16;
/// How soon after a rest the next must begin to count as one in a row towards a surge:
/// two iterations of a busy worker's loop (its connections' work, one accept each),
/// generously. Between bursts further apart, a worker finds the queue empty.
const IN_A_ROW: Duration = Duration::from_millis(50);
/// Every this many accepts a worker re-adds its listeners, moving itself to the back of
/// their queues of exclusive waiters, which the kernel wakes front first (nginx's
/// `ngx_reorder_accept_events` does the same, for the same reason).
const REORDER_EVERY: u64 = 16;
/// After EMFILE/ENFILE, accepting pauses this long instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The listeners' watches wait for nothing for a moment (out of fds, or a rest),
/// instead of spinning on listeners that stay readable.
fn pause_accepting(lp: &mut Loop<Worker>, w: &Worker) {
    for &io in &w.listeners {
        if let Err(e) = lp.pause(io) {
            log::debug!("pausing a listener: {e}");
        }
    }
}

/// Resumes the listeners' watches. One the backend refuses to resume (epoll's add
/// fails, as with `ENOMEM`) the loop tries again before each wait, every 100 ms at
/// least (see `Loop::set_interest`), so that the worker never goes on deaf to a
/// listener while it still beats for the master.
fn resume_accepting(lp: &mut Loop<Worker>, w: &Worker) {
    for &io in &w.listeners {
        if let Err(e) = lp.resume(io) {
            log::error!("resuming a listener: {e}");
        }
    }
}

/// How a worker shares the bursts of the listeners with the other workers.
///
/// `EPOLLEXCLUSIVE` wakes one idle worker per new connection, but a worker that is
/// awake, and found the listener still readable at its last wait, sees the connections
/// queued meanwhile at its next (epoll keeps a level-triggered registration that was
/// ready on its ready list), and taking one per iteration it would still hold a whole
/// burst (the 4 connections `wrk -c4` opens at once) before a worker
/// the kernel woke for part of it gets a CPU: on 2 cores, with the client on one, the
/// workers share the other. So a worker whose open connections grew by [`BURST`] since
/// it last found the queue empty (or rested) leaves the listeners for up to
/// [`ACCEPT_REST`], in which the others take theirs; then [`BURST`] more. The rest ends
/// early once the worker holds no more connections than before the burst: short ones
/// (`Connection: close`) need no sharing, and a worker with nothing else to do must not
/// sit out the rest idle. A surge, which every worker finds still queued rest after
/// rest ([`SURGE_RESTS`]), is taken at the loop's pace, one connection per iteration,
/// until the queue is empty; so is everything while the worker is the master's only
/// one (started so, or after `TTOU`, or while the others are being replaced), which
/// has no one to share with.
#[derive(Debug)]
pub(super) struct Pace {
    /// The workers serving beside this one, and it: no rests while it is alone.
    peers: Peers,
    /// Open connections when the queue was last found empty or a rest ended, lowered
    /// as connections close.
    base: usize,
    /// Rests in a row (each begun within [`IN_A_ROW`] of the end of the one before,
    /// with no empty queue found in between) that lasted their whole time and ended
    /// with connections queued.
    queued_rests: u32,
    /// When the last rest ended.
    rest_ended: Option<Instant>,
    accepted: u64,
    /// The timer of the rest in progress.
    rest: Option<Timer>,
}

impl Pace {
    /// The pace of a worker among `peers`.
    pub(super) fn new(peers: Peers) -> Pace {
        Pace {
            peers,
            base: 0,
            queued_rests: 0,
            rest_ended: None,
            accepted: 0,
            rest: None,
        }
    }
}

/// Exclusive: a new connection wakes one idle worker, not all of them.
pub(super) fn watch_listener(
    lp: &mut Loop<Worker>,
    w: &mut Worker,
    listener: Listener,
) -> crate::Result<()> {
    let exclusive = Interest::READ | Interest::EXCLUSIVE;
    w.listeners
        .push(lp.watch_io(listener, exclusive, on_listener)?);
    Ok(())
}

/// A listener is readable: one connection, as nginx takes by default (no
/// `multi_accept`), so that the worker is back in its loop between two accepts.
fn on_listener(lp: &mut Loop<Worker>, w: &mut Worker, listener: &Listener, _: Readiness) {
    w.pace.base = w.pace.base.min(w.conns.len());
    match accept(lp, w, listener, 1) {
        Accepted::Took => {}
        Accepted::Empty => {
            w.pace.base = w.conns.len();
            w.pace.queued_rests = 0;
            return;
        }
        Accepted::Failed => return,
    }
    w.pace.accepted += 1;
    if w.pace.queued_rests >= SURGE_RESTS {
        if !queued(listener) {
            // The surge is over.
            w.pace.base = w.conns.len();
            w.pace.queued_rests = 0;
        }
    } else if w.pace.peers.count() <= 1 {
        // Alone: no one to share with, nor to wake before it.
    } else if w.conns.len() >= w.pace.base + BURST {
        rest_from_accepting(lp, w);
    } else if w.pace.accepted % REORDER_EVERY == 0 {
        // To the back of the listeners' queues of exclusive waiters.
        for &io in &w.listeners {
            if let Err(e) = lp.reregister(io) {
                log::error!("re-adding a listener: {e}");
            }
        }
    }
}

/// The worker took its burst: the listeners wait for up to [`ACCEPT_REST`] (see `Pace`).
fn rest_from_accepting(lp: &mut Loop<Worker>, w: &mut Worker) {
    let now = lp.now();
    let in_a_row =
        (w.pace.rest_ended).is_some_and(|end| now.saturating_duration_since(end) <= IN_A_ROW);
    if !in_a_row {
        w.pace.queued_rests = 0;
    }
    pause_accepting(lp, w);
    let timer = lp.after(ACCEPT_REST, |lp, w| {
        let still_queued = (w.listeners.iter()).any(|&io| lp.source(io).is_some_and(queued));
        w.pace.queued_rests = if still_queued {
            w.pace.queued_rests + 1
        } else {
            0
        };
        end_rest(lp, w);
    });
    w.pace.rest = Some(timer);
}

/// A connection of the worker's closed: a rest for connections that are all gone ends
/// (see `Pace`).
pub(super) fn connection_closed(lp: &mut Loop<Worker>, w: &mut Worker) {
    if w.pace.rest.is_some() && w.conns.len() <= w.pace.base {
        w.pace.queued_rests = 0;
        end_rest(lp, w);
    }
}

/// The rest is over (its time is up, or its connections closed): accepting resumes.
fn end_rest(lp: &mut Loop<Worker>, w: &mut Worker) {
    let Some(timer) = w.pace.rest.take() else {
        return;
    };
    lp.cancel(timer);
    w.pace.base = w.conns.len();
    w.pace.rest_ended = Some(lp.now());
    if !w.draining {
        resume_accepting(lp, w);
    }
}

/// Whether a connection waits in `listener`'s queue (a `poll` that does not wait).
fn queued(listener: &Listener) -> bool {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

/// What [`accept`] ended on.
pub(super) enum Accepted {
    /// It took `batch` connections.
    Took,
    /// The queue was empty (before `batch`).
    Empty,
    /// An error, logged (and for EMFILE, accepting paused).
    Failed,
}

pub(super) fn accept(
    lp: &mut Loop<Worker>,
    w: &mut Worker,
    listener: &Listener,
    batch: usize,
) -> Accepted {
    for _ in 0..batch {
        match Stream::accept(listener) {
            Ok((stream, peer)) => add_conn(lp, w, stream, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Empty,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                log::warn!("accept: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                pause_accepting(lp, w);
                lp.after(ACCEPT_BACKOFF, |lp, w| {
                    if !w.draining {
                        resume_accepting(lp, w);
                    }
                });
                return Accepted::Failed;
            }
            Err(e) => {
                log::debug!("accept: {e}");
                return Accepted::Failed;
            }
        }
    }
    Accepted::Took
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::rc::Rc;

    use super::*;
    use crate::server::worker::{close, Config, MasterLink, Request, Responder};

    /// A worker (the server starts `workers`) watching a listener on a free loopback
    /// port as `serve` does, its master's end of the link, and the address.
    fn listening(workers: usize) -> (Loop<Worker>, Worker, UnixStream, SocketAddr) {
        listening_on(Loop::new().unwrap(), workers)
    }

    /// [`listening`] on a loop of the test's.
    fn listening_on(
        mut lp: Loop<Worker>,
        workers: usize,
    ) -> (Loop<Worker>, Worker, UnixStream, SocketAddr) {
        let (link, master) = UnixStream::pair().unwrap();
        let link = MasterLink::new(link, Duration::MAX);
        let mut config = Config::default();
        config.supervisor.workers = workers;
        let handler = |_: &mut Loop<Worker>, _: Request, _: Responder| {};
        let mut w = Worker::new(&mut lp, &config, Rc::new(handler), link, None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        watch_listener(&mut lp, &mut w, Listener::Tcp(listener)).unwrap();
        (lp, w, master, addr)
    }

    /// `n` clients, each queued on the listener once `connect` returns.
    fn connect(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
        (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
    }

    /// Iterates until `done(w)`, each wait at most 10 ms, for at most 5 s.
    fn until(lp: &mut Loop<Worker>, w: &mut Worker, done: impl Fn(&Worker) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(w) {
            assert!(Instant::now() < deadline, "not within 5 s: {:?}", w.pace);
            lp.loop_once(Some(Duration::from_millis(10)), w).unwrap();
        }
    }

    fn still_queued(lp: &Loop<Worker>, w: &Worker) -> bool {
        queued(lp.source(w.listeners[0]).unwrap())
    }

    #[test]
    fn a_worker_takes_a_burst_then_leaves_the_queue_to_the_others_until_its_rest_ends() {
        let (mut lp, mut w, _master, addr) = listening(2);
        let _clients = connect(addr, 4);
        until(&mut lp, &mut w, |w| w.pace.rest.is_some());
        assert_eq!(
            w.conns.len(),
            BURST,
            "the rest begins when the burst is taken"
        );
        assert!(still_queued(&lp, &w), "the rest is left queued");
        until(&mut lp, &mut w, |w| w.conns.len() == 4);
    }

    #[test]
    fn a_rest_ends_once_the_connections_it_rests_for_close() {
        let (mut lp, mut w, _master, addr) = listening(2);
        let _clients = connect(addr, 3);
        until(&mut lp, &mut w, |w| w.pace.rest.is_some());
        let ids: Vec<u64> = w.conns.keys().copied().collect();
        for id in ids {
            close(&mut lp, &mut w, id);
        }
        assert!(w.pace.rest.is_none(), "short connections need no rest");
        lp.loop_once(Some(Duration::ZERO), &mut w).unwrap();
        assert_eq!(w.conns.len(), 1, "the queued one is taken at once");
    }

    #[test]
    fn a_rest_that_ends_with_connections_queued_counts_towards_a_surge() {
        let (mut lp, mut w, _master, addr) = listening(2);
        let _clients = connect(addr, 3);
        until(&mut lp, &mut w, |w| w.pace.rest.is_some());
        until(&mut lp, &mut w, |w| w.pace.rest.is_none());
        assert_eq!(w.pace.queued_rests, 1, "one was still queued");
        until(&mut lp, &mut w, |w| w.conns.len() == 3);
        // Long after (the queue emptied in between): the next rest counts afresh.
        w.pace.rest_ended = Instant::now().checked_sub(Duration::from_secs(1));
        let _more = connect(addr, 1);
        until(&mut lp, &mut w, |w| w.pace.rest.is_some());
        assert_eq!(w.pace.queued_rests, 0, "not in a row");
    }

    #[test]
    fn a_surge_is_taken_without_rests() {
        let (mut lp, mut w, _master, addr) = listening(2);
        w.pace.queued_rests = SURGE_RESTS;
        let _clients = connect(addr, 4);
        until(&mut lp, &mut w, |w| {
            assert!(w.pace.rest.is_none());
            w.conns.len() == 4
        });
        assert_eq!(w.pace.queued_rests, 0, "the surge ends with the queue");
    }

    #[test]
    fn the_only_worker_of_a_server_never_rests() {
        let (mut lp, mut w, _master, addr) = listening(1);
        let _clients = connect(addr, 4);
        until(&mut lp, &mut w, |w| {
            assert!(w.pace.rest.is_none());
            w.conns.len() == 4
        });
    }

    /// The best backend, whose `register` fails with `ENOMEM` while `failing` is set,
    /// keeping the fds it is asked to register in `adds`.
    #[derive(Default)]
    struct Flaky {
        inner: Option<Box<dyn crate::Backend>>,
        failing: Rc<std::cell::Cell<bool>>,
        adds: Rc<std::cell::RefCell<Vec<std::os::fd::RawFd>>>,
    }

    impl Flaky {
        fn inner(&mut self) -> &mut dyn crate::Backend {
            self.inner.as_deref_mut().expect("built with a backend")
        }

        fn looping(self) -> Loop<Worker> {
            let inner = crate::Kind::best().unwrap().create().unwrap();
            let flaky = Flaky {
                inner: Some(inner),
                ..self
            };
            Loop::from_backend(Box::new(flaky)).unwrap()
        }
    }

    impl crate::Backend for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn register(&mut self, fd: std::os::fd::RawFd, i: Interest) -> io::Result<()> {
            self.adds.borrow_mut().push(fd);
            if self.failing.get() {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            self.inner().register(fd, i)
        }
        fn modify(&mut self, fd: std::os::fd::RawFd, i: Interest) -> io::Result<()> {
            self.inner().modify(fd, i)
        }
        fn deregister(&mut self, fd: std::os::fd::RawFd) -> io::Result<()> {
            self.inner().deregister(fd)
        }
        fn wait(&mut self, events: &mut Vec<crate::Event>, t: Option<Duration>) -> io::Result<()> {
            self.inner().wait(events, t)
        }
        fn post_fork(
            &mut self,
            r: &mut dyn Iterator<Item = (std::os::fd::RawFd, Interest)>,
        ) -> io::Result<()> {
            self.inner().post_fork(r)
        }
    }

    #[test]
    fn a_listener_the_backend_refuses_to_resume_is_tried_again() {
        let flaky = Flaky::default();
        let failing = flaky.failing.clone();
        let (mut lp, mut w, _master, addr) = listening_on(flaky.looping(), 2);
        let _clients = connect(addr, 3);
        until(&mut lp, &mut w, |w| w.pace.rest.is_some());
        failing.set(true);
        until(&mut lp, &mut w, |w| w.pace.rest.is_none());
        failing.set(false);
        let _more = connect(addr, 5);
        until(&mut lp, &mut w, |w| w.conns.len() == 8);
    }

    /// nginx's reordering: every 16 accepts the listener is registered again (at once:
    /// a pause and a resume would cancel out before the wait).
    #[test]
    fn a_worker_re_adds_its_listener_every_16_accepts() {
        let flaky = Flaky::default();
        let adds = flaky.adds.clone();
        let (mut lp, mut w, _master, addr) = listening_on(flaky.looping(), 2);
        lp.loop_once(Some(Duration::ZERO), &mut w).unwrap();
        let listener = lp.source(w.listeners[0]).unwrap().as_fd().as_raw_fd();
        let readds = || adds.borrow().iter().filter(|&&fd| fd == listener).count();
        let before = readds();
        for accepted in 1..=REORDER_EVERY {
            let _client = TcpStream::connect(addr).unwrap();
            until(&mut lp, &mut w, |w| w.conns.len() == 1);
            let id = *w.conns.keys().next().unwrap();
            close(&mut lp, &mut w, id); // never a burst: no rest
            let readded = readds() - before;
            assert_eq!(
                readded,
                usize::from(accepted == REORDER_EVERY),
                "{accepted}"
            );
        }
    }

    #[test]
    fn a_busy_worker_still_reaches_a_surge() {
        let (mut lp, mut w, _master, addr) = listening(2);
        // Each iteration does 2 ms of work for its connections.
        lp.every(Duration::from_millis(1), |_, _| {
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(2) {}
        })
        .unwrap();
        let _clients = connect(addr, 120);
        until(&mut lp, &mut w, |w| {
            w.pace.queued_rests >= SURGE_RESTS || w.conns.len() == 120
        });
        assert!(w.pace.queued_rests >= SURGE_RESTS, "{:?}", w.pace);
    }
}
