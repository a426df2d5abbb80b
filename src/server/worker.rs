//! A worker: serves HTTP/1.1 connections accepted from the shared listeners on a fresh
//! loop, reports to the master over its pipe (ready, heartbeats, recycle requests), and
//! drains on SIGTERM.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant, SystemTime};

use super::http::{Limits, Parsed, Parser, Request, Response, CONTINUE};
use super::listener::{Listener, Stream};
use super::{Config, Handler};
use crate::id_map::IdMap;
use crate::{Interest, Loop, Watch};

/// Messages a worker sends its master, one byte each.
pub(crate) const READY: u8 = b'R';
pub(crate) const HEARTBEAT: u8 = b'H';
pub(crate) const RECYCLE: u8 = b'M';

/// Requests answered per connection before the next is parsed (pipelining depth).
pub(crate) const MAX_PIPELINED: usize = 32;
/// Connections accepted per wake-up, so one worker does not take a whole burst.
const ACCEPT_BATCH: usize = 16;
/// How long a draining worker keeps an idle keep-alive connection open.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// Unsent response bytes past which a connection parses no more requests until the
/// client reads: a client that pipelines and never reads cannot grow the worker.
const MAX_UNSENT: usize = 256 * 1024;
/// How long a finished connection keeps discarding the peer's input (see `linger`).
const LINGER: Duration = Duration::from_secs(2);
/// After EMFILE/ENFILE, accepting pauses this long instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a worker needs from the master, borrowed across the fork.
pub(crate) struct WorkerSetup<'a> {
    pub slot: usize,
    pub config: &'a Config,
    pub handler: Rc<dyn Handler>,
    pub after_fork: Option<&'a dyn Fn(usize)>,
    pub master: UnixStream,
    pub master_pid: libc::pid_t,
    pub max_requests: Option<u64>,
}

/// Answers one request. Send exactly once, now or later from the loop; a responder
/// dropped unsent answers 500 (at once if dropped during the handler call, else in the
/// loop's next iteration).
pub struct Responder {
    worker: Weak<RefCell<Worker>>,
    unanswered: Rc<Unanswered>,
    conn: u64,
    seq: u64,
    sent: bool,
}

/// Requests whose responders were dropped unsent. Kept apart from the worker, so that
/// a drop can always record itself, even while the worker is borrowed; and with a
/// socketpair whose readable end wakes the worker's loop to answer them.
struct Unanswered {
    queue: RefCell<Vec<(u64, u64)>>,
    wake: UnixStream,
    woken: UnixStream,
}

impl Unanswered {
    fn new() -> io::Result<Unanswered> {
        let (wake, woken) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        woken.set_nonblocking(true)?;
        Ok(Unanswered {
            queue: RefCell::new(Vec::new()),
            wake,
            woken,
        })
    }
}

