//! The master: binds, forks workers through `Loop::fork`, and supervises them from its
//! own loop — `watch_process` for exits, `watch_signal` for TERM/INT/HUP/TTIN/TTOU/USR1,
//! a pipe per worker for readiness and heartbeats. No hand-written select loop, no
//! global signal handlers.
//!
//! The master's state is the loop's data: a `Loop<Master>`, whose callbacks all get
//! `&mut Master`. The loop owns the master's end of each worker's pipe (the pipe's
//! watch is its source).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use std::io::Write;

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;

use super::listener::{Bound, REUSE_PORT_SPREADS};
use super::notify::{self, Notifier};
use super::status::{rss_bytes, Status, WorkerState as State, WorkerStatus};
use super::upgrade::{self, Exe};
use super::worker::{become_worker, Birth, COUNT_BYTES, HEARTBEAT, READY, RECYCLE, SERVED};
use super::{activation, Config, ExitHook, ForkHook, Peers, Supervisor, WorkerFn};
use crate::{ForkOptions, Interest, Io, Loop, Timer};

#[path = "handover.rs"]
mod handover;
#[path = "lanes.rs"]
mod lanes;

use handover::{begin_upgrade, oldbin, tell_old_master, Upgrade};

/// Why the supervisor could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// The configuration cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The `--listen` value.
        address: String,
        /// The OS error.
        source: io::Error,
    },
    /// The pid file is taken or cannot be written.
    #[error("pid file {path}: {reason}")]
    PidFile {
        /// The pid file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The master's loop failed.
    #[error(transparent)]
    Loop(#[from] crate::Error),
    /// Workers kept exiting before they became ready.
    #[error(
        "{attempts} workers in a row exited before becoming ready (the last: {last}); giving up"
    )]
    Startup {
        /// How many failed in a row.
        attempts: u32,
        /// How the last one ended.
        last: String,
    },
}

/// Workers that lived shorter than this count as crashing, for the backoff.
const CRASH_WINDOW: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The shortest heartbeat timeout: a quarter of it must leave room for a beat.
const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(200);
/// A second TERM/INT kills the workers only this long after the first.
const SECOND_SIGNAL: Duration = Duration::from_secs(1);

/// A worker's number, never reused in the master's life: it names the worker in the
/// master's tables and in everything the master does later (timers, replacements). A
/// pid only names a worker until it is reaped; the kernel may then give it to any new
/// process, a later worker included.
type Slot = usize;

struct WorkerInfo {
    pid: libc::pid_t,
    /// The watch of the master's end of the worker's pipe, which the loop owns; `None`
    /// once the worker closed its end (the watch is then gone, and the socket closed).
    pipe: Option<Io<UnixStream>>,
    /// The fd number of that end, for the workers forked later to close their copy.
    pipe_fd: RawFd,
    state: State,
    started: Instant,
    last_heard: Instant,
    /// The worker this one replaces: retired once this one is ready (HUP, recycling).
    replaces: Option<Slot>,
    /// The master sent it SIGKILL: what it still sends is ignored, and it is not
    /// killed again.
    killed: bool,
    /// The requests it says it served in all (`MasterLink::report_served`).
    served: Option<u64>,
    /// A count being read: its value so far, and how many of its bytes came.
    counting: Option<(u64, usize)>,
    /// Heartbeat checks in a row that found it above `max_worker_memory`.
    over_memory: u32,
    /// The lane it serves (`reuse_port`; see `lanes`), until it drains and its lane
    /// is closed.
    lane: Option<usize>,
}

/// A HUP's rolling restart, from its `RELOADING=1` to its `READY=1`.
#[derive(Default)]
struct Reload {
    /// The replacements it forked that are neither ready nor gone.
    pending: HashSet<Slot>,
    /// Replacements it tried to fork.
    started: usize,
    /// Of those, the ones that could not be forked or exited before they were ready.
    failed: usize,
}

/// The master's state: the data of its `Loop<Master>`.
struct Master {
    config: Config,
    /// Run by each worker, in its child (where it is taken from the child's copy of
    /// this state); never in the master.
    worker: Option<WorkerFn>,
    before_fork: Option<ForkHook>,
    on_worker_exit: Option<ExitHook>,
    listeners: Vec<Bound>,
    /// How many lanes each laned listener has (`reuse_port`; see `lanes`); 0 when
    /// none is laned.
    lanes: usize,
    /// Every worker not yet reaped (an entry leaves when its exit is reported).
    workers: HashMap<Slot, WorkerInfo>,
    /// The count of `active` workers, as every worker reads it (see `Peers`).
    peers: Peers,
    target: usize,
    next_slot: usize,
    /// When the first TERM/INT (or the start-up failure) began the shutdown.
    shutdown_began: Option<Instant>,
    announced: bool,
    crash_streak: u32,
    respawn_timer: Option<Timer>,
    startup_failures: u32,
    failure: Option<SupervisorError>,
    backend: &'static str,
    notify: Notifier,
    /// A HUP after the first `READY=1`, until every replacement is ready or gone.
    reload: Option<Reload>,
    /// This binary and its arguments, for an upgrade (why not, if they cannot be known).
    exe: Result<Exe, String>,
    /// How many of `listeners` came from `Supervisor::listener` (the first ones): the
    /// app's own, which an upgrade does not pass on.
    handed_in: usize,
    upgrade: Option<Upgrade>,
    /// Started by an upgrade, and not ready yet: where to tell the old master that
    /// every worker is, and whether each inherited socket is the masters' own.
    report_to: Option<upgrade::Inherited>,
    /// This master handed its sockets over to a new one, and drains: it leaves them as
    /// they are (no filter, no unlinking), as the new master serves them.
    handed_over: bool,
    /// The worker count before a WINCH retired them all.
    winched: Option<usize>,
    /// Where the control socket's file is now (its `.oldbin` name during an upgrade).
    control_path: Option<PathBuf>,
}

