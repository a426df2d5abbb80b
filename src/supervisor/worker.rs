//! The worker's side of the supervisor: what a worker process gets (its
//! [`WorkerContext`]), and how the master's child becomes one before the app runs.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::{Listener, Peers};
use crate::{Loop, Timer};

/// The messages of the link, worker to master, one byte each but for `SERVED`.
pub(crate) const READY: u8 = b'R';
pub(crate) const HEARTBEAT: u8 = b'H';
pub(crate) const RECYCLE: u8 = b'M';
/// Followed by [`COUNT_BYTES`] bytes with the high bit set, 7 bits of the count each
/// (least significant first). The other messages are ASCII, so a count cut short (a
/// partial write, another thread's message in between) is seen as such and dropped,
/// and the next one is read whole.
pub(crate) const SERVED: u8 = b'S';
pub(crate) const COUNT_BYTES: usize = 10;

/// What a worker process gets from its supervisor: the app's `FnOnce(WorkerContext) ->
/// i32` runs with it in the forked child, and its return value is the child's exit
/// status. Take it apart and move each piece where it is used.
#[derive(Debug)]
#[non_exhaustive]
pub struct WorkerContext {
    /// The worker's slot: a number never reused in the master's life.
    pub slot: usize,
    /// The listeners to serve, each shared with every other worker (the kernel hands
    /// each connection to one accepting worker), except under [`Config::reuse_port`]
    /// (see `lane`). Non-blocking.
    ///
    /// [`Config::reuse_port`]: super::Config::reuse_port
    pub listeners: Vec<Listener>,
    /// Under [`Config::reuse_port`](super::Config::reuse_port), the worker's lane:
    /// its listeners of the TCP addresses the master bound are sockets of its own,
    /// which no other worker serves (but the one replacing it, for a moment). When the
    /// worker drains, it must take in the connections they queued before it closes
    /// them: nobody else will. `None`: every listener is shared.
    pub lane: Option<usize>,
    /// How many workers serve now (forkloop's HTTP workers share bursts of connections
    /// only while there are others to take them).
    pub(crate) peers: Peers,
    /// The way to the master: ready, heartbeats, recycling.
    pub link: MasterLink,
    /// Readable once the worker must drain.
    pub drain: Drain,
    /// How many requests (or jobs: whatever the app counts) this worker should serve
    /// before it asks to be recycled, jitter included; `None` for no limit. The
    /// supervisor does not count: the app calls [`MasterLink::recycle`].
    pub max_requests: Option<u64>,
}

/// The worker's end of its link to the master, a Unix stream socket. Clone it into any
/// thread or task: it is `Send + Sync`, and each message is one write.
/// Writes never block: if the master has not read the link for a few hundred
/// messages, the next one is dropped.
///
/// Writes fail with `BrokenPipe` once the master is gone (forkloop's programs ignore
/// `SIGPIPE`, as every Rust binary does by default), and the link becomes readable at
/// EOF: a worker that watches it learns of its master's death even where the kernel
/// does not tell it (on Linux the kernel kills the workers of a dead master).
#[derive(Clone, Debug)]
pub struct MasterLink {
    socket: Arc<UnixStream>,
    heartbeat_interval: Duration,
}

impl MasterLink {
    pub(crate) fn new(socket: UnixStream, heartbeat_interval: Duration) -> MasterLink {
        MasterLink {
            socket: Arc::new(socket),
            heartbeat_interval,
        }
    }

    /// Tells the master this worker serves. Until then it is starting: not counted as
    /// serving, and the worker it replaces (on HUP or recycling) keeps serving. A worker
    /// that is not ready within the heartbeat timeout is killed.
    pub fn ready(&self) -> io::Result<()> {
        self.send(READY)
    }

    /// One heartbeat. Send one at least every [`MasterLink::heartbeat_interval`], from
    /// the code that does the work (the event loop's thread, not a thread of its own),
    /// so that a stuck worker stops beating and is replaced.
    pub fn heartbeat(&self) -> io::Result<()> {
        self.send(HEARTBEAT)
    }

