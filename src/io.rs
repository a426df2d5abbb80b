//! IO watches: the loop's table of fds, the sources it owns, and readiness dispatch.
//!
//! A watch owns its source (anything `AsFd`) and hands it back on removal, so a watched
//! fd cannot be closed while it is registered: the compiler sees to it. Several watches
//! may share an fd (through `Rc<S>`, a `&'static`, or raw fds); the loop registers the
//! union of their interests once and changes it with one syscall when a watch changes.

use std::any::{Any, TypeId};
use std::mem;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use forkloop_backend::{refusal, Interest, Readiness, Refusal};
use smallvec::SmallVec;

use crate::event_loop::{guarded, resume, take_back};
use crate::handle::{Io, Watch, WatchKind};
use crate::{Error, Loop, Result};

/// A watch's source and callback, behind one box: the loop calls it without knowing `S`.
pub(crate) trait Source<D> {
    fn ready(&mut self, lp: &mut Loop<D>, data: &mut D, readiness: Readiness);
    /// The source, for [`Loop::remove`] to downcast back to `S`.
    fn into_source(self: Box<Self>) -> Box<dyn Any>;
    /// The source, for [`Loop::source`].
    fn source(&self) -> &dyn Any;
    /// The source, for [`Loop::source_mut`].
    fn source_mut(&mut self) -> &mut dyn Any;
}

struct Entry<S, F> {
    source: S,
    callback: F,
}

impl<D, S, F> Source<D> for Entry<S, F>
where
    S: 'static,
    F: FnMut(&mut Loop<D>, &mut D, &S, Readiness),
{
    fn ready(&mut self, lp: &mut Loop<D>, data: &mut D, readiness: Readiness) {
        (self.callback)(lp, data, &self.source, readiness)
    }

    fn into_source(self: Box<Self>) -> Box<dyn Any> {
        Box::new(self.source)
    }

    fn source(&self) -> &dyn Any {
        &self.source
    }

    fn source_mut(&mut self) -> &mut dyn Any {
        &mut self.source
    }
}

pub(crate) struct FdState {
    /// The interest registered with the backend: the union of its unpaused watches'.
    pub(crate) interest: Interest,
    /// Readiness gathered from this iteration's events, until the fd is dispatched.
    pub(crate) pending: Readiness,
    pub(crate) watches: SmallVec<[u64; 2]>,
    /// Watches made with `watch_raw_fd`, whose fds the loop does not hold open.
    raw: u32,
    /// Regular files, which epoll refuses with EPERM: reported ready at every iteration,
    /// as poll(2) would report them.
    pub(crate) always_ready: bool,
    /// In `Loop::fd_changes`: a watch changed, and `interest` may no longer be what its
    /// watches want until the change is applied.
    queued: bool,
    /// The backend refused the last change applied before a wait (`Loop::refused`);
    /// it is queued again, and tried before each wait.
    refused: bool,
}

/// How long the loop waits at most while a change the backend refused is outstanding,
/// before it tries that change again.
pub(crate) const REFUSED_RETRY: Duration = Duration::from_millis(100);

pub(crate) struct IoWatch<D: 'static> {
    /// When it was added, on the loop's id counter: a dispatch skips watches added
    /// after it began.
    pub(crate) serial: u64,
    fd: RawFd,
    interest: Interest,
    paused: bool,
    raw: bool,
    /// The type of the source, which an `Io<S>` handle must name to reach the watch: a
    /// slot's generation can wrap, a type check cannot be fooled.
    source_type: TypeId,
    handler: Handler<D>,
}

enum Handler<D: 'static> {
    /// A watch of the user's: `None` while its callback runs, so that a nested `run`
    /// cannot re-enter it.
    Source(Option<Box<dyn Source<D>>>),
    /// The loop's own (self-pipes, pidfds): shared, so a nested `run` runs it too and
    /// a pipe is drained even while an outer call of its callback is on the stack.
    Internal(InternalCallback<D>),
}

type InternalCallback<D> = Rc<dyn Fn(&mut Loop<D>, &mut D)>;

impl<D: 'static> Handler<D> {
    fn source(&self) -> Option<&dyn Source<D>> {
        match self {
            Handler::Source(source) => source.as_deref(),
            Handler::Internal(_) => None,
        }
    }
}

impl<D: 'static> IoWatch<D> {
    /// What the watch asks of the backend now.
    fn wants(&self) -> Interest {
        if self.paused {
            Interest::NONE
        } else {
            self.interest
        }
    }
}