pub(crate) fn run(supervisor: Supervisor) -> Result<(), SupervisorError> {
    // First of all, before the program can have started threads of ours: this takes
    // the variables out of the environment (see `activation::take`).
    let activated = activation::take(&supervisor.config.listen)?;
    let inherited = upgrade::take_inherited(activated.as_ref().map(Vec::len))?;
    let exe = Exe::current().map_err(|e| e.to_string());
    let config = supervisor.config;
    if config.workers == 0 {
        return Err(SupervisorError::Config(
            "workers (--workers) must be at least 1".into(),
        ));
    }
    if config.heartbeat_timeout < MIN_HEARTBEAT_TIMEOUT {
        return Err(SupervisorError::Config(format!(
            "heartbeat_timeout (--heartbeat-timeout) must be at least \
             {MIN_HEARTBEAT_TIMEOUT:?}: workers beat every quarter of it, every 50 ms at most"
        )));
    }
    if config.startup_budget == 0 {
        return Err(SupervisorError::Config(
            "startup_budget must be at least 1".into(),
        ));
    }
    if config.reuse_port && !REUSE_PORT_SPREADS {
        return Err(SupervisorError::Config(
            "reuse_port (--reuse-port) needs a system that spreads connections over \
             SO_REUSEPORT sockets (Linux, or FreeBSD's SO_REUSEPORT_LB); this one does not"
                .into(),
        ));
    }
    if config.max_worker_memory.is_some() && rss_bytes(std::process::id() as libc::pid_t).is_none()
    {
        return Err(SupervisorError::Config(
            "max_worker_memory (--max-worker-memory) needs each process's resident size \
             from /proc/<pid>/statm, which this system does not have"
                .into(),
        ));
    }
    let mut lp: Loop<Master> = config.backend.map_or_else(Loop::new, Loop::with_backend)?;
    let pid_file = config.pid_file.clone();
    let addresses = config.listen.clone();
    let mut master = Master {
        target: config.workers,
        config,
        worker: Some(supervisor.worker),
        before_fork: supervisor.before_fork,
        on_worker_exit: supervisor.on_worker_exit,
        listeners: Vec::new(),
        lanes: 0,
        workers: HashMap::new(),
        peers: Peers::shared().map_err(|e| crate::Error::Create {
            what: "the shared count of workers",
            source: e.into(),
        })?,
        next_slot: 0,
        shutdown_began: None,
        announced: false,
        crash_streak: 0,
        respawn_timer: None,
        startup_failures: 0,
        failure: None,
        backend: lp.backend_name(),
        notify: Notifier::from_env(),
        reload: None,
        exe,
        handed_in: supervisor.listeners.len(),
        upgrade: None,
        handed_over: false,
        winched: None,
        report_to: None,
        control_path: None,
    };
    // Signals first: one that arrives from here on is dispatched, not lost — and never
    // kills a master that already wrote its pid file.
    watch_signals(&mut lp)?;
    for listener in supervisor.listeners {
        let address = listener.address();
        let bound = Bound::handed_in(listener)
            .map_err(|source| SupervisorError::Bind { address, source })?;
        master.listeners.push(bound);
    }
    match (activated, inherited) {
        // From an upgrade: the sockets the old master serves on. Not this master's
        // until it takes over (`tell_old_master`): a new master that fails must leave
        // them as they are, for the old one.
        (Some(listeners), Some(mut inherited)) => {
            let lanes = std::mem::take(&mut inherited.lanes);
            let own = inherited.own.iter().chain(std::iter::repeat(&false));
            for ((listener, more), &own) in listeners.into_iter().zip(lanes).zip(own) {
                let lanes = std::iter::once(listener).chain(more).collect();
                // Only the masters' own sockets are laned (see `Bound`).
                let bound = Bound::inherited(lanes, own && master.config.reuse_port);
                master.listeners.push(bound);
            }
            lanes::check_inherited(&master)?;
            master.notify.hold();
            master.report_to = Some(inherited);
        }
        // Handed in: never unlinked, and never filtered at shutdown (systemd keeps
        // the socket for the next start).
        (Some(listeners), None) => {
            for (listener, address) in listeners.into_iter().zip(addresses) {
                let bound = Bound::handed_in(listener)
                    .map_err(|source| SupervisorError::Bind { address, source })?;
                master.listeners.push(bound);
            }
        }
        (None, _) => {
            for address in &addresses {
                let bound = Bound::bind(address, master.config.reuse_port);
                let bound = bound.map_err(|source| SupervisorError::Bind {
                    address: address.clone(),
                    source,
                });
                match bound {
                    Ok(bound) => master.listeners.push(bound),
                    Err(e) => {
                        unlink_sockets(&master);
                        return Err(e);
                    }
                }
            }
        }
    }
    master.lanes = lanes::count(&master.listeners);
    if master.config.reuse_port && master.lanes == 0 {
        log::info!(
            "reuse_port: no TCP address of the master's own to lay lanes for; every \
             listener is shared by every worker"
        );
    }
    if master.report_to.is_some() && master.lanes > 0 {
        // Each lane needs its worker (see `lanes`): as many as the old master had.
        master.target = master.lanes;
    }
    if let Some(path) = &pid_file {
        if let Err(e) = write_pid_file(path) {
            unlink_sockets(&master);
            return Err(e);
        }
    }
    if let Err(e) = listen_for_status(&mut lp, &mut master) {
        unlink_sockets(&master);
        if let Some(path) = &pid_file {
            remove_pid_file(path);
        }
        return Err(e);
    }
    let result = supervise(&mut lp, &mut master);
    if let Some(path) = &master.control_path {
        let _ = std::fs::remove_file(path);
    }
    unlink_sockets(&master);
    if let Some(path) = &pid_file {
        // Each only if it still names this master: after an upgrade the pid file is the
        // new master's, and the `.oldbin` this one's.
        remove_pid_file(path);
        remove_pid_file(&oldbin(path));
    }
    result?;
    master.failure.take().map_or(Ok(()), Err)
}

