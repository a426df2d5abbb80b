//! The master: binds, forks workers through `Loop::fork`, and supervises them from its
//! own loop — `watch_process` for exits, `watch_signal` for TERM/INT/HUP/TTIN/TTOU/USR1,
//! a pipe per worker for readiness and heartbeats. No hand-written select loop, no
//! global signal handlers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::listener::Listener;
use super::worker::{self, WorkerSetup, HEARTBEAT, READY, RECYCLE};
use super::{Config, Handler, MasterHook, Server, WorkerExitHook};
use crate::{ForkOptions, Interest, Loop, Watch};

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Starting,
    Ready,
    Draining,
}

/// A worker's number, never reused in the master's life: it names the worker in the
/// master's tables and in everything the master does later (timers, replacements). A
/// pid only names a worker until it is reaped; the kernel may then give it to any new
/// process, a later worker included.
type Slot = usize;

struct WorkerInfo {
    pid: libc::pid_t,
    pipe: UnixStream,
    pipe_watch: Option<Watch>,
    state: State,
    started: Instant,
    last_heard: Instant,
    /// The worker this one replaces: retired once this one is ready (HUP, recycling).
    replaces: Option<Slot>,
}

struct Master {
    config: Config,
    handler: Rc<dyn Handler>,
    before_fork: Option<MasterHook>,
    after_fork: Option<MasterHook>,
    on_worker_exit: Option<WorkerExitHook>,
    listeners: Vec<Listener>,
    /// Every worker not yet reaped (an entry leaves when its exit is reported).
    workers: HashMap<Slot, WorkerInfo>,
    target: usize,
    next_slot: usize,
    shutting_down: bool,
    announced: bool,
    crash_streak: u32,
    respawn_timer: Option<Watch>,
    startup_failures: u32,
    failure: Option<ServerError>,
    backend: &'static str,
}

type Shared = Rc<RefCell<Master>>;

pub(crate) fn run(server: Server) -> Result<(), ServerError> {
    let config = server.config;
    if config.workers == 0 {
        return Err(ServerError::Config("--workers must be at least 1".into()));
    }
    if config.listen.is_empty() {
        return Err(ServerError::Config("no --listen address".into()));
    }
    let timeouts = [
        ("--header-timeout", config.header_timeout),
        ("--body-timeout", config.body_timeout),
        ("--heartbeat-timeout", config.heartbeat_timeout),
    ];
    if let Some((flag, _)) = timeouts.iter().find(|(_, t)| t.is_zero()) {
        return Err(ServerError::Config(format!("{flag} must be more than 0 s")));
    }
    let mut lp = config.backend.map_or_else(Loop::new, Loop::with_backend)?;
    let pid_file = config.pid_file.clone();
    let addresses = config.listen.clone();
    let master: Shared = Rc::new(RefCell::new(Master {
        target: config.workers,
        config,
        handler: Rc::from(server.handler),
        before_fork: server.before_fork,
        after_fork: server.after_fork,
        on_worker_exit: server.on_worker_exit,
        listeners: Vec::new(),
        workers: HashMap::new(),
        next_slot: 0,
        shutting_down: false,
        announced: false,
        crash_streak: 0,
        respawn_timer: None,
        startup_failures: 0,
        failure: None,
        backend: lp.backend_name(),
    }));
    // Signals first: one that arrives from here on is dispatched, not lost — and never
    // kills a master that already wrote its pid file.
    watch_signals(&master, &mut lp)?;
    for address in &addresses {
        let listener = Listener::bind(address).map_err(|source| ServerError::Bind {
            address: address.clone(),
            source,
        });
        match listener {
            Ok(listener) => master.borrow_mut().listeners.push(listener),
            Err(e) => {
                unlink_sockets(&master);
                return Err(e);
            }
        }
    }
    if let Some(path) = &pid_file {
        if let Err(e) = write_pid_file(path) {
            unlink_sockets(&master);
            return Err(e);
        }
    }
    let result = supervise(&master, &mut lp);
    unlink_sockets(&master);
    if let Some(path) = &pid_file {
        let _ = std::fs::remove_file(path);
    }
    result?;
    let failure = master.borrow_mut().failure.take();
    failure.map_or(Ok(()), Err)
}

fn unlink_sockets(master: &Shared) {
    for listener in &master.borrow().listeners {
        listener.unlink();
    }
}