    /// Asks to be replaced: the master forks a new worker, and drains this one once the
    /// new one is ready (the overlap path of HUP). This worker serves on until then.
    pub fn recycle(&self) -> io::Result<()> {
        self.send(RECYCLE)
    }

    /// Tells the master how many requests (or jobs) this worker has served in all, for
    /// its status view (`forkloop status`); send it now and then, with a heartbeat.
    /// Like every message, it is dropped if the link is full.
    pub fn report_served(&self, total: u64) -> io::Result<()> {
        let mut message = [0u8; 1 + COUNT_BYTES];
        message[0] = SERVED;
        for (i, byte) in message[1..].iter_mut().enumerate() {
            *byte = 0x80 | ((total >> (7 * i)) & 0x7f) as u8;
        }
        self.write(&message)
    }

    /// How often to beat: a quarter of the master's heartbeat timeout.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// Beats every [`MasterLink::heartbeat_interval`] from a forkloop loop: a timer
    /// whose callback runs on the loop's thread, so a loop stuck in a callback stops
    /// beating. Cancel it with [`Loop::cancel`].
    pub fn beat_on<D: 'static>(&self, lp: &mut Loop<D>) -> crate::Result<Timer> {
        let link = self.clone();
        lp.every(self.heartbeat_interval, move |_, _| {
            let _ = link.heartbeat();
        })
    }

    fn send(&self, message: u8) -> io::Result<()> {
        self.write(&[message])
    }

    fn write(&self, message: &[u8]) -> io::Result<()> {
        // Non-blocking: a master that stopped reading (stopped, or stuck in a hook)
        // must not stall the worker. A full buffer already holds a few hundred
        // messages the master has not read; this one is dropped, which costs nothing
        // for a heartbeat, a repeated ready or recycle, or a count (the next one says
        // more).
        match (&*self.socket).write(message) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other.map(drop),
        }
    }
}

impl AsFd for MasterLink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// Readable once the worker must drain: stop accepting, take in the connections the
/// kernel already queued, close the listeners, finish what is in flight, and return
/// from the worker's function within the master's graceful timeout (then it is
/// killed). It stays readable from then on and nothing needs to read it, so a
/// level-triggered watch of it (a forkloop loop's) must be cancelled once it fires, or
/// it fires in every iteration.
///
/// It is the read end of a pipe that the worker's `SIGTERM` handler writes to. The
/// master drains a worker with `SIGTERM`, and so can an operator. The handler is
/// installed with `sigaction` before the worker's function runs: an app that watches
/// `SIGTERM` through tokio's `signal` module (signal-hook's registry) gets it too, as
/// that registry calls the handler it replaced; a forkloop loop's `watch_signal` of
/// `SIGTERM` would replace it without calling it, so a forkloop worker watches this
/// fd instead. A process the worker forks without `exec` inherits the handler, which
/// there restores the default action and dies of the signal, as if it had none.
///
/// With tokio, wait on it with `AsyncFd::register_with_interest(drain, Interest::READABLE)`
/// and `.readable().await` (examples/axum_prefork.rs); with a forkloop loop, watch it
/// with `watch_io(drain, Interest::READ, …)`; in blocking code, call [`Drain::wait`] in a
/// thread, or [`Drain::is_draining`] between jobs.
#[derive(Debug)]
pub struct Drain {
    fd: OwnedFd,
}

/// The write end of the drain's pipe, and the worker it belongs to: set in the worker
/// before its `SIGTERM` handler is installed, never changed after.
static DRAIN_PIPE: AtomicI32 = AtomicI32::new(-1);
static DRAIN_PID: AtomicI32 = AtomicI32::new(0);

/// The worker's `SIGTERM` handler. Async-signal-safe: atomics, getpid(2), write(2),
/// signal(2) and raise(3) only; errno is preserved for the code it interrupted.
extern "C" fn on_sigterm(_: libc::c_int) {
    let errno = crate::sys::errno_location();
    // SAFETY: errno_location points at this thread's errno.
    let saved = unsafe { *errno };
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == DRAIN_PID.load(Ordering::SeqCst) {
        // SAFETY: writes one byte from a live buffer to the pipe's write end, which
        // the worker never closes; the pipe is non-blocking, and a full one already
        // holds a byte (the fd is readable), so a failed write loses nothing.
        unsafe { libc::write(DRAIN_PIPE.load(Ordering::SeqCst), b"T".as_ptr().cast(), 1) };
    } else {
        // A process forked from the worker without exec: the drain is not its own.
        // SAFETY: sets the default action, then raises the signal, which is blocked
        // while its handler runs and so is delivered, and kills, on return.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::raise(libc::SIGTERM);
        }
    }
    // SAFETY: as above.
    unsafe { *errno = saved };
}