/// The interest an fd is registered with for two sets of its watches: the union of what
/// they want reported, exclusive only if both ask for it (a watch that does not keeps
/// every wake-up it would get alone). `NONE` (paused watches) asks for nothing.
fn merge(a: Interest, b: Interest) -> Interest {
    if a.is_empty() || b.is_empty() {
        return a | b;
    }
    let both = Interest::EXCLUSIVE;
    let exclusive = if a.contains(both) && b.contains(both) {
        both
    } else {
        Interest::NONE
    };
    a.events() | b.events() | exclusive
}

/// Refuses an interest no watch can have, on every backend alike.
fn check_interest(fd: RawFd, interest: Interest) -> Result<()> {
    if interest.events().is_empty() {
        return Err(Error::EmptyInterest(fd));
    }
    if interest.contains(Interest::EXCLUSIVE | Interest::HANGUP) {
        return Err(Error::ExclusiveHangup(fd));
    }
    Ok(())
}

pub(crate) fn fires(interest: Interest, ready: Readiness) -> bool {
    let problem = Readiness::HANGUP | Readiness::ERROR;
    (interest.contains(Interest::READ) && ready.intersects(Readiness::READABLE | problem))
        || (interest.contains(Interest::WRITE) && ready.intersects(Readiness::WRITABLE | problem))
        || (interest.contains(Interest::HANGUP) && ready.intersects(problem))
}

/// The loop's error for what a backend said about `fd` (or about the fd its refusal
/// names, for a wait).
pub(crate) fn watch_error(backend: &'static str, fd: RawFd, source: std::io::Error) -> Error {
    match refusal(&source) {
        Some((fd, Refusal::ClosedWhileRegistered)) => Error::ClosedWhileWatched { backend, fd },
        Some((fd, Refusal::AboveLimit { limit })) => Error::FdAboveLimit { backend, fd, limit },
        _ => Error::Watch {
            backend,
            fd,
            source,
        },
    }
}

/// A failed [`Loop::watch_io`]: the error, and the source, handed back unharmed.
/// `?` converts it into [`Error`] (dropping the source); it is `Send` and `Sync` only if
/// `S` is, so for `anyhow` or `Box<dyn Error + Send + Sync>` with an `Rc` source, write
/// `.map_err(|e| e.error)?`.
pub struct WatchError<S> {
    /// What went wrong.
    pub error: Error,
    /// The source the watch would have owned.
    pub source: S,
}

impl<S> std::fmt::Debug for WatchError<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<S> std::fmt::Display for WatchError<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<S> std::error::Error for WatchError<S> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<S> From<WatchError<S>> for Error {
    fn from(e: WatchError<S>) -> Error {
        e.error
    }
}