fn watch_signals(master: &Shared, lp: &mut Loop) -> Result<(), ServerError> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let m = master.clone();
        lp.watch_signal(signal, move |lp, sig| shutdown(&m, lp, sig))?;
    }
    let m = master.clone();
    lp.watch_signal(libc::SIGHUP, move |lp, _| rolling_restart(&m, lp))?;
    let m = master.clone();
    lp.watch_signal(libc::SIGTTIN, move |lp, _| {
        m.borrow_mut().target += 1;
        log::info!("TTIN: workers: {}", m.borrow().target);
        reconcile(&m, lp);
    })?;
    let m = master.clone();
    lp.watch_signal(libc::SIGTTOU, move |lp, _| fewer_workers(&m, lp))?;
    let m = master.clone();
    lp.watch_signal(libc::SIGUSR1, move |_, _| {
        log::info!("USR1: workers reopen the access log");
        signal_workers(&m, libc::SIGUSR1, |_, _| true);
    })?;
    Ok(())
}

fn supervise(master: &Shared, lp: &mut Loop) -> Result<(), ServerError> {
    let m = master.clone();
    let check = (master.borrow().config.heartbeat_timeout / 4).max(Duration::from_millis(50));
    lp.every(check, move |lp| check_heartbeats(&m, lp))?;
    reconcile(master, lp);
    lp.run()?;
    Ok(())
}

/// Forks workers until `target` of them are starting or serving.
fn reconcile(master: &Shared, lp: &mut Loop) {
    loop {
        let needed = {
            let m = master.borrow();
            let active = m
                .workers
                .values()
                .filter(|w| w.state != State::Draining)
                .count();
            !m.shutting_down && m.respawn_timer.is_none() && active < m.target
        };
        if !needed {
            return;
        }
        if let Err(e) = spawn(master, lp, None) {
            log::error!("forking a worker: {e}; retrying");
            schedule_respawn(master, lp, Duration::from_millis(500));
            return;
        }
    }
}

fn spawn(master: &Shared, lp: &mut Loop, replaces: Option<Slot>) -> Result<Slot, ServerError> {
    let (master_end, worker_end) = UnixStream::pair().map_err(|source| crate::Error::Create {
        what: "a worker pipe",
        source,
    })?;
    let slot = {
        let mut m = master.borrow_mut();
        m.next_slot += 1;
        m.next_slot
    };
    if let Some(hook) = &master.borrow().before_fork {
        hook(slot);
    }
    let master_pid = std::process::id() as libc::pid_t;
    let pid = {
        let mut guard = master.borrow_mut();
        let m = &mut *guard;
        let mut worker_end = Some(worker_end);
        let mut master_end = Some(&master_end);
        let max_requests = m
            .config
            .max_requests
            .map(|n| n + jitter(m.config.max_requests_jitter));
        lp.fork(ForkOptions::new(), || {
            // The child keeps its own pipe end and the listeners, nothing else of the
            // master's: other workers' pipes would hide the master's death from them.
            master_end.take();
            drop(std::mem::take(&mut m.workers));
            let listeners = std::mem::take(&mut m.listeners);
            let setup = WorkerSetup {
                slot,
                config: &m.config,
                handler: m.handler.clone(),
                after_fork: m.after_fork.as_deref(),
                master: worker_end.take().expect("taken once"),
                master_pid,
                max_requests,
            };
            worker::run(setup, listeners)
        })?
    };
    let m2 = master.clone();
    lp.watch_process(pid, move |lp, pid, status| {
        worker_exited(&m2, lp, slot, pid, status)
    })?;
    let m2 = master.clone();
    let pipe_watch = lp.watch_io(master_end.as_raw_fd(), Interest::READ, move |lp, _| {
        worker_message(&m2, lp, slot)
    })?;
    master_end.set_nonblocking(true).ok();
    let now = Instant::now();
    master.borrow_mut().workers.insert(
        slot,
        WorkerInfo {
            pid,
            pipe: master_end,
            pipe_watch: Some(pipe_watch),
            state: State::Starting,
            started: now,
            last_heard: now,
            replaces,
        },
    );
    log::debug!("worker {slot} forked: pid {pid}");
    Ok(slot)
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

fn worker_message(master: &Shared, lp: &mut Loop, slot: Slot) {
    let mut buf = [0u8; 64];
    let (pid, read) = {
        let m = master.borrow();
        let Some(w) = m.workers.get(&slot) else {
            return;
        };
        (w.pid, (&w.pipe).read(&mut buf))
    };
    let n = match read {
        Ok(0) => {
            // EOF: the worker is gone; its exit arrives through watch_process.
            let watch = master
                .borrow_mut()
                .workers
                .get_mut(&slot)
                .and_then(|w| w.pipe_watch.take());
            if let Some(watch) = watch {
                lp.cancel(watch);
            }
            return;
        }
        Ok(n) => n,
        Err(_) => return,
    };
    for &message in &buf[..n] {
        match message {
            READY => worker_ready(master, lp, slot),
            HEARTBEAT => {}
            RECYCLE => {
                let recycle = !master.borrow().shutting_down;
                if recycle {
                    log::info!("worker {pid} reached --max-requests; replacing it");
                    if let Err(e) = spawn(master, lp, Some(slot)) {
                        log::error!("forking a replacement for {pid}: {e}");
                    }
                }
            }
            other => log::warn!("worker {pid} sent an unknown message {other:#x}"),
        }
    }
    if let Some(w) = master.borrow_mut().workers.get_mut(&slot) {
        w.last_heard = Instant::now();
    }
}

fn worker_ready(master: &Shared, lp: &mut Loop, slot: Slot) {
    let replaces = {
        let mut m = master.borrow_mut();
        let Some(w) = m.workers.get_mut(&slot) else {
            return;
        };
        if w.state != State::Starting {
            return;
        }
        w.state = State::Ready;
        let replaces = w.replaces.take();
        m.startup_failures = 0;
        replaces
    };
    if let Some(old) = replaces {
        retire(master, lp, old);
    }
    let announce = {
        let m = master.borrow();
        let ready = m
            .workers
            .values()
            .filter(|w| w.state == State::Ready)
            .count();
        !m.announced && ready >= m.target
    };
    if announce {
        let mut m = master.borrow_mut();
        m.announced = true;
        let addresses: Vec<String> = m.listeners.iter().map(Listener::address).collect();
        log::info!(
            "ready: listening on {} with workers: {}, on the {} backend (master pid {})",
            addresses.join(", "),
            m.target,
            m.backend,
            std::process::id()
        );
    }
}

/// Sends a worker into draining: it stops accepting, finishes, and exits.
fn retire(master: &Shared, lp: &mut Loop, slot: Slot) {
    let pid = {
        let mut m = master.borrow_mut();
        let Some(w) = m.workers.get_mut(&slot) else {
            return;
        };
        if w.state == State::Draining {
            return;
        }
        w.state = State::Draining;
        w.pid
    };
    kill(pid, libc::SIGTERM);
    let timeout = master.borrow().config.graceful_timeout;
    let m = master.clone();
    // Keyed by the slot, never by the pid: by the time this fires the worker may be
    // long reaped and its pid given to a later worker.
    lp.after(timeout, move |_| {
        let pid = m.borrow().workers.get(&slot).map(|w| w.pid);
        if let Some(pid) = pid {
            log::warn!("worker {pid} did not finish within the graceful timeout; killing it");
            kill(pid, libc::SIGKILL);
        }
    });
}

/// Signals a worker by the pid of its entry in `workers`. An entry leaves that table when
/// the worker's exit is reported, so its process is not yet reaped, and the pid of a
/// process that is not yet reaped cannot have been given to another: this reaches the
/// worker and nothing else. (Unless other code in the master reaps our workers behind
/// the loop's back; their watches then end with `ReapedElsewhere` at the next iteration.)
fn kill(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) };
}