impl Responder {
    /// Sends `response` for this request.
    pub fn send(mut self, lp: &mut Loop, response: Response) {
        self.sent = true;
        if let Some(worker) = self.worker.upgrade() {
            complete(&worker, lp, self.conn, self.seq, response);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.sent && self.worker.strong_count() > 0 {
            self.unanswered
                .queue
                .borrow_mut()
                .push((self.conn, self.seq));
            // A full socket already holds a wake-up: nothing is lost by ignoring that.
            let _ = (&self.unanswered.wake).write(&[1]);
        }
    }
}

enum Slot {
    /// Waiting for its handler.
    Pending {
        head: bool,
        keep_alive: bool,
        /// The request line, kept only when there is an access log to write it to.
        line: Option<String>,
    },
    /// Ready to go out once every earlier slot has.
    Ready { bytes: Vec<u8>, close: bool },
}

impl Slot {
    /// The bytes it holds.
    fn len(&self) -> usize {
        match self {
            Slot::Pending { line, .. } => line.as_ref().map_or(0, String::len),
            Slot::Ready { bytes, .. } => bytes.len(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    Header,
    Body,
    Send,
    Idle,
    Linger,
}

struct Conn {
    stream: Stream,
    peer: String,
    parser: Parser,
    slots: VecDeque<Slot>,
    first_seq: u64,
    /// Encoded responses; `out[sent..]` is still to be written.
    out: Vec<u8>,
    sent: usize,
    read: Option<Watch>,
    write: Option<Watch>,
    timer: Option<(TimerKind, Watch)>,
    /// Input came since the last request was parsed (see `Conn::request_begun`).
    sent_since_request: bool,
    /// When the parser last made progress: the body timeout counts from it.
    last_progress: Instant,
    /// When a write last took bytes: the send timeout counts from it.
    last_write: Instant,
    /// Requests were left unparsed because the pipeline or the unsent output was full;
    /// `flush` resumes parsing once both have room.
    held_back: bool,
    /// No more requests are parsed: refused input, or the peer's EOF with no complete
    /// request left in the buffer.
    no_more_requests: bool,
    /// The peer sent EOF: what is buffered is still parsed and answered, nothing more
    /// is read.
    peer_closed: bool,
    /// Everything is answered and our side shut down; the peer's input is discarded
    /// until its EOF (see `linger`).
    lingering: bool,
}

impl Conn {
    /// Between requests of a keep-alive connection: nothing buffered, nothing owed. A
    /// new connection is not idle: its client is about to send its first request.
    fn is_idle_keep_alive(&self) -> bool {
        self.first_seq > 0
            && self.slots.is_empty()
            && self.out.is_empty()
            && !self.request_begun()
            && !self.no_more_requests
            && !self.lingering
    }

    /// Whether the client has sent anything since its last request: even empty lines,
    /// which the parser drops, so that they cannot turn the header deadline back into
    /// a fresh keep-alive one.
    fn request_begun(&self) -> bool {
        self.sent_since_request || self.parser.mid_request()
    }

    /// Bytes of answers the client has not taken: unsent output, and finished responses
    /// queued behind one still being handled.
    fn unsent(&self) -> usize {
        let queued: usize = self.slots.iter().map(Slot::len).sum();
        self.out.len() - self.sent + queued
    }
}

pub(crate) struct Worker {
    conns: IdMap<u64, Conn>,
    next_conn: u64,
    listeners: Vec<(Listener, Option<Watch>)>,
    draining: bool,
    served: u64,
    max_requests: Option<u64>,
    limits: Limits,
    header_timeout: Duration,
    body_timeout: Duration,
    keepalive_timeout: Duration,
    date: (u64, String),
    access_log: Option<File>,
    access_log_path: Option<std::path::PathBuf>,
    master: UnixStream,
    handler: Rc<dyn Handler>,
    unanswered: Rc<Unanswered>,
}

type Shared = Rc<RefCell<Worker>>;

/// The worker's main; its return value is the process's exit status.
pub(crate) fn run(setup: WorkerSetup<'_>, listeners: Vec<Listener>) -> i32 {
    if let Err(e) = die_with_master(setup.master_pid) {
        eprintln!("forkloop worker {}: {e}", setup.slot);
        return 1;
    }
    // Ctrl-C on the process group is for the master, which drains us with TERM.
    // SAFETY: sets a disposition; no handler code runs.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    if let Some(hook) = setup.after_fork {
        hook(setup.slot);
    }
    let mut lp = match setup
        .config
        .backend
        .map_or_else(Loop::new, Loop::with_backend)
    {
        Ok(lp) => lp,
        Err(e) => {
            eprintln!("forkloop worker {}: {e}", setup.slot);
            return 1;
        }
    };
    match serve(&mut lp, setup, listeners) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forkloop worker: {e}");
            1
        }
    }
}

/// Linux: the kernel sends SIGKILL when the master dies. Elsewhere EOF on the master
/// pipe does the job alone.
fn die_with_master(master_pid: libc::pid_t) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number; no pointers.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // The master may have died before prctl: then we have been re-parented already.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != master_pid {
        return Err(io::Error::other(
            "the master exited before this worker started",
        ));
    }
    Ok(())
}

impl Worker {
    fn new(
        config: &Config,
        handler: Rc<dyn Handler>,
        master: UnixStream,
        listeners: Vec<Listener>,
        max_requests: Option<u64>,
    ) -> io::Result<Shared> {
        let access_log = config.access_log.as_deref().map(open_log).transpose();
        Ok(Rc::new(RefCell::new(Worker {
            conns: IdMap::default(),
            next_conn: 0,
            listeners: listeners.into_iter().map(|l| (l, None)).collect(),
            draining: false,
            served: 0,
            max_requests,
            limits: Limits {
                max_head: config.max_header_size,
                max_body: config.max_body_size,
            },
            header_timeout: config.header_timeout,
            body_timeout: config.body_timeout,
            keepalive_timeout: config.keepalive_timeout,
            date: (0, String::new()),
            access_log: access_log.unwrap_or_else(|e| {
                log::error!("access log: {e}");
                None
            }),
            access_log_path: config.access_log.clone(),
            master,
            handler,
            unanswered: Rc::new(Unanswered::new()?),
        })))
    }
}