impl<D: 'static> Loop<D> {
    /// Watches `source` for `interest` and owns it until the watch is removed, which
    /// hands it back ([`Loop::remove`]); cancelling or dropping the loop drops it.
    /// `callback` runs at every iteration in which the fd is ready for the interest
    /// (level-triggered), with `&S`: std implements `Read` and `Write` for `&TcpStream`,
    /// `&UnixStream` and `&File`, and a shared reference cannot replace the source and
    /// so close its fd under the registration. The loop does not make the source
    /// non-blocking (that would change it for every other holder of the file, such as a
    /// terminal's stdin): set it yourself, or a read the kernel cannot satisfy blocks the
    /// whole loop. A read watch also fires on hangup and on a
    /// pending error (reading then tells which); a write watch likewise.
    ///
    /// The source's type says its fd is open, so poll and select take the fd without a
    /// syscall: one closed behind the source's back (only `unsafe` code can; std's
    /// runtime reopens a closed 0, 1 or 2 as `/dev/null` before `main` on Linux) is not
    /// refused here but by the next wait, as [`Error::ClosedWhileWatched`] naming it.
    /// epoll and kqueue refuse it here. A raw fd ([`Loop::watch_raw_fd`]) is checked
    /// here on every backend.
    ///
    /// `Interest::READ | Interest::EXCLUSIVE` asks for exclusive wake-ups: of the
    /// processes or loops that wait on one file this way (workers sharing a listening
    /// socket), a new readiness wakes one, not all (epoll's `EPOLLEXCLUSIVE`; the other
    /// backends ignore it, see [`Interest::EXCLUSIVE`]). The fd is registered exclusive
    /// while every unpaused watch of it in this loop asks for it. It is part of the
    /// interest, so [`Loop::set_interest`] replaces it too, and [`Loop::pause`] and
    /// [`Loop::resume`] keep it; [`Loop::reregister`] puts this loop at the back of the
    /// fd's queue of exclusive waiters. The flag rides on the
    /// interest rather than on a watch option of its own so that it reaches the
    /// backend wherever the interest does, `post_fork`'s re-registration included,
    /// with no new method for a backend to forget. Refused: `EXCLUSIVE` alone
    /// ([`Error::EmptyInterest`]) and with HANGUP ([`Error::ExclusiveHangup`]).
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use std::os::unix::net::UnixStream;
    /// use forkloop::{Interest, Loop};
    ///
    /// let mut lp: Loop<Vec<u8>> = Loop::new()?;
    /// let (mut a, b) = UnixStream::pair()?;
    /// // `b` is `&UnixStream`, which std's `Read` takes by `mut` binding.
    /// lp.watch_io(b, Interest::READ, |lp, got, mut b, _ready| {
    ///     let mut buf = [0; 16];
    ///     let n = b.read(&mut buf).unwrap();
    ///     got.extend_from_slice(&buf[..n]);
    ///     lp.stop(0);
    /// })?;
    /// a.write_all(b"hi")?;
    /// let mut got = Vec::new();
    /// lp.run(&mut got)?;
    /// assert_eq!(got, b"hi");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn watch_io<S: AsFd + 'static>(
        &mut self,
        source: S,
        interest: Interest,
        callback: impl FnMut(&mut Loop<D>, &mut D, &S, Readiness) + 'static,
    ) -> std::result::Result<Io<S>, WatchError<S>> {
        let fd = source.as_fd().as_raw_fd();
        if let Err(error) = self.add_fd(fd, interest, false) {
            return Err(WatchError { error, source });
        }
        Ok(self.insert_io(fd, interest, false, source, callback))
    }

    /// Watches a raw fd, for fds no Rust type owns (one a C library hands out, say).
    /// The callback gets the fd; [`Loop::remove`] gives it back.
    ///
    /// # Safety
    ///
    /// `fd` must stay open until the watch is cancelled or removed (or the loop is
    /// dropped). Closed while watched, its number may be reused by another file, which
    /// the backend then reports on (or, for poll and select, fails the wait with
    /// [`Error::ClosedWhileWatched`]).
    pub unsafe fn watch_raw_fd(
        &mut self,
        fd: RawFd,
        interest: Interest,
        callback: impl FnMut(&mut Loop<D>, &mut D, RawFd, Readiness) + 'static,
    ) -> Result<Io<RawFd>> {
        if fd < 0 {
            return Err(Error::InvalidFd(fd));
        }
        // Nothing guarantees a raw fd open, and poll and select would only notice at the
        // wait (owned sources are open by their type, so only these pay the fcntl).
        forkloop_backend::check_fd_open(fd).map_err(|e| watch_error(self.backend_name(), fd, e))?;
        self.add_fd(fd, interest, true)?;
        let mut callback = callback;
        let callback =
            move |lp: &mut Loop<D>, data: &mut D, fd: &RawFd, ready| callback(lp, data, *fd, ready);
        Ok(self.insert_io(fd, interest, true, fd, callback))
    }

    /// Registers a new watch's interest on `fd` with the backend (before the watch
    /// exists, so a refusal leaves nothing behind).
    fn add_fd(&mut self, fd: RawFd, interest: Interest, raw: bool) -> Result<()> {
        check_interest(fd, interest)?;
        self.ensure_current()?;
        let backend = self.backend_name();
        match self.fds.get_mut(fd) {
            Some(st) => {
                let wanted = merge(st.interest, interest);
                if st.always_ready && st.interest.is_empty() {
                    self.always_ready.push(fd); // all its watches were paused
                }
                // A raw fd may have been closed behind the loop's back, and its number
                // given to another file: epoll refuses any change to it (ENOENT), so it
                // is asked even with the interest unchanged. Owned sources hold theirs
                // open, so the number cannot have moved.
                let check = raw || st.raw > 0;
                if !st.always_ready && (wanted != st.interest || check) {
                    let result = if st.interest.is_empty() {
                        self.backend.register(fd, wanted)
                    } else {
                        self.backend.modify(fd, wanted)
                    };
                    result.map_err(|e| match e.raw_os_error() {
                        Some(libc::ENOENT) => Error::ClosedWhileWatched { backend, fd },
                        _ => watch_error(backend, fd, e),
                    })?;
                }
                st.interest = wanted;
            }
            None => {
                let always_ready = match self.backend.register(fd, interest) {
                    Ok(()) => false,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => true,
                    Err(e) => return Err(watch_error(backend, fd, e)),
                };
                if always_ready {
                    self.always_ready.push(fd);
                }
                let state = FdState {
                    interest,
                    pending: Readiness::NONE,
                    watches: SmallVec::new(),
                    raw: 0,
                    always_ready,
                    queued: false,
                    refused: false,
                };
                self.fds.insert(fd, state);
            }
        }
        Ok(())
    }

    fn insert_io<S: 'static>(
        &mut self,
        fd: RawFd,
        interest: Interest,
        raw: bool,
        source: S,
        callback: impl FnMut(&mut Loop<D>, &mut D, &S, Readiness) + 'static,
    ) -> Io<S> {
        let source = Some(Box::new(Entry { source, callback }) as Box<dyn Source<D>>);
        let handler = Handler::Source(source);
        let id = self.insert_watch(fd, interest, raw, TypeId::of::<S>(), handler);
        Io::new(self.handle(WatchKind::Io, id))
    }

    fn insert_watch(
        &mut self,
        fd: RawFd,
        interest: Interest,
        raw: bool,
        source_type: TypeId,
        handler: Handler<D>,
    ) -> u64 {
        let serial = self.next_id();
        let id = self.io.insert(IoWatch {
            serial,
            fd,
            interest,
            paused: false,
            raw,
            source_type,
            handler,
        });
        let st = self.fds.get_mut(fd).expect("added above");
        st.watches.push(id);
        st.raw += u32::from(raw);
        id
    }

    /// The live IO watch `io` names in this loop.
    fn io_watch<S: 'static>(&self, io: Io<S>) -> Result<&IoWatch<D>> {
        if io.watch.owner != self.id.serial {
            return Err(Error::ForeignWatch);
        }
        let watch = self.io.get(io.watch.id);
        let watch = watch.filter(|w| w.source_type == TypeId::of::<S>());
        watch.ok_or(Error::WatchGone)
    }

    fn io_watch_mut<S: 'static>(&mut self, io: Io<S>) -> Result<&mut IoWatch<D>> {
        self.io_watch(io)?;
        Ok(self.io.get_mut(io.watch.id).expect("found above"))
    }

    /// Changes what the watch waits for, in place. Like [`Loop::pause`] and
    /// [`Loop::resume`], the change reaches the backend just before the loop next waits
    /// (libev's model): at most one syscall (`epoll_ctl`) per fd then, however many
    /// changes were made, and none if the fd's registered interest ends where it began
    /// (a pause and a resume in one callback cost nothing). A refusal then (rare for an
    /// fd the loop holds open: epoll's ENOMEM, or ENOSPC past `max_user_watches`) does
    /// not stop the loop, as libev's does not: it is logged (`log::warn`, naming the
    /// fd and the errno), the fd's active watches see [`Readiness::ERROR`] once, in
    /// that iteration, with nothing pending on the fd itself (a read says
    /// `WouldBlock`: the log says why; a server that closes the connection on ERROR
    /// loses only that connection), and the change is tried again before each later
    /// wait, the wait being cut to 100 ms meanwhile, until the backend takes it or the
    /// watches change. A refused change that drops interest leaves the kernel
    /// reporting what no watch wants meanwhile, so the loop wakes at once until it is
    /// taken. A watch of a raw fd
    /// ([`Loop::watch_raw_fd`]) is changed at once instead, after a check that the fd
    /// is open (one `fcntl`), so that a number closed behind the loop's back is
    /// [`Error::ClosedWhileWatched`] here (a number already reused by another file
    /// cannot be told apart). An empty interest is refused;
    /// [`Loop::pause`] waits for nothing. `interest` replaces the watch's
    /// whole interest, [`Interest::EXCLUSIVE`] included; a change to or from an
    /// exclusive registration costs epoll two syscalls (it cannot modify one).
    ///
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use forkloop::{Interest, Loop, Readiness};
    ///
    /// // Watch for WRITE only while output is pending, as a server does.
    /// let mut lp: Loop<Vec<Readiness>> = Loop::new()?;
    /// let (a, _b) = UnixStream::pair()?;
    /// let io = lp.watch_io(a, Interest::READ, |lp, seen, _a, ready| {
    ///     seen.push(ready);
    ///     lp.stop(0);
    /// })?;
    /// lp.set_interest(io, Interest::READ | Interest::WRITE)?; // one epoll_ctl, in `run`
    /// let mut seen = Vec::new();
    /// lp.run(&mut seen)?;
    /// assert!(seen[0].contains(Readiness::WRITABLE));
    /// lp.pause(io)?; // waits for nothing, keeps the watch and its source
    /// lp.resume(io)?;
    /// let a: UnixStream = lp.remove(io).expect("the source comes back");
    /// # drop(a);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_interest<S: 'static>(&mut self, io: Io<S>, interest: Interest) -> Result<()> {
        let watch = self.io_watch_mut(io)?;
        check_interest(watch.fd, interest)?;
        let (fd, before) = (watch.fd, watch.interest);
        watch.interest = interest;
        self.change_fd(fd).inspect_err(|_| {
            if let Some(watch) = self.io.get_mut(io.watch.id) {
                watch.interest = before;
            }
        })
    }

    /// Stops the watch's callback until [`Loop::resume`], keeping the watch and its
    /// source. Its callback does not run from now on, even for readiness already
    /// reported; the backend hears of it before the loop next waits (one syscall at
    /// most, none if other watches of the fd want the same or it is resumed before
    /// then: see [`Loop::set_interest`]).
    pub fn pause<S: 'static>(&mut self, io: Io<S>) -> Result<()> {
        self.set_paused(io, true)
    }

    /// Undoes [`Loop::pause`], as cheaply (see [`Loop::set_interest`]).
    pub fn resume<S: 'static>(&mut self, io: Io<S>) -> Result<()> {
        self.set_paused(io, false)
    }

    fn set_paused<S: 'static>(&mut self, io: Io<S>, paused: bool) -> Result<()> {
        let watch = self.io_watch_mut(io)?;
        if watch.paused == paused {
            return Ok(());
        }
        watch.paused = paused;
        let fd = watch.fd;
        self.change_fd(fd).inspect_err(|_| {
            if let Some(watch) = self.io.get_mut(io.watch.id) {
                watch.paused = !paused;
            }
        })
    }

    /// Registers the watch's fd with the backend again, now: on epoll a delete and an
    /// add (two syscalls), after one for a change of its watches not yet applied. With
    /// [`Interest::EXCLUSIVE`] that puts this loop at the back of the fd's queue of
    /// waiters, which is how a server spreads the accepts of a listener its workers
    /// share (nginx re-adds its listeners now and then; a [`Loop::pause`] and
    /// [`Loop::resume`] would cancel out before the next wait, and not move it). Other
    /// backends keep no such queue, and do the same harmlessly. An fd whose watches
    /// are all paused is only deregistered (if it was not yet). An error is returned, and what the fd's
    /// watches want is tried again before the next wait (see [`Loop::set_interest`]).
    pub fn reregister<S: 'static>(&mut self, io: Io<S>) -> Result<()> {
        let fd = self.io_watch(io)?.fd;
        self.refresh_fd(fd)?;
        let Some(st) = self.fds.get(fd) else {
            return Ok(());
        };
        let interest = st.interest;
        if interest.is_empty() || st.always_ready || !self.backend_is_current() {
            return Ok(());
        }
        let backend = self.backend_name();
        self.backend
            .deregister(fd)
            .map_err(|e| watch_error(backend, fd, e))?;
        let added = self.backend.register(fd, interest);
        added.map_err(|e| {
            if let Some(st) = self.fds.get_mut(fd) {
                st.interest = Interest::NONE; // deleted above
            }
            self.queue_fd(fd);
            watch_error(backend, fd, e)
        })
    }

    /// Ends the watch and hands its source back. `None` if the watch is gone, belongs to
    /// another loop, or is the one whose callback is running: its source is then dropped
    /// when the callback returns.
    pub fn remove<S: 'static>(&mut self, io: Io<S>) -> Option<S> {
        self.io_watch(io).ok()?;
        let source = self.cancel_io(io.watch.id)?;
        let source = source.into_source().downcast::<S>();
        Some(*source.expect("io_watch checked the source type"))
    }

    /// Ends the watch and drops its source, which closes its fd: for a source the watch
    /// owns alone (a `TcpStream` a server accepted, say). As [`Loop::cancel`], with one
    /// syscall fewer when it was the fd's last watch: the loop does not deregister an fd
    /// that is closed right after (on epoll, no `EPOLL_CTL_DEL`: closing the last fd of
    /// a file removes it from every epoll instance). The source is dropped now, or when
    /// the watch's callback returns if it is the one running.
    ///
    /// Still correct if the file stays open through another fd (a `try_clone`, a forked
    /// child's copy, the other clones of an `Rc` source): epoll then keeps its
    /// registration, whose events are recognized as stale (they never reach another
    /// watch) and make the next wait rebuild the epoll instance without it, at a cost
    /// that grows with the fds watched; and a new watch of that file under the same
    /// number replaces the leftover registration. So prefer [`Loop::cancel`] for a
    /// source that outlives its watch elsewhere. A raw-fd watch
    /// ([`Loop::watch_raw_fd`]), whose fd the loop does not close, is deregistered.
    ///
    /// ```
    /// use std::os::unix::net::UnixStream;
    /// use forkloop::{Interest, Loop};
    ///
    /// let mut lp: Loop = Loop::new()?;
    /// let (a, _b) = UnixStream::pair()?;
    /// let io = lp.watch_io(a, Interest::READ, |_, _, _, _| {})?;
    /// assert!(lp.close_source(io)); // `a` is closed
    /// assert!(!lp.close_source(io), "the watch is gone");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn close_source<S: AsFd + 'static>(&mut self, io: Io<S>) -> bool {
        if self.io_watch(io).is_err() {
            return false;
        }
        drop(self.end_io(io.watch.id, true));
        true
    }

    /// The source watch `io` owns, to use it outside the watch's callback: to write an
    /// answer a timer produced at once, say (std implements `Read` and `Write` for
    /// `&TcpStream`, `&UnixStream` and `&File`). `None` if the watch is gone, belongs to
    /// another loop, or is the one whose callback is running (which has the source).
    pub fn source<S: 'static>(&self, io: Io<S>) -> Option<&S> {
        let source = self.io_watch(io).ok()?.handler.source()?.source();
        Some(
            source
                .downcast_ref::<S>()
                .expect("io_watch checked the source type"),
        )
    }

    /// The source, mutably, as [`Loop::source`] gives it.
    ///
    /// # Safety
    ///
    /// The source must keep its fd: replacing it (`*source = other`), or closing its
    /// fd, while the watch lives breaks what the loop relies on, as closing a raw fd
    /// behind its back does (see [`Loop::watch_raw_fd`]). Callbacks get `&S` for that
    /// reason (calloop's `NoIoDrop` makes the same choice).
    pub unsafe fn source_mut<S: 'static>(&mut self, io: Io<S>) -> Option<&mut S> {
        let Handler::Source(Some(source)) = &mut self.io_watch_mut(io).ok()?.handler else {
            return None;
        };
        let source = source.source_mut();
        Some(
            source
                .downcast_mut::<S>()
                .expect("io_watch checked the source type"),
        )
    }

    /// Removes watch `id` from the tables; its boxed source, unless its callback runs.
    pub(crate) fn cancel_io(&mut self, id: u64) -> Option<Box<dyn Source<D>>> {
        self.end_io(id, false)
    }

    /// [`Loop::cancel_io`]; `closing`: the source is dropped right after, closing its fd
    /// (see [`Loop::close_source`]).
    fn end_io(&mut self, id: u64, closing: bool) -> Option<Box<dyn Source<D>>> {
        let watch = self.io.remove(id)?;
        let st = self
            .fds
            .get_mut(watch.fd)
            .expect("every io watch has its fd's state");
        st.watches.retain(|w| *w != id);
        st.raw -= u32::from(watch.raw);
        // A raw fd stays open whatever becomes of its watch.
        let closing = closing && !watch.raw && st.raw == 0;
        if let Err(e) = self.update_fd(watch.fd, closing) {
            // Closing an fd removes it from epoll/kqueue already; nothing is lost.
            log::debug!(
                "{}: updating fd {} after a cancel: {e}",
                self.backend_name(),
                watch.fd
            );
        }
        match watch.handler {
            Handler::Source(source) => source,
            Handler::Internal(_) => None,
        }
    }

    /// A watch of `fd` was paused, resumed or given a new interest: the backend is told
    /// just before the loop next waits ([`Loop::apply_fd_changes`]), so that changes
    /// which undo each other before then (a pause and a resume, an interest set and set
    /// back, as libev's `ev_io_stop` and `ev_io_start`) cost no syscall, and several
    /// changes of one fd cost one. The kernel's view only matters while the loop
    /// waits, and a callback of a paused watch is skipped by the dispatch either way.
    /// Deferred only while the loop holds the fd open (owned sources): a raw fd may be
    /// closed behind the loop's back, and its change is made now, after a check that
    /// it is still open (one `fcntl`), so that the caller hears of it. (A number closed
    /// and already reused by another file cannot be told from the fd it was.)
    fn change_fd(&mut self, fd: RawFd) -> Result<()> {
        let Some(st) = self.fds.get(fd) else {
            return Ok(());
        };
        if st.raw > 0 {
            forkloop_backend::check_fd_open(fd).map_err(|_| Error::ClosedWhileWatched {
                backend: self.backend_name(),
                fd,
            })?;
        }
        if st.raw > 0 || st.always_ready {
            return self.refresh_fd(fd);
        }
        self.queue_fd(fd);
        // A loop that changes watches and cancels them without ever waiting leaves
        // entries a cancel already applied: keep the list to the queued fds, once.
        // (Here, not in `queue_fd`: `apply_fd_changes` walks the list by index.)
        if self.fd_changes.len() > 2 * self.io.len() + 1024 {
            let fds = &self.fds;
            self.fd_changes
                .retain(|&fd| fds.get(fd).is_some_and(|st| st.queued));
            self.fd_changes.sort_unstable();
            self.fd_changes.dedup();
        }
        Ok(())
    }

    /// Puts `fd` in [`Loop::fd_changes`], once.
    fn queue_fd(&mut self, fd: RawFd) {
        let Some(st) = self.fds.get_mut(fd) else {
            return;
        };
        if !st.queued {
            st.queued = true;
            self.fd_changes.push(fd);
        }
    }

    /// Tells the backend of the watch changes made since the last wait (see
    /// [`Loop::change_fd`]), and again of those it refused before: a refused change
    /// stays queued (see [`Loop::set_interest`] for what a refusal does).
    pub(crate) fn apply_fd_changes(&mut self) {
        let queued = self.fd_changes.len();
        for i in 0..queued {
            let fd = self.fd_changes[i];
            match self.fds.get_mut(fd) {
                Some(st) if st.queued => st.queued = false,
                _ => continue, // its watches are gone, or a cancel or watch_io applied it
            }
            match self.refresh_fd(fd) {
                Ok(()) => {
                    if let Some(st) = self.fds.get_mut(fd) {
                        st.refused = false;
                    }
                }
                Err(e) => self.refused(fd, &e), // queued again, past `queued`
            }
        }
        self.fd_changes.drain(..queued);
    }

    /// The backend refused a change of `fd` before a wait (it is queued again). The
    /// first refusal of a run of them is logged, and the fd's watches are told in this
    /// iteration's dispatch (`Loop::errored`).
    fn refused(&mut self, fd: RawFd, error: &Error) {
        let Some(st) = self.fds.get_mut(fd) else {
            return;
        };
        if !st.refused {
            st.refused = true;
            self.errored.push(fd);
            log::warn!("{error}; tried again before each wait, every {REFUSED_RETRY:?} at least");
        }
    }

    /// Brings the backend's registration of `fd` in line with its watches: registered
    /// with the union of their interests, deregistered while all are paused, forgotten
    /// when none is left. One syscall at most.
    fn refresh_fd(&mut self, fd: RawFd) -> Result<()> {
        self.update_fd(fd, false)
    }

    /// [`Loop::refresh_fd`]; `closing`: if no watch is left, the fd is closed right after
    /// (the backend may skip deregistering it).
    fn update_fd(&mut self, fd: RawFd, closing: bool) -> Result<()> {
        let backend = self.backend_name();
        let current = self.backend_is_current();
        let Some(st) = self.fds.get_mut(fd) else {
            return Ok(());
        };
        let io = &self.io;
        let wanted = st.watches.iter().fold(Interest::NONE, |acc, &w| {
            merge(acc, io.get(w).expect("watches of an fd are live").wants())
        });
        let before = st.interest;
        let (always_ready, gone) = (st.always_ready, st.watches.is_empty());
        st.interest = wanted;
        st.queued = false; // any change made before is in `wanted`
        if gone {
            self.fds.remove(fd);
        }
        if always_ready && wanted.is_empty() != before.is_empty() {
            // Only a regular file something waits for keeps the loop from blocking.
            if wanted.is_empty() {
                self.always_ready.retain(|&f| f != fd);
            } else {
                self.always_ready.push(fd);
            }
        }
        if wanted == before || always_ready || !current {
            return Ok(());
        }
        let result = if wanted.is_empty() && gone && closing {
            self.backend.deregister_closing(fd)
        } else if wanted.is_empty() {
            self.backend.deregister(fd)
        } else if before.is_empty() {
            self.backend.register(fd, wanted)
        } else {
            self.backend.modify(fd, wanted)
        };
        result.map_err(|e| {
            if let Some(st) = self.fds.get_mut(fd) {
                st.interest = before;
            }
            // What the watches want is tried again before the next wait, whoever
            // asked for this update (another watch of the fd may have a change queued).
            self.queue_fd(fd);
            watch_error(backend, fd, e)
        })
    }

    /// Runs the callbacks of `fd`'s watches that `ready` concerns and that existed when
    /// the dispatch began (`mark`).
    pub(crate) fn dispatch_fd(&mut self, fd: RawFd, ready: Readiness, mark: u64, data: &mut D) {
        let Some(st) = self.fds.get(fd) else {
            return;
        };
        let ids: SmallVec<[u64; 4]> = st.watches.iter().copied().collect();
        for id in ids {
            let Some(watch) = self.io.get_mut(id).filter(|w| w.serial < mark) else {
                continue; // cancelled by an earlier callback of this dispatch
            };
            if !fires(watch.wants(), ready) {
                continue;
            }
            match &mut watch.handler {
                Handler::Internal(callback) => Rc::clone(callback)(self, data),
                Handler::Source(source) => {
                    let Some(mut source) = source.take() else {
                        continue; // running further up the stack (nested run)
                    };
                    let serial = self.id.serial;
                    let called = guarded(|| source.ready(self, data, ready));
                    let source = take_back(serial, self.id.serial, source);
                    if let Some(IoWatch {
                        handler: Handler::Source(slot),
                        ..
                    }) = self.io.get_mut(id)
                    {
                        *slot = Some(source);
                    }
                    resume(called);
                }
            }
            if self.forked_in_dispatch() {
                return; // a raw fork in the callback: the rest is the parent's
            }
        }
    }

    /// The loop's own watch of an fd it owns elsewhere (self-pipes, pidfds).
    ///
    /// # Safety
    ///
    /// As [`Loop::watch_raw_fd`]: the caller cancels the watch before it closes `fd`.
    pub(crate) unsafe fn watch_internal(
        &mut self,
        fd: RawFd,
        callback: impl Fn(&mut Loop<D>, &mut D) + 'static,
    ) -> Result<Watch> {
        self.add_fd(fd, Interest::READ, true)?;
        let handler = Handler::Internal(Rc::new(callback));
        let id = self.insert_watch(fd, Interest::READ, true, TypeId::of::<()>(), handler);
        Ok(self.handle(WatchKind::Io, id))
    }

    /// Merges this iteration's events per fd, then dispatches each fd once.
    pub(crate) fn dispatch_io(&mut self, data: &mut D) {
        // Watches added from here on did not exist when the kernel reported these events:
        // a callback that closes its fd and watches a new one given the same number must
        // not see the old fd's readiness (libev guards the same way).
        let mark = self.next_id;
        // One dispatch per fd with all its readiness: kqueue (and mio or polling on it)
        // reports each filter as an event of its own. The per-fd marks are all cleared
        // before the first callback, so a nested iteration or a caught panic finds none.
        let mut ready = mem::take(&mut self.ready);
        for fd in mem::take(&mut self.errored) {
            // Still refused: not a new fd given the number since.
            if let Some(st) = self.fds.get_mut(fd).filter(|st| st.refused) {
                if st.pending.is_empty() {
                    ready.push((fd, Readiness::NONE));
                }
                st.pending |= Readiness::ERROR;
            }
        }
        for event in &self.events {
            if let Some(st) = self.fds.get_mut(event.fd) {
                if st.pending.is_empty() {
                    ready.push((event.fd, Readiness::NONE));
                }
                st.pending |= event.readiness;
            }
        }
        for (fd, readiness) in &mut ready {
            let st = self
                .fds
                .get_mut(*fd)
                .expect("marked above, no callback since");
            *readiness = mem::take(&mut st.pending);
        }
        for &(fd, readiness) in &ready {
            self.dispatch_fd(fd, readiness, mark, data);
            if self.forked_in_dispatch() {
                break; // a raw fork in a callback: the rest is the parent's
            }
        }
        ready.clear();
        self.ready = ready;
        if !self.always_ready.is_empty() {
            for fd in self.always_ready.clone() {
                if self.forked_in_dispatch() {
                    break;
                }
                let both = Readiness::READABLE | Readiness::WRITABLE;
                self.dispatch_fd(fd, both, mark, data);
            }
        }
    }
}