impl Master {
    /// A TERM/INT (or the start-up failure) began the shutdown.
    fn shutting_down(&self) -> bool {
        self.shutdown_began.is_some()
    }
}

fn unlink_sockets(m: &Master) {
    if m.handed_over {
        return;
    }
    for bound in &m.listeners {
        bound.unlink();
    }
}

fn watch_signals(lp: &mut Loop<Master>) -> Result<(), SupervisorError> {
    for (signal, name) in [
        (libc::SIGTERM, "TERM"),
        (libc::SIGINT, "INT"),
        (libc::SIGQUIT, "QUIT"),
    ] {
        lp.watch_signal(signal, move |lp, m, _| shutdown(lp, m, name))?;
    }
    lp.watch_signal(libc::SIGHUP, |lp, m, _| match m.winched.take() {
        Some(workers) => {
            m.target = workers;
            log::info!("HUP: workers again: {workers}");
            reconcile(lp, m);
        }
        None => rolling_restart(lp, m),
    })?;
    lp.watch_signal(libc::SIGUSR2, |lp, m, _| begin_upgrade(lp, m))?;
    lp.watch_signal(libc::SIGWINCH, |lp, m, _| retire_all(lp, m))?;
    lp.watch_signal(libc::SIGTTIN, |lp, m, _| {
        if upgrading(m, "TTIN") {
            return;
        }
        // After a WINCH: one worker, and a HUP no longer restores the old count.
        m.winched = None;
        m.target += 1;
        log::info!("TTIN: workers: {}", m.target);
        reconcile(lp, m);
        report(m);
    })?;
    lp.watch_signal(libc::SIGTTOU, |lp, m, _| fewer_workers(lp, m))?;
    lp.watch_signal(libc::SIGUSR1, |_, m, _| {
        log::info!("USR1: forwarded to the workers");
        signal_all(m, Signal::SIGUSR1);
    })?;
    Ok(())
}

fn supervise(lp: &mut Loop<Master>, m: &mut Master) -> Result<(), SupervisorError> {
    let check = heartbeat_interval(&m.config);
    lp.every(check, check_heartbeats)?;
    if let (true, Some(interval)) = (m.notify.enabled(), notify::watchdog_interval()) {
        // From the master's loop: a master stuck anywhere stops pinging.
        lp.every(interval, |_, m| m.notify.watchdog())?;
    }
    reconcile(lp, m);
    lp.run(m)?;
    Ok(())
}

/// How often workers beat, and the master checks on them: a quarter of the timeout.
fn heartbeat_interval(config: &Config) -> Duration {
    (config.heartbeat_timeout / 4).max(Duration::from_millis(50))
}

/// The workers starting or serving.
fn active(m: &Master) -> usize {
    m.workers
        .values()
        .filter(|w| w.state != State::Draining)
        .count()
}

/// Forks workers until `target` of them are starting or serving (after closing the
/// lanes too many).
fn reconcile(lp: &mut Loop<Master>, m: &mut Master) {
    lanes::trim(lp, m);
    loop {
        let enough = active(m) >= m.target && !lanes::unserved(m);
        if m.shutting_down() || m.respawn_timer.is_some() || enough {
            return;
        }
        if let Err(e) = spawn(lp, m, None) {
            log::error!("forking a worker: {e}; retrying");
            schedule_respawn(lp, m, Duration::from_millis(500));
            return;
        }
    }
}

/// Forks a worker, on the lane of the one it `replaces` or on a lane no other serves.
fn spawn(
    lp: &mut Loop<Master>,
    m: &mut Master,
    replaces: Option<Slot>,
) -> Result<Slot, SupervisorError> {
    let lane = lanes::for_new_worker(m, replaces)?;
    spawn_on(lp, m, replaces, lane)
}