fn serve(lp: &mut Loop, setup: WorkerSetup<'_>, listeners: Vec<Listener>) -> crate::Result<i32> {
    let config = setup.config;
    let worker = Worker::new(
        config,
        setup.handler,
        setup.master,
        listeners,
        setup.max_requests,
    )
    .map_err(|source| crate::Error::Create {
        what: "the worker's wake-up socketpair",
        source,
    })?;

    let w = worker.clone();
    lp.watch_signal(libc::SIGTERM, move |lp, _| drain(&w, lp))?;
    let w = worker.clone();
    lp.watch_signal(libc::SIGUSR1, move |_, _| reopen_log(&w))?;
    worker
        .borrow()
        .master
        .set_nonblocking(true)
        .map_err(|source| crate::Error::Create {
            what: "the master pipe",
            source,
        })?;
    let master_fd = worker.borrow().master.as_raw_fd();
    let w = worker.clone();
    lp.watch_io(master_fd, Interest::READ, move |lp, _| {
        let mut buf = [0u8; 16];
        let alive = matches!(
            io::Read::read(&mut &w.borrow().master, &mut buf),
            Ok(1..) | Err(_)
        );
        if !alive {
            log::warn!("worker {}: the master is gone; exiting", std::process::id());
            lp.stop(1);
        }
    })?;
    let w = worker.clone();
    let beat = (config.heartbeat_timeout / 4).max(Duration::from_millis(50));
    lp.every(beat, move |_| tell_master(&w, HEARTBEAT))?;
    watch_unanswered(&worker, lp)?;
    start_accepting(&worker, lp)?;
    tell_master(&worker, READY);
    let code = lp.run()?;
    // Leave nothing half-open behind.
    let ids: Vec<u64> = worker.borrow().conns.keys().copied().collect();
    for id in ids {
        close(&worker, lp, id);
    }
    Ok(code)
}

fn open_log(path: &std::path::Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn reopen_log(worker: &Shared) {
    let mut w = worker.borrow_mut();
    if let Some(path) = w.access_log_path.clone() {
        match open_log(&path) {
            Ok(file) => w.access_log = Some(file),
            Err(e) => log::error!("reopening the access log {}: {e}", path.display()),
        }
    }
}

/// Responders dropped unsent outside a handler call wake the loop to answer 500.
fn watch_unanswered(worker: &Shared, lp: &mut Loop) -> crate::Result<()> {
    let fd = worker.borrow().unanswered.woken.as_raw_fd();
    let w = worker.clone();
    lp.watch_io(fd, Interest::READ, move |lp, _| {
        let unanswered = w.borrow().unanswered.clone();
        let mut buf = [0u8; 64];
        while matches!((&unanswered.woken).read(&mut buf), Ok(1..)) {}
        answer_unanswered(&w, lp);
    })?;
    Ok(())
}

fn tell_master(worker: &Shared, message: u8) {
    let w = worker.borrow();
    // Non-blocking is not needed: one byte into a socket buffer the master drains.
    let _ = (&w.master).write(&[message]);
}

fn start_accepting(worker: &Shared, lp: &mut Loop) -> crate::Result<()> {
    let count = worker.borrow().listeners.len();
    for index in 0..count {
        let fd = worker.borrow().listeners[index].0.as_raw_fd();
        let w = worker.clone();
        let watch = lp.watch_io(fd, Interest::READ, move |lp, _| {
            accept(&w, lp, index, ACCEPT_BATCH)
        })?;
        worker.borrow_mut().listeners[index].1 = Some(watch);
    }
    Ok(())
}

fn stop_accepting(worker: &Shared, lp: &mut Loop) {
    let watches: Vec<Watch> = worker
        .borrow_mut()
        .listeners
        .iter_mut()
        .filter_map(|(_, w)| w.take())
        .collect();
    for watch in watches {
        lp.cancel(watch);
    }
}

fn accept(worker: &Shared, lp: &mut Loop, index: usize, batch: usize) {
    for _ in 0..batch {
        let accepted = worker.borrow().listeners[index].0.accept();
        match accepted {
            Ok((stream, peer)) => add_conn(worker, lp, stream, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                // Out of fds: stop accepting for a moment instead of spinning on a
                // listener that stays readable.
                log::warn!("accept: {e}; pausing accepts for {ACCEPT_BACKOFF:?}");
                stop_accepting(worker, lp);
                let w = worker.clone();
                lp.after(ACCEPT_BACKOFF, move |lp| {
                    if !w.borrow().draining {
                        let _ = start_accepting(&w, lp);
                    }
                });
                return;
            }
            Err(e) => {
                log::debug!("accept: {e}");
                return;
            }
        }
    }
}

fn add_conn(worker: &Shared, lp: &mut Loop, stream: Stream, peer: String) {
    let id = {
        let mut w = worker.borrow_mut();
        w.next_conn += 1;
        w.next_conn
    };
    let limits = worker.borrow().limits;
    let conn = Conn {
        stream,
        peer,
        parser: Parser::new(limits),
        slots: VecDeque::new(),
        first_seq: 0,
        out: Vec::new(),
        sent: 0,
        read: None,
        write: None,
        timer: None,
        sent_since_request: false,
        last_progress: Instant::now(),
        last_write: Instant::now(),
        held_back: false,
        no_more_requests: false,
        peer_closed: false,
        lingering: false,
    };
    worker.borrow_mut().conns.insert(id, conn);
    update_reading(worker, lp, id);
    set_timer(worker, lp, id);
}

fn on_readable(worker: &Shared, lp: &mut Loop, id: u64) {
    let mut buf = [0u8; 16 * 1024];
    let (lingering, ended) = {
        let mut w = worker.borrow_mut();
        let Some(conn) = w.conns.get_mut(&id) else {
            return;
        };
        let lingering = conn.lingering;
        loop {
            let room = if lingering {
                buf.len()
            } else {
                conn.parser.room().min(buf.len())
            };
            if room == 0 {
                break;
            }
            match conn.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    conn.peer_closed = true;
                    break;
                }
                Ok(n) => {
                    if !lingering {
                        conn.parser.feed(&buf[..n]);
                        conn.sent_since_request = true;
                    }
                    if n < room {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    conn.peer_closed = true;
                    break;
                }
            }
        }
        (lingering, conn.peer_closed)
    };
    if lingering {
        if ended {
            close(worker, lp, id);
        }
        return;
    }
    // A half-closed client still gets answers to what it sent: `process` marks the
    // connection done once no complete request is left, and `flush` closes it.
    process(worker, lp, id);
}