impl Drain {
    /// A pipe whose read end becomes readable at the worker's first `SIGTERM`. Called
    /// once per worker process, in the child, before the app runs.
    fn on_sigterm() -> io::Result<Drain> {
        let (read, write) = crate::sys::pipe()?;
        // The write end lives as long as the process: the handler may write at any time.
        DRAIN_PIPE.store(write.into_raw_fd(), Ordering::SeqCst);
        DRAIN_PID.store(nix::unistd::getpid().as_raw(), Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(on_sigterm),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        // SAFETY: the handler is async-signal-safe (see on_sigterm), and the statics it
        // reads are set above, before it can run.
        unsafe { sigaction(Signal::SIGTERM, &action) }?;
        Ok(Drain { fd: read })
    }

    /// Whether the drain has begun (the fd is readable now).
    pub fn is_draining(&self) -> bool {
        self.poll(PollTimeout::ZERO)
    }

    /// Blocks until the drain begins.
    pub fn wait(&self) {
        while !self.poll(PollTimeout::NONE) {}
    }

    fn poll(&self, timeout: PollTimeout) -> bool {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        // EINTR (a signal, the drain's own included) counts as not readable yet: the
        // caller asks again.
        nix::poll::poll(&mut fds, timeout).is_ok_and(|n| n > 0)
    }
}

impl AsFd for Drain {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Drain {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What the master hands a new worker, in the child.
pub(crate) struct Birth {
    pub slot: usize,
    pub listeners: Vec<Listener>,
    pub lane: Option<usize>,
    pub peers: Peers,
    pub link: UnixStream,
    pub master_pid: libc::pid_t,
    pub heartbeat_interval: Duration,
    pub max_requests: Option<u64>,
}

/// Makes the forked child a worker: it dies with the master, leaves Ctrl-C and Ctrl-\
/// to the master, survives a forwarded `SIGUSR1` it does not watch, and drains on
/// `SIGTERM`.
pub(crate) fn become_worker(birth: Birth) -> io::Result<WorkerContext> {
    die_with_master(birth.master_pid)?;
    birth.link.set_nonblocking(true)?;
    for signal in [libc::SIGINT, libc::SIGQUIT, libc::SIGUSR1] {
        // SIGINT, SIGQUIT: Ctrl-C and Ctrl-\ reach the whole process group, and are for
        // the master, which drains the workers with SIGTERM (for QUIT, instead of a
        // core dump in every worker). SIGUSR1: the master forwards it to every
        // worker, whose default action would be to die of it. A watch of either (a
        // forkloop loop's, tokio's) replaces this.
        // SAFETY: sets a disposition; no handler code runs.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let drain = Drain::on_sigterm()?;
    // The master forks with TERM blocked (`spawn_on`): one sent since is delivered
    // now, to the drain's handler.
    let _ = SigSet::from(Signal::SIGTERM).thread_unblock();
    Ok(WorkerContext {
        slot: birth.slot,
        listeners: birth.listeners,
        lane: birth.lane,
        peers: birth.peers,
        link: MasterLink::new(birth.link, birth.heartbeat_interval),
        drain,
        max_requests: birth.max_requests,
    })
}

/// Linux: the kernel sends SIGKILL when the master dies. Elsewhere the link's EOF
/// tells a worker that watches it.
fn die_with_master(master_pid: libc::pid_t) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number; no pointers.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // The master may have died before prctl: then we have been re-parented already.
    if nix::unistd::getppid().as_raw() != master_pid {
        return Err(io::Error::other(
            "the master exited before this worker started",
        ));
    }
    Ok(())
}
