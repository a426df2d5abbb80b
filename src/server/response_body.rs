//! Streamed response bodies: what a handler writes through a [`BodySender`], and the
//! state it shares with its connection, which frames and writes it.

use std::cell::Cell;
use std::rc::Rc;

use super::worker::{later_guarded, Nudge, Reply, Worker};
use crate::{Loop, Waker};

/// Below this many unsent bytes, a stream is writable again (see
/// [`BodySender::when_writable`]).
pub(crate) const LOW_WATER: usize = 64 * 1024;
/// A stream holding this many unsent bytes is cut: its handler ignores the
/// backpressure, and the worker must not grow without bound for it.
pub(crate) const MAX_BUFFERED: usize = 16 * LOW_WATER;

/// Why a stream takes no more data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamEnded {
    /// The connection is gone: the client left, stopped reading for the body timeout,
    /// or its socket failed; or the handler ignored the backpressure until 1 MiB
    /// waited, and the stream was cut.
    #[error("the client's connection is gone")]
    Closed,
    /// The request was HEAD, or the status has no body (204, 205, 304): the head is
    /// all the answer.
    #[error("the answer has no body")]
    NoBody,
    /// The response's head would break the framing: the client got a 500 instead.
    #[error("the response head was invalid; the client got a 500")]
    Invalid,
    /// More bytes than the response's `Content-Length`.
    #[error("more bytes than the Content-Length")]
    TooLong,
}

type WritableHook = Box<dyn FnOnce(&mut Loop<Worker>, &mut Worker)>;

/// What a [`BodySender`] and its connection share.
pub(crate) struct Shared {
    pub conn: u64,
    /// The response's place in its connection's queue.
    pub seq: u64,
    /// Bytes sent, not yet framed into the connection's output.
    pub pending: Cell<Vec<u8>>,
    /// The handler finished the body.
    pub finished: Cell<bool>,
    /// The sender was dropped unfinished: the connection closes without ending the
    /// body, so the client sees it cut short.
    pub aborted: Cell<bool>,
    /// Why sends fail; `None` while the stream is open.
    pub ended: Cell<Option<StreamEnded>>,
    /// Body bytes the `Content-Length` still allows; `None`: no limit, or not known yet.
    pub remaining: Cell<Option<u64>>,
    /// The connection's unsent bytes, as of its last write.
    pub unsent: Cell<usize>,
    pub writable: Cell<Option<WritableHook>>,
    /// The worker drains: the handler should finish the stream soon (see
    /// [`BodySender::is_draining`]).
    pub draining: Cell<bool>,
    nudge: Nudge,
    /// Wakes the loop for a sender dropped outside it.
    wake: Waker<Reply>,
}

impl Shared {
    pub(crate) fn new(conn: u64, seq: u64, wake: Waker<Reply>) -> Rc<Shared> {
        Rc::new(Shared {
            conn,
            seq,
            pending: Cell::default(),
            finished: Cell::new(false),
            aborted: Cell::new(false),
            ended: Cell::new(None),
            remaining: Cell::new(None),
            unsent: Cell::new(0),
            writable: Cell::default(),
            draining: Cell::new(false),
            nudge: Nudge::new(conn),
            wake,
        })
    }

    /// Takes the body's length from the head's `Content-Length`, so that a send past it
    /// fails at once, during the handler call too.
    pub(crate) fn expect_length(&self, head: &http::Response<()>) {
        let length = head
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        self.remaining.set(length);
    }

    /// Ends the stream for `why`, unless it already ended; a writable hook runs, so a
    /// handler waiting on it learns at its next send.
    pub(crate) fn end(&self, lp: &mut Loop<Worker>, why: StreamEnded) {
        if self.ended.get().is_none() {
            self.ended.set(Some(why));
        }
        self.run_writable(lp);
    }

    /// Runs the writable hook (in this iteration, from the loop), if one waits.
    pub(crate) fn run_writable(&self, lp: &mut Loop<Worker>) {
        if let Some(hook) = self.writable.take() {
            later_guarded(lp, hook);
        }
    }

    /// Makes the connection frame and write what changed, at the end of this
    /// iteration (once, however many sends come before).
    fn schedule(&self, lp: &mut Loop<Worker>) {
        self.nudge.ask(lp);
    }
}