/// Forks a worker serving `lane` (`None`: not laned).
fn spawn_on(
    lp: &mut Loop<Master>,
    m: &mut Master,
    replaces: Option<Slot>,
    lane: Option<usize>,
) -> Result<Slot, SupervisorError> {
    let (master_end, worker_end) = UnixStream::pair().map_err(|source| crate::Error::Create {
        what: "a worker pipe",
        source,
    })?;
    m.next_slot += 1;
    let slot = m.next_slot;
    if let Some(hook) = &m.before_fork {
        hook(slot);
    }
    let master_pid = std::process::id() as libc::pid_t;
    let max_requests = m
        .config
        .max_requests
        .map(|n| n + jitter(m.config.max_requests_jitter));
    // Taken (and so closed) only in the child; the parent keeps both until the fork
    // returns.
    let mut master_end = Some(master_end);
    let mut worker_end = Some(worker_end);
    // TERM stays blocked in the child until its drain handler is in place (see
    // `become_worker`): a worker retired at once (a HUP while it starts, a lane to
    // close) drains instead of dying of it with connections it should take in.
    let term = SigSet::from(Signal::SIGTERM);
    let mut mask = SigSet::empty();
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&term), Some(&mut mask));
    let pid = lp.fork(ForkOptions::new(), || {
        // The child keeps its own pipe end and the listeners, nothing else of the
        // master's: a copy of any worker's master end, this one's included, would hide
        // the master's death from that worker.
        drop(master_end.take());
        close_other_pipes(&m.workers);
        // The new master's line to the old one, during an upgrade, is the master's.
        drop(m.report_to.take());
        let birth = Birth {
            slot,
            // Its lane's socket of each laned listener: the others close here.
            listeners: std::mem::take(&mut m.listeners)
                .into_iter()
                .map(|bound| bound.into_lane(lane.unwrap_or(0)))
                .collect(),
            lane,
            peers: m.peers,
            link: worker_end.take().expect("taken once"),
            master_pid,
            heartbeat_interval: heartbeat_interval(&m.config),
            max_requests,
        };
        let worker = m.worker.take().expect("the master never runs a worker");
        match become_worker(birth) {
            Ok(context) => worker(context),
            Err(e) => {
                eprintln!("forkloop worker {slot}: {e}");
                1
            }
        }
    });
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&mask), None);
    let pid = pid?;
    drop(worker_end);
    let master_end = master_end.expect("taken in the child only");
    // The fork took a while: a worker's clock starts now, not at the wake-up.
    let now = lp.update_now();
    lp.watch_process(pid, move |lp, m, pid, status| {
        worker_exited(lp, m, slot, pid, status)
    })?;
    master_end.set_nonblocking(true).ok();
    let pipe_fd = master_end.as_raw_fd();
    let pipe = lp
        .watch_io(master_end, Interest::READ, move |lp, m, pipe, _| {
            worker_message(lp, m, slot, pipe)
        })
        .map_err(crate::Error::from)?;
    m.workers.insert(
        slot,
        WorkerInfo {
            pid,
            pipe: Some(pipe),
            pipe_fd,
            state: State::Starting,
            started: now,
            last_heard: now,
            replaces,
            killed: false,
            served: None,
            counting: None,
            over_memory: 0,
            lane,
        },
    );
    m.peers.set(active(m));
    match lane {
        Some(lane) => log::debug!("worker {slot} forked: pid {pid}, lane {lane}"),
        None => log::debug!("worker {slot} forked: pid {pid}"),
    }
    Ok(slot)
}

/// In a new worker, before it runs: closes its copies of the other workers' master
/// ends, which the master's loop owns (their watches' sources).
fn close_other_pipes(workers: &HashMap<Slot, WorkerInfo>) {
    for w in workers.values().filter(|w| w.pipe.is_some()) {
        // SAFETY: this runs in a `Loop::fork` child. The socket whose number this is
        // belongs to the master's loop (the live watch `w.pipe` owns it, so the number
        // is still that socket's here), and that loop is borrowed by `fork` for the
        // child's whole life and never used or dropped in it: the child `_exit`s from
        // inside `fork`. So nothing reads, writes or closes this number through its
        // owner again; closing it releases the child's copy of the socket and nothing
        // else.
        unsafe { libc::close(w.pipe_fd) };
    }
}

/// A random number in `0..=max`, from the clock (no need for a real RNG here).
fn jitter(max: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    (nanos ^ (std::process::id() as u64).wrapping_mul(0x9E37_79B9)) % (max + 1)
}

fn worker_message(lp: &mut Loop<Master>, m: &mut Master, slot: Slot, mut pipe: &UnixStream) {
    let Some((pid, killed)) = m.workers.get(&slot).map(|w| (w.pid, w.killed)) else {
        return;
    };
    let mut buf = [0u8; 64];
    let n = match pipe.read(&mut buf) {
        Ok(0) => {
            // EOF: the worker is gone; its exit arrives through watch_process. Its
            // watch ends here, and the socket closes when this callback returns.
            if let Some(io) = m.workers.get_mut(&slot).and_then(|w| w.pipe.take()) {
                lp.cancel(io);
            }
            return;
        }
        Ok(_) if killed => return, // a late word from a worker on its way out
        Ok(n) => n,
        Err(_) => return,
    };
    for &message in &buf[..n] {
        let Some(w) = m.workers.get_mut(&slot) else {
            return;
        };
        if message & 0x80 != 0 {
            // A byte of a count; one that follows no `SERVED` is dropped.
            if let Some((value, read)) = w.counting.take() {
                let value = value | u64::from(message & 0x7f) << (7 * read);
                match read + 1 {
                    COUNT_BYTES => w.served = Some(value),
                    read => w.counting = Some((value, read)),
                }
            }
            continue;
        }
        // Any other message ends a count cut short.
        w.counting = None;
        match message {
            SERVED => w.counting = Some((0, 0)),
            READY => worker_ready(lp, m, slot),
            HEARTBEAT => {}
            RECYCLE => {
                if let Err(e) = replace(lp, m, slot, "asked to be recycled") {
                    log::error!("forking a replacement for {pid}: {e}");
                }
            }
            other => log::warn!("worker {pid} sent an unknown message {other:#x}"),
        }
    }
    let now = lp.now();
    if let Some(w) = m.workers.get_mut(&slot) {
        w.last_heard = now;
    }
}

