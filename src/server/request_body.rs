//! Streamed request bodies: what a handler reads through a [`BodyReceiver`], and the
//! state it shares with its connection, which fills it as the body arrives.

use std::cell::Cell;
use std::rc::Rc;

use super::worker::{later_guarded, Nudge, Reply, Worker};
use crate::{Loop, Waker};

/// The most bytes of a streamed body its connection holds for the handler: past it,
/// the connection reads nothing more from the client until the handler takes some.
/// (One piece more may land on top: the parser hands a body on in pieces of at most
/// this size, so the receiver holds under twice this.)
pub(crate) const RECEIVE_WINDOW: usize = super::h1::MAX_PIECE;

/// What [`BodyReceiver::read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// The next bytes of the body, de-chunked (never empty).
    Data(Vec<u8>),
    /// Nothing more has arrived: wait with [`BodyReceiver::when_readable`].
    Wait,
    /// The body is complete (a chunked body's trailer fields were read, and dropped).
    End,
}

/// Why a streamed request body stopped before its end. The connection closes after
/// the request's answer; the server answers for the handler (400, 408) if it had not
/// begun to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// Its framing is malformed (a bad chunk line, say): 400.
    #[error("the request body is malformed")]
    Invalid,
    /// The client sent none of it for `body_timeout`: 408.
    #[error("the request body timed out")]
    TimedOut,
    /// The client closed its side, or the connection failed, before the body's end.
    #[error("the connection closed before the request body's end")]
    Closed,
    /// Longer than the limit of [`BodyReceiver::collect`].
    #[error("the request body is larger than the limit")]
    TooLarge,
}

type ReadableHook = Box<dyn FnOnce(&mut Loop<Worker>, &mut Worker)>;

/// What a [`BodyReceiver`] and its connection share.
pub(crate) struct Inbound {
    pub conn: u64,
    /// The request's place in its connection's queue.
    pub seq: u64,
    /// Arrived, not taken yet.
    data: Cell<Vec<u8>>,
    /// Every byte of the body has arrived.
    complete: Cell<bool>,
    failed: Cell<Option<BodyError>>,
    received: Cell<u64>,
    /// The receiver is gone: the rest of the body is read and dropped.
    dropped: Cell<bool>,
    /// Bytes that arrived after the receiver was gone.
    discarded: Cell<u64>,
    /// The client waits for `100 Continue` before it sends the body; it is sent when
    /// the handler first reads, not before (the handler may answer without the body).
    continue_wanted: Cell<bool>,
    /// The handler read: the connection owes the client its `100 Continue`.
    pub continue_due: Cell<bool>,
    readable: Cell<Option<ReadableHook>>,
    nudge: Nudge,
    /// Wakes the loop for a receiver dropped outside it.
    wake: Waker<Reply>,
}

impl Inbound {
    pub(crate) fn new(conn: u64, seq: u64, continue_wanted: bool, wake: Waker<Reply>) -> Rc<Self> {
        Rc::new(Inbound {
            conn,
            seq,
            data: Cell::default(),
            complete: Cell::new(false),
            failed: Cell::new(None),
            received: Cell::new(0),
            dropped: Cell::new(false),
            discarded: Cell::new(0),
            continue_wanted: Cell::new(continue_wanted),
            continue_due: Cell::new(false),
            readable: Cell::default(),
            nudge: Nudge::new(conn),
            wake,
        })
    }

    /// The next bytes of the body arrived (dropped, if the receiver is gone).
    pub(crate) fn push(&self, lp: &mut Loop<Worker>, bytes: Vec<u8>) {
        let len = bytes.len() as u64;
        self.received.set(self.received.get().saturating_add(len));
        if self.dropped.get() {
            self.discarded.set(self.discarded.get().saturating_add(len));
            return;
        }
        let mut data = self.data.take();
        if data.is_empty() {
            data = bytes;
        } else {
            data.extend_from_slice(&bytes);
        }
        self.data.set(data);
        self.run_readable(lp);
    }