/// Parses and dispatches every complete request the connection has buffered.
fn process(worker: &Shared, lp: &mut Loop, id: u64) {
    loop {
        let request = {
            let mut guard = worker.borrow_mut();
            let w = &mut *guard;
            let Some(conn) = w.conns.get_mut(&id) else {
                return;
            };
            if conn.no_more_requests {
                break;
            }
            if conn.slots.len() >= MAX_PIPELINED || conn.unsent() >= MAX_UNSENT {
                conn.held_back = true;
                break;
            }
            let progress = conn.parser.progress();
            let parsed = conn.parser.next();
            // Only a body still awaited has a timeout to count from here.
            if conn.parser.progress() != progress && conn.parser.reading_body() {
                conn.last_progress = Instant::now();
            }
            match parsed {
                Ok(None) => {
                    conn.no_more_requests = conn.peer_closed;
                    break;
                }
                Ok(Some(Parsed::Continue)) => {
                    conn.slots.push_back(Slot::Ready {
                        bytes: CONTINUE.to_vec(),
                        close: false,
                    });
                    continue;
                }
                Ok(Some(Parsed::Request(request))) => {
                    conn.sent_since_request = false;
                    let line = w.access_log_path.is_some().then(|| {
                        format!(
                            "{} {} HTTP/1.{}",
                            request.method, request.target, request.minor_version
                        )
                    });
                    // A keep-alive timeout of zero turns keep-alive off.
                    let keep_alive =
                        request.keep_alive && !w.draining && !w.keepalive_timeout.is_zero();
                    let head = request.method == "HEAD";
                    conn.slots.push_back(Slot::Pending {
                        head,
                        keep_alive,
                        line,
                    });
                    // RFC 9112 §9.6: nothing after a request that closes is processed.
                    conn.no_more_requests |= !keep_alive;
                    let seq = conn.first_seq + conn.slots.len() as u64 - 1;
                    (request, seq)
                }
                Err(refusal) => {
                    log::debug!("{}: refused: {}", conn.peer, refusal.why);
                    answer_and_close(w, id, refusal.status, refusal.why);
                    break;
                }
            }
        };
        cancel_timer(worker, lp, id);
        dispatch(worker, lp, id, request);
    }
    update_reading(worker, lp, id);
    flush(worker, lp, id);
}

fn dispatch(worker: &Shared, lp: &mut Loop, id: u64, (request, seq): (Request, u64)) {
    let handler = worker.borrow().handler.clone();
    let responder = Responder {
        worker: Rc::downgrade(worker),
        unanswered: worker.borrow().unanswered.clone(),
        conn: id,
        seq,
        sent: false,
    };
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler.call(lp, request, responder)));
    if outcome.is_err() {
        log::error!("a handler panicked; answering 500");
    }
    answer_unanswered(worker, lp);
    let mut w = worker.borrow_mut();
    w.served += 1;
    if w.max_requests.is_some_and(|max| w.served == max) {
        drop(w);
        tell_master(worker, RECYCLE);
    }
}