/// Forks a replacement for a serving worker (HUP, recycling), which retires it once
/// ready, and returns its slot; nothing for a worker that is not serving, or that has a
/// replacement coming.
fn replace(
    lp: &mut Loop<Master>,
    m: &mut Master,
    slot: Slot,
    why: &str,
) -> Result<Option<Slot>, SupervisorError> {
    let Some(w) = m.workers.get(&slot) else {
        return Ok(None);
    };
    let replaced = m.workers.values().any(|other| other.replaces == Some(slot));
    if m.shutting_down() || w.state != State::Ready || w.killed || replaced {
        return Ok(None);
    }
    log::info!("worker {} {why}; replacing it", w.pid);
    spawn(lp, m, Some(slot)).map(Some)
}

fn worker_ready(lp: &mut Loop<Master>, m: &mut Master, slot: Slot) {
    let Some(w) = m.workers.get_mut(&slot) else {
        return;
    };
    if w.state != State::Starting {
        return;
    }
    w.state = State::Ready;
    log::debug!("worker {} (slot {slot}) ready", w.pid);
    let replaces = w.replaces.take();
    m.startup_failures = 0;
    if let Some(old) = replaces {
        retire(lp, m, old);
        // A crash during the overlap was not replaced: the two counted as one more.
        reconcile(lp, m);
    }
    let ready = m
        .workers
        .values()
        .filter(|w| w.state == State::Ready)
        .count();
    if let Some(reload) = &mut m.reload {
        reload.pending.remove(&slot);
    }
    if !m.announced && ready >= m.target {
        m.announced = true;
        match m.report_to.take() {
            // The old master tells the service manager, as it is the main process
            // until then (`NotifyAccess=main` drops what this one would send).
            Some(inherited) => {
                m.notify.shown(&serving_status(m));
                tell_old_master(m, inherited);
            }
            None => m.notify.ready(&serving_status(m)),
        }
        let addresses: Vec<String> = m.listeners.iter().map(|b| b.listener().address()).collect();
        let listening = if addresses.is_empty() {
            String::new()
        } else {
            format!("listening on {} with ", addresses.join(", "))
        };
        log::info!(
            "ready: {listening}workers: {}, on the {} backend (master pid {})",
            m.target,
            m.backend,
            std::process::id()
        );
    }
    report(m);
}

/// "3 workers ready on epoll", or "2 of 3 workers ready on epoll": the `STATUS=` line.
fn serving_status(m: &Master) -> String {
    let ready = m
        .workers
        .values()
        .filter(|w| w.state == State::Ready)
        .count();
    let workers = if m.target == 1 { "worker" } else { "workers" };
    if ready >= m.target {
        format!("{ready} {workers} ready on {}", m.backend)
    } else {
        format!("{ready} of {} {workers} ready on {}", m.target, m.backend)
    }
}

/// Tells the service manager how things stand, once a worker became ready or exited
/// or the count changed: `READY=1` at the end of a reload (its last replacement is
/// ready or gone), a `STATUS=` line otherwise. Nothing before the first `READY=1`,
/// which `worker_ready` sends, or once stopping.
fn report(m: &mut Master) {
    if !m.announced || m.shutting_down() {
        return;
    }
    match m.reload.take() {
        Some(reload) if !reload.pending.is_empty() => m.reload = Some(reload),
        Some(reload) => {
            let serving = serving_status(m);
            if reload.failed == 0 {
                log::info!("HUP: every worker is replaced");
                m.notify.ready(&format!("reloaded: {serving}"));
            } else {
                // The old workers serve on: the service is as ready as before.
                m.notify.ready(&format!(
                    "reload failed: {} of {} new workers did not start, the old ones \
                     serve on; {serving}",
                    reload.failed, reload.started
                ));
            }
        }
        None => m.notify.status(&serving_status(m)),
    }
}

/// Sends a worker into draining: it stops accepting, finishes, and exits.
fn retire(lp: &mut Loop<Master>, m: &mut Master, slot: Slot) {
    let Some(w) = m.workers.get_mut(&slot) else {
        return;
    };
    if w.state == State::Draining {
        return;
    }
    w.state = State::Draining;
    kill(w.pid, Signal::SIGTERM);
    m.peers.set(active(m));
    if let Some(reload) = &mut m.reload {
        // Retired before it was ready (a second HUP, TTOU): the reload waits no more.
        reload.pending.remove(&slot);
    }
    // Keyed by the slot, never by the pid: by the time this fires the worker may be
    // long reaped and its pid given to a later worker.
    lp.after(m.config.graceful_timeout, move |_, m| {
        kill_workers(m, |s, w| {
            let late = s == slot;
            if late {
                log::warn!(
                    "worker {} did not finish within the graceful timeout; killing it",
                    w.pid
                );
            }
            late
        });
    });
}

