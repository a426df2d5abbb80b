//! A worker: serves HTTP/1.1 connections accepted from the shared listeners on a fresh
//! loop, reports to the master over its link (ready, heartbeats, recycle requests), and
//! drains when the supervisor's drain fd becomes readable (SIGTERM).
//!
//! The worker's state is its loop's data: a `Loop<Worker>`, whose callbacks all get
//! `&mut Worker`. The loop owns the sockets — each listener and each connection's
//! stream is the source of its watch. A connection's socket is read in its watch's
//! callback, which gets it. Output is written as soon as it exists, by `Conn::flush`
//! (from `drive`; the answers to a batch of pipelined requests in one write, after
//! `process` has queued them all): with the socket the
//! callback has, or, for output produced elsewhere (an answer sent from a timer, an
//! idle or a waker callback, a timeout's 408), with the socket the loop lends
//! (`Loop::source_mut`). Only output the socket does not take at once makes the watch
//! also wait for room to write (`set_interest`). Each connection has one timer,
//! restarted in place whenever the timeout it needs changes.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use super::h1::{
    self, BodyRead, Framing, Limits, Parsed, Parser, Peer, Request, Response, CONTINUE,
};
use super::request_body::{BodyError, BodyReceiver, Inbound};
use super::response_body::{BodySender, Shared, StreamEnded, LOW_WATER};
use super::stream::{self, Stream};
use super::{BodyMode, Config, Handler, StreamedRequest};
use crate::id_map::IdMap;
use crate::supervisor::{Drain, Listener, MasterLink, Peers, WorkerContext};
use crate::{Interest, Io, Loop, Readiness, Timer, Waker};
use ::http::StatusCode;
use accepting::{accept, watch_listener, Pace};

#[path = "accepting.rs"]
mod accepting;

/// Requests answered per connection before the next is parsed (pipelining depth).
pub(crate) const MAX_PIPELINED: usize = 32;
/// The most a connection reads at once.
const READ_BUF: usize = 16 * 1024;
/// Output queued while pipelined requests are processed that is written at once, not
/// after the batch: large answers go out as they come.
const WRITE_AT: usize = 64 * 1024;
/// How long a draining worker keeps an idle keep-alive connection open.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// Unsent response bytes past which a connection parses no more requests until the
/// client reads: a client that pipelines and never reads cannot grow the worker.
const MAX_UNSENT: usize = 256 * 1024;
/// How long a finished connection keeps discarding the peer's input (see
/// `Conn::start_lingering`).
const LINGER: Duration = Duration::from_secs(2);
/// The interval of a connection's timer, which never fires by itself: it is restarted
/// to the timeout the connection needs.
const PARKED: Duration = Duration::MAX;

/// Answers one request. Send exactly once, now or later from the loop, or from another
/// thread through [`Responder::into_remote`]; a responder dropped unsent answers 500 (at
/// once if dropped during the handler call, else in the loop's next iteration).
pub struct Responder {
    outbox: Rc<Outbox>,
    conn: u64,
    seq: u64,
    sent: bool,
}

/// A request's answer on its way to its connection; `None` for a responder dropped
/// unsent, which owes a 500.
pub(crate) struct Answer {
    conn: u64,
    seq: u64,
    response: Option<Response>,
}

/// What the worker's waker brings from outside the loop.
pub(crate) enum Reply {
    /// A [`RemoteResponder`]'s answer, or the 500 of a responder dropped unsent outside
    /// a handler call.
    Answer(Answer),
    /// A stream's sender was dropped unfinished outside the loop: its connection is to
    /// be driven (and closed).
    Wake { conn: u64 },
}

/// A handler's answer, whole or streamed, for the worker to take in.
enum Given {
    Whole(Answer),
    Stream {
        head: ::http::Response<()>,
        shared: Rc<Shared>,
    },
}

/// How answers reach the worker's state, which a [`Responder`] does not have (it gets
/// only the loop). Shared by the worker and its responders.
struct Outbox {
    /// Whether a handler call is running: its answers wait in `held`, which the worker
    /// takes in as soon as the call returns.
    in_call: Cell<bool>,
    held: Cell<Vec<Given>>,
    /// For what comes without the loop at hand: a [`RemoteResponder`]'s answer (from
    /// any thread), the 500 of a responder dropped unsent outside a handler call, a
    /// stream's sender dropped outside it. It wakes the loop, which takes it in in the
    /// iteration that wakes.
    remote: Waker<Reply>,
}

impl Outbox {
    /// Keeps `given` for the worker while a handler call runs; else hands it back.
    fn hold(&self, given: Given) -> Option<Given> {
        if !self.in_call.get() {
            return Some(given);
        }
        let mut held = self.held.take();
        held.push(given);
        self.held.set(held);
        None
    }
}

impl Responder {
    /// Sends `response` for this request.
    pub fn send(mut self, lp: &mut Loop<Worker>, response: Response) {
        self.sent = true;
        let answer = Answer {
            conn: self.conn,
            seq: self.seq,
            response: Some(response),
        };
        if let Some(given) = self.outbox.hold(Given::Whole(answer)) {
            // From a callback of the app's (a timer, another fd): taken in, and
            // written, at the end of this iteration.
            lp.later(move |lp, w| take_in(lp, w, given, None));
        }
    }

    /// Starts a streamed response: `head` (its status and headers; a `Content-Length`
    /// in it fixes the body's length, else the body is chunked) goes out as soon as
    /// every earlier answer on the connection has, and the body follows as the
    /// [`BodySender`] sends it. Server-sent events are one: a `text/event-stream` head,
    /// then one send per event.
    pub fn stream(mut self, lp: &mut Loop<Worker>, head: ::http::Response<()>) -> BodySender {
        self.sent = true;
        let shared = Shared::new(self.conn, self.seq, self.outbox.remote.clone());
        shared.expect_length(&head);
        let given = Given::Stream {
            head,
            shared: Rc::clone(&shared),
        };
        if let Some(given) = self.outbox.hold(given) {
            lp.later(move |lp, w| take_in(lp, w, given, None));
        }
        BodySender::new(shared)
    }

    /// This responder as one that is `Send`: hand it, with the request, to another
    /// thread (a pool for blocking work, a client of another service), and answer from
    /// there. The answer wakes the worker's loop through its cross-thread waker, and is
    /// written in the iteration that wakes; the loop goes on serving the worker's other
    /// connections (and beating its heartbeat) meanwhile.
    pub fn into_remote(mut self) -> RemoteResponder {
        self.sent = true; // the remote responder owes the answer now
        RemoteResponder {
            remote: self.outbox.remote.clone(),
            conn: self.conn,
            seq: self.seq,
            sent: false,
        }
    }
}

/// A [`Responder`] for another thread ([`Responder::into_remote`]). Send exactly once;
/// dropped unsent, it answers 500.
pub struct RemoteResponder {
    remote: Waker<Reply>,
    conn: u64,
    seq: u64,
    sent: bool,
}

impl RemoteResponder {
    /// Sends `response` for this request, from any thread. If the worker is gone (its
    /// loop, and the connection with it), the answer is dropped.
    pub fn send(mut self, response: Response) {
        self.sent = true;
        self.deliver(Some(response));
    }

    fn deliver(&self, response: Option<Response>) {
        let _ = self.remote.send(Reply::Answer(Answer {
            conn: self.conn,
            seq: self.seq,
            response,
        }));
    }
}