    /// All of the body arrived.
    pub(crate) fn complete(&self, lp: &mut Loop<Worker>) {
        self.complete.set(true);
        self.run_readable(lp);
    }

    /// The body stops short for `why` (unless it already ended).
    pub(crate) fn fail(&self, lp: &mut Loop<Worker>, why: BodyError) {
        if !self.complete.get() && self.failed.get().is_none() {
            self.failed.set(Some(why));
            self.run_readable(lp);
        }
    }

    /// Whether the connection is to read no more until the handler takes some.
    pub(crate) fn is_full(&self) -> bool {
        self.held() >= RECEIVE_WINDOW
    }

    /// The receiver is gone: the rest of the body is discarded as it comes.
    pub(crate) fn is_dropped(&self) -> bool {
        self.dropped.get()
    }

    /// How much of the body came after the receiver was gone.
    pub(crate) fn discarded(&self) -> u64 {
        self.discarded.get()
    }

    /// The client waits for `100 Continue`, which the handler has not asked for yet.
    pub(crate) fn awaits_continue(&self) -> bool {
        self.continue_wanted.get()
    }

    /// The client waits for `100 Continue`, and none of the body has come.
    pub(crate) fn unasked(&self) -> bool {
        self.awaits_continue() && self.received.get() == 0
    }

    /// The request was answered before the handler read: no `100 Continue` is owed.
    pub(crate) fn answered_unasked(&self) {
        self.continue_wanted.set(false);
    }

    /// The bytes waiting for the handler.
    pub(crate) fn held(&self) -> usize {
        let data = self.data.take();
        let held = data.len();
        self.data.set(data);
        held
    }

    fn readable(&self) -> bool {
        self.held() > 0 || self.complete.get() || self.failed.get().is_some()
    }

    fn run_readable(&self, lp: &mut Loop<Worker>) {
        if self.readable() {
            if let Some(hook) = self.readable.take() {
                later_guarded(lp, hook);
            }
        }
    }

    /// The handler reads: the client that waits for `100 Continue` gets it.
    fn reading(&self, lp: &mut Loop<Worker>) {
        if self.continue_wanted.take() {
            self.continue_due.set(true);
            self.nudge.ask(lp);
        }
    }
}

/// The body of a request whose handler streams it ([`Handler::body_mode`]): read it
/// in pieces as it arrives, from any callback of the worker's loop.
///
/// [`read`](BodyReceiver::read) takes what has arrived; [`when_readable`] hands the
/// receiver back once more has (or the body ended). The connection holds at most
/// 64 KiB for the handler, and reads nothing more from the client until the handler
/// takes it: a handler that reads slowly slows the client down, and never grows the
/// worker. The body is not bounded by `max_body_size`: a handler that wants a bound
/// counts ([`received`](BodyReceiver::received)), or uses
/// [`collect`](BodyReceiver::collect).
///
/// The handler may answer before the body's end (a 401 or a 413 without reading it,
/// or a response streamed while the body still arrives), and still reads the body to
/// its end, even if the answer closes the connection. A receiver dropped before the
/// end discards the rest of the body, which the connection still reads (up to
/// `max_body_size` more; past that it closes after the answer), so that it stays
/// usable for the client's next request. Answered before the handler read, a client
/// that waits for `100 Continue` (and sent none of the body) gets `Connection: close`,
/// as it may then not send the body at all. A panic in a callback given here fails the
/// request (a 500, if unanswered), not the worker.
///
/// [`Handler::body_mode`]: super::Handler::body_mode
/// [`when_readable`]: BodyReceiver::when_readable
#[must_use = "a BodyReceiver dropped discards the rest of the body"]
pub struct BodyReceiver {
    inbound: Rc<Inbound>,
}

impl std::fmt::Debug for BodyReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inbound = &self.inbound;
        f.debug_struct("BodyReceiver")
            .field("received", &inbound.received.get())
            .field("held", &inbound.held())
            .field("complete", &inbound.complete.get())
            .field("failed", &inbound.failed.get())
            .finish()
    }
}