fn signal_workers(master: &Shared, signal: libc::c_int, which: impl Fn(Slot, &WorkerInfo) -> bool) {
    for (&slot, w) in &master.borrow().workers {
        if which(slot, w) {
            kill(w.pid, signal);
        }
    }
}

fn worker_exited(
    master: &Shared,
    lp: &mut Loop,
    slot: Slot,
    pid: libc::pid_t,
    status: crate::Result<ExitStatus>,
) {
    let Some(info) = master.borrow_mut().workers.remove(&slot) else {
        return;
    };
    if let Some(watch) = info.pipe_watch {
        lp.cancel(watch);
    }
    // Its status is lost if other code of the master reaped it first (then the hook,
    // which takes a status, is not called).
    let status = match status {
        Ok(status) => {
            if let Some(hook) = &master.borrow().on_worker_exit {
                hook(slot, pid, status);
            }
            status.to_string()
        }
        Err(e) => {
            log::warn!("worker {pid}: {e}");
            "its status is lost".to_owned()
        }
    };
    let (shutting_down, empty) = {
        let m = master.borrow();
        (m.shutting_down, m.workers.is_empty())
    };
    if shutting_down {
        if empty {
            lp.stop(0);
        }
        return;
    }
    if info.state == State::Draining {
        log::debug!("worker {pid} retired: {status}");
        return;
    }
    log::warn!("worker {pid} exited unexpectedly: {status}");
    let lived = info.started.elapsed();
    let give_up = {
        let mut m = master.borrow_mut();
        m.crash_streak = if lived < CRASH_WINDOW {
            m.crash_streak + 1
        } else {
            1
        };
        if info.state == State::Starting {
            m.startup_failures += 1;
        }
        (m.startup_failures >= m.config.startup_budget).then_some(m.startup_failures)
    };
    if let Some(attempts) = give_up {
        let failure = ServerError::Startup {
            attempts,
            last: status,
        };
        log::error!("{failure}");
        master.borrow_mut().failure = Some(failure);
        shutdown(master, lp, libc::SIGTERM);
        return;
    }
    let streak = master.borrow().crash_streak;
    // The first crash is replaced at once; a streak backs off exponentially.
    let delay = match streak {
        0 | 1 => Duration::ZERO,
        n => (Duration::from_millis(50) * 2u32.saturating_pow(n - 2)).min(MAX_BACKOFF),
    };
    if delay.is_zero() {
        reconcile(master, lp);
    } else {
        log::warn!("workers keep crashing; next fork in {delay:?}");
        schedule_respawn(master, lp, delay);
    }
}