impl Drop for RemoteResponder {
    fn drop(&mut self) {
        if !self.sent {
            self.deliver(None);
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        let answer = Answer {
            conn: self.conn,
            seq: self.seq,
            response: None,
        };
        if let Some(Given::Whole(answer)) = self.outbox.hold(Given::Whole(answer)) {
            // Refused only once the loop is gone, and its connections with it.
            let _ = self.outbox.remote.send(Reply::Answer(answer));
        }
    }
}

enum Slot {
    /// Waiting for its handler.
    Pending {
        head: bool,
        keep_alive: bool,
        /// The request was HTTP/1.0 (a streamed answer cannot be chunked).
        http10: bool,
        /// The request line, kept only when there is an access log to write it to.
        line: Option<String>,
        /// `100 Continue` is owed before the answer (its streamed body is being read).
        interim: bool,
    },
    /// Ready to go out once every earlier slot has.
    Ready { bytes: Vec<u8>, close: bool },
    /// A streamed answer: its head (until it goes into the output), then the body its
    /// sender sends, framed as it goes out. Later answers wait until it is finished.
    Streaming {
        head: Vec<u8>,
        shared: Rc<Shared>,
        framing: Framing,
        close: bool,
    },
}

impl Slot {
    /// The bytes it holds.
    fn len(&self) -> usize {
        match self {
            Slot::Pending { line, .. } => line.as_ref().map_or(0, String::len),
            Slot::Ready { bytes, .. } => bytes.len(),
            Slot::Streaming { head, shared, .. } => head.len() + shared.pending_len(),
        }
    }
}

/// What a stream is after its sent bytes went into the output.
enum StreamState {
    /// More may come.
    Open,
    /// The body is complete.
    Finished,
    /// The body is cut short (its sender was dropped unfinished, or it broke its
    /// `Content-Length`): the connection is to close without ending it.
    Cut,
}

/// Frames what a stream's sender sent (`data`) into `out`, and says what the stream is.
fn frame(out: &mut Vec<u8>, framing: Framing, shared: &Shared, data: Vec<u8>) -> StreamState {
    if framing == Framing::None {
        // HEAD, or a bodyless status: the head is the whole answer.
        shared.ended.set(Some(StreamEnded::NoBody));
        return StreamState::Finished;
    }
    match framing {
        Framing::Chunked if !data.is_empty() => {
            let _ = write!(out, "{:x}\r\n", data.len());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        }
        Framing::Length(_) => {
            let left = shared.remaining.get().unwrap_or(0);
            let take = usize::try_from(left).map_or(data.len(), |left| left.min(data.len()));
            out.extend_from_slice(&data[..take]);
            shared.remaining.set(Some(left - take as u64));
            if take < data.len() {
                log::error!("a streamed body went past its Content-Length; closing");
                shared.ended.set(Some(StreamEnded::TooLong));
                return StreamState::Cut;
            }
        }
        Framing::UntilClose => out.extend_from_slice(&data),
        Framing::None | Framing::Chunked => {}
    }
    if shared.aborted.get() {
        return StreamState::Cut;
    }
    if !shared.finished.get() {
        return StreamState::Open;
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(_) if shared.remaining.get().is_some_and(|left| left > 0) => {
            log::error!("a streamed body finished short of its Content-Length; closing");
            return StreamState::Cut;
        }
        _ => {}
    }
    StreamState::Finished
}

/// The request whose head is parsed and whose body is being read.
// One per connection, in place: boxing the head would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Reading {
    /// Buffered: the request waits for its body, and for its handler after that.
    Buffered {
        head: ::http::request::Parts,
        slot: Slot,
    },
    /// Streamed: its handler has it, and the body goes to its receiver as it comes.
    Streamed {
        inbound: Rc<Inbound>,
        keep_alive: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TimerKind {
    Header,
    Body,
    Send,
    Idle,
    Linger,
}

/// One connection's state. Its socket is not here: the loop owns it, as the source of
/// the connection's watch `io`.
struct Conn {
    io: Io<Stream>,
    /// What `io` waits for now (nothing: paused).
    watching: Interest,
    /// Restarted in place to the timeout the connection needs (see `set_timer`).
    timer: Timer,
    /// The timeout `timer` counts; `None`: none, and a firing is ignored.
    timer_kind: Option<TimerKind>,
    peer: Peer,
    parser: Parser,
    slots: VecDeque<Slot>,
    first_seq: u64,
    /// Encoded responses; `out[sent..]` is still to be written.
    out: Vec<u8>,
    sent: usize,
    /// Input came since the last request was parsed (see `Conn::request_begun`).
    sent_since_request: bool,
    /// When the parser last made progress: the body timeout counts from it.
    last_progress: Instant,
    /// When a write last took bytes: the send timeout counts from it.
    last_write: Instant,
    /// Requests were left unparsed because the pipeline or the unsent output was full;
    /// `drive` resumes parsing once both have room.
    held_back: bool,
    /// No more requests are parsed: refused input, or the peer's EOF with no complete
    /// request left in the buffer.
    no_more_requests: bool,
    /// The peer sent EOF: what is buffered is still parsed and answered, nothing more
    /// is read.
    peer_closed: bool,
    /// Everything is answered and our side shut down; the peer's input is discarded
    /// until its EOF (see `Conn::start_lingering`).
    lingering: bool,
    /// Streams dropped from the queue behind a response that closes: `drive` ends
    /// them (their senders' sends fail from then on).
    unsent_streams: Vec<Rc<Shared>>,
    /// The request whose body is being read, once its head is parsed.
    reading: Option<Reading>,
    /// The last request asked to close (`Connection: close`, or HTTP/1.0 without
    /// keep-alive) and nothing was refused since: RFC 9112 §9.6 forbids its client to
    /// send more, so closing after it need not look for unread input (see
    /// `Conn::start_lingering`).
    client_closes: bool,
    /// Within the connection's callback: its read found the socket empty (a short read
    /// or `EWOULDBLOCK`) a moment ago. Cleared when the callback returns.
    read_dry: bool,
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

    /// The receiver of the body being streamed to its handler.
    fn inbound(&self) -> Option<&Rc<Inbound>> {
        match &self.reading {
            Some(Reading::Streamed { inbound, .. }) => Some(inbound),
            _ => None,
        }
    }

    /// Whether parsing waits: on the handler, for a streamed body its receiver holds
    /// enough of; else for room in the pipeline and in the unsent output.
    fn parse_blocked(&self) -> bool {
        match self.inbound() {
            Some(inbound) => inbound.is_full(),
            None => self.slots.len() >= MAX_PIPELINED || self.unsent() >= MAX_UNSENT,
        }
    }

    /// Everything is answered and written, and no more requests will be read.
    fn finished(&self) -> bool {
        self.out.is_empty() && self.no_more_requests && self.slots.is_empty() && !self.body_wanted()
    }

    /// A streamed body whose receiver still takes it: it is read on to its end, even
    /// once no more requests are (its answer may close the connection before then).
    fn body_wanted(&self) -> bool {
        self.inbound().is_some_and(|inbound| !inbound.is_dropped())
    }

    /// Where request `seq` is in the queue, if it is there.
    fn slot_index(&self, seq: u64) -> Option<usize> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        (index < self.slots.len()).then_some(index)
    }

    /// Makes request `seq`'s answer close the connection, if it is not given yet.
    fn close_after(&mut self, seq: u64) {
        let index = self.slot_index(seq);
        if let Some(Slot::Pending { keep_alive, .. }) = index.and_then(|i| self.slots.get_mut(i)) {
            *keep_alive = false;
        }
    }

    /// What the watch waits for: input while the connection can take more — not after
    /// the peer's EOF or a refusal, and not while its parser is full (pipelined requests
    /// held back), where a level-triggered watch on unread input would spin; room to
    /// write while output waits, and while a finished connection waits for its callback
    /// to wind it down (only if `drive` could not: see `socket`).
    fn wants(&self) -> Interest {
        let more = !self.no_more_requests || self.body_wanted();
        let read = self.lingering || (!self.peer_closed && more && self.parser.room() > 0);
        let write = !self.out.is_empty() || (self.finished() && !self.lingering);
        let mut wants = Interest::NONE;
        if read {
            wants |= Interest::READ;
        }
        if write {
            wants |= Interest::WRITE;
        }
        wants
    }

    /// Changes what the watch waits for, in place: one syscall at most, none if the
    /// interest stays.
    fn watch_for(&mut self, lp: &mut Loop<Worker>, wanted: Interest) -> crate::Result<()> {
        if wanted == self.watching {
            return Ok(());
        }
        if wanted.is_empty() {
            lp.pause(self.io)?;
        } else {
            lp.set_interest(self.io, wanted)?;
            if self.watching.is_empty() {
                lp.resume(self.io)?;
            }
        }
        self.watching = wanted;
        Ok(())
    }

    /// Reads what the socket has through `buf`, as far as the parser has room (all of
    /// it while lingering, discarded).
    fn read_input(&mut self, stream: &Stream, buf: &mut [u8]) {
        loop {
            let room = if self.lingering {
                buf.len()
            } else {
                self.parser.room().min(buf.len())
            };
            if room == 0 {
                break;
            }
            match stream.read(&mut buf[..room]) {
                Ok(0) => {
                    self.peer_closed = true;
                    break;
                }
                Ok(n) => {
                    if !self.lingering {
                        self.parser.feed(&buf[..n]);
                        self.sent_since_request = true;
                    }
                    if n < room {
                        self.read_dry = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_dry = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.peer_closed = true;
                    break;
                }
            }
        }
    }

    /// Moves the ready responses at the front of the queue into the output, in order,
    /// up to one that says `Connection: close`, and what a stream at the front has sent
    /// (up to its end, if it has ended).
    fn queue_ready(&mut self) {
        let ready = matches!(
            self.slots.front(),
            Some(Slot::Ready { .. } | Slot::Streaming { .. } | Slot::Pending { interim: true, .. })
        );
        if self.sent > 0 && ready {
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        loop {
            let close = match self.slots.front_mut() {
                Some(Slot::Pending { interim, .. }) if *interim => {
                    *interim = false;
                    self.out.extend_from_slice(CONTINUE);
                    return;
                }
                Some(Slot::Ready { bytes, close }) => {
                    self.out.append(bytes);
                    *close
                }
                Some(Slot::Streaming {
                    head,
                    shared,
                    framing,
                    close,
                }) => {
                    self.out.append(head);
                    match frame(&mut self.out, *framing, shared, shared.pending.take()) {
                        StreamState::Open => return,
                        StreamState::Finished => *close,
                        StreamState::Cut => true,
                    }
                }
                _ => return,
            };
            self.slots.pop_front();
            self.first_seq += 1;
            if close {
                self.no_more_requests = true;
                // Streams queued behind are never sent: `drive` ends them.
                for slot in self.slots.drain(..) {
                    if let Slot::Streaming { shared, .. } = slot {
                        self.unsent_streams.push(shared);
                    }
                }
                return;
            }
        }
    }

    /// Moves the ready responses into the output and writes what the socket takes, if
    /// at hand (else the output waits for the watch to report room); an error if the
    /// socket broke.
    fn flush(&mut self, stream: Option<&Stream>, now: Instant) -> io::Result<()> {
        self.queue_ready();
        match stream {
            Some(stream) => self.write_out(stream, now),
            None => Ok(()),
        }
    }

    /// Writes as much of the output as the socket takes; an error if it broke.
    fn write_out(&mut self, stream: &Stream, now: Instant) -> io::Result<()> {
        let mut wrote = false;
        while self.sent < self.out.len() {
            match stream.write(&self.out[self.sent..]) {
                Ok(n) => {
                    self.sent += n;
                    wrote = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        } else if wrote {
            // Only output left waiting has a send timeout to count from here.
            self.last_write = now;
        }
        Ok(())
    }

    /// A finished connection: closing with the peer's input unread (a refused request's
    /// rest, requests pipelined after a close) would make the kernel send a reset,
    /// which can destroy the response before the client reads it; so then, unless the
    /// peer has closed its side, ours is shut down and its input discarded until its EOF
    /// or for `LINGER` at most (nginx's lingering close). Returns whether it lingers;
    /// if not, it is to be closed.
    fn start_lingering(&mut self, stream: &Stream) -> bool {
        // Reading stops once no more requests are taken, so input may wait in the kernel;
        // unless the client said it sends nothing more, all it sent is read, and the
        // socket was found empty in this very callback (answered at once: nginx closes
        // so too, without a look). A client that sends on in that moment anyway may get
        // a reset; one whose answer came later (deferred, or behind another in a
        // pipeline) is looked at, as its input may have come meanwhile.
        let read_all = self.client_closes
            && self.read_dry
            && !self.parser.mid_request()
            && self.reading.is_none();
        let unread = !self.peer_closed
            && (self.parser.buffered() > 0 || (!read_all && stream.has_unread_input()));
        self.lingering = unread && stream.shutdown_write().is_ok();
        self.lingering
    }
}

/// A worker's state: the data of its loop, a `Loop<Worker>`, which every callback of
/// that loop gets as `&mut Worker` — a handler's own timers and watches too. Opaque:
/// an app reaches its requests' connections only through their [`Responder`]s.
pub struct Worker {
    conns: IdMap<u64, Conn>,
    /// Connections are numbered, never reusing a number in the worker's life: a
    /// responder may outlive its connection, and an fd number (or a watch's place) is
    /// soon given to another, whose client must not get the stale answer.
    next_conn: u64,
    /// The listeners' watches (the loop owns the listeners); empty once draining.
    listeners: Vec<Io<Listener>>,
    pace: Pace,
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
    link: MasterLink,
    /// The watch of the supervisor's drain fd (none in the tests' workers).
    drain_watch: Option<Io<Drain>>,
    handler: Rc<dyn Handler>,
    outbox: Rc<Outbox>,
    /// What connections read into, one for all: zeroing a buffer on the stack at every
    /// read cost more than the read's copy.
    read_buf: Box<[u8]>,
}

/// The worker's main; its return value is the process's exit status.
pub(crate) fn run(context: WorkerContext, config: &Config, handler: Rc<dyn Handler>) -> i32 {
    let slot = context.slot;
    let served = config
        .supervisor
        .backend
        .map_or_else(Loop::new, Loop::with_backend)
        .and_then(|mut lp| serve(&mut lp, context, config, handler));
    served.unwrap_or_else(|e| {
        eprintln!("forkloop worker {slot}: {e}");
        1
    })
}

impl Worker {
    /// A worker with no listeners yet, for `lp`, where responders dropped unsent wake it.
    fn new(
        lp: &mut Loop<Worker>,
        config: &Config,
        handler: Rc<dyn Handler>,
        link: MasterLink,
        max_requests: Option<u64>,
    ) -> crate::Result<Worker> {
        let (remote, _) = lp.waker(|lp, w, reply| match reply {
            Reply::Answer(answer) => take_in(lp, w, Given::Whole(answer), None),
            Reply::Wake { conn } => drive(lp, w, conn, None),
        })?;
        let outbox = Outbox {
            in_call: Cell::new(false),
            held: Cell::default(),
            remote,
        };
        let access_log = config.access_log.as_deref().map(open_log).transpose();
        Ok(Worker {
            conns: IdMap::default(),
            next_conn: 0,
            listeners: Vec::new(),
            pace: Pace::new(Peers::Fixed(config.supervisor.workers)),
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
            link,
            drain_watch: None,
            handler,
            outbox: Rc::new(outbox),
            read_buf: vec![0; READ_BUF].into_boxed_slice(),
        })
    }
}

fn serve(
    lp: &mut Loop<Worker>,
    context: WorkerContext,
    config: &Config,
    handler: Rc<dyn Handler>,
) -> crate::Result<i32> {
    let WorkerContext {
        listeners,
        lane,
        link,
        drain: drain_fd,
        max_requests,
        peers,
        ..
    } = context;
    let mut worker = Worker::new(lp, config, handler, link.clone(), max_requests)?;
    // Laned TCP listeners are its own (reuse_port): there are no bursts to share.
    worker.pace = Pace::new(if lane.is_some() {
        Peers::Fixed(1)
    } else {
        peers
    });
    // The drain fd stays readable once the drain begins: its watch is paused then
    // (not cancelled: the fd stays open for the SIGTERM handler's next write).
    let drain_watch = lp.watch_io(drain_fd, Interest::READ, |lp, w, _, _| drain(lp, w))?;
    worker.drain_watch = Some(drain_watch);
    lp.watch_signal(libc::SIGUSR1, |_, w, _| reopen_log(w))?;
    // The master writes nothing: the link is readable only at its EOF.
    lp.watch_io(link.clone(), Interest::READ, |lp, _, _, _| {
        log::warn!("worker {}: the master is gone; exiting", std::process::id());
        lp.stop(1);
    })?;
    link.beat_on(lp)?;
    // For the master's status view: the requests served, as often as the heartbeat.
    lp.every(link.heartbeat_interval(), |_, w| {
        let _ = w.link.report_served(w.served);
    })?;
    for listener in listeners {
        // Once here, not at every accept (where the OS copies it to the connection).
        if let Err(e) = stream::nodelay_for_accepted(&listener) {
            log::warn!("TCP_NODELAY on a listener: {e}; its connections keep Nagle");
        }
        watch_listener(lp, &mut worker, listener)?;
    }
    let _ = link.ready();
    let code = lp.run(&mut worker)?;
    // Leave nothing half-open behind.
    let ids: Vec<u64> = worker.conns.keys().copied().collect();
    for id in ids {
        close(lp, &mut worker, id);
    }
    Ok(code)
}

fn open_log(path: &std::path::Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

fn reopen_log(w: &mut Worker) {
    if let Some(path) = &w.access_log_path {
        match open_log(path) {
            Ok(file) => w.access_log = Some(file),
            Err(e) => log::error!("reopening the access log {}: {e}", path.display()),
        }
    }
}

fn add_conn(lp: &mut Loop<Worker>, w: &mut Worker, stream: Stream, peer: Peer) {
    w.next_conn += 1;
    let id = w.next_conn;
    let watched = lp.watch_io(stream, Interest::READ, move |lp, w, stream, ready| {
        on_ready(lp, w, id, stream, ready)
    });
    let io = match watched {
        Ok(io) => io,
        Err(e) => {
            // The socket closes with `e`.
            log::error!("watching connection {id}: {}", e.error);
            return;
        }
    };
    let timer = match lp.every(PARKED, move |lp, w| on_timeout(lp, w, id)) {
        Ok(timer) => timer,
        Err(e) => {
            log::error!("a timer for connection {id}: {e}");
            lp.cancel(io);
            return;
        }
    };
    let now = lp.now();
    let conn = Conn {
        io,
        watching: Interest::READ,
        timer,
        timer_kind: None,
        peer,
        parser: Parser::new(w.limits),
        slots: VecDeque::new(),
        first_seq: 0,
        out: Vec::new(),
        sent: 0,
        sent_since_request: false,
        last_progress: now,
        last_write: now,
        held_back: false,
        no_more_requests: false,
        peer_closed: false,
        lingering: false,
        unsent_streams: Vec::new(),
        reading: None,
        client_closes: false,
        read_dry: false,
    };
    w.conns.insert(id, conn);
    set_timer(lp, w, id);
}

/// The connection's watch fired: the one place its socket is read.
fn on_ready(lp: &mut Loop<Worker>, w: &mut Worker, id: u64, stream: &Stream, ready: Readiness) {
    let Some(conn) = w.conns.get_mut(&id) else {
        return;
    };
    let input = Readiness::READABLE | Readiness::HANGUP | Readiness::ERROR;
    if conn.watching.contains(Interest::READ) && ready.intersects(input) {
        let lingering = conn.lingering;
        conn.read_input(stream, &mut w.read_buf);
        if lingering {
            conn.read_dry = false;
            if conn.peer_closed {
                close(lp, w, id);
            }
            return;
        }
        // A half-closed client still gets answers to what it sent: `process` marks the
        // connection done once no complete request is left, and `drive` closes it.
        process(lp, w, id, Some(stream));
    }
    drive(lp, w, id, Some(stream));
    if let Some(conn) = w.conns.get_mut(&id) {
        conn.read_dry = false;
    }
}

/// The connection's socket: `given` by its watch's callback, which holds it; elsewhere
/// the loop lends it. `None` only while that callback runs further up the stack (a
/// handler that runs the loop itself): then output waits for the watch to report room.
fn socket<'a>(
    lp: &'a Loop<Worker>,
    io: Io<Stream>,
    given: Option<&'a Stream>,
) -> Option<&'a Stream> {
    given.or_else(|| lp.source(io))
}

/// Parses and dispatches every request the connection has buffered, and hands a
/// streamed body's bytes to its receiver. The answers given at once are queued in
/// order, and written together by the `drive` that follows (one write for a batch of
/// pipelined requests, as nginx and the TechEmpower plaintext test expect), or here
/// once `WRITE_AT` bytes wait. `stream`: the socket, when the connection's callback
/// (which holds it) calls.
fn process(lp: &mut Loop<Worker>, w: &mut Worker, id: u64, stream: Option<&Stream>) {
    loop {
        let now = lp.now();
        let Some(conn) = w.conns.get_mut(&id) else {
            return;
        };
        if conn.no_more_requests && !conn.body_wanted() {
            break;
        }
        if conn.parse_blocked() {
            conn.held_back = true;
            break;
        }
        let progress = conn.parser.progress();
        let parsed = conn.parser.next();
        // Only a body still awaited has a timeout to count from here.
        if conn.parser.progress() != progress && conn.parser.reading_body() {
            conn.last_progress = now;
        }
        match parsed {
            Ok(None) => {
                conn.no_more_requests = conn.peer_closed;
                if conn.peer_closed {
                    if let Some(inbound) = conn.inbound() {
                        inbound.fail(lp, BodyError::Closed);
                    }
                }
                break;
            }
            Ok(Some(Parsed::Head(incoming))) => {
                if !begin_request(lp, w, id, incoming) {
                    break;
                }
            }
            Ok(Some(Parsed::Data(data))) => {
                let inbound = conn.inbound().expect("a streamed body has its receiver");
                inbound.push(lp, data);
                // A body its handler no longer reads is discarded, up to the most a
                // request body may be buffered; past that, the connection closes after
                // the answer instead of reading on for nothing.
                if inbound.discarded() > w.limits.max_body {
                    log::debug!(
                        "{}: discarding a long body; closing after the answer",
                        conn.peer
                    );
                    let seq = inbound.seq;
                    conn.reading = None;
                    conn.no_more_requests = true;
                    conn.client_closes = false;
                    conn.close_after(seq);
                }
                continue;
            }
            Ok(Some(Parsed::End(body))) => end_request(lp, w, id, body),
            Err(refusal) => {
                log::debug!("{}: refused: {}", conn.peer, refusal.why);
                refuse(lp, w, id, refusal.status, refusal.why, BodyError::Invalid);
                break;
            }
        }
        let now = lp.now();
        let Some(conn) = w.conns.get_mut(&id) else {
            return;
        };
        conn.queue_ready();
        if conn.out.len() - conn.sent < WRITE_AT {
            continue;
        }
        let socket = socket(lp, conn.io, stream);
        if conn.flush(socket, now).is_err() {
            close(lp, w, id);
            return;
        }
    }
}

/// A head is parsed: asks the handler how it takes the body, and a streamed one's
/// handler gets the request now; `false` if the request is refused.
fn begin_request(lp: &mut Loop<Worker>, w: &mut Worker, id: u64, incoming: h1::Incoming) -> bool {
    let Some(conn) = w.conns.get_mut(&id) else {
        return false;
    };
    let line = w.access_log_path.is_some().then(|| {
        format!(
            "{} {} HTTP/1.{}",
            incoming.method, incoming.target, incoming.minor_version
        )
    });
    // A keep-alive timeout of zero turns keep-alive off.
    let keep_alive = incoming.keep_alive && !w.draining && !w.keepalive_timeout.is_zero();
    conn.client_closes = !incoming.keep_alive;
    let head_only = incoming.method == "HEAD";
    let http10 = incoming.minor_version == 0;
    let (head, ()) = match incoming.into_request(conn.peer) {
        Ok(request) => request.into_parts(),
        Err(why) => {
            log::debug!("{}: refused: {why}", conn.peer);
            answer_and_close(w, id, 400, why);
            return false;
        }
    };
    let handler = Rc::clone(&w.handler);
    let read = match panic::catch_unwind(AssertUnwindSafe(|| handler.body_mode(&head))) {
        Ok(BodyMode::Streamed) => BodyRead::Streamed,
        Ok(_) => BodyRead::Buffered,
        Err(_) => {
            log::error!("a handler's body_mode panicked; answering 500");
            answer_and_close(w, id, 500, "Internal Server Error");
            return false;
        }
    };
    if let Err(refusal) = conn.parser.read_body(read) {
        log::debug!("{}: refused: {}", conn.peer, refusal.why);
        answer_and_close(w, id, refusal.status, refusal.why);
        return false;
    }
    let wants_continue = conn.parser.take_continue();
    let slot = Slot::Pending {
        head: head_only,
        keep_alive,
        http10,
        line,
        interim: false,
    };
    if read == BodyRead::Buffered {
        if wants_continue {
            conn.slots.push_back(Slot::Ready {
                bytes: CONTINUE.to_vec(),
                close: false,
            });
        }
        conn.reading = Some(Reading::Buffered { head, slot });
        return true;
    }
    conn.slots.push_back(slot);
    let seq = conn.first_seq + conn.slots.len() as u64 - 1;
    let inbound = Inbound::new(id, seq, wants_continue, w.outbox.remote.clone());
    conn.reading = Some(Reading::Streamed {
        inbound: Rc::clone(&inbound),
        keep_alive,
    });
    let request = StreamedRequest::from_parts(head, BodyReceiver::new(inbound));
    dispatch(lp, w, id, seq, Call::Streamed(request));
    true
}

/// A request is complete: a buffered one goes to its handler, a streamed one's
/// receiver gets the end.
fn end_request(lp: &mut Loop<Worker>, w: &mut Worker, id: u64, body: Vec<u8>) {
    let Some(conn) = w.conns.get_mut(&id) else {
        return;
    };
    conn.sent_since_request = false;
    // The request's timeout is over: `set_timer` picks the next afresh.
    conn.timer_kind = None;
    match conn.reading.take() {
        Some(Reading::Buffered { head, slot }) => {
            let keep_alive = matches!(
                slot,
                Slot::Pending {
                    keep_alive: true,
                    ..
                }
            );
            conn.slots.push_back(slot);
            // RFC 9112 §9.6: nothing after a request that closes is processed.
            conn.no_more_requests |= !keep_alive;
            let seq = conn.first_seq + conn.slots.len() as u64 - 1;
            dispatch(
                lp,
                w,
                id,
                seq,
                Call::Buffered(Request::from_parts(head, body)),
            );
        }
        Some(Reading::Streamed {
            inbound,
            keep_alive,
        }) => {
            conn.no_more_requests |= !keep_alive;
            inbound.complete(lp);
        }
        None => {}
    }
}

/// Refuses connection `id`'s input with `status` and closes after. A body being
/// streamed stops with `error`, and its request gets the refusal as its answer unless
/// its handler has begun one (then the connection closes after that).
fn refuse(
    lp: &mut Loop<Worker>,
    w: &mut Worker,
    id: u64,
    status: u16,
    why: &str,
    error: BodyError,
) {
    let Some(conn) = w.conns.get_mut(&id) else {
        return;
    };
    let Some(Reading::Streamed { inbound, .. }) = conn.reading.take() else {
        answer_and_close(w, id, status, why);
        return;
    };
    inbound.fail(lp, error);
    conn.no_more_requests = true;
    conn.client_closes = false;
    conn.close_after(inbound.seq);
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // Answers only if the handler has not (else there is no pending slot to fill).
    fill(w, id, inbound.seq, h1::text(code, format!("{why}\n")));
}

/// A handler call: with the request's body, or with its receiver.
enum Call {
    Buffered(Request),
    Streamed(StreamedRequest),
}

fn dispatch(lp: &mut Loop<Worker>, w: &mut Worker, id: u64, seq: u64, call: Call) {
    let responder = Responder {
        outbox: Rc::clone(&w.outbox),
        conn: id,
        seq,
        sent: false,
    };
    let outer = w.outbox.in_call.replace(true);
    let handler = &w.handler;
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| match call {
        Call::Buffered(request) => handler.call(lp, request, responder),
        Call::Streamed(request) => handler.call_streamed(lp, request, responder),
    }));
    w.outbox.in_call.set(outer);
    if outcome.is_err() {
        log::error!("a handler panicked; answering 500");
    }
    // What the handler answered (or dropped: a 500) goes into its slot at once.
    for given in w.outbox.held.take() {
        take_in(lp, w, given, Some(id));
    }
    w.served += 1;
    if w.max_requests.is_some_and(|max| w.served == max) {
        let _ = w.link.recycle();
    }
}

/// Takes an answer into its slot, then brings its connection up to date — unless it
/// is `current`, the connection whose requests are being processed, which does so
/// itself.
fn take_in(lp: &mut Loop<Worker>, w: &mut Worker, given: Given, current: Option<u64>) {
    let id = match given {
        Given::Whole(Answer {
            conn,
            seq,
            response,
        }) => {
            let response = response.unwrap_or_else(|| {
                log::error!("connection {conn}: a responder was dropped unsent; answering 500");
                internal_error()
            });
            if !fill(w, conn, seq, response) {
                return;
            }
            conn
        }
        Given::Stream { head, shared } => {
            let conn = shared.conn;
            if !start_stream(lp, w, head, shared) {
                return;
            }
            conn
        }
    };
    if current != Some(id) {
        drive(lp, w, id, None);
    }
}

/// A pending slot's request, taken out of connection `id`'s slot `seq` (which is left
/// empty and ready, to be filled); `None` if there is no such slot.
struct Taken {
    index: usize,
    head: bool,
    keep_alive: bool,
    http10: bool,
    line: Option<String>,
}

fn take_pending(w: &mut Worker, id: u64, seq: u64) -> Option<Taken> {
    let conn = w.conns.get_mut(&id)?;
    // Answered from the head alone, to a client that waits for `100 Continue` and sent
    // none of the body: it may reuse the connection without sending it, so the
    // connection closes after the answer (and no `100 Continue` follows it).
    if let Some(inbound) = conn.inbound().filter(|i| i.seq == seq && i.unasked()) {
        inbound.answered_unasked();
        conn.close_after(seq);
    }
    // Answered with the rest of the body unwanted: the connection goes on only if it
    // is known to be within what is discarded (see `process`); else the answer says it
    // closes (nginx closes after a 413 too), and the rest is not read.
    if let Some(inbound) = conn.inbound().filter(|i| i.seq == seq && i.is_dropped()) {
        let room = w.limits.max_body.saturating_sub(inbound.discarded());
        if !conn.parser.body_left().is_some_and(|left| left <= room) {
            conn.close_after(seq);
        }
    }
    let index = conn.slot_index(seq)?;
    let slot @ Slot::Pending { .. } = &mut conn.slots[index] else {
        return None;
    };
    let empty = Slot::Ready {
        bytes: Vec::new(),
        close: false,
    };
    let Slot::Pending {
        head,
        keep_alive,
        http10,
        line,
        ..
    } = std::mem::replace(slot, empty)
    else {
        unreachable!()
    };
    // Draining: only the last request in the queue closes the connection, so that
    // every request already handed to the app is answered.
    let last = index + 1 == conn.slots.len();
    Some(Taken {
        index,
        head,
        keep_alive: keep_alive && !(w.draining && last),
        http10,
        line,
    })
}

/// Encodes `response` into connection `id`'s pending slot `seq`; whether there was one.
fn fill(w: &mut Worker, id: u64, seq: u64, response: Response) -> bool {
    let Some(taken) = take_pending(w, id, seq) else {
        return false;
    };
    let date = http_date(&mut w.date);
    let Some(conn) = w.conns.get_mut(&id) else {
        return false;
    };
    let mut bytes = Vec::with_capacity(response.body().len() + 160);
    let encoded = h1::encode(&response, &mut bytes, taken.head, taken.keep_alive, date);
    let (status, length, keep_alive) = match encoded {
        Ok(keep_alive) => (response.status(), response.body().len(), keep_alive),
        Err(why) => {
            log::error!(
                "{}: the handler's response is invalid ({why}); answering 500",
                conn.peer
            );
            let fallback = internal_error();
            // The server's own response always encodes.
            let keep_alive = h1::encode(&fallback, &mut bytes, taken.head, taken.keep_alive, date);
            let length = fallback.body().len();
            (fallback.status(), length, keep_alive.unwrap_or(false))
        }
    };
    log_access(
        &mut w.access_log,
        conn.peer,
        date,
        taken.line,
        status,
        Some(length),
    );
    conn.slots[taken.index] = Slot::Ready {
        bytes,
        close: !keep_alive,
    };
    true
}

/// Puts a streamed answer's head into its slot; whether there was one. A head that
/// would break the framing gets a 500 instead, and ends the stream.
fn start_stream(
    lp: &mut Loop<Worker>,
    w: &mut Worker,
    head: ::http::Response<()>,
    shared: Rc<Shared>,
) -> bool {
    let Some(taken) = take_pending(w, shared.conn, shared.seq) else {
        shared.end(lp, StreamEnded::Closed);
        return false;
    };
    let date = http_date(&mut w.date);
    let Some(conn) = w.conns.get_mut(&shared.conn) else {
        return false;
    };
    let target = h1::Head {
        head_only: taken.head,
        keep_alive: taken.keep_alive,
        http10: taken.http10,
        date,
    };
    let mut bytes = Vec::with_capacity(160);
    match h1::encode_head(&head, None, target, &mut bytes) {
        Ok((keep_alive, framing)) => {
            if let Framing::Length(n) = framing {
                shared.remaining.set(Some(n));
            }
            // Begun during a drain: asked to finish from the start.
            shared.draining.set(w.draining);
            log_access(
                &mut w.access_log,
                conn.peer,
                date,
                taken.line,
                head.status(),
                None,
            );
            conn.slots[taken.index] = Slot::Streaming {
                head: bytes,
                shared,
                framing,
                close: !keep_alive || w.draining,
            };
        }
        Err(why) => {
            log::error!(
                "{}: the handler's stream head is invalid ({why}); answering 500",
                conn.peer
            );
            shared.end(lp, StreamEnded::Invalid);
            let fallback = internal_error();
            let keep_alive = h1::encode(&fallback, &mut bytes, taken.head, taken.keep_alive, date);
            let length = fallback.body().len();
            log_access(
                &mut w.access_log,
                conn.peer,
                date,
                taken.line,
                fallback.status(),
                Some(length),
            );
            conn.slots[taken.index] = Slot::Ready {
                bytes,
                close: !keep_alive.unwrap_or(false),
            };
        }
    }
    true
}

/// One line of the access log, for a request with its request line (`line`; `None`
/// when there is no log); a streamed body's length is `-`.
fn log_access(
    log: &mut Option<File>,
    peer: Peer,
    date: &str,
    line: Option<String>,
    status: StatusCode,
    length: Option<usize>,
) {
    if let (Some(log), Some(line)) = (log, line) {
        let status = status.as_u16();
        let length = length.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let _ = writeln!(log, "{peer} - - [{date}] \"{line}\" {status} {length}");
    }
}

/// Brings connection `id` up to date after a change, wherever it happened: moves its
/// ready responses into the output and writes what the socket takes (`stream`: the
/// socket, when the connection's callback calls), and once everything is answered and
/// written, lingers or closes (after a `Connection: close` response); then sets what its
/// watch waits for — room to write only while output is left — and its timer.
pub(crate) fn drive(lp: &mut Loop<Worker>, w: &mut Worker, id: u64, stream: Option<&Stream>) {
    let now = lp.now();
    let Some(conn) = w.conns.get_mut(&id) else {
        return;
    };
    // The handler began to read a streamed body: the client waiting for `100
    // Continue` gets it, unless the request is answered already.
    if let Some(seq) = conn
        .inbound()
        .filter(|i| i.continue_due.take())
        .map(|i| i.seq)
    {
        let index = conn.slot_index(seq);
        if let Some(Slot::Pending { interim, .. }) = index.and_then(|i| conn.slots.get_mut(i)) {
            *interim = true;
            // The client is asked for its body now: its timeout counts from here.
            conn.last_progress = now;
        }
    }
    let stream = socket(lp, conn.io, stream);
    if conn.flush(stream, now).is_err() {
        close(lp, w, id);
        return;
    }
    if let Some(stream) = stream.filter(|_| conn.finished() && !conn.lingering) {
        if !conn.start_lingering(stream) {
            close(lp, w, id);
            return;
        }
    }
    for shared in std::mem::take(&mut conn.unsent_streams) {
        shared.end(lp, StreamEnded::Closed);
    }
    // A stream being written learns how much the client has not taken yet.
    if let Some(Slot::Streaming { shared, .. }) = conn.slots.front() {
        let unsent = conn.out.len() - conn.sent;
        shared.unsent.set(unsent);
        if unsent < LOW_WATER {
            shared.run_writable(lp);
        }
    }
    // Parsing was held back while the queue or the output was full, or a streamed
    // body's receiver was.
    let more = !conn.no_more_requests || conn.body_wanted();
    let resume = conn.held_back && more && !conn.parse_blocked();
    conn.held_back &= !resume;
    if resume && conn.inbound().is_some() {
        // The wait was the handler's: the client's body timeout counts from now.
        conn.last_progress = now;
    }
    if let Err(e) = conn.watch_for(lp, conn.wants()) {
        log::error!("watching connection {id}: {e}");
        close(lp, w, id);
        return;
    }
    if resume {
        lp.later(move |lp, w| {
            process(lp, w, id, None);
            drive(lp, w, id, None);
        });
    }
    set_timer(lp, w, id);
}

/// Makes a connection `drive` at the end of this iteration: once, however often it is
/// asked before then (by its response stream's sends, its request body's reads).
pub(crate) struct Nudge {
    conn: u64,
    due: Rc<Cell<bool>>,
}

impl Nudge {
    pub(crate) fn new(conn: u64) -> Nudge {
        Nudge {
            conn,
            due: Rc::default(),
        }
    }

    pub(crate) fn ask(&self, lp: &mut Loop<Worker>) {
        if !self.due.replace(true) {
            let (due, conn) = (Rc::clone(&self.due), self.conn);
            lp.later(move |lp, w| {
                due.set(false);
                drive(lp, w, conn, None);
            });
        }
    }
}

/// Runs `hook`, a body callback of the app's (`when_readable`, `when_writable`, a
/// `collect`'s end), at the end of this iteration. A panic in it fails its request,
/// not the worker: it is logged, and what the hook held is dropped (a responder
/// among it answers 500).
pub(crate) fn later_guarded(
    lp: &mut Loop<Worker>,
    hook: impl FnOnce(&mut Loop<Worker>, &mut Worker) + 'static,
) {
    lp.later(move |lp, w| {
        if panic::catch_unwind(AssertUnwindSafe(|| hook(lp, w))).is_err() {
            log::error!("a request's body callback panicked; its answer is a 500");
        }
    });
}

/// Sets the timeout a connection needs: the send timeout while output waits for the
/// client to read it; then, waiting for a request, the header timeout while a head is
/// incomplete (or none has come on a new connection), the body timeout while a body is
/// read, else the keep-alive one. A timeout that stays keeps its deadline.
fn set_timer(lp: &mut Loop<Worker>, w: &mut Worker, id: u64) {
    let Some(conn) = w.conns.get_mut(&id) else {
        return;
    };
    let waiting = conn.slots.is_empty() && conn.out.is_empty() && !conn.no_more_requests;
    let wanted = if conn.lingering {
        Some((TimerKind::Linger, LINGER))
    } else if !conn.out.is_empty() || conn.finished() {
        Some((TimerKind::Send, w.body_timeout))
    } else if let Some(inbound) = conn.inbound() {
        // A streamed body: the client is waited on only while the handler has room for
        // more, and has asked for it (a client waiting for `100 Continue` is not late).
        (!inbound.is_full() && !inbound.awaits_continue())
            .then_some((TimerKind::Body, w.body_timeout))
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
    let kind = wanted.map(|(kind, _)| kind);
    if kind == conn.timer_kind {
        return;
    }
    conn.timer_kind = kind;
    // None: the timer stays where it is, and its firing is ignored (cheaper than
    // moving it away for every request).
    if let Some((_, after)) = wanted {
        lp.restart(conn.timer, after);
    }
}

/// A header or body timeout answers 408 if the client has started its request; the
/// body timeout counts from the parser's last progress, so a body that keeps coming,
/// however slowly, is read to its end, and the send timeout from the last write that
/// took bytes. A stalled send and the other timeouts close the connection.
fn on_timeout(lp: &mut Loop<Worker>, w: &mut Worker, id: u64) {
    let now = lp.now();
    let Some(conn) = w.conns.get_mut(&id) else {
        return;
    };
    let Some(kind) = conn.timer_kind.take() else {
        return; // no timeout was wanted
    };
    let since = match kind {
        TimerKind::Send => conn.last_write,
        _ => conn.last_progress,
    };
    let quiet = now.saturating_duration_since(since);
    match kind {
        TimerKind::Header if conn.parser.buffered() > 0 => {
            answer_and_close(w, id, 408, "request head timed out");
            drive(lp, w, id, None);
        }
        TimerKind::Body | TimerKind::Send if quiet < w.body_timeout => {
            conn.timer_kind = Some(kind);
            lp.restart(conn.timer, w.body_timeout - quiet);
        }
        TimerKind::Body => {
            refuse(
                lp,
                w,
                id,
                408,
                "request body timed out",
                BodyError::TimedOut,
            );
            drive(lp, w, id, None);
        }
        _ => close(lp, w, id),
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
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let response = h1::text(code, format!("{why}\n"));
    // A status and text of the server's own always encode.
    let _ = h1::encode(&response, &mut bytes, false, false, date);
    conn.slots.push_back(Slot::Ready { bytes, close: true });
    conn.no_more_requests = true;
    // Refused: what the client sent may not all be read.
    conn.client_closes = false;
    if let Some(log) = &mut w.access_log {
        let length = response.body().len();
        let _ = writeln!(log, "{} - - [{date}] \"-\" {status} {length}", conn.peer);
    }
}

/// The 500 the server answers for a handler that failed (panicked, dropped its
/// responder, or gave a response that would break the framing).
fn internal_error() -> Response {
    h1::text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error\n")
}

fn close(lp: &mut Loop<Worker>, w: &mut Worker, id: u64) {
    let Some(conn) = w.conns.remove(&id) else {
        return;
    };
    accepting::connection_closed(lp, w);
    let queued = conn.slots.iter().filter_map(|slot| match slot {
        Slot::Streaming { shared, .. } => Some(shared),
        _ => None,
    });
    for shared in queued.chain(&conn.unsent_streams) {
        shared.end(lp, StreamEnded::Closed);
    }
    if let Some(inbound) = conn.inbound() {
        inbound.fail(lp, BodyError::Closed);
    }
    // The loop drops the socket, closing it: at once, or when its callback returns.
    // Only the loop holds it (accepted here, never shared), so the close alone takes it
    // out of the backend: no deregistering syscall.
    lp.close_source(conn.io);
    lp.cancel(conn.timer);
    if w.draining && w.conns.is_empty() {
        lp.stop(0);
    }
}

/// SIGTERM: stop accepting at once (the listeners leave this worker's loop and close),
/// answer what is in flight — including a request on a just-accepted connection — with
/// `Connection: close`, and exit when no connection is left. Idle keep-alive
/// connections close after a short grace: a request a client sent just before it could
/// see the close is still answered, instead of failing in flight.
fn drain(lp: &mut Loop<Worker>, w: &mut Worker) {
    if let Some(watch) = w.drain_watch {
        let _ = lp.pause(watch);
    }
    if w.draining {
        return;
    }
    w.draining = true;
    let listeners: Vec<Listener> = std::mem::take(&mut w.listeners)
        .into_iter()
        .filter_map(|io| lp.remove(io))
        .collect();
    // Connections the kernel already queued are taken in and answered before this
    // worker's listener copies close: the last close of a listener resets its queue.
    for listener in &listeners {
        accept(lp, w, listener, usize::MAX);
    }
    drop(listeners);
    let mut streaming = Vec::new();
    for (&id, conn) in &mut w.conns {
        if conn.is_idle_keep_alive() {
            conn.timer_kind = Some(TimerKind::Idle);
            lp.restart(conn.timer, DRAIN_GRACE);
        }
        // A stream is asked to finish (an endless one, server-sent events, ends
        // here), and its connection closes after it.
        for slot in &mut conn.slots {
            if let Slot::Streaming { shared, close, .. } = slot {
                shared.draining.set(true);
                shared.run_writable(lp);
                *close = true;
                streaming.push(id);
            }
        }
    }
    for id in streaming {
        drive(lp, w, id, None);
    }
    if w.conns.is_empty() {
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
) -> io::Result<(Loop<Worker>, Worker, UnixStream)> {
    let mut lp = Loop::new().map_err(io::Error::other)?;
    let (link, _master_end) = UnixStream::pair()?;
    let link = MasterLink::new(link, Duration::MAX);
    let mut worker = Worker::new(&mut lp, config, handler, link, None).map_err(io::Error::other)?;
    let (client, server) = UnixStream::pair()?;
    client.set_nonblocking(true)?;
    server.set_nonblocking(true)?;
    add_conn(&mut lp, &mut worker, Stream::Unix(server), Peer::Unix);
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
    let (mut lp, mut worker, mut client) = one_connection(config, handler)?;
    let (mut output, mut peak) = (Vec::new(), 0);
    let mut step =
        |lp: &mut Loop<Worker>, worker: &mut Worker, client: &mut UnixStream| -> io::Result<bool> {
            lp.loop_once(Some(Duration::ZERO), worker)
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
            let open = worker.conns.values().next();
            if let Some(conn) = open {
                let inbound = conn.inbound().map_or(0, |i| i.held());
                peak = peak.max(conn.parser.held() + inbound + conn.sent + conn.unsent());
            }
            Ok(open.is_some())
        };
    for chunk in chunks {
        let (mut rest, mut blocked) = (*chunk, 0);
        // Only while the connection is open: a write to a closed one raises SIGPIPE.
        while !rest.is_empty() && step(&mut lp, &mut worker, &mut client)? {
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
        if !step(&mut lp, &mut worker, &mut client)? {
            return Ok((output, peak));
        }
    }
    Err(io::Error::other(
        "the connection is still open 1000 iterations after the client's EOF",
    ))
}

#[cfg(test)]
#[path = "streamed_request_tests.rs"]
mod streamed_request_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::Read;

    /// A worker serving one connection whose handler keeps each responder in `kept`,
    /// after the client sent one request and the handler ran.
    fn kept_responder() -> (Loop<Worker>, Worker, UnixStream, Responder) {
        let kept: Rc<Cell<Option<Responder>>> = Rc::default();
        let stash = kept.clone();
        let handler = move |_: &mut Loop<Worker>, _: Request, responder: Responder| {
            stash.set(Some(responder));
        };
        let (mut lp, mut worker, mut client) =
            one_connection(&Config::default(), Rc::new(handler)).unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        for _ in 0..100 {
            if let Some(responder) = kept.take() {
                return (lp, worker, client, responder);
            }
            lp.loop_once(Some(Duration::from_millis(10)), &mut worker)
                .unwrap();
        }
        panic!("the handler never ran");
    }

    /// Runs the worker until the client has read a response ending in `end`.
    pub(super) fn reply(
        lp: &mut Loop<Worker>,
        worker: &mut Worker,
        client: &mut UnixStream,
        end: &str,
    ) -> String {
        let mut reply = Vec::new();
        for _ in 0..100 {
            lp.loop_once(Some(Duration::from_millis(10)), worker)
                .unwrap();
            let mut buf = [0u8; 4096];
            if let Ok(n) = client.read(&mut buf) {
                reply.extend_from_slice(&buf[..n]);
            }
            if reply.ends_with(end.as_bytes()) {
                break;
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// What the client can read now, without waiting.
    pub(super) fn read_now(client: &mut UnixStream) -> String {
        let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = client.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[test]
    fn a_responder_dropped_outside_its_handler_call_still_answers_500() {
        let (mut lp, mut worker, mut client, responder) = kept_responder();
        drop(responder); // outside any callback: the waker brings the 500 in
        let reply = reply(&mut lp, &mut worker, &mut client, "Internal Server Error\n");
        assert!(reply.starts_with("HTTP/1.1 500 "), "{reply:?}");
    }

    #[test]
    fn the_handler_gets_the_http_crates_request_with_its_peer() {
        /// The request line, the peer and the body the handler saw.
        type Seen = Option<(String, Option<Peer>, Vec<u8>)>;
        let seen: Rc<Cell<Seen>> = Rc::default();
        let stash = seen.clone();
        let handler = move |lp: &mut Loop<Worker>, request: Request, responder: Responder| {
            let peer = request.extensions().get::<Peer>().copied();
            let target = format!(
                "{} {} {:?}",
                request.method(),
                request.uri(),
                request.version()
            );
            stash.set(Some((target, peer, request.into_body())));
            responder.send(lp, h1::text(StatusCode::OK, "ok"));
        };
        let (mut lp, mut worker, mut client) =
            one_connection(&Config::default(), Rc::new(handler)).unwrap();
        client
            .write_all(b"POST /a?b=c HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
            .unwrap();
        reply(&mut lp, &mut worker, &mut client, "ok");
        let (target, peer, body) = seen.take().expect("the handler ran");
        assert_eq!(target, "POST /a?b=c HTTP/1.0");
        assert_eq!(peer, Some(Peer::Unix));
        assert_eq!(body, b"hi");
    }

    /// A worker serving one connection whose handler streams each answer: `head`, then
    /// what `body` does with the sender (kept in `kept` if it does not finish it).
    fn streaming(
        request: &[u8],
        head: fn() -> ::http::Response<()>,
        body: fn(&mut Loop<Worker>, BodySender) -> Option<BodySender>,
    ) -> (
        Loop<Worker>,
        Worker,
        UnixStream,
        Rc<Cell<Option<BodySender>>>,
    ) {
        let kept: Rc<Cell<Option<BodySender>>> = Rc::default();
        let stash = kept.clone();
        let handler = move |lp: &mut Loop<Worker>, _: Request, responder: Responder| {
            let sender = responder.stream(lp, head());
            stash.set(body(lp, sender));
        };
        let (lp, worker, mut client) =
            one_connection(&Config::default(), Rc::new(handler)).unwrap();
        client.write_all(request).unwrap();
        (lp, worker, client, kept)
    }

    fn plain() -> ::http::Response<()> {
        ::http::Response::new(())
    }

    fn sized() -> ::http::Response<()> {
        ::http::Response::builder()
            .header("content-length", "3")
            .body(())
            .unwrap()
    }

    fn abc(lp: &mut Loop<Worker>, sender: BodySender) -> Option<BodySender> {
        sender.send(lp, "a").unwrap();
        sender.send(lp, "bc").unwrap();
        sender.finish(lp);
        None
    }

    pub(super) const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn a_stream_without_a_length_is_chunked_and_keeps_the_connection() {
        let (mut lp, mut worker, mut client, _) = streaming(
            &[GET, b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n"].concat(),
            plain,
            abc,
        );
        let body = "\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let mut reply = reply(&mut lp, &mut worker, &mut client, body);
        if reply.matches(body).count() < 2 {
            reply += &self::reply(&mut lp, &mut worker, &mut client, body);
        }
        assert!(
            reply.contains("Transfer-Encoding: chunked\r\n"),
            "{reply:?}"
        );
        assert!(reply.contains("Connection: keep-alive\r\n"), "{reply:?}");
        assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply:?}");
        assert_eq!(reply.matches(body).count(), 2, "{reply:?}");
    }

    thread_local! {
        /// What a test handler's sends returned (a panic in a handler is caught).
        static SENT: RefCell<Vec<Result<(), StreamEnded>>> = const { RefCell::new(Vec::new()) };
    }

    fn record(result: Result<(), StreamEnded>) {
        SENT.with(|sent| sent.borrow_mut().push(result));
    }

    fn recorded() -> Vec<Result<(), StreamEnded>> {
        SENT.with(|sent| sent.take())
    }

    #[test]
    fn a_stream_of_known_length_is_sent_as_is_and_refuses_more() {
        fn more(lp: &mut Loop<Worker>, sender: BodySender) -> Option<BodySender> {
            record(sender.send(lp, "abc"));
            record(sender.send(lp, "d"));
            sender.finish(lp);
            None
        }
        let (mut lp, mut worker, mut client, _) = streaming(GET, sized, more);
        let reply = reply(&mut lp, &mut worker, &mut client, "\r\n\r\nabc");
        assert_eq!(recorded(), [Ok(()), Err(StreamEnded::TooLong)]);
        assert!(reply.contains("Content-Length: 3\r\n"), "{reply:?}");
        assert!(!reply.contains("Transfer-Encoding"), "{reply:?}");
        assert!(reply.ends_with("\r\n\r\nabc"), "{reply:?}");
    }

    #[test]
    fn a_stream_behind_an_answer_that_closes_is_ended() {
        let kept: Rc<Cell<Option<BodySender>>> = Rc::default();
        let stash = kept.clone();
        let handler = move |lp: &mut Loop<Worker>, request: Request, responder: Responder| {
            if request.uri().path() == "/close" {
                // Answered later: the pipelined request is handed over first.
                lp.later(move |lp, _| {
                    let mut close = h1::text(StatusCode::OK, "bye");
                    let value = ::http::HeaderValue::from_static("close");
                    close
                        .headers_mut()
                        .insert(::http::header::CONNECTION, value);
                    responder.send(lp, close);
                });
            } else {
                stash.set(Some(responder.stream(lp, ::http::Response::new(()))));
            }
        };
        let (mut lp, mut worker, mut client) =
            one_connection(&Config::default(), Rc::new(handler)).unwrap();
        let request = b"GET /close HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        client.write_all(request).unwrap();
        reply(&mut lp, &mut worker, &mut client, "bye");
        let sender = kept.take().expect("the pipelined request was handed over");
        assert_eq!(sender.send(&mut lp, "never"), Err(StreamEnded::Closed));
        sender.finish(&mut lp);
    }

    #[test]
    fn a_stream_to_http_1_0_runs_until_the_connection_closes() {
        let request = b"GET / HTTP/1.0\r\n\r\n";
        let (mut lp, mut worker, mut client, _) = streaming(request, plain, abc);
        let reply = reply(&mut lp, &mut worker, &mut client, "\r\n\r\nabc");
        assert!(reply.contains("Connection: close\r\n"), "{reply:?}");
        assert!(!reply.contains("Transfer-Encoding"), "{reply:?}");
        for _ in 0..10 {
            lp.loop_once(Some(Duration::from_millis(10)), &mut worker)
                .unwrap();
        }
        assert!(
            worker.conns.is_empty(),
            "the connection closes after the body"
        );
    }

    #[test]
    fn a_sender_dropped_unfinished_cuts_the_body_short() {
        fn keep(lp: &mut Loop<Worker>, sender: BodySender) -> Option<BodySender> {
            sender.send(lp, "partial").unwrap();
            Some(sender)
        }
        let (mut lp, mut worker, mut client, kept) = streaming(GET, plain, keep);
        reply(&mut lp, &mut worker, &mut client, "7\r\npartial\r\n");
        drop(kept.take()); // outside the loop: its waker drives the connection
        for _ in 0..10 {
            lp.loop_once(Some(Duration::from_millis(10)), &mut worker)
                .unwrap();
        }
        assert!(worker.conns.is_empty(), "closed");
        let rest = read_now(&mut client);
        assert!(
            !rest.contains("0\r\n\r\n"),
            "ended as if complete: {rest:?}"
        );
    }

    #[test]
    fn a_drain_asks_a_stream_to_finish_and_closes_its_connection_after() {
        fn keep(lp: &mut Loop<Worker>, sender: BodySender) -> Option<BodySender> {
            sender.send(lp, "event").unwrap();
            Some(sender)
        }
        let (mut lp, mut worker, mut client, kept) = streaming(GET, plain, keep);
        reply(&mut lp, &mut worker, &mut client, "5\r\nevent\r\n");
        drain(&mut lp, &mut worker);
        let sender = kept.take().unwrap();
        assert!(sender.is_draining());
        // A finite body may still send its rest; then it finishes.
        sender.send(&mut lp, "last").unwrap();
        sender.finish(&mut lp);
        let rest = reply(&mut lp, &mut worker, &mut client, "0\r\n\r\n");
        assert_eq!(rest, "4\r\nlast\r\n0\r\n\r\n");
        for _ in 0..10 {
            lp.loop_once(Some(Duration::from_millis(10)), &mut worker)
                .unwrap();
        }
        assert!(
            worker.conns.is_empty(),
            "the connection closes after the stream"
        );
    }

    #[test]
    fn a_stream_answering_head_sends_the_head_only_and_ends() {
        fn keep(lp: &mut Loop<Worker>, sender: BodySender) -> Option<BodySender> {
            Some(sender).filter(|s| s.send(lp, "x").is_ok())
        }
        let request = b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let (mut lp, mut worker, mut client, kept) = streaming(request, plain, keep);
        // The HEAD answer is complete at once: the GET's streamed answer follows it.
        let reply = reply(&mut lp, &mut worker, &mut client, "1\r\nx\r\n");
        assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply:?}");
        assert!(
            reply.contains("Transfer-Encoding: chunked\r\n"),
            "{reply:?}"
        );
        let head_answer = reply.split("HTTP/1.1 200 OK").nth(1).unwrap();
        assert!(
            head_answer.ends_with("\r\n\r\n"),
            "a body after HEAD: {reply:?}"
        );
        kept.take().unwrap().finish(&mut lp);
    }

    #[test]
    fn a_remote_responder_answers_from_another_thread() {
        let (mut lp, mut worker, mut client, responder) = kept_responder();
        let remote = responder.into_remote();
        std::thread::spawn(move || remote.send(h1::text(StatusCode::OK, "from a thread")))
            .join()
            .unwrap();
        let reply = reply(&mut lp, &mut worker, &mut client, "from a thread");
        assert!(reply.starts_with("HTTP/1.1 200 "), "{reply:?}");
    }

    #[test]
    fn a_remote_responder_dropped_unsent_in_another_thread_answers_500() {
        let (mut lp, mut worker, mut client, responder) = kept_responder();
        let remote = responder.into_remote();
        std::thread::spawn(move || drop(remote)).join().unwrap();
        let reply = reply(&mut lp, &mut worker, &mut client, "Internal Server Error\n");
        assert!(reply.starts_with("HTTP/1.1 500 "), "{reply:?}");
    }

    #[test]
    fn an_answer_sent_outside_its_connections_callback_is_written() {
        let (mut lp, mut worker, mut client, responder) = kept_responder();
        responder.send(&mut lp, h1::text(StatusCode::OK, "later\n"));
        let reply = reply(&mut lp, &mut worker, &mut client, "later\n");
        assert!(reply.starts_with("HTTP/1.1 200 "), "{reply:?}");
        let conn = worker.conns.values().next().expect("kept alive");
        assert_eq!(conn.watching, Interest::READ, "no longer waits to write");
    }

    #[test]
    fn a_deferred_answer_is_written_in_the_iteration_that_gives_it() {
        // Sent outside a handler call, an answer comes in through an idle callback;
        // dropped unsent outside one, through a waker's. Either writes at once, with the
        // socket the loop lends: one iteration, and the watch never waits to write.
        for send in [true, false] {
            let (mut lp, mut worker, mut client, responder) = kept_responder();
            let (status, body) = if send {
                responder.send(&mut lp, h1::text(StatusCode::OK, "later\n"));
                ("HTTP/1.1 200 ", "later\n")
            } else {
                drop(responder);
                ("HTTP/1.1 500 ", "Internal Server Error\n")
            };
            lp.loop_once(Some(Duration::from_secs(1)), &mut worker)
                .unwrap();
            let reply = read_now(&mut client);
            assert!(
                reply.starts_with(status) && reply.ends_with(body),
                "{reply:?}"
            );
            let conn = worker.conns.values().next().expect("kept alive");
            assert_eq!(conn.watching, Interest::READ);
        }
    }

    #[test]
    fn a_timeouts_408_is_written_by_its_timer() {
        let config = Config {
            header_timeout: Duration::from_millis(50),
            ..Config::default()
        };
        let handler = |_: &mut Loop<Worker>, _: Request, _: Responder| {};
        let (mut lp, mut worker, mut client) = one_connection(&config, Rc::new(handler)).unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        lp.loop_once(Some(Duration::from_secs(1)), &mut worker)
            .unwrap(); // reads the partial head
        assert_eq!(read_now(&mut client), "");
        // Waits for the header timeout, whose timer writes the 408 and winds down.
        lp.loop_once(Some(Duration::from_secs(1)), &mut worker)
            .unwrap();
        let reply = read_now(&mut client);
        assert!(reply.starts_with("HTTP/1.1 408 "), "{reply:?}");
        let conn = worker
            .conns
            .values()
            .next()
            .expect("lingers for the rest of the request");
        assert!(conn.lingering);
        assert_eq!(conn.watching, Interest::READ);
    }

    /// A worker serving one connection on a `SOCK_SEQPACKET` socketpair, where each
    /// write arrives as a record of its own: the client reads one write per read.
    fn packet_connection(handler: Rc<dyn Handler>) -> (Loop<Worker>, Worker, UnixStream) {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (mut lp, mut worker, _) = one_connection(&Config::default(), handler).unwrap();
        let ids: Vec<u64> = worker.conns.keys().copied().collect();
        for id in ids {
            close(&mut lp, &mut worker, id);
        }
        // (SOCK_NONBLOCK is not a socketpair flag everywhere: macOS has none.)
        let (client, server) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::empty(),
        )
        .unwrap();
        let (client, server) = (UnixStream::from(client), UnixStream::from(server));
        client.set_nonblocking(true).unwrap();
        server.set_nonblocking(true).unwrap();
        add_conn(&mut lp, &mut worker, Stream::Unix(server), Peer::Unix);
        (lp, worker, client)
    }

    /// Runs the worker until the client can read, for 100 iterations at most.
    fn until_readable(lp: &mut Loop<Worker>, worker: &mut Worker, client: &UnixStream) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        for _ in 0..100 {
            lp.loop_once(Some(Duration::from_millis(10)), worker)
                .unwrap();
            let mut fds = [PollFd::new(client.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::ZERO).unwrap() > 0 {
                return;
            }
        }
        panic!("no answer in 100 iterations");
    }

    fn hello(lp: &mut Loop<Worker>, _: Request, responder: Responder) {
        responder.send(lp, h1::text(StatusCode::OK, "Hello, World!"));
    }

    #[test]
    fn the_answers_to_a_batch_of_pipelined_requests_go_out_in_one_write() {
        let (mut lp, mut worker, mut client) = packet_connection(Rc::new(hello));
        let batch = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(16);
        client.write_all(&batch).unwrap();
        until_readable(&mut lp, &mut worker, &client);
        let mut record = vec![0u8; 64 * 1024];
        let n = client.read(&mut record).unwrap();
        let first = String::from_utf8_lossy(&record[..n]);
        assert_eq!(
            first.matches("HTTP/1.1 200 OK\r\n").count(),
            16,
            "one write holds all 16 answers: {first:?}"
        );
        assert_eq!(read_now(&mut client), "", "and nothing follows it");
    }

    #[test]
    fn a_refused_request_that_said_close_still_lingers_on_the_body_it_left_unread() {
        let head =
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100000\r\n\r\n";
        // The head fills the parser exactly: it is read whole and its body stays in the
        // kernel, where only a look at the socket finds it.
        let config = Config {
            max_body_size: 10,
            max_header_size: head.len(),
            ..Config::default()
        };
        let (mut lp, mut worker, mut client) = one_connection(&config, Rc::new(hello)).unwrap();
        client.write_all(head).unwrap();
        client.write_all(&[b'x'; 1000]).unwrap();
        let reply = reply(&mut lp, &mut worker, &mut client, "\n");
        assert!(reply.starts_with("HTTP/1.1 413 "), "{reply:?}");
        let conn = worker
            .conns
            .values()
            .next()
            .expect("lingers: closing now would reset the answer");
        assert!(conn.lingering);
    }

    #[test]
    fn a_client_that_said_close_is_closed_once_answered() {
        let (mut lp, mut worker, mut client) =
            one_connection(&Config::default(), Rc::new(hello)).unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let reply = reply(&mut lp, &mut worker, &mut client, "Hello, World!");
        assert!(reply.contains("Connection: close\r\n"), "{reply:?}");
        assert!(worker.conns.is_empty(), "closed, not lingering");
        let mut buf = [0u8; 16];
        assert_eq!(client.read(&mut buf).unwrap(), 0, "the client sees EOF");
    }
}