/// Signals a worker by the pid of its entry in `workers`. An entry leaves that table when
/// the worker's exit is reported, so its process is not yet reaped, and the pid of a
/// process that is not yet reaped cannot have been given to another: this reaches the
/// worker and nothing else. (Unless other code in the master reaps our workers behind
/// the loop's back; their watches then end with `ReapedElsewhere` at the next iteration.)
fn kill(pid: libc::pid_t, signal: Signal) {
    // Fails only for a worker already gone, whose exit is then on its way.
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
}

fn signal_all(m: &Master, signal: Signal) {
    for w in m.workers.values() {
        kill(w.pid, signal);
    }
}

/// SIGKILLs the workers `which` picks, once each: a killed worker is not killed again,
/// and what it still sends is ignored.
fn kill_workers(m: &mut Master, which: impl Fn(Slot, &WorkerInfo) -> bool) {
    for (&slot, w) in &mut m.workers {
        if !w.killed && which(slot, w) {
            w.killed = true;
            kill(w.pid, Signal::SIGKILL);
        }
    }
}

fn worker_exited(
    lp: &mut Loop<Master>,
    m: &mut Master,
    slot: Slot,
    pid: libc::pid_t,
    status: crate::Result<ExitStatus>,
) {
    let Some(info) = m.workers.remove(&slot) else {
        return;
    };
    m.peers.set(active(m));
    if let Some(io) = info.pipe {
        lp.cancel(io); // closes the master's end
    }
    // Its status is lost if other code of the master reaped it first (then the hook,
    // which takes a status, is not called).
    let status = match status {
        Ok(status) => {
            if let Some(hook) = &m.on_worker_exit {
                hook(slot, pid, status);
            }
            status.to_string()
        }
        Err(e) => {
            log::warn!("worker {pid}: {e}");
            "its status is lost".to_owned()
        }
    };
    if m.shutting_down() {
        if m.workers.is_empty() {
            lp.stop(0);
        }
        return;
    }
    if info.state == State::Draining {
        log::debug!("worker {pid} retired: {status}");
        return;
    }
    if let Some(reload) = &mut m.reload {
        if reload.pending.remove(&slot) {
            reload.failed += 1;
        }
    }
    log::warn!("worker {pid} exited unexpectedly: {status}");
    let lived = lp.now().saturating_duration_since(info.started);
    m.crash_streak = if lived < CRASH_WINDOW {
        m.crash_streak + 1
    } else {
        1
    };
    if info.state == State::Starting {
        m.startup_failures += 1;
        let old = info.replaces.and_then(|old| m.workers.get(&old));
        if let Some(old) = old {
            log::error!(
                "a new worker exited before becoming ready ({status}): the reload failed, \
                 and worker {} keeps serving",
                old.pid
            );
        }
    }
    let serving = m.workers.values().any(|w| w.state == State::Ready);
    if serving && m.startup_failures >= m.config.startup_budget {
        // The workers that are ready keep serving; what failed is a reload, not the
        // server. Counting starts again, so the next attempt gets a full budget.
        m.startup_failures = 0;
    } else if m.startup_failures >= m.config.startup_budget {
        let failure = SupervisorError::Startup {
            attempts: m.startup_failures,
            last: status,
        };
        log::error!("{failure}");
        m.failure = Some(failure);
        shutdown(lp, m, "giving up");
        return;
    }
    // The first crash is replaced at once; a streak backs off exponentially.
    let delay = match m.crash_streak {
        0 | 1 => Duration::ZERO,
        n => (Duration::from_millis(50) * 2u32.saturating_pow(n - 2)).min(MAX_BACKOFF),
    };
    if delay.is_zero() {
        reconcile(lp, m);
        report(m);
    } else {
        log::warn!("workers keep crashing; next fork in {delay:?}");
        schedule_respawn(lp, m, delay);
        report(m);
        if m.reload.is_none() && active(m) < m.target {
            let status = serving_status(m);
            m.notify.status(&format!(
                "{status}; workers keep crashing: next fork in {delay:?}"
            ));
        }
    }
}

fn schedule_respawn(lp: &mut Loop<Master>, m: &mut Master, delay: Duration) {
    if m.respawn_timer.is_some() {
        return;
    }
    let timer = lp.after(delay, |lp, m| {
        m.respawn_timer = None;
        reconcile(lp, m);
    });
    m.respawn_timer = Some(timer);
}