/// A responder dropped unsent (by a panic, or by a handler that lost it) owes a 500.
fn answer_unanswered(worker: &Shared, lp: &mut Loop) {
    let unanswered = worker.borrow().unanswered.clone();
    let queue = std::mem::take(&mut *unanswered.queue.borrow_mut());
    for (conn, seq) in queue {
        log::error!("connection {conn}: a responder was dropped unsent; answering 500");
        complete(
            worker,
            lp,
            conn,
            seq,
            Response::text(500, "Internal Server Error\n"),
        );
    }
}

/// Fills a pending slot with its response and writes what can go out.
fn complete(worker: &Shared, lp: &mut Loop, id: u64, seq: u64, response: Response) {
    {
        let mut guard = worker.borrow_mut();
        let w = &mut *guard;
        let Some(conn) = w.conns.get_mut(&id) else {
            return;
        };
        let Some(index) = seq.checked_sub(conn.first_seq).map(|i| i as usize) else {
            return;
        };
        let Some(slot @ Slot::Pending { .. }) = conn.slots.get_mut(index) else {
            return;
        };
        let Slot::Pending {
            head,
            keep_alive,
            line,
        } = std::mem::replace(
            slot,
            Slot::Ready {
                bytes: Vec::new(),
                close: false,
            },
        )
        else {
            unreachable!()
        };
        // Draining: only the last request in the queue closes the connection, so that
        // every request already handed to the app is answered.
        let keep_alive = keep_alive && !(w.draining && index + 1 == conn.slots.len());
        let date = http_date(&mut w.date);
        let mut bytes = Vec::with_capacity(response.body.len() + 160);
        let (status, length, keep_alive) = match response.encode(&mut bytes, head, keep_alive, date)
        {
            Ok(keep_alive) => (response.status, response.body.len(), keep_alive),
            Err(why) => {
                log::error!(
                    "{}: the handler's response is invalid ({why}); answering 500",
                    conn.peer
                );
                let fallback = Response::text(500, "Internal Server Error\n");
                // The server's own response always encodes.
                let keep_alive = fallback.encode(&mut bytes, head, keep_alive, date);
                (500, fallback.body.len(), keep_alive.unwrap_or(false))
            }
        };
        if let (Some(log), Some(line)) = (&mut w.access_log, line) {
            let _ = writeln!(
                log,
                "{} - - [{date}] \"{line}\" {status} {length}",
                conn.peer
            );
        }
        conn.slots[index] = Slot::Ready {
            bytes,
            close: !keep_alive,
        };
    }
    flush(worker, lp, id);
}