/// The body of a streamed response ([`Responder::stream`](super::Responder::stream)):
/// send it in pieces as the handler produces them, from any callback of the worker's
/// loop, then [`finish`](BodySender::finish) it.
///
/// Without a `Content-Length` in the head, the body is chunked (each send a chunk, or
/// several sends one), or, to an HTTP/1.0 client, sent until the connection closes.
/// With one, exactly that many bytes are sent. Sends queue the bytes, so respect the
/// backpressure: check [`buffered`](BodySender::buffered), and wait with
/// [`when_writable`](BodySender::when_writable) while it is high (past 1 MiB buffered
/// the stream is cut). A send fails once the stream has ended ([`StreamEnded`]). When
/// the worker drains, [`is_draining`](BodySender::is_draining) says so (and a pending
/// writable hook runs): finish then. A sender dropped unfinished closes the connection
/// without ending the body, so the client sees it cut short.
#[must_use = "a BodySender dropped unfinished cuts the body short"]
pub struct BodySender {
    shared: Rc<Shared>,
    finished: bool,
}

impl BodySender {
    pub(crate) fn new(shared: Rc<Shared>) -> BodySender {
        BodySender {
            shared,
            finished: false,
        }
    }

    /// Queues `data` as the next piece of the body; it is framed and written at the
    /// end of this iteration.
    pub fn send(&self, lp: &mut Loop<Worker>, data: impl AsRef<[u8]>) -> Result<(), StreamEnded> {
        let shared = &self.shared;
        if let Some(why) = shared.ended.get() {
            return Err(why);
        }
        let data = data.as_ref();
        if let Some(left) = shared.remaining.get() {
            let queued = shared.pending_len() as u64;
            if queued.saturating_add(data.len() as u64) > left {
                return Err(StreamEnded::TooLong);
            }
        }
        if self.buffered().saturating_add(data.len()) > MAX_BUFFERED {
            log::warn!("a streamed body ignored its backpressure past 1 MiB; cutting it");
            shared.aborted.set(true);
            shared.ended.set(Some(StreamEnded::Closed));
            shared.schedule(lp);
            return Err(StreamEnded::Closed);
        }
        let mut pending = shared.pending.take();
        pending.extend_from_slice(data);
        shared.pending.set(pending);
        shared.schedule(lp);
        Ok(())
    }

    /// Whether the worker drains (TERM, HUP, recycling): finish the stream soon, as it
    /// has `graceful_timeout` at most. An endless stream (server-sent events) ends here,
    /// cleanly; a finite one may still send the rest. The connection closes after it.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.get()
    }

    /// Bytes sent that the client has not taken yet.
    pub fn buffered(&self) -> usize {
        self.shared.unsent.get() + self.shared.pending_len()
    }

    /// Hands this sender to `hook` once the stream is writable again: when fewer than
    /// 64 KiB are buffered (at the end of this iteration, if that is already so), when
    /// the worker begins to drain, or when the stream ends (then the next send says
    /// why).
    pub fn when_writable(
        self,
        lp: &mut Loop<Worker>,
        hook: impl FnOnce(&mut Loop<Worker>, &mut Worker, BodySender) + 'static,
    ) {
        let shared = Rc::clone(&self.shared);
        shared
            .writable
            .set(Some(Box::new(move |lp, w| hook(lp, w, self))));
        shared.schedule(lp);
    }

    /// Ends the body: the last chunk goes out after what was sent. A body of known
    /// length that is short of it is cut instead (the connection closes), as the client
    /// waits for the rest.
    pub fn finish(mut self, lp: &mut Loop<Worker>) {
        self.finished = true;
        self.shared.finished.set(true);
        self.shared.schedule(lp);
    }
}

impl Shared {
    pub(crate) fn pending_len(&self) -> usize {
        let pending = self.pending.take();
        let len = pending.len();
        self.pending.set(pending);
        len
    }
}

impl Drop for BodySender {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.shared.aborted.set(true);
        // No loop at hand: the waker makes the loop drive the connection.
        let _ = self.shared.wake.send(Reply::Wake {
            conn: self.shared.conn,
        });
    }
}