/// TERM/INT: drain every worker, exit when all are gone; SIGKILL after the graceful
/// timeout. A second TERM/INT kills them at once.
fn shutdown(lp: &mut Loop<Master>, m: &mut Master, why: &str) {
    let now = lp.now();
    // Before any worker drains: see `refuse_new_connections` (not for sockets a new
    // master serves on).
    if !m.handed_over {
        for bound in &m.listeners {
            bound.refuse_new_connections();
        }
        if m.shutdown_began.is_none() {
            lanes::take_in_unserved(lp, m);
        }
    }
    // A new master not ready yet goes too: the operator stops the service.
    if let Some(upgrade) = &m.upgrade {
        kill(upgrade.pid, Signal::SIGTERM);
    }
    if let Some(began) = m.shutdown_began {
        // A TERM sent to the master and then to its process group (as `timeout` and
        // some supervisors do) is one request, not two.
        if now.saturating_duration_since(began) < SECOND_SIGNAL {
            log::debug!("{why} again within {SECOND_SIGNAL:?}: taken as the same");
            return;
        }
        log::warn!("{why} again: killing the workers now");
        kill_workers(m, |_, _| true);
    } else {
        m.shutdown_began = Some(now);
        log::info!("{why}: graceful shutdown");
        m.reload = None;
        let status = m.failure.as_ref().map_or_else(
            || format!("stopping ({why}): draining {} workers", m.workers.len()),
            ToString::to_string,
        );
        // After a hand-over the service goes on, under the new master.
        if !m.handed_over {
            m.notify.stopping(&status);
        }
        let slots: Vec<Slot> = m.workers.keys().copied().collect();
        for slot in slots {
            retire(lp, m, slot);
        }
    }
    if let Some(timer) = m.respawn_timer.take() {
        lp.cancel(timer);
    }
    // The master's listener copies close now, so that once the workers have taken in
    // what is queued and closed theirs, new connections are refused, not queued unserved.
    unlink_sockets(m);
    m.listeners.clear();
    if m.workers.is_empty() {
        lp.stop(0);
    }
}

/// HUP: every worker is replaced by one forked from now on, and a serving one retires
/// only when its replacement is ready, so capacity never drops. A worker still
/// starting (forked before this HUP) is retired at once, and the worker forked in its
/// place takes over what it was to replace; a serving one whose replacement is still
/// starting gets that one's successor. So the count stays at the target.
fn rolling_restart(lp: &mut Loop<Master>, m: &mut Master) {
    if m.shutting_down() {
        return;
    }
    if let Some(upgrade) = &m.upgrade {
        // One reload at a time, as systemd sees them (RELOADING=1 … READY=1); the new
        // master's workers are new anyway.
        return log::warn!(
            "HUP: an upgrade is under way (new master {}); not reloading: send HUP again \
             once it is done",
            upgrade.pid
        );
    }
    let current: Vec<(Slot, State, Option<Slot>)> = m
        .workers
        .iter()
        .filter(|(_, w)| w.state != State::Draining && !w.killed)
        .map(|(&slot, w)| (slot, w.state, w.replaces))
        .collect();
    log::info!("HUP: replacing workers: {}", current.len());
    // Before the first READY=1 a HUP is part of the start, which that READY=1 ends.
    if m.announced && m.reload.is_none() {
        m.reload = Some(Reload::default());
        let status = format!("reloading: replacing {} workers", current.len());
        m.notify.reloading(&status);
    }
    for (slot, state, replaces) in current {
        let forked = match state {
            State::Starting => {
                retire(lp, m, slot);
                spawn(lp, m, replaces).map(Some)
            }
            _ => replace(lp, m, slot, "is reloaded"),
        };
        match forked {
            Ok(Some(new)) => {
                if let Some(reload) = &mut m.reload {
                    reload.started += 1;
                    reload.pending.insert(new);
                }
            }
            Ok(None) => {}
            Err(e) => {
                log::error!("forking a worker on HUP: {e}");
                if let Some(reload) = &mut m.reload {
                    reload.started += 1;
                    reload.failed += 1;
                }
            }
        }
    }
    report(m);
}

/// Whether an upgrade is under way, in which the count of workers stays as it is: the
/// new master was started with this one's sockets and count, and takes over lanes
/// (`reuse_port`) as they are then. Says why `signal` is refused.
fn upgrading(m: &Master, signal: &str) -> bool {
    let why = if let Some(upgrade) = &m.upgrade {
        format!("an upgrade is under way (new master {})", upgrade.pid)
    } else if m.report_to.is_some() {
        "this master is an upgrade's, not serving alone yet".to_owned()
    } else {
        return false;
    };
    log::warn!("{signal}: {why}; the count stays: send {signal} again once it is done");
    true
}

/// TTOU: one worker fewer, never below one.
fn fewer_workers(lp: &mut Loop<Master>, m: &mut Master) {
    if upgrading(m, "TTOU") {
        return;
    }
    if m.target <= 1 {
        match m.target {
            0 => log::info!("TTOU: no workers (WINCH); HUP brings them back (TTIN starts one)"),
            _ => log::info!("TTOU: already at one worker"),
        }
        return;
    }
    m.target -= 1;
    log::info!("TTOU: workers: {}", m.target);
    if m.lanes > 0 {
        // The worker of the lane that closes goes.
        lanes::trim(lp, m);
        return report(m);
    }
    let victim = m
        .workers
        .iter()
        .filter(|(_, w)| w.state != State::Draining)
        .map(|(&slot, _)| slot)
        .max();
    if let Some(slot) = victim {
        retire(lp, m, slot);
    }
    report(m);
}

/// Kills a worker silent for longer than the heartbeat timeout, or not ready within
/// it; its exit is then handled like a crash.
fn check_heartbeats(lp: &mut Loop<Master>, m: &mut Master) {
    check_memory(lp, m);
    let (now, timeout) = (lp.now(), m.config.heartbeat_timeout);
    kill_workers(m, |slot, w| {
        let quiet = now.saturating_duration_since(w.last_heard) > timeout;
        let late = now.saturating_duration_since(w.started) > timeout;
        let why = match w.state {
            State::Draining => None,
            State::Starting if late => Some("was not ready within"),
            _ if quiet => Some("sent no heartbeat for"),
            _ => None,
        };
        if let Some(why) = why {
            log::warn!(
                "worker {} (slot {slot}) {why} {timeout:?}; killing it",
                w.pid
            );
        }
        why.is_some()
    });
}