/// Writes every ready response at the front of the queue, in order; closes the
/// connection after one that says `Connection: close`.
fn flush(worker: &Shared, lp: &mut Loop, id: u64) {
    let ((failed, finished), want_write, resume) = {
        let mut w = worker.borrow_mut();
        let Some(conn) = w.conns.get_mut(&id) else {
            return;
        };
        if conn.sent > 0 && matches!(conn.slots.front(), Some(Slot::Ready { .. })) {
            conn.out.drain(..conn.sent);
            conn.sent = 0;
        }
        while let Some(Slot::Ready { .. }) = conn.slots.front() {
            let Some(Slot::Ready { bytes, close }) = conn.slots.pop_front() else {
                unreachable!()
            };
            conn.first_seq += 1;
            conn.out.extend_from_slice(&bytes);
            if close {
                conn.no_more_requests = true;
                conn.slots.clear();
                break;
            }
        }
        let (mut failed, mut wrote) = (false, false);
        while conn.sent < conn.out.len() {
            match conn.stream.write(&conn.out[conn.sent..]) {
                Ok(n) => {
                    conn.sent += n;
                    wrote = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if conn.sent == conn.out.len() {
            conn.out.clear();
            conn.sent = 0;
        } else if wrote {
            // Only output left waiting has a send timeout to count from here.
            conn.last_write = Instant::now();
        }
        let done = conn.out.is_empty();
        let finished = done && conn.no_more_requests && conn.slots.is_empty();
        let resume = conn.held_back
            && !conn.no_more_requests
            && conn.slots.len() < MAX_PIPELINED
            && conn.unsent() < MAX_UNSENT;
        conn.held_back &= !resume;
        ((failed, finished), !done && conn.write.is_none(), resume)
    };
    if failed {
        close(worker, lp, id);
        return;
    }
    if finished {
        linger(worker, lp, id);
        return;
    }
    if want_write
        && !watch_conn(worker, lp, id, Interest::WRITE, on_writable, |c| {
            &mut c.write
        })
    {
        return;
    }
    if resume {
        // Pipelined requests were held back while the queue or the output was full.
        let w = worker.clone();
        lp.later(move |lp| process(&w, lp, id));
    }
    set_timer(worker, lp, id);
}

/// Takes one of a connection's watches out (`which` picks it) and cancels it.
fn cancel_watch(worker: &Shared, lp: &mut Loop, id: u64, which: fn(&mut Conn) -> Option<Watch>) {
    let watch = worker.borrow_mut().conns.get_mut(&id).and_then(which);
    if let Some(watch) = watch {
        lp.cancel(watch);
    }
}

fn on_writable(worker: &Shared, lp: &mut Loop, id: u64) {
    cancel_watch(worker, lp, id, |c| c.write.take());
    flush(worker, lp, id);
}

/// Everything is written and no more requests will be read. Closing with the peer's
/// input unread (a refused request's rest, requests pipelined after a close) would make
/// the kernel send a reset, which can destroy the response before the client reads it;
/// so then, unless the peer has closed its side, ours is shut down and its input
/// discarded until its EOF or for `LINGER` at most (nginx's lingering close).
fn linger(worker: &Shared, lp: &mut Loop, id: u64) {
    let lingering = {
        let mut w = worker.borrow_mut();
        let Some(conn) = w.conns.get_mut(&id) else {
            return;
        };
        if conn.lingering {
            return;
        }
        // Reading stops once no more requests are taken, so input may wait in the kernel.
        let unread =
            !conn.peer_closed && (conn.parser.buffered() > 0 || conn.stream.has_unread_input());
        conn.lingering = unread && conn.stream.shutdown_write().is_ok();
        conn.lingering
    };
    if lingering {
        update_reading(worker, lp, id);
        set_timer(worker, lp, id);
    } else {
        close(worker, lp, id);
    }
}

/// Watches a connection for input only while it can take more: not after the peer's
/// EOF or a refusal, and not while its parser is full (pipelined requests held back),
/// where a level-triggered watch on unread input would spin.
fn update_reading(worker: &Shared, lp: &mut Loop, id: u64) {
    let (wanted, watching) = {
        let w = worker.borrow();
        let Some(conn) = w.conns.get(&id) else {
            return;
        };
        let wanted = conn.lingering
            || (!conn.peer_closed && !conn.no_more_requests && conn.parser.room() > 0);
        (wanted, conn.read.is_some())
    };
    match (wanted, watching) {
        (true, false) => {
            watch_conn(worker, lp, id, Interest::READ, on_readable, |c| &mut c.read);
        }
        (false, true) => cancel_watch(worker, lp, id, |c| c.read.take()),
        _ => {}
    }
}

/// Adds one of a connection's watches (`slot` picks which) calling `on_ready`; a
/// connection that cannot be watched is closed. Returns whether it was watched.
fn watch_conn(
    worker: &Shared,
    lp: &mut Loop,
    id: u64,
    interest: Interest,
    on_ready: fn(&Shared, &mut Loop, u64),
    slot: fn(&mut Conn) -> &mut Option<Watch>,
) -> bool {
    let Some(fd) = worker.borrow().conns.get(&id).map(|c| c.stream.as_raw_fd()) else {
        return false;
    };
    let w = worker.clone();
    match lp.watch_io(fd, interest, move |lp, _| on_ready(&w, lp, id)) {
        Ok(watch) => {
            *slot(worker.borrow_mut().conns.get_mut(&id).expect("live")) = Some(watch);
            true
        }
        Err(e) => {
            log::error!("watching connection {id}: {e}");
            close(worker, lp, id);
            false
        }
    }
}

fn cancel_timer(worker: &Shared, lp: &mut Loop, id: u64) {
    cancel_watch(worker, lp, id, |c| c.timer.take().map(|(_, watch)| watch));
}

/// Arms the timer a connection needs: the send timeout while output waits for the
/// client to read it; then, waiting for a request, the header timeout while a head is
/// incomplete (or none has come on a new connection), the body timeout while a body is
/// read, else the keep-alive one.
fn set_timer(worker: &Shared, lp: &mut Loop, id: u64) {
    let (wanted, current) = {
        let w = worker.borrow();
        let Some(conn) = w.conns.get(&id) else { return };
        let waiting = conn.slots.is_empty() && conn.out.is_empty() && !conn.no_more_requests;
        let wanted = if conn.lingering {
            Some((TimerKind::Linger, LINGER))
        } else if !conn.out.is_empty() {
            Some((TimerKind::Send, w.body_timeout))
        } else if !waiting {
            None
        } else if conn.parser.reading_body() {
            Some((TimerKind::Body, w.body_timeout))
        } else if conn.request_begun() || conn.first_seq == 0 {
            Some((TimerKind::Header, w.header_timeout))
        } else {
            // A connection that goes idle during a drain gets the drain's grace only.
            let idle = if w.draining {
                DRAIN_GRACE
            } else {
                w.keepalive_timeout
            };
            Some((TimerKind::Idle, idle))
        };
        (wanted, conn.timer.map(|(kind, _)| kind))
    };
    if wanted.map(|(k, _)| k) == current {
        return;
    }
    cancel_timer(worker, lp, id);
    if let Some((kind, after)) = wanted {
        arm_timer(worker, lp, id, kind, after);
    }
}

fn arm_timer(worker: &Shared, lp: &mut Loop, id: u64, kind: TimerKind, after: Duration) {
    let w = worker.clone();
    let watch = lp.after(after, move |lp| on_timeout(&w, lp, id, kind));
    if let Some(conn) = worker.borrow_mut().conns.get_mut(&id) {
        conn.timer = Some((kind, watch));
    }
}

/// A header or body timeout answers 408 if the client has started its request; the
/// body timeout counts from the parser's last progress, so a body that keeps coming,
/// however slowly, is read to its end, and the send timeout from the last write that
/// took bytes. A stalled send and the other timeouts close the connection.
fn on_timeout(worker: &Shared, lp: &mut Loop, id: u64, kind: TimerKind) {
    enum Then {
        Answer,
        Rearm(Duration),
        Close,
    }
    let then = {
        let mut guard = worker.borrow_mut();
        let w = &mut *guard;
        let Some(conn) = w.conns.get_mut(&id) else {
            return;
        };
        conn.timer = None;
        let quiet = match kind {
            TimerKind::Send => conn.last_write.elapsed(),
            _ => conn.last_progress.elapsed(),
        };
        let then = match kind {
            TimerKind::Header if conn.parser.buffered() > 0 => Then::Answer,
            TimerKind::Body | TimerKind::Send if quiet < w.body_timeout => {
                Then::Rearm(w.body_timeout - quiet)
            }
            TimerKind::Body => Then::Answer,
            _ => Then::Close,
        };
        if let Then::Answer = then {
            let why = match kind {
                TimerKind::Body => "request body timed out",
                _ => "request head timed out",
            };
            answer_and_close(w, id, 408, why);
        }
        then
    };
    match then {
        Then::Answer => flush(worker, lp, id),
        Then::Rearm(after) => arm_timer(worker, lp, id, kind, after),
        Then::Close => close(worker, lp, id),
    }
}

/// Queues `status` as connection `id`'s last response (no request after it is read),
/// and logs it in the access log with `"-"` for the request line.
fn answer_and_close(w: &mut Worker, id: u64, status: u16, why: &str) {
    let date = http_date(&mut w.date);
    let Some(conn) = w.conns.get_mut(&id) else {
        return;
    };
    let mut bytes = Vec::new();
    let response = Response::text(status, format!("{why}\n"));
    // A status and text of the server's own always encode.
    let _ = response.encode(&mut bytes, false, false, date);
    conn.slots.push_back(Slot::Ready { bytes, close: true });
    conn.no_more_requests = true;
    if let Some(log) = &mut w.access_log {
        let length = response.body.len();
        let _ = writeln!(log, "{} - - [{date}] \"-\" {status} {length}", conn.peer);
    }
}

fn close(worker: &Shared, lp: &mut Loop, id: u64) {
    let Some(conn) = worker.borrow_mut().conns.remove(&id) else {
        return;
    };
    for watch in [conn.read, conn.write].into_iter().flatten() {
        lp.cancel(watch);
    }
    if let Some((_, watch)) = conn.timer {
        lp.cancel(watch);
    }
    drop(conn.stream);
    let w = worker.borrow();
    if w.draining && w.conns.is_empty() {
        lp.stop(0);
    }
}

/// SIGTERM: stop accepting at once (the listeners leave this worker's loop and close),
/// answer what is in flight — including a request on a just-accepted connection — with
/// `Connection: close`, and exit when no connection is left. Idle keep-alive
/// connections close after a short grace: a request a client sent just before it could
/// see the close is still answered, instead of failing in flight.
fn drain(worker: &Shared, lp: &mut Loop) {
    if worker.borrow().draining {
        return;
    }
    worker.borrow_mut().draining = true;
    stop_accepting(worker, lp);
    // Connections the kernel already queued are taken in and answered before this
    // worker's listener copies close: the last close of a listener resets its queue.
    let count = worker.borrow().listeners.len();
    for index in 0..count {
        accept(worker, lp, index, usize::MAX);
    }
    worker.borrow_mut().listeners.clear();
    let idle: Vec<u64> = worker
        .borrow()
        .conns
        .iter()
        .filter(|(_, c)| c.is_idle_keep_alive())
        .map(|(&id, _)| id)
        .collect();
    for id in idle {
        cancel_timer(worker, lp, id);
        arm_timer(worker, lp, id, TimerKind::Idle, DRAIN_GRACE);
    }
    if worker.borrow().conns.is_empty() {
        lp.stop(0);
    }
}

/// The `Date` header value, formatted once per second.
fn http_date(cache: &mut (u64, String)) -> &str {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if cache.0 != secs || cache.1.is_empty() {
        *cache = (secs, httpdate::fmt_http_date(now));
    }
    &cache.1
}

/// A worker with no listeners and no master, serving one connection on a socketpair:
/// its loop, the worker, and the client's end (non-blocking).
fn one_connection(
    config: &Config,
    handler: Rc<dyn Handler>,
) -> io::Result<(Loop, Shared, UnixStream)> {
    let mut lp = Loop::new().map_err(io::Error::other)?;
    let (master, _master_end) = UnixStream::pair()?;
    let worker = Worker::new(config, handler, master, Vec::new(), None)?;
    watch_unanswered(&worker, &mut lp).map_err(io::Error::other)?;
    let (client, server) = UnixStream::pair()?;
    client.set_nonblocking(true)?;
    server.set_nonblocking(true)?;
    add_conn(&worker, &mut lp, Stream::Unix(server), "test".into());
    Ok((lp, worker, client))
}

/// The connection state machine without a network, for the fuzz target: one worker
/// (no listeners, no master) serving `handler` on one end of a socketpair, while the
/// other end sends `chunks` one write each (as a client's segments arrive), reads
/// everything the worker writes, and finally closes its write side. Returns the bytes
/// the worker wrote and the most it ever held buffered for the connection; an error if
/// the worker stops reading an open connection or keeps it open 1000 iterations after
/// the client's EOF (a hang).
pub(crate) fn drive_connection(
    config: &Config,
    handler: Rc<dyn Handler>,
    chunks: &[&[u8]],
) -> io::Result<(Vec<u8>, usize)> {
    let (mut lp, worker, mut client) = one_connection(config, handler)?;
    let (mut output, mut peak) = (Vec::new(), 0);
    let mut step = |lp: &mut Loop, client: &mut UnixStream| -> io::Result<bool> {
        lp.loop_once(Some(Duration::ZERO))
            .map_err(io::Error::other)?;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match io::Read::read(client, &mut buf) {
                Ok(0) => break,
                Ok(n) => output.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        let w = worker.borrow();
        let open = w.conns.values().next();
        if let Some(conn) = open {
            peak = peak.max(conn.parser.held() + conn.sent + conn.unsent());
        }
        Ok(open.is_some())
    };
    for chunk in chunks {
        let (mut rest, mut blocked) = (*chunk, 0);
        // Only while the connection is open: a write to a closed one raises SIGPIPE.
        while !rest.is_empty() && step(&mut lp, &mut client)? {
            match client.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && blocked < 1000 => blocked += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::other(
                        "the worker stopped reading an open connection",
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    for _ in 0..1000 {
        if !step(&mut lp, &mut client)? {
            return Ok((output, peak));
        }
    }
    Err(io::Error::other(
        "the connection is still open 1000 iterations after the client's EOF",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_responder_dropped_while_the_worker_is_borrowed_still_answers_500() {
        let kept: Rc<RefCell<Option<Responder>>> = Rc::default();
        let stash = kept.clone();
        let handler = move |_: &mut Loop, _: Request, responder: Responder| {
            *stash.borrow_mut() = Some(responder);
        };
        let (mut lp, worker, mut client) =
            one_connection(&Config::default(), Rc::new(handler)).unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        for _ in 0..100 {
            if kept.borrow().is_some() {
                break;
            }
            lp.loop_once(Some(Duration::from_millis(10))).unwrap();
        }
        let responder = kept.borrow_mut().take().expect("the handler ran");
        {
            let _busy = worker.borrow_mut();
            drop(responder);
        }
        let mut reply = Vec::new();
        for _ in 0..100 {
            lp.loop_once(Some(Duration::from_millis(10))).unwrap();
            let mut buf = [0u8; 4096];
            if let Ok(n) = client.read(&mut buf) {
                reply.extend_from_slice(&buf[..n]);
            }
            if reply.ends_with(b"Internal Server Error\n") {
                break;
            }
        }
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 500 "), "{reply:?}");
    }
}