impl BodyReceiver {
    pub(crate) fn new(inbound: Rc<Inbound>) -> BodyReceiver {
        BodyReceiver { inbound }
    }

    /// Takes the bytes that have arrived; `Wait` if none has yet, `End` once the body
    /// is complete and all of it taken; an error if it stopped short.
    pub fn read(&self, lp: &mut Loop<Worker>) -> Result<Received, BodyError> {
        let inbound = &self.inbound;
        inbound.reading(lp);
        let data = inbound.data.take();
        if !data.is_empty() {
            // Room again: the connection reads on.
            if data.len() >= RECEIVE_WINDOW {
                inbound.nudge.ask(lp);
            }
            return Ok(Received::Data(data));
        }
        if let Some(why) = inbound.failed.get() {
            return Err(why);
        }
        Ok(if inbound.complete.get() {
            Received::End
        } else {
            Received::Wait
        })
    }

    /// Hands this receiver to `hook` once there is something to read: more of the
    /// body, its end, or why it stopped (at the end of this iteration, if there already
    /// is).
    pub fn when_readable(
        self,
        lp: &mut Loop<Worker>,
        hook: impl FnOnce(&mut Loop<Worker>, &mut Worker, BodyReceiver) + 'static,
    ) {
        let inbound = Rc::clone(&self.inbound);
        inbound.reading(lp);
        inbound
            .readable
            .set(Some(Box::new(move |lp, w| hook(lp, w, self))));
        inbound.run_readable(lp);
    }

    /// Body bytes that have arrived so far, taken or not.
    pub fn received(&self) -> u64 {
        self.inbound.received.get()
    }

    /// Reads the rest of the body into memory, up to `limit` bytes, and gives it to
    /// `done` — a buffered body with a limit of the handler's own, for a route that
    /// takes more (or less) than `max_body_size`. Past the limit, `done` gets
    /// [`BodyError::TooLarge`] at once (the rest is discarded as it comes).
    pub fn collect(
        self,
        lp: &mut Loop<Worker>,
        limit: usize,
        done: impl FnOnce(&mut Loop<Worker>, &mut Worker, Result<Vec<u8>, BodyError>) + 'static,
    ) {
        collect_into(self, lp, Vec::new(), limit, Box::new(done));
    }
}

type Collected = Box<dyn FnOnce(&mut Loop<Worker>, &mut Worker, Result<Vec<u8>, BodyError>)>;

fn collect_into(
    receiver: BodyReceiver,
    lp: &mut Loop<Worker>,
    mut body: Vec<u8>,
    limit: usize,
    done: Collected,
) {
    loop {
        match receiver.read(lp) {
            Ok(Received::Data(data)) if data.len() > limit.saturating_sub(body.len()) => {
                drop(receiver);
                later_guarded(lp, move |lp, w| done(lp, w, Err(BodyError::TooLarge)));
                return;
            }
            Ok(Received::Data(data)) => body.extend_from_slice(&data),
            Ok(Received::Wait) => {
                return receiver.when_readable(lp, move |lp, _, receiver| {
                    collect_into(receiver, lp, body, limit, done);
                });
            }
            Ok(Received::End) => {
                later_guarded(lp, move |lp, w| done(lp, w, Ok(body)));
                return;
            }
            Err(why) => {
                later_guarded(lp, move |lp, w| done(lp, w, Err(why)));
                return;
            }
        }
    }
}

impl Drop for BodyReceiver {
    fn drop(&mut self) {
        let inbound = &self.inbound;
        inbound.dropped.set(true);
        let full = inbound.is_full();
        drop(inbound.data.take());
        if full {
            // No loop at hand: the waker makes the loop drive the connection, which
            // reads on (and drops) the rest.
            let _ = inbound.wake.send(Reply::Wake { conn: inbound.conn });
        }
    }
}