/// Recycles, through the overlap of HUP, a serving worker whose resident memory was
/// above `max_worker_memory` at this check and the one before.
fn check_memory(lp: &mut Loop<Master>, m: &mut Master) {
    let Some(limit) = m.config.max_worker_memory else {
        return;
    };
    let mut over = Vec::new();
    for (&slot, w) in &mut m.workers {
        let rss = (w.state == State::Ready)
            .then(|| rss_bytes(w.pid))
            .flatten();
        match rss.filter(|&rss| rss > limit) {
            Some(rss) => {
                w.over_memory += 1;
                if w.over_memory == 2 {
                    over.push((slot, rss));
                }
            }
            None => w.over_memory = 0,
        }
    }
    for (slot, rss) in over {
        let why = format!("uses {} MiB, above max_worker_memory", rss >> 20);
        if let Err(e) = replace(lp, m, slot, &why) {
            log::error!("forking a replacement for a worker that {why}: {e}");
        }
    }
}

/// WINCH: retire every worker and keep the master (nginx's meaning: after an upgrade,
/// the old master's workers stop while it stays to roll back to); HUP brings them back.
/// Ignored on a terminal, where resizing the window sends it.
fn retire_all(lp: &mut Loop<Master>, m: &mut Master) {
    if in_terminal_foreground() {
        return log::info!("WINCH ignored: the master runs on a terminal (a resize sends it)");
    }
    if m.shutting_down() || m.target == 0 {
        return;
    }
    log::info!("WINCH: retiring every worker; HUP brings {} back", m.target);
    m.winched = Some(m.target);
    m.target = 0;
    let slots: Vec<Slot> = m.workers.keys().copied().collect();
    for slot in slots {
        retire(lp, m, slot);
    }
    report(m);
}

/// `PATH.ctl`: the control socket beside pid file `PATH`, by default.
pub(crate) fn control_socket_beside(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".ctl");
    PathBuf::from(name)
}

/// Whether this process is in the foreground of its controlling terminal: there a
/// window resize sends it WINCH, which is then no operator's.
fn in_terminal_foreground() -> bool {
    use nix::fcntl::{open, OFlag};
    let flags = OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let Ok(tty) = open("/dev/tty", flags, nix::sys::stat::Mode::empty()) else {
        return false; // no controlling terminal
    };
    nix::unistd::tcgetpgrp(&tty).is_ok_and(|group| group == nix::unistd::getpgrp())
}

/// Binds the control socket, if configured, and answers each connection with the
/// status view.
fn listen_for_status(lp: &mut Loop<Master>, m: &mut Master) -> Result<(), SupervisorError> {
    let beside_pid_file = m.config.pid_file.as_deref().map(control_socket_beside);
    let Some(path) = m.config.control_socket.clone().or(beside_pid_file) else {
        return Ok(());
    };
    m.config.control_socket = Some(path.clone());
    let error = |source| SupervisorError::Bind {
        address: format!("unix:{} (the control socket)", path.display()),
        source,
    };
    let listener = super::listener::bind_unix(path.clone()).map_err(error)?;
    listener.set_nonblocking(true).map_err(error)?;
    m.control_path = Some(path);
    lp.watch_io(listener, Interest::READ, |lp, m, listener, _| {
        // Each asker gets the view and the close; it is small, so one write takes it.
        while let Ok((mut asker, _)) = listener.accept() {
            let view = status(lp, m).encode();
            let _ = asker.set_nonblocking(true);
            if let Err(e) = asker.write_all(view.as_bytes()) {
                log::debug!("control socket: {e}");
            }
        }
    })
    .map_err(|e| SupervisorError::Loop(e.error))?;
    Ok(())
}

/// What the master knows of its workers, by slot.
fn status(lp: &Loop<Master>, m: &Master) -> Status {
    let now = lp.now();
    let mut workers: Vec<WorkerStatus> = m
        .workers
        .iter()
        .map(|(&slot, w)| WorkerStatus {
            pid: w.pid,
            slot,
            state: w.state,
            age: now.saturating_duration_since(w.started),
            served: w.served,
            rss: rss_bytes(w.pid),
            last_heard: now.saturating_duration_since(w.last_heard),
        })
        .collect();
    workers.sort_by_key(|w| w.slot);
    Status {
        master: std::process::id() as libc::pid_t,
        workers,
    }
}

/// Removes the pid file at `path` if it names this process.
fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim().parse::<u32>() == Ok(std::process::id()));
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Writes the pid file atomically; refuses one that names a live process.
fn write_pid_file(path: &Path) -> Result<(), SupervisorError> {
    let error = |reason: String| SupervisorError::PidFile {
        path: path.to_owned(),
        reason,
    };
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Ok(pid) = text.trim().parse::<libc::pid_t>() {
            // Signal 0 only checks that the process exists (EPERM: it does, not ours).
            let probe = nix::sys::signal::kill(Pid::from_raw(pid), None);
            let alive = pid > 0 && matches!(probe, Ok(()) | Err(nix::errno::Errno::EPERM));
            if alive {
                return Err(error(format!("it names process {pid}, which is running")));
            }
        }
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id())).map_err(|e| error(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        error(e.to_string())
    })
}