fn schedule_respawn(master: &Shared, lp: &mut Loop, delay: Duration) {
    if master.borrow().respawn_timer.is_some() {
        return;
    }
    let m = master.clone();
    let timer = lp.after(delay, move |lp| {
        m.borrow_mut().respawn_timer = None;
        reconcile(&m, lp);
    });
    master.borrow_mut().respawn_timer = Some(timer);
}

/// TERM/INT: drain every worker, exit when all are gone; SIGKILL after the graceful
/// timeout. A second TERM/INT kills them at once.
fn shutdown(master: &Shared, lp: &mut Loop, signal: libc::c_int) {
    let again = std::mem::replace(&mut master.borrow_mut().shutting_down, true);
    if again {
        log::warn!("signal {signal} again: killing the workers now");
        signal_workers(master, libc::SIGKILL, |_, _| true);
    } else {
        log::info!("signal {signal}: graceful shutdown");
        let slots: Vec<Slot> = master.borrow().workers.keys().copied().collect();
        for slot in slots {
            retire(master, lp, slot);
        }
    }
    if let Some(timer) = master.borrow_mut().respawn_timer.take() {
        lp.cancel(timer);
    }
    // The master's listener copies close now, so that once the workers have taken in
    // what is queued and closed theirs, new connections are refused, not queued unserved.
    unlink_sockets(master);
    master.borrow_mut().listeners.clear();
    if master.borrow().workers.is_empty() {
        lp.stop(0);
    }
}

/// HUP: a replacement for every serving worker; each old one retires only when its
/// replacement is ready, so capacity never drops.
fn rolling_restart(master: &Shared, lp: &mut Loop) {
    if master.borrow().shutting_down {
        return;
    }
    let old: Vec<(Slot, libc::pid_t)> = master
        .borrow()
        .workers
        .iter()
        .filter(|(_, w)| w.state != State::Draining)
        .map(|(&slot, w)| (slot, w.pid))
        .collect();
    log::info!("HUP: replacing workers: {}", old.len());
    for (slot, pid) in old {
        if let Err(e) = spawn(master, lp, Some(slot)) {
            log::error!("forking a replacement for {pid}: {e}");
        }
    }
}

/// TTOU: one worker fewer, never below one.
fn fewer_workers(master: &Shared, lp: &mut Loop) {
    let victim = {
        let mut m = master.borrow_mut();
        if m.target <= 1 {
            log::info!("TTOU: already at one worker");
            return;
        }
        m.target -= 1;
        log::info!("TTOU: workers: {}", m.target);
        m.workers
            .iter()
            .filter(|(_, w)| w.state != State::Draining)
            .map(|(&slot, _)| slot)
            .max()
    };
    if let Some(slot) = victim {
        retire(master, lp, slot);
    }
}

/// Kills a worker silent for longer than the heartbeat timeout (or one that never
/// became ready in that time); its exit is then handled like a crash.
fn check_heartbeats(master: &Shared, _: &mut Loop) {
    let timeout = master.borrow().config.heartbeat_timeout;
    signal_workers(master, libc::SIGKILL, |slot, w| {
        let stuck = w.state != State::Draining && w.last_heard.elapsed() > timeout;
        if stuck {
            log::warn!("worker in slot {slot} sent no heartbeat for {timeout:?}; killing it");
        }
        stuck
    });
}

/// Writes the pid file atomically; refuses one that names a live process.
fn write_pid_file(path: &Path) -> Result<(), ServerError> {
    let error = |reason: String| ServerError::PidFile {
        path: path.to_owned(),
        reason,
    };
    if let Ok(text) = std::fs::read_to_string(path) {
        if let Ok(pid) = text.trim().parse::<libc::pid_t>() {
            // SAFETY: signal 0 only checks that the process exists.
            let alive = pid > 0
                && (unsafe { libc::kill(pid, 0) } == 0
                    || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
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
